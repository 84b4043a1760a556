//! keel-bench-guest: PID 1 of the start-latency guest (`rdinit=/bench`).
//!
//! It boots like Keel's init (root moved to a tmpfs, kernel filesystems, the module load
//! list, the cgroup hierarchy), then starts the same container N times in each of these
//! ways, interleaved, in this one boot:
//!
//! - Keel: `Instance::plan` + `Instance::spawn`, the supervisor's own start path, waited
//!   with waitpid on the returned pid;
//! - crun: `crun run --bundle DIR ID` on a read-only overlay of the same image layers, with
//!   a config.json that mirrors Keel's defaults (see `keel_bench::oci`), once with Keel's
//!   seccomp profile and once without any;
//! - bare: the payload fork + exec'd without any container, the floor under both.
//!
//! Two metrics each: start → the payload's first instruction (keel-bench-stamp prints its
//! CLOCK_MONOTONIC time) and start → exit of busybox's /bin/true. It prints `bench:` lines
//! (parsed by keel-bench on the host) and powers off.
//!
//! Kernel command-line options: `keel_bench.n=N` (runs per metric and runtime, default
//! 200), `keel_bench.warmup=N` (unmeasured runs first, default 5), `keel_bench.aslr=1`
//! (keep address-space randomisation, off by default), `keel_bench.crun_debug=1` (crun's
//! debug log on the console).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use keel_bench::{lines, oci, stats};
use keel_config::{Container, HostConfig};
use keel_init::{early, logger, modules};
use keel_supervisor::cgroup::{CGROUP_ROOT, setup_hierarchy};
use keel_supervisor::spawn::{SetupPlan, SetupStep, describe_failure};
use keel_supervisor::{Instance, Paths, Runtime};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// The two containers, declared the way a host file would: parsing gives exactly Keel's
/// defaults for everything not written here (isolation, seccomp, capabilities, shm size).
const HOST_TEXT: &str = r#"
[host]
hostname = "bench"

[images.bench]
layout = "/usr/share/keel/images"

[containers.stamp]
image = "bench"
entrypoint = ["/bin/stamp"]
memory = "64M"
pids = 64
restart = "no"
console = false

[containers.true]
image = "bench"
entrypoint = ["/bin/true"]
memory = "64M"
pids = 64
restart = "no"
console = false
"#;

const CRUN: &str = "/usr/bin/crun";
/// crun's bundles, its read-only rootfs and its stderr log.
const CRUN_DIR: &str = "/run/keel-bench";
/// crun's container cgroups live beside Keel's `/keel`, under this parent.
const CRUN_CGROUP_PARENT: &str = "/keel-bench";

struct Options {
    n: usize,
    warmup: usize,
    /// crun's own debug log to the console, to find out why a crun run fails.
    crun_debug: bool,
    /// Leave address-space randomisation on (see `run`).
    aslr: bool,
}

impl Options {
    fn from_cmdline(cmdline: &str) -> Result<Options, String> {
        let mut options = Options {
            n: 200,
            warmup: 5,
            crun_debug: false,
            aslr: false,
        };
        for word in cmdline.split_whitespace() {
            let Some((key, value)) = word
                .strip_prefix("keel_bench.")
                .and_then(|kv| kv.split_once('='))
            else {
                continue;
            };
            let bad = |e: std::num::ParseIntError| format!("keel_bench.{key}={value}: {e}");
            match key {
                "n" => options.n = value.parse().map_err(bad)?,
                "warmup" => options.warmup = value.parse().map_err(bad)?,
                "crun_debug" => options.crun_debug = value != "0",
                "aslr" => options.aslr = value != "0",
                other => return Err(format!("unknown option keel_bench.{other}")),
            }
        }
        if options.n == 0 {
            return Err("keel_bench.n must be at least 1".into());
        }
        Ok(options)
    }
}

fn main() {
    let outcome = std::panic::catch_unwind(run);
    match outcome {
        Ok(Ok(())) => println!("bench: done"),
        Ok(Err(e)) => println!("bench: error: {e}"),
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            println!("bench: error: panic: {why}");
        }
    }
    power_off();
}

/// PID 1 must not exit (the kernel would panic): sync and power the machine off instead.
fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn monotonic_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
}

fn run() -> Result<(), String> {
    early::switch_to_tmpfs_root().map_err(|e| format!("moving / to a tmpfs: {e}"))?;
    for e in early::mount_kernel_filesystems() {
        println!("bench: warning: {e}");
    }
    logger::init();
    let (_, failed) = modules::load_all(Path::new(modules::LOAD_LIST));
    if failed > 0 {
        return Err(format!("{failed} kernel modules failed to load"));
    }
    let cgroups = setup_hierarchy(Path::new(CGROUP_ROOT)).map_err(|e| format!("cgroups: {e}"))?;
    let cmdline = fs::read_to_string("/proc/cmdline").map_err(|e| format!("/proc/cmdline: {e}"))?;
    let options = Options::from_cmdline(&cmdline)?;
    let time_namespace = Path::new("/proc/self/ns/time").exists();
    // Under TCG, QEMU's translated code is keyed by virtual address: a program mapped at a
    // new random address on every exec is translated again on every exec. That taxes each
    // new process (crun and its ten libraries at every start, the payloads) but not the
    // start path Keel runs inside this long-lived process, so it would skew the comparison
    // in Keel's favour. Without randomisation every exec finds its code translated. (On
    // hardware or KVM this makes no difference worth measuring.)
    if !options.aslr {
        fs::write("/proc/sys/kernel/randomize_va_space", "0")
            .map_err(|e| format!("disabling ASLR: {e}"))?;
    }

    let config = HostConfig::parse(Path::new("/etc/keel/host.toml"), HOST_TEXT)
        .map_err(|e| e.to_string())?;
    let paths = Paths::default();
    for dir in [&paths.layers, &paths.containers, &paths.logs] {
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    // Instance::prepare only looks the layers up: PID 1 leaves unpacking to a helper.
    let layout = paths.open_image("bench").map_err(|e| e.to_string())?;
    keel_image::layer_store::unpack_image(&layout, &paths.layers)
        .map_err(|e| format!("unpacking the image: {e}"))?;
    let mut runtime = Runtime::new(paths, cgroups);
    let stamp = Instance::prepare(&runtime, "stamp", &config.containers["stamp"], None)
        .map_err(|e| e.to_string())?;
    let truth = Instance::prepare(&runtime, "true", &config.containers["true"], None)
        .map_err(|e| e.to_string())?;
    let crun_rootfs = mount_crun_rootfs(&runtime.paths)?;
    // crun 1.8.1 (Debian 12) cannot start a container with a time namespace: its
    // intermediate process exits, the container process is SIGKILLed and `crun run` fails
    // with "write to sync socket". So crun runs without one; Keel keeps its default (a
    // time namespace where the kernel has them), which is work crun is spared.
    let crun = Crun::new(&crun_rootfs, "crun", true, options.crun_debug)?;
    // The same without seccomp, crun's default when a spec has none: it shows what
    // compiling the profile with libseccomp at every start costs crun.
    let crun_plain = Crun::new(&crun_rootfs, "crun-noseccomp", false, options.crun_debug)?;
    let bare = Bare::new(&crun_rootfs);

    println!(
        "bench: info n={} warmup={} aslr={} kernel={} time_namespace={} crun_version={}",
        options.n,
        options.warmup,
        if options.aslr { "on" } else { "off" },
        nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        if time_namespace { "keel-only" } else { "no" },
        crun_version()?
    );

    let dev_null = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| format!("/dev/null: {e}"))?;
    let dev_null = OwnedFd::from(dev_null);

    const FIRST: &str = "start_to_first_instruction_us";
    const EXIT: &str = "start_to_exit_us";
    let mut samples: Vec<((&str, &str), Vec<u64>)> = Vec::new();
    for runtime_name in ["keel", "crun", "crun-noseccomp", "bare"] {
        for metric in [FIRST, EXIT] {
            samples.push(((runtime_name, metric), Vec::with_capacity(options.n)));
        }
    }
    // Interleaved, so a drift of the emulated machine (page cache, slab growth, the host's
    // load) affects every runtime alike. Warm-up runs fill caches and are not recorded.
    for i in 0..options.warmup + options.n {
        let round = [
            keel_start_to_first_instruction(
                &stamp,
                &config.containers["stamp"],
                &mut runtime,
                &dev_null,
            )?,
            keel_start_to_exit(&truth, &config.containers["true"], &mut runtime, &dev_null)?,
            crun.start_to_first_instruction(i)?,
            crun.start_to_exit(i, &dev_null)?,
            crun_plain.start_to_first_instruction(i)?,
            crun_plain.start_to_exit(i, &dev_null)?,
            bare.start_to_first_instruction()?,
            bare.start_to_exit(&dev_null)?,
        ];
        if i >= options.warmup {
            for (slot, ns) in samples.iter_mut().zip(round) {
                slot.1.push(ns);
            }
        }
    }

    println!(
        "bench: info keel_seccomp_programs={}",
        runtime.seccomp_programs()
    );
    for ((runtime_name, metric), values) in &samples {
        let micros: Vec<f64> = values.iter().map(|ns| *ns as f64 / 1000.0).collect();
        let summary = stats::summarize(&micros).ok_or("no samples")?;
        println!("{}", lines::format_summary(runtime_name, metric, &summary));
        let raw: Vec<String> = micros.iter().map(|us| format!("{us:.0}")).collect();
        println!("bench: samples {runtime_name} {metric} {}", raw.join(","));
    }
    Ok(())
}

/// Start → the payload's first instruction: the payload's own CLOCK_MONOTONIC reading
/// minus ours just before `plan` + `spawn`.
fn keel_start_to_first_instruction(
    instance: &Instance,
    definition: &Container,
    runtime: &mut Runtime,
    dev_null: &OwnedFd,
) -> Result<u64, String> {
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let start = monotonic_ns();
    let plan = instance
        .plan(runtime, definition)
        .map_err(|e| e.to_string())?;
    let spawned = instance
        .spawn(
            &plan,
            [dev_null.as_raw_fd(), write.as_raw_fd(), write.as_raw_fd()],
        )
        .map_err(|e| format!("keel: clone3: {e}"))?;
    drop(write);
    let output = read_line(read);
    let status = wait_for(spawned.pid)?;
    check_setup(&plan, spawned.error_pipe)?;
    check_exit("keel stamp", status)?;
    let stamp = parse_stamp(&output?)?;
    Ok(stamp.saturating_sub(start))
}

/// Start → exit of /bin/true: until waitpid returns its exit.
fn keel_start_to_exit(
    instance: &Instance,
    definition: &Container,
    runtime: &mut Runtime,
    dev_null: &OwnedFd,
) -> Result<u64, String> {
    let fd = dev_null.as_raw_fd();
    let start = monotonic_ns();
    let plan = instance
        .plan(runtime, definition)
        .map_err(|e| e.to_string())?;
    let spawned = instance
        .spawn(&plan, [fd, fd, fd])
        .map_err(|e| format!("keel: clone3: {e}"))?;
    let status = wait_for(spawned.pid)?;
    let end = monotonic_ns();
    check_setup(&plan, spawned.error_pipe)?;
    check_exit("keel true", status)?;
    Ok(end - start)
}

/// A setup step that failed in the child says so on the error pipe (EOF means execve ran).
fn check_setup(plan: &SetupPlan, error_pipe: OwnedFd) -> Result<(), String> {
    let mut bytes = Vec::new();
    File::from(error_pipe)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("reading the error pipe: {e}"))?;
    if bytes.is_empty() {
        return Ok(());
    }
    let steps: Vec<String> = plan.steps.iter().map(SetupStep::describe).collect();
    Err(format!(
        "keel: container setup failed: {}",
        describe_failure(&steps, &bytes).unwrap_or_else(|| "unreadable error report".into())
    ))
}

fn wait_for(pid: libc::pid_t) -> Result<WaitStatus, String> {
    loop {
        match waitpid(Pid::from_raw(pid), None) {
            Err(Errno::EINTR) => continue,
            other => return other.map_err(|e| format!("waitpid {pid}: {e}")),
        }
    }
}

fn check_exit(what: &str, status: WaitStatus) -> Result<(), String> {
    match status {
        WaitStatus::Exited(_, 0) => Ok(()),
        other => Err(format!("{what}: {other:?}")),
    }
}

/// Reads up to the first newline (or EOF). crun's own stdout is the same pipe and stays
/// open until crun exits, so waiting for EOF would time crun's teardown too.
fn read_line(fd: OwnedFd) -> Result<String, String> {
    let mut file = File::from(fd);
    let mut line = Vec::with_capacity(32);
    let mut byte = [0u8; 64];
    loop {
        let n = match file.read(&mut byte) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("reading the payload's output: {e}")),
        };
        if n == 0 {
            break;
        }
        line.extend_from_slice(&byte[..n]);
        if line.contains(&b'\n') {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

fn parse_stamp(output: &str) -> Result<u64, String> {
    output
        .trim()
        .parse()
        .map_err(|_| format!("the payload printed {output:?}, not a timestamp"))
}

/// Collects processes re-parented to us (PID 1) that are not anyone's child any more.
/// Only called between runs, so it never takes a status a running measurement waits for.
fn reap_strays() {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(_) => return,
        }
    }
}

/// The payloads without any container: a plain fork + exec from the same files (the crun
/// rootfs), the floor under both runtimes' numbers.
struct Bare {
    stamp: PathBuf,
    truth: PathBuf,
}

impl Bare {
    fn new(rootfs: &Path) -> Bare {
        Bare {
            stamp: rootfs.join("bin/stamp"),
            truth: rootfs.join("bin/true"),
        }
    }

    fn start_to_first_instruction(&self) -> Result<u64, String> {
        let (read, write) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
        let start = monotonic_ns();
        let mut child = Command::new(&self.stamp)
            .stdin(Stdio::null())
            .stdout(Stdio::from(write))
            .spawn()
            .map_err(|e| format!("{}: {e}", self.stamp.display()))?;
        let output = read_line(read);
        let status = child
            .wait()
            .map_err(|e| format!("waiting for stamp: {e}"))?;
        if !status.success() {
            return Err(format!("bare stamp: {status}"));
        }
        let stamp = parse_stamp(&output?)?;
        Ok(stamp.saturating_sub(start))
    }

    fn start_to_exit(&self, dev_null: &OwnedFd) -> Result<u64, String> {
        let stdout = dev_null
            .try_clone()
            .map_err(|e| format!("dup /dev/null: {e}"))?;
        let start = monotonic_ns();
        let status = Command::new(&self.truth)
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .status()
            .map_err(|e| format!("{}: {e}", self.truth.display()))?;
        let end = monotonic_ns();
        if !status.success() {
            return Err(format!("bare true: {status}"));
        }
        Ok(end - start)
    }
}

/// The image's layers mounted once as a read-only overlay: crun wants a directory.
fn mount_crun_rootfs(paths: &Paths) -> Result<PathBuf, String> {
    let layout = paths.open_image("bench").map_err(|e| e.to_string())?;
    // Already unpacked before Instance::prepare: this only returns the same directories.
    let lowers = keel_image::layer_store::unpack_image(&layout, &paths.layers)
        .map_err(|e| format!("unpacking the image: {e}"))?;
    let lowerdir: Vec<String> = lowers
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect();
    let rootfs = Path::new(CRUN_DIR).join("rootfs");
    fs::create_dir_all(&rootfs).map_err(|e| format!("{}: {e}", rootfs.display()))?;
    // Two or more lowers and no upper: overlayfs mounts it read-only.
    nix::mount::mount(
        Some("overlay"),
        &rootfs,
        Some("overlay"),
        nix::mount::MsFlags::MS_RDONLY,
        Some(format!("lowerdir={}", lowerdir.join(":")).as_str()),
    )
    .map_err(|e| format!("mounting the crun rootfs overlay: {e}"))?;
    Ok(rootfs)
}

fn crun_version() -> Result<String, String> {
    let out = Command::new(CRUN)
        .arg("--version")
        .output()
        .map_err(|e| format!("{CRUN} --version: {e}"))?;
    reap_strays();
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap_or("unknown");
    Ok(first.trim_start_matches("crun version ").replace(' ', "_"))
}

/// `crun run` with one bundle per payload.
struct Crun {
    name: &'static str,
    stamp_bundle: PathBuf,
    true_bundle: PathBuf,
    /// crun's stderr, kept for the error message of a failed run.
    log: File,
    debug: bool,
}

impl Crun {
    fn new(rootfs: &Path, name: &'static str, seccomp: bool, debug: bool) -> Result<Crun, String> {
        let dir = Path::new(CRUN_DIR).join(name);
        let rootfs = rootfs.display().to_string();
        let mut bundles = Vec::new();
        for (payload, program) in [("stamp", "/bin/stamp"), ("true", "/bin/true")] {
            let bundle = dir.join(payload);
            fs::create_dir_all(&bundle).map_err(|e| format!("{}: {e}", bundle.display()))?;
            // One cgroup path per bundle: `crun run` removes it when the container is gone,
            // and runs never overlap.
            let cgroups_path = format!("{CRUN_CGROUP_PARENT}/{name}-{payload}");
            let spec = oci::Spec {
                args: vec![program.to_string()],
                env: vec![
                    "PATH=/bin".into(),
                    format!("HOSTNAME={payload}"),
                    "HOME=/root".into(),
                ],
                hostname: payload,
                rootfs: &rootfs,
                cgroups_path: &cgroups_path,
                memory_max: 64 << 20,
                pids_max: 64,
                shm_size: 64 << 20,
                seccomp,
                time_namespace: false,
            };
            let json = serde_json::to_string_pretty(&oci::config(&spec))
                .map_err(|e| format!("config.json: {e}"))?;
            fs::write(bundle.join("config.json"), json)
                .map_err(|e| format!("{}: {e}", bundle.display()))?;
            bundles.push(bundle);
        }
        let log = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(dir.join("crun.log"))
            .map_err(|e| format!("crun log: {e}"))?;
        let true_bundle = bundles.pop().ok_or("no bundle")?;
        let stamp_bundle = bundles.pop().ok_or("no bundle")?;
        Ok(Crun {
            name,
            stamp_bundle,
            true_bundle,
            log,
            debug,
        })
    }

    fn command(&self, bundle: &Path, id: String, stdout: Stdio) -> Result<Command, String> {
        let stderr = self.log.try_clone().map_err(|e| format!("crun log: {e}"))?;
        let mut command = Command::new(CRUN);
        if self.debug {
            command.args(["--debug", "--log=/dev/console"]);
        }
        command
            .arg("--cgroup-manager=cgroupfs")
            .arg("run")
            .arg("--bundle")
            .arg(bundle)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        Ok(command)
    }

    fn start_to_first_instruction(&self, i: usize) -> Result<u64, String> {
        let (read, write) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
        let start = monotonic_ns();
        let mut child = self
            .command(&self.stamp_bundle, format!("stamp-{i}"), Stdio::from(write))?
            .spawn()
            .map_err(|e| format!("spawning {CRUN}: {e}"))?;
        // spawn() left the Command's copy of the write end behind in the temporary; only
        // crun (and the container) hold it now.
        let output = read_line(read);
        let status = child.wait().map_err(|e| format!("waiting for crun: {e}"))?;
        reap_strays();
        if !status.success() {
            return Err(format!(
                "{} (stamp): {status}: {}",
                self.name,
                self.log_tail()
            ));
        }
        let stamp = parse_stamp(&output?)?;
        Ok(stamp.saturating_sub(start))
    }

    fn start_to_exit(&self, i: usize, dev_null: &OwnedFd) -> Result<u64, String> {
        let stdout = dev_null
            .try_clone()
            .map_err(|e| format!("dup /dev/null: {e}"))?;
        let start = monotonic_ns();
        let status = self
            .command(&self.true_bundle, format!("true-{i}"), Stdio::from(stdout))?
            .status()
            .map_err(|e| format!("running crun: {e}"))?;
        let end = monotonic_ns();
        reap_strays();
        if !status.success() {
            return Err(format!(
                "{} (true): {status}: {}",
                self.name,
                self.log_tail()
            ));
        }
        Ok(end - start)
    }

    fn log_tail(&self) -> String {
        let mut log = &self.log;
        let mut text = String::new();
        if log.seek(SeekFrom::Start(0)).is_err() || log.read_to_string(&mut text).is_err() {
            return "(crun's log is unreadable)".into();
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_containers_parse_with_keels_defaults() {
        let config = HostConfig::parse(Path::new("/etc/keel/host.toml"), HOST_TEXT).unwrap();
        for name in ["stamp", "true"] {
            let c = &config.containers[name];
            assert_eq!(c.resources.memory_max, Some(64 << 20));
            assert_eq!(c.resources.pids_max, Some(64));
            assert!(!c.isolation.privileged);
            assert!(c.isolation.no_new_privileges);
            assert_eq!(c.isolation.capabilities().len(), 14);
        }
    }

    #[test]
    fn options_come_from_the_command_line() {
        let o = Options::from_cmdline("console=ttyS0 rdinit=/bench").unwrap();
        assert_eq!(
            (o.n, o.warmup, o.aslr, o.crun_debug),
            (200, 5, false, false)
        );
        let o = Options::from_cmdline("keel_bench.n=100 keel_bench.warmup=0 keel_bench.aslr=1")
            .unwrap();
        assert_eq!((o.n, o.warmup, o.aslr), (100, 0, true));
        assert!(Options::from_cmdline("keel_bench.n=0").is_err());
        assert!(Options::from_cmdline("keel_bench.n=x").is_err());
        assert!(Options::from_cmdline("keel_bench.bogus=1").is_err());
    }
}
