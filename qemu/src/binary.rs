//! Which QEMU binary runs, and the private scratch directory each run keeps its sockets in.

use std::io;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

/// The environment variable naming the QEMU binary to run instead of `qemu-system-x86_64`
/// from `PATH` (a wrapper, a QEMU built elsewhere).
pub const QEMU_ENV: &str = "KEEL_QEMU";

/// The QEMU binary run when neither [`crate::VmConfig::qemu`] nor [`QEMU_ENV`] names one.
pub const DEFAULT_QEMU: &str = "qemu-system-x86_64";

/// The binary to run: `configured`, else [`QEMU_ENV`], else [`DEFAULT_QEMU`] from `PATH`.
pub(crate) fn qemu_binary(configured: Option<&Path>) -> PathBuf {
    if let Some(path) = configured {
        return path.to_owned();
    }
    match std::env::var_os(QEMU_ENV) {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => PathBuf::from(DEFAULT_QEMU),
    }
}

/// The file `binary` names: itself if it has a `/`, else the first executable of that name in
/// `PATH`, as `execvp` would pick it. `None` if there is none.
pub(crate) fn resolve(binary: &Path) -> Option<PathBuf> {
    if binary.as_os_str().as_encoded_bytes().contains(&b'/') {
        return binary.is_file().then(|| binary.to_owned());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A fresh mode-0700 directory for sockets and scratch files, removed on drop.
pub(crate) fn private_dir() -> io::Result<TempDir> {
    let dir = tempfile::Builder::new().prefix("keel-qemu-").tempdir()?;
    // A unix socket path must fit in sun_path (108 bytes); a long $TMPDIR would break QMP.
    if dir.path().as_os_str().len() > 80 {
        return tempfile::Builder::new()
            .prefix("keel-qemu-")
            .tempdir_in("/tmp");
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_like_execvp() {
        assert_eq!(
            resolve(Path::new("sh")).map(|p| p.is_absolute()),
            Some(true)
        );
        assert_eq!(resolve(Path::new("no-such-binary-keel")), None);
        assert_eq!(resolve(Path::new("/nonexistent/qemu")), None);
        assert_eq!(
            qemu_binary(Some(Path::new("/opt/q"))),
            PathBuf::from("/opt/q")
        );
    }
}
