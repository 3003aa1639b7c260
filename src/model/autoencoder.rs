//! The image decoder a pipeline uses: the model's own `AutoencoderKL`, or a replacement given
//! by the user (a tiny `AutoencoderTiny` such as TAESD, or another `AutoencoderKL` such as the
//! SDXL fp16-fix VAE), found in a folder or hub repo of its own; and its encoder, for img2img.
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::tiny_vae::{TinyVaeConfig, TinyVaeDecoder, TinyVaeEncoder, VaeKind};
use super::weights::WeightsPath;
use super::{ConfigFile, ModelFiles, VaeConfig, VaeDecoder, VaeEncoder, Weights};
use crate::noise::NoiseSource;
use crate::{Error, Result};

/// A decoder's architecture.
#[derive(Debug, Clone, PartialEq)]
pub enum AutoencoderConfig {
    /// `AutoencoderKL`.
    Kl(VaeConfig),
    /// `AutoencoderTiny`.
    Tiny(TinyVaeConfig),
}

impl AutoencoderConfig {
    /// Pixels per latent along each side.
    pub fn scale_factor(&self) -> usize {
        match self {
            Self::Kl(c) => c.scale_factor(),
            Self::Tiny(c) => c.scale_factor(),
        }
    }

    /// Channels of the latents it decodes.
    pub fn latent_channels(&self) -> usize {
        match self {
            Self::Kl(c) => c.latent_channels,
            Self::Tiny(c) => c.latent_channels,
        }
    }

    /// Whether the config asks to decode in f32 when the model runs in f16.
    pub fn force_upcast(&self) -> bool {
        match self {
            Self::Kl(c) => c.force_upcast,
            Self::Tiny(c) => c.force_upcast,
        }
    }

    /// The diffusers class name.
    pub fn class_name(&self) -> &'static str {
        match self {
            Self::Kl(_) => "AutoencoderKL",
            Self::Tiny(_) => "AutoencoderTiny",
        }
    }
}

/// Where a decoder's files are, and its architecture: read (and checked) before any work.
#[derive(Debug, Clone)]
pub struct AutoencoderFiles {
    /// The architecture, from its `config.json`.
    pub config: AutoencoderConfig,
    /// Its `config.json`, for messages.
    pub config_path: PathBuf,
    /// Its weights.
    pub weights: WeightsPath,
}

impl AutoencoderFiles {
    /// The VAE in `folder` of `files` (`"vae"` inside a model, `""` for a VAE repo whose
    /// `config.json` sits at the top), of either class.
    pub fn open(files: &ModelFiles, folder: &str, prefer_fp16: bool) -> Result<Self> {
        let config_path = files.get(&in_folder(folder, "config.json"))?;
        Ok(Self {
            config: read_config(&config_path)?,
            config_path,
            weights: files
                .weights(folder, "diffusion_pytorch_model", prefer_fp16)?
                .into(),
        })
    }

    /// A VAE whose config is already read (a single file's, inferred) and its weights.
    pub fn from_config(config: ConfigFile, weights: WeightsPath) -> Result<Self> {
        Ok(Self {
            config: parse_config(&config)?,
            config_path: config.path().to_path_buf(),
            weights,
        })
    }

    /// Only the architecture of the VAE in `folder` (its weights are not looked up, so a hub
    /// model's VAE is not downloaded).
    pub fn open_config_only(files: &ModelFiles, folder: &str) -> Result<AutoencoderConfig> {
        read_config(&files.get(&in_folder(folder, "config.json"))?)
    }

    /// A VAE given on its own (a `--vae` folder or repo): `config.json` at its top (the
    /// layout of madebyollin/taesd and madebyollin/sdxl-vae-fp16-fix), else a model's `vae/`.
    pub fn open_standalone(files: &ModelFiles, prefer_fp16: bool) -> Result<Self> {
        if files.has("config.json") {
            Self::open(files, "", prefer_fp16)
        } else if files.has("vae/config.json") {
            Self::open(files, "vae", prefer_fp16)
        } else {
            Err(Error::MissingFile {
                path: files.display_path("config.json"),
                hint: " (a VAE folder holds config.json and diffusion_pytorch_model.safetensors, \
                       or a model's vae/ folder)"
                    .into(),
            })
        }
    }

    /// Loads the decoder in `dtype` on `device`.
    pub fn load(&self, device: &Device, dtype: DType) -> Result<Autoencoder> {
        let w = Weights::open_at(&self.weights, device, dtype)?;
        self.load_from(&w)
    }

    /// Loads the encoder from opened weights.
    pub fn load_encoder_from(&self, w: &Weights) -> Result<ImageEncoder> {
        Ok(match &self.config {
            AutoencoderConfig::Kl(c) => ImageEncoder::Kl(Box::new(VaeEncoder::load(w, c)?)),
            AutoencoderConfig::Tiny(c) => ImageEncoder::Tiny(Box::new(TinyVaeEncoder::load(w, c)?)),
        })
    }

    /// Loads the decoder from opened weights.
    pub fn load_from(&self, w: &Weights) -> Result<Autoencoder> {
        Ok(match &self.config {
            AutoencoderConfig::Kl(c) => Autoencoder::Kl(Box::new(VaeDecoder::load(w, c)?)),
            AutoencoderConfig::Tiny(c) => Autoencoder::Tiny(Box::new(TinyVaeDecoder::load(w, c)?)),
        })
    }
}

/// `name` inside `folder` (`""`: at the top).
fn in_folder(folder: &str, name: &str) -> String {
    if folder.is_empty() {
        name.to_string()
    } else {
        format!("{folder}/{name}")
    }
}

/// A VAE `config.json` of either class.
fn read_config(path: &Path) -> Result<AutoencoderConfig> {
    parse_config(&ConfigFile::open(path)?)
}

/// A VAE config of either class.
fn parse_config(file: &ConfigFile) -> Result<AutoencoderConfig> {
    Ok(match VaeKind::from_config(file)? {
        VaeKind::Kl => AutoencoderConfig::Kl(VaeConfig::from_config(file)?),
        VaeKind::Tiny => AutoencoderConfig::Tiny(TinyVaeConfig::from_config(file)?),
    })
}

/// A loaded decoder.
#[derive(Debug)]
pub enum Autoencoder {
    /// The KL VAE's decoder.
    Kl(Box<VaeDecoder>),
    /// The tiny VAE's decoder.
    Tiny(Box<TinyVaeDecoder>),
}

impl Autoencoder {
    /// Decodes latents as the UNet loop leaves them (b, c, h, w) into images (b, 3, H, W) in
    /// about [-1, 1], each decoder undoing its own scaling factor.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        match self {
            Self::Kl(d) => d.decode(latents),
            Self::Tiny(d) => d.decode(latents),
        }
    }
}

/// A loaded encoder.
#[derive(Debug)]
pub enum ImageEncoder {
    /// The KL VAE's encoder: a sample of a distribution.
    Kl(Box<VaeEncoder>),
    /// The tiny VAE's encoder: deterministic.
    Tiny(Box<TinyVaeEncoder>),
}

impl ImageEncoder {
    /// Images (b, 3, H, W) in about [-1, 1] -> latents (b, c, H/f, W/f) as the UNet loop reads
    /// them, f32. The KL encoder draws one sample per image from `noise` (row `i` from
    /// generator `i`); the tiny one draws nothing.
    pub fn encode(&self, images: &Tensor, noise: &mut dyn NoiseSource) -> Result<Tensor> {
        match self {
            Self::Kl(e) => e.encode(images, noise),
            Self::Tiny(e) => e.encode(images),
        }
    }

    /// Whether encoding draws from the noise generators (diffusers' `latent_dist.sample`).
    pub fn draws_noise(&self) -> bool {
        matches!(self, Self::Kl(_))
    }
}
