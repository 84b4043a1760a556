//! What to boot, and the QEMU command line for it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::accel::Accel;

/// The name of the first virtio-serial port of the control API (keel_api::VIRTIO_PORT_NAME).
pub const API_PORT_NAME: &str = "keel.api";

/// How many API ports a guest gets (keel_api::VIRTIO_PORT_COUNT): that many API clients are
/// served at once.
pub const API_PORT_COUNT: usize = 4;

/// The name of API port `index` (keel_api::virtio_port_name).
fn keel_api_port_name(index: usize) -> String {
    match index {
        0 => API_PORT_NAME.to_owned(),
        n => format!("{API_PORT_NAME}.{n}"),
    }
}

/// The machine type used for every boot (and for the KVM probe, so that the probe exercises the
/// same vCPU setup as a real boot).
pub(crate) const MACHINE: &str = "q35";

/// Everything needed to boot one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// The QEMU binary; `None` is `KEEL_QEMU`, else `qemu-system-x86_64` from `PATH`.
    pub qemu: Option<PathBuf>,
    /// The kernel image (`-kernel`).
    pub kernel: PathBuf,
    /// The initramfs (`-initrd`); `None` boots the kernel alone, which is only useful to test
    /// the runner itself (the kernel panics for want of a root file system).
    pub initrd: Option<PathBuf>,
    /// The kernel command line (`-append`). It should contain `console=ttyS0`, the console
    /// this crate reads.
    pub cmdline: String,
    /// Guest RAM in MiB.
    pub memory_mb: u32,
    /// Number of vCPUs.
    pub cpus: u32,
    /// TCP ports published on the host's loopback.
    pub publish: Vec<PortForward>,
    /// Also append every console byte to this file (created or truncated at boot).
    pub console_log: Option<PathBuf>,
    /// Copy the console to our stdout as it arrives (what `keel run` wants; tests leave it off).
    pub echo_console: bool,
    /// The host end of the guest's control API port: QEMU listens on this unix socket and
    /// connects whoever connects there to the virtio-serial port `keel.api`, where PID 1
    /// serves the control API (see docs/api.md). Anyone who can open the socket controls the
    /// guest as root, hence [`crate::Vm::boot`] puts it in a private directory when this is
    /// `None`. `keel run DIR` uses `DIR/api.sock`.
    pub api_socket: Option<PathBuf>,
    /// Extra options of the user-mode NIC, e.g. `hostname=NAME` (the name its DHCP server
    /// hands out) or `ipv6=off`.
    pub user_net: Vec<String>,
    /// virtio-blk disks, in this order (the guest sees them as /dev/vda, vdb, ...).
    pub disks: Vec<Disk>,
    /// Appended verbatim to the QEMU command line.
    pub extra_args: Vec<String>,
    /// Boot through UEFI firmware from the first disk instead of QEMU's `-kernel`: `kernel`,
    /// `initrd` and `cmdline` are then not used, and a guest reboot restarts the machine
    /// (firmware, boot loader and all) rather than ending QEMU, since falling back to the
    /// previous system after a failed update takes reboots. A guest that hangs is reset by
    /// the i6300esb watchdog it is given.
    pub firmware: Option<Firmware>,
}

/// OVMF as Debian's `ovmf` installs it.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// The variable store every machine starts from; each gets its own copy.
pub const OVMF_VARS_TEMPLATE: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// UEFI firmware for one machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firmware {
    /// The firmware code, mapped read-only ([`OVMF_CODE`]).
    pub code: PathBuf,
    /// The machine's own variable store (boot entries, the boot loader's variables), written
    /// by the firmware: a copy of [`OVMF_VARS_TEMPLATE`] that lives as long as the machine.
    pub vars: PathBuf,
    /// Secure Boot firmware (e.g. [`OVMF_CODE_SECURE_BOOT`]): it needs SMM, and its flash
    /// is writable only from SMM, so the guest OS cannot change its keys.
    pub secure_boot: bool,
}

/// Debian's OVMF with Secure Boot, and a variable store with its test ("snakeoil") keys
/// enrolled: it starts only EFI binaries signed by `/usr/share/ovmf/PkKek-1-snakeoil.key`.
pub const OVMF_CODE_SECURE_BOOT: &str = "/usr/share/OVMF/OVMF_CODE_4M.snakeoil.fd";
pub const OVMF_VARS_SNAKEOIL: &str = "/usr/share/OVMF/OVMF_VARS_4M.snakeoil.fd";

/// The longest virtio-blk serial: the guest reads it into a 20-byte field
/// (`VIRTIO_BLK_ID_BYTES`), silently cut beyond that.
pub const MAX_DISK_SERIAL: usize = 20;

/// A raw disk image attached as a virtio-blk device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub path: PathBuf,
    /// QEMU opens the file read-only and the guest sees a read-only disk.
    pub read_only: bool,
    /// What the guest reads in /sys/block/vdX/serial, so it can tell its disks apart
    /// whatever order they come in.
    pub serial: Option<String>,
}

impl Disk {
    /// Why the serial cannot be used, if it cannot: longer than [`MAX_DISK_SERIAL`] bytes,
    /// or with characters other than ASCII letters, digits, `-`, `_` and `.` (anything
    /// else would need QEMU's option escaping and the guest's sysfs reading to agree).
    pub fn serial_problem(&self) -> Option<String> {
        let serial = self.serial.as_deref()?;
        if serial.is_empty() || serial.len() > MAX_DISK_SERIAL {
            return Some(format!(
                "disk serial {serial:?} must be 1 to {MAX_DISK_SERIAL} bytes"
            ));
        }
        if !serial
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Some(format!(
                "disk serial {serial:?} may only hold ASCII letters, digits, `-`, `_` and `.`"
            ));
        }
        None
    }
}

impl VmConfig {
    /// The [`Default`] configuration with `kernel` filled in.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            ..VmConfig::default()
        }
    }
}

impl Default for VmConfig {
    /// No kernel (it must be set), no initrd, `console=ttyS0 panic=-1 no_timer_check`, 512 MiB, one vCPU,
    /// nothing published, no log, no echo, the API socket chosen at boot, no disks.
    ///
    /// `panic=-1` makes a panicking guest reboot at once, which `-no-reboot` turns into QEMU
    /// exiting, so a dead guest never leaves a hung QEMU behind.
    fn default() -> Self {
        VmConfig {
            qemu: None,
            kernel: PathBuf::new(),
            initrd: None,
            cmdline: "console=ttyS0 panic=-1 no_timer_check".to_owned(),
            memory_mb: 512,
            cpus: 1,
            publish: Vec::new(),
            console_log: None,
            echo_console: false,
            api_socket: None,
            user_net: Vec::new(),
            disks: Vec::new(),
            extra_args: Vec::new(),
            firmware: None,
        }
    }
}

/// A TCP port published from the host's `127.0.0.1:host` to the guest's port `guest`.
///
/// Parsed from `"HOST:GUEST"` (like `8080:80`) or `"GUEST"` alone; either may end in `/tcp`.
/// A host port of 0 means "pick a free one at boot"; [`crate::Vm::host_port`] tells which.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortForward {
    pub host: u16,
    pub guest: u16,
}

/// Why a port-forward string did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid port forward {input:?}: {reason} (expected HOST:GUEST, like 8080:80)")]
pub struct ParsePortForwardError {
    input: String,
    reason: &'static str,
}

impl FromStr for PortForward {
    type Err = ParsePortForwardError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParsePortForwardError {
            input: s.to_owned(),
            reason,
        };
        let ports = match s.split_once('/') {
            None => s,
            Some((ports, "tcp")) => ports,
            Some(_) => return Err(err("only tcp can be published")),
        };
        let (host, guest) = match ports.split_once(':') {
            Some((host, guest)) => (host, guest),
            None => ("0", ports),
        };
        let host: u16 = host.parse().map_err(|_| err("bad host port"))?;
        let guest: u16 = guest.parse().map_err(|_| err("bad guest port"))?;
        if guest == 0 {
            return Err(err("the guest port cannot be 0"));
        }
        Ok(PortForward { host, guest })
    }
}

impl fmt::Display for PortForward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.guest)
    }
}

/// The full QEMU argument list (without the program name) for `cfg`.
///
/// Pure: it neither checks files nor picks ports, so forwards with `host == 0` must have been
/// resolved before (as [`crate::Vm::boot`] does). `api_ports` are the chardev sockets of the
/// guest's API ports, in order (`Vm::boot` always gives [`API_PORT_COUNT`]). Paths are converted lossily and disk
/// serials taken as they are; `Vm::boot` rejects non-UTF-8 paths and bad serials first.
pub fn qemu_args(
    cfg: &VmConfig,
    accel: Accel,
    qmp_socket: &Path,
    api_ports: &[PathBuf],
) -> Vec<String> {
    let mut args: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(|s| (*s).to_owned()));
    // -nodefaults: no default NIC, VGA, floppy or monitor; everything the guest gets is below.
    let machine = match &cfg.firmware {
        Some(f) if f.secure_boot => format!("{MACHINE},smm=on"),
        _ => MACHINE.to_string(),
    };
    push(&["-nodefaults", "-no-user-config", "-machine", &machine]);
    push(&accel.qemu_args());
    push(&["-display", "none"]);
    let memory = cfg.memory_mb.to_string();
    let cpus = cfg.cpus.to_string();
    push(&["-m", &memory, "-smp", &cpus]);

    match &cfg.firmware {
        None => {
            push(&["-no-reboot"]);
            let kernel = cfg.kernel.to_string_lossy();
            push(&["-kernel", &kernel]);
            if let Some(initrd) = &cfg.initrd {
                push(&["-initrd", &initrd.to_string_lossy()]);
            }
            push(&["-append", &cfg.cmdline]);
        }
        Some(firmware) => {
            let code = format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={}",
                firmware.code.to_string_lossy().replace(',', ",,")
            );
            let vars = format!(
                "if=pflash,format=raw,unit=1,file={}",
                firmware.vars.to_string_lossy().replace(',', ",,")
            );
            push(&["-drive", &code, "-drive", &vars]);
            if firmware.secure_boot {
                push(&["-global", "driver=cfi.pflash01,property=secure,value=on"]);
            }
            // A guest that stops feeding /dev/watchdog is reset, and its boot loader
            // counts the try.
            push(&["-device", "i6300esb", "-action", "watchdog=reset"]);
        }
    }

    push(&["-serial", "stdio"]);
    // QEMU option syntax escapes a comma by doubling it.
    let qmp = format!(
        "unix:{},server=on,wait=off",
        qmp_socket.to_string_lossy().replace(',', ",,")
    );
    push(&["-qmp", &qmp]);

    let mut nic = String::from("user,model=virtio-net-pci");
    for option in &cfg.user_net {
        nic.push(',');
        nic.push_str(&option.replace(',', ",,"));
    }
    for fwd in &cfg.publish {
        nic.push_str(&format!(
            ",hostfwd=tcp:127.0.0.1:{}-:{}",
            fwd.host, fwd.guest
        ));
    }
    push(&["-nic", &nic]);
    push(&["-device", "virtio-rng-pci"]);
    if !api_ports.is_empty() {
        push(&["-device", "virtio-serial-pci"]);
    }
    for (index, socket) in api_ports.iter().enumerate() {
        // A socket chardev is a listener QEMU accepts one client at a time on, relayed to a
        // named port the guest opens as /dev/vportNpM (its sysfs name: keel.api, keel.api.1,
        // ...). The API socket clients use is served by crate::api_mux in front of these.
        let chardev = format!(
            "socket,id=keelapi{index},path={},server=on,wait=off",
            socket.to_string_lossy().replace(',', ",,")
        );
        push(&["-chardev", &chardev]);
        push(&[
            "-device",
            &format!(
                "virtserialport,chardev=keelapi{index},name={}",
                keel_api_port_name(index)
            ),
        ]);
    }
    for (i, disk) in cfg.disks.iter().enumerate() {
        let drive = format!(
            "file={},if=none,id=disk{i},format=raw,readonly={}",
            disk.path.to_string_lossy().replace(',', ",,"),
            if disk.read_only { "on" } else { "off" }
        );
        let mut device = format!("virtio-blk-pci,drive=disk{i}");
        if i == 0 && cfg.firmware.is_some() {
            // Straight to the disk: no time spent offering a network boot first.
            device.push_str(",bootindex=0");
        }
        if let Some(serial) = &disk.serial {
            device.push_str(",serial=");
            device.push_str(&serial.replace(',', ",,"));
        }
        push(&["-drive", &drive, "-device", &device]);
    }
    args.extend(cfg.extra_args.iter().cloned());
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_port_forwards() {
        let pf = |s: &str| s.parse::<PortForward>();
        assert_eq!(
            pf("8080:80"),
            Ok(PortForward {
                host: 8080,
                guest: 80
            })
        );
        assert_eq!(pf("80"), Ok(PortForward { host: 0, guest: 80 }));
        assert_eq!(
            pf("0:443/tcp"),
            Ok(PortForward {
                host: 0,
                guest: 443
            })
        );
        assert_eq!(pf("65535:1").map(|p| p.to_string()), Ok("65535:1".into()));
        for bad in [
            "",
            ":",
            "8080:",
            ":80",
            "a:80",
            "8080:b",
            "65536:80",
            "80:0",
            "1:2:3",
            "8080:80/udp",
            "-1:80",
            " 80:80",
        ] {
            assert!(pf(bad).is_err(), "{bad:?} parsed");
        }
        let msg = pf("x").unwrap_err().to_string();
        assert!(msg.contains("\"x\"") && msg.contains("HOST:GUEST"), "{msg}");
    }

    fn sample() -> VmConfig {
        let mut cfg = VmConfig::new("/boot/vmlinuz");
        cfg.initrd = Some("/out/initrd.img".into());
        cfg.cmdline = "console=ttyS0 quiet".into();
        cfg.memory_mb = 1024;
        cfg.cpus = 2;
        cfg.publish = vec![
            PortForward {
                host: 8080,
                guest: 80,
            },
            PortForward {
                host: 2222,
                guest: 22,
            },
        ];
        cfg.extra_args = vec!["-snapshot".into()];
        cfg
    }

    /// The value following `flag`, asserting the flag appears exactly once.
    fn value<'a>(args: &'a [String], flag: &str) -> &'a str {
        let positions: Vec<_> = args
            .iter()
            .enumerate()
            .filter(|(_, a)| *a == flag)
            .collect();
        assert_eq!(positions.len(), 1, "{flag} in {args:?}");
        &args[positions[0].0 + 1]
    }

    #[test]
    fn builds_qemu_args() {
        let args = qemu_args(&sample(), Accel::Tcg, Path::new("/tmp/d/qmp.sock"), &[]);
        assert_eq!(value(&args, "-accel"), "tcg");
        assert_eq!(value(&args, "-cpu"), "max");
        assert_eq!(value(&args, "-machine"), "q35");
        assert_eq!(value(&args, "-m"), "1024");
        assert_eq!(value(&args, "-smp"), "2");
        assert_eq!(value(&args, "-kernel"), "/boot/vmlinuz");
        assert_eq!(value(&args, "-initrd"), "/out/initrd.img");
        assert_eq!(value(&args, "-append"), "console=ttyS0 quiet");
        assert_eq!(value(&args, "-serial"), "stdio");
        assert_eq!(value(&args, "-display"), "none");
        assert_eq!(
            value(&args, "-qmp"),
            "unix:/tmp/d/qmp.sock,server=on,wait=off"
        );
        assert_eq!(
            value(&args, "-nic"),
            "user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=tcp:127.0.0.1:2222-:22"
        );
        assert_eq!(value(&args, "-device"), "virtio-rng-pci");
        assert!(args.contains(&"-no-reboot".to_owned()));
        assert!(args.contains(&"-nodefaults".to_owned()));
        assert_eq!(args.last().map(String::as_str), Some("-snapshot"));

        let kvm = qemu_args(&sample(), Accel::Kvm, Path::new("/q"), &[]);
        assert_eq!(value(&kvm, "-accel"), "kvm");
        assert_eq!(value(&kvm, "-cpu"), "host");
    }

    #[test]
    fn the_api_ports_are_virtio_serial_ports_on_unix_sockets() {
        let cfg = sample();
        let ports = ["/run/a,b/p0.sock".into(), "/run/p1.sock".into()];
        let args = qemu_args(&cfg, Accel::Tcg, Path::new("/q"), &ports);
        let chardevs: Vec<&str> = args
            .windows(2)
            .filter(|w| w[0] == "-chardev")
            .map(|w| w[1].as_str())
            .collect();
        assert_eq!(
            chardevs,
            [
                "socket,id=keelapi0,path=/run/a,,b/p0.sock,server=on,wait=off",
                "socket,id=keelapi1,path=/run/p1.sock,server=on,wait=off"
            ]
        );
        let devices: Vec<&str> = args
            .windows(2)
            .filter(|w| w[0] == "-device")
            .map(|w| w[1].as_str())
            .collect();
        assert_eq!(
            devices,
            [
                "virtio-rng-pci",
                "virtio-serial-pci",
                "virtserialport,chardev=keelapi0,name=keel.api",
                "virtserialport,chardev=keelapi1,name=keel.api.1"
            ]
        );
        // extra_args stay last, so that they can override.
        assert_eq!(args.last().map(String::as_str), Some("-snapshot"));
    }

    #[test]
    fn disks_are_virtio_blk_devices_with_serials() {
        let mut cfg = sample();
        cfg.disks = vec![
            Disk {
                path: "/out/root.img".into(),
                read_only: true,
                serial: Some("keel-root".into()),
            },
            Disk {
                path: "/data/a,b/data.img".into(),
                read_only: false,
                serial: None,
            },
        ];
        let args = qemu_args(&cfg, Accel::Tcg, Path::new("/q"), &[]);
        let pairs: Vec<(&str, &str)> = args
            .windows(2)
            .filter(|w| w[0] == "-drive" || w[1].starts_with("virtio-blk"))
            .map(|w| (w[0].as_str(), w[1].as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                (
                    "-drive",
                    "file=/out/root.img,if=none,id=disk0,format=raw,readonly=on"
                ),
                ("-device", "virtio-blk-pci,drive=disk0,serial=keel-root"),
                (
                    "-drive",
                    "file=/data/a,,b/data.img,if=none,id=disk1,format=raw,readonly=off"
                ),
                ("-device", "virtio-blk-pci,drive=disk1"),
            ]
        );
        assert_eq!(args.last().map(String::as_str), Some("-snapshot"));
        assert!(!qemu_args(&sample(), Accel::Tcg, Path::new("/q"), &[]).contains(&"-drive".into()));
    }

    #[test]
    fn disk_serials_are_checked() {
        let disk = |serial: Option<&str>| Disk {
            path: "/d".into(),
            read_only: false,
            serial: serial.map(String::from),
        };
        for good in [
            None,
            Some("KEEL-VAR"),
            Some("keel-root"),
            Some("a_b.c-01234567890123"),
        ] {
            assert_eq!(disk(good).serial_problem(), None, "{good:?}");
        }
        for bad in [
            Some(""),
            Some("a23456789012345678901"),
            Some("a,b"),
            Some("a b"),
            Some("é"),
        ] {
            assert!(disk(bad).serial_problem().is_some(), "{bad:?}");
        }
    }

    #[test]
    fn firmware_boots_the_first_disk_and_survives_reboots() {
        let mut cfg = sample();
        cfg.firmware = Some(Firmware {
            code: OVMF_CODE.into(),
            vars: "/m/vars,1.fd".into(),
            secure_boot: false,
        });
        cfg.disks = vec![Disk {
            path: "/m/disk.img".into(),
            read_only: false,
            serial: None,
        }];
        let args = qemu_args(&cfg, Accel::Tcg, Path::new("/q"), &[]);
        for flag in ["-kernel", "-initrd", "-append", "-no-reboot"] {
            assert!(!args.contains(&flag.to_owned()), "{flag} in {args:?}");
        }
        let drives: Vec<&str> = args
            .windows(2)
            .filter(|w| w[0] == "-drive")
            .map(|w| w[1].as_str())
            .collect();
        assert_eq!(
            drives,
            [
                "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
                "if=pflash,format=raw,unit=1,file=/m/vars,,1.fd",
                "file=/m/disk.img,if=none,id=disk0,format=raw,readonly=off",
            ]
        );
        assert!(args.contains(&"virtio-blk-pci,drive=disk0,bootindex=0".to_owned()));
        assert!(args.contains(&"i6300esb".to_owned()));
        assert_eq!(value(&args, "-action"), "watchdog=reset");
    }

    #[test]
    fn minimal_args_and_escaping() {
        let cfg = VmConfig::new("/k");
        let args = qemu_args(&cfg, Accel::Tcg, Path::new("/tmp/a,b/qmp"), &[]);
        assert!(!args.contains(&"-initrd".to_owned()));
        assert_eq!(value(&args, "-m"), "512");
        assert_eq!(value(&args, "-smp"), "1");
        assert_eq!(
            value(&args, "-append"),
            "console=ttyS0 panic=-1 no_timer_check"
        );
        assert_eq!(value(&args, "-nic"), "user,model=virtio-net-pci");
        assert_eq!(
            value(&args, "-qmp"),
            "unix:/tmp/a,,b/qmp,server=on,wait=off"
        );
    }
}
