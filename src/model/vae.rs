//! The image decoder: diffusers' `AutoencoderKL` decoder half, built from `vae/config.json`
//! (the encoder half is in `vae_encoder.rs`).
use candle_core::Tensor;

use super::config::VaeConfig;
use super::layers::{
    conv2d, group_norm, Conv2d, GroupNorm, MultiHeadAttention, ResnetBlock, ResnetConfig, Upsample,
};
use super::Weights;
use crate::Result;

/// diffusers' VAE resnets and norms use eps 1e-6.
pub(crate) const VAE_EPS: f64 = 1e-6;

/// Single-head self-attention over the pixels of a feature map, with its group norm and
/// residual (the VAE mid block's `Attention`).
#[derive(Debug)]
pub(crate) struct SpatialSelfAttention {
    group_norm: GroupNorm,
    attn: MultiHeadAttention,
}

impl SpatialSelfAttention {
    pub(crate) fn load(w: &Weights, channels: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            group_norm: group_norm(&w.pp("group_norm"), groups, channels, VAE_EPS)?,
            attn: MultiHeadAttention::load(w, channels, channels, 1, channels, true)?,
        })
    }

    /// (b, c, h, w) -> (b, c, h, w).
    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let tokens = self
            .group_norm
            .forward(xs)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let out = self.attn.forward(&tokens, None)?;
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        Ok((out + xs)?)
    }
}

/// A resnet block of the VAE (no time embedding, eps 1e-6) at `w`.
pub(crate) fn vae_resnet(
    w: &Weights,
    inc: usize,
    outc: usize,
    groups: usize,
) -> Result<ResnetBlock> {
    ResnetBlock::load(
        w,
        ResnetConfig {
            in_channels: inc,
            out_channels: outc,
            temb_channels: None,
            groups,
            eps: VAE_EPS,
            output_scale_factor: 1.0,
        },
    )
}

/// The decoder of an `AutoencoderKL` (with its `post_quant_conv`).
#[derive(Debug)]
pub struct VaeDecoder {
    config: VaeConfig,
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid_resnet_1: ResnetBlock,
    mid_attention: Option<SpatialSelfAttention>,
    mid_resnet_2: ResnetBlock,
    up: Vec<(Vec<ResnetBlock>, Option<Upsample>)>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl VaeDecoder {
    /// Loads the decoder from `w` (rooted at the VAE file; the encoder's tensors are not read).
    pub fn load(w: &Weights, config: &VaeConfig) -> Result<Self> {
        let cfg = config;
        let g = cfg.norm_num_groups;
        let resnet = |w: &Weights, inc: usize, outc: usize| vae_resnet(w, inc, outc, g);
        let d = w.pp("decoder");
        let top = *cfg.block_out_channels.last().unwrap_or(&0);
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(conv2d(
                &w.pp("post_quant_conv"),
                cfg.latent_channels,
                cfg.latent_channels,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        let mid = d.pp("mid_block");
        let mid_attention = if cfg.mid_block_add_attention {
            Some(SpatialSelfAttention::load(
                &mid.pp("attentions").pp(0),
                top,
                g,
            )?)
        } else {
            None
        };
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let n = rev.len();
        let mut up = Vec::with_capacity(n);
        let mut prev = rev[0];
        for (i, &out_ch) in rev.iter().enumerate() {
            let wb = d.pp("up_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    resnet(
                        &wb.pp("resnets").pp(j),
                        if j == 0 { prev } else { out_ch },
                        out_ch,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let upsample = if i + 1 < n {
                Some(Upsample::load(&wb.pp("upsamplers").pp(0), out_ch)?)
            } else {
                None
            };
            up.push((resnets, upsample));
            prev = out_ch;
        }
        let bottom = rev[n - 1];
        Ok(Self {
            post_quant_conv,
            conv_in: conv2d(&d.pp("conv_in"), cfg.latent_channels, top, 3, 1, 1)?,
            mid_resnet_1: resnet(&mid.pp("resnets").pp(0), top, top)?,
            mid_attention,
            mid_resnet_2: resnet(&mid.pp("resnets").pp(1), top, top)?,
            up,
            conv_norm_out: group_norm(&d.pp("conv_norm_out"), g, bottom, VAE_EPS)?,
            conv_out: conv2d(&d.pp("conv_out"), bottom, cfg.out_channels, 3, 1, 1)?,
            config: config.clone(),
        })
    }

    /// The architecture this decoder was built from.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Decodes denoised latents (b, latent_channels, h, w), as the UNet loop leaves them
    /// (i.e. still multiplied by the scaling factor), into images (b, 3, 8h, 8w) in [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let z = (latents / self.config.scaling_factor)?;
        let z = if self.config.shift_factor != 0.0 {
            (z + self.config.shift_factor)?
        } else {
            z
        };
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(&z)?,
            None => z,
        };
        let mut xs = self.conv_in.forward(&z)?;
        xs = self.mid_resnet_1.forward(&xs, None)?;
        if let Some(attn) = &self.mid_attention {
            xs = attn.forward(&xs)?;
        }
        xs = self.mid_resnet_2.forward(&xs, None)?;
        for (resnets, upsample) in &self.up {
            for r in resnets {
                xs = r.forward(&xs, None)?;
            }
            if let Some(u) = upsample {
                xs = u.forward(&xs, None)?;
            }
        }
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }
}
