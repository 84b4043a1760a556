//! `keel upgrade` under OVMF: a host built from its disk image takes a newer signed build
//! over the control API, writes it into the slot that did not boot, reboots into it on
//! trial and commits it; `keel status` shows both slots. Refused before the slot is touched:
//! a build signed by a key the host does not trust, data that does not match the signed
//! digests, an unsigned build, and an older version.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use keel_api::Client;
use keel_image::update_bundle;
use keel_qemu::Vm;
use keel_tests::{KeelCli, bin_dir, firmware_vm_config, workspace_root};

const GIB: u64 = 1 << 30;
const BOOT: Duration = Duration::from_secs(240);

/// The example host as version `version`, trusting `public_key`, with `extra` in its
/// [update] table; built into `WORK/vVERSION` (with `args` added to `keel build`), signed
/// with `sign_key` if given.
fn build_with(
    work: &Path,
    version: &str,
    public_key: &Path,
    sign_key: Option<&Path>,
    extra: &str,
    args: &[&str],
) -> PathBuf {
    let example = workspace_root().join("examples/hello");
    let text = std::fs::read_to_string(example.join("host.toml"))
        .unwrap()
        .replace(
            "\"site\"]",
            &format!("\"{}\"]", example.join("site").display()),
        );
    let text = format!(
        "{text}\n[update]\nversion = \"{version}\"\ntrusted_keys = [\"{}\"]\n{extra}\n",
        public_key.display()
    );
    let file = work.join(format!("v{version}.toml"));
    std::fs::write(&file, text).unwrap();
    let out = work.join(format!("v{version}"));
    let mut command = Command::new(bin_dir().join("keel"));
    command
        .arg("build")
        .arg(&file)
        .arg("-o")
        .arg(&out)
        .args(args);
    if let Some(key) = sign_key {
        command.arg("--sign-key").arg(key);
    }
    let output = command.env_remove("KEEL_UPDATE_KEY").output().unwrap();
    assert!(
        output.status.success(),
        "keel build: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    out
}

fn build(work: &Path, version: &str, public_key: &Path, sign_key: Option<&Path>) -> PathBuf {
    build_with(work, version, public_key, sign_key, "", &[])
}

/// A daily reboot window that opens six hours from now (UTC): closed for the whole test.
fn closed_window() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let start = (now / 60 + 6 * 60) % (24 * 60);
    let end = (start + 60) % (24 * 60);
    format!(
        "reboot_window = \"{:02}:{:02}-{:02}:{:02}\"",
        start / 60,
        start % 60,
        end / 60,
        end % 60
    )
}

fn keys(dir: &Path) -> (PathBuf, PathBuf) {
    let output = Command::new(bin_dir().join("keel"))
        .args(["pki", "update-key", "-o"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    (dir.join("update-key.pem"), dir.join("update-key.pub.pem"))
}

fn wait(vm: &Vm, line: &str) {
    if let Err(e) = vm.wait_for_line(line, BOOT) {
        panic!("no `{line}`: {e}\n{}", vm.console());
    }
}

/// Sends `dir`'s signed manifest with the given bytes through the API, as a client that does
/// not check anything itself would.
fn raw_upgrade(socket: &Path, dir: &Path, uki: &[u8], root: &[u8]) -> keel_api::ApiError {
    let manifest = std::fs::read_to_string(dir.join(update_bundle::MANIFEST_FILE)).unwrap();
    let signature = std::fs::read_to_string(dir.join(update_bundle::SIGNATURE_FILE)).unwrap();
    let mut client = Client::connect_unix(socket).unwrap();
    client
        .upgrade(
            manifest,
            signature,
            false,
            [
                (&mut &uki[..], uki.len() as u64),
                (&mut &root[..], root.len() as u64),
            ],
            |_| {},
        )
        .expect_err("refused")
}

#[test]
fn a_signed_newer_build_is_installed_in_the_other_slot_and_committed() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let (key, public) = keys(&w.join("keys"));
    let (other_key, _) = keys(&w.join("other-keys"));
    // Version 1 lets an update reboot it only in a window that is closed now.
    let v1 = build_with(w, "1", &public, Some(&key), &closed_window(), &[]);
    let v2 = build(w, "2", &public, Some(&key));
    let foreign = build(w, "3", &public, Some(&other_key));
    let unsigned = build(w, "4", &public, None);

    let vm = Vm::boot(firmware_vm_config(&v1, 8 * GIB, &[])).expect("QEMU starts");
    wait(&vm, "keel: ready");
    let keel = KeelCli::new(vm.api_socket());
    let status = keel.ok(&["status"]);
    assert!(status.starts_with("version 1 (firmware boot)"), "{status}");
    assert!(status.contains("A*    1          committed"), "{status}");

    // Refused, each before the slot is touched.
    let err = keel.fails(&["upgrade", foreign.to_str().unwrap()], 1);
    assert!(err.contains("no trusted key signed this update"), "{err}");
    let err = keel.fails(&["upgrade", unsigned.to_str().unwrap()], 1);
    assert!(err.contains("the build is not signed"), "{err}");
    let uki = std::fs::read(v2.join("keel.efi")).unwrap();
    let mut root = std::fs::read(v2.join("root.img")).unwrap();
    root[5000] ^= 0xff;
    let err = raw_upgrade(keel.socket(), &v2, &uki, &root);
    assert!(
        err.message.contains("the root image received has sha256")
            && err.message.contains("the slot was not touched"),
        "{err:?}"
    );
    let status = keel.ok(&["status"]);
    assert!(!status.contains("B "), "slot B has no entry: {status}");

    // The good one, installed; its reboot waits for the window (five to six hours away).
    let report = keel.ok(&["upgrade", v2.to_str().unwrap()]);
    assert!(
        report.contains("version 2 installed in slot B (keel-b+3.efi, on trial)")
            && report.contains("reboots into it in")
            && report.contains("when its [update] reboot_window opens"),
        "{report}"
    );
    let status = keel.ok(&["status"]);
    assert!(status.contains("A*    1          committed"), "{status}");
    assert!(
        status.contains("B     2          on trial (3 tries left)"),
        "{status}"
    );
    // An operator reboots it now.
    keel.ok(&["reboot"]);
    wait(&vm, "update committed: version 2 in slot B (keel-b.efi)");
    let status = keel.ok(&["status"]);
    assert!(status.starts_with("version 2 (firmware boot)"), "{status}");
    assert!(status.contains("A     1          committed"), "{status}");
    assert!(status.contains("B*    2          committed"), "{status}");

    // No going back to an older version.
    let err = keel.fails(&["upgrade", v1.to_str().unwrap()], 1);
    assert!(
        err.contains("version 1 is not newer than the running 2"),
        "{err}"
    );
    let mut vm = vm;
    vm.powerdown().unwrap();
    let _ = vm.wait_exit(BOOT);
    let console = vm.console();
    assert!(
        console.contains("update to version 2 in slot B on trial"),
        "{console}"
    );
    // /var survived: the second boot found the machine the first provisioned.
    assert!(console.contains("boot 2 of machine"), "{console}");
}

#[test]
fn a_power_cut_while_the_slot_is_written_leaves_the_old_system() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let (key, public) = keys(&w.join("keys"));
    let v1 = build(w, "1", &public, Some(&key));
    // Version 2 carries 48 MiB that do not compress: writing its slot takes long enough
    // under emulation to pull the plug in the middle of it.
    let big = w.join("big");
    std::fs::create_dir_all(&big).unwrap();
    let mut noise = vec![0u8; 48 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in noise.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(big.join("noise"), &noise).unwrap();
    drop(noise);
    let text = std::fs::read_to_string(w.join("v1.toml"))
        .unwrap()
        .replace("version = \"1\"", "version = \"2\"")
        .replace(
            "layers = [\"busybox:/bin/busybox\", ",
            &format!(
                "layers = [\"{}\", \"busybox:/bin/busybox\", ",
                big.display()
            ),
        );
    std::fs::write(w.join("v2.toml"), text).unwrap();
    let v2 = w.join("v2");
    let output = Command::new(bin_dir().join("keel"))
        .arg("build")
        .arg(w.join("v2.toml"))
        .arg("-o")
        .arg(&v2)
        .arg("--sign-key")
        .arg(&key)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");

    let mut vm = Vm::boot(firmware_vm_config(&v1, 8 * GIB, &[])).expect("QEMU starts");
    wait(&vm, "keel: ready");
    let keel = KeelCli::new(vm.api_socket());
    let mut upgrade = keel
        .command(&["upgrade", v2.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + BOOT;
    loop {
        let console = vm.console();
        if console.contains("installing version 2 in slot B") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the install never started:\n{console}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The plug.
    vm.kill();
    let console = vm.console();
    let _ = upgrade.wait();
    assert!(
        !console.contains("written to slot B"),
        "the write finished before the power cut; the test needs a larger image:\n{console}"
    );

    let mut vm = Vm::boot(firmware_vm_config(&v1, 8 * GIB, &[])).expect("QEMU starts");
    wait(&vm, "keel: ready");
    let keel = KeelCli::new(vm.api_socket());
    let status = keel.ok(&["status"]);
    assert!(status.contains("A*    1          committed"), "{status}");
    assert!(
        !status.contains("B "),
        "no entry points at slot B: {status}"
    );
    vm.powerdown().unwrap();
    let _ = vm.wait_exit(BOOT);
}

#[test]
fn an_update_whose_init_fails_at_boot_rolls_back_by_itself() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let (key, public) = keys(&w.join("keys"));
    let v1 = build(w, "1", &public, Some(&key));
    // Version 2's init is a program the kernel cannot run (a dynamic binary in an initramfs
    // without a libc): "No working init found", a panic, a reboot, three times over.
    let v2 = build_with(w, "2", &public, Some(&key), "", &["--init", "/bin/true"]);

    let mut vm = Vm::boot(firmware_vm_config(&v1, 8 * GIB, &[])).expect("QEMU starts");
    wait(&vm, "keel: ready");
    let keel = KeelCli::new(vm.api_socket());
    let report = keel.ok(&["upgrade", v2.to_str().unwrap()]);
    assert!(report.contains("version 2 installed in slot B"), "{report}");
    if let Err(e) = vm.wait_for_line(
        "the update to version 2 (slot B) failed 3 boots and was rolled back",
        BOOT * 3,
    ) {
        panic!("no rollback: {e}\n{}", vm.console());
    }
    // The rollback boot's "ready" is the second one on the console.
    let deadline = std::time::Instant::now() + BOOT;
    while vm.console().matches("keel: ready").count() < 2 {
        assert!(std::time::Instant::now() < deadline, "{}", vm.console());
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = keel.ok(&["status"]);
    assert!(status.contains("A*    1          committed"), "{status}");
    assert!(
        status.contains("B     2          bad (no tries left)"),
        "{status}"
    );
    assert!(
        status.contains("update: the update to version 2 (slot B) failed 3 boots"),
        "{status}"
    );
    vm.powerdown().unwrap();
    let _ = vm.wait_exit(BOOT);
    let console = vm.console();
    assert_eq!(
        console.matches("No working init found").count(),
        3,
        "{console}"
    );
    assert!(
        console.contains("slot A: version 1 (keel-a.efi), booted"),
        "{console}"
    );
    assert!(
        console.contains("boot 2 of machine"),
        "/var survived: {console}"
    );
}
