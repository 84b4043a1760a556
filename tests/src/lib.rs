//! Helpers for the end-to-end tests: find the built `keel` and `keel-init`, build a host
//! with the real CLI, and boot it with the `keel-qemu` harness.
//!
//! The tests use the binaries of the same profile they were built with (`cargo build
//! --release --bins` before `cargo test --release`, which `scripts/test` does).

pub mod bomb_image;
pub mod oci_tools;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use keel_qemu::{Disk, PortForward, Vm, VmConfig};
use serde_json::Value;

/// The virtio serials PID 1 finds its disks by (keel_image::os::ROOT_DISK_SERIAL and
/// DATA_DISK_SERIAL).
pub const ROOT_DISK_SERIAL: &str = "keel-root";
pub const DATA_DISK_SERIAL: &str = "KEEL-VAR";

/// Boots under TCG on a loaded 2-core machine take seconds; give every milestone room.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
pub const STEP_TIMEOUT: Duration = Duration::from_secs(60);

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .to_path_buf()
}

/// The directory holding `keel` and `keel-init` for this test binary's profile.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<triple>/<profile>/deps/<test binary>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary is in a deps directory")
        .to_path_buf();
    for bin in ["keel", "keel-init"] {
        assert!(
            dir.join(bin).is_file(),
            "{} is missing: build the binaries first (`cargo build --release --bins`, as scripts/test does)",
            dir.join(bin).display()
        );
    }
    dir
}

/// Runs `keel build HOST -o OUT` and returns OUT.
pub fn build_host(host_file: &Path, out: &Path) -> PathBuf {
    let keel = bin_dir().join("keel");
    let output = Command::new(&keel)
        .arg("build")
        .arg(host_file)
        .arg("-o")
        .arg(out)
        .output()
        .expect("running keel build");
    assert!(
        output.status.success(),
        "keel build {} failed:\n{}{}",
        host_file.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    out.to_path_buf()
}

/// The VM configuration for a `keel build` output: its root image attached read-only, the
/// given guest ports published on free host ports and the console kept off the test's
/// output. No data disk: /var is a tmpfs unless the test adds one ([`attach_data_disk`]).
pub fn vm_config(dir: &Path, guest_ports: &[u16]) -> VmConfig {
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("manifest.json")).expect("manifest.json"),
    )
    .expect("manifest is JSON");
    let mut config = VmConfig::new(dir.join("vmlinuz"));
    config.initrd = Some(dir.join("initramfs.img"));
    config.cmdline = manifest["cmdline"]
        .as_str()
        .expect("cmdline in manifest")
        .to_string();
    let root_image = manifest["root_image"]
        .as_str()
        .expect("root_image in manifest");
    config.disks.push(Disk {
        path: dir.join(root_image),
        read_only: true,
        serial: Some(ROOT_DISK_SERIAL.to_string()),
    });
    config.publish = guest_ports
        .iter()
        .map(|g| PortForward { host: 0, guest: *g })
        .collect();
    config.echo_console = false;
    config
}

/// The VM configuration that boots a `keel build` output the way `keel run` does by default:
/// OVMF starts `disk.img` (written in place, extended to `disk_size` bytes first if smaller),
/// with the machine's own firmware variables in `dir`. Ports as [`vm_config`].
pub fn firmware_vm_config(dir: &Path, disk_size: u64, guest_ports: &[u16]) -> VmConfig {
    let disk = dir.join("disk.img");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap_or_else(|e| panic!("{}: {e}", disk.display()));
    if file.metadata().unwrap().len() < disk_size {
        file.set_len(disk_size).unwrap();
    }
    let vars = dir.join("disk.efivars.fd");
    if !vars.exists() {
        std::fs::copy(keel_qemu::OVMF_VARS_TEMPLATE, &vars).unwrap_or_else(|e| {
            panic!(
                "{}: {e}: install `ovmf` (scripts/install-deps does)",
                keel_qemu::OVMF_VARS_TEMPLATE
            )
        });
    }
    let mut config = VmConfig {
        firmware: Some(keel_qemu::Firmware {
            code: keel_qemu::OVMF_CODE.into(),
            vars,
            secure_boot: false,
        }),
        ..VmConfig::default()
    };
    config.disks.push(Disk {
        path: disk,
        read_only: false,
        serial: None,
    });
    config.publish = guest_ports
        .iter()
        .map(|g| PortForward { host: 0, guest: *g })
        .collect();
    config
}

/// Attaches a persistent data disk (the guest's /var) at `path`, first creating it as a
/// blank sparse file of `size` bytes if it does not exist; the guest formats a blank disk.
pub fn attach_data_disk(config: &mut VmConfig, path: &Path, size: u64) {
    if !path.exists() {
        let file = std::fs::File::create(path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        file.set_len(size)
            .unwrap_or_else(|e| panic!("sizing {}: {e}", path.display()));
    }
    config.disks.push(Disk {
        path: path.to_path_buf(),
        read_only: false,
        serial: Some(DATA_DISK_SERIAL.to_string()),
    });
}

/// Boots a `keel build` output with no published ports and its control port on
/// `api_socket`.
pub fn boot_with_api(dir: &Path, api_socket: &Path) -> Vm {
    let mut config = vm_config(dir, &[]);
    config.api_socket = Some(api_socket.to_path_buf());
    let vm = Vm::boot(config).expect("QEMU starts");
    assert_eq!(vm.api_socket(), api_socket);
    vm
}

/// Boots a `keel build` output with the given guest ports published on free host ports.
pub fn boot(dir: &Path, guest_ports: &[u16]) -> Vm {
    Vm::boot(vm_config(dir, guest_ports)).expect("QEMU starts")
}

/// A host file built and booted, ready, with the CLI on its API socket; the build output and
/// the socket's directory live as long as it does.
pub struct ReadyHost {
    pub vm: Vm,
    pub keel: KeelCli,
    _work: tempfile::TempDir,
    _sockets: tempfile::TempDir,
}

/// Writes `host_file` (the text of a host file), builds it, boots it with its API on a
/// socket of its own and waits for `keel: ready`.
pub fn boot_ready(host_file: &str) -> ReadyHost {
    let work = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(work.path().join("host.toml"), host_file).expect("writing host.toml");
    let dir = build_host(&work.path().join("host.toml"), &work.path().join("out"));
    // A unix socket path must fit in 108 bytes: $TMPDIR may be long, /tmp is not.
    let sockets = tempfile::Builder::new()
        .prefix("keel-api-")
        .tempdir_in("/tmp")
        .expect("a directory in /tmp");
    let socket = sockets.path().join("api.sock");
    let vm = boot_with_api(&dir, &socket);
    vm.wait_for_line("keel: ready uptime_ms=", BOOT_TIMEOUT)
        .unwrap();
    ReadyHost {
        vm,
        keel: KeelCli::new(socket),
        _work: work,
        _sockets: sockets,
    }
}

/// The `keel` CLI driving a booted VM's control API through its socket (what `keel --vm
/// DIR` does, with the socket given directly by `--api-socket`).
pub struct KeelCli {
    binary: PathBuf,
    socket: PathBuf,
}

impl KeelCli {
    /// The `keel` of this test binary's profile ([`bin_dir`]), talking to `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        KeelCli {
            binary: bin_dir().join("keel"),
            socket: socket.into(),
        }
    }

    /// The API socket it talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `keel --api-socket SOCKET ARGS...`, to be run as the caller sees fit.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.binary);
        command.arg("--api-socket").arg(&self.socket).args(args);
        command
    }

    /// Runs `keel --api-socket SOCKET ARGS...`, killing it if it takes longer than
    /// STEP_TIMEOUT.
    pub fn run(&self, args: &[&str]) -> Output {
        let mut child = self
            .command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running keel");
        // Read while it runs: a command printing more than a pipe holds would block on it.
        let read = |pipe: Option<Box<dyn std::io::Read + Send>>| {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                if let Some(mut pipe) = pipe {
                    let _ = pipe.read_to_end(&mut bytes);
                }
                bytes
            })
        };
        let stdout = read(child.stdout.take().map(|p| Box::new(p) as _));
        let stderr = read(child.stderr.take().map(|p| Box::new(p) as _));
        let deadline = Instant::now() + STEP_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("waiting for keel") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let stderr = stderr.join().unwrap_or_default();
                panic!(
                    "keel {args:?} did not finish within {STEP_TIMEOUT:?}; stderr:\n{}",
                    String::from_utf8_lossy(&stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Output {
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        }
    }

    /// Runs a command that must succeed and returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "keel {args:?} exited with {:?}:\n{}{}",
            output.status.code(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("UTF-8 output")
    }

    /// Runs a command that must fail with exit status `code`; returns its stderr.
    pub fn fails(&self, args: &[&str], code: i32) -> String {
        let output = self.run(args);
        assert_eq!(
            output.status.code(),
            Some(code),
            "keel {args:?}:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stderr).into_owned()
    }

    /// Every container's status, from `keel ps --json`.
    pub fn ps(&self) -> Vec<Value> {
        let text = self.ok(&["ps", "--json"]);
        match serde_json::from_str(&text) {
            Ok(Value::Array(statuses)) => statuses,
            other => panic!("ps --json is not a list: {other:?}\n{text}"),
        }
    }

    /// The containers' names, in `ps` order.
    pub fn names(&self) -> Vec<String> {
        self.ps()
            .iter()
            .filter_map(|s| s["name"].as_str().map(str::to_string))
            .collect()
    }

    /// `name`'s status from `ps`; panics if it is not there.
    pub fn status(&self, name: &str) -> Value {
        self.ps()
            .into_iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("{name} is not in ps"))
    }

    /// Polls `ps` until `done` holds for `name`'s status, and returns that status.
    pub fn wait_for(&self, name: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let status = self.status(name);
            if done(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{name} never got {what}; last status: {status}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Whether a `ps --json` status is a running container with a process.
pub fn running(status: &Value) -> bool {
    status["state"] == "running" && status["pid"].is_i64()
}

/// A host named `hostname` whose one onboot task, `who`, prints `who: WHO` on the console:
/// the delivery tests tell which host file a boot used by it.
pub fn who_host(hostname: &str, who: &str) -> String {
    format!(
        r#"[host]
hostname = "{hostname}"

[images.bb]
layers = ["busybox:/bin/busybox"]
env = ["PATH=/bin"]

[containers.who]
image = "bb"
kind = "onboot"
network = "none"
command = ["sh", "-c", "echo who: {who}"]
"#
    )
}
