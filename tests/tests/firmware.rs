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
