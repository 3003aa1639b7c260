//! The tiny image decoder: diffusers' `AutoencoderTiny` (TAESD for SD 1.x/2.x, TAESDXL for
//! SDXL), decoder half, built from the model's own `config.json`.
//!
//! TAESD is a distilled, attention-free autoencoder (madebyollin/taesd): plain 3x3 convolutions,
//! ReLU and nearest upsampling, about 1.2 M decoder parameters against the KL VAE's 49 M. It
//! reads the same latents as the model's VAE, so it can replace it for fast decodes and previews.
use std::path::Path;

use candle_core::Tensor;

use super::config::ConfigFile;
use super::layers::{conv2d, conv2d_no_bias, Conv2d};
use super::Weights;
use crate::{Error, Result};

/// The autoencoder classes a VAE folder may hold, told apart by `config.json`'s `_class_name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VaeKind {
    /// diffusers' `AutoencoderKL` (the model's own VAE): [`crate::model::VaeDecoder`].
    Kl,
    /// diffusers' `AutoencoderTiny` (TAESD, TAESDXL): [`TinyVaeDecoder`].
    Tiny,
}

impl VaeKind {
    /// The class a VAE `config.json` declares. A file without `_class_name` is taken for an
    /// `AutoencoderKL` (the only VAE class of SD checkpoints); any other class is an error naming
    /// the file and the field.
    pub fn from_config(f: &ConfigFile) -> Result<Self> {
        match f.maybe::<String>("_class_name")?.as_deref() {
            None | Some("AutoencoderKL") => Ok(VaeKind::Kl),
            Some("AutoencoderTiny") => Ok(VaeKind::Tiny),
            Some(other) => Err(f.error(
                "_class_name",
                format!(
                    "unsupported VAE class {other:?} (expected \"AutoencoderKL\" or \"AutoencoderTiny\")"
                ),
            )),
        }
    }
}

/// Architecture of an `AutoencoderTiny`, from its `config.json`.
///
/// `act_fn` must be `relu` and `upsample_fn` `nearest` (every released TAESD model); they are
/// checked, not stored.
#[derive(Debug, Clone, PartialEq)]
pub struct TinyVaeConfig {
    /// Image channels the encoder reads.
    pub in_channels: usize,
    /// Image channels the decoder writes.
    pub out_channels: usize,
    /// Width of each encoder stage (diffusers needs them all equal).
    pub encoder_block_out_channels: Vec<usize>,
    /// Width of each decoder stage (diffusers needs them all equal).
    pub decoder_block_out_channels: Vec<usize>,
    /// Residual blocks per encoder stage.
    pub num_encoder_blocks: Vec<usize>,
    /// Residual blocks per decoder stage.
    pub num_decoder_blocks: Vec<usize>,
    pub latent_channels: usize,
    /// Spatial factor of each upsampling between decoder stages (2).
    pub upsampling_scaling_factor: usize,
    /// Range of raw latents mapped to [0, 1] when latents are stored as bytes (encoder side).
    pub latent_magnitude: f64,
    /// Offset of that byte mapping.
    pub latent_shift: f64,
    /// The decoder divides its input by this (1.0: TAESD reads the scaled latents of the
    /// diffusion model as they are).
    pub scaling_factor: f64,
    /// Added after dividing by `scaling_factor` (0 for TAESD and TAESDXL).
    pub shift_factor: f64,
    /// Always false: diffusers' `AutoencoderTiny` overwrites the file's value with false.
    pub force_upcast: bool,
}

const TINY_VAE_KEYS: &[&str] = &[
    "in_channels",
    "out_channels",
    "encoder_block_out_channels",
    "decoder_block_out_channels",
    "act_fn",
    "upsample_fn",
    "latent_channels",
    "upsampling_scaling_factor",
    "num_encoder_blocks",
    "num_decoder_blocks",
    "latent_magnitude",
    "latent_shift",
    "force_upcast",
    "scaling_factor",
    "shift_factor",
    // Written by diffusers' `save_config` (it registers the decoder's widths under this name
    // for pipelines that compute their scale factor from it); the decoder fields rule.
    "block_out_channels",
];

/// Reads a per-stage list: non-empty, one entry per stage, each entry positive if `positive`.
fn stage_list(
    f: &ConfigFile,
    key: &str,
    default: &[usize],
    stages: Option<usize>,
    positive: bool,
) -> Result<Vec<usize>> {
    let v: Vec<usize> = f.opt(key, default.to_vec())?;
    if v.is_empty() {
        return Err(f.error(key, "is empty"));
    }
    if let Some(n) = stages {
        if v.len() != n {
            return Err(f.error(key, format!("has {} entries for {n} stages", v.len())));
        }
    }
    if positive && v.contains(&0) {
        return Err(f.error(key, format!("{v:?} has a zero entry")));
    }
    Ok(v)
}

/// diffusers' tiny encoder and decoder keep one width through all stages (a stage's residual
/// blocks are built for the width of that stage, but read the previous stage's output), so other
/// widths would fail inside diffusers too.
fn one_width(f: &ConfigFile, key: &str, widths: &[usize]) -> Result<()> {
    if widths.iter().any(|&c| c != widths[0]) {
        return Err(f.error(
            key,
            format!("{widths:?}: stages of different widths are not supported (diffusers cannot run them either)"),
        ));
    }
    Ok(())
}

impl TinyVaeConfig {
    /// Reads an `AutoencoderTiny` `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_config(&ConfigFile::open(path)?)
    }

    /// Builds the config from a parsed file: diffusers' defaults for absent keys, errors naming
    /// the file and the field for another class, unknown keys and values we cannot run.
    pub fn from_config(f: &ConfigFile) -> Result<Self> {
        if VaeKind::from_config(f)? != VaeKind::Tiny {
            let found = f.maybe::<String>("_class_name")?;
            return Err(f.error(
                "_class_name",
                match found {
                    Some(c) => format!("is {c:?}, expected \"AutoencoderTiny\""),
                    None => "missing; expected \"AutoencoderTiny\"".to_string(),
                },
            ));
        }
        f.check_known(TINY_VAE_KEYS)?;
        // diffusers lowercases the activation's name before looking it up.
        if let Some(act) = f.maybe::<String>("act_fn")? {
            if !act.eq_ignore_ascii_case("relu") {
                return Err(f.error(
                    "act_fn",
                    format!("unsupported activation {act:?} (only \"relu\" is supported)"),
                ));
            }
        }
        f.expect_one_of("upsample_fn", &["nearest".into()])?;
        let upsampling_scaling_factor: usize = f.opt("upsampling_scaling_factor", 2)?;
        if upsampling_scaling_factor != 2 {
            return Err(f.error(
                "upsampling_scaling_factor",
                format!("{upsampling_scaling_factor} is not supported (only 2)"),
            ));
        }
        let _: Option<Vec<usize>> = f.maybe("block_out_channels")?;
        let _: bool = f.opt("force_upcast", false)?;

        let default_channels = [64, 64, 64, 64];
        let num_encoder_blocks = stage_list(f, "num_encoder_blocks", &[1, 3, 3, 3], None, false)?;
        let num_decoder_blocks = stage_list(f, "num_decoder_blocks", &[3, 3, 3, 1], None, false)?;
        let encoder_block_out_channels = stage_list(
            f,
            "encoder_block_out_channels",
            &default_channels,
            Some(num_encoder_blocks.len()),
            true,
        )?;
        let decoder_block_out_channels = stage_list(
            f,
            "decoder_block_out_channels",
            &default_channels,
            Some(num_decoder_blocks.len()),
            true,
        )?;
        one_width(f, "encoder_block_out_channels", &encoder_block_out_channels)?;
        one_width(f, "decoder_block_out_channels", &decoder_block_out_channels)?;

        let positive = |key: &str, default: usize| -> Result<usize> {
            let v: usize = f.opt(key, default)?;
            if v == 0 {
                return Err(f.error(key, "must be positive"));
            }
            Ok(v)
        };
        let finite = |key: &str, default: f64| -> Result<f64> {
            let v: f64 = f.opt(key, default)?;
            if !v.is_finite() {
                return Err(f.error(key, format!("{v} is not finite")));
            }
            Ok(v)
        };
        let scaling_factor = finite("scaling_factor", 1.0)?;
        if scaling_factor == 0.0 {
            return Err(f.error("scaling_factor", "must not be 0"));
        }
        Ok(Self {
            in_channels: positive("in_channels", 3)?,
            out_channels: positive("out_channels", 3)?,
            encoder_block_out_channels,
            decoder_block_out_channels,
            num_encoder_blocks,
            num_decoder_blocks,
            latent_channels: positive("latent_channels", 4)?,
            upsampling_scaling_factor,
            latent_magnitude: finite("latent_magnitude", 3.0)?,
            latent_shift: finite("latent_shift", 0.5)?,
            scaling_factor,
            shift_factor: finite("shift_factor", 0.0)?,
            force_upcast: false,
        })
    }

    /// Pixels per latent along each side: the upsampling factor once per decoder stage but the
    /// last (8 for TAESD), the same as the KL VAE it stands in for.
    pub fn scale_factor(&self) -> usize {
        self.upsampling_scaling_factor
            .pow((self.decoder_block_out_channels.len() - 1) as u32)
    }
}

/// diffusers' `AutoencoderTinyBlock` as the tiny VAE uses it (input and output widths equal, so
/// its skip is the identity): `relu(conv3(relu(conv2(relu(conv1(x))))) + x)`.
#[derive(Debug)]
struct TinyBlock {
    convs: [Conv2d; 3],
}

impl TinyBlock {
    /// Loads `conv.0`, `conv.2`, `conv.4` (the ReLUs sit at the odd indices) at `w`.
    fn load(w: &Weights, channels: usize) -> Result<Self> {
        let conv = |i: usize| conv2d(&w.pp("conv").pp(i), channels, channels, 3, 1, 1);
        Ok(Self {
            convs: [conv(0)?, conv(2)?, conv(4)?],
        })
    }

    /// (b, c, h, w) -> (b, c, h, w).
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let [c1, c2, c3] = &self.convs;
        let h = c1.forward(xs)?.relu()?;
        let h = c2.forward(&h)?.relu()?;
        let h = c3.forward(&h)?;
        Ok((h + xs)?.relu()?)
    }
}

/// One decoder stage: residual blocks, then (all but the last stage) a nearest x2 upsampling,
/// then a 3x3 convolution (without bias, except the last stage's, which writes the image).
#[derive(Debug)]
struct TinyStage {
    blocks: Vec<TinyBlock>,
    upsample: bool,
    conv: Conv2d,
}

/// The decoder of an `AutoencoderTiny` (`decoder.layers.*`, an `nn.Sequential`).
#[derive(Debug)]
pub struct TinyVaeDecoder {
    config: TinyVaeConfig,
    conv_in: Conv2d,
    stages: Vec<TinyStage>,
}

impl TinyVaeDecoder {
    /// Loads the decoder from `w` (rooted at the `AutoencoderTiny` file; the encoder's tensors are
    /// not read).
    pub fn load(w: &Weights, config: &TinyVaeConfig) -> Result<Self> {
        let cfg = config;
        let layers = w.pp("decoder").pp("layers");
        let width = cfg.decoder_block_out_channels[0];
        // Positions in the Sequential: conv, ReLU, then per stage its blocks, the parameter-free
        // upsampling (all but the last stage) and its conv. Counting them gives the tensor names.
        let conv_in = conv2d(&layers.pp(0), cfg.latent_channels, width, 3, 1, 1)?;
        let mut index = 2;
        let n = cfg.num_decoder_blocks.len();
        let mut stages = Vec::with_capacity(n);
        for (i, &count) in cfg.num_decoder_blocks.iter().enumerate() {
            let last = i + 1 == n;
            let mut blocks = Vec::with_capacity(count);
            for _ in 0..count {
                blocks.push(TinyBlock::load(&layers.pp(index), width)?);
                index += 1;
            }
            if !last {
                index += 1;
            }
            let conv = if last {
                conv2d(&layers.pp(index), width, cfg.out_channels, 3, 1, 1)?
            } else {
                conv2d_no_bias(&layers.pp(index), width, width, 3, 1, 1)?
            };
            index += 1;
            stages.push(TinyStage {
                blocks,
                upsample: !last,
                conv,
            });
        }
        Ok(Self {
            config: config.clone(),
            conv_in,
            stages,
        })
    }

    /// The architecture this decoder was built from.
    pub fn config(&self) -> &TinyVaeConfig {
        &self.config
    }

    /// Decodes denoised latents (b, latent_channels, h, w), as the UNet loop leaves them
    /// (multiplied by the model VAE's scaling factor, which TAESD reads as they are since its
    /// own `scaling_factor` is 1), into images (b, out_channels, s*h, s*w), s =
    /// [`TinyVaeConfig::scale_factor`] (8), in about [-1, 1] (not clamped), like
    /// [`crate::model::VaeDecoder::decode`]. On the CPU with bf16 weights the latents are f32.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let dims = latents.dims();
        if dims.len() != 4 || dims[1] != self.config.latent_channels {
            return Err(Error::InvalidInput(format!(
                "tiny VAE: latents of shape {dims:?}, expected (batch, {}, height, width)",
                self.config.latent_channels
            )));
        }
        let z = (latents / self.config.scaling_factor)?;
        let z = if self.config.shift_factor != 0.0 {
            (z + self.config.shift_factor)?
        } else {
            z
        };
        // TAESD's soft clamp of its input to (-3, 3).
        let z = ((z / 3.0)?.tanh()? * 3.0)?;
        let mut xs = self.conv_in.forward(&z)?.relu()?;
        let factor = self.config.upsampling_scaling_factor;
        for stage in &self.stages {
            for block in &stage.blocks {
                xs = block.forward(&xs)?;
            }
            if stage.upsample {
                let (_, _, h, w) = xs.dims4()?;
                xs = xs.upsample_nearest2d(h * factor, w * factor)?;
            }
            xs = stage.conv.forward(&xs)?;
        }
        // TAESD writes images in [0, 1]; diffusers maps them to [-1, 1] like the KL VAE's.
        Ok(xs.affine(2.0, -1.0)?)
    }
}

/// One encoder stage: a 3x3 convolution (stride 2 and no bias after the first stage), then
/// residual blocks.
#[derive(Debug)]
struct TinyEncoderStage {
    conv: Conv2d,
    blocks: Vec<TinyBlock>,
}

/// The encoder of an `AutoencoderTiny` (`encoder.layers.*`, an `nn.Sequential`): images to
/// latents directly (no distribution, so nothing random is drawn).
#[derive(Debug)]
pub struct TinyVaeEncoder {
    config: TinyVaeConfig,
    stages: Vec<TinyEncoderStage>,
    conv_out: Conv2d,
}

impl TinyVaeEncoder {
    /// Loads the encoder from `w` (rooted at the `AutoencoderTiny` file).
    pub fn load(w: &Weights, config: &TinyVaeConfig) -> Result<Self> {
        let cfg = config;
        let layers = w.pp("encoder").pp("layers");
        let mut index = 0;
        let mut stages = Vec::with_capacity(cfg.num_encoder_blocks.len());
        for (i, (&count, &width)) in cfg
            .num_encoder_blocks
            .iter()
            .zip(&cfg.encoder_block_out_channels)
            .enumerate()
        {
            let conv = if i == 0 {
                conv2d(&layers.pp(index), cfg.in_channels, width, 3, 1, 1)?
            } else {
                conv2d_no_bias(&layers.pp(index), width, width, 3, 2, 1)?
            };
            index += 1;
            let mut blocks = Vec::with_capacity(count);
            for _ in 0..count {
                blocks.push(TinyBlock::load(&layers.pp(index), width)?);
                index += 1;
            }
            stages.push(TinyEncoderStage { conv, blocks });
        }
        let last = *cfg.encoder_block_out_channels.last().unwrap_or(&0);
        let conv_out = conv2d(&layers.pp(index), last, cfg.latent_channels, 3, 1, 1)?;
        Ok(Self {
            config: config.clone(),
            stages,
            conv_out,
        })
    }

    /// Latents as the UNet loop reads them (times the model's scaling factor, which TAESD's
    /// own `scaling_factor` of 1 leaves as they are) of images (b, 3, H, W) in [-1, 1]. f32.
    pub fn encode(&self, images: &Tensor) -> Result<Tensor> {
        // TAESD reads images in [0, 1].
        let mut xs = images.affine(0.5, 0.5)?;
        for stage in &self.stages {
            xs = stage.conv.forward(&xs)?;
            for block in &stage.blocks {
                xs = block.forward(&xs)?;
            }
        }
        let z = self
            .conv_out
            .forward(&xs)?
            .to_dtype(candle_core::DType::F32)?;
        let z = if self.config.shift_factor != 0.0 {
            (z - self.config.shift_factor)?
        } else {
            z
        };
        Ok((z * self.config.scaling_factor)?)
    }
}
