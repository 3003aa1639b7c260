//! Resource limits and non-finite values: requests too large for the machine, counts past the
//! limit, hostile file headers and config numbers, NaN/inf latents and settings. Each must
//! fail at once with one clear line (exit 1), allocate nothing large, and write no image.
use std::path::Path;
use std::time::{Duration, Instant};

mod common;
use common::{copy_dir, fixtures, stderr};
use latent::pipeline::load_latents;
use latent::{Error, Setting};

fn sd1() -> String {
    fixtures().join("tiny-sd1").display().to_string()
}

/// Runs a command that must fail with exit 1 within `limit`; returns its one `error:` line.
fn fails_fast(args: &[&str], envs: &[(&str, &Path)], limit: Duration) -> String {
    let start = Instant::now();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_latent"));
    cmd.args(args)
        .env_remove("LATENT_MODEL")
        .env("HF_HUB_OFFLINE", "1");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let o = cmd.output().unwrap();
    let took = start.elapsed();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
    assert!(took < limit, "{args:?} took {took:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "exactly one error line expected: {err}");
    errors[0].to_string()
}

/// A `.npy` file of f32 `values` with the header claiming `shape`, written by hand.
fn write_npy(path: &Path, shape: &str, values: &[f32]) {
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    for v in values {
        bytes.extend(v.to_le_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}

fn no_png_in(dir: &Path) {
    let pngs: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "png"))
        .collect();
    assert!(pngs.is_empty(), "{pngs:?}");
}

// Generous against a busy test machine; the refusals themselves take milliseconds.
const FAST: Duration = Duration::from_secs(10);

/// `latent generate x --model MODEL EXTRA -o DIR/x.png`, which must fail within `limit`.
fn generate_fails(dir: &Path, model: &str, extra: &[&str], limit: Duration) -> String {
    let out = dir.join("x.png").display().to_string();
    let mut args = vec!["generate", "x", "--model", model];
    args.extend(extra);
    args.extend(["-o", &out]);
    fails_fast(&args, &[], limit)
}

#[test]
fn a_huge_image_is_refused_before_work() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png").display().to_string();
    let model = sd1();
    let e = generate_fails(dir.path(), &model, &["-W", "100000", "-H", "100000"], FAST);
    assert!(
        e.contains("-W/--width 100000") && e.contains("16384"),
        "{e}"
    );
    // Within the side limit but past the pixel limit.
    let e = generate_fails(dir.path(), &model, &["-W", "16384", "-H", "16384"], FAST);
    assert!(e.contains("pixels"), "{e}");
    // The bundled demo model, extracted to a private cache.
    let cache = dir.path().join("cache");
    let e = fails_fast(
        &["generate", "x", "-W", "100000", "-H", "100000", "-o", &out],
        &[("LATENT_CACHE_DIR", &cache)],
        FAST,
    );
    assert!(e.contains("16384"), "{e}");
    no_png_in(dir.path());
}

/// tiny-sd1, staged (nothing but the text encoder resident).
fn tiny_model() -> latent::pipeline::StableDiffusion {
    let files = latent::model::ModelSource::parse(&sd1(), None)
        .unwrap()
        .open()
        .unwrap();
    latent::pipeline::StableDiffusion::load_with(
        &files,
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
        latent::pipeline::Residency::Staged,
        &mut |_| {},
    )
    .unwrap()
}

fn sampling(side: usize) -> latent::pipeline::Sampling {
    latent::pipeline::Sampling {
        width: side,
        height: side,
        steps: 2,
        guidance: 7.5,
        scheduler: "euler".parse().unwrap(),
        karras: false,
        rng: latent::noise::RngKind::Torch,
        size_conditioning: Default::default(),
        preview_every: None,
        text: Default::default(),
        image: None,
    }
}

#[test]
fn the_memory_check_compares_with_the_given_budget() {
    let model = tiny_model();
    // The tiny model at its own size needs a few MiB: it passes trivially.
    let e = model.memory_estimate(&sampling(64), 1);
    assert!(e.total < 64 << 20, "{e:?}");
    model.check_memory(&sampling(64), 1, Some(e.total)).unwrap();
    model.check_memory(&sampling(64), 1, None).unwrap();
    match model.check_memory(&sampling(64), 4, Some(e.total)) {
        Err(Error::Memory {
            needed,
            available,
            advice,
            ..
        }) => {
            assert!(needed > available, "{needed} vs {available}");
            assert!(
                advice.contains("batch_size") && advice.contains("width"),
                "{advice}"
            );
        }
        other => panic!("{other:?}"),
    }
    let text = model
        .check_memory(&sampling(4096), 1, Some(1 << 30))
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("an image of 4096x4096 needs about") && text.contains("1.0 GiB is available"),
        "{text}"
    );
}

// Needs the host's available memory, which only Linux reports here.
#[cfg(target_os = "linux")]
#[test]
fn a_size_past_available_memory_is_refused_naming_both_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let model = sd1();
    // 8192² fits the hard limits; its attention and decoder activations need more than any
    // test machine has (or its batch of 64 does).
    let e = generate_fails(
        dir.path(),
        &model,
        &["-W", "8192", "-H", "8192", "-n", "64", "--batch-size", "64"],
        FAST,
    );
    assert!(
        e.contains("needs about") && e.contains("is available") && e.contains("batch_size"),
        "{e}"
    );
    no_png_in(dir.path());
}

#[test]
fn a_huge_image_count_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let model = sd1();
    let e = generate_fails(dir.path(), &model, &["-n", "1000000000"], FAST);
    assert!(
        e.contains("-n/--num-images 1000000000") && e.contains("100000"),
        "{e}"
    );
    let e = generate_fails(dir.path(), &model, &["-n", "0"], FAST);
    assert!(e.contains("-n/--num-images 0: must be at least 1"), "{e}");
}

#[test]
fn an_npy_header_claiming_more_than_the_file_holds_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.npy");
    write_npy(&path, "(1000000000, 4, 16, 16)", &[0.0; 18]);
    assert!(std::fs::metadata(&path).unwrap().len() <= 200);
    let start = Instant::now();
    let e = load_latents(&path).unwrap_err().to_string();
    assert!(start.elapsed() < Duration::from_secs(1));
    assert!(
        e.contains("1000000000") && e.contains("the file holds"),
        "{e}"
    );

    let fortran = dir.path().join("f.npy");
    let bytes = std::fs::read(&path).unwrap();
    let at = bytes.windows(5).position(|w| w == b"False").unwrap();
    let mut patched = bytes.clone();
    patched[at..at + 5].copy_from_slice(b"True ");
    std::fs::write(&fortran, patched).unwrap();
    let e = load_latents(&fortran).unwrap_err().to_string();
    assert!(e.contains("fortran_order"), "{e}");
}

#[test]
fn a_safetensors_tensor_past_the_end_of_its_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lat.safetensors");
    // One f32 tensor claiming 1e9 x 4 x 16 x 16 values, with 16 bytes of data.
    let header = r#"{"latents":{"dtype":"F32","shape":[1000000000,4,16,16],"data_offsets":[0,4096000000000]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend([0u8; 16]);
    std::fs::write(&path, bytes).unwrap();
    let e = load_latents(&path).unwrap_err().to_string();
    assert!(e.contains("cannot read safetensors latents"), "{e}");
}

/// A copy of tiny-sd1 with one config field replaced.
fn model_with(dir: &Path, file: &str, field: &str, value: serde_json::Value) -> String {
    let model = dir.join("m");
    copy_dir(&fixtures().join("tiny-sd1"), &model);
    let path = model.join(file);
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json[field] = value;
    std::fs::write(&path, json.to_string()).unwrap();
    model.display().to_string()
}

#[test]
fn huge_config_numbers_are_refused_naming_file_and_field() {
    for (file, field, value) in [
        (
            "unet/config.json",
            "sample_size",
            serde_json::json!(100_000_000),
        ),
        (
            "unet/config.json",
            "layers_per_block",
            serde_json::json!(1_000_000_000_000u64),
        ),
        (
            "unet/config.json",
            "cross_attention_dim",
            serde_json::json!(100_000_000),
        ),
        (
            "unet/config.json",
            "block_out_channels",
            serde_json::json!([32, 64, 1_000_000_000]),
        ),
        (
            "scheduler/scheduler_config.json",
            "num_train_timesteps",
            serde_json::json!(100_000_000_000u64),
        ),
        (
            "text_encoder/config.json",
            "vocab_size",
            serde_json::json!(10_000_000_000u64),
        ),
        (
            "text_encoder/config.json",
            "num_hidden_layers",
            serde_json::json!(100_000),
        ),
        (
            "vae/config.json",
            "latent_channels",
            serde_json::json!(1_000_000),
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let model = model_with(dir.path(), file, field, value);
        let e = generate_fails(dir.path(), &model, &["--steps", "2"], FAST);
        assert!(
            e.contains(file) && e.contains(&format!("field `{field}`")) && e.contains("limit"),
            "{file} {field}: {e}"
        );
    }
}

#[test]
fn latents_with_nan_or_inf_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = sd1();
    for (name, bad) in [("nan", f32::NAN), ("inf", f32::INFINITY)] {
        let mut values = vec![0.5f32; 4 * 8 * 8];
        values[70] = bad;
        let path = dir.path().join(format!("{name}.npy"));
        write_npy(&path, "(1, 4, 8, 8)", &values);
        match load_latents(&path).unwrap_err() {
            Error::Setting {
                setting: Setting::Latents,
                reason,
                ..
            } => assert!(
                reason.contains("1 NaN or infinite value") && reason.contains("[0, 1, 0, 6]"),
                "{reason}"
            ),
            other => panic!("{other}"),
        }
        let p = path.display().to_string();
        let e = generate_fails(
            dir.path(),
            &model,
            &["-W", "64", "-H", "64", "--latents", &p],
            FAST,
        );
        assert!(
            e.contains("--latents") && e.contains("NaN or infinite"),
            "{e}"
        );
    }
    no_png_in(dir.path());
}

#[test]
fn an_overflowing_guidance_stops_denoising_naming_the_step() {
    let dir = tempfile::tempdir().unwrap();
    let model = sd1();
    // Three real steps of the tiny model: allow for a busy machine.
    let e = generate_fails(
        dir.path(),
        &model,
        &["--steps", "3", "--guidance", "1e308"],
        Duration::from_secs(60),
    );
    assert!(
        e.contains("denoising step 1 of ") && e.contains("NaN or infinite"),
        "{e}"
    );
    no_png_in(dir.path());
    let e = generate_fails(dir.path(), &model, &["--guidance", "inf"], FAST);
    assert!(e.contains("--guidance") && e.contains("finite"), "{e}");
}

#[test]
fn a_megabyte_prompt_warns_with_an_excerpt() {
    let model = tiny_model();
    let prompt = "word ".repeat(200_000);
    let mut warnings = Vec::new();
    model
        .encode_prompt(&prompt, "", 7.5, &mut |e| {
            if let latent::pipeline::Event::Warning(w) = e {
                warnings.push(w);
            }
        })
        .unwrap();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let w = &warnings[0];
    assert!(
        w.contains("this part was dropped") && w.contains("more characters)"),
        "{}",
        &w[..w.len().min(300)]
    );
    // 60 characters shown, not the dropped megabyte.
    assert!(w.len() < 300, "{} bytes", w.len());
}
