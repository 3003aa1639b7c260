//! One LoRA file read and checked against a model: its layers paired (down, up, alpha), each
//! matched to the model tensor it changes with a shape that fits, and the delta
//! `alpha / rank * up @ down` of a layer computed on request.
//!
//! Formats: kohya / AUTOMATIC1111 (`lora_unet_*`, `lora_te_*`, `lora_te1_*`, `lora_te2_*` with
//! `lora_down.weight`, `lora_up.weight` and `alpha`; LoCon convolutions with a k x k down and
//! a 1 x 1 up), and diffusers / PEFT (`unet.*`, `text_encoder.*`, `text_encoder_2.*` with
//! `lora_A.weight` / `lora_B.weight`, alpha from a `.alpha` tensor or from the
//! `lora_adapter_metadata` that diffusers writes into the file's header, else the rank).
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::Device;

use super::names::{resolve, split_key, Component, ModuleIndex, Resolved, Role};
use crate::kernels::matmul::View;
use crate::model::Weights;
use crate::{Error, Result};

/// The safetensors metadata key under which diffusers stores the PEFT configs of the file's
/// components (`{"unet.lora_alpha": 8, "unet.alpha_pattern": {...}, ...}`).
const PEFT_METADATA: &str = "lora_adapter_metadata";

/// Names shown in an error before "and N more".
const SHOWN: usize = 4;

/// One layer of a LoRA: which model tensor it changes and how.
#[derive(Debug, Clone)]
pub struct Layer {
    /// The component whose file holds the tensor.
    pub component: Component,
    /// The tensor's name in that file (`....to_q.weight`).
    pub tensor: String,
    /// The tensor's shape.
    pub shape: Vec<usize>,
    down: String,
    up: String,
    rank: usize,
    /// alpha / rank.
    scale: f64,
}

/// A LoRA file, checked against one model.
pub struct LoraFile {
    path: PathBuf,
    weights: Weights,
    layers: Vec<Layer>,
}

fn err(path: &Path, message: impl Into<String>) -> Error {
    Error::Lora {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// `a, b, c, d and 3 more`.
fn some_of<T: std::fmt::Display>(items: &[T]) -> String {
    let mut s = items
        .iter()
        .take(SHOWN)
        .map(|i| format!("`{i}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > SHOWN {
        s.push_str(&format!(" and {} more", items.len() - SHOWN));
    }
    s
}

/// The tensors of one LoRA module.
#[derive(Default)]
struct Parts<'a> {
    down: Option<&'a str>,
    up: Option<&'a str>,
    alpha: Option<&'a str>,
}

impl LoraFile {
    /// Reads the LoRA at `path` and matches every layer to a tensor of the model whose
    /// components' modules are `indexes`. A file that is not safetensors, has keys of kinds
    /// not supported (listed), or layers that match nothing or do not fit (a LoRA for another
    /// model family) is an error naming the file.
    pub fn open(path: &Path, indexes: &[(Component, ModuleIndex)]) -> Result<Self> {
        let weights = Weights::open(path, &Device::Cpu, candle_core::DType::F32)?;
        let mut modules: HashMap<&str, Parts> = HashMap::new();
        let mut unknown = BTreeSet::new();
        for (key, _) in weights.tensors() {
            match split_key(key) {
                Ok((module, role)) => {
                    let parts = modules.entry(module).or_default();
                    let slot = match role {
                        Role::Down => &mut parts.down,
                        Role::Up => &mut parts.up,
                        Role::Alpha => &mut parts.alpha,
                    };
                    *slot = Some(key);
                }
                Err(kind) => {
                    unknown.insert(kind);
                }
            }
        }
        if !unknown.is_empty() {
            let kinds: Vec<String> = unknown.into_iter().collect();
            return Err(err(
                path,
                format!(
                    "keys of kinds latent does not read: {} (LoRA layers are read from \
                     lora_down/lora_up or lora_A/lora_B with alpha; LyCORIS LoHa, LoKr, \
                     Tucker and DoRA files are not supported)",
                    some_of(&kinds)
                ),
            ));
        }
        if modules.is_empty() {
            return Err(err(path, "holds no LoRA layers"));
        }
        let peft = PeftAlphas::read(path, &weights)?;
        let mut names: Vec<&str> = modules.keys().copied().collect();
        names.sort_unstable();
        let mut layers = Vec::new();
        let mut unmatched = Vec::new();
        let mut misfits = Vec::new();
        for module in names {
            let parts = &modules[module];
            let (Some(down), Some(up)) = (parts.down, parts.up) else {
                let has = if parts.down.is_some() {
                    "a down weight but no up weight"
                } else if parts.up.is_some() {
                    "an up weight but no down weight"
                } else {
                    "an alpha but no weights"
                };
                return Err(err(path, format!("layer `{module}` has {has}")));
            };
            let (component, target, shape) = match resolve(module, indexes) {
                Resolved::Found {
                    component,
                    module,
                    shape,
                } => (component, module, shape),
                Resolved::NoComponent(c) => {
                    return Err(err(
                        path,
                        format!(
                            "has layers for a text encoder this model lacks ({c}, e.g. \
                             `{module}`): a LoRA for another model family (SDXL has two text \
                             encoders, SD 1.x/2.x one)"
                        ),
                    ))
                }
                Resolved::UnknownPrefix | Resolved::NoModule(_) => {
                    unmatched.push(module);
                    continue;
                }
            };
            let down_shape = weights.shape_of(down).unwrap_or(&[]).to_vec();
            let up_shape = weights.shape_of(up).unwrap_or(&[]).to_vec();
            let Some(rank) = fits(shape, &down_shape, &up_shape) else {
                misfits.push(format!(
                    "{module} (down {down_shape:?}, up {up_shape:?}) on {component} tensor \
                     {target}.weight {shape:?}"
                ));
                continue;
            };
            let alpha = match parts.alpha {
                Some(key) => scalar(path, &weights, key)?,
                None => peft.alpha(component, target).unwrap_or(rank as f64),
            };
            layers.push(Layer {
                component,
                tensor: format!("{target}.weight"),
                shape: shape.to_vec(),
                down: down.to_string(),
                up: up.to_string(),
                rank,
                scale: alpha / rank as f64,
            });
        }
        if !misfits.is_empty() {
            return Err(err(
                path,
                format!(
                    "{} layer(s) do not fit this model's tensors: {}; a LoRA for another model \
                     family?",
                    misfits.len(),
                    some_of(&misfits)
                ),
            ));
        }
        if layers.is_empty() {
            let examples = some_of(&unmatched);
            return Err(err(
                path,
                format!(
                    "no layer matches this model ({} layer(s), e.g. {examples}): a LoRA for \
                     another model family?",
                    unmatched.len()
                ),
            ));
        }
        if !unmatched.is_empty() {
            return Err(err(
                path,
                format!(
                    "{} of {} layers match no tensor of this model: {}; a LoRA for another model \
                     family?",
                    unmatched.len(),
                    unmatched.len() + layers.len(),
                    some_of(&unmatched)
                ),
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
            weights,
            layers,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its layers, each matched to a model tensor.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// Adds `multiplier * alpha / rank * up @ down` of layer `i` to `values`, the layer's
    /// tensor laid out (out, in[, kh, kw]), in f32 (the scale is applied to `up`, the smaller
    /// factor, and the product accumulates in place).
    pub fn add_delta(&self, i: usize, multiplier: f64, values: &mut [f32]) -> Result<()> {
        let layer = &self.layers[i];
        let out = layer.shape[0];
        let n: usize = layer.shape[1..].iter().product();
        if values.len() != out * n {
            return Err(err(
                &self.path,
                format!(
                    "internal error: `{}` has {} values, its delta {}",
                    layer.tensor,
                    values.len(),
                    out * n
                ),
            ));
        }
        let up_shape = self.weights.shape_of(&layer.up).unwrap_or(&[]).to_vec();
        let down_shape = self.weights.shape_of(&layer.down).unwrap_or(&[]).to_vec();
        let scale = (multiplier * layer.scale) as f32;
        let up: Vec<f32> = self
            .weights
            .get_host(&up_shape, &layer.up)?
            .into_iter()
            .map(|v| v * scale)
            .collect();
        let down = self.weights.get_host(&down_shape, &layer.down)?;
        crate::kernels::matmul::gemm_f32(
            out,
            n,
            layer.rank,
            View::rows(&up, layer.rank),
            View::rows(&down, n),
            values,
            n,
            true,
            crate::kernels::threads(),
        );
        Ok(())
    }
}

/// The rank when a down weight of `down` and an up weight of `up` fit a tensor of `shape`:
/// up (out, rank[, 1, 1]), down (rank, in[, kh, kw]) with the tensor's own kernel; a 1 x 1
/// convolution and a linear layer take each other's 2-D and 1 x 1 forms.
fn fits(shape: &[usize], down: &[usize], up: &[usize]) -> Option<usize> {
    let (&out, rest) = shape.split_first()?;
    let (&rank, down_rest) = down.split_first()?;
    let up_ok = match up {
        [o, r] | [o, r, 1, 1] => *o == out && *r == rank,
        _ => false,
    };
    let down_ok = down_rest == rest
        || match (rest, down_rest) {
            ([i, 1, 1], [j]) | ([i], [j, 1, 1]) => i == j,
            _ => false,
        };
    (up_ok && down_ok && rank > 0).then_some(rank)
}

/// The value of a scalar tensor (an `alpha`).
fn scalar(path: &Path, weights: &Weights, key: &str) -> Result<f64> {
    let shape = weights.shape_of(key).unwrap_or(&[]).to_vec();
    let values = weights.get_host(&shape, key)?;
    match values.as_slice() {
        [v] if v.is_finite() => Ok(*v as f64),
        _ => Err(err(
            path,
            format!("`{key}` should be one finite number, found shape {shape:?}"),
        )),
    }
}

/// One component's PEFT config: its `lora_alpha` and its `alpha_pattern` entries.
#[derive(Default)]
struct PeftConfig {
    alpha: Option<f64>,
    patterns: Vec<(String, f64)>,
}

/// The alphas of a diffusers / PEFT file, from its `lora_adapter_metadata`.
#[derive(Default)]
struct PeftAlphas {
    /// Per component prefix (`unet`, `text_encoder`, ...).
    configs: HashMap<String, PeftConfig>,
}

impl PeftAlphas {
    fn read(path: &Path, weights: &Weights) -> Result<Self> {
        let Some(text) = weights.metadata(PEFT_METADATA) else {
            return Ok(Self::default());
        };
        let json: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| err(path, format!("`{PEFT_METADATA}` is not JSON: {e}")))?;
        let mut configs: HashMap<String, PeftConfig> = HashMap::new();
        for (key, value) in json.as_object().into_iter().flatten() {
            let Some((component, field)) = key.rsplit_once('.') else {
                continue;
            };
            let entry = configs.entry(component.to_string()).or_default();
            match field {
                "lora_alpha" => entry.alpha = value.as_f64(),
                "alpha_pattern" => {
                    for (pattern, alpha) in value.as_object().into_iter().flatten() {
                        if let Some(a) = alpha.as_f64() {
                            entry.patterns.push((pattern.clone(), a));
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(Self { configs })
    }

    /// The alpha PEFT gives `module` of `component`: the longest matching pattern's, else the
    /// component's `lora_alpha`.
    fn alpha(&self, component: Component, module: &str) -> Option<f64> {
        let config = self.configs.get(&component.to_string())?;
        config
            .patterns
            .iter()
            .filter(|(p, _)| module == p || module.ends_with(&format!(".{p}")))
            .max_by_key(|(p, _)| p.len())
            .map(|(_, a)| *a)
            .or(config.alpha)
    }
}

#[cfg(test)]
mod tests {
    use super::{fits, Component, PeftAlphas, PeftConfig};

    #[test]
    fn peft_alphas_take_the_longest_matching_pattern_else_the_default() {
        let mut alphas = PeftAlphas::default();
        alphas.configs.insert(
            "unet".into(),
            PeftConfig {
                alpha: Some(8.0),
                patterns: vec![("to_k".into(), 2.0), ("attn2.to_k".into(), 16.0)],
            },
        );
        let unet = |m: &str| alphas.alpha(Component::UNet, m);
        assert_eq!(
            unet("mid_block.attentions.0.transformer_blocks.0.attn1.to_k"),
            Some(2.0)
        );
        assert_eq!(
            unet("mid_block.attentions.0.transformer_blocks.0.attn2.to_k"),
            Some(16.0)
        );
        assert_eq!(
            unet("mid_block.attentions.0.transformer_blocks.0.attn2.to_kv"),
            Some(8.0)
        );
        assert_eq!(alphas.alpha(Component::TextEncoder(0), "x"), None);
    }

    #[test]
    fn shapes_that_fit() {
        assert_eq!(fits(&[64, 32], &[4, 32], &[64, 4]), Some(4));
        // LoCon: 3x3 down, 1x1 up.
        assert_eq!(
            fits(&[64, 32, 3, 3], &[4, 32, 3, 3], &[64, 4, 1, 1]),
            Some(4)
        );
        // Linear and 1x1 convolution forms of proj_in / proj_out.
        assert_eq!(fits(&[64, 64, 1, 1], &[8, 64], &[64, 8]), Some(8));
        assert_eq!(fits(&[64, 64], &[8, 64, 1, 1], &[64, 8, 1, 1]), Some(8));
        // Another family's widths, a rank mismatch, a kernel mismatch.
        assert_eq!(fits(&[64, 32], &[4, 48], &[64, 4]), None);
        assert_eq!(fits(&[64, 32], &[4, 32], &[64, 8]), None);
        assert_eq!(fits(&[64, 32, 3, 3], &[4, 32, 1, 1], &[64, 4, 1, 1]), None);
        assert_eq!(fits(&[64, 32], &[4, 32], &[64, 4, 3, 3]), None);
    }
}
