//! End-to-end: every verb of the control API, driven from the host with the `keel` CLI
//! through the VM's virtio-serial port (what `keel --vm DIR` does, with the socket given
//! directly by `--api-socket`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use keel_qemu::Vm;
use keel_tests::{BOOT_TIMEOUT, STEP_TIMEOUT, bin_dir, build_host};
use serde_json::Value;

const HOST: &str = r#"
[host]
hostname = "control"
stop_timeout = "2s"

[images.box]
layers = ["busybox:/bin/busybox"]
env = ["PATH=/bin"]

[containers.web]
image = "box"
entrypoint = ["/bin/httpd", "-f", "-p", "80", "-h", "/"]
restart = "always"

[containers.sleeper]
image = "box"
entrypoint = ["/bin/sh", "-c", "echo one; echo two; exec sleep 3600"]
restart = "always"
"#;

/// Boots a `keel build` output with its control port on `api_socket`.
fn boot_with_api(dir: &Path, api_socket: &Path) -> Vm {
    let mut config = keel_tests::vm_config(dir, &[]);
    config.api_socket = Some(api_socket.to_path_buf());
    let vm = Vm::boot(config).expect("QEMU starts");
    assert_eq!(vm.api_socket(), api_socket);
    vm
}

struct Keel {
    binary: PathBuf,
    socket: PathBuf,
}

impl Keel {
    /// Runs `keel --api-socket SOCKET ARGS...`, killing it if it takes longer than
    /// STEP_TIMEOUT.
    fn run(&self, args: &[&str]) -> Output {
        let mut child = Command::new(&self.binary)
            .arg("--api-socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running keel");
        let deadline = Instant::now() + STEP_TIMEOUT;
        while child.try_wait().expect("waiting for keel").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let output = child.wait_with_output().expect("keel output");
                panic!(
                    "keel {args:?} did not finish within {STEP_TIMEOUT:?}; stderr:\n{}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().expect("keel output")
    }

    /// Runs a command that must succeed and returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
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

    /// Runs a command that must fail with `code`.
    fn fails(&self, args: &[&str], code: i32) -> String {
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

    fn ps(&self) -> Vec<Value> {
        let text = self.ok(&["ps", "--json"]);
        match serde_json::from_str(&text) {
            Ok(Value::Array(statuses)) => statuses,
            other => panic!("ps --json is not a list: {other:?}\n{text}"),
        }
    }

    fn status(&self, name: &str) -> Value {
        self.ps()
            .into_iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("{name} is not in ps"))
    }

    /// Polls `ps` until `done` holds for `name`'s status, and returns that status.
    fn wait_for(&self, name: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
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

fn running(s: &Value) -> bool {
    s["state"] == "running" && s["pid"].is_i64()
}

#[test]
fn every_verb_works_from_the_host() {
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("host.toml"), HOST).unwrap();
    let dir = build_host(&work.path().join("host.toml"), &work.path().join("out"));
    // A unix socket path must fit in 108 bytes: $TMPDIR may be long, /tmp is not.
    let sockets = tempfile::Builder::new()
        .prefix("keel-control-")
        .tempdir_in("/tmp")
        .unwrap();
    let socket = sockets.path().join("api.sock");
    let mut vm = boot_with_api(&dir, &socket);
    vm.wait_for_line("keel: ready uptime_ms=", BOOT_TIMEOUT)
        .unwrap();
    let keel = Keel {
        binary: bin_dir().join("keel"),
        socket,
    };

    // ps: both services run; the table has the documented columns.
    let web = keel.wait_for("web", "running", running);
    let sleeper = keel.wait_for("sleeper", "running", running);
    assert_eq!(web["kind"], "service");
    let table = keel.ok(&["ps"]);
    let header = table.lines().next().unwrap_or_default();
    for column in [
        "NAME",
        "KIND",
        "STATE",
        "PID",
        "UPTIME",
        "RESTARTS",
        "HEALTH",
        "LAST EXIT",
    ] {
        assert!(header.contains(column), "{table}");
    }
    assert!(table.lines().any(|l| l.starts_with("sleeper ")), "{table}");

    // stop, and it stays stopped; start; starting a running container is a conflict.
    keel.ok(&["stop", "-t", "2", "web"]);
    let stopped = keel.wait_for("web", "stopped", |s| s["state"] == "stopped");
    assert!(stopped["pid"].is_null(), "{stopped}");
    keel.ok(&["start", "web"]);
    let web = keel.wait_for("web", "running again", running);
    keel.fails(&["start", "web"], 4);

    // restart gives a new process.
    keel.ok(&["restart", "web"]);
    let old_pid = web["pid"].clone();
    keel.wait_for("web", "a new pid", |s| running(s) && s["pid"] != old_pid);

    // A SIGKILL is an exit like any other: restart = "always" brings it back.
    keel.ok(&["kill", "-s", "KILL", "sleeper"]);
    let restarted = keel.wait_for("sleeper", "restarted by its policy", |s| {
        running(s) && s["pid"] != sleeper["pid"] && s["restarts"].as_u64() >= Some(1)
    });
    assert!(
        restarted["last_exit"]
            .as_str()
            .is_some_and(|e| e.contains("KILL") || e.contains('9')),
        "{restarted}"
    );

    // inspect: JSON with the configuration.
    let inspect: Value = serde_json::from_str(&keel.ok(&["inspect", "web"])).unwrap();
    assert_eq!(inspect["name"], "web", "{inspect}");
    assert!(!inspect["config"].is_null(), "{inspect}");
    keel.fails(&["inspect", "nosuch"], 3);

    // stats: cgroup counters.
    let stats: Value = serde_json::from_str(&keel.ok(&["stats", "web", "--json"])).unwrap();
    let memory = stats[0]["memory_current"].as_u64();
    assert!(memory.is_some_and(|m| m > 0), "{stats}");
    let table = keel.ok(&["stats"]);
    assert!(table.starts_with("NAME "), "{table}");

    // logs: the last line of the sleeper's output (it prints it again on each restart).
    // Its restart may still be printing: its stdout ends with "two" once it has.
    let deadline = Instant::now() + STEP_TIMEOUT;
    while keel.ok(&["logs", "sleeper", "--tail", "1"]) != "two\n" {
        assert!(Instant::now() < deadline, "the log never ended in \"two\"");
        std::thread::sleep(Duration::from_millis(200));
    }
    let all = keel.ok(&["logs", "sleeper"]);
    assert!(all.starts_with("one\ntwo\n"), "{all}");
    assert_eq!(
        keel.ok(&[
            "logs",
            "sleeper",
            "--since",
            "2000-01-01T00:00:00Z",
            "--tail",
            "2"
        ]),
        "one\ntwo\n"
    );
    keel.fails(&["logs", "nosuch"], 3);

    // exec: output and exit code.
    assert_eq!(keel.ok(&["exec", "web", "--", "echo", "hi"]), "hi\n");
    let output = keel.run(&[
        "exec",
        "web",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ]);
    assert_eq!(output.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&output.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&output.stderr), "err\n");
    keel.fails(&["exec", "nosuch", "--", "true"], 3);

    // poweroff: an orderly shutdown, and QEMU exits 0.
    keel.ok(&["poweroff"]);
    vm.wait_for_line("keel: poweroff clean", STEP_TIMEOUT)
        .unwrap();
    let status = vm.wait_exit(STEP_TIMEOUT).unwrap();
    assert!(status.success(), "QEMU exited with {status:?}");
}

/// The socket `keel run DIR` would use, to document the `--vm` mapping in a test.
#[test]
fn vm_dir_means_its_api_socket() {
    let keel = bin_dir().join("keel");
    let output = Command::new(keel)
        .args(["--vm", "/nonexistent/out", "ps"])
        .output()
        .expect("running keel");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("/nonexistent/out/api.sock") && stderr.contains("keel run"),
        "{stderr}"
    );
}
