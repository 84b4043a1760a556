//! Choosing between KVM and TCG: the one place that decides, for `keel run`, the test harness
//! and the benchmarks alike.
//!
//! `/dev/kvm` existing proves little: under nested virtualisation it can open fine, run trivial
//! real-mode code, and still hang a Linux guest before it prints a byte. So the decision has
//! three sources, strongest first:
//!
//! 1. `KEEL_ACCEL=kvm|tcg` forces either (a forced KVM guest that shows no sign of life is an
//!    error, never a silent hang).
//! 2. What a real boot on this machine showed, remembered for the machine's uptime
//!    ([`crate::kvm_verdict`]): [`crate::Vm::boot`] watches every KVM boot, and a guest that
//!    prints nothing within [`KVM_LIFE_SIGN_TIMEOUT`] is killed and booted again under TCG.
//! 3. A probe: QEMU itself, with the accelerator, CPU model and machine type of a real boot,
//!    on a 64 KiB firmware whose reset vector writes to an `isa-debug-exit` port. Reaching that
//!    write means QEMU created the VM, configured the vCPU and ran guest code; QEMU then exits
//!    with a code nothing else produces. It takes well under 100 ms; a hung vCPU is cut off
//!    after [`PROBE_TIMEOUT`]. It rules KVM out cheaply where it cannot even start; passing it
//!    only earns KVM a watched boot.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::binary::private_dir;
use crate::child::ChildWatch;
use crate::config::MACHINE;
use crate::error::QemuError;
use crate::kvm_verdict::{KvmVerdict, VerdictFile};

/// The environment variable that forces an accelerator: `kvm`, `tcg`, or `auto` (the default).
pub const ACCEL_ENV: &str = "KEEL_ACCEL";

/// How long the KVM probe may take before KVM is declared hung.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a KVM guest may stay silent on its console before KVM is declared unable to run
/// guests. A Linux guest under working KVM prints its first line (the kernel's, or stage 1's
/// at `loglevel=3`) within one or two seconds even on a loaded machine.
pub const KVM_LIFE_SIGN_TIMEOUT: Duration = Duration::from_secs(8);

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

/// The accelerator a boot starts with, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    pub accel: Accel,
    /// [`ACCEL_ENV`] chose it: no fallback.
    pub forced: bool,
    /// Why KVM is not used, when the automatic choice fell to TCG.
    pub kvm_refused: Option<String>,
}

/// The accelerator to start a boot with: what [`ACCEL_ENV`] forces, else KVM unless
/// [`kvm_status`] rules it out, else TCG.
pub fn choose_accel(qemu: &Path) -> Result<AccelChoice, QemuError> {
    if let Some(accel) = forced_accel()? {
        return Ok(AccelChoice {
            accel,
            forced: true,
            kvm_refused: None,
        });
    }
    Ok(match kvm_status(qemu) {
        Ok(()) => AccelChoice {
            accel: Accel::Kvm,
            forced: false,
            kvm_refused: None,
        },
        Err(why) => AccelChoice {
            accel: Accel::Tcg,
            forced: false,
            kvm_refused: Some(why),
        },
    })
}

/// The accelerator [`ACCEL_ENV`] forces, if any.
fn forced_accel() -> Result<Option<Accel>, QemuError> {
    match std::env::var(ACCEL_ENV) {
        Ok(value) => parse_accel(&value),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(value)) => {
            Err(QemuError::BadAccel(value.to_string_lossy().into_owned()))
        }
    }
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

/// What this process knows of KVM per QEMU binary: a verdict, or a passed probe (`Ok` too,
/// until a watched boot says otherwise).
static KNOWN: Mutex<Option<HashMap<PathBuf, KvmVerdict>>> = Mutex::new(None);

/// Whether KVM may run guests with the QEMU binary `qemu`; the error says why not. Answers
/// from what this process learnt, else from the machine's remembered verdict, else from the
/// probe (the first call then takes up to 2 s, normally under 100 ms).
pub fn kvm_status(qemu: &Path) -> KvmVerdict {
    // Held across the probe, so parallel boots in one process probe once.
    let mut known = KNOWN.lock().unwrap_or_else(PoisonError::into_inner);
    let known = known.get_or_insert_with(HashMap::new);
    if let Some(verdict) = known.get(qemu) {
        return verdict.clone();
    }
    let file = VerdictFile::for_binary(qemu);
    let verdict = match file.as_ref().and_then(VerdictFile::load) {
        Some(Ok(())) => Ok(()),
        Some(Err(why)) => Err(format!(
            "{why}; seen earlier in this machine's uptime, remembered in {}",
            file.as_ref().map_or(Path::new("?"), |f| &f.path).display()
        )),
        None => {
            let probed = probe(qemu, Accel::Kvm);
            // A failed probe is final for this boot of the machine; a passed one is not.
            if let (Err(_), Some(file)) = (&probed, &file) {
                file.store(&probed);
            }
            probed
        }
    };
    known.insert(qemu.to_owned(), verdict.clone());
    verdict
}

/// Records what a watched KVM boot showed, for this process and for the rest of the machine's
/// uptime.
pub(crate) fn record_kvm_boot(qemu: &Path, verdict: KvmVerdict) {
    if let Some(file) = VerdictFile::for_binary(qemu) {
        file.store(&verdict);
    }
    KNOWN
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get_or_insert_with(HashMap::new)
        .insert(qemu.to_owned(), verdict);
}

/// Says, once per process and reason, that a boot runs under TCG because KVM does not work.
pub(crate) fn announce_tcg(why: &str) {
    static SAID: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut said = SAID.lock().unwrap_or_else(PoisonError::into_inner);
    if !said.iter().any(|s| s == why) {
        eprintln!("keel: KVM does not run guests here ({why}); using TCG");
        said.push(why.to_owned());
    }
}

/// Runs the probe guest under `accel` with the QEMU binary `qemu` (only KVM is ever in doubt;
/// TCG is probed in tests to prove the probe guest itself is right).
fn probe(qemu: &Path, accel: Accel) -> Result<(), String> {
    let dir = private_dir().map_err(|e| format!("{accel} probe: {e}"))?;
    let rom = dir.path().join("probe.rom");
    fs::write(&rom, probe_rom()).map_err(|e| format!("{accel} probe: writing firmware: {e}"))?;
    let stderr_path = dir.path().join("stderr");
    let stderr = File::create(&stderr_path).map_err(|e| format!("{accel} probe: {e}"))?;

    let child = Command::new(qemu)
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
        .map_err(|e| format!("{accel} probe: cannot run {}: {e}", qemu.display()))?;
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
    // QEMU's last word is the one that says what failed ("failed to initialize kvm: ...").
    let detail = stderr
        .lines()
        .rev()
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
        match probe(Path::new(crate::binary::DEFAULT_QEMU), Accel::Tcg) {
            Ok(()) => {}
            Err(e) if e.contains("cannot run") => eprintln!("skipping: {e}"),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn kvm_probe_is_cached_and_consistent() {
        // Whatever the answer on this host, asking twice gives the same one without a second
        // probe (the second call must be instant).
        let qemu = Path::new(crate::binary::DEFAULT_QEMU);
        let first = kvm_status(qemu);
        let start = std::time::Instant::now();
        assert_eq!(kvm_status(qemu), first);
        assert!(start.elapsed() < Duration::from_millis(50));
        eprintln!("kvm_status on this host: {first:?}");
    }
}
