//! Seeded noise made on the host (candle cannot seed its CPU generator), moved to the device afterwards.
//!
//! [`TorchGenerator`] reproduces, bit for bit, what `torch.randn(shape, generator=g,
//! dtype=torch.float32)` returns for `g = torch.Generator("cpu").manual_seed(seed)` on x86
//! machines with AVX2 or AVX-512, the case of nearly every PC that runs diffusers. That is what
//! makes a seed mean the same picture here and in diffusers. Checked against torch 2.15 in
//! `tests/noise.rs`; the values come from three pieces of torch's CPU code:
//!
//! - `at::mt19937` (`ATen/core/MT19937RNGEngine.h`), seeded with the low 32 bits of the seed.
//! - `normal_fill` with `NormalFill16` (`ATen/native/cpu/DistributionTemplates.h`) for
//!   contiguous tensors of 16 or more elements: all uniforms first, then Box-Muller on blocks
//!   of 16, the polynomials of `ATen/native/cpu/avx_mathfun.h` (`log256_ps`, `sincos256_ps`) for
//!   log, sin and cos, and 16 fresh uniforms that redo the last 16 values when the length is not
//!   a multiple of 16.
//! - `at::normal_distribution<double>` (`ATen/core/DistributionsHelper.h`) for fewer than 16
//!   elements: double-precision Box-Muller whose second value waits in the generator for the
//!   next such call.
//!
//! The vector code runs here one lane at a time in scalar `f32` with the same operations in the
//! same order. torch's binary is built with floating-point contraction, so the compiler fused
//! several multiply-adds of `avx_mathfun.h` into FMA instructions (read from the disassembly of
//! `libtorch_cpu.so`); this port uses [`f32::mul_add`] at exactly those places, and plain
//! operations everywhere else. Without the fused steps about 1% of the values differ by an ulp.
use std::fmt;
use std::str::FromStr;

use candle_core::{Device, Tensor};

use crate::{Error, Result};

/// A source of standard normal noise for a batch of images.
///
/// Row `i` of every tensor it returns (the first dimension is the batch) is drawn from
/// image `i`'s own generator, in the order diffusers draws with a list of generators.
pub trait NoiseSource {
    /// Draws a float32 tensor of `shape` (first dim = batch) on `device`.
    fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor>;
}

/// Which random number generator makes the initial noise.
///
/// `Torch` (the default, written `torch`) is torch's CPU generator as diffusers uses it with
/// `torch.Generator("cpu")`: the same seed gives the same noise as diffusers on x86.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum RngKind {
    /// torch's CPU generator (mt19937 + torch's Box-Muller), see [`TorchGenerator`].
    #[default]
    Torch,
}

impl RngKind {
    /// Every kind, in the order help texts list them.
    pub const ALL: [RngKind; 1] = [RngKind::Torch];

    /// The name used on the command line and in metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            RngKind::Torch => "torch",
        }
    }

    /// A noise source with one generator per image, seeded with `seeds` (one per image).
    pub fn noise_source(self, seeds: impl IntoIterator<Item = u64>) -> Box<dyn NoiseSource> {
        match self {
            RngKind::Torch => Box::new(BatchNoise::from_seeds(seeds)),
        }
    }
}

impl fmt::Display for RngKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RngKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        RngKind::ALL
            .into_iter()
            .find(|kind| kind.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                let known: Vec<&str> = RngKind::ALL.iter().map(|k| k.as_str()).collect();
                Error::InvalidInput(format!(
                    "unknown RNG `{s}` (expected one of: {})",
                    known.join(", ")
                ))
            })
    }
}

const MT_N: usize = 624;
const MT_M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// The 32-bit Mersenne Twister exactly as `at::mt19937`: seeded with `init_genrand`, the state
/// regenerated lazily when the first number is asked for.
#[derive(Clone)]
struct Mt19937 {
    state: [u32; MT_N],
    /// Numbers left before the state must be regenerated, plus one (torch's `left_`).
    left: usize,
    next: usize,
}

impl Mt19937 {
    fn new(seed: u32) -> Self {
        let mut state = [0u32; MT_N];
        state[0] = seed;
        for j in 1..MT_N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        Mt19937 {
            state,
            left: 1,
            next: 0,
        }
    }

    fn twist(u: u32, v: u32) -> u32 {
        let mixed = (u & UPPER_MASK) | (v & LOWER_MASK);
        (mixed >> 1) ^ if v & 1 != 0 { MATRIX_A } else { 0 }
    }

    fn regenerate(&mut self) {
        for i in 0..MT_N {
            let twisted = Self::twist(self.state[i], self.state[(i + 1) % MT_N]);
            self.state[i] = self.state[(i + MT_M) % MT_N] ^ twisted;
        }
        self.left = MT_N;
        self.next = 0;
    }

    fn next_u32(&mut self) -> u32 {
        self.left -= 1;
        if self.left == 0 {
            self.regenerate();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }
}

/// torch's CPU generator (`at::CPUGeneratorImpl`): mt19937 plus the cached second value of the
/// double-precision Box-Muller transform.
#[derive(Clone)]
pub struct TorchGenerator {
    seed: u64,
    mt: Mt19937,
    next_double_normal: Option<f64>,
}

impl fmt::Debug for TorchGenerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TorchGenerator")
            .field("seed", &self.seed)
            .field("next_double_normal", &self.next_double_normal)
            .finish_non_exhaustive()
    }
}

impl TorchGenerator {
    /// The generator of `torch.Generator("cpu").manual_seed(seed)`. Like torch, only the low 32
    /// bits of `seed` reach mt19937: `2^32 + 5` gives the same numbers as `5`.
    pub fn new(seed: u64) -> Self {
        TorchGenerator {
            seed,
            mt: Mt19937::new(seed as u32),
            next_double_normal: None,
        }
    }

    /// The seed it was made with (all 64 bits, as torch's `initial_seed()` reports it).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// What `torch.randn` returns for a contiguous float32 tensor of `n` elements (the shape only
    /// matters through its element count). Successive calls continue the stream like successive
    /// `torch.randn` calls on one generator.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        if n >= 16 {
            self.randn_fill16(n)
        } else {
            (0..n).map(|_| self.next_double_normal() as f32).collect()
        }
    }

    /// torch's `uniform_real_distribution<float>(0, 1)`: the low 24 bits of one output.
    fn uniform_f32(&mut self) -> f32 {
        // `x * (to - from) + from` with to = 1, from = 0 changes nothing, so it is left out.
        (self.mt.next_u32() & 0x00ff_ffff) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// torch's `uniform_real_distribution<double>(0, 1)`: the low 53 bits of two outputs, the
    /// first one high.
    fn uniform_f64(&mut self) -> f64 {
        let hi = u64::from(self.mt.next_u32());
        let lo = u64::from(self.mt.next_u32());
        (((hi << 32) | lo) & ((1u64 << 53) - 1)) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// torch's `normal_distribution<double>(0, 1)`, used for tensors below 16 elements.
    fn next_double_normal(&mut self) -> f64 {
        if let Some(cached) = self.next_double_normal.take() {
            return cached;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        // Same libm calls as torch (`log1p`, `sin`, `cos` in double) on the same platform.
        let radius = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(radius * theta.sin());
        radius * theta.cos()
    }

    /// torch's `normal_fill` for contiguous float tensors of `n >= 16` elements.
    fn randn_fill16(&mut self, n: usize) -> Vec<f32> {
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for block in data.chunks_exact_mut(16) {
            normal_fill_16(block);
        }
        if !n.is_multiple_of(16) {
            // The last 16 values are drawn again and recomputed, overlapping the last full block.
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            normal_fill_16(tail);
        }
        data
    }
}

/// `NormalFill16<float>` of torch's AVX2 kernel, one lane at a time: uniforms `data[..8]` give
/// the radius, `data[8..]` the angle; cos goes to the first half, sin to the second.
fn normal_fill_16(data: &mut [f32]) {
    // `_mm256_set1_ps(2.0f * c10::pi<double>)`: the product is taken in double, then rounded.
    let two_pi = (2.0 * std::f64::consts::PI) as f32;
    for j in 0..8 {
        let u1 = 1.0 - data[j];
        let u2 = data[j + 8];
        let radius = (-2.0 * log_ps(u1)).sqrt();
        let (sin, cos) = sincos_ps(two_pi * u2);
        // `_mm256_fmadd_ps(n, std, mean)` with std = 1 and mean = 0: `n * 1` is exact, so the
        // fused form is `n + 0.0` (which, like the FMA, turns -0.0 into +0.0).
        data[j] = radius * cos + 0.0;
        data[j + 8] = radius * sin + 0.0;
    }
}

/// A `double` constant of `avx_mathfun.h` stored into a float vector.
const fn c(x: f64) -> f32 {
    x as f32
}

/// Lane mask of an SSE/AVX compare: all ones or all zeros.
fn mask(cond: bool) -> u32 {
    if cond {
        u32::MAX
    } else {
        0
    }
}

const SIGN_MASK: u32 = 0x8000_0000;

/// One lane of `log256_ps` (Cephes `logf`). The `mul_add` calls are where torch's compiled
/// code has FMA instructions.
fn log_ps(x: f32) -> f32 {
    let invalid = mask(x <= 0.0);
    let min_norm_pos = f32::from_bits(0x0080_0000);
    // `_mm256_max_ps(x, min)` returns the second operand unless x > min.
    let x = if x > min_norm_pos { x } else { min_norm_pos };
    let exponent = (x.to_bits() >> 23) as i32 - 0x7f;
    // Keep the mantissa, exponent of 0.5: x in [0.5, 1).
    let mut x = f32::from_bits((x.to_bits() & !0x7f80_0000) | 0.5f32.to_bits());
    let mut e = exponent as f32 + 1.0;
    // cephes_SQRTHF = 0.707106781186547524, i.e. 1/sqrt(2).
    let below = mask(x < c(std::f64::consts::FRAC_1_SQRT_2));
    let tmp = f32::from_bits(x.to_bits() & below);
    x -= 1.0;
    e -= f32::from_bits(1.0f32.to_bits() & below);
    x += tmp;

    let z = x * x;
    let mut y = c(7.037_683_629_2E-2);
    for p in [
        -1.151_461_031_0E-1,
        1.167_699_874_0E-1,
        -1.242_014_084_6E-1,
        1.424_932_278_7E-1,
        -1.666_805_766_5E-1,
        2.000_071_476_5E-1,
        -2.499_999_399_3E-1,
        3.333_333_117_4E-1,
    ] {
        y = y.mul_add(x, c(p));
    }
    y *= x;
    y = y.mul_add(z, e * c(-2.121_944_40e-4));
    y = (-z).mul_add(0.5, y);
    x += y;
    x = e.mul_add(c(0.693_359_375), x);
    f32::from_bits(x.to_bits() | invalid)
}

/// One lane of `sincos256_ps` (Cephes `sinf`/`cosf`), returns `(sin, cos)`. Valid for the
/// angles used here, `0 <= x < 2 pi`, where the float-to-int truncation cannot overflow.
fn sincos_ps(x: f32) -> (f32, f32) {
    let mut sign_sin = x.to_bits() & SIGN_MASK;
    let mut x = f32::from_bits(x.to_bits() & !SIGN_MASK);
    // `_mm256_cvttps_epi32`: truncation toward zero.
    let mut j = (x * c(1.273_239_544_735_16)) as i32;
    j = (j + 1) & !1;
    let y = j as f32;
    let swap_sign_sin = ((j & 4) as u32) << 29;
    let poly_mask = mask(j & 2 == 0);

    // Extended precision modular arithmetic: x - y * pi/4 in three parts (DP1..DP3; the last
    // two written as the shortest decimals of the same doubles).
    x = y.mul_add(c(-0.785_156_25), x);
    x = y.mul_add(c(-2.418_756_484_985_352e-4), x);
    x = y.mul_add(c(-3.774_894_977_445_941e-8), x);

    let sign_cos = ((!(j - 2) & 4) as u32) << 29;
    sign_sin ^= swap_sign_sin;

    // Cosine polynomial, for 0 <= x <= pi/4.
    let z = x * x;
    let mut yc = c(2.443_315_711_809_948E-5);
    yc = yc.mul_add(z, c(-1.388_731_625_493_765E-3));
    yc = yc.mul_add(z, c(4.166_664_568_298_827E-2));
    yc *= z;
    yc = yc.mul_add(z, -(z * 0.5));
    yc += 1.0;

    // Sine polynomial.
    let mut ys = c(-1.951_529_589_1E-4);
    ys = ys.mul_add(z, c(8.332_160_873_6E-3));
    ys = ys.mul_add(z, c(-1.666_665_461_1E-1));
    ys *= z;
    ys = ys.mul_add(x, x);

    // Select with masks; the subtractions and additions of zero are kept because they turn
    // -0.0 into +0.0 exactly as the vector code does.
    let ysin2 = f32::from_bits(poly_mask & ys.to_bits());
    let ysin1 = f32::from_bits(!poly_mask & yc.to_bits());
    let ys = ys - ysin2;
    let yc = yc - ysin1;
    let sin = ysin1 + ysin2;
    let cos = yc + ys;
    (
        f32::from_bits(sin.to_bits() ^ sign_sin),
        f32::from_bits(cos.to_bits() ^ sign_cos),
    )
}

/// One [`TorchGenerator`] per image: row `i` of the noise comes from generator `i`, as diffusers'
/// `randn_tensor` does with a list of generators (one `torch.randn((1, ...))` per generator,
/// then concatenated).
#[derive(Debug, Clone)]
pub struct BatchNoise {
    generators: Vec<TorchGenerator>,
}

impl BatchNoise {
    /// A batch with the given generators, image `i` drawing from `generators[i]`.
    pub fn new(generators: Vec<TorchGenerator>) -> Self {
        BatchNoise { generators }
    }

    /// One generator per seed, image `i` seeded with the `i`-th seed.
    pub fn from_seeds(seeds: impl IntoIterator<Item = u64>) -> Self {
        Self::new(seeds.into_iter().map(TorchGenerator::new).collect())
    }

    /// `count` images seeded `seed, seed + 1, ...` (wrapping at `u64::MAX`), the per-image seeds
    /// `latent` uses for a batch.
    pub fn consecutive(seed: u64, count: usize) -> Self {
        Self::from_seeds((0..count as u64).map(|i| seed.wrapping_add(i)))
    }

    /// Number of images (generators).
    pub fn len(&self) -> usize {
        self.generators.len()
    }

    /// Whether there are no generators.
    pub fn is_empty(&self) -> bool {
        self.generators.is_empty()
    }

    /// The generators, image `i` at index `i`.
    pub fn generators(&self) -> &[TorchGenerator] {
        &self.generators
    }
}

impl NoiseSource for BatchNoise {
    /// `shape` = `[batch, rest...]` with `batch` equal to the number of generators.
    fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let Some((&batch, rest)) = shape.split_first() else {
            return Err(Error::InvalidInput(
                "noise shape is empty; expected [batch, ...]".to_string(),
            ));
        };
        if batch != self.generators.len() {
            return Err(Error::InvalidInput(format!(
                "noise shape {shape:?} has batch {batch}, but there are {} generators (one per image)",
                self.generators.len()
            )));
        }
        let row = rest
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .filter(|row| row.checked_mul(batch).is_some())
            .ok_or_else(|| Error::InvalidInput(format!("noise shape {shape:?} is too large")))?;
        let mut data = Vec::with_capacity(row * batch);
        for generator in &mut self.generators {
            data.extend(generator.randn(row));
        }
        Ok(Tensor::from_vec(data, shape, device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_reference_outputs() {
        // Default seed 5489: first output 3499211612; the 10000th is 4123659995, the check value
        // the C++ standard gives for std::mt19937.
        let mut mt = Mt19937::new(5489);
        assert_eq!(mt.next_u32(), 3_499_211_612);
        for _ in 1..9999 {
            mt.next_u32();
        }
        assert_eq!(mt.next_u32(), 4_123_659_995);
        // init_genrand(1), outputs of the reference mt19937ar.c.
        let mut mt = Mt19937::new(1);
        assert_eq!(
            [mt.next_u32(), mt.next_u32(), mt.next_u32()],
            [1_791_095_845, 4_282_876_139, 3_093_770_124]
        );
    }

    #[test]
    fn uniforms_are_low_24_bits() {
        // torch.rand(3, generator=torch.Generator().manual_seed(5489)) scaled by 2^24.
        let mut g = TorchGenerator::new(5489);
        let expected = [3_499_211_612u32, 581_869_302, 3_890_346_734].map(|x| x & 0x00ff_ffff);
        for e in expected {
            assert_eq!(g.uniform_f32() * 16_777_216.0, e as f32);
        }
    }

    #[test]
    fn seed_keeps_low_32_bits() {
        let high = TorchGenerator::new((1 << 32) + 5).randn(40);
        let low = TorchGenerator::new(5).randn(40);
        assert_eq!(high, low);
        assert_ne!(low, TorchGenerator::new(6).randn(40));
    }

    #[test]
    fn small_calls_share_the_cached_normal() {
        // Two calls of one element return the pair of one Box-Muller draw, like one call of two.
        let mut g = TorchGenerator::new(3);
        let mut split = g.randn(1);
        split.extend(g.randn(1));
        assert_eq!(split, TorchGenerator::new(3).randn(2));
        // A call of 16+ elements neither uses nor clears the cache.
        let mut g = TorchGenerator::new(3);
        let first = g.randn(1);
        g.randn(16);
        let second = g.randn(1);
        let pair = TorchGenerator::new(3).randn(2);
        assert_eq!([first[0], second[0]], [pair[0], pair[1]]);
    }

    #[test]
    fn log_and_sincos_at_exact_points() {
        assert_eq!(log_ps(1.0).to_bits(), 0.0f32.to_bits());
        assert!((log_ps(0.5) + std::f32::consts::LN_2).abs() <= f32::EPSILON);
        assert!(log_ps(0.0).is_nan());
        assert_eq!(sincos_ps(0.0), (0.0, 1.0));
        let (s, c) = sincos_ps(std::f32::consts::FRAC_PI_2);
        assert!((s - 1.0).abs() <= f32::EPSILON && c.abs() <= 1e-7);
    }

    #[test]
    fn tail_recomputes_the_last_16() {
        // 20 elements: the first 4 come from the first block of 16 uniforms, the last 16 from 16
        // fresh uniforms; so the first 4 equal those of a 16-element call.
        let n20 = TorchGenerator::new(11).randn(20);
        let n16 = TorchGenerator::new(11).randn(16);
        assert_eq!(n20[..4], n16[..4]);
        assert_ne!(n20[4..16], n16[4..16]);
    }

    #[test]
    fn rng_kind_parses_and_prints() {
        assert_eq!("torch".parse::<RngKind>().ok(), Some(RngKind::Torch));
        assert_eq!("Torch".parse::<RngKind>().ok(), Some(RngKind::Torch));
        assert_eq!(RngKind::Torch.to_string(), "torch");
        let err = "philox".parse::<RngKind>().err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("unknown RNG `philox` (expected one of: torch)")
        );
    }

    #[test]
    fn batch_noise_checks_the_batch_size() {
        let mut noise = BatchNoise::consecutive(0, 2);
        assert!(matches!(
            noise.randn(&[3, 4], &Device::Cpu),
            Err(Error::InvalidInput(_))
        ));
        assert!(matches!(
            noise.randn(&[], &Device::Cpu),
            Err(Error::InvalidInput(_))
        ));
        assert!(matches!(
            noise.randn(&[2, usize::MAX, 2], &Device::Cpu),
            Err(Error::InvalidInput(_))
        ));
    }
}
