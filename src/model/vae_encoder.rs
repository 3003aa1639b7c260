//! The image encoder: diffusers' `AutoencoderKL` encoder half (with `quant_conv`), built from
//! `vae/config.json`, for img2img and inpainting.
use candle_core::{DType, Tensor};

use super::config::VaeConfig;
use super::layers::{conv2d, group_norm, Conv2d, Downsample, GroupNorm, ResnetBlock};
use super::vae::{vae_resnet, SpatialSelfAttention, VAE_EPS};
use super::Weights;
use crate::noise::NoiseSource;
use crate::Result;

/// The encoder of an `AutoencoderKL`: images to the moments (mean and log-variance) of the
/// latent distribution.
#[derive(Debug)]
pub struct VaeEncoder {
    config: VaeConfig,
    conv_in: Conv2d,
    down: Vec<(Vec<ResnetBlock>, Option<Downsample>)>,
    mid_resnet_1: ResnetBlock,
    mid_attention: Option<SpatialSelfAttention>,
    mid_resnet_2: ResnetBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
}

impl VaeEncoder {
    /// Loads the encoder from `w` (rooted at the VAE file; the decoder's tensors are not read).
    pub fn load(w: &Weights, config: &VaeConfig) -> Result<Self> {
        let cfg = config;
        let g = cfg.norm_num_groups;
        let resnet = |w: &Weights, inc: usize, outc: usize| vae_resnet(w, inc, outc, g);
        let e = w.pp("encoder");
        let first = *cfg.block_out_channels.first().unwrap_or(&0);
        let top = *cfg.block_out_channels.last().unwrap_or(&0);
        let n = cfg.block_out_channels.len();
        let mut down = Vec::with_capacity(n);
        let mut prev = first;
        for (i, &out_ch) in cfg.block_out_channels.iter().enumerate() {
            let wb = e.pp("down_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    resnet(
                        &wb.pp("resnets").pp(j),
                        if j == 0 { prev } else { out_ch },
                        out_ch,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            // diffusers' `DownEncoderBlock2D`: padding 0, padded (0, 1, 0, 1) by hand.
            let downsample = if i + 1 < n {
                Some(Downsample::load(&wb.pp("downsamplers").pp(0), out_ch, 0)?)
            } else {
                None
            };
            down.push((resnets, downsample));
            prev = out_ch;
        }
        let mid = e.pp("mid_block");
        let mid_attention = if cfg.mid_block_add_attention {
            Some(SpatialSelfAttention::load(
                &mid.pp("attentions").pp(0),
                top,
                g,
            )?)
        } else {
            None
        };
        let moments = 2 * cfg.latent_channels;
        let quant_conv = if cfg.use_quant_conv {
            Some(conv2d(&w.pp("quant_conv"), moments, moments, 1, 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            conv_in: conv2d(&e.pp("conv_in"), cfg.in_channels, first, 3, 1, 1)?,
            down,
            mid_resnet_1: resnet(&mid.pp("resnets").pp(0), top, top)?,
            mid_attention,
            mid_resnet_2: resnet(&mid.pp("resnets").pp(1), top, top)?,
            conv_norm_out: group_norm(&e.pp("conv_norm_out"), g, top, VAE_EPS)?,
            conv_out: conv2d(&e.pp("conv_out"), top, moments, 3, 1, 1)?,
            quant_conv,
            config: config.clone(),
        })
    }

    /// The architecture this encoder was built from.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Images (b, 3, H, W) in [-1, 1] -> moments (b, 2 * latent_channels, H/f, W/f): the mean,
    /// then the log-variance (diffusers' `DiagonalGaussianDistribution` parameters).
    pub fn moments(&self, images: &Tensor) -> Result<Tensor> {
        let mut xs = self.conv_in.forward(images)?;
        for (resnets, downsample) in &self.down {
            for r in resnets {
                xs = r.forward(&xs, None)?;
            }
            if let Some(d) = downsample {
                xs = d.forward(&xs)?;
            }
        }
        xs = self.mid_resnet_1.forward(&xs, None)?;
        if let Some(attn) = &self.mid_attention {
            xs = attn.forward(&xs)?;
        }
        xs = self.mid_resnet_2.forward(&xs, None)?;
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        let xs = self.conv_out.forward(&xs)?;
        match &self.quant_conv {
            Some(c) => c.forward(&xs),
            None => Ok(xs),
        }
    }

    /// Latents as the UNet loop reads them (times the scaling factor, minus the shift) of
    /// images (b, 3, H, W) in [-1, 1]: a sample of the latent distribution, with row `i`'s
    /// noise drawn from `noise`'s generator `i` (diffusers' `latent_dist.sample(generator)`,
    /// one draw of the latents' shape per image). f32.
    pub fn encode(&self, images: &Tensor, noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let moments = self.moments(images)?.to_dtype(DType::F32)?;
        let c = self.config.latent_channels;
        let mean = moments.narrow(1, 0, c)?;
        let logvar = moments.narrow(1, c, c)?.clamp(-30f32, 20f32)?;
        let std = (logvar * 0.5)?.exp()?;
        let eps = noise.randn(mean.dims(), mean.device())?;
        let z = (mean + (std * eps)?)?;
        let z = if self.config.shift_factor != 0.0 {
            (z - self.config.shift_factor)?
        } else {
            z
        };
        Ok((z * self.config.scaling_factor)?)
    }
}
