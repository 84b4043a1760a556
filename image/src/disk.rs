//! The bootable disk image (`disk.img`): a GPT with an EFI system partition, two root slots
//! and /var, written without root, loop devices or mounting, and byte for byte the same for
//! the same inputs (issue 14, part 1; the boot path that uses it follows).
//!
//! ```text
//! 1  KEEL-ESP     512 MiB  EFI System (FAT32): the boot loader and its entries
//! 2  KEEL-ROOT-A    2 GiB  root, x86-64 (Discoverable Partitions type): the erofs (+ verity)
//! 3  KEEL-ROOT-B    2 GiB  root, x86-64: the other slot, empty until an update
//! 4  KEEL-VAR     the rest (at least 256 MiB; the first boot grows it to the disk's end)
//! ```
//!
//! Sizes are generous on purpose: Flatcar's 128 MiB /boot and 1 GiB /usr became a trap its
//! users could not leave. Every GUID (the disk's, each partition's) and the FAT volume id are
//! derived from a seed the caller computes from the build's inputs, and FAT timestamps are
//! the FAT epoch (1980-01-01), so the same inputs give the same bytes.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::esp::Slot;

const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;

pub const ESP_SIZE: u64 = 512 * MIB;
pub use crate::esp::ROOT_SLOT_SIZE;
pub const VAR_MIN_SIZE: u64 = 256 * MIB;
/// Partitions start on 1 MiB boundaries.
const ALIGN: u64 = MIB;

pub const ESP_LABEL: &str = "KEEL-ESP";
pub const ROOT_A_LABEL: &str = Slot::A.label();
pub const ROOT_B_LABEL: &str = Slot::B.label();
pub const VAR_LABEL: &str = "KEEL-VAR";

/// The EFI System Partition type.
pub const ESP_TYPE: &str = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
/// The Discoverable Partitions Specification's root partition type for x86-64.
pub const ROOT_X86_64_TYPE: &str = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709";
/// The Discoverable Partitions Specification's /var partition type.
pub const VAR_TYPE: &str = "4d21b016-b534-45c2-a9fb-5c16e091fd2d";

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the partition table: {0}")]
    Gpt(#[from] gptman::Error),
    #[error("the root image is {size} bytes: a root slot holds {ROOT_SLOT_SIZE}")]
    RootTooLarge { size: u64 },
    #[error("the EFI system partition: {0}")]
    Esp(String),
}

/// What goes on the disk.
pub struct DiskContents<'a> {
    /// The root image (erofs, with its verity tree) for slot A.
    pub root_image: &'a Path,
    /// Slot B's, if it holds one (`keel build` leaves it empty for the first update; tests
    /// lay out a machine an update has already reached).
    pub root_image_b: Option<&'a Path>,
    /// Files of the EFI system partition: a path there (`EFI/BOOT/BOOTX64.EFI`) and bytes.
    pub esp_files: Vec<(String, Vec<u8>)>,
    /// Everything that makes this disk what it is (a digest of the build's inputs): the
    /// GUIDs and the FAT volume id are derived from it.
    pub seed: [u8; 32],
}

/// Where things ended up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    pub disk_guid: String,
    /// (label, partition GUID, first byte, length in bytes), in partition order.
    pub partitions: Vec<(String, String, u64, u64)>,
    pub size: u64,
}

/// Writes the disk image at `out` (a sparse file of `ESP + 2 slots + var` bytes).
pub fn write_disk(out: &Path, contents: &DiskContents<'_>) -> Result<DiskInfo, DiskError> {
    for image in std::iter::once(contents.root_image).chain(contents.root_image_b) {
        let size = std::fs::metadata(image)?.len();
        if size > ROOT_SLOT_SIZE {
            return Err(DiskError::RootTooLarge { size });
        }
    }
    // GPT: the protective MBR, the header and 128 entries at the front, their copy at the end.
    let head = ALIGN;
    let tail = 33 * SECTOR;
    let size = head + ESP_SIZE + 2 * ROOT_SLOT_SIZE + VAR_MIN_SIZE + tail;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(out)?;
    file.set_len(size)?;

    let layout = [
        (ESP_LABEL, ESP_TYPE, ESP_SIZE),
        (ROOT_A_LABEL, ROOT_X86_64_TYPE, ROOT_SLOT_SIZE),
        (ROOT_B_LABEL, ROOT_X86_64_TYPE, ROOT_SLOT_SIZE),
        (VAR_LABEL, VAR_TYPE, VAR_MIN_SIZE),
    ];
    let disk_guid = derived_guid(&contents.seed, "disk");
    let mut gpt = gptman::GPT::new_from(&mut file, SECTOR, guid_bytes(&disk_guid))?;
    let mut partitions = Vec::new();
    let mut start = head;
    for (i, (label, kind, len)) in layout.iter().enumerate() {
        let guid = derived_guid(&contents.seed, label);
        gpt[(i + 1) as u32] = gptman::GPTPartitionEntry {
            partition_type_guid: guid_bytes(kind),
            unique_partition_guid: guid_bytes(&guid),
            starting_lba: start / SECTOR,
            ending_lba: (start + len) / SECTOR - 1,
            attribute_bits: 0,
            partition_name: (*label).into(),
        };
        partitions.push((label.to_string(), guid, start, *len));
        start += len;
    }
    gptman::GPT::write_protective_mbr_into(&mut file, SECTOR)?;
    gpt.write_into(&mut file)?;

    let (_, _, esp_start, esp_len) = &partitions[0];
    write_esp(&mut file, *esp_start, *esp_len, contents)?;
    for (slot, image) in [(1, Some(contents.root_image)), (2, contents.root_image_b)] {
        let Some(image) = image else { continue };
        let (_, _, start, _) = &partitions[slot];
        let mut root = File::open(image)?;
        file.seek(SeekFrom::Start(*start))?;
        copy_sparse(&mut root, &mut file)?;
    }
    file.sync_all()?;
    Ok(DiskInfo {
        disk_guid,
        partitions,
        size,
    })
}

/// Copies `from` to `to`'s position, skipping runs of zeros (the disk stays sparse).
fn copy_sparse(from: &mut File, to: &mut File) -> io::Result<()> {
    let mut buf = vec![0u8; MIB as usize];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        let chunk = &buf[..n];
        if chunk.iter().all(|&b| b == 0) {
            to.seek(SeekFrom::Current(n as i64))?;
        } else {
            to.write_all(chunk)?;
        }
    }
}

/// Formats the ESP as FAT32 and writes its files.
fn write_esp(
    file: &mut File,
    start: u64,
    len: u64,
    contents: &DiskContents<'_>,
) -> Result<(), DiskError> {
    let esp = |e: io::Error| DiskError::Esp(e.to_string());
    let id = derived_guid(&contents.seed, "esp-volume");
    let volume_id = u32::from_str_radix(&id[..8], 16).unwrap_or(0);
    let mut label = [b' '; 11];
    label[..ESP_LABEL.len()].copy_from_slice(ESP_LABEL.as_bytes());
    {
        let region = Region::new(file, start, len);
        fatfs::format_volume(
            region,
            fatfs::FormatVolumeOptions::new()
                .fat_type(fatfs::FatType::Fat32)
                .volume_id(volume_id)
                .volume_label(label),
        )
        .map_err(esp)?;
    }
    let region = Region::new(file, start, len);
    // The FAT epoch for every timestamp: the same files give the same bytes.
    let options = fatfs::FsOptions::new().time_provider(&FAT_EPOCH);
    let fs = fatfs::FileSystem::new(region, options).map_err(esp)?;
    for (path, bytes) in &contents.esp_files {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let Some((name, dirs)) = parts.split_last() else {
            continue;
        };
        let mut dir = fs.root_dir();
        for d in dirs {
            dir = match dir.open_dir(d) {
                Ok(existing) => existing,
                Err(_) => dir.create_dir(d).map_err(esp)?,
            };
        }
        let mut f = dir.create_file(name).map_err(esp)?;
        f.truncate().map_err(esp)?;
        f.write_all(bytes).map_err(esp)?;
    }
    fs.unmount().map_err(esp)?;
    Ok(())
}

/// A time provider that always answers the FAT epoch.
#[derive(Debug)]
struct FatEpoch;

static FAT_EPOCH: FatEpoch = FatEpoch;

impl fatfs::TimeProvider for FatEpoch {
    fn get_current_date(&self) -> fatfs::Date {
        fatfs::Date {
            year: 1980,
            month: 1,
            day: 1,
        }
    }

    fn get_current_date_time(&self) -> fatfs::DateTime {
        fatfs::DateTime {
            date: self.get_current_date(),
            time: fatfs::Time {
                hour: 0,
                min: 0,
                sec: 0,
                millis: 0,
            },
        }
    }
}

/// A window of a file, as fatfs wants a whole device.
struct Region<'f> {
    file: &'f mut File,
    start: u64,
    len: u64,
    pos: u64,
}

impl<'f> Region<'f> {
    fn new(file: &'f mut File, start: u64, len: u64) -> Region<'f> {
        Region {
            file,
            start,
            len,
            pos: 0,
        }
    }
}

impl Read for Region<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.len.saturating_sub(self.pos) as usize;
        let n = buf.len().min(left);
        self.file.seek(SeekFrom::Start(self.start + self.pos))?;
        let n = self.file.read(&mut buf[..n])?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for Region<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.len.saturating_sub(self.pos) as usize;
        if left == 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "past the partition's end",
            ));
        }
        let n = buf.len().min(left);
        self.file.seek(SeekFrom::Start(self.start + self.pos))?;
        let n = self.file.write(&buf[..n])?;
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Seek for Region<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(p) => p as i128,
            SeekFrom::End(d) => self.len as i128 + d as i128,
            SeekFrom::Current(d) => self.pos as i128 + d as i128,
        };
        if pos < 0 || pos > self.len as i128 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "outside the partition",
            ));
        }
        self.pos = pos as u64;
        Ok(self.pos)
    }
}

/// A version-4-shaped UUID derived from `seed` and `what`.
pub fn derived_guid(seed: &[u8; 32], what: &str) -> String {
    let digest = Sha256::new()
        .chain_update(seed)
        .chain_update(what.as_bytes())
        .finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        b[0],
        b[1],
        b[2],
        b[3],
        b[4],
        b[5],
        b[6],
        b[7],
        b[8],
        b[9],
        b[10],
        b[11],
        b[12],
        b[13],
        b[14],
        b[15]
    )
}

pub use crate::esp::guid_bytes;

#[cfg(test)]
mod tests {
    use super::*;

    fn build(dir: &Path, name: &str) -> (std::path::PathBuf, DiskInfo) {
        let root = dir.join("root.img");
        if !root.exists() {
            let mut data = vec![0u8; 3 * MIB as usize];
            data[..8].copy_from_slice(b"KEELROOT");
            data[2 * MIB as usize..2 * MIB as usize + 4].copy_from_slice(b"TAIL");
            std::fs::write(&root, data).unwrap();
        }
        let out = dir.join(name);
        let info = write_disk(
            &out,
            &DiskContents {
                root_image: &root,
                root_image_b: None,
                esp_files: vec![
                    ("EFI/BOOT/BOOTX64.EFI".into(), b"MZ stub".to_vec()),
                    (
                        "loader/entries/keel-a.conf".into(),
                        b"title Keel\n".to_vec(),
                    ),
                ],
                seed: [7; 32],
            },
        )
        .unwrap();
        (out, info)
    }

    #[test]
    fn the_disk_has_its_partitions_its_esp_files_and_the_root_in_slot_a() {
        let dir = tempfile::tempdir().unwrap();
        let (out, info) = build(dir.path(), "disk.img");
        let mut f = File::open(&out).unwrap();
        let gpt = gptman::GPT::find_from(&mut f).unwrap();
        let names: Vec<String> = gpt
            .iter()
            .filter(|(_, p)| p.is_used())
            .map(|(_, p)| p.partition_name.as_str().to_string())
            .collect();
        assert_eq!(names, [ESP_LABEL, ROOT_A_LABEL, ROOT_B_LABEL, VAR_LABEL]);
        assert_eq!(gpt[1].partition_type_guid, guid_bytes(ESP_TYPE));
        assert_eq!(gpt[2].partition_type_guid, guid_bytes(ROOT_X86_64_TYPE));
        assert_eq!(gpt[4].partition_type_guid, guid_bytes(VAR_TYPE));
        assert_eq!(
            gpt[2].unique_partition_guid,
            guid_bytes(&info.partitions[1].1)
        );
        assert_eq!((gpt[1].starting_lba * SECTOR) % ALIGN, 0);
        assert_eq!(gpt[1].size().unwrap() * SECTOR, ESP_SIZE);

        // The root image at slot A's first byte, its tail where it was.
        let (_, _, root_start, _) = info.partitions[1];
        let mut head = [0u8; 8];
        f.seek(SeekFrom::Start(root_start)).unwrap();
        f.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"KEELROOT");
        f.seek(SeekFrom::Start(root_start + 2 * MIB)).unwrap();
        f.read_exact(&mut head[..4]).unwrap();
        assert_eq!(&head[..4], b"TAIL");

        // The ESP is FAT32, labelled, with the files.
        let (_, _, esp_start, esp_len) = info.partitions[0];
        let fs = fatfs::FileSystem::new(
            Region::new(&mut f, esp_start, esp_len),
            fatfs::FsOptions::new(),
        )
        .unwrap();
        assert_eq!(fs.fat_type(), fatfs::FatType::Fat32);
        assert_eq!(fs.volume_label(), ESP_LABEL);
        let mut text = String::new();
        fs.root_dir()
            .open_file("loader/entries/keel-a.conf")
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "title Keel\n");
    }

    #[test]
    fn the_same_inputs_give_the_same_bytes_and_a_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let (a, info_a) = build(dir.path(), "a.img");
        let (b, info_b) = build(dir.path(), "b.img");
        assert_eq!(info_a, info_b);
        // What is written: the table and the ESP, the root in slot A, the backup table.
        let (_, _, root_start, _) = info_a.partitions[1];
        let regions = [
            (0, ALIGN + ESP_SIZE),
            (root_start, 3 * MIB),
            (info_a.size - 33 * SECTOR, 33 * SECTOR),
        ];
        let digest = |p: &Path| {
            let mut f = File::open(p).unwrap();
            let mut h = Sha256::new();
            for (start, len) in regions {
                let mut buf = vec![0u8; len as usize];
                f.seek(SeekFrom::Start(start)).unwrap();
                f.read_exact(&mut buf).unwrap();
                h.update(&buf);
            }
            h.finalize()
        };
        assert_eq!(digest(&a), digest(&b));
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&a).unwrap();
        assert!(
            meta.blocks() * 512 < 64 * MIB,
            "sparse: {} blocks",
            meta.blocks()
        );
    }

    #[test]
    fn guids_are_stored_mixed_endian_and_derived_reproducibly() {
        assert_eq!(
            guid_bytes(ESP_TYPE),
            [
                0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e,
                0xc9, 0x3b
            ]
        );
        let g = derived_guid(&[1; 32], "disk");
        assert_eq!(g, derived_guid(&[1; 32], "disk"));
        assert_ne!(g, derived_guid(&[2; 32], "disk"));
        assert_eq!(&g[14..15], "4");
    }

    #[test]
    fn a_root_image_larger_than_a_slot_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("big.img");
        File::create(&root)
            .unwrap()
            .set_len(ROOT_SLOT_SIZE + 1)
            .unwrap();
        let e = write_disk(
            &dir.path().join("d.img"),
            &DiskContents {
                root_image: &root,
                root_image_b: None,
                esp_files: Vec::new(),
                seed: [0; 32],
            },
        )
        .unwrap_err();
        assert!(matches!(e, DiskError::RootTooLarge { .. }), "{e}");
    }
}
