//! /var grows into its disk. A disk image is written to disks larger than itself (`dd` onto a
//! server's SSD, a cloud volume sized at launch, `keel run --disk-size`), and a cloud volume
//! can be enlarged later. At every boot, before /var is mounted, the `KEEL-VAR` partition is
//! extended to the end of its disk when there is room (the GPT's backup header moves to the
//! disk's new end first, as FCOS and cloud-init's growpart do), and the kernel is told with
//! BLKPG; once mounted, an ext4 smaller than its partition is grown online
//! (EXT4_IOC_RESIZE_FS). No partitioning tool and no resize2fs: the GPT is rewritten with
//! gptman, the rest is two ioctls.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::blockdev::BlockDevice;

/// Partitions end on 1 MiB boundaries, like the ones `keel build` lays out.
const ALIGN_BYTES: u64 = 1 << 20;
/// Less room than this after the partition is not worth a rewrite of the partition table.
const MIN_GROWTH_BYTES: u64 = 16 << 20;

/// `BLKPG` (`_IO(0x12, 105)`) and its resize operation (linux/blkpg.h).
const BLKPG: libc::c_ulong = 0x1269;
const BLKPG_RESIZE_PARTITION: libc::c_int = 3;
/// `EXT4_IOC_RESIZE_FS`: `_IOW('f', 16, __u64)`.
const EXT4_IOC_RESIZE_FS: libc::c_ulong = 0x4008_6610;

#[repr(C)]
struct BlkpgPartition {
    start: libc::c_longlong,
    length: libc::c_longlong,
    pno: libc::c_int,
    devname: [libc::c_char; 64],
    volname: [libc::c_char; 64],
}

#[repr(C)]
struct BlkpgIoctlArg {
    op: libc::c_int,
    flags: libc::c_int,
    datalen: libc::c_int,
    data: *mut libc::c_void,
}

/// A partition that was extended: its size before and after, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grown {
    pub from: u64,
    pub to: u64,
}

/// Extends `partition` (a GPT partition) to the end of its disk if there is room. `Ok(None)`:
/// nothing to do.
pub fn grow_partition(partition: &BlockDevice) -> Result<Option<Grown>, String> {
    let sys = Path::new("/sys/class/block").join(&partition.name);
    let number: u32 = read_sys(&sys.join("partition"))?
        .parse()
        .map_err(|_| format!("{}: not a partition", partition.node.display()))?;
    let disk_name = crate::blockdev::parent_disk(&partition.name)
        .ok_or_else(|| format!("{}: no parent disk", sys.display()))?;
    let disk_node = PathBuf::from("/dev").join(&disk_name);
    let mut disk = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk_node)
        .map_err(|e| format!("{}: {e}", disk_node.display()))?;
    let Some((grown, start, len)) = grow_in_table(&mut disk, number)
        .map_err(|e| format!("the partition table of {}: {e}", disk_node.display()))?
    else {
        return Ok(None);
    };
    disk.sync_all()
        .map_err(|e| format!("{}: {e}", disk_node.display()))?;
    tell_kernel(&disk, number, start, len).map_err(|e| {
        format!(
            "telling the kernel that {} grew to {} MiB: {e}",
            partition.node.display(),
            len >> 20
        )
    })?;
    Ok(Some(grown))
}

/// The partition-table half of [`grow_partition`], on anything that reads and writes like a
/// disk: moves the backup GPT to the end, extends partition `number` to the last usable
/// 1 MiB boundary. Returns the growth and the partition's new start and length in bytes.
fn grow_in_table(disk: &mut File, number: u32) -> Result<Option<(Grown, u64, u64)>, gptman::Error> {
    let mut gpt = gptman::GPT::find_from(disk)?;
    let sector = gpt.sector_size;
    let disk_len = disk.seek(SeekFrom::End(0))?;
    let entry = &gpt[number];
    if entry.is_unused() {
        return Ok(None);
    }
    let (start_lba, end_lba) = (entry.starting_lba, entry.ending_lba);
    // Nothing may follow the partition: growing it must never reach another.
    if gpt
        .iter()
        .any(|(i, e)| i != number && e.is_used() && e.starting_lba > end_lba)
    {
        return Ok(None);
    }
    let mut header = gpt.header.clone();
    header.update_from(disk, sector)?;
    let usable_end = (header.last_usable_lba + 1) * sector;
    let new_end = usable_end / ALIGN_BYTES * ALIGN_BYTES;
    let old_end = (end_lba + 1) * sector;
    if new_end < old_end + MIN_GROWTH_BYTES || new_end > disk_len {
        return Ok(None);
    }
    gpt.header = header;
    gpt[number].ending_lba = new_end / sector - 1;
    // The new backup table (at the disk's new end) first, flushed, then the primary: a power
    // cut in between leaves the old primary valid; one that tears the primary leaves the new
    // backup where firmware looks for it, at the last sector.
    let entries: Vec<gptman::GPTPartitionEntry> = (1..=gpt.header.number_of_partition_entries)
        .map(|i| gpt[i].clone())
        .collect();
    let mut backup = gpt.header.clone();
    backup.primary_lba = gpt.header.backup_lba;
    backup.backup_lba = gpt.header.primary_lba;
    backup.partition_entry_lba = gpt.header.last_usable_lba + 1;
    backup.write_into(disk, sector, &entries)?;
    disk.sync_all()?;
    gpt.header.write_into(disk, sector, &entries)?;
    let start = start_lba * sector;
    Ok(Some((
        Grown {
            from: old_end - start,
            to: new_end - start,
        },
        start,
        new_end - start,
    )))
}

fn tell_kernel(disk: &File, number: u32, start: u64, len: u64) -> std::io::Result<()> {
    let mut part = BlkpgPartition {
        start: start as libc::c_longlong,
        length: len as libc::c_longlong,
        pno: number as libc::c_int,
        devname: [0; 64],
        volname: [0; 64],
    };
    let mut arg = BlkpgIoctlArg {
        op: BLKPG_RESIZE_PARTITION,
        flags: 0,
        datalen: std::mem::size_of::<BlkpgPartition>() as libc::c_int,
        data: (&mut part as *mut BlkpgPartition).cast(),
    };
    // SAFETY: BLKPG reads a blkpg_ioctl_arg whose data points at a blkpg_partition of
    // `datalen` bytes; both live on this stack frame for the duration of the call.
    let rc = unsafe { libc::ioctl(disk.as_raw_fd(), BLKPG, &mut arg) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Grows the ext4 mounted at `mount_point` (on `node`) to fill its device when it is at
/// least [`MIN_GROWTH_BYTES`] smaller. Returns the new size in bytes when it grew.
pub fn grow_ext4(node: &Path, mount_point: &Path) -> Result<Option<u64>, String> {
    let mut head = vec![0u8; 2048];
    File::open(node)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(|e| format!("{}: {e}", node.display()))?;
    let Some((blocks, block_size)) = ext4_size(&head) else {
        return Err(format!("{}: no ext4 superblock", node.display()));
    };
    let device_len = File::open(node)
        .and_then(|mut f| f.seek(SeekFrom::End(0)))
        .map_err(|e| format!("{}: {e}", node.display()))?;
    let target = device_len / block_size;
    if target * block_size < blocks * block_size + MIN_GROWTH_BYTES {
        return Ok(None);
    }
    let dir = File::open(mount_point).map_err(|e| format!("{}: {e}", mount_point.display()))?;
    let count: u64 = target;
    // SAFETY: EXT4_IOC_RESIZE_FS reads one u64 (the new block count) from the pointer,
    // which points at a local that outlives the call.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), EXT4_IOC_RESIZE_FS, &count) };
    if rc < 0 {
        return Err(format!(
            "growing the ext4 on {} to {} MiB: {}",
            node.display(),
            (target * block_size) >> 20,
            std::io::Error::last_os_error()
        ));
    }
    Ok(Some(target * block_size))
}

/// The block count and block size in an ext4 superblock (`head` holds the device's first
/// 2 KiB).
fn ext4_size(head: &[u8]) -> Option<(u64, u64)> {
    let sb = head.get(1024..2048)?;
    let u32_at = |at: usize| Some(u32::from_le_bytes(sb.get(at..at + 4)?.try_into().ok()?));
    if u16::from_le_bytes(sb.get(0x38..0x3a)?.try_into().ok()?) != 0xEF53 {
        return None;
    }
    let lo = u64::from(u32_at(0x04)?);
    let incompat = u32_at(0x60)?;
    let hi = if incompat & 0x80 != 0 {
        u64::from(u32_at(0x150)?)
    } else {
        0
    };
    let log = u32_at(0x18)?;
    if log > 6 {
        return None;
    }
    Some(((hi << 32) | lo, 1024u64 << log))
}

fn read_sys(path: &Path) -> Result<String, String> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A GPT disk image laid out like `keel build`'s, in small: three partitions, the last
    /// one `var`.
    fn disk(len: u64) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut f = file.reopen().unwrap();
        f.set_len(len).unwrap();
        let mut gpt = gptman::GPT::new_from(&mut f, 512, [7; 16]).unwrap();
        for (i, (start, end)) in [(1, 5), (5, 9), (9, 12)].into_iter().enumerate() {
            gpt[(i + 1) as u32] = gptman::GPTPartitionEntry {
                partition_type_guid: [1; 16],
                unique_partition_guid: [i as u8 + 2; 16],
                starting_lba: start * MIB / 512,
                ending_lba: end * MIB / 512 - 1,
                attribute_bits: 0,
                partition_name: "part".into(),
            };
        }
        gpt.write_into(&mut f).unwrap();
        file
    }

    #[test]
    fn the_last_partition_grows_to_the_end_of_a_larger_disk() {
        let file = disk(13 * MIB);
        let mut f = file.reopen().unwrap();
        // Nothing to grow into yet.
        assert!(grow_in_table(&mut f, 3).unwrap().is_none());
        // The image written to a disk of 64 MiB.
        f.set_len(64 * MIB).unwrap();
        let (grown, start, len) = grow_in_table(&mut f, 3).unwrap().unwrap();
        assert_eq!(grown.from, 3 * MIB);
        assert_eq!(start, 9 * MIB);
        // The last MiB holds the backup table: the partition ends on the boundary before.
        assert_eq!(len, 54 * MIB);
        assert_eq!(grown.to, len);
        // Both copies of the table say so, the backup at the disk's new end.
        let gpt = gptman::GPT::read_from(&mut f, 512).unwrap();
        assert_eq!(gpt[3].ending_lba, 63 * MIB / 512 - 1);
        assert_eq!(gpt.header.backup_lba, 64 * MIB / 512 - 1);
        let mut backup_only = file.reopen().unwrap();
        use std::io::Write;
        backup_only.seek(SeekFrom::Start(512)).unwrap();
        backup_only.write_all(&[0; 512]).unwrap();
        let from_backup = gptman::GPT::read_from(&mut backup_only, 512).unwrap();
        assert!(from_backup.header.is_backup());
        assert_eq!(from_backup[3].ending_lba, 63 * MIB / 512 - 1);
        // Done: the next boot finds nothing to do.
        let mut f = disk(13 * MIB).reopen().unwrap();
        f.set_len(64 * MIB).unwrap();
        grow_in_table(&mut f, 3).unwrap();
        assert!(grow_in_table(&mut f, 3).unwrap().is_none());
    }

    #[test]
    fn a_partition_with_another_after_it_never_grows() {
        let file = disk(13 * MIB);
        let mut f = file.reopen().unwrap();
        f.set_len(64 * MIB).unwrap();
        assert!(grow_in_table(&mut f, 2).unwrap().is_none());
        assert!(grow_in_table(&mut f, 4).unwrap().is_none());
    }

    #[test]
    fn ext4_sizes_are_read_from_a_real_superblock() {
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(32 * MIB).unwrap();
        let mke2fs = ["/sbin/mke2fs", "/usr/sbin/mke2fs"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("e2fsprogs");
        let status = std::process::Command::new(mke2fs)
            .args(["-q", "-F", "-t", "ext4", "-b", "4096"])
            .arg(file.path())
            .status()
            .unwrap();
        assert!(status.success());
        let mut head = vec![0u8; 2048];
        file.reopen().unwrap().read_exact(&mut head).unwrap();
        assert_eq!(ext4_size(&head), Some((32 * MIB / 4096, 4096)));
        head[1024 + 0x38] = 0;
        assert_eq!(ext4_size(&head), None);
    }
}
