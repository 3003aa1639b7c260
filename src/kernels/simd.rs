//! Vectorisable element math (exp, SiLU, GELU) for the CPU kernels.
//!
//! Each slice function has an AVX-512 version (explicit intrinsics, 16 lanes, chosen at run
//! time when the CPU has AVX-512F) and a portable scalar one with the same formulas. Accuracy: `exp` within 2 ulp of the correctly rounded value over the range
//! softmax and SiLU use; `erf` within 1.5e-7 absolute (Abramowitz & Stegun 7.1.26), which keeps
//! GELU within about 1 ulp of torch's.

/// e^x, 0 below -87.3 (where f32 goes subnormal), +inf above 88.7.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-87.336_55, 88.722_83);
    let n = (xc * LOG2E + 0.5).floor();
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    let v = y * scale;
    if x < -87.336_55 {
        0.0
    } else if x > 88.722_83 {
        f32::INFINITY
    } else {
        v
    }
}

/// erf(x) within 1.5e-7 absolute.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp(-a * a);
    if x < 0.0 {
        -y
    } else {
        y
    }
}

/// torch's exact GELU, `x / 2 * (1 + erf(x / sqrt(2)))`.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// SiLU, `x / (1 + e^-x)`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// Declares `pub fn $name($args)` that runs `$body` compiled for AVX-512 when the CPU has it.
macro_rules! multiversion {
    ($(#[$m:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn inner($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,fma")]
                unsafe fn fast($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                if std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512dq")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512vl")
                    && std::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has every feature `fast` was compiled for.
                    return unsafe { fast($($arg),*) };
                }
            }
            inner($($arg),*)
        }
    };
}

/// Whether the AVX-512 versions can run here.
#[inline]
fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Softmax of `row * scale` in place (max subtracted first, as torch does).
pub fn softmax_scaled(row: &mut [f32], scale: f32) {
    if row.is_empty() {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { avx512::softmax_scaled(row, scale) };
    }
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) * scale;
    let mut sum = 0f32;
    for v in row.iter_mut() {
        *v = exp(*v * scale - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

/// `x = x * scale + shift` over a plane of one channel (group norm's affine), then SiLU when
/// `act`.
pub fn affine_silu(plane: &mut [f32], scale: f32, shift: f32, act: bool) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { avx512::affine_silu(plane, scale, shift, act) };
    }
    for v in plane.iter_mut() {
        let y = *v * scale + shift;
        *v = if act { silu(y) } else { y };
    }
}

/// GEGLU: `out[i] = a[i] * gelu(g[i])`.
pub fn geglu(a: &[f32], g: &[f32], out: &mut [f32]) {
    assert!(a.len() == out.len() && g.len() == out.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { avx512::geglu(a, g, out) };
    }
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(g) {
        *o = x * gelu(y);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! The same formulas as the scalar functions above, 16 lanes at a time; tails go through
    //! masked loads and stores.
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn exp(x: __m512) -> __m512 {
        let lo = _mm512_set1_ps(-87.336_55);
        let xc = _mm512_min_ps(_mm512_max_ps(x, lo), _mm512_set1_ps(88.722_83));
        let fx = _mm512_fmadd_ps(
            xc,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
            _mm512_set1_ps(0.5),
        );
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(fx);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), xc);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let y = _mm512_fmadd_ps(
            p,
            _mm512_mul_ps(r, r),
            _mm512_add_ps(r, _mm512_set1_ps(1.0)),
        );
        let bits = _mm512_slli_epi32::<23>(_mm512_add_epi32(
            _mm512_cvtps_epi32(n),
            _mm512_set1_epi32(127),
        ));
        let v = _mm512_mul_ps(y, _mm512_castsi512_ps(bits));
        let under = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, lo);
        _mm512_mask_blend_ps(under, v, _mm512_setzero_ps())
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn silu(x: __m512) -> __m512 {
        let one = _mm512_set1_ps(1.0);
        let e = exp(_mm512_sub_ps(_mm512_setzero_ps(), x));
        _mm512_div_ps(x, _mm512_add_ps(one, e))
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn gelu(x: __m512) -> __m512 {
        let z = _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
        let a = _mm512_abs_ps(z);
        let one = _mm512_set1_ps(1.0);
        let t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.327_591_1), a, one));
        let mut p = _mm512_set1_ps(1.061_405_4);
        for c in [-1.453_152, 1.421_413_8, -0.284_496_74, 0.254_829_6] {
            p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(c));
        }
        p = _mm512_mul_ps(p, t);
        let e = exp(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(a, a)));
        let erf_abs = _mm512_fnmadd_ps(p, e, one);
        let neg = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(z, _mm512_setzero_ps());
        let erf = _mm512_mask_sub_ps(erf_abs, neg, _mm512_setzero_ps(), erf_abs);
        _mm512_mul_ps(
            _mm512_mul_ps(_mm512_set1_ps(0.5), x),
            _mm512_add_ps(one, erf),
        )
    }

    /// Mask of the first `n` (< 16) lanes.
    #[inline]
    fn tail(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }

    /// Applies `f` to `xs` in place, 16 lanes at a time.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn map(xs: &mut [f32], f: impl Fn(__m512) -> __m512) {
        let mut chunks = xs.chunks_exact_mut(16);
        for c in &mut chunks {
            // SAFETY: `c` holds exactly 16 floats.
            unsafe { _mm512_storeu_ps(c.as_mut_ptr(), f(_mm512_loadu_ps(c.as_ptr()))) };
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let m = tail(rest.len());
            // SAFETY: the mask covers only the `rest.len()` floats of `rest`.
            unsafe {
                let v = _mm512_maskz_loadu_ps(m, rest.as_ptr());
                _mm512_mask_storeu_ps(rest.as_mut_ptr(), m, f(v));
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    pub fn softmax_scaled(row: &mut [f32], scale: f32) {
        let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut chunks = row.chunks_exact(16);
        for c in &mut chunks {
            // SAFETY: `c` holds exactly 16 floats.
            mx = _mm512_max_ps(mx, unsafe { _mm512_loadu_ps(c.as_ptr()) });
        }
        let mut max = _mm512_reduce_max_ps(mx);
        for &v in chunks.remainder() {
            max = max.max(v);
        }
        let s = _mm512_set1_ps(scale);
        let m = _mm512_set1_ps(max * scale);
        let mut acc = _mm512_setzero_ps();
        let mut chunks = row.chunks_exact_mut(16);
        for c in &mut chunks {
            // SAFETY: `c` holds exactly 16 floats.
            unsafe {
                let e = exp(_mm512_fmsub_ps(_mm512_loadu_ps(c.as_ptr()), s, m));
                acc = _mm512_add_ps(acc, e);
                _mm512_storeu_ps(c.as_mut_ptr(), e);
            }
        }
        let mut sum = _mm512_reduce_add_ps(acc);
        for v in chunks.into_remainder() {
            *v = super::exp(*v * scale - max * scale);
            sum += *v;
        }
        let inv = _mm512_set1_ps(1.0 / sum);
        map(row, |v| _mm512_mul_ps(v, inv));
    }

    #[target_feature(enable = "avx512f")]
    pub fn affine_silu(plane: &mut [f32], scale: f32, shift: f32, act: bool) {
        let (a, b) = (_mm512_set1_ps(scale), _mm512_set1_ps(shift));
        if act {
            map(plane, |v| silu(_mm512_fmadd_ps(v, a, b)));
        } else {
            map(plane, |v| _mm512_fmadd_ps(v, a, b));
        }
    }

    #[target_feature(enable = "avx512f")]
    pub fn geglu(a: &[f32], g: &[f32], out: &mut [f32]) {
        out.copy_from_slice(g);
        map(out, |v| gelu(v));
        let mut i = 0;
        while i + 16 <= out.len() {
            // SAFETY: `i + 16 <= len` for both slices (equal lengths checked by the caller).
            unsafe {
                let v = _mm512_mul_ps(
                    _mm512_loadu_ps(a.as_ptr().add(i)),
                    _mm512_loadu_ps(out.as_ptr().add(i)),
                );
                _mm512_storeu_ps(out.as_mut_ptr().add(i), v);
            }
            i += 16;
        }
        for j in i..out.len() {
            out[j] *= a[j];
        }
    }
}

multiversion! {
    /// Sum of `xs` when `center` is None, else the sum of squared deviations from `center`;
    /// 16 f32 lanes over blocks of 1024 values, blocks added in f64 (norm statistics).
    pub fn block_sum(xs: &[f32], center: Option<f32>) -> f64 {
        let c = center.unwrap_or(0.0);
        let square = center.is_some();
        let mut total = 0f64;
        for block in xs.chunks(1024) {
            let mut lanes = [0f32; 16];
            let mut chunks = block.chunks_exact(16);
            for ch in &mut chunks {
                for i in 0..16 {
                    let d = ch[i] - c;
                    lanes[i] += if square { d * d } else { d };
                }
            }
            for &v in chunks.remainder() {
                let d = (v - c) as f64;
                total += if square { d * d } else { d };
            }
            total += lanes.iter().map(|&v| v as f64).sum::<f64>();
        }
        total
    }
}

/// (mean, biased variance) of `xs`, two passes.
pub fn mean_var(xs: &[f32]) -> (f64, f64) {
    let n = xs.len().max(1) as f64;
    let mean = block_sum(xs, None) / n;
    let var = block_sum(xs, Some(mean as f32)) / n;
    // The deviations were taken from the f32-rounded mean; correct for the difference.
    let d = mean - (mean as f32) as f64;
    (mean, (var - d * d).max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_within_two_ulp_of_std() {
        let mut worst = 0;
        let mut x = -87.0f32;
        while x < 88.0 {
            worst = worst.max(ulps(exp(x), x.exp()));
            x += 0.0137;
        }
        assert!(worst <= 2, "exp off by {worst} ulp");
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn gelu_and_silu_match_f64_references() {
        let mut x = -12.0f32;
        while x < 12.0 {
            let want = 0.5 * x as f64 * (1.0 + libm::erf(x as f64 / 2f64.sqrt()));
            let d = (gelu(x) as f64 - want).abs();
            assert!(d <= 2e-7 * (x.abs() as f64).max(1.0), "gelu({x}): {d}");
            let want = x as f64 / (1.0 + (-x as f64).exp());
            let d = (silu(x) as f64 - want).abs();
            assert!(d <= 3e-7 * want.abs().max(1e-3), "silu({x}): {d}");
            x += 0.00731;
        }
    }

    #[test]
    fn softmax_sums_to_one_and_matches_reference() {
        for n in [1, 15, 16, 17, 77, 1000] {
            let row: Vec<f32> = (0..n)
                .map(|i| ((i * 37) % 101) as f32 * 0.3 - 15.0)
                .collect();
            let mut got = row.clone();
            softmax_scaled(&mut got, 0.5);
            let max = row.iter().fold(f64::MIN, |m, &v| m.max(v as f64 * 0.5));
            let e: Vec<f64> = row.iter().map(|&v| (v as f64 * 0.5 - max).exp()).collect();
            let s: f64 = e.iter().sum();
            for (g, w) in got.iter().zip(&e) {
                assert!((*g as f64 - w / s).abs() < 1e-6, "n={n}");
            }
        }
    }

    #[test]
    fn mean_var_matches_f64_even_far_from_zero() {
        for offset in [0.0f32, 100.0] {
            let xs: Vec<f32> = (0..5000)
                .map(|i| (i % 97) as f32 * 0.01 - 0.3 + offset)
                .collect();
            let (m, v) = mean_var(&xs);
            let wm = xs.iter().map(|&v| v as f64).sum::<f64>() / 5000.0;
            let wv = xs.iter().map(|&v| (v as f64 - wm).powi(2)).sum::<f64>() / 5000.0;
            assert!((m - wm).abs() < 1e-6 * wm.abs().max(1.0), "{m} {wm}");
            assert!((v - wv).abs() < 1e-5 * wv, "{v} {wv}");
        }
    }
}
