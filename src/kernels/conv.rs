//! 2-D convolution (NCHW, square kernel, symmetric padding) as matrix products.
//!
//! A 1x1 convolution with stride 1 is `W (out x in) * X (in x pixels)` on the input as it lies.
//! Other kernels unfold the input (im2col) into a bounded scratch buffer a few output rows at a
//! time, so memory stays small at any image size, and multiply each chunk straight into the
//! output's channel planes (no layout copy afterwards).
use std::cell::RefCell;

use rayon::prelude::*;

use super::matmul::{self, Precision, Role, View, Weight};

/// Target size of the unfolded chunk, in floats (16 MB).
const CHUNK_FLOATS: usize = 4 << 20;

/// A convolution's weights and geometry, prepared at load.
#[derive(Debug)]
pub struct Conv2d {
    weight: Weight,
    bias: Option<Vec<f32>>,
    in_ch: usize,
    out_ch: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    /// `weight` is (out, in, k, k) row-major, `bias` (out).
    pub fn new(
        weight: impl Into<super::HostF32>,
        bias: Option<Vec<f32>>,
        (out_ch, in_ch, kernel): (usize, usize, usize),
        stride: usize,
        padding: usize,
        precision: Precision,
    ) -> Self {
        let weight = weight.into();
        assert_eq!(weight.len(), out_ch * in_ch * kernel * kernel);
        assert!(stride > 0 && kernel > 0);
        Self {
            weight: Weight::new(
                weight,
                out_ch,
                in_ch * kernel * kernel,
                Role::Lhs,
                precision,
            ),
            bias,
            in_ch,
            out_ch,
            kernel,
            stride,
            padding,
        }
    }

    pub fn out_channels(&self) -> usize {
        self.out_ch
    }

    pub fn kernel(&self) -> usize {
        self.kernel
    }

    /// Output height and width for an `h x w` input.
    pub fn out_size(&self, h: usize, w: usize) -> (usize, usize) {
        let o = |n: usize| (n + 2 * self.padding - self.kernel) / self.stride + 1;
        (o(h), o(w))
    }

    /// Floating-point operations for a batch of `b` images of `h x w`.
    pub fn flops(&self, b: usize, h: usize, w: usize) -> usize {
        let (ho, wo) = self.out_size(h, w);
        2 * b * self.out_ch * self.weight.in_dim() * ho * wo
    }

    /// Convolves `b` images (`x` is (b, in, h, w)); returns (b, out, ho, wo) data.
    pub fn forward(&self, x: &[f32], b: usize, h: usize, w: usize, threads: usize) -> Vec<f32> {
        assert_eq!(x.len(), b * self.in_ch * h * w);
        assert!(h + 2 * self.padding >= self.kernel && w + 2 * self.padding >= self.kernel);
        let (ho, wo) = self.out_size(h, w);
        let plane = ho * wo;
        let mut out = vec![0f32; b * self.out_ch * plane];
        let bias = self.bias.as_deref();
        let pointwise = self.kernel == 1 && self.stride == 1 && self.padding == 0;
        for (img, dst) in x
            .chunks(self.in_ch * h * w)
            .zip(out.chunks_mut(self.out_ch * plane))
        {
            if pointwise {
                let rhs = View::rows(img, plane);
                matmul::weight_times(&self.weight, rhs, plane, dst, plane, bias, threads);
                continue;
            }
            let k = self.weight.in_dim();
            let rows_per_chunk = (CHUNK_FLOATS / (k * wo)).clamp(1, ho);
            SCRATCH.with(|scratch| {
                let mut col = scratch.borrow_mut();
                for y0 in (0..ho).step_by(rows_per_chunk) {
                    let rows = rows_per_chunk.min(ho - y0);
                    let n = rows * wo;
                    if col.len() < k * n {
                        col.resize(k * n, 0.0);
                    }
                    self.unfold(img, h, w, y0, rows, wo, &mut col[..k * n]);
                    let rhs = View::rows(&col[..k * n], n);
                    let dst = &mut dst[y0 * wo..];
                    matmul::weight_times(&self.weight, rhs, n, dst, plane, bias, threads);
                }
            });
        }
        out
    }

    /// im2col of output rows `y0..y0 + rows` into `col` ((in * k * k) x (rows * wo)).
    #[allow(clippy::too_many_arguments)]
    fn unfold(
        &self,
        img: &[f32],
        h: usize,
        w: usize,
        y0: usize,
        rows: usize,
        wo: usize,
        col: &mut [f32],
    ) {
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        let n = rows * wo;
        col.par_chunks_mut(k * k * n)
            .enumerate()
            .for_each(|(c, block)| {
                let src = &img[c * h * w..(c + 1) * h * w];
                for ky in 0..k {
                    for kx in 0..k {
                        let row = &mut block[(ky * k + kx) * n..(ky * k + kx + 1) * n];
                        // Output columns x whose input column x * s + kx - p lies inside.
                        let x_lo = p.saturating_sub(kx).div_ceil(s).min(wo);
                        let x_hi = if w + p > kx {
                            ((w + p - kx - 1) / s + 1).min(wo)
                        } else {
                            0
                        }
                        .max(x_lo);
                        for (r, out) in row.chunks_mut(wo).enumerate() {
                            let iy = (y0 + r) * s + ky;
                            if iy < p || iy - p >= h {
                                out.fill(0.0);
                                continue;
                            }
                            let line = &src[(iy - p) * w..(iy - p + 1) * w];
                            out[..x_lo].fill(0.0);
                            out[x_hi..].fill(0.0);
                            if s == 1 {
                                let ix0 = x_lo + kx - p;
                                out[x_lo..x_hi].copy_from_slice(&line[ix0..ix0 + (x_hi - x_lo)]);
                            } else {
                                for (x, o) in out[x_lo..x_hi].iter_mut().enumerate() {
                                    *o = line[(x_lo + x) * s + kx - p];
                                }
                            }
                        }
                    }
                }
            });
    }
}

thread_local! {
    /// The im2col buffer, reused across calls on this thread.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::too_many_arguments)]
    fn naive(
        x: &[f32],
        wt: &[f32],
        bias: Option<&[f32]>,
        (b, ci, h, w): (usize, usize, usize, usize),
        (co, k): (usize, usize),
        s: usize,
        p: usize,
    ) -> Vec<f64> {
        let ho = (h + 2 * p - k) / s + 1;
        let wo = (w + 2 * p - k) / s + 1;
        let mut out = vec![0f64; b * co * ho * wo];
        for bi in 0..b {
            for o in 0..co {
                for y in 0..ho {
                    for xx in 0..wo {
                        let mut acc = bias.map_or(0.0, |bb| bb[o] as f64);
                        for c in 0..ci {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let iy = (y * s + ky) as isize - p as isize;
                                    let ix = (xx * s + kx) as isize - p as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    let xv = x[((bi * ci + c) * h + iy as usize) * w + ix as usize];
                                    let wv = wt[((o * ci + c) * k + ky) * k + kx];
                                    acc += xv as f64 * wv as f64;
                                }
                            }
                        }
                        out[((bi * co + o) * ho + y) * wo + xx] = acc;
                    }
                }
            }
        }
        out
    }

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + seed * 104729) % 2003) as f32 / 1000.0 - 1.0)
            .collect()
    }

    #[test]
    fn matches_naive_convolution() {
        // (batch, in, h, w, out, kernel, stride, padding)
        let cases = [
            (1, 1, 1, 1, 1, 1, 1, 0),
            (2, 3, 5, 7, 4, 3, 1, 1),
            (1, 5, 9, 6, 3, 3, 2, 1),
            (2, 4, 8, 8, 5, 3, 2, 0),
            (1, 6, 11, 13, 7, 1, 1, 0),
            (2, 2, 4, 3, 3, 3, 1, 0),
            (1, 3, 17, 5, 2, 1, 2, 0),
        ];
        for &(b, ci, h, w, co, k, s, p) in &cases {
            let x = values(b * ci * h * w, 1);
            let wt = values(co * ci * k * k, 2);
            let bias = values(co, 3);
            let want = naive(&x, &wt, Some(&bias), (b, ci, h, w), (co, k), s, p);
            let conv = Conv2d::new(
                wt.clone(),
                Some(bias.clone()),
                (co, ci, k),
                s,
                p,
                Precision::F32,
            );
            for threads in [1, 2] {
                let got = conv.forward(&x, b, h, w, threads);
                assert_eq!(got.len(), want.len());
                for (g, e) in got.iter().zip(&want) {
                    assert!(
                        (*g as f64 - e).abs() < 1e-5 * e.abs().max(1.0),
                        "{g} vs {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn chunked_unfold_covers_tall_images() {
        // Enough rows that the im2col runs in several chunks.
        let (b, ci, h, w, co) = (1, 256, 40, 64, 2);
        let x = values(b * ci * h * w, 4);
        let wt = values(co * ci * 9, 5);
        let conv = Conv2d::new(wt.clone(), None, (co, ci, 3), 1, 1, Precision::F32);
        assert!(CHUNK_FLOATS / (ci * 9 * w) < h, "test must span chunks");
        let got = conv.forward(&x, b, h, w, 2);
        let want = naive(&x, &wt, None, (b, ci, h, w), (co, 3), 1, 1);
        for (g, e) in got.iter().zip(&want) {
            assert!((*g as f64 - e).abs() < 1e-4 * e.abs().max(1.0));
        }
    }
}
