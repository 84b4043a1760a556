//! The EFI system partition's layout, which `keel build` writes and PID 1 updates: the one
//! module that knows it.
//!
//! ```text
//! EFI/BOOT/BOOTX64.EFI            systemd-boot, where firmware looks with no boot entry of its own
//! EFI/systemd/systemd-bootx64.efi the same, where systemd-boot's own tools expect it
//! loader/loader.conf              no menu, no editor, no automatic entries and no `default`
//! EFI/Linux/keel-a.efi            slot A's Unified Kernel Image (a Boot Loader Spec type #2 entry)
//! EFI/Linux/keel-b+3.efi          slot B's, on trial: three boots left (boot assessment)
//! ```
//!
//! Why systemd-boot in front of the UKIs rather than a UKI as BOOTX64.EFI: boot assessment.
//! systemd-boot counts each try down in the entry's file name (`keel-b+3.efi` becomes
//! `keel-b+2-1.efi` before it starts it) and sorts an entry with no tries left after the
//! others, so a system that never commits falls back to the previous slot with nobody at the
//! console; firmware alone has no such counter. Without a `default` it boots the first entry
//! in its order: entries with tries left before those without, then by the `.osrel` section's
//! IMAGE_ID and, newest first, IMAGE_VERSION. A fixed default would keep booting a bad entry.
//!
//! Each UKI finds its own root: its command line names the erofs UUID (and, with dm-verity,
//! the root hash), and stage 1 looks for that UUID, so the same file works from either slot
//! and can be signed when it is built.

use std::fmt;

/// systemd-boot as Debian's `systemd-boot-efi` installs it.
pub const DEBIAN_SYSTEMD_BOOT: &str = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi";

/// Where firmware looks on a disk that has no boot entry in its NVRAM (the removable-media
/// path), so the image boots wherever it is written.
pub const FALLBACK_LOADER: &str = "EFI/BOOT/BOOTX64.EFI";
/// systemd-boot's own place.
pub const SYSTEMD_BOOT: &str = "EFI/systemd/systemd-bootx64.efi";
pub const LOADER_CONF: &str = "loader/loader.conf";
/// The directory systemd-boot finds type #2 entries (UKIs) in.
pub const ENTRIES_DIR: &str = "EFI/Linux";

/// `timeout 0`: no menu (a key held at boot still shows it). `editor no`: nobody at the
/// console changes the command line, which holds the verity root hash. No automatic entries
/// (firmware setup, other loaders) and no `default`: see the module comment.
pub const LOADER_CONF_TEXT: &str = "timeout 0\neditor no\nauto-entries no\nauto-firmware no\n";

/// The `.osrel` IMAGE_ID of every Keel UKI: systemd-boot groups entries by it.
pub const IMAGE_ID: &str = "keel";

/// The size of each root slot (`KEEL-ROOT-A`, `KEEL-ROOT-B`): 2 GiB, generous on purpose
/// (image/src/disk.rs lays them out).
pub const ROOT_SLOT_SIZE: u64 = 2 << 30;

/// The tries a new entry gets before systemd-boot gives up on it.
pub const UPDATE_TRIES: u32 = 3;

/// A UUID's text as GPT stores it: the first three fields little-endian. Text that is not a
/// UUID gives zeros where it is not hex.
pub fn guid_bytes(text: &str) -> [u8; 16] {
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    let mut b = [0u8; 16];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2).unwrap_or("00"), 16).unwrap_or(0);
    }
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    b
}

/// A root slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub const ALL: [Slot; 2] = [Slot::A, Slot::B];

    /// The GPT partition name of the slot.
    pub const fn label(self) -> &'static str {
        match self {
            Slot::A => "KEEL-ROOT-A",
            Slot::B => "KEEL-ROOT-B",
        }
    }

    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    fn letter(self) -> char {
        match self {
            Slot::A => 'a',
            Slot::B => 'b',
        }
    }

    pub fn from_label(label: &str) -> Option<Slot> {
        Slot::ALL.into_iter().find(|s| s.label() == label)
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Slot::A => "A",
            Slot::B => "B",
        })
    }
}

/// A boot entry's file name in [`ENTRIES_DIR`]: the slot and, while on trial, its counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryName {
    pub slot: Slot,
    /// `None`: a committed entry. `Some`: boot assessment is on.
    pub tries: Option<Tries>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tries {
    pub left: u32,
    pub done: u32,
}

impl EntryName {
    pub fn committed(slot: Slot) -> EntryName {
        EntryName { slot, tries: None }
    }

    /// A newly installed entry: [`UPDATE_TRIES`] left, none done.
    pub fn on_trial(slot: Slot) -> EntryName {
        EntryName {
            slot,
            tries: Some(Tries {
                left: UPDATE_TRIES,
                done: 0,
            }),
        }
    }

    /// `keel-a.efi`, `keel-b+3.efi`, `keel-b+2-1.efi`, `keel-b+0-3.efi`.
    pub fn file_name(&self) -> String {
        let base = format!("keel-{}", self.slot.letter());
        match self.tries {
            None => format!("{base}.efi"),
            Some(Tries { left, done: 0 }) => format!("{base}+{left}.efi"),
            Some(Tries { left, done }) => format!("{base}+{left}-{done}.efi"),
        }
    }

    /// Reads a file name as systemd-boot writes it (case-insensitively: FAT keeps case, the
    /// firmware's file protocol may not). `None` for anything that is not a Keel entry.
    pub fn parse(name: &str) -> Option<EntryName> {
        let lower = name.to_ascii_lowercase();
        let stem = lower.strip_suffix(".efi")?.strip_prefix("keel-")?;
        let (slot, counter) = match stem.split_once('+') {
            Some((slot, counter)) => (slot, Some(counter)),
            None => (stem, None),
        };
        let slot = match slot {
            "a" => Slot::A,
            "b" => Slot::B,
            _ => return None,
        };
        let number = |t: &str| -> Option<u32> {
            (!t.is_empty() && t.len() <= 9 && t.bytes().all(|b| b.is_ascii_digit()))
                .then(|| t.parse().ok())
                .flatten()
        };
        let tries = match counter {
            None => None,
            Some(c) => {
                let (left, done) = match c.split_once('-') {
                    Some((left, done)) => (number(left)?, number(done)?),
                    None => (number(c)?, 0),
                };
                Some(Tries { left, done })
            }
        };
        Some(EntryName { slot, tries })
    }

    /// Out of tries: systemd-boot sorts it last and boots the other slot.
    pub fn is_bad(&self) -> bool {
        matches!(self.tries, Some(Tries { left: 0, .. }))
    }
}

/// The `.osrel` key with the sha256 of the root image the UKI boots.
pub const ROOT_SHA256_KEY: &str = "KEEL_ROOT_SHA256";

/// The `.osrel` section of a Keel UKI: what systemd-boot shows and sorts by, and what PID 1
/// reads back to tell the slots' versions and root images. `version` is a checked Keel
/// version (digits and dots), `hostname` a checked hostname, `root_sha256` hex: none needs
/// quoting.
pub fn os_release(version: &str, hostname: &str, root_sha256: &str) -> String {
    format!(
        "ID={IMAGE_ID}\nNAME=Keel\nIMAGE_ID={IMAGE_ID}\nIMAGE_VERSION={version}\nVERSION_ID={version}\nPRETTY_NAME=\"Keel {version} ({hostname})\"\n{ROOT_SHA256_KEY}={root_sha256}\n"
    )
}

/// A value of an os-release text (`KEY=value`, optionally quoted).
pub fn os_release_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(key)?.strip_prefix('=')?;
        Some(value.trim_matches('"'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_round_trip_with_their_counters() {
        for (name, slot, tries) in [
            ("keel-a.efi", Slot::A, None),
            ("keel-b+3.efi", Slot::B, Some((3, 0))),
            ("keel-b+2-1.efi", Slot::B, Some((2, 1))),
            ("keel-a+0-3.efi", Slot::A, Some((0, 3))),
        ] {
            let parsed = EntryName::parse(name).unwrap();
            assert_eq!(parsed.slot, slot, "{name}");
            assert_eq!(parsed.tries.map(|t| (t.left, t.done)), tries, "{name}");
            assert_eq!(parsed.file_name(), name);
        }
        assert_eq!(
            EntryName::parse("KEEL-B+1-2.EFI").map(|e| e.file_name()),
            Some("keel-b+1-2.efi".into())
        );
        assert!(EntryName::parse("keel-a+0-3.efi").unwrap().is_bad());
        assert!(!EntryName::parse("keel-a+1-2.efi").unwrap().is_bad());
        for other in [
            "keel-c.efi",
            "keel-a.conf",
            "linux.efi",
            "keel-a+.efi",
            "keel-a+x.efi",
            "keel-a+1-.efi",
            "keel-a+1-2-3.efi",
            "keel-.efi",
        ] {
            assert_eq!(EntryName::parse(other), None, "{other}");
        }
        assert_eq!(EntryName::on_trial(Slot::B).file_name(), "keel-b+3.efi");
    }

    #[test]
    fn os_release_names_the_image_and_its_version() {
        let text = os_release("1.4.0", "web-1", "ab12");
        assert_eq!(os_release_value(&text, ROOT_SHA256_KEY), Some("ab12"));
        assert_eq!(os_release_value(&text, "IMAGE_ID"), Some("keel"));
        assert_eq!(os_release_value(&text, "IMAGE_VERSION"), Some("1.4.0"));
        assert_eq!(
            os_release_value(&text, "PRETTY_NAME"),
            Some("Keel 1.4.0 (web-1)")
        );
        assert_eq!(os_release_value(&text, "VERSION"), None);
    }

    #[test]
    fn slots_have_their_partition_names() {
        assert_eq!(Slot::from_label("KEEL-ROOT-B"), Some(Slot::B));
        assert_eq!(Slot::A.other(), Slot::B);
        assert_eq!(Slot::from_label("KEEL-VAR"), None);
    }
}
