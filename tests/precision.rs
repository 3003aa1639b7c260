//! The dtype is part of what makes an image: the PNG's parameters record it (`Precision`),
//! batch resume does not count an image made in another dtype as done, and f16 on the CPU
//! warns once.
use std::fs;

mod common;
use common::batch::{records, run_batch, write};
use common::{fixtures, latent, stderr};

/// The `parameters` of the one PNG a tiny-model generate writes with `extra` flags.
fn generate_parameters(extra: &[&str]) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let model = fixtures().join("tiny-sd1").display().to_string();
    let out_s = out.display().to_string();
    let mut args = vec![
        "generate", "a cat", "--model", &model, "--steps", "2", "--seed", "3", "-o", &out_s,
        "--quiet",
    ];
    args.extend_from_slice(extra);
    let o = latent(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let params = latent::output::read_png_parameters(&out).unwrap().unwrap();
    (params, stderr(&o))
}

#[test]
fn the_png_records_the_dtype_and_f16_on_the_cpu_warns_once() {
    let (f32_text, f32_err) = generate_parameters(&["--device", "cpu"]);
    let (bf16_text, bf16_err) = generate_parameters(&["--device", "cpu", "--dtype", "bf16"]);
    let (f16_text, f16_err) = generate_parameters(&["--device", "cpu", "--dtype", "f16"]);
    assert!(
        f32_text.ends_with(", RNG: torch, Precision: f32"),
        "{f32_text}"
    );
    assert!(
        bf16_text.ends_with(", RNG: torch, Precision: bf16"),
        "{bf16_text}"
    );
    assert!(
        f16_text.ends_with(", RNG: torch, Precision: f16"),
        "{f16_text}"
    );
    // Otherwise the same settings: only the Precision key tells them apart.
    assert_eq!(
        f32_text.replace("Precision: f32", ""),
        bf16_text.replace("Precision: bf16", "")
    );
    let parsed = latent::output::parse_a1111(&bf16_text).unwrap();
    assert_eq!(parsed.get("Precision"), Some("bf16"));

    let warning = "warning: dtype f16 on the CPU runs about 4x slower than f32";
    assert_eq!(f16_err.matches(warning).count(), 1, "{f16_err}");
    assert!(!f32_err.contains("warning"), "{f32_err}");
    // bf16 warns only where it runs the portable kernel (no AVX512-BF16 or AMX).
    let bf16_warning = "warning: dtype bf16 on this CPU (no AVX512-BF16 or AMX)";
    let expected = usize::from(latent::kernels::bf16::backend() == "portable");
    assert_eq!(
        bf16_err.matches(bf16_warning).count(),
        expected,
        "{bf16_err}"
    );
}

#[test]
fn given_latents_are_recorded() {
    let latents = fixtures().join("golden/init_latents.npy");
    let (text, _) = generate_parameters(&["--latents", &latents.display().to_string()]);
    assert!(text.contains(", Latents: from file"), "{text}");
    let (seeded, _) = generate_parameters(&[]);
    assert!(!seeded.contains("Latents"), "{seeded}");
}

#[test]
fn batch_resume_does_not_count_an_image_of_another_dtype_as_done() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "p.txt", "a cat\n");
    let png = dir.path().join("out").join("00000-100-a_cat.png");
    let o = run_batch(dir.path(), &["p.txt"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let f32_png = fs::read(&png).unwrap();

    // The same command in bf16: the f32 image is not this item; it is in the way.
    let o = run_batch(dir.path(), &["p.txt"], &["--dtype", "bf16"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("is in the way: it holds an image with other settings"),
        "{err}"
    );
    assert!(
        err.contains("0 made, 0 skipped (already done), 1 failed"),
        "{err}"
    );
    assert_eq!(fs::read(&png).unwrap(), f32_png, "left alone");

    // With --overwrite it is remade in bf16, and then bf16 is done and f32 is not.
    let o = run_batch(dir.path(), &["p.txt"], &["--dtype", "bf16", "--overwrite"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let params = latent::output::read_png_parameters(&png).unwrap().unwrap();
    assert!(params.ends_with("Precision: bf16"), "{params}");
    let info = latent(&["info", &png.display().to_string()]);
    assert!(
        String::from_utf8_lossy(&info.stdout).contains("Precision: bf16"),
        "latent info shows the dtype: {}",
        stderr(&info)
    );
    let recs = records(dir.path());
    assert_eq!(
        recs.iter().map(|r| r.dtype.as_str()).collect::<Vec<_>>(),
        ["f32", "bf16"]
    );
    let o = run_batch(dir.path(), &["p.txt"], &["--dtype", "bf16"]);
    assert!(
        stderr(&o).contains("0 made, 1 skipped (already done), 0 failed"),
        "{}",
        stderr(&o)
    );
    let o = run_batch(dir.path(), &["p.txt"], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("1 failed"), "{}", stderr(&o));
}
