//! Multi-head scaled dot-product attention on token-major data, a block of queries at a time.
//!
//! Queries, keys and values stay in the (batch, tokens, heads * head_dim) layout the projections
//! produce: each head is a strided view, so there is no transpose before or after. Each task
//! takes a block of query rows of one image, and for every head computes the block's scores
//! against all keys, an exact softmax (max subtracted, f32) and the product with the values,
//! written straight into the output columns of that head. Only one block of scores per thread
//! exists at a time (at most 4 MB), instead of a tokens x tokens matrix per head.
use std::cell::RefCell;

use rayon::prelude::*;

use super::bf16;
use super::matmul::{gemm_f32, Precision, View};
use super::simd;

/// Scores per block, in floats (4 MB).
const BLOCK_FLOATS: usize = 1 << 20;

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub batch: usize,
    /// Query tokens per image.
    pub queries: usize,
    /// Key/value tokens per image.
    pub keys: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl Dims {
    /// Floating-point operations of the two products.
    pub fn flops(&self) -> usize {
        4 * self.batch * self.heads * self.queries * self.keys * self.head_dim
    }
}

/// softmax(q k^T * scale) v per head; `q` is (batch, queries, heads * head_dim), `k` and `v` are
/// (batch, keys, heads * head_dim). Returns data shaped like `q`.
///
/// In [`Precision::Bf16`] both products take bf16 inputs (keys and values packed once per
/// head, query blocks and probabilities rounded while packed) with f32 sums; the softmax stays
/// f32.
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: Dims,
    scale: f32,
    precision: Precision,
) -> Vec<f32> {
    let inner = d.heads * d.head_dim;
    assert_eq!(q.len(), d.batch * d.queries * inner);
    assert_eq!(k.len(), d.batch * d.keys * inner);
    assert_eq!(v.len(), d.batch * d.keys * inner);
    let mut out = vec![0f32; q.len()];
    if out.is_empty() {
        return out;
    }
    if d.keys == 0 {
        // An empty softmax: torch gives NaN; there is nothing sensible to attend to.
        out.fill(f32::NAN);
        return out;
    }
    // bf16: k^T and v of every (image, head), packed once for all query blocks.
    let packed: Vec<(bf16::PackedRhs, bf16::PackedRhs)> = match precision {
        Precision::F32 => Vec::new(),
        Precision::Bf16 => (0..d.batch * d.heads)
            .into_par_iter()
            .map(|bh| {
                let (b, h) = (bh / d.heads, bh % d.heads);
                let kv = b * d.keys * inner + h * d.head_dim;
                // k^T: element (dim j, key t) at t * inner + j; v: (key t, dim j).
                let kt = bf16::PackedRhs::pack(d.head_dim, d.keys, &k[kv..], 1, inner);
                let vp = bf16::PackedRhs::pack(d.keys, d.head_dim, &v[kv..], inner, 1);
                (kt.expect("k fits its dims"), vp.expect("v fits its dims"))
            })
            .collect(),
    };
    let block = (BLOCK_FLOATS / d.keys).clamp(16, 256).min(d.queries);
    // Chunk per image so a block never crosses from one image into the next.
    out.par_chunks_mut(d.queries * inner)
        .enumerate()
        .flat_map_iter(|(b, img_out)| {
            img_out
                .chunks_mut(block * inner)
                .enumerate()
                .map(move |(i, dst)| (b, i * block, dst))
        })
        .for_each(|(b, q0, dst)| {
            let rows = dst.len() / inner;
            let qb = &q[(b * d.queries + q0) * inner..(b * d.queries + q0 + rows) * inner];
            let kb = &k[b * d.keys * inner..(b + 1) * d.keys * inner];
            let vb = &v[b * d.keys * inner..(b + 1) * d.keys * inner];
            SCORES.with(|scores| {
                let mut s = scores.borrow_mut();
                if s.len() < rows * d.keys {
                    s.resize(rows * d.keys, 0.0);
                }
                let s = &mut s[..rows * d.keys];
                for h in 0..d.heads {
                    let off = h * d.head_dim;
                    let (n, hd) = (d.keys, d.head_dim);
                    // bf16: this head's packed k^T and v; f32: none.
                    let kv = packed.get(b * d.heads + h);
                    match kv {
                        None => {
                            let qv = View::rows(&qb[off..], inner);
                            let kt = View {
                                data: &kb[off..],
                                rs: 1,
                                cs: inner,
                            };
                            gemm_f32(rows, n, hd, qv, kt, s, n, false, 1);
                        }
                        Some((kt, _)) => {
                            let qv = bf16::Lhs::Strided {
                                data: &qb[off..],
                                rs: inner,
                                cs: 1,
                            };
                            let kt = bf16::Rhs::Packed(kt);
                            bf16::gemm_bf16(rows, n, hd, qv, kt, s, n, false, bf16::Bias::None, 1)
                                .expect("scores fit the block");
                        }
                    }
                    for row in s.chunks_mut(n) {
                        simd::softmax_scaled(row, scale);
                    }
                    let out = &mut dst[off..];
                    match kv {
                        None => {
                            let vv = View::rows(&vb[off..], inner);
                            let sv = View::rows(s, n);
                            gemm_f32(rows, hd, n, sv, vv, out, inner, false, 1);
                        }
                        Some((_, vp)) => {
                            let sv = bf16::Lhs::Strided {
                                data: s,
                                rs: n,
                                cs: 1,
                            };
                            let vp = bf16::Rhs::Packed(vp);
                            bf16::gemm_bf16(
                                rows,
                                hd,
                                n,
                                sv,
                                vp,
                                out,
                                inner,
                                false,
                                bf16::Bias::None,
                                1,
                            )
                            .expect("the output block fits");
                        }
                    }
                }
            });
        });
    out
}

thread_local! {
    /// One block of scores, reused across calls on this thread.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + seed * 104729) % 2003) as f32 / 700.0 - 1.4)
            .collect()
    }

    fn naive(q: &[f32], k: &[f32], v: &[f32], d: Dims, scale: f64) -> Vec<f64> {
        let inner = d.heads * d.head_dim;
        let mut out = vec![0f64; q.len()];
        for b in 0..d.batch {
            for h in 0..d.heads {
                for i in 0..d.queries {
                    let qi = |j: usize| q[(b * d.queries + i) * inner + h * d.head_dim + j] as f64;
                    let kt = |t: usize, j: usize| k[(b * d.keys + t) * inner + h * d.head_dim + j];
                    let s: Vec<f64> = (0..d.keys)
                        .map(|t| {
                            (0..d.head_dim)
                                .map(|j| qi(j) * kt(t, j) as f64)
                                .sum::<f64>()
                        })
                        .map(|x| x * scale)
                        .collect();
                    let max = s.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for j in 0..d.head_dim {
                        let mut acc = 0f64;
                        for t in 0..d.keys {
                            acc += e[t] / sum
                                * v[(b * d.keys + t) * inner + h * d.head_dim + j] as f64;
                        }
                        out[(b * d.queries + i) * inner + h * d.head_dim + j] = acc;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn matches_naive_attention() {
        // (batch, queries, keys, heads, head_dim)
        let cases = [
            (1, 1, 1, 1, 1),
            (2, 17, 5, 3, 4),
            (1, 300, 77, 2, 8),
            (2, 33, 1100, 1, 5),
            (1, 5, 3000, 4, 3),
            (2, 70, 333, 3, 40),
        ];
        for &(batch, queries, keys, heads, head_dim) in &cases {
            let d = Dims {
                batch,
                queries,
                keys,
                heads,
                head_dim,
            };
            let inner = heads * head_dim;
            let q = values(batch * queries * inner, 1);
            let k = values(batch * keys * inner, 2);
            let v = values(batch * keys * inner, 3);
            let scale = 1.0 / (head_dim as f32).sqrt();
            let want = naive(&q, &k, &v, d, scale as f64);
            let got = attention(&q, &k, &v, d, scale, Precision::F32);
            for (g, e) in got.iter().zip(&want) {
                assert!((*g as f64 - e).abs() < 2e-5, "{d:?}: {g} vs {e}");
            }
            // bf16 inputs (8 significant bits) to both products: relative error ~2^-8 of the
            // terms; values here are within 1.4 in magnitude.
            let got = attention(&q, &k, &v, d, scale, Precision::Bf16);
            for (g, e) in got.iter().zip(&want) {
                assert!((*g as f64 - e).abs() < 2e-2, "bf16 {d:?}: {g} vs {e}");
            }
        }
    }
}
