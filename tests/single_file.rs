//! Single-file checkpoints (the LDM layout of AUTOMATIC1111 and model-sharing sites): the tiny
//! fixtures as single files (assembled from recipes, see tests/common/single_file.rs) give the
//! folders' latents bit for bit, with the folders' configs or with configs inferred from the
//! tensors; detection, model types, VAE files, dtypes and the errors.
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use latent::model::single_file::ModelType;
use latent::model::ModelSource;
use latent::pipeline::{LoadOptions, StableDiffusion};

mod common;
use common::single_file::assemble;
use common::{fixtures, latent, max_abs, request, stderr};

fn open(spec: &Path) -> latent::model::ModelFiles {
    ModelSource::parse(&spec.display().to_string(), None)
        .unwrap()
        .open()
        .unwrap()
}

fn try_load(
    model: &Path,
    config: Option<&Path>,
    model_type: Option<&str>,
    dtype: DType,
) -> latent::Result<StableDiffusion> {
    let files = ModelSource::parse(&model.display().to_string(), None)?.open()?;
    let config = config.map(open);
    let options = LoadOptions {
        model_config: config.as_ref(),
        model_type: model_type.map(|t| t.parse::<ModelType>().unwrap()),
        ..LoadOptions::default()
    };
    StableDiffusion::load_opts(&files, &Device::Cpu, dtype, &options, &mut |_| {})
}

/// Final latents: 3 steps of `scheduler` at 32x32, seed 3.
fn run(model: &StableDiffusion, scheduler: &str) -> Tensor {
    let req = request("a photo of a cat", 32, 3, scheduler, 3);
    let out = model
        .generate(&req, &latent::Cancel::new(), &mut |_| {})
        .unwrap();
    out.images[0].latents.clone()
}

#[test]
fn single_files_with_the_folders_configs_give_the_folders_latents_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    for (kind, scheduler) in [("sd1", "euler"), ("sd2", "ddim"), ("sdxl", "euler-a")] {
        let folder = fixtures().join(format!("tiny-{kind}"));
        let file = assemble(kind, tmp.path());
        let want = run(
            &try_load(&folder, None, None, DType::F32).unwrap(),
            scheduler,
        );
        let single = try_load(&file, Some(&folder), None, DType::F32).unwrap();
        assert!(
            single.detected().unwrap().contains("configs from tiny-"),
            "{:?}",
            single.detected()
        );
        let got = run(&single, scheduler);
        let diff = max_abs(&(got - &want).unwrap());
        assert_eq!(diff, 0.0, "{kind}: single file vs folder");
        eprintln!(
            "{kind}: single file == folder (max |latent| {})",
            max_abs(&want)
        );
    }
}

#[test]
fn configs_inferred_from_the_tensors_run_and_say_what_they_detected() {
    let tmp = tempfile::tempdir().unwrap();
    for (kind, model_type, detected) in [
        (
            "sd1",
            None,
            "SD 1.x checkpoint, predicts noise (the family's)",
        ),
        (
            "sd2",
            Some("sd2-v"),
            "SD 2.x checkpoint, v-prediction (as given)",
        ),
        (
            "sdxl",
            None,
            "SDXL checkpoint, predicts noise (the family's)",
        ),
    ] {
        let file = assemble(kind, tmp.path());
        let model = try_load(&file, None, model_type, DType::F32).unwrap();
        assert_eq!(model.detected(), Some(detected));
        let latents = run(&model, "euler");
        let m = max_abs(&latents);
        assert!(m.is_finite() && m > 0.0, "{kind}: {m}");
    }
}

#[test]
fn an_sd2_file_that_does_not_say_what_it_predicts_needs_the_model_type() {
    let tmp = tempfile::tempdir().unwrap();
    let file = assemble("sd2", tmp.path());
    let e = try_load(&file, None, None, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("sd2 or sd2-v"), "{e}");
    let e = try_load(&file, None, Some("sdxl"), DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("says SDXL") && e.contains("SD 2.x checkpoint"),
        "{e}"
    );
    // With the type, the noise-predicting reading differs from the v one.
    let eps = run(
        &try_load(&file, None, Some("sd2"), DType::F32).unwrap(),
        "euler",
    );
    let v = run(
        &try_load(&file, None, Some("sd2-v"), DType::F32).unwrap(),
        "euler",
    );
    assert!(max_abs(&(eps - v).unwrap()) > 1e-3);
}

#[test]
fn half_precision_files_load_and_stay_close_to_the_folder() {
    // The tiny weights are f16 values: an f32 or bf16 copy of the single file loads the same
    // numbers (bf16 rounds them) into the same model.
    let tmp = tempfile::tempdir().unwrap();
    let file = assemble("sd1", tmp.path());
    let folder = fixtures().join("tiny-sd1");
    let want = run(&try_load(&folder, None, None, DType::F32).unwrap(), "euler");
    for (dtype, name, tolerance) in [(DType::F32, "f32", 0.0), (DType::BF16, "bf16", 0.05)] {
        let tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
        let converted: std::collections::HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(k, v)| (k, v.to_dtype(dtype).unwrap()))
            .collect();
        let path = tmp.path().join(format!("tiny-sd1-{name}.safetensors"));
        candle_core::safetensors::save(&converted, &path).unwrap();
        let got = run(
            &try_load(&path, Some(&folder), None, DType::F32).unwrap(),
            "euler",
        );
        let diff = max_abs(&(got - &want).unwrap());
        assert!(diff <= tolerance * max_abs(&want), "{name}: {diff}");
    }
}

#[test]
fn a_vae_file_in_either_layout_replaces_the_models_vae() {
    // A VAE file's config is inferred like a checkpoint's: both layouts of the tiny VAE must
    // decode as the single-file checkpoint's own (inferred) VAE does.
    let tmp = tempfile::tempdir().unwrap();
    let file = assemble("sd1", tmp.path());
    let all = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    // The LDM layout as VAE files are shared (no first_stage_model. prefix).
    let ldm: std::collections::HashMap<String, Tensor> = all
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("first_stage_model.")?.to_string(), v.clone())))
        .collect();
    let ldm_path = tmp.path().join("vae-ldm.safetensors");
    candle_core::safetensors::save(&ldm, &ldm_path).unwrap();
    let diffusers_path = fixtures().join("tiny-sd1/vae/diffusion_pytorch_model.safetensors");
    let model = try_load(&file, None, None, DType::F32).unwrap();
    let latents = run(&model, "euler").unsqueeze(0).unwrap();
    let want = model.decode(&latents, &mut |_| {}).unwrap();
    for vae in [&ldm_path, &diffusers_path] {
        let files = open(&file);
        let vae_files = open(vae);
        let options = LoadOptions {
            vae: Some(&vae_files),
            ..LoadOptions::default()
        };
        let m = StableDiffusion::load_opts(&files, &Device::Cpu, DType::F32, &options, &mut |_| {})
            .unwrap();
        let got = m.decode(&latents, &mut |_| {}).unwrap();
        assert_eq!(max_abs(&(got - &want).unwrap()), 0.0, "{}", vae.display());
    }
    // Not a VAE: one line naming the flag's value.
    let files = open(&file);
    let lora = open(&fixtures().join("lora/sd1/kohya-style.safetensors"));
    let options = LoadOptions {
        vae: Some(&lora),
        ..LoadOptions::default()
    };
    let e = StableDiffusion::load_opts(&files, &Device::Cpu, DType::F32, &options, &mut |_| {})
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not a VAE"), "{e}");
}

#[test]
fn files_that_are_not_checkpoints_get_one_line_naming_them() {
    let tmp = tempfile::tempdir().unwrap();
    let vae = fixtures().join("tiny-sd1/vae/diffusion_pytorch_model.safetensors");
    let unet = fixtures().join("tiny-sd1/unet/diffusion_pytorch_model.safetensors");
    let lora = fixtures().join("lora/sd1/kohya-style.safetensors");
    let ckpt = tmp.path().join("model.ckpt");
    std::fs::write(&ckpt, b"not really").unwrap();
    for (file, says) in [
        (&vae, "a VAE"),
        (&unet, "one component of a diffusers model"),
        (&lora, "a LoRA"),
        (&ckpt, "pickle"),
    ] {
        let out = latent(&[
            "generate",
            "a cat",
            "--model",
            &file.display().to_string(),
            "-o",
            &tmp.path().join("x.png").display().to_string(),
        ]);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(
            err.contains(says) && err.contains("--model"),
            "{}: {err}",
            file.display()
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    assert!(!tmp.path().join("x.png").exists());
}

#[test]
fn the_command_line_reads_single_files_and_records_their_name() {
    let tmp = tempfile::tempdir().unwrap();
    let file = assemble("sd2", tmp.path());
    let out_png = tmp.path().join("cat.png");
    let args = |extra: &[&str]| {
        let mut a = vec![
            "generate".to_string(),
            "a cat".into(),
            "--model".into(),
            file.display().to_string(),
            "--steps".into(),
            "2".into(),
            "-W".into(),
            "32".into(),
            "-H".into(),
            "32".into(),
            "-o".into(),
            out_png.display().to_string(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let missing = latent(&refs(&args(&[])));
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("--model-type"),
        "{}",
        stderr(&missing)
    );
    let bad = latent(&refs(&args(&["--model-type", "sd3"])));
    assert!(
        stderr(&bad).contains("--model-type sd3: unknown model type"),
        "{}",
        stderr(&bad)
    );
    let ok = latent(&refs(&args(&["--model-type", "sd2-v"])));
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert!(
        String::from_utf8_lossy(&ok.stdout).contains("SD 2.x checkpoint, v-prediction")
            || stderr(&ok).contains("SD 2.x checkpoint, v-prediction"),
        "{}",
        stderr(&ok)
    );
    assert!(out_png.exists());
}

fn refs(a: &[String]) -> Vec<&str> {
    a.iter().map(String::as_str).collect()
}

#[test]
fn loras_merge_into_single_files_as_into_folders() {
    // kohya names map onto the same modules whichever way the model was stored.
    let tmp = tempfile::tempdir().unwrap();
    let file = assemble("sd1", tmp.path());
    let folder = fixtures().join("tiny-sd1");
    let lora =
        latent::lora::LoraSpec::new(fixtures().join("lora/sd1/kohya-style.safetensors"), 0.8);
    let load = |model: &Path, config: Option<&Path>| {
        let files = open(model);
        let config = config.map(open);
        let options = LoadOptions {
            model_config: config.as_ref(),
            lora: latent::pipeline::LoraSettings {
                dir: None,
                base: vec![lora.clone()],
            },
            ..LoadOptions::default()
        };
        StableDiffusion::load_opts(&files, &Device::Cpu, DType::F32, &options, &mut |_| {}).unwrap()
    };
    let want = run(&load(&folder, None), "euler");
    let got = run(&load(&file, Some(&folder)), "euler");
    assert_eq!(max_abs(&(got - &want).unwrap()), 0.0);
    let plain = run(&try_load(&folder, None, None, DType::F32).unwrap(), "euler");
    assert!(
        max_abs(&(plain - &want).unwrap()) > 1e-3,
        "the LoRA changes nothing"
    );
}
