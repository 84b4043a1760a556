//! Replacing a file atomically and durably: the one way Keel writes a file that must survive
//! a power cut whole or not at all (an image layout's `index.json`, `oci-layout` and
//! imported blobs, Keel's state files on /var).
//!
//! The new content goes to a temporary file beside the target (`.NAME.PID-N.tmp`, unique to
//! the writing process), which is fsynced, renamed over the target, and the directory is
//! fsynced: after a crash a reader sees the old file or the new one, never a mix. A leftover
//! temporary is a write that never committed; it is never read, and
//! [`remove_stale_temporaries`] deletes it.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Temporary files are named `.NAME.PID-N.tmp` beside their target.
const TMP_PREFIX: &str = ".";
const TMP_SUFFIX: &str = ".tmp";

fn temporary_for(path: &Path) -> io::Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "a path to write needs a name")
    })?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut tmp = std::ffi::OsString::from(TMP_PREFIX);
    tmp.push(name);
    tmp.push(format!(".{}-{n}{TMP_SUFFIX}", std::process::id()));
    Ok(path.with_file_name(tmp))
}

/// Replaces `path` with `bytes` (a new file gets `mode`) atomically and durably: once this
/// returns, the new content survives a power cut; if the machine dies before, the old
/// content is still there.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = temporary_for(path)?;
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        // The rename is only durable once the directory entry is.
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Deletes the temporary files of writes a crash interrupted, under `dir` (not recursing
/// into subdirectories). Returns the paths deleted.
pub fn remove_stale_temporaries(dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return removed;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if is_file
            && name.starts_with(TMP_PREFIX)
            && name.ends_with(TMP_SUFFIX)
            && name.len() > TMP_PREFIX.len() + TMP_SUFFIX.len()
            && fs::remove_file(entry.path()).is_ok()
        {
            removed.push(entry.path());
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_atomic_write_replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["state.json"]);
    }

    #[test]
    fn interrupted_writes_are_swept_and_committed_files_kept() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(".state.json.tmp"), b"half").unwrap();
        fs::write(dir.path().join("state.json"), b"whole").unwrap();
        fs::write(dir.path().join(".tmp"), b"not ours").unwrap();
        let removed = remove_stale_temporaries(dir.path());
        assert_eq!(removed, [dir.path().join(".state.json.tmp")]);
        assert_eq!(fs::read(dir.path().join("state.json")).unwrap(), b"whole");
        assert!(dir.path().join(".tmp").exists());
    }

    #[test]
    fn temporaries_are_unique_and_swept() {
        let dir = tempfile::tempdir().unwrap();
        let a = temporary_for(&dir.path().join("index.json")).unwrap();
        let b = temporary_for(&dir.path().join("index.json")).unwrap();
        assert_ne!(a, b);
        fs::write(&a, b"half").unwrap();
        assert_eq!(remove_stale_temporaries(dir.path()), [a]);
    }
}
