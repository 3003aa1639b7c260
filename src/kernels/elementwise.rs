//! Fused element-wise ops.
use rayon::prelude::*;

use super::simd;

/// GEGLU on rows of `2 * half` values: `out[r, i] = h[r, i] * gelu(h[r, half + i])`, with
/// torch's exact (erf) GELU.
pub fn geglu(h: &[f32], half: usize) -> Vec<f32> {
    assert!(half > 0 && h.len().is_multiple_of(2 * half));
    let rows = h.len() / (2 * half);
    let mut out = vec![0f32; rows * half];
    let rows_per_task = (8192 / half).max(1);
    out.par_chunks_mut(rows_per_task * half)
        .zip(h.par_chunks(rows_per_task * 2 * half))
        .for_each(|(dst, src)| {
            for (o, row) in dst.chunks_mut(half).zip(src.chunks(2 * half)) {
                let (a, g) = row.split_at(half);
                simd::geglu(a, g, o);
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geglu_matches_reference() {
        let half = 37;
        let h: Vec<f32> = (0..3 * 2 * half)
            .map(|i| ((i * 31) % 97) as f32 * 0.1 - 4.5)
            .collect();
        let got = geglu(&h, half);
        for r in 0..3 {
            for i in 0..half {
                let a = h[r * 2 * half + i] as f64;
                let g = h[r * 2 * half + half + i] as f64;
                let want = a * 0.5 * g * (1.0 + libm::erf(g / 2f64.sqrt()));
                let d = (got[r * half + i] as f64 - want).abs();
                assert!(d < 1e-6 * want.abs().max(1.0), "{d}");
            }
        }
    }
}
