//! The LoRA deltas of one component's weight file, added to its tensors as they load
//! (`Weights::with_patches`).
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use super::file::LoraFile;
use crate::{Error, Result};

/// One layer of one LoRA file, with its multiplier.
#[derive(Clone)]
struct Delta {
    file: Arc<LoraFile>,
    layer: usize,
    multiplier: f64,
}

/// Deltas by tensor name, for the tensors of one weight file.
#[derive(Clone, Default)]
pub struct Patches {
    by_tensor: HashMap<String, Vec<Delta>>,
}

/// What a set of patches is, for comparing two sets without their data: (file, layer,
/// multiplier bits), sorted.
pub type Fingerprint = Vec<(PathBuf, usize, u64)>;

impl Patches {
    /// Adds layer `layer` of `file`, times `multiplier`, to the tensor it names.
    pub fn add(&mut self, file: &Arc<LoraFile>, layer: usize, multiplier: f64) {
        let tensor = file.layers()[layer].tensor.clone();
        self.by_tensor.entry(tensor).or_default().push(Delta {
            file: Arc::clone(file),
            layer,
            multiplier,
        });
    }

    /// True when no tensor is patched.
    pub fn is_empty(&self) -> bool {
        self.by_tensor.is_empty()
    }

    /// Whether tensor `name` has deltas.
    pub fn touches(&self, name: &str) -> bool {
        self.by_tensor.contains_key(name)
    }

    /// Adds the deltas of tensor `name` (of `shape`) to its base `values`, in f32 and in the
    /// order the LoRAs were given.
    pub fn apply(&self, name: &str, shape: &[usize], values: &mut [f32]) -> Result<()> {
        for d in self.by_tensor.get(name).into_iter().flatten() {
            let layer = &d.file.layers()[d.layer];
            if layer.shape != shape {
                return Err(Error::Lora {
                    path: d.file.path().to_path_buf(),
                    message: format!(
                        "internal error: the delta of `{name}` has shape {:?}, the tensor {shape:?}",
                        layer.shape
                    ),
                });
            }
            d.file.add_delta(d.layer, d.multiplier, values)?;
        }
        Ok(())
    }

    /// What these patches are, for [`Fingerprint`] comparisons.
    pub fn fingerprint(&self) -> Fingerprint {
        let mut f: Fingerprint = self
            .by_tensor
            .values()
            .flatten()
            .map(|d| (d.file.path().to_path_buf(), d.layer, d.multiplier.to_bits()))
            .collect();
        f.sort();
        f
    }
}
