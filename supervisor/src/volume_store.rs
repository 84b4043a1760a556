//! The volume store, `/var/lib/keel/volumes`: the one owner of its layout.
//!
//! ```text
//! NAME/                       a named volume (the host file's `NAME:/path`)
//! .image/CONTAINER/ENCODED/   an anonymous volume: the image's `Volumes` entry ENCODED
//!                             (the target, `%` and `/` percent-encoded) of CONTAINER
//! .NAME.staging, .image/CONTAINER/.ENCODED.staging
//!                             a volume being made (see crate::copy_up); never trusted
//! .trash/ENTRY/               removed volumes, emptied by a helper process
//! ```
//!
//! A volume exists once it is complete: it is made in its staging directory and renamed
//! onto its name, so its existence is the record that its first use (the copy-up) is done.
//! A staging directory found later was interrupted and goes to the trash.
//!
//! An anonymous volume lives as long as its container is in the host file: it is kept
//! across restarts, reboots and changed definitions, and goes to the trash when the
//! container is removed (by `keel apply`, or found missing from the host file at boot).

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

const ANONYMOUS: &str = ".image";
const TRASH: &str = ".trash";
const STAGING_SUFFIX: &str = ".staging";

/// The volume store at one root directory.
#[derive(Debug, Clone)]
pub struct VolumeStore {
    root: PathBuf,
}

impl VolumeStore {
    pub fn new(root: impl Into<PathBuf>) -> VolumeStore {
        VolumeStore { root: root.into() }
    }

    /// The directory of named volume `name` (a name the host file's validation allows:
    /// letters, digits, `-`, `_`, `.`, not starting with `.`).
    pub fn named(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The directory of `container`'s anonymous volume at `target`.
    pub fn anonymous(&self, container: &str, target: &str) -> PathBuf {
        self.root
            .join(ANONYMOUS)
            .join(container)
            .join(encode_target(target))
    }

    /// Where `volume` is made before it is renamed into place.
    pub fn staging_for(volume: &Path) -> PathBuf {
        let name = volume.file_name().unwrap_or(OsStr::new("volume"));
        let mut staging = std::ffi::OsString::from(".");
        staging.push(name);
        staging.push(STAGING_SUFFIX);
        volume.with_file_name(staging)
    }

    /// Makes `volume` empty, owned by `owner`, mode 0755, unless it exists; true if made.
    /// Atomic like a copy-up: made aside, then renamed onto its name.
    pub fn create_empty(&self, volume: &Path, owner: (u32, u32)) -> io::Result<bool> {
        if volume.symlink_metadata().is_ok() {
            return Ok(false);
        }
        let parent = volume
            .parent()
            .ok_or_else(|| io::Error::other("a volume has a parent directory"))?;
        std::fs::create_dir_all(parent)?;
        let staging = Self::staging_for(volume);
        if staging.symlink_metadata().is_ok() {
            self.discard(&staging)?;
        }
        std::fs::create_dir(&staging)?;
        std::os::unix::fs::chown(&staging, Some(owner.0), Some(owner.1))?;
        std::fs::set_permissions(
            &staging,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        match rustix::fs::renameat_with(
            rustix::fs::CWD,
            &staging,
            rustix::fs::CWD,
            volume,
            rustix::fs::RenameFlags::NOREPLACE,
        ) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::EXIST) => {
                std::fs::remove_dir(&staging)?;
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Moves `container`'s anonymous volumes to the trash; true if it had any.
    pub fn discard_anonymous(&self, container: &str) -> io::Result<bool> {
        let dir = self.root.join(ANONYMOUS).join(container);
        if dir.symlink_metadata().is_err() {
            return Ok(false);
        }
        self.discard(&dir)?;
        Ok(true)
    }

    /// Moves the anonymous volumes of containers not in `containers` to the trash, and
    /// returns whose they were.
    pub fn discard_orphans(&self, containers: &BTreeSet<&str>) -> io::Result<Vec<String>> {
        let mut discarded = Vec::new();
        for entry in read_dir_or_empty(&self.root.join(ANONYMOUS))? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(STAGING_SUFFIX) || containers.contains(name.as_ref()) {
                continue;
            }
            self.discard(&entry.path())?;
            discarded.push(name.into_owned());
        }
        Ok(discarded)
    }

    /// Moves every staging directory (an interrupted copy-up) to the trash; how many.
    pub fn sweep_staging(&self) -> io::Result<usize> {
        let mut found = Vec::new();
        let staging = |dir: &Path, found: &mut Vec<PathBuf>| -> io::Result<()> {
            for entry in read_dir_or_empty(dir)? {
                let entry = entry?;
                let name = entry.file_name();
                if name.as_bytes().starts_with(b".")
                    && name.as_bytes().ends_with(STAGING_SUFFIX.as_bytes())
                {
                    found.push(entry.path());
                }
            }
            Ok(())
        };
        staging(&self.root, &mut found)?;
        for container in read_dir_or_empty(&self.root.join(ANONYMOUS))? {
            staging(&container?.path(), &mut found)?;
        }
        for path in &found {
            self.discard(path)?;
        }
        Ok(found.len())
    }

    /// Whether the trash holds anything.
    pub fn trash_is_empty(&self) -> bool {
        std::fs::read_dir(self.root.join(TRASH)).map_or(true, |mut d| d.next().is_none())
    }

    /// Deletes what the trash holds, through file descriptors (a volume's content is the
    /// container's: a symlink in it is never followed). For a helper process: a volume can
    /// be large.
    pub fn empty_trash(&self) -> io::Result<u64> {
        let trash = self.root.join(TRASH);
        let dir = match rustix::fs::open(
            &trash,
            keel_image::unpack::DIR_FLAGS,
            rustix::fs::Mode::empty(),
        ) {
            Ok(dir) => dir,
            Err(rustix::io::Errno::NOENT) => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        let mut removed = 0;
        for entry in std::fs::read_dir(&trash)? {
            keel_image::remove_tree::remove_tree(&dir, &entry?.file_name())?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Renames `path` into the trash under a name of its own.
    fn discard(&self, path: &Path) -> io::Result<()> {
        let trash = self.root.join(TRASH);
        std::fs::create_dir_all(&trash)?;
        let base = path
            .strip_prefix(&self.root)
            .unwrap_or(path)
            .to_string_lossy()
            .replace('/', "%");
        for n in 0u32.. {
            let to = trash.join(format!("{base}.{n}"));
            match rustix::fs::renameat_with(
                rustix::fs::CWD,
                path,
                rustix::fs::CWD,
                &to,
                rustix::fs::RenameFlags::NOREPLACE,
            ) {
                Err(rustix::io::Errno::EXIST) => continue,
                other => return other.map_err(io::Error::from),
            }
        }
        Err(io::Error::other("no free name in the trash"))
    }
}

fn read_dir_or_empty(
    dir: &Path,
) -> io::Result<Box<dyn Iterator<Item = io::Result<std::fs::DirEntry>>>> {
    match std::fs::read_dir(dir) {
        Ok(entries) => Ok(Box::new(entries)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Box::new(std::iter::empty())),
        Err(e) => Err(e),
    }
}

/// A container path as one directory name: `/var/lib/db` is `var%2Flib%2Fdb`; `%` itself is
/// `%25`, so no two targets share a name.
fn encode_target(target: &str) -> String {
    let mut out = String::with_capacity(target.len());
    for c in target.trim_matches('/').chars() {
        match c {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_encode_without_collisions() {
        assert_eq!(encode_target("/var/lib/db"), "var%2Flib%2Fdb");
        assert_ne!(encode_target("/a%2Fb"), encode_target("/a/b"));
        assert_ne!(encode_target("/a%/b"), encode_target("/a/%b"));
    }

    #[test]
    fn the_layout_names_named_anonymous_and_staging_directories() {
        let store = VolumeStore::new("/v");
        assert_eq!(store.named("data"), Path::new("/v/data"));
        assert_eq!(
            store.anonymous("db", "/var/lib/db/"),
            Path::new("/v/.image/db/var%2Flib%2Fdb")
        );
        assert_eq!(
            VolumeStore::staging_for(&store.named("data")),
            Path::new("/v/.data.staging")
        );
    }

    #[test]
    fn an_empty_volume_appears_whole_once_and_staging_goes_to_the_trash() {
        let root = tempfile::tempdir().unwrap();
        let store = VolumeStore::new(root.path());
        let volume = store.named("data");
        // An interrupted copy-up left its staging directory.
        std::fs::create_dir_all(VolumeStore::staging_for(&volume).join("half")).unwrap();
        assert_eq!(store.sweep_staging().unwrap(), 1);
        assert!(!VolumeStore::staging_for(&volume).exists());
        assert!(!store.trash_is_empty());

        assert!(store.create_empty(&volume, (0, 0)).unwrap());
        std::fs::write(volume.join("kept"), "x").unwrap();
        assert!(!store.create_empty(&volume, (0, 0)).unwrap(), "made once");
        assert!(volume.join("kept").exists());

        let anon = store.anonymous("db", "/var/lib/db");
        assert!(store.create_empty(&anon, (0, 0)).unwrap());
        let other = store.anonymous("gone", "/data");
        assert!(store.create_empty(&other, (0, 0)).unwrap());
        let kept = BTreeSet::from(["db"]);
        assert_eq!(store.discard_orphans(&kept).unwrap(), ["gone"]);
        assert!(anon.is_dir() && !other.exists());
        assert!(store.discard_anonymous("db").unwrap());
        assert!(!anon.exists());
        assert!(!store.discard_anonymous("db").unwrap());

        assert_eq!(store.empty_trash().unwrap(), 3);
        assert!(store.trash_is_empty());
        assert!(
            volume.join("kept").exists(),
            "named volumes are not touched"
        );
    }
}
