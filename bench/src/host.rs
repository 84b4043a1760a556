//! The host side of the benchmarks: images and initramfs archives for the guests, host
//! files for `keel build`, the crun binary with its shared libraries, and the boots.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use keel_image::cpio::{Compression, InitramfsBuilder};
use keel_image::import::{ImageConfigSpec, LayerSource, import};
use keel_image::kernel::{Kernel, fetch_kernel};
use keel_image::layout::ImageLayout;
use keel_image::modules::{ModuleIndex, ModuleRef};
use keel_image::rootfs::shared_libraries;
use keel_qemu::{Disk, Vm, VmConfig};

use crate::oci;

pub use keel_image::os::BASE_MODULES;

/// Every benchmark guest gets two vCPUs.
pub const CPUS: u32 = 2;

/// The Debian kernel and the module closure Keel hosts load.
pub struct KernelParts {
    pub kernel: Kernel,
    pub modules: Vec<ModuleRef>,
}

impl KernelParts {
    pub fn fetch(cache_dir: &Path) -> Result<KernelParts, String> {
        let kernel = fetch_kernel(&cache_dir.join("kernel")).map_err(|e| format!("kernel: {e}"))?;
        let index =
            ModuleIndex::scan(&kernel.modules_dir).map_err(|e| format!("kernel modules: {e}"))?;
        // In `keel build`'s order for a host without container networks, extra modules or
        // dm-verity: the base modules, then the initramfs's.
        let wanted: Vec<&str> = BASE_MODULES
            .iter()
            .chain(keel_image::os::STAGE1_MODULES)
            .copied()
            .collect();
        let modules = index
            .closure(&wanted)
            .map_err(|e| format!("kernel modules: {e}"))?;
        Ok(KernelParts { kernel, modules })
    }

    /// Archive path of each module, dependencies first (what /lib/modules/keel.load lists).
    pub fn module_paths(&self) -> Vec<PathBuf> {
        let root = Path::new("lib/modules").join(&self.kernel.version);
        self.modules
            .iter()
            .map(|m| root.join(&m.rel_path))
            .collect()
    }

    /// Adds the modules and Keel's load list, as `keel build` does.
    pub fn add_to(&self, initramfs: &mut InitramfsBuilder) -> Result<(), String> {
        let mut load_list = String::from("# written by keel-bench: dependencies first\n");
        for (module, dest) in self.modules.iter().zip(self.module_paths()) {
            initramfs
                .add_file_from_path(&dest, 0o644, &module.path)
                .map_err(|e| format!("{}: {e}", module.path.display()))?;
            load_list += &format!("/{}\n", dest.display());
        }
        initramfs
            .add_file_from_bytes("lib/modules/keel.load", 0o644, load_list.into_bytes())
            .map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// Fails unless a `keel build` manifest lists the same modules in the same order.
pub fn check_same_modules(parts: &KernelParts, manifest: &serde_json::Value) -> Result<(), String> {
    let built: Vec<&str> = manifest["modules"]
        .as_array()
        .map(|a| a.iter().filter_map(|m| m.as_str()).collect())
        .unwrap_or_default();
    let ours: Vec<&str> = parts.modules.iter().map(|m| m.name.as_str()).collect();
    if built != ours {
        return Err(format!(
            "keel build loads modules {built:?}, the benchmark guests {ours:?}"
        ));
    }
    Ok(())
}

/// A dynamically linked program with everything it loads, to copy into an initramfs.
pub struct DynamicBinary {
    pub path: PathBuf,
    pub libraries: Vec<PathBuf>,
}

impl DynamicBinary {
    /// `path` and its shared libraries with the dynamic loader, as `ldd` resolves them
    /// ([`shared_libraries`]).
    pub fn resolve(path: &Path) -> Result<DynamicBinary, String> {
        let libraries = shared_libraries(path).map_err(|e| e.to_string())?;
        Ok(DynamicBinary {
            path: path.to_path_buf(),
            libraries,
        })
    }

    /// Each file at its own absolute path (symlinks followed: the archive gets the
    /// contents under the name the loader asks for).
    pub fn add_to(&self, initramfs: &mut InitramfsBuilder) -> Result<(), String> {
        for file in std::iter::once(&self.path).chain(&self.libraries) {
            let rel = file.strip_prefix("/").unwrap_or(file);
            initramfs
                .add_file_from_path(rel, 0o755, file)
                .map_err(|e| format!("{}: {e}", file.display()))?;
        }
        Ok(())
    }
}

/// `busybox --list`, for a link per applet in the baseline's /bin.
fn busybox_applets(busybox: &Path) -> Result<Vec<String>, String> {
    let out = Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(|e| format!("{} --list: {e}", busybox.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/'))
        .map(str::to_string)
        .collect())
}

/// The start-latency image: busybox (for /bin/true) plus a layer with the stamp payload.
pub fn import_bench_image(busybox: &Path, stamp: &Path, work: &Path) -> Result<PathBuf, String> {
    let payload = work.join("payload");
    fs::create_dir_all(payload.join("bin")).map_err(|e| format!("{}: {e}", payload.display()))?;
    fs::copy(stamp, payload.join("bin/stamp"))
        .map_err(|e| format!("copying {}: {e}", stamp.display()))?;
    let layout = work.join("bench-image");
    let _ = fs::remove_dir_all(&layout);
    let spec = ImageConfigSpec {
        env: vec!["PATH=/bin".into()],
        ..ImageConfigSpec::default()
    };
    import(
        &[
            LayerSource::Busybox(busybox.into()),
            LayerSource::Dir(payload),
        ],
        &spec,
        Some("bench"),
        &layout,
    )
    .map_err(|e| format!("importing the bench image: {e}"))?;
    Ok(layout)
}

/// The start-latency guest: keel-bench-guest as `/bench`, the modules, the image where
/// Keel's supervisor looks for images, and crun with its libraries.
pub fn latency_initramfs(
    parts: &KernelParts,
    guest: &Path,
    image: &Path,
    crun: &DynamicBinary,
    out: &Path,
) -> Result<(), String> {
    let mut initramfs = base_initramfs()?;
    initramfs
        .add_file_from_path("bench", 0o755, guest)
        .map_err(|e| format!("{}: {e}", guest.display()))?;
    parts.add_to(&mut initramfs)?;
    crun.add_to(&mut initramfs)?;
    initramfs
        .add_tree("usr/share/keel/images", image)
        .map_err(|e| format!("bench image: {e}"))?;
    write_initramfs(initramfs, out)
}

/// The skeleton every guest here starts with, the same as `keel build`'s.
fn base_initramfs() -> Result<InitramfsBuilder, String> {
    keel_image::os::base_initramfs().map_err(|e| e.to_string())
}

fn write_initramfs(initramfs: InitramfsBuilder, out: &Path) -> Result<(), String> {
    let file = fs::File::create(out).map_err(|e| format!("{}: {e}", out.display()))?;
    initramfs
        .write_compressed(std::io::BufWriter::new(file), Compression::Zstd)
        .map_err(|e| format!("writing {}: {e}", out.display()))
}

/// The one container of the boot benchmark, in both setups.
pub const BOOT_CONTAINER_ARGS: &[&str] = &["/bin/sleep", "3600"];

/// The Keel host of the boot benchmark: DHCP on eth0 and one busybox container.
pub fn boot_host_file(busybox: &Path) -> String {
    format!(
        r#"# keel-bench: boot time with one container
[host]
hostname = "bootbench"

[network.interfaces.eth0]
dhcp4 = true

[images.box]
layers = ["busybox:{busybox}"]
env = ["PATH=/bin"]

[containers.box]
image = "box"
entrypoint = {args:?}
memory = "64M"
pids = 64
restart = "no"
console = false
"#,
        busybox = busybox.display(),
        args = BOOT_CONTAINER_ARGS,
    )
}

/// A Keel host running `count` idle busybox containers, for PID 1's RSS.
pub fn rss_host_file(busybox: &Path, count: usize) -> String {
    let mut text = format!(
        r#"# keel-bench: PID 1's RSS with {count} containers
[host]
hostname = "rss{count}"

[network.interfaces.eth0]
dhcp4 = true

[images.box]
layers = ["busybox:{busybox}"]
env = ["PATH=/bin"]
"#,
        busybox = busybox.display()
    );
    for i in 0..count {
        text += &format!(
            r#"
[containers.c{i:03}]
image = "box"
entrypoint = ["/bin/sleep", "3600"]
memory = "8M"
pids = 8
restart = "no"
console = false
"#
        );
    }
    text
}

/// The baseline's init: the job of Keel's PID 1 for the boot benchmark, as a busybox
/// shell script. `$MODULES` are the archive paths of the modules in load order.
pub fn baseline_init_script(modules: &[PathBuf], layer_count: usize) -> String {
    let insmods: String = modules
        .iter()
        .map(|m| format!("insmod /{}\n", m.display()))
        .collect();
    let untars: String = (0..layer_count)
        .map(|i| format!("tar -xzf /usr/share/bench/layer{i}.tar.gz -C /var/lib/bench/rootfs\n"))
        .collect();
    format!(
        r#"#!/bin/busybox sh
# keel-bench baseline: what Keel's PID 1 does for a one-container host, with busybox and crun.
export PATH=/bin:/usr/bin
# pivot_root (crun's default) refuses the initramfs rootfs: copy it into a tmpfs first, as
# Keel's init does; switch_root deletes the old files.
if [ ! -e /.tmpfs-root ]; then
  mount -t tmpfs -o mode=0755 tmpfs /newroot
  cd /
  for f in *; do [ "$f" = newroot ] || cp -a "$f" /newroot/; done
  touch /newroot/.tmpfs-root
  exec switch_root /newroot /init
fi
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts -o nosuid,noexec,gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=1777 shm /dev/shm
mount -t tmpfs -o nosuid,nodev,mode=0755 run /run
mount -t tmpfs -o nosuid,nodev,mode=1777 tmp /tmp
mount -t cgroup2 -o nosuid,nodev,noexec,nsdelegate cgroup2 /sys/fs/cgroup
echo "+cpu +io +memory +pids" > /sys/fs/cgroup/cgroup.subtree_control
{insmods}hostname baseline
ip link set lo up
ip link set eth0 up
udhcpc -i eth0 -q -n -s /etc/udhcpc.script >/dev/null 2>&1 || echo "baseline: dhcp failed"
mkdir -p /var/lib/bench/rootfs
{untars}crun --cgroup-manager=cgroupfs run -d --bundle /var/lib/bench box </dev/null >/dev/null 2>/run/crun.err || {{ echo "baseline: crun failed"; cat /run/crun.err; }}
read up rest </proc/uptime
s=${{up%.*}}
c=${{up#*.}}
c=${{c#0}}
echo "baseline: ready uptime_ms=$((s * 1000 + c * 10))"
# After the measurement: prove the container really runs.
if crun state box | grep -q '"running"'; then echo "baseline: box running"; else echo "baseline: box not running"; fi
exec sleep 2147483647
"#
    )
}

/// udhcpc's event script: the address, the default route and resolv.conf with busybox ip.
pub const UDHCPC_SCRIPT: &str = r#"#!/bin/busybox sh
case "$1" in
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    for r in $router; do ip route add default via "$r" dev "$interface"; break; done
    : > /etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
    ;;
esac
exit 0
"#;

/// The baseline initramfs: busybox as /bin, the init script, the modules, crun, the
/// container's image layers and its bundle config.
pub fn baseline_initramfs(
    parts: &KernelParts,
    busybox: &Path,
    crun: &DynamicBinary,
    image: &Path,
    time_namespace: bool,
    out: &Path,
) -> Result<(), String> {
    let mut initramfs = base_initramfs()?;
    for dir in ["bin", "newroot", "usr/share/bench", "var/lib/bench"] {
        initramfs.add_dir(dir, 0o755).map_err(|e| e.to_string())?;
    }
    initramfs
        .add_file_from_path("bin/busybox", 0o755, busybox)
        .map_err(|e| format!("{}: {e}", busybox.display()))?;
    for applet in busybox_applets(busybox)? {
        initramfs
            .add_symlink(format!("bin/{applet}"), "busybox")
            .map_err(|e| e.to_string())?;
    }
    let layout = ImageLayout::open(image).map_err(|e| format!("{}: {e}", image.display()))?;
    let layers = layout.layers();
    for (i, layer) in layers.iter().enumerate() {
        initramfs
            .add_file_from_path(
                format!("usr/share/bench/layer{i}.tar.gz"),
                0o644,
                &layer.path,
            )
            .map_err(|e| format!("{}: {e}", layer.path.display()))?;
    }
    let script = baseline_init_script(&parts.module_paths(), layers.len());
    initramfs
        .add_file_from_bytes("init", 0o755, script.into_bytes())
        .map_err(|e| e.to_string())?;
    initramfs
        .add_file_from_bytes(
            "etc/udhcpc.script",
            0o755,
            UDHCPC_SCRIPT.as_bytes().to_vec(),
        )
        .map_err(|e| e.to_string())?;
    let spec = oci::Spec {
        args: BOOT_CONTAINER_ARGS.iter().map(|s| s.to_string()).collect(),
        env: vec![
            "PATH=/bin".into(),
            "HOSTNAME=box".into(),
            "HOME=/root".into(),
        ],
        hostname: "box",
        rootfs: "/var/lib/bench/rootfs",
        cgroups_path: "/keel/box",
        memory_max: 64 << 20,
        pids_max: 64,
        shm_size: 64 << 20,
        seccomp: true,
        time_namespace,
    };
    let config = serde_json::to_vec_pretty(&oci::config(&spec)).map_err(|e| e.to_string())?;
    initramfs
        .add_file_from_bytes("var/lib/bench/config.json", 0o644, config)
        .map_err(|e| e.to_string())?;
    parts.add_to(&mut initramfs)?;
    crun.add_to(&mut initramfs)?;
    write_initramfs(initramfs, out)
}

/// Runs `keel build HOST -o OUT` with the real CLI.
pub fn keel_build(keel: &Path, host_file: &Path, out: &Path, cache: &Path) -> Result<(), String> {
    let output = Command::new(keel)
        .arg("build")
        .arg(host_file)
        .arg("-o")
        .arg(out)
        .arg("--cache")
        .arg(cache)
        .output()
        .map_err(|e| format!("running {}: {e}", keel.display()))?;
    if !output.status.success() {
        return Err(format!(
            "keel build {} failed:\n{}",
            host_file.display(),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}

pub fn read_manifest(dir: &Path) -> Result<serde_json::Value, String> {
    let path = dir.join("manifest.json");
    let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Boots a kernel + initramfs with the benchmark's QEMU settings (only memory varies).
pub fn boot(
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
    memory_mb: u32,
    console_log: &Path,
) -> Result<Vm, String> {
    let mut config = VmConfig::new(kernel);
    config.initrd = Some(initrd.to_path_buf());
    config.cmdline = cmdline.to_string();
    config.memory_mb = memory_mb;
    config.cpus = CPUS;
    config.console_log = Some(console_log.to_path_buf());
    Vm::boot(config).map_err(|e| format!("QEMU: {e}"))
}

/// Boots a `keel build` output directory: its kernel and initramfs, with its root image
/// attached read-only and no data disk (/var is a tmpfs, as in the baseline).
pub fn boot_build(
    dir: &Path,
    cmdline: &str,
    memory_mb: u32,
    console_log: &Path,
) -> Result<Vm, String> {
    let manifest = read_manifest(dir)?;
    let root_image = manifest["root_image"]
        .as_str()
        .ok_or_else(|| format!("{}/manifest.json names no root_image", dir.display()))?;
    let mut config = VmConfig::new(dir.join("vmlinuz"));
    config.initrd = Some(dir.join("initramfs.img"));
    config.cmdline = cmdline.to_string();
    config.memory_mb = memory_mb;
    config.cpus = CPUS;
    config.console_log = Some(console_log.to_path_buf());
    config.disks.push(Disk {
        path: dir.join(root_image),
        read_only: true,
        serial: Some(keel_image::os::ROOT_DISK_SERIAL.to_string()),
    });
    Vm::boot(config).map_err(|e| format!("QEMU: {e}"))
}

/// Waits for a console line and returns it.
pub fn wait_line(vm: &Vm, needle: &str, timeout: Duration) -> Result<String, String> {
    vm.wait_for_line(needle, timeout).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_files_parse_as_keel_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let busybox = Path::new("/bin/busybox");
        let boot =
            keel_config::HostConfig::parse(&dir.path().join("h.toml"), &boot_host_file(busybox))
                .unwrap();
        assert_eq!(boot.containers.len(), 1);
        assert_eq!(boot.containers["box"].resources.memory_max, Some(64 << 20));
        for count in [0, 10, 100] {
            let host = keel_config::HostConfig::parse(
                &dir.path().join("h.toml"),
                &rss_host_file(busybox, count),
            )
            .unwrap();
            assert_eq!(host.containers.len(), count);
        }
    }

    #[test]
    fn baseline_script_loads_modules_in_order_and_prints_ready() {
        let script = baseline_init_script(
            &[
                PathBuf::from("lib/modules/v/a.ko"),
                PathBuf::from("lib/modules/v/b.ko"),
            ],
            2,
        );
        let a = script.find("insmod /lib/modules/v/a.ko").unwrap();
        let b = script.find("insmod /lib/modules/v/b.ko").unwrap();
        assert!(a < b);
        assert!(script.starts_with("#!/bin/busybox sh\n"));
        assert!(script.contains("layer1.tar.gz"));
        assert!(script.contains("baseline: ready uptime_ms="));
        assert!(script.contains("udhcpc -i eth0"));
    }
}
