//! The operations behind the control API: status, start/stop/restart/kill, inspect, exec
//! and stats.

use super::*;

/// Status of one container for `keel ps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub name: String,
    pub kind: Kind,
    pub state: &'static str,
    pub pid: Option<libc::pid_t>,
    pub uptime_ms: Option<u64>,
    pub restarts: u64,
    pub health: Option<&'static str>,
    pub last_exit: Option<String>,
}

/// Errors of the control operations, by kind, for the API's error codes.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Failed(String),
    /// An exec could not be set up or cloned.
    #[error(transparent)]
    Exec(#[from] SetupError),
}

/// A process started with [`Supervisor::exec`].
pub struct ExecStarted {
    pub pid: libc::pid_t,
    pub output: ExecOutput,
    /// The write end of its stdin pipe, when it was asked for without a terminal.
    pub stdin: Option<OwnedFd>,
    pub exit: tokio::sync::oneshot::Receiver<i32>,
}

/// Where an exec's output comes from.
pub enum ExecOutput {
    /// The read ends of its stdout and stderr pipes.
    Pipes { stdout: OwnedFd, stderr: OwnedFd },
    /// The socket its terminal's master arrives on (SCM_RIGHTS, once the process has opened
    /// it in the container; nothing arrives if that failed). The master carries its input
    /// and its output, stdout and stderr together.
    Terminal { socket: OwnedFd },
}

/// How an exec's standard streams are connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecStdio {
    /// All to /dev/null (health probes).
    Quiet,
    /// Output to pipes; stdin from a pipe too when `stdin`, else /dev/null.
    Pipes { stdin: bool },
    /// A pseudo-terminal of the container's, of this size.
    Terminal { rows: u16, cols: u16 },
}

/// What [`Supervisor::spawn_exec`] started.
pub(super) struct SpawnedExec {
    pub pid: libc::pid_t,
    pub pidfd: OwnedFd,
    pub output: Option<ExecOutput>,
    pub stdin: Option<OwnedFd>,
}

pub(super) enum ExecWaiter {
    Api(tokio::sync::oneshot::Sender<i32>),
    Probe { name: String, generation: u64 },
}

/// A container's counters, read from its cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub state: &'static str,
    pub pid: Option<libc::pid_t>,
    pub restarts: u64,
    pub cpu_usage_usec: Option<u64>,
    pub memory_current: Option<u64>,
    pub memory_peak: Option<u64>,
    pub pids_current: Option<u64>,
    pub oom_kills: Option<u64>,
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
        write!(
            f,
            "state={} pid={} restarts={} cpu_usec={} memory={} memory_peak={} pids={} oom_kills={}",
            self.state,
            self.pid.map_or_else(|| "-".to_string(), |p| p.to_string()),
            self.restarts,
            n(self.cpu_usage_usec),
            n(self.memory_current),
            n(self.memory_peak),
            n(self.pids_current),
            n(self.oom_kills)
        )
    }
}

impl Supervisor {
    pub(super) fn managed(&self, name: &str) -> Result<&Managed, ControlError> {
        self.containers
            .get(name)
            .ok_or_else(|| ControlError::NotFound(format!("no container named {name}")))
    }

    pub fn statuses(&self) -> Vec<Status> {
        self.containers
            .iter()
            .map(|(name, m)| Status {
                name: name.clone(),
                kind: m.config.lifecycle.kind,
                state: m.state.name(),
                pid: m.state.run().map(|r| r.pid),
                uptime_ms: m.state.run().map(|r| r.since.elapsed().as_millis() as u64),
                restarts: m.restarts,
                health: m
                    .state
                    .run()
                    .and_then(|r| r.health.as_ref())
                    .map(|h| h.health.as_str()),
                last_exit: m.last_exit.clone(),
            })
            .collect()
    }

    /// Starts a container that is not running (clears a stop that held it).
    pub fn start_container(&mut self, name: &str) -> Result<(), ControlError> {
        let m = self.managed(name)?;
        if m.state.run().is_some() || matches!(m.state, ContainerState::BackingOff { .. }) {
            return Err(ControlError::Conflict(format!("{name} is already running")));
        }
        if matches!(
            self.phase,
            Phase::Stopping | Phase::ShutdownTasks | Phase::Finished
        ) {
            return Err(ControlError::Conflict("the host is shutting down".into()));
        }
        if let Some(m) = self.containers.get_mut(name) {
            m.held = false;
            m.failures = 0;
            m.state = ContainerState::Waiting;
        }
        let image = self.managed(name)?.config.image.clone();
        self.retry_failed_unpacks(&image);
        self.retry_failed_populates();
        self.start(name);
        self.advance();
        match &self.managed(name)?.state {
            ContainerState::Failed(why) => Err(ControlError::Failed(why.clone())),
            _ => Ok(()),
        }
    }

    /// Stops a container and keeps it stopped (no restart) until started again.
    pub fn stop_container(
        &mut self,
        name: &str,
        timeout_ms: Option<u64>,
    ) -> Result<(), ControlError> {
        let m = self.managed(name)?;
        match &m.state {
            ContainerState::Running(_) => {}
            ContainerState::BackingOff { .. } | ContainerState::Waiting => {
                if let Some(m) = self.containers.get_mut(name) {
                    m.held = true;
                    m.state = ContainerState::Stopped;
                }
                return Ok(());
            }
            ContainerState::Stopping(_) => return Ok(()),
            _ => return Err(ControlError::Conflict(format!("{name} is not running"))),
        }
        if let Some(m) = self.containers.get_mut(name) {
            m.held = true;
        }
        // An API value, unchecked: held to the host file's longest duration.
        let timeout =
            timeout_ms.map(|ms| Duration::from_millis(ms.min(keel_config::MAX_DURATION_MS)));
        self.send_stop(name, timeout);
        Ok(())
    }

    /// Stops (if running) and starts again.
    pub fn restart_container(&mut self, name: &str) -> Result<(), ControlError> {
        let m = self.managed(name)?;
        if m.state.run().is_none() {
            return self.start_container(name);
        }
        if let Some(m) = self.containers.get_mut(name) {
            m.held = false;
            m.restart_requested = true;
        }
        self.send_stop(name, None);
        Ok(())
    }

    // ---- live apply (`keel apply`, see crate::apply) ----

    /// The host file in force: the one booted with, or the last one applied.
    pub fn config(&self) -> &HostConfig {
        &self.config
    }

    /// Sends a signal to a container's main process; its restart policy decides the rest.
    pub fn kill_container(&mut self, name: &str, signal: i32) -> Result<(), ControlError> {
        let m = self.managed(name)?;
        let Some(run) = m.state.run() else {
            return Err(ControlError::Conflict(format!("{name} is not running")));
        };
        send_signal(&run.pidfd, signal)
            .map_err(|e| ControlError::Failed(format!("signal {signal}: {e}")))
    }

    /// Everything known about one container, for `keel inspect`.
    pub fn inspect(&self, name: &str) -> Result<serde_json::Value, ControlError> {
        let m = self.managed(name)?;
        let status = self.statuses().into_iter().find(|s| s.name == name);
        let stats = self
            .stats()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s);
        Ok(serde_json::json!({
            "name": name,
            "kind": format!("{:?}", m.config.lifecycle.kind).to_lowercase(),
            "state": m.state.name(),
            "failure": match &m.state { ContainerState::Failed(why) => Some(why.clone()), _ => None },
            "pid": status.as_ref().and_then(|s| s.pid),
            "uptime_ms": status.as_ref().and_then(|s| s.uptime_ms),
            "restarts": m.restarts,
            "health": status.as_ref().and_then(|s| s.health),
            "last_exit": m.last_exit,
            "apply": match &m.retire {
                Some(Retire::Remove) => Some("removing"),
                Some(Retire::Replace(..)) => Some("replacing"),
                None => None,
            },
            "user_namespace": m.userns.map(|u| serde_json::json!({"uid": u.uid, "gid": u.gid, "size": u.size})),
            "cgroup": m.instance.as_ref().map(|i| i.cgroup().path().display().to_string()),
            "stats": stats.map(|s| serde_json::json!({
                "cpu_usage_usec": s.cpu_usage_usec,
                "memory_current": s.memory_current,
                "memory_peak": s.memory_peak,
                "pids_current": s.pids_current,
                "oom_kills": s.oom_kills,
            })),
            "config": format!("{:#?}", m.config),
        }))
    }

    /// Runs a command inside a running container; the exit code arrives on `exit`.
    pub fn exec(
        &mut self,
        name: &str,
        argv: &[String],
        env: &[String],
        stdio: ExecStdio,
    ) -> Result<ExecStarted, ControlError> {
        let spawned = self.spawn_exec(name, argv, env, stdio)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.execs.insert(spawned.pid, ExecWaiter::Api(tx));
        let output = spawned
            .output
            .ok_or_else(|| ControlError::Failed("exec output".into()))?;
        Ok(ExecStarted {
            pid: spawned.pid,
            output,
            stdin: spawned.stdin,
            exit: rx,
        })
    }

    /// Starts an exec with its streams connected as `stdio` says.
    pub(super) fn spawn_exec(
        &mut self,
        name: &str,
        argv: &[String],
        env: &[String],
        stdio: ExecStdio,
    ) -> Result<SpawnedExec, ControlError> {
        let m = self
            .containers
            .get(name)
            .ok_or_else(|| ControlError::NotFound(format!("no container named {name}")))?;
        let (Some(instance), Some(run)) = (&m.instance, m.state.run()) else {
            return Err(ControlError::Conflict(format!("{name} is not running")));
        };
        let dev_null = self
            .dev_null
            .as_ref()
            .ok_or_else(|| ControlError::Failed("no /dev/null".into()))?;
        let failed = |e: rustix::io::Errno| ControlError::Failed(e.to_string());
        let pipe = || rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(failed);
        let null = dev_null.as_raw_fd();
        // What the child gets (kept until the spawn) and what PID 1 keeps.
        let mut child_ends: Vec<OwnedFd> = Vec::new();
        let (fds, output, stdin, terminal) = match stdio {
            ExecStdio::Quiet => ([null; 3], None, None, None),
            ExecStdio::Pipes { stdin } => {
                let (out_r, out_w) = pipe()?;
                let (err_r, err_w) = pipe()?;
                let (input, in_fd) = if stdin {
                    let (in_r, in_w) = pipe()?;
                    let fd = in_r.as_raw_fd();
                    child_ends.push(in_r);
                    (Some(in_w), fd)
                } else {
                    (None, null)
                };
                let fds = [in_fd, out_w.as_raw_fd(), err_w.as_raw_fd()];
                child_ends.extend([out_w, err_w]);
                let output = ExecOutput::Pipes {
                    stdout: out_r,
                    stderr: err_r,
                };
                (fds, Some(output), input, None)
            }
            ExecStdio::Terminal { rows, cols } => {
                let (ours, theirs) = rustix::net::socketpair(
                    rustix::net::AddressFamily::UNIX,
                    rustix::net::SocketType::SEQPACKET,
                    rustix::net::SocketFlags::CLOEXEC,
                    None,
                )
                .map_err(failed)?;
                let terminal = crate::container::ExecTerminal {
                    socket: theirs.as_raw_fd(),
                    rows,
                    cols,
                };
                child_ends.push(theirs);
                let output = ExecOutput::Terminal { socket: ours };
                ([null; 3], Some(output), None, Some(terminal))
            }
        };
        let exec = crate::instance::ExecSpec {
            argv,
            env,
            stdio: fds,
            terminal,
        };
        let spawned = instance.spawn_exec(&mut self.runtime, &m.config, &run.pidfd, exec)?;
        // The child has its copies: PID 1's go, so that the ends see EOF when it exits.
        drop(child_ends);
        let steps: Vec<String> = Vec::new();
        tokio::spawn(report_start_failure(
            format!("{name} (exec)"),
            spawned.error_pipe,
            steps,
        ));
        Ok(SpawnedExec {
            pid: spawned.pid,
            pidfd: spawned.pidfd,
            output,
            stdin,
        })
    }

    /// Counters of every container, for the log or the API.
    pub fn stats(&self) -> Vec<(String, Stats)> {
        self.containers
            .iter()
            .map(|(name, m)| {
                let mut stats = Stats {
                    state: m.state.name(),
                    pid: m.state.run().map(|r| r.pid),
                    restarts: m.restarts,
                    ..Stats::default()
                };
                if let Some(i) = &m.instance {
                    let cg = i.cgroup();
                    stats.cpu_usage_usec = cg.keyed("cpu.stat", "usage_usec");
                    stats.memory_current = cg.number("memory.current");
                    stats.memory_peak = cg.number("memory.peak");
                    stats.pids_current = cg.number("pids.current");
                    stats.oom_kills = cg.keyed("memory.events", "oom_kill");
                }
                (name.clone(), stats)
            })
            .collect()
    }
}
