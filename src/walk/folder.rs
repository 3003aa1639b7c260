//! The walk folder on disk: readying it for a walk (which frames to keep, what to delete, when
//! to refuse), finding the folder of the same walk, claiming a new `walk-N`.
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::record::{read_record, write_record, WalkRecord, PREVIEW_DIR, RECORD_FILE};
use crate::files::{self, LOCK_FILE};
use crate::{Error, Result};

/// What [`prepare_folder`] found and did.
#[derive(Debug, Clone, PartialEq)]
pub struct FolderPlan {
    /// Per planned frame: its file is on disk and belongs to this walk (skip it).
    pub done: Vec<bool>,
    /// Files deleted because the new walk replaces them (only with `overwrite`).
    pub removed: Vec<PathBuf>,
    /// The animations still valid: the walk was complete, nothing changed, same fps.
    pub animations: Vec<String>,
}

/// Readies `dir` for the walk `new` and writes its record; returns which frames are done.
///
/// - A missing folder is created.
/// - A folder without `walk.json` must be empty (a `preview/` subfolder aside) unless
///   `overwrite`, which deletes the frame and animation files found there by our names.
/// - A `walk.json` that cannot be read, or one whose render settings (model, dtype, size,
///   steps, scheduler, karras, rng, interpolation) differ, is refused unless `overwrite`, which
///   deletes its frames and animations.
/// - Otherwise each planned frame whose file is on disk and whose inputs (keyframes, eased
///   time) are the same in both records is done; frames that would change, and frames beyond
///   the new plan, are refused unless `overwrite`, which deletes them. So a walk extended by
///   keyframes at the end keeps the frames it shares with the old one.
///
/// Leftover temporary files of interrupted writes are removed. The caller holds the folder's
/// [`crate::files::FolderLock`] (whose lock file is neither a foreign file nor ours to delete).
pub fn prepare_folder(dir: &Path, new: &WalkRecord, overwrite: bool) -> Result<FolderPlan> {
    let n = new.frames.len();
    match fs::metadata(dir) {
        Ok(m) if !m.is_dir() => {
            return Err(Error::InvalidInput(format!(
                "{}: exists and is not a folder",
                dir.display()
            )))
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            write_record(dir, new)?;
            return Ok(FolderPlan {
                done: vec![false; n],
                removed: Vec::new(),
                animations: Vec::new(),
            });
        }
        Err(e) => return Err(Error::io(dir, e)),
    }
    // A killed run's half-written files; the caller holds the folder's lock, so none is live.
    files::remove_temps(dir, |target| {
        target == RECORD_FILE || frame_index(target).is_some() || is_animation_name(target)
    })?;
    let names = list_names(dir)?;
    let ours = |name: &str| frame_index(name).is_some() || is_animation_name(name);
    let refuse = |why: String| {
        Err(Error::Occupied {
            path: dir.to_path_buf(),
            reason: why,
        })
    };
    // Every frame and animation of ours goes, and the new record takes the folder.
    let start_fresh = || -> Result<FolderPlan> {
        let doomed: Vec<PathBuf> = names
            .iter()
            .filter(|n| ours(n))
            .map(|n| dir.join(n))
            .collect();
        remove_all(&doomed)?;
        write_record(dir, new)?;
        Ok(FolderPlan {
            done: vec![false; n],
            removed: doomed,
            animations: Vec::new(),
        })
    };

    let old = match read_record(dir) {
        Ok(old) => old,
        // Replaced below, as asked.
        Err(_) if overwrite => None,
        Err(e) => return refuse(format!("its walk record cannot be read ({e})")),
    };
    let Some(old) = old else {
        let others: Vec<&String> = names
            .iter()
            // Our own temporary files are gone already: any left are someone else's.
            .filter(|n| ![PREVIEW_DIR, RECORD_FILE, LOCK_FILE].contains(&n.as_str()))
            .collect();
        if !others.is_empty() && !overwrite {
            return refuse(format!(
                "not empty and holds no walk ({RECORD_FILE} missing; found {})",
                others[0]
            ));
        }
        return start_fresh();
    };

    if let Some(diff) = new.render_difference(&old) {
        if !overwrite {
            return refuse(format!("it holds a walk with other settings ({diff})"));
        }
        return start_fresh();
    }

    let mut done = vec![false; n];
    let mut conflicts: Vec<String> = Vec::new();
    for name in &names {
        let Some(i) = frame_index(name) else { continue };
        let same = i < n
            && new.frames[i].file == *name
            && new.frame_key(i).is_some()
            && new.frame_key(i) == old.frame_key(i);
        if same {
            done[i] = true;
        } else {
            conflicts.push(name.clone());
        }
    }
    conflicts.sort();
    if !conflicts.is_empty() && !overwrite {
        return refuse(format!(
            "{} frame file(s) there belong to a different walk (first: {})",
            conflicts.len(),
            conflicts[0]
        ));
    }
    let complete_before = old.frames.len() == n && done.iter().all(|&d| d);
    let mut doomed: Vec<PathBuf> = conflicts.iter().map(|c| dir.join(c)).collect();
    let unchanged = complete_before && conflicts.is_empty() && new.frames == old.frames;
    let animations = if unchanged && new.fps == old.fps {
        old.animations.clone()
    } else {
        // Stale: they show frames that are changing or missing, or play at another speed.
        doomed.extend(
            names
                .iter()
                .filter(|n| is_animation_name(n))
                .map(|n| dir.join(n)),
        );
        Vec::new()
    };
    remove_all(&doomed)?;
    let record = WalkRecord {
        animations: animations.clone(),
        ..new.clone()
    };
    write_record(dir, &record)?;
    Ok(FolderPlan {
        done,
        removed: doomed,
        animations,
    })
}

/// The walk folder under `parent` (`walk-N`, newest first, or its `preview/`) whose record
/// `matches`; unreadable records do not match.
pub fn find_walk_folder(
    parent: &Path,
    matches: &dyn Fn(&WalkRecord, bool) -> bool,
) -> Result<Option<(PathBuf, WalkRecord)>> {
    let mut numbered = walk_folders(parent)?;
    numbered.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    for (_, dir) in numbered {
        for (sub, preview) in [(dir.clone(), false), (dir.join(PREVIEW_DIR), true)] {
            // Other folders' records are only candidates: one that cannot be read is not ours.
            if let Ok(Some(record)) = read_record(&sub) {
                if matches(&record, preview) {
                    return Ok(Some((dir, record)));
                }
            }
        }
    }
    Ok(None)
}

/// `parent/walk-N` with N one past the highest existing (from 1).
pub fn next_walk_folder(parent: &Path) -> Result<PathBuf> {
    let next = walk_folders(parent)?
        .into_iter()
        .map(|(n, _)| n)
        .max()
        .map_or(1, |n| n.saturating_add(1));
    Ok(parent.join(format!("walk-{next}")))
}

/// Creates and returns a new `parent/walk-N` (N past the highest); creating it is the claim,
/// so two runs starting together never share one (the loser takes the next N).
pub fn claim_walk_folder(parent: &Path) -> Result<PathBuf> {
    fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    loop {
        let dir = next_walk_folder(parent)?;
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io(&dir, e)),
        }
    }
}

/// Deletes the frames, animations and record of a walk folder (not the folder, nor other files).
pub fn clean_folder(dir: &Path) -> Result<Vec<PathBuf>> {
    let names = list_names(dir)?;
    let doomed: Vec<PathBuf> = names
        .iter()
        .filter(|n| frame_index(n).is_some() || is_animation_name(n) || n.as_str() == RECORD_FILE)
        .map(|n| dir.join(n))
        .collect();
    remove_all(&doomed)?;
    Ok(doomed)
}

fn walk_folders(parent: &Path) -> Result<Vec<(u64, PathBuf)>> {
    Ok(list_names(parent)?
        .into_iter()
        .filter_map(|name| {
            let n: u64 = name.strip_prefix("walk-")?.parse().ok()?;
            let path = parent.join(&name);
            path.is_dir().then_some((n, path))
        })
        .collect())
}

/// File names in `dir` (empty when it does not exist).
fn list_names(dir: &Path) -> Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// `frame-00012.png` -> 12.
fn frame_index(name: &str) -> Option<usize> {
    let digits = name.strip_prefix("frame-")?.strip_suffix(".png")?;
    if digits.len() < 5 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn is_animation_name(name: &str) -> bool {
    super::AnimationFormat::ALL
        .iter()
        .any(|f| f.file_name() == name)
}

fn remove_all(paths: &[PathBuf]) -> Result<()> {
    for p in paths {
        match fs::remove_file(p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(p, e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::noise::RngKind;
    use crate::pipeline::Sampling;
    use crate::schedulers::SchedulerKind;
    use crate::walk::{Ease, Interp};
    use crate::walk::{Keyframe, WalkSettings};
    use candle_core::DType;

    fn settings() -> WalkSettings {
        WalkSettings {
            sampling: Sampling {
                width: 64,
                height: 64,
                steps: 3,
                guidance: 7.5,
                scheduler: SchedulerKind::Ddim,
                karras: false,
                rng: RngKind::Torch,
                size_conditioning: Default::default(),
                preview_every: None,
                text: Default::default(),
                image: None,
            },
            looped: false,
            ease: Ease::Linear,
            text_interp: Interp::Lerp,
        }
    }

    fn kfs(prompts: &[&str], frames: usize) -> Vec<Keyframe> {
        prompts
            .iter()
            .enumerate()
            .map(|(i, p)| Keyframe {
                prompt: p.to_string(),
                negative_prompt: String::new(),
                seed: i as u64 + 1,
                frames: Some(frames),
                guidance: 7.5,
            })
            .collect()
    }

    fn record(prompts: &[&str], frames: usize, s: &WalkSettings) -> WalkRecord {
        let mut k = kfs(prompts, frames);
        if !s.looped {
            k.last_mut().unwrap().frames = None;
        }
        WalkRecord::new("m", DType::F32, &k, s, 12.0).unwrap()
    }

    /// Writes dummy frame files as if rendered.
    fn touch_frames(dir: &Path, r: &WalkRecord, which: impl Iterator<Item = usize>) {
        for i in which {
            fs::write(dir.join(&r.frames[i].file), b"png").unwrap();
        }
    }

    #[test]
    fn a_fresh_folder_is_created_with_its_record() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("w");
        let r = record(&["a", "b"], 3, &settings());
        let plan = prepare_folder(&dir, &r, false).unwrap();
        assert_eq!(plan.done, [false; 4]);
        assert_eq!(read_record(&dir).unwrap().unwrap(), r);
    }

    #[test]
    fn resume_keeps_frames_of_the_same_walk() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let r = record(&["a", "b"], 3, &settings());
        prepare_folder(dir, &r, false).unwrap();
        touch_frames(dir, &r, [0, 2].into_iter());
        let plan = prepare_folder(dir, &r, false).unwrap();
        assert_eq!(plan.done, [true, false, true, false]);
        assert!(plan.removed.is_empty());
    }

    #[test]
    fn other_render_settings_are_refused_unless_overwrite() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let r = record(&["a", "b"], 3, &settings());
        prepare_folder(dir, &r, false).unwrap();
        touch_frames(dir, &r, 0..4);
        fs::write(dir.join("walk.gif"), b"gif").unwrap();
        fs::write(dir.join("notes.txt"), b"mine").unwrap();
        let mut s = settings();
        s.sampling.steps = 5;
        let r2 = record(&["a", "b"], 3, &s);
        let err = prepare_folder(dir, &r2, false).unwrap_err();
        assert!(matches!(err, Error::Occupied { .. }), "{err}");
        let err = err.to_string();
        assert!(
            err.contains("steps 3, now 5") && err.contains("allow overwriting"),
            "{err}"
        );
        // Nothing was touched.
        assert_eq!(read_record(dir).unwrap().unwrap(), r);
        assert!(dir.join("frame-00003.png").exists());

        let plan = prepare_folder(dir, &r2, true).unwrap();
        assert_eq!(plan.done, [false; 4]);
        assert_eq!(plan.removed.len(), 5);
        assert!(!dir.join("frame-00000.png").exists() && !dir.join("walk.gif").exists());
        assert!(dir.join("notes.txt").exists(), "not ours: kept");
        assert_eq!(read_record(dir).unwrap().unwrap(), r2);
    }

    #[test]
    fn changed_keyframes_conflict_only_where_frames_change() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let r = record(&["a", "b"], 2, &settings());
        prepare_folder(dir, &r, false).unwrap();
        touch_frames(dir, &r, 0..3);
        // Extended at the end: frames 0..3 are unchanged (frame 2 is keyframe "b" at t = 0).
        let longer = record(&["a", "b", "c"], 2, &settings());
        let plan = prepare_folder(dir, &longer, false).unwrap();
        assert_eq!(plan.done, [true, true, true, false, false]);

        // A changed second prompt changes frames 1 and 2.
        let changed = record(&["a", "x", "c"], 2, &settings());
        let err = prepare_folder(dir, &changed, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("2 frame file(s)") && err.contains("frame-00001.png"),
            "{err}"
        );
        let plan = prepare_folder(dir, &changed, true).unwrap();
        assert_eq!(plan.done, [true, false, false, false, false]);
    }

    #[test]
    fn animations_of_a_complete_walk_are_kept_unless_the_speed_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let r = record(&["a", "b"], 2, &settings());
        prepare_folder(dir, &r, false).unwrap();
        touch_frames(dir, &r, 0..3);
        fs::write(dir.join("walk.gif"), b"gif").unwrap();
        write_record(
            dir,
            &WalkRecord {
                animations: vec!["walk.gif".into()],
                ..r.clone()
            },
        )
        .unwrap();
        let plan = prepare_folder(dir, &r, false).unwrap();
        assert_eq!(plan.animations, ["walk.gif"]);
        assert!(dir.join("walk.gif").exists());
        let faster = WalkRecord { fps: 24.0, ..r };
        let plan = prepare_folder(dir, &faster, false).unwrap();
        assert!(plan.animations.is_empty());
        assert_eq!(plan.done, [true; 3]);
        assert!(!dir.join("walk.gif").exists());
    }

    #[test]
    fn a_shorter_walk_must_not_leave_stray_frames() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let r = record(&["a", "b"], 4, &settings());
        prepare_folder(dir, &r, false).unwrap();
        touch_frames(dir, &r, 0..5);
        let shorter = record(&["a", "b"], 2, &settings());
        let err = prepare_folder(dir, &shorter, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("different walk"), "{err}");
    }

    #[test]
    fn foreign_or_corrupt_folders_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let r = record(&["a", "b"], 2, &settings());
        fs::write(dir.join("holiday.jpg"), b"x").unwrap();
        let err = prepare_folder(dir, &r, false).unwrap_err().to_string();
        assert!(
            err.contains("holds no walk") && err.contains("holiday.jpg"),
            "{err}"
        );
        fs::remove_file(dir.join("holiday.jpg")).unwrap();

        fs::write(dir.join(RECORD_FILE), b"{ not json").unwrap();
        let err = prepare_folder(dir, &r, false).unwrap_err().to_string();
        assert!(err.contains("cannot be read"), "{err}");
        prepare_folder(dir, &r, true).unwrap();
        assert_eq!(read_record(dir).unwrap().unwrap(), r);
    }

    #[test]
    fn leftover_temporary_files_are_removed_and_a_preview_folder_and_the_lock_are_allowed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let _lock = files::FolderLock::acquire(dir, files::LockMode::Exclusive, false).unwrap();
        fs::create_dir(dir.join(PREVIEW_DIR)).unwrap();
        fs::write(dir.join(".frame-00001.png.tmp-77-0"), b"half").unwrap();
        fs::write(dir.join(".walk.json.tmp-77-1"), b"{").unwrap();
        // Another program's temporary file is not ours to delete.
        fs::write(dir.join(".notes.txt.tmp-5-0"), b"x").unwrap();
        let r = record(&["a", "b"], 2, &settings());
        let err = prepare_folder(dir, &r, false).unwrap_err();
        assert!(err.to_string().contains(".notes.txt.tmp-5-0"), "{err}");
        fs::remove_file(dir.join(".notes.txt.tmp-5-0")).unwrap();
        prepare_folder(dir, &r, false).unwrap();
        assert!(!dir.join(".frame-00001.png.tmp-77-0").exists());
        assert!(!dir.join(".walk.json.tmp-77-1").exists());
        assert!(dir.join(PREVIEW_DIR).is_dir());
        // Starting over (another walk, overwriting) keeps the lock file.
        let other = record(&["c", "d"], 2, &settings());
        prepare_folder(dir, &other, true).unwrap();
        assert!(dir.join(LOCK_FILE).is_file());
    }

    #[test]
    fn same_walk_and_folder_search() {
        let tmp = tempfile::tempdir().unwrap();
        let parent = tmp.path();
        assert_eq!(next_walk_folder(parent).unwrap(), parent.join("walk-1"));
        let r = record(&["a", "b"], 2, &settings());
        prepare_folder(&parent.join("walk-2"), &r, false).unwrap();
        fs::create_dir(parent.join("walk-10")).unwrap();
        assert_eq!(next_walk_folder(parent).unwrap(), parent.join("walk-11"));

        let mut reseeded = r.clone();
        reseeded.keyframes[0].seed = 99;
        assert!(!r.same_walk(&reseeded, false));
        assert!(r.same_walk(&reseeded, true));
        let found = find_walk_folder(parent, &|rec, _| rec.same_walk(&reseeded, true)).unwrap();
        assert_eq!(found.map(|f| f.0), Some(parent.join("walk-2")));
        let other = record(&["a", "c"], 2, &settings());
        assert!(
            find_walk_folder(parent, &|rec, _| rec.same_walk(&other, true))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn frame_names_parse() {
        assert_eq!(frame_index("frame-00012.png"), Some(12));
        assert_eq!(frame_index("frame-123456.png"), Some(123456));
        assert_eq!(frame_index("frame-12.png"), None);
        assert_eq!(frame_index("frame-0001a.png"), None);
        assert_eq!(frame_index(".frame-00001.png.tmp-1-2"), None);
    }
}
