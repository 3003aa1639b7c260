//! bf16 matrix products on the CPU: operands rounded to bf16, products summed in f32, f32 out.
//!
//! Three backends share one packed operand format and one blocked driver: Intel AMX tiles
//! (`tdpbf16ps`, 32x32 output per micro-kernel call), AVX512_BF16 (`vdpbf16ps`), and a portable
//! f32 path for every other machine. [`Backend::detect`] picks the best one once per process; for
//! AMX that includes asking Linux for the tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), and
//! every call loads the tile configuration on the thread it runs on (rayon workers included) and
//! releases it before returning.
//!
//! Packed format: an operand is cut into tiles of 16 rows (lhs) or 16 columns (rhs) by 32 k
//! values, one 1 KiB [`Block`] each, zero-padded to multiples of 32 rows/columns and of 32 k.
//! A block is 16x16 `u32`, each two bf16 adjacent in k (low half = even k): lhs blocks are
//! `[row][k pair]` (an AMX A tile), rhs blocks `[k pair][column]` (a B tile in VNNI layout).
//! f32 values are rounded to nearest even while packing.

use std::sync::OnceLock;

/// k values per block.
const KB: usize = 32;
/// Rows (lhs) or columns (rhs) per tile.
const TILE: usize = 16;
/// Output rows and columns per micro-kernel call (2x2 AMX tiles).
const MR: usize = 32;
/// Cache blocking: k blocks per pass; rows/columns of the operand packed per call (outer
/// loop) and of the other one (inner loop). Sums of an inner x outer block stay in L2.
const KC: usize = 16;
const OB: usize = 256;
const IB: usize = 256;

/// One 16x32 bf16 tile of a packed operand, aligned so tile loads never split cache lines.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Block([u32; 256]);

const ZERO_BLOCK: Block = Block([0; 256]);

/// The instruction set a product runs on, best last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Backend {
    /// Plain Rust on f32; correct on any machine.
    Portable,
    /// `vdpbf16ps` on 512-bit vectors.
    Avx512Bf16,
    /// Intel AMX tiles.
    Amx,
}

impl Backend {
    /// The best backend this machine and OS allow (decided once per process).
    pub fn detect() -> Backend {
        static DETECTED: OnceLock<Backend> = OnceLock::new();
        *DETECTED.get_or_init(detect)
    }

    /// Short name for logs and benchmark tables: "amx", "avx512bf16" or "portable".
    pub fn name(self) -> &'static str {
        match self {
            Backend::Portable => "portable",
            Backend::Avx512Bf16 => "avx512bf16",
            Backend::Amx => "amx",
        }
    }
}

/// Name of the backend [`gemm_bf16`] uses on this machine.
pub fn backend() -> &'static str {
    Backend::detect().name()
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Backend {
    let avx512 = is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512bf16");
    if !avx512 {
        return Backend::Portable;
    }
    // Leaf 7 exists on every CPU with AVX-512; EDX bit 22 = AMX-BF16, bit 24 = AMX-TILE.
    let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
    if edx & (1 << 22) != 0 && edx & (1 << 24) != 0 && request_tile_state() {
        Backend::Amx
    } else {
        Backend::Avx512Bf16
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Backend {
    Backend::Portable
}

/// Linux hands the 8 KiB AMX register state only to processes that ask for it.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: this arch_prctl only changes the process's permitted xsave features; it reads and
    // writes no user memory.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn request_tile_state() -> bool {
    false
}

/// Why a product or a packing was refused (shapes that do not fit the slices given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GemmError(String);

impl std::fmt::Display for GemmError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bf16 gemm: {}", self.0)
    }
}

impl std::error::Error for GemmError {}

/// A strided f32 matrix seen along its tile dimension: element (i, kk) = `data[i * rs + kk * cs]`
/// for `i < rows` (lhs rows or rhs columns) and `kk < k`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    rows: usize,
    k: usize,
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    fn new(
        what: &str,
        data: &'a [f32],
        rows: usize,
        k: usize,
        rs: usize,
        cs: usize,
    ) -> Result<Self, GemmError> {
        check_len(what, data.len(), rows, k, rs, cs)?;
        Ok(View {
            data,
            rows,
            k,
            rs,
            cs,
        })
    }
}

/// Checks that a `rows x cols` view with strides `rs`, `cs` lies inside `len` elements.
fn check_len(
    what: &str,
    len: usize,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
) -> Result<(), GemmError> {
    let last = (rows.max(1) - 1)
        .checked_mul(rs)
        .and_then(|r| (cols.max(1) - 1).checked_mul(cs)?.checked_add(r));
    match last {
        _ if rows == 0 || cols == 0 => Ok(()),
        Some(last) if last < len => Ok(()),
        _ => Err(GemmError(format!(
            "{what}: a {rows}x{cols} view with strides ({rs}, {cs}) does not fit in {len} elements"
        ))),
    }
}

/// An operand rounded to bf16 and packed: `rows` tiles-dimension entries by `k`.
struct Packed {
    rows: usize,
    k: usize,
    blocks: Vec<Block>,
}

impl Packed {
    fn new(view: &View, vnni: bool) -> Self {
        let mut blocks = vec![ZERO_BLOCK; 2 * view.rows.div_ceil(MR) * view.k.div_ceil(KB)];
        pack(
            view,
            vnni,
            0,
            2 * view.rows.div_ceil(MR),
            &mut blocks,
            Backend::detect(),
        );
        Packed {
            rows: view.rows,
            k: view.k,
            blocks,
        }
    }

    fn src(&self, what: &str, rows: usize, k: usize) -> Result<Src<'_>, GemmError> {
        if (self.rows, self.k) != (rows, k) {
            let (r, c) = if what == "lhs" {
                (self.rows, self.k)
            } else {
                (self.k, self.rows)
            };
            return Err(GemmError(format!(
                "packed {what} is {r}x{c}, not what the product needs"
            )));
        }
        Ok(Src::Packed(&self.blocks))
    }
}

/// Weights `M x K` (a convolution's `Cout x Cin*kh*kw`) rounded to bf16 and packed once.
pub struct PackedLhs(Packed);

/// A `K x N` operand (a linear layer's `W^T`) rounded to bf16 and packed once.
pub struct PackedRhs(Packed);

impl std::fmt::Debug for PackedLhs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedLhs({}x{} bf16)", self.0.rows, self.0.k)
    }
}

impl std::fmt::Debug for PackedRhs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedRhs({}x{} bf16)", self.0.k, self.0.rows)
    }
}

impl PackedLhs {
    /// Packs the `m x k` matrix with element (i, kk) at `data[i * rs + kk * cs]`.
    pub fn pack(m: usize, k: usize, data: &[f32], rs: usize, cs: usize) -> Result<Self, GemmError> {
        Ok(Self(Packed::new(
            &View::new("lhs", data, m, k, rs, cs)?,
            false,
        )))
    }

    /// (rows, columns) = (M, K).
    pub fn shape(&self) -> (usize, usize) {
        (self.0.rows, self.0.k)
    }

    /// Bytes held: 2 per element plus zero padding to multiples of 32.
    pub fn bytes(&self) -> usize {
        std::mem::size_of_val(self.0.blocks.as_slice())
    }
}

impl PackedRhs {
    /// Packs the `k x n` matrix with element (kk, j) at `data[kk * rs + j * cs]`; a linear
    /// layer's weight `W` (`n x k`, row-major) gives `W^T` with `rs = 1, cs = k`.
    pub fn pack(k: usize, n: usize, data: &[f32], rs: usize, cs: usize) -> Result<Self, GemmError> {
        Ok(Self(Packed::new(
            &View::new("rhs", data, n, k, cs, rs)?,
            true,
        )))
    }

    /// (rows, columns) = (K, N).
    pub fn shape(&self) -> (usize, usize) {
        (self.0.k, self.0.rows)
    }

    /// Bytes held: 2 per element plus zero padding to multiples of 32.
    pub fn bytes(&self) -> usize {
        std::mem::size_of_val(self.0.blocks.as_slice())
    }
}

/// Left operand: packed weights or a strided f32 view, element (i, kk) at `data[i*rs + kk*cs]`.
#[derive(Clone, Copy)]
pub enum Lhs<'a> {
    Packed(&'a PackedLhs),
    Strided {
        data: &'a [f32],
        rs: usize,
        cs: usize,
    },
}

/// Right operand: packed weights or a strided f32 view, element (kk, j) at `data[kk*rs + j*cs]`.
#[derive(Clone, Copy)]
pub enum Rhs<'a> {
    Packed(&'a PackedRhs),
    Strided {
        data: &'a [f32],
        rs: usize,
        cs: usize,
    },
}

/// A bias added to every output: one value per row (convolution channels) or per column.
#[derive(Clone, Copy)]
pub enum Bias<'a> {
    None,
    PerRow(&'a [f32]),
    PerCol(&'a [f32]),
}

/// A validated operand: its packed blocks (tile `t`, k block `b` at `t * kbs + b`) or a view to
/// pack per call.
#[derive(Clone, Copy)]
enum Src<'a> {
    Packed(&'a [Block]),
    Strided(View<'a>),
}

/// The destination pointer, shared by the threads of one product.
#[derive(Clone, Copy)]
struct DstPtr(*mut f32);
// SAFETY: the threads of one product write disjoint row or column ranges of dst (see
// `gemm_bf16_on`), whose `&mut [f32]` stays borrowed for the whole product.
unsafe impl Send for DstPtr {}
// SAFETY: as above; the pointer itself is only copied.
unsafe impl Sync for DstPtr {}

/// A validated product.
struct Problem<'a> {
    kbs: usize,
    lhs: Src<'a>,
    rhs: Src<'a>,
    dst: DstPtr,
    dst_rs: usize,
    accumulate: bool,
    bias: Bias<'a>,
    backend: Backend,
}

/// `dst[i*dst_rs + j] (= or +=) sum_kk bf16(lhs[i,kk]) * bf16(rhs[kk,j]) (+ bias)`, f32 sums.
///
/// `threads == 1` runs on the calling thread (which may be inside a rayon job); more splits the
/// output into that many parts on rayon's pool. Fails, writing nothing, if a view, the bias or
/// `dst` is too small for the shapes or `dst_rs < n`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_bf16(
    m: usize,
    n: usize,
    k: usize,
    lhs: Lhs,
    rhs: Rhs,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    bias: Bias,
    threads: usize,
) -> Result<(), GemmError> {
    gemm_bf16_on(
        Backend::detect(),
        m,
        n,
        k,
        lhs,
        rhs,
        dst,
        dst_rs,
        accumulate,
        bias,
        threads,
    )
}

/// [`gemm_bf16`] on a chosen backend (tests, benchmarks); fails if this machine lacks it.
#[allow(clippy::too_many_arguments)]
pub fn gemm_bf16_on(
    backend: Backend,
    m: usize,
    n: usize,
    k: usize,
    lhs: Lhs,
    rhs: Rhs,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    bias: Bias,
    threads: usize,
) -> Result<(), GemmError> {
    let fail = |msg: String| Err(GemmError(msg));
    if backend > Backend::detect() {
        return fail(format!("backend {} is not available here", backend.name()));
    }
    let lhs = match lhs {
        Lhs::Packed(p) => p.0.src("lhs", m, k)?,
        Lhs::Strided { data, rs, cs } => Src::Strided(View::new("lhs", data, m, k, rs, cs)?),
    };
    let rhs = match rhs {
        Rhs::Packed(p) => p.0.src("rhs", n, k)?,
        Rhs::Strided { data, rs, cs } => Src::Strided(View::new("rhs", data, n, k, cs, rs)?),
    };
    match bias {
        Bias::PerRow(b) if b.len() < m => return fail(format!("{} row biases, {m} rows", b.len())),
        Bias::PerCol(b) if b.len() < n => {
            return fail(format!("{} column biases, {n} columns", b.len()))
        }
        _ => {}
    }
    if m > 1 && dst_rs < n {
        return fail(format!("dst row stride {dst_rs} is below the {n} columns"));
    }
    check_len("dst", dst.len(), m, n, dst_rs, 1)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    let dst = DstPtr(dst.as_mut_ptr());
    let p = Problem {
        kbs: k.div_ceil(KB),
        lhs,
        rhs,
        dst,
        dst_rs,
        accumulate,
        bias,
        backend,
    };
    // Split the dimension whose operand is packed per call, so that no thread repeats another's
    // packing, else the larger one; parts are whole 32-wide micro-kernel steps.
    let split_m = match (lhs, rhs) {
        (Src::Strided(_), Src::Packed(_)) => m.div_ceil(MR) >= threads,
        (Src::Packed(_), Src::Strided(_)) => n.div_ceil(MR) < threads,
        _ => m > n,
    };
    let dim = if split_m { m } else { n };
    let parts = threads.clamp(1, dim.div_ceil(MR));
    let run = |part: usize| {
        let units = dim.div_ceil(MR);
        let r = (
            units * part / parts * MR,
            (units * (part + 1) / parts * MR).min(dim),
        );
        if split_m {
            p.run(r, (0, n))
        } else {
            p.run((0, m), r)
        }
    };
    if parts == 1 {
        run(0);
    } else {
        use rayon::prelude::*;
        (0..parts).into_par_iter().for_each(run);
    }
    Ok(())
}

/// Packed blocks of consecutive tiles over all of k: tile `t`, k block `b` at
/// `blocks[(t - t0) * kbs + b]`.
#[derive(Clone, Copy)]
struct Panel<'a> {
    blocks: &'a [Block],
    t0: usize,
    kbs: usize,
}

impl Panel<'_> {
    /// The `nk` blocks from k block `kb0` of the two tiles holding rows/columns `r..r + 32`.
    fn pair(&self, r: usize, kb0: usize, nk: usize) -> [*const Block; 2] {
        let at = (r / TILE - self.t0) * self.kbs + kb0;
        [
            self.blocks[at..at + nk].as_ptr(),
            self.blocks[at + self.kbs..][..nk].as_ptr(),
        ]
    }
}

impl Problem<'_> {
    /// The panel of rows/columns `r0..r1` of `src`, packed into `buf` if it is a view.
    fn panel<'b>(
        &self,
        src: Src<'b>,
        vnni: bool,
        (r0, r1): (usize, usize),
        buf: &'b mut Vec<Block>,
    ) -> Panel<'b> {
        let kbs = self.kbs;
        match src {
            Src::Packed(blocks) => Panel { blocks, t0: 0, kbs },
            Src::Strided(view) => {
                let tiles = 2 * (r1 - r0).div_ceil(MR);
                buf.resize(tiles * kbs, ZERO_BLOCK);
                pack(&view, vnni, r0 / TILE, tiles, buf, self.backend);
                Panel {
                    blocks: buf,
                    t0: r0 / TILE,
                    kbs,
                }
            }
        }
    }

    /// Output rows `rows.0..rows.1` by columns `cols.0..cols.1` (starts multiples of 32) on the
    /// calling thread.
    fn run(&self, rows: (usize, usize), cols: (usize, usize)) {
        let _tiles = TileConfig::load(self.backend);
        // Operands given as views are packed over all of k, each part once: lhs panels in the
        // outer loop if lhs is a view (a rhs view then packed whole first), else rhs panels.
        let outer_m = matches!(self.lhs, Src::Strided(_));
        let (mut inner_buf, mut outer_buf) = (Vec::new(), Vec::new());
        let inner_panel = if outer_m {
            self.panel(self.rhs, true, cols, &mut inner_buf)
        } else {
            self.panel(self.lhs, false, rows, &mut inner_buf)
        };
        let (outer, inner) = if outer_m { (rows, cols) } else { (cols, rows) };
        let mut sums = vec![0f32; OB * IB];
        for o0 in (outer.0..outer.1).step_by(OB) {
            let o = (o0, (o0 + OB).min(outer.1));
            let outer_panel = if outer_m {
                self.panel(self.lhs, false, o, &mut outer_buf)
            } else {
                self.panel(self.rhs, true, o, &mut outer_buf)
            };
            for i0 in (inner.0..inner.1).step_by(IB) {
                let i = (i0, (i0 + IB).min(inner.1));
                if outer_m {
                    self.block(outer_panel, inner_panel, o, i, &mut sums);
                } else {
                    self.block(inner_panel, outer_panel, i, o, &mut sums);
                }
            }
        }
    }

    /// Output rows `m0..m1` by columns `n0..n1`: sums over all of k kept in `c` (32x32 blocks
    /// in order) over passes of `KC` k blocks, then written to dst once.
    fn block(
        &self,
        a: Panel,
        b: Panel,
        (m0, m1): (usize, usize),
        (n0, n1): (usize, usize),
        c: &mut [f32],
    ) {
        let nb = (n1 - n0).div_ceil(MR);
        if self.kbs == 0 {
            c.fill(0.0);
        }
        for kb0 in (0..self.kbs).step_by(KC) {
            let nk = KC.min(self.kbs - kb0);
            for j in (n0..n1).step_by(MR) {
                let [b0, b1] = b.pair(j, kb0, nk);
                for i in (m0..m1).step_by(MR) {
                    let [a0, a1] = a.pair(i, kb0, nk);
                    let cb = &mut c[((i - m0) / MR * nb + (j - n0) / MR) * MR * MR..][..MR * MR];
                    let ops = Operands { a0, a1, b0, b1, nk };
                    // SAFETY: `pair` sliced nk blocks of each tile; cb is a 32x32 block.
                    unsafe { kernel(self.backend, &ops, cb.as_mut_ptr(), kb0 > 0) };
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        if self.backend != Backend::Portable {
            // SAFETY: every backend but Portable is chosen only after AVX-512F was detected.
            return unsafe { self.store_avx512(c, (m0, m1), (n0, n1)) };
        }
        self.store(c, (m0, m1), (n0, n1));
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn store_avx512(&self, c: &[f32], rows: (usize, usize), cols: (usize, usize)) {
        self.store(c, rows, cols)
    }

    /// dst = sums (+ old dst) (+ bias) over rows `m0..m1`, columns `n0..n1`.
    #[inline(always)]
    fn store(&self, c: &[f32], (m0, m1): (usize, usize), (n0, n1): (usize, usize)) {
        const NO_BIAS: [f32; MR] = [0.0; MR];
        let nb = (n1 - n0).div_ceil(MR);
        for i in m0..m1 {
            // SAFETY: row i, columns n0..n1 lie inside dst (checked in `gemm_bf16_on`) and in
            // this thread's part of it, so nothing else refers to them.
            let row = unsafe {
                std::slice::from_raw_parts_mut(self.dst.0.add(i * self.dst_rs + n0), n1 - n0)
            };
            let row_bias = if let Bias::PerRow(b) = self.bias {
                b[i]
            } else {
                0.0
            };
            for (jb, d) in row.chunks_mut(MR).enumerate() {
                let at = ((i - m0) / MR * nb + jb) * MR * MR + (i - m0) % MR * MR;
                let col_bias = match self.bias {
                    Bias::PerCol(b) => &b[n0 + jb * MR..][..d.len()],
                    _ => &NO_BIAS[..d.len()],
                };
                let sums = &c[at..at + d.len()];
                for ((d, &s), &cb) in d.iter_mut().zip(sums).zip(col_bias) {
                    *d = s + row_bias + cb + if self.accumulate { *d } else { 0.0 };
                }
            }
        }
    }
}

/// f32 to bf16 bits, rounding to nearest even; NaN stays NaN (quiet).
#[inline(always)]
fn bf16_bits(x: f32) -> u32 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    if b & 0x7fff_ffff > 0x7f80_0000 {
        (b >> 16) | 0x40
    } else {
        rounded
    }
}

#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    bf16_bits(lo) | (bf16_bits(hi) << 16)
}

/// Packs `tiles` tiles from tile `t0` of `view` over all of k into `out` (tile `t`, k block `b`
/// at `t * kbs + b`), as rhs (VNNI) blocks if `vnni`.
fn pack(view: &View, vnni: bool, t0: usize, tiles: usize, out: &mut [Block], backend: Backend) {
    #[cfg(target_arch = "x86_64")]
    if backend != Backend::Portable {
        // SAFETY: every backend but Portable is chosen only after AVX-512F/BW were detected.
        return unsafe { pack_avx512(view, vnni, t0, tiles, out) };
    }
    let _ = backend;
    pack_loops(view, vnni, t0, tiles, out);
}

/// The same loops compiled for AVX-512, whatever the crate's target CPU.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pack_avx512(view: &View, vnni: bool, t0: usize, tiles: usize, out: &mut [Block]) {
    pack_loops(view, vnni, t0, tiles, out);
}

#[inline(always)]
fn pack_loops(view: &View, vnni: bool, t0: usize, tiles: usize, out: &mut [Block]) {
    let kbs = view.k.div_ceil(KB);
    // Walk the source in memory order: along the rows of a row-major rhs, else along k.
    let (outer, inner) = if view.rs == 1 {
        (kbs, tiles)
    } else {
        (tiles, kbs)
    };
    for o in 0..outer {
        for i in 0..inner {
            let (t, b) = if view.rs == 1 { (i, o) } else { (o, i) };
            pack_block(view, vnni, (t0 + t) * TILE, b * KB, &mut out[t * kbs + b].0);
        }
    }
}

/// Packs rows `i0..i0+16` by k `k0..k0+32` of `v` into one block, zeros outside the view.
#[inline(always)]
fn pack_block(v: &View, vnni: bool, i0: usize, k0: usize, out: &mut [u32; 256]) {
    // Index of the pair (row r, k pair q) in the block.
    let at = |r: usize, q: usize| if vnni { q * TILE + r } else { r * TILE + q };
    if i0 + TILE <= v.rows && k0 + KB <= v.k {
        if v.cs == 1 {
            // Each row's k values are contiguous (activations; a linear layer's W^T).
            for r in 0..TILE {
                let src = &v.data[(i0 + r) * v.rs + k0..][..KB];
                for q in 0..TILE {
                    out[at(r, q)] = pair(src[2 * q], src[2 * q + 1]);
                }
            }
            return;
        }
        if v.rs == 1 && vnni {
            // A row-major rhs (im2col columns): two k rows interleave into one block row.
            for q in 0..TILE {
                let lo = &v.data[(k0 + 2 * q) * v.cs + i0..][..TILE];
                let hi = &v.data[(k0 + 2 * q + 1) * v.cs + i0..][..TILE];
                for (r, (&lo, &hi)) in lo.iter().zip(hi).enumerate() {
                    out[q * TILE + r] = pair(lo, hi);
                }
            }
            return;
        }
    }
    let get = |r: usize, kk: usize| match i0 + r < v.rows && k0 + kk < v.k {
        true => v.data[(i0 + r) * v.rs + (k0 + kk) * v.cs],
        false => 0.0,
    };
    for r in 0..TILE {
        for q in 0..TILE {
            out[at(r, q)] = pair(get(r, 2 * q), get(r, 2 * q + 1));
        }
    }
}

/// The four tiles a micro-kernel call reads: lhs rows 0-15 and 16-31, rhs columns 0-15 and
/// 16-31, each `nk` consecutive k blocks.
struct Operands {
    a0: *const Block,
    a1: *const Block,
    b0: *const Block,
    b1: *const Block,
    nk: usize,
}

/// `C (+)= A * B` on the contiguous 32x32 f32 block `c`; `load` keeps C's value, else C
/// starts at zero.
///
/// # Safety
/// `ops` points at four runs of `ops.nk >= 1` blocks, `c` at 32 * 32 writable f32, and
/// `backend` is available here (AMX: with `TileConfig` loaded on this thread).
unsafe fn kernel(backend: Backend, ops: &Operands, c: *mut f32, load: bool) {
    // SAFETY: the callees have this function's contract.
    unsafe {
        match backend {
            #[cfg(target_arch = "x86_64")]
            Backend::Amx => amx::kernel(ops, c, load),
            #[cfg(target_arch = "x86_64")]
            Backend::Avx512Bf16 => avx512::kernel(ops, c, load),
            _ => portable_kernel(ops, c, load),
        }
    }
}

/// Safety: as [`kernel`].
unsafe fn portable_kernel(ops: &Operands, c: *mut f32, load: bool) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2; the contract is this function's.
        return unsafe { portable_kernel_avx2(ops, c, load) };
    }
    // SAFETY: the contract is this function's.
    unsafe { portable_kernel_body(ops, c, load) }
}

/// [`portable_kernel_body`] compiled for AVX2 (the same operations in the same order, so the
/// same sums, eight columns at a time). Safety: as [`kernel`], on a CPU with AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn portable_kernel_avx2(ops: &Operands, c: *mut f32, load: bool) {
    // SAFETY: the contract is this function's.
    unsafe { portable_kernel_body(ops, c, load) }
}

/// The sums of one 32x32 block in plain Rust: each k pair's 32 B values are widened once and
/// reused by the 32 rows, so the column loop is contiguous (and vectorises). Every output
/// adds its k pairs in ascending order, as the other backends' reference.
/// Safety: as [`kernel`].
#[inline(always)]
unsafe fn portable_kernel_body(ops: &Operands, c: *mut f32, load: bool) {
    // SAFETY: c holds 32 * 32 f32 and nothing else refers to it during the call.
    let c = unsafe { &mut *(c as *mut [[f32; MR]; MR]) };
    if !load {
        *c = [[0.0; MR]; MR];
    }
    let widen = |x: u32| (f32::from_bits(x << 16), f32::from_bits(x & 0xffff_0000));
    let (mut b_lo, mut b_hi) = ([0f32; MR], [0f32; MR]);
    for kb in 0..ops.nk {
        // SAFETY: each run holds nk blocks.
        let (a, b) = unsafe {
            let a = [&(*ops.a0.add(kb)).0, &(*ops.a1.add(kb)).0];
            (a, [&(*ops.b0.add(kb)).0, &(*ops.b1.add(kb)).0])
        };
        for q in 0..TILE {
            for col in 0..MR {
                (b_lo[col], b_hi[col]) = widen(b[col / TILE][q * TILE + col % TILE]);
            }
            for (r, row) in c.iter_mut().enumerate() {
                let (a_lo, a_hi) = widen(a[r / TILE][r % TILE * TILE + q]);
                for ((out, &lo), &hi) in row.iter_mut().zip(&b_lo).zip(&b_hi) {
                    *out += a_lo * lo + a_hi * hi;
                }
            }
        }
    }
}

/// Holds the AMX tile configuration on this thread for the guard's life.
struct TileConfig(bool);

impl TileConfig {
    fn load(backend: Backend) -> Self {
        #[cfg(target_arch = "x86_64")]
        if backend == Backend::Amx {
            amx::configure();
            return TileConfig(true);
        }
        let _ = backend;
        TileConfig(false)
    }
}

impl Drop for TileConfig {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        if self.0 {
            amx::release();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod amx {
    use super::Operands;
    use std::arch::asm;

    /// Palette 1; tiles 0-7 all 16 rows of 64 bytes (C 16x16 f32, A 16x32 bf16, B 16x16 pairs).
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    pub(super) fn configure() {
        let mut cfg = Config([0; 64]);
        cfg.0[0] = 1;
        for t in 0..8 {
            cfg.0[16 + 2 * t] = 64; // bytes per row, u16 little-endian
            cfg.0[48 + t] = 16; // rows
        }
        // SAFETY: reached only with Backend::Amx, i.e. after CPUID showed AMX and Linux granted
        // the tile state; ldtilecfg reads the 64-byte config, valid for palette 1.
        unsafe { asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly)) };
    }

    pub(super) fn release() {
        // SAFETY: AMX is available (see `configure`); tilerelease only resets the tile state.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }

    /// Safety: as [`super::kernel`], with `configure` called on this thread.
    pub(super) unsafe fn kernel(ops: &Operands, c: *mut f32, load: bool) {
        // SAFETY: (all asm below) the C tiles are rows 0-15 / 16-31 by columns 0-15 / 16-31 of
        // the 32x32 block at c (row stride 128 bytes); A/B loads read nk blocks of 16 rows x 64
        // bytes from each run; compiled Rust code never uses tile registers.
        unsafe {
            let c1 = c.add(16 * 32);
            if load {
                asm!(
                    "tileloadd tmm0, [{c0} + {s}]",
                    "tileloadd tmm1, [{c0} + {s} + 64]",
                    "tileloadd tmm2, [{c1} + {s}]",
                    "tileloadd tmm3, [{c1} + {s} + 64]",
                    c0 = in(reg) c, c1 = in(reg) c1, s = in(reg) 128usize,
                    options(nostack, readonly),
                );
            } else {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3"
                );
            }
            asm!(
                "2:",
                "tileloadd tmm4, [{a0} + {s}]",
                "tileloadd tmm6, [{b0} + {s}]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {s}]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {s}]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "add {a0}, 1024",
                "add {a1}, 1024",
                "add {b0}, 1024",
                "add {b1}, 1024",
                "dec {n}",
                "jnz 2b",
                a0 = inout(reg) ops.a0 => _, a1 = inout(reg) ops.a1 => _,
                b0 = inout(reg) ops.b0 => _, b1 = inout(reg) ops.b1 => _,
                n = inout(reg) ops.nk => _, s = in(reg) 64usize,
                options(nostack, readonly),
            );
            asm!(
                "tilestored [{c0} + {s}], tmm0",
                "tilestored [{c0} + {s} + 64], tmm1",
                "tilestored [{c1} + {s}], tmm2",
                "tilestored [{c1} + {s} + 64], tmm3",
                c0 = in(reg) c, c1 = in(reg) c1, s = in(reg) 128usize,
                options(nostack),
            );
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Operands, MR, TILE};
    use std::arch::x86_64::*;

    /// Safety: as [`super::kernel`].
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn kernel(ops: &Operands, c: *mut f32, load: bool) {
        // SAFETY: `ops` runs hold nk blocks of 256 u32 (16 vectors) each and c 32 rows of 32
        // f32 (the caller's contract); __m512i and __m512bh are both 64 plain bytes.
        unsafe {
            let bh = |x: __m512i| std::mem::transmute::<__m512i, __m512bh>(x);
            // 8 rows x 32 columns per pass: 16 accumulators, 2 rhs vectors, broadcast lhs pairs.
            for slab in 0..MR / 8 {
                let a = if slab < 2 { ops.a0 } else { ops.a1 } as *const u32;
                let (r0, row) = ((slab % 2) * 8, |r: usize| c.add((slab * 8 + r) * MR));
                let mut acc = [[_mm512_setzero_ps(); 2]; 8];
                if load {
                    for (r, acc) in acc.iter_mut().enumerate() {
                        *acc = [_mm512_loadu_ps(row(r)), _mm512_loadu_ps(row(r).add(16))];
                    }
                }
                for kb in 0..ops.nk {
                    let ak = a.add(kb * 256 + r0 * TILE);
                    let (b0, b1) = (
                        ops.b0.add(kb) as *const __m512i,
                        ops.b1.add(kb) as *const __m512i,
                    );
                    for q in 0..TILE {
                        let x0 = bh(_mm512_loadu_si512(b0.add(q)));
                        let x1 = bh(_mm512_loadu_si512(b1.add(q)));
                        for (r, acc) in acc.iter_mut().enumerate() {
                            let p = bh(_mm512_set1_epi32(*ak.add(r * TILE + q) as i32));
                            acc[0] = _mm512_dpbf16_ps(acc[0], p, x0);
                            acc[1] = _mm512_dpbf16_ps(acc[1], p, x1);
                        }
                    }
                }
                for (r, acc) in acc.iter().enumerate() {
                    _mm512_storeu_ps(row(r), acc[0]);
                    _mm512_storeu_ps(row(r).add(16), acc[1]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1) from a 64-bit LCG, so failures reproduce.
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        };
        (0..len).map(|_| next()).collect()
    }

    /// How an operand is handed over: packed, row-major with padded rows, or transposed.
    #[derive(Clone, Copy, Debug)]
    enum Kind {
        Packed,
        RowMajor,
        Transposed,
    }

    /// Lays out row-major `rows x cols` `x` as `kind`: (data, rs, cs).
    fn layout(x: &[f32], rows: usize, cols: usize, kind: Kind) -> (Vec<f32>, usize, usize) {
        let (rs, cs) = match kind {
            Kind::Transposed => (1, rows + 2),
            _ => (cols + 3, 1),
        };
        let mut data = vec![f32::NAN; rows * rs + cols * cs];
        for (i, &v) in x.iter().enumerate() {
            data[i / cols * rs + i % cols * cs] = v;
        }
        (data, rs, cs)
    }

    #[derive(Clone, Copy, Debug)]
    struct Case {
        m: usize,
        n: usize,
        k: usize,
        lhs: Kind,
        rhs: Kind,
        acc: bool,
        bias: u8,
        threads: usize,
    }

    /// Runs one product and compares it with an f64 sum of the bf16-rounded inputs.
    ///
    /// Bound: each output is k products (exact in f32: 8-bit by 8-bit significands) plus the old
    /// value and the bias, summed in f32 in some order, so |got - exact| <= (k + 2) * u * S with
    /// u = 2^-24 and S the sum of the magnitudes of those terms (the recursive summation bound).
    fn check(backend: Backend, c: Case) {
        let Case { m, n, k, .. } = c;
        let a = values(m * k, (m * 31 + k) as u64);
        let b = values(k * n, (n * 17 + k) as u64);
        let (bias, dst_rs) = (values(m.max(n), 7), n + 5);
        let old = values(m * dst_rs, 3);
        let ((ad, ars, acs), (bd, brs, bcs)) = (layout(&a, m, k, c.lhs), layout(&b, k, n, c.rhs));
        let pa = PackedLhs::pack(m, k, &ad, ars, acs).unwrap();
        let pb = PackedRhs::pack(k, n, &bd, brs, bcs).unwrap();
        let lhs = match c.lhs {
            Kind::Packed => Lhs::Packed(&pa),
            _ => Lhs::Strided {
                data: &ad,
                rs: ars,
                cs: acs,
            },
        };
        let rhs = match c.rhs {
            Kind::Packed => Rhs::Packed(&pb),
            _ => Rhs::Strided {
                data: &bd,
                rs: brs,
                cs: bcs,
            },
        };
        let bias_arg = [
            Bias::None,
            Bias::PerRow(&bias[..m]),
            Bias::PerCol(&bias[..n]),
        ][c.bias as usize];
        let mut dst = if c.acc {
            old.clone()
        } else {
            vec![f32::NAN; m * dst_rs]
        };
        dst.chunks_mut(dst_rs).for_each(|row| row[n..].fill(-7.0));
        gemm_bf16_on(
            backend, m, n, k, lhs, rhs, &mut dst, dst_rs, c.acc, bias_arg, c.threads,
        )
        .unwrap();
        let round = |x: &f32| half::bf16::from_f32(*x).to_f64();
        let (ar, br): (Vec<f64>, Vec<f64>) =
            (a.iter().map(round).collect(), b.iter().map(round).collect());
        for i in 0..m {
            for j in 0..n {
                let old = if c.acc {
                    old[i * dst_rs + j] as f64
                } else {
                    0.0
                };
                let bias = [0.0, bias[i] as f64, bias[j] as f64][c.bias as usize];
                let (mut exact, mut mag) = (old + bias, old.abs() + bias.abs());
                for kk in 0..k {
                    let p = ar[i * k + kk] * br[kk * n + j];
                    (exact, mag) = (exact + p, mag + p.abs());
                }
                let bound = (k + 2) as f64 * 2f64.powi(-24) * mag;
                let got = dst[i * dst_rs + j] as f64;
                let ctx = format!("{} {c:?} at ({i}, {j})", backend.name());
                assert!(
                    (got - exact).abs() <= bound,
                    "{ctx}: got {got}, want {exact} +- {bound}"
                );
            }
            assert!(
                dst[i * dst_rs + n..][..5].iter().all(|&x| x == -7.0),
                "wrote past row {i}"
            );
        }
    }

    /// Every backend this machine has, so an AMX machine tests all three.
    fn backends() -> Vec<Backend> {
        let all = [Backend::Portable, Backend::Avx512Bf16, Backend::Amx];
        all.into_iter()
            .filter(|&b| b <= Backend::detect())
            .collect()
    }

    #[test]
    fn odd_shapes_all_variants_all_backends() {
        let dims = [1, 3, 15, 17, 31, 33, 100, 257];
        let kinds = [Kind::Packed, Kind::RowMajor, Kind::Transposed];
        let mut i = 0usize;
        for backend in backends() {
            for s in 0..dims.len().pow(3) {
                let (m, n, k) = (dims[s / 64], dims[s / 8 % 8], dims[s % 8]);
                // Rotate operand kinds, accumulate, bias and threads with co-prime periods, so
                // each option meets many shapes and the other options.
                let (lhs, rhs) = (kinds[i % 3], kinds[i / 3 % 3]);
                let (acc, bias, threads) = (i % 2 == 1, (i / 2 % 3) as u8, 1 + i / 5 % 2);
                check(
                    backend,
                    Case {
                        m,
                        n,
                        k,
                        lhs,
                        rhs,
                        acc,
                        bias,
                        threads,
                    },
                );
                i += 1;
            }
        }
    }

    #[test]
    fn several_blocks_and_threads() {
        // Spans several k passes (KC * 32), outer panels (OB) and inner blocks (IB).
        let (p, r, t) = (Kind::Packed, Kind::RowMajor, Kind::Transposed);
        for backend in backends() {
            let case = |m, n, k, lhs, rhs, acc, threads| Case {
                m,
                n,
                k,
                lhs,
                rhs,
                acc,
                bias: 1,
                threads,
            };
            check(backend, case(300, 600, 530, p, r, false, 2));
            check(backend, case(600, 100, 520, r, p, true, 2));
            check(backend, case(70, 530, 300, t, t, true, 3));
        }
    }

    #[test]
    fn k_zero_leaves_old_value_plus_bias() {
        for backend in backends() {
            for (acc, bias) in [(false, 1), (true, 2), (true, 0)] {
                let (lhs, rhs) = (Kind::RowMajor, Kind::Packed);
                check(
                    backend,
                    Case {
                        m: 5,
                        n: 40,
                        k: 0,
                        lhs,
                        rhs,
                        acc,
                        bias,
                        threads: 2,
                    },
                );
            }
        }
    }

    #[test]
    fn detects_a_backend() {
        let name = backend();
        assert!(["amx", "avx512bf16", "portable"].contains(&name), "{name}");
        println!("bf16 backend: {name}");
    }

    #[test]
    fn rounding_matches_half() {
        let mut xs = values(100_000, 11);
        xs.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
        ]);
        xs.extend([0x3f80_8000, 0x3f81_8000, 0x7f7f_ffff].map(f32::from_bits));
        for x in xs {
            assert_eq!(
                bf16_bits(x) as u16,
                half::bf16::from_f32(x).to_bits(),
                "{x:e}"
            );
        }
        for nan in [
            f32::NAN,
            f32::from_bits(0x7f80_0001),
            f32::from_bits(0xffff_ffff),
        ] {
            assert!(f32::from_bits(bf16_bits(nan) << 16).is_nan());
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let (a, mut dst) = (vec![0f32; 12], vec![0f32; 16]);
        let lhs = Lhs::Strided {
            data: &a,
            rs: 4,
            cs: 1,
        };
        let rhs = Rhs::Strided {
            data: &a,
            rs: 4,
            cs: 1,
        };
        assert!(gemm_bf16(3, 4, 4, lhs, rhs, &mut dst, 4, false, Bias::None, 1).is_err());
        assert!(gemm_bf16(3, 4, 3, lhs, rhs, &mut dst, 3, false, Bias::None, 1).is_err());
        assert!(gemm_bf16(
            3,
            4,
            3,
            lhs,
            rhs,
            &mut dst,
            4,
            false,
            Bias::PerRow(&a[..2]),
            1
        )
        .is_err());
        assert!(gemm_bf16(3, 4, 3, lhs, rhs, &mut dst[..11], 4, false, Bias::None, 1).is_err());
        assert!(gemm_bf16(3, 4, 3, lhs, rhs, &mut dst, 4, false, Bias::None, 1).is_ok());
        let p = PackedLhs::pack(3, 4, &a, 4, 1).unwrap();
        assert!(gemm_bf16(
            3,
            4,
            3,
            Lhs::Packed(&p),
            rhs,
            &mut dst,
            4,
            false,
            Bias::None,
            1
        )
        .is_err());
        assert!(PackedRhs::pack(4, 4, &a, 4, 1).is_err());
        assert_eq!((p.shape(), p.bytes()), ((3, 4), 32 * 32 * 2));
    }

    /// `cargo test --release -- --ignored --nocapture bench`: GFLOP/s, best of 10, per shape,
    /// backend and thread count. conv: packed weights x f32 im2col columns; lin: f32 tokens x
    /// packed W^T; attn: both f32.
    #[test]
    #[ignore]
    fn bench() {
        #[rustfmt::skip]
        let shapes = [
            ("conv 320x2880 n1024", 320, 1024, 2880), ("conv 640x5760 n1024", 640, 1024, 5760),
            ("conv 1280x11520 n256", 1280, 256, 11520), ("conv 128x1152 n4096", 128, 4096, 1152),
            ("conv 256x2304 n2048", 256, 2048, 2304), ("conv 512x4608 n1024", 512, 1024, 4608),
            ("conv1x1 320x320 n4096", 320, 4096, 320), ("lin 4096x320 -> 320", 4096, 320, 320),
            ("lin 4096x320 -> 2560", 4096, 2560, 320), ("lin 4096x1280 -> 320", 4096, 320, 1280),
            ("lin 1024x640 -> 5120", 1024, 5120, 640), ("lin 256x1280 -> 10240", 256, 10240, 1280),
            ("attn QK^T 4096x4096 d40", 4096, 4096, 40), ("attn PV 4096x40 k4096", 4096, 40, 4096),
        ];
        println!("backend detected: {}", backend());
        for (name, m, n, k) in shapes {
            let (a, b, mut dst) = (values(m * k, 1), values(k * n, 2), vec![0f32; m * n]);
            let (conv, lin) = (name.starts_with("conv"), name.starts_with("lin"));
            // A linear weight is W (n x k) row-major, i.e. W^T with strides (1, k); so is K^T.
            let (brs, bcs) = if lin || name.contains("QK") {
                (1, k)
            } else {
                (n, 1)
            };
            let (pa, pb) = (
                PackedLhs::pack(m, k, &a, k, 1).unwrap(),
                PackedRhs::pack(k, n, &b, brs, bcs).unwrap(),
            );
            let lhs = if conv {
                Lhs::Packed(&pa)
            } else {
                Lhs::Strided {
                    data: &a,
                    rs: k,
                    cs: 1,
                }
            };
            let rhs = if lin {
                Rhs::Packed(&pb)
            } else {
                Rhs::Strided {
                    data: &b,
                    rs: brs,
                    cs: bcs,
                }
            };
            let mut line = format!("{name:24}");
            for backend in backends().into_iter().rev() {
                for threads in [1, 2] {
                    let mut best = f64::MAX;
                    for _ in 0..if backend == Backend::Portable { 1 } else { 10 } {
                        let t = std::time::Instant::now();
                        gemm_bf16_on(
                            backend,
                            m,
                            n,
                            k,
                            lhs,
                            rhs,
                            &mut dst,
                            n,
                            false,
                            Bias::None,
                            threads,
                        )
                        .unwrap();
                        best = best.min(t.elapsed().as_secs_f64());
                    }
                    let gflops = 2.0 * (m * n * k) as f64 / best / 1e9;
                    line += &format!(" | {} {threads}t {gflops:6.1}", backend.name());
                }
            }
            println!("{line}");
        }
    }
}
