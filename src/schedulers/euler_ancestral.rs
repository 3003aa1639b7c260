//! Euler ancestral sampling: Euler's method in the σ parametrisation of Karras et al. 2022
//! ("Elucidating the Design Space of Diffusion-Based Generative Models") with fresh noise added
//! after each step, splitting σ_{i+1} into a deterministic σ_down and a stochastic σ_up as in
//! k-diffusion's `sample_euler_ancestral`: matches diffusers' `EulerAncestralDiscreteScheduler`.
//!
//! The noise is drawn from the caller's [`NoiseSource`] at the point and with the shape
//! diffusers draws it (`randn_tensor(model_output.shape)` after the Euler update), so a
//! torch-compatible source with one generator per image reproduces diffusers' images.
use candle_core::Tensor;

use super::config::SchedulerConfig;
use super::euler::{euler_init_noise_sigma, euler_timesteps, predict_x0, TrainSchedule};
use super::math::{self, Prediction, Spacing};
use super::{check_index, div, mul, to_f32, Scheduler};
use crate::noise::NoiseSource;
use crate::{Error, Result};

const CLASS: &str = "EulerAncestralDiscreteScheduler";

/// Euler ancestral for a fixed number of steps.
#[derive(Debug)]
pub(crate) struct EulerAncestral {
    timesteps: Vec<f64>,
    /// σ per timestep plus a final 0, float32 as diffusers stores them.
    sigmas: Vec<f32>,
    init_noise_sigma: f64,
    prediction: Prediction,
}

impl EulerAncestral {
    pub(crate) fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        // diffusers' class has neither Karras sigmas nor final_sigmas_type: those keys are
        // ignored, like any key of another class.
        let prediction = config.prediction(CLASS, &[Prediction::Epsilon, Prediction::Velocity])?;
        let train = TrainSchedule::new(config)?;
        let spacing = config.spacing(Spacing::Linspace)?;
        let timesteps = euler_timesteps(config, spacing, num_inference_steps)?;
        let train_sigmas: Vec<f64> = train.sigmas.iter().map(|&s| f64::from(s)).collect();
        let sigmas: Vec<f32> = timesteps
            .iter()
            .map(|&t| math::np_interp(f64::from(t), &train_sigmas) as f32)
            .chain(std::iter::once(0.0))
            .collect();
        Ok(EulerAncestral {
            timesteps: timesteps.iter().map(|&t| f64::from(t)).collect(),
            init_noise_sigma: euler_init_noise_sigma(&sigmas, spacing),
            sigmas,
            prediction,
        })
    }
}

impl Scheduler for EulerAncestral {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        let sigma = self.sigmas[step_index];
        div(&to_f32(sample)?, (sigma * sigma + 1.0).sqrt())
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
        let x = to_f32(sample)?;
        let sigma_from = self.sigmas[step_index];
        let sigma_to = self.sigmas[step_index + 1];
        // 1. D(x; σ_i), the denoised estimate.
        let x0 = predict_x0(self.prediction, &x, &model_output, sigma_from)?;
        // 2. σ_up = √(σ_{i+1}² (σ_i² − σ_{i+1}²) / σ_i²), σ_down = √(σ_{i+1}² − σ_up²):
        //    the ancestral step's noise and deterministic parts, σ_down² + σ_up² = σ_{i+1}².
        let (from2, to2) = (sigma_from * sigma_from, sigma_to * sigma_to);
        let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
        let sigma_down = (to2 - sigma_up * sigma_up).sqrt();
        // 3. Euler step to σ_down: x + (σ_down − σ_i) · (x − D) / σ_i.
        let d = div(&(&x - x0)?, sigma_from)?;
        let x = (&x + mul(&d, sigma_down - sigma_from)?)?;
        // 4. Add fresh noise ε ~ N(0, I) scaled by σ_up.
        let eps = noise.randn(model_output.dims(), model_output.device())?;
        if eps.dims() != model_output.dims() {
            return Err(Error::InvalidInput(format!(
                "noise source returned shape {:?} for requested {:?}",
                eps.dims(),
                model_output.dims()
            )));
        }
        Ok((x + mul(&to_f32(&eps)?, sigma_up)?)?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        let sigma = self.sigmas[step_index];
        Ok((to_f32(original)? + mul(&to_f32(noise)?, sigma)?)?)
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }
}

#[cfg(test)]
mod tests {
    use crate::schedulers::{build, SchedulerConfig, SchedulerKind};

    #[test]
    fn sample_prediction_is_rejected_like_diffusers() {
        let c = SchedulerConfig::from_json(r#"{"prediction_type": "sample"}"#, "a.json").unwrap();
        let err = build(SchedulerKind::EulerAncestral, &c, 10, false)
            .err()
            .unwrap()
            .to_string();
        assert!(err.starts_with("a.json: field `prediction_type`"), "{err}");
    }

    #[test]
    fn karras_keys_of_other_classes_are_ignored() {
        let c = SchedulerConfig::from_json(
            r#"{"use_karras_sigmas": true, "final_sigmas_type": "sigma_min"}"#,
            "a.json",
        )
        .unwrap();
        let s = build(SchedulerKind::EulerAncestral, &c, 10, false).unwrap();
        assert_eq!(s.sigmas().unwrap().last(), Some(&0.0));
        let plain = build(
            SchedulerKind::EulerAncestral,
            &SchedulerConfig::default(),
            10,
            false,
        )
        .unwrap();
        assert_eq!(s.sigmas(), plain.sigmas());
    }
}
