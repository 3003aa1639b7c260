//! Schedule math shared by the schedulers, computed the way diffusers computes it.
//!
//! diffusers builds its schedules from torch float32 tensors (betas, `alphas_cumprod`, the
//! training sigmas) and numpy float64 arrays (timestep spacing, interpolation, Karras sigmas),
//! converting between them at fixed points. Each function here reproduces one of those stages
//! with the same precision and, where it matters for the last bit, the same operation order.

/// How inference timesteps are spread over the training timesteps (diffusers'
/// `timestep_spacing`; Table 2 of "Common Diffusion Noise Schedules and Sample Steps are
/// Flawed", Lin et al. 2023).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Spacing {
    Linspace,
    Leading,
    Trailing,
}

/// What the model predicts (diffusers' `prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prediction {
    /// The noise ε.
    Epsilon,
    /// The velocity v = α·ε − σ·x₀ (Salimans & Ho 2022, "Progressive Distillation").
    Velocity,
    /// The clean sample x₀.
    Sample,
}

/// `torch.linspace(start, end, steps, dtype=torch.float32)` on the CPU.
///
/// torch casts the ends to float32, takes `step = (end - start) / (steps - 1)` in float32 and
/// fills the first half as `start + step * i` and the second as `end - step * (steps - 1 - i)`.
/// Its kernels are compiled with FMA contraction, so each element is one fused multiply-add;
/// `mul_add` reproduces that rounding exactly (checked against torch 2.15 on all SD schedules).
pub(crate) fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let start = start as f32;
    let end = end as f32;
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// `numpy.linspace(start, stop, num)` in float64: `i * ((stop - start) / (num - 1)) + start`,
/// with the last element set to `stop`.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    let delta = stop - start;
    let div = num - 1;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64).collect();
    if div > 0 {
        let step = delta / div as f64;
        if step == 0.0 {
            y.iter_mut().for_each(|v| *v = *v / div as f64 * delta);
        } else {
            y.iter_mut().for_each(|v| *v *= step);
        }
    } else {
        y.iter_mut().for_each(|v| *v *= delta);
    }
    y.iter_mut().for_each(|v| *v += start);
    if num > 1 {
        y[num - 1] = stop;
    }
    y
}

/// `numpy.linspace(start, stop, num, endpoint=False)` in float64: `i * ((stop - start) / num)
/// + start`, so `stop` itself is left out.
pub(crate) fn np_linspace_no_endpoint(start: f64, stop: f64, num: usize) -> Vec<f64> {
    let delta = stop - start;
    let step = delta / num as f64;
    (0..num)
        .map(|i| {
            let i = i as f64;
            // numpy divides first when the step underflows to zero.
            let y = if step == 0.0 {
                i / num as f64 * delta
            } else {
                i * step
            };
            y + start
        })
        .collect()
}

/// `numpy.arange(start, 0, -step)` for floats, as numpy fills it: the length is
/// `ceil(start / step)`, the first two values are `start` and `start - step`, and the rest are
/// `start + i * delta` with `delta` the difference of those two (not `-step` itself).
///
/// For "trailing" spacing numpy's ceil can give one value more than the step count (61 steps
/// out of 1000 give 62 values, the last one rounding to 0); diffusers keeps them all.
pub(crate) fn np_arange_down(start: f64, step: f64) -> Vec<f64> {
    let len = ((0.0 - start) / -step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let second = start + -step;
    let delta = second - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `numpy.interp(x, arange(len(fp)), fp)`: linear interpolation on integer abscissae, with
/// numpy's rules (clamped outside, exact at the nodes, `slope * (x - j) + fp[j]` inside).
pub(crate) fn np_interp(x: f64, fp: &[f64]) -> f64 {
    let last = fp.len() - 1;
    if x.is_nan() {
        return x;
    }
    if x < 0.0 {
        return fp[0];
    }
    if x >= last as f64 {
        return fp[last];
    }
    let j = x.floor() as usize;
    let xj = j as f64;
    if xj == x {
        return fp[j];
    }
    let slope = (fp[j + 1] - fp[j]) / ((j + 1) as f64 - xj);
    slope * (x - xj) + fp[j]
}

/// numpy's float32 `log` on x86 machines with AVX2 or AVX-512, for positive normal inputs.
///
/// diffusers' `_sigma_to_t` takes `np.log` of the float32 training sigmas. numpy evaluates it
/// with its own SIMD kernel (the same numbers on AVX2 and AVX-512): split x into 2^e · m with
/// m in [1/√2, √2), then `e · ln 2 + P(m - 1) / Q(m - 1)` with two degree-5 polynomials
/// evaluated by fused multiply-adds. It is not correctly rounded (about 1 value in 5 of an SD
/// schedule differs from `ln` by an ulp), and Euler's Karras timesteps inherit those ulps (9%
/// of them moved by 1-9 float32 ulps with a correctly rounded log), so the same arithmetic is
/// done here. The coefficients are numpy's minimax values.
pub(crate) fn numpy_logf(x: f32) -> f32 {
    // numpy's decimal constants (npy_simd_data.h), rounded to float32 by the compiler as
    // numpy's C compiler rounds them.
    #[allow(clippy::excessive_precision)]
    const P: [f32; 6] = [
        0.000000000000000000000e+00,
        9.999999999999998702752e-01,
        2.112677543073053063722e+00,
        1.480000633576506585156e+00,
        3.808837741388407920751e-01,
        2.589979117907922693523e-02,
    ];
    #[allow(clippy::excessive_precision)]
    const Q: [f32; 6] = [
        1.000000000000000000000e+00,
        2.612677543073109236779e+00,
        2.453006071784736363091e+00,
        9.864942958519418960339e-01,
        1.546476374983906719538e-01,
        5.875095403124574342950e-03,
    ];
    if !(x.is_finite() && x >= f32::MIN_POSITIVE) {
        // Zero, subnormal, negative, infinite or NaN: never a training sigma.
        return (x as f64).ln() as f32;
    }
    let bits = x.to_bits();
    // x = 2^e · m with m in [0.5, 1).
    let mut e = ((bits >> 23) as i32 - 126) as f32;
    let mut m = f32::from_bits((bits & 0x007f_ffff) | (126 << 23));
    if m <= std::f32::consts::FRAC_1_SQRT_2 {
        m += m;
        e -= 1.0;
    }
    let y = m - 1.0;
    let num = P[1..]
        .iter()
        .rev()
        .skip(1)
        .fold(P[5], |acc, &c| acc.mul_add(y, c));
    let num = num.mul_add(y, P[0]);
    let den = Q[..5].iter().rev().fold(Q[5], |acc, &c| acc.mul_add(y, c));
    e.mul_add(std::f32::consts::LN_2, num / den)
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose log-sigma `sigma`
/// interpolates, given the float32 `log_sigmas` (ascending, one per training timestep).
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // Index of the first maximum of the running count of log_sigmas at or below log_sigma,
    // i.e. the last such index (0 when there is none), kept below the last interval's end.
    let mut count = 0usize;
    let mut best = 0usize;
    let mut best_index = 0usize;
    for (i, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - f64::from(ls) >= 0.0 {
            count += 1;
        }
        if count > best {
            best = count;
            best_index = i;
        }
    }
    let low_idx = best_index.min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx];
    let high = log_sigmas[high_idx];
    // numpy subtracts the two float32 values in float32.
    let w = (f64::from(low) - log_sigma) / f64::from(low - high);
    let w = w.clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// The noise levels of Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based
/// Generative Models", eq. 5, ρ = 7): `n` sigmas from `sigma_max` down to `sigma_min`, evenly
/// spaced in σ^(1/ρ), in float64 as diffusers' `_convert_to_karras` computes them.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// The "squaredcos_cap_v2" betas of Nichol & Dhariwal 2021 ("Improved Denoising Diffusion
/// Probabilistic Models", eq. 17): β_i = min(1 − ᾱ((i+1)/n) / ᾱ(i/n), 0.999) with
/// ᾱ(t) = cos²((t + 0.008) / 1.008 · π/2), in float64, stored as float32.
///
/// The fractions are float divisions: candle's and diffusers-rs' ports divide usizes here and
/// get t = 0 for every step but the last.
pub(crate) fn betas_for_alpha_bar(n: usize) -> Vec<f32> {
    fn alpha_bar(t: f64) -> f64 {
        let c = ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos();
        c * c
    }
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// Rescales betas to zero terminal SNR (Lin et al. 2023, Algorithm 1), in float32 like
/// diffusers' `rescale_zero_terminal_snr`.
pub(crate) fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sqrt_ab: Vec<f32> = cumprod(&alphas).iter().map(|a| a.sqrt()).collect();
    let first = sqrt_ab[0];
    let last = sqrt_ab[sqrt_ab.len() - 1];
    // Shift so the last value is 0, then scale so the first is unchanged.
    let scale = first / (first - last);
    for v in &mut sqrt_ab {
        *v = (*v - last) * scale;
    }
    let ab: Vec<f32> = sqrt_ab.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(ab.len());
    out.push(1.0 - ab[0]);
    for i in 1..ab.len() {
        out.push(1.0 - ab[i] / ab[i - 1]);
    }
    out
}

/// `torch.cumprod` of a float32 tensor on the CPU: torch accumulates in float64 and rounds
/// each partial product to float32.
pub(crate) fn cumprod(values: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    values
        .iter()
        .map(|&v| {
            acc *= f64::from(v);
            acc as f32
        })
        .collect()
}

/// ᾱ_t = ∏ (1 − β_s), float32 as diffusers stores `alphas_cumprod`.
pub(crate) fn alphas_cumprod(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    cumprod(&alphas)
}

/// The training noise levels σ_t = √((1 − ᾱ_t) / ᾱ_t) in float32, ascending in t.
pub(crate) fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod
        .iter()
        .map(|a| ((1.0 - a) / a).sqrt())
        .collect()
}

/// numpy's `round` (half to even) on float64.
pub(crate) fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=float32) ** 2 and its cumprod,
    /// selected entries as printed by torch 2.15 (float32 values through Python floats).
    #[test]
    fn scaled_linear_betas_match_torch() {
        let betas: Vec<f32> = torch_linspace_f32(0.00085f64.sqrt(), 0.012f64.sqrt(), 1000)
            .into_iter()
            .map(|b| b * b)
            .collect();
        // torch: betas[[0, 500, 999]].
        assert_eq!(betas[0], 0.0008499999530613422f64 as f32);
        assert_eq!(betas[500], 0.004814953543245792f64 as f32);
        assert_eq!(betas[999], 0.011999999172985554f64 as f32);
        let ac = alphas_cumprod(&betas);
        // diffusers: scheduler.alphas_cumprod[[0, 499, 999]] for SD 1.5's config.
        assert_eq!(ac[0], 0.9991499781608582f64 as f32);
        assert_eq!(ac[999], 0.00466009508818388f64 as f32);
    }

    #[test]
    fn linspace_with_one_step_is_the_start() {
        assert_eq!(torch_linspace_f32(0.1, 0.2, 1), vec![0.1f32]);
        assert_eq!(np_linspace(0.0, 999.0, 1), vec![0.0]);
        assert_eq!(np_linspace(0.0, 999.0, 2), vec![0.0, 999.0]);
        let y = np_linspace(0.0, 999.0, 7);
        assert_eq!(y[6], 999.0);
        assert_eq!(y[3], 3.0 * (999.0 / 6.0));
    }

    #[test]
    fn linspace_without_endpoint_leaves_out_stop() {
        assert_eq!(
            np_linspace_no_endpoint(0.0, 50.0, 4),
            vec![0.0, 12.5, 25.0, 37.5]
        );
        assert_eq!(np_linspace_no_endpoint(0.0, 50.0, 1), vec![0.0]);
        assert!(np_linspace_no_endpoint(0.0, 50.0, 0).is_empty());
        // numpy.linspace(0, 50, 3, endpoint=False)[2] == 33.333333333333336
        assert_eq!(np_linspace_no_endpoint(0.0, 50.0, 3)[2], 33.333333333333336);
    }

    #[test]
    fn arange_matches_numpy_length_quirk() {
        // numpy.arange(1000, 0, -1000 / 7): 7 values.
        let v = np_arange_down(1000.0, 1000.0 / 7.0);
        assert_eq!(v.len(), 7);
        assert_eq!(v[0], 1000.0);
        // numpy.arange(1000, 0, -1000 / 61) has 62 values; the last is ~1e-13.
        let v = np_arange_down(1000.0, 1000.0 / 61.0);
        assert_eq!(v.len(), 62);
        assert!(v[61].abs() < 1e-9);
    }

    #[test]
    fn interp_follows_numpy() {
        let fp = [1.0, 3.0, 7.0];
        assert_eq!(np_interp(-1.0, &fp), 1.0);
        assert_eq!(np_interp(0.5, &fp), 2.0);
        assert_eq!(np_interp(1.0, &fp), 3.0);
        assert_eq!(np_interp(1.25, &fp), 4.0);
        assert_eq!(np_interp(2.0, &fp), 7.0);
        assert_eq!(np_interp(5.0, &fp), 7.0);
    }

    #[test]
    fn squaredcos_uses_float_fractions() {
        let betas = betas_for_alpha_bar(1000);
        // With integer division every beta but the last would be 1 - ᾱ(0)/ᾱ(0) = 0.
        assert!(betas[..999].iter().all(|&b| b > 0.0));
        // diffusers' betas_for_alpha_bar(1000)[[0, 500, 999]].
        assert_eq!(betas[0], 4.128422369831242e-05f64 as f32);
        assert_eq!(betas[500], 0.003155691549181938f64 as f32);
        assert_eq!(betas[999], 0.999f32);
    }

    #[test]
    fn zero_snr_rescale_ends_at_zero() {
        let betas: Vec<f32> = torch_linspace_f32(0.00085f64.sqrt(), 0.012f64.sqrt(), 1000)
            .into_iter()
            .map(|b| b * b)
            .collect();
        let rescaled = rescale_zero_terminal_snr(&betas);
        let ac = alphas_cumprod(&rescaled);
        assert_eq!(ac[999], 0.0);
        assert_eq!(rescaled[999], 1.0);
        assert!((ac[0] - alphas_cumprod(&betas)[0]).abs() < 1e-6);
    }

    #[test]
    fn numpy_logf_is_close_to_ln_and_differs_in_the_last_bit_like_numpy() {
        let mut differ = 0;
        for i in 1..2000 {
            let x = i as f32 * 0.0173;
            let ours = numpy_logf(x);
            let exact = (x as f64).ln();
            assert!(
                (f64::from(ours) - exact).abs()
                    <= 4.0 * f64::from(f32::EPSILON) * exact.abs().max(1.0),
                "{x}: {ours} vs {exact}"
            );
            if ours != exact as f32 {
                differ += 1;
            }
        }
        // numpy's kernel is not correctly rounded: some values differ by an ulp.
        assert!(differ > 0);
        assert_eq!(numpy_logf(1.0), 0.0);
        // Bit patterns of numpy 2.4's np.log(np.float32([0.0291675, 14.614647, 0.5, 1.7, 3.3]))
        // on AVX-512; for 3.3 the correctly rounded value is 0x3f98d273.
        let inputs = [0.0291675f32, 14.614647, 0.5, 1.7, 3.3];
        let expected = [
            0xc062_3887u32,
            0x402b_a649,
            0xbf31_7218,
            0x3f07_d741,
            0x3f98_d274,
        ];
        for (x, bits) in inputs.into_iter().zip(expected) {
            assert_eq!(numpy_logf(x).to_bits(), bits, "log({x})");
        }
    }

    #[test]
    fn karras_sigmas_run_from_max_to_min() {
        let s = karras_sigmas(0.0292, 14.6146, 5);
        assert!((s[0] - 14.6146).abs() < 1e-12);
        assert!((s[4] - 0.0292).abs() < 1e-12);
        assert!(s.windows(2).all(|w| w[0] > w[1]));
        assert_eq!(karras_sigmas(0.0292, 14.6146, 1).len(), 1);
    }

    #[test]
    fn sigma_to_t_inverts_the_training_sigmas() {
        let betas = torch_linspace_f32(0.0001, 0.02, 1000);
        let sig = train_sigmas(&alphas_cumprod(&betas));
        let logs: Vec<f32> = sig.iter().map(|&s| numpy_logf(s)).collect();
        assert_eq!(sigma_to_t(f64::from(sig[0]), &logs), 0.0);
        assert_eq!(sigma_to_t(f64::from(sig[999]), &logs), 999.0);
        let t = sigma_to_t(f64::from(sig[500]), &logs);
        assert!((t - 500.0).abs() < 1e-4, "{t}");
        // Below the smallest sigma: clamped to 0.
        assert_eq!(sigma_to_t(1e-6, &logs), 0.0);
    }
}
