//! The prompt side against diffusers' goldens: token ids (both tokenizer loading paths), the
//! text dropped by truncation, text-encoder embeddings, and errors that name the file.
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use latent::model::Weights;
use latent::text::{ClipActivation, ClipTextConfig, ClipTextModel, ClipTokenizer};
use latent::Error;
use serde_json::Value;

mod common;
use common::max_abs_diff;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn cases() -> Value {
    let path = fixtures().join("golden/cases.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The token cases recorded for `model`: (prompt, ids, dropped).
fn token_cases(model: &str) -> Vec<(String, Vec<u32>, Option<String>)> {
    let cases = cases();
    let out: Vec<_> = cases["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["model"] == model)
        .map(|c| {
            let ids = c["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_u64().unwrap() as u32)
                .collect();
            (
                c["prompt"].as_str().unwrap().to_string(),
                ids,
                c["dropped"].as_str().map(str::to_string),
            )
        })
        .collect();
    assert!(out.len() >= 5, "too few token cases for {model}");
    out
}

fn check_tokens(tokenizer: &ClipTokenizer, model: &str) {
    assert_eq!(tokenizer.max_length(), 77);
    let mut truncated = 0;
    for (prompt, ids, dropped) in token_cases(model) {
        let got = tokenizer.encode(&prompt).unwrap();
        assert_eq!(got.ids, ids, "{model}: ids for {prompt:?}");
        assert_eq!(got.dropped, dropped, "{model}: dropped text for {prompt:?}");
        truncated += usize::from(dropped.is_some());
    }
    // The long prompt is in the set, so the dropped-text path was exercised.
    assert_eq!(
        truncated, 1,
        "{model}: expected exactly one truncated prompt"
    );
}

#[test]
fn sd1_tokens_from_vocab_and_merges_match_diffusers() {
    let dir = fixtures().join("tiny-sd1/tokenizer");
    assert!(!dir.join("tokenizer.json").exists());
    let tokenizer = ClipTokenizer::from_dir(&dir).unwrap();
    assert_eq!(tokenizer.pad_id(), 49407);
    check_tokens(&tokenizer, "tiny-sd1");
}

#[test]
fn sd2_tokens_from_tokenizer_json_match_diffusers() {
    let dir = fixtures().join("tiny-sd2/tokenizer");
    assert!(dir.join("tokenizer.json").exists());
    let tokenizer = ClipTokenizer::from_dir(&dir).unwrap();
    assert_eq!(tokenizer.pad_id(), 0);
    check_tokens(&tokenizer, "tiny-sd2");
}

#[test]
fn sd2_tokens_from_vocab_and_merges_match_diffusers() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("tiny-sd2/tokenizer");
    for name in [
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        std::fs::copy(src.join(name), tmp.path().join(name)).unwrap();
    }
    let tokenizer = ClipTokenizer::from_dir(tmp.path()).unwrap();
    check_tokens(&tokenizer, "tiny-sd2");
}

#[test]
fn pad_token_in_a_prompt_is_its_own_token() {
    // SD 2.x pads with "!", a special token, so "!!" is two pad ids there but one BPE token
    // (`!!</w>`, 748) for SD 1.x, as in diffusers.
    let sd1 = ClipTokenizer::from_dir(&fixtures().join("tiny-sd1/tokenizer")).unwrap();
    let sd2 = ClipTokenizer::from_dir(&fixtures().join("tiny-sd2/tokenizer")).unwrap();
    assert_eq!(
        &sd1.encode("cat!!").unwrap().ids[..4],
        &[49406, 2368, 748, 49407]
    );
    assert_eq!(
        &sd2.encode("cat!!").unwrap().ids[..5],
        &[49406, 2368, 0, 0, 49407]
    );
}

#[test]
fn long_prompt_reports_dropped_text() {
    let tokenizer = ClipTokenizer::from_dir(&fixtures().join("tiny-sd1/tokenizer")).unwrap();
    let long = "a red cat, ".repeat(30);
    let got = tokenizer.encode(&long).unwrap();
    assert_eq!(got.ids.len(), 77);
    assert_eq!(got.ids[76], 49407);
    // 30 x 4 tokens; 75 kept (18 whole repeats and "a red cat"), the last 45 dropped.
    let dropped = got.dropped.expect("long prompt must report dropped text");
    assert!(
        dropped.starts_with(", a red cat , a red"),
        "dropped: {dropped:?}"
    );
    assert_eq!(dropped.split(' ').count(), 45, "dropped: {dropped:?}");
    assert_eq!(tokenizer.encode("a red cat").unwrap().dropped, None);
}

fn load_encoder(model: &str, dtype: DType) -> (ClipTokenizer, ClipTextModel) {
    let root = fixtures().join(model);
    let tokenizer = ClipTokenizer::from_dir(&root.join("tokenizer")).unwrap();
    let config = ClipTextConfig::from_file(&root.join("text_encoder/config.json")).unwrap();
    let weights = Weights::open(
        &root.join("text_encoder/model.safetensors"),
        &Device::Cpu,
        dtype,
    )
    .unwrap();
    (tokenizer, ClipTextModel::load(&weights, &config).unwrap())
}

fn embed(tokenizer: &ClipTokenizer, model: &ClipTextModel, prompts: &[&str]) -> Tensor {
    let ids: Vec<u32> = prompts
        .iter()
        .flat_map(|p| tokenizer.encode(p).unwrap().ids)
        .collect();
    let ids = Tensor::from_vec(ids, (prompts.len(), tokenizer.max_length()), &Device::Cpu).unwrap();
    model.forward(&ids).unwrap()
}

/// (model, prompt, golden (1, 77, hidden)) for every embedding case.
fn embedding_goldens() -> Vec<(String, String, Tensor)> {
    let cases = cases();
    let file = fixtures()
        .join("golden")
        .join(cases["embeddings"]["file"].as_str().unwrap());
    let tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    cases["embeddings"]["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["model"].as_str().unwrap().to_string(),
                c["prompt"].as_str().unwrap().to_string(),
                tensors[c["key"].as_str().unwrap()].clone(),
            )
        })
        .collect()
}

#[test]
fn embeddings_match_diffusers_f32() {
    let goldens = embedding_goldens();
    assert!(goldens.len() >= 8);
    let mut worst = 0f32;
    for model in ["tiny-sd1", "tiny-sd2"] {
        let (tokenizer, encoder) = load_encoder(model, DType::F32);
        for (_, prompt, golden) in goldens.iter().filter(|g| g.0 == model) {
            let got = embed(&tokenizer, &encoder, &[prompt]);
            assert_eq!(got.dims(), golden.dims());
            let d = max_abs_diff(&got, golden);
            // Tolerance: max abs diff 1e-4 (measured 1.9e-6 on x86-64; values are O(1);
            // tanh-GELU in place of erf-GELU would give 4e-4).
            assert!(d < 1e-4, "{model} {prompt:?}: max abs diff {d}");
            worst = worst.max(d);
        }
    }
    eprintln!("text embeddings f32: worst max abs diff {worst:e}");
}

#[test]
fn embeddings_f16_stay_close() {
    let goldens = embedding_goldens();
    let (tokenizer, encoder) = load_encoder("tiny-sd1", DType::F16);
    let (_, prompt, golden) = goldens.iter().find(|g| g.0 == "tiny-sd1").unwrap();
    let got = embed(&tokenizer, &encoder, &[prompt]);
    // Computed in f16; embeddings come back in f32, as the pipeline uses them.
    assert_eq!(got.dtype(), DType::F32);
    let d = max_abs_diff(&got, golden);
    // Tolerance: max abs diff 2e-2 in f16 (measured 3.1e-3; f16 has ~1e-3 relative precision).
    assert!(d < 2e-2, "f16 max abs diff {d}");
    eprintln!("text embeddings f16: max abs diff {d:e}");
}

#[test]
fn batch_equals_single() {
    let (tokenizer, encoder) = load_encoder("tiny-sd2", DType::F32);
    let batch = embed(&tokenizer, &encoder, &["a photo of a cat", ""]);
    let second = embed(&tokenizer, &encoder, &[""]);
    let d = max_abs_diff(&batch.narrow(0, 1, 1).unwrap(), &second);
    // Tolerance: 1e-6 (same kernels; only summation order could differ).
    assert!(d < 1e-6, "batch vs single: {d}");
    let first = embed(&tokenizer, &encoder, &["a photo of a cat"]);
    assert!(max_abs_diff(&batch.narrow(0, 0, 1).unwrap(), &first) < 1e-6);
    assert!(max_abs_diff(&first, &second) > 1e-2, "prompts must matter");
}

#[test]
fn config_reads_activation_and_sizes() {
    let c =
        ClipTextConfig::from_file(&fixtures().join("tiny-sd1/text_encoder/config.json")).unwrap();
    assert_eq!(c.hidden_act, ClipActivation::QuickGelu);
    assert_eq!(
        (c.vocab_size, c.hidden_size, c.num_hidden_layers),
        (49408, 32, 2)
    );
    let c =
        ClipTextConfig::from_file(&fixtures().join("tiny-sd2/text_encoder/config.json")).unwrap();
    assert_eq!(c.hidden_act, ClipActivation::Gelu);
}

/// The tiny-sd1 text encoder config with `edit` applied, written to a temp file.
fn edited_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> PathBuf {
    let src = fixtures().join("tiny-sd1/text_encoder/config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(src).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
    path
}

#[test]
fn bad_configs_name_file_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let path = edited_config(tmp.path(), |m| {
        m.insert("hidden_act".into(), "relu".into());
    });
    match ClipTextConfig::from_file(&path) {
        Err(Error::Config { path: p, field, .. }) => {
            assert_eq!(p, path);
            assert_eq!(field, "hidden_act");
        }
        other => panic!("expected a config error, got {other:?}"),
    }
    let path = edited_config(tmp.path(), |m| {
        m.remove("hidden_size");
    });
    let err = ClipTextConfig::from_file(&path).unwrap_err();
    assert!(
        matches!(&err, Error::Config { field, .. } if field == "hidden_size"),
        "{err:?}"
    );
    assert!(err.to_string().contains(&path.display().to_string()));

    std::fs::write(&path, "{ not json").unwrap();
    assert!(matches!(
        ClipTextConfig::from_file(&path),
        Err(Error::Json { path: p, .. }) if p == path
    ));
    let missing = tmp.path().join("nope/config.json");
    assert!(matches!(
        ClipTextConfig::from_file(&missing),
        Err(Error::MissingFile { path: p, .. }) if p == missing
    ));
}

#[test]
fn weights_that_do_not_fit_the_config_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let path = edited_config(tmp.path(), |m| {
        m.insert("intermediate_size".into(), 128.into());
    });
    let config = ClipTextConfig::from_file(&path).unwrap();
    let weights = Weights::open(
        &fixtures().join("tiny-sd1/text_encoder/model.safetensors"),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    match ClipTextModel::load(&weights, &config) {
        Err(Error::TensorShape { name, .. }) => {
            assert_eq!(name, "text_model.encoder.layers.0.mlp.fc1.weight")
        }
        other => panic!("expected a shape error, got {other:?}"),
    }
}

#[test]
fn missing_tokenizer_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let err = ClipTokenizer::from_dir(tmp.path()).unwrap_err();
    assert!(
        matches!(&err, Error::MissingFile { path, .. } if path.ends_with("tokenizer_config.json")),
        "{err:?}"
    );

    let src = fixtures().join("tiny-sd1/tokenizer");
    std::fs::copy(
        src.join("tokenizer_config.json"),
        tmp.path().join("tokenizer_config.json"),
    )
    .unwrap();
    let err = ClipTokenizer::from_dir(tmp.path()).unwrap_err();
    assert!(
        matches!(&err, Error::MissingFile { path, .. } if path.ends_with("vocab.json")),
        "{err:?}"
    );
    assert!(err.to_string().contains("merges.txt"), "hint: {err}");

    std::fs::copy(src.join("vocab.json"), tmp.path().join("vocab.json")).unwrap();
    let err = ClipTokenizer::from_dir(tmp.path()).unwrap_err();
    assert!(
        matches!(&err, Error::MissingFile { path, .. } if path.ends_with("merges.txt")),
        "{err:?}"
    );

    std::fs::write(tmp.path().join("vocab.json"), "[1, 2").unwrap();
    std::fs::copy(src.join("merges.txt"), tmp.path().join("merges.txt")).unwrap();
    let err = ClipTokenizer::from_dir(tmp.path()).unwrap_err();
    assert!(
        matches!(&err, Error::Json { path, .. } if path.ends_with("vocab.json")),
        "{err:?}"
    );

    std::fs::write(
        tmp.path().join("tokenizer_config.json"),
        "{\"pad_token\": 3}",
    )
    .unwrap();
    let err = ClipTokenizer::from_dir(tmp.path()).unwrap_err();
    assert!(
        matches!(&err, Error::Config { field, .. } if field == "pad_token"),
        "{err:?}"
    );
}

#[test]
fn corrupt_tokenizer_json_is_a_tokenizer_error() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("tiny-sd2/tokenizer");
    std::fs::copy(
        src.join("tokenizer_config.json"),
        tmp.path().join("tokenizer_config.json"),
    )
    .unwrap();
    std::fs::write(tmp.path().join("tokenizer.json"), "{\"model\": 1}").unwrap();
    let err = ClipTokenizer::from_dir(tmp.path()).unwrap_err();
    assert!(
        matches!(&err, Error::Tokenizer(m) if m.contains("tokenizer.json")),
        "{err:?}"
    );
}

#[test]
fn encoders_saved_without_the_text_model_level_load_the_same() {
    // transformers >= 5.6 saves CLIPTextModel's tensors at the top of the file.
    let (tokenizer, nested) = load_encoder("tiny-sd1", DType::F32);
    let root = fixtures().join("tiny-sd1/text_encoder");
    let tensors =
        candle_core::safetensors::load(root.join("model.safetensors"), &Device::Cpu).unwrap();
    let flat: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("text_model.").unwrap_or(&k).to_string(), v))
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("model.safetensors");
    candle_core::safetensors::save(&flat, &path).unwrap();
    let config = ClipTextConfig::from_file(&root.join("config.json")).unwrap();
    let weights = Weights::open(&path, &Device::Cpu, DType::F32).unwrap();
    let model = ClipTextModel::load(&weights, &config).unwrap();
    let prompts = ["a photo of a cat"];
    let diff = max_abs_diff(
        &embed(&tokenizer, &model, &prompts),
        &embed(&tokenizer, &nested, &prompts),
    );
    assert_eq!(diff, 0.0);
}
