//! Block devices and what is on them, read straight from sysfs and the superblocks (what
//! libblkid would tell, for the few filesystems Keel uses): the root image is found by its
//! erofs UUID, the data disk and the config disk by label, a blank disk by its serial or
//! partition name.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const SYS_CLASS_BLOCK: &str = "/sys/class/block";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDevice {
    /// The kernel's name: `vda`, `vda1`, `dm-0`.
    pub name: String,
    pub node: PathBuf,
    /// The disk's serial (virtio-blk `serial=`), for a whole disk that has one.
    pub serial: Option<String>,
    /// The GPT partition name, for a partition.
    pub partname: Option<String>,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Probe {
    /// `ext4` (also ext2/ext3), `erofs`, `iso9660` or `squashfs`.
    pub fstype: Option<&'static str>,
    pub label: Option<String>,
    /// Lowercase, 8-4-4-4-12.
    pub uuid: Option<String>,
    /// No filesystem Keel knows and nothing but zeros where filesystems, partition tables
    /// and RAID or LVM labels keep their headers (the first MiB and the last 64 KiB): safe
    /// to format. Anything else is somebody's data.
    pub blank: bool,
}

/// Every block device the kernel knows, whole disks and partitions, in name order.
/// Loop, RAM and zram devices are left out: they are never the root, the data disk or the
/// config disk.
pub fn list() -> Vec<BlockDevice> {
    list_in(Path::new(SYS_CLASS_BLOCK), Path::new("/dev"))
}

fn list_in(sys: &Path, dev: &Path) -> Vec<BlockDevice> {
    let mut devices = Vec::new();
    let Ok(entries) = fs::read_dir(sys) else {
        return devices;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if ["loop", "ram", "zram"].iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let dir = entry.path();
        let read = |file: &str| {
            fs::read_to_string(dir.join(file))
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        };
        let size_bytes = read("size")
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
            * 512;
        let partname = read("uevent").and_then(|u| {
            u.lines()
                .find_map(|l| l.strip_prefix("PARTNAME=").map(str::to_string))
        });
        devices.push(BlockDevice {
            node: dev.join(&name),
            serial: read("serial"),
            partname,
            size_bytes,
            name,
        });
    }
    devices.sort_by(|a, b| a.name.cmp(&b.name));
    devices
}

/// The whole disk a partition (`vda2`) is on (`vda`): /sys/class/block/vda2 links to
/// .../block/vda/vda2. `None` for a whole disk.
pub fn parent_disk(partition: &str) -> Option<String> {
    let sys = Path::new(SYS_CLASS_BLOCK).join(partition);
    // A whole disk is no partition: it has no parent disk.
    if !sys.join("partition").exists() {
        return None;
    }
    let real = fs::canonicalize(&sys).ok()?;
    Some(real.parent()?.file_name()?.to_string_lossy().into_owned())
}

/// Where the headers Keel recognises sit.
const SUPERBLOCK: u64 = 1024;
const EXT_MAGIC: u16 = 0xEF53;
const EROFS_MAGIC: u32 = 0xE0F5_E1E2;
const ISO_DESCRIPTOR: u64 = 0x8000;
const SQUASHFS_MAGIC: &[u8; 4] = b"hsqs";
const BLANK_HEAD: usize = 1 << 20;
const BLANK_TAIL: u64 = 64 << 10;

/// Reads what is on the device (or image file) at `node`.
pub fn probe(node: &Path) -> io::Result<Probe> {
    let mut file = fs::File::open(node)?;
    let size = file.seek(SeekFrom::End(0))?;
    file.seek(SeekFrom::Start(0))?;
    let mut head = Vec::with_capacity(BLANK_HEAD);
    (&mut file).take(BLANK_HEAD as u64).read_to_end(&mut head)?;
    let mut probe = probe_head(&head);
    if probe.fstype.is_none() && head.iter().all(|b| *b == 0) {
        let tail_start = size.saturating_sub(BLANK_TAIL).max(head.len() as u64);
        file.seek(SeekFrom::Start(tail_start))?;
        let mut tail = Vec::new();
        file.take(BLANK_TAIL).read_to_end(&mut tail)?;
        probe.blank = tail.iter().all(|b| *b == 0);
    }
    Ok(probe)
}

/// The probe from the device's first bytes (at least 64 KiB of them for every format).
fn probe_head(head: &[u8]) -> Probe {
    let at = |offset: u64, len: usize| -> Option<&[u8]> {
        let start = usize::try_from(offset).ok()?;
        head.get(start..start.checked_add(len)?)
    };
    let le16 = |offset| at(offset, 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let le32 = |offset| at(offset, 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));

    if le32(SUPERBLOCK) == Some(EROFS_MAGIC) {
        return Probe {
            fstype: Some("erofs"),
            uuid: at(SUPERBLOCK + 48, 16).and_then(uuid_string),
            label: at(SUPERBLOCK + 64, 16).and_then(|b| text_field(b, 0)),
            blank: false,
        };
    }
    if le16(SUPERBLOCK + 0x38) == Some(EXT_MAGIC) {
        return Probe {
            fstype: Some("ext4"),
            uuid: at(SUPERBLOCK + 0x68, 16).and_then(uuid_string),
            label: at(SUPERBLOCK + 0x78, 16).and_then(|b| text_field(b, 0)),
            blank: false,
        };
    }
    if at(0, 4) == Some(SQUASHFS_MAGIC) {
        return Probe {
            fstype: Some("squashfs"),
            ..Probe::default()
        };
    }
    if at(ISO_DESCRIPTOR, 6) == Some(b"\x01CD001") {
        return Probe {
            fstype: Some("iso9660"),
            label: at(ISO_DESCRIPTOR + 40, 32).and_then(|b| text_field(b, b' ')),
            ..Probe::default()
        };
    }
    Probe::default()
}

/// A fixed-size text field padded with `pad` (NULs for ext4/erofs, spaces for ISO 9660).
fn text_field(bytes: &[u8], pad: u8) -> Option<String> {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    let text = std::str::from_utf8(&bytes[..end]).ok()?;
    let text = text.trim_end_matches(pad as char).trim_end();
    (!text.is_empty()).then(|| text.to_string())
}

/// An all-zero UUID is no UUID (mkfs without one).
fn uuid_string(bytes: &[u8]) -> Option<String> {
    if bytes.iter().all(|b| *b == 0) {
        return None;
    }
    Some(keel_image::os::format_uuid(bytes.try_into().ok()?))
}

/// Polls until a device `want`s appears or `timeout` passes: disks show up asynchronously
/// once their driver is loaded. A device that cannot be read is skipped.
pub fn wait_for(
    want: impl Fn(&BlockDevice, &Probe) -> bool,
    timeout: Duration,
) -> Option<(BlockDevice, Probe)> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = find(&want) {
            return Some(found);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The first device `want`s, now.
pub fn find(want: impl Fn(&BlockDevice, &Probe) -> bool) -> Option<(BlockDevice, Probe)> {
    list().into_iter().find_map(|device| {
        let probe = probe(&device.node).ok()?;
        want(&device, &probe).then_some((device, probe))
    })
}

/// One line per device, for error messages: `vda erofs uuid=… label=…, vdb blank`.
pub fn describe_all() -> String {
    let lines: Vec<String> = list()
        .iter()
        .map(|d| {
            let mut line = d.name.clone();
            match probe(&d.node) {
                Ok(p) => {
                    match (p.fstype, p.blank) {
                        (Some(t), _) => line += &format!(" {t}"),
                        (None, true) => line += " blank",
                        (None, false) => line += " unknown-content",
                    }
                    if let Some(u) = p.uuid {
                        line += &format!(" uuid={u}");
                    }
                    if let Some(l) = p.label {
                        line += &format!(" label={l}");
                    }
                }
                Err(e) => line += &format!(" unreadable ({e})"),
            }
            if let Some(s) = &d.serial {
                line += &format!(" serial={s}");
            }
            if let Some(p) = &d.partname {
                line += &format!(" partname={p}");
            }
            line
        })
        .collect();
    if lines.is_empty() {
        "no block devices".into()
    } else {
        lines.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(size: usize, writes: &[(usize, &[u8])]) -> tempfile::NamedTempFile {
        let mut bytes = vec![0u8; size];
        for (offset, data) in writes {
            bytes[*offset..*offset + data.len()].copy_from_slice(data);
        }
        let file = tempfile::NamedTempFile::new().unwrap();
        fs::write(file.path(), bytes).unwrap();
        file
    }

    #[test]
    fn ext4_label_and_uuid_are_read() {
        let uuid: Vec<u8> = (1..=16).collect();
        let f = image(
            4 << 20,
            &[
                (1024 + 0x38, &EXT_MAGIC.to_le_bytes()),
                (1024 + 0x68, &uuid),
                (1024 + 0x78, b"KEEL-VAR"),
            ],
        );
        let p = probe(f.path()).unwrap();
        assert_eq!(p.fstype, Some("ext4"));
        assert_eq!(p.label.as_deref(), Some("KEEL-VAR"));
        assert_eq!(
            p.uuid.as_deref(),
            Some("01020304-0506-0708-090a-0b0c0d0e0f10")
        );
        assert!(!p.blank);
    }

    #[test]
    fn erofs_uuid_and_iso_label_are_read() {
        let uuid = [0xabu8; 16];
        let f = image(
            64 << 10,
            &[(1024, &EROFS_MAGIC.to_le_bytes()), (1024 + 48, &uuid)],
        );
        let p = probe(f.path()).unwrap();
        assert_eq!(p.fstype, Some("erofs"));
        assert_eq!(
            p.uuid.as_deref(),
            Some("abababab-abab-abab-abab-abababababab")
        );

        let mut label = [b' '; 32];
        label[..11].copy_from_slice(b"KEEL-CONFIG");
        let f = image(64 << 10, &[(0x8000, b"\x01CD001"), (0x8000 + 40, &label)]);
        let p = probe(f.path()).unwrap();
        assert_eq!(
            (p.fstype, p.label.as_deref()),
            (Some("iso9660"), Some("KEEL-CONFIG"))
        );
    }

    #[test]
    fn only_an_all_zero_disk_is_blank() {
        assert!(probe(image(4 << 20, &[]).path()).unwrap().blank);
        // A GPT or MBR at the start, or a backup header at the end, is somebody's data.
        assert!(
            !probe(image(4 << 20, &[(510, b"\x55\xaa")]).path())
                .unwrap()
                .blank
        );
        assert!(
            !probe(image(4 << 20, &[((4 << 20) - 512, b"EFI PART")]).path())
                .unwrap()
                .blank
        );
        // Smaller than the head window: the whole thing is checked.
        assert!(probe(image(4096, &[]).path()).unwrap().blank);
    }

    #[test]
    fn a_real_mke2fs_label_is_found() {
        let Ok(mke2fs) = which("mke2fs") else { return };
        let f = image(8 << 20, &[]);
        let status = std::process::Command::new(mke2fs)
            .args(["-q", "-F", "-t", "ext4", "-L", "KEEL-VAR"])
            .arg(f.path())
            .status()
            .unwrap();
        assert!(status.success());
        let p = probe(f.path()).unwrap();
        assert_eq!(
            (p.fstype, p.label.as_deref()),
            (Some("ext4"), Some("KEEL-VAR"))
        );
        assert!(p.uuid.is_some());
    }

    fn which(tool: &str) -> Result<PathBuf, ()> {
        ["/usr/sbin", "/sbin", "/usr/bin"]
            .iter()
            .map(|d| Path::new(d).join(tool))
            .find(|p| p.is_file())
            .ok_or(())
    }

    #[test]
    fn sysfs_entries_become_devices() {
        let sys = tempfile::tempdir().unwrap();
        for (name, files) in [
            ("vda", vec![("size", "8192\n"), ("serial", "keel-root\n")]),
            (
                "vdb1",
                vec![
                    ("size", "2048\n"),
                    ("uevent", "MAJOR=254\nPARTNAME=KEEL-VAR\n"),
                ],
            ),
            ("loop0", vec![("size", "0\n")]),
        ] {
            let dir = sys.path().join(name);
            fs::create_dir(&dir).unwrap();
            for (file, text) in files {
                fs::write(dir.join(file), text).unwrap();
            }
        }
        let devices = list_in(sys.path(), Path::new("/dev"));
        assert_eq!(devices.len(), 2);
        assert_eq!(devices[0].serial.as_deref(), Some("keel-root"));
        assert_eq!(devices[0].size_bytes, 8192 * 512);
        assert_eq!(devices[1].partname.as_deref(), Some("KEEL-VAR"));
        assert_eq!(devices[1].node, Path::new("/dev/vdb1"));
    }
}
