//! The bundled demo model (`weights/demo/`, see `weights/README.md`): its files are compiled
//! into the library, so the default model works from any folder and from an installed binary,
//! and are written once to a cache folder, from which they load like any other local model.
//!
//! The folder is named after a hash of the files' contents (`latent-demo-<hash>`), so a new
//! build with other weights never reads an old copy. It is written under a temporary name and
//! renamed into place, so a crash or a concurrent run never leaves a half-written model.
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Name of the demo model's folders and of the model in image metadata.
pub const NAME: &str = "latent-demo";

/// Environment variable that overrides where the demo model is extracted.
pub const CACHE_ENV: &str = "LATENT_CACHE_DIR";

macro_rules! demo_files {
    ($($path:literal),* $(,)?) => {
        &[$(($path, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/weights/demo/", $path)))),*]
    };
}

/// Every file of the demo model: (path inside the diffusers folder, contents).
pub const FILES: &[(&str, &[u8])] = demo_files!(
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
);

/// A 64-bit FNV-1a hash of every file's path, length and contents: names the extracted folder.
pub fn content_hash() -> u64 {
    hash_files(FILES)
}

fn hash_files(files: &[(&str, &[u8])]) -> u64 {
    let mut h = FNV_OFFSET;
    for (path, bytes) in files {
        h = fnv1a(h, path.as_bytes());
        h = fnv1a(h, &(bytes.len() as u64).to_le_bytes());
        h = fnv1a(h, bytes);
    }
    h
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Where the demo model is extracted: `$LATENT_CACHE_DIR`, else `$XDG_CACHE_HOME/latent`, else
/// `~/.cache/latent` (`%LOCALAPPDATA%\latent` on Windows).
pub fn cache_root() -> Result<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var(CACHE_ENV) {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = var("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("latent"));
    }
    if cfg!(windows) {
        if let Some(dir) = var("LOCALAPPDATA") {
            return Ok(PathBuf::from(dir).join("latent"));
        }
    }
    if let Some(home) = var("HOME") {
        return Ok(PathBuf::from(home).join(".cache").join("latent"));
    }
    Err(Error::InvalidInput(format!(
        "no cache folder for the bundled demo model: set {CACHE_ENV} (or HOME), or choose another model"
    )))
}

/// The demo model's folder under [`cache_root`], extracted first if needed.
pub fn model_dir() -> Result<PathBuf> {
    extract(&cache_root()?)
}

/// Makes sure `root/latent-demo-<hash>/` holds the demo model and returns that folder.
///
/// An existing folder is checked file by file (sizes); one that does not match is replaced.
pub fn extract(root: &Path) -> Result<PathBuf> {
    let dir = root.join(format!("{NAME}-{:016x}", content_hash()));
    if is_complete(&dir) {
        return Ok(dir);
    }
    std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
    let tmp = root.join(format!(
        ".{NAME}-{}-{}.tmp",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    let written = write_all(&tmp);
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() && !is_complete(&dir) {
        // A damaged copy (a file deleted or cut short by hand): replace it.
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    if let Err(e) = std::fs::rename(&tmp, &dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        // Another process may have put a complete copy there first: that one is as good.
        if !is_complete(&dir) {
            return Err(Error::io(&dir, e));
        }
    }
    Ok(dir)
}

fn write_all(tmp: &Path) -> Result<()> {
    for (rel, bytes) in FILES {
        let path = tmp.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

fn is_complete(dir: &Path) -> bool {
    FILES.iter().all(|(rel, bytes)| {
        std::fs::metadata(dir.join(rel))
            .map(|m| m.is_file() && m.len() == bytes.len() as u64)
            .unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_every_file_once_and_repairs_a_damaged_copy() {
        let root = tempfile::tempdir().unwrap();
        let dir = extract(root.path()).unwrap();
        assert_eq!(
            dir.file_name().unwrap().to_string_lossy(),
            format!("{NAME}-{:016x}", content_hash())
        );
        for (rel, bytes) in FILES {
            assert_eq!(&std::fs::read(dir.join(rel)).unwrap(), bytes, "{rel}");
        }
        // A second call reuses the folder: nothing else appears beside it.
        assert_eq!(extract(root.path()).unwrap(), dir);
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);

        let (rel, bytes) = FILES
            .iter()
            .find(|(p, _)| p.starts_with("unet/") && p.ends_with(".safetensors"))
            .unwrap();
        let unet = dir.join(rel);
        std::fs::write(&unet, b"truncated").unwrap();
        assert_eq!(extract(root.path()).unwrap(), dir);
        assert_eq!(&std::fs::read(&unet).unwrap(), bytes);
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
    }

    #[test]
    fn hash_is_fnv1a_over_names_lengths_and_bytes() {
        // The FNV-1a 64 test vector for "a".
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        let a = hash_files(&[("x.json", b"{}"), ("y.bin", b"12")]);
        assert_ne!(a, hash_files(&[("x.json", b"{}"), ("y.bin", b"13")]));
        assert_ne!(a, hash_files(&[("x.json", b"{}"), ("z.bin", b"12")]));
        assert_ne!(a, hash_files(&[("x.json", b"{}1"), ("y.bin", b"2")]));
    }
}
