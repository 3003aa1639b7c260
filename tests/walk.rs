//! `latent walk` on the tiny SD1 model: frame files and their metadata, walk.json, the
//! animations (GIF, WebP, APNG decoded back; MP4 without ffmpeg refused), frame k equal to
//! the image rendered alone from its interpolated inputs, resume, preview, Ctrl-C, bad inputs.
use std::fs;
use std::io::{BufReader, Cursor};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use image::AnimationDecoder;
use latent::model::ModelSource;
use latent::noise::{RngKind, TorchGenerator};
use latent::output::{parse_a1111, read_png_parameters};
use latent::pipeline::{
    GenerateRequest, PromptEmbeddings, Sampling, StableDiffusion, TextConditioning, Timings,
};
use latent::schedulers::SchedulerKind;
use latent::walk::{self, Ease, Interp, Keyframe, Walk, WalkRecord, WalkSettings};
use serde_json::Value;

mod common;
use common::max_abs;

fn sd1() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny-sd1")
        .display()
        .to_string()
}

fn latent_in(dir: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_latent"));
    cmd.args(args)
        .env_remove("LATENT_MODEL")
        .env("HF_HUB_OFFLINE", "1");
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    cmd.output().expect("run latent")
}

fn latent(args: &[&str]) -> Output {
    latent_in(None, args)
}

fn ok(o: Output) -> Output {
    assert!(
        o.status.success(),
        "latent failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// A command that must fail with exit code 1 and exactly one `error:` line; returns that line.
fn fails(o: Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(lines.len(), 1, "one error line expected: {err}");
    lines[0].to_string()
}

/// A quick walk on the tiny model: 64x64, DDIM, 2 steps unless `extra` sets `--steps`.
fn walk_args<'a>(model: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "walk",
        "--model",
        model,
        "--scheduler",
        "ddim",
        "-o",
        out,
        "--quiet",
    ];
    if !extra.contains(&"--steps") {
        v.extend(["--steps", "2"]);
    }
    v.extend_from_slice(extra);
    v
}

fn run_walk(out: &Path, extra: &[&str]) -> Output {
    let model = sd1();
    let out = out.display().to_string();
    latent(&walk_args(&model, &out, extra))
}

/// The JSON lines a `--json` walk printed: per-frame objects, then the summary.
fn json_lines(o: &Output) -> (Vec<Value>, Value) {
    let mut lines: Vec<Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let summary = lines.pop().expect("summary line");
    assert!(summary.get("walk").is_some(), "{summary}");
    (lines, summary)
}

fn rendered_frames(o: &Output) -> Vec<u64> {
    json_lines(o)
        .0
        .iter()
        .map(|l| l["frame"].as_u64().unwrap())
        .collect()
}

fn frame_path(dir: &Path, k: usize) -> PathBuf {
    dir.join(format!("frame-{k:05}.png"))
}

fn rgb(path: &Path) -> image::RgbImage {
    image::open(path).unwrap().to_rgb8()
}

fn max_pixel_diff(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

fn frames_of<'a>(decoder: impl AnimationDecoder<'a>) -> Vec<image::RgbaImage> {
    decoder
        .into_frames()
        .collect_frames()
        .unwrap()
        .into_iter()
        .map(|f| f.into_buffer())
        .collect()
}

#[test]
fn walk_writes_frames_with_metadata_a_record_and_animations() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("w");
    ok(run_walk(
        &dir,
        &[
            "-p",
            "a red apple",
            "-p",
            "a green pear",
            "--seed",
            "1",
            "--seed",
            "2",
            "--frames",
            "3",
            "--batch-size",
            "2",
            "--format",
            "webp,apng",
            "--fps",
            "10",
        ],
    ));
    // 3 frames from keyframe 1 to 2, then keyframe 2 closes the walk.
    for k in 0..4 {
        assert!(frame_path(&dir, k).is_file(), "frame {k}");
    }
    assert!(!frame_path(&dir, 4).exists());

    let params = read_png_parameters(&frame_path(&dir, 1)).unwrap().unwrap();
    let p = parse_a1111(&params).unwrap();
    assert_eq!(p.prompt, "a red apple");
    assert_eq!(p.get("Seed"), Some("1"));
    assert_eq!(p.get("Steps"), Some("2"));
    assert_eq!(p.get("Walk frame"), Some("2/4"));
    assert_eq!(p.get("Walk keyframes"), Some("1->2"));
    assert_eq!(
        p.get("Walk t").map(|t| t.parse::<f64>().unwrap()),
        Some(1.0 / 3.0)
    );
    assert_eq!(p.get("Walk to prompt"), Some("a green pear"));
    assert_eq!(p.get("Walk to seed"), Some("2"));
    let last = parse_a1111(&read_png_parameters(&frame_path(&dir, 3)).unwrap().unwrap()).unwrap();
    assert_eq!(last.prompt, "a green pear");
    assert_eq!(last.get("Seed"), Some("2"));
    assert_eq!(last.get("Walk keyframes"), Some("2->2"));

    let record = walk::read_record(&dir).unwrap().unwrap();
    assert_eq!(record.keyframes.len(), 2);
    assert_eq!(record.keyframes[1].prompt, "a green pear");
    assert_eq!((record.steps, record.width, record.height), (2, 64, 64));
    assert_eq!(record.frames.len(), 4);
    assert_eq!(record.frames[2].from, 0);
    assert_eq!(record.animations, ["walk.gif", "walk.webp", "walk.apng"]);

    let pngs: Vec<image::RgbImage> = (0..4).map(|k| rgb(&frame_path(&dir, k))).collect();
    // Neighbouring frames differ: the walk moves.
    assert!(max_pixel_diff(pngs[0].as_raw(), pngs[1].as_raw()) > 0);

    let gif = image::codecs::gif::GifDecoder::new(BufReader::new(
        fs::File::open(dir.join("walk.gif")).unwrap(),
    ))
    .unwrap();
    let gif_frames = frames_of(gif);
    assert_eq!(gif_frames.len(), 4);
    assert!(gif_frames.iter().all(|f| f.dimensions() == (64, 64)));

    // WebP and APNG are lossless: every frame equals its PNG.
    let webp = image::codecs::webp::WebPDecoder::new(Cursor::new(
        fs::read(dir.join("walk.webp")).unwrap(),
    ))
    .unwrap();
    let apng =
        image::codecs::png::PngDecoder::new(Cursor::new(fs::read(dir.join("walk.apng")).unwrap()))
            .unwrap()
            .apng()
            .unwrap();
    for frames in [frames_of(webp), frames_of(apng)] {
        assert_eq!(frames.len(), 4);
        for (f, png) in frames.iter().zip(&pngs) {
            let rgb = image::DynamicImage::ImageRgba8(f.clone()).to_rgb8();
            assert_eq!(rgb.as_raw(), png.as_raw());
        }
    }
}

fn load_model() -> StableDiffusion {
    let files = ModelSource::parse(&sd1(), None).unwrap().open().unwrap();
    StableDiffusion::load(&files, &Device::Cpu, DType::F32, &mut |_| {}).unwrap()
}

fn keyframe(prompt: &str, seed: u64, frames: Option<usize>) -> Keyframe {
    Keyframe {
        prompt: prompt.into(),
        negative_prompt: String::new(),
        seed,
        frames,
        guidance: 7.5,
    }
}

fn sampling(scheduler: SchedulerKind, steps: usize) -> Sampling {
    Sampling {
        width: 64,
        height: 64,
        steps,
        guidance: 7.5,
        scheduler,
        karras: false,
        rng: RngKind::Torch,
        size_conditioning: Default::default(),
        preview_every: None,
        text: Default::default(),
        image: None,
    }
}

/// Starting noise of `seed` as diffusers draws it: torch.randn((1, 4, 8, 8)).
fn noise(seed: u64) -> Tensor {
    Tensor::from_vec(
        TorchGenerator::new(seed).randn(4 * 8 * 8),
        (1, 4, 8, 8),
        &Device::Cpu,
    )
    .unwrap()
}

/// Tolerances: a frame rendered in a batch and the same inputs rendered alone differ only in
/// the order of summation inside batched matmuls (we measured ~6e-5 abs on latents), so
/// latents must agree within 1e-4 of their largest value and images within 1/255.
fn assert_same_image(
    walked: &latent::pipeline::GeneratedImage,
    alone: &latent::pipeline::GeneratedImage,
    what: &str,
) {
    let scale = max_abs(&alone.latents);
    let diff = max_abs(&(&walked.latents - &alone.latents).unwrap());
    assert!(
        diff <= 1e-4 * scale,
        "{what}: latents differ by {diff} (max {scale})"
    );
    let px = max_pixel_diff(&walked.rgb, &alone.rgb);
    assert!(px <= 1, "{what}: pixels differ by {px}/255");
}

#[test]
fn frame_k_equals_the_image_rendered_alone_from_its_interpolated_inputs() {
    check_frames_equal_their_single_renders(&load_model());
}

/// SDXL walks interpolate both encoders' embeddings and the pooled embedding alike.
#[test]
fn sdxl_frame_k_equals_the_image_rendered_alone() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sdxl");
    let files = ModelSource::parse(&dir.display().to_string(), None)
        .unwrap()
        .open()
        .unwrap();
    let model = StableDiffusion::load(&files, &Device::Cpu, DType::F32, &mut |_| {}).unwrap();
    assert!(model.time_ids(64, 64, &Default::default()).is_some());
    check_frames_equal_their_single_renders(&model);
}

fn check_frames_equal_their_single_renders(model: &StableDiffusion) {
    // Every scheduler family: multistep (PNDM), and ancestral, whose per-step noise comes from
    // the segment's first seed.
    for (scheduler, ease, text, looped) in [
        (SchedulerKind::Pndm, Ease::Linear, Interp::Lerp, false),
        (
            SchedulerKind::EulerAncestral,
            Ease::Smooth,
            Interp::Slerp,
            true,
        ),
    ] {
        let mut kfs = vec![
            keyframe("a red apple", 11, Some(3)),
            keyframe("a green pear on a table", 22, Some(2)),
            keyframe("a lighthouse", 33, Some(2)),
        ];
        kfs[1].negative_prompt = "blurry".into();
        let settings = WalkSettings {
            sampling: sampling(scheduler, 3),
            looped,
            ease,
            text_interp: text,
        };
        let w = Walk::new(model, kfs.clone(), settings.clone(), &mut |_| {}).unwrap();
        let n = w.frames().len();
        assert_eq!(n, if looped { 7 } else { 6 });
        let all: Vec<usize> = (0..n).collect();
        let mut walked = Vec::new();
        for batch in w.batches(&all, 4).unwrap() {
            walked.extend(
                w.render(
                    &batch,
                    &mut Timings::default(),
                    &latent::Cancel::new(),
                    &mut |_| {},
                )
                .unwrap(),
            );
        }

        let embed = |k: &Keyframe| {
            model
                .encode_prompt(&k.prompt, &k.negative_prompt, 7.5, &mut |_| {})
                .unwrap()
        };
        for k in [1, 2, 3, 4, n - 1] {
            let f = w.frames()[k];
            let (a, b) = (&kfs[f.from], &kfs[f.to]);
            // Independently: torch noise of both seeds, slerp; both prompts encoded, blended.
            let s = if f.from == f.to { 0.0 } else { ease.apply(f.t) };
            let x = walk::slerp(&noise(a.seed), &noise(b.seed), s).unwrap();
            let (ea, eb) = (embed(a), embed(b));
            let lerp = |x: &TextConditioning, y: &TextConditioning| {
                TextConditioning::zip_with(x, y, |p, q| text.apply(p, q, s)).unwrap()
            };
            let emb = PromptEmbeddings::fixed(
                lerp(&ea.cond, &eb.cond),
                Some(lerp(
                    ea.uncond.as_ref().unwrap(),
                    eb.uncond.as_ref().unwrap(),
                )),
            );
            let alone = model
                .render_batch(
                    &emb,
                    &[a.seed],
                    Some(&x),
                    &settings.sampling,
                    0,
                    &mut Timings::default(),
                    &latent::Cancel::new(),
                    &mut |_| {},
                )
                .unwrap();
            assert_same_image(&walked[k], &alone[0], &format!("{scheduler} frame {k}"));
        }

        // The tolerance tells neighbours apart: consecutive frames differ far more.
        let scale = max_abs(&walked[2].latents);
        let step = max_abs(&(&walked[1].latents - &walked[2].latents).unwrap());
        assert!(
            step > 1e-2 * scale,
            "{scheduler}: frames 1 and 2 nearly equal ({step})"
        );

        // A keyframe's own frame is what `generate` makes from its prompt and seed. (Not with
        // euler-a: generate draws its step noise after the starting noise from the same
        // generator, a walk frame gets its starting noise by interpolation.)
        if scheduler == SchedulerKind::EulerAncestral {
            continue;
        }
        let generated = model
            .generate(
                &GenerateRequest {
                    prompt: kfs[1].prompt.clone(),
                    negative_prompt: kfs[1].negative_prompt.clone(),
                    sampling: settings.sampling.clone(),
                    seeds: vec![kfs[1].seed],
                    batch_size: 1,
                    latents: None,
                },
                &latent::Cancel::new(),
                &mut |_| {},
            )
            .unwrap();
        assert_same_image(&walked[3], &generated.images[0], "keyframe 2 vs generate");
    }
}

#[test]
fn a_noise_walk_frame_equals_generate_from_its_latents() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("w");
    ok(run_walk(
        &dir,
        &[
            "-p",
            "a lighthouse at dusk",
            "--seed",
            "5",
            "--seed",
            "6",
            "--frames",
            "4",
            "--batch-size",
            "3",
        ],
    ));
    // Frame 2 sits halfway from seed 5 to seed 6; its noise as generate's --latents.
    let x = walk::slerp(&noise(5), &noise(6), 0.5).unwrap();
    let latents = tmp.path().join("frame2.npy");
    x.write_npy(&latents).unwrap();
    let single = tmp.path().join("single.png");
    let model = sd1();
    ok(latent(&[
        "generate",
        "a lighthouse at dusk",
        "--model",
        &model,
        "--steps",
        "2",
        "--scheduler",
        "ddim",
        "--seed",
        "5",
        "--latents",
        latents.to_str().unwrap(),
        "-o",
        single.to_str().unwrap(),
        "--quiet",
    ]));
    let d = max_pixel_diff(rgb(&frame_path(&dir, 2)).as_raw(), rgb(&single).as_raw());
    assert!(d <= 1, "frame 2 vs generate --latents: {d}/255");
    // And the walk's first frame is plain `generate --seed 5`.
    let single0 = tmp.path().join("single0.png");
    ok(latent(&[
        "generate",
        "a lighthouse at dusk",
        "--model",
        &model,
        "--steps",
        "2",
        "--scheduler",
        "ddim",
        "--seed",
        "5",
        "-o",
        single0.to_str().unwrap(),
        "--quiet",
    ]));
    let d = max_pixel_diff(rgb(&frame_path(&dir, 0)).as_raw(), rgb(&single0).as_raw());
    assert!(d <= 1, "frame 0 vs generate: {d}/255");
}

#[test]
fn rerunning_renders_only_the_missing_frames() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("w");
    let args = [
        "-p",
        "a cat",
        "-p",
        "a dog",
        "--seed",
        "3",
        "--frames",
        "4",
        "--batch-size",
        "2",
        "--json",
    ];
    let first = ok(run_walk(&dir, &args));
    assert_eq!(rendered_frames(&first), [0, 1, 2, 3, 4]);
    let kept: Vec<(usize, Vec<u8>, std::time::SystemTime)> = [0, 2, 4]
        .into_iter()
        .map(|k| {
            let p = frame_path(&dir, k);
            (
                k,
                fs::read(&p).unwrap(),
                fs::metadata(&p).unwrap().modified().unwrap(),
            )
        })
        .collect();
    let original_1 = fs::read(frame_path(&dir, 1)).unwrap();
    fs::remove_file(frame_path(&dir, 1)).unwrap();
    fs::remove_file(frame_path(&dir, 3)).unwrap();

    let second = ok(run_walk(&dir, &args));
    assert_eq!(rendered_frames(&second), [1, 3]);
    let (_, summary) = json_lines(&second);
    assert_eq!(summary["rendered"], 2);
    assert_eq!(summary["skipped"], 3);
    for (k, bytes, mtime) in kept {
        let p = frame_path(&dir, k);
        assert_eq!(fs::read(&p).unwrap(), bytes, "frame {k} rewritten");
        assert_eq!(
            fs::metadata(&p).unwrap().modified().unwrap(),
            mtime,
            "frame {k} touched"
        );
    }
    // The re-rendered frame is the same picture (rendered in another batch).
    let d = max_pixel_diff(
        image::load_from_memory(&original_1)
            .unwrap()
            .to_rgb8()
            .as_raw(),
        rgb(&frame_path(&dir, 1)).as_raw(),
    );
    assert!(d <= 1, "{d}");

    // Complete: nothing to render, and the animation is kept.
    let gif_time = fs::metadata(dir.join("walk.gif"))
        .unwrap()
        .modified()
        .unwrap();
    let third = ok(run_walk(&dir, &args));
    assert!(rendered_frames(&third).is_empty());
    assert_eq!(
        fs::metadata(dir.join("walk.gif"))
            .unwrap()
            .modified()
            .unwrap(),
        gif_time
    );
}

#[test]
fn the_same_command_finds_its_walk_folder_and_its_random_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let model = sd1();
    let base = [
        "walk",
        "--model",
        &model,
        "--steps",
        "2",
        "--scheduler",
        "ddim",
        "--quiet",
        "--json",
        "--frames",
        "2",
        "-p",
        "a cat",
        "-p",
        "a dog",
    ];
    // No --seed: a random one, recorded and reused by the same command.
    let first = ok(latent_in(Some(tmp.path()), &base));
    let (_, s1) = json_lines(&first);
    assert_eq!(s1["walk"], "outputs/walk-1");
    assert_eq!(s1["rendered"], 3);
    let second = ok(latent_in(Some(tmp.path()), &base));
    let (_, s2) = json_lines(&second);
    assert_eq!(s2["walk"], "outputs/walk-1");
    assert_eq!(s2["rendered"], 0);
    // Another walk gets the next folder.
    let mut other = base.to_vec();
    other.extend(["--loop"]);
    let (_, s3) = json_lines(&ok(latent_in(Some(tmp.path()), &other)));
    assert_eq!(s3["walk"], "outputs/walk-2");
    assert_eq!(s3["rendered"], 4);
}

#[test]
fn a_folder_of_another_walk_is_refused_unless_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("w");
    let args = ["-p", "a cat", "--seed", "1", "--seed", "2", "--frames", "2"];
    ok(run_walk(&dir, &args));
    let before = fs::read(frame_path(&dir, 1)).unwrap();
    let record = fs::read(dir.join("walk.json")).unwrap();

    let mut other = args.to_vec();
    other.extend(["--guidance", "3"]);
    let err = fails(run_walk(&dir, &other));
    assert!(
        err.contains("different walk") && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(
        fs::read(frame_path(&dir, 1)).unwrap(),
        before,
        "nothing lost"
    );
    assert_eq!(fs::read(dir.join("walk.json")).unwrap(), record);

    let mut steps = args.to_vec();
    steps.extend(["--steps", "3"]);
    let err = fails(run_walk(&dir, &steps));
    assert!(err.contains("steps 2, now 3"), "{err}");

    other.push("--overwrite");
    ok(run_walk(&dir, &other));
    assert_ne!(fs::read(frame_path(&dir, 1)).unwrap(), before);
    let r = walk::read_record(&dir).unwrap().unwrap();
    assert_eq!(r.keyframes[0].guidance, 3.0);
}

#[test]
fn a_keyframe_file_with_loop() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("k.toml");
    fs::write(
        &file,
        "frames = 2\nnegative_prompt = \"blurry\"\n\n[[keyframe]]\nprompt = \"a red apple\"\nseed = 1\nframes = 3\n\n\
         [[keyframe]]\nprompt = \"a green pear\"\nseed = 2\nguidance = 1\n\n[[keyframe]]\nprompt = \"a banana\"\nseed = 3\n",
    )
    .unwrap();
    let dir = tmp.path().join("w");
    let o = ok(run_walk(
        &dir,
        &[
            file.to_str().unwrap(),
            "--loop",
            "--ease",
            "smooth",
            "--json",
            "--batch-size",
            "8",
        ],
    ));
    // 3 + 2 + 2 frames, back to the first keyframe without repeating it.
    assert_eq!(rendered_frames(&o), (0..7).collect::<Vec<u64>>());
    let r = walk::read_record(&dir).unwrap().unwrap();
    assert!(r.looped);
    assert_eq!(r.ease, "smooth");
    assert_eq!(r.frames.last().unwrap().to, 0);
    assert_eq!(r.keyframes[1].guidance, 1.0);
    assert_eq!(r.keyframes[0].negative_prompt, "blurry");
    // Guidance is interpolated per frame: 7.5 at keyframe 1, 1 at keyframe 2.
    let g: Vec<f64> = r.frames.iter().map(|f| f.guidance).collect();
    assert_eq!(g[0], 7.5);
    assert_eq!(g[3], 1.0);
    assert!(g[1] < 7.5 && g[1] > 1.0);
    let p = parse_a1111(&read_png_parameters(&frame_path(&dir, 3)).unwrap().unwrap()).unwrap();
    assert_eq!(p.get("CFG scale"), Some("1"));
}

#[test]
fn the_example_keyframe_file_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("prompts/walk.toml");
    let defaults = walk::FileDefaults {
        frames: None,
        negative_prompt: String::new(),
        guidance: 7.5,
    };
    let k = walk::read_keyframe_file(&path, &defaults, true).unwrap();
    assert!(k.len() >= 3, "{k:?}");
    assert!(walk::plan_frames(&k, true, Ease::Smooth).unwrap().len() >= k.len());
}

#[test]
fn preview_renders_few_steps_into_its_own_folder_first() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("w");
    let args = [
        "-p", "a cat", "--seed", "1", "--seed", "2", "--frames", "2", "--steps", "9",
    ];
    let mut preview = args.to_vec();
    preview.push("--preview");
    ok(run_walk(&dir, &preview));
    let p = walk::read_record(&dir.join("preview")).unwrap().unwrap();
    assert_eq!(p.steps, 4);
    assert!(dir.join("preview/walk.gif").is_file());
    assert!(!frame_path(&dir, 0).exists(), "preview only");
    ok(run_walk(&dir, &args));
    assert_eq!(walk::read_record(&dir).unwrap().unwrap().steps, 9);
    assert!(frame_path(&dir, 2).is_file());
}

#[test]
fn bad_inputs_fail_with_one_clear_line_and_nothing_written() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("w");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "-p", "a", "-p", "b", "-p", "c", "--seed", "1", "--seed", "2",
            ],
            "3 prompts and 2 seeds cannot be paired",
        ),
        (vec!["-p", "a", "--seed", "1"], "at least two keyframes"),
        (
            vec!["-p", "a", "-p", "b", "--frames", "0"],
            "--frames 0: must be at least 1",
        ),
        (vec!["-p", "a", "-p", "b", "--fps", "0"], "--fps"),
        (
            vec!["-p", "a", "-p", "b", "--batch-size", "0"],
            "--batch-size",
        ),
        (vec!["--seed", "1", "--seed", "2"], "no prompt"),
        (vec!["-p", "a", "-p", "b", "-W", "60"], "multiple of 8"),
        (vec!["-p", " ", "-p", "b"], "prompt is empty"),
    ];
    for (args, want) in cases {
        let err = fails(run_walk(&dir, &args));
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let bad = tmp.path().join("bad.toml");
    fs::write(&bad, "frames = 2\n\n[[keyframe]]\nprompt = \"a\"\nseed = 1\n\n[[keyframe]]\nprompt = \"b\"\nseed = \"two\"\n").unwrap();
    let err = fails(run_walk(&dir, &[bad.to_str().unwrap()]));
    assert!(err.contains(&format!("{}:9:", bad.display())), "{err}");
    let err = fails(run_walk(
        &dir,
        &[tmp.path().join("none.toml").to_str().unwrap()],
    ));
    assert!(err.contains("none.toml"), "{err}");
    assert!(!dir.exists(), "nothing may be written for bad input");

    // A folder that is not a walk is left alone.
    let foreign = tmp.path().join("photos");
    fs::create_dir(&foreign).unwrap();
    fs::write(foreign.join("me.jpg"), b"x").unwrap();
    let err = fails(run_walk(&foreign, &["-p", "a", "-p", "b", "--frames", "1"]));
    assert!(err.contains("holds no walk"), "{err}");
    // Only the run's lock file was added.
    let mut names: Vec<String> = fs::read_dir(&foreign)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, [".latent.lock", "me.jpg"]);
}

#[cfg(unix)]
#[test]
fn mp4_without_ffmpeg_fails_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("w");
    let empty = tmp.path().join("empty-bin");
    fs::create_dir(&empty).unwrap();
    let model = sd1();
    let out = dir.display().to_string();
    let args = walk_args(
        &model,
        &out,
        &["-p", "a", "-p", "b", "--frames", "2", "--format", "mp4"],
    );
    let o = Command::new(env!("CARGO_BIN_EXE_latent"))
        .args(&args)
        .env("PATH", &empty)
        .output()
        .unwrap();
    let err = fails(o);
    assert!(
        err.contains("--format mp4: needs ffmpeg") && err.contains("PATH"),
        "{err}"
    );
    assert!(!dir.exists(), "checked before any work");
}

#[cfg(unix)]
#[test]
fn ctrl_c_stops_after_the_batch_with_only_complete_frames_and_resumes() {
    use std::time::{Duration, Instant};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("w");
    let model = sd1();
    let out = dir.display().to_string();
    let args = walk_args(
        &model,
        &out,
        &[
            "-p", "a", "-p", "b", "--frames", "60", "--json", "--steps", "3",
        ],
    );
    let child = Command::new(env!("CARGO_BIN_EXE_latent"))
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !frame_path(&dir, 1).exists() {
        assert!(Instant::now() < deadline, "no frames appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let o = child.wait_with_output().unwrap();
    let err = fails(o);
    assert!(
        err.contains("interrupted") && err.contains("run the same command again"),
        "{err}"
    );

    let names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let frames: Vec<&String> = names.iter().filter(|n| n.starts_with("frame-")).collect();
    assert!(
        !frames.is_empty() && frames.len() < 61,
        "{} frames",
        frames.len()
    );
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with('.') && n != latent::files::LOCK_FILE),
        "temporary files left: {names:?}"
    );
    assert!(
        !names.contains(&"walk.gif".to_string()),
        "no animation of a partial walk"
    );
    for f in &frames {
        image::open(dir.join(f)).unwrap_or_else(|e| panic!("{f} is incomplete: {e}"));
    }
    let done = frames.len();
    let resumed = ok(run_walk(
        &dir,
        &[
            "-p", "a", "-p", "b", "--frames", "60", "--json", "--steps", "3",
        ],
    ));
    assert_eq!(rendered_frames(&resumed).len(), 61 - done);
    assert!(dir.join("walk.gif").is_file());
}

#[test]
fn the_record_describes_the_walk_for_re_rendering() {
    // walk.json written by the library equals what the binary writes for the same walk.
    let model = load_model();
    let kfs = vec![keyframe("a cat", 1, Some(2)), keyframe("a dog", 2, None)];
    let settings = WalkSettings {
        sampling: sampling(SchedulerKind::Ddim, 2),
        looped: false,
        ease: Ease::Linear,
        text_interp: Interp::Lerp,
    };
    let expected = WalkRecord::new(model.name(), model.dtype(), &kfs, &settings, 12.0).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("w");
    let file = tmp.path().join("k.toml");
    fs::write(&file, "[[keyframe]]\nprompt = \"a cat\"\nseed = 1\nframes = 2\n[[keyframe]]\nprompt = \"a dog\"\nseed = 2\n").unwrap();
    ok(run_walk(&dir, &[file.to_str().unwrap()]));
    let got = walk::read_record(&dir).unwrap().unwrap();
    assert_eq!(
        WalkRecord {
            animations: vec![],
            ..got
        },
        expected
    );
}
