//! `latent walk` under stress, on the tiny SD1 model: a real ffmpeg MP4 read back by ffprobe,
//! two runs on one folder, leftovers of killed runs, absurd frame counts, SIGKILL at random
//! moments, and the library's run stopped by a cancel request.
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use latent::model::ModelSource;
use latent::noise::RngKind;
use latent::pipeline::{Sampling, StableDiffusion};
use latent::schedulers::SchedulerKind;
use latent::walk::{self, Ease, Interp, Keyframe, WalkConfig, WalkEvent, WalkFolder};
use latent::Cancel;
use serde_json::Value;

fn sd1() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny-sd1")
        .display()
        .to_string()
}

/// `latent walk` on the tiny model (DDIM, 2 steps, quiet) with `extra` flags, not yet started.
fn walk_command(cwd: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_latent"));
    cmd.current_dir(cwd)
        .args(["walk", "--model", &sd1(), "--scheduler", "ddim", "--quiet"])
        .args(["--steps", "2"])
        .args(extra)
        .env_remove("LATENT_MODEL")
        .env("HF_HUB_OFFLINE", "1");
    cmd
}

fn run(cwd: &Path, extra: &[&str]) -> Output {
    walk_command(cwd, extra).output().expect("run latent")
}

fn spawn(cwd: &Path, extra: &[&str]) -> Child {
    walk_command(cwd, extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start latent")
}

fn ok(o: Output) -> Output {
    assert!(
        o.status.success(),
        "latent failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// The one `error:` line of a failed run (exit code 1).
fn fails(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(lines.len(), 1, "one error line expected: {err}");
    lines[0].to_string()
}

/// The summary line of a `--json` run.
fn summary(o: &Output) -> Value {
    let text = String::from_utf8_lossy(&o.stdout);
    let last = text.lines().last().expect("a summary line");
    serde_json::from_str(last).expect("JSON summary")
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn frame_path(dir: &Path, k: usize) -> PathBuf {
    dir.join(format!("frame-{k:05}.png"))
}

/// Hidden files other than the folder's lock: temporary files of unfinished writes.
fn temporary_files(dir: &Path) -> Vec<String> {
    names(dir)
        .into_iter()
        .filter(|n| n.starts_with('.') && n != latent::files::LOCK_FILE)
        .collect()
}

fn on_path(program: &str) -> bool {
    Command::new(program)
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn mp4_made_by_ffmpeg_holds_every_frame_at_the_asked_speed() {
    if !(on_path("ffmpeg") && on_path("ffprobe")) {
        assert!(
            std::env::var("LATENT_REQUIRE_FFMPEG").as_deref() != Ok("1"),
            "LATENT_REQUIRE_FFMPEG=1 but ffmpeg or ffprobe is not on PATH"
        );
        eprintln!("note: ffmpeg/ffprobe not on PATH; skipping the MP4 check");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("w");
    let out = dir.display().to_string();
    // 2 segments of 3 frames and the closing frame: 7 frames at 10 fps = 0.7 s.
    ok(run(
        tmp.path(),
        &[
            "-p", "a", "-p", "b", "-p", "c", "--seed", "1", "--frames", "3", "--fps", "10",
            "--format", "mp4", "-o", &out,
        ],
    ));
    let mp4 = dir.join("walk.mp4");
    assert!(mp4.is_file());
    let probe = Command::new("ffprobe")
        .args(["-v", "error", "-count_frames", "-select_streams", "v:0"])
        .args([
            "-show_entries",
            "stream=nb_read_frames,width,height,duration",
        ])
        .args(["-of", "json"])
        .arg(&mp4)
        .output()
        .unwrap();
    assert!(probe.status.success(), "{probe:?}");
    let info: Value = serde_json::from_slice(&probe.stdout).unwrap();
    let stream = &info["streams"][0];
    let number = |v: &Value| -> f64 {
        match v {
            Value::String(s) => s.parse().unwrap(),
            other => other.as_f64().unwrap(),
        }
    };
    let (w, h) = image::image_dimensions(frame_path(&dir, 0)).unwrap();
    assert_eq!(number(&stream["nb_read_frames"]), 7.0, "{info}");
    assert_eq!(number(&stream["width"]), f64::from(w), "{info}");
    assert_eq!(number(&stream["height"]), f64::from(h), "{info}");
    let duration = number(&stream["duration"]);
    assert!(
        (duration - 0.7).abs() <= 0.1 + 1e-9,
        "duration {duration} s, expected 0.7 s within one frame"
    );
}

#[test]
fn a_second_walk_on_a_busy_folder_fails_at_once_or_waits_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("w");
    let out = dir.display().to_string();
    let args = [
        "-p", "a", "-p", "b", "--seed", "1", "--frames", "16", "--json", "-o", &out,
    ];
    let first = spawn(tmp.path(), &args);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !frame_path(&dir, 0).exists() {
        assert!(Instant::now() < deadline, "the first walk made no frame");
        std::thread::sleep(Duration::from_millis(10));
    }
    let started = Instant::now();
    let second = run(tmp.path(), &args);
    let err = fails(&second);
    assert!(
        err.contains(&format!(
            "{} is in use by another latent run (pid {})",
            dir.display(),
            first.id()
        )) && err.contains("--wait"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(10), "not at once");

    let mut waiting_args = args.to_vec();
    waiting_args.push("--wait");
    let waiting = spawn(tmp.path(), &waiting_args);
    let first = first.wait_with_output().unwrap();
    assert_eq!(summary(&ok(first))["rendered"], 17);
    let waited = ok(waiting.wait_with_output().unwrap());
    let s = summary(&waited);
    assert_eq!(
        (s["rendered"].as_u64(), s["skipped"].as_u64()),
        (Some(0), Some(17))
    );
    assert!(temporary_files(&dir).is_empty(), "{:?}", names(&dir));
}

#[test]
fn walks_without_a_folder_never_share_one() {
    let tmp = tempfile::tempdir().unwrap();
    let args = [
        "-p", "a", "-p", "b", "--seed", "3", "--frames", "6", "--json",
    ];
    // Started together: each takes its own walk-N, or the later one finds the first's folder
    // busy; never two runs in one folder.
    let a = spawn(tmp.path(), &args);
    let b = spawn(tmp.path(), &args);
    let outputs = [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()];
    let mut done = Vec::new();
    for o in &outputs {
        if o.status.success() {
            done.push(PathBuf::from(summary(o)["walk"].as_str().unwrap()));
        } else {
            assert!(fails(o).contains("is in use by another latent run"));
        }
    }
    assert!(!done.is_empty());
    if done.len() == 2 {
        assert_ne!(done[0], done[1], "two runs in one folder");
    }
    for d in &done {
        let d = tmp.path().join(d);
        let frames = names(&d).iter().filter(|n| n.starts_with("frame-")).count();
        assert_eq!(frames, 7, "{:?}", names(&d));
        assert!(walk::read_record(&d).unwrap().is_some());
    }

    // The same command again resumes a finished folder: nothing left to render.
    let again = ok(run(tmp.path(), &args));
    assert_eq!(summary(&again)["rendered"], 0);
}

#[test]
fn leftover_temporary_files_are_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("w");
    fs::create_dir(&dir).unwrap();
    // What a run killed mid-write leaves: hidden temporary files beside their targets.
    fs::write(dir.join(".frame-00000.png.tmp-99999-0"), b"half a png").unwrap();
    fs::write(dir.join(".walk.json.tmp-99999-1"), b"{").unwrap();
    let out = dir.display().to_string();
    ok(run(
        tmp.path(),
        &[
            "-p", "a", "-p", "b", "--seed", "1", "--frames", "1", "-o", &out,
        ],
    ));
    assert!(temporary_files(&dir).is_empty(), "{:?}", names(&dir));
    assert!(frame_path(&dir, 0).is_file() && frame_path(&dir, 1).is_file());
}

#[test]
fn absurd_frame_counts_fail_at_once_with_nothing_written() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("w");
    let out = dir.display().to_string();

    let started = Instant::now();
    let o = run(
        tmp.path(),
        &["-p", "a", "-p", "b", "--frames", "100000000", "-o", &out],
    );
    let err = fails(&o);
    assert!(
        err.contains("--frames 100000000") && err.contains("at most 100000 frames"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    let file = tmp.path().join("k.toml");
    fs::write(
        &file,
        "[[keyframe]]\nprompt = \"a\"\nseed = 1\nframes = 100000000\n\n[[keyframe]]\nprompt = \"b\"\nseed = 2\n",
    )
    .unwrap();
    let started = Instant::now();
    let o = run(tmp.path(), &[file.to_str().unwrap(), "-o", &out]);
    let err = fails(&o);
    assert!(
        err.contains(&format!("{}:4:", file.display())) && err.contains("at most 100000 frames"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // Segments each within the limit but over it together.
    let o = run(
        tmp.path(),
        &[
            "-p", "a", "-p", "b", "-p", "c", "--frames", "60000", "-o", &out,
        ],
    );
    let err = fails(&o);
    assert!(
        err.contains("--frames 120001") && err.contains("at most 100000"),
        "{err}"
    );
    assert!(!dir.exists(), "nothing may be written");
}

/// A small deterministic generator (xorshift64*), so the kill moments repeat run to run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[cfg(unix)]
#[test]
fn a_walk_killed_at_random_moments_resumes_to_the_uninterrupted_result() {
    let tmp = tempfile::tempdir().unwrap();
    let (reference, dir) = (tmp.path().join("reference"), tmp.path().join("killed"));
    let (reference_out, out) = (reference.display().to_string(), dir.display().to_string());
    // 8 frames, one per batch, GIF only.
    let walk = |out: &str| -> Vec<String> {
        let flags = "-p a -p b --seed 7 --seed 8 --frames 7 --batch-size 1 -o";
        let mut v: Vec<String> = flags.split(' ').map(String::from).collect();
        v.push(out.to_string());
        v
    };
    let (reference_args, args) = (walk(&reference_out), walk(&out));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();

    // The uninterrupted run, then a second one timed (warm, as the killed runs are: the first
    // may also set up the demo model's cache): the kills are spread over its duration.
    ok(run(
        tmp.path(),
        &reference_args
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    ));
    let started = Instant::now();
    ok(run(tmp.path(), &a));
    let span = started.elapsed();
    fs::remove_dir_all(&dir).unwrap();

    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    // Kills that left some frames but not all: the test must really interrupt walks.
    let mut partial = 0;
    for i in 0..20 {
        // A fresh walk each time, killed at a moment spread over a whole run (start-up and the
        // first write included, a little beyond the end too), then resumed.
        if dir.exists() {
            fs::remove_dir_all(&dir).unwrap();
        }
        let delay = Duration::from_millis(rng.next() % (span.as_millis() as u64 * 6 / 5).max(1));
        let mut child = walk_command(tmp.path(), &a)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        if dir.exists() {
            // Whatever is on disk after a kill is complete.
            for name in names(&dir) {
                if name.starts_with("frame-") {
                    image::open(dir.join(&name))
                        .unwrap_or_else(|e| panic!("kill {i}: {name} is incomplete: {e}"));
                }
            }
            if dir.join("walk.json").exists() {
                walk::read_record(&dir).unwrap().expect("walk.json");
            }
            let on_disk = names(&dir)
                .iter()
                .filter(|n| n.starts_with("frame-"))
                .count();
            if (1..8).contains(&on_disk) {
                partial += 1;
            }
        }
        ok(run(tmp.path(), &a));
        assert_same_walk(&dir, &reference, i);
    }
    eprintln!("{partial} of 20 kills interrupted a walk with frames on disk");
    assert!(partial >= 2, "only {partial} kills landed mid-walk");
}

/// `dir` holds the complete walk of `reference`: one PNG per frame, byte for byte the same, a
/// valid walk.json, the GIF, and no temporary files.
fn assert_same_walk(dir: &Path, reference: &Path, kill: usize) {
    let frames: Vec<String> = names(dir)
        .into_iter()
        .filter(|n| n.starts_with("frame-"))
        .collect();
    assert_eq!(frames.len(), 8, "kill {kill}: {frames:?}");
    for k in 0..8 {
        let got = fs::read(frame_path(dir, k)).unwrap();
        image::load_from_memory(&got).unwrap();
        assert!(
            got == fs::read(frame_path(reference, k)).unwrap(),
            "kill {kill}: frame {k} differs from the uninterrupted run's"
        );
    }
    let record = walk::read_record(dir).unwrap().expect("walk.json");
    assert_eq!(record.frames.len(), 8);
    assert_eq!(record.animations, ["walk.gif"]);
    assert!(dir.join("walk.gif").is_file());
    assert!(
        temporary_files(dir).is_empty(),
        "kill {kill}: {:?}",
        names(dir)
    );
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

#[test]
fn a_cancelled_run_stops_after_its_batch_and_resumes() {
    let files = ModelSource::parse(&sd1(), None).unwrap().open().unwrap();
    let model = StableDiffusion::load(&files, &Device::Cpu, DType::F32, &mut |_| {}).unwrap();
    let sampling = Sampling {
        width: 64,
        height: 64,
        steps: 2,
        guidance: 7.5,
        scheduler: SchedulerKind::Ddim,
        karras: false,
        rng: RngKind::Torch,
        size_conditioning: Default::default(),
        preview_every: None,
        text: Default::default(),
        image: None,
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("w");
    let config = WalkConfig {
        keyframes: vec![keyframe("a", 1, Some(3)), keyframe("b", 2, None)],
        reuse_recorded_seeds: false,
        looped: false,
        ease: Ease::Linear,
        text_interp: Interp::Lerp,
        preview: false,
        batch_size: 1,
        fps: 12.0,
        formats: vec![],
        folder: WalkFolder::At(dir.clone()),
        overwrite: false,
        wait: false,
    };
    walk::check_config(&config).unwrap();

    let cancel = Cancel::new();
    let mut written = Vec::new();
    let summary = walk::run(&model, &config, &sampling, &cancel, &mut |e| {
        if let WalkEvent::FrameWritten(f) = e {
            written.push(f.frame);
            // As a first Ctrl-C would: the batch in flight (this one frame) is finished.
            cancel.request();
        }
    })
    .unwrap();
    assert!(summary.stopped);
    assert_eq!((summary.rendered, summary.skipped), (1, 0));
    assert_eq!(written, [0]);
    assert!(summary.animations.is_empty() && !dir.join("walk.gif").exists());

    let summary = walk::run(&model, &config, &sampling, &Cancel::new(), &mut |_| {}).unwrap();
    assert!(!summary.stopped);
    assert_eq!(
        (summary.rendered, summary.skipped, summary.frames),
        (3, 1, 4)
    );
    assert_eq!(summary.animations, [dir.join("walk.gif")]);
    assert!(dir.join("walk.gif").is_file());
}
