//! Interpolation of the walk's inputs: slerp for noise, lerp or slerp for text embeddings, and
//! the ease curve that times each segment.
use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// Cosine above which two noise vectors count as parallel and slerp falls back to lerp
/// (stable-diffusion-videos' `DOT_THRESHOLD`): there `sin(theta)` is too small to divide by, and
/// the arc and the chord are the same to within float error anyway.
pub const PARALLEL_DOT: f64 = 0.9995;

/// Spherical interpolation between `a` and `b` (same shape), treated as flat vectors.
///
/// `slerp(a, b, t) = sin((1-t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b` with
/// `cos(theta) = a.b / (|a| |b|)`. Two Gaussian noise samples are nearly orthogonal with equal
/// norms; lerp would shrink the norm by up to `1/sqrt(2)` halfway, which the sampler sees as too
/// little noise (washed-out, blurry frames); slerp keeps it. When `|cos(theta)| >`
/// [`PARALLEL_DOT`] or either vector is zero this is [`lerp`]. `t = 0` and `t = 1` return `a` and
/// `b` exactly. Computed in f64, returned in `a`'s dtype.
pub fn slerp(a: &Tensor, b: &Tensor, t: f64) -> Result<Tensor> {
    check_same_shape(a, b)?;
    if t == 0.0 {
        return Ok(a.clone());
    }
    if t == 1.0 {
        return Ok(b.clone());
    }
    let a64 = a.to_dtype(DType::F64)?;
    let b64 = b.to_dtype(DType::F64)?;
    let dot = (&a64 * &b64)?.sum_all()?.to_scalar::<f64>()?;
    let norm_a = a64.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let norm_b = b64.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let cos = dot / (norm_a * norm_b);
    if !cos.is_finite() || cos.abs() > PARALLEL_DOT {
        return lerp(a, b, t);
    }
    let theta = cos.acos();
    let sin_theta = theta.sin();
    let wa = ((1.0 - t) * theta).sin() / sin_theta;
    let wb = (t * theta).sin() / sin_theta;
    Ok(((a64 * wa)? + (b64 * wb)?)?.to_dtype(a.dtype())?)
}

/// Linear interpolation `(1 - t) a + t b`; `t = 0` and `t = 1` return `a` and `b` exactly.
pub fn lerp(a: &Tensor, b: &Tensor, t: f64) -> Result<Tensor> {
    check_same_shape(a, b)?;
    if t == 0.0 {
        return Ok(a.clone());
    }
    if t == 1.0 {
        return Ok(b.clone());
    }
    let a64 = a.to_dtype(DType::F64)?;
    let b64 = b.to_dtype(DType::F64)?;
    Ok(((a64 * (1.0 - t))? + (b64 * t)?)?.to_dtype(a.dtype())?)
}

fn check_same_shape(a: &Tensor, b: &Tensor) -> Result<()> {
    if a.dims() != b.dims() {
        return Err(Error::InvalidInput(format!(
            "cannot interpolate tensors of shapes {:?} and {:?}",
            a.dims(),
            b.dims()
        )));
    }
    Ok(())
}

/// How two tensors are blended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Interp {
    /// Straight line, [`lerp`].
    #[default]
    Lerp,
    /// Great circle, [`slerp`].
    Slerp,
}

impl Interp {
    /// Blends `a` and `b` at `t`.
    pub fn apply(self, a: &Tensor, b: &Tensor, t: f64) -> Result<Tensor> {
        match self {
            Interp::Lerp => lerp(a, b, t),
            Interp::Slerp => slerp(a, b, t),
        }
    }

    /// The name on the command line and in walk.json.
    pub fn as_str(self) -> &'static str {
        match self {
            Interp::Lerp => "lerp",
            Interp::Slerp => "slerp",
        }
    }
}

impl fmt::Display for Interp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Interp {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "lerp" | "linear" => Ok(Interp::Lerp),
            "slerp" | "spherical" => Ok(Interp::Slerp),
            _ => Err(Error::InvalidInput(format!(
                "unknown interpolation `{s}` (expected lerp or slerp)"
            ))),
        }
    }
}

/// The timing curve inside each segment between two keyframes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ease {
    /// Constant speed: `s = t`.
    #[default]
    Linear,
    /// Smoothstep `s = 3t^2 - 2t^3`: starts and ends at rest, so the animation lingers on each
    /// keyframe and moves fastest halfway.
    Smooth,
}

impl Ease {
    /// The eased time for `t` in [0, 1]; 0 and 1 map to themselves exactly.
    pub fn apply(self, t: f64) -> f64 {
        match self {
            Ease::Linear => t,
            Ease::Smooth => t * t * (3.0 - 2.0 * t),
        }
    }

    /// The name on the command line and in walk.json.
    pub fn as_str(self) -> &'static str {
        match self {
            Ease::Linear => "linear",
            Ease::Smooth => "smooth",
        }
    }
}

impl fmt::Display for Ease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Ease {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "linear" => Ok(Ease::Linear),
            "smooth" | "smoothstep" => Ok(Ease::Smooth),
            _ => Err(Error::InvalidInput(format!(
                "unknown ease `{s}` (expected linear or smooth)"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn vec_tensor(v: &[f32]) -> Tensor {
        Tensor::from_slice(v, (v.len(),), &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.to_vec1().unwrap()
    }

    fn norm(v: &[f32]) -> f64 {
        v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt()
    }

    #[test]
    fn slerp_endpoints_are_exact() {
        // Values whose arithmetic would round: the endpoints must not go through it.
        let a = vec_tensor(&[0.1, -0.7, 1.3e-3, 3.3]);
        let b = vec_tensor(&[-2.1, 0.25, 0.9, 1e-7]);
        assert_eq!(values(&slerp(&a, &b, 0.0).unwrap()), values(&a));
        assert_eq!(values(&slerp(&a, &b, 1.0).unwrap()), values(&b));
        assert_eq!(values(&lerp(&a, &b, 0.0).unwrap()), values(&a));
        assert_eq!(values(&lerp(&a, &b, 1.0).unwrap()), values(&b));
    }

    #[test]
    fn slerp_keeps_unit_vectors_on_the_sphere() {
        let s = std::f32::consts::FRAC_1_SQRT_2;
        let a = vec_tensor(&[1.0, 0.0, 0.0]);
        let b = vec_tensor(&[0.0, s, s]);
        for t in [0.1, 0.25, 0.5, 0.8, 0.99] {
            let v = values(&slerp(&a, &b, t).unwrap());
            assert!((norm(&v) - 1.0).abs() < 1e-6, "t={t}: norm {}", norm(&v));
            // Halfway between orthogonal unit vectors: the angle to each is 45 degrees.
            if t == 0.5 {
                let c = std::f32::consts::FRAC_1_SQRT_2;
                assert!(
                    (v[0] - c).abs() < 1e-6 && (v[1] - 0.5).abs() < 1e-6,
                    "{v:?}"
                );
            }
        }
        // Lerp of the same pair shrinks the norm: the reason slerp is used for noise.
        let mid = values(&lerp(&a, &b, 0.5).unwrap());
        assert!((norm(&mid) - s as f64).abs() < 1e-6, "{}", norm(&mid));
    }

    #[test]
    fn slerp_on_gaussian_noise_keeps_the_norm() {
        let n = 4096;
        let a = crate::noise::TorchGenerator::new(1).randn(n);
        let b = crate::noise::TorchGenerator::new(2).randn(n);
        let (na, nb) = (norm(&a), norm(&b));
        let mid = values(&slerp(&vec_tensor(&a), &vec_tensor(&b), 0.5).unwrap());
        // Nearly orthogonal, nearly equal norms: slerp stays within 2% of them, lerp loses ~29%.
        assert!((norm(&mid) / na.max(nb)) > 0.98, "{} vs {na}", norm(&mid));
        let lmid = values(&lerp(&vec_tensor(&a), &vec_tensor(&b), 0.5).unwrap());
        assert!(norm(&lmid) / na < 0.75, "{}", norm(&lmid));
    }

    #[test]
    fn nearly_parallel_vectors_fall_back_to_lerp() {
        let a = vec_tensor(&[1.0, 2.0, 3.0]);
        let b = vec_tensor(&[1.0, 2.0, 3.001]);
        let t = 0.3;
        assert_eq!(
            values(&slerp(&a, &b, t).unwrap()),
            values(&lerp(&a, &b, t).unwrap())
        );
        // Same vector: no NaN from sin(0) / sin(0).
        let v = values(&slerp(&a, &a, t).unwrap());
        assert!(v.iter().all(|x| x.is_finite()), "{v:?}");
        for (x, y) in v.iter().zip([1.0, 2.0, 3.0]) {
            assert!((x - y).abs() < 1e-6);
        }
        // A zero vector has no direction: lerp, not NaN.
        let z = vec_tensor(&[0.0, 0.0, 0.0]);
        let v = values(&slerp(&z, &a, 0.5).unwrap());
        assert_eq!(v, [0.5, 1.0, 1.5]);
        // Just below the threshold is a real slerp (differs from lerp).
        let c = vec_tensor(&[1.0, 0.0]);
        let d = vec_tensor(&[0.99, 0.1411]); // cos ~= 0.99
        assert_ne!(
            values(&slerp(&c, &d, t).unwrap()),
            values(&lerp(&c, &d, t).unwrap())
        );
    }

    #[test]
    fn mismatched_shapes_are_an_error() {
        let a = vec_tensor(&[1.0, 2.0]);
        let b = vec_tensor(&[1.0, 2.0, 3.0]);
        assert!(slerp(&a, &b, 0.5).is_err());
        assert!(lerp(&a, &b, 0.5).is_err());
    }

    #[test]
    fn ease_curves() {
        for e in [Ease::Linear, Ease::Smooth] {
            assert_eq!(e.apply(0.0), 0.0);
            assert_eq!(e.apply(1.0), 1.0);
            assert_eq!(e.apply(0.5), 0.5);
        }
        assert_eq!(Ease::Linear.apply(0.25), 0.25);
        assert!((Ease::Smooth.apply(0.25) - 0.15625).abs() < 1e-15);
        assert!((Ease::Smooth.apply(0.75) - 0.84375).abs() < 1e-15);
        // Monotonic, flat at both ends, symmetric.
        let mut last = 0.0;
        for i in 1..=100 {
            let t = i as f64 / 100.0;
            let s = Ease::Smooth.apply(t);
            assert!(s > last, "not increasing at {t}");
            assert!((s + Ease::Smooth.apply(1.0 - t) - 1.0).abs() < 1e-12);
            last = s;
        }
        assert!(Ease::Smooth.apply(0.01) < 0.001);
        assert_eq!("smooth".parse::<Ease>().unwrap(), Ease::Smooth);
        assert!("bounce".parse::<Ease>().is_err());
    }
}
