//! End-to-end: issue 3's isolation and resource limits, seen from inside the containers of a
//! booted host (tests/hosts/isolation/).
//!
//! One boot carries the escape suite (tests/escape, run in a default `jail` and in a
//! `privileged` container) and the resource checks; user namespaces get a boot of their own so
//! that the rest can pass without them. The checks of the shared boot are independent, so each
//! failure is collected and all are reported together: one run then shows the whole state of
//! the runtime, not just its first gap.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use keel_qemu::{QemuError, Vm};
use keel_tests::{BOOT_TIMEOUT, STEP_TIMEOUT, bin_dir, boot, build_host, workspace_root};

/// Every attempt of the escape program, in its order.
const ATTEMPTS: [&str; 21] = [
    "mount",
    "unshare-user",
    "unshare-net",
    "ptrace",
    "read-kcore",
    "sys-firmware",
    "write-proc-sys",
    "sysrq-trigger",
    "load-module",
    "reboot",
    "raw-socket",
    "mknod-block",
    "dev-mem",
    "keyctl",
    "io-uring",
    "setuid-nnp",
    "inherited-fd",
    "volume-mknod",
    "tmpfs-mknod",
    "init-overwrite",
    "api-socket",
];

/// What a privileged container must get through. The others depend on the guest (is there a
/// /dev/mem, a disk to mknod, a leaked fd?), not on the container's privileges.
const PRIVILEGED_GETS_THROUGH: [&str; 14] = [
    "mount",
    "unshare-user",
    "unshare-net",
    "read-kcore",
    "sys-firmware",
    "write-proc-sys",
    "load-module",
    "reboot",
    "raw-socket",
    "keyctl",
    "io-uring",
    "setuid-nnp",
    "volume-mknod",
    "tmpfs-mknod",
];

/// What CAP_SYS_ADMIN must still not get through: it may mount a tmpfs without nodev, but
/// the device policy refuses the nodes there; /dev/init and the API stay closed.
const SYSADMIN_BLOCKED: [&str; 7] = [
    "mknod-block",
    "dev-mem",
    "volume-mknod",
    "tmpfs-mknod",
    "init-overwrite",
    "api-socket",
    "inherited-fd",
];

/// The containers that must block every attempt: the default one, and the same in a user
/// namespace of its own.
const JAILS: [&str; 2] = ["jail", "jail-userns"];

/// The spin loop is throttled to a fifth of a CPU, and under TCG the CPU is slow to begin with.
const SPIN_TIMEOUT: Duration = Duration::from_secs(300);

/// How long a container's output may trail PID 1's log of its exit: both reach the console
/// through PID 1, the output through a pipe that is drained separately.
const OUTPUT_GRACE: Duration = Duration::from_secs(5);

/// Failures of independent checks, reported together at the end.
#[derive(Default)]
struct Checks {
    failures: Vec<String>,
}

impl Checks {
    fn fail(&mut self, message: impl Into<String>) {
        self.failures.push(message.into());
    }

    fn check(&mut self, ok: bool, message: impl FnOnce() -> String) {
        if !ok {
            self.fail(message());
        }
    }

    fn finish(self) {
        assert!(
            self.failures.is_empty(),
            "{} check(s) failed:\n\n{}",
            self.failures.len(),
            self.failures.join("\n\n")
        );
    }
}

/// The message of a line PID 1 logged about `container`: `keel: [error: |warning: ]NAME: ...`.
fn pid1_message<'a>(line: &'a str, container: &str) -> Option<&'a str> {
    let (_, rest) = line.split_once("keel: ")?;
    let rest = ["error: ", "warning: "]
        .iter()
        .find_map(|level| rest.strip_prefix(level))
        .unwrap_or(rest);
    rest.strip_prefix(container)?.strip_prefix(": ")
}

/// The lines PID 1 logged about `container`, for failure messages.
fn pid1_lines(console: &str, container: &str) -> String {
    let lines: Vec<&str> = console
        .lines()
        .filter(|l| pid1_message(l, container).is_some())
        .collect();
    if lines.is_empty() {
        format!("(PID 1 logged nothing about {container})")
    } else {
        lines.join("\n")
    }
}

/// The lines `container` printed, for failure messages.
fn output_lines(console: &str, container: &str) -> String {
    let prefix = format!("[{container}] ");
    let lines: Vec<&str> = console.lines().filter(|l| l.contains(&prefix)).collect();
    if lines.is_empty() {
        format!("({container} printed nothing)")
    } else {
        lines.join("\n")
    }
}

/// Whether PID 1 logged that `container` stopped, however it did.
fn stopped(console: &str, container: &str) -> bool {
    console.lines().any(|l| {
        pid1_message(l, container).is_some_and(|m| {
            ["exited", "killed", "out of memory", "failed"]
                .iter()
                .any(|how| m.contains(how))
        })
    })
}

/// Waits for a console line containing `needle`, which `container` prints or PID 1 logs about
/// it; gives up early once the container has stopped without it.
fn wait_output(
    vm: &Vm,
    container: &str,
    needle: &str,
    timeout: Duration,
) -> Result<String, String> {
    let start = Instant::now();
    let mut stopped_at = None;
    loop {
        // Short waits on the console itself, so that a stop is noticed between them.
        match vm.wait_for_line_anywhere(needle, Duration::from_millis(500)) {
            Ok(line) => return Ok(line),
            Err(QemuError::LineTimeout { .. }) => {}
            Err(e) => return Err(e.to_string()),
        }
        let console = vm.console();
        if stopped_at.is_none() && stopped(&console, container) {
            stopped_at = Some(Instant::now());
        }
        let why = if stopped_at.is_some_and(|t| t.elapsed() >= OUTPUT_GRACE) {
            format!("{container} stopped without it")
        } else if start.elapsed() >= timeout {
            format!("not within {timeout:?}")
        } else {
            continue;
        };
        return Err(format!(
            "no console line containing {needle:?}: {why}\n{}\n{}",
            pid1_lines(&console, container),
            output_lines(&console, container)
        ));
    }
}

/// The number after `key=` in a line.
fn field(line: &str, key: &str) -> Option<u64> {
    let start = line.find(&format!("{key}="))? + key.len() + 1;
    line[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()
}

struct Attempt {
    allowed: bool,
    detail: String,
}

/// What one container's run of the escape program printed.
struct EscapeReport {
    container: &'static str,
    attempts: BTreeMap<String, Attempt>,
    done: Option<String>,
}

impl EscapeReport {
    fn parse(console: &str, container: &'static str) -> EscapeReport {
        let prefix = format!("[{container}] escape: ");
        let mut report = EscapeReport {
            container,
            attempts: BTreeMap::new(),
            done: None,
        };
        for line in console.lines() {
            // Not anchored at the start: a kernel message (the privileged run's SysRq help)
            // may land on the same console line.
            let Some(at) = line.find(&prefix) else {
                continue;
            };
            let rest = line[at + prefix.len()..].trim_end();
            if let Some(done) = rest.strip_prefix("done ") {
                report.done = Some(done.to_string());
                continue;
            }
            let Some((name, rest)) = rest.split_once(' ') else {
                continue;
            };
            let (allowed, detail) = if let Some(d) = rest.strip_prefix("ALLOWED") {
                (true, d)
            } else if let Some(d) = rest.strip_prefix("blocked") {
                (false, d)
            } else {
                continue;
            };
            let detail = detail.trim();
            let detail = detail
                .strip_prefix('(')
                .and_then(|d| d.strip_suffix(')'))
                .unwrap_or(detail);
            report.attempts.insert(
                name.to_string(),
                Attempt {
                    allowed,
                    detail: detail.to_string(),
                },
            );
        }
        report
    }

    fn table(&self) -> String {
        let mut out = format!("{}:\n", self.container);
        for name in ATTEMPTS {
            let _ = match self.attempts.get(name) {
                Some(a) => writeln!(
                    out,
                    "  {name:<15} {:<8} {}",
                    if a.allowed { "ALLOWED" } else { "blocked" },
                    a.detail
                ),
                None => writeln!(out, "  {name:<15} (no line)"),
            };
        }
        let _ = writeln!(
            out,
            "  done            {}",
            self.done.as_deref().unwrap_or("(no line)")
        );
        out
    }
}

/// Every attempt fails in the default containers (with and without a user namespace); the
/// privileged one gets through the same doors, so a blocked attempt is a wall and not a
/// broken attempt; CAP_SYS_ADMIN still does not reach the devices, /dev/init or the API.
fn escape_suite(vm: &Vm, checks: &mut Checks) {
    let mut problems = Vec::new();
    for container in JAILS.iter().chain(&["privileged", "sysadmin"]) {
        let needle = format!("[{container}] escape: done");
        if let Err(e) = wait_output(vm, container, &needle, STEP_TIMEOUT) {
            problems.push(format!(
                "{container}: the escape program did not finish: {e}"
            ));
        }
    }
    let console = vm.console();
    let mut tables = String::new();
    for jail in JAILS {
        let report = EscapeReport::parse(&console, jail);
        for name in ATTEMPTS {
            match report.attempts.get(name) {
                Some(a) if a.allowed => {
                    problems.push(format!("{jail}: {name} got through: {}", a.detail))
                }
                Some(_) => {}
                None => problems.push(format!("{jail}: no result for {name}")),
            }
        }
        let done = report.done.as_deref().unwrap_or_default();
        if field(done, "allowed") != Some(0)
            || field(done, "blocked") != Some(ATTEMPTS.len() as u64)
        {
            problems.push(format!(
                "{jail}: expected `done blocked={} allowed=0`, got {:?}",
                ATTEMPTS.len(),
                report.done
            ));
        }
        tables.push_str(&report.table());
    }
    let privileged = EscapeReport::parse(&console, "privileged");
    for name in PRIVILEGED_GETS_THROUGH {
        match privileged.attempts.get(name) {
            Some(a) if a.allowed => {}
            Some(a) => problems.push(format!("privileged: {name} was blocked: {}", a.detail)),
            None => problems.push(format!("privileged: no result for {name}")),
        }
    }
    let sysadmin = EscapeReport::parse(&console, "sysadmin");
    for name in SYSADMIN_BLOCKED {
        match sysadmin.attempts.get(name) {
            Some(a) if a.allowed => {
                problems.push(format!("sysadmin: {name} got through: {}", a.detail))
            }
            Some(_) => {}
            None => problems.push(format!("sysadmin: no result for {name}")),
        }
    }
    tables.push_str(&privileged.table());
    tables.push_str(&sysadmin.table());
    // The figures for the record: shown with --nocapture, and with any failure.
    eprintln!("{tables}");
    if !problems.is_empty() {
        checks.fail(format!(
            "escape suite:\n  {}\n\n{tables}",
            problems.join("\n  "),
        ));
    }
}

/// A container sharing the host's pid namespace signals PID 1: PID 1 logs that it ignored
/// each signal and names the container, and the host stays up (the checks after this one
/// need it).
fn host_pid_signals(vm: &Vm, checks: &mut Checks) {
    if let Err(e) = wait_output(vm, "hostpid", "[hostpid] escape: signal-pid1", STEP_TIMEOUT) {
        return checks.fail(format!("hostpid: did not signal PID 1: {e}"));
    }
    for signal in ["SIGUSR1", "SIGTERM"] {
        let needle = format!("keel: warning: ignored {signal} from pid");
        match vm.wait_for_line_anywhere(&needle, STEP_TIMEOUT) {
            Ok(line) => checks.check(line.contains("container hostpid"), || {
                format!("hostpid: PID 1 did not name the container: {line}")
            }),
            Err(e) => checks.fail(format!(
                "hostpid: PID 1 did not log that it ignored {signal}: {e}\n{}",
                output_lines(&vm.console(), "hostpid")
            )),
        }
    }
    let console = vm.console();
    checks.check(!console.contains("keel: stats pid1"), || {
        "hostpid: PID 1 obeyed a container's SIGUSR1 (it logged its statistics)".into()
    });
    checks.check(!console.contains("shutting down for"), || {
        "hostpid: PID 1 obeyed a container's SIGTERM and shut down".into()
    });
}

/// A mount target behind a symlink another container swapped into a shared volume resolves
/// inside the container's root: the victim starts, and nothing appears in the host's /dev.
fn symlink_swap(vm: &Vm, checks: &mut Checks) {
    if let Err(e) = wait_output(vm, "victim", "[victim] victim: started", STEP_TIMEOUT) {
        return checks.fail(format!(
            "victim: did not start beside the swapped symlink: {e}\n{}",
            output_lines(&vm.console(), "swapper")
        ));
    }
    match wait_output(vm, "hostview", "[hostview] hostview: host", STEP_TIMEOUT) {
        Ok(line) => checks.check(line.trim_end().ends_with("absent"), || {
            format!("the victim's tmpfs target resolved on the host: {line}")
        }),
        Err(e) => checks.fail(format!("hostview: {e}")),
    }
}

/// The bomb image's layer is refused by the unpacker, with the image, the layer and the
/// limit named, while PID 1 goes on: the API answers and the web container serves.
fn bomb_layer(vm: &Vm, checks: &mut Checks) {
    let refusal =
        match vm.wait_for_line_anywhere("unpacking image bomb: layer sha256:", STEP_TIMEOUT) {
            Ok(line) => line,
            Err(e) => return checks.fail(format!("bomb-image: no refusal of the bomb layer: {e}")),
        };
    checks.check(
        refusal.contains("more than the limit of 67108864 bytes (max_unpacked_size)"),
        || format!("bomb-image: the refusal does not name the limit: {refusal}"),
    );
    match vm.wait_for_line_anywhere(
        "keel: error: bomb-image: cannot be started: unpacking image bomb",
        STEP_TIMEOUT,
    ) {
        Ok(_) => {}
        Err(e) => checks.fail(format!("bomb-image: PID 1 did not fail the container: {e}")),
    }
    let api = keel_api::Client::connect_unix(vm.api_socket()).and_then(|mut client| {
        client.set_timeout(Some(STEP_TIMEOUT))?;
        client.ps()
    });
    match api {
        Ok(ps) => checks.check(
            ps.iter()
                .any(|c| c.name == "bomb-image" && c.state == "failed"),
            || format!("bomb-image is not failed in ps: {ps:?}"),
        ),
        Err(e) => checks.fail(format!("the API does not answer beside the bomb: {e}")),
    }
    match vm.http_get(80, "/", STEP_TIMEOUT) {
        Ok(r) if r.status == 200 => {}
        other => checks.fail(format!("web does not serve beside the bomb: {other:?}")),
    }
}

/// Every copy of the host file PID 1 keeps is 0600: it may hold registry passwords. PID 1's
/// memory.min, the containers' pids.max and the unpacker's memory.max are set.
fn host_file_modes(vm: &Vm, checks: &mut Checks) {
    match wait_output(vm, "modes", "[modes] modes: host.toml=", STEP_TIMEOUT) {
        Ok(line) => checks.check(line.trim_end().ends_with("host.toml=600"), || {
            format!("/run/keel/host.toml is not 0600: {line}")
        }),
        Err(e) => checks.fail(format!("modes: {e}")),
    }
    // PID 1 keeps memory and tasks no container can take, and the unpacker is bounded.
    match wait_output(vm, "modes", "[modes] modes: init memory.min=", STEP_TIMEOUT) {
        Ok(line) => {
            let number = |key: &str| field(&line, key);
            checks.check(
                number("memory.min").is_some_and(|n| n > 0)
                    && number("pids.max").is_some_and(|n| n > 0)
                    && number("unpack memory.max").is_some_and(|n| n > 0),
                || format!("PID 1's protections are not set: {line}"),
            );
        }
        Err(e) => checks.fail(format!("modes: {e}")),
    }
    // Docker's open-files limit, which images such as redis expect.
    match wait_output(vm, "modes", "[modes] modes: nofile=", STEP_TIMEOUT) {
        Ok(line) => checks.check(
            field(&line, "nofile") == Some(1 << 20) && field(&line, "hard") == Some(1 << 20),
            || format!("the default nofile is not 1048576/1048576: {line}"),
        ),
        Err(e) => checks.fail(format!("modes: {e}")),
    }
}

/// The hog is OOM-killed, and PID 1 says so rather than reporting a bare SIGKILL.
fn memory_hog(vm: &Vm, checks: &mut Checks) {
    // PID 1 may put a log level between `keel: ` and the message.
    let oom = "hog: out of memory: killed by the OOM killer";
    match wait_output(vm, "hog", oom, STEP_TIMEOUT) {
        Ok(line) => checks.check(pid1_message(&line, "hog").is_some(), || {
            format!("hog: the OOM report is not PID 1's: {line}")
        }),
        Err(e) => checks.fail(format!("hog: no OOM report: {e}")),
    }
}

/// The bomb stops at pids.max, and meanwhile its neighbour answers (forking a CGI in its own
/// cgroup) and PID 1 still supervises (logs a kill, restarts the container).
fn fork_bomb(vm: &Vm, checks: &mut Checks) {
    let report = match wait_output(vm, "bomb", "[bomb] bomb: pids.max=", STEP_TIMEOUT) {
        Ok(line) => line,
        Err(e) => return checks.fail(format!("bomb: no report: {e}")),
    };
    let console = vm.console();
    let outputs = || output_lines(&console, "bomb");
    checks.check(
        console
            .lines()
            .any(|l| l.contains("[bomb] ") && l.contains("can't fork")),
        || format!("bomb: no fork failed:\n{}", outputs()),
    );
    checks.check(field(&report, "pids.max") == Some(32), || {
        format!("bomb: pids.max is not 32: {report}")
    });
    // sh and 31 sleeps hold 32 pids until the subshell that forked them exits.
    checks.check(
        field(&report, "pids.current").is_some_and(|n| (30..=32).contains(&n)),
        || format!("bomb: it did not fill its pids.max: {report}"),
    );
    let refused = report
        .split_once("pids.events=max ")
        .and_then(|(_, n)| n.trim().parse::<u64>().ok());
    checks.check(refused.is_some_and(|n| n > 0), || {
        format!("bomb: pids.events counted no refused fork: {report}")
    });

    let root = workspace_root();
    let page = std::fs::read_to_string(root.join("examples/hello/site/www/index.html")).unwrap();
    let get = |path: &str| -> Result<String, String> {
        let r = vm
            .http_get(80, path, STEP_TIMEOUT)
            .map_err(|e| format!("GET :80{path}: {e}"))?;
        if r.status == 200 {
            Ok(r.body)
        } else {
            Err(format!("GET :80{path}: {r:?}"))
        }
    };
    let neighbour = || -> Result<(), String> {
        let alive = get("/cgi-bin/alive")?;
        if !alive.contains("alive") {
            return Err(format!("/cgi-bin/alive answered {alive:?}"));
        }
        if get("/")? != page {
            return Err("/ is not the example's page".into());
        }
        // The web container shares PID 1's pid namespace, so the pid PID 1 logs is the one its
        // CGI can kill.
        let console = vm.console();
        let web_pid = console
            .lines()
            .filter(|l| l.contains("keel: web: started pid="))
            .filter_map(|l| field(l, "pid"))
            .next_back()
            .ok_or("PID 1 never logged web's start")?;
        let killed = get(&format!("/cgi-bin/kill?{web_pid}"))?;
        if !killed.contains("killed") {
            return Err(format!("/cgi-bin/kill?{web_pid} answered {killed:?}"));
        }
        vm.wait_for_line("keel: web: killed by SIGKILL", STEP_TIMEOUT)
            .map_err(|e| e.to_string())?;
        let restarted = vm
            .wait_for_line("keel: web: started pid=", STEP_TIMEOUT)
            .map_err(|e| e.to_string())?;
        if field(&restarted, "pid") == Some(web_pid) {
            return Err(format!("web was not restarted: {restarted}"));
        }
        if get("/")? != page {
            return Err("after the restart, / is not the example's page".into());
        }
        Ok(())
    };
    if let Err(e) = neighbour() {
        checks.fail(format!("web, beside the bomb at its limit: {e}"));
    }
    let console = vm.console();
    checks.check(!stopped(&console, "bomb"), || {
        format!(
            "bomb: it stopped before the checks beside it were done, so they prove nothing:\n{}",
            pid1_lines(&console, "bomb")
        )
    });
}

/// cpus = 0.2 becomes cpu.max `20000 100000`, and the busy loop is throttled by it.
fn cpu_throttling(vm: &Vm, checks: &mut Checks) {
    if let Err(e) = wait_output(vm, "spin", "[spin] throttled_usec", SPIN_TIMEOUT) {
        return checks.fail(format!("spin: no cpu.stat: {e}"));
    }
    let console = vm.console();
    let lines: Vec<&str> = console
        .lines()
        .filter_map(|l| l.split_once("[spin] ").map(|(_, rest)| rest.trim()))
        .collect();
    checks.check(lines.contains(&"20000 100000"), || {
        format!("spin: cpu.max is not `20000 100000`:\n{}", lines.join("\n"))
    });
    let throttled = lines
        .iter()
        .find_map(|l| l.strip_prefix("nr_throttled "))
        .and_then(|n| n.trim().parse::<u64>().ok());
    checks.check(throttled.is_some_and(|n| n > 0), || {
        format!("spin: never throttled:\n{}", lines.join("\n"))
    });
}

#[test]
fn containers_cannot_escape_and_stay_within_their_limits() {
    let root = workspace_root();
    let escape = bin_dir().join("keel-escape");
    assert!(
        escape.is_file(),
        "{} is missing: build the binaries first (`cargo build --release --workspace --bins`, as scripts/test does)",
        escape.display()
    );
    let work = tempfile::tempdir().unwrap();
    let layer_bin = work.path().join("escape/bin");
    std::fs::create_dir_all(&layer_bin).unwrap();
    std::fs::copy(&escape, layer_bin.join("keel-escape")).unwrap();
    keel_tests::bomb_image::write_bomb_layout(&work.path().join("bomb"), 256 << 20);
    let template =
        std::fs::read_to_string(root.join("tests/hosts/isolation/host.toml.in")).unwrap();
    let host = work.path().join("host.toml");
    let workspace = root.to_str().expect("the workspace path is UTF-8");
    std::fs::write(&host, template.replace("@WORKSPACE@", workspace)).unwrap();
    let dir = build_host(&host, &work.path().join("out"));

    let mut vm = boot(&dir, &[80]);
    vm.wait_for_line("keel: ready uptime_ms=", BOOT_TIMEOUT)
        .unwrap();
    let mut checks = Checks::default();
    escape_suite(&vm, &mut checks);
    host_pid_signals(&vm, &mut checks);
    host_file_modes(&vm, &mut checks);
    symlink_swap(&vm, &mut checks);
    bomb_layer(&vm, &mut checks);
    memory_hog(&vm, &mut checks);
    fork_bomb(&vm, &mut checks);
    cpu_throttling(&vm, &mut checks);

    vm.powerdown().unwrap();
    vm.wait_for_line_anywhere("keel: poweroff clean", Duration::from_secs(90))
        .unwrap();
    let status = vm.wait_exit(STEP_TIMEOUT).unwrap();
    checks.check(status.success(), || format!("QEMU exited with {status:?}"));
    // Only now is the console complete: the hog is reported once, and only as OOM.
    let console = vm.console();
    let sigkill = console
        .lines()
        .any(|l| pid1_message(l, "hog").is_some_and(|m| m.starts_with("killed by SIGKILL")));
    checks.check(!sigkill, || {
        format!(
            "hog: its OOM kill was reported as a plain SIGKILL:\n{}",
            pid1_lines(&console, "hog")
        )
    });
    checks.finish();
}

/// `userns = "auto"`: root in the container is a non-zero uid outside it.
#[test]
fn a_user_namespaced_root_is_unprivileged_on_the_host() {
    let root = workspace_root();
    let out = tempfile::tempdir().unwrap();
    let dir = build_host(&root.join("tests/hosts/isolation/userns.toml"), out.path());
    let mut vm = boot(&dir, &[]);
    vm.wait_for_line("keel: ready uptime_ms=", BOOT_TIMEOUT)
        .unwrap();

    let uid = wait_output(&vm, "userns", "[userns] userns: uid=", STEP_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(field(&uid, "uid"), Some(0), "{uid}");
    let map = wait_output(&vm, "userns", "[userns] userns: uid_map", STEP_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let fields: Vec<u64> = map
        .split_once("uid_map")
        .map(|(_, m)| {
            m.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        matches!(fields[..], [0, host, 65536] if host != 0),
        "expected the container's uid 0 mapped to a non-zero host uid for 65536 ids: {map}"
    );
    // Docker's open-files limit holds in a user namespace too (it never exceeds PID 1's).
    let nofile = wait_output(&vm, "userns", "[userns] userns: nofile=", STEP_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(field(&nofile, "nofile"), Some(1 << 20), "{nofile}");
    assert_eq!(field(&nofile, "hard"), Some(1 << 20), "{nofile}");

    vm.powerdown().unwrap();
    vm.wait_for_line_anywhere("keel: poweroff clean", Duration::from_secs(90))
        .unwrap();
    let status = vm.wait_exit(STEP_TIMEOUT).unwrap();
    assert!(status.success(), "QEMU exited with {status:?}");
}

/// The console parsing above, on lines as a real boot prints them.
#[test]
fn console_lines_are_read_as_pid1_and_container_reports() {
    let console = "\
keel: warning: hog: out of memory: killed by the OOM killer (memory.max 33554432, oom_kill 1)
keel: hog: OOM-killed after 1337 ms; restart policy \"no\": not restarting
keel: error: userns: container setup failed: mount cgroup2: Device or resource busy
keel: webby: started pid=3
[jail] escape: mount blocked (mount: EPERM)
[    3.6] sysrq: HELP : loglevel(0-9)[privileged] escape: sysrq-trigger ALLOWED (wrote h to /proc/sysrq-trigger)
[jail] escape: done blocked=17 allowed=0
";
    assert_eq!(
        pid1_message(console.lines().next().unwrap(), "hog"),
        Some("out of memory: killed by the OOM killer (memory.max 33554432, oom_kill 1)")
    );
    assert!(stopped(console, "hog"));
    assert!(stopped(console, "userns"));
    assert!(!stopped(console, "web"), "webby is another container");
    assert_eq!(
        pid1_lines(console, "web"),
        "(PID 1 logged nothing about web)"
    );

    let jail = EscapeReport::parse(console, "jail");
    let mount = &jail.attempts["mount"];
    assert!(!mount.allowed);
    assert_eq!(mount.detail, "mount: EPERM");
    assert_eq!(field(jail.done.as_deref().unwrap(), "blocked"), Some(17));
    let privileged = EscapeReport::parse(console, "privileged");
    assert!(privileged.attempts["sysrq-trigger"].allowed);
    assert!(privileged.done.is_none());
}
