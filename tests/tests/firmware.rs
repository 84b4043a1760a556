//! The boot users get: `keel build` writes `disk.img` and UEFI firmware (Debian's OVMF)
//! boots it with nothing else, as `keel run` does. systemd-boot on the EFI system partition
//! starts slot A's Unified Kernel Image, stage 1 finds the root image in slot A by its erofs
//! UUID, the KEEL-VAR partition grows to the end of the disk and becomes /var, and the
//! example serves its page. Written to a larger disk later (a second size), /var grows again,
//! online, and keeps its data; on an NVMe controller instead of virtio, it boots the same.

use std::time::Duration;

use keel_qemu::Vm;
use keel_tests::{BOOT_TIMEOUT, build_host, firmware_vm_config, workspace_root};

const GIB: u64 = 1 << 30;

fn boot_until_ready(config: keel_qemu::VmConfig) -> Vm {
    let vm = Vm::boot(config).expect("QEMU starts");
    if let Err(e) = vm.wait_for_line("keel: ready", BOOT_TIMEOUT) {
        panic!("no `keel: ready` under OVMF: {e}\n{}", vm.console());
    }
    vm
}

fn power_off(mut vm: Vm) -> String {
    vm.powerdown().expect("power button");
    if let Err(e) = vm.wait_exit(Duration::from_secs(120)) {
        panic!("the guest did not power off: {e}\n{}", vm.console());
    }
    vm.console()
}

#[test]
fn the_disk_image_boots_under_firmware_and_var_grows_with_its_disk() {
    let work = tempfile::tempdir().unwrap();
    let out = build_host(
        &workspace_root().join("examples/hello/host.toml"),
        &work.path().join("out"),
    );

    // First boot on an 8 GiB disk: the 4.75 GiB image's /var (256 MiB) takes the rest.
    let vm = boot_until_ready(firmware_vm_config(&out, 8 * GIB, &[80]));
    let page = vm
        .http_get(80, "/", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("no page: {e}\n{}", vm.console()));
    assert!(
        page.body.contains("Hello from a Keel container"),
        "{}",
        page.body
    );
    let console = power_off(vm);
    for expected in [
        // systemd-boot started the UKI, whose stub started the kernel.
        "EFI stub",
        "stage 1: root image /dev/vda2",
        // 8 GiB less the 1 MiB before the ESP, the ESP, two slots and the backup GPT's MiB.
        "/dev/vda4 grown from 256 MiB to 3582 MiB",
        "/var on /dev/vda4",
        "formatted on this first boot",
        // QEMU's i6300esb, fed by PID 1 from here on.
        "watchdog /dev/watchdog armed",
        "keel: poweroff clean",
    ] {
        assert!(
            console.contains(expected),
            "`{expected}` missing:\n{console}"
        );
    }

    // The same disk, enlarged to 12 GiB (a cloud volume resized): the partition and the
    // mounted ext4 grow; /var keeps what the first boot wrote there.
    let vm = boot_until_ready(firmware_vm_config(&out, 12 * GIB, &[80]));
    let console = power_off(vm);
    for expected in [
        "/dev/vda4 grown from 3582 MiB to 7678 MiB",
        "/var grown to 7678 MiB",
        "keel: poweroff clean",
    ] {
        assert!(
            console.contains(expected),
            "`{expected}` missing:\n{console}"
        );
    }
    assert!(
        !console.contains("formatted on this first boot"),
        "/var was formatted again:\n{console}"
    );

    // The same disk on an NVMe controller, as on a server or a cloud instance: stage 1 finds
    // no root on a virtio disk, loads the other controllers' drivers and boots from it.
    let mut config = firmware_vm_config(&out, 12 * GIB, &[]);
    let disk = config.disks.remove(0);
    config.extra_args.extend([
        "-drive".to_string(),
        format!("file={},if=none,id=nvme0,format=raw", disk.path.display()),
        "-device".to_string(),
        "nvme,drive=nvme0,serial=keel-nvme,bootindex=0".to_string(),
    ]);
    let console = power_off(boot_until_ready(config));
    for expected in [
        "the root is not on a virtio disk",
        "stage 1: root image /dev/nvme0n1p2",
        "/var on /dev/nvme0n1p4",
        "keel: poweroff clean",
    ] {
        assert!(
            console.contains(expected),
            "`{expected}` missing:\n{console}"
        );
    }
}

/// Secure Boot, as far as it goes here: Debian's OVMF with its test ("snakeoil") keys
/// enrolled starts a disk whose systemd-boot and UKI `keel build --secure-boot-key` signed
/// with that key, and refuses one signed with a key it does not hold (`keel pki
/// secure-boot-key`, not enrolled).
#[test]
fn secure_boot_firmware_starts_only_a_disk_signed_with_an_enrolled_key() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let keel = keel_tests::bin_dir().join("keel");
    let snakeoil = w.join("snakeoil.key");
    let decrypted = std::process::Command::new("openssl")
        .args([
            "rsa",
            "-in",
            "/usr/share/ovmf/PkKek-1-snakeoil.key",
            "-passin",
            "pass:snakeoil",
            "-out",
        ])
        .arg(&snakeoil)
        .output()
        .unwrap();
    assert!(decrypted.status.success(), "{decrypted:?}");
    let ours = w.join("ours");
    let made = std::process::Command::new(&keel)
        .args(["pki", "secure-boot-key", "-o"])
        .arg(&ours)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let build = |out: &str, key: &std::path::Path, cert: &std::path::Path| {
        let out = w.join(out);
        let built = std::process::Command::new(&keel)
            .arg("build")
            .arg(workspace_root().join("examples/hello/host.toml"))
            .arg("-o")
            .arg(&out)
            .arg("--secure-boot-key")
            .arg(key)
            .arg("--secure-boot-cert")
            .arg(cert)
            .output()
            .unwrap();
        assert!(built.status.success(), "{built:?}");
        out
    };
    let secure = |dir: &std::path::Path| {
        let mut config = firmware_vm_config(dir, 8 * GIB, &[]);
        let vars = dir.join("disk.efivars-secure-boot.fd");
        std::fs::copy(keel_qemu::OVMF_VARS_SNAKEOIL, &vars).unwrap();
        config.firmware = Some(keel_qemu::Firmware {
            code: keel_qemu::OVMF_CODE_SECURE_BOOT.into(),
            vars,
            secure_boot: true,
        });
        config
    };

    let signed = build(
        "signed",
        &snakeoil,
        std::path::Path::new("/usr/share/ovmf/PkKek-1-snakeoil.pem"),
    );
    let console = power_off(boot_until_ready(secure(&signed)));
    assert!(console.contains("UEFI Secure Boot is enabled"), "{console}");

    let foreign = build(
        "foreign",
        &ours.join("secure-boot.key.pem"),
        &ours.join("secure-boot.crt.pem"),
    );
    let mut vm = Vm::boot(secure(&foreign)).expect("QEMU starts");
    if let Err(e) = vm.wait_for_line("Access Denied", BOOT_TIMEOUT) {
        panic!(
            "the firmware did not refuse the foreign signature: {e}\n{}",
            vm.console()
        );
    }
    vm.kill();
    assert!(!vm.console().contains("EFI stub"), "{}", vm.console());
}
