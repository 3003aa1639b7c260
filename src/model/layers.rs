//! Building blocks shared by the UNet and the VAE, loaded from diffusers-named weights.
//!
//! Each layer holds its weights either as candle tensors (GPU devices, f16/bf16) and runs
//! candle's ops, or, for f32 on the CPU, prepared for the project's own kernels
//! (`crate::kernels`): convolution without a full im2col, products with weights laid out once,
//! blocked attention, fused group norm + SiLU. Both paths compute the same function; the parity
//! tests run the CPU one against diffusers.
use candle_core::{DType, Device, Module, Tensor, D};

use super::Weights;
use crate::kernels::{self, matmul, profile, profile::Op};
use crate::Result;

/// Whether layers loaded from `w` run on the CPU kernels, and with which products: f32 weights
/// in f32; bf16 weights (`--dtype bf16` on the CPU) as bf16 products with f32 activations.
fn cpu_kernels(w: &Weights) -> Option<matmul::Precision> {
    match (w.device(), w.dtype()) {
        (Device::Cpu, DType::F32) => Some(matmul::Precision::F32),
        (Device::Cpu, DType::BF16) => Some(matmul::Precision::Bf16),
        _ => None,
    }
}

/// A matrix weight for the kernels: read in place from the mapped file for f32 products, or
/// copied out (and the file's pages released) when it is about to be packed as bf16.
fn host_weight(
    w: &Weights,
    precision: matmul::Precision,
    shape: &[usize],
) -> Result<kernels::HostF32> {
    match precision {
        matmul::Precision::F32 => w.get_mapped(shape, "weight"),
        matmul::Precision::Bf16 => Ok(w.get_host(shape, "weight")?.into()),
    }
}

/// `nn.Linear(in, out, bias)`.
#[derive(Debug)]
pub enum Linear {
    Candle(candle_nn::Linear),
    Cpu {
        weight: matmul::Weight,
        bias: Option<Vec<f32>>,
    },
}

/// `nn.Linear(in, out, bias)` at `w`.
pub fn linear(w: &Weights, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
    if let Some(precision) = cpu_kernels(w) {
        let weight = host_weight(w, precision, &[out_dim, in_dim])?;
        return Ok(Linear::Cpu {
            weight: matmul::Weight::new(weight, out_dim, in_dim, matmul::Role::RhsT, precision),
            bias: bias.then(|| w.get_host(&[out_dim], "bias")).transpose()?,
        });
    }
    let weight = w.get(&[out_dim, in_dim], "weight")?;
    let bias = if bias {
        Some(w.get(&[out_dim], "bias")?)
    } else {
        None
    };
    Ok(Linear::Candle(candle_nn::Linear::new(weight, bias)))
}

impl Linear {
    /// (..., in) -> (..., out).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Candle(l) => {
                let _p = profile::scope(Op::Linear, 0);
                Ok(l.forward(xs)?)
            }
            Linear::Cpu { weight, bias } => {
                let dims = xs.dims();
                let in_dim = weight.in_dim();
                let out_dim = weight.out_dim();
                let rows = xs.elem_count() / in_dim.max(1);
                let _p = profile::scope(Op::Linear, 2 * rows * in_dim * out_dim);
                let mut out = vec![0f32; rows * out_dim];
                kernels::with_f32(xs, |x| {
                    let lhs = matmul::View::rows(x, in_dim);
                    let threads = kernels::threads();
                    matmul::times_weight_t(
                        lhs,
                        rows,
                        weight,
                        &mut out,
                        out_dim,
                        bias.as_deref(),
                        threads,
                    );
                    Ok(())
                })?;
                let mut shape = dims.to_vec();
                *shape
                    .last_mut()
                    .expect("a linear input has a last dimension") = out_dim;
                kernels::tensor(out, shape)
            }
        }
    }
}

/// `nn.Conv2d(in, out, k, stride, padding)` with bias.
#[derive(Debug)]
pub enum Conv2d {
    Candle(candle_nn::Conv2d),
    Cpu(kernels::conv::Conv2d),
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
    conv2d_with(w, (in_ch, out_ch, kernel), stride, padding, true)
}

/// `nn.Conv2d(in, out, k, stride, padding, bias=False)` at `w` (only `weight` is read).
pub fn conv2d_no_bias(
    w: &Weights,
    in_ch: usize,
    out_ch: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<Conv2d> {
    conv2d_with(w, (in_ch, out_ch, kernel), stride, padding, false)
}

fn conv2d_with(
    w: &Weights,
    (in_ch, out_ch, kernel): (usize, usize, usize),
    stride: usize,
    padding: usize,
    bias: bool,
) -> Result<Conv2d> {
    if let Some(precision) = cpu_kernels(w) {
        let b = if bias {
            Some(w.get_host(&[out_ch], "bias")?)
        } else {
            None
        };
        return Ok(Conv2d::Cpu(kernels::conv::Conv2d::new(
            host_weight(w, precision, &[out_ch, in_ch, kernel, kernel])?,
            b,
            (out_ch, in_ch, kernel),
            stride,
            padding,
            precision,
        )));
    }
    let weight = w.get(&[out_ch, in_ch, kernel, kernel], "weight")?;
    let b = if bias {
        Some(w.get(&[out_ch], "bias")?)
    } else {
        None
    };
    let cfg = candle_nn::Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    Ok(Conv2d::Candle(candle_nn::Conv2d::new(weight, b, cfg)))
}

impl Conv2d {
    /// (b, in, h, w) -> (b, out, ho, wo).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Conv2d::Candle(c) => {
                let op = if c.weight().dim(3)? == 1 {
                    Op::Conv1x1
                } else {
                    Op::Conv3x3
                };
                let _p = profile::scope(op, 0);
                Ok(c.forward(xs)?)
            }
            Conv2d::Cpu(c) => {
                let (b, _, h, w) = xs.dims4()?;
                let op = if c.kernel() == 1 {
                    Op::Conv1x1
                } else {
                    Op::Conv3x3
                };
                let _p = profile::scope(op, c.flops(b, h, w));
                let out = kernels::with_f32(xs, |x| Ok(c.forward(x, b, h, w, kernels::threads())))?;
                let (ho, wo) = c.out_size(h, w);
                kernels::tensor(out, (b, c.out_channels(), ho, wo))
            }
        }
    }
}

/// `nn.GroupNorm(groups, channels, eps)`, with the SiLU that usually follows it fused.
#[derive(Debug)]
pub enum GroupNorm {
    Candle(candle_nn::GroupNorm),
    Cpu {
        weight: Vec<f32>,
        bias: Vec<f32>,
        groups: usize,
        eps: f64,
    },
}

/// `nn.GroupNorm(groups, channels, eps)` at `w`.
pub fn group_norm(w: &Weights, groups: usize, channels: usize, eps: f64) -> Result<GroupNorm> {
    if cpu_kernels(w).is_some() {
        return Ok(GroupNorm::Cpu {
            weight: w.get_host(&[channels], "weight")?,
            bias: w.get_host(&[channels], "bias")?,
            groups,
            eps,
        });
    }
    let weight = w.get(&[channels], "weight")?;
    let bias = w.get(&[channels], "bias")?;
    Ok(GroupNorm::Candle(candle_nn::GroupNorm::new(
        weight, bias, channels, groups, eps,
    )?))
}

impl GroupNorm {
    /// (b, c, ...) -> (b, c, ...).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.run(xs, false)
    }

    /// `silu(group_norm(xs))` in one pass on the CPU.
    pub fn forward_silu(&self, xs: &Tensor) -> Result<Tensor> {
        self.run(xs, true)
    }

    fn run(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        let _p = profile::scope(Op::GroupNorm, 0);
        match self {
            GroupNorm::Candle(n) => {
                let y = n.forward(xs)?;
                Ok(if silu { y.silu()? } else { y })
            }
            GroupNorm::Cpu {
                weight,
                bias,
                groups,
                eps,
            } => {
                let b = xs.dim(0)?;
                let c = xs.dim(1)?;
                let plane = xs.elem_count() / (b * c).max(1);
                let out = kernels::with_f32(xs, |x| {
                    Ok(kernels::norm::group_norm(
                        x, b, c, plane, *groups, *eps, weight, bias, silu,
                    ))
                })?;
                kernels::tensor(out, xs.shape().clone())
            }
        }
    }
}

/// `nn.LayerNorm(dim, eps)` over the last dimension.
#[derive(Debug)]
pub enum LayerNorm {
    Candle(candle_nn::LayerNorm),
    Cpu {
        weight: Vec<f32>,
        bias: Vec<f32>,
        eps: f64,
    },
}

/// `nn.LayerNorm(dim, eps)` at `w`.
pub fn layer_norm(w: &Weights, dim: usize, eps: f64) -> Result<LayerNorm> {
    if cpu_kernels(w).is_some() {
        return Ok(LayerNorm::Cpu {
            weight: w.get_host(&[dim], "weight")?,
            bias: w.get_host(&[dim], "bias")?,
            eps,
        });
    }
    let weight = w.get(&[dim], "weight")?;
    let bias = w.get(&[dim], "bias")?;
    Ok(LayerNorm::Candle(candle_nn::LayerNorm::new(
        weight, bias, eps,
    )))
}

impl LayerNorm {
    /// (..., dim) -> (..., dim).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let _p = profile::scope(Op::LayerNorm, 0);
        match self {
            LayerNorm::Candle(n) => Ok(n.forward(xs)?),
            LayerNorm::Cpu { weight, bias, eps } => {
                let out = kernels::with_f32(xs, |x| {
                    Ok(kernels::norm::layer_norm(
                        x,
                        weight.len(),
                        *eps,
                        weight,
                        bias,
                    ))
                })?;
                kernels::tensor(out, xs.shape().clone())
            }
        }
    }
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

/// GEGLU on the last dimension: first half times the exact (erf) GELU of the second half.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let half = h.dim(D::Minus1)? / 2;
    let _p = profile::scope(Op::Geglu, 0);
    if kernels::is_cpu_f32(h) {
        let out = kernels::with_f32(h, |x| Ok(kernels::elementwise::geglu(x, half)))?;
        let mut shape = h.dims().to_vec();
        *shape.last_mut().expect("GEGLU input has a last dimension") = half;
        return kernels::tensor(out, shape);
    }
    Ok((h.narrow(D::Minus1, 0, half)? * h.narrow(D::Minus1, half, half)?.gelu_erf()?)?)
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
    /// The CPU kernel's products: bf16 with bf16 weights (f32 activations), else f32.
    precision: matmul::Precision,
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
            precision: cpu_kernels(w).unwrap_or(matmul::Precision::F32),
        })
    }

    /// xs: (b, n, query_dim), context: (b, m, context_dim) or None for self-attention.
    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(xs);
        let (b, n, _) = xs.dims3()?;
        let m = context.dim(1)?;
        if kernels::is_cpu_f32(xs) {
            let q = self.to_q.forward(xs)?;
            let k = self.to_k.forward(context)?;
            let v = self.to_v.forward(context)?;
            let inner = q.dim(D::Minus1)?;
            let dims = kernels::attention::Dims {
                batch: b,
                queries: n,
                keys: m,
                heads: self.heads,
                head_dim: inner / self.heads,
            };
            let out = {
                let _p = profile::scope(Op::Attention, dims.flops());
                let out = kernels::with_f32(&q, |q| {
                    kernels::with_f32(&k, |k| {
                        kernels::with_f32(&v, |v| {
                            Ok(kernels::attention::attention(
                                q,
                                k,
                                v,
                                dims,
                                self.scale as f32,
                                self.precision,
                            ))
                        })
                    })
                })?;
                kernels::tensor(out, (b, n, inner))?
            };
            return self.to_out.forward(&out);
        }
        let split = |t: Tensor, len: usize| -> Result<Tensor> {
            let inner = t.dim(D::Minus1)?;
            Ok(t.reshape((b, len, self.heads, inner / self.heads))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split(self.to_q.forward(xs)?, n)?;
        let k = split(self.to_k.forward(context)?, m)?;
        let v = split(self.to_v.forward(context)?, m)?;
        let out = {
            let _p = profile::scope(Op::Attention, 0);
            attention(&q, &k, &v, self.scale)?
        };
        let out = out.transpose(1, 2)?.reshape((b, n, ()))?;
        self.to_out.forward(&out)
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
        let h = self.conv1.forward(&self.norm1.forward_silu(xs)?)?;
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => {
                let t = proj.forward(&temb.silu()?)?.unsqueeze(2)?.unsqueeze(3)?;
                h.broadcast_add(&t)?
            }
            _ => h,
        };
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
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
            self.conv.forward(&xs)
        } else {
            self.conv.forward(xs)
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
        self.conv.forward(&up)
    }
}
