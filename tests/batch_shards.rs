//! `latent batch --shard`: shards running side by side into one folder add up, after
//! `--merge`, to one unsharded run; a killed shard resumes only its own items; `--shard auto`
//! reads Kubernetes' and Slurm's variables; bad values are clear errors.
use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use latent::batch::Record;
use serde_json::Value;

mod common;
use common::batch::*;
use common::stderr;

const PROMPTS: &str = "--prompt a cat --n_iter 4\na dog\n--prompt a fox --n_iter 2\n";

/// `latent batch p.txt` on the tiny model into `out` with `extra` flags and `env` set.
fn batch_cmd(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Command {
    let model = model_dir();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_latent"));
    cmd.current_dir(dir)
        .args(["batch", "p.txt", "--model", &model, "-o", "out"])
        .args(extra)
        .env_remove("LATENT_MODEL")
        .env_remove("JOB_COMPLETION_INDEX")
        .env_remove("LATENT_SHARD_COUNT")
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("SLURM_ARRAY_TASK_COUNT")
        .env_remove("SLURM_ARRAY_TASK_MIN")
        .env("HF_HUB_OFFLINE", "1")
        .envs(env.iter().copied());
    cmd
}

/// [`batch_cmd`] with 2 steps, run to its end.
fn run(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    batch_cmd(dir, extra, env)
        .args(["--steps", "2"])
        .output()
        .unwrap()
}

/// The records of one manifest file in `dir/out`.
fn manifest_records(dir: &Path, name: &str) -> Vec<Record> {
    fs::read_to_string(dir.join("out").join(name))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// What makes two records the same, timings and machine aside.
fn key_fields(r: &Record) -> (usize, String, u64, u64, String, String) {
    (
        r.index,
        r.file.clone(),
        r.seed,
        r.run_seed,
        r.prompt.clone(),
        r.parameters.clone(),
    )
}

/// Item indices of `--json` lines.
fn json_indices(o: &Output) -> Vec<u64> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["index"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

#[test]
fn three_shards_at_once_then_merge_equal_one_run() {
    let reference = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    for d in [reference.path(), dir.path()] {
        write(d, "p.txt", PROMPTS);
    }
    let o = run(reference.path(), &["--seed", "100", "--quiet"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));

    let shards: Vec<_> = ["1/3", "2/3", "3/3"]
        .iter()
        .map(|s| {
            batch_cmd(
                dir.path(),
                &["--seed", "100", "--steps", "2", "--quiet", "--shard", s],
                &[],
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    for child in shards {
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
    }
    for i in 1..=3 {
        let name = format!("manifest.shard-{i}-of-3.jsonl");
        for r in manifest_records(dir.path(), &name) {
            assert_eq!(r.index % 3, i - 1, "{name} holds item {}", r.index);
        }
    }
    let o = latent(dir.path(), &["batch", "--merge", "out"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("merged 3 manifest file(s)"),
        "{}",
        stderr(&o)
    );

    let manifests: BTreeSet<String> = fs::read_dir(dir.path().join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("manifest"))
        .collect();
    assert_eq!(manifests, BTreeSet::from(["manifest.jsonl".to_string()]));
    assert_eq!(pngs(dir.path()), pngs(reference.path()));
    assert_eq!(pngs(dir.path()).len(), 7);
    for name in pngs(dir.path()) {
        let got = fs::read(dir.path().join("out").join(&name)).unwrap();
        let want = fs::read(reference.path().join("out").join(&name)).unwrap();
        assert!(got == want, "{name} differs from the unsharded run's");
    }
    let got: Vec<_> = records(dir.path()).iter().map(key_fields).collect();
    let want: Vec<_> = records(reference.path()).iter().map(key_fields).collect();
    assert_eq!(got, want, "merged records in item order");

    // A resume after the merge has nothing left.
    let o = run(dir.path(), &["--json"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(json_indices(&o).is_empty());
}

#[cfg(unix)]
#[test]
fn a_killed_shard_resumes_only_its_own_items() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "p.txt", "--prompt a cat --n_iter 12\n");
    let shard = ["--seed", "100", "--shard", "2/3"];
    let mut child = batch_cmd(dir.path(), &shard, &[])
        .args(["--steps", "20"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let manifest = dir.path().join("out/manifest.shard-2-of-3.jsonl");
    let start = Instant::now();
    while fs::read_to_string(&manifest).map_or(true, |t| t.lines().count() < 1) {
        assert!(start.elapsed() < Duration::from_secs(60), "no image made");
        assert!(child.try_wait().unwrap().is_none(), "the shard ended early");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before = manifest_records(dir.path(), "manifest.shard-2-of-3.jsonl").len();
    assert!(before < 4, "killed before the end");

    // A killed writer's temporary files: one of this shard's items (item 1), removed by the
    // rerun, and one of shard 1's (item 0), which may be in the middle of being written.
    let own_temp = dir.path().join("out/.00001-101-a_cat.png.tmp-1-0");
    let other_temp = dir.path().join("out/.00000-100-a_cat.png.tmp-1-0");
    fs::write(&own_temp, "partial").unwrap();
    fs::write(&other_temp, "partial").unwrap();
    let o = batch_cmd(dir.path(), &shard, &[])
        .args(["--steps", "20", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let made = json_indices(&o);
    assert!(made.iter().all(|i| i % 3 == 1), "{made:?}");
    let recorded: Vec<usize> = manifest_records(dir.path(), "manifest.shard-2-of-3.jsonl")
        .iter()
        .map(|r| r.index)
        .collect();
    assert_eq!(recorded.iter().collect::<BTreeSet<_>>().len(), 4);
    assert!(recorded.iter().all(|i| i % 3 == 1), "{recorded:?}");
    assert_eq!(
        made.len() + before,
        4,
        "only the rest of the shard: {made:?}"
    );
    assert_eq!(pngs(dir.path()).len(), 4);
    assert!(!own_temp.exists(), "the shard's own leftover is removed");
    assert!(
        other_temp.exists(),
        "another shard's temporary file is left alone"
    );
}

#[test]
fn shard_auto_reads_kubernetes_and_slurm_variables() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "p.txt", PROMPTS);
    let k8s = [("JOB_COMPLETION_INDEX", "1"), ("LATENT_SHARD_COUNT", "3")];
    let o = run(
        dir.path(),
        &["--seed", "1", "--shard", "auto", "--json"],
        &k8s,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(json_indices(&o), vec![1, 4]);
    assert!(dir.path().join("out/manifest.shard-2-of-3.jsonl").exists());

    let slurm = [
        ("SLURM_ARRAY_TASK_ID", "7"),
        ("SLURM_ARRAY_TASK_MIN", "5"),
        ("SLURM_ARRAY_TASK_COUNT", "3"),
    ];
    let o = run(dir.path(), &["--shard", "auto", "--json"], &slurm);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(json_indices(&o), vec![2, 5]);
    assert!(dir.path().join("out/manifest.shard-3-of-3.jsonl").exists());
}

#[test]
fn bad_shard_values_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "p.txt", PROMPTS);
    for (flags, env, want) in [
        (
            &["--shard", "0/3"][..],
            &[][..],
            "--shard 0/3: the shard number must be from 1 to 3",
        ),
        (
            &["--shard", "4/3"][..],
            &[][..],
            "--shard 4/3: the shard number must be from 1 to 3",
        ),
        (&["--shard", "x"][..], &[][..], "--shard x: give I/N"),
        (
            &["--shard", "auto"][..],
            &[][..],
            "neither $JOB_COMPLETION_INDEX",
        ),
        (
            &["--shard", "auto"][..],
            &[("JOB_COMPLETION_INDEX", "0")][..],
            "$LATENT_SHARD_COUNT",
        ),
    ] {
        let mut args = flags.to_vec();
        args.extend(["--seed", "1"]);
        let o = run(dir.path(), &args, env);
        assert_eq!(o.status.code(), Some(1), "{flags:?}");
        let err = stderr(&o);
        assert!(err.contains(want), "{flags:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    // Without a seed each shard would draw its own.
    let o = run(dir.path(), &["--shard", "1/2"], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("needs one run seed"), "{}", stderr(&o));
    assert!(pngs(dir.path()).is_empty());
}
