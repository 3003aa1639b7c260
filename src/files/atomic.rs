//! The one atomic write: a hidden temporary file beside the target (`.NAME.tmp-PID-N`),
//! written, synced, then moved into place, so a reader (or a run that was killed) sees the old
//! file, the complete new one, or nothing; never a partial file.
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{Error, Result};

/// What to do when the target exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replace {
    /// Replace it atomically (`rename`).
    Overwrite,
    /// Leave it and fail with `AlreadyExists`, even when another process creates it meanwhile
    /// (the final step is a hard link, which fails on an existing name without touching it).
    NoClobber,
}

/// Writes `path` through `write`, which gets the open temporary file and its path (for writers
/// that take a path, such as ffmpeg; they must write to that same file). The parent folder is created when missing; the temporary file is
/// removed on every error.
pub fn write_atomic(
    path: &Path,
    replace: Replace,
    write: impl FnOnce(&mut File, &Path) -> Result<()>,
) -> Result<()> {
    let Some(name) = path.file_name() else {
        return Err(Error::InvalidInput(format!(
            "{}: output path has no file name",
            path.display()
        )));
    };
    // Fail before writing when we can already tell; the hard link below is the real guard.
    if replace == Replace::NoClobber && fs::symlink_metadata(path).is_ok() {
        return Err(exists_error(path));
    }
    let dir = path.parent().unwrap_or(Path::new(""));
    if !dir.as_os_str().is_empty() {
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let (temp, mut file) = TempFile::create(dir, name)?;
    write(&mut file, &temp.path)?;
    file.sync_all().map_err(|e| Error::io(path, e))?;
    drop(file);
    match replace {
        Replace::Overwrite => fs::rename(&temp.path, path).map_err(|e| Error::io(path, e))?,
        Replace::NoClobber => {
            fs::hard_link(&temp.path, path).map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => exists_error(path),
                _ => Error::io(path, e),
            })?;
            fs::remove_file(&temp.path).map_err(|e| Error::io(&temp.path, e))?;
        }
    }
    temp.keep();
    Ok(())
}

/// The error for an output file that exists while overwriting is off.
fn exists_error(path: &Path) -> Error {
    Error::io(
        path,
        io::Error::new(io::ErrorKind::AlreadyExists, "file exists"),
    )
}

/// A temporary file that is deleted when dropped, unless [`TempFile::keep`] was called.
struct TempFile {
    path: PathBuf,
}

impl TempFile {
    /// Creates `.{name}.tmp-{pid}-{n}` in `dir`; `n` counts up so threads never share a name.
    fn create(dir: &Path, name: &OsStr) -> Result<(TempFile, File)> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(temp_name(name, std::process::id(), n));
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => return Ok((TempFile { path }, file)),
                // Left over from a killed process that had our pid: take the next number.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io(path, e)),
            }
        }
    }

    /// The file has been moved into place; do not delete it.
    fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        // Best effort: this runs on error paths, where the original error is the one to report.
        let _ = fs::remove_file(&self.path);
    }
}

/// `.{name}.tmp-{pid}-{n}`: hidden, next to its target.
fn temp_name(name: &OsStr, pid: u32, n: u64) -> OsString {
    let mut temp = OsString::from(".");
    temp.push(name);
    temp.push(format!(".tmp-{pid}-{n}"));
    temp
}

/// The target's name when `name` is one of our temporary names (`.NAME.tmp-PID-N`).
pub fn temp_target(name: &str) -> Option<&str> {
    let rest = name.strip_prefix('.')?;
    let (target, tail) = rest.rsplit_once(".tmp-")?;
    let (pid, n) = tail.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(pid) && digits(n) && !target.is_empty()).then_some(target)
}

/// True when `name` is one of our temporary names.
pub fn is_temp_name(name: &str) -> bool {
    temp_target(name).is_some()
}

/// Removes our temporary files in `dir` whose target name `owned` accepts (a killed run's
/// leftovers; call it only while holding the folder's lock). Returns what was removed.
pub fn remove_temps(dir: &Path, owned: impl Fn(&str) -> bool) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let Some(target) = name.to_str().and_then(temp_target) else {
            continue;
        };
        if !owned(target) {
            continue;
        }
        let path = entry.path();
        match fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&path, e)),
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_round_trip() {
        let name = temp_name(OsStr::new("00001-5.png"), 42, 7);
        assert_eq!(name, ".00001-5.png.tmp-42-7");
        assert_eq!(temp_target(name.to_str().unwrap()), Some("00001-5.png"));
        assert_eq!(temp_target(".walk.json.tmp-1-0"), Some("walk.json"));
        for not_ours in [
            "00001-5.png",
            ".hidden",
            ".a.tmp-x-1",
            ".a.tmp-1-",
            ".tmp-1-2",
            "a.tmp-1-2",
        ] {
            assert_eq!(temp_target(not_ours), None, "{not_ours}");
        }
    }

    #[test]
    fn write_is_atomic_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/out.txt");
        write_atomic(&path, Replace::NoClobber, |f, _| {
            io::Write::write_all(f, b"one").map_err(|e| Error::io(&path, e))
        })
        .unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"one");
        let err = write_atomic(&path, Replace::NoClobber, |_, _| Ok(())).unwrap_err();
        assert!(err.to_string().contains("file exists"), "{err}");
        let failed = write_atomic(&path, Replace::Overwrite, |_, _| {
            Err(Error::InvalidInput("stop".into()))
        });
        assert!(failed.is_err());
        write_atomic(&path, Replace::Overwrite, |f, _| {
            io::Write::write_all(f, b"two").map_err(|e| Error::io(&path, e))
        })
        .unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsString::from("out.txt")]);
    }

    #[test]
    fn no_clobber_never_replaces_a_file_made_meanwhile() {
        // The race the early check cannot see: the target appears while the temp is written.
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("00000-1.png");
        let err = write_atomic(&target, Replace::NoClobber, |f, _| {
            fs::write(&target, b"made by someone else").unwrap();
            io::Write::write_all(f, b"new").map_err(|e| Error::io(&target, e))
        })
        .unwrap_err();
        assert!(err.to_string().contains("file exists"), "{err}");
        assert_eq!(fs::read(&target).unwrap(), b"made by someone else");
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "temporary file left"
        );
    }

    #[test]
    fn removes_only_owned_temps() {
        let dir = tempfile::tempdir().unwrap();
        for n in [".a.png.tmp-1-0", ".b.png.tmp-2-3", ".keep", "a.png"] {
            fs::write(dir.path().join(n), b"").unwrap();
        }
        let removed = remove_temps(dir.path(), |t| t == "a.png").unwrap();
        assert_eq!(removed, vec![dir.path().join(".a.png.tmp-1-0")]);
        assert!(dir.path().join(".b.png.tmp-2-3").exists());
        remove_temps(dir.path(), |_| true).unwrap();
        let mut left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, vec![".keep", "a.png"]);
    }
}
