//! End-to-end: every verb of the control API, driven from the host with the `keel` CLI
//! through the VM's virtio-serial port (what `keel --vm DIR` does, with the socket given
//! directly by `--api-socket`).

use std::process::Command;
use std::time::{Duration, Instant};

use keel_tests::{
    BOOT_TIMEOUT, KeelCli, STEP_TIMEOUT, bin_dir, boot_with_api, build_host, running,
};
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
    let keel = KeelCli::new(socket);

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
