//! Euler's method on the probability-flow ODE in the σ parametrisation of "Elucidating the
//! Design Space of Diffusion-Based Generative Models" (Karras, Aittala, Aila & Laine, NeurIPS
//! 2022, Algorithm 2 with γ = 0 and without its second-order correction): matches diffusers'
//! `EulerDiscreteScheduler`, optionally with Karras sigmas (`use_karras_sigmas`).
use candle_core::Tensor;

use super::config::SchedulerConfig;
use super::math::{self, Prediction, Spacing};
use super::{check_index, div, mul, to_f32, Scheduler};
use crate::noise::NoiseSource;
use crate::Result;

const CLASS: &str = "EulerDiscreteScheduler";

/// ᾱ of the last training timestep after a zero-terminal-SNR rescale: diffusers' Euler-family
/// schedulers replace the exact 0 with 2^-24 so that σ stays finite.
const ZERO_SNR_LAST_ALPHA: f32 = 1.0 / 16_777_216.0;

/// Euler for a fixed number of steps.
#[derive(Debug)]
pub(crate) struct Euler {
    timesteps: Vec<f64>,
    /// σ per timestep plus the final one, float32 as diffusers stores them.
    sigmas: Vec<f32>,
    init_noise_sigma: f64,
    prediction: Prediction,
}

/// The inputs shared by the Euler-family schedulers: the training `alphas_cumprod` (with the
/// zero-SNR adjustment) and the training sigmas derived from them.
pub(crate) struct TrainSchedule {
    pub(crate) alphas_cumprod: Vec<f32>,
    pub(crate) sigmas: Vec<f32>,
}

impl TrainSchedule {
    pub(crate) fn new(config: &SchedulerConfig) -> Result<Self> {
        let mut alphas_cumprod = math::alphas_cumprod(&config.betas(true)?);
        if config.rescale_betas_zero_snr.unwrap_or(false) {
            if let Some(last) = alphas_cumprod.last_mut() {
                *last = ZERO_SNR_LAST_ALPHA;
            }
        }
        let sigmas = math::train_sigmas(&alphas_cumprod);
        Ok(TrainSchedule {
            alphas_cumprod,
            sigmas,
        })
    }

    /// σ at training timestep 0: the final sigma for `final_sigmas_type: sigma_min`.
    pub(crate) fn sigma_min(&self) -> f32 {
        let a = self.alphas_cumprod[0];
        ((1.0 - a) / a).sqrt()
    }
}

/// The float32 timesteps of Euler and Euler ancestral for `n` steps (they differ from DDIM's:
/// "linspace" is not rounded).
pub(crate) fn euler_timesteps(
    config: &SchedulerConfig,
    spacing: Spacing,
    n: usize,
) -> Result<Vec<f32>> {
    let train = config.num_train_timesteps()?;
    Ok(match spacing {
        Spacing::Linspace => math::np_linspace(0.0, (train - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|t| t as f32)
            .collect(),
        Spacing::Leading => {
            let ratio = train / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio) as f32 + config.steps_offset() as f32)
                .collect()
        }
        Spacing::Trailing => math::np_arange_down(train as f64, train as f64 / n as f64)
            .into_iter()
            .map(|t| math::np_round(t) as f32 - 1.0)
            .collect(),
    })
}

/// `init_noise_sigma` of the Euler family: σ_max for "linspace"/"trailing", √(σ_max² + 1)
/// for "leading", in float32.
pub(crate) fn euler_init_noise_sigma(sigmas: &[f32], spacing: Spacing) -> f64 {
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sigma = match spacing {
        Spacing::Linspace | Spacing::Trailing => max,
        Spacing::Leading => (max * max + 1.0).sqrt(),
    };
    f64::from(sigma)
}

/// x₀ predicted from the model output at noise level σ (Karras et al.'s D(x; σ)).
pub(crate) fn predict_x0(
    prediction: Prediction,
    sample: &Tensor,
    model_output: &Tensor,
    sigma: f32,
) -> Result<Tensor> {
    Ok(match prediction {
        // x₀ = x − σ·ε
        Prediction::Epsilon => (sample - mul(model_output, sigma)?)?,
        // x₀ = −σ/√(σ²+1) · v + x/(σ²+1)
        Prediction::Velocity => {
            let c_out = -sigma / (sigma * sigma + 1.0).sqrt();
            (mul(model_output, c_out)? + div(sample, sigma * sigma + 1.0)?)?
        }
        Prediction::Sample => model_output.clone(),
    })
}

impl Euler {
    pub(crate) fn new(
        config: &SchedulerConfig,
        num_inference_steps: usize,
        karras: bool,
    ) -> Result<Self> {
        check_euler_config(config)?;
        let prediction = config.prediction(
            CLASS,
            &[
                Prediction::Epsilon,
                Prediction::Velocity,
                Prediction::Sample,
            ],
        )?;
        let karras = karras || config.use_karras_sigmas.unwrap_or(false);
        let n = num_inference_steps;
        let train = TrainSchedule::new(config)?;
        let spacing = config.spacing(Spacing::Linspace)?;
        let mut timesteps = euler_timesteps(config, spacing, n)?;
        let train_sigmas: Vec<f64> = train.sigmas.iter().map(|&s| f64::from(s)).collect();
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| math::np_interp(f64::from(t), &train_sigmas))
            .collect();
        if karras {
            let sigma_min = config.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let sigma_max = config.sigma_max.unwrap_or(sigmas[0]);
            sigmas = math::karras_sigmas(sigma_min, sigma_max, n);
            let log_sigmas: Vec<f32> = train.sigmas.iter().map(|&s| math::numpy_logf(s)).collect();
            timesteps = sigmas
                .iter()
                .map(|&s| math::sigma_to_t(s, &log_sigmas) as f32)
                .collect();
        }
        let last = if config.final_sigma_is_min()? {
            train.sigma_min()
        } else {
            0.0
        };
        let sigmas: Vec<f32> = sigmas
            .iter()
            .map(|&s| s as f32)
            .chain(std::iter::once(last))
            .collect();
        Ok(Euler {
            timesteps: timesteps.iter().map(|&t| f64::from(t)).collect(),
            init_noise_sigma: euler_init_noise_sigma(&sigmas, spacing),
            sigmas,
            prediction,
        })
    }
}

/// Options of `EulerDiscreteScheduler` that `latent` does not implement.
fn check_euler_config(config: &SchedulerConfig) -> Result<()> {
    match config.interpolation_type.as_deref() {
        None | Some("linear") => {}
        Some(other) => {
            return Err(config.error(
                "interpolation_type",
                format!("`{other}` is not implemented (expected linear)"),
            ))
        }
    }
    match config.timestep_type.as_deref() {
        None | Some("discrete") => {}
        Some(other) => {
            return Err(config.error(
                "timestep_type",
                format!("`{other}` is not implemented (expected discrete)"),
            ))
        }
    }
    config.require_off(
        config.use_exponential_sigmas,
        "use_exponential_sigmas",
        "exponential sigmas are not implemented",
    )?;
    config.require_off(
        config.use_beta_sigmas,
        "use_beta_sigmas",
        "beta sigmas are not implemented",
    )?;
    Ok(())
}

impl Scheduler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        let sigma = self.sigmas[step_index];
        // The model sees x / √(σ² + 1) (Karras et al.'s c_in).
        div(&to_f32(sample)?, (sigma * sigma + 1.0).sqrt())
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
        let x = to_f32(sample)?;
        // 1. σ_i and σ_{i+1}; without churn (γ = 0) σ̂ = σ_i.
        let sigma_hat = self.sigmas[step_index];
        let sigma_next = self.sigmas[step_index + 1];
        // 2. D(x; σ̂), the denoised estimate.
        let x0 = predict_x0(self.prediction, &x, &model_output, sigma_hat)?;
        // 3. d = (x − D(x; σ̂)) / σ̂, the ODE's dx/dσ.
        let d = div(&(&x - x0)?, sigma_hat)?;
        // 4. x_{i+1} = x + (σ_{i+1} − σ̂) · d.
        Ok((&x + mul(&d, sigma_next - sigma_hat)?)?)
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
    use crate::schedulers::{build, sd15_test_config, SchedulerConfig, SchedulerKind};

    #[test]
    fn sd15_schedule_matches_diffusers() {
        let s = build(SchedulerKind::Euler, &sd15_test_config(), 4, false).unwrap();
        // EulerDiscreteScheduler.from_config(sd15).set_timesteps(4): linspace, not rounded.
        assert_eq!(s.timesteps(), &[999.0, 666.0, 333.0, 0.0]);
        let sigmas = s.sigmas().unwrap();
        assert_eq!(sigmas.len(), 5);
        assert_eq!(sigmas[0], 14.614_647);
        assert_eq!(sigmas[3], 0.029_167_533);
        assert_eq!(sigmas[4], 0.0);
        assert_eq!(s.init_noise_sigma(), f64::from(14.614_647f32));
    }

    #[test]
    fn karras_follows_the_flag_or_the_config() {
        let plain = build(SchedulerKind::Euler, &sd15_test_config(), 10, false).unwrap();
        let karras = build(SchedulerKind::Euler, &sd15_test_config(), 10, true).unwrap();
        assert_ne!(plain.sigmas(), karras.sigmas());
        let mut c = sd15_test_config();
        c.use_karras_sigmas = Some(true);
        let from_config = build(SchedulerKind::Euler, &c, 10, false).unwrap();
        assert_eq!(from_config.sigmas(), karras.sigmas());
        assert_eq!(from_config.timesteps(), karras.timesteps());
    }

    #[test]
    fn unimplemented_options_are_config_errors() {
        for (field, json) in [
            (
                "interpolation_type",
                r#"{"interpolation_type": "log_linear"}"#,
            ),
            ("timestep_type", r#"{"timestep_type": "continuous"}"#),
            ("use_beta_sigmas", r#"{"use_beta_sigmas": true}"#),
            ("final_sigmas_type", r#"{"final_sigmas_type": "max"}"#),
        ] {
            let c = SchedulerConfig::from_json(json, "e.json").unwrap();
            let err = build(SchedulerKind::Euler, &c, 10, false)
                .err()
                .unwrap()
                .to_string();
            assert!(
                err.starts_with(&format!("e.json: field `{field}`")),
                "{err}"
            );
        }
    }
}
