//! LoRA on the tiny models: kohya / AUTOMATIC1111 files (LoCon convolutions, text-encoder
//! layers, SDXL's SGM names and two text encoders) and diffusers / PEFT files against diffusers
//! pipelines with the same weights merged, `<lora:NAME:WEIGHT>` tags, weight 0, switching sets
//! without drift, and the errors. Goldens: tests/fixtures/lora/, made by
//! tools/make_lora_fixtures.py.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use latent::lora::LoraSpec;
use latent::model::ModelSource;
use latent::pipeline::{LoadOptions, LoraSettings, StableDiffusion};

mod common;
use common::{fixtures, latent, max_abs, max_abs_diff, request, stderr};

const PROMPT: &str = "a photo of a cat";

fn goldens() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("lora/diffusers.safetensors"), &Device::Cpu)
        .unwrap()
}

fn lora_dir(family: &str) -> PathBuf {
    fixtures().join("lora").join(family)
}

fn lora(family: &str, name: &str, weight: f64) -> LoraSpec {
    LoraSpec::new(lora_dir(family).join(format!("{name}.safetensors")), weight)
}

/// The tiny model `name` with LoRA folder `dir` and `base` LoRAs.
fn try_load(name: &str, dir: &Path, base: &[LoraSpec]) -> latent::Result<StableDiffusion> {
    try_load_in(name, dir, base, DType::F32)
}

/// [`try_load`] in `dtype`.
fn try_load_in(
    name: &str,
    dir: &Path,
    base: &[LoraSpec],
    dtype: DType,
) -> latent::Result<StableDiffusion> {
    let files = ModelSource::parse(&fixtures().join(name).display().to_string(), None)?.open()?;
    let options = LoadOptions {
        lora: LoraSettings {
            dir: Some(dir.to_path_buf()),
            base: base.to_vec(),
        },
        ..LoadOptions::default()
    };
    StableDiffusion::load_opts(&files, &Device::Cpu, dtype, &options, &mut |_| {})
}

fn load(name: &str, dir: &Path, base: &[LoraSpec]) -> StableDiffusion {
    try_load(name, dir, base).unwrap()
}

/// Final latents of the goldens' run: Euler, 4 steps, guidance 7.5, seed 3, 32x32.
fn run(model: &StableDiffusion, prompt: &str) -> Tensor {
    let req = request(prompt, 32, 4, "euler", 3);
    let out = model
        .generate(&req, &latent::Cancel::new(), &mut |_| {})
        .unwrap();
    out.images[0].latents.unsqueeze(0).unwrap()
}

/// Latents within 1e-5 of their range of diffusers' (f32 both sides; summation order differs).
fn assert_close(got: &Tensor, want: &Tensor, what: &str) {
    let diff = max_abs_diff(got, want);
    let range = max_abs(want).max(1.0);
    assert!(
        diff <= 1e-5 * range,
        "{what}: max |diff| {diff:e} (range {range})"
    );
    eprintln!("{what}: max |diff| {diff:.2e} (range {range:.1})");
}

#[test]
fn kohya_and_peft_files_match_diffusers() {
    let g = goldens();
    let dir = lora_dir("sd1");
    for (name, loras) in [
        ("sd1/none", vec![]),
        ("sd1/kohya/1.0", vec![lora("sd1", "kohya-style", 1.0)]),
        ("sd1/kohya/0.6", vec![lora("sd1", "kohya-style", 0.6)]),
        ("sd1/peft/1.0", vec![lora("sd1", "peft-style", 1.0)]),
        (
            "sd1/both",
            vec![
                lora("sd1", "kohya-style", 0.5),
                lora("sd1", "peft-style", 0.8),
            ],
        ),
    ] {
        let model = load("tiny-sd1", &dir, &loras);
        assert_close(&run(&model, PROMPT), &g[name], name);
    }
    // The LoRAs change the picture: the goldens are not all the same.
    assert!(max_abs_diff(&g["sd1/none"], &g["sd1/kohya/1.0"]) > 1.0);
}

#[test]
fn sdxl_kohya_file_with_sgm_names_and_two_text_encoders_matches_diffusers() {
    let g = goldens();
    let model = load("tiny-sdxl", &lora_dir("sdxl"), &[]);
    assert_close(&run(&model, PROMPT), &g["sdxl/none"], "sdxl/none");
    let tagged = format!("{PROMPT}<lora:xl-kohya:0.8>");
    assert_close(
        &run(&model, &tagged),
        &g["sdxl/kohya/0.8"],
        "sdxl/kohya/0.8",
    );
}

#[test]
fn prompt_tags_apply_their_loras_and_leave_the_text() {
    let g = goldens();
    let model = load("tiny-sd1", &lora_dir("sd1"), &[]);
    let got = run(&model, &format!("<lora:kohya-style:0.6>{PROMPT}"));
    assert_close(&got, &g["sd1/kohya/0.6"], "tag kohya 0.6");
    let got = run(
        &model,
        &format!("{PROMPT}<lora:peft-style:0.8><lora:kohya-style:0.5>"),
    );
    assert_close(&got, &g["sd1/both"], "two tags");
    // A tag overrides the weight of the same LoRA given for every prompt.
    let model = load(
        "tiny-sd1",
        &lora_dir("sd1"),
        &[lora("sd1", "kohya-style", 1.0)],
    );
    assert_close(&run(&model, PROMPT), &g["sd1/kohya/1.0"], "base LoRA");
    let got = run(&model, &format!("{PROMPT}<lora:kohya-style:0.6>"));
    assert_close(&got, &g["sd1/kohya/0.6"], "tag over base");
}

#[test]
fn reduced_precision_merges_in_f32_then_rounds() {
    // bf16 on the CPU reads weights through the host path, f16 through candle tensors: both
    // add the delta in f32 before rounding, so they land near the f32 LoRA run, far from the
    // run without it.
    let g = goldens();
    for dtype in [DType::BF16, DType::F16] {
        let loras = [lora("sd1", "kohya-style", 1.0)];
        let model = try_load_in("tiny-sd1", &lora_dir("sd1"), &loras, dtype).unwrap();
        let got = run(&model, PROMPT);
        let near = max_abs_diff(&got, &g["sd1/kohya/1.0"]);
        let far = max_abs_diff(&got, &g["sd1/none"]);
        eprintln!("{dtype:?}: {near} from the f32 LoRA run, {far} from no LoRA");
        assert!(near * 4.0 < far, "{dtype:?}: {near} vs {far}");
    }
}

#[test]
fn weight_zero_is_no_lora() {
    let plain = run(&load("tiny-sd1", &lora_dir("sd1"), &[]), PROMPT);
    let model = load(
        "tiny-sd1",
        &lora_dir("sd1"),
        &[lora("sd1", "peft-style", 0.0)],
    );
    assert_eq!(max_abs_diff(&run(&model, PROMPT), &plain), 0.0);
    let tagged = format!("{PROMPT}<lora:kohya-style:0>");
    assert_eq!(max_abs_diff(&run(&model, &tagged), &plain), 0.0);
}

#[test]
fn switching_sets_gives_what_fresh_loads_give() {
    let dir = lora_dir("sd1");
    let prompts = [
        format!("{PROMPT}<lora:kohya-style:1>"),
        format!("{PROMPT}<lora:peft-style:1>"),
        PROMPT.to_string(),
        format!("{PROMPT}<lora:kohya-style:0.5><lora:peft-style:0.8>"),
        format!("{PROMPT}<lora:kohya-style:1>"),
    ];
    // One model through the sequence, against a fresh model for each prompt: bit-equal, since
    // every switch loads the base weights from the files again.
    let model = load("tiny-sd1", &dir, &[]);
    for p in &prompts {
        let fresh = run(&load("tiny-sd1", &dir, &[]), p);
        assert_eq!(max_abs_diff(&run(&model, p), &fresh), 0.0, "{p}");
    }
    // The same set in another order is the same set: nothing reloads, the same latents.
    let a = run(
        &model,
        &format!("{PROMPT}<lora:peft-style:0.8><lora:kohya-style:0.5>"),
    );
    let b = run(&model, &prompts[3]);
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    assert_eq!(model.active_loras().len(), 2);
}

/// A safetensors file of `tensors` (name, shape) filled with 0.1, in `dir`.
fn write_lora(dir: &Path, file: &str, tensors: &[(&str, &[usize])]) -> PathBuf {
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s)| {
            let count: usize = s.iter().product();
            let bytes = (0..count).flat_map(|_| 0.1f32.to_le_bytes()).collect();
            (n.to_string(), s.to_vec(), bytes)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    let path = dir.join(file);
    safetensors::serialize_to_file(views, None, &path).unwrap();
    path
}

fn load_error(name: &str, base: &[LoraSpec]) -> String {
    match try_load(name, &lora_dir("sd1"), base) {
        Ok(_) => panic!("{base:?} loaded on {name}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn lora_errors_name_the_file_and_the_problem() {
    // Another family's LoRA: SDXL's (a second text encoder) on SD 1.x, SD 1.x's on SDXL.
    let err = load_error("tiny-sd1", &[lora("sdxl", "xl-kohya", 1.0)]);
    assert!(
        err.contains("xl-kohya.safetensors") && err.contains("another model family"),
        "{err}"
    );
    let err = load_error("tiny-sdxl", &[lora("sd1", "kohya-style", 1.0)]);
    assert!(
        err.contains("kohya-style.safetensors") && err.contains("another model family"),
        "{err}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // Keys that match nothing.
    let none = write_lora(
        d,
        "nothing.safetensors",
        &[
            ("lora_unet_no_such_layer.lora_down.weight", &[2, 4]),
            ("lora_unet_no_such_layer.lora_up.weight", &[4, 2]),
        ],
    );
    let err = load_error("tiny-sd1", &[LoraSpec::new(&none, 1.0)]);
    assert!(
        err.contains("nothing.safetensors") && err.contains("no layer matches"),
        "{err}"
    );
    // Kinds latent does not read are listed.
    let loha = write_lora(
        d,
        "loha.safetensors",
        &[
            ("lora_unet_conv_in.hada_w1_a", &[2, 4]),
            ("lora_unet_conv_in.hada_w1_b", &[4, 2]),
        ],
    );
    let err = load_error("tiny-sd1", &[LoraSpec::new(&loha, 1.0)]);
    assert!(
        err.contains("loha.safetensors") && err.contains("`hada_w1_a`, `hada_w1_b`"),
        "{err}"
    );
    // A layer whose shape does not fit.
    let misfit = write_lora(
        d,
        "misfit.safetensors",
        &[
            (
                "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
                &[2, 48],
            ),
            (
                "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight",
                &[64, 2],
            ),
        ],
    );
    let err = load_error("tiny-sd1", &[LoraSpec::new(&misfit, 1.0)]);
    assert!(
        err.contains("misfit.safetensors") && err.contains("do not fit"),
        "{err}"
    );
    // Not a safetensors file, and a pickle one.
    let junk = d.join("junk.safetensors");
    std::fs::write(&junk, b"not a safetensors file").unwrap();
    let err = load_error("tiny-sd1", &[LoraSpec::new(&junk, 1.0)]);
    assert!(
        err.contains("junk.safetensors") && err.contains("not a valid safetensors"),
        "{err}"
    );
    let pickle = d.join("old.pt");
    std::fs::write(&pickle, b"pickle").unwrap();
    let err = load_error("tiny-sd1", &[LoraSpec::new(&pickle, 1.0)]);
    assert!(err.contains("old.pt") && err.contains("pickle"), "{err}");
    // An unknown name in a prompt, and a network kind latent cannot apply: checked before work.
    let model = load("tiny-sd1", &lora_dir("sd1"), &[]);
    let err = model
        .prompt_loras("a cat <lora:no-such-lora:1>")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no-such-lora") && err.contains("no LoRA of that name"),
        "{err}"
    );
    let err = model
        .prompt_loras("a cat <hypernet:x:1>")
        .unwrap_err()
        .to_string();
    assert!(err.contains("hypernet"), "{err}");
}

#[test]
fn cli_lora_flags_tags_and_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny-sd1").display().to_string();
    let dir = lora_dir("sd1").display().to_string();
    let gen = |prompt: &str, extra: &[&str], out: &str| {
        let out = tmp.path().join(out).display().to_string();
        let mut args = vec![
            "generate", prompt, "--model", &model, "--steps", "2", "-W", "32", "-H", "32",
            "--seed", "3", "-o", &out,
        ];
        args.extend_from_slice(extra);
        let o = latent(&args);
        (o, out)
    };
    let file = lora_dir("sd1")
        .join("kohya-style.safetensors")
        .display()
        .to_string();
    let flag = format!("{file}:0.6");
    let (o, a) = gen(PROMPT, &["--lora", &flag], "flag.png");
    assert!(o.status.success(), "{}", stderr(&o));
    let tagged = format!("{PROMPT}<lora:kohya-style:0.6>");
    let (o, b) = gen(&tagged, &["--lora-dir", &dir], "tag.png");
    assert!(o.status.success(), "{}", stderr(&o));
    let (o, c) = gen(PROMPT, &[], "none.png");
    assert!(o.status.success(), "{}", stderr(&o));
    let pixels = |p: &str| image::open(p).unwrap().to_rgb8().into_raw();
    assert_eq!(pixels(&a), pixels(&b), "--lora FILE:W and a tag differ");
    assert_ne!(pixels(&a), pixels(&c), "the LoRA changed nothing");
    // A --lora is appended to the recorded prompt as a tag, as AUTOMATIC1111 does.
    let params = latent::output::read_png_parameters(Path::new(&a))
        .unwrap()
        .unwrap();
    assert!(
        params.starts_with("a photo of a cat<lora:kohya-style:0.6>\n"),
        "{params}"
    );
    // The PNG keeps the tag in its prompt, as AUTOMATIC1111's does.
    let o = latent(&["info", &b]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("<lora:kohya-style:0.6>"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    // An unknown name: one error line naming it, no image.
    let (o, out) = gen("a cat <lora:nope:1>", &["--lora-dir", &dir], "never.png");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("nope") && !Path::new(&out).exists(), "{err}");
    assert_eq!(
        err.trim()
            .lines()
            .filter(|l| l.starts_with("error"))
            .count(),
        1,
        "{err}"
    );
}

#[test]
fn batch_lines_carry_their_own_loras() {
    use common::batch::{records, run_batch, write};
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let dir = lora_dir("sd1").display().to_string();
    // Lines with and without a tag, the tagged ones apart: grouped by LoRA set, each set merged
    // once, and each image what the same prompt makes alone.
    write(
        d,
        "p.txt",
        "a cat <lora:kohya-style:0.6>\na cat\na cat <lora:kohya-style:0.6>\n",
    );
    let extra = [
        "--lora-dir",
        dir.as_str(),
        "--batch-size",
        "2",
        "-W",
        "32",
        "-H",
        "32",
    ];
    let o = run_batch(d, &["p.txt"], &extra);
    assert!(o.status.success(), "{}", stderr(&o));
    let recs = records(d);
    assert_eq!(recs.len(), 3);
    let model = fixtures().join("tiny-sd1").display().to_string();
    let pixels = |p: &Path| image::open(p).unwrap().to_rgb8().into_raw();
    let mut made = Vec::new();
    for r in &recs {
        let alone = d.join(format!("alone-{}.png", r.index));
        let seed = r.seed.to_string();
        let o = latent(&[
            "generate",
            &r.prompt,
            "--model",
            &model,
            "--steps",
            "2",
            "-W",
            "32",
            "-H",
            "32",
            "--seed",
            &seed,
            "--lora-dir",
            &dir,
            "-o",
            &alone.display().to_string(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let a = pixels(&d.join("out").join(&r.file));
        let b = pixels(&alone);
        let worst = a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
        // Batched latents differ from single ones by summation order only.
        assert!(worst <= 1, "{}: pixels differ by {worst}", r.file);
        made.push((r.index, a));
    }
    made.sort_by_key(|(i, _)| *i);
    assert_ne!(made[0].1, made[1].1, "the tag changed nothing");
}

#[test]
fn walk_keyframes_share_one_set_of_loras() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny-sd1").display().to_string();
    let dir = lora_dir("sd1").display().to_string();
    let walk = |second: &str, out: &str| {
        let out = tmp.path().join(out).display().to_string();
        latent(&[
            "walk",
            "-p",
            "a cat <lora:kohya-style:0.6>",
            "-p",
            second,
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
            "--model",
            &model,
            "--lora-dir",
            &dir,
            "-o",
            &out,
        ])
    };
    let o = walk("a dog", "mixed");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("keyframe 2 asks for other LoRAs"), "{err}");
    let o = walk("a dog <lora:kohya-style:0.6>", "same");
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn batch_resume_does_not_take_an_image_made_with_other_loras_as_done() {
    use common::batch::{records, run_batch, write};
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    write(d, "p.txt", "a cat\n");
    let size = ["-W", "32", "-H", "32"];
    let o = run_batch(d, &["p.txt"], &size);
    assert!(o.status.success(), "{}", stderr(&o));
    let flag = format!(
        "{}:0.6",
        lora_dir("sd1").join("kohya-style.safetensors").display()
    );
    let with_lora = [&size[..], &["--lora", flag.as_str()]].concat();
    let o = run_batch(d, &["p.txt"], &with_lora);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("other settings"), "{err}");
    // With --overwrite it is made again, and its record names the LoRA.
    let again = [&with_lora[..], &["--overwrite"]].concat();
    let o = run_batch(d, &["p.txt"], &again);
    assert!(o.status.success(), "{}", stderr(&o));
    let last = records(d).pop().unwrap();
    assert_eq!(last.loras.as_deref(), Some(flag.as_str()));
    assert!(
        last.parameters.starts_with("a cat<lora:kohya-style:0.6>"),
        "{}",
        last.parameters
    );
}
