//! Textual inversion: embeddings whose file name, written in a prompt, stands for learned token
//! vectors. Reads AUTOMATIC1111's `.safetensors` embeddings (`emb_params`; SDXL's `clip_l` and
//! `clip_g`) and diffusers' `learned_embeds.safetensors` (one tensor under its token); the
//! name is the file's stem either way, as in AUTOMATIC1111. Pickle files (`.pt`, `.bin`) are
//! refused.
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result, Setting};

/// One embedding: its name and, per text encoder of the model, its vectors (n, hidden).
#[derive(Debug, Clone)]
pub struct Embedding {
    pub name: String,
    pub path: PathBuf,
    /// Per text encoder: (n, hidden) f32, or `None` when the file has none for that encoder.
    pub vectors: Vec<Option<Tensor>>,
}

impl Embedding {
    /// Vectors per use (the token slots it takes).
    pub fn len(&self) -> usize {
        self.vectors
            .iter()
            .flatten()
            .next()
            .map_or(0, |t| t.dims()[0])
    }

    /// True when the embedding has no vectors.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::setting(Setting::Embeddings, path.display(), reason.into())
}

/// Reads the embedding in `path` for a model whose text encoders have `hidden` sizes (one
/// per encoder, in the model's order: SDXL's CLIP-L then CLIP-G).
pub fn load_file(path: &Path, hidden: &[usize]) -> Result<Embedding> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext != "safetensors" {
        return Err(bad(
            path,
            "only .safetensors embeddings are read (.pt and .bin are pickle files that can run \
             code; convert them with safetensors' convert tools)",
        ));
    }
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| bad(path, "the file name is not UTF-8"))?
        .to_string();
    let map = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| bad(path, format!("cannot read: {e}")))?;
    let as_vectors = |t: &Tensor| -> Result<Tensor> {
        let t = t.to_dtype(DType::F32)?;
        match t.rank() {
            1 => Ok(t.unsqueeze(0)?),
            2 => Ok(t),
            _ => Err(bad(path, format!("a tensor of shape {:?}", t.dims()))),
        }
    };
    let vectors: Vec<Option<Tensor>> = if map.contains_key("clip_l") || map.contains_key("clip_g") {
        // SDXL: CLIP-L for the first encoder, CLIP-G for the second.
        ["clip_l", "clip_g"]
            .iter()
            .take(hidden.len())
            .map(|k| map.get(*k).map(as_vectors).transpose())
            .collect::<Result<_>>()?
    } else {
        let t = match (map.get("emb_params"), map.len()) {
            (Some(t), _) => t,
            (None, 1) => map.values().next().ok_or_else(|| bad(path, "no tensor"))?,
            (None, n) => {
                return Err(bad(
                    path,
                    format!("{n} tensors and none named emb_params, clip_l or clip_g"),
                ))
            }
        };
        let t = as_vectors(t)?;
        let dim = t.dims()[1];
        hidden
            .iter()
            .map(|&h| (h == dim).then(|| t.clone()))
            .collect()
    };
    let widths: Vec<usize> = vectors.iter().flatten().map(|t| t.dims()[1]).collect();
    let fits = vectors
        .iter()
        .zip(hidden)
        .all(|(v, &h)| v.as_ref().is_none_or(|t| t.dims()[1] == h));
    if widths.is_empty() || !fits {
        return Err(bad(
            path,
            format!(
                "vectors of width {widths:?} do not fit this model's text encoders \
                 (width {hidden:?}): an embedding for another model family"
            ),
        ));
    }
    let counts: Vec<usize> = vectors.iter().flatten().map(|t| t.dims()[0]).collect();
    if counts.iter().any(|&n| n == 0 || n > 75 || n != counts[0]) {
        return Err(bad(path, format!("{counts:?} vectors: expected 1 to 75")));
    }
    Ok(Embedding {
        name,
        path: path.to_path_buf(),
        vectors,
    })
}

/// Every `.safetensors` embedding in `dir` (not in subfolders), sorted by name. Files that are
/// not embeddings for this model are errors naming them.
pub fn load_dir(dir: &Path, hidden: &[usize]) -> Result<Vec<Embedding>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.is_file() && path.extension().is_some_and(|e| e == "safetensors") {
            paths.push(path);
        }
    }
    paths.sort();
    let mut out: Vec<Embedding> = Vec::with_capacity(paths.len());
    for p in paths {
        let e = load_file(&p, hidden)?;
        if let Some(other) = out.iter().find(|o| o.name == e.name) {
            return Err(bad(
                &p,
                format!("the name {} is taken by {}", e.name, other.path.display()),
            ));
        }
        out.push(e);
    }
    Ok(out)
}
