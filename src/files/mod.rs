//! Files a run writes and shares: one atomic write for every output (PNGs, JSON, manifests,
//! animations), the names of its temporary files, the lock that gives a run its folder, and
//! opening files without following symbolic links.
mod atomic;
mod lock;

pub use atomic::{is_temp_name, remove_temps, temp_target, write_atomic, Replace};
pub use lock::{FolderLock, LockMode, LOCK_FILE};

use std::fs::{File, OpenOptions};
use std::path::Path;

use crate::{Error, Result};

/// Opens `path` for reading and appending, creating it, without following a symbolic link at
/// `path` itself (a link there is an error naming it, never a write elsewhere).
pub fn open_append_no_follow(path: &Path) -> Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).append(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NOFOLLOW);
    }
    #[cfg(not(unix))]
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(symlink_error(path));
    }
    options.open(path).map_err(|e| {
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
            symlink_error(path)
        } else {
            Error::io(path, e)
        }
    })
}

/// Reads `path` whole, refusing a symbolic link (a missing file is `Ok(None)`).
pub fn read_no_follow(path: &Path) -> Result<Option<Vec<u8>>> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => return Err(symlink_error(path)),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    }
    std::fs::read(path)
        .map(Some)
        .map_err(|e| Error::io(path, e))
}

fn symlink_error(path: &Path) -> Error {
    Error::io(
        path,
        std::io::Error::other(
            "is a symbolic link; latent only writes its own files inside the output folder",
        ),
    )
}
