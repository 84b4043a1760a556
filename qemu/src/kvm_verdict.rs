//! What KVM was seen to do on this machine, remembered until the machine reboots.
//!
//! The probe guest proves little where KVM only looks usable (it can pass while a real Linux
//! guest hangs without printing a byte), so the final word comes from watching real boots
//! (see [`crate::Vm::boot`]). Their verdict is kept in one small JSON file per QEMU binary,
//! `kvm-<hash>.json` in `$KEEL_CACHE`, `$XDG_CACHE_HOME/keel` or `~/.cache/keel`, so that every
//! later `keel run`, test and benchmark on this machine decides at once and the same way. A
//! verdict holds only for the boot of the machine that recorded it (`boot_id`) and the exact
//! QEMU binary (path, size, modification time): a reboot, a kernel module reload that comes
//! with it, or a QEMU upgrade makes the next boot find out again. Delete the file to forget.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde_json::{Value, json};

use crate::binary;

/// What real boots showed: `Ok` if a KVM guest came to life, `Err(why)` if not.
pub(crate) type KvmVerdict = Result<(), String>;

/// Where a verdict for one QEMU binary lives, and what it must match to count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VerdictFile {
    pub(crate) path: PathBuf,
    /// The machine's boot, from /proc/sys/kernel/random/boot_id.
    boot_id: String,
    /// The resolved QEMU binary, its size and modification time.
    qemu: String,
}

impl VerdictFile {
    /// The verdict file for `qemu` (as given to `Command::new`). `None` where there is nowhere
    /// to keep one (no cache directory, no boot id, no such binary): then nothing is remembered
    /// and every process probes and watches for itself.
    pub(crate) fn for_binary(qemu: &Path) -> Option<VerdictFile> {
        let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        Self::with(qemu, &cache_dir()?, boot_id.trim())
    }

    fn with(qemu: &Path, dir: &Path, boot_id: &str) -> Option<VerdictFile> {
        let resolved = binary::resolve(qemu)?;
        let resolved = fs::canonicalize(&resolved).unwrap_or(resolved);
        let meta = fs::metadata(&resolved).ok()?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let qemu = format!(
            "{} size={} mtime_ns={mtime}",
            resolved.display(),
            meta.len()
        );
        let name = format!("kvm-{:016x}.json", fnv1a(qemu.as_bytes()));
        Some(VerdictFile {
            path: dir.join(name),
            boot_id: boot_id.to_owned(),
            qemu,
        })
    }

    /// The verdict recorded in this machine boot for this binary, if any. A file that does not
    /// parse or belongs to another boot or binary is no verdict.
    pub(crate) fn load(&self) -> Option<KvmVerdict> {
        let text = fs::read_to_string(&self.path).ok()?;
        let record: Value = serde_json::from_str(&text).ok()?;
        if record["boot_id"] != self.boot_id.as_str() || record["qemu"] != self.qemu.as_str() {
            return None;
        }
        match record["kvm_runs_guests"].as_bool()? {
            true => Some(Ok(())),
            false => Some(Err(record["why_not"].as_str()?.to_owned())),
        }
    }

    /// Records `verdict`, replacing the file atomically (concurrent test processes may race
    /// to record; each write is whole, and they agree). Failure to write only costs the next
    /// process a probe, so it is reported and otherwise ignored.
    pub(crate) fn store(&self, verdict: &KvmVerdict) {
        let record = json!({
            "boot_id": self.boot_id,
            "qemu": self.qemu,
            "kvm_runs_guests": verdict.is_ok(),
            "why_not": verdict.as_ref().err(),
        });
        if let Err(e) = self.write(&record) {
            eprintln!(
                "keel: could not remember the KVM verdict in {}: {e}",
                self.path.display()
            );
        }
        self.sweep();
    }

    /// Removes the verdicts that can never count again: those of an earlier boot of the
    /// machine, and those of binaries that are gone (a test's wrapper, an uninstalled QEMU).
    fn sweep(&self) {
        let Some(dir) = self.path.parent() else {
            return;
        };
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if !(name.starts_with("kvm-") && name.ends_with(".json")) {
                continue;
            }
            let Ok(text) = fs::read_to_string(entry.path()) else {
                continue;
            };
            let Ok(record) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            let binary = record["qemu"]
                .as_str()
                .and_then(|q| q.rsplit_once(" size="))
                .map(|(path, _)| path);
            let stale = record["boot_id"] != self.boot_id.as_str()
                || binary.is_none_or(|path| !Path::new(path).exists());
            if stale {
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    fn write(&self, record: &Value) -> std::io::Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir)?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        tmp.write_all(record.to_string().as_bytes())?;
        tmp.persist(&self.path).map_err(|e| e.error)?;
        Ok(())
    }
}

/// `$KEEL_CACHE`, `$XDG_CACHE_HOME/keel` or `$HOME/.cache/keel`: where `keel` keeps its
/// downloads (the kernel package, pulled images) and this crate its KVM verdicts.
pub fn cache_dir() -> Option<PathBuf> {
    let non_empty = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = non_empty("KEEL_CACHE") {
        return Some(PathBuf::from(dir));
    }
    let base = non_empty("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| non_empty("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(base.join("keel"))
}

/// FNV-1a, 64 bits: a stable file name for a binary's identity (not a security boundary: the
/// file's content is checked against the full identity).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verdict_holds_for_its_boot_and_binary_only() {
        let dir = tempfile::tempdir().unwrap();
        let qemu = dir.path().join("qemu");
        fs::write(&qemu, "#!/bin/sh\n").unwrap();
        let file = VerdictFile::with(&qemu, dir.path(), "boot-1").unwrap();
        assert_eq!(file.load(), None);
        file.store(&Err("a KVM guest printed nothing".into()));
        assert_eq!(file.load(), Some(Err("a KVM guest printed nothing".into())));
        file.store(&Ok(()));
        assert_eq!(file.load(), Some(Ok(())));

        // Another boot of the machine: the verdict no longer counts.
        let rebooted = VerdictFile::with(&qemu, dir.path(), "boot-2").unwrap();
        assert_eq!(rebooted.path, file.path);
        assert_eq!(rebooted.load(), None);

        // Another binary (a QEMU upgrade changes its size): a file of its own.
        fs::write(&qemu, "#!/bin/sh\nexit 0\n").unwrap();
        let upgraded = VerdictFile::with(&qemu, dir.path(), "boot-1").unwrap();
        assert_ne!(upgraded.path, file.path);
        assert_eq!(upgraded.load(), None);

        // Storing sweeps what can never count again: another boot's verdict, a gone binary's.
        let other = dir.path().join("other-qemu");
        fs::write(&other, "#!/bin/sh\n").unwrap();
        let gone = VerdictFile::with(&other, dir.path(), "boot-1").unwrap();
        gone.store(&Ok(()));
        rebooted.store(&Ok(()));
        assert!(!file.path.exists() || file.load().is_none());
        fs::remove_file(&other).unwrap();
        upgraded.store(&Ok(()));
        assert!(!gone.path.exists());
        assert!(upgraded.path.exists());

        // Garbage is no verdict.
        file.store(&Ok(()));
        fs::write(&file.path, "{not json").unwrap();
        assert_eq!(file.load(), None);
        assert!(VerdictFile::with(Path::new("/nonexistent/q"), dir.path(), "b").is_none());
    }
}
