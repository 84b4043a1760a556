//! End-to-end configuration delivery: one built image, three host files. QEMU fw_cfg wins
//! over `keel.config=` on the kernel command line, which wins over the file built into the
//! image; a delivered file that is invalid is rejected whole and the next source is used.

use std::path::Path;

use keel_qemu::Vm;
use keel_tests::{BOOT_TIMEOUT, build_host, vm_config, who_host};

fn host(hostname: &str, who: &str) -> String {
    who_host(hostname, who)
}

fn boot(dir: &Path, fw_cfg: Option<&Path>, cmdline_config: Option<&str>) -> Vm {
    let mut config = vm_config(dir, &[]);
    if let Some(path) = fw_cfg {
        config.extra_args.extend([
            "-fw_cfg".to_string(),
            format!("name=opt/keel/config,file={}", path.display()),
        ]);
    }
    if let Some(text) = cmdline_config {
        let arg = keel_init::delivery::encode_cmdline(text).unwrap();
        config.cmdline.push(' ');
        config.cmdline.push_str(&arg);
    }
    Vm::boot(config).expect("QEMU starts")
}

#[test]
fn fw_cfg_then_the_command_line_then_the_built_in_file() {
    let work = tempfile::tempdir().unwrap();
    let baked = work.path().join("baked.toml");
    std::fs::write(&baked, host("baked", "baked")).unwrap();
    let dir = build_host(&baked, &work.path().join("out"));
    let fw_cfg = work.path().join("fw_cfg.toml");
    std::fs::write(&fw_cfg, host("delivered", "fw_cfg")).unwrap();
    let cmdline = host("commanded", "cmdline");

    // Both delivered: fw_cfg wins.
    let vm = boot(&dir, Some(&fw_cfg), Some(&cmdline));
    vm.wait_for_line("[who] who: fw_cfg", BOOT_TIMEOUT).unwrap();
    let console = vm.console();
    assert!(console.contains("keel: host file from fw_cfg"), "{console}");
    drop(vm);

    // An invalid fw_cfg file is rejected, named, and the command line's is used.
    let bad = work.path().join("bad.toml");
    std::fs::write(&bad, "[host]\nhostname = \"bad\"\nsurprise = true\n").unwrap();
    let vm = boot(&dir, Some(&bad), Some(&cmdline));
    vm.wait_for_line("[who] who: cmdline", BOOT_TIMEOUT)
        .unwrap();
    let console = vm.console();
    assert!(
        console.contains(
            "keel: error: host file from fw_cfg: fw_cfg:opt/keel/config:3:1: host.surprise: unknown field"
        ),
        "{console}"
    );
    assert!(
        console.contains("keel: host file from the kernel command line"),
        "{console}"
    );
    drop(vm);

    // Nothing delivered: the file built into the image.
    let vm = boot(&dir, None, None);
    vm.wait_for_line("[who] who: baked", BOOT_TIMEOUT).unwrap();
    assert!(vm.console().contains("keel: host file from the image"));
}
