//! The `latent` binary on SDXL, Turbo and LCM models and `--vae`: images equal the library's
//! (which tests/xl.rs holds to diffusers), metadata records what changes pixels, previews are
//! written, and every broken model or mismatched VAE fails before any work with one line.
use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

mod common;
use common::{copy_dir, fixtures, latent, stderr};

fn fixture(name: &str) -> String {
    fixtures().join(name).display().to_string()
}

/// Runs a command that must fail before writing anything; returns its one `error:` line.
fn fails(args: &[&str]) -> String {
    let o = latent(args);
    let err = stderr(&o);
    assert!(!o.status.success(), "expected failure for {args:?}: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "exactly one error line expected: {err}");
    errors[0].to_string()
}

fn parameters(png: &Path) -> String {
    latent::output::read_png_parameters(png)
        .unwrap()
        .expect("a parameters chunk")
}

fn generate(model: &str, out: &Path, extra: &[&str]) -> Output {
    let out = out.display().to_string();
    let mut args = vec![
        "generate",
        "a photo of a cat",
        "--model",
        model,
        "--seed",
        "42",
        "-o",
        &out,
        "--quiet",
    ];
    args.extend_from_slice(extra);
    latent(&args)
}

#[test]
fn sdxl_generate_records_sizes_and_the_vae() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("xl.png");
    let o = generate(
        &fixture("tiny-sdxl"),
        &png,
        &[
            "--steps",
            "3",
            "--vae",
            &fixture("tiny-taesd"),
            "--original-size",
            "96,128",
            "--crop-top-left",
            "4,8",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let p = parameters(&png);
    // The native size of the tiny SDXL (sample_size 8 x VAE factor 8), A1111's keys.
    assert!(p.contains("Size: 64x64"), "{p}");
    assert!(p.contains("Sampler: Euler"), "{p}");
    assert!(p.contains("VAE: tiny-taesd"), "{p}");
    assert!(p.contains("Original size: 96x128"), "{p}");
    // A value with a comma is quoted, as AUTOMATIC1111 writes (and reads) such values.
    assert!(p.contains("Crop top-left: \"4,8\""), "{p}");
    assert!(!p.contains("Target size"), "defaults are not written: {p}");
}

#[test]
fn turbo_and_lcm_run_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    // SDXL-Turbo: the repo's own scheduler file (Euler a, trailing), 1 step, no guidance.
    let turbo = dir.path().join("turbo");
    copy_dir(&fixtures().join("tiny-sdxl"), &turbo);
    std::fs::copy(
        fixtures().join("golden-xl/sdxl_turbo_scheduler_config.json"),
        turbo.join("scheduler/scheduler_config.json"),
    )
    .unwrap();
    let png = dir.path().join("turbo.png");
    let o = generate(
        &turbo.display().to_string(),
        &png,
        &["--steps", "1", "--guidance", "0", "--json"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let rec: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rec["scheduler"], "euler-a");
    assert!(parameters(&png).contains("Steps: 1, Sampler: Euler a, CFG scale: 0"));

    // An LCM-distilled model (its scheduler is LCM) and LCM as a switch on SDXL.
    for (model, extra) in [
        (fixture("tiny-lcm"), vec!["--steps", "4", "--guidance", "8"]),
        (
            fixture("tiny-sdxl"),
            vec!["--steps", "4", "--guidance", "1", "--scheduler", "lcm"],
        ),
    ] {
        let png = dir.path().join("lcm.png");
        let mut args = extra.clone();
        args.push("--overwrite");
        let o = generate(&model, &png, &args);
        assert!(o.status.success(), "{model}: {}", stderr(&o));
        assert!(parameters(&png).contains("Sampler: LCM"), "{model}");
    }
}

#[test]
fn an_lcm_model_walks_with_its_guidance_embedding() {
    // Guidance above 1 on an LCM-distilled UNet is an input, not a second (unconditional) pass.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("walk");
    let out_s = out.display().to_string();
    let model = fixture("tiny-lcm");
    let o = latent(&[
        "walk",
        "-p",
        "a red circle",
        "-p",
        "a blue square",
        "--seed",
        "1",
        "--frames",
        "2",
        "--steps",
        "2",
        "--guidance",
        "8",
        "--model",
        &model,
        "-o",
        &out_s,
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.join("frame-00002.png").is_file());
}

#[test]
fn preview_file_is_written_next_to_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("cat.png");
    for vae in [None, Some(fixture("tiny-taesd"))] {
        let mut extra = vec!["--steps", "4", "--preview-every", "2", "--overwrite"];
        if let Some(v) = &vae {
            extra.extend(["--vae", v.as_str()]);
        }
        let o = generate(&fixture("tiny-sdxl"), &png, &extra);
        assert!(o.status.success(), "{}", stderr(&o));
        let preview = dir.path().join("cat.preview.png");
        let img = image::open(&preview).expect("a preview PNG").to_rgb8();
        // The tiny VAE previews at the image's size; the linear map at the latents' (8x8),
        // shown at the image's size too.
        assert_eq!(img.dimensions(), (64, 64), "{vae:?}");
        let leftovers: Vec<PathBuf> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    }
}

/// A copy of tiny-sdxl with `edit` applied.
fn broken(dir: &Path, edit: impl FnOnce(&Path)) -> String {
    let m = dir.join("model");
    copy_dir(&fixtures().join("tiny-sdxl"), &m);
    edit(&m);
    m.display().to_string()
}

fn set_json(path: &Path, key: &str, value: Value) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v[key] = value;
    std::fs::write(path, v.to_string()).unwrap();
}

#[test]
fn broken_sdxl_models_fail_before_work_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("never.png");
    let run = |model: &str, extra: &[&str]| {
        let out_s = out.display().to_string();
        let mut args = vec!["generate", "a cat", "--model", model, "-o", &out_s];
        args.extend_from_slice(extra);
        let e = fails(&args);
        assert!(!out.exists(), "nothing may be written: {e}");
        e
    };

    let m = broken(&dir.path().join("a"), |m| {
        set_json(
            &m.join("model_index.json"),
            "_class_name",
            "StableDiffusion3Pipeline".into(),
        )
    });
    let e = run(&m, &[]);
    assert!(
        e.contains("StableDiffusion3Pipeline is not supported")
            && e.contains("StableDiffusionXLPipeline"),
        "{e}"
    );

    let m = broken(&dir.path().join("b"), |m| {
        std::fs::remove_dir_all(m.join("text_encoder_2")).unwrap()
    });
    let e = run(&m, &[]);
    assert!(
        e.contains("text_encoder_2") && e.contains("not found"),
        "{e}"
    );

    let m = broken(&dir.path().join("c"), |m| {
        set_json(
            &m.join("unet/config.json"),
            "cross_attention_dim",
            64.into(),
        )
    });
    let e = run(&m, &[]);
    assert!(
        e.contains("cross_attention_dim") && e.contains("32 + 48 = 80"),
        "{e}"
    );

    let m = broken(&dir.path().join("d"), |m| {
        set_json(
            &m.join("text_encoder_2/config.json"),
            "vocab_size",
            1000.into(),
        )
    });
    let e = run(&m, &[]);
    assert!(
        e.contains("vocab_size") && e.contains("does not belong"),
        "{e}"
    );

    // A tiny VAE of another latent space (16 channels, like SD3's TAESD3).
    let vae = dir.path().join("taesd16");
    copy_dir(&fixtures().join("tiny-taesd"), &vae);
    set_json(&vae.join("config.json"), "latent_channels", 16.into());
    let e = run(
        &fixture("tiny-sdxl"),
        &["--vae", &vae.display().to_string()],
    );
    assert!(
        e.contains("latent_channels") && e.contains("another model family"),
        "{e}"
    );
    // SDXL's size conditioning on a model without it is refused, not ignored.
    let e = run(&fixture("tiny-sd1"), &["--original-size", "512,512"]);
    assert!(e.contains("size conditioning") && e.contains("SDXL"), "{e}");
    let e = run(&fixture("tiny-sdxl"), &["--vae", "./no-such-vae"]);
    assert!(e.contains("--vae") && e.contains("no such folder"), "{e}");
}
