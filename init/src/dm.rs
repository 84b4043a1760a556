//! Device-mapper, by hand: the few ioctls of linux/dm-ioctl.h (interface 4.x) that stage 1
//! needs to put one read-only target (dm-verity) over the root disk. The `devicemapper`
//! crate would need bindgen and libclang at build time for the same four calls.
//!
//! Every call passes a `struct dm_ioctl` header; a table load follows it with one
//! `struct dm_target_spec` and the target's NUL-terminated parameter string, padded so the
//! whole buffer stays 8-byte aligned, as the kernel's parser expects.

use std::fs::{File, OpenOptions};
use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use nix::sys::stat::{Mode, SFlag, makedev, mknod};

/// The control node; devtmpfs creates it when dm_mod loads.
pub const CONTROL: &str = "/dev/mapper/control";
/// device-mapper's control node is misc (10) minor 236 (linux/miscdevice.h).
const MISC_MAJOR: u64 = 10;
const DM_CONTROL_MINOR: u64 = 236;

const DM_NAME_LEN: usize = 128;
const DM_UUID_LEN: usize = 129;
const DM_MAX_TYPE_NAME: usize = 16;

/// The interface version we speak. The kernel accepts any request whose major matches and
/// whose minor is not newer than its own; 4.0 is all these commands need.
const DM_VERSION: [u32; 3] = [4, 0, 0];

const DM_IOCTL_TYPE: u8 = 0xfd;
const DM_DEV_CREATE_CMD: u8 = 3;
const DM_DEV_REMOVE_CMD: u8 = 4;
const DM_DEV_SUSPEND_CMD: u8 = 6;
const DM_TABLE_LOAD_CMD: u8 = 9;

/// In a table load: open the underlying devices read-only and make the mapped device
/// read-only when it is resumed. The root disk itself is read-only (QEMU `readonly=on`),
/// so a read-write table would not even load.
pub const DM_READONLY_FLAG: u32 = 1 << 0;
/// In DM_DEV_SUSPEND: suspend. Without it the same command resumes, which is what makes a
/// loaded table live.
#[cfg(test)]
const DM_SUSPEND_FLAG: u32 = 1 << 1;

/// `struct dm_ioctl`, field for field.
#[repr(C)]
#[allow(dead_code)] // Only its layout is used: the buffer is written at its offsets.
struct DmIoctl {
    version: [u32; 3],
    data_size: u32,
    data_start: u32,
    target_count: u32,
    open_count: i32,
    flags: u32,
    event_nr: u32,
    padding: u32,
    dev: u64,
    name: [u8; DM_NAME_LEN],
    uuid: [u8; DM_UUID_LEN],
    data: [u8; 7],
}

/// `struct dm_target_spec`; its parameter string follows it directly.
#[repr(C)]
#[allow(dead_code)] // Only its layout is used.
struct DmTargetSpec {
    sector_start: u64,
    length: u64,
    status: i32,
    next: u32,
    target_type: [u8; DM_MAX_TYPE_NAME],
}

const HEADER: usize = size_of::<DmIoctl>();
/// Far more than any one-line table needs; keeps every size in the buffer a small u32.
const MAX_PARAMS: usize = 64 << 10;
const SPEC: usize = size_of::<DmTargetSpec>();

#[derive(Debug, thiserror::Error)]
pub enum DmError {
    #[error(
        "cannot open the device-mapper control node {CONTROL}: {0}; is the dm_mod module in the initramfs's load list?"
    )]
    Control(#[source] io::Error),
    #[error("device-mapper name {0:?} is invalid: it must be 1 to 127 bytes without '/' or NUL")]
    Name(String),
    #[error("device-mapper target type {0:?} is invalid: it must be 1 to 15 bytes without NUL")]
    TargetType(String),
    #[error("device-mapper table line {0:?} is not `start length target_type params`")]
    Table(String),
    #[error("the {target_type} table parameters are unusable: {why}")]
    Params {
        target_type: String,
        why: &'static str,
    },
    #[error("device-mapper {what} for {name}: {source}")]
    Ioctl {
        what: &'static str,
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("creating the device node {}: {source}", node.display())]
    Node {
        node: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// One table line: `start length target_type params`, in 512-byte sectors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub start_sector: u64,
    pub sectors: u64,
    pub target_type: String,
    pub params: String,
}

impl Target {
    /// One line of a dmsetup-style table: `start length target_type params…`.
    pub fn parse(line: &str) -> Result<Target, DmError> {
        let bad = || DmError::Table(line.to_string());
        let mut words = line.trim().splitn(4, ' ');
        let mut next = || words.next().filter(|w| !w.is_empty()).ok_or_else(bad);
        let start_sector = next()?.parse().map_err(|_| bad())?;
        let sectors = next()?.parse().map_err(|_| bad())?;
        let target_type = next()?.to_string();
        let params = next()?.trim().to_string();
        Ok(Target {
            start_sector,
            sectors,
            target_type,
            params,
        })
    }
}

/// A live mapped device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    /// The kernel's dev_t (`makedev(major, minor)`).
    pub dev: u64,
    /// `/dev/mapper/NAME`, made by us so the node exists however devtmpfs names it.
    pub node: PathBuf,
}

/// Creates `name` with one read-only `target` and activates it. On any failure after the
/// device was created, it is removed again, so a retry (or the next boot stage) does not
/// find a half-made device.
pub fn create_readonly(name: &str, target: &Target) -> Result<Device, DmError> {
    let control = open_control()?;
    let created = call(&control, DM_DEV_CREATE_CMD, header(name, DM_READONLY_FLAG)?)
        .map_err(|source| ioctl_error("create", name, source))?;
    let finish = || -> Result<Device, DmError> {
        let load = table_load(name, DM_READONLY_FLAG, target)?;
        call(&control, DM_TABLE_LOAD_CMD, load).map_err(|source| {
            ioctl_error(
                "table load (the kernel log says why the table was refused)",
                name,
                source,
            )
        })?;
        call(
            &control,
            DM_DEV_SUSPEND_CMD,
            header(name, DM_READONLY_FLAG)?,
        )
        .map_err(|source| ioctl_error("resume", name, source))?;
        let dev = read_dev(&created);
        let node = Path::new("/dev/mapper").join(name);
        make_node(&node, dev)?;
        Ok(Device {
            name: name.to_string(),
            dev,
            node,
        })
    };
    finish().inspect_err(|_| {
        let _ = remove_with(&control, name);
    })
}

/// Removes the mapped device `name` (and our node for it).
pub fn remove(name: &str) -> Result<(), DmError> {
    let control = open_control()?;
    remove_with(&control, name)
}

fn remove_with(control: &File, name: &str) -> Result<(), DmError> {
    let _ = std::fs::remove_file(Path::new("/dev/mapper").join(name));
    call(control, DM_DEV_REMOVE_CMD, header(name, 0)?)
        .map_err(|source| ioctl_error("remove", name, source))?;
    Ok(())
}

fn ioctl_error(what: &'static str, name: &str, source: io::Error) -> DmError {
    DmError::Ioctl {
        what,
        name: name.to_string(),
        source,
    }
}

/// Opens the control node, making it first if devtmpfs has none (a kernel with dm built in
/// but the node not yet created, or a /dev that is not devtmpfs).
fn open_control() -> Result<File, DmError> {
    let open = || OpenOptions::new().read(true).write(true).open(CONTROL);
    match open() {
        Ok(f) => Ok(f),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all("/dev/mapper").map_err(DmError::Control)?;
            mknod(
                CONTROL,
                SFlag::S_IFCHR,
                Mode::from_bits_truncate(0o600),
                makedev(MISC_MAJOR, DM_CONTROL_MINOR),
            )
            .map_err(|e| DmError::Control(e.into()))?;
            open().map_err(DmError::Control)
        }
        Err(e) => Err(DmError::Control(e)),
    }
}

/// Makes a block node for `dev` at `node`, replacing whatever a previous attempt left.
fn make_node(node: &Path, dev: u64) -> Result<(), DmError> {
    let node_error = |source| DmError::Node {
        node: node.to_path_buf(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(node) {
        use std::os::unix::fs::MetadataExt;
        if meta.file_type().is_block_device() && meta.rdev() == dev {
            return Ok(());
        }
        std::fs::remove_file(node).map_err(node_error)?;
    }
    if let Some(parent) = node.parent() {
        std::fs::create_dir_all(parent).map_err(node_error)?;
    }
    mknod(node, SFlag::S_IFBLK, Mode::from_bits_truncate(0o400), dev)
        .map_err(|e| node_error(e.into()))
}

/// Runs one ioctl on `buffer`; returns the buffer as the kernel left it.
fn call(control: &File, cmd: u8, mut buffer: Vec<u8>) -> io::Result<Vec<u8>> {
    let request = nix::request_code_readwrite!(DM_IOCTL_TYPE, cmd, HEADER);
    // SAFETY: `buffer` is a complete dm_ioctl (plus its data) of exactly the length its
    // data_size field announces, so the kernel reads and writes only inside it; it lives
    // across the call and nothing else aliases it.
    let rc = unsafe { libc::ioctl(control.as_raw_fd(), request, buffer.as_mut_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(buffer)
}

fn put(buffer: &mut [u8], offset: usize, bytes: &[u8]) {
    buffer[offset..offset + bytes.len()].copy_from_slice(bytes);
}

/// A header-only request for device `name`.
fn header(name: &str, flags: u32) -> Result<Vec<u8>, DmError> {
    with_data(name, flags, 0, &[])
}

/// A header followed by `data` (already 8-byte padded), for `target_count` targets.
fn with_data(name: &str, flags: u32, target_count: u32, data: &[u8]) -> Result<Vec<u8>, DmError> {
    if name.is_empty() || name.len() >= DM_NAME_LEN || name.contains(['/', '\0']) {
        return Err(DmError::Name(name.to_string()));
    }
    let mut buffer = vec![0u8; HEADER + data.len()];
    for (i, v) in DM_VERSION.iter().enumerate() {
        put(
            &mut buffer,
            offset_of!(DmIoctl, version) + 4 * i,
            &v.to_ne_bytes(),
        );
    }
    // table_load caps the data far below u32::MAX.
    let size = buffer.len() as u32;
    put(
        &mut buffer,
        offset_of!(DmIoctl, data_size),
        &size.to_ne_bytes(),
    );
    put(
        &mut buffer,
        offset_of!(DmIoctl, data_start),
        &(HEADER as u32).to_ne_bytes(),
    );
    put(
        &mut buffer,
        offset_of!(DmIoctl, target_count),
        &target_count.to_ne_bytes(),
    );
    put(
        &mut buffer,
        offset_of!(DmIoctl, flags),
        &flags.to_ne_bytes(),
    );
    put(&mut buffer, offset_of!(DmIoctl, name), name.as_bytes());
    put(&mut buffer, HEADER, data);
    Ok(buffer)
}

/// DM_TABLE_LOAD's buffer: header, one target spec, its parameters.
fn table_load(name: &str, flags: u32, target: &Target) -> Result<Vec<u8>, DmError> {
    let kind = &target.target_type;
    if kind.is_empty() || kind.len() >= DM_MAX_TYPE_NAME || kind.contains('\0') {
        return Err(DmError::TargetType(kind.clone()));
    }
    let refuse = |why| {
        Err(DmError::Params {
            target_type: kind.clone(),
            why,
        })
    };
    if target.params.contains('\0') {
        return refuse("they contain a NUL byte");
    }
    if target.params.len() > MAX_PARAMS {
        return refuse("they are longer than 64 KiB");
    }
    // The parameters end with a NUL, and the next spec (were there one) must start 8-byte
    // aligned: `next` is the distance from this spec to it.
    let params_len = (target.params.len() + 1).next_multiple_of(8);
    let mut spec = vec![0u8; SPEC + params_len];
    put(
        &mut spec,
        offset_of!(DmTargetSpec, sector_start),
        &target.start_sector.to_ne_bytes(),
    );
    put(
        &mut spec,
        offset_of!(DmTargetSpec, length),
        &target.sectors.to_ne_bytes(),
    );
    let next = spec.len() as u32;
    put(
        &mut spec,
        offset_of!(DmTargetSpec, next),
        &next.to_ne_bytes(),
    );
    put(
        &mut spec,
        offset_of!(DmTargetSpec, target_type),
        kind.as_bytes(),
    );
    put(&mut spec, SPEC, target.params.as_bytes());
    with_data(name, flags, 1, &spec)
}

/// The `dev` the kernel returned (huge_encode_dev, which is userspace's makedev encoding).
fn read_dev(buffer: &[u8]) -> u64 {
    let at = offset_of!(DmIoctl, dev);
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&buffer[at..at + 8]);
    u64::from_ne_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_ne_bytes(b[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn structs_match_the_kernel_header() {
        // Sizes and offsets from linux/dm-ioctl.h on x86_64 (pahole).
        assert_eq!(size_of::<DmIoctl>(), 312);
        assert_eq!(offset_of!(DmIoctl, data_size), 12);
        assert_eq!(offset_of!(DmIoctl, data_start), 16);
        assert_eq!(offset_of!(DmIoctl, target_count), 20);
        assert_eq!(offset_of!(DmIoctl, open_count), 24);
        assert_eq!(offset_of!(DmIoctl, flags), 28);
        assert_eq!(offset_of!(DmIoctl, event_nr), 32);
        assert_eq!(offset_of!(DmIoctl, dev), 40);
        assert_eq!(offset_of!(DmIoctl, name), 48);
        assert_eq!(offset_of!(DmIoctl, uuid), 176);
        assert_eq!(offset_of!(DmIoctl, data), 305);
        assert_eq!(size_of::<DmTargetSpec>(), 40);
        assert_eq!(offset_of!(DmTargetSpec, status), 16);
        assert_eq!(offset_of!(DmTargetSpec, next), 20);
        assert_eq!(offset_of!(DmTargetSpec, target_type), 24);
    }

    #[test]
    fn request_numbers_match_the_kernel_header() {
        // _IOWR(0xfd, cmd, struct dm_ioctl), as strace prints them.
        assert_eq!(
            nix::request_code_readwrite!(DM_IOCTL_TYPE, DM_DEV_CREATE_CMD, HEADER),
            0xc138fd03
        );
        assert_eq!(
            nix::request_code_readwrite!(DM_IOCTL_TYPE, DM_TABLE_LOAD_CMD, HEADER),
            0xc138fd09
        );
        assert_eq!(
            nix::request_code_readwrite!(DM_IOCTL_TYPE, DM_DEV_SUSPEND_CMD, HEADER),
            0xc138fd06
        );
        assert_eq!(
            nix::request_code_readwrite!(DM_IOCTL_TYPE, DM_DEV_REMOVE_CMD, HEADER),
            0xc138fd04
        );
        assert_ne!(DM_SUSPEND_FLAG, DM_READONLY_FLAG);
    }

    #[test]
    fn a_header_names_the_device_and_its_size() {
        let b = header("keel-root", DM_READONLY_FLAG).unwrap();
        assert_eq!(b.len(), 312);
        assert_eq!([u32_at(&b, 0), u32_at(&b, 4), u32_at(&b, 8)], [4, 0, 0]);
        assert_eq!(u32_at(&b, 12), 312);
        assert_eq!(u32_at(&b, 16), 312);
        assert_eq!(u32_at(&b, 20), 0);
        assert_eq!(u32_at(&b, 28), DM_READONLY_FLAG);
        assert_eq!(&b[48..57], b"keel-root");
        assert_eq!(b[57], 0);
    }

    #[test]
    fn a_table_load_carries_one_aligned_target() {
        let params = "1 /dev/vda /dev/vda 4096 4096 10 10 sha256 ab cd";
        let target = Target {
            start_sector: 0,
            sectors: 80,
            target_type: "verity".into(),
            params: params.into(),
        };
        let b = table_load("keel-root", DM_READONLY_FLAG, &target).unwrap();
        assert_eq!(b.len() % 8, 0);
        assert_eq!(u32_at(&b, 12) as usize, b.len());
        assert_eq!(u32_at(&b, 16), 312);
        assert_eq!(u32_at(&b, 20), 1);
        let spec = 312;
        assert_eq!(u64_at(&b, spec), 0);
        assert_eq!(u64_at(&b, spec + 8), 80);
        let next = u32_at(&b, spec + 20) as usize;
        assert_eq!(next % 8, 0);
        assert_eq!(spec + next, b.len());
        assert_eq!(&b[spec + 24..spec + 30], b"verity");
        assert_eq!(b[spec + 30], 0);
        let text = &b[spec + 40..];
        assert_eq!(&text[..params.len()], params.as_bytes());
        assert!(text[params.len()..].iter().all(|&c| c == 0));
        assert!(
            !text[params.len()..].is_empty(),
            "the parameters end with a NUL"
        );
    }

    #[test]
    fn a_table_line_splits_into_its_target() {
        let t =
            Target::parse("0 80 verity 1 /dev/vda /dev/vda 4096 4096 10 10 sha256 ab cd").unwrap();
        assert_eq!(
            t,
            Target {
                start_sector: 0,
                sectors: 80,
                target_type: "verity".into(),
                params: "1 /dev/vda /dev/vda 4096 4096 10 10 sha256 ab cd".into(),
            }
        );
        for bad in ["", "0 80 verity", "x 80 verity 1", "0 -1 verity 1"] {
            assert!(
                matches!(Target::parse(bad), Err(DmError::Table(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn bad_names_are_refused_before_the_kernel_sees_them() {
        assert!(matches!(header("a/b", 0), Err(DmError::Name(_))));
        assert!(matches!(header("", 0), Err(DmError::Name(_))));
        assert!(matches!(header(&"x".repeat(128), 0), Err(DmError::Name(_))));
        let target = Target {
            start_sector: 0,
            sectors: 8,
            target_type: "a-very-long-target".into(),
            params: String::new(),
        };
        assert!(matches!(
            table_load("x", 0, &target),
            Err(DmError::TargetType(_))
        ));
    }

    #[test]
    fn the_returned_dev_is_read_where_the_kernel_writes_it() {
        let mut b = header("x", 0).unwrap();
        let dev = makedev(253, 0);
        b[40..48].copy_from_slice(&dev.to_ne_bytes());
        assert_eq!(read_dev(&b), dev);
    }
}
