//! Splitting one batch over several processes (a Kubernetes Indexed Job, a Slurm array): which
//! items a shard makes, its own manifest file in the shared output folder, reading every
//! manifest of a folder as one, and merging them into one `manifest.jsonl`.
use std::collections::HashSet;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{Manifest, Record, MANIFEST_NAME};
use crate::files::{self, FolderLock, LockMode, Replace};
use crate::{Error, Result, Setting};

/// Kubernetes Indexed Jobs export each pod's index, from 0.
pub const K8S_INDEX_ENV: &str = "JOB_COMPLETION_INDEX";
/// Kubernetes does not export the number of completions, so the manifest sets this one.
pub const SHARD_COUNT_ENV: &str = "LATENT_SHARD_COUNT";
/// Slurm job arrays export the task id, the task count and the lowest id.
pub const SLURM_ID_ENV: &str = "SLURM_ARRAY_TASK_ID";
pub const SLURM_COUNT_ENV: &str = "SLURM_ARRAY_TASK_COUNT";
pub const SLURM_MIN_ENV: &str = "SLURM_ARRAY_TASK_MIN";

/// Shard `index` (from 1) of `count`: the items whose index in the whole plan is
/// `index - 1` modulo `count`. The split depends only on the plan, never on machine speed, so
/// every shard (and every rerun of one) agrees on who makes what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// `I/N` (1-based I); `auto` or `auto/N` read the scheduler's variables through `env`:
    /// `JOB_COMPLETION_INDEX` (from 0) with N from `auto/N` or `LATENT_SHARD_COUNT`, else
    /// `SLURM_ARRAY_TASK_ID` minus `SLURM_ARRAY_TASK_MIN` (from 0) of
    /// `SLURM_ARRAY_TASK_COUNT`.
    pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Shard> {
        let bad = |reason: &str| Error::setting(Setting::Shard, text, reason);
        let number = |s: &str, what: &str| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| bad(&format!("{what} {s:?} is not a whole number")))
        };
        let (index, count) = match text.split_once('/') {
            Some(("auto", n)) => auto_index(text, env, Some(number(n, "the count")?))?,
            None if text == "auto" => auto_index(text, env, None)?,
            Some((i, n)) => (number(i, "the shard number")?, number(n, "the count")?),
            None => return Err(bad("give I/N (shard I of N, from 1), auto or auto/N")),
        };
        if count == 0 {
            return Err(bad("the number of shards must be at least 1"));
        }
        if index == 0 || index > count {
            return Err(bad(&format!("the shard number must be from 1 to {count}")));
        }
        Ok(Shard { index, count })
    }

    /// True when the item at `index` of the whole plan belongs to this shard.
    pub fn owns(&self, index: usize) -> bool {
        index % self.count == self.index - 1
    }

    /// `manifest.shard-I-of-N.jsonl`: each shard appends to its own file.
    pub fn manifest_name(&self) -> String {
        format!("manifest.shard-{}-of-{}.jsonl", self.index, self.count)
    }

    /// The folder lock a shard holds: the folder shared, its own shard exclusively.
    pub fn lock_mode(&self) -> LockMode {
        LockMode::Shard {
            index: self.index,
            count: self.count,
        }
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// `(index from 1, count)` from the scheduler's variables.
fn auto_index(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
    count: Option<usize>,
) -> Result<(usize, usize)> {
    let bad = |reason: String| Error::setting(Setting::Shard, text, reason);
    let var = |name: &str| -> Result<Option<usize>> {
        match env(name) {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| bad(format!("${name} is {v:?}, not a whole number"))),
        }
    };
    if let Some(i) = var(K8S_INDEX_ENV)? {
        let count = match (count, var(SHARD_COUNT_ENV)?) {
            (Some(n), _) | (None, Some(n)) => n,
            (None, None) => {
                return Err(bad(format!(
                    "${K8S_INDEX_ENV} is set but not the number of shards: use auto/N or set \
                     ${SHARD_COUNT_ENV} (the Job's completions)"
                )))
            }
        };
        return Ok((i + 1, count));
    }
    if let Some(id) = var(SLURM_ID_ENV)? {
        let min = var(SLURM_MIN_ENV)?.unwrap_or(0);
        let count = match (count, var(SLURM_COUNT_ENV)?) {
            (Some(n), _) | (None, Some(n)) => n,
            (None, None) => return Err(bad(format!("${SLURM_COUNT_ENV} is not set"))),
        };
        let Some(from_zero) = id.checked_sub(min) else {
            return Err(bad(format!(
                "${SLURM_ID_ENV} {id} is below ${SLURM_MIN_ENV} {min}"
            )));
        };
        return Ok((from_zero + 1, count));
    }
    Err(bad(format!(
        "neither ${K8S_INDEX_ENV} (Kubernetes Indexed Job) nor ${SLURM_ID_ENV} (Slurm array) is \
         set; give I/N instead"
    )))
}

/// True for `manifest.jsonl` and the shard manifests `manifest.shard-*.jsonl`.
fn is_manifest_name(name: &str) -> bool {
    name == MANIFEST_NAME || (name.starts_with("manifest.shard-") && name.ends_with(".jsonl"))
}

/// The manifest files of `dir`, `manifest.jsonl` first, then the shards' by name.
pub fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        if let Some(name) = entry.file_name().to_str().filter(|n| is_manifest_name(n)) {
            names.push(name.to_string());
        }
    }
    names.sort_by_key(|n| (n != MANIFEST_NAME, n.clone()));
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

/// Every record of every manifest in `dir`, read as one (a run's own file is read by
/// [`Manifest::open`]; `except` skips it). Torn last lines of other files belong to runs still
/// writing them and are left out silently.
pub fn read_all(dir: &Path, except: Option<&Path>) -> Result<Vec<Record>> {
    let mut records = Vec::new();
    for path in manifest_files(dir)? {
        if except == Some(path.as_path()) {
            continue;
        }
        records.extend(Manifest::read(&path)?.records);
    }
    Ok(records)
}

/// What [`merge`] did.
#[derive(Debug, Clone, Serialize)]
pub struct MergeReport {
    /// The manifests read, `manifest.jsonl` included when it existed.
    pub files: Vec<PathBuf>,
    /// Records written to `manifest.jsonl`, one per item.
    pub records: usize,
    /// Records dropped because another record had the same item key.
    pub duplicates: usize,
    /// The merged manifest.
    pub manifest: PathBuf,
}

/// Merges every manifest of `dir` into one `manifest.jsonl` (in item order, one record per
/// item key, written atomically) and removes the shard manifests. Holds the folder
/// exclusively, so no shard is running; `wait` waits for them instead of failing.
pub fn merge(dir: &Path, wait: bool) -> Result<MergeReport> {
    if !dir.is_dir() {
        return Err(Error::setting(
            Setting::Merge,
            dir.display(),
            "is not a folder",
        ));
    }
    let _lock = FolderLock::acquire(dir, LockMode::Exclusive, wait)?;
    let files = manifest_files(dir)?;
    let mut records = Vec::new();
    for path in &files {
        records.extend(Manifest::read(path)?.records);
    }
    // Stable: among equal indices the first file (manifest.jsonl) wins.
    records.sort_by_key(|r| r.index);
    let mut seen = HashSet::new();
    let total = records.len();
    records.retain(|r| seen.insert(r.key()));
    let manifest = dir.join(MANIFEST_NAME);
    let mut text = String::new();
    for record in &records {
        let line = serde_json::to_string(record)
            .map_err(|e| Error::InvalidInput(format!("cannot write a manifest record: {e}")))?;
        text.push_str(&line);
        text.push('\n');
    }
    files::write_atomic(&manifest, Replace::Overwrite, |file, tmp| {
        file.write_all(text.as_bytes())
            .map_err(|e| Error::io(tmp, e))
    })?;
    for path in files.iter().filter(|p| **p != manifest) {
        std::fs::remove_file(path).map_err(|e| Error::io(path, e))?;
    }
    Ok(MergeReport {
        files,
        records: records.len(),
        duplicates: total - records.len(),
        manifest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, vars: &[(&str, &str)]) -> Result<Shard> {
        Shard::parse(text, &|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn explicit_shards_and_their_errors() {
        assert_eq!(parse("2/3", &[]).unwrap(), Shard { index: 2, count: 3 });
        for (text, want) in [
            ("0/3", "from 1 to 3"),
            ("4/3", "from 1 to 3"),
            ("1/0", "at least 1"),
            ("x", "give I/N"),
            ("a/3", "not a whole number"),
        ] {
            let e = parse(text, &[]).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("shard {text}: ")) && e.contains(want),
                "{e}"
            );
        }
    }

    #[test]
    fn auto_reads_kubernetes_and_slurm() {
        let k8s = [(K8S_INDEX_ENV, "0"), (SHARD_COUNT_ENV, "3")];
        assert_eq!(parse("auto", &k8s).unwrap(), Shard { index: 1, count: 3 });
        assert_eq!(
            parse("auto/4", &[(K8S_INDEX_ENV, "3")]).unwrap(),
            Shard { index: 4, count: 4 }
        );
        let e = parse("auto", &[(K8S_INDEX_ENV, "0")])
            .unwrap_err()
            .to_string();
        assert!(e.contains(SHARD_COUNT_ENV), "{e}");
        let slurm = [
            (SLURM_ID_ENV, "6"),
            (SLURM_COUNT_ENV, "3"),
            (SLURM_MIN_ENV, "5"),
        ];
        assert_eq!(parse("auto", &slurm).unwrap(), Shard { index: 2, count: 3 });
        let e = parse("auto", &[]).unwrap_err().to_string();
        assert!(e.contains("neither"), "{e}");
        let e = parse("auto", &[(K8S_INDEX_ENV, "3"), (SHARD_COUNT_ENV, "3")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("from 1 to 3"), "{e}");
    }

    #[test]
    fn shards_split_items_by_index() {
        let shards: Vec<Shard> = (1..=3).map(|index| Shard { index, count: 3 }).collect();
        for item in 0..10 {
            let owners = shards.iter().filter(|s| s.owns(item)).count();
            assert_eq!(owners, 1, "item {item}");
        }
        assert!(shards[0].owns(0) && shards[1].owns(4) && shards[2].owns(8));
    }
}
