//! Removing a directory tree through file descriptors, never following a symlink: what a
//! hostile layer left in a layer directory or a store's temporary directory cannot redirect
//! the removal elsewhere.

use std::ffi::{OsStr, OsString};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{AtFlags, Dir, FileType, Mode, openat, statat, unlinkat};
use rustix::io::Errno;

use crate::unpack::DIR_FLAGS;

/// Removes `name` in `parent`, a whole directory tree included, never following a
/// symlink. Iterative, with one directory open at a time, so a deep tree can exhaust
/// neither the stack nor the file descriptors.
pub fn remove_tree(parent: &OwnedFd, name: &OsStr) -> Result<(), Errno> {
    let st = match statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return unlinkat(parent, name, AtFlags::empty());
    }
    // The names from `name` down to the directory `cur` is.
    let mut path: Vec<OsString> = vec![name.to_owned()];
    let mut cur = openat(parent, name, DIR_FLAGS, Mode::empty())?;
    loop {
        let mut subdir = None;
        let mut removed_any = false;
        let mut dir = Dir::read_from(&cur)?;
        while let Some(entry) = dir.read() {
            let entry = entry?;
            let child = entry.file_name().to_bytes();
            if child == b"." || child == b".." {
                continue;
            }
            let child = OsStr::from_bytes(child);
            let is_dir = match entry.file_type() {
                FileType::Unknown => {
                    let st = statat(&cur, child, AtFlags::SYMLINK_NOFOLLOW)?;
                    FileType::from_raw_mode(st.st_mode) == FileType::Directory
                }
                ft => ft == FileType::Directory,
            };
            if is_dir {
                subdir = Some(child.to_owned());
                break;
            }
            unlinkat(&cur, child, AtFlags::empty())?;
            removed_any = true;
        }
        drop(dir);
        if let Some(child) = subdir {
            cur = openat(&cur, &child, DIR_FLAGS, Mode::empty())?;
            path.push(child);
        } else if removed_any {
            // Entries removed while reading may hide others from the same pass.
            continue;
        } else {
            let done = path.pop().unwrap_or_default();
            if path.is_empty() {
                drop(cur);
                return unlinkat(parent, name, AtFlags::REMOVEDIR);
            }
            // Our own tree, which nothing else modifies: `..` is the parent we came from.
            let up = openat(&cur, "..", DIR_FLAGS, Mode::empty())?;
            unlinkat(&up, &done, AtFlags::REMOVEDIR)?;
            cur = up;
        }
    }
}
