//! Keel's image handling, split in two halves by the `builder` feature.
//!
//! **Guest side (always compiled).** The PID 1 inside the VM links this crate with
//! `default-features = false`, so this half stays small and pure Rust:
//! - [`layout`] reads an OCI image layout (`oci-layout`, `index.json`, manifest, config),
//!   verifying the SHA-256 of every JSON blob it trusts;
//! - [`unpack`] extracts each layer into its own directory the overlayfs-native way
//!   (whiteouts become 0/0 character devices, opaque markers become
//!   `trusted.overlay.opaque=y`), so the layer directories can be stacked directly as
//!   overlay `lowerdir`s. Extraction never follows symlinks from the layer and verifies the
//!   layer digest while streaming.
//!
//! **Host side (`builder`, on by default).** Used by the host CLI to assemble a bootable
//! system; it pulls heavier dependencies (the C zstd encoder, the cpio writer) and runs
//! host tools (apt, dpkg-deb, busybox):
//! - `kernel` fetches and caches Debian's kernel package;
//! - `modules` computes a kernel-module dependency closure from the `.modinfo` ELF
//!   sections, since the Debian package ships no `modules.dep`;
//! - `cpio` writes a byte-for-byte reproducible newc initramfs, optionally compressed;
//! - `import` creates an OCI image layout from directories, tarballs or a busybox binary,
//!   reproducibly, like `docker import`;
//! - `archive` brings images made by other tools into a layout: oci-archive and
//!   docker-archive tarballs, and images of other layouts, each blob verified and stored
//!   once however many images share it.
//! - `rootfs` stages the root image's tree (with host programs and their shared
//!   libraries), `erofs` turns it into a reproducible erofs image with `mkfs.erofs`, and
//!   `verity` appends a dm-verity hash tree to it.
//!
//! [`os`] (paths and constants both sides agree on) and [`verity::VerityParams`] (the
//! dm-verity table stage 1 loads) are in the guest half.

pub mod atomic;
mod digest;
mod error;
pub mod esp;
pub mod gc;
pub mod layer_store;
pub mod layout;
mod layout_index;
pub mod remove_tree;
pub mod unpack;
pub mod unpack_limits;

#[cfg(feature = "builder")]
pub mod archive;
#[cfg(feature = "builder")]
pub mod cpio;
#[cfg(feature = "builder")]
pub mod disk;
#[cfg(feature = "builder")]
pub mod erofs;
#[cfg(feature = "builder")]
pub mod import;
#[cfg(feature = "builder")]
pub mod kernel;
#[cfg(feature = "builder")]
pub mod modules;
#[cfg(feature = "pull")]
pub mod registry;
#[cfg(feature = "builder")]
pub mod rootfs;
pub mod uki;
pub mod update_bundle;
pub mod verity;

/// What every Keel host image has, whoever builds it (`keel build`, the benchmarks), and
/// where things are in it: the builder writes these paths and PID 1 reads them, so both
/// sides take them from here (this module is compiled without the `builder` feature too).
pub mod os {
    /// A 16-byte UUID in its canonical text form (lowercase, 8-4-4-4-12), as `mkfs.erofs
    /// -U` takes it, `keel.root=UUID=` names it and stage 1 reads it back.
    pub fn format_uuid(bytes: &[u8; 16]) -> String {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "{}-{}-{}-{}-{}",
            &hex[..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..]
        )
    }

    /// Modules every Keel host loads: the virtio NIC and its PCI transport, the
    /// virtio-serial port the control API is reached through from the host, overlayfs for
    /// container roots, the ACPI power button with the evdev interface it is read
    /// through, QEMU's fw_cfg device, through which a host file may be delivered, ext4
    /// for the /var data disk, and FAT (with the code pages its mount defaults to) and
    /// efivarfs for the EFI system partition and the boot loader's variables, through which
    /// a booted disk's entries are committed and updated, and QEMU's watchdog (i6300esb; a
    /// machine without one says ENODEV, which is not an error).
    pub const BASE_MODULES: &[&str] = &[
        "virtio_pci",
        "virtio_net",
        "virtio_console",
        "overlay",
        "button",
        "evdev",
        "qemu_fw_cfg",
        "ext4",
        "vfat",
        "nls_cp437",
        "nls_ascii",
        "efivarfs",
        "i6300esb",
    ];

    /// What stage 1 (the initramfs) needs to reach the root image: the virtio disk and
    /// its PCI transport, and erofs (whose lz4 decompressor Debian builds in).
    /// With efivarfs, stage 1 reads which disk the boot loader started from.
    pub const STAGE1_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "erofs", "efivarfs"];

    /// The disk controllers of the machines a disk image is written to, beyond QEMU's
    /// virtio disk: NVMe (clouds' and servers' SSDs), AHCI SATA and virtio-scsi (some clouds'
    /// boot disks), with the SCSI disk driver the last two hand disks to. In the initramfs,
    /// but loaded (from [`STORAGE_LOAD_LIST`]) only when the root image is not on a virtio
    /// disk: probing them costs a QEMU guest about 0.4 s of boot under TCG.
    pub const STORAGE_MODULES: &[&str] = &["nvme", "ahci", "virtio_scsi", "sd_mod"];

    /// The load list of [`STORAGE_MODULES`] and what they need beyond [`STAGE1_MODULES`].
    pub const STORAGE_LOAD_LIST: &str = "/lib/modules/keel-storage.load";

    /// Added to [`STAGE1_MODULES`] when the root image is dm-verity protected.
    pub const VERITY_MODULES: &[&str] = &["dm_mod", "dm_verity"];

    /// The kernel command line: serial console; only critical kernel messages on it (PID 1
    /// prints its own lines, which would otherwise show twice through /dev/kmsg); PID 1's
    /// kmsg lines not rate-limited; a kernel panic ends the VM instead of hanging it; and
    /// no IO-APIC timer check, which a software-emulated CPU on a busy host can fail
    /// ("IO-APIC + timer doesn't work!", a panic before init) though the timer works.
    pub const CMDLINE: &str = "console=ttyS0 loglevel=3 panic=-1 printk.devkmsg=on no_timer_check";

    /// The kernel command-line parameter naming the root image: `keel.root=UUID=<uuid>`,
    /// the erofs superblock's UUID.
    pub const ROOT_PARAM: &str = "keel.root=";

    /// The file name of the root image in a `keel build` output directory.
    pub const ROOT_IMAGE: &str = "root.img";

    /// The virtio-blk serial of the root image's disk (at most 20 bytes).
    pub const ROOT_DISK_SERIAL: &str = "keel-root";

    /// The virtio-blk serial of the persistent data disk mounted on /var.
    pub const DATA_DISK_SERIAL: &str = "KEEL-VAR";

    /// The ext4 label PID 1 gives the data disk when it formats it.
    pub const DATA_LABEL: &str = "KEEL-VAR";

    /// What stage 1 execs in the root image once it is mounted and switched to.
    pub const ROOT_INIT: &str = "/sbin/init";

    /// The host file built into the root image. /etc is a tmpfs made at boot, so the
    /// file lives under /usr, which is read-only.
    pub const BAKED_HOST_FILE: &str = "/usr/share/keel/host.toml";

    /// The OCI layout of the images built into the root image.
    pub const IMAGES_DIR: &str = "/usr/share/keel/images";

    /// The module load list, dependencies first, in both the initramfs and the root image.
    pub const MODULE_LOAD_LIST: &str = "/lib/modules/keel.load";

    /// e2fsprogs' mke2fs in the root image (with its shared libraries), for PID 1 to format
    /// a blank data disk.
    pub const MKE2FS: &str = "/usr/sbin/mke2fs";

    /// e2fsprogs' e2fsck in the root image, for PID 1 to check the data disk before
    /// mounting it.
    pub const E2FSCK: &str = "/usr/sbin/e2fsck";

    /// Directories of the root image that are only mount points: the root is mounted
    /// read-only and everything that changes is mounted over these.
    pub const MOUNT_POINTS: &[&str] = &["dev", "proc", "sys", "run", "tmp", "etc", "var"];

    /// The skeleton every Keel initramfs starts from: the mount points PID 1 uses and
    /// /dev/console, which the kernel opens as PID 1's stdio before any devtmpfs exists.
    #[cfg(feature = "builder")]
    pub fn base_initramfs() -> Result<crate::cpio::InitramfsBuilder, crate::cpio::CpioError> {
        let mut initramfs = crate::cpio::InitramfsBuilder::new();
        for dir in MOUNT_POINTS
            .iter()
            .copied()
            .chain(["usr/share/keel/images"])
        {
            initramfs.add_dir(dir, 0o755)?;
        }
        initramfs.add_char_device("dev/console", 0o600, 5, 1)?;
        Ok(initramfs)
    }
}

pub use error::ImageError;
