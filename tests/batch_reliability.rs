//! `latent batch` when things go wrong around it: a second run on the same folder, files left
//! by a killed run, a symbolic link in place of the manifest, control characters in prompts, a
//! full disk, and SIGKILL at random moments followed by resumes.
use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::batch::*;
use common::stderr;

/// `latent batch p.txt` on the tiny model into `out`, as a child process.
fn spawn_batch(dir: &Path, steps: &str, extra: &[&str]) -> Child {
    let model = model_dir();
    Command::new(env!("CARGO_BIN_EXE_latent"))
        .current_dir(dir)
        .args([
            "batch", "p.txt", "--model", &model, "--steps", steps, "-o", "out", "--seed", "100",
            "--quiet",
        ])
        .args(extra)
        .env_remove("LATENT_MODEL")
        .env("HF_HUB_OFFLINE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until `out/manifest.jsonl` has at least `n` lines.
fn wait_for_records(dir: &Path, n: usize) {
    let manifest = dir.join("out/manifest.jsonl");
    let start = Instant::now();
    while fs::read_to_string(&manifest).map_or(true, |t| t.lines().count() < n) {
        assert!(start.elapsed() < Duration::from_secs(120), "no image made");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_second_run_on_the_same_folder_stops_at_once_or_waits_with_wait() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "p.txt", "--prompt a cat --n_iter 16\n");
    let first = spawn_batch(dir.path(), "20", &[]);
    wait_for_records(dir.path(), 1);

    // `--check` only reads: it neither waits for the run nor disturbs it.
    let o = spawn_batch(dir.path(), "20", &["--check", "--json"])
        .wait_with_output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["items"], 16);

    let started = Instant::now();
    let o = spawn_batch(dir.path(), "20", &[])
        .wait_with_output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let want = format!("is in use by another latent run (pid {})", first.id());
    assert!(err.contains(&want), "{err}");
    assert!(err.contains("pass --wait"), "{err}");
    assert_eq!(err.lines().count(), 1, "one message: {err}");
    // At once: no image rendered, only the model loaded.
    assert!(started.elapsed() < Duration::from_secs(30));

    let waiting = spawn_batch(dir.path(), "20", &["--wait", "--json"]);
    let o = waiting.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = first.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The waiting run found everything done (it made nothing: no --json line), and each item
    // is recorded exactly once.
    assert_eq!(stdout(&o), "");
    let files: Vec<String> = records(dir.path()).into_iter().map(|r| r.file).collect();
    let unique: BTreeSet<String> = files.iter().cloned().collect();
    assert_eq!(files.len(), 16);
    assert_eq!(unique, pngs(dir.path()));
}

#[test]
fn a_leftover_temporary_file_is_removed_by_the_next_run() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "p.txt", "a cat\n");
    fs::create_dir(dir.path().join("out")).unwrap();
    // What `kill -9` during a PNG write leaves, and a file of someone else's.
    write(dir.path(), "out/.00000-5.png.tmp-123-0", "partial");
    write(dir.path(), "out/.notes.txt", "mine");
    let o = run_batch(dir.path(), &["p.txt"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(temps(dir.path()).is_empty(), "{:?}", temps(dir.path()));
    assert!(dir.path().join("out/.notes.txt").exists());
    assert_eq!(pngs(dir.path()).len(), 1);
}

#[cfg(unix)]
#[test]
fn a_symlinked_manifest_is_refused_and_its_target_untouched() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "p.txt", "a cat\n");
    write(dir.path(), "elsewhere.jsonl", "");
    fs::create_dir(dir.path().join("out")).unwrap();
    std::os::unix::fs::symlink("../elsewhere.jsonl", dir.path().join("out/manifest.jsonl"))
        .unwrap();
    let o = run_batch(dir.path(), &["p.txt"], &[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("manifest.jsonl: is a symbolic link"),
        "names the link: {err}"
    );
    assert_eq!(fs::read(dir.path().join("elsewhere.jsonl")).unwrap(), b"");
    assert!(pngs(dir.path()).is_empty());
}

#[test]
fn control_characters_in_prompts_are_line_errors_and_other_lines_render() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "p.txt", "a cat\na\0dog\na fox\n");
    write(
        dir.path(),
        "q.jsonl",
        "{\"prompt\": \"a bird\", \"negative_prompt\": \"x\\u0007y\"}\n{\"prompt\": \"tab\\tok\"}\n",
    );
    let o = run_batch(dir.path(), &["p.txt", "q.jsonl"], &[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("p.txt:2:") && err.contains("U+0000"), "{err}");
    assert!(
        err.contains("q.jsonl:1:") && err.contains("U+0007"),
        "{err}"
    );
    assert!(err.contains("2 lines were not usable"), "{err}");
    // A tab is allowed.
    assert_eq!(pngs(dir.path()).len(), 3);
    assert_eq!(records(dir.path()).len(), 3);
}

/// Mounts a tmpfs of `size` at `dir`; false (with a note) where that is not allowed.
#[cfg(target_os = "linux")]
fn mount_tmpfs(dir: &Path, size: &str) -> bool {
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("note: cannot mount a tmpfs here (not root?); skipping the full-disk test");
    }
    ok
}

#[cfg(target_os = "linux")]
#[test]
fn a_full_disk_stops_the_run_at_the_first_write_that_fails() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "p.txt", "--prompt a cat --n_iter 40\n");
    let out = dir.path().join("out");
    fs::create_dir(&out).unwrap();
    if !mount_tmpfs(&out, "1m") {
        return;
    }
    // Fill all but ~40 KB: room for the lock, the manifest and a PNG or two (~13 KB each).
    let filler = vec![0u8; 1024 * 1024 - 40 * 1024];
    let _ = fs::write(out.join("filler"), &filler);
    let o = run_batch(dir.path(), &["p.txt"], &[]);
    let err = stderr(&o);
    let made = pngs(dir.path());
    assert_pngs_decode(dir.path());
    let leftover = temps(dir.path());
    let unmounted = Command::new("umount").arg(&out).status();
    assert!(
        unmounted.is_ok_and(|s| s.success()),
        "umount {}",
        out.display()
    );

    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("no space left on device"), "{err}");
    assert!(err.contains("free some space"), "{err}");
    // One failed item, then the run stops: it does not try the other items.
    assert_eq!(err.matches("failed:").count(), 1, "{err}");
    assert!(made.len() < 40);
    assert!(err.contains("error: stopped: "), "{err}");
    assert!(
        err.contains(&format!("{} made, {} left", made.len(), 40 - made.len()))
            || err.contains(&format!(
                "{} made, {} left",
                made.len() - 1,
                41 - made.len()
            )),
        "{err}"
    );
    assert!(leftover.is_empty(), "{leftover:?}");
}

/// xorshift64*: a fixed sequence of kill delays, the same on every run of the test.
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
fn killed_at_random_moments_and_resumed_it_ends_like_an_uninterrupted_run() {
    let reference = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    for d in [reference.path(), dir.path()] {
        write(
            d,
            "p.txt",
            "--prompt a cat --n_iter 3\n--prompt a dog --n_iter 3\n",
        );
    }
    let started = Instant::now();
    let o = spawn_batch(reference.path(), "4", &[])
        .wait_with_output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let whole_run = started.elapsed();

    let mut rng = Rng(0x5eed_1234_abcd_0001);
    for _ in 0..20 {
        // From at once to the whole run's length, so some kills land before any output.
        let delay = whole_run.mul_f64((rng.next() % 1000) as f64 / 1000.0);
        let mut child = spawn_batch(dir.path(), "4", &[]);
        std::thread::sleep(delay);
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let o = spawn_batch(dir.path(), "4", &[])
        .wait_with_output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    assert_eq!(pngs(dir.path()), pngs(reference.path()));
    assert_eq!(pngs(dir.path()).len(), 6);
    assert_pngs_decode(dir.path());
    let files: Vec<String> = records(dir.path()).into_iter().map(|r| r.file).collect();
    assert_eq!(files.len(), 6, "one record per item: {files:?}");
    assert_eq!(files.iter().collect::<BTreeSet<_>>().len(), 6);
    assert!(temps(dir.path()).is_empty(), "{:?}", temps(dir.path()));
    for name in pngs(dir.path()) {
        let got = fs::read(dir.path().join("out").join(&name)).unwrap();
        let want = fs::read(reference.path().join("out").join(&name)).unwrap();
        assert!(got == want, "{name} differs from the uninterrupted run's");
    }
}

#[test]
fn a_line_asking_for_a_huge_image_fails_alone() {
    // Before the size limits this line aborted the whole batch with an allocation failure.
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "q.jsonl",
        "{\"prompt\": \"a cat\"}\n{\"prompt\": \"huge\", \"width\": 100000, \"height\": 100000}\n\
         {\"prompt\": \"a fox\"}\n",
    );
    let started = Instant::now();
    let o = run_batch(dir.path(), &["q.jsonl"], &[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("q.jsonl:2: width 100000: is larger than the limit of 16384 pixels"),
        "{err}"
    );
    assert!(err.contains("1 line was not usable"), "{err}");
    assert_eq!(pngs(dir.path()).len(), 2);
    assert_eq!(records(dir.path()).len(), 2);
    assert!(started.elapsed() < Duration::from_secs(60));
}
