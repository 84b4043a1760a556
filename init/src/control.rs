//! PID 1's side of the control API: the servers (a root-only unix socket, and the
//! virtio-serial port `keel run` exposes on the host) hand every request that needs the
//! supervisor to the main loop as a [`Call`]; this module answers it.

use std::path::{Path, PathBuf};

use keel_api::{ApiError, ContainerStatus, ErrorCode, Stats};
use keel_init::api::{self, Call, Command, ExecHandle, Reply};
use keel_supervisor::{ControlError, Supervisor};
use tokio::sync::mpsc::UnboundedSender;

use crate::Action;

/// The API socket inside the guest.
pub const API_SOCKET: &str = "/run/keel/api.sock";
const LOGS_DIR: &str = "/var/log/keel";

/// Starts both servers; a server that cannot start is logged and the host runs without it.
pub fn start_servers(calls: UnboundedSender<Call>) {
    match api::listen_unix(Path::new(API_SOCKET)) {
        Ok(listener) => {
            tokio::spawn(api::serve(listener, calls.clone(), PathBuf::from(LOGS_DIR)));
        }
        Err(e) => log::error!("control API on {API_SOCKET}: {e}"),
    }
    // serve_virtio finds the port by its name in /sys/class/virtio-ports (there is no udev
    // to make the /dev/virtio-ports link) and waits for it to appear.
    tokio::spawn(api::serve_virtio(
        Path::new(api::VIRTIO_PORT_PATH),
        calls,
        PathBuf::from(LOGS_DIR),
    ));
}

fn error(e: ControlError) -> ApiError {
    match e {
        ControlError::NotFound(m) => ApiError::new(ErrorCode::NotFound, m),
        ControlError::Conflict(m) => ApiError::new(ErrorCode::Conflict, m),
        ControlError::Failed(m) => ApiError::new(ErrorCode::Internal, m),
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
pub fn handle(supervisor: &mut Supervisor, call: Call) -> Option<Action> {
    let mut action = None;
    let result = match call.command {
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
        Command::Exec { name, argv, env } => supervisor
            .exec(&name, &argv, &env)
            .map(|started| {
                Reply::Exec(ExecHandle {
                    stdout: started.stdout,
                    stderr: started.stderr,
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
