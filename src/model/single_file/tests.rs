//! Configs inferred from the layouts of full-size SD 1.5, SD 2.1 and SDXL base checkpoints
//! (names and shapes only, tests/fixtures/single-file/layouts.json, written by
//! tools/make_single_file.py from diffusers models built on the meta device) are the real
//! models' configs.
use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorInfo};
use serde_json::{json, Map, Value};

use super::*;
use crate::model::{UNetConfig, VaeConfig};
use crate::text::ClipTextConfig;

fn layout(kind: &str) -> HashMap<String, TensorInfo> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/single-file/layouts.json");
    let all: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut offset = 0;
    let mut header = HashMap::new();
    for entry in all[kind].as_array().unwrap() {
        let shape: Vec<usize> = serde_json::from_value(entry[1].clone()).unwrap();
        let bytes = shape.iter().product::<usize>() * 2;
        let info = TensorInfo {
            dtype: Dtype::F16,
            shape,
            data_offsets: (offset, offset + bytes),
        };
        offset += bytes;
        header.insert(entry[0].as_str().unwrap().to_string(), info);
    }
    header
}

fn config(text: &str, changes: Value) -> ConfigFile {
    let mut map: Map<String, Value> = serde_json::from_str(text).unwrap();
    for (k, v) in changes.as_object().unwrap() {
        map.insert(k.clone(), v.clone());
    }
    ConfigFile::from_map("template".into(), map)
}

fn check(kind: &str, unet: &str, texts: &[ConfigFile], vae_scaling: f64) {
    let header = layout(kind);
    let ckpt = Checkpoint::from_header(Path::new(kind), &header, &HashMap::new()).unwrap();
    assert_eq!(
        UNetConfig::from_config(&ckpt.unet.config).unwrap(),
        UNetConfig::from_config(&config(unet, json!({}))).unwrap(),
        "{kind} unet"
    );
    assert_eq!(
        VaeConfig::from_config(&ckpt.vae.config).unwrap(),
        VaeConfig::from_config(&config(VAE, json!({ "scaling_factor": vae_scaling }))).unwrap(),
        "{kind} vae"
    );
    assert_eq!(ckpt.text.len(), texts.len());
    for (got, want) in ckpt.text.iter().zip(texts) {
        assert_eq!(
            ClipTextConfig::from_config(&got.component.config).unwrap(),
            ClipTextConfig::from_config(want).unwrap(),
            "{kind} text encoder"
        );
    }
    // Every tensor of a part lies inside the data the header describes.
    let end = header.values().map(|i| i.data_offsets.1).max().unwrap();
    for part in [&ckpt.unet, &ckpt.vae] {
        let part = part.weights.part.as_ref().unwrap();
        assert!(part.parameter_count() > 0);
        assert!(part.tensors.values().all(|i| i.data_offsets.1 <= end));
    }
}

#[test]
fn sd15_layout_gives_sd15_configs() {
    check("sd1", UNET_SD1, &[config(TEXT_CLIP, json!({}))], 0.18215);
}

#[test]
fn sd21_layout_gives_sd21_configs_reading_the_penultimate_layer() {
    check(
        "sd2",
        UNET_SD2,
        &[config(TEXT_OPEN_CLIP, json!({}))],
        0.18215,
    );
}

#[test]
fn sdxl_layout_gives_sdxl_base_configs() {
    let big_g = json!({
        "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
        "num_hidden_layers": 32, "projection_dim": 1280
    });
    check(
        "sdxl",
        UNET_SDXL,
        &[config(TEXT_CLIP, json!({})), config(TEXT_OPEN_CLIP, big_g)],
        SDXL_VAE_SCALING,
    );
}

#[test]
fn detection_and_stated_prediction() {
    let header = layout("sd2");
    let ckpt = Checkpoint::from_header(Path::new("x"), &header, &HashMap::new()).unwrap();
    assert_eq!(ckpt.kind, Kind::Sd2);
    assert!(ckpt.prediction(None).is_err());
    let meta: HashMap<String, String> = [(
        "modelspec.architecture".to_string(),
        "stable-diffusion-v2-768-v".to_string(),
    )]
    .into();
    let ckpt = Checkpoint::from_header(Path::new("x"), &header, &meta).unwrap();
    assert_eq!(ckpt.prediction(None).unwrap().0, Prediction::V);
    let mut marked = layout("sdxl");
    marked.insert(
        "v_pred".into(),
        TensorInfo {
            dtype: Dtype::F32,
            shape: vec![],
            data_offsets: (0, 4),
        },
    );
    let ckpt = Checkpoint::from_header(Path::new("x"), &marked, &HashMap::new()).unwrap();
    assert_eq!(
        ckpt.prediction(None).unwrap(),
        (Prediction::V, "its v_pred tensor")
    );
    // A UNet tensor nothing reads is an error naming it.
    let mut odd = layout("sd1");
    odd.insert(
        "model.diffusion_model.input_blocks.1.0.extra.weight".into(),
        TensorInfo {
            dtype: Dtype::F16,
            shape: vec![1],
            data_offsets: (0, 2),
        },
    );
    let e = Checkpoint::from_header(Path::new("x"), &odd, &HashMap::new())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("input_blocks.1.0.extra.weight"), "{e}");
}
