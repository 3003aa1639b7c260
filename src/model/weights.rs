//! Safetensors weight files: memory-mapped, looked up by dotted name, checked against the
//! shape the architecture expects, with errors that name the file and the tensor.
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorInfo};

use crate::{Error, Result};

/// File extensions of PyTorch pickle checkpoints, which we refuse to load (they can run code).
const PICKLE_EXTENSIONS: &[&str] = &["bin", "ckpt", "pt", "pth", "pkl"];

struct WeightsFile {
    path: PathBuf,
    /// The open file, for reading f32 tensors straight into host memory.
    handle: std::fs::File,
    mmap: memmap2::Mmap,
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
    /// The header's `__metadata__` strings.
    metadata: HashMap<String, String>,
    /// Tensors stored transposed (a part of a single-file checkpoint, see [`FilePart`]).
    transposed: HashSet<String>,
}

/// Where a component's tensors are: a file of its own (a diffusers folder's), or its part of
/// a single-file checkpoint.
#[derive(Debug, Clone)]
pub struct WeightsPath {
    /// The file.
    pub path: PathBuf,
    /// The component's tensors inside it, under the names its loader reads; `None`: every
    /// tensor of the file, as named there.
    pub part: Option<Arc<FilePart>>,
}

impl From<PathBuf> for WeightsPath {
    fn from(path: PathBuf) -> Self {
        Self { path, part: None }
    }
}

/// How a tensor of a single-file checkpoint becomes one a loader reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reshape {
    /// As stored.
    Same,
    /// Rows `index` of `count` equal blocks along the first axis (one of a fused q/k/v).
    Rows { index: usize, count: usize },
    /// A 1x1 convolution's kernel read as a linear layer's matrix (trailing 1s dropped).
    Squeeze,
    /// A matrix stored transposed (`x @ P` in the file, a linear layer's weight here).
    Transpose,
}

/// A component's tensors inside a single-file checkpoint: header entries under the names its
/// loader reads, each a view of the bytes in the file (nothing copied at load, except the
/// rare transposed matrix).
#[derive(Debug, Default)]
pub struct FilePart {
    pub(crate) tensors: HashMap<String, TensorInfo>,
    transposed: HashSet<String>,
}

impl FilePart {
    /// The part described by `(name here, name in the file, reshape)` over the file's header
    /// entries; a name not in the header, or a reshape its shape does not allow, is an error
    /// naming the file.
    pub fn build(
        path: &Path,
        header: &HashMap<String, TensorInfo>,
        names: &[(String, String, Reshape)],
    ) -> Result<Self> {
        let mut part = Self::default();
        for (name, source, reshape) in names {
            let info = header.get(source).ok_or_else(|| Error::MissingTensor {
                path: path.to_path_buf(),
                name: source.clone(),
            })?;
            let bad = |why: &str| Error::Weights {
                path: path.to_path_buf(),
                message: format!("tensor `{source}` of shape {:?} {why}", info.shape),
            };
            let mut view = info.clone();
            match *reshape {
                Reshape::Same => {}
                Reshape::Rows { index, count } => {
                    let rows = info.shape.first().copied().unwrap_or(0);
                    if rows == 0 || rows % count != 0 {
                        return Err(bad(&format!("cannot be split in {count} along its rows")));
                    }
                    let (start, end) = info.data_offsets;
                    let size = (end - start) / count;
                    view.data_offsets = (start + index * size, start + (index + 1) * size);
                    view.shape[0] = rows / count;
                }
                Reshape::Squeeze => {
                    if info.shape.len() != 4 || info.shape[2..] != [1, 1] {
                        return Err(bad("is not a 1x1 convolution"));
                    }
                    view.shape.truncate(2);
                }
                Reshape::Transpose => {
                    if info.shape.len() != 2 {
                        return Err(bad("is not a matrix"));
                    }
                    view.shape.reverse();
                    part.transposed.insert(name.clone());
                }
            }
            part.tensors.insert(name.clone(), view);
        }
        Ok(part)
    }

    /// Number of parameters of the part.
    pub fn parameter_count(&self) -> u64 {
        self.tensors
            .values()
            .map(|i| i.shape.iter().map(|&d| d as u64).product::<u64>())
            .sum()
    }
}

/// The header of the safetensors file at `path`: its tensors and `__metadata__` (nothing is
/// loaded).
pub fn read_header(path: &Path) -> Result<(HashMap<String, TensorInfo>, HashMap<String, String>)> {
    let w = Weights::open(path, &Device::Cpu, DType::F32)?;
    Ok((w.file.tensors.clone(), w.file.metadata.clone()))
}

impl AsRef<[u8]> for WeightsFile {
    fn as_ref(&self) -> &[u8] {
        &self.mmap
    }
}

/// A view into one safetensors file under a name prefix (like candle's `VarBuilder`), that
/// loads tensors onto a device in a chosen dtype.
#[derive(Clone)]
pub struct Weights {
    file: Arc<WeightsFile>,
    prefix: String,
    device: Device,
    dtype: DType,
    /// LoRA deltas added to some of the file's tensors as they load (see [`Self::with_patches`]).
    patches: Option<Arc<crate::lora::Patches>>,
}

/// Asks for transparent huge pages under a large, not yet touched buffer: loading then takes
/// 2 MB page faults instead of 4 KB ones, and the products that stream the weights miss the TLB
/// less. Only a hint; ignored where unsupported.
fn advise_huge_pages(buf: &mut [f32]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        const PAGE: usize = 4096;
        let start = buf.as_mut_ptr() as usize;
        let end = start + buf.len() * 4;
        let lo = start.div_ceil(PAGE) * PAGE;
        let hi = end / PAGE * PAGE;
        if hi > lo && hi - lo >= HUGE {
            // SAFETY: the range lies inside `buf`'s allocation and MADV_HUGEPAGE changes only how
            // the kernel backs it, never its contents.
            unsafe { libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

/// Number of parameters stored in the safetensors file at `path`, read from its header only
/// (nothing is loaded): what the memory estimate counts for a component's weights.
pub fn parameter_count(weights: &WeightsPath) -> Result<u64> {
    if let Some(part) = &weights.part {
        return Ok(part.parameter_count());
    }
    let path = weights.path.as_path();
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: read-only map, only the header is read (see `Weights::open`).
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let (_, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| Error::Weights {
        path: path.to_path_buf(),
        message: format!("not a valid safetensors file ({e}); is it truncated?"),
    })?;
    Ok(metadata
        .tensors()
        .values()
        .map(|info| info.shape.iter().map(|&d| d as u64).product::<u64>())
        .sum())
}

impl Weights {
    /// Memory-maps `path` and reads its header. Pickle checkpoints, truncated files and
    /// malformed headers are refused with an error naming the file.
    pub fn open(path: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        if PICKLE_EXTENSIONS.contains(&ext.as_str()) {
            return Err(Error::Weights {
                path: path.to_path_buf(),
                message: "PyTorch pickle checkpoints are not supported (they can execute code); \
                          convert the model to .safetensors"
                    .into(),
            });
        }
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; a file truncated underneath us while mapped is the one
        // case memmap cannot guard against, and the same holds for every mmap-based loader.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|e| Error::Weights {
                path: path.to_path_buf(),
                message: format!("not a valid safetensors file ({e}); is it truncated?"),
            })?;
        let data_start = 8 + header_len;
        let tensors: HashMap<String, TensorInfo> = metadata
            .tensors()
            .into_iter()
            .map(|(k, v)| (k, v.clone()))
            .collect();
        let data_len = mmap.len().saturating_sub(data_start);
        if let Some((name, info)) = tensors.iter().find(|(_, i)| i.data_offsets.1 > data_len) {
            return Err(Error::Weights {
                path: path.to_path_buf(),
                message: format!(
                    "file is truncated: tensor `{name}` ends at byte {} of a {data_len}-byte data section",
                    info.data_offsets.1
                ),
            });
        }
        let metadata = metadata.metadata().clone().unwrap_or_default();
        Ok(Self {
            file: Arc::new(WeightsFile {
                path: path.to_path_buf(),
                handle: file,
                mmap,
                data_start,
                tensors,
                metadata,
                transposed: HashSet::new(),
            }),
            prefix: String::new(),
            device: device.clone(),
            dtype,
            patches: None,
        })
    }

    /// Opens a component's weights: a whole file, or its part of a single-file checkpoint
    /// (then only the part's tensors are seen, under the names its loader reads).
    pub fn open_at(weights: &WeightsPath, device: &Device, dtype: DType) -> Result<Self> {
        let mut w = Self::open(&weights.path, device, dtype)?;
        if let Some(part) = &weights.part {
            let file = Arc::get_mut(&mut w.file).expect("a file just opened has one owner");
            file.tensors = part.tensors.clone();
            file.transposed = part.transposed.clone();
        }
        Ok(w)
    }

    /// A view whose names are prefixed by `name.` (diffusers module paths).
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Self {
            prefix,
            ..self.clone()
        }
    }

    /// The same file, loading in another dtype.
    pub fn with_dtype(&self, dtype: DType) -> Self {
        Self {
            dtype,
            ..self.clone()
        }
    }

    /// The same file, with `patches` added to the tensors they name whenever those load
    /// (`get`, `get_host`, `get_mapped`): base weight and delta are summed in f32, then
    /// converted to the view's dtype. The base values always come from the file, so changing
    /// the patches and loading again never accumulates rounding.
    pub fn with_patches(&self, patches: Option<Arc<crate::lora::Patches>>) -> Self {
        Self {
            patches,
            ..self.clone()
        }
    }

    /// Every tensor of the file (whatever the prefix) with its shape.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.file
            .tensors
            .iter()
            .map(|(name, info)| (name.as_str(), info.shape.as_slice()))
    }

    /// The shape of tensor `name` (under the prefix), if the file has it.
    pub fn shape_of(&self, name: &str) -> Option<&[usize]> {
        self.file
            .tensors
            .get(&self.full_name(name))
            .map(|i| i.shape.as_slice())
    }

    /// The header's `__metadata__` entry `key`.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.file.metadata.get(key).map(String::as_str)
    }

    /// The values of tensor `full` with its patches added, when it has any.
    fn patched(&self, full: &str, info: &TensorInfo) -> Result<Option<Vec<f32>>> {
        let Some(patches) = self.patches.as_ref().filter(|p| p.touches(full)) else {
            return Ok(None);
        };
        let mut values = self.host_values(full, info)?;
        patches.apply(full, &info.shape, &mut values)?;
        Ok(Some(values))
    }

    fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Path of the underlying file.
    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// Device tensors are loaded onto.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Dtype tensors are converted to.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Whether a tensor named `name` (under the prefix) exists.
    pub fn contains(&self, name: &str) -> bool {
        self.file.tensors.contains_key(&self.full_name(name))
    }

    /// Loads tensor `name`, checking that its shape is `shape`.
    pub fn get(&self, shape: &[usize], name: &str) -> Result<Tensor> {
        let (full, info) = self.shaped(shape, name)?;
        if let Some(values) = self.patched(&full, info)? {
            let t = Tensor::from_vec(values, shape, &Device::Cpu)?;
            return Ok(t.to_dtype(self.dtype)?.to_device(&self.device)?);
        }
        self.load(&full, info)
    }

    /// Tensor `name` (of shape `shape`) as f32 values for the CPU kernels, read in place from
    /// the mapped file when it is stored as aligned little-endian f32 (nothing copied; its pages
    /// are faulted in now so that loading, not the first step, pays for reading them), else
    /// converted into host memory like [`Self::get_host`].
    pub fn get_mapped(&self, shape: &[usize], name: &str) -> Result<crate::kernels::HostF32> {
        let (full, info) = self.shaped(shape, name)?;
        if let Some(values) = self.patched(&full, info)? {
            return Ok(values.into());
        }
        let (dtype, bytes) = self.raw(&full, info)?;
        if dtype == DType::F32 && !self.file.transposed.contains(&full) {
            let offset = self.file.data_start + info.data_offsets.0;
            let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = self.file.clone();
            if let Some(host) = crate::kernels::HostF32::shared(owner, offset, bytes.len() / 4) {
                self.populate(offset, bytes.len());
                return Ok(host);
            }
        }
        Ok(self.get_host(shape, name)?.into())
    }

    /// Faults in the mapped pages of a byte range.
    fn populate(&self, offset: usize, len: usize) {
        #[cfg(target_os = "linux")]
        if self
            .file
            .mmap
            .advise_range(
                memmap2::Advice::PopulateRead,
                offset / 4096 * 4096,
                len + offset % 4096,
            )
            .is_ok()
        {
            return;
        }
        let bytes = &self.file.mmap[offset..offset + len];
        let mut sum = 0u8;
        for page in bytes.chunks(4096) {
            sum = sum.wrapping_add(page[0]);
        }
        std::hint::black_box(sum);
    }

    /// Loads tensor `name`, checking that its shape is `shape`, as f32 values in host memory
    /// (converted from the file's dtype in one pass), for the CPU kernels.
    pub fn get_host(&self, shape: &[usize], name: &str) -> Result<Vec<f32>> {
        let (full, info) = self.shaped(shape, name)?;
        if let Some(values) = self.patched(&full, info)? {
            return Ok(values);
        }
        self.host_values(&full, info)
    }

    /// The values of tensor `full` as f32 in host memory, without patches.
    fn host_values(&self, full: &str, info: &TensorInfo) -> Result<Vec<f32>> {
        let values = self.stored_values(full, info)?;
        if !self.file.transposed.contains(full) {
            return Ok(values);
        }
        // Stored as (cols, rows): read it back as (rows, cols).
        let (rows, cols) = (info.shape[0], info.shape[1]);
        let mut out = vec![0f32; values.len()];
        for (c, row) in values.chunks_exact(rows).enumerate() {
            for (r, &v) in row.iter().enumerate() {
                out[r * cols + c] = v;
            }
        }
        Ok(out)
    }

    /// The values of tensor `full` as f32 in host memory, in the file's order.
    fn stored_values(&self, full: &str, info: &TensorInfo) -> Result<Vec<f32>> {
        let (dtype, bytes) = self.raw(full, info)?;
        #[cfg(all(unix, target_endian = "little"))]
        if dtype == DType::F32 {
            // One copy by the kernel from the page cache into our buffer: no page faults on the
            // map and nothing of the file left in this process's resident memory.
            use std::os::unix::fs::FileExt;
            let mut values = vec![0f32; bytes.len() / 4];
            advise_huge_pages(&mut values);
            // SAFETY: any byte pattern is a valid f32, and the byte view covers exactly the
            // vector's initialised storage.
            let buf = unsafe {
                std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), values.len() * 4)
            };
            let offset = (self.file.data_start + info.data_offsets.0) as u64;
            self.file
                .handle
                .read_exact_at(buf, offset)
                .map_err(|e| Error::io(&self.file.path, e))?;
            return Ok(values);
        }
        let values = match dtype {
            DType::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            DType::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            DType::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            _ => bytes
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("8-byte chunk")) as f32)
                .collect(),
        };
        self.release(info.data_offsets);
        Ok(values)
    }

    /// Drops the mapped pages of a tensor that has been copied out from this process's resident
    /// memory (they stay in the page cache), so loading does not hold the file and the copy at
    /// once.
    fn release(&self, (start, end): (usize, usize)) {
        #[cfg(unix)]
        {
            const PAGE: usize = 4096;
            let lo = (self.file.data_start + start).div_ceil(PAGE) * PAGE;
            let hi = (self.file.data_start + end) / PAGE * PAGE;
            if hi > lo {
                // SAFETY: the map is a read-only shared file mapping, so MADV_DONTNEED only
                // makes later reads fetch the same bytes from the file again; no reference into
                // this range outlives the copy made just before.
                let _ = unsafe {
                    self.file.mmap.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        lo,
                        hi - lo,
                    )
                };
            }
        }
        #[cfg(not(unix))]
        let _ = (start, end);
    }

    /// Loads tensor `name` whatever its shape.
    pub fn get_any_shape(&self, name: &str) -> Result<Tensor> {
        let full = self.full_name(name);
        let info = self.info(&full)?;
        if let Some(values) = self.patched(&full, info)? {
            let t = Tensor::from_vec(values, info.shape.as_slice(), &Device::Cpu)?;
            return Ok(t.to_dtype(self.dtype)?.to_device(&self.device)?);
        }
        self.load(&full, info)
    }

    /// The full name and header entry of tensor `name`, checked to have shape `shape`.
    fn shaped(&self, shape: &[usize], name: &str) -> Result<(String, &TensorInfo)> {
        let full = self.full_name(name);
        let info = self.info(&full)?;
        if info.shape != shape {
            return Err(Error::TensorShape {
                path: self.file.path.clone(),
                name: full,
                expected: shape.to_vec(),
                found: info.shape.clone(),
            });
        }
        Ok((full, info))
    }

    fn info(&self, full: &str) -> Result<&TensorInfo> {
        self.file
            .tensors
            .get(full)
            .ok_or_else(|| Error::MissingTensor {
                path: self.file.path.clone(),
                name: full.to_string(),
            })
    }

    fn load(&self, full: &str, info: &TensorInfo) -> Result<Tensor> {
        let (dtype, bytes) = self.raw(full, info)?;
        let t = if self.file.transposed.contains(full) {
            let stored = [info.shape[1], info.shape[0]];
            Tensor::from_raw_buffer(bytes, dtype, &stored, &Device::Cpu)?
                .t()?
                .contiguous()?
        } else {
            Tensor::from_raw_buffer(bytes, dtype, &info.shape, &Device::Cpu)?
        };
        Ok(t.to_dtype(self.dtype)?.to_device(&self.device)?)
    }

    /// The dtype and bytes of a tensor in the file, checked against its shape.
    fn raw(&self, full: &str, info: &TensorInfo) -> Result<(DType, &[u8])> {
        let dtype = match info.dtype {
            StDtype::F32 => DType::F32,
            StDtype::F16 => DType::F16,
            StDtype::BF16 => DType::BF16,
            StDtype::F64 => DType::F64,
            other => {
                return Err(Error::Weights {
                    path: self.file.path.clone(),
                    message: format!("tensor `{full}` has unsupported dtype {other:?}"),
                })
            }
        };
        let (start, end) = info.data_offsets;
        let bytes = &self.file.mmap[self.file.data_start + start..self.file.data_start + end];
        let expected = info.shape.iter().product::<usize>() * dtype.size_in_bytes();
        if bytes.len() != expected {
            return Err(Error::Weights {
                path: self.file.path.clone(),
                message: format!(
                    "tensor `{full}` holds {} bytes, its shape {:?} needs {expected}",
                    bytes.len(),
                    info.shape
                ),
            });
        }
        Ok((dtype, bytes))
    }
}
