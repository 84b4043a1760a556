//! The first step off QEMU's `-kernel`: UEFI firmware (Debian's OVMF) boots a GPT disk made
//! by image/src/disk.rs whose EFI system partition holds a Unified Kernel Image made by
//! image/src/uki.rs (Debian's systemd stub + the kernel, the stage-1 initramfs and the command
//! line). Stage 1 finds the root image in slot A by its filesystem UUID, /var goes on the
//! KEEL-VAR partition, and the example's web container starts. (`keel build` does not write
//! the disk yet: issue 14.)

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keel_image::{disk, uki};
use keel_tests::{BOOT_TIMEOUT, build_host, workspace_root};

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

#[test]
fn ovmf_boots_the_example_from_a_disk_with_a_unified_kernel_image() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let out = build_host(
        &workspace_root().join("examples/hello/host.toml"),
        &w.join("out"),
    );
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let cmdline = manifest["cmdline"].as_str().unwrap();
    let stub = std::fs::read(uki::DEBIAN_STUB).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: install `systemd-boot-efi` (scripts/install-deps does)",
            uki::DEBIAN_STUB
        )
    });
    let kernel = std::fs::read(out.join("vmlinuz")).unwrap();
    let initrd = std::fs::read(out.join("initramfs.img")).unwrap();
    let image = uki::build(
        &stub,
        &[
            (".osrel", b"ID=keel\nNAME=Keel\n"),
            (".cmdline", cmdline.as_bytes()),
            (".linux", &kernel),
            (".initrd", &initrd),
        ],
    )
    .unwrap();
    let disk_path = w.join("disk.img");
    let info = disk::write_disk(
        &disk_path,
        &disk::DiskContents {
            root_image: &out.join(manifest["root_image"].as_str().unwrap()),
            esp_files: vec![("EFI/BOOT/BOOTX64.EFI".into(), image)],
            seed: [0x4b; 32],
        },
    )
    .unwrap();
    assert_eq!(info.partitions.len(), 4);

    // The firmware's variables are the VM's own copy.
    let vars = w.join("vars.fd");
    std::fs::copy(OVMF_VARS, &vars)
        .unwrap_or_else(|e| panic!("{OVMF_VARS}: {e}: install `ovmf` (scripts/install-deps does)"));
    let console = w.join("console.log");
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "q35",
            "-m",
            "512",
            "-nographic",
            "-no-reboot",
            "-nodefaults",
        ])
        .arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"
        ))
        .arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,unit=1,file={}",
            vars.display()
        ))
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=none,id=d0",
            disk_path.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=d0,bootindex=0"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64 runs");
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let read = || std::fs::read_to_string(&console).unwrap_or_default();
    let text = loop {
        let text = read();
        if text.contains("keel: web: started") {
            break text;
        }
        if let Ok(Some(status)) = qemu.try_wait() {
            let mut stderr = String::new();
            let _ = qemu
                .stderr
                .take()
                .map(|mut e| e.read_to_string(&mut stderr));
            panic!("QEMU ended ({status}) before the web container started:\n{stderr}\n{text}");
        }
        if Instant::now() > deadline {
            let _ = qemu.kill();
            let _ = qemu.wait();
            panic!("no `keel: web: started` within {BOOT_TIMEOUT:?} under OVMF:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = qemu.kill();
    let _ = qemu.wait();
    assert!(
        text.contains("EFI stub"),
        "the UKI's stub started the kernel:\n{text}"
    );
    assert!(
        text.contains("stage 1: root image /dev/vda2"),
        "slot A is the root:\n{text}"
    );
    assert!(
        text.contains("/var on /dev/vda4"),
        "KEEL-VAR is /var:\n{text}"
    );
}
