//! What the supervisor knows of each container: its definition, its state and its run.

use super::*;

/// Where a container is in its life.
#[derive(Debug)]
pub(super) enum ContainerState {
    /// Not started yet: waiting for its turn (boot phase) or for its dependencies.
    Waiting,
    Running(Run),
    /// Its stop signal was sent; SIGKILL to the cgroup follows at the deadline.
    Stopping(Run),
    BackingOff {
        generation: u64,
    },
    /// Ran and will not run again by itself (policy, or a task that completed).
    Exited {
        code: Option<i32>,
    },
    /// Stopped on request (API or shutdown).
    Stopped,
    /// Cannot run: a preparation error or a dependency that can never be met.
    Failed(String),
}

/// One run of a container's main process.
#[derive(Debug)]
pub(super) struct Run {
    pub(super) pid: libc::pid_t,
    pub(super) pidfd: OwnedFd,
    pub(super) since: Instant,
    pub(super) generation: u64,
    /// memory.events oom_kill when it started, to tell an OOM kill from a kill -9.
    pub(super) oom_kills_before: u64,
    /// READY=1 seen (containers with `notify = true`; others are ready when started).
    pub(super) ready: bool,
    pub(super) health: Option<HealthState>,
}

impl ContainerState {
    pub(super) fn name(&self) -> &'static str {
        match self {
            ContainerState::Waiting => "waiting",
            ContainerState::Running(run) if !run.ready => "starting",
            ContainerState::Running(_) => "running",
            ContainerState::Stopping(_) => "stopping",
            ContainerState::BackingOff { .. } => "restarting",
            ContainerState::Exited { .. } => "exited",
            ContainerState::Stopped => "stopped",
            ContainerState::Failed(_) => "failed",
        }
    }

    pub(super) fn run(&self) -> Option<&Run> {
        match self {
            ContainerState::Running(run) | ContainerState::Stopping(run) => Some(run),
            _ => None,
        }
    }
}

pub(super) struct Managed {
    pub(super) config: Container,
    pub(super) instance: Option<Instance>,
    /// The container's user namespace range, if it has one.
    pub(super) userns: Option<IdMap>,
    pub(super) state: ContainerState,
    pub(super) restarts: u64,
    /// Failed runs since the last success, for `on-failure:N`.
    pub(super) failures: u32,
    pub(super) last_delay: Option<Duration>,
    /// Counts starts; events carry it so a stale timer cannot touch a later run.
    pub(super) generation: u64,
    pub(super) last_exit: Option<String>,
    /// Stopped through the API: no restart until started again.
    pub(super) held: bool,
    /// Stop, then start again once it has exited (API restart, restart_on_unhealthy).
    pub(super) restart_requested: bool,
    pub(super) log: Option<Arc<ContainerLog>>,
    /// `keel apply` removes it or replaces its definition once it has stopped.
    pub(super) retire: Option<Retire>,
}

impl Managed {
    pub(super) fn new(config: Container, userns: Option<IdMap>) -> Managed {
        Managed {
            config,
            instance: None,
            userns,
            state: ContainerState::Waiting,
            restarts: 0,
            failures: 0,
            last_delay: None,
            generation: 0,
            last_exit: None,
            held: false,
            restart_requested: false,
            log: None,
            retire: None,
        }
    }
}

/// What `keel apply` does with a container once its process is gone.
pub(super) enum Retire {
    Remove,
    /// Start again as this definition, with this user namespace range.
    Replace(Box<Container>, Option<IdMap>),
}
