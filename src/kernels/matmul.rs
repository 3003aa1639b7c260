//! Matrix products on f32 slices: the one place that picks the GEMM implementation.
//!
//! Weights are prepared once at load ([`Weight`]) in the layout the product wants; activations
//! are strided views. Rows of the destination have stride `dst_rs`, columns stride 1.
//! In f32 the products run on the `gemm` crate (its AVX-512 kernels where the CPU has them); in
//! bf16 the weights are stored packed as bf16 and the activations rounded to bf16 while packing,
//! with f32 accumulation, on AMX or AVX512-BF16 where available ([`super::bf16`]).
use super::{bf16, HostF32};
/// A strided read-only matrix view: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// A row-major view with row stride `rs`.
    pub fn rows(data: &'a [f32], rs: usize) -> Self {
        Self { data, rs, cs: 1 }
    }
}

/// The role a weight plays, fixed at load: `Lhs` for `W (m x k) * X` (convolutions, channels
/// first), `RhsT` for `X * W^T` with `W` stored `(n x k)` (linear layers, tokens first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Lhs,
    RhsT,
}

/// Number format of the products with a weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    /// bf16 inputs, f32 accumulation and output.
    Bf16,
}

/// A weight matrix prepared for products, `rows x cols` as stored (`out x in` for both roles).
#[derive(Debug)]
pub struct Weight {
    rows: usize,
    cols: usize,
    role: Role,
    repr: Repr,
}

#[derive(Debug)]
enum Repr {
    F32(HostF32),
    Bf16Lhs(bf16::PackedLhs),
    Bf16Rhs(bf16::PackedRhs),
}

impl Weight {
    /// Prepares a row-major `rows x cols` weight (`out x in`) for `role` in `precision`.
    pub fn new(
        data: impl Into<HostF32>,
        rows: usize,
        cols: usize,
        role: Role,
        precision: Precision,
    ) -> Self {
        let data = data.into();
        assert_eq!(data.len(), rows * cols);
        let repr = match (precision, role) {
            (Precision::F32, _) => Repr::F32(data),
            (Precision::Bf16, Role::Lhs) => Repr::Bf16Lhs(
                bf16::PackedLhs::pack(rows, cols, &data, cols, 1)
                    .expect("the view covers the weight it was made from"),
            ),
            // W^T (cols x rows): element (k, j) is W[j][k].
            (Precision::Bf16, Role::RhsT) => Repr::Bf16Rhs(
                bf16::PackedRhs::pack(cols, rows, &data, 1, cols)
                    .expect("the view covers the weight it was made from"),
            ),
        };
        Self {
            rows,
            cols,
            role,
            repr,
        }
    }

    /// Output features (`out`).
    pub fn out_dim(&self) -> usize {
        self.rows
    }

    /// Input features (`in`, or `in * kh * kw` for a convolution).
    pub fn in_dim(&self) -> usize {
        self.cols
    }
}

/// `dst (out x n) = W * rhs (in x n) [+ bias per row]`, for a [`Role::Lhs`] weight.
pub fn weight_times(
    w: &Weight,
    rhs: View,
    n: usize,
    dst: &mut [f32],
    dst_rs: usize,
    bias: Option<&[f32]>,
    threads: usize,
) {
    assert_eq!(w.role, Role::Lhs);
    let (m, k) = (w.rows, w.cols);
    match &w.repr {
        Repr::F32(data) => {
            let biased = write_bias(dst, dst_rs, m, n, bias, true);
            gemm_f32(
                m,
                n,
                k,
                View::rows(data, k),
                rhs,
                dst,
                dst_rs,
                biased,
                threads,
            );
        }
        Repr::Bf16Lhs(p) => {
            let bias = bias.map_or(bf16::Bias::None, bf16::Bias::PerRow);
            let (lhs, rhs) = (bf16::Lhs::Packed(p), bf16::Rhs::from(rhs));
            bf16::gemm_bf16(m, n, k, lhs, rhs, dst, dst_rs, false, bias, threads)
                .expect("shapes were checked by the caller");
        }
        Repr::Bf16Rhs(_) => unreachable!("a Lhs weight is packed as Bf16Lhs"),
    }
}

/// `dst (m x out) = lhs (m x in) * W^T [+ bias per column]`, for a [`Role::RhsT`] weight.
pub fn times_weight_t(
    lhs: View,
    m: usize,
    w: &Weight,
    dst: &mut [f32],
    dst_rs: usize,
    bias: Option<&[f32]>,
    threads: usize,
) {
    assert_eq!(w.role, Role::RhsT);
    let (n, k) = (w.rows, w.cols);
    match &w.repr {
        Repr::F32(data) => {
            let biased = write_bias(dst, dst_rs, m, n, bias, false);
            let rhs = View { data, rs: 1, cs: k };
            // Linear layers over few tokens (text encoders) split their output columns.
            if m < MAX_ROWS_FOR_COLUMN_SPLIT
                && threads > 1
                && n >= 2 * MIN_COLS_PER_THREAD
                && 2 * m * n * k >= MIN_PARALLEL_FLOPS
            {
                check_gemm_views(m, n, k, lhs, rhs, dst, dst_rs);
                gemm_column_blocks(m, n, k, lhs, rhs, dst, dst_rs, biased, threads);
            } else {
                gemm_f32(m, n, k, lhs, rhs, dst, dst_rs, biased, threads);
            }
        }
        Repr::Bf16Rhs(p) => {
            let bias = bias.map_or(bf16::Bias::None, bf16::Bias::PerCol);
            let (lhs, rhs) = (bf16::Lhs::from(lhs), bf16::Rhs::Packed(p));
            bf16::gemm_bf16(m, n, k, lhs, rhs, dst, dst_rs, false, bias, threads)
                .expect("shapes were checked by the caller");
        }
        Repr::Bf16Lhs(_) => unreachable!("a RhsT weight is packed as Bf16Rhs"),
    }
}

impl<'a> From<View<'a>> for bf16::Lhs<'a> {
    fn from(v: View<'a>) -> Self {
        bf16::Lhs::Strided {
            data: v.data,
            rs: v.rs,
            cs: v.cs,
        }
    }
}

impl<'a> From<View<'a>> for bf16::Rhs<'a> {
    fn from(v: View<'a>) -> Self {
        bf16::Rhs::Strided {
            data: v.data,
            rs: v.rs,
            cs: v.cs,
        }
    }
}

/// Writes `bias` (one value per row, or one per column) into the `m x n` destination so the
/// product can accumulate onto it; returns whether it did.
fn write_bias(
    dst: &mut [f32],
    rs: usize,
    m: usize,
    n: usize,
    bias: Option<&[f32]>,
    per_row: bool,
) -> bool {
    let Some(b) = bias else { return false };
    for i in 0..m {
        let row = &mut dst[i * rs..i * rs + n];
        if per_row {
            row.fill(b[i]);
        } else {
            row.copy_from_slice(b);
        }
    }
    true
}

/// `dst (m x n) [+]= lhs (m x k) * rhs (k x n)` on strided views; `threads` 1 runs on the
/// calling thread.
#[allow(clippy::too_many_arguments)]
pub fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    lhs: View,
    rhs: View,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    check_gemm_views(m, n, k, lhs, rhs, dst, dst_rs);
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    // Split the rows over the threads ourselves, each block a single-threaded product: every
    // thread packs its own copy of the right-hand operand (a small cost next to the product)
    // and the destination blocks are disjoint slices.
    let blocks = if m >= 2 * MIN_ROWS_PER_THREAD && 2 * m * n * k >= MIN_PARALLEL_FLOPS {
        threads.clamp(1, m / MIN_ROWS_PER_THREAD)
    } else {
        1
    };
    if blocks <= 1 {
        gemm_serial(m, n, k, lhs, rhs, dst, dst_rs, accumulate);
        return;
    }
    let rows_per = m.div_ceil(blocks);
    let mut parts = Vec::with_capacity(blocks);
    let mut rest = &mut dst[..(m - 1) * dst_rs + n];
    let mut r0 = 0;
    while r0 < m {
        let rows = rows_per.min(m - r0);
        let take = if r0 + rows < m {
            rows * dst_rs
        } else {
            rest.len()
        };
        let (part, tail) = rest.split_at_mut(take);
        parts.push((r0, rows, part));
        rest = tail;
        r0 += rows;
    }
    use rayon::prelude::*;
    parts.into_par_iter().for_each(|(r0, rows, part)| {
        let lhs = View {
            data: &lhs.data[r0 * lhs.rs..],
            ..lhs
        };
        gemm_serial(rows, n, k, lhs, rhs, part, dst_rs, accumulate);
    });
}

/// Panics unless the views and `dst` cover an `m x k` by `k x n` product (internal shapes,
/// checked before the unsafe kernels run).
fn check_gemm_views(
    m: usize,
    n: usize,
    k: usize,
    lhs: View,
    rhs: View,
    dst: &[f32],
    dst_rs: usize,
) {
    assert!(
        m == 0 || n == 0 || dst.len() >= (m - 1) * dst_rs + n,
        "gemm: destination too small"
    );
    assert!(
        m == 0 || k == 0 || lhs.data.len() > (m - 1) * lhs.rs + (k - 1) * lhs.cs,
        "gemm: lhs too small"
    );
    assert!(
        n == 0 || k == 0 || rhs.data.len() > (k - 1) * rhs.rs + (n - 1) * rhs.cs,
        "gemm: rhs too small"
    );
}

/// Linear layers with fewer rows than this split their columns over the threads.
const MAX_ROWS_FOR_COLUMN_SPLIT: usize = 256;
/// Column blocks narrower than this are not worth a thread of their own.
const MIN_COLS_PER_THREAD: usize = 64;

/// The destination's base pointer, shared by threads that write disjoint column blocks.
#[derive(Clone, Copy)]
struct DstPtr(*mut f32);
// SAFETY: every thread writes only its own columns of the destination (see
// `gemm_column_blocks`), so no element is written by two threads or read while written.
unsafe impl Send for DstPtr {}
unsafe impl Sync for DstPtr {}

impl DstPtr {
    /// The pointer (a method, so closures capture the whole `Send` wrapper, not the field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// [`gemm_f32`] with the columns of `rhs` and `dst` split into `threads` blocks, one
/// single-threaded product each: few rows and many columns (a text encoder's 77 tokens
/// through a linear layer), where every thread packing the whole right-hand operand would
/// cost as much as its share of the product. The views and `dst` were checked by
/// [`check_gemm_views`].
#[allow(clippy::too_many_arguments)]
fn gemm_column_blocks(
    m: usize,
    n: usize,
    k: usize,
    lhs: View,
    rhs: View,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    threads: usize,
) {
    let blocks = threads.clamp(1, n / MIN_COLS_PER_THREAD);
    // Multiples of 16 columns keep the AVX-512 kernels on full vectors.
    let per = n.div_ceil(blocks).div_ceil(16) * 16;
    let base = DstPtr(dst.as_mut_ptr());
    let starts: Vec<usize> = (0..n).step_by(per).collect();
    use rayon::prelude::*;
    starts.into_par_iter().for_each(|c0| {
        let cols = per.min(n - c0);
        // SAFETY: check_gemm_views checked that dst holds (m - 1) * dst_rs + n elements and that rhs
        // covers k x n; this block reads rhs columns c0..c0 + cols and writes dst columns
        // c0..c0 + cols of rows 0..m, which no other block touches.
        unsafe {
            gemm::gemm(
                m,
                cols,
                k,
                base.get().add(c0),
                1,
                dst_rs as isize,
                accumulate,
                lhs.data.as_ptr(),
                lhs.cs as isize,
                lhs.rs as isize,
                rhs.data.as_ptr().add(c0 * rhs.cs),
                rhs.cs as isize,
                rhs.rs as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    });
}

/// Products smaller than this run on one thread.
const MIN_PARALLEL_FLOPS: usize = 4 << 20;
/// Row blocks smaller than this are not worth a thread of their own.
const MIN_ROWS_PER_THREAD: usize = 16;

/// One single-threaded product; the views and `dst` were checked by [`gemm_f32`].
#[allow(clippy::too_many_arguments)]
fn gemm_serial(
    m: usize,
    n: usize,
    k: usize,
    lhs: View,
    rhs: View,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
) {
    assert!(
        dst.len() > (m - 1) * dst_rs + n - 1,
        "gemm: destination too small"
    );
    assert!(
        lhs.data.len() > (m - 1) * lhs.rs + (k - 1) * lhs.cs,
        "gemm: lhs too small"
    );
    // SAFETY: the asserts (here and in gemm_f32) check that every index the product reads or
    // writes lies inside the slices; the destination is borrowed mutably, so nothing else
    // aliases it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: View, b: View) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    out[i * n + j] +=
                        a.data[i * a.rs + p * a.cs] as f64 * b.data[p * b.rs + j * b.cs] as f64;
                }
            }
        }
        out
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    #[test]
    fn gemm_matches_naive_on_odd_shapes_and_strides() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (3, 17, 5),
            (17, 3, 33),
            (33, 31, 15),
            (100, 7, 257),
            // large enough to split over threads, uneven row blocks
            (201, 65, 300),
        ] {
            let a = values(m * k, 1);
            let b = values(k * n, 2);
            // a row-major, b transposed through strides
            let av = View::rows(&a, k);
            let bv = View {
                data: &b,
                rs: 1,
                cs: k,
            };
            let want = naive(m, n, k, av, bv);
            for threads in [1, 2] {
                let mut dst = vec![0.5f32; m * (n + 2)];
                gemm_f32(m, n, k, av, bv, &mut dst, n + 2, false, threads);
                for i in 0..m {
                    for j in 0..n {
                        let d = (dst[i * (n + 2) + j] as f64 - want[i * n + j]).abs();
                        assert!(d <= 1e-5 * (k as f64).sqrt() * 4.0, "{m}x{n}x{k}: {d}");
                    }
                    assert_eq!(dst[i * (n + 2) + n], 0.5, "padding column touched");
                }
            }
        }
    }

    #[test]
    fn linear_over_few_tokens_splits_columns_and_matches() {
        // Few rows and many output columns take the column split; uneven blocks.
        for &(m, out, inp) in &[(77, 1000, 300), (7, 131, 4000)] {
            let w = values(out * inp, 6);
            let x = values(m * inp, 7);
            let bias = values(out, 8);
            let rhs_t = Weight::new(w.clone(), out, inp, Role::RhsT, Precision::F32);
            let wt = View {
                data: &w,
                rs: 1,
                cs: inp,
            };
            let want = naive(m, out, inp, View::rows(&x, inp), wt);
            for threads in [1, 2] {
                let mut dst = vec![0.5f32; m * (out + 3)];
                times_weight_t(
                    View::rows(&x, inp),
                    m,
                    &rhs_t,
                    &mut dst,
                    out + 3,
                    Some(&bias),
                    threads,
                );
                for i in 0..m {
                    for j in 0..out {
                        let got = dst[i * (out + 3) + j] as f64;
                        let d = (got - want[i * out + j] - bias[j] as f64).abs();
                        assert!(
                            d <= 1e-5 * (inp as f64).sqrt() * 4.0,
                            "{m}x{out}x{inp}: {d}"
                        );
                    }
                    assert_eq!(dst[i * (out + 3) + out], 0.5, "padding column touched");
                }
            }
        }
    }

    #[test]
    fn weight_products_add_bias_and_transpose() {
        let (out, inp, n) = (5, 7, 3);
        let w = values(out * inp, 3);
        let x = values(inp * n, 4);
        let bias = values(out, 5);
        let lhs = Weight::new(w.clone(), out, inp, Role::Lhs, Precision::F32);
        let mut dst = vec![0f32; out * n];
        weight_times(&lhs, View::rows(&x, n), n, &mut dst, n, Some(&bias), 1);
        let want = naive(out, n, inp, View::rows(&w, inp), View::rows(&x, n));
        for i in 0..out {
            for j in 0..n {
                let d = (dst[i * n + j] as f64 - want[i * n + j] - bias[i] as f64).abs();
                assert!(d < 1e-5);
            }
        }
        // tokens-first: x^T (n x inp) * W^T
        let rhs_t = Weight::new(w.clone(), out, inp, Role::RhsT, Precision::F32);
        let xt = View {
            data: &x,
            rs: 1,
            cs: n,
        };
        let mut dst = vec![0f32; n * out];
        times_weight_t(xt, n, &rhs_t, &mut dst, out, Some(&bias), 2);
        for j in 0..n {
            for i in 0..out {
                let d = (dst[j * out + i] as f64 - want[i * n + j] - bias[i] as f64).abs();
                assert!(d < 1e-5);
            }
        }
    }
}
