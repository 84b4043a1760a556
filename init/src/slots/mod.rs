//! The root slots of a machine booted from a Keel disk image: which entry the boot loader
//! started, what each slot's entry holds (version, root image digest, boot counter), and the
//! assessment that commits an update or gives up on it ([`assessment`]). The ESP's layout is
//! keel_image::esp's; this module only reads it and renames entries.

pub mod assessment;
pub mod efivars;

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use keel_image::esp::{self, EntryName};
use keel_image::uki;
use nix::mount::{MntFlags, MsFlags, mount, umount2};

use crate::blockdev;

/// Where PID 1 mounts the EFI system partition while it reads or changes it.
pub const ESP_MOUNT: &str = "/run/keel/esp";
/// The ESP's GPT partition name.
pub const ESP_PARTNAME: &str = "KEEL-ESP";

/// The ESP, mounted on [`ESP_MOUNT`] until this is dropped. Mounted only for the moment it
/// is needed: a FAT left mounted is a FAT a power cut can leave dirty.
pub struct MountedEsp {
    dir: PathBuf,
    /// The disk it is on (`vda`, `nvme0n1`): the root slots it boots are on the same disk.
    pub disk: String,
}

impl MountedEsp {
    pub fn mount(writable: bool) -> Result<MountedEsp, String> {
        Self::mount_at(Path::new(ESP_MOUNT), writable)
    }

    /// [`MountedEsp::mount`] on `dir`. With several disks holding a `KEEL-ESP` (a clone
    /// plugged in), the one on the disk the boot loader started from.
    pub fn mount_at(dir: &Path, writable: bool) -> Result<MountedEsp, String> {
        let mut esps: Vec<_> = blockdev::list()
            .into_iter()
            .filter(|d| d.partname.as_deref() == Some(ESP_PARTNAME))
            .collect();
        if esps.len() > 1 {
            esps.retain(|d| blockdev::parent_disk(&d.name).is_some_and(|disk| is_boot_disk(&disk)));
        }
        let device = match esps.as_slice() {
            [one] => one,
            [] => return Err(format!("no partition named {ESP_PARTNAME}")),
            more => {
                return Err(format!(
                    "{} partitions are named {ESP_PARTNAME}; remove all but one",
                    more.len()
                ));
            }
        };
        let dir = dir.to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        if !writable {
            flags |= MsFlags::MS_RDONLY;
        }
        // Only root reads it; "flush" writes each file out when it is closed.
        mount(
            Some(&device.node),
            &dir,
            Some("vfat"),
            flags,
            Some("umask=0077,flush"),
        )
        .map_err(|e| {
            format!(
                "mounting the ESP {} on {}: {e}",
                device.node.display(),
                dir.display()
            )
        })?;
        Ok(MountedEsp {
            dir,
            disk: blockdev::parent_disk(&device.name).unwrap_or_default(),
        })
    }

    /// The directory of the boot entries (`EFI/Linux`).
    pub fn entries_dir(&self) -> PathBuf {
        self.dir.join(esp::ENTRIES_DIR)
    }
}

impl Drop for MountedEsp {
    fn drop(&mut self) {
        // This filesystem only (the unmount writes it out too): a system-wide sync would wait
        // for whatever else is being written, an update's slot included.
        if let Ok(dir) = File::open(&self.dir) {
            let _ = nix::unistd::syncfs(&dir);
        }
        if let Err(e) = umount2(&self.dir, MntFlags::empty()) {
            log::warn!("unmounting the ESP from {}: {e}", self.dir.display());
            let _ = umount2(&self.dir, MntFlags::MNT_DETACH);
        }
    }
}

/// Whether the whole disk `disk` (`vda`) holds the partition the boot loader was started
/// from (`LoaderDevicePartUUID`, read from its GPT). True when that is unknown (no boot
/// loader, no efivarfs): then any disk may hold this boot's root. A machine with two Keel
/// disks (a clone on a USB stick) then boots the root of the disk that booted, not whichever
/// shows up first.
pub fn is_boot_disk(disk: &str) -> bool {
    static LOADER_PART: std::sync::OnceLock<Option<[u8; 16]>> = std::sync::OnceLock::new();
    let wanted = LOADER_PART.get_or_init(|| {
        efivars::mount_efivarfs().ok()?.then_some(())?;
        efivars::loader_string(efivars::DEVICE_PART_UUID).map(|t| esp::guid_bytes(&t))
    });
    let Some(wanted) = wanted else {
        return true;
    };
    let Ok(mut file) = File::open(Path::new("/dev").join(disk)) else {
        return false;
    };
    gptman::GPT::find_from(&mut file)
        .map(|gpt| {
            gpt.iter()
                .any(|(_, p)| p.is_used() && &p.unique_partition_guid == wanted)
        })
        .unwrap_or(false)
}

/// One slot's boot entry as found on the ESP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotEntry {
    pub name: EntryName,
    /// The file name as it is on the ESP.
    pub file: String,
    /// IMAGE_VERSION of its `.osrel`.
    pub version: Option<String>,
    /// KEEL_ROOT_SHA256 of its `.osrel`: the root image it boots.
    pub root_sha256: Option<String>,
}

/// What the boot loader did and what the ESP holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootSlots {
    /// The entry systemd-boot started, as it named it.
    pub booted: Option<EntryName>,
    /// The booted entry's file while it counts tries (`LoaderBootCountPath`, an ESP path).
    pub boot_count_path: Option<String>,
    pub entries: Vec<SlotEntry>,
}

impl BootSlots {
    /// Reads the boot loader's variables and the ESP. `Ok(None)`: not a firmware boot of a
    /// Keel disk (QEMU's -kernel, or no ESP), so there are no slots.
    pub fn read() -> Result<Option<BootSlots>, String> {
        if !efivars::mount_efivarfs()? {
            return Ok(None);
        }
        let boot_count_path = efivars::loader_string(efivars::BOOT_COUNT_PATH);
        let booted = boot_count_path
            .as_deref()
            .and_then(|p| p.rsplit(['\\', '/']).next())
            .and_then(EntryName::parse)
            .or_else(|| {
                efivars::loader_string(efivars::ENTRY_SELECTED)
                    .as_deref()
                    .and_then(EntryName::parse)
            });
        let esp = match MountedEsp::mount(false) {
            Ok(esp) => esp,
            Err(e) if booted.is_none() => {
                log::debug!("no Keel boot entries: {e}");
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let entries = read_entries(&esp.entries_dir());
        Ok(Some(BootSlots {
            booted,
            boot_count_path,
            entries,
        }))
    }

    /// The booted slot's entry.
    pub fn booted_entry(&self) -> Option<&SlotEntry> {
        let booted = self.booted?;
        self.entries.iter().find(|e| e.name.slot == booted.slot)
    }

    /// The other slot's entry.
    pub fn other_entry(&self) -> Option<&SlotEntry> {
        let booted = self.booted?;
        self.entries.iter().find(|e| e.name.slot != booted.slot)
    }
}

/// Every Keel entry in `dir`, in slot order; unreadable ones are logged and left out.
pub fn read_entries(dir: &Path) -> Vec<SlotEntry> {
    let Ok(listing) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut entries = Vec::new();
    for item in listing.flatten() {
        let file = item.file_name().to_string_lossy().into_owned();
        let Some(name) = EntryName::parse(&file) else {
            continue;
        };
        let osrel = match read_osrel(&item.path()) {
            Ok(text) => text,
            Err(e) => {
                log::warn!("boot entry {file}: {e}");
                String::new()
            }
        };
        entries.push(SlotEntry {
            name,
            file,
            version: esp::os_release_value(&osrel, "IMAGE_VERSION").map(str::to_string),
            root_sha256: esp::os_release_value(&osrel, esp::ROOT_SHA256_KEY).map(str::to_string),
        });
    }
    entries.sort_by_key(|e| e.name.slot);
    entries
}

/// A UKI's `.osrel`, read without reading its kernel.
fn read_osrel(path: &Path) -> Result<String, String> {
    let mut file = File::open(path).map_err(|e| e.to_string())?;
    let mut head = vec![0u8; uki::HEADERS_LEN];
    let n = file.read(&mut head).map_err(|e| e.to_string())?;
    head.truncate(n);
    let (offset, len) = uki::locate_section(&head, ".osrel")
        .map_err(|e| e.to_string())?
        .ok_or("no .osrel section")?;
    if len > 64 << 10 {
        return Err(format!("an .osrel of {len} bytes"));
    }
    let mut text = vec![0u8; len as usize];
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.read_exact(&mut text))
        .map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&text).into_owned())
}
