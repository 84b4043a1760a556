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

mod digest;
mod error;
pub mod gc;
pub mod layout;
pub mod unpack;

#[cfg(feature = "builder")]
pub mod archive;
#[cfg(feature = "builder")]
pub mod cpio;
#[cfg(feature = "builder")]
pub mod import;
#[cfg(feature = "builder")]
pub mod kernel;
#[cfg(feature = "builder")]
pub mod modules;
#[cfg(feature = "pull")]
pub mod registry;

/// What every Keel host image has, whoever builds it (`keel build`, the benchmarks).
#[cfg(feature = "builder")]
pub mod os {
    /// Modules every Keel host loads: the virtio NIC and its PCI transport, the
    /// virtio-serial port the control API is reached through from the host, overlayfs for
    /// container roots, the ACPI power button with the evdev interface it is read
    /// through, QEMU's fw_cfg device, through which a host file may be delivered, the
    /// virtio disk driver with ext4 for the /var data disk, and ISO 9660 for a KEEL-CONFIG
    /// config disk (ext4 serves those too).
    pub const BASE_MODULES: &[&str] = &[
        "virtio_pci",
        "virtio_net",
        "virtio_console",
        "virtio_blk",
        "overlay",
        "button",
        "evdev",
        "qemu_fw_cfg",
        "ext4",
        "isofs",
    ];

    /// The kernel command line: serial console; only critical kernel messages on it (PID 1
    /// prints its own lines, which would otherwise show twice through /dev/kmsg); PID 1's
    /// kmsg lines not rate-limited; a kernel panic ends the VM instead of hanging it; and
    /// no IO-APIC timer check, which a software-emulated CPU on a busy host can fail
    /// ("IO-APIC + timer doesn't work!", a panic before init) though the timer works.
    pub const CMDLINE: &str = "console=ttyS0 loglevel=3 panic=-1 printk.devkmsg=on no_timer_check";

    /// The skeleton every Keel initramfs starts from: the mount points PID 1 uses and
    /// /dev/console, which the kernel opens as PID 1's stdio before any devtmpfs exists.
    pub fn base_initramfs() -> Result<crate::cpio::InitramfsBuilder, crate::cpio::CpioError> {
        let mut initramfs = crate::cpio::InitramfsBuilder::new();
        for dir in [
            "dev",
            "proc",
            "sys",
            "run",
            "tmp",
            "etc",
            "var",
            "usr/share/keel/images",
        ] {
            initramfs.add_dir(dir, 0o755)?;
        }
        initramfs.add_char_device("dev/console", 0o600, 5, 1)?;
        Ok(initramfs)
    }
}

pub use error::ImageError;
