//! Where a model's files come from: a local diffusers folder or a Hugging Face hub repo.
//!
//! Hub downloads go to the standard Hugging Face cache (`HF_HUB_CACHE`, else `HF_HOME/hub`,
//! else `~/.cache/huggingface/hub`), so they are shared with Python tools. `HF_HUB_OFFLINE=1`
//! uses only what the cache holds; `HF_TOKEN` (or the cache's token file) authenticates.
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

use crate::{Error, Result, Setting};

/// A model location given by the user.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A folder in diffusers layout.
    Local(PathBuf),
    /// A single `.safetensors` file: a checkpoint in the original layout (or, given as a
    /// VAE, a VAE file).
    SingleFile(PathBuf),
    /// A hub repo id (`owner/name`) at a revision.
    Hub { repo_id: String, revision: String },
}

impl ModelSource {
    /// What `spec` names, in this order: a path that exists is a local folder (a file is an
    /// error: only diffusers folders load); a value written as a path (`./x`, `../x`, `/x`,
    /// `~/x`, `a/b/c`, `x/`) that does not exist is a missing folder; `owner/name` made of
    /// letters, digits, `-`, `_` and `.` is a hub repo id; anything else (`tiny-sd2`) is
    /// neither, and an error that says so.
    pub fn parse(spec: &str, revision: Option<&str>) -> Result<Self> {
        Self::parse_as(
            spec,
            revision,
            Setting::Model,
            "model_index.json, unet/, vae/, ...",
        )
    }

    /// A single component's folder or repo (a VAE), as [`Self::parse`] reads a model; the
    /// caller names the setting in its message.
    pub fn parse_component(spec: &str) -> Result<Self> {
        Self::parse_as(
            spec,
            None,
            Setting::Vae,
            "config.json, diffusion_pytorch_model.safetensors",
        )
    }

    fn parse_as(
        spec: &str,
        revision: Option<&str>,
        setting: Setting,
        layout: &str,
    ) -> Result<Self> {
        let path = expand_home(spec);
        if path.exists() {
            if revision.is_some() {
                return Err(Error::setting(
                    Setting::Revision,
                    revision.unwrap_or_default(),
                    "only applies to hub models, not local folders",
                ));
            }
            if path.is_dir() {
                return Ok(Self::Local(path));
            }
            return single_file(spec, path, setting, layout);
        }
        match classify_missing(spec) {
            Missing::HubId => Ok(Self::Hub {
                repo_id: spec.to_string(),
                revision: revision.unwrap_or("main").to_string(),
            }),
            Missing::Path if path.is_relative() => Err(Error::setting(
                setting,
                spec,
                format!("no such folder (looked in {})", current_dir_text()),
            )),
            Missing::Path => Err(Error::setting(setting, spec, "no such folder")),
            Missing::Neither => Err(Error::setting(
                setting,
                spec,
                format!(
                    "neither an existing folder or file (looked in {}) nor a hub repo id of \
                     the form owner/name",
                    current_dir_text()
                ),
            )),
        }
    }

    /// Opens the source, resolving how files will be fetched.
    pub fn open(&self) -> Result<ModelFiles> {
        match self {
            Self::Local(dir) => Ok(ModelFiles {
                name: dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| dir.display().to_string()),
                backend: Backend::Local(dir.clone()),
            }),
            Self::SingleFile(path) => Ok(ModelFiles {
                name: path
                    .file_stem()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| path.display().to_string()),
                backend: Backend::SingleFile(path.clone()),
            }),
            Self::Hub { repo_id, revision } => {
                let cache = hub_cache();
                let repo = Repo::with_revision(repo_id.clone(), RepoType::Model, revision.clone());
                let offline = std::env::var("HF_HUB_OFFLINE")
                    .map(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"))
                    .unwrap_or(false);
                let backend = if offline {
                    Backend::HubOffline {
                        cache: cache.repo(repo),
                        repo_id: repo_id.clone(),
                    }
                } else {
                    let token = std::env::var("HF_TOKEN")
                        .ok()
                        .filter(|t| !t.is_empty())
                        .or_else(|| cache.token());
                    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache)
                        .with_token(token)
                        .with_progress(false)
                        .build()
                        .map_err(|e| Error::Hub(format!("{repo_id}: {e}")))?;
                    let api_repo = api.repo(repo);
                    let info = api_repo
                        .info()
                        .map_err(|e| Error::Hub(format!("{repo_id}@{revision}: cannot list files: {e} (there is no local folder {repo_id} either; set HF_HUB_OFFLINE=1 to use the local cache only)")))?;
                    Backend::Hub {
                        files: info.siblings.into_iter().map(|s| s.rfilename).collect(),
                        repo: Box::new(api_repo),
                        repo_id: repo_id.clone(),
                    }
                };
                Ok(ModelFiles {
                    name: repo_id.clone(),
                    backend,
                })
            }
        }
    }
}

/// A file given as a model or VAE: a `.safetensors` file is one; pickles are refused with a
/// way to convert them; anything else is not a model.
fn single_file(spec: &str, path: PathBuf, setting: Setting, layout: &str) -> Result<ModelSource> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "safetensors" => Ok(ModelSource::SingleFile(path)),
        "ckpt" | "pt" | "pth" | "bin" | "pkl" => Err(Error::setting(
            setting,
            spec,
            format!(
                "a PyTorch pickle checkpoint, which latent does not load (loading one can run \
                 code); convert it once to .safetensors, e.g. python -c \"import torch, \
                 safetensors.torch as s; d = torch.load('{name}', weights_only=True); \
                 d = d.get('state_dict', d); s.save_file({{k: v.contiguous() for k, v in \
                 d.items() if isinstance(v, torch.Tensor)}}, '{stem}.safetensors')\"",
                name = path
                    .file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default(),
                stem = path
                    .file_stem()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default(),
            ),
        )),
        _ => Err(Error::setting(
            setting,
            spec,
            format!(
                "expected a folder in diffusers layout ({layout}) or a .safetensors file, found \
                 another file"
            ),
        )),
    }
}

fn hub_cache() -> Cache {
    if let Ok(dir) = std::env::var("HF_HUB_CACHE") {
        return Cache::new(PathBuf::from(dir));
    }
    Cache::from_env()
}

/// What a `--model` value that names nothing on disk is taken for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Missing {
    /// `owner/name` with hub-safe characters: a hub repo.
    HubId,
    /// Written as a path (`./x`, `../x`, `/x`, `~/x`, `a/b/c`, `x/`, a backslash): a folder
    /// that does not exist.
    Path,
    /// One word (`tiny-sd2`) or an id with characters the hub does not allow.
    Neither,
}

/// The rule for a value that is not on disk: only `owner/name` made of letters, digits, `-`,
/// `_` and `.` is a hub id (the hub's own rule); anything written as a path is a missing path.
fn classify_missing(spec: &str) -> Missing {
    let pathlike = spec.starts_with(['.', '/', '~'])
        || spec.contains('\\')
        || spec.ends_with('/')
        || spec.matches('/').count() > 1;
    if pathlike {
        return Missing::Path;
    }
    let hub_part = |p: &str| {
        !p.is_empty()
            && !p.starts_with(['-', '.'])
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    match spec.split_once('/') {
        Some((owner, name)) if hub_part(owner) && hub_part(name) => Missing::HubId,
        _ => Missing::Neither,
    }
}

/// `~/x` as `$HOME/x` (a quoted `~` or `--model=~/x` reaches us unexpanded); other values as
/// they are.
fn expand_home(spec: &str) -> PathBuf {
    if let Some(rest) = spec.strip_prefix("~/") {
        if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
            return PathBuf::from(home).join(rest);
        }
    }
    PathBuf::from(spec)
}

/// The current folder for messages about relative paths.
fn current_dir_text() -> String {
    std::env::current_dir()
        .map(|d| d.display().to_string())
        .unwrap_or_else(|_| "the current folder".into())
}

enum Backend {
    Local(PathBuf),
    SingleFile(PathBuf),
    HubOffline {
        cache: hf_hub::CacheRepo,
        repo_id: String,
    },
    Hub {
        repo: Box<hf_hub::api::sync::ApiRepo>,
        repo_id: String,
        files: HashSet<String>,
    },
}

/// An opened model: fetches files by their path inside the diffusers layout.
pub struct ModelFiles {
    name: String,
    backend: Backend,
}

impl ModelFiles {
    /// A short name for the model (folder name or repo id), recorded in image metadata.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file, when the model is a single `.safetensors` file rather than a folder.
    pub fn single_file(&self) -> Option<&Path> {
        match &self.backend {
            Backend::SingleFile(path) => Some(path),
            _ => None,
        }
    }

    /// How to name `rel` in a message: its local path, or `repo_id/rel` for hub models.
    pub fn display_path(&self, rel: &str) -> PathBuf {
        match &self.backend {
            Backend::Local(dir) | Backend::SingleFile(dir) => dir.join(rel),
            Backend::HubOffline { repo_id, .. } | Backend::Hub { repo_id, .. } => {
                PathBuf::from(format!("{repo_id}/{rel}"))
            }
        }
    }

    /// Whether the model has the file `rel` (e.g. `unet/config.json`).
    pub fn has(&self, rel: &str) -> bool {
        match &self.backend {
            Backend::Local(dir) => dir.join(rel).is_file(),
            Backend::SingleFile(_) => false,
            Backend::HubOffline { cache, .. } => cache.get(rel).is_some(),
            Backend::Hub { files, .. } => files.contains(rel),
        }
    }

    /// The local path of `rel`, downloading it first for hub models.
    pub fn get(&self, rel: &str) -> Result<PathBuf> {
        match &self.backend {
            Backend::Local(dir) => {
                let p = dir.join(rel);
                if p.is_file() {
                    Ok(p)
                } else {
                    Err(Error::MissingFile {
                        path: p,
                        hint: " (is this a diffusers-format Stable Diffusion folder?)".into(),
                    })
                }
            }
            Backend::SingleFile(path) => Err(Error::MissingFile {
                path: path.join(rel),
                hint: " (a single-file checkpoint has no component folders)".into(),
            }),
            Backend::HubOffline { cache, repo_id } => cache.get(rel).ok_or_else(|| Error::MissingFile {
                path: PathBuf::from(format!("{repo_id}/{rel}")),
                hint: format!(" in the Hugging Face cache (HF_HUB_OFFLINE is set, so nothing is downloaded; \
                               there is no local folder {repo_id} either)"),
            }),
            Backend::Hub { repo, repo_id, files } => {
                if !files.contains(rel) {
                    return Err(Error::MissingFile {
                        path: PathBuf::from(format!("{repo_id}/{rel}")),
                        hint: " on the hub".into(),
                    });
                }
                repo.get(rel).map_err(|e| Error::Hub(format!("{repo_id}/{rel}: {e}")))
            }
        }
    }

    /// The weights file of a component folder: `{stem}.fp16.safetensors` when `prefer_fp16`
    /// and present, else `{stem}.safetensors`. Only pickle files present is a clear error.
    pub fn weights(&self, folder: &str, stem: &str, prefer_fp16: bool) -> Result<PathBuf> {
        // `folder` may be empty: a component repo with its files at the top (a VAE repo).
        let prefix = if folder.is_empty() {
            String::new()
        } else {
            format!("{folder}/")
        };
        let fp16 = format!("{prefix}{stem}.fp16.safetensors");
        let full = format!("{prefix}{stem}.safetensors");
        if prefer_fp16 && self.has(&fp16) {
            return self.get(&fp16);
        }
        if self.has(&full) {
            return self.get(&full);
        }
        if self.has(&fp16) {
            return self.get(&fp16);
        }
        for ext in ["bin", "fp16.bin", "ckpt"] {
            let pickle = format!("{prefix}{stem}.{ext}");
            if self.has(&pickle) {
                return Err(Error::Weights {
                    path: PathBuf::from(format!("{}/{pickle}", self.name)),
                    message: "only a PyTorch pickle checkpoint is present; latent loads .safetensors only \
                              (pickles can execute code): convert it, e.g. with diffusers' save_pretrained(safe_serialization=True)"
                        .into(),
                });
            }
        }
        self.get(&full)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_not_on_disk_are_hub_ids_only_as_owner_name() {
        for id in ["stabilityai/sd-turbo", "madebyollin/taesd", "a_b/c.d-1"] {
            assert_eq!(classify_missing(id), Missing::HubId, "{id}");
        }
        for path in [
            "./nope",
            "../nope",
            "/nope/model",
            "~/models/sd",
            "tests/fixtures/tiny-sd1",
            "owner/name/",
            "models\\sd",
            "owner/",
        ] {
            assert_eq!(classify_missing(path), Missing::Path, "{path}");
        }
        for neither in ["tiny-sd2", "owner/na me", "-x/y", "owner/.."] {
            assert_eq!(classify_missing(neither), Missing::Neither, "{neither}");
        }
    }

    #[test]
    fn an_existing_folder_is_local_even_when_it_looks_like_an_id() {
        let dir = tempfile::tempdir().unwrap();
        let id_like = dir.path().join("owner");
        std::fs::create_dir_all(id_like.join("name")).unwrap();
        let spec = id_like.join("name");
        match ModelSource::parse(&spec.display().to_string(), None).unwrap() {
            ModelSource::Local(p) => assert_eq!(p, spec),
            other => panic!("expected a local folder, got {other:?}"),
        }
        let file = dir.path().join("model.safetensors");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            ModelSource::parse(&file.display().to_string(), None).unwrap(),
            ModelSource::SingleFile(_)
        ));
        let other = dir.path().join("model.txt");
        std::fs::write(&other, b"x").unwrap();
        let e = ModelSource::parse(&other.display().to_string(), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("found another file"), "{e}");
        let pickle = dir.path().join("model.ckpt");
        std::fs::write(&pickle, b"x").unwrap();
        let e = ModelSource::parse(&pickle.display().to_string(), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("pickle") && e.contains("model.safetensors"),
            "{e}"
        );
    }
}
