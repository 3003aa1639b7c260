//! Group norm (optionally fused with the SiLU that follows it in every resnet) and layer norm.
//! Statistics are accumulated in f64 and the variance is the biased one, as torch's.
use rayon::prelude::*;

use super::simd;

/// Group norm over NCHW data `x` of `batch` images with `channels` planes of `plane` pixels:
/// `y = (x - mean_g) / sqrt(var_g + eps) * weight[c] + bias[c]`, then SiLU when `silu`.
#[allow(clippy::too_many_arguments)]
pub fn group_norm(
    x: &[f32],
    batch: usize,
    channels: usize,
    plane: usize,
    groups: usize,
    eps: f64,
    weight: &[f32],
    bias: &[f32],
    silu: bool,
) -> Vec<f32> {
    assert_eq!(x.len(), batch * channels * plane);
    assert!(groups > 0 && channels.is_multiple_of(groups));
    let per_group = channels / groups;
    let mut out = x.to_vec();
    if out.is_empty() {
        return out;
    }
    let group_len = per_group * plane;
    out.par_chunks_mut(group_len)
        .enumerate()
        .for_each(|(bg, chunk)| {
            let g = bg % groups;
            let (mean, var) = simd::mean_var(chunk);
            let rstd = 1.0 / (var + eps).sqrt();
            for (i, plane_data) in chunk.chunks_mut(plane).enumerate() {
                let c = g * per_group + i;
                let scale = rstd * weight[c] as f64;
                let shift = bias[c] as f64 - mean * scale;
                simd::affine_silu(plane_data, scale as f32, shift as f32, silu);
            }
        });
    out
}

/// Layer norm over the last dimension (`dim`) of row-major `x`.
pub fn layer_norm(x: &[f32], dim: usize, eps: f64, weight: &[f32], bias: &[f32]) -> Vec<f32> {
    assert!(dim > 0 && x.len().is_multiple_of(dim));
    let mut out = x.to_vec();
    let rows_per_task = (16384 / dim).max(1);
    out.par_chunks_mut(rows_per_task * dim).for_each(|rows| {
        for row in rows.chunks_mut(dim) {
            let (mean, var) = simd::mean_var(row);
            let rstd = (1.0 / (var + eps).sqrt()) as f32;
            let mean = mean as f32;
            for ((v, &w), &b) in row.iter_mut().zip(weight).zip(bias) {
                *v = (*v - mean) * rstd * w + b;
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + 13) % 1009) as f32 / 100.0 - 3.0)
            .collect()
    }

    fn naive_group_norm(
        x: &[f32],
        (b, c, p, g): (usize, usize, usize, usize),
        w: &[f32],
        bias: &[f32],
        silu: bool,
    ) -> Vec<f64> {
        let mut out = vec![0f64; x.len()];
        let cg = c / g;
        for bi in 0..b {
            for gi in 0..g {
                let idx = |ci: usize, pi: usize| (bi * c + gi * cg + ci) * p + pi;
                let n = (cg * p) as f64;
                let mut mean = 0f64;
                for ci in 0..cg {
                    for pi in 0..p {
                        mean += x[idx(ci, pi)] as f64;
                    }
                }
                mean /= n;
                let mut var = 0f64;
                for ci in 0..cg {
                    for pi in 0..p {
                        var += (x[idx(ci, pi)] as f64 - mean).powi(2);
                    }
                }
                var /= n;
                for ci in 0..cg {
                    let ch = gi * cg + ci;
                    for pi in 0..p {
                        let y = (x[idx(ci, pi)] as f64 - mean) / (var + 1e-5).sqrt() * w[ch] as f64
                            + bias[ch] as f64;
                        out[idx(ci, pi)] = if silu { y / (1.0 + (-y).exp()) } else { y };
                    }
                }
            }
        }
        out
    }

    #[test]
    fn group_norm_matches_naive() {
        for &(b, c, p, g) in &[(1, 4, 1, 2), (2, 6, 15, 3), (2, 32, 17, 32), (1, 64, 33, 8)] {
            let x = values(b * c * p);
            let w: Vec<f32> = (0..c).map(|i| 1.0 + i as f32 * 0.1).collect();
            let bias: Vec<f32> = (0..c).map(|i| i as f32 * -0.05).collect();
            for silu in [false, true] {
                let got = group_norm(&x, b, c, p, g, 1e-5, &w, &bias, silu);
                let want = naive_group_norm(&x, (b, c, p, g), &w, &bias, silu);
                for (a, e) in got.iter().zip(&want) {
                    assert!(
                        (*a as f64 - e).abs() < 2e-5 * e.abs().max(1.0),
                        "{a} vs {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn layer_norm_matches_naive() {
        for &(rows, dim) in &[(1, 1), (3, 17), (5, 320), (2, 1000)] {
            let x = values(rows * dim);
            let w: Vec<f32> = (0..dim).map(|i| 0.5 + (i % 7) as f32 * 0.1).collect();
            let bias: Vec<f32> = (0..dim).map(|i| (i % 5) as f32 * 0.01).collect();
            let got = layer_norm(&x, dim, 1e-5, &w, &bias);
            for r in 0..rows {
                let row = &x[r * dim..(r + 1) * dim];
                let mean = row.iter().map(|&v| v as f64).sum::<f64>() / dim as f64;
                let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / dim as f64;
                for i in 0..dim {
                    let want =
                        (row[i] as f64 - mean) / (var + 1e-5).sqrt() * w[i] as f64 + bias[i] as f64;
                    assert!((got[r * dim + i] as f64 - want).abs() < 2e-5 * want.abs().max(1.0));
                }
            }
        }
    }
}
