//! One run per output folder: an advisory lock on a file inside it, taken before the run reads
//! or writes anything there and released by the operating system when the process ends, however
//! it ends (so a killed run never leaves a stale lock).
//!
//! A whole-folder run holds `.latent.lock` exclusively. A shard of a batch holds it shared (so
//! shards of one batch run side by side, but never beside a whole-folder run) and its own
//! `.latent-shard-I-of-N.lock` exclusively. The holder of an exclusive lock writes its process
//! id into the file, for the message another run prints.
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Name of the folder's lock file.
pub const LOCK_FILE: &str = ".latent.lock";

/// How a run holds its folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// The whole folder: no other run at all.
    Exclusive,
    /// Shard `index` (1-based) of `count`: beside the other shards of the same split only.
    Shard { index: usize, count: usize },
}

/// A held folder lock; dropping it releases the lock.
#[derive(Debug)]
pub struct FolderLock {
    dir: PathBuf,
    _folder: File,
    _shard: Option<File>,
}

impl FolderLock {
    /// Locks `dir` (created when missing) in `mode`. With `wait` a held lock is waited for;
    /// without, it is [`Error::InUse`] naming the folder and, when known, the holder's pid.
    pub fn acquire(dir: &Path, mode: LockMode, wait: bool) -> Result<FolderLock> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let folder_path = dir.join(LOCK_FILE);
        let mut folder = open_lock_file(&folder_path)?;
        let shared = matches!(mode, LockMode::Shard { .. });
        take(&folder, &folder_path, dir, shared, wait)?;
        let shard = match mode {
            LockMode::Exclusive => {
                write_pid(&mut folder, &folder_path)?;
                None
            }
            LockMode::Shard { index, count } => {
                // No exclusive holder can exist now: a pid left by a killed one is stale.
                folder.set_len(0).map_err(|e| Error::io(&folder_path, e))?;
                let path = dir.join(shard_lock_name(index, count));
                let mut file = open_lock_file(&path)?;
                take(&file, &path, dir, false, wait)?;
                write_pid(&mut file, &path)?;
                Some(file)
            }
        };
        Ok(FolderLock {
            dir: dir.to_path_buf(),
            _folder: folder,
            _shard: shard,
        })
    }

    /// The locked folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// `.latent-shard-I-of-N.lock`.
fn shard_lock_name(index: usize, count: usize) -> String {
    format!(".latent-shard-{index}-of-{count}.lock")
}

fn open_lock_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| Error::io(path, e))
}

/// Takes the lock on `file` (shared or exclusive), waiting or failing with [`Error::InUse`].
fn take(file: &File, path: &Path, dir: &Path, shared: bool, wait: bool) -> Result<()> {
    let result = match (shared, wait) {
        (false, true) => file.lock().map_err(TryLockError::Error),
        (true, true) => file.lock_shared().map_err(TryLockError::Error),
        (false, false) => file.try_lock(),
        (true, false) => file.try_lock_shared(),
    };
    match result {
        Ok(()) => Ok(()),
        Err(TryLockError::WouldBlock) => Err(Error::InUse {
            path: dir.to_path_buf(),
            pid: read_pid(path),
        }),
        Err(TryLockError::Error(e)) => Err(Error::io(path, e)),
    }
}

fn write_pid(file: &mut File, path: &Path) -> Result<()> {
    file.set_len(0)
        .and_then(|()| file.seek(SeekFrom::Start(0)))
        .and_then(|_| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
        .map_err(|e| Error::io(path, e))
}

/// The pid written by the holder, when there is one.
fn read_pid(path: &Path) -> Option<u32> {
    let mut text = String::new();
    File::open(path).ok()?.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_exclusive_run_is_refused_with_the_pid() {
        let dir = tempfile::tempdir().unwrap();
        let held = FolderLock::acquire(dir.path(), LockMode::Exclusive, false).unwrap();
        let err = FolderLock::acquire(dir.path(), LockMode::Exclusive, false).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("is in use by another latent run")
                && text.contains(&format!("(pid {})", std::process::id())),
            "{text}"
        );
        drop(held);
        FolderLock::acquire(dir.path(), LockMode::Exclusive, false).unwrap();
    }

    #[test]
    fn shards_share_the_folder_but_not_their_own_lock() {
        let dir = tempfile::tempdir().unwrap();
        let one = LockMode::Shard { index: 1, count: 2 };
        let two = LockMode::Shard { index: 2, count: 2 };
        let a = FolderLock::acquire(dir.path(), one, false).unwrap();
        let _b = FolderLock::acquire(dir.path(), two, false).unwrap();
        assert!(matches!(
            FolderLock::acquire(dir.path(), one, false),
            Err(Error::InUse { .. })
        ));
        assert!(matches!(
            FolderLock::acquire(dir.path(), LockMode::Exclusive, false),
            Err(Error::InUse { .. })
        ));
        drop(a);
        FolderLock::acquire(dir.path(), one, false).unwrap();
    }
}
