//! End-to-end: a privileged container sees the host's devices in a /dev of its own. Two of
//! them, each restarted twice, keep running, and the host's /dev is the same afterwards
//! (before, they shared the host's devtmpfs: the first one's /dev/fd link landed in it and
//! every later start failed with "File exists").

use keel_tests::{boot_ready, running};
use serde_json::Value;

const HOST: &str = r#"
[host]
hostname = "privileged"
stop_timeout = "2s"

[images.box]
layers = ["busybox:/bin/busybox"]
env = ["PATH=/bin"]

[containers.p1]
image = "box"
privileged = true
network = "none"
init = true
command = ["sleep", "1000000"]

[containers.p2]
image = "box"
privileged = true
network = "none"
init = true
command = ["sleep", "1000000"]

# Looks at PID 1's own /dev through /proc/1/root (host pid namespace, all capabilities).
[containers.observer]
image = "box"
privileged = true
pid = "host"
network = "none"
init = true
command = ["sleep", "1000000"]
"#;

#[test]
fn privileged_containers_restart_and_leave_the_host_dev_alone() {
    let host = boot_ready(HOST);
    let keel = &host.keel;
    for name in ["p1", "p2", "observer"] {
        keel.wait_for(name, "running", running);
    }
    let host_dev = || {
        keel.ok(&[
            "exec",
            "observer",
            "--",
            "sh",
            "-c",
            "cd /proc/1/root/dev && find . -maxdepth 2 | sort",
        ])
    };
    let before = host_dev();
    assert!(before.contains("./vda\n"), "{before}");
    assert!(
        !before.contains("./fd\n"),
        "the host's /dev has container links: {before}"
    );

    // The host's devices, as device nodes of the container's own /dev, with its own links.
    let vda = keel.ok(&["exec", "p1", "--", "ls", "-l", "/dev/vda"]);
    assert!(vda.starts_with('b'), "{vda}");
    keel.ok(&["exec", "p1", "--", "ls", "/dev/fd/"]);
    keel.ok(&["exec", "p1", "--", "touch", "/dev/keel-marker"]);

    for name in ["p1", "p2"] {
        for _ in 0..2 {
            let old = keel.status(name)["pid"].clone();
            keel.ok(&["restart", name]);
            keel.wait_for(name, "a new run", |s: &Value| running(s) && s["pid"] != old);
        }
        // `keel restart` is no failure: the restart policy's counter stays.
        let status = keel.status(name);
        assert_eq!(status["restarts"], 0, "{status}");
    }
    // Each run has a fresh /dev: the marker went with p1's first run.
    keel.fails(&["exec", "p1", "--", "ls", "/dev/keel-marker"], 1);
    assert_eq!(host_dev(), before, "the host's /dev changed");
}
