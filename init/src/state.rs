//! Keel's own state on /var: small files that must survive a power cut whole or not at all.
//!
//! Every state file is written with [`write_atomic`] (keel_image::atomic): after a crash a
//! reader sees the old file or the new one, never a mix; [`remove_stale_temporaries`]
//! deletes the leftovers of interrupted writes at boot.

use std::fs;
use std::io;
use std::path::Path;

use sha2::{Digest, Sha256};

/// Where Keel keeps its state.
pub const STATE_DIR: &str = "/var/lib/keel";
/// The record of first-boot provisioning (see the init's `var` module).
pub const PROVISIONED: &str = "/var/lib/keel/provisioned.json";
/// The host file last applied with `keel apply`, with the delivered file it was applied over.
pub const APPLIED: &str = "/var/lib/keel/applied.toml";

pub use keel_image::atomic::{remove_stale_temporaries, write_atomic};

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
