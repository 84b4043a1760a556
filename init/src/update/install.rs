//! `keel-init --install-update ERROR_FILE STAGING SLOT`: writes a staged update into root
//! slot SLOT and installs its boot entry on trial. A process of its own: tens of MiB of
//! writes, reads and hashing must not stall PID 1's loop.
//!
//! The order keeps the machine bootable whenever it stops (a power cut at any point):
//! 1. the staged files are checked against the signed manifest again, and the UKI against
//!    it (its version, its dm-verity root hash);
//! 2. the slot's old boot entry (the previous fallback) is removed: from here on nothing
//!    points at the slot;
//! 3. the root image is written, flushed, dropped from the page cache and read back from
//!    the disk: the digest must match;
//! 4. the UKI is written under a temporary name, flushed, and renamed to `keel-X+3.efi`:
//!    only a complete entry ever appears.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use keel_image::esp::{self, EntryName, Slot};
use keel_image::uki;
use keel_image::update_bundle::UpdateManifest;
use sha2::{Digest, Sha256};

use super::{STAGED_MANIFEST, STAGED_ROOT, STAGED_UKI};
use crate::blockdev;
use crate::slots::MountedEsp;

/// Where the helper mounts the ESP: not PID 1's mount point.
const INSTALL_ESP_MOUNT: &str = "/run/keel/esp-install";

/// Runs the helper; `args` are STAGING and SLOT (`A` or `B`).
pub fn run(_host_file: &Path, args: &[String]) -> Result<(), String> {
    let [staging, slot] = args else {
        return Err("--install-update takes STAGING SLOT".into());
    };
    let slot = match slot.as_str() {
        "A" => Slot::A,
        "B" => Slot::B,
        other => return Err(format!("no slot {other:?}")),
    };
    install(Path::new(staging), slot)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 and length of the first `len` bytes of `file` (all of it when `None`).
fn digest(file: &mut File, len: Option<u64>) -> std::io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let want = match len {
            Some(l) => ((l - total) as usize).min(buf.len()),
            None => buf.len(),
        };
        if want == 0 {
            break;
        }
        let n = file.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hex(&hasher.finalize()), total))
}

fn install(staging: &Path, slot: Slot) -> Result<(), String> {
    let text = fs::read(staging.join(STAGED_MANIFEST)).map_err(|e| format!("the manifest: {e}"))?;
    let manifest = UpdateManifest::parse(&text).map_err(|e| e.to_string())?;

    // 1. What arrived is what was signed.
    let uki_path = staging.join(STAGED_UKI);
    let root_path = staging.join(STAGED_ROOT);
    let mut root = File::open(&root_path).map_err(|e| format!("{}: {e}", root_path.display()))?;
    let (root_sha, root_len) = digest(&mut root, None).map_err(|e| e.to_string())?;
    if root_sha != manifest.root_image_sha256 || root_len != manifest.root_image_bytes {
        return Err(format!(
            "the staged root image ({root_len} bytes, sha256 {root_sha}) is not the signed one; the slot was not touched"
        ));
    }
    let uki_bytes = fs::read(&uki_path).map_err(|e| format!("{}: {e}", uki_path.display()))?;
    if hex(&Sha256::digest(&uki_bytes)) != manifest.uki_sha256 {
        return Err("the staged UKI is not the signed one; the slot was not touched".into());
    }
    check_uki(&uki_bytes, &manifest)?;

    // 2. Nothing may point at the slot while it is written.
    let disk = {
        let esp = MountedEsp::mount_at(Path::new(INSTALL_ESP_MOUNT), true)?;
        remove_entries(&esp.entries_dir(), slot)?;
        esp.disk.clone()
    };

    // 3. The slot: on the disk the ESP is on, whatever other disks hold (a second Keel disk
    // plugged in has partitions of the same names).
    let partition = blockdev::list()
        .into_iter()
        .find(|d| {
            d.partname.as_deref() == Some(slot.label())
                && blockdev::parent_disk(&d.name).as_deref() == Some(disk.as_str())
        })
        .ok_or_else(|| format!("no partition named {} on {disk}", slot.label()))?;
    if partition.size_bytes < manifest.root_image_bytes {
        return Err(format!(
            "{} holds {} bytes, the root image is {}",
            partition.node.display(),
            partition.size_bytes,
            manifest.root_image_bytes
        ));
    }
    let mut device = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&partition.node)
        .map_err(|e| format!("{}: {e}", partition.node.display()))?;
    root.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    std::io::copy(&mut root, &mut device)
        .and_then(|_| device.sync_all())
        .map_err(|e| format!("writing {}: {e}", partition.node.display()))?;
    // SAFETY: posix_fadvise only reads its integer arguments; the descriptor is open.
    unsafe {
        libc::posix_fadvise(device.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
    device.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    let (written, _) = digest(&mut device, Some(manifest.root_image_bytes))
        .map_err(|e| format!("reading back {}: {e}", partition.node.display()))?;
    if written != manifest.root_image_sha256 {
        return Err(format!(
            "{} reads back with sha256 {written}, not {}: the disk is failing; no boot entry was installed",
            partition.node.display(),
            manifest.root_image_sha256
        ));
    }

    // 4. The entry, complete or not at all.
    let esp = MountedEsp::mount_at(Path::new(INSTALL_ESP_MOUNT), true)?;
    let dir = esp.entries_dir();
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let tmp = dir.join(format!(".keel-{slot}.tmp"));
    let entry = dir.join(EntryName::on_trial(slot).file_name());
    let mut file = File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    file.write_all(&uki_bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    drop(file);
    fs::rename(&tmp, &entry).map_err(|e| format!("{}: {e}", entry.display()))?;
    drop(esp);
    eprintln!(
        "keel: version {} written to slot {slot} ({}) and read back; boot entry {} installed",
        manifest.version,
        partition.node.display(),
        EntryName::on_trial(slot).file_name()
    );
    Ok(())
}

/// The UKI is the signed version's and boots the signed root: its `.osrel` names the
/// version and root digest, its command line the verity root hash.
fn check_uki(bytes: &[u8], manifest: &UpdateManifest) -> Result<(), String> {
    let section = |name: &str| -> Result<String, String> {
        let head = &bytes[..bytes.len().min(uki::HEADERS_LEN)];
        let (offset, len) = uki::locate_section(head, name)
            .map_err(|e| format!("the UKI: {e}"))?
            .ok_or_else(|| format!("the UKI has no {name} section"))?;
        let data = bytes
            .get(offset as usize..(offset + len) as usize)
            .ok_or_else(|| format!("the UKI's {name} lies past its end"))?;
        Ok(String::from_utf8_lossy(data).into_owned())
    };
    let osrel = section(".osrel")?;
    if esp::os_release_value(&osrel, "IMAGE_VERSION") != Some(manifest.version.as_str()) {
        return Err(format!(
            "the UKI is not version {} (its .osrel: {osrel:?})",
            manifest.version
        ));
    }
    if esp::os_release_value(&osrel, esp::ROOT_SHA256_KEY)
        != Some(manifest.root_image_sha256.as_str())
    {
        return Err("the UKI boots another root image than the signed one".into());
    }
    let cmdline = section(".cmdline")?;
    let roothash = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("keel.verity.roothash="));
    if roothash != manifest.verity_root_hash.as_deref() {
        return Err(format!(
            "the UKI's dm-verity root hash ({}) is not the signed one ({})",
            roothash.unwrap_or("none"),
            manifest.verity_root_hash.as_deref().unwrap_or("none")
        ));
    }
    Ok(())
}

/// Removes every entry of `slot` (whatever its counter) from the entries directory.
fn remove_entries(dir: &Path, slot: Slot) -> Result<(), String> {
    let Ok(listing) = fs::read_dir(dir) else {
        return Ok(());
    };
    for item in listing.flatten() {
        let name = item.file_name().to_string_lossy().into_owned();
        if EntryName::parse(&name).is_some_and(|e| e.slot == slot) {
            fs::remove_file(item.path())
                .map_err(|e| format!("removing {}: {e}", item.path().display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(version: &str, root: &str, roothash: Option<&str>) -> UpdateManifest {
        UpdateManifest {
            format: keel_image::update_bundle::FORMAT,
            hostname: "h".into(),
            version: version.into(),
            uki_sha256: "0".repeat(64),
            uki_bytes: 1,
            root_image_sha256: root.into(),
            root_image_bytes: 1,
            verity_root_hash: roothash.map(str::to_string),
        }
    }

    fn uki(version: &str, root: &str, cmdline: &str) -> Vec<u8> {
        let stub = fs::read(uki::DEBIAN_STUB).expect("systemd-boot-efi's stub");
        let osrel = esp::os_release(version, "h", root);
        uki::build(
            &stub,
            &[
                (".osrel", osrel.as_bytes()),
                (".cmdline", cmdline.as_bytes()),
            ],
        )
        .unwrap()
    }

    #[test]
    fn the_uki_must_be_the_signed_version_booting_the_signed_root() {
        let root = "a".repeat(64);
        let hash = "b".repeat(64);
        let good = uki(
            "2",
            &root,
            &format!("console=ttyS0 keel.verity.roothash={hash}"),
        );
        assert!(check_uki(&good, &manifest("2", &root, Some(&hash))).is_ok());
        let err = check_uki(&good, &manifest("3", &root, Some(&hash))).unwrap_err();
        assert!(err.contains("not version 3"), "{err}");
        let err = check_uki(&good, &manifest("2", &"c".repeat(64), Some(&hash))).unwrap_err();
        assert!(err.contains("another root image"), "{err}");
        let err = check_uki(&good, &manifest("2", &root, Some(&"d".repeat(64)))).unwrap_err();
        assert!(err.contains("dm-verity root hash"), "{err}");
        let err = check_uki(&good, &manifest("2", &root, None)).unwrap_err();
        assert!(err.contains("dm-verity root hash"), "{err}");
        let plain = uki("2", &root, "console=ttyS0");
        assert!(check_uki(&plain, &manifest("2", &root, None)).is_ok());
    }

    #[test]
    fn only_the_target_slots_entries_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["keel-a.efi", "keel-b+0-3.efi", "keel-b.efi", "other.efi"] {
            fs::write(dir.path().join(name), b"x").unwrap();
        }
        remove_entries(dir.path(), Slot::B).unwrap();
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["keel-a.efi", "other.efi"]);
    }
}
