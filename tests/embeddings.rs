//! Textual inversion: AUTOMATIC1111's and diffusers' embedding files on the tiny models, against
//! diffusers' own `load_textual_inversion` (plain syntax: prompt embeddings and a whole
//! pipeline's latents) and AUTOMATIC1111's placement of the vectors (its syntax, with emphasis
//! and chunks), and the errors. Goldens: tests/fixtures/embeddings/, made by
//! tools/make_embedding_fixtures.py.
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use latent::model::ModelSource;
use latent::pipeline::StableDiffusion;
use latent::prompt::{PromptSyntax, TextOptions};

mod common;
use common::{assert_close, fixtures, latent, stderr};

fn goldens(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("embeddings").join(name), &Device::Cpu).unwrap()
}

fn load(name: &str, embeddings: &str) -> StableDiffusion {
    let dir = fixtures().join(name);
    let files = ModelSource::parse(&dir.display().to_string(), None)
        .unwrap()
        .open()
        .unwrap();
    let mut m = StableDiffusion::load(&files, &Device::Cpu, DType::F32, &mut |_| {}).unwrap();
    m.load_embeddings(&fixtures().join("embeddings").join(embeddings))
        .unwrap();
    m
}

const PLAIN: TextOptions = TextOptions {
    syntax: PromptSyntax::Plain,
    clip_skip: 1,
};

#[test]
fn plain_prompts_match_diffusers_textual_inversion() {
    let g = goldens("diffusers.safetensors");
    let sd1 = load("tiny-sd1", "sd1");
    let mut names: Vec<&str> = sd1.embeddings().iter().map(|e| e.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["glowfox", "shiny-cat"]);
    let prompts = [
        "a photo of shiny-cat",
        "glowfox and shiny-cat in a field",
        "a plain prompt",
    ];
    for (i, p) in prompts.iter().enumerate() {
        let e = sd1
            .encode_prompt_with(p, "", 1.0, &PLAIN, 4, &mut |_| {})
            .unwrap();
        assert_close(&e.cond.context, &g[&format!("sd1/{i}")], p);
    }
    let xl = load("tiny-sdxl", "sdxl");
    for (i, p) in ["a painting, xl-style", "xl-style"].iter().enumerate() {
        let e = xl
            .encode_prompt_with(p, "", 1.0, &PLAIN, 4, &mut |_| {})
            .unwrap();
        assert_close(&e.cond.context, &g[&format!("sdxl/{i}")], p);
        assert_close(
            e.cond.pooled.as_ref().unwrap(),
            &g[&format!("sdxl/{i}/pooled")],
            p,
        );
    }
    // A whole pipeline: Euler, 4 steps, guidance 7.5, seed 3, 32x32.
    let mut req = common::request(prompts[0], 32, 4, "euler", 3);
    req.sampling.text = PLAIN;
    let out = sd1
        .generate(&req, &latent::Cancel::new(), &mut |_| {})
        .unwrap();
    let got = out.images[0].latents.unsqueeze(0).unwrap();
    assert_close(&got, &g["sd1/latents"], "pipeline latents");
}

#[test]
fn a1111_prompts_place_vectors_as_automatic1111() {
    let g = goldens("a1111.safetensors");
    let a1111 = TextOptions::default();
    let sd1 = load("tiny-sd1", "sd1");
    let long = format!("glowfox {}", "word ".repeat(74));
    for (i, p) in [
        "a photo of shiny-cat",
        "(shiny-cat:1.4), [glowfox]",
        long.as_str(),
    ]
    .iter()
    .enumerate()
    {
        let e = sd1
            .encode_prompt_with(p, "", 1.0, &a1111, 4, &mut |_| {})
            .unwrap();
        assert_close(&e.cond.context, &g[&format!("sd1/{i}")], p);
    }
    let xl = load("tiny-sdxl", "sdxl");
    let p = "(a painting:1.2), xl-style";
    let e = xl
        .encode_prompt_with(p, "", 1.0, &a1111, 4, &mut |_| {})
        .unwrap();
    assert_close(&e.cond.context, &g["sdxl/0"], p);
    assert_close(e.cond.pooled.as_ref().unwrap(), &g["sdxl/0/pooled"], p);
}

#[test]
fn embedding_errors_name_the_file() {
    // An embedding of another width than the model's encoder.
    let dir = fixtures().join("embeddings/other");
    let model = fixtures().join("tiny-sd1");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("never.png");
    let o = latent(&[
        "generate",
        "a cat",
        "--model",
        &model.display().to_string(),
        "--embeddings",
        &dir.display().to_string(),
        "--steps",
        "1",
        "-o",
        &out.display().to_string(),
    ]);
    assert!(!out.exists());
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("wrong-family.safetensors") && err.contains("another model family"),
        "{err}"
    );
    assert_eq!(
        err.trim()
            .lines()
            .filter(|l| l.starts_with("error"))
            .count(),
        1,
        "{err}"
    );
    // A pickle file and a missing folder.
    std::fs::write(tmp.path().join("old.pt"), b"pickle").unwrap();
    let sd1 = fixtures().join("tiny-sd1");
    let files = ModelSource::parse(&sd1.display().to_string(), None)
        .unwrap()
        .open()
        .unwrap();
    let mut m = StableDiffusion::load(&files, &Device::Cpu, DType::F32, &mut |_| {}).unwrap();
    let err = latent::prompt::embeddings::load_file(&tmp.path().join("old.pt"), &[32])
        .unwrap_err()
        .to_string();
    assert!(err.contains("old.pt") && err.contains("pickle"), "{err}");
    let err = m
        .load_embeddings(&tmp.path().join("missing"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing"), "{err}");
}
