//! Parity of the tiny VAE decoder (diffusers' `AutoencoderTiny`, TAESD) with diffusers, and its
//! config checks. Model: tests/fixtures/tiny-taesd; goldens: tests/fixtures/golden-taesd, both
//! made by tools/make_tiny_taesd.py.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use latent::model::{ConfigFile, TinyVaeConfig, TinyVaeDecoder, VaeKind, Weights};
use serde_json::{json, Map, Value};

mod common;
use common::{fixtures, max_abs_diff};

fn model_dir() -> PathBuf {
    fixtures().join("tiny-taesd")
}

fn goldens() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join("golden-taesd/taesd.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn load(dir: &Path, config: &TinyVaeConfig, dtype: DType) -> TinyVaeDecoder {
    let w = Weights::open(
        &dir.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
        dtype,
    )
    .unwrap();
    TinyVaeDecoder::load(&w, config).unwrap()
}

fn decoder(dtype: DType) -> TinyVaeDecoder {
    let config = TinyVaeConfig::from_file(&model_dir().join("config.json")).unwrap();
    load(&model_dir(), &config, dtype)
}

/// (b, 3, h, w) in [-1, 1] -> (b, h, w, 3) bytes the way diffusers' pipelines save images:
/// `round(clamp(x / 2 + 0.5, 0, 1) * 255)`.
fn to_u8(image: &Tensor) -> Vec<u8> {
    let v: Vec<f32> = image
        .permute((0, 2, 3, 1))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    v.into_iter()
        .map(|x| ((x / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect()
}

const CASES: [&str; 2] = ["square", "wide"];

#[test]
fn decode_matches_diffusers() {
    let vae = decoder(DType::F32);
    assert_eq!(vae.config().scale_factor(), 8);
    let g = goldens();
    for case in CASES {
        let latents = &g[&format!("{case}_latents")];
        let image = vae.decode(latents).unwrap();
        let (_, _, h, w) = latents.dims4().unwrap();
        assert_eq!(image.dims()[2..], [8 * h, 8 * w]);
        let d = max_abs_diff(&image, &g[&format!("{case}_image")]);
        // f32 on both sides; the differences are summation order only.
        eprintln!("taesd {case}: max abs diff {d:.3e}");
        assert!(d < 1e-4, "taesd {case}: max abs diff {d}");

        let want: Vec<u8> = g[&format!("{case}_image_u8")]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let got = to_u8(&image);
        assert_eq!(got.len(), want.len());
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        let off = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        eprintln!(
            "taesd {case}: uint8 max diff {worst}, {off} of {} values differ",
            got.len()
        );
        // A value within 1e-4 of a rounding boundary may round the other way: at most 1/255.
        assert!(worst <= 1, "taesd {case}: uint8 max diff {worst}");
    }
}

#[test]
fn bf16_decode_stays_close_to_f32() {
    let f32_vae = decoder(DType::F32);
    let bf16_vae = decoder(DType::BF16);
    let g = goldens();
    for case in CASES {
        // bf16 weights and products with f32 activations (the CPU's bf16 mode): latents stay f32.
        let latents = &g[&format!("{case}_latents")];
        let full = f32_vae.decode(latents).unwrap();
        let half = bf16_vae.decode(latents).unwrap();
        let d = max_abs_diff(&full, &half);
        eprintln!("taesd {case}: bf16 vs f32 max abs diff {d:.3e}");
        // bf16 keeps 8 bits of mantissa (relative error up to 2^-9 per rounding) through 19
        // convolutions; measured 6.5e-3 (square) and 8.2e-3 (wide) on images spanning about
        // [-1.3, 1.3]. The bound leaves a factor of ~4 for other CPUs' summation orders.
        assert!(d < 0.03, "taesd {case}: bf16 vs f32 max abs diff {d}");
    }
}

#[test]
fn f16_decode_through_candle_ops_stays_close_to_f32() {
    // f16 on the CPU takes the layers' candle path (the one GPUs use), not the project's kernels.
    let f32_vae = decoder(DType::F32);
    let f16_vae = decoder(DType::F16);
    let g = goldens();
    for case in CASES {
        let latents = &g[&format!("{case}_latents")];
        let full = f32_vae.decode(latents).unwrap();
        let half = f16_vae
            .decode(&latents.to_dtype(DType::F16).unwrap())
            .unwrap();
        assert_eq!(half.dtype(), DType::F16);
        let d = max_abs_diff(&full, &half);
        eprintln!("taesd {case}: f16 vs f32 max abs diff {d:.3e}");
        // f16 keeps 11 bits of mantissa, activations included; measured 1.7e-3 (square) and
        // 2.2e-3 (wide). The bound leaves a factor of ~4.
        assert!(d < 0.01, "taesd {case}: f16 vs f32 max abs diff {d}");
    }
}

#[test]
fn scaling_and_shift_factors_apply_before_decoding() {
    let dir = model_dir();
    let base = TinyVaeConfig::from_file(&dir.join("config.json")).unwrap();
    let g = goldens();
    let latents = &g["wide_latents"];
    let plain = load(&dir, &base, DType::F32);

    // Contract of VaeDecoder::decode: latents / scaling_factor + shift_factor.
    let scaled = TinyVaeConfig {
        scaling_factor: 2.0,
        ..base.clone()
    };
    let got = load(&dir, &scaled, DType::F32)
        .decode(&(latents * 2.0).unwrap())
        .unwrap();
    let d = max_abs_diff(&got, &plain.decode(latents).unwrap());
    // Multiplying and dividing by 2 is exact in floating point.
    assert!(d == 0.0, "scaling_factor: max abs diff {d}");

    let shifted = TinyVaeConfig {
        shift_factor: 0.25,
        ..base
    };
    let got = load(&dir, &shifted, DType::F32).decode(latents).unwrap();
    let want = plain.decode(&(latents + 0.25).unwrap()).unwrap();
    let d = max_abs_diff(&got, &want);
    assert!(d == 0.0, "shift_factor: max abs diff {d}");
    // And the shift does change the image (the check above could not pass by ignoring it).
    assert!(max_abs_diff(&got, &plain.decode(latents).unwrap()) > 1e-3);
}

#[test]
fn latents_of_the_wrong_shape_are_refused() {
    let vae = decoder(DType::F32);
    let three = Tensor::zeros((1, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let err = vae.decode(&three).unwrap_err().to_string();
    assert!(err.contains("[1, 3, 4, 4]") && err.contains("4"), "{err}");
}

#[test]
fn vae_kind_follows_the_class_name() {
    let tiny = ConfigFile::open(&model_dir().join("config.json")).unwrap();
    assert_eq!(VaeKind::from_config(&tiny).unwrap(), VaeKind::Tiny);
    let kl = ConfigFile::open(&fixtures().join("tiny-sd1/vae/config.json")).unwrap();
    assert_eq!(VaeKind::from_config(&kl).unwrap(), VaeKind::Kl);

    let (_tmp, path) = edited_config(|m| {
        m.insert("_class_name".into(), json!("ConsistencyDecoderVAE"));
    });
    let f = ConfigFile::open(&path).unwrap();
    let err = VaeKind::from_config(&f).unwrap_err().to_string();
    assert!(
        err.contains(&path.display().to_string())
            && err.contains("`_class_name`")
            && err.contains("ConsistencyDecoderVAE"),
        "{err}"
    );
}

/// The config of the hub's madebyollin/taesd as diffusers reads it.
#[test]
fn the_real_taesd_config_reads_with_defaults_filled_in() {
    let (_tmp, path) = config_file(json!({
        "_class_name": "AutoencoderTiny",
        "_diffusers_version": "0.20.0.dev0",
        "act_fn": "relu",
        "decoder_block_out_channels": [64, 64, 64, 64],
        "encoder_block_out_channels": [64, 64, 64, 64],
        "force_upcast": false,
        "in_channels": 3,
        "latent_channels": 4,
        "latent_magnitude": 3,
        "latent_shift": 0.5,
        "num_decoder_blocks": [3, 3, 3, 1],
        "num_encoder_blocks": [1, 3, 3, 3],
        "out_channels": 3,
        "scaling_factor": 1.0,
        "upsampling_scaling_factor": 2
    }));
    let c = TinyVaeConfig::from_file(&path).unwrap();
    assert_eq!(c.decoder_block_out_channels, [64, 64, 64, 64]);
    assert_eq!(c.num_decoder_blocks, [3, 3, 3, 1]);
    assert_eq!(c.num_encoder_blocks, [1, 3, 3, 3]);
    assert_eq!(c.latent_channels, 4);
    assert_eq!((c.latent_magnitude, c.latent_shift), (3.0, 0.5));
    assert_eq!((c.scaling_factor, c.shift_factor), (1.0, 0.0));
    assert!(!c.force_upcast);
    assert_eq!(c.scale_factor(), 8);

    // A file with only the class name takes diffusers' defaults, which are TAESD's.
    let (_tmp2, bare) = config_file(json!({"_class_name": "AutoencoderTiny"}));
    assert_eq!(TinyVaeConfig::from_file(&bare).unwrap(), c);
}

fn config_file(value: Value) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&value).unwrap()).unwrap();
    (tmp, path)
}

/// The fixture's config.json with `edit` applied, in a temporary folder.
fn edited_config(edit: impl FnOnce(&mut Map<String, Value>)) -> (tempfile::TempDir, PathBuf) {
    let text = std::fs::read_to_string(model_dir().join("config.json")).unwrap();
    let mut value: Value = serde_json::from_str(&text).unwrap();
    edit(value.as_object_mut().unwrap());
    config_file(value)
}

#[test]
fn bad_configs_name_the_file_and_the_field() {
    // (field, new value or None to remove it, expected part of the message)
    let cases: Vec<(&str, Option<Value>, &str)> = vec![
        (
            "_class_name",
            Some(json!("AutoencoderKL")),
            "expected \"AutoencoderTiny\"",
        ),
        ("_class_name", None, "missing"),
        ("use_attention", Some(json!(true)), "unknown field"),
        ("act_fn", Some(json!("silu")), "only \"relu\""),
        ("upsample_fn", Some(json!("bilinear")), "unsupported value"),
        ("upsampling_scaling_factor", Some(json!(4)), "only 2"),
        (
            "decoder_block_out_channels",
            Some(json!([16, 16, 16])),
            "3 entries for 4 stages",
        ),
        (
            "decoder_block_out_channels",
            Some(json!([16, 32, 32, 32])),
            "different widths",
        ),
        ("scaling_factor", Some(json!(0.0)), "must not be 0"),
        ("latent_channels", Some(json!("four")), "invalid value"),
    ];
    for (field, value, message) in cases {
        let (_tmp, path) = edited_config(|m| match value {
            Some(v) => {
                m.insert(field.into(), v);
            }
            None => {
                m.remove(field);
            }
        });
        let err = TinyVaeConfig::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains(&path.display().to_string())
                && err.contains(&format!("`{field}`"))
                && err.contains(message),
            "{field}: {err}"
        );
    }
    // diffusers lowercases the activation's name; so do we.
    let (_tmp, path) = edited_config(|m| {
        m.insert("act_fn".into(), json!("ReLU"));
    });
    assert!(TinyVaeConfig::from_file(&path).is_ok());
}

#[test]
fn a_config_that_does_not_fit_the_weights_names_the_missing_tensor() {
    // With 2 blocks in the third stage, that stage's conv is looked for at layers.15, where the
    // file has an upsampling (no tensor).
    let (_tmp, path) = edited_config(|m| {
        m.insert("num_decoder_blocks".into(), json!([3, 3, 2, 1]));
    });
    let config = TinyVaeConfig::from_file(&path).unwrap();
    let weights = model_dir().join("diffusion_pytorch_model.safetensors");
    let w = Weights::open(&weights, &Device::Cpu, DType::F32).unwrap();
    let err = TinyVaeDecoder::load(&w, &config).unwrap_err().to_string();
    assert!(
        err.contains(&weights.display().to_string()) && err.contains("decoder.layers."),
        "{err}"
    );
}
