//! Whole-pipeline parity with diffusers' StableDiffusionPipeline on the tiny models: final
//! latents and decoded images for every scheduler, with and without guidance, negative
//! prompts, non-square sizes, given latents, SD1 (epsilon) and SD2 (v-prediction) models.
//! Goldens: tests/fixtures/golden/cases.json, made by tools/make_tiny_models.py.
use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device};
use latent::model::ModelSource;
use latent::noise::RngKind;
use latent::pipeline::{
    load_latents, Event, GenerateRequest, Residency, Sampling, StableDiffusion,
};
use serde_json::Value;

mod common;
use common::{assert_matches_golden, copy_dir, fixtures, max_abs_diff};

fn load_model(name: &str) -> StableDiffusion {
    let files = ModelSource::parse(&fixtures().join(name).display().to_string(), None)
        .unwrap()
        .open()
        .unwrap();
    StableDiffusion::load(&files, &Device::Cpu, DType::F32, &mut |_| {}).unwrap()
}

fn run_case(case: &Value, models: &mut HashMap<String, StableDiffusion>) {
    let name = case["name"].as_str().unwrap();
    let model_name = case["model"].as_str().unwrap().to_string();
    let model = models
        .entry(model_name.clone())
        .or_insert_with(|| load_model(&model_name));
    let seed = case["seed"].as_u64().unwrap();
    let n = case["num_images"].as_u64().unwrap();
    let latents = case["latents"]
        .get("safetensors")
        .map(|f| load_latents(&fixtures().join("golden").join(f.as_str().unwrap())).unwrap());
    let req = GenerateRequest {
        prompt: case["prompt"].as_str().unwrap().into(),
        negative_prompt: case["negative_prompt"].as_str().unwrap().into(),
        sampling: Sampling {
            width: case["width"].as_u64().unwrap() as usize,
            height: case["height"].as_u64().unwrap() as usize,
            steps: case["steps"].as_u64().unwrap() as usize,
            guidance: case["guidance"].as_f64().unwrap(),
            scheduler: case["scheduler"].as_str().unwrap().parse().unwrap(),
            karras: case["karras"].as_bool().unwrap(),
            rng: RngKind::Torch,
            size_conditioning: Default::default(),
            preview_every: None,
            text: Default::default(),
            image: None,
        },
        seeds: (0..n).map(|i| seed + i).collect(),
        batch_size: n as usize,
        latents,
    };
    let s = &req.sampling;
    // The scheduler's timesteps equal diffusers' as the UNet sees them (it embeds them in f32;
    // diffusers keeps Euler's Karras timesteps in f64, tests/schedulers.rs covers them).
    let sched = model.scheduler(s.scheduler, s.steps, s.karras).unwrap();
    let want_t: Vec<f64> = case["timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let as_f32 = |v: &[f64]| v.iter().map(|&t| t as f32).collect::<Vec<f32>>();
    assert_eq!(
        as_f32(sched.timesteps()),
        as_f32(&want_t),
        "{name}: timesteps"
    );

    let out = model
        .generate(&req, &latent::Cancel::new(), &mut |_| {})
        .unwrap();
    let golden = candle_core::safetensors::load(
        fixtures()
            .join("golden")
            .join(case["file"].as_str().unwrap()),
        &Device::Cpu,
    )
    .unwrap();
    assert_matches_golden(name, &out.images, &golden);
}

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(fixtures().join("golden/cases.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["pipeline"].as_array().unwrap().clone()
}

#[test]
fn every_golden_case_matches_diffusers() {
    let mut models = HashMap::new();
    let all = cases();
    assert!(all.len() >= 14, "expected the full golden set");
    for case in &all {
        run_case(case, &mut models);
    }
}

#[test]
fn image_in_a_batch_equals_image_alone() {
    let model = load_model("tiny-sd1");
    let mut req = GenerateRequest {
        prompt: "a photo of a cat".into(),
        negative_prompt: String::new(),
        sampling: Sampling {
            width: 64,
            height: 64,
            steps: 4,
            guidance: 7.5,
            scheduler: "euler-a".parse().unwrap(),
            karras: false,
            rng: RngKind::Torch,
            size_conditioning: Default::default(),
            preview_every: None,
            text: Default::default(),
            image: None,
        },
        seeds: vec![5, 6, 7],
        batch_size: 3,
        latents: None,
    };
    let batched = model
        .generate(&req, &latent::Cancel::new(), &mut |_| {})
        .unwrap();
    req.seeds = vec![6];
    req.batch_size = 1;
    let alone = model
        .generate(&req, &latent::Cancel::new(), &mut |_| {})
        .unwrap();
    let d = max_abs_diff(&batched.images[1].latents, &alone.images[0].latents);
    // Same math, different batch size: only summation-order differences.
    eprintln!("batch vs alone: latents max abs diff {d:.2e}");
    assert!(d <= 1e-4, "batch vs alone: {d}");
}

#[test]
fn interrupt_stops_between_steps_and_skip_abandons_one_batch() {
    let model = load_model("tiny-sd1");
    let req = GenerateRequest {
        prompt: "a photo of a cat".into(),
        negative_prompt: String::new(),
        sampling: Sampling {
            width: 64,
            height: 64,
            steps: 4,
            guidance: 7.5,
            scheduler: "euler".parse().unwrap(),
            karras: false,
            rng: RngKind::Torch,
            size_conditioning: Default::default(),
            preview_every: None,
            text: Default::default(),
            image: None,
        },
        seeds: vec![1],
        batch_size: 1,
        latents: None,
    };
    for (name, raise) in [
        (
            "interrupt",
            latent::Cancel::interrupt as fn(&latent::Cancel),
        ),
        ("skip", latent::Cancel::skip),
    ] {
        let cancel = latent::Cancel::new();
        let mut steps = 0;
        let result = model.generate(&req, &cancel, &mut |e| {
            if let latent::pipeline::Event::Step { .. } = e {
                steps += 1;
                if steps == 2 {
                    raise(&cancel);
                }
            }
        });
        let err = result
            .err()
            .unwrap_or_else(|| panic!("{name}: the run finished"));
        let want = if name == "interrupt" {
            "interrupted"
        } else {
            "skipped"
        };
        assert_eq!(err.to_string(), want, "{name}");
        assert_eq!(steps, 2, "{name}: steps run after the request");
    }
}

#[test]
fn npy_and_safetensors_latents_are_the_same() {
    let dir = fixtures().join("golden");
    let a = load_latents(&dir.join("init_latents.safetensors")).unwrap();
    let b = load_latents(&dir.join("init_latents.npy")).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

fn load_with(
    dir: &Path,
    residency: Residency,
    events: &mut Vec<String>,
) -> latent::Result<StableDiffusion> {
    let files = ModelSource::parse(&dir.display().to_string(), None)
        .unwrap()
        .open()
        .unwrap();
    StableDiffusion::load_with(&files, &Device::Cpu, DType::F32, residency, &mut |e| {
        if let Event::Loading { component } = e {
            events.push(component.to_string());
        }
    })
}

#[test]
fn staged_model_makes_the_same_images_loading_each_component_once() {
    let dir = fixtures().join("tiny-sd1");
    let mut events = Vec::new();
    let resident = load_with(&dir, Residency::Resident, &mut events).unwrap();
    let mut events = Vec::new();
    let staged = load_with(&dir, Residency::Staged, &mut events).unwrap();
    // At load: the VAE is checked (then dropped), the text encoder stays for the first stage.
    assert_eq!(events, ["tokenizer", "vae", "text encoder"]);
    let req = GenerateRequest {
        prompt: "a photo of a cat".into(),
        negative_prompt: "blurry".into(),
        sampling: Sampling {
            width: 64,
            height: 64,
            steps: 3,
            guidance: 7.5,
            scheduler: "dpm++2m".parse().unwrap(),
            karras: false,
            rng: RngKind::Torch,
            size_conditioning: Default::default(),
            preview_every: None,
            text: Default::default(),
            image: None,
        },
        seeds: vec![3, 4, 5],
        batch_size: 2,
        latents: None,
    };
    let want = resident
        .generate(&req, &latent::Cancel::new(), &mut |_| {})
        .unwrap();
    let mut events = Vec::new();
    let got = staged
        .generate(&req, &latent::Cancel::new(), &mut |e| {
            if let Event::Loading { component } = e {
                events.push(component.to_string());
            }
        })
        .unwrap();
    // Two batches: the UNet runs both before the VAE decodes them, one load each.
    assert_eq!(events, ["unet", "vae"]);
    assert_eq!(got.images.len(), 3);
    for (a, b) in want.images.iter().zip(&got.images) {
        assert_eq!(a.seed, b.seed);
        assert_eq!(a.rgb, b.rgb);
        assert_eq!(max_abs_diff(&a.latents, &b.latents), 0.0);
    }
    // A second run reloads what the first dropped (the text encoder) and still agrees.
    let again = staged
        .generate(&req, &latent::Cancel::new(), &mut |_| {})
        .unwrap();
    assert_eq!(again.images[2].rgb, want.images[2].rgb);
    assert!(staged.load_time() > std::time::Duration::ZERO);
}

#[test]
fn staged_load_checks_the_vae_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("model");
    copy_dir(&fixtures().join("tiny-sd1"), &m);
    let cfg_path = m.join("vae/config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let first = cfg["block_out_channels"][0].as_u64().unwrap();
    cfg["block_out_channels"][0] = (first * 2).into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = load_with(&m, Residency::Staged, &mut Vec::new())
        .err()
        .expect("a VAE that disagrees with its config must fail at load")
        .to_string();
    assert!(err.contains("vae") && err.contains("expected"), "{err}");
}
