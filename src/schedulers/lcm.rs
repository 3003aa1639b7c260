//! Latent consistency sampling, "Latent Consistency Models: Synthesizing High-Resolution Images
//! with Few-Step Inference" (Luo, Tan, Huang, Li & Zhao, 2023): matches diffusers'
//! `LCMScheduler`.
//!
//! A latent consistency model f_θ maps a noisy latent z_t straight to an estimate of its clean
//! origin, with the consistency-model boundary condition f_θ(z, 0) = z built in:
//! f_θ(z_t, t) = c_skip(t) · z_t + c_out(t) · x̂₀(z_t, t). Multistep sampling alternates that
//! jump with re-noising the estimate to the next (lower) timestep with fresh noise,
//! z_{τ_{n+1}} ~ N(√ᾱ_{τ_{n+1}} · x̂₀, (1 − ᾱ_{τ_{n+1}}) I); the last step returns x̂₀ itself.
//!
//! Timesteps: distillation used `original_inference_steps` timesteps k apart (the paper's
//! skipping interval, k = ⌊T / original_inference_steps⌋): k − 1, 2k − 1, …; inference takes
//! `num_inference_steps` of them, evenly spaced by index, from the top. diffusers' class reads
//! but never uses `timestep_spacing` and `steps_offset`, nor `set_alpha_to_one` (the last step
//! does not re-noise, so no ᾱ after the last timestep is ever needed); they have no effect here
//! either.
//!
//! The noise is drawn from the caller's [`NoiseSource`] at the point and with the shape
//! diffusers draws it (`randn_tensor(model_output.shape)` after x̂₀ on every step but the last),
//! so a torch-compatible source with one generator per image reproduces diffusers' images.
use candle_core::Tensor;

use super::config::{BetaDefaults, SchedulerConfig};
use super::ddim::add_noise_vp;
use super::math::{self, Prediction};
use super::{check_index, div, mul, to_f32, Scheduler};
use crate::noise::NoiseSource;
use crate::{Error, Result};

const CLASS: &str = "LCMScheduler";
/// σ_data of the boundary-condition scalings (diffusers fixes it at 0.5, as Consistency Models
/// does for images scaled to [-1, 1]).
const SIGMA_DATA: f32 = 0.5;

/// LCM multistep sampling for a fixed number of steps.
#[derive(Debug)]
pub(crate) struct Lcm {
    timesteps: Vec<f64>,
    /// The same timesteps as indices into `alphas_cumprod`.
    indices: Vec<usize>,
    alphas_cumprod: Vec<f32>,
    prediction: Prediction,
    /// `clip_sample_range` when `clip_sample` is on.
    clip: Option<f32>,
    /// `timestep_scaling` in float32, as torch multiplies the integer timestep by it.
    timestep_scaling: f32,
}

impl Lcm {
    /// `strength` below 1 is an LCM model's img2img (the distillation schedule shortened).
    pub(crate) fn new(
        config: &SchedulerConfig,
        num_inference_steps: usize,
        strength: f64,
    ) -> Result<Self> {
        config.require_off(
            config.thresholding,
            "thresholding",
            "dynamic thresholding is not implemented (it is meant for pixel-space models)",
        )?;
        let prediction = config.prediction(
            CLASS,
            &[
                Prediction::Epsilon,
                Prediction::Velocity,
                Prediction::Sample,
            ],
        )?;
        // LCMScheduler's beta defaults are Stable Diffusion's, not DDPM's.
        let alphas_cumprod = math::alphas_cumprod(
            &config.betas_with_defaults(true, BetaDefaults::STABLE_DIFFUSION)?,
        );
        let clip = if config.clip_sample.unwrap_or(false) {
            Some(config.clip_sample_range.unwrap_or(1.0) as f32)
        } else {
            None
        };
        let timestep_scaling = config.timestep_scaling.unwrap_or(10.0);
        if !timestep_scaling.is_finite() {
            return Err(config.error(
                "timestep_scaling",
                format!("{timestep_scaling} is not a finite number"),
            ));
        }
        let train = config.num_train_timesteps()?;
        let original = config.original_inference_steps.unwrap_or(50);
        if original == 0 || original > train {
            return Err(config.error(
                "original_inference_steps",
                format!("{original} must be between 1 and the model's {train} training timesteps"),
            ));
        }
        let indices =
            lcm_timesteps(train, original, num_inference_steps, strength).map_err(|available| {
                let strength = if strength < 1.0 {
                    format!(" at strength {strength}")
                } else {
                    String::new()
                };
                Error::InvalidInput(format!(
                    "{num_inference_steps} steps is more than the {available} timesteps of the \
                     LCM distillation schedule{strength} (original_inference_steps {original} in \
                     {}); use at most {available} steps",
                    config.path().display()
                ))
            })?;
        Ok(Lcm {
            timesteps: indices.iter().map(|&t| t as f64).collect(),
            indices,
            alphas_cumprod,
            prediction,
            clip,
            timestep_scaling: timestep_scaling as f32,
        })
    }

    /// The consistency-model boundary-condition scalings at timestep `t`, in float32 like
    /// diffusers computes them from the integer timestep tensor: with s = t · timestep_scaling,
    /// c_skip = σ_data² / (s² + σ_data²) and c_out = s / √(s² + σ_data²), so c_skip(0) = 1 and
    /// c_out(0) = 0.
    fn boundary_scalings(&self, t: usize) -> (f32, f32) {
        let s = t as f32 * self.timestep_scaling;
        let denominator = s * s + SIGMA_DATA * SIGMA_DATA;
        let c_skip = SIGMA_DATA * SIGMA_DATA / denominator;
        let c_out = s / denominator.sqrt();
        (c_skip, c_out)
    }
}

/// The LCM inference timesteps, descending: the distillation schedule k − 1, 2k − 1, …,
/// ⌊original · strength⌋ · k − 1 (k = ⌊train / original⌋), reversed, then `n` entries at indices
/// ⌊i · len / n⌋ (numpy's `floor(linspace(0, len, n, endpoint=False))`).
///
/// `strength` < 1 is img2img's partial schedule. Fails with the schedule's length when `n` is
/// larger (diffusers raises a ValueError there); needs 1 ≤ `original` ≤ `train`.
fn lcm_timesteps(
    train: usize,
    original: usize,
    n: usize,
    strength: f64,
) -> std::result::Result<Vec<usize>, usize> {
    let k = train / original;
    // Python's int() truncates toward zero, as `as` does.
    let len = (original as f64 * strength) as usize;
    if n == 0 || n > len {
        return Err(len);
    }
    // Entry j of the reversed schedule is (len − j) · k − 1.
    Ok(math::np_linspace_no_endpoint(0.0, len as f64, n)
        .into_iter()
        .map(|x| (len - x.floor() as usize) * k - 1)
        .collect())
}

impl Scheduler for Lcm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        Ok(sample.clone())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        let model_output = to_f32(model_output)?;
        let z_t = to_f32(sample)?;
        // 1. ᾱ at τ_n (this step) and τ_{n+1} (the next listed timestep, or none at the end).
        let t = self.indices[step_index];
        let alpha_t = self.alphas_cumprod[t];
        let beta_t = 1.0 - alpha_t;
        let alpha_next = self
            .indices
            .get(step_index + 1)
            .map(|&next| self.alphas_cumprod[next]);
        // 2. The boundary-condition scalings c_skip(τ_n) and c_out(τ_n).
        let (c_skip, c_out) = self.boundary_scalings(t);
        // 3. x̂₀ from the model's parametrisation (ε: (z − √(1−ᾱ)·ε̂) / √ᾱ).
        let x0 = match self.prediction {
            Prediction::Epsilon => div(
                &(&z_t - mul(&model_output, beta_t.sqrt())?)?,
                alpha_t.sqrt(),
            )?,
            Prediction::Sample => model_output.clone(),
            Prediction::Velocity => {
                (mul(&z_t, alpha_t.sqrt())? - mul(&model_output, beta_t.sqrt())?)?
            }
        };
        // 4. Optional clipping of x̂₀ (diffusers' clip_sample).
        let x0 = match self.clip {
            Some(range) => x0.clamp(-range, range)?,
            None => x0,
        };
        // 5. f_θ(z_{τ_n}, τ_n) = c_skip · z + c_out · x̂₀: the consistency function's estimate.
        let denoised = (mul(&x0, c_out)? + mul(&z_t, c_skip)?)?;
        // 6. Between steps, re-noise the estimate to τ_{n+1} with fresh ε ~ N(0, I):
        //    z_{τ_{n+1}} = √ᾱ_{τ_{n+1}} · f_θ + √(1 − ᾱ_{τ_{n+1}}) · ε. The last step (and so
        //    one-step sampling) returns f_θ and draws nothing.
        let Some(alpha_next) = alpha_next else {
            return Ok(denoised);
        };
        let eps = noise.randn(model_output.dims(), model_output.device())?;
        if eps.dims() != model_output.dims() {
            return Err(Error::InvalidInput(format!(
                "noise source returned shape {:?} for requested {:?}",
                eps.dims(),
                model_output.dims()
            )));
        }
        Ok((mul(&denoised, alpha_next.sqrt())? + mul(&to_f32(&eps)?, (1.0 - alpha_next).sqrt())?)?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        add_noise_vp(
            &self.alphas_cumprod,
            self.indices[step_index],
            original,
            noise,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::lcm_timesteps;
    use crate::schedulers::{build, sd15_test_config, SchedulerConfig, SchedulerKind};

    /// LCM_Dreamshaper_v7's scheduler_config.json.
    fn dreamshaper() -> SchedulerConfig {
        SchedulerConfig::from_json(
            r#"{"_class_name": "LCMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "beta_start": 0.00085, "clip_sample": false, "original_inference_steps": 50,
                "prediction_type": "epsilon", "set_alpha_to_one": true, "steps_offset": 1,
                "timestep_scaling": 10.0, "timestep_spacing": "leading"}"#,
            "lcm.json",
        )
        .expect("valid test config")
    }

    #[test]
    fn timesteps_match_diffusers() {
        // LCMScheduler(...).set_timesteps(n).timesteps with diffusers 0.42.1.
        let cases: [(usize, &[f64]); 6] = [
            (1, &[999.0]),
            (2, &[999.0, 499.0]),
            (3, &[999.0, 679.0, 339.0]),
            (4, &[999.0, 759.0, 499.0, 259.0]),
            (6, &[999.0, 839.0, 679.0, 499.0, 339.0, 179.0]),
            (8, &[999.0, 879.0, 759.0, 639.0, 499.0, 379.0, 259.0, 139.0]),
        ];
        for (n, expected) in cases {
            let s = build(SchedulerKind::Lcm, &dreamshaper(), n, false).unwrap();
            assert_eq!(s.timesteps(), expected, "{n} steps");
            assert_eq!(s.init_noise_sigma(), 1.0);
        }
        // 50 steps: the whole distillation schedule, 999 down to 19 by 20.
        let s = build(SchedulerKind::Lcm, &dreamshaper(), 50, false).unwrap();
        let all: Vec<f64> = (0..50).map(|i| (999 - 20 * i) as f64).collect();
        assert_eq!(s.timesteps(), all.as_slice());
    }

    #[test]
    fn other_schedule_lengths_match_diffusers() {
        // set_timesteps(4, original_inference_steps=30): k = 33.
        assert_eq!(
            lcm_timesteps(1000, 30, 4, 1.0),
            Ok(vec![989, 758, 494, 263])
        );
        // original_inference_steps = num_train_timesteps: k = 1, every timestep.
        assert_eq!(
            lcm_timesteps(1000, 1000, 7, 1.0),
            Ok(vec![999, 857, 714, 571, 428, 285, 142])
        );
        // LCMScheduler(num_train_timesteps=999): k = 19.
        assert_eq!(lcm_timesteps(999, 50, 4, 1.0), Ok(vec![949, 721, 474, 246]));
        // img2img strengths: set_timesteps(4, strength=0.5) and (3, strength=0.3); 50 · 0.3 is
        // 15.000000000000002 in float64 and truncates to 15.
        assert_eq!(
            lcm_timesteps(1000, 50, 4, 0.5),
            Ok(vec![499, 379, 259, 139])
        );
        assert_eq!(lcm_timesteps(1000, 50, 3, 0.3), Ok(vec![299, 199, 99]));
        assert_eq!(lcm_timesteps(1000, 50, 16, 0.3), Err(15));
    }

    #[test]
    fn more_steps_than_the_distillation_schedule_is_an_error() {
        // diffusers: "The combination of `original_steps x strength`: 50 x 1.0 is smaller than
        // `num_inference_steps`: 51".
        let err = build(SchedulerKind::Lcm, &dreamshaper(), 51, false)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("51 steps is more than the 50 timesteps of the LCM distillation"),
            "{err}"
        );
        assert!(err.contains("lcm.json"), "{err}");
        let mut c = dreamshaper();
        c.original_inference_steps = Some(1001);
        let err = build(SchedulerKind::Lcm, &c, 4, false)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.starts_with("lcm.json: field `original_inference_steps`"),
            "{err}"
        );
        c.original_inference_steps = Some(0);
        assert!(build(SchedulerKind::Lcm, &c, 4, false).is_err());
    }

    #[test]
    fn unsupported_settings_are_config_errors() {
        let mut c = dreamshaper();
        c.thresholding = Some(true);
        let err = build(SchedulerKind::Lcm, &c, 4, false)
            .err()
            .unwrap()
            .to_string();
        assert!(err.starts_with("lcm.json: field `thresholding`"), "{err}");
        let mut c = dreamshaper();
        c.prediction_type = Some("original_sample".into());
        let err = build(SchedulerKind::Lcm, &c, 4, false)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.starts_with("lcm.json: field `prediction_type`"),
            "{err}"
        );
    }

    #[test]
    fn spacing_and_offset_do_not_move_the_timesteps() {
        // SD 1.5's PNDM config (steps_offset 1, leading) switched to LCM, and a trailing one.
        let plain = build(SchedulerKind::Lcm, &sd15_test_config(), 4, false).unwrap();
        assert_eq!(plain.timesteps(), &[999.0, 759.0, 499.0, 259.0]);
        let mut c = sd15_test_config();
        c.timestep_spacing = Some("trailing".into());
        c.steps_offset = Some(7);
        let s = build(SchedulerKind::Lcm, &c, 4, false).unwrap();
        assert_eq!(s.timesteps(), plain.timesteps());
    }

    #[test]
    fn boundary_scalings_follow_the_boundary_condition() {
        let s = super::Lcm::new(&dreamshaper(), 4, 1.0).unwrap();
        assert_eq!(s.boundary_scalings(0), (1.0, 0.0));
        let (c_skip, c_out) = s.boundary_scalings(999);
        // float32 as torch computes them: (9990²) rounds to 99800096 in float32.
        assert_eq!(c_skip, 0.25 / 99_800_096.0f32);
        assert_eq!(c_out, 9990.0 / 99_800_096.0f32.sqrt());
        assert!((1.0 - c_out).abs() < 1e-6);
    }
}
