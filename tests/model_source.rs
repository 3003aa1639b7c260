//! What `--model` and `--vae` name, as the README's rule says: an existing folder is local
//! (even when it reads like `owner/name`), a file is an error, a missing path is "no such
//! folder", `owner/name` not on disk is a hub id, and one word that is neither says so.
use std::path::Path;
use std::process::{Command, Output};

mod common;
use common::{copy_dir, fixtures, stderr};

/// Runs `latent` in `dir`, offline (a value sent to the hub fails without the network).
fn latent_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_latent"))
        .current_dir(dir)
        .args(args)
        .env_remove("LATENT_MODEL")
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", dir.join("empty-hub-cache"))
        .output()
        .expect("run latent")
}

/// `generate` with `--model model` in `dir`, two steps into `dir/out.png`.
fn generate(dir: &Path, model: &str) -> Output {
    latent_in(
        dir,
        &[
            "generate", "a cat", "--model", model, "--steps", "2", "-o", "out.png", "--quiet",
        ],
    )
}

/// The one `error:` line of a failed run (exit code 1).
fn error_line(o: &Output) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(lines.len(), 1, "one error line expected: {err}");
    lines[0].to_string()
}

#[test]
fn a_missing_path_is_no_such_folder_and_never_goes_to_the_hub() {
    let dir = tempfile::tempdir().unwrap();
    for spec in ["./nope", "../nope", "nope/deeper/model", "nope/"] {
        let e = error_line(&generate(dir.path(), spec));
        assert!(
            e.contains(&format!("--model {spec}: no such folder")),
            "{spec}: {e}"
        );
        assert!(!e.contains("cache") && !e.contains("hub"), "{spec}: {e}");
    }
    let e = error_line(&generate(dir.path(), "/nonexistent/model"));
    assert!(
        e.contains("--model /nonexistent/model: no such folder"),
        "{e}"
    );
    let e = error_line(&latent_in(
        dir.path(),
        &["generate", "a cat", "--vae", "./no-vae", "--steps", "2"],
    ));
    assert!(e.contains("--vae ./no-vae: no such folder"), "{e}");
    assert!(!dir.path().join("out.png").exists());
}

#[test]
fn one_word_that_is_not_a_folder_is_neither_a_folder_nor_a_hub_id() {
    let dir = tempfile::tempdir().unwrap();
    let e = error_line(&generate(dir.path(), "tiny-sd2"));
    assert!(
        e.contains("--model tiny-sd2: neither an existing folder or file")
            && e.contains("nor a hub repo id of the form owner/name"),
        "{e}"
    );
}

#[test]
fn an_existing_folder_is_local_relative_to_the_current_folder() {
    // The README's `--model tiny-sd2` works where that folder is.
    let out = tempfile::tempdir().unwrap();
    let o = latent_in(
        &fixtures(),
        &[
            "generate",
            "a cat",
            "--model",
            "tiny-sd2",
            "--steps",
            "2",
            "-o",
            &out.path().join("sd2.png").display().to_string(),
            "--quiet",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.path().join("sd2.png").is_file());

    // A folder that reads like a hub id is still the folder (the hub cache is empty and
    // offline, so the hub would fail).
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("tiny-sd1"), &dir.path().join("owner/name"));
    let o = generate(dir.path(), "owner/name");
    assert!(o.status.success(), "{}", stderr(&o));
    let params = latent::output::read_png_parameters(&dir.path().join("out.png"))
        .unwrap()
        .unwrap();
    assert!(params.contains("Model: name"), "{params}");
}

#[test]
fn owner_name_not_on_disk_is_a_hub_id_and_a_file_that_is_no_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let e = error_line(&generate(dir.path(), "nobody/nothing"));
    assert!(
        e.contains("nobody/nothing/model_index.json")
            && e.contains("Hugging Face cache")
            && e.contains("no local folder nobody/nothing either"),
        "{e}"
    );
    // A .safetensors file is read as a single-file checkpoint: a broken one says so.
    std::fs::write(dir.path().join("model.safetensors"), b"x").unwrap();
    let e = error_line(&generate(dir.path(), "model.safetensors"));
    assert!(
        e.contains("model.safetensors: not a valid safetensors file"),
        "{e}"
    );
    std::fs::write(dir.path().join("notes.txt"), b"x").unwrap();
    let e = error_line(&generate(dir.path(), "notes.txt"));
    assert!(
        e.contains("--model notes.txt: expected a folder in diffusers layout")
            && e.contains("or a .safetensors file, found another file"),
        "{e}"
    );
}
