//! Building blocks shared by the UNet and the VAE, loaded from diffusers-named weights.
//!
//! Layers are plain candle ops for now; each is one place to swap in a faster kernel later.
use candle_core::{DType, Module, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, LayerNorm, Linear};

use super::Weights;
use crate::Result;

/// `nn.Linear(in, out, bias)` at `w`.
pub fn linear(w: &Weights, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
    let weight = w.get(&[out_dim, in_dim], "weight")?;
    let bias = if bias {
        Some(w.get(&[out_dim], "bias")?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
}

/// `nn.Conv2d(in, out, k, stride, padding)` with bias at `w`.
pub fn conv2d(
    w: &Weights,
    in_ch: usize,
    out_ch: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<Conv2d> {
    let weight = w.get(&[out_ch, in_ch, kernel, kernel], "weight")?;
    let bias = w.get(&[out_ch], "bias")?;
    let cfg = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    Ok(Conv2d::new(weight, Some(bias), cfg))
}

/// `nn.GroupNorm(groups, channels, eps)` at `w`.
pub fn group_norm(w: &Weights, groups: usize, channels: usize, eps: f64) -> Result<GroupNorm> {
    let weight = w.get(&[channels], "weight")?;
    let bias = w.get(&[channels], "bias")?;
    Ok(GroupNorm::new(weight, bias, channels, groups, eps)?)
}

/// `nn.LayerNorm(dim, eps)` at `w`.
pub fn layer_norm(w: &Weights, dim: usize, eps: f64) -> Result<LayerNorm> {
    let weight = w.get(&[dim], "weight")?;
    let bias = w.get(&[dim], "bias")?;
    Ok(LayerNorm::new(weight, bias, eps))
}

/// Scaled dot-product attention over (batch, heads, seq, head_dim) tensors; the softmax is
/// computed in f32 whatever the input dtype (diffusers' upcast_softmax), output in input dtype.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let in_dtype = q.dtype();
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let probs =
        candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(in_dtype)?;
    Ok(probs.matmul(v)?)
}

/// Multi-head attention with diffusers' `Attention` weight names (`to_q`, `to_k`, `to_v`,
/// `to_out.0`), or the old VAE names (`query`, `key`, `value`, `proj_attn`).
#[derive(Debug)]
pub struct MultiHeadAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
}

impl MultiHeadAttention {
    /// Loads an attention layer of `query_dim` channels attending over `context_dim` channels.
    pub fn load(
        w: &Weights,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        qkv_bias: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let (q, k, v, o) = if !w.contains("to_q.weight") && w.contains("query.weight") {
            ("query", "key", "value", "proj_attn")
        } else {
            ("to_q", "to_k", "to_v", "to_out.0")
        };
        Ok(Self {
            to_q: linear(&w.pp(q), query_dim, inner, qkv_bias)?,
            to_k: linear(&w.pp(k), context_dim, inner, qkv_bias)?,
            to_v: linear(&w.pp(v), context_dim, inner, qkv_bias)?,
            to_out: linear(&w.pp(o), inner, query_dim, true)?,
            heads,
            scale: 1.0 / (head_dim as f64).sqrt(),
        })
    }

    /// xs: (b, n, query_dim), context: (b, m, context_dim) or None for self-attention.
    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(xs);
        let (b, n, _) = xs.dims3()?;
        let m = context.dim(1)?;
        let split = |t: Tensor, len: usize| -> Result<Tensor> {
            let inner = t.dim(D::Minus1)?;
            Ok(t.reshape((b, len, self.heads, inner / self.heads))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split(self.to_q.forward(xs)?, n)?;
        let k = split(self.to_k.forward(context)?, m)?;
        let v = split(self.to_v.forward(context)?, m)?;
        let out = attention(&q, &k, &v, self.scale)?;
        let out = out.transpose(1, 2)?.reshape((b, n, ()))?;
        Ok(self.to_out.forward(&out)?)
    }
}

/// diffusers' `ResnetBlock2D` (time-scale-shift "default", output scale factor applied).
#[derive(Debug)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

/// Settings of a `ResnetBlock2D`.
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub output_scale_factor: f64,
}

impl ResnetBlock {
    /// Loads the block at `w`.
    pub fn load(w: &Weights, c: ResnetConfig) -> Result<Self> {
        let conv_shortcut = if c.in_channels != c.out_channels {
            Some(conv2d(
                &w.pp("conv_shortcut"),
                c.in_channels,
                c.out_channels,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(&w.pp("norm1"), c.groups, c.in_channels, c.eps)?,
            conv1: conv2d(&w.pp("conv1"), c.in_channels, c.out_channels, 3, 1, 1)?,
            time_emb_proj: match c.temb_channels {
                Some(t) => Some(linear(&w.pp("time_emb_proj"), t, c.out_channels, true)?),
                None => None,
            },
            norm2: group_norm(&w.pp("norm2"), c.groups, c.out_channels, c.eps)?,
            conv2: conv2d(&w.pp("conv2"), c.out_channels, c.out_channels, 3, 1, 1)?,
            conv_shortcut,
            output_scale_factor: c.output_scale_factor,
        })
    }

    /// xs: (b, in, h, w), temb: (b, temb_channels) -> (b, out, h, w).
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(xs)?.silu()?)?;
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => {
                let t = proj.forward(&temb.silu()?)?.unsqueeze(2)?.unsqueeze(3)?;
                h.broadcast_add(&t)?
            }
            _ => h,
        };
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(xs)?,
            None => xs.clone(),
        };
        let out = (shortcut + h)?;
        Ok(if self.output_scale_factor != 1.0 {
            (out / self.output_scale_factor)?
        } else {
            out
        })
    }
}

/// diffusers' `Downsample2D` with a convolution (stride 2).
#[derive(Debug)]
pub struct Downsample {
    conv: Conv2d,
    /// diffusers pads (0, 1, 0, 1) by hand when the conv padding is 0.
    pad_by_hand: bool,
}

impl Downsample {
    /// Loads `downsamplers.0` at `w`.
    pub fn load(w: &Weights, channels: usize, padding: usize) -> Result<Self> {
        Ok(Self {
            conv: conv2d(&w.pp("conv"), channels, channels, 3, 2, padding)?,
            pad_by_hand: padding == 0,
        })
    }

    /// (b, c, h, w) -> (b, c, h/2, w/2).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.pad_by_hand {
            let xs = xs
                .pad_with_zeros(D::Minus1, 0, 1)?
                .pad_with_zeros(D::Minus2, 0, 1)?;
            Ok(self.conv.forward(&xs)?)
        } else {
            Ok(self.conv.forward(xs)?)
        }
    }
}

/// diffusers' `Upsample2D`: nearest-neighbour x2 (or to a given size), then a 3x3 conv.
#[derive(Debug)]
pub struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    /// Loads `upsamplers.0` at `w`.
    pub fn load(w: &Weights, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: conv2d(&w.pp("conv"), channels, channels, 3, 1, 1)?,
        })
    }

    /// (b, c, h, w) -> (b, c, 2h, 2w) or (b, c, size).
    pub fn forward(&self, xs: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let (oh, ow) = size.unwrap_or((2 * h, 2 * w));
        let up = xs.upsample_nearest2d(oh, ow)?;
        Ok(self.conv.forward(&up)?)
    }
}
