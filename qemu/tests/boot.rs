//! Real QEMU runs. The kernel boot test needs a kernel at `TEST_KERNEL` (a Debian 6.1 kernel on
//! the development machines) and is skipped without one; booting it with no initramfs ends in
//! "VFS: Unable to mount root fs", a panic, and (with `panic=-1 -no-reboot`) QEMU exiting 0.

use std::path::Path;
use std::time::Duration;

use keel_qemu::{QemuError, Vm, VmConfig};

const TEST_KERNEL: &str = "/tmp/k/x/boot/vmlinuz-6.1.0-56-amd64";

/// TCG boots take several seconds, more on a loaded machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

fn kernel() -> Option<&'static Path> {
    let path = Path::new(TEST_KERNEL);
    if path.is_file() {
        Some(path)
    } else {
        eprintln!("skipping: no test kernel at {TEST_KERNEL}");
        None
    }
}

/// `None` (and a note) when QEMU is not installed, so these tests skip rather than fail there.
fn boot(cfg: VmConfig) -> Option<Vm> {
    match Vm::boot(cfg) {
        Ok(vm) => Some(vm),
        Err(QemuError::NotInstalled(_)) => {
            eprintln!("skipping: qemu-system-x86_64 is not installed");
            None
        }
        Err(e) => panic!("boot failed: {e}"),
    }
}

#[test]
fn kernel_without_initrd_panics_and_qemu_exits() {
    let Some(kernel) = kernel() else { return };
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("console.log");
    let mut cfg = VmConfig::new(kernel);
    cfg.console_log = Some(log.clone());
    cfg.publish = vec!["80".parse().unwrap()];
    let Some(mut vm) = boot(cfg) else { return };

    let port = vm.host_port(80).unwrap();
    assert_ne!(port, 0);
    assert_eq!(vm.host_port(81), None);
    assert!(vm.pid() > 0);
    let status = vm.qmp("query-status", None).unwrap();
    assert!(status["status"].is_string(), "{status}");

    let version = vm.wait_for_line("Linux version", BOOT_TIMEOUT).unwrap();
    assert!(version.contains("6.1."), "{version}");
    let panic = vm.wait_for_line("Kernel panic", BOOT_TIMEOUT).unwrap();
    // The cursor is past the version line now; the whole-log search still finds it.
    assert!(
        vm.wait_for_line("Linux version", Duration::from_millis(200))
            .is_err()
    );
    assert_eq!(
        vm.wait_for_line_anywhere("Linux version", Duration::ZERO)
            .unwrap(),
        version
    );
    let vfs = vm
        .wait_for_line_anywhere("VFS: Unable to mount root", BOOT_TIMEOUT)
        .unwrap();
    assert!(panic.contains("not syncing"), "{panic}");
    assert!(!vfs.ends_with('\r'));

    let status = vm.wait_exit(BOOT_TIMEOUT).unwrap();
    assert!(status.success(), "{status}");
    match vm.wait_for_line("never printed", BOOT_TIMEOUT) {
        Err(QemuError::ExitedBeforeLine { tail, .. }) => assert!(tail.contains("Kernel")),
        other => panic!("{other:?}"),
    }
    let console = vm.console();
    assert!(console.contains(&version) && console.contains(&panic));
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains(&panic), "console log misses the panic");
    assert!(
        vm.http_get(80, "/", Duration::from_secs(5)).is_err(),
        "nothing listens in a dead guest"
    );
}

#[test]
fn kill_stops_a_running_guest() {
    let Some(kernel) = kernel() else { return };
    let Some(mut vm) = boot(VmConfig::new(kernel)) else {
        return;
    };
    vm.wait_for_line("Linux version", BOOT_TIMEOUT).unwrap();
    vm.kill();
    let status = vm.wait_exit(Duration::from_secs(5)).unwrap();
    assert!(!status.success());
    vm.kill(); // a second kill is harmless
}

#[test]
fn qemu_startup_failure_shows_its_stderr() {
    // Any existing file passes the pre-checks; QEMU rejects the option before reading it.
    let mut cfg = VmConfig::new("/proc/self/exe");
    cfg.extra_args = vec!["-no-such-option".into()];
    match Vm::boot(cfg) {
        Err(QemuError::EarlyExit { stderr, .. }) => {
            assert!(stderr.contains("no-such-option"), "{stderr}")
        }
        Err(QemuError::NotInstalled(_)) => eprintln!("skipping: QEMU is not installed"),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("QEMU accepted a bogus option"),
    }
}
