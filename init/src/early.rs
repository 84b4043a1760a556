//! The first things PID 1 does: give `/` a real mount (pivot_root refuses the initramfs
//! rootfs), then mount the kernel's filesystems.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use nix::mount::{MsFlags, mount};

const NEW_ROOT: &str = "/.keel-root";

/// statfs magic numbers of the filesystems the kernel unpacks an initramfs into.
const RAMFS_MAGIC: i64 = 0x8584_58f6;
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// If `/` is the initramfs rootfs, copies it into a fresh tmpfs and makes that the root
/// (LinuxKit does the same), so containers can pivot_root later. The old files are deleted
/// as they are copied, so memory is not held twice.
pub fn switch_to_tmpfs_root() -> io::Result<bool> {
    if !root_is_initramfs() {
        return Ok(false);
    }
    // A tmpfs root that is already a mount of its own (we switched before) shows up in
    // /proc/self/mountinfo; the initramfs rootfs has no parent mount. Without /proc yet,
    // the marker directory tells.
    if Path::new(NEW_ROOT).exists() {
        return Ok(false);
    }
    fs::create_dir(NEW_ROOT)?;
    mount(
        Some("tmpfs"),
        NEW_ROOT,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )?;
    for entry in fs::read_dir("/")? {
        let entry = entry?;
        let name = entry.file_name();
        if name == ".keel-root" {
            continue;
        }
        let from = entry.path();
        let to = Path::new(NEW_ROOT).join(&name);
        move_tree(&from, &to)?;
    }
    std::env::set_current_dir(NEW_ROOT)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)?;
    nix::unistd::chroot(".")?;
    std::env::set_current_dir("/")?;
    Ok(true)
}

/// Whether `/` is the filesystem the kernel unpacked the initramfs into (ramfs, or tmpfs).
pub fn root_is_initramfs() -> bool {
    nix::sys::statfs::statfs("/").is_ok_and(|s| {
        let magic = s.filesystem_type().0;
        magic == RAMFS_MAGIC || magic == TMPFS_MAGIC
    })
}

/// Copies `from` to `to` keeping type, mode and ownership, then deletes `from`.
fn move_tree(from: &Path, to: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(from)?;
    let file_type = meta.file_type();
    if file_type.is_dir() {
        fs::create_dir(to)?;
        for entry in fs::read_dir(from)? {
            let entry = entry?;
            move_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        fs::set_permissions(to, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        fs::remove_dir(from)?;
        return Ok(());
    }
    if file_type.is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(from)?, to)?;
    } else if file_type.is_char_device() || file_type.is_block_device() || file_type.is_fifo() {
        let kind = nix::sys::stat::SFlag::from_bits_truncate(meta.mode() & libc::S_IFMT);
        let perm = nix::sys::stat::Mode::from_bits_truncate(meta.mode() & 0o7777);
        nix::sys::stat::mknod(to, kind, perm, meta.rdev())?;
    } else {
        fs::copy(from, to)?;
    }
    std::os::unix::fs::lchown(to, Some(meta.uid()), Some(meta.gid()))?;
    fs::remove_file(from)
}

struct Mount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

/// The kernel filesystems every Keel host has, in mount order.
fn kernel_mounts() -> Vec<Mount> {
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    vec![
        Mount {
            source: "proc",
            target: "/proc",
            fstype: "proc",
            flags: nosuid_nodev_noexec,
            data: None,
        },
        Mount {
            source: "sysfs",
            target: "/sys",
            fstype: "sysfs",
            flags: nosuid_nodev_noexec,
            data: None,
        },
        Mount {
            source: "devtmpfs",
            target: "/dev",
            fstype: "devtmpfs",
            flags: MsFlags::MS_NOSUID,
            data: Some("mode=0755"),
        },
        Mount {
            source: "devpts",
            target: "/dev/pts",
            fstype: "devpts",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            data: Some("gid=5,mode=0620,ptmxmode=0666"),
        },
        Mount {
            source: "shm",
            target: "/dev/shm",
            fstype: "tmpfs",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            data: Some("mode=1777"),
        },
        Mount {
            source: "run",
            target: "/run",
            fstype: "tmpfs",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            data: Some("mode=0755"),
        },
        Mount {
            source: "tmp",
            target: "/tmp",
            fstype: "tmpfs",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            data: Some("mode=1777"),
        },
        Mount {
            source: "cgroup2",
            target: "/sys/fs/cgroup",
            fstype: "cgroup2",
            flags: nosuid_nodev_noexec,
            data: Some("nsdelegate"),
        },
    ]
}

/// Mounts /proc, /sys, /dev (+ pts, shm), /run, /tmp and cgroup2. A failure is logged by
/// the caller and boot goes on: a host with a missing /dev/shm is better than no host.
pub fn mount_kernel_filesystems() -> Vec<String> {
    let mut errors = Vec::new();
    for m in kernel_mounts() {
        if let Err(e) = fs::create_dir_all(m.target) {
            errors.push(format!("mkdir {}: {e}", m.target));
            continue;
        }
        // The stage-1 init moved /proc, /sys and /dev over from the initramfs.
        if is_mount_point(Path::new(m.target)) {
            continue;
        }
        if let Err(e) = mount(Some(m.source), m.target, Some(m.fstype), m.flags, m.data) {
            // devtmpfs may already be mounted by the kernel (CONFIG_DEVTMPFS_MOUNT).
            if !(e == nix::errno::Errno::EBUSY && m.fstype == "devtmpfs") {
                errors.push(format!("mount {} on {}: {e}", m.fstype, m.target));
            }
        }
    }
    errors
}

/// Whether `path` is the root of a filesystem other than its parent's. (A bind mount of
/// the same filesystem would not show, but nothing mounts those this early.)
fn is_mount_point(path: &Path) -> bool {
    let Some(parent) = path.parent() else {
        return true;
    };
    match (fs::metadata(path), fs::metadata(parent)) {
        (Ok(p), Ok(q)) => p.dev() != q.dev(),
        _ => false,
    }
}

/// Milliseconds since boot (CLOCK_BOOTTIME), for the ready line.
pub fn uptime_ms() -> u128 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u128 * 1000 + t.tv_nsec() as u128 / 1_000_000)
        .unwrap_or(0)
}

/// This process's resident set size in KiB.
pub fn rss_kb() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix("VmRSS:")?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_is_read() {
        assert!(rss_kb().is_some_and(|kb| kb > 0));
    }

    #[test]
    fn mounts_come_parent_first() {
        let mounts = kernel_mounts();
        let pos = |t: &str| mounts.iter().position(|m| m.target == t).unwrap();
        assert!(pos("/dev") < pos("/dev/pts"));
        assert!(pos("/dev") < pos("/dev/shm"));
        assert!(pos("/sys") < pos("/sys/fs/cgroup"));
    }

    #[test]
    fn mount_points_are_told_from_directories() {
        assert!(is_mount_point(Path::new("/proc")));
        assert!(is_mount_point(Path::new("/")));
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("plain")).unwrap();
        assert!(!is_mount_point(&dir.path().join("plain")));
    }

    #[test]
    fn a_tree_moves_with_its_links_and_modes() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        let root = src.path().join("root");
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::write(root.join("bin/tool"), b"x").unwrap();
        fs::set_permissions(root.join("bin/tool"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("tool", root.join("bin/alias")).unwrap();
        let to = dst.path().join("root");
        move_tree(&root, &to).unwrap();
        assert!(!root.exists());
        assert_eq!(
            fs::metadata(to.join("bin/tool")).unwrap().mode() & 0o777,
            0o755
        );
        assert_eq!(
            fs::read_link(to.join("bin/alias")).unwrap(),
            Path::new("tool")
        );
    }
}
