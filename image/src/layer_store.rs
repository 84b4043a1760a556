//! The store of unpacked layers (`/var/lib/keel/layers`): the one owner of its layout on
//! disk. A layer lives in a directory named after its digest's hex (`<hex>`, or
//! `<hex>@<uid>-<gid>-<size>` for a copy with owners shifted into a user namespace's range);
//! `.tmp-*` directories are unpacks in progress or interrupted; `l/` holds the short links
//! overlay mounts name layers by. Extraction itself (one tar into one directory) is
//! [`crate::unpack`]'s.
//!
//! # Crash safety
//!
//! [`unpack_image`] extracts every layer into a uniquely named `.tmp-*` directory of the
//! store, verifies the layer digest, syncs the filesystem and only then renames the
//! directory to its digest with `RENAME_NOREPLACE`: a directory named after a digest is
//! therefore always complete and verified, and is reused as it is. `.tmp-*` directories
//! are never trusted. They are removed when an unpack fails, and those left by a crash are
//! swept by the next [`unpack_image`] that finds no other unpack running: unpacks hold a
//! shared `flock` on the store directory, and sweeping takes it exclusively (as should
//! anything else that removes `.tmp-*` directories, such as a garbage collector).
//!
//! [`collect_garbage`] removes what no image needs any more; [`short_lowers`] keeps the
//! short links.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{
    AtFlags, Dir, FileType, FlockOperation, Gid, Mode, RenameFlags, Uid, fchmod, fchown, flock,
    fsync, mkdirat, openat, renameat, renameat_with, statat, syncfs, unlinkat,
};
use rustix::io::Errno;

use crate::ImageError;
use crate::layout::{ImageLayout, Layer};
use crate::remove_tree::remove_tree;
use crate::unpack::{DIR_FLAGS, IdShift, unpack_into};
use crate::unpack_limits::UnpackLimits;

/// Prefix of the store's in-progress (or crashed) layer directories.
const TMP_PREFIX: &str = ".tmp-";
/// Makes temporary directory names unique within the process.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The directory name of `hex`'s layer, unshifted or shifted by `shift`.
fn layer_dir_name(hex: &str, shift: Option<IdShift>) -> String {
    match shift {
        None => hex.to_owned(),
        Some(s) => format!("{hex}@{}-{}-{}", s.uid, s.gid, s.size),
    }
}

/// The digest hex a layer directory's name stands for (without a shift's suffix).
fn layer_of_dir_name(name: &str) -> &str {
    name.split('@').next().unwrap_or(name)
}

/// Unpacks every layer of `layout` into `store_dir/<hex digest>/` (reusing directories
/// that already exist there) and returns the layer directories bottom layer first.
///
/// See the module documentation for how a crash can never leave a directory that is later
/// trusted as a complete layer.
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
    unpack_image_limited(layout, store_dir, shift, &UnpackLimits::default())
}

/// [`unpack_image_shifted`] within `limits`: every layer, and the layers this call unpacks
/// together, stay under `limits.max_unpacked_bytes` (layers already in the store were checked
/// when they were unpacked).
pub fn unpack_image_limited(
    layout: &ImageLayout,
    store_dir: &Path,
    shift: Option<IdShift>,
    limits: &UnpackLimits,
) -> Result<Vec<PathBuf>, ImageError> {
    let mut budget = limits.max_unpacked_bytes;
    let store_io =
        |what: &str, e: Errno| ImageError::io(format!("{what} {}", store_dir.display()), e.into());
    fs::create_dir_all(store_dir)
        .map_err(|e| ImageError::io(format!("creating {}", store_dir.display()), e))?;
    let store = openat(rustix::fs::CWD, store_dir, DIR_FLAGS, Mode::empty())
        .map_err(|e| store_io("opening", e))?;
    // Held until every layer is in place, so that no other unpack sweeps our tmp dirs.
    let _lock = lock_store(&store, store_dir)?;
    let mut dirs = Vec::new();
    // Extracted and verified, not yet renamed into place: (tmp name, final name).
    let mut pending: Vec<(String, String)> = Vec::new();
    for layer in layout.layers() {
        let name = layer_dir_name(layer.digest_hex()?, shift);
        let final_dir = store_dir.join(&name);
        match statat(&store, name.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
            // Only a rename of a complete, verified tmp dir creates a directory by this name.
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                dirs.push(final_dir);
                continue;
            }
            // Not something this module made (a symlink, a file): never trusted.
            Ok(_) => unlinkat(&store, name.as_str(), AtFlags::empty())
                .map_err(|e| store_io(&format!("removing the non-directory {name} in"), e))?,
            Err(Errno::NOENT) => {}
            Err(e) => return Err(store_io(&format!("inspecting {name} in"), e)),
        }
        let tmp = extract_to_tmp(&store, store_dir, &layer, &name, shift, limits, budget);
        match tmp {
            Ok((tmp, stream_bytes)) => {
                budget = budget.saturating_sub(stream_bytes);
                pending.push((tmp, name));
            }
            Err(e) => {
                for (tmp, _) in &pending {
                    let _ = remove_tree(&store, OsStr::new(tmp));
                }
                return Err(e);
            }
        }
        dirs.push(final_dir);
    }
    if pending.is_empty() {
        return Ok(dirs);
    }
    // The renames below must not become durable before the layers' contents do: one sync
    // of the filesystem for all of them (each syncfs also waits for every other writer's
    // data, which on a busy disk costs more than the layers themselves).
    if let Err(e) = syncfs(&store) {
        for (tmp, _) in &pending {
            let _ = remove_tree(&store, OsStr::new(tmp));
        }
        return Err(store_io("syncing", e));
    }
    let mut failure = None;
    for (tmp, name) in &pending {
        if failure.is_some() {
            let _ = remove_tree(&store, OsStr::new(tmp));
            continue;
        }
        if let Err(e) = install_tmp(&store, store_dir, tmp, name) {
            failure = Some(e);
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    fsync(&store).map_err(|e| store_io("syncing the store after renaming into", e))?;
    Ok(dirs)
}

/// The directories of `layout`'s layers (shifted by `shift`), bottom layer first, if every
/// one is already unpacked in `store_dir`; an error naming the first missing layer
/// otherwise. Reads only the store's directory entries: PID 1 checks with this, and leaves
/// the unpacking itself to a process of its own.
pub fn unpacked_layers(
    layout: &ImageLayout,
    store_dir: &Path,
    shift: Option<IdShift>,
) -> Result<Vec<PathBuf>, ImageError> {
    let mut dirs = Vec::new();
    for layer in layout.layers() {
        let dir = store_dir.join(layer_dir_name(layer.digest_hex()?, shift));
        match fs::symlink_metadata(&dir) {
            Ok(meta) if meta.is_dir() => dirs.push(dir),
            _ => {
                return Err(ImageError::NotUnpacked {
                    layer: layer.digest.clone(),
                    store: store_dir.to_owned(),
                });
            }
        }
    }
    Ok(dirs)
}

/// Unpacks one layer into a fresh tmp dir of the store (verifying its digest); returns the
/// tmp dir's name and its tar stream's size. Nothing is synced yet: see
/// `unpack_image_limited`.
fn extract_to_tmp(
    store: &OwnedFd,
    store_dir: &Path,
    layer: &Layer,
    name: &str,
    shift: Option<IdShift>,
    limits: &UnpackLimits,
    budget: u64,
) -> Result<(String, u64), ImageError> {
    let tmp_name = loop {
        let candidate = format!(
            "{TMP_PREFIX}{name}-{}-{}",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        match mkdirat(store, candidate.as_str(), Mode::from_raw_mode(0o700)) {
            Ok(()) => break candidate,
            // A crashed process with a recycled pid, whose leftover is not swept yet.
            Err(Errno::EXIST) => continue,
            Err(e) => {
                return Err(ImageError::io(
                    format!("creating {}", store_dir.join(&candidate).display()),
                    e.into(),
                ));
            }
        }
    };
    let tmp_path = store_dir.join(&tmp_name);
    let io_err =
        |what: &str, e: Errno| ImageError::io(format!("{what} {}", tmp_path.display()), e.into());
    let result = (|| {
        let root = openat(store, tmp_name.as_str(), DIR_FLAGS, Mode::empty())
            .map_err(|e| io_err("opening", e))?;
        // The layer root's attributes when the layer has no `./` entry.
        let (uid, gid) = shift.map_or((0, 0), |s| (s.uid, s.gid));
        fchown(&root, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
            .map_err(|e| io_err("chowning", e))?;
        fchmod(&root, Mode::from_raw_mode(0o755)).map_err(|e| io_err("chmoding", e))?;
        unpack_into(layer, root, &tmp_path, shift, limits, budget)
    })();
    match result {
        Ok(stats) => Ok((tmp_name, stats.stream_bytes)),
        Err(e) => {
            // Best effort: the error that caused this matters more than a failed cleanup,
            // and a leftover tmp dir is never trusted and is swept later.
            let _ = remove_tree(store, OsStr::new(&tmp_name));
            Err(e)
        }
    }
}

/// Renames a synced tmp dir to its final `name`; another unpacker's complete copy wins.
fn install_tmp(
    store: &OwnedFd,
    store_dir: &Path,
    tmp_name: &str,
    name: &str,
) -> Result<(), ImageError> {
    let tmp_path = store_dir.join(tmp_name);
    let renamed = match renameat_with(store, tmp_name, store, name, RenameFlags::NOREPLACE) {
        // Filesystems without RENAME_NOREPLACE: a plain rename cannot replace a non-empty
        // directory either, and an empty one would be a complete (empty) layer too.
        Err(Errno::INVAL) => renameat(store, tmp_name, store, name),
        other => other,
    };
    match renamed {
        Ok(()) => Ok(()),
        // Another unpacker finished the same layer first; its copy is as good.
        Err(Errno::EXIST | Errno::NOTEMPTY) => {
            let _ = remove_tree(store, OsStr::new(tmp_name));
            match statat(store, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => Ok(()),
                _ => Err(ImageError::BadSource {
                    path: store_dir.join(name),
                    reason: "appeared during the unpack and is not a directory".into(),
                }),
            }
        }
        Err(e) => {
            let _ = remove_tree(store, OsStr::new(tmp_name));
            Err(ImageError::io(
                format!("renaming {} to {name}", tmp_path.display()),
                e.into(),
            ))
        }
    }
}

/// Takes the store lock (a `flock` on the store directory itself) shared, first sweeping
/// leftover tmp dirs if no other unpack holds it. Returns `None` where the filesystem has
/// no `flock` (nothing is swept there).
fn lock_store(store: &OwnedFd, store_dir: &Path) -> Result<Option<OwnedFd>, ImageError> {
    let lock_err = |e: Errno| ImageError::io(format!("locking {}", store_dir.display()), e.into());
    // A lock belongs to an open file description: this one is ours alone.
    let fd = openat(store, ".", DIR_FLAGS, Mode::empty()).map_err(lock_err)?;
    match flock(&fd, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {
            // No unpack is running: every tmp dir is a crash's leftover.
            sweep_tmp_dirs(store, store_dir)?;
            flock(&fd, FlockOperation::LockShared).map_err(lock_err)?;
        }
        Err(Errno::WOULDBLOCK) => flock(&fd, FlockOperation::LockShared).map_err(lock_err)?,
        Err(Errno::NOLCK | Errno::OPNOTSUPP) => return Ok(None),
        Err(e) => return Err(lock_err(e)),
    }
    Ok(Some(fd))
}

/// Removes every `.tmp-*` entry of the store (the caller holds the lock exclusively).
fn sweep_tmp_dirs(store: &OwnedFd, store_dir: &Path) -> Result<(), ImageError> {
    let err = |e: Errno| ImageError::io(format!("sweeping {}", store_dir.display()), e.into());
    let mut stale = Vec::new();
    let mut dir = Dir::read_from(store).map_err(err)?;
    while let Some(entry) = dir.read() {
        let entry = entry.map_err(err)?;
        let name = entry.file_name().to_bytes();
        if name.starts_with(TMP_PREFIX.as_bytes()) {
            stale.push(OsString::from_vec(name.to_vec()));
        }
    }
    for name in stale {
        remove_tree(store, &name).map_err(|e| {
            ImageError::io(
                format!(
                    "removing the leftover of an interrupted unpack {}",
                    store_dir.join(&name).display()
                ),
                e.into(),
            )
        })?;
    }
    Ok(())
}

/// What a collection removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Collected {
    pub layers: usize,
    pub partial: usize,
    pub links: usize,
}

/// Removes from `store` every unpacked layer whose digest (hex, the directory name up to an
/// `@` id-shift suffix) is not in `keep`, every `.tmp-*` directory (an unpack that never
/// completed is never trusted), and every short link left dangling. Must run before any
/// container of this boot has started: a layer in use is one `keep` names.
pub fn collect_garbage(store: &Path, keep: &BTreeSet<String>) -> io::Result<Collected> {
    let mut collected = Collected::default();
    let entries = match std::fs::read_dir(store) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(collected),
        Err(e) => return Err(e),
    };
    // Unpacks hold a shared lock on the store: only without one is a `.tmp-*` directory
    // certainly abandoned rather than being written right now.
    let store_dir = std::fs::File::open(store)?;
    let exclusive = rustix::fs::flock(
        &store_dir,
        rustix::fs::FlockOperation::NonBlockingLockExclusive,
    )
    .is_ok();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if name == SHORT_LINKS {
            continue;
        }
        let path = entry.path();
        if name.starts_with(TMP_PREFIX) {
            if exclusive {
                std::fs::remove_dir_all(&path)?;
                collected.partial += 1;
            }
            continue;
        }
        let digest = layer_of_dir_name(name);
        if !keep.contains(digest) {
            std::fs::remove_dir_all(&path)?;
            collected.layers += 1;
        }
    }
    if let Ok(links) = std::fs::read_dir(store.join("l")) {
        for link in links {
            let link = link?.path();
            // metadata() follows the link: NotFound means it dangles.
            if std::fs::metadata(&link).is_err_and(|e| e.kind() == io::ErrorKind::NotFound) {
                std::fs::remove_file(&link)?;
                collected.links += 1;
            }
        }
    }
    Ok(collected)
}

/// Directory of the short links in a layer store.
const SHORT_LINKS: &str = "l";

/// overlayfs takes its options in one page (4096 bytes), so absolute store paths (about 90
/// bytes each) would cap an image at some 45 layers. As Docker's overlay2 does, each layer
/// gets a short link `l/<12 characters>` in the store, and the overlay is mounted from the
/// store directory with those relative names (15 bytes a layer): 250 layers fit, and
/// overlayfs itself stacks at most 500. Returns the relative names, in `lowers`' order.
pub fn short_lowers(store: &Path, lowers: &[PathBuf]) -> io::Result<Vec<PathBuf>> {
    use sha2::Digest;
    let links = store.join(SHORT_LINKS);
    std::fs::create_dir_all(&links)?;
    let mut out = Vec::with_capacity(lowers.len());
    for lower in lowers {
        let name = lower.file_name().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("layer directory {} has no name", lower.display()),
            )
        })?;
        let target = Path::new("..").join(name);
        let hash = sha2::Sha256::digest(name.as_encoded_bytes());
        let short = base32(&hash[..8])[..12].to_string();
        let link = links.join(&short);
        match std::fs::read_link(&link) {
            Ok(existing) if existing == target => {}
            Ok(existing) => {
                return Err(io::Error::other(format!(
                    "short layer link {} points to {}, not {}",
                    link.display(),
                    existing.display(),
                    target.display()
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                match std::os::unix::fs::symlink(&target, &link) {
                    Ok(()) => {}
                    // Created by a concurrent prepare of another container of the image.
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
        out.push(Path::new(SHORT_LINKS).join(short));
    }
    Ok(out)
}

/// RFC 4648 base32, lowercase, without padding.
fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut out = String::new();
    let (mut buffer, mut bits) = (0u32, 0u32);
    for byte in bytes {
        buffer = (buffer << 8) | u32::from(*byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unused_layers_partial_unpacks_and_dangling_links_go() {
        let store = tempfile::tempdir().unwrap();
        let s = store.path();
        for dir in ["aaaa", "bbbb", "bbbb@100000-100000-65536", ".tmp-cccc", "l"] {
            std::fs::create_dir(s.join(dir)).unwrap();
        }
        std::fs::write(s.join("aaaa/file"), "x").unwrap();
        std::os::unix::fs::symlink("../aaaa", s.join("l/keep")).unwrap();
        std::os::unix::fs::symlink("../bbbb", s.join("l/gone")).unwrap();
        let keep: BTreeSet<String> = ["aaaa".to_string()].into();
        let collected = collect_garbage(s, &keep).unwrap();
        assert_eq!(
            collected,
            Collected {
                layers: 2,
                partial: 1,
                links: 1
            }
        );
        assert!(s.join("aaaa/file").exists());
        assert!(s.join("l/keep").exists());
        assert!(!s.join("bbbb").exists() && !s.join(".tmp-cccc").exists());
        // Nothing to do the second time; a missing store is no error.
        assert_eq!(collect_garbage(s, &keep).unwrap(), Collected::default());
        assert_eq!(
            collect_garbage(&s.join("missing"), &keep).unwrap(),
            Collected::default()
        );
    }

    #[test]
    fn base32_is_rfc4648() {
        assert_eq!(base32(b"foobar"), "mzxw6ytboi");
        assert_eq!(base32(b"f"), "my");
    }
}
