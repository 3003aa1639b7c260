//! img2img and inpainting against diffusers' own pipelines on the tiny models (img2img with
//! every scheduler family, the tiny VAE, SDXL and LCM; legacy 4-channel and 9-channel
//! inpainting), then the command line and its errors. Goldens: tests/fixtures/img2img/, made by
//! tools/make_img2img_fixtures.py.
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use latent::model::ModelSource;
use latent::pipeline::{
    mask_luma, read_image, GenerateRequest, ImageInput, LoadOptions, Residency, Sampling,
    StableDiffusion,
};
use latent::prompt::{PromptSyntax, TextOptions};
use latent::Setting;

mod common;
use common::{assert_close, fixtures, latent, max_abs, max_abs_diff, stderr};

fn goldens() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join("img2img/diffusers.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn files(name: &str) -> latent::model::ModelFiles {
    let dir = fixtures().join(name);
    ModelSource::parse(&dir.display().to_string(), None)
        .unwrap()
        .open()
        .unwrap()
}

fn load(name: &str) -> StableDiffusion {
    StableDiffusion::load(&files(name), &Device::Cpu, DType::F32, &mut |_| {}).unwrap()
}

fn input(image: &str, mask: Option<&str>, strength: f64) -> Arc<ImageInput> {
    let dir = fixtures().join("img2img");
    let image = read_image(&dir.join(image), Setting::InitImage).unwrap();
    let mask = mask.map(|m| mask_luma(&read_image(&dir.join(m), Setting::Mask).unwrap()));
    Arc::new(ImageInput::new(image, mask, strength))
}

const PLAIN: TextOptions = TextOptions {
    syntax: PromptSyntax::Plain,
    clip_skip: 1,
};

struct Case<'a> {
    scheduler: &'a str,
    steps: usize,
    strength: f64,
    guidance: f64,
    negative: &'a str,
    size: usize,
}

fn request(case: &Case, image: Arc<ImageInput>) -> GenerateRequest {
    let (scheduler, karras) = match case.scheduler.strip_suffix("-karras") {
        Some(s) => (s, true),
        None => (case.scheduler, false),
    };
    GenerateRequest {
        prompt: "a photo of a cat".into(),
        negative_prompt: case.negative.into(),
        sampling: Sampling {
            width: case.size,
            height: case.size,
            steps: case.steps,
            guidance: case.guidance,
            scheduler: scheduler.parse().unwrap(),
            karras,
            rng: latent::noise::RngKind::Torch,
            size_conditioning: Default::default(),
            preview_every: None,
            text: PLAIN,
            image: Some(image),
        },
        seeds: vec![3],
        batch_size: 1,
        latents: None,
    }
}

fn run(model: &StableDiffusion, req: &GenerateRequest) -> latent::pipeline::Generation {
    model
        .generate(req, &latent::Cancel::new(), &mut |_| {})
        .unwrap()
}

fn check(model: &StableDiffusion, key: &str, case: Case, image: &str, mask: Option<&str>) {
    let g = goldens();
    let image = input(image, mask, case.strength);
    let out = run(model, &request(&case, image));
    let got = out.images[0].latents.unsqueeze(0).unwrap();
    assert_close(&got, &g[key], key);
}

fn sd1(scheduler: &str, steps: usize, strength: f64) -> Case<'_> {
    Case {
        scheduler,
        steps,
        strength,
        guidance: 7.5,
        negative: "blurry",
        size: 32,
    }
}

#[test]
fn img2img_matches_diffusers_with_every_scheduler() {
    let model = load("tiny-sd1");
    for (key, sched, steps, strength) in [
        ("sd1/euler", "euler", 8, 0.6),
        ("sd1/euler-a", "euler-a", 6, 0.75),
        ("sd1/dpm++2m-karras", "dpm++2m-karras", 10, 0.5),
        ("sd1/ddim", "ddim", 5, 0.8),
        ("sd1/pndm", "pndm", 5, 0.6),
    ] {
        let case = sd1(sched, steps, strength);
        check(&model, key, case, "init.png", None);
    }
}

#[test]
fn img2img_image_matches_diffusers_to_one_level() {
    let g = goldens();
    let model = load("tiny-sd1");
    let case = sd1("euler", 8, 0.6);
    let out = run(&model, &request(&case, input("init.png", None, 0.6)));
    let want: Vec<u8> = g["sd1/euler/image"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let worst = out.images[0]
        .rgb
        .iter()
        .zip(&want)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert_eq!(out.images[0].rgb.len(), want.len());
    assert!(worst <= 1, "image differs by {worst}/255");
}

#[test]
fn img2img_with_the_tiny_vae_matches_diffusers() {
    let vae = files("tiny-taesd");
    let options = LoadOptions {
        residency: Residency::Resident,
        vae: Some(&vae),
        ..LoadOptions::default()
    };
    let model = StableDiffusion::load_opts(
        &files("tiny-sd1"),
        &Device::Cpu,
        DType::F32,
        &options,
        &mut |_| {},
    )
    .unwrap();
    let case = Case {
        negative: "",
        ..sd1("euler", 6, 0.7)
    };
    check(&model, "sd1-taesd/euler", case, "init.png", None);
}

#[test]
fn legacy_inpainting_matches_diffusers() {
    let model = load("tiny-sd1");
    for (key, sched, steps, strength) in [
        ("sd1-inpaint-legacy/euler", "euler", 6, 1.0),
        ("sd1-inpaint-legacy/ddim", "ddim", 6, 0.7),
        ("sd1-inpaint-legacy/euler-a", "euler-a", 5, 0.8),
    ] {
        let case = Case {
            negative: "",
            ..sd1(sched, steps, strength)
        };
        check(&model, key, case, "init.png", Some("mask.png"));
    }
}

#[test]
fn inpainting_unet_matches_diffusers() {
    let model = load("tiny-sd1-inpaint");
    assert!(model.is_inpainting_model());
    for (key, sched, steps, strength) in [
        ("sd1-inpaint/euler-a", "euler-a", 6, 1.0),
        ("sd1-inpaint/dpm++2m", "dpm++2m", 8, 0.6),
    ] {
        let case = Case {
            negative: "",
            ..sd1(sched, steps, strength)
        };
        check(&model, key, case, "init.png", Some("mask.png"));
    }
}

#[test]
fn sdxl_img2img_and_inpainting_match_diffusers() {
    let model = load("tiny-sdxl");
    let size = model.default_size();
    let case = |strength| Case {
        scheduler: "euler",
        steps: 5,
        strength,
        guidance: 5.0,
        negative: "",
        size,
    };
    check(&model, "sdxl/euler", case(0.6), "init-xl.png", None);
    check(
        &model,
        "sdxl-inpaint-legacy/euler",
        case(0.8),
        "init-xl.png",
        Some("mask-xl.png"),
    );
}

#[test]
fn lcm_img2img_matches_diffusers() {
    let model = load("tiny-lcm");
    let case = Case {
        scheduler: "lcm",
        steps: 4,
        strength: 0.5,
        guidance: 8.0,
        negative: "",
        size: 32,
    };
    check(&model, "lcm/lcm", case, "init.png", None);
}

#[test]
fn batched_images_equal_images_made_alone() {
    let model = load("tiny-sd1");
    let image = input("init.png", Some("mask.png"), 0.7);
    let case = Case {
        negative: "",
        ..sd1("euler-a", 4, 0.7)
    };
    let mut req = request(&case, image);
    req.seeds = vec![5, 6];
    req.batch_size = 2;
    let both = run(&model, &req);
    for (i, seed) in [5u64, 6].iter().enumerate() {
        req.seeds = vec![*seed];
        req.batch_size = 1;
        let alone = run(&model, &req);
        let d = max_abs_diff(&both.images[i].latents, &alone.images[0].latents);
        assert!(
            d <= 1e-5 * max_abs(&alone.images[0].latents),
            "seed {seed}: {d}"
        );
    }
}

#[test]
fn bad_image_inputs_are_refused_before_work() {
    let model = load("tiny-sd1");
    let case = sd1("euler", 4, 0.1);
    let err = model
        .check_inputs(&request(&case, input("init.png", None, 0.1)))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("strength 0.1") && err.contains("no step"),
        "{err}"
    );
    let case = sd1("euler", 4, 1.5);
    let err = model
        .check_inputs(&request(&case, input("init.png", None, 1.5)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("at most 1"), "{err}");
    let inpaint = load("tiny-sd1-inpaint");
    let err = inpaint
        .check_inputs(&request(
            &sd1("euler", 4, 0.5),
            input("init.png", None, 0.5),
        ))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("inpainting model") && err.contains("mask"),
        "{err}"
    );
}

fn generate(dir: &Path, extra: &[&str]) -> std::process::Output {
    let model = fixtures().join("tiny-sd1");
    let out = dir.join("out.png");
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt-syntax",
        "plain",
        "a photo of a cat",
        "--steps",
        "8",
        "--scheduler",
        "euler",
        "--seed",
        "3",
        "--neg",
        "blurry",
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    latent(&args)
}

#[test]
fn cli_img2img_takes_the_size_of_the_init_image_and_records_it() {
    let dir = tempfile::tempdir().unwrap();
    let init = fixtures().join("img2img/init.png");
    let o = generate(
        dir.path(),
        &["--init-image", init.to_str().unwrap(), "--strength", "0.6"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let png = image::open(dir.path().join("out.png")).unwrap().to_rgb8();
    assert_eq!(png.dimensions(), (32, 32));
    let want: Vec<u8> = goldens()["sd1/euler/image"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let worst = png
        .as_raw()
        .iter()
        .zip(&want)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(worst <= 1, "{worst}");
    let text = std::fs::read(dir.path().join("out.png")).unwrap();
    let text = String::from_utf8_lossy(&text);
    assert!(
        text.contains("Denoising strength: 0.6"),
        "parameters lack the strength"
    );
}

#[test]
fn cli_errors_name_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.png");
    let o = generate(dir.path(), &["--init-image", missing.to_str().unwrap()]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("nope.png"), "{e}");
    let junk = dir.path().join("junk.png");
    std::fs::write(&junk, b"not a picture").unwrap();
    let o = generate(dir.path(), &["--init-image", junk.to_str().unwrap()]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("--init-image"), "{e}");
    let init = fixtures().join("img2img/init.png");
    let o = generate(dir.path(), &["--mask", init.to_str().unwrap()]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("--init-image"), "{e}");
    let o = generate(
        dir.path(),
        &["--init-image", init.to_str().unwrap(), "--strength", "0"],
    );
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("--strength"), "{e}");
    assert!(!dir.path().join("out.png").exists());
}
