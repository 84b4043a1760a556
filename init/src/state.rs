//! Keel's own state on /var: small files that must survive a power cut whole or not at all.
//!
//! Every state file is written to a temporary file in the same directory, fsynced, renamed
//! over the old one, and the directory fsynced: after a crash a reader sees the old file or
//! the new one, never a mix. A leftover temporary file is a write that never committed; it
//! is never read, and [`remove_stale_temporaries`] deletes it at boot.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Where Keel keeps its state.
pub const STATE_DIR: &str = "/var/lib/keel";
/// The record of first-boot provisioning (see the init's `var` module).
pub const PROVISIONED: &str = "/var/lib/keel/provisioned.json";
/// The host file last applied with `keel apply`, with the delivered file it was applied over.
pub const APPLIED: &str = "/var/lib/keel/applied.toml";

/// Temporary files are named `.NAME.tmp` beside their target.
const TMP_PREFIX: &str = ".";
const TMP_SUFFIX: &str = ".tmp";

fn temporary_for(path: &Path) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "a state path needs a name"))?;
    let mut tmp = std::ffi::OsString::from(TMP_PREFIX);
    tmp.push(name);
    tmp.push(TMP_SUFFIX);
    Ok(path.with_file_name(tmp))
}

/// Replaces `path` with `bytes` atomically and durably: once this returns, the new content
/// survives a power cut; if the machine dies before, the old content is still there.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = temporary_for(path)?;
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
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

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A host file applied live, and the sha256 of the delivered host file it replaced. On
/// the next boot it is used only while the same file is still delivered: a new delivery
/// (a new fw_cfg file, a rebuilt image) wins over an old live change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub base_sha256: String,
    pub text: String,
}

/// The first line of the applied file names its base; the rest is the host file verbatim.
const APPLIED_HEADER: &str = "# keel apply: over delivered sha256 ";

impl Applied {
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let content = format!("{APPLIED_HEADER}{}\n{}", self.base_sha256, self.text);
        write_atomic(path, content.as_bytes(), 0o600)
    }

    /// The applied file at `path`: `Ok(None)` when there is none.
    pub fn load(path: &Path) -> io::Result<Option<Applied>> {
        let content = match fs::read_to_string(path) {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let (first, text) = content.split_once('\n').unwrap_or((&content, ""));
        let base = first.strip_prefix(APPLIED_HEADER).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} lacks its header line", path.display()),
            )
        })?;
        Ok(Some(Applied {
            base_sha256: base.trim().to_string(),
            text: text.to_string(),
        }))
    }
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
    fn an_applied_file_round_trips_and_a_headerless_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("applied.toml");
        assert_eq!(Applied::load(&path).unwrap(), None);
        let applied = Applied {
            base_sha256: sha256_hex(b"delivered"),
            text: "[host]\nhostname = \"x\"\n".into(),
        };
        applied.save(&path).unwrap();
        assert_eq!(Applied::load(&path).unwrap(), Some(applied));
        fs::write(&path, "[host]\n").unwrap();
        assert!(Applied::load(&path).is_err());
    }
}
