//! Stage 1: the small initramfs's whole job. Load the modules that reach the root disk,
//! find the root image (`keel.root=`), optionally put dm-verity over it and read it all
//! once, mount it read-only on /sysroot, switch root like util-linux's switch_root and exec
//! `/sbin/init` (this same binary, which then sees `/` = erofs and boots as stage 2).
//!
//! Stage 1 either execs stage 2 or powers the machine off with one clear message: it never
//! returns (PID 1 exiting panics the kernel) and never falls back to booting something
//! unverified. No tokio here: it is a straight line of system calls.

use std::convert::Infallible;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use keel_image::verity::VerityParams;
use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};

use crate::{blockdev, dm, early, logger, modules};

/// Where the root image is mounted before it becomes `/`.
pub const SYSROOT: &str = "/sysroot";
/// Stage 2, on the root image.
pub const STAGE2_INIT: &str = "/sbin/init";
/// The mapped device dm-verity's checked view of the root disk gets.
pub const VERITY_NAME: &str = "keel-root";
/// Disks appear asynchronously once virtio_blk probes them; a slow TCG guest can take
/// seconds, a missing disk never comes.
const ROOT_WAIT: Duration = Duration::from_secs(30);
/// The full read of the verified device: large requests keep per-syscall and per-bio
/// overhead (expensive under TCG) negligible next to the hashing.
const VERIFY_CHUNK: usize = 1 << 20;
const BLOCK: u64 = 4096;

/// What `keel.root=` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootSpec {
    /// `UUID=…`: the erofs filesystem UUID `keel build` recorded, lowercase.
    Uuid(String),
    /// `/dev/NAME`.
    Device(PathBuf),
}

impl std::fmt::Display for RootSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RootSpec::Uuid(u) => write!(f, "an erofs image with UUID {u}"),
            RootSpec::Device(d) => write!(f, "{}", d.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Stage1Error {
    #[error("mounting {fstype} on {target}: {source}")]
    Mount {
        fstype: &'static str,
        target: String,
        #[source]
        source: Errno,
    },
    #[error(
        "keel.root={0:?} on the kernel command line is not understood: use keel.root=UUID=<erofs uuid, 8-4-4-4-12 hex> or keel.root=/dev/NAME"
    )]
    RootArg(String),
    #[error("keel.verity.* on the kernel command line: {0}")]
    VerityArgs(String),
    #[error(
        "no root image ({wanted}) appeared within {} s; block devices: {devices}. Is root.img attached as a virtio disk, and are virtio_pci and virtio_blk in the initramfs's /lib/modules/keel.load?",
        waited.as_secs()
    )]
    RootNotFound {
        wanted: RootSpec,
        waited: Duration,
        devices: String,
    },
    #[error("setting up dm-verity over the root image {}: {source}{kernel}", disk.display())]
    Verity {
        disk: PathBuf,
        #[source]
        source: dm::DmError,
        kernel: String,
    },
    #[error(
        "root image {} failed dm-verity verification near byte {offset} (block {block}): the image was modified or the disk is corrupt; refusing to boot{hint}{kernel}",
        disk.display()
    )]
    Corrupt {
        disk: PathBuf,
        offset: u64,
        block: u64,
        /// Set when the mismatch is at the top of the tree: the likelier cause is then a
        /// command line from another build.
        hint: &'static str,
        kernel: String,
    },
    #[error(
        "reading the verified root image {} at byte {offset}: {source}; the disk is unreadable, refusing to boot",
        node.display()
    )]
    VerifyRead {
        node: PathBuf,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error(
        "mounting the root image {} (erofs, read-only) on {SYSROOT}: {source}; is erofs in the initramfs's module list, and is the image an erofs built by keel build?{kernel}",
        device.display()
    )]
    MountRoot {
        device: PathBuf,
        #[source]
        source: Errno,
        kernel: String,
    },
    #[error("the root image has no executable {STAGE2_INIT}: {0}; rebuild it with keel build")]
    NoInit(#[source] io::Error),
    #[error("switching root to {SYSROOT}: {step}: {source}")]
    Switch {
        step: &'static str,
        #[source]
        source: Errno,
    },
    #[error("executing {STAGE2_INIT} on the new root: {0}")]
    Exec(#[source] Errno),
}

/// True when this is PID 1 on the initramfs and the command line names a root image: the
/// two-stage boot. An initramfs without `keel.root=` is a whole system (the single-stage
/// boot) and goes on as before.
pub fn is_stage1(cmdline: &str) -> bool {
    root_value(cmdline).is_some() && std::process::id() == 1 && early::root_is_initramfs()
}

/// At the very start of PID 1: the kernel command line if this is stage 1. /proc is not
/// mounted yet, and `keel.*` arguments contain a dot, so the kernel hands them to init
/// neither as arguments nor as environment: /proc is mounted for the look, and unmounted
/// again unless stage 1 goes on (the single-stage boot copies `/` to a tmpfs and must not
/// find a mount in it).
pub fn detect() -> Option<String> {
    if std::process::id() != 1 || !early::root_is_initramfs() {
        return None;
    }
    let mounted_here = !Path::new("/proc/self").exists()
        && fs::create_dir_all("/proc").is_ok()
        && mount(
            Some("proc"),
            "/proc",
            Some("proc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .is_ok();
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let stage1 = is_stage1(&cmdline);
    if mounted_here && !stage1 {
        let _ = umount2("/proc", MntFlags::MNT_DETACH);
    }
    stage1.then_some(cmdline)
}

/// The last `keel.root=` (the kernel's own rule for repeated arguments).
fn root_value(cmdline: &str) -> Option<&str> {
    cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("keel.root="))
        .next_back()
}

/// Parses `keel.root=`; `None` when there is none.
pub fn parse_root(cmdline: &str) -> Result<Option<RootSpec>, Stage1Error> {
    let Some(value) = root_value(cmdline) else {
        return Ok(None);
    };
    let bad = || Stage1Error::RootArg(value.to_string());
    if let Some(uuid) = value.strip_prefix("UUID=") {
        let uuid = uuid.to_ascii_lowercase();
        let canonical = uuid.len() == 36
            && uuid.char_indices().all(|(i, c)| match i {
                8 | 13 | 18 | 23 => c == '-',
                _ => c.is_ascii_hexdigit(),
            });
        return if canonical {
            Ok(Some(RootSpec::Uuid(uuid)))
        } else {
            Err(bad())
        };
    }
    match value.strip_prefix("/dev/") {
        Some(name) if !name.is_empty() && !name.split('/').any(|c| c == "..") => {
            Ok(Some(RootSpec::Device(PathBuf::from(value))))
        }
        _ => Err(bad()),
    }
}

/// Stage 1, to the exec of stage 2; on any failure the message goes to the console and the
/// machine reboots when UEFI firmware booted it (the boot loader counts the failed try and,
/// once an updated entry has none left, boots the previous slot: see image/src/esp.rs), and
/// powers off otherwise (a direct kernel boot has nothing else to try).
pub fn run(cmdline: &str) -> ! {
    let Err(error) = boot(cmdline);
    log::error!("{error}");
    let mode = if Path::new("/sys/firmware/efi").exists() {
        log::error!(
            "stage 1 failed; rebooting (the boot loader falls back to the previous system once an update runs out of tries)"
        );
        nix::sys::reboot::RebootMode::RB_AUTOBOOT
    } else {
        log::error!("stage 1 failed; powering off");
        nix::sys::reboot::RebootMode::RB_POWER_OFF
    };
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(mode);
    loop {
        // reboot(2) fails only without CAP_SYS_BOOT, i.e. not as PID 1: stay alive anyway.
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn boot(cmdline: &str) -> Result<Infallible, Stage1Error> {
    let started = Instant::now();
    mount_kernel_filesystems()?;
    logger::init();
    log::info!(
        "stage 1: finding the root image (uptime {} ms)",
        early::uptime_ms()
    );
    // Bad arguments are reported before waiting 30 s for a disk.
    let wanted = parse_root(cmdline)?.ok_or_else(|| Stage1Error::RootArg(String::new()))?;
    let verity = VerityParams::from_cmdline(cmdline).map_err(Stage1Error::VerityArgs)?;

    modules::load_all_logged(Path::new(modules::LOAD_LIST), "stage 1: ");

    let t = Instant::now();
    let (disk, probe) = find_root(&wanted)?;
    log::info!(
        "stage 1: root image {} ({} uuid={}) found in {} ms",
        disk.display(),
        probe.fstype.unwrap_or("unknown"),
        probe.uuid.as_deref().unwrap_or("none"),
        t.elapsed().as_millis()
    );

    let root = match &verity {
        Some(params) => verified_root(&disk, params)?,
        None => disk.clone(),
    };

    fs::create_dir_all(SYSROOT).map_err(|e| mount_error("erofs", SYSROOT, e))?;
    let kmsg = KmsgMark::now();
    if let Err(source) = mount(
        Some(&root),
        SYSROOT,
        Some("erofs"),
        MsFlags::MS_RDONLY,
        None::<&str>,
    ) {
        return Err(Stage1Error::MountRoot {
            device: root,
            source,
            kernel: kmsg.quote(|l| l.contains("erofs")),
        });
    }
    check_init(Path::new(SYSROOT))?;
    log::info!(
        "stage 1: {} mounted read-only on {SYSROOT}; switching root (stage 1 took {} ms, uptime {} ms)",
        root.display(),
        started.elapsed().as_millis(),
        early::uptime_ms()
    );
    switch_root(Path::new(SYSROOT))
}

/// /proc, /sys and /dev: what module loading, disk discovery and the logger need. /proc may
/// be mounted already (detect).
fn mount_kernel_filesystems() -> Result<(), Stage1Error> {
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let mounts: [(&str, &str, MsFlags, Option<&str>, &str); 3] = [
        ("proc", "/proc", flags, None, "/proc/self"),
        ("sysfs", "/sys", flags, None, "/sys/kernel"),
        (
            "devtmpfs",
            "/dev",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
            "/dev/null",
        ),
    ];
    for (fstype, target, flags, data, present) in mounts {
        if Path::new(present).exists() {
            continue;
        }
        fs::create_dir_all(target).map_err(|e| mount_error(fstype, target, e))?;
        match mount(Some(fstype), target, Some(fstype), flags, data) {
            // The kernel may have mounted devtmpfs itself.
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(source) => {
                return Err(Stage1Error::Mount {
                    fstype,
                    target: target.to_string(),
                    source,
                });
            }
        }
    }
    Ok(())
}

fn mount_error(fstype: &'static str, target: &str, e: io::Error) -> Stage1Error {
    Stage1Error::Mount {
        fstype,
        target: target.to_string(),
        source: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    }
}

/// Looks for the root on the disks the first modules reached (a virtio disk appears while
/// its driver loads) for this long before loading the other disk controllers' drivers.
const VIRTIO_LOOK: Duration = Duration::from_secs(1);

fn find_root(wanted: &RootSpec) -> Result<(PathBuf, blockdev::Probe), Stage1Error> {
    // On the disk that booted, when the boot loader says which (see slots::is_boot_disk).
    let on_boot_disk = |d: &blockdev::BlockDevice| {
        blockdev::parent_disk(&d.name).is_none_or(|disk| crate::slots::is_boot_disk(&disk))
    };
    let look = |wait| match wanted {
        RootSpec::Uuid(uuid) => blockdev::wait_for(
            |d, p| p.fstype == Some("erofs") && p.uuid.as_deref() == Some(uuid) && on_boot_disk(d),
            wait,
        ),
        RootSpec::Device(node) => blockdev::wait_for(|d, _| &d.node == node, wait),
    };
    let found = look(VIRTIO_LOOK).or_else(|| {
        let list = Path::new(keel_image::os::STORAGE_LOAD_LIST);
        if list.exists() {
            modules::load_all_logged(list, "stage 1: the root is not on a virtio disk: ");
        }
        look(ROOT_WAIT)
    });
    match found {
        Some((device, probe)) => Ok((device.node, probe)),
        None => Err(Stage1Error::RootNotFound {
            wanted: wanted.clone(),
            waited: ROOT_WAIT,
            devices: blockdev::describe_all(),
        }),
    }
}

/// Maps dm-verity over `disk` and reads the whole mapped device once. dm-verity checks a
/// block only when it is read, so without the full read a modified block would surface as
/// an I/O error in some program hours later; this way a modified image stops this boot,
/// here, with one message.
fn verified_root(disk: &Path, params: &VerityParams) -> Result<PathBuf, Stage1Error> {
    let disk_name = disk.to_string_lossy();
    let kmsg = KmsgMark::now();
    let device = dm::Target::parse(&params.table(&disk_name))
        .and_then(|target| dm::create_readonly(VERITY_NAME, &target))
        .map_err(|source| Stage1Error::Verity {
            disk: disk.to_path_buf(),
            source,
            kernel: kmsg.quote(is_dm_line),
        })?;
    log::info!(
        "stage 1: dm-verity device {} over {} ({} data blocks)",
        device.node.display(),
        disk.display(),
        params.data_blocks
    );
    let t = Instant::now();
    let kmsg = KmsgMark::now();
    let bytes = match read_all(&device.node) {
        Ok(bytes) => bytes,
        Err(ReadFailure::Corrupt { offset }) => {
            let kernel = kmsg.quote(is_dm_line);
            // The tree's top block is the first hash block, checked against the root hash.
            let top = format!("metadata block {} is corrupted", params.data_blocks);
            return Err(Stage1Error::Corrupt {
                disk: disk.to_path_buf(),
                offset,
                block: offset / BLOCK,
                hint: if kernel.contains(&top) {
                    " (the hash tree's top block does not match keel.verity.roothash: is the command line from another build of this image?)"
                } else {
                    ""
                },
                kernel,
            });
        }
        Err(ReadFailure::Other { offset, source }) => {
            return Err(Stage1Error::VerifyRead {
                node: device.node,
                offset,
                source,
            });
        }
    };
    let ms = t.elapsed().as_millis();
    log::info!(
        "stage 1: root verified: {} MiB in {ms} ms ({} MiB/s)",
        bytes >> 20,
        (bytes >> 20) as u128 * 1000 / ms.max(1)
    );
    Ok(device.node)
}

fn is_dm_line(line: &str) -> bool {
    line.contains("device-mapper") || line.contains("verity")
}

#[derive(Debug)]
enum ReadFailure {
    /// dm-verity's answer to a block whose hash does not match: EIO.
    Corrupt {
        offset: u64,
    },
    Other {
        offset: u64,
        source: io::Error,
    },
}

/// Reads `node` from start to end; returns the byte count, or where it failed. O_DIRECT
/// when the device takes it: the image is read once and need not sit in the page cache.
fn read_all(node: &Path) -> Result<u64, ReadFailure> {
    let open_err = |source| ReadFailure::Other { offset: 0, source };
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(node)
        .or_else(|_| File::open(node))
        .map_err(open_err)?;
    // O_DIRECT wants a block-aligned buffer: take the aligned window of a larger one.
    let mut storage = vec![0u8; VERIFY_CHUNK + BLOCK as usize];
    let skip = storage.as_ptr().align_offset(BLOCK as usize);
    let buffer = &mut storage[skip..skip + VERIFY_CHUNK];
    let mut offset = 0u64;
    loop {
        match file.read_at(buffer, offset) {
            Ok(0) => return Ok(offset),
            Ok(n) => offset += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                // The chunk failed as a whole: find its first bad block.
                let block = &mut buffer[..BLOCK as usize];
                let first_bad = (offset..offset + VERIFY_CHUNK as u64)
                    .step_by(BLOCK as usize)
                    .find(|&at| {
                        file.read_at(block, at)
                            .is_err_and(|e| e.raw_os_error() == Some(libc::EIO))
                    });
                return Err(ReadFailure::Corrupt {
                    offset: first_bad.unwrap_or(offset),
                });
            }
            Err(source) => return Err(ReadFailure::Other { offset, source }),
        }
    }
}

/// A position in the kernel log, to quote what the kernel said about a failure after it
/// (dm-verity names the corrupted block; a refused table says why).
struct KmsgMark(Option<File>);

impl KmsgMark {
    fn now() -> KmsgMark {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .and_then(|mut f| f.seek(SeekFrom::End(0)).map(|_| f))
            .ok();
        KmsgMark(file)
    }

    /// The kernel's lines since the mark that `keep` accepts, as `; the kernel says: …`.
    fn quote(mut self, keep: impl Fn(&str) -> bool) -> String {
        let Some(file) = self.0.as_mut() else {
            return String::new();
        };
        let mut lines = Vec::new();
        let mut record = [0u8; 8192];
        // One read, one record; EAGAIN at the end. Bounded in case the log is busy.
        for _ in 0..256 {
            match file.read(&mut record) {
                Ok(n) if n > 0 => {
                    let text = String::from_utf8_lossy(&record[..n]);
                    if let Some(message) = kmsg_message(&text)
                        && keep(message)
                        && lines.len() < 4
                        && !lines.iter().any(|l| l == message)
                    {
                        lines.push(message.to_string());
                    }
                }
                // A record overwritten while we read: the next read goes on.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {}
                _ => break,
            }
        }
        if lines.is_empty() {
            String::new()
        } else {
            format!("; the kernel says: {}", lines.join(" | "))
        }
    }
}

/// The message of one /dev/kmsg record: `prio,seq,usec,flags;message\n KEY=value…`.
fn kmsg_message(record: &str) -> Option<&str> {
    let (_, rest) = record.split_once(';')?;
    Some(rest.lines().next().unwrap_or("").trim_end())
}

fn check_init(sysroot: &Path) -> Result<(), Stage1Error> {
    let init = sysroot.join(STAGE2_INIT.trim_start_matches('/'));
    nix::unistd::access(&init, nix::unistd::AccessFlags::X_OK)
        .map_err(|e| Stage1Error::NoInit(e.into()))
}

/// util-linux switch_root: move the kernel filesystems into the new root, free the
/// initramfs, make the new root `/`, exec its init with our arguments and environment.
fn switch_root(new_root: &Path) -> Result<Infallible, Stage1Error> {
    for dir in ["/dev", "/proc", "/sys"] {
        let target = new_root.join(dir.trim_start_matches('/'));
        if let Err(e) = mount(
            Some(dir),
            &target,
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        ) {
            // Stage 2 mounts what is missing; a stale mount left behind would only pin
            // initramfs memory.
            log::warn!(
                "moving {dir} to {}: {e}; stage 2 mounts a fresh one",
                target.display()
            );
            let _ = umount2(dir, MntFlags::MNT_DETACH);
        }
    }
    let t = Instant::now();
    let freed = match fs::symlink_metadata("/") {
        Ok(meta) => remove_on_device(Path::new("/"), meta.dev()),
        Err(_) => 0,
    };
    log::info!(
        "stage 1: freed {} KiB of initramfs in {} ms",
        freed >> 10,
        t.elapsed().as_millis()
    );
    let step = |step: &'static str| move |source| Stage1Error::Switch { step, source };
    nix::unistd::chdir(new_root).map_err(step("chdir"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(step("moving it onto /"))?;
    nix::unistd::chroot(".").map_err(step("chroot"))?;
    nix::unistd::chdir("/").map_err(step("chdir /"))?;

    let c_string = |s: &[u8]| CString::new(s).ok();
    let argv: Vec<CString> = std::env::args_os()
        .filter_map(|a| c_string(a.as_bytes()))
        .collect();
    let env: Vec<CString> = std::env::vars_os()
        .filter_map(|(k, v)| c_string(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
        .collect();
    let init = CString::new(STAGE2_INIT).map_err(|_| Stage1Error::Exec(Errno::EINVAL))?;
    let argv = if argv.is_empty() {
        vec![init.clone()]
    } else {
        argv
    };
    match nix::unistd::execve(&init, &argv, &env) {
        Err(e) => Err(Stage1Error::Exec(e)),
    }
}

/// Deletes everything below `dir` that lives on device `dev`, depth first: never follows a
/// symlink and never enters another mount (the new root, the moved /dev). Returns the
/// bytes of the regular files removed. Best effort: an entry that cannot be removed only
/// keeps its memory.
fn remove_on_device(dir: &Path, dev: u64) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut freed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.dev() != dev {
            continue;
        }
        if meta.is_dir() {
            freed += remove_on_device(&path, dev);
            let _ = fs::remove_dir(&path);
        } else if fs::remove_file(&path).is_ok() && meta.is_file() {
            freed += meta.len();
        }
    }
    freed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keel_root_forms() {
        let uuid = "0A1B2C3D-4e5f-6a7b-8c9d-0e1f2a3b4c5d";
        assert_eq!(
            parse_root(&format!("console=ttyS0 keel.root=UUID={uuid} quiet")).unwrap(),
            Some(RootSpec::Uuid(uuid.to_ascii_lowercase()))
        );
        assert_eq!(
            parse_root("keel.root=/dev/vda").unwrap(),
            Some(RootSpec::Device("/dev/vda".into()))
        );
        assert_eq!(
            parse_root("keel.root=/dev/vda keel.root=/dev/vdb").unwrap(),
            Some(RootSpec::Device("/dev/vdb".into())),
            "the last one wins, as in the kernel"
        );
        assert_eq!(parse_root("console=ttyS0 root=/dev/vda").unwrap(), None);
        assert_eq!(parse_root("xkeel.root=/dev/vda").unwrap(), None);
        for bad in [
            "keel.root=UUID=1234",
            "keel.root=UUID=0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d",
            "keel.root=UUID=0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5g",
            "keel.root=LABEL=root",
            "keel.root=vda",
            "keel.root=/dev/",
            "keel.root=/dev/../etc/x",
            "keel.root=",
        ] {
            let e = parse_root(bad).unwrap_err();
            assert!(e.to_string().contains("keel.root=UUID="), "{bad}: {e}");
        }
    }

    #[test]
    fn only_pid_1_on_an_initramfs_with_keel_root_is_stage_1() {
        // The test runner is not PID 1, whatever its root is.
        assert!(!is_stage1("keel.root=/dev/vda"));
        assert!(!is_stage1("console=ttyS0"));
    }

    #[test]
    fn kmsg_records_are_cut_to_their_message() {
        let record = "3,1234,5678901,-;device-mapper: verity: 254:0: data block 7 is corrupted\n SUBSYSTEM=block\n";
        assert_eq!(
            kmsg_message(record),
            Some("device-mapper: verity: 254:0: data block 7 is corrupted")
        );
        assert_eq!(kmsg_message("garbage"), None);
    }

    #[test]
    fn a_corrupt_block_reads_as_its_offset() {
        let e = Stage1Error::Corrupt {
            disk: "/dev/vda".into(),
            offset: 7 * 4096,
            block: 7,
            hint: "",
            kernel: String::new(),
        };
        assert_eq!(
            e.to_string(),
            "root image /dev/vda failed dm-verity verification near byte 28672 (block 7): the image was modified or the disk is corrupt; refusing to boot"
        );
    }

    #[test]
    fn a_whole_file_is_read_to_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        fs::write(&path, vec![7u8; VERIFY_CHUNK * 2 + 4096 * 3]).unwrap();
        assert_eq!(
            read_all(&path).unwrap(),
            (VERIFY_CHUNK * 2 + 4096 * 3) as u64
        );
    }

    #[test]
    fn the_initramfs_walk_deletes_files_links_and_dirs_but_not_other_devices() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("lib/modules")).unwrap();
        fs::write(root.join("lib/modules/a.ko"), vec![0u8; 1000]).unwrap();
        fs::write(root.join("init"), vec![0u8; 24]).unwrap();
        // A link out of the tree must go, not what it points to.
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("keep"), b"x").unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("link")).unwrap();
        let dev = fs::metadata(root).unwrap().dev();

        // A device number nothing is on: nothing is touched.
        assert_eq!(remove_on_device(root, dev ^ 0xffff), 0);
        assert!(root.join("init").exists());

        // A mount inside the tree (needs root and a private mount namespace for this
        // thread; skipped elsewhere) must be left alone, as /sysroot and /dev are.
        let mounted = mount_tmpfs_privately(&root.join("sysroot"));
        if mounted {
            fs::write(root.join("sysroot/sbin-init"), b"stage 2").unwrap();
        }

        assert_eq!(remove_on_device(root, dev), 1024);
        assert!(outside.path().join("keep").exists());
        let left: Vec<_> = fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        if mounted {
            assert_eq!(left, ["sysroot"]);
            assert!(root.join("sysroot/sbin-init").exists());
            umount2(&root.join("sysroot"), MntFlags::MNT_DETACH).unwrap();
        } else {
            assert!(left.is_empty(), "{left:?}");
        }
    }

    /// Mounts a tmpfs at `at` in a mount namespace of this test thread alone. False when
    /// not permitted (not root, or in a sandbox).
    fn mount_tmpfs_privately(at: &Path) -> bool {
        fs::create_dir_all(at).unwrap();
        // unshare(CLONE_NEWNS) from a threaded process moves only the calling thread
        // (it implies CLONE_FS), so the rest of the test run keeps the host's mounts.
        if nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).is_err() {
            return false;
        }
        if mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .is_err()
        {
            return false;
        }
        mount(
            Some("tmpfs"),
            at,
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .is_ok()
    }
}
