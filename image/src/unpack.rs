//! Layer extraction for overlayfs, the "overlay-native" way (containerd's
//! `OverlayConvertWhiteout`).
//!
//! Each layer is extracted into its own directory, and the caller stacks those directories
//! as overlay `lowerdir`s (upper layers first). OCI whiteouts are therefore translated
//! into what overlayfs itself uses: `dir/.wh.name` becomes a 0/0 character device at
//! `dir/name`, and `dir/.wh..wh..opq` becomes `trusted.overlay.opaque=y` on `dir`.
//!
//! Layers are treated as hostile. Every path is resolved component by component from a
//! directory file descriptor with `O_NOFOLLOW`, so a symlink created by an earlier entry
//! can never redirect a later one outside the destination; `..` that would climb above
//! the root is refused, hard links are resolved the same way, and overlay xattrs carried
//! in the layer are dropped. Other PAX `SCHILY.xattr.*` records are applied to files and
//! directories where the filesystem supports them. Extraction needs root (chown, mknod,
//! trusted xattrs).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{
    AtFlags, FileType, Gid, Mode, OFlags, Timespec, Timestamps, Uid, XattrFlags, chmodat, chownat,
    fchmod, fchown, fsetxattr, futimens, linkat, makedev, mkdirat, mknodat, openat, statat,
    symlinkat, unlinkat, utimensat,
};
use rustix::io::Errno;

use crate::ImageError;
use crate::digest::HashingReader;
use crate::layout::{ImageLayout, Layer, decompress};

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
const WHITEOUT_OPAQUE: &[u8] = b".wh..wh..opq";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const PAX_XATTR_PREFIX: &str = "SCHILY.xattr.";

/// What one [`unpack_layer`] call created.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UnpackStats {
    /// Regular files written.
    pub files: u64,
    /// Directories created or updated.
    pub dirs: u64,
    /// Symbolic links created.
    pub symlinks: u64,
    /// Hard links created.
    pub hardlinks: u64,
    /// Device nodes and FIFOs created.
    pub devices: u64,
    /// Whiteouts converted to 0/0 character devices.
    pub whiteouts: u64,
    /// Directories marked opaque.
    pub opaque_dirs: u64,
    /// Bytes of regular-file content written.
    pub bytes: u64,
}

/// Extracts one layer into `dest`, which must be an existing, empty directory.
///
/// The blob's SHA-256 is computed while it streams and compared with `layer.digest` at
/// the end; on a mismatch an error is returned and `dest` holds untrusted content that
/// the caller must discard ([`unpack_image`] does).
pub fn unpack_layer(layer: &Layer, dest: &Path) -> Result<UnpackStats, ImageError> {
    unpack_layer_shifted(layer, dest, None)
}

/// Owner ids shifted into a user namespace's range: an entry owned by uid `n` is written
/// owned by `uid + n` on disk, so a container whose root is host uid `uid` owns its files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdShift {
    pub uid: u32,
    pub gid: u32,
    pub size: u32,
}

impl IdShift {
    fn apply(&self, id: u32, base: u32, what: &str) -> Result<u32, String> {
        if id >= self.size {
            return Err(format!(
                "{what} {id} is outside the user namespace's {} ids",
                self.size
            ));
        }
        base.checked_add(id)
            .ok_or_else(|| format!("{what} {id} overflows when shifted by {base}"))
    }
}

/// [`unpack_layer`] with owners shifted by `shift` (for user-namespaced containers).
pub fn unpack_layer_shifted(
    layer: &Layer,
    dest: &Path,
    shift: Option<IdShift>,
) -> Result<UnpackStats, ImageError> {
    let expected = layer.digest_hex()?.to_owned();
    let compression = layer.compression()?;

    let root = openat(
        rustix::fs::CWD,
        dest,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| ImageError::io(format!("opening {}", dest.display()), e.into()))?;
    let mut listing =
        fs::read_dir(dest).map_err(|e| ImageError::io(format!("reading {}", dest.display()), e))?;
    if listing.next().is_some() {
        return Err(ImageError::BadSource {
            path: dest.to_owned(),
            reason: "destination directory is not empty".into(),
        });
    }

    let file = fs::File::open(&layer.path)
        .map_err(|e| ImageError::io(format!("opening layer {}", layer.path.display()), e))?;
    let mut hashing = HashingReader::new(io::BufReader::new(file));
    let mut unpacker = Unpacker {
        root,
        shift,
        dest: dest.to_owned(),
        stats: UnpackStats::default(),
        dir_times: HashMap::new(),
    };
    {
        let stream = decompress(compression, &mut hashing)?;
        let mut archive = tar::Archive::new(stream);
        let entries = archive
            .entries()
            .map_err(|e| ImageError::io(format!("reading layer {}", layer.digest), e))?;
        for entry in entries {
            let entry =
                entry.map_err(|e| ImageError::io(format!("reading layer {}", layer.digest), e))?;
            unpacker.apply(entry)?;
        }
        // Drain the decoder too: trailing zero blocks and the compression trailer are part
        // of the blob, and a truncated compressed stream must fail here.
        let mut rest = archive.into_inner();
        io::copy(&mut rest, &mut io::sink())
            .map_err(|e| ImageError::io(format!("reading layer {}", layer.digest), e))?;
    }
    let (actual, _) = hashing
        .finish()
        .map_err(|e| ImageError::io(format!("reading layer {}", layer.path.display()), e))?;
    if actual != expected {
        return Err(ImageError::DigestMismatch {
            what: format!("layer {}", layer.path.display()),
            expected: layer.digest.clone(),
            actual: format!("sha256:{actual}"),
        });
    }
    unpacker.finish_dir_times()?;
    Ok(unpacker.stats)
}

/// Unpacks every layer of `layout` into `store_dir/<hex digest>/` (reusing directories
/// that already exist there) and returns the layer directories bottom layer first.
///
/// Each layer is extracted into `store_dir/.tmp-<hex>`, synced, and renamed into place,
/// so a directory named after a digest always holds a complete, verified layer.
pub fn unpack_image(layout: &ImageLayout, store_dir: &Path) -> Result<Vec<PathBuf>, ImageError> {
    unpack_image_shifted(layout, store_dir, None)
}

/// [`unpack_image`] with owners shifted into a user namespace's range. Shifted copies are
/// kept apart from the plain ones (`<hex>@<uid>-<gid>-<size>`): layers cannot be shared
/// across id ranges without idmapped mounts, which tmpfs lacks before Linux 6.3.
pub fn unpack_image_shifted(
    layout: &ImageLayout,
    store_dir: &Path,
    shift: Option<IdShift>,
) -> Result<Vec<PathBuf>, ImageError> {
    fs::create_dir_all(store_dir)
        .map_err(|e| ImageError::io(format!("creating {}", store_dir.display()), e))?;
    let mut dirs = Vec::new();
    for layer in layout.layers() {
        let hex = match shift {
            None => layer.digest_hex()?.to_owned(),
            Some(s) => format!("{}@{}-{}-{}", layer.digest_hex()?, s.uid, s.gid, s.size),
        };
        let final_dir = store_dir.join(&hex);
        if final_dir.is_dir() {
            dirs.push(final_dir);
            continue;
        }
        let tmp = store_dir.join(format!(".tmp-{hex}"));
        if fs::symlink_metadata(&tmp).is_ok() {
            // Left over by an interrupted unpack.
            fs::remove_dir_all(&tmp)
                .map_err(|e| ImageError::io(format!("removing stale {}", tmp.display()), e))?;
        }
        fs::create_dir(&tmp)
            .map_err(|e| ImageError::io(format!("creating {}", tmp.display()), e))?;
        let result = unpack_layer_shifted(&layer, &tmp, shift).and_then(|_| {
            let fd = fs::File::open(&tmp)
                .map_err(|e| ImageError::io(format!("opening {}", tmp.display()), e))?;
            // The rename below must not become durable before the layer's contents do.
            rustix::fs::syncfs(&fd)
                .map_err(|e| ImageError::io(format!("syncing {}", tmp.display()), e.into()))
        });
        if let Err(e) = result {
            // Best effort: the error that caused this matters more than a failed cleanup,
            // and a leftover tmp dir is removed by the next attempt anyway.
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        if let Err(e) = fs::rename(&tmp, &final_dir) {
            // Another unpacker may have finished the same layer first; its copy is as good.
            if final_dir.is_dir() {
                let _ = fs::remove_dir_all(&tmp);
            } else {
                return Err(ImageError::io(
                    format!("renaming {} to {}", tmp.display(), final_dir.display()),
                    e,
                ));
            }
        }
        dirs.push(final_dir);
    }
    Ok(dirs)
}

/// Header fields of one entry, after PAX overrides.
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    xattrs: Vec<(String, Vec<u8>)>,
}

struct Unpacker {
    root: OwnedFd,
    shift: Option<IdShift>,
    dest: PathBuf,
    stats: UnpackStats,
    /// Directory mtimes are applied after all entries, since creating children changes them.
    dir_times: HashMap<Vec<Vec<u8>>, i64>,
}

/// How to treat a missing parent directory.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Missing {
    Create,
    Fail,
}

fn display(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw).into_owned()
}

/// Splits a tar path into normal components. A leading `/` is dropped (the layer root is
/// the root), `.` is skipped, and `..` pops a component but may never climb above the root.
fn normalize(raw: &[u8]) -> Result<Vec<Vec<u8>>, ImageError> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                if out.pop().is_none() {
                    return Err(ImageError::UnsafePath {
                        path: display(raw),
                        reason: "path escapes layer root via ..",
                    });
                }
            }
            c => {
                if c.contains(&0) {
                    return Err(ImageError::UnsafePath {
                        path: display(raw),
                        reason: "NUL byte in path",
                    });
                }
                out.push(c.to_vec());
            }
        }
    }
    Ok(out)
}

fn os(c: &[u8]) -> &OsStr {
    OsStr::from_bytes(c)
}

fn errno_io(e: Errno) -> io::Error {
    e.into()
}

impl Unpacker {
    fn io_err(&self, path: &[u8], what: &str, e: Errno) -> ImageError {
        ImageError::io(
            format!("{what} {:?} in {}", display(path), self.dest.display()),
            errno_io(e),
        )
    }

    /// Opens the directory `comps` below the root without following any symlink.
    fn open_dir(
        &self,
        raw: &[u8],
        comps: &[Vec<u8>],
        missing: Missing,
    ) -> Result<OwnedFd, ImageError> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mut cur = openat(&self.root, ".", flags, Mode::empty())
            .map_err(|e| self.io_err(raw, "opening root for", e))?;
        for comp in comps {
            let name = os(comp);
            let next = match openat(&cur, name, flags, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::NOENT) if missing == Missing::Create => {
                    // Layers may omit parent directories; tar and containerd create them.
                    match mkdirat(&cur, name, Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(self.io_err(raw, "creating parent of", e)),
                    }
                    openat(&cur, name, flags, Mode::empty())
                        .map_err(|e| self.check_component(raw, &cur, name, e))?
                }
                Err(e) => return Err(self.check_component(raw, &cur, name, e)),
            };
            cur = next;
        }
        Ok(cur)
    }

    /// Turns a failed component open into a precise error.
    fn check_component(&self, raw: &[u8], dir: &OwnedFd, name: &OsStr, e: Errno) -> ImageError {
        match statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => {
                ImageError::UnsafePath {
                    path: display(raw),
                    reason: "path escapes layer root via symlink",
                }
            }
            Ok(_) if e == Errno::NOTDIR || e == Errno::LOOP => ImageError::BadEntry {
                path: display(raw),
                reason: "a parent component is not a directory".into(),
            },
            _ => self.io_err(raw, "resolving", e),
        }
    }

    fn meta(
        shift: Option<IdShift>,
        entry: &mut tar::Entry<'_, impl Read>,
    ) -> Result<Meta, ImageError> {
        let raw = entry.path_bytes().into_owned();
        let bad = |reason: String| ImageError::BadEntry {
            path: display(&raw),
            reason,
        };
        let h = entry.header();
        let mode = h.mode().map_err(|e| bad(format!("bad mode: {e}")))? & 0o7777;
        let mut uid = h.uid().map_err(|e| bad(format!("bad uid: {e}")))?;
        let mut gid = h.gid().map_err(|e| bad(format!("bad gid: {e}")))?;
        let mut mtime = h.mtime().map_err(|e| bad(format!("bad mtime: {e}")))?;
        let mut xattrs = Vec::new();
        if let Some(pax) = entry
            .pax_extensions()
            .map_err(|e| bad(format!("bad PAX header: {e}")))?
        {
            for ext in pax {
                let ext = ext.map_err(|e| bad(format!("bad PAX record: {e}")))?;
                let Ok(key) = ext.key() else { continue };
                let number =
                    || -> Option<u64> { ext.value().ok()?.split('.').next()?.parse().ok() };
                match key {
                    "uid" => uid = number().ok_or_else(|| bad("bad PAX uid".into()))?,
                    "gid" => gid = number().ok_or_else(|| bad("bad PAX gid".into()))?,
                    "mtime" => mtime = number().ok_or_else(|| bad("bad PAX mtime".into()))?,
                    _ => {
                        if let Some(name) = key.strip_prefix(PAX_XATTR_PREFIX) {
                            // A layer must not be able to forge overlayfs metadata
                            // (redirects, metacopy, opaque) on the lower directories.
                            if !name.starts_with("trusted.overlay.")
                                && !name.starts_with("user.overlay.")
                            {
                                xattrs.push((name.to_owned(), ext.value_bytes().to_vec()));
                            }
                        }
                    }
                }
            }
        }
        // u32::MAX means "leave unchanged" to chown, so it cannot be a real owner.
        let id = |v: u64, what: &str| {
            u32::try_from(v)
                .ok()
                .filter(|&v| v != u32::MAX)
                .ok_or_else(|| bad(format!("{what} {v} out of range")))
        };
        let (mut uid, mut gid) = (id(uid, "uid")?, id(gid, "gid")?);
        if let Some(shift) = shift {
            uid = shift.apply(uid, shift.uid, "uid").map_err(bad)?;
            gid = shift.apply(gid, shift.gid, "gid").map_err(bad)?;
        }
        Ok(Meta {
            mode,
            uid,
            gid,
            mtime: i64::try_from(mtime).map_err(|_| bad("mtime out of range".into()))?,
            xattrs,
        })
    }

    fn apply(&mut self, mut entry: tar::Entry<'_, impl Read>) -> Result<(), ImageError> {
        let raw = entry.path_bytes().into_owned();
        let kind = entry.header().entry_type();
        if kind == tar::EntryType::XGlobalHeader {
            return Ok(());
        }
        let mut comps = normalize(&raw)?;

        // aufs bookkeeping (.wh..wh.plnk, .wh..wh.orph and their contents) is meaningless
        // outside aufs. The opaque marker is the only `.wh..wh.` name with a meaning.
        let (last, parents) = match comps.split_last() {
            Some((last, parents)) => (Some(last.as_slice()), parents),
            None => (None, &comps[..]),
        };
        if parents.iter().any(|c| c.starts_with(WHITEOUT_META_PREFIX))
            || last.is_some_and(|l| l.starts_with(WHITEOUT_META_PREFIX) && l != WHITEOUT_OPAQUE)
        {
            return Ok(());
        }
        if parents.iter().any(|c| c.starts_with(WHITEOUT_PREFIX)) {
            return Err(ImageError::BadEntry {
                path: display(&raw),
                reason: "whiteout name used as a directory".into(),
            });
        }

        let meta = Self::meta(self.shift, &mut entry)?;
        let Some(name) = comps.pop() else {
            // The layer root itself ("./"): only directory attributes make sense.
            if kind != tar::EntryType::Directory {
                return Err(ImageError::BadEntry {
                    path: display(&raw),
                    reason: "non-directory entry for the layer root".into(),
                });
            }
            let root = openat(
                &self.root,
                ".",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| self.io_err(&raw, "opening", e))?;
            self.set_attrs_fd(&raw, &root, &meta)?;
            self.dir_times.insert(Vec::new(), meta.mtime);
            self.stats.dirs += 1;
            return Ok(());
        };

        if name == WHITEOUT_OPAQUE {
            let dir = self.open_dir(&raw, &comps, Missing::Create)?;
            self.set_opaque(&raw, &dir)?;
            return Ok(());
        }
        if let Some(target) = name.strip_prefix(WHITEOUT_PREFIX) {
            let parent = self.open_dir(&raw, &comps, Missing::Create)?;
            return self.whiteout(&raw, &parent, target, &meta);
        }

        let parent = self.open_dir(&raw, &comps, Missing::Create)?;
        let name = os(&name);
        let replaced_whiteout =
            self.clear_slot(&raw, &parent, name, kind == tar::EntryType::Directory)?;
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let fd = openat(
                    &parent,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| self.io_err(&raw, "creating", e))?;
                let mut file = fs::File::from(fd);
                let n = io::copy(&mut entry, &mut file)
                    .map_err(|e| ImageError::io(format!("writing {:?}", display(&raw)), e))?;
                let fd = OwnedFd::from(file);
                self.set_attrs_fd(&raw, &fd, &meta)?;
                futimens(&fd, &times(meta.mtime))
                    .map_err(|e| self.io_err(&raw, "setting times of", e))?;
                self.stats.files += 1;
                self.stats.bytes += n;
            }
            tar::EntryType::Directory => {
                match mkdirat(&parent, name, Mode::from_raw_mode(0o700)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(self.io_err(&raw, "creating directory", e)),
                }
                let fd = openat(
                    &parent,
                    name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| self.check_component(&raw, &parent, name, e))?;
                self.set_attrs_fd(&raw, &fd, &meta)?;
                if replaced_whiteout {
                    // Whiteout then directory in one layer: the new directory must still
                    // hide whatever the lower layers had at this path.
                    self.set_opaque(&raw, &fd)?;
                }
                comps.push(name.as_bytes().to_vec());
                self.dir_times.insert(comps, meta.mtime);
                self.stats.dirs += 1;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| ImageError::BadEntry {
                        path: display(&raw),
                        reason: "symlink without target".into(),
                    })?;
                symlinkat(os(&target), &parent, name)
                    .map_err(|e| self.io_err(&raw, "creating symlink", e))?;
                self.set_attrs_at(&raw, &parent, name, &meta, false)?;
                self.stats.symlinks += 1;
            }
            tar::EntryType::Link => {
                let target_raw = entry
                    .link_name_bytes()
                    .ok_or_else(|| ImageError::BadEntry {
                        path: display(&raw),
                        reason: "hard link without target".into(),
                    })?
                    .into_owned();
                let mut target = normalize(&target_raw)?;
                let Some(target_name) = target.pop() else {
                    return Err(ImageError::BadEntry {
                        path: display(&raw),
                        reason: "hard link to the layer root".into(),
                    });
                };
                let target_dir = self.open_dir(&target_raw, &target, Missing::Fail)?;
                linkat(
                    &target_dir,
                    os(&target_name),
                    &parent,
                    name,
                    AtFlags::empty(),
                )
                .map_err(|e| self.io_err(&raw, "creating hard link", e))?;
                self.stats.hardlinks += 1;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let bad = |what: &str| ImageError::BadEntry {
                    path: display(&raw),
                    reason: format!("bad device {what}"),
                };
                let major = entry
                    .header()
                    .device_major()
                    .map_err(|_| bad("major"))?
                    .unwrap_or(0);
                let minor = entry
                    .header()
                    .device_minor()
                    .map_err(|_| bad("minor"))?
                    .unwrap_or(0);
                let file_type = match kind {
                    tar::EntryType::Char => FileType::CharacterDevice,
                    tar::EntryType::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                mknodat(
                    &parent,
                    name,
                    file_type,
                    Mode::from_raw_mode(0o600),
                    makedev(major, minor),
                )
                .map_err(|e| self.io_err(&raw, "creating device", e))?;
                self.set_attrs_at(&raw, &parent, name, &meta, true)?;
                self.stats.devices += 1;
            }
            other => {
                return Err(ImageError::BadEntry {
                    path: display(&raw),
                    reason: format!("unsupported tar entry type {other:?}"),
                });
            }
        }
        Ok(())
    }

    /// Makes room for a new entry. Returns true if a whiteout device was removed.
    fn clear_slot(
        &self,
        raw: &[u8],
        parent: &OwnedFd,
        name: &OsStr,
        new_is_dir: bool,
    ) -> Result<bool, ImageError> {
        let st = match statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Ok(false),
            Err(e) => return Err(self.io_err(raw, "inspecting", e)),
        };
        let ft = FileType::from_raw_mode(st.st_mode);
        match ft {
            // Two directories merge: only the attributes of the existing one change.
            FileType::Directory if new_is_dir => Ok(false),
            FileType::Directory => {
                // The path was checked symlink-free above, so removing by path stays inside.
                let mut path = self.dest.clone();
                let comps = normalize(raw)?;
                for c in &comps {
                    path.push(os(c));
                }
                fs::remove_dir_all(&path).map_err(|e| {
                    ImageError::io(format!("replacing directory {}", path.display()), e)
                })?;
                Ok(false)
            }
            _ => {
                unlinkat(parent, name, AtFlags::empty())
                    .map_err(|e| self.io_err(raw, "replacing", e))?;
                Ok(ft == FileType::CharacterDevice && st.st_rdev == 0)
            }
        }
    }

    fn whiteout(
        &mut self,
        raw: &[u8],
        parent: &OwnedFd,
        target: &[u8],
        meta: &Meta,
    ) -> Result<(), ImageError> {
        if target.is_empty() || target == b"." || target == b".." {
            return Err(ImageError::BadEntry {
                path: display(raw),
                reason: "invalid whiteout name".into(),
            });
        }
        let name = os(target);
        match statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => {
                // The same layer also provides this path; the whiteout only hides lower
                // layers. A real file already does that; a directory needs to be opaque.
                if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
                    let fd = openat(
                        parent,
                        name,
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(|e| self.io_err(raw, "opening", e))?;
                    self.set_opaque(raw, &fd)?;
                }
                self.stats.whiteouts += 1;
                Ok(())
            }
            Err(Errno::NOENT) => {
                mknodat(
                    parent,
                    name,
                    FileType::CharacterDevice,
                    Mode::empty(),
                    makedev(0, 0),
                )
                .map_err(|e| self.io_err(raw, "creating whiteout for", e))?;
                chownat(
                    parent,
                    name,
                    Some(Uid::from_raw(meta.uid)),
                    Some(Gid::from_raw(meta.gid)),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(|e| self.io_err(raw, "chowning whiteout", e))?;
                self.stats.whiteouts += 1;
                Ok(())
            }
            Err(e) => Err(self.io_err(raw, "inspecting", e)),
        }
    }

    fn set_opaque(&mut self, raw: &[u8], dir: &OwnedFd) -> Result<(), ImageError> {
        fsetxattr(dir, OPAQUE_XATTR, b"y", XattrFlags::empty())
            .map_err(|e| self.io_err(raw, "marking opaque", e))?;
        self.stats.opaque_dirs += 1;
        Ok(())
    }

    /// Owner, then mode (chown clears setuid/setgid), then xattrs, on an open fd.
    fn set_attrs_fd(&self, raw: &[u8], fd: &OwnedFd, meta: &Meta) -> Result<(), ImageError> {
        fchown(
            fd,
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
        )
        .map_err(|e| self.io_err(raw, "chowning", e))?;
        fchmod(fd, Mode::from_raw_mode(meta.mode)).map_err(|e| self.io_err(raw, "chmoding", e))?;
        for (key, value) in &meta.xattrs {
            match fsetxattr(fd.as_fd(), key.as_str(), value, XattrFlags::empty()) {
                // Xattrs are best effort: a filesystem without them still gets the files.
                Ok(()) | Err(Errno::OPNOTSUPP) => {}
                Err(e) => return Err(self.io_err(raw, &format!("setting xattr {key} on"), e)),
            }
        }
        Ok(())
    }

    /// Owner, mode (devices only: symlink modes do not exist on Linux) and times by name,
    /// never following a symlink.
    fn set_attrs_at(
        &self,
        raw: &[u8],
        parent: &OwnedFd,
        name: &OsStr,
        meta: &Meta,
        chmod: bool,
    ) -> Result<(), ImageError> {
        chownat(
            parent,
            name,
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| self.io_err(raw, "chowning", e))?;
        if chmod {
            // fchmodat cannot refuse symlinks on Linux, but this name was just created as
            // a device node by us, and nothing else writes to the tree.
            chmodat(
                parent,
                name,
                Mode::from_raw_mode(meta.mode),
                AtFlags::empty(),
            )
            .map_err(|e| self.io_err(raw, "chmoding", e))?;
        }
        utimensat(parent, name, &times(meta.mtime), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| self.io_err(raw, "setting times of", e))?;
        Ok(())
    }

    fn finish_dir_times(&self) -> Result<(), ImageError> {
        for (comps, mtime) in &self.dir_times {
            let raw = comps.join(&b'/');
            // A directory replaced by a later entry of the layer has nothing to restore.
            if let Ok(fd) = self.open_dir(&raw, comps, Missing::Fail) {
                futimens(&fd, &times(*mtime))
                    .map_err(|e| self.io_err(&raw, "setting times of", e))?;
            }
        }
        Ok(())
    }
}

fn times(mtime: i64) -> Timestamps {
    let t = Timespec {
        tv_sec: mtime,
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::sha256_digest;
    use crate::layout::tests::make_layout;
    use crate::layout::{MEDIA_TYPE_LAYER_GZIP, MEDIA_TYPE_LAYER_TAR};
    use std::io::Write;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

    /// A tar builder that can also write names the `tar` crate refuses (`..`, absolute).
    struct T(tar::Builder<Vec<u8>>);

    impl T {
        fn new() -> Self {
            T(tar::Builder::new(Vec::new()))
        }
        fn header(kind: tar::EntryType, name: &str, mode: u32, size: u64) -> tar::Header {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_size(size);
            h.set_mtime(1_000_000);
            h.set_uid(0);
            h.set_gid(0);
            let bytes = name.as_bytes();
            let field = &mut h.as_old_mut().name;
            field.fill(0);
            field[..bytes.len()].copy_from_slice(bytes);
            h.set_cksum();
            h
        }
        fn file(mut self, name: &str, data: &[u8]) -> Self {
            let h = Self::header(tar::EntryType::Regular, name, 0o644, data.len() as u64);
            self.0.append(&h, data).unwrap();
            self
        }
        fn file_owned(mut self, name: &str, mode: u32, uid: u64, data: &[u8]) -> Self {
            let mut h = Self::header(tar::EntryType::Regular, name, mode, data.len() as u64);
            h.set_uid(uid);
            h.set_gid(uid + 1);
            h.set_cksum();
            self.0.append(&h, data).unwrap();
            self
        }
        fn dir(mut self, name: &str) -> Self {
            let h = Self::header(tar::EntryType::Directory, name, 0o755, 0);
            self.0.append(&h, io::empty()).unwrap();
            self
        }
        fn link(mut self, kind: tar::EntryType, name: &str, target: &str) -> Self {
            let mut h = Self::header(kind, name, 0o777, 0);
            h.set_link_name_literal(target).unwrap();
            h.set_cksum();
            self.0.append(&h, io::empty()).unwrap();
            self
        }
        fn finish(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }
    }

    fn scratch() -> tempfile::TempDir {
        // tmpfs supports trusted.* xattrs for root, which the opaque marker needs.
        tempfile::Builder::new()
            .prefix("keel-unpack-")
            .tempdir_in("/dev/shm")
            .unwrap()
    }

    fn layer_file(dir: &Path, name: &str, data: &[u8], media_type: &str) -> Layer {
        let path = dir.join(name);
        fs::write(&path, data).unwrap();
        Layer {
            digest: sha256_digest(data),
            media_type: media_type.to_owned(),
            path,
        }
    }

    fn unpack_bytes(
        tmp: &Path,
        name: &str,
        tar: &[u8],
    ) -> (PathBuf, Result<UnpackStats, ImageError>) {
        let layer = layer_file(tmp, &format!("{name}.tar"), tar, MEDIA_TYPE_LAYER_TAR);
        let dest = tmp.join(name);
        fs::create_dir(&dest).unwrap();
        let r = unpack_layer(&layer, &dest);
        (dest, r)
    }

    fn is_whiteout(p: &Path) -> bool {
        let m = fs::symlink_metadata(p).unwrap();
        m.file_type().is_char_device() && m.rdev() == 0
    }

    fn opaque(p: &Path) -> Option<Vec<u8>> {
        let mut buf = [0u8; 16];
        rustix::fs::getxattr(p, OPAQUE_XATTR, &mut buf[..])
            .ok()
            .map(|n| buf[..n].to_vec())
    }

    #[test]
    fn whiteouts_and_opaque_dirs() {
        let tmp = scratch();
        let l1 = T::new().file("a", b"A").dir("d").file("d/x", b"X").finish();
        let l2 = T::new()
            .file(".wh.a", b"")
            .dir("d")
            .file("d/.wh..wh..opq", b"")
            .file("d/y", b"Y")
            .file(".wh..wh.plnk/123", b"junk")
            .finish();
        let gz = {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&l2).unwrap();
            e.finish().unwrap()
        };
        let (d1, r1) = unpack_bytes(tmp.path(), "l1", &l1);
        let s1 = r1.unwrap();
        assert_eq!((s1.files, s1.dirs), (2, 1));
        assert_eq!(fs::read(d1.join("d/x")).unwrap(), b"X");

        let layer2 = layer_file(tmp.path(), "l2.tgz", &gz, MEDIA_TYPE_LAYER_GZIP);
        let d2 = tmp.path().join("l2");
        fs::create_dir(&d2).unwrap();
        let s2 = unpack_layer(&layer2, &d2).unwrap();
        assert_eq!(s2.whiteouts, 1);
        assert_eq!(s2.opaque_dirs, 1);
        assert!(is_whiteout(&d2.join("a")));
        assert_eq!(opaque(&d2.join("d")).as_deref(), Some(&b"y"[..]));
        assert_eq!(fs::read(d2.join("d/y")).unwrap(), b"Y");
        assert!(!d2.join("d/.wh..wh..opq").exists());
        assert!(!d2.join(".wh.a").exists());
        assert!(fs::symlink_metadata(d2.join(".wh..wh.plnk")).is_err());
        assert!(opaque(&d1.join("d")).is_none());
    }

    #[test]
    fn owners_are_shifted_into_a_user_namespace_range() {
        let tmp = scratch();
        let bytes = T::new()
            .dir("d")
            .file_owned("d/f", 0o644, 1000, b"F")
            .finish();
        let layer = layer_file(tmp.path(), "l.tar", &bytes, MEDIA_TYPE_LAYER_TAR);
        let dest = tmp.path().join("shifted");
        fs::create_dir(&dest).unwrap();
        let shift = IdShift {
            uid: 100_000,
            gid: 200_000,
            size: 65_536,
        };
        unpack_layer_shifted(&layer, &dest, Some(shift)).unwrap();
        let d = fs::symlink_metadata(dest.join("d")).unwrap();
        assert_eq!((d.uid(), d.gid()), (100_000, 200_000));
        let f = fs::symlink_metadata(dest.join("d/f")).unwrap();
        assert_eq!((f.uid(), f.gid()), (101_000, 201_001));

        // An owner the namespace cannot map is refused, not silently squashed.
        let narrow = tmp.path().join("narrow");
        fs::create_dir(&narrow).unwrap();
        let e = unpack_layer_shifted(
            &layer,
            &narrow,
            Some(IdShift {
                size: 1000,
                ..shift
            }),
        )
        .unwrap_err();
        assert!(e.to_string().contains("outside the user namespace"), "{e}");
    }

    #[test]
    fn keeps_modes_owners_times_links_and_devices() {
        let tmp = scratch();
        let mut t = T::new()
            .file_owned("bin/su", 0o4755, 1000, b"suid")
            .link(tar::EntryType::Symlink, "bin/sh", "busybox")
            .link(tar::EntryType::Link, "bin/su2", "bin/su");
        let mut h = T::header(tar::EntryType::Char, "dev/null", 0o666, 0);
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        h.set_cksum();
        t.0.append(&h, io::empty()).unwrap();
        let (d, r) = unpack_bytes(tmp.path(), "l", &t.finish());
        let s = r.unwrap();
        assert_eq!((s.files, s.symlinks, s.hardlinks, s.devices), (1, 1, 1, 1));
        let su = fs::metadata(d.join("bin/su")).unwrap();
        assert_eq!(su.permissions().mode() & 0o7777, 0o4755);
        assert_eq!((su.uid(), su.gid()), (1000, 1001));
        assert_eq!(su.mtime(), 1_000_000);
        assert_eq!(
            fs::read_link(d.join("bin/sh")).unwrap(),
            Path::new("busybox")
        );
        assert_eq!(fs::metadata(d.join("bin/su2")).unwrap().ino(), su.ino());
        let null = fs::symlink_metadata(d.join("dev/null")).unwrap();
        assert!(null.file_type().is_char_device());
        assert_eq!(null.rdev(), makedev(1, 3));
        assert_eq!(null.permissions().mode() & 0o7777, 0o666);
    }

    #[test]
    fn refuses_escapes() {
        let tmp = scratch();
        let outside = tmp.path().join("evil");

        let (_, r) = unpack_bytes(tmp.path(), "up", &T::new().file("../evil", b"x").finish());
        assert!(matches!(r, Err(ImageError::UnsafePath { .. })), "{r:?}");
        assert!(!outside.exists());

        let (d, r) = unpack_bytes(
            tmp.path(),
            "deep",
            &T::new().file("a/../../evil", b"x").finish(),
        );
        assert!(matches!(r, Err(ImageError::UnsafePath { .. })), "{r:?}");
        assert!(!outside.exists());
        assert!(!d.join("a").exists() || fs::read_dir(d.join("a")).unwrap().next().is_none());

        // Absolute names are taken relative to the layer root.
        let (d, r) = unpack_bytes(tmp.path(), "abs", &T::new().file("/abs", b"x").finish());
        r.unwrap();
        assert_eq!(fs::read(d.join("abs")).unwrap(), b"x");

        let target = tmp.path().join("target");
        fs::create_dir(&target).unwrap();
        let evil = T::new()
            .link(tar::EntryType::Symlink, "s", target.to_str().unwrap())
            .file("s/passwd", b"pwned")
            .finish();
        let (_, r) = unpack_bytes(tmp.path(), "sym", &evil);
        match r {
            Err(e @ ImageError::UnsafePath { .. }) => {
                assert!(
                    e.to_string()
                        .contains("path escapes layer root via symlink")
                )
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(!target.join("passwd").exists());

        let evil_link = T::new().link(tar::EntryType::Link, "h", "../evil").finish();
        let (_, r) = unpack_bytes(tmp.path(), "hard", &evil_link);
        assert!(matches!(r, Err(ImageError::UnsafePath { .. })), "{r:?}");

        fs::write(target.join("secret"), b"s").unwrap();
        let via_symlink = T::new()
            .link(tar::EntryType::Symlink, "s", target.to_str().unwrap())
            .link(tar::EntryType::Link, "h", "s/secret")
            .finish();
        let (d, r) = unpack_bytes(tmp.path(), "hard2", &via_symlink);
        assert!(matches!(r, Err(ImageError::UnsafePath { .. })), "{r:?}");
        assert!(!d.join("h").exists());
    }

    #[test]
    fn digest_mismatch_and_unpack_image() {
        let tmp = scratch();
        let l1 = T::new().file("etc/hostname", b"keel\n").finish();
        let l2 = T::new().file(".wh.etc", b"").finish();
        let layout = tmp.path().join("layout");
        make_layout(
            &layout,
            &[
                (MEDIA_TYPE_LAYER_TAR, l1.clone()),
                (MEDIA_TYPE_LAYER_TAR, l2.clone()),
            ],
            &[sha256_digest(&l1), sha256_digest(&l2)],
        );
        let img = ImageLayout::open(&layout).unwrap();
        let store = tmp.path().join("store");
        let dirs = unpack_image(&img, &store).unwrap();
        assert_eq!(dirs.len(), 2);
        assert_eq!(dirs[0], store.join(&sha256_digest(&l1)[7..]));
        assert_eq!(fs::read(dirs[0].join("etc/hostname")).unwrap(), b"keel\n");
        assert!(is_whiteout(&dirs[1].join("etc")));

        // Existing layer dirs are reused as they are.
        fs::write(dirs[0].join("marker"), b"").unwrap();
        assert_eq!(unpack_image(&img, &store).unwrap(), dirs);
        assert!(dirs[0].join("marker").exists());

        // A corrupted blob is detected, and leaves neither the layer nor the tmp dir.
        fs::remove_dir_all(&store).unwrap();
        let mut bad = l1.clone();
        let pos = bad.windows(5).position(|w| w == b"keel\n").unwrap();
        bad[pos] = b'K';
        fs::write(&img.layers()[0].path, &bad).unwrap();
        let r = unpack_image(&img, &store);
        assert!(matches!(r, Err(ImageError::DigestMismatch { .. })), "{r:?}");
        let left: Vec<_> = fs::read_dir(&store).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn whiteout_and_entry_in_the_same_layer() {
        let tmp = scratch();
        // Whiteout then directory: the directory must hide the lower one (opaque).
        // Directory then whiteout: likewise. File then whiteout: the file stays.
        let t = T::new()
            .file(".wh.d1", b"")
            .dir("d1")
            .dir("d2")
            .file(".wh.d2", b"")
            .file("f", b"kept")
            .file(".wh.f", b"")
            .finish();
        let (d, r) = unpack_bytes(tmp.path(), "l", &t);
        let s = r.unwrap();
        assert_eq!(s.whiteouts, 3);
        assert!(fs::symlink_metadata(d.join("d1")).unwrap().is_dir());
        assert_eq!(opaque(&d.join("d1")).as_deref(), Some(&b"y"[..]));
        assert_eq!(opaque(&d.join("d2")).as_deref(), Some(&b"y"[..]));
        assert_eq!(fs::read(d.join("f")).unwrap(), b"kept");

        // A later entry replaces an earlier one of another type.
        let t = T::new()
            .dir("x")
            .file("x/inner", b"1")
            .file("x", b"now a file")
            .link(tar::EntryType::Symlink, "y", "x")
            .file("y", b"regular")
            .finish();
        let (d, r) = unpack_bytes(tmp.path(), "replace", &t);
        r.unwrap();
        assert_eq!(fs::read(d.join("x")).unwrap(), b"now a file");
        assert!(fs::symlink_metadata(d.join("y")).unwrap().is_file());

        for (i, bad) in [".wh.", "a/.wh..", ".wh.x/y"].into_iter().enumerate() {
            let (_, r) = unpack_bytes(
                tmp.path(),
                &format!("bad{i}"),
                &T::new().file(bad, b"").finish(),
            );
            assert!(
                matches!(r, Err(ImageError::BadEntry { .. })),
                "{bad}: {r:?}"
            );
        }
        let (_, r) = unpack_bytes(
            tmp.path(),
            "dangling",
            &T::new().link(tar::EntryType::Link, "h", "missing").finish(),
        );
        assert!(matches!(r, Err(ImageError::Io { .. })), "{r:?}");
    }

    #[cfg(feature = "builder")]
    #[test]
    fn zstd_layers_with_several_frames() {
        let tmp = scratch();
        let a = T::new().file("a", b"first frame").finish();
        let b = T::new().file("b", b"second frame").finish();
        // Two independent frames: the first tar's end-of-archive blocks end the stream
        // for tar, and the second frame must still be read and hashed.
        let mut blob = zstd::stream::encode_all(&a[..], 3).unwrap();
        blob.extend(zstd::stream::encode_all(&b[..], 3).unwrap());
        let layer = layer_file(
            tmp.path(),
            "l.zst",
            &blob,
            crate::layout::MEDIA_TYPE_LAYER_ZSTD,
        );
        let dest = tmp.path().join("z");
        fs::create_dir(&dest).unwrap();
        unpack_layer(&layer, &dest).unwrap();
        assert_eq!(fs::read(dest.join("a")).unwrap(), b"first frame");

        let mut truncated = blob.clone();
        truncated.truncate(blob.len() - 3);
        let layer = layer_file(
            tmp.path(),
            "t.zst",
            &truncated,
            crate::layout::MEDIA_TYPE_LAYER_ZSTD,
        );
        let dest = tmp.path().join("t");
        fs::create_dir(&dest).unwrap();
        assert!(unpack_layer(&layer, &dest).is_err());
    }

    #[test]
    fn refuses_non_empty_destination() {
        let tmp = scratch();
        let layer = layer_file(
            tmp.path(),
            "l.tar",
            &T::new().file("a", b"").finish(),
            MEDIA_TYPE_LAYER_TAR,
        );
        let dest = tmp.path().join("full");
        fs::create_dir(&dest).unwrap();
        fs::write(dest.join("old"), b"").unwrap();
        assert!(matches!(
            unpack_layer(&layer, &dest),
            Err(ImageError::BadSource { .. })
        ));
    }

    #[test]
    fn overlayfs_honours_the_unpacked_layers() {
        let tmp = scratch();
        let l1 = T::new()
            .file("a", b"A")
            .dir("d")
            .file("d/x", b"X")
            .file("keep", b"K")
            .finish();
        let l2 = T::new()
            .file(".wh.a", b"")
            .dir("d")
            .file("d/.wh..wh..opq", b"")
            .file("d/y", b"Y")
            .finish();
        let layout = tmp.path().join("layout");
        make_layout(
            &layout,
            &[
                (MEDIA_TYPE_LAYER_TAR, l1.clone()),
                (MEDIA_TYPE_LAYER_TAR, l2.clone()),
            ],
            &[sha256_digest(&l1), sha256_digest(&l2)],
        );
        let dirs = unpack_image(
            &ImageLayout::open(&layout).unwrap(),
            &tmp.path().join("store"),
        )
        .unwrap();
        let lower = format!("lowerdir={}:{}", dirs[1].display(), dirs[0].display());
        let data = std::ffi::CString::new(lower).unwrap();
        let merged = tmp.path().join("merged");
        fs::create_dir(&merged).unwrap();
        if let Err(e) = rustix::mount::mount(
            "overlay",
            &merged,
            "overlay",
            rustix::mount::MountFlags::RDONLY,
            data.as_c_str(),
        ) {
            eprintln!("cannot mount overlayfs here ({e}); skipping");
            return;
        }
        let names = |p: &Path| {
            let mut v: Vec<String> = fs::read_dir(p)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        let top = names(&merged);
        let inner = names(&merged.join("d"));
        rustix::mount::unmount(&merged, rustix::mount::UnmountFlags::empty()).unwrap();
        assert_eq!(top, ["d", "keep"]);
        assert_eq!(inner, ["y"]);
    }

    #[test]
    fn normalize_rules() {
        assert_eq!(
            normalize(b"./a//b/").unwrap(),
            vec![b"a".to_vec(), b"b".to_vec()]
        );
        assert_eq!(normalize(b"/a/../b").unwrap(), vec![b"b".to_vec()]);
        assert!(normalize(b"./").unwrap().is_empty());
        assert!(normalize(b"a/../..").is_err());
    }
}
