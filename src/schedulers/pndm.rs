//! PNDM, "Pseudo Numerical Methods for Diffusion Models on Manifolds" (Liu, Ren, Lin & Zhao,
//! ICLR 2022): matches diffusers' `PNDMScheduler`. With `skip_prk_steps` (Stable Diffusion's
//! setting) it is PLMS, a linear multistep method started with one second-order step; without,
//! the first three steps are pseudo Runge-Kutta (PRK) steps.
//!
//! As in `ddim.rs`, the previous timestep comes from the timestep list rather than from
//! `t - num_train_timesteps // num_inference_steps`: identical for "leading" spacing (SD's),
//! different, and consistent with the list, for "linspace", "trailing" and PRK half steps
//! when that ratio is odd.
use candle_core::Tensor;

use super::config::SchedulerConfig;
use super::ddim::{add_noise_vp, checked_indices};
use super::math::{self, Prediction, Spacing};
use super::{check_index, div, mul, to_f32, Scheduler};
use crate::noise::NoiseSource;
use crate::{Error, Result};

const CLASS: &str = "PNDMScheduler";

/// PNDM / PLMS for a fixed number of steps.
#[derive(Debug)]
pub(crate) struct Pndm {
    /// diffusers' `timesteps`: the PRK ones (if any), then the PLMS ones.
    timesteps: Vec<f64>,
    indices: Vec<usize>,
    /// How many leading entries of `indices` are PRK steps.
    prk_len: usize,
    /// The distinct timesteps, descending (diffusers' `_timesteps` reversed).
    distinct: Vec<usize>,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    prediction: Prediction,
    /// Steps taken so far (diffusers' `counter`): the multistep history depends on it.
    counter: usize,
    /// Past ε estimates, newest last (diffusers' `ets`).
    ets: Vec<Tensor>,
    /// PRK: the weighted sum of the stage outputs so far.
    cur_model_output: Option<Tensor>,
    /// The sample a PRK step or the PLMS warm-up step started from.
    cur_sample: Option<Tensor>,
}

impl Pndm {
    pub(crate) fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        let prediction = config.prediction(CLASS, &[Prediction::Epsilon, Prediction::Velocity])?;
        // PNDMScheduler has no rescale_betas_zero_snr: diffusers ignores the key.
        let alphas_cumprod = math::alphas_cumprod(&config.betas(false)?);
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(false) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let train = config.num_train_timesteps()?;
        let n = num_inference_steps;
        let spacing = config.spacing(Spacing::Leading)?;
        // diffusers' `_timesteps`, ascending.
        let base: Vec<i64> = match spacing {
            Spacing::Linspace => math::np_linspace(0.0, (train - 1) as f64, n)
                .into_iter()
                .map(|t| math::np_round(t) as i64)
                .collect(),
            Spacing::Leading => {
                let ratio = train / n;
                (0..n)
                    .map(|i| (i * ratio + config.steps_offset()) as i64)
                    .collect()
            }
            Spacing::Trailing => math::np_arange_down(train as f64, train as f64 / n as f64)
                .into_iter()
                .rev()
                .map(|t| math::np_round(t) as i64 - 1)
                .collect(),
        };
        let len = base.len();
        let skip_prk = config.skip_prk_steps.unwrap_or(false);
        let (prk, plms): (Vec<i64>, Vec<i64>) = if skip_prk {
            // PLMS: the first timestep twice after the first step (its warm-up correction).
            let mut plms = base[..len - 1].to_vec();
            if len >= 2 {
                plms.push(base[len - 2]);
            }
            plms.push(base[len - 1]);
            plms.reverse();
            (Vec::new(), plms)
        } else {
            if len < 4 {
                return Err(Error::InvalidInput(format!(
                    "PNDM with Runge-Kutta warm-up steps (skip_prk_steps false in {}) needs at \
                     least 4 steps, got {n}",
                    config.path().display()
                )));
            }
            // Three RK steps over the last four timesteps, each with two half-step stages.
            let half = (train / n / 2) as i64;
            let mut stages = Vec::with_capacity(8);
            for &t in &base[len - 4..] {
                stages.push(t);
                stages.push(t + half);
            }
            stages.pop();
            let doubled: Vec<i64> = stages.iter().flat_map(|&t| [t, t]).collect();
            let mut prk = doubled[1..doubled.len() - 1].to_vec();
            prk.reverse();
            let plms = base[..len - 3].iter().rev().copied().collect();
            (prk, plms)
        };
        let timesteps: Vec<i64> = prk.iter().chain(plms.iter()).copied().collect();
        let indices = checked_indices(&timesteps, train, spacing, n, config)?;
        let mut distinct = checked_indices(&base, train, spacing, n, config)?;
        distinct.sort_unstable_by(|a, b| b.cmp(a));
        distinct.dedup();
        Ok(Pndm {
            timesteps: timesteps.iter().map(|&t| t as f64).collect(),
            indices,
            prk_len: prk.len(),
            distinct,
            alphas_cumprod,
            final_alpha_cumprod,
            prediction,
            counter: 0,
            ets: Vec::new(),
            cur_model_output: None,
            cur_sample: None,
        })
    }

    fn alpha(&self, index: Option<usize>) -> f32 {
        match index {
            Some(t) => self.alphas_cumprod[t],
            None => self.final_alpha_cumprod,
        }
    }

    /// The distinct timestep after `t` (less noisy), or `None` after the last.
    fn next_distinct(&self, t: usize) -> Option<usize> {
        let i = self.distinct.iter().position(|&d| d == t)?;
        self.distinct.get(i + 1).copied()
    }

    /// The paper's transfer part φ(x_t, ε, t, t−δ), its DDIM-derived update: moves `sample`
    /// from timestep `from` to `to` (`None`: past the last step) along the ε estimate `eps`.
    fn transfer(
        &self,
        sample: &Tensor,
        from: usize,
        to: Option<usize>,
        eps: &Tensor,
    ) -> Result<Tensor> {
        let alpha_t = self.alphas_cumprod[from];
        let alpha_prev = self.alpha(to);
        let beta_t = 1.0 - alpha_t;
        let beta_prev = 1.0 - alpha_prev;
        let eps = match self.prediction {
            // ε = √ᾱ_t · v + √(1 − ᾱ_t) · x_t.
            Prediction::Velocity => (mul(eps, alpha_t.sqrt())? + mul(sample, beta_t.sqrt())?)?,
            _ => eps.clone(),
        };
        let sample_coeff = (alpha_prev / alpha_t).sqrt();
        let denom = alpha_t * beta_prev.sqrt() + (alpha_t * beta_t * alpha_prev).sqrt();
        let update = div(&mul(&eps, alpha_prev - alpha_t)?, denom)?;
        Ok((mul(sample, sample_coeff)? - update)?)
    }

    /// One stage of the paper's pseudo Runge-Kutta method (PRK), used for the first three steps.
    fn step_prk(&mut self, eps: Tensor, sample: Tensor) -> Result<Tensor> {
        let c = self.counter;
        let group = c / 4 * 4;
        // 1. The RK step runs from the group's first timestep; stages 0-1 aim at the
        //    midpoint, stages 2-3 at the end.
        let from = self.indices[group];
        let to = if c % 4 < 2 {
            self.indices[group + 1]
        } else {
            self.indices[group + 3]
        };
        // 2. e' = (e1 + 2 e2 + 2 e3 + e4) / 6 accumulated over the four stages.
        let eps = match c % 4 {
            0 => {
                self.cur_model_output = Some(mul(&eps, (1.0f64 / 6.0) as f32)?);
                self.ets.push(eps.clone());
                self.cur_sample = Some(sample.clone());
                eps
            }
            1 | 2 => {
                let acc = self.cur_model_output.take().ok_or_else(out_of_order)?;
                self.cur_model_output = Some((acc + mul(&eps, (1.0f64 / 3.0) as f32)?)?);
                eps
            }
            _ => {
                let acc = self.cur_model_output.take().ok_or_else(out_of_order)?;
                (acc + mul(&eps, (1.0f64 / 6.0) as f32)?)?
            }
        };
        let start = self.cur_sample.clone().unwrap_or(sample);
        let prev = self.transfer(&start, from, Some(to), &eps)?;
        self.counter += 1;
        Ok(prev)
    }

    /// One step of the paper's pseudo linear multistep method (PLMS, fourth-order
    /// Adams-Bashforth weights on the ε history).
    fn step_plms(&mut self, eps: Tensor, sample: Tensor, step_index: usize) -> Result<Tensor> {
        let t = self.indices[step_index];
        let c = self.counter;
        // 1. Where this step goes: from t to the next timestep, except the warm-up's second
        //    evaluation, which redoes the first step from the timestep before t.
        let (from, to) = if c != 1 {
            self.ets.push(eps.clone());
            if self.ets.len() > 4 {
                self.ets.remove(0);
            }
            (t, self.next_distinct(t))
        } else {
            let i = self.distinct.iter().position(|&d| d == t);
            let before = i
                .and_then(|i| i.checked_sub(1))
                .map(|i| self.distinct[i])
                .ok_or_else(out_of_order)?;
            (before, Some(t))
        };
        // 2. The combined ε estimate e'.
        let n = self.ets.len();
        let (eps, sample) = if n == 1 && c == 0 {
            self.cur_sample = Some(sample.clone());
            (eps, sample)
        } else if n == 1 && c == 1 {
            // Second-order start: the mean of ε at both ends, applied from the first sample.
            let start = self.cur_sample.take().ok_or_else(out_of_order)?;
            (div(&(eps + &self.ets[0])?, 2.0)?, start)
        } else {
            let e = &self.ets;
            let combined = match n {
                2 => div(&(mul(&e[1], 3.0)? - &e[0])?, 2.0)?,
                3 => {
                    let sum = ((mul(&e[2], 23.0)? - mul(&e[1], 16.0)?)? + mul(&e[0], 5.0)?)?;
                    div(&sum, 12.0)?
                }
                4 => {
                    let sum = (((mul(&e[3], 55.0)? - mul(&e[2], 59.0)?)? + mul(&e[1], 37.0)?)?
                        - mul(&e[0], 9.0)?)?;
                    mul(&sum, (1.0f64 / 24.0) as f32)?
                }
                _ => return Err(out_of_order()),
            };
            (combined, sample)
        };
        // 3. Transfer x_t to x_{t-δ} with e'.
        let prev = self.transfer(&sample, from, to, &eps)?;
        self.counter += 1;
        Ok(prev)
    }
}

fn out_of_order() -> Error {
    Error::InvalidInput("PNDM steps must be taken in order, starting from the first".into())
}

impl Scheduler for Pndm {
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
        let eps = to_f32(model_output)?;
        let sample = to_f32(sample)?;
        if self.counter < self.prk_len {
            self.step_prk(eps, sample)
        } else {
            self.step_plms(eps, sample, step_index)
        }
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
    use crate::schedulers::{build, SchedulerConfig, SchedulerKind};

    fn config(skip_prk: bool) -> SchedulerConfig {
        let mut c = SchedulerConfig::from_json(
            r#"{"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "beta_start": 0.00085, "set_alpha_to_one": false, "steps_offset": 1}"#,
            "sd15.json",
        )
        .unwrap();
        c.skip_prk_steps = Some(skip_prk);
        c
    }

    #[test]
    fn plms_repeats_the_second_timestep() {
        let s = build(SchedulerKind::Pndm, &config(true), 5, false).unwrap();
        // PNDMScheduler.from_config(sd15).set_timesteps(5).timesteps
        assert_eq!(s.timesteps(), &[801.0, 601.0, 601.0, 401.0, 201.0, 1.0]);
        let s = build(SchedulerKind::Pndm, &config(true), 1, false).unwrap();
        assert_eq!(s.timesteps(), &[1.0]);
    }

    #[test]
    fn prk_timesteps_match_diffusers() {
        let s = build(SchedulerKind::Pndm, &config(false), 5, false).unwrap();
        // PNDMScheduler(skip_prk_steps=False, steps_offset=1).set_timesteps(5).timesteps
        assert_eq!(
            s.timesteps(),
            &[
                801.0, 701.0, 701.0, 601.0, 601.0, 501.0, 501.0, 401.0, 401.0, 301.0, 301.0, 201.0,
                201.0, 1.0
            ]
        );
        let err = build(SchedulerKind::Pndm, &config(false), 3, false)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("needs at least 4 steps"), "{err}");
    }

    #[test]
    fn sample_prediction_is_rejected() {
        let mut c = config(true);
        c.prediction_type = Some("sample".into());
        let err = build(SchedulerKind::Pndm, &c, 10, false)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("`sample` is not supported by PNDMScheduler"),
            "{err}"
        );
    }
}
