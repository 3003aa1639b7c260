//! `latent batch` end to end on the tiny SD1 test model (64x64, 2-3 steps): files and
//! manifest, resume after a run stopped early, batch equals single, bad lines, exit codes,
//! whole-file errors, `--check`, `--json` and Ctrl-C.
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device};
use latent::batch::{self, Access, Batch, BatchConfig, BatchEvent, Defaults, Format, Plan, Stop};
use latent::model::ModelSource;
use latent::noise::RngKind;
use latent::pipeline::{Sampling, StableDiffusion, Timings};
use latent::Cancel;
use serde_json::Value;

mod common;
use common::batch::*;
use common::stderr;
use common::{max_abs, max_abs_diff};

const TXT: &str = "\
# two plain prompts, one AUTOMATIC1111 line
a photo of a cat

--prompt \"a dog, oil painting\" --negative_prompt 'blurry, dark' --seed 5 --n_iter 2 --sampler_name \"DPM++ 2M Karras\" --cfg_scale 6
a red fox
";

const JSONL: &str = "\
{\"prompt\": \"a blue bird\", \"width\": 72, \"height\": 64, \"seed\": 9}
";

#[test]
fn writes_files_and_a_manifest_record_per_image() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "p.txt", TXT);
    write(dir.path(), "q.jsonl", JSONL);
    let o = run_batch(dir.path(), &["p.txt", "q.jsonl"], &["--batch-size", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("5 items: 5 made, 0 skipped (already done), 0 failed, 0 left; 0 bad lines"),
        "{err}"
    );

    let want: BTreeSet<String> = [
        "00000-100-a_photo_of_a_cat.png",
        "00001-5-a_dog_oil_painting.png",
        "00002-6-a_dog_oil_painting.png",
        "00003-103-a_red_fox.png",
        "00004-9-a_blue_bird.png",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(pngs(dir.path()), want);

    let recs = records(dir.path());
    assert_eq!(recs.len(), 5);
    let by_index = |i: usize| recs.iter().find(|r| r.index == i).unwrap();
    let cat = by_index(0);
    assert_eq!(
        (cat.seed, cat.seed_from, cat.run_seed),
        (100, batch::SeedFrom::Run, 100)
    );
    assert_eq!((cat.width, cat.height, cat.steps), (64, 64, 2));
    assert_eq!((cat.sampler_name.as_str(), cat.cfg_scale), ("PLMS", 7.5));
    assert_eq!(cat.source, "p.txt:2");
    let dog = by_index(2);
    assert_eq!(
        (dog.seed, dog.seed_from, dog.prompt.as_str()),
        (6, batch::SeedFrom::Line, "a dog, oil painting")
    );
    assert_eq!(dog.negative_prompt, "blurry, dark");
    assert_eq!(
        (
            dog.sampler_name.as_str(),
            dog.scheduler.as_str(),
            dog.karras
        ),
        ("DPM++ 2M Karras", "dpm++2m", true)
    );
    assert_eq!(dog.cfg_scale, 6.0);
    // The two dog images share settings, so they ran as one batch of 2.
    assert_eq!(dog.batch_size, Some(2));
    let fox = by_index(3);
    assert_eq!((fox.seed, fox.source.as_str()), (103, "p.txt:5"));
    // The cat and the fox share settings too and were grouped into one batch.
    assert_eq!((cat.batch_size, fox.batch_size), (Some(2), Some(2)));
    let bird = by_index(4);
    assert_eq!((bird.width, bird.height, bird.seed), (72, 64, 9));
    assert_eq!(bird.source, "q.jsonl:1");
    for r in &recs {
        let t = r.timings.as_ref().expect("timings");
        assert!(t.denoise_s > 0.0 && t.image_s > 0.0, "{t:?}");
        assert_eq!(r.model, "tiny-sd1");
        // Each PNG carries exactly the parameters its record names.
        let png = dir.path().join("out").join(&r.file);
        let text = latent::output::read_png_parameters(&png).unwrap().unwrap();
        assert_eq!(text, r.parameters);
        assert!(text.contains(&format!("Seed: {}", r.seed)), "{text}");
        let img = image::open(&png).unwrap();
        assert_eq!(
            (img.width(), img.height()),
            (r.width as u32, r.height as u32)
        );
    }
    let dog_params = latent::output::parse_a1111(&dog.parameters).unwrap();
    assert_eq!(dog_params.negative_prompt, "blurry, dark");
    assert_eq!(dog_params.get("Schedule type"), Some("Karras"));
}

#[test]
fn a_run_stopped_early_resumes_with_only_the_missing_items() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "p.txt",
        "a cat\na dog\n--prompt fox --n_iter 3\n",
    );
    // --max-images stops the first run after 2 images, as an interrupted run would stop.
    let o = run_batch(
        dir.path(),
        &["p.txt"],
        &["--max-images", "2", "--batch-size", "2"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("5 items: 2 made, 0 skipped (already done), 0 failed, 3 left"));
    assert!(stderr(&o).contains("stopped after --max-images 2"));
    let first = pngs(dir.path());
    assert_eq!(first.len(), 2);
    assert_eq!(records(dir.path()).len(), 2);
    let stamp = |name: &str| {
        fs::metadata(dir.path().join("out").join(name))
            .unwrap()
            .modified()
            .unwrap()
    };
    let before: Vec<_> = first.iter().map(|n| stamp(n)).collect();

    // The same command without a seed: the run seed comes back from the manifest.
    let model = model_dir();
    let o = latent(
        dir.path(),
        &[
            "batch", "p.txt", "--model", &model, "--steps", "2", "-o", "out", "--json",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("5 items: 3 made, 2 skipped (already done), 0 failed, 0 left"),
        "{}",
        stderr(&o)
    );
    let lines: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let made: Vec<u64> = lines.iter().map(|v| v["index"].as_u64().unwrap()).collect();
    assert_eq!(made, [2, 3, 4], "only the missing items");
    for v in &lines {
        assert_eq!(v["run_seed"], 100);
        assert!(Path::new(dir.path().join(v["path"].as_str().unwrap()).as_path()).is_file());
    }
    let after: Vec<_> = first.iter().map(|n| stamp(n)).collect();
    assert_eq!(before, after, "finished files are not rewritten");
    assert_eq!(pngs(dir.path()).len(), 5);
    let recs = records(dir.path());
    let indices: BTreeSet<usize> = recs.iter().map(|r| r.index).collect();
    assert_eq!((recs.len(), indices.len()), (5, 5));

    // Everything done: a third run skips all and makes nothing.
    let o = run_batch(dir.path(), &["p.txt"], &[]);
    assert!(o.status.success());
    assert!(stderr(&o).contains("5 items: 0 made, 5 skipped"));

    // A deleted file is made again; a file whose record was lost is recorded, not remade.
    let gone = recs.iter().find(|r| r.index == 1).unwrap().file.clone();
    fs::remove_file(dir.path().join("out").join(&gone)).unwrap();
    let manifest = dir.path().join("out").join(batch::MANIFEST_NAME);
    let text = fs::read_to_string(&manifest).unwrap();
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.contains("\"index\":4"))
        .collect();
    // ... and the last line torn, as a crash in the middle of a write leaves it.
    let torn = format!("{}\n{}", kept.join("\n"), "{\"file\":\"000");
    fs::write(&manifest, torn).unwrap();
    let o = run_batch(dir.path(), &["p.txt"], &["--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("dropped the incomplete last record"), "{err}");
    assert!(
        err.contains("5 items: 1 made, 4 skipped (already done), 0 failed, 0 left"),
        "{err}"
    );
    let made: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(made.len(), 1);
    assert_eq!(made[0]["file"], gone.as_str());
    let recs = records(dir.path());
    let indices: BTreeSet<usize> = recs.iter().map(|r| r.index).collect();
    assert_eq!(indices, (0..5).collect());
    let recovered = recs.iter().find(|r| r.index == 4).unwrap();
    assert!(recovered.timings.is_none() && recovered.batch_size.is_none());
}

#[test]
fn images_made_in_a_batch_equal_images_made_alone_in_files() {
    let dir = tempfile::tempdir().unwrap();
    // Three prompts and two negative prompts in one group: stacked embeddings in one batch.
    write(
        dir.path(),
        "p.txt",
        "a cat\n--prompt \"a dog\" --negative_prompt blurry\n--prompt fox --seed 7\n",
    );
    let o = run_batch_to(dir.path(), "batched", &["p.txt"], &["--batch-size", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let manifest = dir.path().join("batched").join(batch::MANIFEST_NAME);
    let batched = fs::read_to_string(manifest).unwrap();
    assert_eq!(
        batched.matches("\"batch_size\":3").count(),
        3,
        "one batch of 3"
    );
    let o = run_batch_to(dir.path(), "alone", &["p.txt"], &["--batch-size", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    for name in [
        "00000-100-a_cat.png",
        "00001-101-a_dog.png",
        "00002-7-fox.png",
    ] {
        let a = image::open(dir.path().join("batched").join(name))
            .unwrap()
            .to_rgb8();
        let b = image::open(dir.path().join("alone").join(name))
            .unwrap()
            .to_rgb8();
        let worst = a
            .as_raw()
            .iter()
            .zip(b.as_raw())
            .map(|(x, y)| x.abs_diff(*y))
            .max()
            .unwrap();
        // Latents differ only by float summation order (~1e-5); after 8-bit rounding a pixel
        // may flip by one level at most.
        assert!(worst <= 1, "{name}: pixels differ by {worst}");
    }
}

fn load_tiny() -> StableDiffusion {
    let files = ModelSource::parse(&model_dir(), None)
        .unwrap()
        .open()
        .unwrap();
    StableDiffusion::load(&files, &Device::Cpu, DType::F32, &mut |_| {}).unwrap()
}

#[test]
fn render_jobs_batch_equals_single_on_latents() {
    let model = load_tiny();
    let text = "a cat\n--prompt \"a dog\" --negative_prompt blurry\n--prompt fox --seed 7\n\
                --prompt owl --steps 3\n";
    let file = batch::parse_prompt_text(Path::new("p.txt"), text, Format::Text).unwrap();
    let defaults = Defaults {
        negative_prompt: String::new(),
        sampling: Sampling {
            width: 64,
            height: 64,
            steps: 3,
            guidance: 7.5,
            scheduler: "euler-a".parse().unwrap(),
            karras: false,
            rng: RngKind::Torch,
            size_conditioning: Default::default(),
            preview_every: None,
            text: Default::default(),
            image: None,
        },
        repeat: 1,
    };
    let plan = Plan::new(&[file], &defaults, 40, &|j| batch::validate_job(&model, j));
    assert!(plan.errors.is_empty());
    let groups = batch::group_jobs(&plan.jobs);
    assert_eq!(groups.len(), 1, "steps 3 equals the default: one group");
    let jobs = &groups[0].jobs;
    assert_eq!(jobs.len(), 4);

    let mut t = Timings::default();
    let together =
        batch::render_jobs(&model, jobs, 0, &mut t, &Cancel::new(), &mut |_| {}).unwrap();
    assert_eq!(t.unet_steps, 3, "one UNet loop for the whole batch");
    for (i, job) in jobs.iter().enumerate() {
        let alone = batch::render_jobs(
            &model,
            &[job],
            0,
            &mut Timings::default(),
            &Cancel::new(),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(together[i].seed, job.seed);
        let d = max_abs_diff(&together[i].latents, &alone[0].latents);
        let scale = max_abs(&alone[0].latents);
        eprintln!(
            "item {i}: batch of 4 vs alone: latents max abs diff {d:.2e} (max |x| {scale:.1})"
        );
        // Same math at another batch size: summation order only. Measured 4.6e-5 to 5.3e-5
        // absolute on latents up to 15 in magnitude (about 4e-6 relative); the bound is 2e-5 of
        // the largest magnitude, a few float32 roundings per step accumulated.
        assert!(
            d <= 2e-5 * scale,
            "item {i}: latents differ by {d} (max |x| {scale})"
        );
    }
    // Different prompts give different images: the rows are not all the first prompt.
    assert!(max_abs_diff(&together[0].latents, &together[1].latents) > 1e-3);

    // Jobs with different settings cannot share a batch.
    let mut other = jobs[1].clone();
    other.sampling.steps = 4;
    let e = batch::render_jobs(
        &model,
        &[jobs[0], &other],
        0,
        &mut t,
        &Cancel::new(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("cannot share a batch"), "{e}");
}

#[test]
fn a_bad_line_does_not_stop_the_good_ones() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "p.txt",
        "a cat\n--prompt \"unclosed\n--prompt dog --width 100\n--prompt x --sampler_name Heun\n\
         a fox\n",
    );
    let o = run_batch(dir.path(), &["p.txt"], &[]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    for want in [
        "p.txt:2: unclosed double quote (opened at column 10)",
        "p.txt:3: width 100: must be a positive multiple of 8",
        "p.txt:4: --sampler_name: unknown sampler `Heun`",
        "2 items: 2 made, 0 skipped (already done), 0 failed, 0 left; 3 bad lines",
        "error: 3 lines were not usable (see above)",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    assert_eq!(
        pngs(dir.path()),
        ["00000-100-a_cat.png", "00001-101-a_fox.png"]
            .into_iter()
            .map(String::from)
            .collect()
    );
    assert_eq!(records(dir.path()).len(), 2);
}

#[test]
fn a_foreign_file_in_the_way_fails_its_item_and_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "p.txt", "a cat\na dog\n");
    fs::create_dir(dir.path().join("out")).unwrap();
    let blocker = dir.path().join("out").join("00001-101-a_dog.png");
    fs::write(&blocker, b"not mine").unwrap();
    let o = run_batch(dir.path(), &["p.txt"], &[]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("p.txt:2: item 1: "), "{err}");
    assert!(
        err.contains("is in the way: it is not a readable PNG"),
        "{err}"
    );
    assert!(
        err.contains("1 made, 0 skipped (already done), 1 failed"),
        "{err}"
    );
    assert!(err.contains("error: 1 item failed (see above)"), "{err}");
    assert_eq!(fs::read(&blocker).unwrap(), b"not mine");
    // --overwrite replaces it.
    let o = run_batch(dir.path(), &["p.txt"], &["--overwrite"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(latent::output::read_png_parameters(&blocker)
        .unwrap()
        .is_some());
}

#[test]
fn whole_file_problems_are_clear_errors_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "empty.txt", "");
    write(dir.path(), "comments.txt", "# nothing\n\n");
    write(dir.path(), "list.csv", "a cat\n");
    fs::write(dir.path().join("latin1.txt"), b"a cat\ncaf\xe9\n").unwrap();
    let cases: [(&[&str], &str); 5] = [
        (&["missing.txt"], "error: missing.txt: No such file"),
        (&["empty.txt"], "error: empty.txt: the file is empty"),
        (
            &["comments.txt"],
            "error: comments.txt: no prompts in the file (only comments and blank lines)",
        ),
        (
            &["latin1.txt"],
            "error: latin1.txt:2: the file is not valid UTF-8 (byte 9 is 0xE9); save it as UTF-8",
        ),
        (&["list.csv"], "error: list.csv: cannot tell the format"),
    ];
    for (files, want) in cases {
        let o = run_batch(dir.path(), files, &[]);
        assert_eq!(o.status.code(), Some(1), "{files:?}");
        let err = stderr(&o);
        assert!(err.contains(want), "{files:?}: {err}");
        assert_eq!(err.lines().filter(|l| l.starts_with("error:")).count(), 1);
        assert!(
            !dir.path().join("out").exists(),
            "nothing written for {files:?}"
        );
    }
    // --format reads any extension.
    let o = run_batch(dir.path(), &["list.csv"], &["--format", "text"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(pngs(dir.path()).len(), 1);
    // Bad flags.
    for (flags, want) in [
        (
            &["--batch-size", "0"][..],
            "--batch-size 0: must be at least 1",
        ),
        (&["--repeat", "0"][..], "-n/--repeat 0: must be at least 1"),
        (&["--filename", "{index}.jpg"][..], "must end in .png"),
    ] {
        let o = run_batch(dir.path(), &["list.csv", "--format", "text"], flags);
        assert_eq!(o.status.code(), Some(1));
        assert!(stderr(&o).contains(want), "{}", stderr(&o));
    }
}

#[test]
fn check_prints_the_plan_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "p.txt",
        "a cat\n--prompt dog --steps 3\n--prompt fox --n_iter 2\n",
    );
    let o = run_batch(dir.path(), &["p.txt"], &["--check", "--batch-size", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for want in [
        "4 items from 1 file(s), run seed 100, output out",
        "4 to make in 2 group(s), 3 batch(es) of up to 2; 0 already done",
        "group 1: 64x64, 2 steps, PLMS, cfg 7.5, rng torch: 3 item(s) in 2 batch(es)",
        "group 2: 64x64, 3 steps, PLMS, cfg 7.5, rng torch: 1 item(s) in 1 batch(es)",
        "00003  seed 103",
        "estimated time: ",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    assert!(!dir.path().join("out").exists());

    write(dir.path(), "bad.txt", "a cat\n--prompt x --steps 0\n");
    let o = run_batch(dir.path(), &["bad.txt"], &["--check"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("bad.txt:2: --steps 0: must be at least 1"));
    assert!(stderr(&o).contains("error: 1 line was not usable"));
}

/// The run seed is recorded, so a later run without --seed makes the same seeds.
#[test]
fn item_seeds_come_from_the_run_seed_and_index() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "p.txt", "a\n--prompt b --seed 42\nc\n");
    let o = run_batch(dir.path(), &["p.txt"], &["-n", "2", "--json", "--quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).is_empty(), "--quiet: {}", stderr(&o));
    let seeds: Vec<(u64, String)> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|v| {
            (
                v["seed"].as_u64().unwrap(),
                v["seed_from"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: Vec<(u64, String)> = [
        (100, "run"),
        (101, "run"),
        (42, "line"),
        (43, "line"),
        (104, "run"),
        (105, "run"),
    ]
    .into_iter()
    .map(|(s, f)| (s, f.to_string()))
    .collect();
    assert_eq!(seeds, want);
}

#[cfg(unix)]
fn interrupt_run(presses: usize) -> (Output, PathBuf, tempfile::TempDir) {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    // Enough work that the run is still going when the signal comes.
    write(dir.path(), "p.txt", "--prompt a cat --n_iter 12\n");
    let model = model_dir();
    let child = Command::new(env!("CARGO_BIN_EXE_latent"))
        .current_dir(dir.path())
        .args([
            "batch", "p.txt", "--model", &model, "--steps", "20", "-o", "out", "--seed", "1",
        ])
        .env_remove("LATENT_MODEL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let manifest = dir.path().join("out").join(batch::MANIFEST_NAME);
    let start = Instant::now();
    while fs::read_to_string(&manifest).map_or(true, |t| t.lines().count() < 1) {
        assert!(start.elapsed() < Duration::from_secs(60), "no image made");
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..presses {
        let ok = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (out, manifest, dir)
}

/// Every record names a PNG that exists and every PNG has a record, with no temporary files.
#[cfg(unix)]
fn assert_consistent(dir: &Path) {
    let recorded: BTreeSet<String> = records(dir).into_iter().map(|r| r.file).collect();
    assert_eq!(recorded, pngs(dir));
    let temps = temps(dir);
    assert!(temps.is_empty(), "temporary files left: {temps:?}");
}

#[cfg(unix)]
#[test]
fn ctrl_c_finishes_the_batch_and_keeps_the_manifest_consistent() {
    let (out, _, dir) = interrupt_run(1);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("interrupted: finishing the current batch"),
        "{err}"
    );
    assert!(
        err.contains("run the same command again to resume"),
        "{err}"
    );
    let made = pngs(dir.path()).len();
    assert!((1..12).contains(&made), "{made} images");
    assert_consistent(dir.path());

    // Resume makes exactly the rest.
    let o = latent(
        dir.path(),
        &[
            "batch",
            "p.txt",
            "--model",
            &model_dir(),
            "--steps",
            "20",
            "-o",
            "out",
            "--quiet",
            "--batch-size",
            "4",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(pngs(dir.path()).len(), 12);
    assert_eq!(records(dir.path()).len(), 12);
}

#[cfg(unix)]
#[test]
fn a_second_ctrl_c_abandons_the_batch_cleanly() {
    let (out, _, dir) = interrupt_run(2);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted again: quitting"), "{err}");
    assert_consistent(dir.path());
}

#[test]
fn the_library_run_stops_after_the_batch_in_flight_when_cancelled() {
    let model = load_tiny();
    let dir = tempfile::tempdir().unwrap();
    let file = batch::parse_prompt_text(
        Path::new("p.txt"),
        "--prompt a cat --n_iter 5\n",
        Format::Text,
    )
    .unwrap();
    let config = BatchConfig {
        out_dir: dir.path().join("out"),
        seed: Some(3),
        new_seed: 0,
        repeat: 1,
        batch_size: 2,
        max_images: None,
        template: batch::DEFAULT_TEMPLATE.parse().unwrap(),
        overwrite: false,
        wait: false,
        shard: None,
    };
    let sampling = Sampling {
        width: 64,
        height: 64,
        steps: 2,
        guidance: 7.5,
        scheduler: "euler".parse().unwrap(),
        karras: false,
        rng: RngKind::Torch,
        size_conditioning: Default::default(),
        preview_every: None,
        text: Default::default(),
        image: None,
    };
    // The settings check comes first, before the folder is touched.
    let bad = BatchConfig {
        batch_size: 0,
        ..config.clone()
    };
    let e = Batch::prepare(
        &model,
        bad,
        std::slice::from_ref(&file),
        "",
        sampling.clone(),
        Access::Write,
    );
    assert_eq!(
        e.err().map(|e| e.to_string()),
        Some("batch_size 0: must be at least 1".to_string())
    );
    assert!(!dir.path().join("out").exists());

    let prepared = Batch::prepare(&model, config, &[file], "", sampling, Access::Write).unwrap();
    assert_eq!(prepared.todo().len(), 5);
    let cancel = Cancel::new();
    let mut written = Vec::new();
    let mut batches = 0;
    let summary = prepared
        .run(&cancel, &mut |event| match event {
            BatchEvent::BatchStarted { .. } => batches += 1,
            BatchEvent::Written { record, .. } => {
                written.push(record.index);
                // A server's stop button: asked while the first batch is being written.
                cancel.request();
            }
            _ => {}
        })
        .unwrap();
    assert_eq!(batches, 1);
    assert_eq!(written, vec![0, 1], "the batch in flight is finished");
    assert_eq!(summary.stop, Stop::Cancelled);
    assert_eq!((summary.made, summary.left, summary.items), (2, 3, 5));
    assert!(summary.stopped_early());
    assert_eq!(records(dir.path()).len(), 2);
}

#[test]
fn a_run_kept_in_memory_makes_the_files_a_folder_run_writes_and_touches_no_folder() {
    let model = load_tiny();
    let dir = tempfile::tempdir().unwrap();
    // An in-memory prompt source, as a server builds one from a request.
    let spec = batch::LineSpec {
        prompt: "a cat".into(),
        negative_prompt: Some("blurry".into()),
        seed: Some(40),
        batch_size: Some(2),
        n_iter: Some(2),
        ..Default::default()
    };
    let file = batch::PromptFile::in_memory("request", vec![spec]);
    let config = |out: &str| BatchConfig {
        out_dir: dir.path().join(out),
        seed: Some(40),
        new_seed: 0,
        repeat: 1,
        batch_size: 2,
        max_images: None,
        template: batch::DEFAULT_TEMPLATE.parse().unwrap(),
        overwrite: false,
        wait: false,
        shard: None,
    };
    let sampling = Sampling {
        width: 64,
        height: 64,
        steps: 2,
        guidance: 7.5,
        scheduler: "euler".parse().unwrap(),
        karras: false,
        rng: RngKind::Torch,
        size_conditioning: Default::default(),
        preview_every: None,
        text: Default::default(),
        image: None,
    };
    let run = |out: &str, access| {
        let prepared = Batch::prepare(
            &model,
            config(out),
            std::slice::from_ref(&file),
            "",
            sampling.clone(),
            access,
        )
        .unwrap();
        let mut made = Vec::new();
        let summary = prepared
            .run(&Cancel::new(), &mut |event| match event {
                BatchEvent::Made { png, record } => made.push((record.clone(), png.to_vec())),
                BatchEvent::Written { path, record } => {
                    made.push((record.clone(), fs::read(path).unwrap()))
                }
                _ => {}
            })
            .unwrap();
        assert_eq!((summary.made, summary.failed), (4, 0));
        made
    };
    let memory = run("memory", Access::Memory);
    assert!(
        !dir.path().join("memory").exists(),
        "no folder, no lock, no manifest"
    );
    let written = run("folder", Access::Write);
    assert_eq!(memory.len(), 4);
    for ((mem_record, mem_png), (file_record, file_png)) in memory.iter().zip(&written) {
        assert_eq!(mem_record.seed, file_record.seed);
        assert_eq!(mem_record.source, "request:1");
        assert_eq!(mem_record.parameters, file_record.parameters);
        assert!(
            mem_png == file_png,
            "the same PNG bytes, parameters included"
        );
    }
    let seeds: Vec<u64> = memory.iter().map(|(r, _)| r.seed).collect();
    assert_eq!(seeds, [40, 41, 42, 43]);
}
