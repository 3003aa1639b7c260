//! What a single-file checkpoint is: the family, from its tensor names, and what its UNet
//! predicts, from a marker tensor or the file's model-spec metadata where it says so.
use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::TensorInfo;

use crate::{Error, Result, Setting};

/// The checkpoint families `latent` reads from single files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// SD 1.x: OpenAI's CLIP ViT-L under `cond_stage_model.transformer`.
    Sd1,
    /// SD 2.x: OpenCLIP ViT-H under `cond_stage_model.model`, read at its penultimate layer.
    Sd2,
    /// SDXL base: CLIP ViT-L and OpenCLIP ViT-bigG under `conditioner.embedders.0/1`.
    Sdxl,
}

impl Kind {
    /// How messages name it.
    pub fn describe(self) -> &'static str {
        match self {
            Kind::Sd1 => "SD 1.x",
            Kind::Sd2 => "SD 2.x",
            Kind::Sdxl => "SDXL",
        }
    }
}

/// What the UNet predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    /// The noise (`epsilon`).
    Epsilon,
    /// The velocity (`v_prediction`: SD 2.x 768 models).
    V,
}

impl Prediction {
    /// The scheduler config's `prediction_type`.
    pub fn config_value(self) -> &'static str {
        match self {
            Prediction::Epsilon => "epsilon",
            Prediction::V => "v_prediction",
        }
    }
}

/// What a user says a checkpoint is: `sd1`, `sd2`, `sd2-v`, `sdxl` or `sdxl-v`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelType {
    pub kind: Kind,
    pub prediction: Prediction,
}

/// The values [`ModelType`] accepts, for messages.
pub const MODEL_TYPES: &str = "sd1, sd2, sd2-v, sdxl, sdxl-v";

impl std::str::FromStr for ModelType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let (kind, prediction) = match s.trim().to_ascii_lowercase().as_str() {
            "sd1" => (Kind::Sd1, Prediction::Epsilon),
            "sd2" => (Kind::Sd2, Prediction::Epsilon),
            "sd2-v" => (Kind::Sd2, Prediction::V),
            "sdxl" => (Kind::Sdxl, Prediction::Epsilon),
            "sdxl-v" => (Kind::Sdxl, Prediction::V),
            _ => {
                return Err(Error::setting(
                    Setting::ModelType,
                    s,
                    format!("unknown model type (one of {MODEL_TYPES})"),
                ))
            }
        };
        Ok(Self { kind, prediction })
    }
}

/// The family of the checkpoint at `path` from its tensor names; files that are something
/// else (a VAE, a LoRA, a diffusers component, another architecture) are errors saying so.
pub(super) fn family(path: &Path, header: &HashMap<String, TensorInfo>) -> Result<Kind> {
    let has = |start: &str| header.keys().any(|k| k.starts_with(start));
    let not = |what: &str| {
        Error::setting(
            Setting::Model,
            path.display().to_string(),
            format!("{what}, not a Stable Diffusion checkpoint"),
        )
    };
    if !has("model.diffusion_model.") {
        return Err(if has("encoder.down") || has("first_stage_model.") {
            not("a VAE (give it as the VAE)")
        } else if has("lora_unet_") || has("lora_te") || header.keys().any(|k| k.contains("lora_A"))
        {
            not("a LoRA (give it as a LoRA)")
        } else if has("down_blocks.") || has("text_model.") {
            not("one component of a diffusers model (load the model's folder)")
        } else {
            not("neither an SD 1.x/2.x/SDXL checkpoint nor a VAE")
        });
    }
    if has("model.diffusion_model.joint_blocks.") || has("model.diffusion_model.double_blocks.") {
        return Err(not("an SD3 or Flux model"));
    }
    if has("conditioner.embedders.1.model.") {
        Ok(Kind::Sdxl)
    } else if has("conditioner.embedders.0.model.") {
        Err(not("an SDXL refiner (latent runs SDXL base models)"))
    } else if has("cond_stage_model.model.") {
        Ok(Kind::Sd2)
    } else if has("cond_stage_model.transformer.") {
        Ok(Kind::Sd1)
    } else {
        Err(not(
            "a UNet without its text encoder (no cond_stage_model or conditioner tensors)",
        ))
    }
}

/// What the file itself says its UNet predicts, and where it says it: a `v_pred` marker
/// tensor, or the model spec's `modelspec.prediction_type` / a `-v` architecture.
pub(super) fn stated_prediction(
    header: &HashMap<String, TensorInfo>,
    metadata: &HashMap<String, String>,
) -> Option<(Prediction, &'static str)> {
    if header.contains_key("v_pred") {
        return Some((Prediction::V, "its v_pred tensor"));
    }
    if let Some(p) = metadata.get("modelspec.prediction_type") {
        match p.trim() {
            "v" | "v_prediction" => return Some((Prediction::V, "its modelspec metadata")),
            "epsilon" | "eps" => return Some((Prediction::Epsilon, "its modelspec metadata")),
            _ => {}
        }
    }
    let architecture = metadata.get("modelspec.architecture")?;
    architecture
        .ends_with("-v")
        .then_some((Prediction::V, "its modelspec metadata"))
}
