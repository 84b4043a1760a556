//! The boot loader's EFI variables (systemd's Boot Loader Interface), read through efivarfs:
//! which entry systemd-boot started and which file carries its boot counter.

use std::fs;
use std::path::Path;

use nix::mount::{MsFlags, mount};

pub const EFIVARS: &str = "/sys/firmware/efi/efivars";
/// The vendor GUID of the Boot Loader Interface's variables.
const LOADER_GUID: &str = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";

/// The entry systemd-boot booted, its file name in lower case (its boot counter included
/// or not, depending on the loader's version).
pub const ENTRY_SELECTED: &str = "LoaderEntrySelected";
/// The partition GUID of the ESP the boot loader was started from (upper-case text).
pub const DEVICE_PART_UUID: &str = "LoaderDevicePartUUID";
/// The ESP path of the booted entry's file while it counts tries, e.g.
/// `\EFI\Linux\keel-b+2-1.efi`: the file to rename when the boot is good.
pub const BOOT_COUNT_PATH: &str = "LoaderBootCountPath";

/// Mounts efivarfs where the firmware is UEFI. `Ok(false)`: not booted by UEFI firmware
/// (QEMU's -kernel, a BIOS), so there is no boot loader to talk to.
pub fn mount_efivarfs() -> Result<bool, String> {
    if !Path::new("/sys/firmware/efi").exists() {
        return Ok(false);
    }
    if fs::read_dir(EFIVARS).is_ok_and(|mut d| d.next().is_some()) {
        return Ok(true);
    }
    match mount(
        Some("efivarfs"),
        EFIVARS,
        Some("efivarfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    ) {
        Ok(()) | Err(nix::errno::Errno::EBUSY) => Ok(true),
        Err(e) => Err(format!("mounting efivarfs on {EFIVARS}: {e}")),
    }
}

/// A Boot Loader Interface string variable, `None` when it is not set.
pub fn loader_string(name: &str) -> Option<String> {
    let raw = fs::read(Path::new(EFIVARS).join(format!("{name}-{LOADER_GUID}"))).ok()?;
    decode(&raw)
}

/// efivarfs files are the 4-byte attributes, then the value: here UTF-16LE, NUL-terminated.
fn decode(raw: &[u8]) -> Option<String> {
    let units: Vec<u16> = raw
        .get(4..)?
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|u| *u != 0)
        .collect();
    String::from_utf16(&units).ok().filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_utf16_after_the_attributes() {
        let mut raw = vec![6, 0, 0, 0];
        for u in "\\EFI\\Linux\\keel-b+2-1.efi".encode_utf16().chain([0]) {
            raw.extend(u.to_le_bytes());
        }
        assert_eq!(
            decode(&raw).as_deref(),
            Some("\\EFI\\Linux\\keel-b+2-1.efi")
        );
        assert_eq!(decode(&[6, 0, 0, 0, 0, 0]), None);
        assert_eq!(decode(&[6, 0]), None);
    }
}
