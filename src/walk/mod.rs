//! Latent walks: animations that morph between keyframes (a prompt and a seed each) by
//! interpolating the starting noise (slerp) and the text embeddings (lerp or slerp), then
//! running every frame through the pipeline's own stages (`render_batch`).
//!
//! The frame plan: keyframe `i` owns `frames` frames at `t = j / frames` (`j = 0..frames`) on the
//! way to keyframe `i + 1`, so every keyframe appears exactly once, as the first frame of its
//! segment. Without `--loop` the last keyframe closes the walk as one more frame; with it, the
//! last segment leads back to the first keyframe and the animation cycles without a repeated
//! frame. stable-diffusion-videos (the anchor) samples `linspace(0, 1, n)` per segment instead,
//! which shows every inner keyframe twice and stutters there.
//!
//! A frame at eased time `s` between keyframes `a` and `b` starts from
//! `slerp(noise_a, noise_b, s)`, is conditioned on `interp(text_a, text_b, s)` (conditional and
//! unconditional embeddings alike), uses guidance `lerp(g_a, g_b, s)` and keyframe `a`'s seed for
//! whatever per-step noise the scheduler draws. So frame k is exactly the image that
//! `render_batch` (the stage `generate` runs) makes from those inputs alone, and a keyframe's own
//! frame is `generate --seed seed_a prompt_a` (for every scheduler but euler-a, whose step noise
//! `generate` draws after the starting noise from the same generator).
mod animation;
mod folder;
mod interp;
mod keyframes;
mod record;
mod run;

use candle_core::{Device, Tensor};

use crate::pipeline::{
    Event, GeneratedImage, PromptEmbeddings, Sampling, StableDiffusion, TextConditioning, Timings,
};
use crate::{Cancel, Error, Result, Setting};

pub use animation::{check_ffmpeg, write_animation, AnimationFormat};
pub use folder::{
    claim_walk_folder, clean_folder, find_walk_folder, next_walk_folder, prepare_folder, FolderPlan,
};
pub use interp::{lerp, slerp, Ease, Interp, PARALLEL_DOT};
pub use keyframes::{
    keyframes_from_flags, parse_keyframes, read_keyframe_file, FileDefaults, Keyframe,
    KeyframeFileError,
};
pub use record::{read_record, write_record, FrameRecord, WalkRecord, PREVIEW_DIR, RECORD_FILE};
pub use run::{
    check_config, run, FrameWritten, WalkConfig, WalkEvent, WalkFolder, WalkSummary, WalkTimings,
};

/// Most frames one walk may have, all segments together: far beyond any animation people
/// watch (over two hours at 12 fps), and a bound that stops a typo (`frames = 100000000`) before
/// the plan, the record and the folder scan grow with it.
pub const MAX_FRAMES: usize = 100_000;

/// One frame of the plan: where it sits between two keyframes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Frame {
    /// Position in the animation, from 0.
    pub index: usize,
    /// Keyframe the segment starts at.
    pub from: usize,
    /// Keyframe the segment leads to (equal to `from` for the closing frame of a walk without
    /// loop).
    pub to: usize,
    /// Linear time in the segment, `j / frames`, in [0, 1).
    pub t: f64,
    /// `t` through the ease curve: the weight of keyframe `to`.
    pub eased: f64,
}

/// The frames of a walk through `keyframes`, in order.
///
/// Keyframe `i` contributes `keyframes[i].frames` frames (t = 0, 1/n, ..., (n-1)/n) towards
/// keyframe `i + 1`. Without `looped` the last keyframe adds one closing frame and its `frames`
/// is not used; with `looped` its segment leads back to keyframe 0. Errors: fewer than two
/// keyframes, a segment with 0 frames or without a frame count.
pub fn plan_frames(keyframes: &[Keyframe], looped: bool, ease: Ease) -> Result<Vec<Frame>> {
    let k = keyframes.len();
    if k < 2 {
        return Err(Error::InvalidInput(format!(
            "a walk needs at least two keyframes, found {k}: give several prompts, several seeds, \
             or a keyframe file"
        )));
    }
    let segments = if looped { k } else { k - 1 };
    // The total first, so an absurd count fails before anything is allocated for it.
    let mut total: usize = usize::from(!looped);
    for kf in keyframes.iter().take(segments) {
        let n = kf.frames.unwrap_or(0);
        if n > MAX_FRAMES {
            return Err(Error::setting(
                Setting::Frames,
                n,
                format!("a walk has at most {MAX_FRAMES} frames in all"),
            ));
        }
        total = total.saturating_add(n);
    }
    if total > MAX_FRAMES {
        return Err(Error::setting(
            Setting::Frames,
            total,
            format!("a walk has at most {MAX_FRAMES} frames in all"),
        ));
    }
    let mut frames = Vec::with_capacity(total);
    for (i, kf) in keyframes.iter().enumerate().take(segments) {
        let n = match kf.frames {
            Some(0) => {
                return Err(Error::InvalidInput(format!(
                    "keyframe {}: frames must be at least 1",
                    i + 1
                )))
            }
            Some(n) => n,
            None => {
                return Err(Error::InvalidInput(format!(
                    "keyframe {}: no frame count to the next keyframe",
                    i + 1
                )))
            }
        };
        let to = (i + 1) % k;
        for j in 0..n {
            let t = j as f64 / n as f64;
            frames.push(Frame {
                index: frames.len(),
                from: i,
                to,
                t,
                eased: ease.apply(t),
            });
        }
    }
    if !looped {
        frames.push(Frame {
            index: frames.len(),
            from: k - 1,
            to: k - 1,
            t: 0.0,
            eased: 0.0,
        });
    }
    Ok(frames)
}

/// File name of frame `index` inside a walk folder (`frame-00012.png`; ffmpeg's
/// `frame-%05d.png`).
pub fn frame_file_name(index: usize) -> String {
    format!("frame-{index:05}.png")
}

/// Everything of a walk but its keyframes.
#[derive(Debug, Clone)]
pub struct WalkSettings {
    /// Size, steps, scheduler, generator. Its `guidance` is not used: each keyframe carries its
    /// own, and frames interpolate it.
    pub sampling: Sampling,
    /// Return from the last keyframe to the first.
    pub looped: bool,
    /// Timing curve within each segment.
    pub ease: Ease,
    /// How text embeddings are blended (noise always uses slerp).
    pub text_interp: Interp,
}

/// The inputs of one frame, as `render_batch` takes them for a batch of one.
#[derive(Debug, Clone)]
pub struct FrameInputs {
    /// Seed of the `from` keyframe: drives the per-step noise of ancestral schedulers.
    pub seed: u64,
    /// Classifier-free guidance scale of this frame.
    pub guidance: f64,
    /// Starting noise (1, c, h/f, w/f), unscaled, f32 on the CPU.
    pub noise: Tensor,
    /// Text conditioning with batch 1; `uncond` is `None` when `guidance <= 1`.
    pub embeddings: PromptEmbeddings,
}

/// A walk ready to render: keyframe noise drawn and prompts encoded once, frames planned.
pub struct Walk<'m> {
    model: &'m StableDiffusion,
    keyframes: Vec<Keyframe>,
    settings: WalkSettings,
    frames: Vec<Frame>,
    /// Per keyframe: (1, c, h/f, w/f) f32 on the CPU.
    noise: Vec<Tensor>,
    /// Per keyframe, batch 1.
    embeddings: Vec<PromptEmbeddings>,
}

impl<'m> Walk<'m> {
    /// Checks the walk, plans its frames, draws each keyframe's noise and encodes each distinct
    /// prompt once.
    pub fn new(
        model: &'m StableDiffusion,
        keyframes: Vec<Keyframe>,
        settings: WalkSettings,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Self> {
        let frames = check_walk(model, &keyframes, &settings)?;
        let kind = settings.sampling.scheduler;
        if kind.draws_noise() {
            on_event(Event::Warning(format!(
                "{kind} draws fresh noise at every step from each segment's first seed, so the \
                 walk jumps at every keyframe (and keyframes differ from `generate`); ddim, pndm, \
                 euler or dpm++2m give smooth walks"
            )));
        }

        let s = &settings.sampling;
        let f = model.vae_scale_factor();
        let shape = [1, model.latent_channels(), s.height / f, s.width / f];
        let noise = keyframes
            .iter()
            .map(|kf| s.rng.noise_source([kf.seed]).randn(&shape, &Device::Cpu))
            .collect::<Result<Vec<_>>>()?;

        // Every keyframe gets its unconditional embedding when any frame uses guidance, so it
        // can be interpolated towards keyframes that do.
        let max_guidance = keyframes
            .iter()
            .map(|kf| kf.guidance)
            .fold(f64::NEG_INFINITY, f64::max);
        let mut embeddings: Vec<PromptEmbeddings> = Vec::with_capacity(keyframes.len());
        for (i, kf) in keyframes.iter().enumerate() {
            let same = keyframes[..i]
                .iter()
                .position(|o| o.prompt == kf.prompt && o.negative_prompt == kf.negative_prompt);
            let e = match same {
                Some(j) => embeddings[j].clone(),
                None => model.encode_prompt_with(
                    &kf.prompt,
                    &kf.negative_prompt,
                    max_guidance,
                    &s.text,
                    s.steps,
                    on_event,
                )?,
            };
            embeddings.push(e);
        }
        Ok(Walk {
            model,
            keyframes,
            settings,
            frames,
            noise,
            embeddings,
        })
    }

    /// The planned frames, in order.
    pub fn frames(&self) -> &[Frame] {
        &self.frames
    }

    /// The keyframes.
    pub fn keyframes(&self) -> &[Keyframe] {
        &self.keyframes
    }

    /// The settings.
    pub fn settings(&self) -> &WalkSettings {
        &self.settings
    }

    fn frame(&self, k: usize) -> Result<&Frame> {
        self.frames.get(k).ok_or_else(|| {
            Error::InvalidInput(format!(
                "frame {k} is outside the walk ({} frames)",
                self.frames.len()
            ))
        })
    }

    /// Guidance of frame `k`: the keyframes' guidance interpolated linearly at the eased time.
    pub fn frame_guidance(&self, k: usize) -> Result<f64> {
        let f = self.frame(k)?;
        Ok(frame_guidance(&self.keyframes, f))
    }

    /// Starting noise, text embeddings, guidance and seed of frame `k`.
    ///
    /// The noise is the slerp of the two keyframes' noise; the embeddings (conditional and
    /// unconditional) use the walk's text interpolation. Where both keyframes share the seed
    /// (or the text) that input is taken as is, without a round trip through the arithmetic.
    pub fn frame_inputs(&self, k: usize) -> Result<FrameInputs> {
        let f = *self.frame(k)?;
        let (a, b) = (&self.keyframes[f.from], &self.keyframes[f.to]);
        let s = f.eased;
        let noise = if a.seed == b.seed {
            self.noise[f.from].clone()
        } else {
            slerp(&self.noise[f.from], &self.noise[f.to], s)?
        };
        let guidance = frame_guidance(&self.keyframes, &f);
        let (ea, eb) = (&self.embeddings[f.from], &self.embeddings[f.to]);
        let same_text = a.prompt == b.prompt && a.negative_prompt == b.negative_prompt;
        let interp = self.settings.text_interp;
        let cond = if same_text {
            ea.cond.clone()
        } else {
            TextConditioning::zip_with(&ea.cond, &eb.cond, |x, y| interp.apply(x, y, s))?
        };
        // The model's rule, not `guidance > 1`: LCM-distilled UNets take guidance as an input.
        let uncond = match (self.model.uses_cfg(guidance), &ea.uncond, &eb.uncond) {
            (false, _, _) => None,
            (true, Some(ua), Some(ub)) => Some(if same_text {
                ua.clone()
            } else {
                TextConditioning::zip_with(ua, ub, |x, y| interp.apply(x, y, s))?
            }),
            // `new` encodes the unconditional text of every keyframe when any guidance > 1.
            (true, _, _) => {
                return Err(Error::InvalidInput(format!(
                    "frame {k}: guidance {guidance} without unconditional embeddings"
                )))
            }
        };
        Ok(FrameInputs {
            seed: a.seed,
            guidance,
            noise,
            embeddings: PromptEmbeddings::fixed(cond, uncond),
        })
    }

    /// Splits `todo` (frame indices, in order) into batches of at most `batch_size` frames that
    /// can share one UNet call: consecutive in `todo` and with the same guidance.
    pub fn batches(&self, todo: &[usize], batch_size: usize) -> Result<Vec<Vec<usize>>> {
        if batch_size == 0 {
            return Err(Error::setting(Setting::BatchSize, 0, "must be at least 1"));
        }
        let mut out: Vec<Vec<usize>> = Vec::new();
        let mut last_guidance = None;
        for &k in todo {
            let g = self.frame_guidance(k)?;
            match out.last_mut() {
                Some(batch) if batch.len() < batch_size && last_guidance == Some(g.to_bits()) => {
                    batch.push(k)
                }
                _ => out.push(vec![k]),
            }
            last_guidance = Some(g.to_bits());
        }
        Ok(out)
    }

    /// Renders frames `batch` (indices sharing one guidance, see [`Walk::batches`]) in one
    /// `render_batch` call; images come back in the same order. Progress events label the batch
    /// by its first frame index.
    pub fn render(
        &self,
        batch: &[usize],
        timings: &mut Timings,
        cancel: &Cancel,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Vec<GeneratedImage>> {
        let Some(&first) = batch.first() else {
            return Ok(Vec::new());
        };
        let inputs = batch
            .iter()
            .map(|&k| self.frame_inputs(k))
            .collect::<Result<Vec<_>>>()?;
        let guidance = inputs[0].guidance;
        if inputs
            .iter()
            .any(|i| i.guidance.to_bits() != guidance.to_bits())
        {
            return Err(Error::InvalidInput(
                "frames of one batch must share their guidance".into(),
            ));
        }
        let seeds: Vec<u64> = inputs.iter().map(|i| i.seed).collect();
        let noise = Tensor::cat(&inputs.iter().map(|i| &i.noise).collect::<Vec<_>>(), 0)?;
        let embeddings = PromptEmbeddings::stack(
            &inputs
                .iter()
                .map(|i| i.embeddings.clone())
                .collect::<Vec<_>>(),
        )?;
        let sampling = Sampling {
            guidance,
            ..self.settings.sampling.clone()
        };
        self.model.render_batch(
            &embeddings,
            &seeds,
            Some(&noise),
            &sampling,
            first,
            timings,
            cancel,
            on_event,
        )
    }

    /// The walk's part of frame `k`'s PNG metadata, as `(key, value)` pairs after the usual
    /// settings: position, keyframe pair (numbered from 1, as people count), times, target
    /// prompt and seed, interpolation.
    pub fn frame_metadata(&self, k: usize) -> Result<Vec<(String, String)>> {
        let f = self.frame(k)?;
        let to = &self.keyframes[f.to];
        let mut pairs = vec![
            (
                "Walk frame".to_string(),
                format!("{}/{}", k + 1, self.frames.len()),
            ),
            (
                "Walk keyframes".to_string(),
                format!("{}->{}", f.from + 1, f.to + 1),
            ),
            ("Walk t".to_string(), format!("{}", f.t)),
            ("Walk eased t".to_string(), format!("{}", f.eased)),
            ("Walk to seed".to_string(), to.seed.to_string()),
            ("Walk to prompt".to_string(), to.prompt.clone()),
        ];
        if !to.negative_prompt.is_empty() {
            pairs.push(("Walk to negative prompt".into(), to.negative_prompt.clone()));
        }
        pairs.extend([
            ("Walk noise".to_string(), "slerp".to_string()),
            (
                "Walk text".to_string(),
                self.settings.text_interp.to_string(),
            ),
            ("Walk ease".to_string(), self.settings.ease.to_string()),
        ]);
        Ok(pairs)
    }
}

/// Checks a walk before any work (what [`Walk::new`] checks first): at least two keyframes,
/// frame counts, non-empty prompts, finite guidance, and the pipeline's own input checks
/// (size, steps) for the settings every frame shares. Returns the frame plan.
pub fn check_walk(
    model: &StableDiffusion,
    keyframes: &[Keyframe],
    settings: &WalkSettings,
) -> Result<Vec<Frame>> {
    let frames = plan_frames(keyframes, settings.looped, settings.ease)?;
    check_keyframes(keyframes)?;
    // Stage 0 with the settings every frame shares.
    model.check_sampling(&settings.sampling, 1)?;
    let s = &settings.sampling;
    for kf in keyframes {
        crate::prompt::check_prompts(&kf.prompt, &kf.negative_prompt, &s.text, s.steps)?;
        if s.text.syntax == crate::prompt::PromptSyntax::A1111 {
            for (setting, p) in [
                (Setting::Prompt, &kf.prompt),
                (Setting::NegativePrompt, &kf.negative_prompt),
            ] {
                if crate::prompt::schedule(p, s.steps.max(1)).len() > 1 {
                    return Err(Error::setting(
                        setting,
                        crate::text::excerpt(p, 60),
                        "prompt editing [from:to:when] and alternation [a|b] are not supported \
                         in walks (frames interpolate between fixed prompts)",
                    ));
                }
            }
        }
    }
    // The UNet's weights cannot be interpolated: every keyframe asks for the same LoRAs.
    let mut first_loras = None;
    for (i, kf) in keyframes.iter().enumerate() {
        let (_, loras) = model.prompt_loras(&kf.prompt)?;
        match &first_loras {
            None => first_loras = Some(loras),
            Some(first) if *first != loras => {
                return Err(Error::setting(
                    Setting::Prompt,
                    crate::text::excerpt(&kf.prompt, 60),
                    format!(
                        "keyframe {} asks for other LoRAs than keyframe 1; a walk uses one set \
                         of LoRAs (give every keyframe the same <lora:...> tags, or use --lora)",
                        i + 1
                    ),
                ));
            }
            Some(_) => {}
        }
    }
    Ok(frames)
}

/// Keyframe guidance interpolated at the frame's eased time; exactly `g_from` at `s = 0` and
/// when both keyframes agree.
fn frame_guidance(keyframes: &[Keyframe], f: &Frame) -> f64 {
    let (ga, gb) = (keyframes[f.from].guidance, keyframes[f.to].guidance);
    if ga == gb || f.eased == 0.0 {
        ga
    } else {
        ga + (gb - ga) * f.eased
    }
}

/// Per-keyframe checks the frame plan does not make.
fn check_keyframes(keyframes: &[Keyframe]) -> Result<()> {
    for (i, kf) in keyframes.iter().enumerate() {
        if kf.prompt.trim().is_empty() {
            return Err(Error::InvalidInput(format!(
                "keyframe {}: the prompt is empty",
                i + 1
            )));
        }
        if !kf.guidance.is_finite() {
            return Err(Error::InvalidInput(format!(
                "keyframe {}: guidance must be a finite number",
                i + 1
            )));
        }
    }
    Ok(())
}

/// Steps of a `--preview` render: a quarter of `steps`, but at least 4 (or `steps` itself when
/// smaller).
pub fn preview_steps(steps: usize) -> usize {
    (steps / 4).max(steps.min(4))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kf(frames: Option<usize>) -> Keyframe {
        Keyframe {
            prompt: "p".into(),
            negative_prompt: String::new(),
            seed: 0,
            frames,
            guidance: 7.5,
        }
    }

    #[test]
    fn frames_without_loop_end_on_the_last_keyframe() {
        let kfs = [kf(Some(3)), kf(Some(2)), kf(None)];
        let plan = plan_frames(&kfs, false, Ease::Linear).unwrap();
        let got: Vec<(usize, usize, usize, f64)> =
            plan.iter().map(|f| (f.index, f.from, f.to, f.t)).collect();
        assert_eq!(
            got,
            [
                (0, 0, 1, 0.0),
                (1, 0, 1, 1.0 / 3.0),
                (2, 0, 1, 2.0 / 3.0),
                (3, 1, 2, 0.0),
                (4, 1, 2, 0.5),
                (5, 2, 2, 0.0),
            ]
        );
    }

    #[test]
    fn frames_with_loop_return_to_the_first_keyframe_without_repeating_it() {
        let kfs = [kf(Some(2)), kf(Some(1)), kf(Some(3))];
        let plan = plan_frames(&kfs, true, Ease::Smooth).unwrap();
        let got: Vec<(usize, usize, f64)> = plan.iter().map(|f| (f.from, f.to, f.t)).collect();
        assert_eq!(
            got,
            [
                (0, 1, 0.0),
                (0, 1, 0.5),
                (1, 2, 0.0),
                (2, 0, 0.0),
                (2, 0, 1.0 / 3.0),
                (2, 0, 2.0 / 3.0),
            ]
        );
        assert!(plan.iter().enumerate().all(|(i, f)| f.index == i));
        assert!((plan[4].eased - Ease::Smooth.apply(1.0 / 3.0)).abs() < 1e-15);
        // The last keyframe needs a count when looping.
        let err = plan_frames(&[kf(Some(2)), kf(None)], true, Ease::Linear).unwrap_err();
        assert!(err.to_string().contains("keyframe 2"), "{err}");
    }

    #[test]
    fn frame_counts() {
        let count = |n: &[Option<usize>], looped| {
            let kfs: Vec<Keyframe> = n.iter().map(|&f| kf(f)).collect();
            plan_frames(&kfs, looped, Ease::Linear).map(|p| p.len())
        };
        assert_eq!(count(&[Some(24), Some(24)], false).unwrap(), 25);
        assert_eq!(count(&[Some(24), Some(24)], true).unwrap(), 48);
        assert_eq!(count(&[Some(1), Some(1), None], false).unwrap(), 3);
        assert!(count(&[Some(0), None], false)
            .unwrap_err()
            .to_string()
            .contains("at least 1"));
        assert!(count(&[Some(4)], false)
            .unwrap_err()
            .to_string()
            .contains("two keyframes"));
        assert!(count(&[Some(4)], true).is_err());
    }

    #[test]
    fn frame_guidance_interpolates_and_is_exact_at_keyframes() {
        let mut kfs = [kf(Some(4)), kf(None)];
        kfs[1].guidance = 3.5;
        let plan = plan_frames(&kfs, false, Ease::Linear).unwrap();
        let g: Vec<f64> = plan.iter().map(|f| frame_guidance(&kfs, f)).collect();
        assert_eq!(g, [7.5, 6.5, 5.5, 4.5, 3.5]);
    }

    #[test]
    fn preview_steps_are_a_quarter_but_at_least_four() {
        assert_eq!(preview_steps(30), 7);
        assert_eq!(preview_steps(50), 12);
        assert_eq!(preview_steps(10), 4);
        assert_eq!(preview_steps(3), 3);
        assert_eq!(preview_steps(1), 1);
    }

    #[test]
    fn frame_files_sort_in_order() {
        assert_eq!(frame_file_name(0), "frame-00000.png");
        assert_eq!(frame_file_name(123), "frame-00123.png");
    }
}
