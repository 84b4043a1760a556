//! Layer extraction for overlayfs, the "overlay-native" way (containerd's
//! `OverlayConvertWhiteout`).
//!
//! Each layer is extracted into its own directory, and the caller stacks those directories
//! as overlay `lowerdir`s (upper layers first). OCI whiteouts are therefore translated
//! into what overlayfs itself uses: `dir/.wh.name` becomes a 0/0 character device at
//! `dir/name`, and `dir/.wh..wh..opq` becomes `trusted.overlay.opaque=y` on `dir`.
//! Extraction needs root (chown, mknod, trusted xattrs).
//!
//! # Hostile layers
//!
//! Layers are treated as hostile; nothing an entry says can make extraction write outside
//! the layer directory. Names are first normalised lexically, then every directory is
//! opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS |
//! RESOLVE_NO_XDEV)` from the layer root's file descriptor, so the kernel itself refuses
//! any path that would leave the layer, go through a symlink or cross a mount (kernels
//! without `openat2` get the same walk one component at a time with `O_NOFOLLOW`). The
//! last component is only ever touched with `*at` calls on the parent directory that do
//! not follow it (`O_CREAT|O_EXCL|O_NOFOLLOW`, `mkdirat`, `symlinkat`, `mknodat`,
//! `linkat` without `AT_SYMLINK_FOLLOW`, `unlinkat`). The rules, class by class:
//!
//! - **Names.** A leading `/` is dropped (absolute names are relative to the layer root)
//!   and `.` and empty components are ignored. `..` is resolved lexically, as Docker and
//!   containerd do: in an absolute name it stops at the root, like `/..` does in POSIX; in
//!   a relative name, climbing above the root is refused ([`ImageError::UnsafePath`]).
//!   `..` in the middle (`a/../b`) is fine and means `b`. Names are kept as bytes: invalid
//!   UTF-8 is written as it is, since Linux and overlayfs names are bytes (errors show it
//!   escaped). A NUL byte, a component longer than 255 bytes (`NAME_MAX`) or a name longer
//!   than 4095 bytes (`PATH_MAX`) is refused; so is a path through a `.wh.` component.
//! - **Symlinks** are data: a symlink may point anywhere (absolute, climbing, dangling)
//!   and is created as it is, but it is never followed. An entry whose parent path goes
//!   through a symlink (`link/file`, `link/.wh.x`, `link/.wh..wh..opq`, a hard link
//!   target `link/file`) is refused, even when the symlink would stay inside the layer:
//!   layer producers never emit such names. An entry that *replaces* a symlink removes the
//!   symlink first and never writes through it.
//! - **Hard links** must name an existing non-directory entry of the same layer, by a
//!   path under the same rules (absolute = layer-relative, no climbing, no symlinks on
//!   the way). A hard link to a symlink links the symlink itself. The link's own header
//!   (owner, mode) is not applied, so it cannot change the target's attributes.
//! - **Whiteouts** (`.wh.NAME`, whatever the entry's type, its content ignored) become a
//!   0/0 character device `NAME`. `.wh.` with an empty name, `.wh..` (the directory itself
//!   or, at the top, the root) and `.wh...` (the parent) are refused. Per the OCI spec a
//!   whiteout only hides lower layers: if this layer also has `NAME` the entry is kept
//!   (a directory becomes opaque). An implicit parent over a whiteout (`.wh.d` then `d/f`
//!   without a `d/` entry) becomes an opaque directory.
//! - **Opaque markers** (`.wh..wh..opq`) mark their directory `trusted.overlay.opaque=y`
//!   wherever they appear, whatever their type; a content is read and discarded. At the
//!   top they mark the layer root, which overlayfs ignores on a lower layer: whoever
//!   stacks the layers must leave out those below it ([`root_is_opaque`]). Other
//!   `.wh..wh.*` names (aufs bookkeeping such as `.wh..wh.plnk/`) and everything under
//!   them are skipped. Overlay xattrs carried in the
//!   layer itself (`trusted.overlay.*`, `user.overlay.*` PAX records) are dropped, so a
//!   layer cannot forge opaque directories, redirects or metacopy; other `SCHILY.xattr.*`
//!   records are applied to files and directories where the filesystem supports them.
//! - **Duplicates**: a later entry replaces an earlier one (removing it, a directory with
//!   its whole subtree), except that a directory over a directory merges and takes the
//!   later attributes; a hard link to itself is refused. An entry whose parent is not a
//!   directory (a file, a device) is refused rather than replacing it.
//! - **Device nodes and FIFOs** are created as the layer says, inside the layer, like
//!   Docker and containerd do; a literal 0/0 character device is, in overlay form, a
//!   whiteout. They are inert in containers because the supervisor mounts unprivileged
//!   container roots `nodev` (only privileged containers can use them, as in Docker).
//! - **Modes** are kept whole, setuid, setgid and sticky bits included (owners are set
//!   before modes, since chown clears setuid). Owners may be shifted into a user
//!   namespace's range ([`IdShift`]); an owner outside the range is refused.

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{
    AtFlags, FileType, Gid, Mode, OFlags, ResolveFlags, Timespec, Timestamps, Uid, XattrFlags,
    chmodat, chownat, fchmod, fchown, fsetxattr, futimens, linkat, makedev, mkdirat, mknodat,
    openat, openat2, statat, symlinkat, unlinkat, utimensat,
};
use rustix::io::Errno;

use crate::ImageError;
use crate::digest::HashingReader;
use crate::layout::{Layer, decompress};
use crate::remove_tree::remove_tree;
use crate::unpack_limits::{CountingReader, TarGuard, UnpackLimits};

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
const WHITEOUT_OPAQUE: &[u8] = b".wh..wh..opq";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const PAX_XATTR_PREFIX: &str = "SCHILY.xattr.";

/// Longest name component Linux accepts.
const NAME_MAX: usize = 255;
/// Longest path (without its NUL) Linux accepts; also bounds the depth of a layer's tree.
const PATH_MAX: usize = 4095;

/// How a new regular file is created: never over or through anything that exists.
pub const NEW_FILE_FLAGS: OFlags = OFlags::WRONLY
    .union(OFlags::CREATE)
    .union(OFlags::EXCL)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// How every directory is opened: never through or onto a symlink.
pub const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);
/// The kernel-enforced containment of every directory lookup below the layer root.
const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

/// Cleared the first time `openat2` turns out to be missing (Linux < 5.6, or hidden by a
/// seccomp filter); lookups then walk one component at a time with `O_NOFOLLOW`.
static HAVE_OPENAT2: AtomicBool = AtomicBool::new(true);

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
    /// Bytes of the decompressed tar stream, headers included: what counts against
    /// [`UnpackLimits::max_unpacked_bytes`].
    pub stream_bytes: u64,
}

/// Extracts one layer into `dest`, which must be an existing, empty directory.
///
/// The blob's SHA-256 is computed while it streams and compared with `layer.digest` at
/// the end. On any error (a refused entry, a digest mismatch, a truncated blob) `dest`
/// holds partial, untrusted content that the caller must discard ([`crate::layer_store::unpack_image`] does).
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
    let limits = UnpackLimits::default();
    unpack_into(layer, root, dest, shift, &limits, limits.max_unpacked_bytes)
}

/// Streams `layer` into the directory `root` (shown as `dest` in errors), within `limits`
/// and what is left of the image's `budget` of unpacked bytes.
pub(crate) fn unpack_into(
    layer: &Layer,
    root: OwnedFd,
    dest: &Path,
    shift: Option<IdShift>,
    limits: &UnpackLimits,
    budget: u64,
) -> Result<UnpackStats, ImageError> {
    let expected = layer.digest_hex()?.to_owned();
    let compression = layer.compression()?;
    let file = fs::File::open(&layer.path)
        .map_err(|e| ImageError::io(format!("opening layer {}", layer.path.display()), e))?;
    let compressed = Rc::new(Cell::new(0));
    let mut hashing = HashingReader::new(io::BufReader::new(CountingReader::new(
        file,
        Rc::clone(&compressed),
    )));
    let mut unpacker = Unpacker {
        root,
        shift,
        dest: dest.to_owned(),
        stats: UnpackStats::default(),
        dir_times: HashMap::new(),
    };
    {
        let stream = decompress(compression, &mut hashing)?;
        let guard = TarGuard::new(stream, *limits, budget, compressed);
        let violation = guard.violation();
        // A refusal of the guard is the error to report, not what the tar reader made of it.
        let read_error = |e: io::Error| match violation.borrow().as_ref() {
            Some(reason) => ImageError::LimitExceeded {
                layer: layer.digest.clone(),
                reason: reason.clone(),
            },
            None => ImageError::io(format!("reading layer {}", layer.digest), e),
        };
        let mut archive = tar::Archive::new(guard);
        let entries = archive.entries().map_err(read_error)?;
        for entry in entries {
            let entry = entry.map_err(read_error)?;
            unpacker
                .apply(entry)
                .map_err(|e| match violation.borrow().as_ref() {
                    Some(reason) => ImageError::LimitExceeded {
                        layer: layer.digest.clone(),
                        reason: reason.clone(),
                    },
                    None => e,
                })?;
        }
        // Drain the decoder too: trailing zero blocks and the compression trailer are part
        // of the blob, and a truncated compressed stream must fail here.
        let mut rest = archive.into_inner();
        io::copy(&mut rest, &mut io::sink()).map_err(read_error)?;
        unpacker.stats.stream_bytes = rest.total();
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

/// Whether the root of the unpacked layer `layer_dir` is opaque (the layer has a
/// `.wh..wh..opq` at its top, hiding everything below it). overlayfs ignores the opaque
/// xattr on a lower layer's root, so whoever stacks the layers must leave out every layer
/// below one whose root is opaque.
pub fn root_is_opaque(layer_dir: &Path) -> bool {
    let mut value = [0u8; 1];
    matches!(rustix::fs::lgetxattr(layer_dir, OPAQUE_XATTR, &mut value[..]), Ok(1) if value == *b"y")
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

/// An entry name for messages: as it is when it is UTF-8, escaped otherwise.
fn display(raw: &[u8]) -> String {
    match std::str::from_utf8(raw) {
        Ok(s) => s.to_owned(),
        Err(_) => raw.escape_ascii().to_string(),
    }
}

/// Splits a tar path into normal components (see the module documentation): a leading
/// `/` is dropped, `.` is skipped, and `..` pops a component; it may climb above the root
/// only in an absolute name, where it stays at the root as in POSIX.
fn normalize(raw: &[u8]) -> Result<Vec<Vec<u8>>, ImageError> {
    let absolute = raw.first() == Some(&b'/');
    let mut out: Vec<Vec<u8>> = Vec::new();
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                if out.pop().is_none() && !absolute {
                    return Err(ImageError::UnsafePath {
                        path: display(raw),
                        reason: "path climbs above the layer root via ..",
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
                if c.len() > NAME_MAX {
                    return Err(ImageError::BadEntry {
                        path: display(raw),
                        reason: format!(
                            "a name component is {} bytes, longer than NAME_MAX ({NAME_MAX})",
                            c.len()
                        ),
                    });
                }
                out.push(c.to_vec());
            }
        }
    }
    let len: usize = out.iter().map(|c| c.len() + 1).sum();
    if len > PATH_MAX {
        return Err(ImageError::BadEntry {
            path: display(raw),
            reason: format!("path is {len} bytes, longer than PATH_MAX ({PATH_MAX})"),
        });
    }
    Ok(out)
}

fn os(c: &[u8]) -> &OsStr {
    OsStr::from_bytes(c)
}

fn errno_io(e: Errno) -> io::Error {
    e.into()
}

fn file_type_at(dir: &OwnedFd, name: &OsStr) -> Result<Option<(FileType, u64)>, Errno> {
    match statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some((FileType::from_raw_mode(st.st_mode), st.st_rdev))),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Opens the directory `path` (normalised, relative) below `dir`, never leaving `dir`,
/// never through a symlink and never across a mount point.
fn open_beneath(dir: BorrowedFd<'_>, path: &[u8]) -> Result<OwnedFd, Errno> {
    let path = if path.is_empty() { b"." } else { path };
    if HAVE_OPENAT2.load(Ordering::Relaxed) {
        match openat2(dir, os(path), DIR_FLAGS, Mode::empty(), RESOLVE) {
            Err(Errno::NOSYS) => HAVE_OPENAT2.store(false, Ordering::Relaxed),
            other => return other,
        }
    }
    // One component at a time with O_NOFOLLOW, the same containment for old kernels.
    let mut cur: Option<OwnedFd> = None;
    for comp in path.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => continue,
            b".." => return Err(Errno::XDEV),
            _ => {}
        }
        let base = match &cur {
            Some(fd) => fd.as_fd(),
            None => dir,
        };
        let next = openat(base, os(comp), DIR_FLAGS, Mode::empty())?;
        cur = Some(next);
    }
    match cur {
        Some(fd) => Ok(fd),
        None => openat(dir, ".", DIR_FLAGS, Mode::empty()),
    }
}

impl Unpacker {
    fn io_err(&self, path: &[u8], what: &str, e: Errno) -> ImageError {
        ImageError::io(
            format!("{what} {:?} in {}", display(path), self.dest.display()),
            errno_io(e),
        )
    }

    /// Opens the directory `comps` below the root (kernel-enforced containment, see
    /// [`open_beneath`]), creating missing directories with `Missing::Create`.
    fn open_dir(
        &mut self,
        raw: &[u8],
        comps: &[Vec<u8>],
        missing: Missing,
    ) -> Result<OwnedFd, ImageError> {
        // The common case in one lookup; any failure is retried step by step below, which
        // creates what is missing and names precisely what is wrong.
        if let Ok(fd) = open_beneath(self.root.as_fd(), &comps.join(&b'/')) {
            return Ok(fd);
        }
        let mut cur = open_beneath(self.root.as_fd(), b".")
            .map_err(|e| self.io_err(raw, "opening root for", e))?;
        for comp in comps {
            let name = os(comp);
            let next =
                match open_beneath(cur.as_fd(), comp) {
                    Ok(fd) => fd,
                    Err(Errno::NOENT) if missing == Missing::Create => {
                        // Layers may omit parent directories; tar and containerd create them.
                        let created = match mkdirat(&cur, name, Mode::from_raw_mode(0o755)) {
                            Ok(()) => true,
                            Err(Errno::EXIST) => false,
                            Err(e) => return Err(self.io_err(raw, "creating parent of", e)),
                        };
                        let fd = open_beneath(cur.as_fd(), comp)
                            .map_err(|e| self.check_component(raw, &cur, name, e))?;
                        if created {
                            self.init_implicit_dir(raw, &fd)?;
                        }
                        fd
                    }
                    Err(e @ Errno::NOTDIR)
                        if missing == Missing::Create
                            && file_type_at(&cur, name).ok().flatten().is_some_and(
                                |(ft, rdev)| ft == FileType::CharacterDevice && rdev == 0,
                            ) =>
                    {
                        // `.wh.d` then `d/f` with no `d/` entry: the implicit directory
                        // replaces the whiteout and must still hide the lower `d`.
                        unlinkat(&cur, name, AtFlags::empty())
                            .map_err(|_| self.check_component(raw, &cur, name, e))?;
                        mkdirat(&cur, name, Mode::from_raw_mode(0o755))
                            .map_err(|e| self.io_err(raw, "creating parent of", e))?;
                        let fd = open_beneath(cur.as_fd(), comp)
                            .map_err(|e| self.check_component(raw, &cur, name, e))?;
                        self.init_implicit_dir(raw, &fd)?;
                        self.set_opaque(raw, &fd)?;
                        fd
                    }
                    Err(e) => return Err(self.check_component(raw, &cur, name, e)),
                };
            cur = next;
        }
        Ok(cur)
    }

    /// A directory the layer implies but does not list: 0755, owned by the (shifted) root.
    fn init_implicit_dir(&self, raw: &[u8], fd: &OwnedFd) -> Result<(), ImageError> {
        let (uid, gid) = self.shift.map_or((0, 0), |s| (s.uid, s.gid));
        fchown(fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
            .map_err(|e| self.io_err(raw, "chowning a parent of", e))?;
        fchmod(fd, Mode::from_raw_mode(0o755))
            .map_err(|e| self.io_err(raw, "chmoding a parent of", e))
    }

    /// Turns a failed component open into a precise error.
    fn check_component(&self, raw: &[u8], dir: &OwnedFd, name: &OsStr, e: Errno) -> ImageError {
        match file_type_at(dir, name) {
            Ok(Some((FileType::Symlink, _))) => ImageError::UnsafePath {
                path: display(raw),
                reason: "a parent directory is a symlink, which extraction never follows",
            },
            Ok(Some((ft, _))) if ft != FileType::Directory => ImageError::BadEntry {
                path: display(raw),
                reason: "a parent component is not a directory".into(),
            },
            _ if e == Errno::XDEV => ImageError::UnsafePath {
                path: display(raw),
                reason: "path leaves the layer or crosses a mount point",
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
            let root = open_beneath(self.root.as_fd(), b".")
                .map_err(|e| self.io_err(&raw, "opening", e))?;
            self.set_attrs_fd(&raw, &root, &meta)?;
            self.dir_times.insert(Vec::new(), meta.mtime);
            self.stats.dirs += 1;
            return Ok(());
        };

        if name == WHITEOUT_OPAQUE {
            // Whatever the entry's type; a content is skipped by the tar reader.
            let dir = self.open_dir(&raw, &comps, Missing::Create)?;
            self.set_opaque(&raw, &dir)?;
            return Ok(());
        }
        if let Some(target) = name.strip_prefix(WHITEOUT_PREFIX) {
            let parent = self.open_dir(&raw, &comps, Missing::Create)?;
            return self.whiteout(&raw, &parent, target, &meta);
        }

        let parent = self.open_dir(&raw, &comps, Missing::Create)?;
        let os_name = os(&name);
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                self.clear_slot(&raw, &parent, os_name, false)?;
                let fd = openat(&parent, os_name, NEW_FILE_FLAGS, Mode::from_raw_mode(0o600))
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
                let replaced_whiteout = self.clear_slot(&raw, &parent, os_name, true)?;
                match mkdirat(&parent, os_name, Mode::from_raw_mode(0o700)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(self.io_err(&raw, "creating directory", e)),
                }
                let fd = open_beneath(parent.as_fd(), &name)
                    .map_err(|e| self.check_component(&raw, &parent, os_name, e))?;
                self.set_attrs_fd(&raw, &fd, &meta)?;
                if replaced_whiteout {
                    // Whiteout then directory in one layer: the new directory must still
                    // hide whatever the lower layers had at this path.
                    self.set_opaque(&raw, &fd)?;
                }
                comps.push(name);
                self.dir_times.insert(comps, meta.mtime);
                self.stats.dirs += 1;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| ImageError::BadEntry {
                        path: display(&raw),
                        reason: "symlink without target".into(),
                    })?
                    .into_owned();
                let bad = |reason: &str| ImageError::BadEntry {
                    path: display(&raw),
                    reason: reason.into(),
                };
                if target.is_empty() {
                    return Err(bad("symlink with an empty target"));
                }
                if target.contains(&0) {
                    return Err(bad("NUL byte in symlink target"));
                }
                if target.len() > PATH_MAX {
                    return Err(bad("symlink target longer than PATH_MAX"));
                }
                self.clear_slot(&raw, &parent, os_name, false)?;
                // The target is data: stored as it is, never resolved.
                symlinkat(os(&target), &parent, os_name)
                    .map_err(|e| self.io_err(&raw, "creating symlink", e))?;
                self.set_attrs_at(&raw, &parent, os_name, &meta, false)?;
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
                self.hard_link(&raw, &comps, &name, &parent, &target_raw)?;
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
                self.clear_slot(&raw, &parent, os_name, false)?;
                mknodat(
                    &parent,
                    os_name,
                    file_type,
                    Mode::from_raw_mode(0o600),
                    makedev(major, minor),
                )
                .map_err(|e| self.io_err(&raw, "creating device", e))?;
                self.set_attrs_at(&raw, &parent, os_name, &meta, true)?;
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

    /// Creates the hard link `parent/name` (whose parent path is `comps`) to `target_raw`.
    fn hard_link(
        &mut self,
        raw: &[u8],
        comps: &[Vec<u8>],
        name: &[u8],
        parent: &OwnedFd,
        target_raw: &[u8],
    ) -> Result<(), ImageError> {
        let mut target = match normalize(target_raw) {
            Ok(t) => t,
            Err(ImageError::UnsafePath { .. }) => {
                return Err(ImageError::UnsafePath {
                    path: display(raw),
                    reason: "hard link target climbs above the layer root",
                });
            }
            Err(ImageError::BadEntry { reason, .. }) => {
                return Err(ImageError::BadEntry {
                    path: display(raw),
                    reason: format!("hard link target: {reason}"),
                });
            }
            Err(e) => return Err(e),
        };
        let bad = |reason: String| ImageError::BadEntry {
            path: display(raw),
            reason,
        };
        if target.len() == comps.len() + 1
            && target[..comps.len()] == *comps
            && target[comps.len()] == name
        {
            return Err(bad("hard link to itself".into()));
        }
        let Some(target_name) = target.pop() else {
            return Err(bad("hard link to the layer root".into()));
        };
        let missing = || {
            bad(format!(
                "hard link target {:?} is not in the layer",
                display(target_raw)
            ))
        };
        let target_dir = self
            .open_dir(raw, &target, Missing::Fail)
            .map_err(|e| match e {
                ImageError::Io { ref source, .. } if source.kind() == io::ErrorKind::NotFound => {
                    missing()
                }
                e => e,
            })?;
        let target_name = os(&target_name);
        match file_type_at(&target_dir, target_name) {
            Ok(Some((FileType::Directory, _))) => {
                return Err(bad("hard link to a directory".into()));
            }
            Ok(Some(_)) => {}
            Ok(None) => return Err(missing()),
            Err(e) => return Err(self.io_err(raw, "inspecting the target of", e)),
        }
        let os_name = os(name);
        self.clear_slot(raw, parent, os_name, false)?;
        // No AT_SYMLINK_FOLLOW: a link to a symlink links the symlink itself.
        linkat(&target_dir, target_name, parent, os_name, AtFlags::empty())
            .map_err(|e| self.io_err(raw, "creating hard link", e))?;
        self.stats.hardlinks += 1;
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
        let Some((ft, rdev)) =
            file_type_at(parent, name).map_err(|e| self.io_err(raw, "inspecting", e))?
        else {
            return Ok(false);
        };
        match ft {
            // Two directories merge: only the attributes of the existing one change.
            FileType::Directory if new_is_dir => Ok(false),
            FileType::Directory => {
                remove_tree(parent, name)
                    .map_err(|e| self.io_err(raw, "replacing directory", e))?;
                Ok(false)
            }
            _ => {
                unlinkat(parent, name, AtFlags::empty())
                    .map_err(|e| self.io_err(raw, "replacing", e))?;
                Ok(ft == FileType::CharacterDevice && rdev == 0)
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
        let reason = match target {
            b"" => Some("whiteout with an empty name"),
            b"." => Some("whiteout of the directory itself (.wh..)"),
            b".." => Some("whiteout of the parent directory (.wh...)"),
            _ => None,
        };
        if let Some(reason) = reason {
            return Err(ImageError::BadEntry {
                path: display(raw),
                reason: reason.into(),
            });
        }
        let name = os(target);
        match file_type_at(parent, name) {
            Ok(Some((ft, _))) => {
                // The same layer also provides this path; the whiteout only hides lower
                // layers. A real file already does that; a directory needs to be opaque.
                if ft == FileType::Directory {
                    let fd = open_beneath(parent.as_fd(), target)
                        .map_err(|e| self.io_err(raw, "opening", e))?;
                    self.set_opaque(raw, &fd)?;
                }
                self.stats.whiteouts += 1;
                Ok(())
            }
            Ok(None) => {
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
            // fchmodat cannot refuse symlinks before Linux 6.6, but this name was just
            // created as a device node by us, in a directory nothing else writes to.
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

    fn finish_dir_times(&mut self) -> Result<(), ImageError> {
        let dir_times: Vec<_> = self.dir_times.drain().collect();
        for (comps, mtime) in dir_times {
            let raw = comps.join(&b'/');
            // A directory replaced by a later entry of the layer has nothing to restore.
            if let Ok(fd) = self.open_dir(&raw, &comps, Missing::Fail) {
                futimens(&fd, &times(mtime))
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
    use crate::layer_store::unpack_image;
    use crate::layout::ImageLayout;
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
                assert!(e.to_string().contains("a parent directory is a symlink"))
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
        assert!(matches!(r, Err(ImageError::BadEntry { .. })), "{r:?}");
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
