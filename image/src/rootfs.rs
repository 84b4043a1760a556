//! The root image's tree, staged in a directory for `mkfs.erofs`.
//!
//! Ownership is not staged (the image is made with `--all-root`) and neither are
//! timestamps (`-T`); permissions are normalised by [`Staging::normalize_modes`] so that
//! the umask of whoever builds does not reach the image.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

/// Errors while staging the tree.
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}: not a relative path inside the image")]
    BadPath(PathBuf),
    #[error("{program}: {reason}")]
    Program { program: PathBuf, reason: String },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> StagingError {
    let context = context.into();
    move |source| StagingError::Io { context, source }
}

/// A directory that becomes the root of the image.
#[derive(Debug)]
pub struct Staging {
    root: PathBuf,
}

impl Staging {
    /// Stages into `root`, which must not exist yet or be empty.
    pub fn new(root: &Path) -> Result<Staging, StagingError> {
        fs::create_dir_all(root).map_err(io_err(format!("creating {}", root.display())))?;
        Ok(Staging {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where `rel` (relative, or absolute as seen from inside the image) is staged.
    pub fn path(&self, rel: impl AsRef<Path>) -> Result<PathBuf, StagingError> {
        let rel = rel.as_ref();
        let mut out = self.root.clone();
        let mut any = false;
        for c in rel.components() {
            match c {
                Component::RootDir | Component::CurDir => {}
                Component::Normal(part) => {
                    out.push(part);
                    any = true;
                }
                Component::ParentDir | Component::Prefix(_) => {
                    return Err(StagingError::BadPath(rel.to_path_buf()));
                }
            }
        }
        if !any {
            return Err(StagingError::BadPath(rel.to_path_buf()));
        }
        Ok(out)
    }

    /// Creates a directory and its parents.
    pub fn add_dir(&self, rel: impl AsRef<Path>) -> Result<PathBuf, StagingError> {
        let path = self.path(rel)?;
        fs::create_dir_all(&path).map_err(io_err(format!("creating {}", path.display())))?;
        Ok(path)
    }

    fn parent_of(&self, rel: &Path) -> Result<PathBuf, StagingError> {
        let path = self.path(rel)?;
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io_err(format!("creating {}", parent.display())))?;
        }
        Ok(path)
    }

    /// Writes a file (and its parent directories).
    pub fn add_file_from_bytes(
        &self,
        rel: impl AsRef<Path>,
        mode: u32,
        data: &[u8],
    ) -> Result<(), StagingError> {
        let path = self.parent_of(rel.as_ref())?;
        fs::write(&path, data).map_err(io_err(format!("writing {}", path.display())))?;
        set_mode(&path, mode)
    }

    /// Copies `src` (following symlinks: the image gets the contents under the staged
    /// name) to `rel`.
    pub fn add_file_from_path(
        &self,
        rel: impl AsRef<Path>,
        mode: u32,
        src: &Path,
    ) -> Result<(), StagingError> {
        let path = self.parent_of(rel.as_ref())?;
        fs::copy(src, &path).map_err(io_err(format!(
            "copying {} to {}",
            src.display(),
            path.display()
        )))?;
        set_mode(&path, mode)
    }

    /// Copies a dynamically linked program of this machine to `dest` and every shared
    /// library it loads (with the dynamic loader) to the path it is loaded from here, so
    /// the program runs in the image as it does here. Returns the (source, path in the
    /// image) pairs copied, the program first.
    pub fn add_host_program(
        &self,
        program: &Path,
        dest: &str,
    ) -> Result<Vec<(PathBuf, String)>, StagingError> {
        let mut copied = vec![(program.to_path_buf(), dest.to_string())];
        for lib in shared_libraries(program)? {
            let name = lib.to_string_lossy().into_owned();
            copied.push((lib, name));
        }
        for (src, dest) in &copied {
            self.add_file_from_path(dest, 0o755, src)?;
        }
        Ok(copied)
    }

    /// Directories 0755, files 0755 when anyone may execute them and 0644 otherwise,
    /// throughout the tree.
    pub fn normalize_modes(&self) -> Result<(), StagingError> {
        normalize(&self.root)
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<(), StagingError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(io_err(format!("chmod {}", path.display())))
}

fn normalize(dir: &Path) -> Result<(), StagingError> {
    set_mode(dir, 0o755)?;
    let entries = fs::read_dir(dir).map_err(io_err(format!("reading {}", dir.display())))?;
    for entry in entries {
        let entry = entry.map_err(io_err(format!("reading {}", dir.display())))?;
        let path = entry.path();
        let meta = fs::symlink_metadata(&path)
            .map_err(io_err(format!("inspecting {}", path.display())))?;
        if meta.is_dir() {
            normalize(&path)?;
        } else if meta.is_file() {
            let mode = if meta.permissions().mode() & 0o111 != 0 {
                0o755
            } else {
                0o644
            };
            set_mode(&path, mode)?;
        }
    }
    Ok(())
}

/// The shared libraries and the dynamic loader `program` loads on this machine, as `ldd`
/// resolves them (its whole closure: libraries' own dependencies are included).
pub fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>, StagingError> {
    let failed = |reason: String| StagingError::Program {
        program: program.to_path_buf(),
        reason,
    };
    let out = Command::new("ldd")
        .arg(program)
        .output()
        .map_err(|e| failed(format!("running ldd: {e}")))?;
    if !out.status.success() {
        return Err(failed(format!(
            "ldd failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    if let Some(missing) = text.lines().find(|l| l.contains("not found")) {
        return Err(failed(format!("a library is missing: {}", missing.trim())));
    }
    let libraries = parse_ldd(&text);
    if !libraries
        .iter()
        .any(|l| l.to_string_lossy().contains("/ld-linux"))
    {
        return Err(failed(
            "ldd names no dynamic loader (a static program needs no libraries: copy it alone)"
                .into(),
        ));
    }
    Ok(libraries)
}

/// The paths in `ldd` output: `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` and
/// `/lib64/ld-linux-x86-64.so.2 (0x...)`; the vDSO has no file.
pub fn parse_ldd(output: &str) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = output
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect();
    paths.sort();
    paths.dedup();
    paths
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_is_parsed() {
        let out = "\tlinux-vdso.so.1 (0x00007ffc)\n\
                   \tlibext2fs.so.2 => /lib/x86_64-linux-gnu/libext2fs.so.2 (0x00007f83)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f83)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f83)\n";
        assert_eq!(
            parse_ldd(out),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib/x86_64-linux-gnu/libext2fs.so.2"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }

    #[test]
    fn staged_paths_stay_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let staging = Staging::new(&dir.path().join("root")).unwrap();
        assert_eq!(
            staging.path("/usr/sbin/mke2fs").unwrap(),
            dir.path().join("root/usr/sbin/mke2fs")
        );
        for bad in ["../x", "/a/../../x", "/", ""] {
            assert!(staging.path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn modes_are_normalised() {
        let dir = tempfile::tempdir().unwrap();
        let staging = Staging::new(&dir.path().join("root")).unwrap();
        staging.add_file_from_bytes("a/x", 0o700, b"x").unwrap();
        staging.add_file_from_bytes("a/y", 0o600, b"y").unwrap();
        set_mode(&dir.path().join("root/a"), 0o700).unwrap();
        staging.normalize_modes().unwrap();
        let mode = |p: &str| {
            fs::metadata(dir.path().join("root").join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!((mode("a"), mode("a/x"), mode("a/y")), (0o755, 0o755, 0o644));
    }
}
