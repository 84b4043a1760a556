//! End-to-end: the immutable root and the persistent /var.
//!
//! - A host writes to a volume and is killed mid-write (QEMU killed, no shutdown); on the
//!   next boot /var is checked and mounted, the last committed data is intact, and Keel's
//!   state (machine id, provisioning record, boot count) carried over.
//! - A write to / fails with EROFS.
//! - A disk labelled KEEL-CONFIG delivers the host file (below fw_cfg, above the image).
//! - With verity on, a flipped byte in the root image stops the boot with a clear message.

use std::path::Path;
use std::process::Command;

use keel_qemu::Vm;
use keel_tests::{BOOT_TIMEOUT, STEP_TIMEOUT, attach_data_disk, build_host, vm_config, who_host};

/// The writer commits a counter the way a careful program does (write a temporary file,
/// fsync it, rename it, fsync the directory) while another file is being written without
/// any sync, so the power cut lands in the middle of writes.
const WRITER: &str = r#"
c=$(cat /data/committed 2>/dev/null)
echo "found: ${c:-nothing}"
echo "root write: $(touch /hostusr/keel-probe 2>&1 || true)"
n=${c:-0}
while true; do
  n=$((n + 1))
  echo "$n" > /data/.committed.tmp
  sync /data/.committed.tmp
  mv /data/.committed.tmp /data/committed
  sync /data
  echo "committed $n"
  dd if=/dev/zero of=/data/scratch bs=64k count=32 2>/dev/null
done
"#;

fn host(hostname: &str, verity: bool) -> String {
    format!(
        r#"[host]
hostname = "{hostname}"
verity = {verity}

[images.bb]
layers = ["busybox:/bin/busybox"]
env = ["PATH=/bin"]

[containers.writer]
image = "bb"
network = "none"
restart = "no"
volumes = ["data:/data", "/usr:/hostusr"]
command = ["sh", "-c", '''{WRITER}''']
"#
    )
}

fn committed(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.split("[writer] committed ").nth(1))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

fn machine_id(console: &str) -> Option<String> {
    console
        .lines()
        .find_map(|l| l.split("machine id ").nth(1))
        .and_then(|rest| rest.split(';').next())
        .map(str::to_string)
}

#[test]
fn var_survives_a_power_cut_and_the_root_is_read_only() {
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("persist.toml");
    std::fs::write(&file, host("persist", false)).unwrap();
    let dir = build_host(&file, &work.path().join("out"));
    let disk = work.path().join("data.img");

    // First boot: the blank disk is formatted, the writer starts from nothing.
    let mut config = vm_config(&dir, &[]);
    attach_data_disk(&mut config, &disk, 1 << 30);
    // A unix socket path must fit in 108 bytes: $TMPDIR may be long, /tmp is not.
    let sockets = tempfile::Builder::new()
        .prefix("keel-persist-")
        .tempdir_in("/tmp")
        .unwrap();
    let socket = sockets.path().join("api.sock");
    config.api_socket = Some(socket.clone());
    let mut vm = Vm::boot(config).expect("QEMU starts");
    vm.wait_for_line("[writer] found: nothing", BOOT_TIMEOUT)
        .unwrap();
    let console = vm.console();
    assert!(
        console.contains("formatted on this first boot"),
        "{console}"
    );
    assert!(
        console.contains("keel: first boot: provisioned"),
        "{console}"
    );
    let first_id = machine_id(&console).expect("the machine id is logged");
    // / is the read-only root image: writing to it fails with EROFS, also through a bind
    // mount into a container.
    vm.wait_for_line("[writer] root write:", STEP_TIMEOUT)
        .unwrap();
    let line = vm
        .console()
        .lines()
        .find(|l| l.contains("[writer] root write:"))
        .unwrap_or_default()
        .to_string();
    assert!(line.contains("Read-only file system"), "{line}");

    // A live change, saved on /var: it must come back after the power cut.
    let applied = format!(
        "{}\n[containers.marker]\nimage = \"bb\"\nnetwork = \"none\"\ncommand = [\"sh\", \"-c\", \"echo marker: applied; exec sleep 1000000\"]\n",
        host("persist", false)
    );
    let mut client = keel_api::Client::connect_unix(&socket).expect("the API answers");
    let report = client
        .apply(&applied, false)
        .expect("the apply is accepted");
    assert_eq!(report.added, ["marker"], "{report:?}");
    vm.wait_for_line("[marker] marker: applied", STEP_TIMEOUT)
        .unwrap();

    // Power cut in the middle of the writes.
    vm.wait_for_line("[writer] committed 5", STEP_TIMEOUT)
        .unwrap();
    vm.kill();
    let before = *committed(&vm.console()).last().unwrap();
    assert!(before >= 5);
    drop(vm);

    // Second boot: /var is checked and mounted, the last committed counter is there
    // whole, and the state carried over.
    let mut config = vm_config(&dir, &[]);
    attach_data_disk(&mut config, &disk, 1 << 30);
    let vm = Vm::boot(config).expect("QEMU starts");
    let found = vm.wait_for_line("[writer] found: ", BOOT_TIMEOUT).unwrap();
    let found = found
        .split("[writer] found: ")
        .nth(1)
        .unwrap_or_default()
        .trim();
    let found: u64 = found
        .parse()
        .unwrap_or_else(|_| panic!("the counter is whole: {found:?}\n{}", vm.console()));
    assert!(found >= before, "committed {before}, found {found}");
    // The applied host file came back with /var, whole (its container may have started
    // before or after the writer's line).
    vm.wait_for_line_anywhere("[marker] marker: applied", STEP_TIMEOUT)
        .unwrap();
    let console = vm.console();
    assert!(
        console.contains("keel: host file from keel apply"),
        "{console}"
    );
    assert!(console.contains("checked, "), "{console}");
    assert!(
        !console.contains("formatted on this first boot"),
        "{console}"
    );
    assert!(!console.contains("first boot: provisioned"), "{console}");
    assert!(
        console.contains(&format!("boot 2 of machine {first_id}")),
        "{console}"
    );

    // An orderly poweroff unmounts /var cleanly: the next check finds no journal to replay.
    vm.wait_for_line_anywhere("keel: ready", STEP_TIMEOUT)
        .unwrap();
    vm.powerdown().unwrap();
    let mut vm = vm;
    vm.wait_exit(STEP_TIMEOUT).expect("the host powers off");
    let console = vm.console();
    assert!(console.contains("keel: poweroff clean"), "{console}");
    assert!(!console.contains("could not be unmounted"), "{console}");
    drop(vm);
    let mut config = vm_config(&dir, &[]);
    attach_data_disk(&mut config, &disk, 1 << 30);
    let vm = Vm::boot(config).expect("QEMU starts");
    vm.wait_for_line(&format!("keel: boot 3 of machine {first_id}"), BOOT_TIMEOUT)
        .unwrap();
    let console = vm.console();
    assert!(console.contains("checked, clean"), "{console}");
    assert!(!console.contains("recovering journal"), "{console}");
}

/// A filesystem labelled KEEL-CONFIG holding host.toml, made as a user can: mke2fs -d.
fn config_disk(work: &Path, text: &str) -> std::path::PathBuf {
    let content = work.join("config-disk");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("host.toml"), text).unwrap();
    let image = work.join("config.img");
    let status = Command::new("mke2fs")
        .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
        .args(["-q", "-F", "-t", "ext4", "-L", "KEEL-CONFIG", "-d"])
        .arg(&content)
        .arg(&image)
        .arg("8M")
        .status()
        .expect("mke2fs (e2fsprogs) runs");
    assert!(status.success());
    image
}

fn who(hostname: &str) -> String {
    who_host(hostname, hostname)
}

#[test]
fn a_config_disk_delivers_the_host_file_and_fw_cfg_still_wins() {
    let work = tempfile::tempdir().unwrap();
    let baked = work.path().join("baked.toml");
    std::fs::write(&baked, who("baked")).unwrap();
    let dir = build_host(&baked, &work.path().join("out"));
    let disk = config_disk(work.path(), &who("from-disk"));

    let mut config = vm_config(&dir, &[]);
    config.disks.push(keel_qemu::Disk {
        path: disk.clone(),
        read_only: true,
        serial: None,
    });
    let vm = Vm::boot(config).expect("QEMU starts");
    vm.wait_for_line("[who] who: from-disk", BOOT_TIMEOUT)
        .unwrap();
    assert!(
        vm.console()
            .contains("keel: host file from the config disk")
    );
    drop(vm);

    let fw_cfg = work.path().join("fw.toml");
    std::fs::write(&fw_cfg, who("from-fw-cfg")).unwrap();
    let mut config = vm_config(&dir, &[]);
    config.disks.push(keel_qemu::Disk {
        path: disk,
        read_only: true,
        serial: None,
    });
    config.extra_args.extend([
        "-fw_cfg".to_string(),
        format!("name=opt/keel/config,file={}", fw_cfg.display()),
    ]);
    let vm = Vm::boot(config).expect("QEMU starts");
    vm.wait_for_line("[who] who: from-fw-cfg", BOOT_TIMEOUT)
        .unwrap();
}

#[test]
fn a_verified_root_boots_and_a_flipped_byte_stops_the_boot() {
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("verity.toml");
    std::fs::write(&file, who("verified")).unwrap();
    let text = who("verified").replace(
        "hostname = \"verified\"\n",
        "hostname = \"verified\"\nverity = true\n",
    );
    std::fs::write(&file, text).unwrap();
    let dir = build_host(&file, &work.path().join("out"));
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let data_blocks = manifest["verity"]["data_blocks"]
        .as_u64()
        .expect("the manifest records the verity data size");

    let vm = Vm::boot(vm_config(&dir, &[])).expect("QEMU starts");
    vm.wait_for_line("[who] who: verified", BOOT_TIMEOUT)
        .unwrap();
    assert!(vm.console().contains("root verified"), "{}", vm.console());
    drop(vm);

    // One bit, in the middle of the filesystem's data (not its superblock, so the root
    // is still found by its UUID and it is verification that catches it).
    let root = dir.join("root.img");
    let mut bytes = std::fs::read(&root).unwrap();
    let offset = (data_blocks * 4096 / 2) as usize;
    bytes[offset] ^= 0x01;
    std::fs::write(&root, bytes).unwrap();
    let mut vm = Vm::boot(vm_config(&dir, &[])).expect("QEMU starts");
    vm.wait_for_line("failed dm-verity verification", BOOT_TIMEOUT)
        .unwrap();
    vm.wait_exit(STEP_TIMEOUT)
        .expect("the tampered host powers off");
    let console = vm.console();
    assert!(console.contains("refusing to boot"), "{console}");
    assert!(!console.contains("[who] who:"), "{console}");
}
