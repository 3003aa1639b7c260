//! What the UNet is conditioned on besides the noisy latents: the prompts' text embeddings
//! (and SDXL's pooled embedding), batched for classifier-free guidance, and SDXL's size ids.
use candle_core::{Device, Tensor};

use crate::model::config::TIME_IDS;
use crate::{Error, Result};

/// The text conditioning of one prompt: what the UNet cross-attends to and, for SDXL, the
/// pooled embedding of the second text encoder.
#[derive(Debug, Clone)]
pub struct TextConditioning {
    /// (rows, tokens, cross_attention_dim), f32.
    pub context: Tensor,
    /// (rows, pooled_dim), f32; SDXL only.
    pub pooled: Option<Tensor>,
}

impl TextConditioning {
    /// Applies `f` to the matching tensors of `a` and `b` (walks interpolate this way).
    pub fn zip_with(
        a: &Self,
        b: &Self,
        mut f: impl FnMut(&Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Self> {
        // Prompts of different lengths (AUTOMATIC1111's chunks of 75 tokens): the shorter is
        // padded with its last vector, as AUTOMATIC1111 pads conditionings it stacks.
        let tokens = a.tokens()?.max(b.tokens()?);
        let (a, b) = (&a.padded_to(tokens)?, &b.padded_to(tokens)?);
        let pooled = match (&a.pooled, &b.pooled) {
            (Some(pa), Some(pb)) => Some(f(pa, pb)?),
            (None, None) => None,
            _ => {
                return Err(Error::InvalidInput(
                    "one prompt has a pooled embedding and the other not".into(),
                ))
            }
        };
        Ok(Self {
            context: f(&a.context, &b.context)?,
            pooled,
        })
    }

    /// Tokens per row of the context.
    pub fn tokens(&self) -> Result<usize> {
        Ok(self.context.dim(1)?)
    }

    /// The conditioning with its context made `tokens` long by repeating its last vector
    /// (AUTOMATIC1111's `stack_conds`); unchanged when it is that long already.
    pub fn padded_to(&self, tokens: usize) -> Result<Self> {
        let have = self.tokens()?;
        if have >= tokens {
            return Ok(self.clone());
        }
        let last = self.context.narrow(1, have - 1, 1)?;
        let (rows, _, dim) = self.context.dims3()?;
        let fill = last.broadcast_as((rows, tokens - have, dim))?;
        Ok(Self {
            context: Tensor::cat(&[&self.context, &fill.contiguous()?], 1)?,
            pooled: self.pooled.clone(),
        })
    }

    /// Concatenates the rows of several conditionings (shorter contexts padded as
    /// [`Self::padded_to`]).
    pub fn stack(items: &[&TextConditioning]) -> Result<Self> {
        let tokens = items
            .iter()
            .map(|c| c.tokens())
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .max()
            .unwrap_or(0);
        let padded = items
            .iter()
            .map(|c| c.padded_to(tokens))
            .collect::<Result<Vec<_>>>()?;
        let contexts: Vec<&Tensor> = padded.iter().map(|c| &c.context).collect();
        let pooled = if items.iter().all(|c| c.pooled.is_some()) && !items.is_empty() {
            let p: Vec<&Tensor> = items.iter().filter_map(|c| c.pooled.as_ref()).collect();
            Some(Tensor::cat(&p, 0)?)
        } else {
            None
        };
        Ok(Self {
            context: Tensor::cat(&contexts, 0)?,
            pooled,
        })
    }
}

/// Prompt embeddings: conditional, and unconditional when guidance is on.
#[derive(Debug, Clone)]
pub struct PromptEmbeddings {
    /// The prompt's conditioning, 1 row (or one per image, for walks); with a schedule, the
    /// conditioning of the first step.
    pub cond: TextConditioning,
    /// The negative prompt's; `None` without classifier-free guidance.
    pub uncond: Option<TextConditioning>,
    /// Prompt editing and alternation: the conditioning of each step; `None` when the prompts
    /// stay the same throughout.
    pub schedule: Option<StepSchedule>,
}

/// Which conditioning applies at which step, as AUTOMATIC1111's `reconstruct_cond_batch`
/// picks it: at step s (0-based, one per UNet evaluation) the first entry whose last step is
/// at least s, else the first entry.
#[derive(Debug, Clone)]
pub struct StepSchedule {
    /// (last step, conditioning) of the prompt, in step order.
    pub cond: Vec<(i64, TextConditioning)>,
    /// The same for the negative prompt; empty without guidance.
    pub uncond: Vec<(i64, TextConditioning)>,
}

/// The index of the entry of `entries` in use at `step`.
fn entry_at<T>(entries: &[(i64, T)], step: i64) -> usize {
    entries
        .iter()
        .position(|(until, _)| step <= *until)
        .unwrap_or(0)
}

impl StepSchedule {
    /// The entries (prompt, negative prompt) in use at `step`: equal values mean the same
    /// conditioning.
    pub fn selection(&self, step: usize) -> (usize, usize) {
        let s = step as i64;
        (entry_at(&self.cond, s), entry_at(&self.uncond, s))
    }
}

/// Repeats a tensor of 1 row to `b` rows, or checks it already has `b`.
fn rows_of(t: &Tensor, b: usize) -> Result<Tensor> {
    match t.dim(0)? {
        1 => {
            let mut reps = vec![1; t.rank()];
            reps[0] = b;
            Ok(t.repeat(reps)?)
        }
        n if n == b => Ok(t.clone()),
        n => Err(Error::InvalidInput(format!(
            "prompt embeddings have {n} rows for a batch of {b}"
        ))),
    }
}

impl PromptEmbeddings {
    /// Embeddings that stay the same at every step.
    pub fn fixed(cond: TextConditioning, uncond: Option<TextConditioning>) -> Self {
        Self {
            cond,
            uncond,
            schedule: None,
        }
    }

    /// The conditioning in use at `step` (0-based), without a schedule.
    pub fn at_step(&self, step: usize) -> Self {
        let Some(schedule) = &self.schedule else {
            return self.clone();
        };
        let (c, u) = schedule.selection(step);
        Self::fixed(
            schedule.cond.get(c).map_or(&self.cond, |e| &e.1).clone(),
            match schedule.uncond.get(u) {
                Some(e) => Some(e.1.clone()),
                None => self.uncond.clone(),
            },
        )
    }

    /// What changes between steps: the schedule's selection at `step` ((0, 0) without one).
    pub fn selection(&self, step: usize) -> (usize, usize) {
        self.schedule.as_ref().map_or((0, 0), |s| s.selection(step))
    }

    /// Whether the prompt and negative prompt contexts have different lengths (then the UNet
    /// runs them as two batches, as AUTOMATIC1111 does).
    pub fn lengths_differ(&self) -> Result<bool> {
        Ok(match &self.uncond {
            Some(u) => u.tokens()? != self.cond.tokens()?,
            None => false,
        })
    }

    /// The UNet's context for a batch of `b`: [uncond x b, cond x b] with guidance (diffusers'
    /// order), else cond x b. Embeddings of batch 1 are repeated; others must have `b` rows.
    pub fn batched(&self, b: usize) -> Result<Tensor> {
        let cond = rows_of(&self.cond.context, b)?;
        Ok(match &self.uncond {
            Some(u) => Tensor::cat(&[&rows_of(&u.context, b)?, &cond], 0)?,
            None => cond,
        })
    }

    /// The pooled embeddings batched as [`Self::batched`] does the context; `None` when the
    /// model has none.
    pub fn batched_pooled(&self, b: usize) -> Result<Option<Tensor>> {
        let Some(cond) = &self.cond.pooled else {
            return Ok(None);
        };
        let cond = rows_of(cond, b)?;
        Ok(Some(
            match self.uncond.as_ref().map(|u| u.pooled.as_ref()) {
                Some(Some(u)) => Tensor::cat(&[&rows_of(u, b)?, &cond], 0)?,
                Some(None) => {
                    return Err(Error::InvalidInput(
                        "the negative prompt has no pooled embedding".into(),
                    ))
                }
                None => cond,
            },
        ))
    }

    /// Stacks per-image embeddings (each of batch 1) into one of batch n. With schedules, the
    /// stack switches wherever one of the items does.
    pub fn stack(items: &[PromptEmbeddings]) -> Result<Self> {
        if items.iter().any(|e| e.schedule.is_some()) {
            let mut points: Vec<i64> = items
                .iter()
                .filter_map(|e| e.schedule.as_ref())
                .flat_map(|s| s.cond.iter().chain(&s.uncond).map(|(u, _)| *u))
                .collect();
            points.sort_unstable();
            points.dedup();
            let mut cond = Vec::with_capacity(points.len());
            let mut uncond = Vec::with_capacity(points.len());
            for &until in &points {
                let step = until.max(0) as usize;
                let at: Vec<PromptEmbeddings> = items.iter().map(|e| e.at_step(step)).collect();
                let stacked = Self::stack(&at)?;
                cond.push((until, stacked.cond));
                if let Some(u) = stacked.uncond {
                    uncond.push((until, u));
                }
            }
            let first = Self::stack(&items.iter().map(|e| e.at_step(0)).collect::<Vec<_>>())?;
            return Ok(Self {
                schedule: Some(StepSchedule { cond, uncond }),
                ..first
            });
        }
        let conds: Vec<&TextConditioning> = items.iter().map(|e| &e.cond).collect();
        let uncond = if items.iter().all(|e| e.uncond.is_some()) && !items.is_empty() {
            let u: Vec<&TextConditioning> =
                items.iter().filter_map(|e| e.uncond.as_ref()).collect();
            Some(TextConditioning::stack(&u)?)
        } else {
            None
        };
        Ok(Self::fixed(TextConditioning::stack(&conds)?, uncond))
    }
}

/// SDXL's size ids of one image, six values each: original (h, w), crop (top, left),
/// target (h, w), for the prompt and for the negative prompt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimeIds {
    pub cond: [f32; TIME_IDS],
    pub uncond: [f32; TIME_IDS],
}

impl TimeIds {
    /// (rows, 6) f32: [uncond x b, cond x b] with guidance, else cond x b.
    pub fn batched(&self, b: usize, cfg: bool, device: &Device) -> Result<Tensor> {
        let mut data = Vec::with_capacity(2 * b * TIME_IDS);
        if cfg {
            (0..b).for_each(|_| data.extend_from_slice(&self.uncond));
        }
        (0..b).for_each(|_| data.extend_from_slice(&self.cond));
        let rows = data.len() / TIME_IDS;
        Ok(Tensor::from_vec(data, (rows, TIME_IDS), device)?)
    }
}

/// SDXL's size conditioning ("micro-conditioning"), in pixels as (width, height) and (x, y).
/// Unset sizes default as in diffusers: the image size, and a crop at (0, 0). Other models
/// ignore it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SizeConditioning {
    /// The size the picture should look as if it came from.
    pub original_size: Option<(usize, usize)>,
    /// Top-left corner of the crop it should look as if it was cut at.
    pub crop_top_left: Option<(usize, usize)>,
    /// The size it should look as if it was made for.
    pub target_size: Option<(usize, usize)>,
    /// The same three for the negative prompt; all unset = the prompt's.
    pub negative_original_size: Option<(usize, usize)>,
    pub negative_crop_top_left: Option<(usize, usize)>,
    pub negative_target_size: Option<(usize, usize)>,
}

impl SizeConditioning {
    /// The size ids for an image of `width` x `height` (diffusers' `_get_add_time_ids`:
    /// original size, crop top-left and target size, each as (y, x)).
    pub fn time_ids(&self, width: usize, height: usize) -> TimeIds {
        let ids = |original: Option<(usize, usize)>,
                   crop: Option<(usize, usize)>,
                   target: Option<(usize, usize)>| {
            let (ow, oh) = original.unwrap_or((width, height));
            let (cx, cy) = crop.unwrap_or((0, 0));
            let (tw, th) = target.unwrap_or((width, height));
            [oh, ow, cy, cx, th, tw].map(|v| v as f32)
        };
        let cond = ids(self.original_size, self.crop_top_left, self.target_size);
        // diffusers uses separate negative ids only when negative sizes are given; a missing
        // negative field then takes the same default as its positive counterpart would.
        let uncond = if self.has_negative() {
            ids(
                self.negative_original_size,
                self.negative_crop_top_left,
                self.negative_target_size,
            )
        } else {
            cond
        };
        TimeIds { cond, uncond }
    }

    /// Whether any negative size is set.
    pub fn has_negative(&self) -> bool {
        self.negative_original_size.is_some()
            || self.negative_crop_top_left.is_some()
            || self.negative_target_size.is_some()
    }

    /// Whether anything differs from the defaults.
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_ids_default_to_the_image_and_negative_to_the_prompt() {
        let s = SizeConditioning::default();
        let ids = s.time_ids(96, 64);
        assert_eq!(ids.cond, [64.0, 96.0, 0.0, 0.0, 64.0, 96.0]);
        assert_eq!(ids.uncond, ids.cond);
        let s = SizeConditioning {
            original_size: Some((1024, 768)),
            crop_top_left: Some((16, 8)),
            negative_original_size: Some((256, 256)),
            ..Default::default()
        };
        let ids = s.time_ids(64, 64);
        assert_eq!(ids.cond, [768.0, 1024.0, 8.0, 16.0, 64.0, 64.0]);
        // A given negative field replaces only itself; the others take the image's defaults.
        assert_eq!(ids.uncond, [256.0, 256.0, 0.0, 0.0, 64.0, 64.0]);
    }

    #[test]
    fn batched_rows_are_uncond_then_cond() {
        let ids = SizeConditioning {
            negative_target_size: Some((8, 8)),
            ..Default::default()
        }
        .time_ids(16, 16);
        let t: Vec<Vec<f32>> = ids
            .batched(2, true, &Device::Cpu)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(t.len(), 4);
        assert_eq!(t[0][4], 8.0);
        assert_eq!(t[1][4], 8.0);
        assert_eq!(t[2][4], 16.0);
        assert_eq!(t[3][4], 16.0);
    }
}
