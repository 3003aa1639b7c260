//! Helpers shared by the test crates that take `mod common;`.
// Each test crate compiles its own copy and uses only some of these.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Tensor};

/// tests/fixtures: the tiny models and the golden files.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Copies a folder tree (a model a test is about to damage or rearrange).
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}

/// Largest |a - b| over all elements (shapes must match), compared in f32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap();
    max_abs(&d)
}

/// Largest |t| over all elements, in f32.
pub fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Runs the `latent` binary offline, without `$LATENT_MODEL`.
pub fn latent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_latent"))
        .args(args)
        .env_remove("LATENT_MODEL")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run latent")
}

/// A command's standard error as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
