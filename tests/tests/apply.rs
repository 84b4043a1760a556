//! End-to-end: `keel apply` changes a running host without a reboot. Only the containers
//! whose definition changed are touched: the others keep their process and uptime. A file
//! that is invalid or cannot be applied live is refused whole and nothing changes.

use std::path::Path;
use std::time::{Duration, Instant};

use keel_api::ErrorCode;
use keel_tests::{BOOT_TIMEOUT, KeelCli, STEP_TIMEOUT, boot_with_api, build_host, running};
use serde_json::Value;

const HOST: &str = r#"
[host]
hostname = "apply"
stop_timeout = "2s"

[images.box]
layers = ["busybox:/bin/busybox"]
env = ["PATH=/bin"]

[containers.a]
image = "box"
entrypoint = ["/bin/sh", "-c", "echo a up; exec sleep 3600"]

[containers.b]
image = "box"
entrypoint = ["/bin/sh", "-c", "echo b mode=$MODE; exec sleep 3600"]
env = { MODE = "one" }

[containers.c]
image = "box"
entrypoint = ["/bin/sh", "-c", "exec sleep 3600"]
"#;

/// HOST with b's environment changed, c removed and d (which waits for b) added.
fn changed() -> String {
    HOST.replace("MODE = \"one\"", "MODE = \"two\"").replace(
        "[containers.c]\nimage = \"box\"\nentrypoint = [\"/bin/sh\", \"-c\", \"exec sleep 3600\"]\n",
        "[containers.d]\nimage = \"box\"\nentrypoint = [\"/bin/sh\", \"-c\", \"echo d up; exec sleep 3600\"]\ndepends_on = [\"b\"]\n",
    )
}

/// The same process, still running, never restarted, and older than before.
fn untouched(before: &Value, after: &Value) {
    assert!(running(after), "{after}");
    assert_eq!(after["pid"], before["pid"], "{before} -> {after}");
    assert_eq!(after["restarts"], 0, "{after}");
    assert!(
        after["uptime_ms"].as_u64() > before["uptime_ms"].as_u64(),
        "{before} -> {after}"
    );
}

/// A host file in the work directory.
fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn apply_changes_one_container_and_leaves_the_others_running() {
    let work = tempfile::tempdir().unwrap();
    let host = write(work.path(), "host.toml", HOST);
    let dir = build_host(Path::new(&host), &work.path().join("out"));
    // A unix socket path must fit in 108 bytes: $TMPDIR may be long, /tmp is not.
    let sockets = tempfile::Builder::new()
        .prefix("keel-apply-")
        .tempdir_in("/tmp")
        .unwrap();
    let socket = sockets.path().join("api.sock");
    let mut vm = boot_with_api(&dir, &socket);
    vm.wait_for_line("keel: ready uptime_ms=", BOOT_TIMEOUT)
        .unwrap();
    let keel = KeelCli::new(&socket);
    for name in ["a", "b", "c"] {
        keel.wait_for(name, "running", running);
    }
    let a = keel.status("a");
    let b = keel.status("b");

    // A dry run says what would happen and changes nothing.
    let next = write(work.path(), "next.toml", &changed());
    let plan = keel.ok(&["apply", &next, "--dry-run"]);
    for line in [
        "a          unchanged",
        "b          would restart (changed)",
        "c          would be removed",
        "d          would be added",
        "dry run, nothing changed: 1 added, 1 removed, 1 restarted",
    ] {
        assert!(plan.contains(line), "{line:?} not in:\n{plan}");
    }
    assert_eq!(keel.names(), ["a", "b", "c"]);
    assert_eq!(keel.status("b")["pid"], b["pid"]);

    // The apply: its answer comes once c and the old b have stopped and the new ones started.
    let output = keel.run(&["apply", &next]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}{stderr}");
    for line in [
        "a          unchanged",
        "b          restarted (changed)",
        "c          removed",
        "d          added",
        "applied: 1 added, 1 removed, 1 restarted, 0 updated in place, 1 unchanged",
    ] {
        assert!(stdout.contains(line), "{line:?} not in:\n{stdout}");
    }
    // No data disk: /var is a tmpfs, so the applied file is live only.
    assert!(
        stderr.contains("warning: not kept for the next boot"),
        "{stderr}"
    );
    untouched(&a, &keel.status("a"));
    assert_eq!(keel.names(), ["a", "b", "d"]);
    let new_b = keel.wait_for("b", "its new process", |s| {
        running(s) && s["pid"] != b["pid"]
    });
    assert_eq!(new_b["restarts"], 0, "a new container: {new_b}");
    assert_eq!(
        keel.ok(&["exec", "b", "--", "sh", "-c", "echo $MODE"]),
        "two\n"
    );
    keel.wait_for("d", "running", running);
    let deadline = Instant::now() + STEP_TIMEOUT;
    while !keel.ok(&["logs", "b"]).contains("b mode=two") {
        assert!(Instant::now() < deadline, "b never logged its new mode");
        std::thread::sleep(Duration::from_millis(200));
    }
    vm.wait_for_line("c: removed (keel apply)", STEP_TIMEOUT)
        .unwrap();

    // Refused whole, nothing changes. An unknown key is caught here, before the host...
    let before: Vec<Value> = keel.ps();
    let typo = write(
        work.path(),
        "typo.toml",
        &changed().replace("stop_timeout = \"2s\"", "stop_timeout = \"2s\"\nbogus = 1"),
    );
    let err = keel.fails(&["apply", &typo], 2);
    assert!(
        err.contains("typo.toml:5:1") && err.contains("bogus"),
        "{err}"
    );
    // ... and by the host too, for any client.
    let mut client = keel_api::Client::connect_unix(&socket).unwrap();
    let e = client
        .apply("[host]\nhostname = \"apply\"\nbogus = 1\n", false)
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::BadRequest, "{e}");
    assert!(
        e.message.contains("apply:HOST.toml:3:1") && e.message.contains("nothing was changed"),
        "{e}"
    );
    drop(client);
    // A valid file the host cannot follow: an image it does not have, a new hostname.
    let impossible = write(
        work.path(),
        "impossible.toml",
        &changed()
            .replace("hostname = \"apply\"", "hostname = \"renamed\"")
            .replace(
                "[containers.d]\nimage = \"box\"",
                "[images.ghost]\nlayout = \"/nonexistent\"\n\n[containers.d]\nimage = \"ghost\"",
            ),
    );
    let err = keel.fails(&["apply", &impossible], 2);
    for part in [
        "host.hostname:",
        "images.ghost: image `ghost` is not on this host",
        "nothing was changed",
    ] {
        assert!(err.contains(part), "{part:?} not in:\n{err}");
    }
    let after = keel.ps();
    assert_eq!(after.len(), before.len());
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(a["name"], b["name"]);
        untouched(b, a);
    }

    // Applying the file in force again changes nothing.
    let same = keel.ok(&["apply", &next]);
    assert!(
        same.contains("applied: 0 added, 0 removed, 0 restarted, 0 updated in place, 3 unchanged"),
        "{same}"
    );

    keel.ok(&["poweroff"]);
    vm.wait_for_line("keel: poweroff clean", STEP_TIMEOUT)
        .unwrap();
    let status = vm.wait_exit(STEP_TIMEOUT).unwrap();
    assert!(status.success(), "QEMU exited with {status:?}");
}
