//! The `latent` binary end to end on the tiny test models: files, metadata, `info`, `--json`,
//! no-overwrite, and one clear error line with a non-zero exit for every bad input.
use std::path::{Path, PathBuf};

mod common;
use common::{copy_dir, fixtures, latent, stderr};

fn sd1() -> String {
    fixtures().join("tiny-sd1").display().to_string()
}

/// Runs a command that must fail; returns its one `error:` line (exit code 1 for failures,
/// 2 for usage errors caught by the argument parser).
fn fails(args: &[&str]) -> String {
    let o = latent(args);
    let err = stderr(&o);
    assert!(
        !o.status.success(),
        "expected failure for {args:?}, stderr: {err}"
    );
    assert!(
        matches!(o.status.code(), Some(1 | 2)),
        "exit code for {args:?}: {:?}",
        o.status.code()
    );
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "panic: {err}"
    );
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "exactly one error line expected: {err}");
    errors[0].to_string()
}

fn quick<'a>(model: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "generate",
        "a photo of a cat",
        "--model",
        model,
        "--steps",
        "3",
        "-o",
        out,
        "--quiet",
    ]
}

#[test]
fn generate_writes_png_with_parameters_and_info_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cat.png");
    let model = sd1();
    let out_s = out.display().to_string();
    let mut args = quick(&model, &out_s);
    args.extend([
        "--seed",
        "42",
        "--negative-prompt",
        "blurry, dark",
        "--scheduler",
        "dpm++2m",
        "--karras",
    ]);
    let o = latent(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let img = image::open(&out).unwrap().to_rgb8();
    assert_eq!((img.width(), img.height()), (64, 64));

    let info = latent(&["info", &out_s]);
    assert!(info.status.success());
    let text = String::from_utf8(info.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "a photo of a cat");
    assert_eq!(lines[1], "Negative prompt: blurry, dark");
    assert!(
        lines[2].starts_with("Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 64x64, Model: tiny-sd1"),
        "{}",
        lines[2]
    );
    // No temp files left next to the output.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn json_reports_one_object_per_image_with_consecutive_seeds() {
    let dir = tempfile::tempdir().unwrap();
    let model = sd1();
    let out_s = dir.path().display().to_string();
    let mut args = quick(&model, &out_s);
    args.extend([
        "--seed",
        "7",
        "-n",
        "3",
        "--batch-size",
        "2",
        "--json",
        "--scheduler",
        "euler-a",
    ]);
    let o = latent(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8(o.stdout).unwrap();
    let records: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 3);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["seed"], 7 + i as u64);
        assert_eq!(r["scheduler"], "euler-a");
        assert_eq!(r["steps"], 3);
        let path = PathBuf::from(r["path"].as_str().unwrap());
        assert!(path.is_file());
        assert!(path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .ends_with(&format!("-{}.png", 7 + i)));
        assert!(r["timings"]["seconds_per_step"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn existing_file_is_not_overwritten_without_flag() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("keep.png");
    std::fs::write(&out, b"precious").unwrap();
    let model = sd1();
    let out_s = out.display().to_string();
    let err = fails(&quick(&model, &out_s));
    assert!(
        err.contains("keep.png") && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");

    let mut args = quick(&model, &out_s);
    args.push("--overwrite");
    let o = latent(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(image::open(&out).is_ok());
}

#[test]
fn bad_sizes_steps_prompts_and_names_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = sd1();
    let out_s = dir.path().join("x.png").display().to_string();
    let with = |extra: &[&str]| {
        let mut a = quick(&model, &out_s);
        a.extend_from_slice(extra);
        fails(&a)
    };
    assert!(with(&["--width", "65"]).contains("--width 65"));
    assert!(with(&["--height", "0"]).contains("--height"));
    assert!(with(&["--steps", "0"]).contains("--steps"));
    assert!(fails(&["generate", "  ", "--model", &model, "-o", &out_s])
        .contains("is empty: give a text to draw"));
    assert!(fails(&["generate", "x", "--model", &model, "--scheduler", "heun"]).contains("heun"));
    assert!(with(&["--scheduler", "ddim", "--karras"]).contains("karras"));
    assert!(fails(&["generate", "x", "--model", &model, "--device", "tpu"]).contains("tpu"));
    assert!(
        fails(&["generate", "x", "--model", "/nonexistent/model"]).contains("/nonexistent/model")
    );
    assert!(fails(&["generate", "x", "--model", &model, "-o", "out.jpg"]).contains("png"));
    assert!(!Path::new(&out_s).exists());
}

/// Copies the tiny SD1 model so a test can damage it.
fn copy_model(dst: &Path) {
    copy_dir(&fixtures().join("tiny-sd1"), dst);
}

#[test]
fn damaged_models_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out_s = dir.path().join("x.png").display().to_string();

    // A truncated weights file names the file.
    let m = dir.path().join("truncated");
    copy_model(&m);
    let unet = m.join("unet/diffusion_pytorch_model.safetensors");
    let len = std::fs::metadata(&unet).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&unet)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let ms = m.display().to_string();
    let err = fails(&quick(&ms, &out_s));
    assert!(
        err.contains("unet/diffusion_pytorch_model.safetensors") && err.contains("truncated"),
        "{err}"
    );

    // A config that disagrees with the weights names the tensor and both shapes.
    let m = dir.path().join("shape");
    copy_model(&m);
    let cfg_path = m.join("unet/config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["block_out_channels"][0] = 48.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let ms = m.display().to_string();
    let err = fails(&quick(&ms, &out_s));
    assert!(
        err.contains("tensor `down_blocks.0.resnets.0.norm1.weight` has shape [32], expected [48]"),
        "{err}"
    );

    // A config value latent does not implement (Kandinsky's added embedding) is named with its
    // file.
    let m = dir.path().join("unknown");
    copy_model(&m);
    let cfg_path = m.join("unet/config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["addition_embed_type"] = "text_image".into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let ms = m.display().to_string();
    let err = fails(&quick(&ms, &out_s));
    assert!(
        err.contains("unet/config.json") && err.contains("addition_embed_type"),
        "{err}"
    );

    // A missing weights file, and a pickle in its place.
    let m = dir.path().join("pickle");
    copy_model(&m);
    std::fs::rename(
        m.join("vae/diffusion_pytorch_model.safetensors"),
        m.join("vae/diffusion_pytorch_model.bin"),
    )
    .unwrap();
    let ms = m.display().to_string();
    let err = fails(&quick(&ms, &out_s));
    assert!(err.contains("pickle") && err.contains("vae"), "{err}");
    std::fs::remove_file(m.join("vae/diffusion_pytorch_model.bin")).unwrap();
    let err = fails(&quick(&ms, &out_s));
    assert!(
        err.contains("vae/diffusion_pytorch_model.safetensors") && err.contains("not found"),
        "{err}"
    );
    assert!(!Path::new(&out_s).exists());
}

#[test]
fn long_prompt_warns_which_words_were_dropped_in_plain_syntax_only() {
    let dir = tempfile::tempdir().unwrap();
    let model = sd1();
    let out_s = dir.path().join("long.png").display().to_string();
    let prompt = format!("{} zebra giraffe", "cat ".repeat(80));
    let args = [
        "generate", &prompt, "--model", &model, "--steps", "2", "-o", &out_s,
    ];
    let o = latent(&[&args[..], &["--prompt-syntax", "plain"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("warning:") && err.contains("zebra giraffe"),
        "{err}"
    );
    let params = latent(&["info", &out_s]);
    let text = String::from_utf8_lossy(&params.stdout).into_owned();
    assert!(text.contains("Prompt syntax: plain"), "{text}");
    // AUTOMATIC1111's syntax (the default) encodes the prompt in two chunks: nothing is lost.
    std::fs::remove_file(&out_s).unwrap();
    let o = latent(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("dropped"), "{}", stderr(&o));
    let again = latent(&["info", &out_s]);
    assert!(!String::from_utf8_lossy(&again.stdout).contains("Prompt syntax"));
}

#[test]
fn missing_png_for_info_is_an_error() {
    let err = fails(&["info", "/nonexistent/file.png"]);
    assert!(err.contains("/nonexistent/file.png"), "{err}");
}

#[test]
fn given_latents_and_f16_runs_work() {
    let dir = tempfile::tempdir().unwrap();
    let model = sd1();
    let lat = fixtures()
        .join("golden/init_latents.npy")
        .display()
        .to_string();
    let a = dir.path().join("a.png").display().to_string();
    let b = dir.path().join("b.png").display().to_string();
    let mut args = quick(&model, &a);
    args.extend(["--latents", &lat, "--scheduler", "euler"]);
    let o = latent(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut args = quick(&model, &b);
    args.extend(["--latents", &lat, "--scheduler", "euler", "--dtype", "f16"]);
    let o = latent(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let ia = image::open(&a).unwrap().to_rgb8();
    let ib = image::open(&b).unwrap().to_rgb8();
    let worst = ia
        .as_raw()
        .iter()
        .zip(ib.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap();
    // f16 weights and activations against f32: measured 1/255 on this model.
    assert!(worst <= 4, "f16 vs f32 differ by {worst}/255");

    // bf16 on the CPU: bf16 weights and products, f32 activations.
    let bf = b.replace("b.png", "bf.png");
    let mut args = quick(&model, &bf);
    args.extend(["--latents", &lat, "--scheduler", "euler", "--dtype", "bf16"]);
    let o = latent(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let ic = image::open(&bf).unwrap().to_rgb8();
    let mse = ia
        .as_raw()
        .iter()
        .zip(ic.as_raw())
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum::<f64>()
        / ia.as_raw().len() as f64;
    let psnr = 10.0 * (255f64 * 255.0 / mse.max(1e-12)).log10();
    // bf16 keeps 8 bits of mantissa: the image drifts but stays close (PSNR vs f32).
    assert!(psnr > 30.0, "bf16 vs f32 PSNR {psnr:.1} dB");

    // Latents of the wrong shape for the request are refused before any work.
    let c = dir.path().join("c.png").display().to_string();
    let mut args = quick(&model, &c);
    args.extend(["--latents", &lat, "-n", "2"]);
    assert!(fails(&args).contains("--latents"));
    let mut args = quick(&model, &c);
    args.extend(["--latents", "/nonexistent.npy"]);
    assert!(fails(&args).contains("/nonexistent.npy"));
}

#[test]
fn f16_decode_overflow_warns_and_redecodes_in_f32() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("overflow");
    copy_model(&m);
    // Scale the VAE's last convolution past f16's range (65504): in f16 the weights become
    // inf and the decode NaN/inf; in f32 they stay finite.
    let path = m.join("vae/diffusion_pytorch_model.safetensors");
    let dev = candle_core::Device::Cpu;
    let mut tensors = candle_core::safetensors::load(&path, &dev).unwrap();
    for t in tensors.values_mut() {
        *t = t.to_dtype(candle_core::DType::F32).unwrap();
    }
    let w = tensors["decoder.conv_out.weight"].clone();
    tensors.insert("decoder.conv_out.weight".into(), (w * 1e6).unwrap());
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let out = dir.path().join("x.png");
    let ms = m.display().to_string();
    let out_s = out.display().to_string();
    let o = latent(&[
        "generate", "a cat", "--model", &ms, "--steps", "2", "--dtype", "f16", "-o", &out_s,
    ]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("warning:") && err.contains("decoding again in f32"),
        "{err}"
    );
    assert!(image::open(&out).is_ok());
}

#[test]
fn prompt_syntax_errors_are_one_line_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let model = sd1();
    let out = dir.path().join("x.png").display().to_string();
    let base = ["generate", "--model", &model, "--steps", "2", "-o", &out];
    // A weight that is not a number: AUTOMATIC1111 refuses it too.
    let err = fails(&[&base[..], &["a (cat:1.2.3) hat"]].concat());
    assert!(err.contains("the prompt") && err.contains("1.2.3"), "{err}");
    let err = fails(&[&base[..], &["a cat", "--neg", "(x:1..5)"]].concat());
    assert!(
        err.contains("--negative-prompt") && err.contains("1..5"),
        "{err}"
    );
    let err = fails(&[&base[..], &["a cat", "--clip-skip", "3"]].concat());
    assert!(
        err.contains("--clip-skip 3") && err.contains("between 1 and 2"),
        "{err}"
    );
    let err = fails(&[&base[..], &["a cat", "--prompt-syntax", "comfy"]].concat());
    assert!(err.contains("a1111 or plain"), "{err}");
    // Unbalanced brackets are text, as in AUTOMATIC1111; the plain reading takes anything.
    let o = latent(&[&base[..], &["a (cat", "--prompt-syntax", "plain"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!Path::new(&dir.path().join("y.png")).exists());
    // Walks refuse prompt editing before rendering a frame.
    let walk_out = dir.path().join("walk").display().to_string();
    let err = fails(&[
        "walk",
        "--model",
        &model,
        "-p",
        "[a cat:a dog:1]",
        "-p",
        "a dog",
        "--seed",
        "1",
        "--seed",
        "2",
        "--frames",
        "2",
        "--steps",
        "2",
        "-W",
        "32",
        "-H",
        "32",
        "-o",
        &walk_out,
    ]);
    assert!(err.contains("not supported in walks"), "{err}");
    assert!(!Path::new(&walk_out).join("frame-0000.png").exists());
}
