//! End-to-end: a thousand containers on one host. PID 1 raises its own descriptor limit at
//! boot and keeps only the descriptors each running container needs (pidfd, two output
//! pipes, the log file); before, the boot default of 1024 ran out at 165 containers and every
//! later start failed.

use std::fmt::Write;

use keel_tests::{BOOT_TIMEOUT, KeelCli, build_host, vm_config};

const CONTAINERS: usize = 1000;

#[test]
fn a_thousand_containers_all_run() {
    let mut host = String::from(
        r#"
[host]
hostname = "thousand"

[images.box]
layers = ["busybox:/bin/busybox"]
env = ["PATH=/bin"]
"#,
    );
    for i in 0..CONTAINERS {
        write!(
            host,
            "\n[containers.c{i:04}]\nimage = \"box\"\nmemory = \"8M\"\ncommand = [\"sleep\", \"1000000\"]\n"
        )
        .unwrap();
    }
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("host.toml"), host).unwrap();
    let dir = build_host(&work.path().join("host.toml"), &work.path().join("out"));
    let sockets = tempfile::Builder::new()
        .prefix("keel-scale-")
        .tempdir_in("/tmp")
        .unwrap();
    let socket = sockets.path().join("api.sock");
    let mut config = vm_config(&dir, &[]);
    config.api_socket = Some(socket.clone());
    config.memory_mb = 2048;
    config.cpus = 2;
    let vm = keel_qemu::Vm::boot(config).expect("QEMU starts");
    vm.wait_for_line("keel: ready uptime_ms=", BOOT_TIMEOUT * 3)
        .unwrap();
    let pid1 = vm
        .wait_for_line_anywhere("keel: pid1 rss_kb=", BOOT_TIMEOUT)
        .unwrap();
    let fds: usize = pid1
        .split("fds=")
        .nth(1)
        .and_then(|n| n.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no fds= in {pid1:?}"));
    // Four per container (see keel_supervisor::fds), the error pipes of children that have
    // not reached their execve yet when ready is logged (at most one each), and a few dozen
    // of PID 1's own. Before, six per container.
    assert!(fds <= 5 * CONTAINERS + 100, "{pid1}");
    assert!(
        !vm.console().contains("Too many open files"),
        "a start ran out of descriptors"
    );

    let keel = KeelCli::new(socket);
    let statuses = keel.ps();
    assert_eq!(statuses.len(), CONTAINERS);
    let not_running: Vec<_> = statuses
        .iter()
        .filter(|s| s["state"] != "running")
        .map(|s| format!("{} {}", s["name"], s["state"]))
        .collect();
    assert!(not_running.is_empty(), "{not_running:?}");
}
