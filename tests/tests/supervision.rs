//! End-to-end supervision: one boot of tests/hosts/supervision/host.toml, asserted from the
//! guest console (PID 1's `keel:` lines and the containers' `[name]` lines).

use std::time::Duration;

use std::ops::ControlFlow;

use keel_api::{Client, LogEntry, Stream};
use keel_tests::{BOOT_TIMEOUT, STEP_TIMEOUT, boot, build_host, workspace_root};

/// Every log entry of a container, through the control API on the VM's virtio-serial port.
fn logs(vm: &keel_qemu::Vm, name: &str, tail: Option<u64>) -> Vec<LogEntry> {
    let mut client = Client::connect_unix(vm.api_socket()).expect("API socket");
    let mut entries = Vec::new();
    client
        .logs(name, false, None, tail, |e| {
            entries.push(e);
            ControlFlow::Continue(())
        })
        .unwrap_or_else(|e| panic!("logs {name}: {e}"));
    entries
}

/// Position of the first console line containing `needle`.
fn position(console: &str, needle: &str) -> usize {
    console
        .lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in the console"))
}

fn count(console: &str, needle: &str) -> usize {
    console.lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn tasks_dependencies_policies_health_stops_and_faults() {
    let root = workspace_root();
    let out = tempfile::tempdir().unwrap();
    let dir = build_host(&root.join("tests/hosts/supervision/host.toml"), out.path());
    let mut vm = boot(&dir, &[80]);
    vm.wait_for_line_anywhere("keel: ready uptime_ms=", BOOT_TIMEOUT)
        .unwrap();

    // Boot tasks ran in file order before any service; a failing one with
    // on_failure = "continue" is reported and the boot goes on.
    vm.wait_for_line_anywhere("keel: boot tasks done; starting services", STEP_TIMEOUT)
        .unwrap();
    let c = vm.console();
    assert!(position(&c, "[migrate] migrate: ran") < position(&c, "keel: seed: started"));
    assert!(position(&c, "[seed] seed: failing") < position(&c, "boot tasks done"));
    assert!(
        c.contains("onboot task seed failed; continuing"),
        "the failure is reported"
    );
    assert!(position(&c, "boot tasks done") < position(&c, "keel: flaky: started"));

    // web waits for db to be healthy, db for migrate to have completed.
    vm.wait_for_line_anywhere("keel: web: started pid=", STEP_TIMEOUT)
        .unwrap();
    let c = vm.console();
    assert!(
        position(&c, "keel: db: healthy") < position(&c, "keel: web: started pid="),
        "web started before db was healthy"
    );
    let page = vm.http_get(80, "/", STEP_TIMEOUT).unwrap();
    assert_eq!(page.status, 200);

    // on-failure:2 runs three times, then gives up, loudly.
    vm.wait_for_line_anywhere("flaky: gave up after 3 failed runs", STEP_TIMEOUT)
        .unwrap();
    let c = vm.console();
    assert_eq!(count(&c, "keel: flaky: exited with code 1"), 3, "{c}");
    // restart = "no": one run, its code reported.
    vm.wait_for_line_anywhere("keel: once: exited with code 7", STEP_TIMEOUT)
        .unwrap();
    assert_eq!(count(&vm.console(), "keel: once: started"), 1);

    // always: an instant-exit loop backs off, doubling from 100 ms.
    vm.wait_for_line_anywhere("looper: restarting in 800 ms (restart #4)", STEP_TIMEOUT)
        .unwrap();
    let c = vm.console();
    for (n, ms) in [(1, 100), (2, 200), (3, 400), (4, 800)] {
        assert!(
            c.contains(&format!("looper: restarting in {ms} ms (restart #{n})")),
            "restart #{n} after {ms} ms:\n{c}"
        );
    }

    // The same backoff, from the timestamps PID 1 wrote into looper's log: the gap between
    // two exits is the delay plus one (short) run; emulation may add, never subtract. The
    // fifth exit (the end of the last gap) is logged before restart #5 is announced.
    vm.wait_for_line_anywhere("looper: restarting in 1600 ms (restart #5)", STEP_TIMEOUT)
        .unwrap();
    let exits: Vec<u64> = logs(&vm, "looper", None)
        .into_iter()
        .filter(|e| e.stream == Stream::Keel && e.line.starts_with("exited with code 0"))
        .map(|e| e.ts_ms)
        .collect();
    assert!(exits.len() >= 5, "{exits:?}");
    for (i, delay) in [100u64, 200, 400, 800].into_iter().enumerate() {
        let gap = exits[i + 1] - exits[i];
        assert!(
            gap + 20 >= delay && gap < delay + 2000,
            "exit {} -> {}: {gap} ms for a {delay} ms backoff ({exits:?})",
            i + 1,
            i + 2
        );
    }

    // A failing health check makes it unhealthy, and restart_on_unhealthy restarts it.
    let restarted = vm
        .wait_for_line_anywhere("; restarting as requested", STEP_TIMEOUT)
        .unwrap();
    assert!(restarted.starts_with("keel: sick: "), "{restarted}");
    let c = vm.console();
    assert!(
        position(&c, "keel: sick: healthy") < position(&c, "sick: unhealthy after 2 failed checks")
    );
    assert!(c.contains("sick: restarting because it is unhealthy"));

    // Faults around a web server: 10 000 zombies, a log flood, a closed stdout. PID 1
    // keeps serving and web keeps its first run. Forking 10 000 shells takes a while
    // under emulation.
    vm.wait_for_line_anywhere("[zombies] zombies: made", BOOT_TIMEOUT)
        .unwrap();
    vm.wait_for_line_anywhere("keel: flood: exited with code 0", STEP_TIMEOUT)
        .unwrap();
    assert_eq!(vm.http_get(80, "/", STEP_TIMEOUT).unwrap().status, 200);
    let c = vm.console();
    assert_eq!(
        count(&c, "keel: web: started pid="),
        1,
        "web was restarted:\n{c}"
    );
    assert!(
        !c.contains("[flood] flood line"),
        "console = false keeps the flood off the console"
    );
    assert!(
        !c.contains("keel: mute: exited"),
        "a closed stdout does not end the container"
    );
    // The flood was rotated away: the log holds its end, not its 20 000 lines.
    let flood = logs(&vm, "flood", None);
    assert!(
        flood.len() < 20_000 && flood.len() > 100,
        "{} entries",
        flood.len()
    );
    assert!(
        flood
            .iter()
            .any(|e| e.stream == Stream::Stderr && e.line == "flood: done")
    );
    assert!(flood.iter().any(|e| e.line == "flood line 19999"));
    assert!(
        !flood.iter().any(|e| e.line == "flood line 0"),
        "the oldest lines were rotated out"
    );
    // The host still answers, and web has been up since its first start.
    let mut client = Client::connect_unix(vm.api_socket()).unwrap();
    let ps = client.ps().unwrap();
    let web = ps.iter().find(|s| s.name == "web").expect("web in ps");
    assert_eq!((web.state.as_str(), web.restarts), ("running", 0), "{ps:?}");
    assert!(
        ps.iter()
            .any(|s| s.name == "zombies" && s.state == "running"),
        "{ps:?}"
    );

    // Orderly shutdown: dependents first, the stop signal honoured, the stubborn one
    // killed at its deadline, then the onshutdown task.
    vm.powerdown().unwrap();
    vm.wait_for_line_anywhere("keel: poweroff clean", Duration::from_secs(90))
        .unwrap();
    let c = vm.console();
    assert!(
        c.contains("[graceful] graceful: got INT"),
        "SIGINT was the stop signal"
    );
    assert!(c.contains("stubborn: did not stop within 1000 ms: killing its cgroup"));
    let stopped = |name: &str| position(&c, &format!("keel: {name}: stopping"));
    assert!(
        stopped("web") < stopped("db"),
        "web depends on db, so it stops first"
    );
    assert!(
        position(&c, "services stopped; running onshutdown tasks")
            < position(&c, "[backup] backup: ran at shutdown")
    );
    let status = vm.wait_exit(STEP_TIMEOUT).unwrap();
    assert!(status.success(), "QEMU exited with {status:?}");
}
