//! The benchmarks of booting from the disk image: `firmware` (OVMF from disk.img against
//! QEMU's -kernel) and `updates` (an A/B upgrade, and a rollback, timed end to end).

use std::path::{Path, PathBuf};
use std::time::Instant;

use keel_bench::host;
use keel_image::disk::{self, DiskContents};
use keel_image::esp::{self, EntryName, Slot};
use keel_image::update_bundle;

use crate::{BOOT_MEMORY_MB, BOOT_TIMEOUT, Cli, Env, Results, accel_name};

/// The same build booted the way users get it (OVMF, systemd-boot, the UKI, from disk.img)
/// and with QEMU's -kernel, alternating; wall clock from QEMU's start to `keel: ready`. The
/// disk is provisioned by one boot first, so every measured boot is a reboot (/var checked
/// and mounted, not formatted); the -kernel boots have /var on a tmpfs.
pub(crate) fn firmware(
    cli: &Cli,
    env: &Env,
    keel_dir: &Path,
    results: &mut Results,
) -> Result<(), String> {
    let disk = env.work.join("firmware-disk.img");
    let vars = env.work.join("firmware-vars.fd");
    new_machine(&keel_dir.join("disk.img"), &disk, &vars)?;
    let firmware_boot = |log: &Path| -> Result<(keel_qemu::Vm, u64), String> {
        let started = Instant::now();
        let vm = boot_disk(&disk, &vars, log)?;
        host::wait_line(&vm, "keel: ready", BOOT_TIMEOUT)?;
        Ok((vm, started.elapsed().as_millis() as u64))
    };
    let power_off = |mut vm: keel_qemu::Vm| {
        let _ = vm.powerdown();
        let _ = vm.wait_exit(BOOT_TIMEOUT);
    };
    eprintln!("keel-bench: firmware, provisioning the disk");
    let (vm, _) = firmware_boot(&env.work.join("console-firmware-first.log"))?;
    power_off(vm);
    eprintln!("keel-bench: firmware, {} boots per setup", cli.boots);
    for i in 0..cli.boots {
        let (vm, ms) = firmware_boot(&env.work.join(format!("console-firmware-{i}.log")))?;
        results.accel = accel_name(&vm);
        eprintln!("keel-bench: firmware boot {i}: ready {ms} ms after QEMU started");
        results.firmware_boot_ms.push(ms);
        power_off(vm);

        let log = env.work.join(format!("console-direct-{i}.log"));
        let started = Instant::now();
        let vm = host::boot_build(keel_dir, &env.cmdline, BOOT_MEMORY_MB, &log)?;
        host::wait_line(&vm, "keel: ready", BOOT_TIMEOUT)?;
        let ms = started.elapsed().as_millis() as u64;
        eprintln!("keel-bench: -kernel boot {i}: ready {ms} ms after QEMU started");
        results.direct_boot_ms.push(ms);
        drop(vm);
    }
    Ok(())
}

/// Boots `disk` (with firmware variables `vars`) under OVMF with the benchmark's settings.
fn boot_disk(disk: &Path, vars: &Path, log: &Path) -> Result<keel_qemu::Vm, String> {
    let mut config = keel_qemu::VmConfig {
        firmware: Some(keel_qemu::Firmware {
            code: keel_qemu::OVMF_CODE.into(),
            vars: vars.to_path_buf(),
            secure_boot: false,
        }),
        memory_mb: BOOT_MEMORY_MB,
        cpus: host::CPUS,
        console_log: Some(log.to_path_buf()),
        ..keel_qemu::VmConfig::default()
    };
    config.disks.push(keel_qemu::Disk {
        path: disk.to_path_buf(),
        read_only: false,
        serial: None,
    });
    keel_qemu::Vm::boot(config).map_err(|e| format!("QEMU: {e}"))
}

/// A fresh machine: a sparse copy of `image` and a new variable store.
fn new_machine(image: &Path, disk: &Path, vars: &Path) -> Result<(), String> {
    let copy = std::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(image)
        .arg(disk)
        .status()
        .map_err(|e| format!("cp: {e}"))?;
    if !copy.success() {
        return Err(format!("copying {} failed", image.display()));
    }
    std::fs::copy(keel_qemu::OVMF_VARS_TEMPLATE, vars)
        .map_err(|e| format!("{}: {e}", keel_qemu::OVMF_VARS_TEMPLATE))?;
    Ok(())
}

/// The boot benchmark's host as version `version` (`verity` on or off), trusting `public`,
/// built and signed with `key` into `work/update-vVERSION`.
fn build_version(
    env: &Env,
    busybox: &Path,
    version: &str,
    verity: bool,
    public: &Path,
    key: &Path,
) -> Result<PathBuf, String> {
    let mut text = host::boot_host_file(busybox);
    if verity {
        text = text.replacen("[host]\n", "[host]\nverity = true\n", 1);
    }
    text.push_str(&format!(
        "\n[update]\nversion = \"{version}\"\ntrusted_keys = [\"{}\"]\n",
        public.display()
    ));
    let file = env.work.join(format!("update-v{version}.toml"));
    std::fs::write(&file, text).map_err(|e| format!("{}: {e}", file.display()))?;
    let out = env.work.join(format!("update-v{version}"));
    let output = std::process::Command::new(env.bin_dir.join("keel"))
        .arg("build")
        .arg(&file)
        .arg("-o")
        .arg(&out)
        .arg("--cache")
        .arg(&env.cache)
        .arg("--sign-key")
        .arg(key)
        .output()
        .map_err(|e| format!("keel build: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "keel build {}: {}",
            file.display(),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(out)
}

/// Rounds of: boot version 1 from its disk, `upgrade` to version 2 over the API (send,
/// check, write, read back, install the entry), then reboot into it until it commits
/// itself; and of a rollback: a disk whose slot B holds a version that fails dm-verity in
/// stage 1, from QEMU's start until version 1 is ready again after the three failed tries.
pub(crate) fn updates(cli: &Cli, env: &Env, results: &mut Results) -> Result<(), String> {
    let rounds = cli.boots.clamp(1, 3);
    let (private, public) = update_bundle::generate_key().map_err(|e| e.to_string())?;
    let key = env.work.join("update-key.pem");
    let public_path = env.work.join("update-key.pub.pem");
    std::fs::write(&key, private).map_err(|e| e.to_string())?;
    std::fs::write(&public_path, public).map_err(|e| e.to_string())?;
    // The host file names it relative to itself otherwise.
    let public_path = std::fs::canonicalize(&public_path).map_err(|e| e.to_string())?;
    let v1 = build_version(env, &cli.busybox, "1", false, &public_path, &key)?;
    let v2 = build_version(env, &cli.busybox, "2", false, &public_path, &key)?;
    let v3 = build_version(env, &cli.busybox, "3", true, &public_path, &key)?;
    let disk = env.work.join("update-disk.img");
    let vars = env.work.join("update-vars.fd");
    let manifest = std::fs::read_to_string(v2.join(update_bundle::MANIFEST_FILE))
        .map_err(|e| e.to_string())?;
    let signature = std::fs::read_to_string(v2.join(update_bundle::SIGNATURE_FILE))
        .map_err(|e| e.to_string())?;
    let parsed =
        update_bundle::UpdateManifest::parse(manifest.as_bytes()).map_err(|e| e.to_string())?;
    eprintln!("keel-bench: updates, {rounds} rounds");
    for i in 0..rounds {
        new_machine(&v1.join("disk.img"), &disk, &vars)?;
        let vm = boot_disk(
            &disk,
            &vars,
            &env.work.join(format!("console-upgrade-{i}.log")),
        )?;
        results.accel = accel_name(&vm);
        host::wait_line(&vm, "keel: ready", BOOT_TIMEOUT)?;
        let started = Instant::now();
        let mut client =
            keel_api::Client::connect_unix(vm.api_socket()).map_err(|e| e.to_string())?;
        let mut uki = std::fs::File::open(v2.join("keel.efi")).map_err(|e| e.to_string())?;
        let mut root = std::fs::File::open(v2.join("root.img")).map_err(|e| e.to_string())?;
        client
            .upgrade(
                manifest.clone(),
                signature.clone(),
                true,
                [
                    (&mut uki, parsed.uki_bytes),
                    (&mut root, parsed.root_image_bytes),
                ],
                |_| {},
            )
            .map_err(|e| format!("upgrade: {}", e.message))?;
        let installed = started.elapsed().as_millis() as u64;
        host::wait_line(&vm, "update committed: version 2", BOOT_TIMEOUT)?;
        let total = started.elapsed().as_millis() as u64;
        eprintln!("keel-bench: upgrade {i}: installed in {installed} ms, committed at {total} ms");
        results.upgrade_ms.push((installed, total));
        drop(vm);

        // The rollback: slot B on trial with a root that fails verification.
        let systemd_boot = std::fs::read(esp::DEBIAN_SYSTEMD_BOOT).map_err(|e| e.to_string())?;
        let entry = |name: EntryName| format!("{}/{}", esp::ENTRIES_DIR, name.file_name());
        let read = |p: PathBuf| std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()));
        disk::write_disk(
            &disk,
            &DiskContents {
                root_image: &v1.join("root.img"),
                root_image_b: Some(&v3.join("root.img")),
                esp_files: vec![
                    (esp::FALLBACK_LOADER.into(), systemd_boot),
                    (esp::LOADER_CONF.into(), esp::LOADER_CONF_TEXT.into()),
                    (
                        entry(EntryName::committed(Slot::A)),
                        read(v1.join("keel.efi"))?,
                    ),
                    (
                        entry(EntryName::on_trial(Slot::B)),
                        read(v3.join("keel.efi"))?,
                    ),
                ],
                seed: [i as u8; 32],
            },
        )
        .map_err(|e| e.to_string())?;
        corrupt_slot_b(&disk)?;
        std::fs::copy(keel_qemu::OVMF_VARS_TEMPLATE, &vars).map_err(|e| e.to_string())?;
        let started = Instant::now();
        let vm = boot_disk(
            &disk,
            &vars,
            &env.work.join(format!("console-rollback-{i}.log")),
        )?;
        host::wait_line(&vm, "failed 3 boots and was rolled back", BOOT_TIMEOUT * 3)?;
        host::wait_line(&vm, "keel: ready", BOOT_TIMEOUT)?;
        let ms = started.elapsed().as_millis() as u64;
        eprintln!("keel-bench: rollback {i}: version 1 ready again at {ms} ms");
        results.rollback_ms.push(ms);
    }
    Ok(())
}

/// Flips one byte of slot B's root image, past its superblock.
fn corrupt_slot_b(disk: &Path) -> Result<(), String> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let at = disk::ESP_SIZE + (1 << 20) + esp::ROOT_SLOT_SIZE + 64 * 4096;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)
        .map_err(|e| e.to_string())?;
    let mut byte = [0u8];
    file.seek(SeekFrom::Start(at))
        .and_then(|_| file.read_exact(&mut byte))
        .and_then(|()| file.seek(SeekFrom::Start(at)))
        .and_then(|_| file.write_all(&[byte[0] ^ 0xff]))
        .map_err(|e| e.to_string())
}
