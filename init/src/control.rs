//! PID 1's side of the control API: the servers (a root-only unix socket, and the
//! virtio-serial port `keel run` exposes on the host) hand every request that needs the
//! supervisor to the main loop as a [`Call`]; this module answers it.

use std::path::{Path, PathBuf};

use keel_api::{ApiError, ApplyFailure, ApplyReport, ContainerStatus, ErrorCode, Stats};
use keel_config::HostConfig;
use keel_init::api::{self, Call, Command, ExecHandle, Reply};
use keel_init::delivery;
use keel_init::slots::assessment::Trial;
use keel_init::state::{APPLIED, Applied, write_atomic};
use keel_init::update::{self, Updater};
use keel_supervisor::{ApplyError, ApplyOutcome, ControlError, ExecStdio, Supervisor};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::oneshot;

use crate::Action;

/// The API socket inside the guest.
pub const API_SOCKET: &str = "/run/keel/api.sock";
const LOGS_DIR: &str = "/var/log/keel";
/// How errors name a host file sent with `keel apply`.
const APPLY_LABEL: &str = "apply:HOST.toml";

/// Starts both servers; a server that cannot start is logged and the host runs without it.
pub fn start_servers(calls: UnboundedSender<Call>) {
    match api::listen_unix(Path::new(API_SOCKET)) {
        Ok(listener) => {
            tokio::spawn(api::serve(listener, calls.clone(), PathBuf::from(LOGS_DIR)));
        }
        Err(e) => log::error!("control API on {API_SOCKET}: {e}"),
    }
    // serve_virtio finds each port by its name in /sys/class/virtio-ports (there is no udev
    // to make the /dev/virtio-ports links) and waits for it to appear. Each port serves one
    // host client at a time; the runner spreads its clients over them.
    for index in 0..api::VIRTIO_PORT_COUNT {
        let path = Path::new("/dev/virtio-ports").join(api::virtio_port_name(index));
        tokio::spawn(api::serve_virtio(
            &path,
            calls.clone(),
            PathBuf::from(LOGS_DIR),
            index == 0,
        ));
    }
}

fn error(e: ControlError) -> ApiError {
    match e {
        ControlError::NotFound(m) => ApiError::new(ErrorCode::NotFound, m),
        ControlError::Conflict(m) => ApiError::new(ErrorCode::Conflict, m),
        ControlError::Failed(m) => ApiError::new(ErrorCode::Internal, m),
        ControlError::Exec(e) => ApiError::new(ErrorCode::Internal, e.to_string()),
    }
}

fn status(s: keel_supervisor::Status) -> ContainerStatus {
    ContainerStatus {
        name: s.name,
        kind: match s.kind {
            keel_config::Kind::Service => "service",
            keel_config::Kind::OnBoot => "onboot",
            keel_config::Kind::OnShutdown => "onshutdown",
        }
        .to_string(),
        state: s.state.to_string(),
        pid: s.pid,
        uptime_ms: s.uptime_ms,
        restarts: s.restarts,
        health: s.health.map(str::to_string),
        last_exit: s.last_exit,
    }
}

/// Answers one call; a reboot or poweroff request is returned for the main loop to act on.
/// `base_sha256` is the hash of the host file delivered at boot, which an applied file is
/// saved over (`None` when none was valid).
pub fn handle(
    supervisor: &mut Supervisor,
    updater: &mut Updater,
    trial: Option<&Trial>,
    call: Call,
    base_sha256: Option<&str>,
) -> Option<Action> {
    let mut action = None;
    let result = match call.command {
        Command::Status => {
            let trial = trial.map(|t| {
                format!(
                    "version {} in slot {} is on trial ({} tries left after this boot)",
                    t.version,
                    t.slot,
                    t.tries_left()
                )
            });
            // The install helper has the ESP mounted: its state is the one to report.
            let trial = match &updater.installing {
                Some(i) => Some(format!(
                    "version {} is being installed in slot {}",
                    i.report.version, i.report.slot
                )),
                None => trial,
            };
            let status = if updater.installing.is_some() {
                keel_api::HostStatus {
                    version: updater.running_version.clone(),
                    boot: "firmware".into(),
                    slots: Vec::new(),
                    update: trial,
                }
            } else {
                update::host_status(&updater.running_version, trial)
            };
            serde_json::to_value(status)
                .map(Reply::Value)
                .map_err(|e| ApiError::internal(e.to_string()))
        }
        Command::UpgradeBegin {
            manifest,
            signature,
        } => updater
            .begin(&manifest, &signature, trial.is_some())
            .and_then(|accepted| {
                serde_json::to_value(accepted)
                    .map(Reply::Value)
                    .map_err(|e| ApiError::internal(e.to_string()))
            }),
        Command::UpgradeAbort { why } => {
            updater.abort(&why);
            Ok(Reply::Done)
        }
        Command::UpgradeInstall { reboot } => {
            if let Err((error, reply)) = updater.install(reboot, call.reply) {
                let _ = reply.send(Err(error));
            }
            return None;
        }
        Command::Apply { host_file, dry_run } => {
            apply(supervisor, call.reply, host_file, dry_run, base_sha256);
            return None;
        }
        Command::Ps => Ok(Reply::Statuses(
            supervisor.statuses().into_iter().map(status).collect(),
        )),
        Command::Inspect(name) => supervisor.inspect(&name).map(Reply::Value).map_err(error),
        Command::Stats(name) => {
            let all = supervisor.stats();
            if let Some(n) = &name
                && !all.iter().any(|(k, _)| k == n)
            {
                Err(ApiError::new(
                    ErrorCode::NotFound,
                    format!("no container named {n}"),
                ))
            } else {
                Ok(Reply::Stats(
                    all.into_iter()
                        .filter(|(k, _)| name.as_ref().is_none_or(|n| n == k))
                        .map(|(k, s)| Stats {
                            name: k,
                            cpu_usage_usec: s.cpu_usage_usec,
                            memory_current: s.memory_current,
                            memory_peak: s.memory_peak,
                            pids_current: s.pids_current,
                            oom_kills: s.oom_kills,
                        })
                        .collect(),
                ))
            }
        }
        Command::Start(name) => supervisor
            .start_container(&name)
            .map(|()| Reply::Done)
            .map_err(error),
        Command::Stop { name, timeout_ms } => supervisor
            .stop_container(&name, timeout_ms)
            .map(|()| Reply::Done)
            .map_err(error),
        Command::Restart(name) => supervisor
            .restart_container(&name)
            .map(|()| Reply::Done)
            .map_err(error),
        Command::Kill { name, signal } => supervisor
            .kill_container(&name, signal)
            .map(|()| Reply::Done)
            .map_err(error),
        Command::Exec {
            name,
            argv,
            env,
            stdio,
        } => supervisor
            .exec(&name, &argv, &env, stdio)
            .map(|started| {
                Reply::Exec(ExecHandle {
                    output: started.output,
                    stdin: started.stdin,
                    // The client sends input lines (or at least resizes).
                    interactive: stdio != ExecStdio::Quiet
                        && stdio != ExecStdio::Pipes { stdin: false },
                    exit: started.exit,
                })
            })
            .map_err(error),
        Command::Reboot => {
            action = Some(Action::Reboot);
            Ok(Reply::Done)
        }
        Command::Poweroff => {
            action = Some(Action::PowerOff);
            Ok(Reply::Done)
        }
    };
    let _ = call.reply.send(result);
    action
}

/// `keel apply`: parse, let the supervisor judge and start the change, save the file for
/// helpers and for the next boot, and answer once the supervisor reports the apply done.
fn apply(
    supervisor: &mut Supervisor,
    reply: oneshot::Sender<Result<Reply, ApiError>>,
    text: String,
    dry_run: bool,
    base_sha256: Option<&str>,
) {
    let answer = |result| {
        let _ = reply.send(result);
    };
    let new = match HostConfig::parse(Path::new(APPLY_LABEL), &text) {
        Ok(config) => config,
        Err(e) => {
            return answer(Err(ApiError::bad_request(format!(
                "{e}; nothing was changed"
            ))));
        }
    };
    let started = match supervisor.apply(&new, dry_run) {
        Ok(started) => started,
        Err(e @ ApplyError::Rejected(_)) => {
            log::warn!("apply refused: {e}");
            return answer(Err(ApiError::bad_request(format!(
                "{e}\nnothing was changed"
            ))));
        }
        Err(ApplyError::Conflict(why)) => return answer(Err(ApiError::conflict(why))),
    };
    let plan = started.plan;
    let mut report = ApplyReport {
        dry_run,
        added: plan.added,
        removed: plan.removed,
        restarted: plan.restarted,
        updated: plan.updated,
        unchanged: plan.unchanged,
        settings: plan.settings,
        failed: Vec::new(),
        warnings: started.warnings,
    };
    if !dry_run {
        report.warnings.extend(save(&text, base_sha256));
        for w in &report.warnings {
            log::warn!("apply: {w}");
        }
    }
    let Some(done) = started.done else {
        return answer(to_value(&report));
    };
    // The stops take up to the containers' stop timeouts: answer from a task, so that the
    // main loop goes on reaping the exits the apply waits for.
    tokio::spawn(async move {
        match done.await {
            Ok(ApplyOutcome {
                failed,
                interrupted,
            }) => {
                report.failed = failed
                    .into_iter()
                    .map(|(name, error)| ApplyFailure { name, error })
                    .collect();
                report.warnings.extend(interrupted);
            }
            Err(_) => report
                .warnings
                .push("PID 1 stopped following the apply before it finished".into()),
        }
        answer(to_value(&report));
    });
}

fn to_value(report: &ApplyReport) -> Result<Reply, ApiError> {
    serde_json::to_value(report)
        .map(Reply::Value)
        .map_err(|e| ApiError::internal(format!("encoding the answer: {e}")))
}

/// Writes the applied file where PID 1's helpers read the host file in force, and beside its
/// base for the next boot. The change is live either way: failures are warnings.
fn save(text: &str, base_sha256: Option<&str>) -> Vec<String> {
    let mut warnings = Vec::new();
    // Atomic: a boot pull starting now reads the old file or the new one, never half.
    if let Err(e) = write_atomic(Path::new(delivery::EFFECTIVE), text.as_bytes(), 0o600) {
        warnings.push(format!("writing {}: {e}", delivery::EFFECTIVE));
    }
    let Some(base) = base_sha256 else {
        warnings.push(
            "no host file was delivered at boot: the applied file is not kept for the next boot"
                .into(),
        );
        return warnings;
    };
    let path = Path::new(APPLIED);
    let saved = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| {
            Applied {
                base_sha256: base.to_string(),
                text: text.to_string(),
            }
            .save(path)
        });
    match saved {
        Err(e) => warnings.push(format!(
            "not kept for the next boot: writing {APPLIED}: {e}"
        )),
        Ok(()) if on_tmpfs(path) => warnings.push(format!(
            "not kept for the next boot: {APPLIED} is on a tmpfs (no data disk for /var)"
        )),
        Ok(()) => {}
    }
    warnings
}

fn on_tmpfs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}
