//! DPM-Solver++(2M), the second-order multistep solver of "DPM-Solver++: Fast Solver for Guided
//! Sampling of Diffusion Probabilistic Models" (Lu, Zhou, Bao, Chen, Li & Zhu, 2022,
//! Algorithm 2), AUTOMATIC1111's "DPM++ 2M": matches diffusers' `DPMSolverMultistepScheduler`
//! with `algorithm_type="dpmsolver++"` and `solver_order=2`.
//!
//! Those two are what this kind is, so the config's `algorithm_type` and `solver_order` are not
//! read here (a model whose default is another DPM-Solver is refused by
//! `SchedulerConfig::default_kind` instead). The other options are the file's or diffusers'
//! defaults: `lower_order_final`, `euler_at_final`, `final_sigmas_type` ("zero"),
//! `solver_type` ("midpoint"), `lambda_min_clipped`, Karras sigmas.
use candle_core::Tensor;

use super::config::SchedulerConfig;
use super::euler::TrainSchedule;
use super::math::{self, Prediction, Spacing};
use super::{check_index, div, mul, to_f32, Scheduler};
use crate::noise::NoiseSource;
use crate::{Error, Result};

const CLASS: &str = "DPMSolverMultistepScheduler";

/// How the second-order step weighs the first-order difference D1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SolverType {
    Midpoint,
    Heun,
}

/// DPM++ 2M for a fixed number of steps.
#[derive(Debug)]
pub(crate) struct DpmPp2m {
    timesteps: Vec<f64>,
    /// σ per timestep plus the final one, float32 as diffusers stores them.
    sigmas: Vec<f32>,
    prediction: Prediction,
    solver_type: SolverType,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_zero: bool,
    /// The previous step's x₀ prediction (diffusers' `model_outputs[-2]`).
    previous_x0: Option<Tensor>,
    /// Steps taken so far, capped at 2 (diffusers' `lower_order_nums`).
    lower_order_nums: usize,
}

impl DpmPp2m {
    pub(crate) fn new(
        config: &SchedulerConfig,
        num_inference_steps: usize,
        karras: bool,
    ) -> Result<Self> {
        check_dpm_config(config)?;
        let prediction = config.prediction(
            CLASS,
            &[
                Prediction::Epsilon,
                Prediction::Velocity,
                Prediction::Sample,
            ],
        )?;
        let solver_type = match config.solver_type.as_deref() {
            // diffusers maps the UniPC/DEIS names onto midpoint.
            None | Some("midpoint") | Some("logrho") | Some("bh1") | Some("bh2") => {
                SolverType::Midpoint
            }
            Some("heun") => SolverType::Heun,
            Some(other) => {
                return Err(config.error(
                    "solver_type",
                    format!("`{other}` is not implemented (expected midpoint or heun)"),
                ))
            }
        };
        let karras = karras || config.use_karras_sigmas.unwrap_or(false);
        let n = num_inference_steps;
        let train_steps = config.num_train_timesteps()?;
        let train = TrainSchedule::new(config)?;

        // Timesteps below the log-SNR floor λ_min are cut off the end of the schedule.
        let clipped = clipped_count(&train.alphas_cumprod, config.lambda_min_clipped);
        let last_timestep = train_steps - clipped;
        let spacing = config.spacing(Spacing::Linspace)?;
        let mut timesteps: Vec<i64> = match spacing {
            Spacing::Linspace => {
                let mut t: Vec<i64> = math::np_linspace(0.0, last_timestep as f64 - 1.0, n + 1)
                    .into_iter()
                    .rev()
                    .map(|t| math::np_round(t) as i64)
                    .collect();
                t.pop();
                t
            }
            Spacing::Leading => {
                let ratio = last_timestep / (n + 1);
                (1..=n)
                    .rev()
                    .map(|i| (i * ratio + config.steps_offset()) as i64)
                    .collect()
            }
            Spacing::Trailing => {
                let ratio = train_steps as f64 / n as f64;
                math::np_arange_down(last_timestep as f64, ratio)
                    .into_iter()
                    .map(|t| math::np_round(t) as i64 - 1)
                    .collect()
            }
        };

        let train_sigmas: Vec<f64> = train.sigmas.iter().map(|&s| f64::from(s)).collect();
        let sigmas: Vec<f64> = if karras {
            // diffusers takes the ends from the whole training schedule here, not from the
            // interpolated one as Euler does.
            let sigma_min = train_sigmas[0];
            let sigma_max = train_sigmas[train_sigmas.len() - 1];
            let sigmas = math::karras_sigmas(sigma_min, sigma_max, n);
            let log_sigmas: Vec<f32> = train.sigmas.iter().map(|&s| math::numpy_logf(s)).collect();
            let round = config.beta_schedule.as_deref() != Some("squaredcos_cap_v2");
            timesteps = sigmas
                .iter()
                .map(|&s| {
                    let t = math::sigma_to_t(s, &log_sigmas);
                    // numpy rounds half to even, then astype(int64) truncates.
                    (if round { math::np_round(t) } else { t }) as i64
                })
                .collect();
            sigmas
        } else {
            timesteps
                .iter()
                .map(|&t| math::np_interp(t as f64, &train_sigmas))
                .collect()
        };
        let final_sigma_zero = !config.final_sigma_is_min()?;
        let last = if final_sigma_zero {
            0.0
        } else {
            train.sigma_min()
        };
        let sigmas: Vec<f32> = sigmas
            .iter()
            .map(|&s| s as f32)
            .chain(std::iter::once(last))
            .collect();
        Ok(DpmPp2m {
            timesteps: timesteps.iter().map(|&t| t as f64).collect(),
            sigmas,
            prediction,
            solver_type,
            lower_order_final: config.lower_order_final.unwrap_or(true),
            euler_at_final: config.euler_at_final.unwrap_or(false),
            final_sigma_zero,
            previous_x0: None,
            lower_order_nums: 0,
        })
    }

    /// x₀ from the model output at loop position `i` (the "data prediction" model of
    /// DPM-Solver++).
    fn convert_model_output(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        i: usize,
    ) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i]);
        Ok(match self.prediction {
            // x₀ = (x_t − σ_t ε) / α_t
            Prediction::Epsilon => div(&(sample - mul(model_output, sigma_t)?)?, alpha_t)?,
            // x₀ = α_t x_t − σ_t v
            Prediction::Velocity => (mul(sample, alpha_t)? - mul(model_output, sigma_t)?)?,
            Prediction::Sample => model_output.clone(),
        })
    }
}

/// Options of `DPMSolverMultistepScheduler` that `latent` does not implement.
fn check_dpm_config(config: &SchedulerConfig) -> Result<()> {
    config.require_off(
        config.thresholding,
        "thresholding",
        "dynamic thresholding is not implemented (it is meant for pixel-space models)",
    )?;
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
    config.require_off(
        config.use_lu_lambdas,
        "use_lu_lambdas",
        "Lu lambdas are not implemented",
    )?;
    config.require_off(
        config.use_flow_sigmas,
        "use_flow_sigmas",
        "flow-matching sigmas are not implemented",
    )?;
    config.require_off(
        config.use_dynamic_shifting,
        "use_dynamic_shifting",
        "dynamic shifting is not implemented",
    )?;
    if let Some(v @ ("learned" | "learned_range")) = config.variance_type.as_deref() {
        return Err(config.error(
            "variance_type",
            format!("`{v}` is not implemented (a model that also predicts its variance)"),
        ));
    }
    Ok(())
}

/// diffusers' `_sigma_to_alpha_sigma_t` in float32: α_t = 1/√(σ² + 1), σ_t = σ·α_t.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// λ_t = log α_t − log σ_t, the half log-SNR, in float32.
fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

/// How many training timesteps have λ below `lambda_min_clipped` (diffusers' searchsorted on
/// the flipped λ table). Computed with correctly rounded logs, where torch uses its vectorised
/// ones: a value exactly on a table entry could land one index apart.
fn clipped_count(alphas_cumprod: &[f32], lambda_min_clipped: Option<f64>) -> usize {
    let Some(floor) = lambda_min_clipped else {
        return 0;
    };
    let lambdas: Vec<f64> = alphas_cumprod
        .iter()
        .rev()
        .map(|&a| f64::from(lambda(a.sqrt(), (1.0 - a).sqrt())))
        .collect();
    lambdas.iter().take_while(|&&l| l < floor).count()
}

impl Scheduler for DpmPp2m {
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
        let len = self.timesteps.len();
        check_index(step_index, len)?;
        let i = step_index;
        let x = to_f32(sample)?;
        // The last step is first order (DDIM-like) with a zero final sigma, and for short
        // schedules with lower_order_final; diffusers' rule.
        let lower_order_final = i == len - 1
            && (self.euler_at_final
                || (self.lower_order_final && len < 15)
                || self.final_sigma_zero);
        // 1. Data prediction x₀ = x_θ(x_{t_i}, t_i) and the history.
        let x0 = self.convert_model_output(&to_f32(model_output)?, &x, i)?;
        let previous = self.previous_x0.replace(x0.clone());
        // 2. α, σ and λ = log(α/σ) at t_i (s0) and t_{i+1} (t).
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        // 3. h_i = λ_{t_{i+1}} − λ_{t_i}.
        let h = lambda_t - lambda_s0;
        let phi = alpha_t * ((-h).exp() - 1.0);
        // 4. x̃ = (σ_{t_{i+1}} / σ_{t_i}) x − α_{t_{i+1}} (e^{−h} − 1) D, with D = x₀ for the
        //    first-order (DPM-Solver++1, i.e. DDIM) step and D corrected by the previous x₀
        //    for the second-order one.
        let prev = match previous {
            Some(m1) if self.lower_order_nums >= 1 && !lower_order_final => {
                let before = i.checked_sub(1).ok_or_else(|| {
                    Error::InvalidInput("DPM++ 2M steps must be taken in order".into())
                })?;
                let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[before]);
                let lambda_s1 = lambda(alpha_s1, sigma_s1);
                // r_i = h_{i-1} / h_i; D1 = (x₀ − x₀_prev) / r_i.
                let h_0 = lambda_s0 - lambda_s1;
                let r0 = h_0 / h;
                let d1 = mul(&(&x0 - m1)?, 1.0 / r0)?;
                let base = (mul(&x, sigma_t / sigma_s0)? - mul(&x0, phi)?)?;
                match self.solver_type {
                    // Algorithm 2: D = (1 + 1/(2r)) x₀ − 1/(2r) x₀_prev.
                    SolverType::Midpoint => (base - mul(&d1, 0.5 * phi)?)?,
                    SolverType::Heun => {
                        (base + mul(&d1, alpha_t * (((-h).exp() - 1.0) / h + 1.0))?)?
                    }
                }
            }
            _ => (mul(&x, sigma_t / sigma_s0)? - mul(&x0, phi)?)?,
        };
        self.lower_order_nums = (self.lower_order_nums + 1).min(2);
        Ok(prev)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step_index]);
        Ok((mul(&to_f32(original)?, alpha_t)? + mul(&to_f32(noise)?, sigma_t)?)?)
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }
}

#[cfg(test)]
mod tests {
    use crate::schedulers::{build, sd15_test_config, SchedulerConfig, SchedulerKind};

    #[test]
    fn sd15_timesteps_match_diffusers() {
        let s = build(SchedulerKind::DpmPp2m, &sd15_test_config(), 5, false).unwrap();
        // DPMSolverMultistepScheduler.from_config(sd15).set_timesteps(5).timesteps
        assert_eq!(s.timesteps(), &[999.0, 799.0, 599.0, 400.0, 200.0]);
        assert_eq!(s.sigmas().unwrap().len(), 6);
        assert_eq!(s.sigmas().unwrap()[5], 0.0);
    }

    #[test]
    fn lambda_min_clipped_cuts_the_schedule() {
        let mut c = sd15_test_config();
        c.lambda_min_clipped = Some(f64::NEG_INFINITY);
        let full = build(SchedulerKind::DpmPp2m, &c, 5, false).unwrap();
        assert_eq!(full.timesteps()[0], 999.0);
        // λ at t = 999 is about -2.68; clipping at -2.5 drops the noisiest timesteps.
        c.lambda_min_clipped = Some(-2.5);
        let clipped = build(SchedulerKind::DpmPp2m, &c, 5, false).unwrap();
        assert!(clipped.timesteps()[0] < 999.0, "{:?}", clipped.timesteps());
    }

    #[test]
    fn unimplemented_options_are_config_errors() {
        for (field, json) in [
            ("thresholding", r#"{"thresholding": true}"#),
            ("use_lu_lambdas", r#"{"use_lu_lambdas": true}"#),
            ("variance_type", r#"{"variance_type": "learned_range"}"#),
            ("solver_type", r#"{"solver_type": "rk4"}"#),
        ] {
            let c = SchedulerConfig::from_json(json, "d.json").unwrap();
            let err = build(SchedulerKind::DpmPp2m, &c, 10, false)
                .err()
                .unwrap()
                .to_string();
            assert!(
                err.starts_with(&format!("d.json: field `{field}`")),
                "{err}"
            );
        }
        // DDPM's variance_type passes through from_config and is ignored by DPM-Solver.
        let c =
            SchedulerConfig::from_json(r#"{"variance_type": "fixed_small"}"#, "d.json").unwrap();
        assert!(build(SchedulerKind::DpmPp2m, &c, 10, false).is_ok());
    }
}
