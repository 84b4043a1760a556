//! Keel's PID 1.
//!
//! Boot: give `/` a real mount, mount the kernel filesystems, load modules, set the hostname,
//! set up cgroups, configure the network over netlink, start the containers, print
//! `keel: ready uptime_ms=N`. Then serve: reap every child, hand container exits to the
//! supervisor, and wait for a reason to stop: SIGTERM/SIGUSR2/SIGPWR or the ACPI power
//! button power off, SIGINT (the kernel's Ctrl-Alt-Del) reboots — the signals only from the
//! kernel or the host's own processes, never from a container (see power_signals).
//!
//! PID 1 must never exit or panic: the kernel would panic with it. Failures are logged and
//! boot goes on; a panic is caught, and only then does the machine sync and reboot.

use keel_init::power_signals::{PowerRequest, PowerSignals};
use keel_init::slots::BootSlots;
use keel_init::slots::assessment::{self, Trial, Verdict};
use keel_init::update::Updater;
use keel_init::watchdog::Watchdog;
use keel_init::{delivery, early, etc, helpers, logger, modules, net, power, puller, reaper, var};

mod control;

use std::path::Path;
use std::time::{Duration, Instant};

use keel_config::HostConfig;
use keel_supervisor::cgroup::{CGROUP_ROOT, Cgroup};
use keel_supervisor::logs::Console;
use keel_supervisor::{ExitStatus, Paths, Supervisor};
use nix::sys::reboot::{RebootMode, reboot};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};

/// The host file `keel build` bakes into the root image.
const HOST_FILE: &str = "/usr/share/keel/host.toml";
/// After the shutdown deadline and a cgroup kill, how long to wait for the kills to land.
const KILL_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    PowerOff,
    Reboot,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::PowerOff => "poweroff",
            Action::Reboot => "reboot",
        }
    }
}

fn main() {
    // Inside a container with `init = true`, this binary is the container's reaping init.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "--reap") {
        let command = match args.get(2) {
            Some(sep) if sep == "--" => &args[3..],
            _ => &args[2..],
        };
        reaper::run(command);
    }
    // Started by PID 1 to pull a `pull_at = "boot"` image.
    if args.get(1).is_some_and(|a| a == "--pull") {
        let image = args.get(2).map(|a| a.to_string_lossy().into_owned());
        let code = match image {
            Some(image) => puller::run(
                Path::new(delivery::EFFECTIVE),
                &image,
                &keel_supervisor::Paths::default().pulled,
            ),
            None => {
                eprintln!("keel: --pull needs an image name");
                2
            }
        };
        std::process::exit(code);
    }
    // Started by PID 1 for work within limits: unpacking, filling a volume, emptying trash.
    if let Some(mode) = args.get(1).map(|a| a.to_string_lossy().into_owned())
        && mode.starts_with("--")
    {
        let rest: Vec<String> = args[2..]
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        if let Some(code) = helpers::run(Path::new(delivery::EFFECTIVE), &mode, &rest) {
            std::process::exit(code);
        }
    }
    let outcome = std::panic::catch_unwind(boot_and_serve);
    let why = match outcome {
        Ok(()) => "the service loop returned".to_string(),
        Err(panic) => panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into()),
    };
    give_up(&why);
}

/// The host file applied live with `keel apply` replaces the delivered one, as long as
/// it was applied over this same delivered file: a new delivery (a new fw_cfg file, a
/// rebuilt image) wins, and the old live change is dropped.
fn with_applied_changes(delivered: delivery::Delivered) -> delivery::Delivered {
    use keel_init::state::{APPLIED, Applied, sha256_hex};
    let path = Path::new(APPLIED);
    let applied = match Applied::load(path) {
        Ok(Some(a)) => a,
        Ok(None) => return delivered,
        Err(e) => {
            log::error!("{APPLIED}: {e}; ignored");
            return delivered;
        }
    };
    if applied.base_sha256 != sha256_hex(delivered.text.as_bytes()) {
        log::info!(
            "the host file from {} is new since the last keel apply; the applied changes are dropped",
            delivered.source
        );
        if let Err(e) = std::fs::remove_file(path) {
            log::warn!("removing {APPLIED}: {e}");
        }
        return delivered;
    }
    match keel_config::HostConfig::parse(path, &applied.text) {
        Ok(config) => delivery::Delivered {
            config,
            text: applied.text,
            source: "keel apply (over the delivered host file)",
            base_sha256: delivered.base_sha256,
        },
        Err(e) => {
            log::error!("{e}; the applied host file is ignored");
            delivered
        }
    }
}

/// The last resort: sync and reboot rather than let PID 1 exit.
fn give_up(why: &str) -> ! {
    logger::stop_console_queue();
    log::error!("fatal: {why}; syncing and rebooting");
    nix::unistd::sync();
    let _ = reboot(RebootMode::RB_AUTOBOOT);
    loop {
        // reboot(2) only fails without CAP_SYS_BOOT, i.e. not as PID 1: stay alive anyway.
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn boot_and_serve() {
    // Stage 1 (an initramfs whose command line names a root image) only reaches that
    // image and execs its /sbin/init, this binary again; it never returns.
    if let Some(cmdline) = keel_init::stage1::detect() {
        keel_init::stage1::run(&cmdline);
    }
    let switched = early::switch_to_tmpfs_root();
    let mut mount_errors = early::mount_kernel_filesystems();
    if let Err(e) = etc::mount_tmpfs(Path::new("/etc")) {
        mount_errors.push(format!("tmpfs on /etc: {e}"));
    }
    logger::init();
    std::panic::set_hook(Box::new(|info| log::error!("panic: {info}")));
    match switched {
        Ok(true) => log::info!("root moved from the initramfs to a tmpfs"),
        Ok(false) => {}
        Err(e) => {
            log::error!("cannot move / off the initramfs ({e}); containers will fail to pivot_root")
        }
    }
    for e in mount_errors {
        log::error!("{e}");
    }
    if std::process::id() != 1 {
        log::warn!("running as pid {}, not 1", std::process::id());
    }
    // Ctrl-Alt-Del becomes SIGINT to us instead of an immediate reboot.
    if let Err(e) = nix::sys::reboot::set_cad_enabled(false) {
        log::warn!("cannot take over Ctrl-Alt-Del: {e}");
    }

    modules::load_all_logged(Path::new(modules::LOAD_LIST), "");

    let var = var::setup();
    match &var {
        var::Var::Disk {
            device,
            uuid,
            formatted,
            check,
        } => log::info!(
            "/var on {} (ext4 {}, uuid {}): {}",
            device.node.display(),
            var::DATA_LABEL,
            uuid.as_deref().unwrap_or("?"),
            if *formatted {
                "formatted on this first boot".to_string()
            } else {
                format!("checked, {check}")
            }
        ),
        var::Var::Tmpfs { why } => {
            log::warn!("/var is a tmpfs: {why}; nothing written to /var survives a reboot")
        }
    }

    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let (delivered, rejected) = delivery::choose(
        Path::new(delivery::FW_CFG_CONFIG),
        delivery::read_config_disk(),
        &cmdline,
        Path::new(HOST_FILE),
    );
    for why in &rejected {
        log::error!("host file from {why}");
    }
    let delivered = delivered.map(with_applied_changes);
    // What `keel apply` saves its file over.
    let base_sha256 = delivered.as_ref().map(|d| d.base_sha256.clone());
    let config = match delivered {
        Some(d) => {
            log::info!("host file from {}", d.source);
            // PID 1's helpers (`--pull`) read the same file. 0600 like every copy of it:
            // it may hold registry passwords.
            if let Err(e) = std::fs::create_dir_all("/run/keel").and_then(|()| {
                keel_init::state::write_atomic(
                    Path::new(delivery::EFFECTIVE),
                    d.text.as_bytes(),
                    0o600,
                )
            }) {
                log::error!("writing {}: {e}", delivery::EFFECTIVE);
            }
            Some(d.config)
        }
        None => {
            log::error!("no valid host file; running with no containers");
            None
        }
    };

    let disk_uuid = match &var {
        var::Var::Disk { uuid, .. } => uuid.as_deref(),
        var::Var::Tmpfs { .. } => None,
    };
    let machine_id = match var::provision(Path::new("/"), disk_uuid) {
        Ok(state) => {
            for path in &state.swept {
                log::warn!(
                    "removed {}: a state write a crash interrupted",
                    path.display()
                );
            }
            if state.first_boot {
                log::info!(
                    "first boot: provisioned /var, machine id {}; recorded in {}",
                    state.machine_id,
                    keel_init::state::PROVISIONED
                );
            } else {
                log::info!(
                    "boot {} of machine {}; provisioned {} (boot id {})",
                    state.boots,
                    state.machine_id,
                    keel_api::format_rfc3339_ms(state.provisioned.at.saturating_mul(1000)),
                    state.provisioned.boot_id
                );
            }
            state.machine_id
        }
        Err(e) => {
            log::error!("provisioning /var: {e}");
            String::new()
        }
    };

    let hostname = config
        .as_ref()
        .map_or(keel_config::DEFAULT_HOSTNAME, |c| c.hostname.as_str());
    if let Err(e) = etc::generate(
        Path::new("/etc"),
        &etc::Identity {
            hostname,
            machine_id: &machine_id,
            effective_host_file: Path::new(delivery::EFFECTIVE),
        },
    ) {
        log::error!("generating /etc: {e}");
    }
    if let Err(e) = nix::unistd::sethostname(hostname) {
        log::error!("sethostname {hostname}: {e}");
    }
    let cgroups = match keel_supervisor::cgroup::setup_hierarchy(Path::new(CGROUP_ROOT)) {
        Ok(c) => c,
        Err(e) => {
            log::error!("cgroup setup: {e}; containers get no resource limits");
            Cgroup::at(Path::new(CGROUP_ROOT).join("keel"))
        }
    };

    // Before anything holds descriptors per container: the boot default of 1024 would end
    // container starts at a few hundred.
    match keel_supervisor::fds::raise_limit() {
        Ok(limit) => log::info!("pid1: open files limit {limit}"),
        Err(e) => log::warn!("pid1: cannot raise the open files limit: {e}"),
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
    {
        Ok(r) => r,
        Err(e) => give_up(&format!("cannot build the event loop: {e}")),
    };
    let (trial, booted_version) = boot_slots(config.as_ref());
    let updater = Updater::new(
        booted_version.unwrap_or_else(|| {
            config.as_ref().map_or_else(
                || keel_config::DEFAULT_VERSION.to_string(),
                |c| c.update.version.clone(),
            )
        }),
        config
            .as_ref()
            .map_or(keel_config::DEFAULT_HOSTNAME, |c| c.hostname.as_str())
            .to_string(),
    );
    let watchdog = Watchdog::open();
    let stop_timeout = Duration::from_millis(config.as_ref().map_or(10_000, |c| c.stop_timeout_ms));
    let action = runtime.block_on(serve(
        config,
        cgroups,
        stop_timeout,
        base_sha256,
        trial,
        updater,
        watchdog,
    ));
    // The console queue's writer ends with the runtime.
    logger::stop_console_queue();
    drop(runtime);
    finish(action);
}

/// On a machine booted from a Keel disk by its boot loader: says which slot and version
/// booted, reports an update that was rolled back, and returns the trial when this boot is
/// an update on trial (see keel_init::slots::assessment).
fn boot_slots(config: Option<&HostConfig>) -> (Option<Trial>, Option<String>) {
    let slots = match BootSlots::read() {
        Ok(Some(slots)) => slots,
        Ok(None) => return (None, None),
        Err(e) => {
            log::warn!("boot slots: {e}");
            return (None, None);
        }
    };
    let booted_version = slots.booted_entry().and_then(|e| e.version.clone());
    for entry in &slots.entries {
        let booted = slots.booted.is_some_and(|b| b.slot == entry.name.slot);
        log::info!(
            "slot {}: version {} ({}){}",
            entry.name.slot,
            entry.version.as_deref().unwrap_or("?"),
            entry.file,
            if booted { ", booted" } else { "" }
        );
    }
    if let Some(report) = assessment::failed_update(&slots) {
        log::error!("{report}");
    }
    let Some(config) = config else {
        return (None, booted_version);
    };
    let Some(trial) = Trial::begin(&slots, &config.update, Instant::now()) else {
        return (None, booted_version);
    };
    log::info!(
        "update to version {} in slot {} on trial ({} tries left after this one): committed once PID 1 is ready, the network online and {} running healthy, within {} s",
        trial.version,
        trial.slot,
        trial.tries_left(),
        if config.update.critical.is_empty() {
            "no container needs to be".to_string()
        } else {
            config.update.critical.join(", ")
        },
        config.update.health_timeout_ms / 1000
    );
    (Some(trial), booted_version)
}

async fn serve(
    config: Option<HostConfig>,
    cgroups: Cgroup,
    stop_timeout: Duration,
    base_sha256: Option<String>,
    mut trial: Option<Trial>,
    mut updater: Updater,
    mut watchdog: Option<Watchdog>,
) -> Action {
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let console = Console::open(Path::new("/dev/console"))
        .map_err(|e| log::warn!("container output will not be echoed: {e}"))
        .ok();
    if let Some(console) = &console {
        logger::use_console_queue(console.clone());
    }
    let empty = HostConfig {
        path: HOST_FILE.into(),
        hostname: keel_config::DEFAULT_HOSTNAME.into(),
        hostname_from_network: true,
        verity: false,
        modules: Vec::new(),
        stop_timeout_ms: stop_timeout.as_millis() as u64,
        shutdown_timeout_ms: 30_000,
        max_unpacked_bytes: keel_config::DEFAULT_MAX_UNPACKED_BYTES,
        interfaces: Default::default(),
        registries: Default::default(),
        networks: Default::default(),
        images: Default::default(),
        containers: Default::default(),
        update: keel_config::UpdatePolicy {
            version: keel_config::DEFAULT_VERSION.into(),
            health_timeout_ms: keel_config::DEFAULT_HEALTH_TIMEOUT_MS,
            critical: Vec::new(),
            trusted_keys: Vec::new(),
            reboot_window: None,
        },
    };
    let config = config.unwrap_or(empty);
    let mut supervisor = Supervisor::new(&config, Paths::default(), cgroups, events_tx, console);

    let mut signals = match Signals::new() {
        Ok(s) => s,
        Err(e) => give_up(&format!("cannot install signal handlers: {e}")),
    };
    let mut power_signals = match PowerSignals::new() {
        Ok(s) => s,
        Err(e) => give_up(&format!("cannot read the power signals: {e}")),
    };
    let (calls_tx, mut calls) = tokio::sync::mpsc::unbounded_channel();
    control::start_servers(calls_tx);
    let interfaces = config.interfaces.clone();
    let hostname = config.hostname.clone();
    let adopt_hostname = config.hostname_from_network;
    let (online_tx, mut online_rx) = tokio::sync::watch::channel(false);
    let mut network = tokio::spawn(async move {
        net::configure(&interfaces, &hostname, adopt_hostname, online_tx).await
    });
    let mut network_done = false;
    let mut ready_reported = false;
    let power_button = power::pressed();
    tokio::pin!(power_button);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // An installed update waiting for [update] reboot_window.
    let mut reboot_at: Option<tokio::time::Instant> = None;
    let mut judge_now = false;
    let mut commit_retry_at: Option<Instant> = None;

    let action = loop {
        let requested = tokio::select! {
            _ = tick.tick() => {
                if let Some(w) = watchdog.as_mut() {
                    w.feed();
                }
                judge_now = trial.is_some();
                None
            }
            _ = signals.child.recv() => {
                let mut reboot = None;
                guarded("reaping", || reboot = reap(&mut supervisor, &mut updater));
                match reboot {
                    Some(0) => Some(Action::Reboot),
                    Some(seconds) => {
                        reboot_at = Some(tokio::time::Instant::now() + Duration::from_secs(seconds));
                        None
                    }
                    None => None,
                }
            }
            _ = sleep_until_some(reboot_at) => {
                log::info!("the reboot window is open: rebooting into the installed update");
                Some(Action::Reboot)
            }
            Some(event) = events.recv() => { guarded("a supervisor event", || supervisor.on_event(event)); None }
            Some(call) = calls.recv() => guarded_call(&mut supervisor, &mut updater, trial.as_ref(), call, base_sha256.as_deref()),
            Ok(()) = online_rx.changed() => {
                let online = *online_rx.borrow_and_update();
                guarded("network-online", || supervisor.set_network_online(online));
                None
            }
            result = &mut network, if !network_done => {
                network_done = true;
                match result {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => log::error!("network: {e}"),
                    Err(e) => log::error!("network setup task failed: {e}"),
                }
                guarded("starting containers", || supervisor.start_all());
                None
            }
            request = power_signals.next() => match request {
                PowerRequest::PowerOff => Some(Action::PowerOff),
                PowerRequest::Reboot => Some(Action::Reboot),
                PowerRequest::Stats => {
                log::info!(
                    "stats pid1 rss_kb={} fds={}",
                    early::rss_kb().unwrap_or(0),
                    keel_supervisor::fds::open_count().unwrap_or(0)
                );
                for (name, stats) in supervisor.stats() {
                    log::info!("stats {name} {stats}");
                }
                None
                }
            },
            _ = &mut power_button => {
                log::info!("power button pressed");
                Some(Action::PowerOff)
            }
        };
        if !ready_reported && network_done && supervisor.booted() {
            ready_reported = true;
            log::info!("ready uptime_ms={}", early::uptime_ms());
            log::info!(
                "pid1 rss_kb={} containers={} fds={}",
                early::rss_kb().unwrap_or(0),
                config.containers.len(),
                keel_supervisor::fds::open_count().unwrap_or(0)
            );
        }
        if let Some(action) = requested {
            break action;
        }
        if judge_now && let Some(t) = &trial {
            judge_now = false;
            let online = *online_rx.borrow();
            match t.judge(
                Instant::now(),
                ready_reported,
                online,
                &supervisor.statuses(),
            ) {
                Verdict::Waiting(_) => {}
                Verdict::Good if commit_retry_at.is_some_and(|at| Instant::now() < at) => {}
                Verdict::Good => match t.commit() {
                    Ok(file) => {
                        log::info!(
                            "update committed: version {} in slot {} ({file}); slot {} is the fallback",
                            t.version,
                            t.slot,
                            t.slot.other()
                        );
                        trial = None;
                    }
                    Err(e) => {
                        // Still on trial: tried again in a while, and until then the boot
                        // loader keeps counting this entry's tries.
                        log::error!(
                            "the update to version {} is good but could not be committed: {e}; trying again in 30 s",
                            t.version
                        );
                        commit_retry_at = Some(Instant::now() + Duration::from_secs(30));
                    }
                },
                Verdict::Failed(why) => {
                    log::error!(
                        "update to version {} (slot {}) failed this boot: {why}; rebooting ({} tries left)",
                        t.version,
                        t.slot,
                        t.tries_left()
                    );
                    t.record_failure(&why);
                    break Action::Reboot;
                }
            }
        }
    };

    // The whole shutdown must fit in shutdown_timeout; keep a little of it for the end
    // (killing strays, unmounting).
    // The host file in force: `keel apply` may have changed it since boot.
    let total = Duration::from_millis(supervisor.config().shutdown_timeout_ms);
    let now = tokio::time::Instant::now();
    // checked: a deadline from the host file must never be able to panic PID 1.
    let deadline = now
        .checked_add(total.saturating_sub(KILL_GRACE))
        .unwrap_or(now + Duration::from_secs(365 * 24 * 3600));
    log::info!(
        "shutting down for {}: stopping containers, dependents first (deadline {} ms)",
        action.name(),
        total.as_millis()
    );
    guarded("stopping", || supervisor.shutdown());
    while !supervisor.finished() {
        tokio::select! {
            _ = tick.tick() => {
                if let Some(w) = watchdog.as_mut() {
                    w.feed();
                }
            }
            _ = signals.child.recv() => guarded("reaping", || {
                reap(&mut supervisor, &mut updater);
            }),
            Some(event) = events.recv() => guarded("a supervisor event", || supervisor.on_event(event)),
            Some(call) = calls.recv() => { guarded_call(&mut supervisor, &mut updater, trial.as_ref(), call, base_sha256.as_deref()); }
            _ = tokio::time::sleep_until(deadline) => {
                log::warn!("shutdown deadline reached");
                break;
            }
        }
    }
    if supervisor.running() > 0 {
        supervisor.kill_all();
        let grace = tokio::time::Instant::now() + KILL_GRACE;
        while supervisor.running() > 0 {
            tokio::select! {
                _ = signals.child.recv() => guarded("reaping", || {
                reap(&mut supervisor, &mut updater);
            }),
                _ = tokio::time::sleep_until(grace) => break,
            }
        }
    }
    supervisor.remove_cgroups();
    supervisor.teardown_networks();
    // After the containers, which may still have used the network while stopping.
    net::release_dhcp(Duration::from_secs(1)).await;
    kill_everything_else();
    reap(&mut supervisor, &mut updater);
    // Disarmed for a power-off (a reset would turn it into a reboot); left running through a
    // reboot, so that a hang on the way down is reset too.
    if let (Some(w), Action::PowerOff) = (watchdog, &action) {
        w.disarm();
    }
    action
}

/// Handles one API call like [`guarded`]: a panic in it is logged, the call's reply channel
/// is dropped with it (its client gets an error, the connection ends), and PID 1 serves on.
fn guarded_call(
    supervisor: &mut Supervisor,
    updater: &mut Updater,
    trial: Option<&Trial>,
    call: keel_init::api::Call,
    base_sha256: Option<&str>,
) -> Option<Action> {
    let mut action = None;
    guarded("an API request", || {
        action = control::handle(supervisor, updater, trial, call, base_sha256);
    });
    action
}

/// Runs a piece of supervision; a panic in it is caught and logged, and the machine stays
/// up (the supervisor may have lost track of one container, not of the host).
fn guarded(what: &str, f: impl FnOnce()) {
    if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into());
        log::error!("caught a panic while handling {what}: {why}; PID 1 carries on");
    }
}

/// SIGCHLD; the power signals are [`PowerSignals`], which check their sender.
struct Signals {
    child: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        Ok(Signals {
            child: signal(SignalKind::child())?,
        })
    }
}

/// Sleeps until `at`; never returns without one.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Collects every exited child: container main processes go to the supervisor, anything
/// else is an orphan re-parented to PID 1.
/// Returns, when an update was installed that asked for a reboot, the seconds until it.
fn reap(supervisor: &mut Supervisor, updater: &mut Updater) -> Option<u64> {
    let mut reboot = None;
    loop {
        let (pid, status) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => (pid, ExitStatus::Code(code)),
            Ok(WaitStatus::Signaled(pid, signal, _)) => (pid, ExitStatus::Signal(signal as i32)),
            Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => return reboot,
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                log::error!("waitpid: {e}");
                return reboot;
            }
        };
        let code = match status {
            ExitStatus::Code(code) => Some(code),
            ExitStatus::Signal(_) => None,
        };
        let window = supervisor.config().update.reboot_window;
        if let Some(asked) = updater.on_exit(pid.as_raw(), code, window) {
            reboot = reboot.or(asked);
            continue;
        }
        if !supervisor.on_exit(pid.as_raw(), status) {
            log::info!("reaped orphan pid={pid} ({status})");
        }
    }
}

/// Whatever is not a container (orphans, strays) gets SIGTERM, a moment, then SIGKILL.
fn kill_everything_else() {
    use nix::sys::signal::{Signal, kill};
    // kill(-1) from PID 1 reaches every process but itself.
    if kill(Pid::from_raw(-1), Signal::SIGTERM).is_ok() {
        std::thread::sleep(Duration::from_millis(100));
        let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    }
}

/// The mount points to take down at shutdown, innermost first.
fn unmount_order(mounts: &str) -> Vec<String> {
    let mut targets: Vec<String> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|t| t.replace("\\040", " "))
        .filter(|t| t != "/")
        .collect();
    targets.reverse();
    targets
}

fn finish(action: Action) -> ! {
    nix::unistd::sync();
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut busy = 0;
    for target in unmount_order(&mounts) {
        if nix::mount::umount2(target.as_str(), nix::mount::MntFlags::empty()).is_err()
            && nix::mount::umount2(target.as_str(), nix::mount::MntFlags::MNT_DETACH).is_err()
        {
            busy += 1;
        }
    }
    nix::unistd::sync();
    if busy > 0 {
        log::warn!("{busy} filesystems could not be unmounted");
    }
    log::info!("{} clean", action.name());
    let mode = match action {
        Action::PowerOff => RebootMode::RB_POWER_OFF,
        Action::Reboot => RebootMode::RB_AUTOBOOT,
    };
    match reboot(mode) {
        Err(e) => give_up(&format!("reboot: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmounting_goes_innermost_first_and_keeps_root() {
        let mounts = "rootfs / rootfs rw 0 0\nproc /proc proc rw 0 0\nsysfs /sys sysfs rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw 0 0\noverlay /run/keel/containers/my\\040app/rootfs overlay rw 0 0\n";
        assert_eq!(
            unmount_order(mounts),
            [
                "/run/keel/containers/my app/rootfs",
                "/sys/fs/cgroup",
                "/sys",
                "/proc"
            ]
        );
    }
}
