//! The denoiser: diffusers' `UNet2DConditionModel` as used by Stable Diffusion 1.x/2.x, SDXL
//! (added text/size conditioning) and LCM (guidance embedding), built entirely from
//! `unet/config.json`.
use candle_core::{DType, Device, Tensor};

use super::config::{MidBlockKind, UNetBlockConfig, UNetConfig, TIME_IDS};
use super::layers::{
    conv2d, geglu, group_norm, layer_norm, linear, Conv2d, Downsample, GroupNorm, LayerNorm,
    Linear, MultiHeadAttention, ResnetBlock, ResnetConfig, Upsample,
};
use super::Weights;
use crate::Result;

/// Sinusoidal timestep embedding (diffusers' `get_timestep_embedding`), computed on the host in
/// f32 in torch's operation order. Returns (batch, dim).
pub fn timestep_embedding(
    timestep: f64,
    batch: usize,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    device: &Device,
) -> Result<Tensor> {
    let row = sinusoidal_row(timestep as f32, dim, flip_sin_to_cos, freq_shift);
    let data: Vec<f32> = (0..batch).flat_map(|_| row.iter().copied()).collect();
    Ok(Tensor::from_vec(data, (batch, dim), device)?)
}

/// One row of [`timestep_embedding`] for the value `t`.
fn sinusoidal_row(t: f32, dim: usize, flip_sin_to_cos: bool, freq_shift: f64) -> Vec<f32> {
    let half = dim / 2;
    let ln_max_period = (10000f64).ln() as f32;
    let mut sin = Vec::with_capacity(half);
    let mut cos = Vec::with_capacity(half);
    for i in 0..half {
        let exponent = -ln_max_period * (i as f32) / (half as f32 - freq_shift as f32);
        let arg = t * exponent.exp();
        sin.push(arg.sin());
        cos.push(arg.cos());
    }
    let mut row = if flip_sin_to_cos {
        [cos, sin].concat()
    } else {
        [sin, cos].concat()
    };
    if dim % 2 == 1 {
        row.push(0.0);
    }
    row
}

/// The guidance-scale embedding of LCM-distilled UNets (diffusers'
/// `get_guidance_scale_embedding`, after the VDM paper's Fourier features): for each `w`,
/// `[sin(1000 w f_i), cos(1000 w f_i)]` with `f_i = exp(-i ln(10000) / (half - 1))`, in f32
/// in torch's operation order. Pipelines pass `w = guidance - 1`. Returns (len, dim).
pub fn guidance_scale_embedding(w: &[f32], dim: usize, device: &Device) -> Result<Tensor> {
    let half = dim / 2;
    // torch.log(torch.tensor(10000.0)) / (half - 1), all float32.
    let step = 10000f32.ln() / (half as f32 - 1.0);
    let freqs: Vec<f32> = (0..half).map(|i| (i as f32 * -step).exp()).collect();
    let mut data = Vec::with_capacity(w.len() * dim);
    for &wi in w {
        let scaled = wi * 1000.0;
        data.extend(freqs.iter().map(|f| (scaled * f).sin()));
        data.extend(freqs.iter().map(|f| (scaled * f).cos()));
        if dim % 2 == 1 {
            data.push(0.0);
        }
    }
    Ok(Tensor::from_vec(data, (w.len(), dim), device)?)
}

/// Conditioning besides the timestep and the text that some UNets take.
#[derive(Debug, Clone, Copy, Default)]
pub struct AddedConditioning<'a> {
    /// SDXL (`text_time`): the pooled text embeddings (b, pooled_dim) and the size ids
    /// (b, 6): original (h, w), crop (top, left), target (h, w).
    pub text_time: Option<(&'a Tensor, &'a Tensor)>,
    /// LCM: the guidance embedding (b, time_cond_proj_dim), see [`guidance_scale_embedding`].
    pub timestep_cond: Option<&'a Tensor>,
}

/// `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward.
#[derive(Debug)]
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: MultiHeadAttention,
    norm2: LayerNorm,
    attn2: MultiHeadAttention,
    norm3: LayerNorm,
    ff_proj: Linear,
    ff_out: Linear,
}

impl TransformerBlock {
    fn load(w: &Weights, dim: usize, heads: usize, context_dim: usize) -> Result<Self> {
        let head_dim = dim / heads;
        let inner = dim * 4;
        Ok(Self {
            norm1: layer_norm(&w.pp("norm1"), dim, 1e-5)?,
            attn1: MultiHeadAttention::load(&w.pp("attn1"), dim, dim, heads, head_dim, false)?,
            norm2: layer_norm(&w.pp("norm2"), dim, 1e-5)?,
            attn2: MultiHeadAttention::load(
                &w.pp("attn2"),
                dim,
                context_dim,
                heads,
                head_dim,
                false,
            )?,
            norm3: layer_norm(&w.pp("norm3"), dim, 1e-5)?,
            ff_proj: linear(&w.pp("ff.net.0.proj"), dim, inner * 2, true)?,
            ff_out: linear(&w.pp("ff.net.2"), inner, dim, true)?,
        })
    }

    /// xs: (b, hw, dim), context: (b, tokens, context_dim).
    fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let xs = (self.attn1.forward(&self.norm1.forward(xs)?, None)? + xs)?;
        let xs = (self
            .attn2
            .forward(&self.norm2.forward(&xs)?, Some(context))?
            + &xs)?;
        let h = self.ff_proj.forward(&self.norm3.forward(&xs)?)?;
        // GEGLU with the exact (erf) GELU, as torch's F.gelu.
        let gated = geglu(&h)?;
        Ok((self.ff_out.forward(&gated)? + xs)?)
    }
}

/// Input/output projection of a `Transformer2DModel`: 1x1 conv (SD 1.x) or linear (SD 2.x).
#[derive(Debug)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// `Transformer2DModel` over an image feature map.
#[derive(Debug)]
struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
}

impl SpatialTransformer {
    /// `depth` transformer blocks of `heads` heads over `channels`.
    fn load(
        w: &Weights,
        channels: usize,
        (heads, depth): (usize, usize),
        cfg: &UNetConfig,
    ) -> Result<Self> {
        let proj = |name: &str| -> Result<Projection> {
            Ok(if cfg.use_linear_projection {
                Projection::Linear(linear(&w.pp(name), channels, channels, true)?)
            } else {
                Projection::Conv(conv2d(&w.pp(name), channels, channels, 1, 1, 0)?)
            })
        };
        let blocks = (0..depth)
            .map(|i| {
                TransformerBlock::load(
                    &w.pp("transformer_blocks").pp(i),
                    channels,
                    heads,
                    cfg.cross_attention_dim,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: group_norm(&w.pp("norm"), cfg.norm_num_groups, channels, 1e-6)?,
            proj_in: proj("proj_in")?,
            blocks,
            proj_out: proj("proj_out")?,
        })
    }

    /// xs: (b, c, h, w), context: (b, tokens, context_dim) -> (b, c, h, w).
    fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let to_tokens =
            |t: &Tensor| -> Result<Tensor> { Ok(t.permute((0, 2, 3, 1))?.reshape((b, h * w, c))?) };
        let normed = self.norm.forward(xs)?;
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(&normed)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let from_tokens = |t: &Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, h, w, c))?
                .permute((0, 3, 1, 2))?
                .contiguous()?)
        };
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&from_tokens(&tokens)?)?,
            Projection::Linear(lin) => from_tokens(&lin.forward(&tokens)?)?,
        };
        Ok((out + xs)?)
    }
}

/// A down block: resnets (each followed by a transformer in cross-attention blocks), then an
/// optional downsampler. Returns the output and the skip connections it produced.
#[derive(Debug)]
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    downsample: Option<Downsample>,
}

/// An up block: resnets over [hidden, skip] concatenations (each followed by a transformer in
/// cross-attention blocks), then an optional upsampler.
#[derive(Debug)]
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    upsample: Option<Upsample>,
}

/// `UNetMidBlock2DCrossAttn` (resnet, then (transformer, resnet) pairs) or `UNetMidBlock2D`
/// (the resnet alone).
#[derive(Debug)]
struct MidBlock {
    first: ResnetBlock,
    layers: Vec<(SpatialTransformer, ResnetBlock)>,
}

/// SDXL's `add_time_proj` + `add_embedding` (`addition_embed_type: "text_time"`).
#[derive(Debug)]
struct AddEmbedding {
    /// Sinusoidal width of each size id.
    time_embed_dim: usize,
    linear_1: Linear,
    linear_2: Linear,
}

impl AddEmbedding {
    /// text_embeds (b, pooled_dim) and time_ids (b, 6) -> (b, time_embed_dim of the UNet):
    /// the ids' sinusoidal embeddings (the UNet's flip and shift) after the pooled text,
    /// through linear, SiLU, linear.
    fn forward(
        &self,
        text_embeds: &Tensor,
        time_ids: &Tensor,
        cfg: &UNetConfig,
        dtype: DType,
    ) -> Result<Tensor> {
        let b = text_embeds.dim(0)?;
        let ids: Vec<f32> = time_ids.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        if ids.len() != b * TIME_IDS {
            return Err(missing_input(&format!(
                "{} size ids for {b} rows; expected {TIME_IDS} per row",
                ids.len()
            )));
        }
        let data: Vec<f32> = ids
            .iter()
            .flat_map(|&v| {
                sinusoidal_row(v, self.time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
            })
            .collect();
        let time_embeds = Tensor::from_vec(
            data,
            (b, TIME_IDS * self.time_embed_dim),
            text_embeds.device(),
        )?;
        let add =
            Tensor::cat(&[&text_embeds.to_dtype(DType::F32)?, &time_embeds], 1)?.to_dtype(dtype)?;
        self.linear_2.forward(&self.linear_1.forward(&add)?.silu()?)
    }
}

/// diffusers' `UNet2DConditionModel` for SD 1.x/2.x and SDXL, with LCM's guidance input.
#[derive(Debug)]
pub struct UNet {
    config: UNetConfig,
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    /// `time_embedding.cond_proj` (LCM): guidance embedding -> timestep embedding width.
    time_cond_proj: Option<Linear>,
    /// SDXL: pooled text + size ids -> time embedding.
    add_embedding: Option<AddEmbedding>,
    down: Vec<DownBlock>,
    mid: Option<MidBlock>,
    up: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet {
    /// Builds the model from its config, loading every tensor from `w` (rooted at the file).
    pub fn load(w: &Weights, config: &UNetConfig) -> Result<Self> {
        let cfg = config;
        let ch0 = cfg.blocks[0].channels;
        let temb = cfg.time_embed_dim();
        let n = cfg.blocks.len();
        let resnet = |w: &Weights, inc: usize, outc: usize, scale: f64| {
            ResnetBlock::load(
                w,
                ResnetConfig {
                    in_channels: inc,
                    out_channels: outc,
                    temb_channels: Some(temb),
                    groups: cfg.norm_num_groups,
                    eps: cfg.norm_eps,
                    output_scale_factor: scale,
                },
            )
        };

        let mut down = Vec::with_capacity(n);
        let mut out_ch = ch0;
        for (i, block) in cfg.blocks.iter().enumerate() {
            let wb = w.pp("down_blocks").pp(i);
            let in_ch = out_ch;
            out_ch = block.channels;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..cfg.layers_per_block {
                let inc = if j == 0 { in_ch } else { out_ch };
                resnets.push(resnet(&wb.pp("resnets").pp(j), inc, out_ch, 1.0)?);
                if block.cross_attention {
                    attentions.push(SpatialTransformer::load(
                        &wb.pp("attentions").pp(j),
                        out_ch,
                        (block.heads, block.transformer_layers[j]),
                        cfg,
                    )?);
                }
            }
            let downsample = if i + 1 < n {
                Some(Downsample::load(
                    &wb.pp("downsamplers").pp(0),
                    out_ch,
                    cfg.downsample_padding,
                )?)
            } else {
                None
            };
            down.push(DownBlock {
                resnets,
                attentions,
                downsample,
            });
        }

        let last = &cfg.blocks[n - 1];
        let wm = w.pp("mid_block");
        let mid_ch = last.channels;
        let mid_scale = cfg.mid_block_scale_factor;
        let mid = match cfg.mid_block {
            MidBlockKind::None => None,
            // A resnet, then (transformer, resnet) pairs: one pair with cross-attention, none
            // in the plain `UNetMidBlock2D` UNet2DConditionModel builds (num_layers 0).
            kind => {
                let mut layers = Vec::new();
                if let MidBlockKind::CrossAttn { transformer_layers } = kind {
                    layers.push((
                        SpatialTransformer::load(
                            &wm.pp("attentions").pp(0),
                            mid_ch,
                            (last.heads, transformer_layers),
                            cfg,
                        )?,
                        resnet(&wm.pp("resnets").pp(1), mid_ch, mid_ch, mid_scale)?,
                    ));
                }
                Some(MidBlock {
                    first: resnet(&wm.pp("resnets").pp(0), mid_ch, mid_ch, mid_scale)?,
                    layers,
                })
            }
        };

        let rev: Vec<&UNetBlockConfig> = cfg.blocks.iter().rev().collect();
        let mut up = Vec::with_capacity(n);
        let mut prev_out = rev[0].channels;
        for (i, block) in rev.iter().enumerate() {
            let wb = w.pp("up_blocks").pp(i);
            let out_ch = block.channels;
            let in_ch = rev[(i + 1).min(n - 1)].channels;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            let layers = cfg.layers_per_block + 1;
            for j in 0..layers {
                let skip = if j == layers - 1 { in_ch } else { out_ch };
                let inc = if j == 0 { prev_out } else { out_ch };
                resnets.push(resnet(&wb.pp("resnets").pp(j), inc + skip, out_ch, 1.0)?);
                if block.cross_attention {
                    attentions.push(SpatialTransformer::load(
                        &wb.pp("attentions").pp(j),
                        out_ch,
                        (block.heads, block.up_transformer_layers[j]),
                        cfg,
                    )?);
                }
            }
            let upsample = if i + 1 < n {
                Some(Upsample::load(&wb.pp("upsamplers").pp(0), out_ch)?)
            } else {
                None
            };
            up.push(UpBlock {
                resnets,
                attentions,
                upsample,
            });
            prev_out = out_ch;
        }

        Ok(Self {
            conv_in: conv2d(
                &w.pp("conv_in"),
                cfg.in_channels,
                ch0,
                cfg.conv_in_kernel,
                1,
                cfg.conv_in_kernel / 2,
            )?,
            time_linear_1: linear(&w.pp("time_embedding.linear_1"), ch0, temb, true)?,
            time_linear_2: linear(&w.pp("time_embedding.linear_2"), temb, temb, true)?,
            time_cond_proj: cfg
                .time_cond_proj_dim
                .map(|d| linear(&w.pp("time_embedding.cond_proj"), d, ch0, false))
                .transpose()?,
            add_embedding: cfg
                .text_time
                .as_ref()
                .map(|tt| -> Result<AddEmbedding> {
                    Ok(AddEmbedding {
                        time_embed_dim: tt.time_embed_dim,
                        linear_1: linear(
                            &w.pp("add_embedding.linear_1"),
                            tt.input_dim,
                            temb,
                            true,
                        )?,
                        linear_2: linear(&w.pp("add_embedding.linear_2"), temb, temb, true)?,
                    })
                })
                .transpose()?,
            down,
            mid,
            up,
            conv_norm_out: group_norm(
                &w.pp("conv_norm_out"),
                cfg.norm_num_groups,
                ch0,
                cfg.norm_eps,
            )?,
            conv_out: conv2d(
                &w.pp("conv_out"),
                ch0,
                cfg.out_channels,
                cfg.conv_out_kernel,
                1,
                cfg.conv_out_kernel / 2,
            )?,
            config: config.clone(),
        })
    }

    /// The architecture this model was built from.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Predicts the noise (or v, or x0, per the scheduler's prediction type), for UNets that
    /// need no added conditioning (SD 1.x/2.x).
    ///
    /// sample: (b, in_channels, h, w); encoder_hidden_states: (b, tokens, cross_attention_dim);
    /// returns (b, out_channels, h, w) in the sample's dtype.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        self.forward_with(
            sample,
            timestep,
            encoder_hidden_states,
            &AddedConditioning::default(),
        )
    }

    /// [`Self::forward`] with SDXL's pooled text and size ids and/or LCM's guidance embedding,
    /// which this UNet's config requires (missing or unexpected ones are an error).
    pub fn forward_with(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        added: &AddedConditioning,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (b, _, h, w) = sample.dims4()?;
        let dtype = sample.dtype();
        let up_factor = 1usize << (cfg.blocks.len() - 1);
        let forward_upsample_size = h % up_factor != 0 || w % up_factor != 0;
        let xs = if cfg.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample.clone()
        };

        // 1. time (+ LCM's guidance embedding, + SDXL's pooled text and size ids)
        let t_emb = timestep_embedding(
            timestep,
            b,
            cfg.blocks[0].channels,
            cfg.flip_sin_to_cos,
            cfg.freq_shift,
            sample.device(),
        )?
        .to_dtype(dtype)?;
        let t_emb = match (&self.time_cond_proj, added.timestep_cond) {
            (Some(proj), Some(c)) => (t_emb + proj.forward(&c.to_dtype(dtype)?)?)?,
            (None, None) => t_emb,
            (Some(_), None) => {
                return Err(missing_input(
                    "time_cond_proj_dim is set: the UNet needs a guidance embedding",
                ))
            }
            (None, Some(_)) => {
                return Err(missing_input(
                    "a guidance embedding was given to a UNet without time_cond_proj_dim",
                ))
            }
        };
        let mut emb = self
            .time_linear_2
            .forward(&self.time_linear_1.forward(&t_emb)?.silu()?)?;
        match (&self.add_embedding, added.text_time) {
            (Some(add), Some((text_embeds, time_ids))) => {
                let aug = add.forward(text_embeds, time_ids, cfg, dtype)?;
                emb = (emb + aug)?;
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err(missing_input(
                    "addition_embed_type is \"text_time\": the UNet needs pooled text embeddings \
                     and size ids",
                ))
            }
            (None, Some(_)) => {
                return Err(missing_input(
                    "pooled text embeddings were given to a UNet without text_time conditioning",
                ))
            }
        }
        let context = encoder_hidden_states.to_dtype(dtype)?;

        // 2. pre-process
        let mut xs = self.conv_in.forward(&xs)?;

        // 3. down
        let mut skips = vec![xs.clone()];
        for block in &self.down {
            for (j, resnet) in block.resnets.iter().enumerate() {
                xs = resnet.forward(&xs, Some(&emb))?;
                if let Some(attn) = block.attentions.get(j) {
                    xs = attn.forward(&xs, &context)?;
                }
                skips.push(xs.clone());
            }
            if let Some(ds) = &block.downsample {
                xs = ds.forward(&xs)?;
                skips.push(xs.clone());
            }
        }

        // 4. mid
        if let Some(mid) = &self.mid {
            xs = mid.first.forward(&xs, Some(&emb))?;
            for (attn, resnet) in &mid.layers {
                xs = attn.forward(&xs, &context)?;
                xs = resnet.forward(&xs, Some(&emb))?;
            }
        }

        // 5. up
        for block in &self.up {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().ok_or_else(|| {
                    crate::Error::InvalidInput("UNet skip connections exhausted".into())
                })?;
                xs = Tensor::cat(&[&xs, &skip], 1)?;
                xs = resnet.forward(&xs, Some(&emb))?;
                if let Some(attn) = block.attentions.get(j) {
                    xs = attn.forward(&xs, &context)?;
                }
            }
            if let Some(us) = &block.upsample {
                // When the input is not a multiple of the total down factor, upsample to the
                // size of the next skip connection (diffusers' forward_upsample_size).
                let size = match (forward_upsample_size, skips.last()) {
                    (true, Some(s)) => {
                        let (_, _, sh, sw) = s.dims4()?;
                        Some((sh, sw))
                    }
                    _ => None,
                };
                xs = us.forward(&xs, size)?;
            }
        }

        // 6. post-process
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }
}

fn missing_input(message: &str) -> crate::Error {
    crate::Error::InvalidInput(format!("UNet input: {message}"))
}
