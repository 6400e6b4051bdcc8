//! Files written whole or not at all.
//!
//! A file is replaced through a synced temp file and a rename, and the
//! directory is synced after, so a crash or a full disk leaves either the old
//! file or the new one, never a mix. Used by the filesystem store and for
//! the pins file. Blocking: call from a blocking context. Depends on nothing
//! else in the crate.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

/// Replaces `dest` with `bytes` through a temp file next to it.
pub fn replace_file(dest: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let file = File::create(&temp)?;
    finish_replace(&temp, file, dest, bytes)
}

/// Writes `bytes` into the open temp file `temp`, syncs it and renames it
/// over `dest`; the temp file is removed when anything fails.
pub fn finish_replace(temp: &Path, mut file: File, dest: &Path, bytes: &[u8]) -> io::Result<()> {
    let result = file
        .write_all(bytes)
        .and_then(|()| file.sync_data())
        .and_then(|()| fs::rename(temp, dest));
    if result.is_err() {
        let _ = fs::remove_file(temp);
    }
    result?;
    if let Some(dir) = dest.parent() {
        sync_dir(dir);
    }
    Ok(())
}

/// Makes a rename or a new entry in `dir` durable; best effort.
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}
