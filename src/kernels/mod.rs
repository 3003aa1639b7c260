//! CPU kernels for the operations where a Stable Diffusion step spends its time: convolution
//! (im2col in bounded chunks, or none for 1x1), matrix products with weights packed once at load,
//! attention without a full score matrix per head, fused group norm + SiLU, and the GEGLU gate.
//!
//! They work on plain `f32` slices; `model::layers` decides per call whether a tensor can take
//! this path (contiguous f32 on the CPU) and otherwise uses candle's own ops, so CUDA and Metal
//! keep candle's kernels. Every kernel has a test against a naive reference in its own file.
pub mod attention;
pub mod bf16;
pub mod conv;
pub mod elementwise;
pub mod matmul;
pub mod norm;
pub mod profile;
mod simd;

use std::sync::Arc;

use candle_core::{CpuStorage, DType, Device, Layout, Shape, Storage, Tensor};

use crate::Result;

/// f32 values in host memory: owned, or read in place from a shared byte buffer (a weight
/// file mapped into memory, so loading copies nothing).
pub enum HostF32 {
    Owned(Vec<f32>),
    Shared {
        bytes: Arc<dyn AsRef<[u8]> + Send + Sync>,
        offset: usize,
        len: usize,
    },
}

impl HostF32 {
    /// `len` little-endian f32 values at `offset` of `bytes`, when they lie inside it, are
    /// 4-byte aligned in memory and this machine is little-endian; else None.
    pub fn shared(
        bytes: Arc<dyn AsRef<[u8]> + Send + Sync>,
        offset: usize,
        len: usize,
    ) -> Option<Self> {
        let b = (*bytes).as_ref();
        let fits = offset
            .checked_add(len * 4)
            .is_some_and(|end| end <= b.len());
        let aligned = (b.as_ptr() as usize + offset).is_multiple_of(std::mem::align_of::<f32>());
        (fits && aligned && cfg!(target_endian = "little")).then_some(HostF32::Shared {
            bytes,
            offset,
            len,
        })
    }
}

impl std::ops::Deref for HostF32 {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            HostF32::Owned(v) => v,
            HostF32::Shared { bytes, offset, len } => {
                let b = &(**bytes).as_ref()[*offset..*offset + *len * 4];
                // SAFETY: `shared` checked that the range is inside the buffer and 4-byte
                // aligned; any bit pattern is a valid f32; the buffer is immutable and kept
                // alive by the Arc for as long as this borrow.
                unsafe { std::slice::from_raw_parts(b.as_ptr().cast::<f32>(), *len) }
            }
        }
    }
}

impl From<Vec<f32>> for HostF32 {
    fn from(v: Vec<f32>) -> Self {
        HostF32::Owned(v)
    }
}

impl std::fmt::Debug for HostF32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            HostF32::Owned(_) => "owned",
            HostF32::Shared { .. } => "mapped",
        };
        write!(f, "HostF32({} values, {kind})", self.len())
    }
}

/// Tells glibc's allocator to keep freed memory for reuse instead of returning large blocks
/// to the kernel: every layer allocates tens of MB of activations, and fresh pages cost a page
/// fault and zeroing each time (a third of the VAE decode's element-wise time). Called once by
/// the command-line program; a library user decides for their own process.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// Number of worker threads kernels may split work across (rayon's pool size, which follows
/// `RAYON_NUM_THREADS` like candle's own CPU ops).
pub fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// What the CPU kernels run on here, for benchmark records: the f32 GEMM's instruction set and
/// the bf16 backend.
pub fn describe() -> String {
    #[cfg(target_arch = "x86_64")]
    let f32_isa = if std::is_x86_feature_detected!("avx512f") {
        "avx512"
    } else if std::is_x86_feature_detected!("fma") {
        "avx2+fma"
    } else {
        "sse"
    };
    #[cfg(not(target_arch = "x86_64"))]
    let f32_isa = std::env::consts::ARCH;
    format!("f32 gemm {f32_isa}, bf16 {}", bf16::backend())
}

/// Whether `t` can use the CPU kernels: an f32 tensor on the CPU.
pub fn is_cpu_f32(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32
}

/// Runs `f` on the contiguous f32 data of a CPU tensor (made contiguous first if needed).
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let owned;
    let t = if t.is_contiguous() {
        t
    } else {
        owned = t.contiguous()?;
        &owned
    };
    let (storage, layout): (_, &Layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(data)) => {
            let start = layout.start_offset();
            f(&data[start..start + layout.shape().elem_count()])
        }
        _ => Err(crate::Error::InvalidInput(format!(
            "internal: CPU f32 kernel called on a {:?} tensor on {:?}",
            t.dtype(),
            t.device()
        ))),
    }
}

/// Wraps a vector as a CPU tensor of `shape` without copying.
pub fn tensor(data: Vec<f32>, shape: impl Into<Shape>) -> Result<Tensor> {
    Ok(Tensor::from_vec(data, shape.into(), &Device::Cpu)?)
}

/// Returns freed heap memory to the kernel (glibc's `malloc_trim`), e.g. after a model
/// component was dropped, so the next one does not stack on top of it in resident memory.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns unused heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}
