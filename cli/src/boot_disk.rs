//! The last step of `keel build`: the Unified Kernel Image (`keel.efi`: Debian's systemd stub
//! with the kernel, the stage-1 initramfs, the command line and an os-release) and the disk
//! image firmware boots (`disk.img`, optionally also `disk.qcow2`): systemd-boot and the UKI
//! on the EFI system partition as image/src/esp.rs lays it out, the root image in slot A.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use keel_image::disk::{self, DiskContents};
use keel_image::esp::{self, EntryName, Slot};
use keel_image::uki;
use serde::{Deserialize, Serialize};

/// The UKI's file name in the output directory.
pub const UKI_FILE: &str = "keel.efi";
/// The raw disk image's file name in the output directory.
pub const DISK_FILE: &str = "disk.img";
/// The qcow2 copy's file name, with `--format qcow2`.
pub const QCOW2_FILE: &str = "disk.qcow2";

/// Which disk files `keel build` writes: the raw image always (the one `keel run` boots
/// and `dd` writes), and a qcow2 copy for clouds and hypervisors that import that.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DiskFormat {
    #[default]
    Raw,
    Qcow2,
}

/// The boot loader's files, read before the long part of a build so a missing package
/// fails it at once; with a Secure Boot key, systemd-boot is signed here.
pub struct BootFiles {
    pub stub: Vec<u8>,
    pub systemd_boot: Vec<u8>,
    pub signer: Option<SecureBootSigner>,
}

impl BootFiles {
    pub fn read(signer: Option<SecureBootSigner>) -> Result<BootFiles, String> {
        let read = |path: &str| {
            fs::read(path).map_err(|e| {
                format!(
                    "{path}: {e}: install Debian's systemd-boot-efi (scripts/install-deps does)"
                )
            })
        };
        let mut systemd_boot = read(esp::DEBIAN_SYSTEMD_BOOT)?;
        if let Some(signer) = &signer {
            systemd_boot = signer.sign(&systemd_boot)?;
        }
        Ok(BootFiles {
            stub: read(uki::DEBIAN_STUB)?,
            systemd_boot,
            signer,
        })
    }
}

/// Signs EFI binaries for Secure Boot (Authenticode, with `sbsign` from Debian's
/// sbsigntool: there is no well-kept Rust signer), with an RSA key whose certificate the
/// firmware's `db` holds.
#[derive(Debug, Clone)]
pub struct SecureBootSigner {
    pub key: PathBuf,
    pub cert: PathBuf,
}

impl SecureBootSigner {
    pub fn sign(&self, image: &[u8]) -> Result<Vec<u8>, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("a temporary directory: {e}"))?;
        let (input, output) = (dir.path().join("in.efi"), dir.path().join("out.efi"));
        fs::write(&input, image).map_err(|e| format!("{}: {e}", input.display()))?;
        let result = Command::new("sbsign")
            .arg("--key")
            .arg(&self.key)
            .arg("--cert")
            .arg(&self.cert)
            .arg("--output")
            .arg(&output)
            .arg(&input)
            .output()
            .map_err(|e| format!("sbsign: {e}: install sbsigntool (scripts/install-deps does)"))?;
        if !result.status.success() {
            return Err(format!(
                "sbsign with {} and {}: {}",
                self.key.display(),
                self.cert.display(),
                String::from_utf8_lossy(&result.stderr).trim()
            ));
        }
        fs::read(&output).map_err(|e| format!("{}: {e}", output.display()))
    }
}

/// What the manifest records about the boot artifacts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BootArtifacts {
    /// The UKI's file name ([`UKI_FILE`]) and digest: what an update installs.
    pub uki: String,
    pub uki_sha256: String,
    pub uki_bytes: u64,
    /// The disk image ([`DISK_FILE`]) and its size (sparse: little of it is allocated).
    pub disk: String,
    pub disk_bytes: u64,
    pub disk_guid: String,
    /// The qcow2 copy, when asked for.
    pub qcow2: Option<String>,
}

/// One UKI for this build: the same bytes whichever slot it boots from.
pub fn make_uki(
    boot: &BootFiles,
    version: &str,
    hostname: &str,
    root_sha256: &str,
    cmdline: &str,
    kernel: &[u8],
    initrd: &[u8],
) -> Result<Vec<u8>, String> {
    let osrel = esp::os_release(version, hostname, root_sha256);
    uki::build(
        &boot.stub,
        &[
            (".osrel", osrel.as_bytes()),
            (".cmdline", cmdline.as_bytes()),
            (".linux", kernel),
            (".initrd", initrd),
        ],
    )
    .map_err(|e| format!("making the unified kernel image: {e}"))
    .and_then(|image| match &boot.signer {
        Some(signer) => signer.sign(&image),
        None => Ok(image),
    })
}

/// Writes `out/disk.img` (and `out/disk.qcow2` with [`DiskFormat::Qcow2`]): systemd-boot,
/// its configuration and `uki` as slot A's committed entry on the ESP, `root_image` in slot
/// A. `seed` (a digest of the build's inputs) makes the GUIDs.
pub fn write_disk(
    out: &Path,
    boot: &BootFiles,
    uki_bytes: &[u8],
    root_image: &Path,
    seed: [u8; 32],
    format: DiskFormat,
) -> Result<(u64, String, Option<String>), String> {
    let entry = format!(
        "{}/{}",
        esp::ENTRIES_DIR,
        EntryName::committed(Slot::A).file_name()
    );
    let contents = DiskContents {
        root_image,
        root_image_b: None,
        esp_files: vec![
            (esp::FALLBACK_LOADER.into(), boot.systemd_boot.clone()),
            (esp::SYSTEMD_BOOT.into(), boot.systemd_boot.clone()),
            (
                esp::LOADER_CONF.into(),
                esp::LOADER_CONF_TEXT.as_bytes().to_vec(),
            ),
            (entry, uki_bytes.to_vec()),
        ],
        seed,
    };
    let path = out.join(DISK_FILE);
    let tmp = out.join(format!(".{DISK_FILE}.tmp"));
    let info = disk::write_disk(&tmp, &contents).map_err(|e| format!("{}: {e}", path.display()))?;
    fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))?;
    // The firmware variables of a machine that booted the disk this one replaces.
    let _ = fs::remove_file(crate::disks::efivars_path(&path));
    let qcow2 = match format {
        DiskFormat::Raw => {
            // A qcow2 of an earlier build would not match this one.
            let _ = fs::remove_file(out.join(QCOW2_FILE));
            None
        }
        DiskFormat::Qcow2 => {
            convert_to_qcow2(&path, &out.join(QCOW2_FILE))?;
            Some(QCOW2_FILE.to_string())
        }
    };
    Ok((info.size, info.disk_guid, qcow2))
}

/// `qemu-img convert`, compressed: what a cloud image import wants, and small.
fn convert_to_qcow2(raw: &Path, qcow2: &Path) -> Result<(), String> {
    let tmp: PathBuf = qcow2.with_extension("qcow2.tmp");
    let output = Command::new("qemu-img")
        .args(["convert", "-q", "-c", "-f", "raw", "-O", "qcow2"])
        .arg(raw)
        .arg(&tmp)
        .output()
        .map_err(|e| format!("qemu-img: {e}: install qemu-utils (scripts/install-deps does)"))?;
    if !output.status.success() {
        let _ = fs::remove_file(&tmp);
        return Err(format!(
            "qemu-img convert {} to qcow2: {}",
            raw.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    fs::rename(&tmp, qcow2).map_err(|e| format!("{}: {e}", qcow2.display()))
}
