//! Copy-up: a new volume starts with what the image has at the volume's mount target, as
//! under Docker (an image's `/var/lib/redis`, owned by `redis`, is what a new `redisdata`
//! volume mounted there holds before the first start).
//!
//! It runs in a process of its own (`keel-init --populate`, in the unpack cgroup): the image
//! is hostile input, and its tree can be large. That process mounts the image's layers as a
//! read-only overlay in a private mount namespace (so whiteouts and opaque directories mean
//! what they mean in the container), resolves the target inside that root, and copies the
//! tree into a staging directory beside the volume through file descriptors only: nothing
//! it reads is followed, no path it writes leaves the staging directory. Kept: directories,
//! files, symlinks, FIFOs, owners (the layers of a user-namespaced container are already
//! shifted, so are the copies), modes, extended attributes, timestamps and hard links.
//! Skipped: device nodes and sockets (a volume is `nodev`; a node there would only be a
//! handle on the host's devices for whoever lists /var). The staging directory is synced and
//! renamed onto the volume's name: a volume either does not exist or is complete, and a
//! copy a power cut interrupts leaves only a staging directory, swept and redone.

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{
    AtFlags, Dir, FileType, Mode, OFlags, RenameFlags, ResolveFlags, Timestamps, XattrFlags,
    fchmod, fchown, fgetxattr, flistxattr, fsetxattr, fstat, futimens, linkat, mkdirat, mknodat,
    openat, openat2, readlinkat, renameat_with, statat, symlinkat, utimensat,
};
use rustix::io::Errno;
use rustix::process::{Gid, Uid};

/// How every directory is opened: never through or onto a symlink (as the unpacker does).
use keel_image::unpack::DIR_FLAGS;

/// Deeper trees are refused: each level holds two descriptors open.
const MAX_DEPTH: usize = 256;

/// What a copy made.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopyStats {
    pub directories: u64,
    pub files: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    pub fifos: u64,
    pub bytes: u64,
    /// Device nodes and sockets left out.
    pub skipped: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CopyUpError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: deeper than {MAX_DEPTH} directories")]
    TooDeep { path: String },
    #[error("{0}")]
    Setup(String),
}

fn io_at(path: &Path, e: Errno) -> CopyUpError {
    CopyUpError::Io {
        path: path.display().to_string(),
        source: e.into(),
    }
}

/// Copies the contents of the directory `src` into the empty directory `dst`, then gives
/// `dst` the owner, mode, extended attributes and times of `src`.
pub fn copy_tree(src: &OwnedFd, dst: &OwnedFd) -> Result<CopyStats, CopyUpError> {
    let mut copy = TreeCopy {
        dst_root: dst.try_clone().map_err(|e| CopyUpError::Io {
            path: ".".into(),
            source: e,
        })?,
        links: HashMap::new(),
        stats: CopyStats::default(),
    };
    copy.directory(src, dst, &mut PathBuf::new(), 0)?;
    copy_metadata(src, dst).map_err(|e| io_at(Path::new("."), e))?;
    Ok(copy.stats)
}

struct TreeCopy {
    dst_root: OwnedFd,
    /// Files with more than one link, by (device, inode): where their first copy is,
    /// relative to the destination root.
    links: HashMap<(u64, u64), PathBuf>,
    stats: CopyStats,
}

impl TreeCopy {
    fn directory(
        &mut self,
        src: &OwnedFd,
        dst: &OwnedFd,
        rel: &mut PathBuf,
        depth: usize,
    ) -> Result<(), CopyUpError> {
        if depth >= MAX_DEPTH {
            return Err(CopyUpError::TooDeep {
                path: rel.display().to_string(),
            });
        }
        let mut names = Vec::new();
        let mut dir = Dir::read_from(src).map_err(|e| io_at(rel, e))?;
        while let Some(entry) = dir.read() {
            let entry = entry.map_err(|e| io_at(rel, e))?;
            let name = entry.file_name();
            if name.to_bytes() != b"." && name.to_bytes() != b".." {
                names.push(name.to_owned());
            }
        }
        drop(dir);
        for name in names {
            rel.push(OsStr::from_bytes(name.to_bytes()));
            let result = self.entry(src, dst, &name, rel, depth);
            rel.pop();
            result?;
        }
        Ok(())
    }

    fn entry(
        &mut self,
        src: &OwnedFd,
        dst: &OwnedFd,
        name: &CStr,
        rel: &mut PathBuf,
        depth: usize,
    ) -> Result<(), CopyUpError> {
        let st = statat(src, name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| io_at(rel, e))?;
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => {
                let from =
                    openat(src, name, DIR_FLAGS, Mode::empty()).map_err(|e| io_at(rel, e))?;
                mkdirat(dst, name, Mode::from_raw_mode(0o700)).map_err(|e| io_at(rel, e))?;
                let to = openat(dst, name, DIR_FLAGS, Mode::empty()).map_err(|e| io_at(rel, e))?;
                self.directory(&from, &to, rel, depth + 1)?;
                // After the children: writing them changed the directory's times.
                copy_metadata(&from, &to).map_err(|e| io_at(rel, e))?;
                self.stats.directories += 1;
            }
            FileType::RegularFile => {
                let key = (st.st_dev, st.st_ino);
                if st.st_nlink > 1
                    && let Some(first) = self.links.get(&key)
                {
                    linkat(&self.dst_root, first, dst, name, AtFlags::empty())
                        .map_err(|e| io_at(rel, e))?;
                    self.stats.hardlinks += 1;
                    return Ok(());
                }
                let from = openat(
                    src,
                    name,
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY,
                    Mode::empty(),
                )
                .map_err(|e| io_at(rel, e))?;
                let to = openat(
                    dst,
                    name,
                    keel_image::unpack::NEW_FILE_FLAGS,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| io_at(rel, e))?;
                self.stats.bytes += copy_contents(&from, &to).map_err(|e| io_at(rel, e))?;
                copy_metadata(&from, &to).map_err(|e| io_at(rel, e))?;
                if st.st_nlink > 1 {
                    self.links.insert(key, rel.clone());
                }
                self.stats.files += 1;
            }
            FileType::Symlink => {
                let target = readlinkat(src, name, Vec::new()).map_err(|e| io_at(rel, e))?;
                symlinkat(target.as_c_str(), dst, name).map_err(|e| io_at(rel, e))?;
                rustix::fs::chownat(
                    dst,
                    name,
                    Some(Uid::from_raw(st.st_uid)),
                    Some(Gid::from_raw(st.st_gid)),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(|e| io_at(rel, e))?;
                utimensat(dst, name, &times_of(&st), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| io_at(rel, e))?;
                self.stats.symlinks += 1;
            }
            FileType::Fifo => {
                mknodat(dst, name, FileType::Fifo, Mode::from_raw_mode(0o600), 0)
                    .map_err(|e| io_at(rel, e))?;
                // Opened by path, not for reading or writing: a FIFO's open blocks.
                let to = openat(
                    dst,
                    name,
                    OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| io_at(rel, e))?;
                let proc_path = proc_fd_path(&to);
                rustix::fs::chown(
                    proc_path.as_c_str(),
                    Some(Uid::from_raw(st.st_uid)),
                    Some(Gid::from_raw(st.st_gid)),
                )
                .map_err(|e| io_at(rel, e))?;
                rustix::fs::chmod(
                    proc_path.as_c_str(),
                    Mode::from_raw_mode(st.st_mode & 0o7777),
                )
                .map_err(|e| io_at(rel, e))?;
                utimensat(dst, name, &times_of(&st), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| io_at(rel, e))?;
                self.stats.fifos += 1;
            }
            FileType::CharacterDevice
            | FileType::BlockDevice
            | FileType::Socket
            | FileType::Unknown => {
                log::warn!(
                    "copy-up: {} left out (a device node or socket)",
                    rel.display()
                );
                self.stats.skipped += 1;
            }
        }
        Ok(())
    }
}

fn proc_fd_path(fd: &OwnedFd) -> CString {
    use std::os::fd::AsRawFd;
    // A decimal number: never contains a NUL.
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
}

fn times_of(st: &rustix::fs::Stat) -> Timestamps {
    Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: st.st_atime as _,
            tv_nsec: st.st_atime_nsec as _,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: st.st_mtime as _,
            tv_nsec: st.st_mtime_nsec as _,
        },
    }
}

/// Copies a regular file's bytes; in the kernel where it can.
fn copy_contents(from: &OwnedFd, to: &OwnedFd) -> Result<u64, Errno> {
    let mut total = 0u64;
    loop {
        match rustix::fs::copy_file_range(from, None, to, None, 1 << 30) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n as u64,
            Err(Errno::INTR) => {}
            // Across filesystems on older kernels, or a filesystem without it.
            Err(Errno::XDEV | Errno::NOSYS | Errno::OPNOTSUPP | Errno::INVAL) if total == 0 => {
                return copy_by_reading(from, to);
            }
            Err(e) => return Err(e),
        }
    }
}

fn copy_by_reading(from: &OwnedFd, to: &OwnedFd) -> Result<u64, Errno> {
    let mut buf = vec![0u8; 128 * 1024];
    let mut total = 0u64;
    loop {
        let n = match rustix::io::read(from, &mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e),
        };
        let mut written = 0;
        while written < n {
            match rustix::io::write(to, &buf[written..n]) {
                Ok(w) => written += w,
                Err(Errno::INTR) => {}
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
    }
}

/// Owner, then mode (a chown clears set-id bits), then extended attributes (a chown also
/// drops `security.capability`), then times (everything before changed them).
fn copy_metadata(from: &OwnedFd, to: &OwnedFd) -> Result<(), Errno> {
    let st = fstat(from)?;
    fchown(
        to,
        Some(Uid::from_raw(st.st_uid)),
        Some(Gid::from_raw(st.st_gid)),
    )?;
    fchmod(to, Mode::from_raw_mode(st.st_mode & 0o7777))?;
    copy_xattrs(from, to)?;
    futimens(to, &times_of(&st))
}

fn copy_xattrs(from: &OwnedFd, to: &OwnedFd) -> Result<(), Errno> {
    let mut names = vec![0u8; 4096];
    let len = loop {
        match flistxattr(from, &mut names) {
            Ok(len) => break len,
            Err(Errno::RANGE) if names.len() < (1 << 20) => names.resize(names.len() * 4, 0),
            Err(Errno::NOTSUP) => return Ok(()),
            Err(e) => return Err(e),
        }
    };
    for name in names[..len].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        // Overlayfs' own bookkeeping is not the file's.
        if name.starts_with(b"trusted.overlay.") {
            continue;
        }
        let Ok(name) = CString::new(name) else {
            continue;
        };
        let mut value = vec![0u8; 1024];
        let len = loop {
            match fgetxattr(from, name.as_c_str(), &mut value) {
                Ok(len) => break len,
                Err(Errno::RANGE) if value.len() < (1 << 20) => value.resize(value.len() * 4, 0),
                Err(e) => return Err(e),
            }
        };
        match fsetxattr(to, name.as_c_str(), &value[..len], XattrFlags::empty()) {
            Ok(()) => {}
            // A namespace the volume's filesystem does not keep (e.g. user.* on tmpfs).
            Err(Errno::NOTSUP) => log::warn!(
                "copy-up: extended attribute {} not kept: the volume's filesystem has no room for it",
                name.to_string_lossy()
            ),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The private directory the copy-up process `pid` mounts the image in.
pub fn scratch_dir(pid: u32) -> PathBuf {
    PathBuf::from(format!("/run/keel/populate/{pid}"))
}

/// What to copy and where: one volume's first use.
#[derive(Debug, Clone)]
pub struct PopulateJob {
    /// The layer store: the overlay's lower directories are relative to it.
    pub layer_root: PathBuf,
    /// The image's layers, bottom first, relative to `layer_root`.
    pub lowers: Vec<PathBuf>,
    /// Where the volume is mounted in the container (an absolute path in the image).
    pub target: String,
    /// The volume's directory, which must not exist yet.
    pub volume: PathBuf,
    /// Where the copy is made first, beside `volume`.
    pub staging: PathBuf,
    /// A private scratch directory for the overlay's mount point.
    pub scratch: PathBuf,
    /// The owner of a volume the image has nothing for (root, shifted for a user namespace).
    pub empty_owner: (u32, u32),
}

/// What [`populate`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Populated {
    /// The image's content at the target was copied in.
    Copied(CopyStats),
    /// The image has nothing there: the volume starts empty.
    Empty,
    /// The volume was there already (nothing was changed).
    Existed,
}

/// Makes `job.volume` from the image's content at `job.target`. For a process of its own
/// only: it leaves PID 1's mount namespace for a private one.
pub fn populate(job: &PopulateJob) -> Result<Populated, CopyUpError> {
    let setup = |what: &str, e: &dyn std::fmt::Display| CopyUpError::Setup(format!("{what}: {e}"));
    if job.volume.symlink_metadata().is_ok() {
        return Ok(Populated::Existed);
    }
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| setup("a mount namespace of its own", &e))?;
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| setup("making mounts private", &e))?;

    let merged = job.scratch.join("merged");
    // Overlayfs wants two lower directories when it has no upper one.
    let empty = job.scratch.join("empty");
    for dir in [&merged, &empty] {
        std::fs::create_dir_all(dir).map_err(|e| setup(&dir.display().to_string(), &e))?;
    }
    let mut lowers: Vec<String> = job
        .lowers
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect();
    lowers.push(empty.display().to_string());
    let options = format!("lowerdir={}", lowers.join(":"));
    std::env::set_current_dir(&job.layer_root)
        .map_err(|e| setup(&job.layer_root.display().to_string(), &e))?;
    let mounted = nix::mount::mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        nix::mount::MsFlags::MS_RDONLY
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NOEXEC,
        Some(options.as_str()),
    );
    let _ = std::env::set_current_dir("/");
    mounted.map_err(|e| setup("mounting the image's layers", &e))?;

    let result = copy_from_root(job, &merged);
    // The mount goes with the namespace when the process exits; the directories now.
    let _ = nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH);
    let _ = std::fs::remove_dir(&merged);
    let _ = std::fs::remove_dir(&empty);
    let _ = std::fs::remove_dir(&job.scratch);
    result
}

/// The copy from the image mounted at `root` (tests call it on a plain directory).
pub fn copy_from_root(job: &PopulateJob, root: &Path) -> Result<Populated, CopyUpError> {
    let root_fd = rustix::fs::open(root, DIR_FLAGS, Mode::empty()).map_err(|e| io_at(root, e))?;
    // Inside the image's root, never through a symlink: the container's own mount of the
    // volume refuses a symlinked target, so a copy through one would serve nothing.
    let source = match openat2(
        &root_fd,
        job.target.trim_start_matches('/'),
        // Not O_NOFOLLOW: a symlink at the end would then be ENOTDIR, not ELOOP.
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT
            | ResolveFlags::NO_SYMLINKS
            | ResolveFlags::NO_MAGICLINKS
            | ResolveFlags::NO_XDEV,
    ) {
        Ok(fd) => Some(fd),
        // Nothing there (or a file, which a directory volume cannot take the place of).
        Err(Errno::NOENT | Errno::NOTDIR) => None,
        Err(Errno::LOOP) => {
            return Err(CopyUpError::Setup(format!(
                "{} in the image goes through a symlink",
                job.target
            )));
        }
        Err(e) => return Err(io_at(Path::new(&job.target), e)),
    };
    let (parent, staging_name) = split(&job.staging)?;
    let (_, volume_name) = split(&job.volume)?;
    // An anonymous volume's container directory is made with its first volume.
    std::fs::create_dir_all(parent).map_err(|source| CopyUpError::Io {
        path: parent.display().to_string(),
        source,
    })?;
    let parent_fd =
        rustix::fs::open(parent, DIR_FLAGS, Mode::empty()).map_err(|e| io_at(parent, e))?;
    // A staging directory left by an interrupted copy is never trusted: made again.
    keel_image::remove_tree::remove_tree(&parent_fd, staging_name)
        .map_err(|e| io_at(&job.staging, e))?;
    mkdirat(&parent_fd, staging_name, Mode::from_raw_mode(0o700))
        .map_err(|e| io_at(&job.staging, e))?;
    let staging = openat(&parent_fd, staging_name, DIR_FLAGS, Mode::empty())
        .map_err(|e| io_at(&job.staging, e))?;
    let copied = match &source {
        Some(source) => copy_tree(source, &staging).map(Populated::Copied),
        None => {
            let (uid, gid) = job.empty_owner;
            fchown(&staging, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
                .and_then(|()| fchmod(&staging, Mode::from_raw_mode(0o755)))
                .map(|()| Populated::Empty)
                .map_err(|e| io_at(&job.staging, e))
        }
    };
    let finished = copied.and_then(|populated| {
        rustix::fs::syncfs(&staging).map_err(|e| io_at(&job.staging, e))?;
        match renameat_with(
            &parent_fd,
            staging_name,
            &parent_fd,
            volume_name,
            RenameFlags::NOREPLACE,
        ) {
            Ok(()) => {}
            // Made meanwhile by someone else: theirs stands.
            Err(Errno::EXIST) => {
                let _ = keel_image::remove_tree::remove_tree(&parent_fd, staging_name);
                return Ok(Populated::Existed);
            }
            Err(e) => return Err(io_at(&job.volume, e)),
        }
        rustix::fs::fsync(&parent_fd).map_err(|e| io_at(parent, e))?;
        Ok(populated)
    });
    if finished.is_err() {
        let _ = keel_image::remove_tree::remove_tree(&parent_fd, staging_name);
    }
    finished
}

fn split(path: &Path) -> Result<(&Path, &OsStr), CopyUpError> {
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => Ok((parent, name)),
        _ => Err(CopyUpError::Setup(format!(
            "{}: not a path in a directory",
            path.display()
        ))),
    }
}
