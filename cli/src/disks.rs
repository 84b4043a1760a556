//! The disks `keel run` gives a guest. Booted through firmware (the default): the build's
//! disk image, written in place like a real machine's disk (extended to `--disk-size` first;
//! the guest grows /var into the room), with the machine's own firmware variables beside it.
//! Booted directly (`--direct-kernel`): the build's root image, read-only, and a persistent
//! data disk for /var that the guest formats itself on first boot.

use std::fs;
use std::path::Path;

use keel_image::os;
use keel_qemu::Disk;

use crate::build::Manifest;

/// The data disk's file in a build directory.
pub const DATA_IMAGE: &str = "data.img";

/// The smallest data disk: ext4 with a journal needs a few MiB, containers need more.
const MIN_DATA_BYTES: u64 = 16 << 20;

/// A size in bytes: a number with an optional binary suffix (`K`, `M`, `G`, `T`, also as
/// `KiB`... or `KB`...; all powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let bad = || {
        format!("{text:?} is not a size (expected bytes or a number with K, M, G or T, like 4G)")
    };
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, suffix) = t.split_at(digits);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let suffix = suffix.to_ascii_uppercase();
    let suffix = suffix
        .strip_suffix("IB")
        .or_else(|| suffix.strip_suffix('B'))
        .unwrap_or(&suffix);
    let shift = match suffix {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(bad()),
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// The root image of `dir`, and its data disk (created sparse with `data_size` bytes if
/// missing, kept as it is otherwise) unless `data_size` is `None`.
pub fn run_disks(
    dir: &Path,
    manifest: &Manifest,
    data_size: Option<u64>,
) -> Result<Vec<Disk>, String> {
    let root = dir.join(&manifest.root_image);
    if !root.is_file() {
        return Err(format!(
            "{} is missing: build {} again with keel build",
            root.display(),
            dir.display()
        ));
    }
    let mut disks = vec![Disk {
        path: root,
        read_only: true,
        serial: Some(os::ROOT_DISK_SERIAL.to_string()),
    }];
    if let Some(size) = data_size {
        let path = dir.join(DATA_IMAGE);
        if create_sparse(&path, size)? {
            eprintln!(
                "keel: data disk {} created ({} MiB, formatted by the guest at its first boot)",
                path.display(),
                size >> 20
            );
        }
        disks.push(Disk {
            path,
            read_only: false,
            serial: Some(os::DATA_DISK_SERIAL.to_string()),
        });
    }
    Ok(disks)
}

/// The firmware variable store of the machine whose disk is `disk`: `disk.img` keeps its
/// variables in `disk.efivars.fd` beside it. `keel build` removes it with the disk it
/// replaces.
pub fn efivars_path(disk: &Path) -> std::path::PathBuf {
    disk.with_extension("efivars.fd")
}

/// The variable store of the machine booted with Secure Boot firmware: its own, since it
/// holds the Secure Boot keys (`disk.efivars-secure-boot.fd`).
pub fn secure_boot_efivars_path(disk: &Path) -> std::path::PathBuf {
    disk.with_extension("efivars-secure-boot.fd")
}

/// The machine booted through firmware from `disk`: extends the disk to `size` bytes if it is
/// smaller (never shrinks it), and gives it a variable store (a copy of OVMF's template, or
/// with `secure_boot` of the one with Debian's test keys enrolled) if it has none.
pub fn firmware_machine(
    disk: &Path,
    size: u64,
    secure_boot: bool,
) -> Result<(Disk, keel_qemu::Firmware), String> {
    let mut head = [0u8; 4];
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)
        .map_err(|e| format!("{}: {e}", disk.display()))?;
    std::io::Read::read_exact(&mut &file, &mut head)
        .map_err(|e| format!("{}: {e}", disk.display()))?;
    if &head == b"QFI\xfb" {
        return Err(format!(
            "{} is a qcow2 image, made for importing into a cloud or hypervisor; keel run boots the raw disk.img beside it",
            disk.display()
        ));
    }
    let len = file
        .metadata()
        .map_err(|e| format!("{}: {e}", disk.display()))?
        .len();
    if len < size {
        file.set_len(size)
            .map_err(|e| format!("extending {}: {e}", disk.display()))?;
        eprintln!(
            "keel: disk {} extended from {} MiB to {} MiB (the guest grows /var into it)",
            disk.display(),
            len >> 20,
            size >> 20
        );
    }
    let (vars, template, code) = if secure_boot {
        (
            secure_boot_efivars_path(disk),
            keel_qemu::OVMF_VARS_SNAKEOIL,
            keel_qemu::OVMF_CODE_SECURE_BOOT,
        )
    } else {
        (
            efivars_path(disk),
            keel_qemu::OVMF_VARS_TEMPLATE,
            keel_qemu::OVMF_CODE,
        )
    };
    if !vars.exists() {
        fs::copy(template, &vars).map_err(|e| {
            format!("{template}: {e}: install Debian's ovmf (scripts/install-deps does)")
        })?;
    }
    if !Path::new(code).is_file() {
        return Err(format!(
            "{code} is missing: install Debian's ovmf (scripts/install-deps does)"
        ));
    }
    Ok((
        Disk {
            path: disk.to_path_buf(),
            read_only: false,
            serial: None,
        },
        keel_qemu::Firmware {
            code: code.into(),
            vars,
            secure_boot,
        },
    ))
}

/// Creates a blank sparse file of `size` bytes unless `path` exists; true if it created one.
/// The guest formats a blank disk itself: nothing is written here.
pub fn create_sparse(path: &Path, size: u64) -> Result<bool, String> {
    if size < MIN_DATA_BYTES {
        return Err(format!(
            "a data disk of {size} bytes is too small: at least {} MiB",
            MIN_DATA_BYTES >> 20
        ));
    }
    let file = match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    file.set_len(size)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("64KB"), Ok(64 << 10));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        for bad in ["", "G", "4X", "-4G", "4.5G", "4 G", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_data_disk_is_created_sparse_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DATA_IMAGE);
        assert!(create_sparse(&path, 1 << 30).unwrap());
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 1 << 30);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(meta.blocks(), 0, "nothing is written");
        // An existing disk is the guest's: never resized or rewritten.
        fs::write(&path, b"data").unwrap();
        assert!(!create_sparse(&path, 2 << 30).unwrap());
        assert_eq!(fs::read(&path).unwrap(), b"data");
        assert!(create_sparse(&dir.path().join("tiny"), 1 << 20).is_err());
    }
}
