//! Choosing between KVM and TCG.
//!
//! `/dev/kvm` existing proves little: under nested virtualisation it can open fine and even run
//! trivial real-mode code, while QEMU with `-cpu host` dies setting MSRs or hangs. So the probe
//! runs QEMU itself, with the exact accelerator, CPU model and machine type of a real boot, on
//! a 64 KiB firmware whose reset vector writes to an `isa-debug-exit` port. Reaching that
//! write means QEMU created the VM, configured the vCPU and ran guest code; QEMU then exits
//! with a code nothing else produces. It takes well under 100 ms; a hung vCPU is cut off after
//! [`PROBE_TIMEOUT`]. The answer is cached for the life of the process.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use crate::child::ChildWatch;
use crate::config::MACHINE;
use crate::error::QemuError;
use crate::vm::{QEMU_BINARY, private_dir};

/// The environment variable that forces an accelerator: `kvm`, `tcg`, or `auto` (the default).
pub const ACCEL_ENV: &str = "KEEL_ACCEL";

/// How long the KVM probe may take before KVM is declared hung.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The I/O port of the probe's `isa-debug-exit` device.
const PROBE_PORT: u8 = 0xf4;
/// The byte the probe writes; `isa-debug-exit` makes QEMU exit with `(value << 1) | 1`.
const PROBE_VALUE: u8 = 0x31;

/// How QEMU executes guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation, with the host's CPU model (`-accel kvm -cpu host`).
    Kvm,
    /// Emulation, with every feature QEMU can emulate (`-accel tcg -cpu max`). Several times
    /// slower, but works anywhere.
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "KVM",
            Accel::Tcg => "TCG",
        })
    }
}

impl Accel {
    /// The `-accel` and `-cpu` arguments.
    pub(crate) fn qemu_args(self) -> [&'static str; 4] {
        match self {
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
            Accel::Tcg => ["-accel", "tcg", "-cpu", "max"],
        }
    }
}

/// The accelerator to boot with: what [`ACCEL_ENV`] forces, else KVM if [`kvm_status`] says it
/// works, else TCG.
pub fn select_accel() -> Result<Accel, QemuError> {
    let forced = match std::env::var(ACCEL_ENV) {
        Ok(value) => parse_accel(&value)?,
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(value)) => {
            return Err(QemuError::BadAccel(value.to_string_lossy().into_owned()));
        }
    };
    Ok(forced.unwrap_or(match kvm_status() {
        Ok(()) => Accel::Kvm,
        Err(_) => Accel::Tcg,
    }))
}

/// `Some` for a forced accelerator, `None` for automatic choice.
fn parse_accel(value: &str) -> Result<Option<Accel>, QemuError> {
    match value {
        "kvm" => Ok(Some(Accel::Kvm)),
        "tcg" => Ok(Some(Accel::Tcg)),
        "" | "auto" => Ok(None),
        other => Err(QemuError::BadAccel(other.to_owned())),
    }
}

/// Whether KVM really runs guests on this host; the error says why not. Probed once per
/// process (the first call takes up to 2 s, normally under 100 ms).
pub fn kvm_status() -> Result<(), &'static str> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE
        .get_or_init(|| probe(Accel::Kvm))
        .as_ref()
        .map_err(String::as_str)
        .copied()
}

/// Runs the probe guest under `accel` (only KVM is ever in doubt; TCG is probed in tests to
/// prove the probe guest itself is right).
fn probe(accel: Accel) -> Result<(), String> {
    if accel == Accel::Kvm {
        // Cheap early exit for the common "no KVM at all" case, with a clearer reason.
        OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    }

    let dir = private_dir().map_err(|e| format!("{accel} probe: {e}"))?;
    let rom = dir.path().join("probe.rom");
    fs::write(&rom, probe_rom()).map_err(|e| format!("{accel} probe: writing firmware: {e}"))?;
    let stderr_path = dir.path().join("stderr");
    let stderr = File::create(&stderr_path).map_err(|e| format!("{accel} probe: {e}"))?;

    let child = Command::new(QEMU_BINARY)
        .args(["-nodefaults", "-no-user-config", "-machine", MACHINE])
        .args(accel.qemu_args())
        .args(["-display", "none", "-no-reboot", "-m", "16", "-bios"])
        .arg(&rom)
        .args([
            "-device",
            &format!("isa-debug-exit,iobase={PROBE_PORT:#x},iosize=1"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("{accel} probe: cannot run {QEMU_BINARY}: {e}"))?;
    let watch = ChildWatch::spawn(child).map_err(|e| format!("{accel} probe: {e}"))?;
    let Some(status) = watch.wait_timeout(PROBE_TIMEOUT) else {
        watch.kill();
        return Err(format!(
            "a {accel} test guest was still running after {PROBE_TIMEOUT:?}"
        ));
    };
    if status.code() == Some(i32::from(PROBE_VALUE) << 1 | 1) {
        return Ok(());
    }
    let stderr = fs::read_to_string(&stderr_path).unwrap_or_default();
    let detail = stderr
        .lines()
        .find(|l| !l.trim().is_empty() && !l.contains("warning"))
        .unwrap_or("no error message");
    Err(format!("a {accel} test guest failed ({status}): {detail}"))
}

/// A 64 KiB BIOS image: the reset vector (16 bytes below the top, executed at F000:FFF0 in
/// real mode) writes [`PROBE_VALUE`] to [`PROBE_PORT`]; everything else is `hlt`, so a
/// misbehaving vCPU halts forever instead of running garbage.
fn probe_rom() -> Vec<u8> {
    let mut rom = vec![0xf4_u8; 64 * 1024];
    let code = [
        0xb0,
        PROBE_VALUE, // mov al, PROBE_VALUE
        0xe6,
        PROBE_PORT, // out PROBE_PORT, al
        0xfa,       // cli
        0xf4,       // hlt
    ];
    let start = rom.len() - 16;
    rom[start..start + code.len()].copy_from_slice(&code);
    rom
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_accel_values() {
        assert_eq!(parse_accel("kvm").unwrap(), Some(Accel::Kvm));
        assert_eq!(parse_accel("tcg").unwrap(), Some(Accel::Tcg));
        assert_eq!(parse_accel("auto").unwrap(), None);
        assert_eq!(parse_accel("").unwrap(), None);
        assert!(matches!(parse_accel("KVM"), Err(QemuError::BadAccel(v)) if v == "KVM"));
    }

    #[test]
    fn probe_rom_reset_vector() {
        let rom = probe_rom();
        assert_eq!(rom.len(), 65536);
        assert_eq!(&rom[0xfff0..0xfff4], &[0xb0, 0x31, 0xe6, 0xf4]);
    }

    #[test]
    fn probe_guest_reaches_its_exit_port_under_tcg() {
        match probe(Accel::Tcg) {
            Ok(()) => {}
            Err(e) if e.contains("cannot run") => eprintln!("skipping: {e}"),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn kvm_probe_is_cached_and_consistent() {
        // Whatever the answer on this host, asking twice gives the same one without a second
        // probe (the second call must be instant).
        let first = kvm_status();
        let start = std::time::Instant::now();
        assert_eq!(kvm_status(), first);
        assert!(start.elapsed() < Duration::from_millis(50));
        eprintln!("kvm_status on this host: {first:?}");
    }
}
