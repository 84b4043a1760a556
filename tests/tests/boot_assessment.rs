//! A/B boot assessment under OVMF, on disks laid out as an update leaves them: version 1 in
//! slot A (committed, `keel-a.efi`), the new version in slot B with three tries
//! (`keel-b+3.efi`). A good new version commits itself; one whose critical container never
//! becomes healthy, and one whose root fails dm-verity in stage 1, each use up their tries
//! and the machine falls back to version 1 by itself, with /var intact, and says which version
//! failed and why.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use keel_image::disk::{self, DiskContents};
use keel_image::esp::{self, EntryName, Slot};
use keel_qemu::Vm;
use keel_tests::{build_host, firmware_vm_config, workspace_root};

const GIB: u64 = 1 << 30;
/// Several boots in a row under TCG on a loaded machine.
const ROLLBACK_TIMEOUT: Duration = Duration::from_secs(900);
const BOOT: Duration = Duration::from_secs(240);

/// The example host as version `version`, with `host` added to its [host] table, `web`
/// to its web container and `tail` at the end.
fn variant(work: &Path, version: &str, host: &str, web: &str, tail: &str) -> PathBuf {
    let example = workspace_root().join("examples/hello");
    let text = std::fs::read_to_string(example.join("host.toml"))
        .unwrap()
        .replace("[host]\n", &format!("[host]\n{host}\n"))
        .replace(
            "\"site\"]",
            &format!("\"{}\"]", example.join("site").display()),
        );
    let text = format!("{text}{web}\n[update]\nversion = \"{version}\"\n{tail}\n");
    let file = work.join(format!("v{version}.toml"));
    std::fs::write(&file, text).unwrap();
    build_host(&file, &work.join(format!("v{version}")))
}

/// A machine whose slot A holds `a` (committed) and slot B `b` on trial: a disk and its
/// firmware variables in a directory of their own.
fn machine(work: &Path, a: &Path, b: &Path) -> PathBuf {
    let dir = work.join("machine");
    std::fs::create_dir_all(&dir).unwrap();
    let systemd_boot = std::fs::read(esp::DEBIAN_SYSTEMD_BOOT).unwrap();
    let entry = |name: EntryName| format!("{}/{}", esp::ENTRIES_DIR, name.file_name());
    disk::write_disk(
        &dir.join("disk.img"),
        &DiskContents {
            root_image: &a.join("root.img"),
            root_image_b: Some(&b.join("root.img")),
            esp_files: vec![
                (esp::FALLBACK_LOADER.into(), systemd_boot),
                (esp::LOADER_CONF.into(), esp::LOADER_CONF_TEXT.into()),
                (
                    entry(EntryName::committed(Slot::A)),
                    std::fs::read(a.join("keel.efi")).unwrap(),
                ),
                (
                    entry(EntryName::on_trial(Slot::B)),
                    std::fs::read(b.join("keel.efi")).unwrap(),
                ),
            ],
            seed: [9; 32],
        },
    )
    .unwrap();
    dir
}

fn wait(vm: &Vm, line: &str, timeout: Duration) {
    if let Err(e) = vm.wait_for_line(line, timeout) {
        panic!("no `{line}`: {e}\n{}", vm.console());
    }
}

fn power_off(mut vm: Vm) -> String {
    vm.powerdown().expect("power button");
    if let Err(e) = vm.wait_exit(BOOT) {
        panic!("the guest did not power off: {e}\n{}", vm.console());
    }
    vm.console()
}

/// The machine id every boot of the console names: /var is the same filesystem throughout.
fn machine_ids(console: &str) -> Vec<String> {
    console
        .lines()
        .filter_map(|l| {
            l.split_once("machine id ")
                .or_else(|| l.split_once(" of machine "))
                .map(|(_, rest)| rest.split([';', ' ']).next().unwrap_or("").to_string())
        })
        .collect()
}

#[test]
fn a_good_update_commits_itself_and_stays() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let v1 = variant(w, "1", "", "", "");
    let v2 = variant(w, "2", "", "", "health_timeout = \"5m\"");
    let dir = machine(w, &v1, &v2);

    let vm = Vm::boot(firmware_vm_config(&dir, 8 * GIB, &[])).expect("QEMU starts");
    wait(
        &vm,
        "update committed: version 2 in slot B (keel-b.efi)",
        BOOT,
    );
    let console = power_off(vm);
    assert!(
        console.contains("update to version 2 in slot B on trial (2 tries left after this one)"),
        "{console}"
    );

    // Committed: the next boot starts slot B without a trial, and slot A is the fallback.
    let vm = Vm::boot(firmware_vm_config(&dir, 8 * GIB, &[])).expect("QEMU starts");
    wait(&vm, "keel: ready", BOOT);
    let console = power_off(vm);
    for expected in [
        "slot A: version 1 (keel-a.efi)",
        "slot B: version 2 (keel-b.efi), booted",
    ] {
        assert!(
            console.contains(expected),
            "`{expected}` missing:\n{console}"
        );
    }
    assert!(!console.contains("on trial"), "{console}");
}

#[test]
fn an_update_whose_container_never_becomes_healthy_rolls_back() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let v1 = variant(w, "1", "", "", "");
    // Nothing listens on port 81: web is never healthy.
    let v3 = variant(
        w,
        "3",
        "",
        "healthcheck = { http = \"81/\", interval = \"2s\", timeout = \"1s\", retries = 1 }",
        "health_timeout = \"20s\"",
    );
    let dir = machine(w, &v1, &v3);

    let mut vm = Vm::boot(firmware_vm_config(&dir, 8 * GIB, &[])).expect("QEMU starts");
    wait(
        &vm,
        "the update to version 3 (slot B) failed 3 boots and was rolled back: not healthy within 20 s: web is unhealthy",
        ROLLBACK_TIMEOUT,
    );
    wait(&vm, "keel: ready", BOOT);
    vm.powerdown().unwrap();
    let _ = vm.wait_exit(BOOT);
    let console = vm.console();
    assert_eq!(
        console
            .matches("update to version 3 (slot B) failed this boot")
            .count(),
        3,
        "{console}"
    );
    assert!(
        console.contains("slot A: version 1 (keel-a.efi), booted"),
        "{console}"
    );
    let ids = machine_ids(&console);
    assert_eq!(ids.len(), 4, "four boots: {ids:?}\n{console}");
    assert!(ids.iter().all(|id| id == &ids[0]), "/var changed: {ids:?}");
}

#[test]
fn an_update_whose_root_fails_verification_rolls_back() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let v1 = variant(w, "1", "", "", "");
    let v4 = variant(w, "4", "verity = true", "", "");
    let dir = machine(w, &v1, &v4);
    // One byte of slot B's file data changed after the build (past the erofs superblock,
    // so stage 1 still finds the image by its UUID and dm-verity catches the change).
    let slot_b = (1 + 512 + 2048) << 20;
    let mut disk = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("disk.img"))
        .unwrap();
    let mut byte = [0u8];
    disk.seek(SeekFrom::Start(slot_b + 64 * 4096)).unwrap();
    disk.read_exact(&mut byte).unwrap();
    disk.seek(SeekFrom::Start(slot_b + 64 * 4096)).unwrap();
    disk.write_all(&[byte[0] ^ 0xff]).unwrap();
    drop(disk);

    let mut vm = Vm::boot(firmware_vm_config(&dir, 8 * GIB, &[])).expect("QEMU starts");
    wait(
        &vm,
        "the update to version 4 (slot B) failed 3 boots and was rolled back",
        ROLLBACK_TIMEOUT,
    );
    wait(&vm, "keel: ready", BOOT);
    vm.powerdown().unwrap();
    let _ = vm.wait_exit(BOOT);
    let console = vm.console();
    assert_eq!(
        console.matches("failed dm-verity verification").count(),
        3,
        "{console}"
    );
    assert!(console.contains("stage 1 failed; rebooting"), "{console}");
    assert!(
        console.contains("slot A: version 1 (keel-a.efi), booted"),
        "{console}"
    );
}
