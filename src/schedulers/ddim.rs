//! DDIM, "Denoising Diffusion Implicit Models" (Song, Meng & Ermon, ICLR 2021), deterministic
//! (η = 0): matches diffusers' `DDIMScheduler` with `eta=0`.
//!
//! One difference, on purpose: the previous timestep is the next entry of the timestep list.
//! diffusers computes `t - num_train_timesteps // num_inference_steps`, which is the same for
//! "leading" spacing (every Stable Diffusion config) but skips to the wrong noise level for
//! "linspace" and "trailing" (diffusers issues #11347 and #12633).
use candle_core::Tensor;

use super::config::SchedulerConfig;
use super::math::{self, Prediction, Spacing};
use super::{check_index, div, mul, to_f32, Scheduler};
use crate::noise::NoiseSource;
use crate::{Error, Result};

const CLASS: &str = "DDIMScheduler";

/// DDIM with η = 0 for a fixed number of steps.
#[derive(Debug)]
pub(crate) struct Ddim {
    timesteps: Vec<f64>,
    /// The same timesteps as indices into `alphas_cumprod`.
    indices: Vec<usize>,
    alphas_cumprod: Vec<f32>,
    /// ᾱ after the last step: 1 with `set_alpha_to_one`, else ᾱ_0.
    final_alpha_cumprod: f32,
    prediction: Prediction,
    /// `clip_sample_range` when `clip_sample` is on.
    clip: Option<f32>,
}

impl Ddim {
    pub(crate) fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
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
        let alphas_cumprod = math::alphas_cumprod(&config.betas(true)?);
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let clip = if config.clip_sample.unwrap_or(true) {
            Some(config.clip_sample_range.unwrap_or(1.0) as f32)
        } else {
            None
        };
        let train = config.num_train_timesteps()?;
        let n = num_inference_steps;
        let spacing = config.spacing(Spacing::Leading)?;
        let timesteps: Vec<i64> = match spacing {
            Spacing::Linspace => math::np_linspace(0.0, (train - 1) as f64, n)
                .into_iter()
                .rev()
                .map(|t| math::np_round(t) as i64)
                .collect(),
            Spacing::Leading => {
                let ratio = train / n;
                (0..n)
                    .rev()
                    .map(|i| (i * ratio + config.steps_offset()) as i64)
                    .collect()
            }
            Spacing::Trailing => math::np_arange_down(train as f64, train as f64 / n as f64)
                .into_iter()
                .map(|t| math::np_round(t) as i64 - 1)
                .collect(),
        };
        let indices = checked_indices(&timesteps, train, spacing, n, config)?;
        Ok(Ddim {
            timesteps: timesteps.iter().map(|&t| t as f64).collect(),
            indices,
            alphas_cumprod,
            final_alpha_cumprod,
            prediction,
            clip,
        })
    }
}

/// Turns integer timesteps into `alphas_cumprod` indices, rejecting any outside the training
/// range (diffusers would index past the end, or wrap a -1 around to the last entry).
pub(crate) fn checked_indices(
    timesteps: &[i64],
    train: usize,
    spacing: Spacing,
    steps: usize,
    config: &SchedulerConfig,
) -> Result<Vec<usize>> {
    timesteps
        .iter()
        .map(|&t| {
            usize::try_from(t)
                .ok()
                .filter(|&t| t < train)
                .ok_or_else(|| {
                    Error::InvalidInput(format!(
                        "{steps} steps with timestep_spacing {spacing:?} and steps_offset {} give \
                     timestep {t}, outside the model's {train} training timesteps ({}); \
                     choose another step count",
                        config.steps_offset(),
                        config.path().display()
                    ))
                })
        })
        .collect()
}

impl Scheduler for Ddim {
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
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        let model_output = to_f32(model_output)?;
        let x_t = to_f32(sample)?;
        // 1. ᾱ_t and ᾱ_{t-1} (the paper's α), with t-1 the next listed timestep.
        let alpha_t = self.alphas_cumprod[self.indices[step_index]];
        let alpha_prev = match self.indices.get(step_index + 1) {
            Some(&prev) => self.alphas_cumprod[prev],
            None => self.final_alpha_cumprod,
        };
        let beta_t = 1.0 - alpha_t;
        // 2. Predicted x₀ and ε_θ(x_t) (eq. 12's "predicted x₀" term).
        let (x0, eps) = match self.prediction {
            Prediction::Epsilon => {
                let x0 = div(
                    &(&x_t - mul(&model_output, beta_t.sqrt())?)?,
                    alpha_t.sqrt(),
                )?;
                (x0, model_output)
            }
            Prediction::Sample => {
                let eps = div(
                    &(&x_t - mul(&model_output, alpha_t.sqrt())?)?,
                    beta_t.sqrt(),
                )?;
                (model_output, eps)
            }
            Prediction::Velocity => {
                let x0 = (mul(&x_t, alpha_t.sqrt())? - mul(&model_output, beta_t.sqrt())?)?;
                let eps = (mul(&model_output, alpha_t.sqrt())? + mul(&x_t, beta_t.sqrt())?)?;
                (x0, eps)
            }
        };
        // 3. Optional clipping of x₀ (diffusers' clip_sample).
        let x0 = match self.clip {
            Some(range) => x0.clamp(-range, range)?,
            None => x0,
        };
        // 4. "Direction pointing to x_t": √(1 − ᾱ_{t-1} − σ_t²) · ε_θ, with σ_t = 0 for η = 0.
        let direction = mul(&eps, (1.0 - alpha_prev - 0.0).sqrt())?;
        // 5. x_{t-1} = √ᾱ_{t-1} · x₀ + direction (eq. 12 without the noise term).
        Ok((mul(&x0, alpha_prev.sqrt())? + direction)?)
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

/// q(x_t | x₀) = N(√ᾱ_t · x₀, (1 − ᾱ_t) I): `√ᾱ_t · original + √(1 − ᾱ_t) · noise`.
pub(crate) fn add_noise_vp(
    alphas_cumprod: &[f32],
    index: usize,
    original: &Tensor,
    noise: &Tensor,
) -> Result<Tensor> {
    let alpha = alphas_cumprod[index];
    let original = to_f32(original)?;
    let noise = to_f32(noise)?;
    Ok((mul(&original, alpha.sqrt())? + mul(&noise, (1.0 - alpha).sqrt())?)?)
}

#[cfg(test)]
mod tests {
    use crate::schedulers::{build, sd15_test_config, SchedulerKind};

    #[test]
    fn leading_timesteps_match_diffusers() {
        let s = build(SchedulerKind::Ddim, &sd15_test_config(), 10, false).unwrap();
        // DDIMScheduler.from_config(sd15).set_timesteps(10).timesteps
        assert_eq!(
            s.timesteps(),
            &[901.0, 801.0, 701.0, 601.0, 501.0, 401.0, 301.0, 201.0, 101.0, 1.0]
        );
    }

    #[test]
    fn linspace_and_trailing_timesteps_match_diffusers() {
        let mut c = sd15_test_config();
        c.timestep_spacing = Some("linspace".into());
        let s = build(SchedulerKind::Ddim, &c, 7, false).unwrap();
        // np.linspace(0, 999, 7).round(): 166.5 and 832.5 round to even.
        assert_eq!(
            s.timesteps(),
            &[999.0, 832.0, 666.0, 500.0, 333.0, 166.0, 0.0]
        );
        c.timestep_spacing = Some("trailing".into());
        let s = build(SchedulerKind::Ddim, &c, 7, false).unwrap();
        assert_eq!(
            s.timesteps(),
            &[999.0, 856.0, 713.0, 570.0, 428.0, 285.0, 142.0]
        );
    }

    #[test]
    fn out_of_range_timesteps_are_errors() {
        // 1000 leading steps with steps_offset 1 reach timestep 1000.
        let err = build(SchedulerKind::Ddim, &sd15_test_config(), 1000, false)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("give timestep 1000"), "{err}");
        // numpy's arange gives 61 trailing steps a 62nd timestep of -1.
        let mut c = sd15_test_config();
        c.timestep_spacing = Some("trailing".into());
        let err = build(SchedulerKind::Ddim, &c, 61, false)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("give timestep -1"), "{err}");
    }

    #[test]
    fn thresholding_is_a_config_error() {
        let mut c = sd15_test_config();
        c.thresholding = Some(true);
        let err = build(SchedulerKind::Ddim, &c, 10, false)
            .err()
            .unwrap()
            .to_string();
        assert!(err.starts_with("sd15.json: field `thresholding`"), "{err}");
    }
}
