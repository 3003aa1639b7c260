//! Helpers shared by the test crates that take `mod common;`.
// Each test crate compiles its own copy and uses only some of these.
#![allow(dead_code)]
pub mod batch;
pub mod serve;
pub mod single_file;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use latent::pipeline::GeneratedImage;

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

/// Asserts `got` is within 1e-5 of `want`'s range (at least 1): f32 on both sides, differing
/// from PyTorch in summation order only. Prints what it measured.
pub fn assert_close(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}");
    let diff = max_abs_diff(got, want);
    let range = max_abs(want);
    assert!(
        diff <= 1e-5 * range.max(1.0),
        "{what}: max |diff| {diff:e} (range {range})"
    );
    eprintln!("{what}: max |diff| {diff:e} (range {range})");
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

/// Holds a generation to diffusers' golden run `name`: final latents within 1e-5 of the
/// latents' range (f32 on both sides, differing in summation order only; the tiny random
/// models give latents up to ~50 and guidance amplifies every rounding difference, so the bound
/// is relative), saved 8-bit images within 1/255 (a value within rounding distance of a level
/// boundary may round the other way). Prints what it measured.
pub fn assert_matches_golden(
    name: &str,
    images: &[GeneratedImage],
    golden: &HashMap<String, Tensor>,
) {
    let latents = Tensor::stack(
        &images.iter().map(|i| i.latents.clone()).collect::<Vec<_>>(),
        0,
    )
    .unwrap();
    let d = max_abs_diff(&latents, &golden["latents"]);
    let scale = max_abs(&golden["latents"]).max(1.0);
    assert!(
        d <= 1e-5 * scale,
        "{name}: latents max abs diff {d} (max |latents| {scale})"
    );
    let want: Vec<u8> = golden["image_u8"].flatten_all().unwrap().to_vec1().unwrap();
    let ours: Vec<u8> = images.iter().flat_map(|i| i.rgb.iter().copied()).collect();
    assert_eq!(ours.len(), want.len(), "{name}: image size");
    let worst = ours
        .iter()
        .zip(&want)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(worst <= 1, "{name}: image differs by {worst}/255");
    eprintln!(
        "{name}: latents max abs diff {d:.2e} (relative {:.1e}), image max diff {worst}/255",
        d / scale
    );
}

/// A plain-syntax request for one image: `size` x `size`, `steps` of `scheduler`, guidance
/// 7.5, torch's generator seeded with `seed`.
pub fn request(
    prompt: &str,
    size: usize,
    steps: usize,
    scheduler: &str,
    seed: u64,
) -> latent::pipeline::GenerateRequest {
    use latent::pipeline::{GenerateRequest, Sampling};
    use latent::prompt::{PromptSyntax, TextOptions};
    GenerateRequest {
        prompt: prompt.into(),
        negative_prompt: String::new(),
        sampling: Sampling {
            width: size,
            height: size,
            steps,
            guidance: 7.5,
            scheduler: scheduler.parse().unwrap(),
            karras: false,
            rng: latent::noise::RngKind::Torch,
            size_conditioning: Default::default(),
            preview_every: None,
            text: TextOptions {
                syntax: PromptSyntax::Plain,
                clip_skip: 1,
            },
            image: None,
        },
        seeds: vec![seed],
        batch_size: 1,
        latents: None,
    }
}
