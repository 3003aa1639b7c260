//! What a model is made of, read before anything loads: its family, tokenizers, configs and
//! where each component's weights are, from a diffusers folder or a single-file checkpoint.
use std::path::{Path, PathBuf};

use super::{LoadOptions, TextEncoderFiles};
use crate::model::autoencoder::{AutoencoderConfig, AutoencoderFiles};
use crate::model::family::{Family, PIPELINE_CLASSES};
use crate::model::single_file::{self, Checkpoint, Kind};
use crate::model::weights::WeightsPath;
use crate::model::{ConfigFile, ModelFiles, UNetConfig};
use crate::schedulers::SchedulerConfig;
use crate::text::{ClipTextConfig, ClipTokenizer};
use crate::{Error, Result, Setting};

/// Everything [`super::StableDiffusion`] needs from a model's files.
pub(super) struct ModelParts {
    pub family: Family,
    pub force_zeros_for_empty_prompt: bool,
    pub text: Vec<TextEncoderFiles>,
    pub unet_config: UNetConfig,
    /// Where the UNet config came from, for messages.
    pub unet_config_path: PathBuf,
    pub unet_path: WeightsPath,
    pub vae: AutoencoderFiles,
    /// The model's own VAE's architecture when `vae` replaces it.
    pub own_vae: Option<AutoencoderConfig>,
    pub scheduler_config: SchedulerConfig,
    pub scheduler_path: PathBuf,
    /// For a single file: what it was read as, and how that was decided.
    pub detected: Option<String>,
}

/// Files of a tokenizer folder (a tokenizer.json, or vocab.json + merges.txt, plus configs).
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// Loads the tokenizer in the model's `folder` (fetching its files from the hub if needed).
fn load_tokenizer(files: &ModelFiles, folder: &str) -> Result<ClipTokenizer> {
    let mut dir = None;
    for f in TOKENIZER_FILES {
        let rel = format!("{folder}/{f}");
        if files.has(&rel) {
            let path = files.get(&rel)?;
            dir = path.parent().map(Path::to_path_buf);
        }
    }
    let dir = match dir {
        Some(d) => d,
        // Nothing there: let the error name the file a CLIP tokenizer needs.
        None => files.get(&format!("{folder}/vocab.json"))?,
    };
    ClipTokenizer::from_dir(&dir)
}

/// The configs and tokenizers of a diffusers folder (a model, or the `config` of a single
/// file), without weights.
struct FolderConfigs {
    class: String,
    family: Family,
    force_zeros_for_empty_prompt: bool,
    text: Vec<(ClipTextConfig, ClipTokenizer)>,
    unet_config: UNetConfig,
    unet_config_path: PathBuf,
    scheduler_config: SchedulerConfig,
    scheduler_path: PathBuf,
}

fn folder_configs(files: &ModelFiles) -> Result<FolderConfigs> {
    let index = ConfigFile::open(&files.get("model_index.json")?)?;
    let class: String = index.req("_class_name")?;
    let family = Family::from_pipeline_class(&class).ok_or_else(|| {
        index.error(
            "_class_name",
            format!(
                "{class} is not supported (latent runs {})",
                PIPELINE_CLASSES.join(", ")
            ),
        )
    })?;
    let force_zeros_for_empty_prompt =
        family == Family::StableDiffusionXl && index.opt("force_zeros_for_empty_prompt", true)?;
    let mut text = Vec::new();
    for &(folder, tokenizer_folder, _, _) in family.encoders() {
        let config_rel = format!("{folder}/config.json");
        if !files.has(&config_rel) {
            return Err(Error::MissingFile {
                path: files.display_path(&config_rel),
                hint: format!(" ({class} needs the text encoder `{folder}`)"),
            });
        }
        let config = ClipTextConfig::from_file(&files.get(&config_rel)?)?;
        let tokenizer = load_tokenizer(files, tokenizer_folder)?;
        if tokenizer.max_length() > config.max_position_embeddings {
            return Err(Error::config(
                files.get(&format!("{tokenizer_folder}/tokenizer_config.json"))?,
                "model_max_length",
                format!(
                    "is {}, but {folder} has only {} positions",
                    tokenizer.max_length(),
                    config.max_position_embeddings
                ),
            ));
        }
        if let Some(id) = tokenizer.largest_id() {
            if id as usize >= config.vocab_size {
                return Err(Error::config(
                    files.get(&config_rel)?,
                    "vocab_size",
                    format!(
                        "is {}, but {tokenizer_folder} produces ids up to {id}: the tokenizer \
                         does not belong to this text encoder",
                        config.vocab_size
                    ),
                ));
            }
        }
        text.push((config, tokenizer));
    }
    let unet_config_path = files.get("unet/config.json")?;
    let unet_config = UNetConfig::from_file(&unet_config_path)?;
    let scheduler_path = files.get("scheduler/scheduler_config.json")?;
    let scheduler_config = SchedulerConfig::from_file(&scheduler_path)?;
    Ok(FolderConfigs {
        class,
        family,
        force_zeros_for_empty_prompt,
        text,
        unet_config,
        unet_config_path,
        scheduler_config,
        scheduler_path,
    })
}

/// A diffusers folder or hub repo.
pub(super) fn from_folder(
    files: &ModelFiles,
    options: &LoadOptions,
    prefer_fp16: bool,
) -> Result<ModelParts> {
    let c = folder_configs(files)?;
    let mut text = Vec::new();
    for ((config, tokenizer), &(folder, _, output, projection)) in
        c.text.into_iter().zip(c.family.encoders())
    {
        text.push(TextEncoderFiles {
            tokenizer,
            config,
            path: files.weights(folder, "model", prefer_fp16)?.into(),
            output,
            projection,
        });
    }
    let unet_path = files
        .weights("unet", "diffusion_pytorch_model", prefer_fp16)?
        .into();
    let (vae, own_vae) = match options.vae {
        Some(vae_files) => {
            let own = if files.has("vae/config.json") {
                Some(AutoencoderFiles::open_config_only(files, "vae")?)
            } else {
                None
            };
            (replacement_vae(vae_files, c.family, prefer_fp16)?, own)
        }
        None => (AutoencoderFiles::open(files, "vae", prefer_fp16)?, None),
    };
    Ok(ModelParts {
        family: c.family,
        force_zeros_for_empty_prompt: c.force_zeros_for_empty_prompt,
        text,
        unet_config: c.unet_config,
        unet_config_path: c.unet_config_path,
        unet_path,
        vae,
        own_vae,
        scheduler_config: c.scheduler_config,
        scheduler_path: c.scheduler_path,
        detected: None,
    })
}

/// A VAE given in place of the model's: a folder or repo, or a single `.safetensors` file
/// (whose scaling factor is the family's).
fn replacement_vae(
    vae: &ModelFiles,
    family: Family,
    prefer_fp16: bool,
) -> Result<AutoencoderFiles> {
    match vae.single_file() {
        Some(path) => {
            let part = single_file::open_vae(
                path,
                single_file::vae_scaling(family == Family::StableDiffusionXl),
            )?;
            AutoencoderFiles::from_config(part.config, part.weights)
        }
        None => AutoencoderFiles::open_standalone(vae, prefer_fp16),
    }
}

/// A single-file checkpoint at `path`; its configs are inferred, or read from the diffusers
/// folder `options.model_config` (as diffusers' `from_single_file(config=...)`).
pub(super) fn from_single_file(
    path: &Path,
    options: &LoadOptions,
    prefer_fp16: bool,
) -> Result<ModelParts> {
    let ckpt = Checkpoint::open(path)?;
    let family = match ckpt.kind {
        Kind::Sd1 | Kind::Sd2 => Family::StableDiffusion,
        Kind::Sdxl => Family::StableDiffusionXl,
    };
    let weights: Vec<WeightsPath> = ckpt
        .text
        .iter()
        .map(|t| t.component.weights.clone())
        .collect();
    let (text_parts, unet_config, unet_config_path, scheduler, force_zeros, detected) =
        match options.model_config {
            Some(config_files) => {
                let c = folder_configs(config_files)?;
                if c.family != family {
                    return Err(Error::setting(
                        Setting::ModelConfig,
                        config_files.name(),
                        format!(
                            "is a {} folder ({}), but {} is an {} checkpoint",
                            c.family.name(),
                            c.class,
                            path.display(),
                            ckpt.kind.describe()
                        ),
                    ));
                }
                if options.model_type.is_some() {
                    return Err(Error::setting(
                        Setting::ModelType,
                        "",
                        "cannot be given with a config folder, whose scheduler config says what \
                         the model predicts",
                    ));
                }
                let detected = format!(
                    "{} checkpoint, configs from {}",
                    ckpt.kind.describe(),
                    config_files.name()
                );
                (
                    c.text,
                    c.unet_config,
                    c.unet_config_path,
                    (c.scheduler_config, c.scheduler_path),
                    c.force_zeros_for_empty_prompt,
                    detected,
                )
            }
            None => {
                let (prediction, how) = ckpt.prediction(options.model_type)?;
                let mut text = Vec::new();
                for t in &ckpt.text {
                    let tokenizer = ClipTokenizer::builtin(t.pad)?;
                    text.push((ClipTextConfig::from_config(&t.component.config)?, tokenizer));
                }
                let mut unet = UNetConfig::from_config(&ckpt.unet.config)?;
                if ckpt.kind == Kind::Sd2 && prediction == single_file::Prediction::V {
                    // SD 2.x v-prediction models are the 768-pixel ones, and their diffusers
                    // config upcasts attention (it overflows in f16 otherwise).
                    unet.sample_size = 96;
                    unet.upcast_attention = true;
                }
                let scheduler_path = PathBuf::from(format!("{} [scheduler]", path.display()));
                let scheduler = SchedulerConfig::from_json(
                    &ckpt.scheduler_config(prediction),
                    &scheduler_path,
                )?;
                let detected = format!(
                    "{} checkpoint, {} ({how})",
                    ckpt.kind.describe(),
                    match prediction {
                        single_file::Prediction::Epsilon => "predicts noise",
                        single_file::Prediction::V => "v-prediction",
                    }
                );
                let config_path = PathBuf::from(format!("{} [unet]", path.display()));
                (
                    text,
                    unet,
                    config_path,
                    (scheduler, scheduler_path),
                    ckpt.kind == Kind::Sdxl,
                    detected,
                )
            }
        };
    let mut text = Vec::new();
    for (((config, tokenizer), weights), &(_, _, output, projection)) in
        text_parts.into_iter().zip(weights).zip(family.encoders())
    {
        text.push(TextEncoderFiles {
            tokenizer,
            config,
            path: weights,
            output,
            projection,
        });
    }
    let own = match options.model_config {
        Some(config_files) => AutoencoderFiles::from_config(
            ConfigFile::open(&config_files.get("vae/config.json")?)?,
            ckpt.vae.weights.clone(),
        )?,
        None => AutoencoderFiles::from_config(ckpt.vae.config, ckpt.vae.weights.clone())?,
    };
    let (vae, own_vae) = match options.vae {
        Some(vae_files) => (
            replacement_vae(vae_files, family, prefer_fp16)?,
            Some(own.config),
        ),
        None => (own, None),
    };
    Ok(ModelParts {
        family,
        force_zeros_for_empty_prompt: force_zeros,
        text,
        unet_config,
        unet_config_path,
        unet_path: ckpt.unet.weights,
        vae,
        own_vae,
        scheduler_config: scheduler.0,
        scheduler_path: scheduler.1,
        detected: Some(detected),
    })
}
