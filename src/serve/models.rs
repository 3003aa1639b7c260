//! The models a server offers: the one it started with, then every diffusers folder (a folder
//! with `model_index.json`, by folder name) and single-file checkpoint (`NAME.safetensors`,
//! by file name, as AUTOMATIC1111 lists them) directly under `--models-dir`.
use std::path::{Path, PathBuf};

use super::api::SdModelItem;
use crate::{Error, Result, Setting};

/// One model the server can switch to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelEntry {
    /// AUTOMATIC1111's `title`: what `sd_model_checkpoint` names.
    pub title: String,
    /// What the loader is given: a folder path, or the spec the server started with.
    pub spec: String,
    /// Where it is, for `filename`.
    pub filename: String,
}

impl ModelEntry {
    /// The entry as `/sdapi/v1/sd-models` lists it.
    pub fn item(&self) -> SdModelItem {
        SdModelItem {
            title: self.title.clone(),
            model_name: self.title.clone(),
            hash: None,
            sha256: None,
            filename: self.filename.clone(),
            config: None,
        }
    }
}

/// The models on offer, the starting one first.
#[derive(Debug, Clone)]
pub struct Catalog {
    entries: Vec<ModelEntry>,
}

impl Catalog {
    /// The starting model (`title` as the loaded model names itself, `spec` as it was given)
    /// and the diffusers folders in `dir`, sorted by name. A folder that is the starting model,
    /// or has its name, is listed once.
    pub fn new(title: &str, spec: &str, dir: Option<&Path>) -> Result<Catalog> {
        let first = ModelEntry {
            title: title.into(),
            spec: spec.into(),
            filename: spec.into(),
        };
        let first_path = std::fs::canonicalize(spec).ok();
        let mut entries = vec![first];
        if let Some(dir) = dir {
            let mut found = scan(dir)?;
            found.retain(|(name, path)| {
                name != title && std::fs::canonicalize(path).ok() != first_path
            });
            entries.extend(found.into_iter().map(|(title, path)| ModelEntry {
                title,
                spec: path.display().to_string(),
                filename: path.display().to_string(),
            }));
        }
        Ok(Catalog { entries })
    }

    /// Every entry, the starting model first.
    pub fn entries(&self) -> &[ModelEntry] {
        &self.entries
    }

    /// The entry `name` stands for: a title, a title with AUTOMATIC1111's ` [hash]` suffix or
    /// `.safetensors` ending, or a filename.
    pub fn find(&self, name: &str) -> Option<&ModelEntry> {
        let name = name.trim();
        let bare = name
            .rsplit_once(" [")
            .filter(|(_, rest)| rest.ends_with(']'))
            .map_or(name, |(head, _)| head);
        let bare = bare.strip_suffix(".safetensors").unwrap_or(bare);
        self.entries.iter().find(|e| {
            e.title == name
                || e.title == bare
                || e.title.strip_suffix(".safetensors") == Some(bare)
                || e.filename == name
        })
    }
}

/// The models directly under `dir`: (folder or file name, path). A `.safetensors` file is
/// listed when its tensor names are a checkpoint's (VAEs and LoRAs kept beside are not).
fn scan(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let read = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut found = Vec::new();
    for entry in read {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let is_file_checkpoint = || {
            path.extension().is_some_and(|e| e == "safetensors")
                && path.is_file()
                && crate::model::single_file::is_checkpoint(&path)
        };
        if path.join("model_index.json").is_file() || is_file_checkpoint() {
            found.push((entry.file_name().to_string_lossy().into_owned(), path));
        }
    }
    if found.is_empty() {
        return Err(Error::setting(
            Setting::Model,
            dir.display(),
            "holds no model (a diffusers folder with model_index.json, or a .safetensors \
             checkpoint)",
        ));
    }
    found.sort();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_diffusers_folders_and_finds_them_by_a1111_names() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b-model", "a-model"] {
            std::fs::create_dir_all(dir.path().join(name)).unwrap();
            std::fs::write(dir.path().join(name).join("model_index.json"), "{}").unwrap();
        }
        std::fs::create_dir_all(dir.path().join("not-a-model")).unwrap();
        std::fs::write(dir.path().join("broken.safetensors"), b"not a checkpoint").unwrap();
        // A checkpoint's names (the family is read from them) and a VAE's.
        let one = [0u8; 4];
        let tensor = |name: &str| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &one)
                .unwrap();
            (name.to_string(), view)
        };
        let checkpoint = [
            tensor("model.diffusion_model.out.2.weight"),
            tensor("cond_stage_model.transformer.text_model.final_layer_norm.weight"),
        ];
        safetensors::serialize_to_file(checkpoint, None, &dir.path().join("c-model.safetensors"))
            .unwrap();
        let vae = [tensor("encoder.down.0.block.0.conv1.weight")];
        safetensors::serialize_to_file(vae, None, &dir.path().join("vae.safetensors")).unwrap();
        let c = Catalog::new("start", "/nowhere/start", Some(dir.path())).unwrap();
        let titles: Vec<&str> = c.entries().iter().map(|e| e.title.as_str()).collect();
        assert_eq!(
            titles,
            ["start", "a-model", "b-model", "c-model.safetensors"]
        );
        assert_eq!(c.find("c-model").unwrap().title, "c-model.safetensors");
        assert_eq!(
            c.find("c-model.safetensors [12ab]").unwrap().title,
            "c-model.safetensors"
        );
        assert_eq!(c.find("a-model [0123abcd]").unwrap().title, "a-model");
        assert_eq!(c.find("b-model.safetensors").unwrap().title, "b-model");
        assert!(c.find("d-model").is_none());
        let empty = tempfile::tempdir().unwrap();
        assert!(Catalog::new("start", "x", Some(empty.path())).is_err());
    }
}
