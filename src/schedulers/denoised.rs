//! The clean latents x̂₀ the model's output implies at any step, whatever the scheduler: what
//! live previews show (AUTOMATIC1111 and ComfyUI preview this estimate too, not the noisy
//! latents, which early on are mostly noise).
//!
//! Every scheduler feeds the UNet `scale_model_input(x)`, which is the DDPM-parametrised
//! sample x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε (σ-parametrised schedulers divide by √(σ²+1) to get
//! there), so one formula serves them all (Ho et al. 2020, eq. 15; Salimans & Ho 2022 for v).
use candle_core::{DType, Tensor};

use super::config::SchedulerConfig;
use super::math::{self, Prediction};
use crate::Result;

/// x̂₀ from a model input and output, for the model's training schedule.
#[derive(Debug, Clone)]
pub struct DenoisedEstimate {
    alphas_cumprod: Vec<f32>,
    prediction: Prediction,
}

impl DenoisedEstimate {
    /// The estimate for a model whose scheduler file is `config` (its betas and
    /// `prediction_type`).
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let betas = config.betas(true)?;
        let prediction = config.prediction(
            "the preview",
            &[
                Prediction::Epsilon,
                Prediction::Velocity,
                Prediction::Sample,
            ],
        )?;
        Ok(Self {
            alphas_cumprod: math::alphas_cumprod(&betas),
            prediction,
        })
    }

    /// ᾱ at a timestep, interpolated linearly between training timesteps (Euler-family
    /// schedulers run at fractional ones).
    fn alpha_bar(&self, t: f64) -> f64 {
        let last = self.alphas_cumprod.len().saturating_sub(1);
        let t = t.clamp(0.0, last as f64);
        let (lo, hi) = (t.floor() as usize, t.ceil() as usize);
        let frac = t - lo as f64;
        f64::from(self.alphas_cumprod[lo]) * (1.0 - frac)
            + f64::from(self.alphas_cumprod[hi]) * frac
    }

    /// x̂₀ (b, c, h, w) f32 from the UNet's input `model_input` (already scaled by the
    /// scheduler) and its (guided) output at timestep `t`.
    pub fn estimate(&self, model_input: &Tensor, model_output: &Tensor, t: f64) -> Result<Tensor> {
        let x = model_input.to_dtype(DType::F32)?;
        let out = model_output.to_dtype(DType::F32)?;
        let a = self.alpha_bar(t);
        let (sa, s1a) = (a.sqrt(), (1.0 - a).sqrt());
        Ok(match self.prediction {
            // x₀ = (x_t − √(1−ᾱ)·ε) / √ᾱ
            Prediction::Epsilon => ((x - (out * s1a)?)? / sa.max(1e-6))?,
            // x₀ = √ᾱ·x_t − √(1−ᾱ)·v
            Prediction::Velocity => ((x * sa)? - (out * s1a)?)?,
            Prediction::Sample => out,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn recovers_x0_from_a_noised_sample() {
        let cfg = SchedulerConfig::from_json(
            r#"{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}"#,
            "s.json",
        )
        .unwrap();
        let est = DenoisedEstimate::new(&cfg).unwrap();
        let x0 = Tensor::new(&[[[[0.5f32, -1.0], [2.0, 0.0]]]], &Device::Cpu).unwrap();
        let eps = Tensor::new(&[[[[1.0f32, 0.3], [-0.7, 0.1]]]], &Device::Cpu).unwrap();
        let t = 500.0;
        let a = est.alpha_bar(t);
        let xt = ((&x0 * a.sqrt()).unwrap() + (&eps * (1.0 - a).sqrt()).unwrap()).unwrap();
        let got = est.estimate(&xt, &eps, t).unwrap();
        let d: f32 = (got - &x0)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(d < 1e-5, "{d}");
        // Between training timesteps ᾱ is interpolated, and stays within its neighbours.
        let mid = est.alpha_bar(500.5);
        assert!(mid < est.alpha_bar(500.0) && mid > est.alpha_bar(501.0));
    }
}
