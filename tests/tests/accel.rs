//! End-to-end: the accelerator choice proves itself by a real boot. A KVM that passes the probe
//! but never runs a Linux guest, and a KVM that genuinely fails the probe, both end in TCG
//! by themselves, for the test harness and for `keel run`; a forced KVM that shows no sign of
//! life is a clear error, not a hang.
//!
//! These machines are simulated with QEMU wrappers on the runner's binary path (`KEEL_QEMU`
//! for `keel run`, `VmConfig::qemu` for the harness), so the tests mean the same on a machine
//! with working KVM, with a hanging one, and with none.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use keel_qemu::{Accel, KVM_LIFE_SIGN_TIMEOUT, Vm};
use keel_tests::{BOOT_TIMEOUT, STEP_TIMEOUT, bin_dir, build_host, vm_config, workspace_root};

/// examples/hello, built once for every test here.
fn hello() -> &'static Path {
    static BUILT: OnceLock<tempfile::TempDir> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let out = tempfile::tempdir().unwrap();
            build_host(
                &workspace_root().join("examples/hello/host.toml"),
                out.path(),
            );
            out
        })
        .path()
}

/// The real QEMU, by absolute path (the wrappers must not find themselves).
fn real_qemu() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap();
    std::env::split_paths(&path)
        .map(|dir| dir.join("qemu-system-x86_64"))
        .find(|p| p.is_file())
        .expect("qemu-system-x86_64 on PATH")
}

/// Writes an executable `qemu` wrapper script into `dir`. `@QEMU@` stands for the real one.
fn wrapper(dir: &Path, script: &str) -> PathBuf {
    let path = dir.join("qemu");
    let text = script.replace("@QEMU@", &real_qemu().display().to_string());
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A KVM that looks usable but hangs real guests: asked for KVM, it runs the probe's firmware
/// under TCG (so the probe passes), and starts a real boot paused forever (QMP answers, the
/// guest never runs a single instruction).
const KVM_HANGS: &str = r#"#!/bin/sh
case " $* " in *" -accel kvm "*) ;; *) exec @QEMU@ "$@" ;; esac
probe=no
for a do
  shift
  case "$a" in kvm) a=tcg ;; host) a=max ;; -bios) probe=yes ;; esac
  set -- "$@" "$a"
done
[ "$probe" = yes ] && exec @QEMU@ "$@"
exec @QEMU@ "$@" -S
"#;

/// A KVM that genuinely fails: QEMU runs with `/dev/kvm` replaced by `/dev/null` in a mount
/// namespace of its own (or, where the machine has no /dev/kvm, as it is), so QEMU's own KVM
/// initialisation fails.
const KVM_FAILS: &str = r#"#!/bin/sh
case " $* " in *" -accel kvm "*) ;; *) exec @QEMU@ "$@" ;; esac
exec unshare --mount sh -c '[ -e /dev/kvm ] && mount --bind /dev/null /dev/kvm; exec @QEMU@ "$@"' qemu "$@"
"#;

/// `keel run`, with its stderr lines arriving on a channel.
struct KeelRun {
    child: Child,
    stderr: Receiver<String>,
    seen: Vec<String>,
}

impl KeelRun {
    fn start(dir: &Path, qemu: &Path, cache: &Path, accel: Option<&str>) -> KeelRun {
        let mut cmd = Command::new(bin_dir().join("keel"));
        cmd.arg("run")
            .arg(dir)
            .args([
                "--publish",
                "0:80",
                "--direct-kernel",
                "--no-data-disk",
                "--console",
            ])
            .arg(dir.join("console.log"))
            .env("KEEL_QEMU", qemu)
            .env("KEEL_CACHE", cache)
            .env_remove("KEEL_ACCEL")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(accel) = accel {
            cmd.env("KEEL_ACCEL", accel);
        }
        let mut child = cmd.spawn().expect("running keel run");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        KeelRun {
            child,
            stderr: rx,
            seen: Vec::new(),
        }
    }

    /// The first stderr line (from the start) containing `needle`.
    fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        if let Some(line) = self.seen.iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "keel run: no stderr line with {needle:?} ({e:?}); stderr so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits for keel run to exit and returns its code, with every stderr line read.
    fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                while let Ok(line) = self.stderr.recv_timeout(Duration::from_secs(5)) {
                    self.seen.push(line);
                }
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "keel run did not exit within {timeout:?}; stderr:\n{}",
                self.seen.join("\n")
            );
            // The channel doubles as the pause between looks at the child.
            if let Ok(line) = self.stderr.recv_timeout(Duration::from_millis(200)) {
                self.seen.push(line);
            }
        }
    }
}

impl Drop for KeelRun {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // Two SIGTERMs: the first asks the guest to power off, the second kills QEMU.
            let pid = self.child.id().to_string();
            for _ in 0..2 {
                let _ = Command::new("kill").args(["-TERM", &pid]).status();
                std::thread::sleep(Duration::from_millis(300));
            }
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("===== keel run stderr =====\n{}", self.seen.join("\n"));
        }
    }
}

/// The page through a host port, retried while the guest's server is not up.
fn fetch(port: u16) -> String {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let attempt = TcpStream::connect(("127.0.0.1", port)).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut page = String::new();
            s.read_to_string(&mut page)?;
            Ok(page)
        });
        match attempt {
            Ok(page) if page.starts_with("HTTP/") => return page,
            other => assert!(
                Instant::now() < deadline,
                "no page on port {port}: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_harness_falls_back_to_tcg_when_kvm_hangs_a_real_guest() {
    let scratch = tempfile::tempdir().unwrap();
    let mut config = vm_config(hello(), &[80]);
    config.qemu = Some(wrapper(scratch.path(), KVM_HANGS));
    let started = Instant::now();
    let mut vm = Vm::boot(config).expect("QEMU starts");
    let why = vm.kvm_refused().map(str::to_owned);
    assert_eq!(vm.accel(), Accel::Tcg, "{why:?}");
    let why = why.expect("a reason for not using KVM");
    assert!(why.contains("printed nothing within"), "{why}");
    // Found out by the life-sign watch, not by a boot timeout.
    assert!(
        started.elapsed() < KVM_LIFE_SIGN_TIMEOUT + STEP_TIMEOUT,
        "{:?}",
        started.elapsed()
    );
    vm.wait_for_line("keel: ready uptime_ms=", BOOT_TIMEOUT)
        .unwrap();
    assert_eq!(vm.http_get(80, "/", STEP_TIMEOUT).unwrap().status, 200);
    vm.powerdown().unwrap();
    vm.wait_for_line("keel: poweroff clean", STEP_TIMEOUT)
        .unwrap();
    assert!(vm.wait_exit(STEP_TIMEOUT).unwrap().success());
}

#[test]
fn a_kvm_that_fails_the_probe_boots_under_tcg() {
    let scratch = tempfile::tempdir().unwrap();
    let mut config = vm_config(hello(), &[]);
    config.qemu = Some(wrapper(scratch.path(), KVM_FAILS));
    let vm = Vm::boot(config).expect("QEMU starts");
    assert_eq!(vm.accel(), Accel::Tcg);
    let why = vm.kvm_refused().expect("a reason for not using KVM");
    // QEMU's own words, e.g. "failed to initialize kvm: Inappropriate ioctl for device" or
    // "Could not access KVM kernel module".
    assert!(why.contains("KVM test guest failed"), "{why}");
    assert!(why.to_lowercase().contains("kvm"), "{why}");
    vm.wait_for_line("keel: ready uptime_ms=", BOOT_TIMEOUT)
        .unwrap();
}

#[test]
fn keel_run_falls_back_to_tcg_and_a_forced_kvm_fails_clearly() {
    let scratch = tempfile::tempdir().unwrap();
    let qemu = wrapper(scratch.path(), KVM_HANGS);
    let cache = scratch.path().join("cache");
    let dir = hello();

    let mut run = KeelRun::start(dir, &qemu, &cache, None);
    let line = run.wait_for("KVM does not run guests here", STEP_TIMEOUT);
    assert!(
        line.contains("printed nothing within") && line.ends_with("; using TCG"),
        "{line}"
    );
    // Progress on stderr while the console goes to a file, then the ready line with the URL.
    run.wait_for("kernel started", BOOT_TIMEOUT);
    let ready = run.wait_for("keel: ready after", BOOT_TIMEOUT);
    let port: u16 = ready
        .split("http://127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no URL in {ready:?}"));
    assert!(fetch(port).contains("Hello from a Keel container"));
    let pid = run.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    assert_eq!(run.wait_exit(STEP_TIMEOUT * 2), Some(0), "{:?}", run.seen);

    // The machine remembers: the verdict is in keel's cache.
    let verdicts: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .filter(|text| text.contains("kvm_runs_guests"))
        .collect();
    assert_eq!(verdicts.len(), 1, "{verdicts:?}");
    assert!(
        verdicts[0].contains("\"kvm_runs_guests\":false"),
        "{verdicts:?}"
    );

    // KEEL_ACCEL=kvm: no fallback, and no silent hang either.
    let started = Instant::now();
    let mut forced = KeelRun::start(dir, &qemu, &cache, Some("kvm"));
    assert_ne!(forced.wait_exit(STEP_TIMEOUT), Some(0));
    let error = forced.wait_for("KEEL_ACCEL=kvm forced KVM", Duration::ZERO);
    assert!(error.contains("printed nothing within"), "{error}");
    assert!(
        started.elapsed() < KVM_LIFE_SIGN_TIMEOUT + STEP_TIMEOUT,
        "{:?}",
        started.elapsed()
    );
}
