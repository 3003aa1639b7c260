//! Single-file checkpoints, the layout AUTOMATIC1111, ComfyUI and model-sharing sites use:
//! `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and `cond_stage_model.*` or
//! `conditioner.embedders.*` (text encoders) in one `.safetensors`.
//!
//! The family comes from the tensor names; each component is a part of the file under the
//! names its loader reads (nothing converted or copied on disk); its config is the family's
//! template (compiled in, `templates/`) with every number the tensor shapes tell. Tokenizers
//! are CLIP's, compiled in.
mod clip;
mod detect;
mod header;
#[cfg(test)]
mod tests;
mod unet;
mod vae;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use safetensors::tensor::TensorInfo;

use serde_json::{json, Map, Value};

pub use detect::{Kind, ModelType, Prediction, MODEL_TYPES};
use header::{NameMap, Sub};

use super::config::ConfigFile;
use super::weights::{read_header, FilePart, WeightsPath};
use crate::{Error, Result, Setting};

const UNET_SD1: &str = include_str!("templates/unet_sd1.json");
const UNET_SD2: &str = include_str!("templates/unet_sd2.json");
const UNET_SDXL: &str = include_str!("templates/unet_sdxl.json");
const VAE: &str = include_str!("templates/vae.json");
const TEXT_CLIP: &str = include_str!("templates/text_clip.json");
const TEXT_OPEN_CLIP: &str = include_str!("templates/text_open_clip.json");
const SCHEDULER_SD1: &str = include_str!("templates/scheduler_sd1.json");
const SCHEDULER_SD2: &str = include_str!("templates/scheduler_sd2.json");
const SCHEDULER_SDXL: &str = include_str!("templates/scheduler_sdxl.json");

/// SDXL's VAE scaling factor (SD 1.x/2.x: the template's 0.18215).
const SDXL_VAE_SCALING: f64 = 0.13025;

/// A component of a checkpoint: its config (inferred) and its part of the file.
pub struct Component {
    pub config: ConfigFile,
    pub weights: WeightsPath,
}

/// A text encoder of a checkpoint, with the pad token of its tokenizer.
pub struct TextComponent {
    pub component: Component,
    /// `<|endoftext|>` for OpenAI's CLIP, `!` for OpenCLIP.
    pub pad: &'static str,
}

/// An opened single-file checkpoint.
pub struct Checkpoint {
    pub path: PathBuf,
    pub kind: Kind,
    /// What the file says its UNet predicts, and where it says so (`None`: it does not;
    /// SD 1.x and SDXL predict noise unless marked, SD 2.x may be either).
    pub stated: Option<(Prediction, &'static str)>,
    /// In the order of the family's text encoders.
    pub text: Vec<TextComponent>,
    pub unet: Component,
    pub vae: Component,
}

impl Checkpoint {
    /// Reads the header of `path` and lays out every component (no tensor is read).
    pub fn open(path: &Path) -> Result<Self> {
        let (header, metadata) = read_header(path)?;
        let mut ckpt = Self::from_header(path, &header, &metadata)?;
        if ckpt.stated.is_none() && ckpt.kind != Kind::Sd1 {
            ckpt.stated = yaml_prediction(path);
        }
        Ok(ckpt)
    }

    /// [`Self::open`] on a header already read.
    fn from_header(
        path: &Path,
        header: &HashMap<String, TensorInfo>,
        metadata: &HashMap<String, String>,
    ) -> Result<Self> {
        let kind = detect::family(path, header)?;
        let stated = match kind {
            Kind::Sd1 => None,
            Kind::Sd2 | Kind::Sdxl => detect::stated_prediction(header, metadata),
        };
        let part = |names: NameMap| -> Result<WeightsPath> {
            Ok(WeightsPath {
                path: path.to_path_buf(),
                part: Some(Arc::new(FilePart::build(path, header, &names.entries)?)),
            })
        };
        let config = |label: &str, map: Map<String, Value>| {
            ConfigFile::from_map(PathBuf::from(format!("{} [{label}]", path.display())), map)
        };
        let sub = |prefix: &str| Sub::new(path, header, prefix);

        let (unet_template, text_parts) = match kind {
            Kind::Sd1 => (
                UNET_SD1,
                vec![("cond_stage_model.transformer.", Encoder::Clip)],
            ),
            Kind::Sd2 => (
                UNET_SD2,
                vec![("cond_stage_model.model.", Encoder::OpenClipPenultimate)],
            ),
            Kind::Sdxl => (
                UNET_SDXL,
                vec![
                    ("conditioner.embedders.0.transformer.", Encoder::Clip),
                    ("conditioner.embedders.1.model.", Encoder::OpenClipProjected),
                ],
            ),
        };
        let mut text = Vec::new();
        let mut pooled = 0;
        for (i, (prefix, encoder)) in text_parts.into_iter().enumerate() {
            let s = sub(prefix);
            let converted = match encoder {
                Encoder::Clip => clip::convert_clip(&s, TEXT_CLIP)?,
                Encoder::OpenClipPenultimate => {
                    clip::convert_open_clip(&s, TEXT_OPEN_CLIP, true, false)?
                }
                Encoder::OpenClipProjected => {
                    clip::convert_open_clip(&s, TEXT_OPEN_CLIP, false, true)?
                }
            };
            let label = if i == 0 {
                "text_encoder"
            } else {
                "text_encoder_2"
            };
            if matches!(encoder, Encoder::OpenClipProjected) {
                pooled = converted
                    .config
                    .get("projection_dim")
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
            }
            text.push(TextComponent {
                component: Component {
                    config: config(label, converted.config),
                    weights: part(converted.names)?,
                },
                pad: match encoder {
                    Encoder::Clip => "<|endoftext|>",
                    _ => "!",
                },
            });
        }
        let (mut unet_config, unet_names) = unet::convert(&sub(unet::PREFIX), kind, unet_template)?;
        if kind == Kind::Sdxl {
            // The size ids' width: what the pooled projection leaves of the input.
            if let Some(input) = unet_config
                .get("projection_class_embeddings_input_dim")
                .and_then(Value::as_u64)
            {
                unet_config.insert(
                    "addition_time_embed_dim".into(),
                    json!(input.saturating_sub(pooled) / 6),
                );
            }
        }
        let vae_sub = sub(vae::PREFIX);
        let (vae_config, vae_names) = vae::convert_ldm(&vae_sub, VAE)?;
        let mut vae_config = vae_config;
        if kind == Kind::Sdxl {
            vae_config.insert("scaling_factor".into(), json!(SDXL_VAE_SCALING));
        }
        Ok(Self {
            path: path.to_path_buf(),
            kind,
            stated,
            unet: Component {
                config: config("unet", unet_config),
                weights: part(unet_names)?,
            },
            vae: Component {
                config: config("vae", vae_config),
                weights: part(vae_names)?,
            },
            text,
        })
    }

    /// What `latent info` says about the checkpoint: one line per fact.
    pub fn describe(&self) -> Vec<String> {
        let millions = |c: &Component| {
            let n = c.weights.part.as_ref().map_or(0, |p| p.parameter_count());
            format!("{:.1} M parameters", n as f64 / 1e6)
        };
        let number = |c: &ConfigFile, key: &str| -> String {
            c.maybe::<Value>(key)
                .ok()
                .flatten()
                .map(|v| v.to_string())
                .unwrap_or_else(|| "?".into())
        };
        let mut lines = vec![format!(
            "{} checkpoint (from its tensor names)",
            self.kind.describe()
        )];
        lines.push(match (self.stated, self.kind) {
            (Some((p, how)), _) => format!("predicts: {} ({how})", p.config_value()),
            (None, Kind::Sd2) => "predicts: not stated (give the model type: sd2 or sd2-v)".into(),
            (None, _) => "predicts: epsilon (the family's)".into(),
        });
        let u = &self.unet.config;
        lines.push(format!(
            "unet: {}, block_out_channels {}, layers_per_block {}, cross_attention_dim {}, in_channels {}",
            millions(&self.unet),
            number(u, "block_out_channels"),
            number(u, "layers_per_block"),
            number(u, "cross_attention_dim"),
            number(u, "in_channels")
        ));
        for (i, t) in self.text.iter().enumerate() {
            let c = &t.component.config;
            lines.push(format!(
                "text_encoder{}: {}, hidden_size {}, num_hidden_layers {}, {}",
                if i == 0 {
                    String::new()
                } else {
                    format!("_{}", i + 1)
                },
                millions(&t.component),
                number(c, "hidden_size"),
                number(c, "num_hidden_layers"),
                if t.pad == "!" { "OpenCLIP" } else { "CLIP" }
            ));
        }
        lines.push(format!(
            "vae: {}, block_out_channels {}, scaling_factor {}",
            millions(&self.vae),
            number(&self.vae.config, "block_out_channels"),
            number(&self.vae.config, "scaling_factor")
        ));
        lines
    }

    /// The family's scheduler config (its default sampler and noise schedule) with the UNet's
    /// prediction type, as JSON text.
    pub fn scheduler_config(&self, prediction: Prediction) -> String {
        let template = match self.kind {
            Kind::Sd1 => SCHEDULER_SD1,
            Kind::Sd2 => SCHEDULER_SD2,
            Kind::Sdxl => SCHEDULER_SDXL,
        };
        let mut map: Map<String, Value> = serde_json::from_str(template).unwrap_or_default();
        map.insert("prediction_type".into(), json!(prediction.config_value()));
        Value::Object(map).to_string()
    }

    /// Settles what the UNet predicts: `given` when there is one (it must be of this family),
    /// else what the file states, else noise for SD 1.x and SDXL; an SD 2.x file that does not
    /// say is an error asking for the type. Returns the prediction and how it was decided.
    pub fn prediction(&self, given: Option<ModelType>) -> Result<(Prediction, &'static str)> {
        if let Some(t) = given {
            if t.kind != self.kind {
                return Err(Error::setting(
                    Setting::ModelType,
                    "",
                    format!(
                        "says {}, but {} is an {} checkpoint (from its tensor names)",
                        t.kind.describe(),
                        self.path.display(),
                        self.kind.describe()
                    ),
                ));
            }
            return Ok((t.prediction, "as given"));
        }
        if let Some(stated) = self.stated {
            return Ok(stated);
        }
        match self.kind {
            Kind::Sd1 | Kind::Sdxl => Ok((Prediction::Epsilon, "the family's")),
            Kind::Sd2 => Err(Error::setting(
                Setting::ModelType,
                "",
                format!(
                    "{} is an SD 2.x checkpoint, which may predict noise (512-pixel models such \
                     as 2.x-base) or v (768-pixel models such as 2.1), and neither the file nor \
                     a .yaml beside it says which: give the model type, sd2 or sd2-v",
                    self.path.display()
                ),
            )),
        }
    }
}

/// Whether `path` is a `.safetensors` checkpoint of a family latent reads (from its header).
pub fn is_checkpoint(path: &Path) -> bool {
    read_header(path).is_ok_and(|(header, _)| detect::family(path, &header).is_ok())
}

/// What an AUTOMATIC1111-style config beside the checkpoint (`NAME.yaml`, the LDM config)
/// says the UNet predicts: its `parameterization: "v"`, else noise.
fn yaml_prediction(path: &Path) -> Option<(Prediction, &'static str)> {
    let text = std::fs::read_to_string(path.with_extension("yaml")).ok()?;
    let v = text.lines().any(|line| {
        let line = line.trim();
        line.strip_prefix("parameterization:")
            .is_some_and(|value| value.trim().trim_matches(['"', '\'']) == "v")
    });
    Some(if v {
        (Prediction::V, "the .yaml beside it")
    } else {
        (Prediction::Epsilon, "the .yaml beside it")
    })
}

/// How a text encoder is stored.
#[derive(Clone, Copy)]
enum Encoder {
    /// OpenAI's CLIP in transformers' layout.
    Clip,
    /// OpenCLIP read at its penultimate layer, without projection (SD 2.x).
    OpenClipPenultimate,
    /// OpenCLIP with its last layer and the pooled projection (SDXL's second encoder).
    OpenClipProjected,
}

/// A VAE in one `.safetensors` file: the LDM layout (`encoder.down.…`, with or without the
/// `first_stage_model.` prefix of a whole checkpoint) or the diffusers one; `scaling_factor`
/// is the family's (the file cannot tell).
pub fn open_vae(path: &Path, scaling_factor: f64) -> Result<Component> {
    let (header, _) = read_header(path)?;
    let prefix = if header.keys().any(|k| k.starts_with(vae::PREFIX)) {
        vae::PREFIX
    } else {
        ""
    };
    let sub = Sub::new(path, &header, prefix);
    let (mut config, names) = if vae::is_ldm(&sub) {
        vae::convert_ldm(&sub, VAE)?
    } else if vae::is_diffusers(&sub) {
        vae::convert_diffusers(&sub, VAE)?
    } else {
        return Err(Error::setting(
            Setting::Vae,
            path.display().to_string(),
            "not a VAE: no encoder.down.* (LDM layout) or decoder.up_blocks.* (diffusers layout) \
             tensors",
        ));
    };
    config.insert("scaling_factor".into(), json!(scaling_factor));
    Ok(Component {
        config: ConfigFile::from_map(PathBuf::from(format!("{} [vae]", path.display())), config),
        weights: WeightsPath {
            path: path.to_path_buf(),
            part: Some(Arc::new(FilePart::build(path, &header, &names.entries)?)),
        },
    })
}

/// The VAE scaling factor of a family.
pub fn vae_scaling(sdxl: bool) -> f64 {
    if sdxl {
        SDXL_VAE_SCALING
    } else {
        0.18215
    }
}
