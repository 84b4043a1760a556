//! End-to-end: real Keel images booted in QEMU. Each test shares one boot between several
//! assertions; the guest's console is printed when one fails (keel-qemu's Vm does it on drop).

use std::time::Duration;

use keel_tests::{BOOT_TIMEOUT, STEP_TIMEOUT, boot, build_host, workspace_root};

/// The number after `key=` in a console line.
fn field(line: &str, key: &str) -> u64 {
    let start = line
        .find(&format!("{key}="))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        + key.len()
        + 1;
    line[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or_else(|_| panic!("bad {key} in {line:?}"))
}

/// The main job: the bundled example boots, serves its page through the published port,
/// and powers off cleanly on the ACPI power button.
#[test]
fn the_example_serves_its_page_and_powers_off_cleanly() {
    let root = workspace_root();
    let out = tempfile::tempdir().unwrap();
    let dir = build_host(&root.join("examples/hello/host.toml"), out.path());
    let mut vm = boot(&dir, &[80]);

    let ready = vm
        .wait_for_line("keel: ready uptime_ms=", BOOT_TIMEOUT)
        .unwrap();
    assert!(field(&ready, "uptime_ms") > 0, "{ready}");

    let expected =
        std::fs::read_to_string(root.join("examples/hello/site/www/index.html")).unwrap();
    let page = vm.http_get(80, "/", STEP_TIMEOUT).unwrap();
    assert_eq!(page.status, 200, "{page:?}");
    assert_eq!(page.body, expected);

    vm.powerdown().unwrap();
    vm.wait_for_line("keel: poweroff clean", STEP_TIMEOUT)
        .unwrap();
    let status = vm.wait_exit(STEP_TIMEOUT).unwrap();
    assert!(status.success(), "QEMU exited with {status:?}");
    // The web server honoured its stop signal: nothing had to be killed.
    let console = vm.console();
    let stopped = console
        .lines()
        .find(|l| l.contains("keel: web: ") && l.ends_with("(stopped)"));
    assert!(
        stopped.is_some(),
        "no stop of web in the console:\n{console}"
    );
    assert!(
        !console.contains("did not stop within") && !console.contains("killing"),
        "the example did not stop cleanly:\n{console}"
    );
}

/// The deeper checks, from inside the guest through the probe container's CGI scripts.
#[test]
fn a_host_is_isolated_supervised_and_reaped() {
    let root = workspace_root();
    let out = tempfile::tempdir().unwrap();
    let dir = build_host(&root.join("tests/hosts/e2e/host.toml"), out.path());
    let mut vm = boot(&dir, &[80, 81]);
    vm.wait_for_line("keel: ready uptime_ms=", BOOT_TIMEOUT)
        .unwrap();
    let get = |port: u16, path: &str| {
        let r = vm
            .http_get(port, path, STEP_TIMEOUT)
            .unwrap_or_else(|e| panic!("GET :{port}{path}: {e}"));
        assert_eq!(r.status, 200, "GET :{port}{path}: {r:?}");
        r.body
    };

    // DHCP from QEMU's user network, applied over netlink.
    let net = get(81, "/cgi-bin/net");
    assert!(net.contains("inet 10.0.2.15/24"), "{net}");
    assert!(net.contains("default via 10.0.2.2 dev eth0"), "{net}");

    // The page is served from the container's overlay (the example's site layer).
    let expected =
        std::fs::read_to_string(root.join("examples/hello/site/www/index.html")).unwrap();
    assert_eq!(get(80, "/"), expected);

    // Namespaces and cgroup of the web container's main process, seen from the host pid ns.
    let started = vm
        .wait_for_line_anywhere("keel: web: started pid=", STEP_TIMEOUT)
        .unwrap();
    let web_pid = field(&started, "pid");
    let ns = get(81, &format!("/cgi-bin/ns?{web_pid}"));
    let value = |key: &str| {
        ns.lines()
            .find_map(|l| l.strip_prefix(&format!("{key} ")))
            .unwrap_or_else(|| panic!("no {key} in {ns}"))
            .to_string()
    };
    assert!(value("init pid").starts_with("pid:["), "{ns}");
    assert_ne!(value("init pid"), value("target pid"), "{ns}");
    assert!(value("target mnt").starts_with("mnt:["), "{ns}");
    assert_ne!(value("init mnt"), value("target mnt"), "{ns}");
    assert!(
        value("target cgroup").ends_with("/web"),
        "web has its own cgroup: {ns}"
    );
    assert_ne!(value("init cgroup"), value("target cgroup"), "{ns}");

    // The limits from the host file, read inside the container from its own cgroup.
    let own = get(80, "/cgi-bin/self");
    assert!(own.contains("memory.max 67108864"), "{own}");
    assert!(own.contains("pids.max 64"), "{own}");
    assert!(
        own.contains("cgroup 0::/\n"),
        "the cgroup namespace is rooted at the container's cgroup: {own}"
    );
    assert!(own.contains("hostname web"), "{own}");
    assert!(
        own.contains("pid1 httpd"),
        "httpd is pid 1 of its own pid namespace: {own}"
    );

    // Killed from outside, the container is restarted (policy "always") and serves again.
    assert!(get(81, &format!("/cgi-bin/kill?{web_pid}")).contains("killed"));
    vm.wait_for_line("keel: web: killed by SIGKILL", STEP_TIMEOUT)
        .unwrap();
    let restarted = vm
        .wait_for_line("keel: web: started pid=", STEP_TIMEOUT)
        .unwrap();
    assert_ne!(field(&restarted, "pid"), web_pid);
    assert_eq!(get(80, "/"), expected);

    // An orphan re-parented to PID 1 is reaped when it exits: no zombie is left.
    let orphan: u64 = get(81, "/cgi-bin/orphan")
        .trim()
        .parse()
        .expect("orphan pid");
    let status = get(81, &format!("/cgi-bin/status?{orphan}"));
    assert!(
        status.contains("PPid:\t1\n"),
        "the orphan now belongs to PID 1: {status}"
    );
    assert!(get(81, "/cgi-bin/release").contains("released"));
    vm.wait_for_line_anywhere(&format!("keel: reaped orphan pid={orphan} "), STEP_TIMEOUT)
        .unwrap();
    assert_eq!(get(81, &format!("/cgi-bin/status?{orphan}")).trim(), "gone");

    // The ACPI power button powers off in order.
    vm.powerdown().unwrap();
    vm.wait_for_line("keel: shutting down for poweroff", STEP_TIMEOUT)
        .unwrap();
    vm.wait_for_line("keel: poweroff clean", Duration::from_secs(90))
        .unwrap();
    let status = vm.wait_exit(STEP_TIMEOUT).unwrap();
    assert!(status.success(), "QEMU exited with {status:?}");
}
