//! Helpers for the `latent batch` test crates: the tiny model, running the binary in a
//! folder, and reading what a run left in `out/`.
use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use latent::batch::{self, Record};

/// The tiny SD1 test model's folder.
pub fn model_dir() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny-sd1")
        .display()
        .to_string()
}

/// Runs the `latent` binary in `dir`, offline, without `$LATENT_MODEL`.
pub fn latent(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_latent"))
        .current_dir(dir)
        .args(args)
        .env_remove("LATENT_MODEL")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run latent")
}

/// `latent batch FILES... --model tiny --steps 2 -o out --seed 100 EXTRA...` in `dir`.
pub fn run_batch(dir: &Path, files: &[&str], extra: &[&str]) -> Output {
    run_batch_to(dir, "out", files, extra)
}

/// [`run_batch`] into the folder `out`.
pub fn run_batch_to(dir: &Path, out: &str, files: &[&str], extra: &[&str]) -> Output {
    let model = model_dir();
    let mut args = vec!["batch"];
    args.extend(files);
    args.extend([
        "--model", &model, "--steps", "2", "-o", out, "--seed", "100",
    ]);
    args.extend(extra);
    latent(dir, &args)
}

/// A command's standard output as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The records of `dir/out/manifest.jsonl`.
pub fn records(dir: &Path) -> Vec<Record> {
    let text = fs::read_to_string(dir.join("out").join(batch::MANIFEST_NAME)).unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).expect("manifest line"))
        .collect()
}

/// The PNG names in `dir/out`.
pub fn pngs(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir.join("out"))
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".png"))
                .collect()
        })
        .unwrap_or_default()
}

/// Writes `text` to `dir/name`.
pub fn write(dir: &Path, name: &str, text: &str) {
    fs::write(dir.join(name), text).unwrap();
}

/// Names in `dir/out` that are our temporary files.
pub fn temps(dir: &Path) -> Vec<String> {
    fs::read_dir(dir.join("out"))
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| latent::files::is_temp_name(n))
                .collect()
        })
        .unwrap_or_default()
}

/// Decodes every PNG in `dir/out` (a partial file fails here).
pub fn assert_pngs_decode(dir: &Path) {
    for name in pngs(dir) {
        let path = dir.join("out").join(&name);
        image::open(&path).unwrap_or_else(|e| panic!("{name} is not a complete PNG: {e}"));
    }
}
