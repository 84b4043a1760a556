//! The supervision state machine: boot tasks, dependencies, starts, health, restarts with
//! backoff, ordered stops and shutdown tasks, and the control operations behind the API.
//!
//! The supervisor never waits for children itself. PID 1 owns reaping (one `waitpid(-1)`
//! loop for every child: containers, execs and orphans alike) and hands each exit to
//! [`Supervisor::on_exit`]; timers, health results and sd_notify readiness come back
//! through the event channel as [`Event`]s. Everything runs on PID 1's single thread.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_config::{
    Condition, Container, Dependency, HealthProbe, HostConfig, Kind, RestartPolicy, TaskFailure,
};
use keel_net::ContainerNetworks;
use tokio::sync::mpsc::UnboundedSender;

use crate::apply::{self, Plan, Refusal};
use crate::cgroup::Cgroup;
use crate::health::{Health, HealthState};
use crate::instance::{Instance, Runtime};
use crate::logs::{Console, ContainerLog, Stream, pump};
use crate::spawn::{IdMap, Step, describe_failure};

/// Where the supervisor finds images and keeps its state in the guest.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The OCI image layout holding every image of the host file, each under its name.
    pub images: PathBuf,
    /// The layout `pull_at = "boot"` images are pulled into.
    pub pulled: PathBuf,
    /// Unpacked layers shared by every container of an image.
    pub layers: PathBuf,
    /// Per-container overlay upper, work and mount point directories.
    pub containers: PathBuf,
    pub logs: PathBuf,
    /// Named volumes, one directory each, created on first use.
    pub volumes: PathBuf,
}

impl Paths {
    /// Opens image `name` of the host file (named so in the layout `keel build` embeds),
    /// verifying its manifest and config.
    /// An image pulled at boot is found in [`Paths::pulled`] instead.
    pub fn open_image(&self, name: &str) -> Result<keel_image::layout::ImageLayout, String> {
        keel_image::layout::ImageLayout::open_ref(&self.images, name)
            .or_else(|embedded| {
                keel_image::layout::ImageLayout::open_ref(&self.pulled, name).map_err(|_| embedded)
            })
            .map_err(|e| format!("image {name} ({}): {e}", self.images.display()))
    }

    /// Opens image `name` pulled at boot.
    pub fn open_pulled_image(&self, name: &str) -> Result<keel_image::layout::ImageLayout, String> {
        keel_image::layout::ImageLayout::open_ref(&self.pulled, name)
            .map_err(|e| format!("image {name} ({}): {e}", self.pulled.display()))
    }
}

impl Default for Paths {
    fn default() -> Paths {
        Paths {
            images: "/usr/share/keel/images".into(),
            pulled: "/var/lib/keel/images".into(),
            layers: "/var/lib/keel/layers".into(),
            containers: "/run/keel/containers".into(),
            logs: "/var/log/keel".into(),
            volumes: "/var/lib/keel/volumes".into(),
        }
    }
}

/// Restart backoff: 100 ms doubling to a cap, back to the start once a run lasted 10 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(60),
            reset_after: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// The delay before the next start, given the previous delay and how long the last run lasted.
    pub fn next(&self, previous: Option<Duration>, ran_for: Duration) -> Duration {
        match previous {
            Some(prev) if ran_for < self.reset_after => (prev * 2).min(self.max),
            _ => self.initial,
        }
    }
}

/// Where a container is in its life.
#[derive(Debug)]
enum State {
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
struct Run {
    pid: libc::pid_t,
    pidfd: OwnedFd,
    since: Instant,
    generation: u64,
    /// memory.events oom_kill when it started, to tell an OOM kill from a kill -9.
    oom_kills_before: u64,
    /// READY=1 seen (containers with `notify = true`; others are ready when started).
    ready: bool,
    health: Option<HealthState>,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Waiting => "waiting",
            State::Running(run) if !run.ready => "starting",
            State::Running(_) => "running",
            State::Stopping(_) => "stopping",
            State::BackingOff { .. } => "restarting",
            State::Exited { .. } => "exited",
            State::Stopped => "stopped",
            State::Failed(_) => "failed",
        }
    }

    fn run(&self) -> Option<&Run> {
        match self {
            State::Running(run) | State::Stopping(run) => Some(run),
            _ => None,
        }
    }
}

struct Managed {
    config: Container,
    instance: Option<Instance>,
    /// The container's user namespace range, if it has one.
    userns: Option<IdMap>,
    state: State,
    restarts: u64,
    /// Failed runs since the last success, for `on-failure:N`.
    failures: u32,
    last_delay: Option<Duration>,
    /// Counts starts; events carry it so a stale timer cannot touch a later run.
    generation: u64,
    last_exit: Option<String>,
    /// Stopped through the API: no restart until started again.
    held: bool,
    /// Stop, then start again once it has exited (API restart, restart_on_unhealthy).
    restart_requested: bool,
    log: Option<Arc<ContainerLog>>,
    /// `keel apply` removes it or replaces its definition once it has stopped.
    retire: Option<Retire>,
}

impl Managed {
    fn new(config: Container, userns: Option<IdMap>) -> Managed {
        Managed {
            config,
            instance: None,
            userns,
            state: State::Waiting,
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
enum Retire {
    Remove,
    /// Start again as this definition, with this user namespace range.
    Replace(Box<Container>, Option<IdMap>),
}

/// A `keel apply` whose stops are still under way.
struct Applying {
    /// Added and restarted containers, to report those that could not start.
    starting: Vec<String>,
    done: tokio::sync::oneshot::Sender<ApplyOutcome>,
}

/// How an apply ended, once every container it stopped has stopped and the new ones have
/// been started (or wait for their dependencies).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// Added or restarted containers that could not start: name and why.
    pub failed: Vec<(String, String)>,
    /// Set when the host began shutting down first.
    pub interrupted: Option<String>,
}

/// An apply that was accepted (a dry run changes nothing and has no `done`).
#[derive(Debug)]
pub struct ApplyStarted {
    pub plan: Plan,
    /// Parts of it that failed without undoing the rest (container network files).
    pub warnings: Vec<String>,
    /// Resolves when the apply has finished (see [`ApplyOutcome`]).
    pub done: Option<tokio::sync::oneshot::Receiver<ApplyOutcome>>,
}

/// Why an apply was refused; nothing changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyError {
    /// Parts of the new file cannot take effect on a running host.
    Rejected(Vec<Refusal>),
    /// The host is not in a state to apply anything (booting, shutting down, applying).
    Conflict(String),
}

impl std::fmt::Display for ApplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApplyError::Rejected(refusals) => {
                f.write_str("cannot be applied to the running host")?;
                for r in refusals {
                    write!(f, "\n  {r}")?;
                }
                Ok(())
            }
            ApplyError::Conflict(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for ApplyError {}

/// Where the host as a whole is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Running the onboot tasks one after another.
    Boot,
    /// Services run.
    Running,
    /// An onboot task with `on_failure = "halt"` failed: no service starts.
    Halted,
    /// Services are being stopped, dependents first.
    Stopping,
    /// Running the onshutdown tasks.
    ShutdownTasks,
    /// Everything has stopped.
    Finished,
}

/// Something the supervisor scheduled for itself, or learned from a socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    RestartDue {
        name: String,
        generation: u64,
    },
    StopDeadline {
        name: String,
        generation: u64,
    },
    HealthDue {
        name: String,
        generation: u64,
    },
    HealthResult {
        name: String,
        generation: u64,
        passed: bool,
        detail: String,
    },
    Ready {
        name: String,
    },
    /// Time to try pulling a boot image again.
    PullRetry {
        image: String,
    },
}

/// What the policy says after an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Restart,
    /// Done for good; `completed` when it exited with code 0.
    Done {
        completed: bool,
    },
    /// on-failure:N ran out of attempts.
    GiveUp,
}

/// Docker's restart policies. `failures` counts failed runs since the last success,
/// including this one.
pub fn decide(policy: RestartPolicy, status: ExitStatus, failures: u32) -> Decision {
    let success = status == ExitStatus::Code(0);
    match policy {
        RestartPolicy::Always | RestartPolicy::UnlessStopped => Decision::Restart,
        RestartPolicy::No => Decision::Done { completed: success },
        RestartPolicy::OnFailure { .. } if success => Decision::Done { completed: true },
        RestartPolicy::OnFailure { max: Some(max) } if failures > max => Decision::GiveUp,
        RestartPolicy::OnFailure { .. } => Decision::Restart,
    }
}

/// Whether a dependency is met, pending, or can never be met.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Readiness {
    Met,
    Pending,
    Never(String),
}

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlError {
    NotFound(String),
    Conflict(String),
    Failed(String),
}

impl std::fmt::Display for ControlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlError::NotFound(m) | ControlError::Conflict(m) | ControlError::Failed(m) => {
                f.write_str(m)
            }
        }
    }
}

/// A process started with [`Supervisor::exec`].
pub struct ExecStarted {
    pub pid: libc::pid_t,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    pub exit: tokio::sync::oneshot::Receiver<i32>,
}

pub struct Supervisor {
    runtime: Runtime,
    events: UnboundedSender<Event>,
    console: Option<Arc<Console>>,
    dev_null: Option<OwnedFd>,
    backoff: Backoff,
    containers: BTreeMap<String, Managed>,
    phase: Phase,
    /// Exec'd processes (API execs and exec health probes) by pid, with who waits.
    execs: BTreeMap<libc::pid_t, ExecWaiter>,
    networks: ContainerNetworks,
    /// Every required host interface has its address (see `Condition::NetworkOnline`).
    network_online: bool,
    /// `pull_at = "boot"` images by name: their containers wait until they are pulled.
    pulls: BTreeMap<String, Pull>,
    /// The host file in force: the booted one, then the last one applied.
    config: HostConfig,
    applying: Option<Applying>,
}

/// A boot pull, run by a process of its own (`keel-init --pull IMAGE`).
struct Pull {
    state: PullState,
    failures: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PullState {
    /// Waiting for the network, or for its retry time.
    Waiting,
    Running {
        pid: libc::pid_t,
    },
    Done,
}

enum ExecWaiter {
    Api(tokio::sync::oneshot::Sender<i32>),
    Probe { name: String, generation: u64 },
}

impl Supervisor {
    /// `cgroups` is the parent of every container cgroup (`/sys/fs/cgroup/keel`).
    pub fn new(
        config: &HostConfig,
        paths: Paths,
        cgroups: Cgroup,
        events: UnboundedSender<Event>,
        console: Option<Arc<Console>>,
    ) -> Supervisor {
        let userns = allocate_userns(&config.containers);
        let containers = config
            .containers
            .iter()
            .map(|(name, c)| {
                let managed = Managed::new(c.clone(), userns.get(name).copied());
                (name.clone(), managed)
            })
            .collect();
        let dev_null = rustix::fs::open(
            "/dev/null",
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| log::error!("cannot open /dev/null for container stdin: {e}"))
        .ok();
        Supervisor {
            runtime: Runtime::new(paths, cgroups),
            events,
            console,
            dev_null,
            backoff: Backoff::default(),
            containers,
            phase: Phase::Boot,
            execs: BTreeMap::new(),
            networks: ContainerNetworks::new(config),
            network_online: false,
            pulls: config
                .images
                .iter()
                .filter(|(_, i)| {
                    matches!(
                        i.source,
                        keel_config::ImageSource::Pull {
                            at: keel_config::PullAt::Boot,
                            ..
                        }
                    )
                })
                .map(|(name, _)| {
                    (
                        name.clone(),
                        Pull {
                            state: PullState::Waiting,
                            failures: 0,
                        },
                    )
                })
                .collect(),
            config: config.clone(),
            applying: None,
        }
    }

    /// The host network came online or went offline: services waiting on
    /// `network-online` may start. Going offline stops nothing that already runs.
    pub fn set_network_online(&mut self, online: bool) {
        if self.network_online == online {
            return;
        }
        self.network_online = online;
        if online {
            self.start_pulls();
        }
        if online && self.phase == Phase::Running {
            self.advance();
        }
    }

    /// Whether image `name` can be prepared: embedded, or pulled at boot already.
    fn image_ready(&self, image: &str) -> bool {
        self.pulls
            .get(image)
            .is_none_or(|p| p.state == PullState::Done)
    }

    /// Starts the waiting boot pulls, once the network is online.
    fn start_pulls(&mut self) {
        if !self.network_online {
            return;
        }
        for (image, pull) in self.pulls.iter_mut() {
            if pull.state != PullState::Waiting {
                continue;
            }
            // A process of its own: PID 1 keeps reaping and serving during the pull. Its
            // exit comes back through on_exit, from the one reaper.
            match std::process::Command::new("/proc/self/exe")
                .arg("--pull")
                .arg(image)
                .stdin(std::process::Stdio::null())
                .spawn()
            {
                Ok(child) => {
                    let pid = child.id() as libc::pid_t;
                    log::info!("image {image}: pulling (pid {pid})");
                    pull.state = PullState::Running { pid };
                }
                Err(e) => {
                    log::error!("image {image}: cannot start the pull: {e}");
                    pull.failures += 1;
                    schedule(
                        &self.events,
                        pull_backoff(pull.failures),
                        Event::PullRetry {
                            image: image.clone(),
                        },
                    );
                }
            }
        }
    }

    /// A pull process ended; false when `pid` is not one.
    fn on_pull_exit(&mut self, pid: libc::pid_t, status: ExitStatus) -> bool {
        let Some((image, pull)) = self
            .pulls
            .iter_mut()
            .find(|(_, p)| p.state == PullState::Running { pid })
        else {
            return false;
        };
        if status == ExitStatus::Code(0) {
            log::info!("image {image}: pulled");
            pull.state = PullState::Done;
            self.advance();
        } else if !self.config.images.contains_key(image.as_str()) {
            // `keel apply` dropped the image meanwhile: nothing waits for it any more.
            log::info!("image {image}: pull failed ({status}); no longer in the host file");
            let image = image.clone();
            self.pulls.remove(&image);
        } else {
            pull.failures += 1;
            pull.state = PullState::Waiting;
            let delay = pull_backoff(pull.failures);
            log::error!(
                "image {image}: pull failed ({status}); retrying in {} s",
                delay.as_secs()
            );
            let image = image.clone();
            self.schedule(delay, Event::PullRetry { image });
        }
        true
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Unit tests drive the apply logic without starting anything (no root).
    #[cfg(test)]
    fn set_phase(&mut self, phase: Phase) {
        self.phase = phase;
    }

    /// Starts the boot: onboot tasks in file order, then the services.
    pub fn start_all(&mut self) {
        self.collect_layer_garbage();
        self.start_pulls();
        let resolv_conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        for e in self.networks.prepare(&resolv_conf) {
            log::error!("container networks: {e}");
        }
        for dir in [
            &self.runtime.paths.layers,
            &self.runtime.paths.containers,
            &self.runtime.paths.logs,
        ] {
            if let Err(e) = std::fs::create_dir_all(dir) {
                log::error!("cannot create {}: {e}", dir.display());
            }
        }
        // Layers may hold setuid files and device nodes: nobody but root walks the store.
        if let Err(e) = std::fs::set_permissions(
            &self.runtime.paths.layers,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        ) {
            log::warn!("{}: {e}", self.runtime.paths.layers.display());
        }
        self.advance();
    }

    /// Names of the containers of `kind`, in file order.
    fn in_order(&self, kind: Kind) -> Vec<String> {
        let mut names: Vec<(&String, usize)> = self
            .containers
            .iter()
            .filter(|(_, m)| m.config.lifecycle.kind == kind)
            .map(|(n, m)| (n, m.config.order))
            .collect();
        names.sort_by_key(|(_, order)| *order);
        names.into_iter().map(|(n, _)| n.clone()).collect()
    }

    /// Moves the host forward after any change: next task, startable services, the next
    /// wave of stops, the end of the shutdown.
    fn advance(&mut self) {
        // Several steps may follow from one change (a task finishing lets a service start).
        for _ in 0..self.containers.len() + 4 {
            let before = self.snapshot();
            match self.phase {
                Phase::Boot => self.advance_tasks(Kind::OnBoot),
                Phase::Running => {
                    self.advance_apply();
                    self.start_ready_services();
                }
                Phase::Halted | Phase::Finished => {}
                Phase::Stopping => self.advance_stop(),
                Phase::ShutdownTasks => self.advance_tasks(Kind::OnShutdown),
            }
            if self.snapshot() == before {
                break;
            }
        }
        self.finish_apply();
    }

    /// A cheap fingerprint of every state, to know when `advance` has settled.
    fn snapshot(&self) -> (Phase, Vec<(&'static str, u64)>) {
        (
            self.phase,
            self.containers
                .values()
                .map(|m| (m.state.name(), m.generation))
                .collect(),
        )
    }

    /// Runs the tasks of `kind` one at a time in file order.
    fn advance_tasks(&mut self, kind: Kind) {
        for name in self.in_order(kind) {
            let Some(m) = self.containers.get(&name) else {
                continue;
            };
            match &m.state {
                State::Waiting => {
                    // A task whose image is still being pulled holds the sequence.
                    if self.image_ready(&m.config.image) {
                        self.start(&name);
                    }
                    return;
                }
                State::Running(_) | State::Stopping(_) | State::BackingOff { .. } => return,
                State::Exited { code: Some(0) } | State::Stopped => continue,
                State::Exited { .. } | State::Failed(_) => {
                    if m.config.lifecycle.on_failure == TaskFailure::Halt {
                        if kind == Kind::OnBoot {
                            log::error!(
                                "boot halted: onboot task {name} failed and has on_failure = \"halt\"; no service will start"
                            );
                            self.phase = Phase::Halted;
                        } else {
                            log::error!(
                                "onshutdown task {name} failed and has on_failure = \"halt\"; skipping the remaining tasks"
                            );
                            self.phase = Phase::Finished;
                        }
                        return;
                    }
                    log::warn!(
                        "{} task {name} failed; continuing",
                        if kind == Kind::OnBoot {
                            "onboot"
                        } else {
                            "onshutdown"
                        }
                    );
                }
            }
        }
        self.phase = if kind == Kind::OnBoot {
            Phase::Running
        } else {
            Phase::Finished
        };
        if kind == Kind::OnBoot {
            log::info!("boot tasks done; starting services");
        }
    }

    fn readiness(&self, dep: &Dependency) -> Readiness {
        if dep.condition == Condition::NetworkOnline {
            return if self.network_online {
                Readiness::Met
            } else {
                Readiness::Pending
            };
        }
        let Some(m) = self.containers.get(&dep.name) else {
            return Readiness::Never(format!("{} does not exist", dep.name));
        };
        let restarts = !matches!(
            decide(m.config.restart, ExitStatus::Code(1), m.failures + 1),
            Decision::Done { .. } | Decision::GiveUp
        );
        match (&m.state, dep.condition) {
            (State::Running(run), Condition::Started) if run.ready => Readiness::Met,
            (State::Running(run), Condition::Healthy)
                if run
                    .health
                    .as_ref()
                    .is_some_and(|h| h.health == Health::Healthy) =>
            {
                Readiness::Met
            }
            (State::Exited { code: Some(0) }, Condition::CompletedSuccessfully) => Readiness::Met,
            (State::Exited { code }, _)
                if !restarts || dep.condition == Condition::CompletedSuccessfully =>
            {
                Readiness::Never(format!(
                    "{} {}",
                    dep.name,
                    code.map_or_else(
                        || "was killed".to_string(),
                        |c| format!("exited with code {c}")
                    )
                ))
            }
            (State::Failed(why), _) => Readiness::Never(format!("{} failed: {why}", dep.name)),
            (State::Stopped, _) => Readiness::Pending,
            _ => Readiness::Pending,
        }
    }

    /// Starts every waiting service whose dependencies are met; fails the ones whose
    /// dependencies never will be (loudly: nothing waits in silence).
    fn start_ready_services(&mut self) {
        // An onboot task waits while services run only when `keel apply` added or changed
        // it: such tasks run now, one at a time in file order, as at boot.
        let task_busy = self.containers.values().any(|m| {
            m.config.lifecycle.kind == Kind::OnBoot
                && matches!(
                    m.state,
                    State::Running(_) | State::Stopping(_) | State::BackingOff { .. }
                )
        });
        let next_task = if task_busy {
            None
        } else {
            self.in_order(Kind::OnBoot).into_iter().find(|name| {
                self.containers
                    .get(name)
                    .is_some_and(|m| matches!(m.state, State::Waiting) && !m.held)
            })
        };
        for name in next_task.into_iter().chain(self.in_order(Kind::Service)) {
            let Some(m) = self.containers.get(&name) else {
                continue;
            };
            if !matches!(m.state, State::Waiting) || m.held || !self.image_ready(&m.config.image) {
                continue;
            }
            let mut pending = false;
            let mut never = None;
            for dep in &m.config.lifecycle.depends_on {
                match self.readiness(dep) {
                    Readiness::Met => {}
                    Readiness::Pending => pending = true,
                    Readiness::Never(why) => never = Some(why),
                }
            }
            if let Some(why) = never {
                log::error!("{name}: will not start: dependency {why}");
                if let Some(m) = self.containers.get_mut(&name) {
                    m.state = State::Failed(format!("dependency {why}"));
                }
            } else if !pending {
                self.start(&name);
            }
        }
    }

    /// During shutdown, stops every service no running service depends on.
    fn advance_stop(&mut self) {
        let mut still_running = false;
        let names: Vec<String> = self.containers.keys().cloned().collect();
        for name in &names {
            let Some(m) = self.containers.get(name) else {
                continue;
            };
            if m.config.lifecycle.kind == Kind::OnShutdown {
                continue;
            }
            match &m.state {
                State::Running(_) => {
                    still_running = true;
                    let has_running_dependent = self.containers.iter().any(|(other, o)| {
                        other != name
                            && matches!(o.state, State::Running(_) | State::Stopping(_))
                            && o.config
                                .lifecycle
                                .depends_on
                                .iter()
                                .any(|d| &d.name == name)
                    });
                    if !has_running_dependent {
                        self.send_stop(name, None);
                    }
                }
                State::Stopping(_) => still_running = true,
                State::Waiting | State::BackingOff { .. } => {
                    if let Some(m) = self.containers.get_mut(name) {
                        m.state = State::Stopped;
                    }
                }
                _ => {}
            }
        }
        if !still_running {
            self.phase = Phase::ShutdownTasks;
            if !self.in_order(Kind::OnShutdown).is_empty() {
                log::info!("services stopped; running onshutdown tasks");
            }
        }
    }

    fn start(&mut self, name: &str) {
        let Some(managed) = self.containers.get_mut(name) else {
            return;
        };
        if managed.instance.is_none() {
            match Instance::prepare(&self.runtime, name, &managed.config, managed.userns) {
                Ok(mut instance) => {
                    if managed.config.lifecycle.notify {
                        let path = self.runtime.paths.containers.join(name).join("notify.sock");
                        match crate::notify::listen(name, &path, self.events.clone()) {
                            Ok(path) => instance.set_notify_socket(path),
                            Err(e) => log::error!("{name}: notify socket {}: {e}", path.display()),
                        }
                    }
                    managed.instance = Some(instance);
                }
                Err(e) => {
                    log::error!("{name}: cannot be started: {e}");
                    managed.state = State::Failed(e);
                    return;
                }
            }
        }
        let log_sink = managed
            .log
            .get_or_insert_with(|| {
                let console = if managed.config.console {
                    self.console.clone()
                } else {
                    None
                };
                ContainerLog::open(name, &self.runtime.paths.logs, managed.config.logs, console)
            })
            .clone();
        let Some(instance) = managed.instance.as_mut() else {
            return;
        };
        if let Err(e) = instance.ensure_cgroup(&self.runtime) {
            log::error!("{name}: cannot be started: {e}");
            managed.state = State::Failed(e);
            return;
        }
        let instance = &*instance;
        let plan = match instance.plan(&mut self.runtime) {
            Ok(plan) => plan,
            Err(e) => {
                log::error!("{name}: cannot be started: {e}");
                managed.state = State::Failed(e);
                return;
            }
        };
        let Some(dev_null) = self.dev_null.as_ref() else {
            managed.state = State::Failed("no /dev/null for stdin".into());
            return;
        };
        // Leftovers of a previous run (possible when it shared the host pid namespace)
        // must not share the cgroup with the new one.
        if !instance.cgroup().is_empty() {
            let _ = instance.cgroup().kill_all();
        }
        let pipes = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).and_then(|out| {
            Ok((
                out,
                rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?,
            ))
        });
        let ((out_read, out_write), (err_read, err_write)) = match pipes {
            Ok(p) => p,
            Err(e) => {
                log::error!(
                    "{name}: cannot create output pipes: {}",
                    crate::fds::explain(&e.into())
                );
                self.after_exit_decision(name, ExitStatus::Code(127), Duration::ZERO);
                return;
            }
        };
        let stdio = [
            dev_null.as_raw_fd(),
            out_write.as_raw_fd(),
            err_write.as_raw_fd(),
        ];
        let oom_kills_before = instance
            .cgroup()
            .keyed("memory.events", "oom_kill")
            .unwrap_or(0);
        match instance.spawn(&plan, stdio) {
            Ok(spawned) => {
                drop((out_write, err_write));
                managed.generation += 1;
                let generation = managed.generation;
                log::info!("{name}: started pid={}", spawned.pid);
                if let Some(gate) = spawned.gate {
                    release_when_attached(&mut self.networks, name, spawned.pid, gate);
                }
                if let Err(e) = self.networks.set_published(name, true) {
                    log::error!("{name}: publishing its ports: {e}");
                }
                tokio::spawn(pump(log_sink.clone(), Stream::Stdout, out_read));
                tokio::spawn(pump(log_sink, Stream::Stderr, err_read));
                let steps = plan.steps.iter().map(Step::describe).collect();
                tokio::spawn(report_start_failure(
                    name.to_string(),
                    spawned.error_pipe,
                    steps,
                ));
                let health = managed.config.lifecycle.healthcheck.as_ref().map(|check| {
                    schedule(
                        &self.events,
                        Duration::from_millis(check.interval_ms),
                        Event::HealthDue {
                            name: name.to_string(),
                            generation,
                        },
                    );
                    HealthState::default()
                });
                managed.state = State::Running(Run {
                    pid: spawned.pid,
                    pidfd: spawned.pidfd,
                    since: Instant::now(),
                    generation,
                    oom_kills_before,
                    ready: !managed.config.lifecycle.notify,
                    health,
                });
            }
            Err(e) => {
                log::error!("{name}: clone3 failed: {}", crate::fds::explain(&e));
                self.after_exit_decision(name, ExitStatus::Code(127), Duration::ZERO);
            }
        }
    }

    fn schedule(&self, delay: Duration, event: Event) {
        schedule(&self.events, delay, event);
    }

    /// Sends a container its stop signal and arms the SIGKILL deadline.
    fn send_stop(&mut self, name: &str, timeout_override: Option<Duration>) {
        let Some(m) = self.containers.get_mut(name) else {
            return;
        };
        let State::Running(_) = &m.state else { return };
        let State::Running(run) = std::mem::replace(&mut m.state, State::Waiting) else {
            return;
        };
        let signal = m.instance.as_ref().map_or(
            m.config.lifecycle.stop_signal.unwrap_or(libc::SIGTERM),
            |i| i.stop_signal(),
        );
        let timeout =
            timeout_override.unwrap_or(Duration::from_millis(m.config.lifecycle.stop_timeout_ms));
        log::info!(
            "{name}: stopping: signal {signal} to pid {}, SIGKILL in {} ms",
            run.pid,
            timeout.as_millis()
        );
        if let Err(e) = send_signal(&run.pidfd, signal) {
            log::warn!("{name}: stop signal: {e}");
        }
        let generation = run.generation;
        m.state = State::Stopping(run);
        self.schedule(
            timeout,
            Event::StopDeadline {
                name: name.to_string(),
                generation,
            },
        );
    }

    /// Handles the exit of a reaped child; false when `pid` is not one of ours.
    pub fn on_exit(&mut self, pid: libc::pid_t, status: ExitStatus) -> bool {
        if self.on_pull_exit(pid, status) {
            return true;
        }
        if let Some(waiter) = self.execs.remove(&pid) {
            let code = match status {
                ExitStatus::Code(c) => c,
                ExitStatus::Signal(s) => 128 + s,
            };
            match waiter {
                ExecWaiter::Api(reply) => {
                    let _ = reply.send(code);
                }
                ExecWaiter::Probe {
                    name, generation, ..
                } => {
                    let detail = format!("exec probe {status}");
                    self.on_event(Event::HealthResult {
                        name,
                        generation,
                        passed: code == 0,
                        detail,
                    });
                }
            }
            return true;
        }
        let Some(name) = self
            .containers
            .iter()
            .find(|(_, m)| m.state.run().is_some_and(|r| r.pid == pid))
            .map(|(n, _)| n.clone())
        else {
            return false;
        };
        let Some(m) = self.containers.get_mut(&name) else {
            return false;
        };
        let run = match std::mem::replace(&mut m.state, State::Waiting) {
            State::Running(run) | State::Stopping(run) => run,
            other => {
                m.state = other;
                return false;
            }
        };
        if let Err(e) = self.networks.set_published(&name, false) {
            log::error!("{name}: withdrawing its ports: {e}");
        }
        let ran_for = run.since.elapsed();
        // The kernel's OOM killer sends SIGKILL: memory.events tells it from a kill -9.
        let oom_kills = m
            .instance
            .as_ref()
            .and_then(|i| i.cgroup().keyed("memory.events", "oom_kill"))
            .unwrap_or(0);
        let oom = oom_kills > run.oom_kills_before;
        if oom {
            let limit = m
                .config
                .resources
                .memory_max
                .map_or_else(|| "no limit".to_string(), |b| format!("memory.max {b}"));
            log::warn!(
                "{name}: out of memory: killed by the OOM killer ({limit}, oom_kill {oom_kills})"
            );
        }
        let text = if oom && status == ExitStatus::Signal(libc::SIGKILL) {
            "OOM-killed".to_string()
        } else {
            status.to_string()
        };
        m.last_exit = Some(if oom {
            format!("{status} (OOM)")
        } else {
            status.to_string()
        });
        if let Some(log) = &m.log {
            log.note(&format!("{text} after {} ms", ran_for.as_millis()));
        }
        let stopping_host = matches!(
            self.phase,
            Phase::Stopping | Phase::ShutdownTasks | Phase::Finished
        ) && m.config.lifecycle.kind != Kind::OnShutdown;
        if m.retire.is_some() && !stopping_host {
            // The apply removes or replaces it (advance_apply), cgroup and all.
            log::info!(
                "{name}: {text} after {} ms (stopped for keel apply)",
                ran_for.as_millis()
            );
            m.state = State::Stopped;
        } else if m.held || stopping_host {
            log::info!("{name}: {text} after {} ms (stopped)", ran_for.as_millis());
            m.state = State::Stopped;
            remove_cgroup(&name, m);
        } else if m.restart_requested {
            m.restart_requested = false;
            log::info!(
                "{name}: {text} after {} ms; restarting as requested",
                ran_for.as_millis()
            );
            m.state = State::Waiting;
            self.start(&name);
        } else {
            log::info!("{name}: {text} after {} ms", ran_for.as_millis());
            self.after_exit_decision(&name, status, ran_for);
        }
        self.advance();
        true
    }

    /// Applies the restart policy after an exit (or a failed start).
    fn after_exit_decision(&mut self, name: &str, status: ExitStatus, ran_for: Duration) {
        let Some(m) = self.containers.get_mut(name) else {
            return;
        };
        if status == ExitStatus::Code(0) {
            m.failures = 0;
        } else {
            m.failures += 1;
        }
        match decide(m.config.restart, status, m.failures) {
            Decision::Restart => {
                let delay = self.backoff.next(m.last_delay, ran_for);
                log::info!(
                    "{name}: restarting in {} ms (restart #{})",
                    delay.as_millis(),
                    m.restarts + 1
                );
                m.restarts += 1;
                m.last_delay = Some(delay);
                m.generation += 1;
                let generation = m.generation;
                m.state = State::BackingOff { generation };
                self.schedule(
                    delay,
                    Event::RestartDue {
                        name: name.to_string(),
                        generation,
                    },
                );
            }
            Decision::Done { completed } => {
                let code = match status {
                    ExitStatus::Code(c) => Some(c),
                    ExitStatus::Signal(_) => None,
                };
                if !completed {
                    log::info!("{name}: not restarting (restart = {:?})", m.config.restart);
                }
                m.state = State::Exited { code };
                remove_cgroup(name, m);
            }
            Decision::GiveUp => {
                log::error!(
                    "{name}: gave up after {} failed runs (restart = {:?})",
                    m.failures,
                    m.config.restart
                );
                m.state = State::Exited {
                    code: match status {
                        ExitStatus::Code(c) => Some(c),
                        ExitStatus::Signal(_) => None,
                    },
                };
                remove_cgroup(name, m);
            }
        }
    }

    pub fn on_event(&mut self, event: Event) {
        match event {
            Event::PullRetry { image } => {
                if let Some(pull) = self.pulls.get_mut(&image)
                    && pull.state == PullState::Waiting
                {
                    self.start_pulls();
                }
            }
            Event::RestartDue { name, generation } => {
                let due = self.containers.get(&name).is_some_and(
                    |m| matches!(m.state, State::BackingOff { generation: g } if g == generation),
                );
                if due
                    && matches!(
                        self.phase,
                        Phase::Boot | Phase::Running | Phase::ShutdownTasks
                    )
                {
                    self.start(&name);
                }
            }
            Event::StopDeadline { name, generation } => {
                if let Some(m) = self.containers.get(&name)
                    && let State::Stopping(run) = &m.state
                    && run.generation == generation
                {
                    log::warn!(
                        "{name}: did not stop within {} ms: killing its cgroup",
                        m.config.lifecycle.stop_timeout_ms
                    );
                    if let Some(i) = &m.instance
                        && let Err(e) = i.cgroup().kill_all()
                    {
                        log::warn!("{name}: cgroup.kill: {e}");
                        let _ = send_signal(&run.pidfd, libc::SIGKILL);
                    }
                }
            }
            Event::HealthDue { name, generation } => self.run_probe(&name, generation),
            Event::HealthResult {
                name,
                generation,
                passed,
                detail,
            } => self.on_health(&name, generation, passed, &detail),
            Event::Ready { name } => {
                if let Some(m) = self.containers.get_mut(&name)
                    && let State::Running(run) = &mut m.state
                    && !run.ready
                {
                    run.ready = true;
                    log::info!("{name}: ready (READY=1)");
                }
            }
        }
        self.advance();
    }

    fn run_probe(&mut self, name: &str, generation: u64) {
        let Some(m) = self.containers.get(name) else {
            return;
        };
        let (Some(check), State::Running(run)) = (m.config.lifecycle.healthcheck.clone(), &m.state)
        else {
            return;
        };
        if run.generation != generation {
            return;
        }
        let timeout = Duration::from_millis(check.timeout_ms);
        // A bridged container listens on its own network, out of the host's loopback.
        let addr = self
            .networks
            .attachment(name)
            .map_or(std::net::Ipv4Addr::LOCALHOST, |a| a.address);
        let events = self.events.clone();
        let owned_name = name.to_string();
        let reply = move |passed: bool, detail: String| {
            let _ = events.send(Event::HealthResult {
                name: owned_name.clone(),
                generation,
                passed,
                detail,
            });
        };
        match &check.probe {
            HealthProbe::Tcp { port } => {
                let port = *port;
                let reply = reply.clone();
                tokio::spawn(async move {
                    match crate::health::probe_tcp(addr, port, timeout).await {
                        Ok(()) => reply(true, String::new()),
                        Err(e) => reply(false, e),
                    }
                });
            }
            HealthProbe::Http { port, path } => {
                let (port, path) = (*port, path.clone());
                tokio::spawn(async move {
                    match crate::health::probe_http(addr, port, &path, timeout).await {
                        Ok(()) => reply(true, String::new()),
                        Err(e) => reply(false, e),
                    }
                });
            }
            HealthProbe::Exec(argv) => {
                let argv = argv.clone();
                match self.spawn_exec(name, &argv, &[], true) {
                    Ok((pid, pidfd, _, _)) => {
                        // A probe that outlives its timeout is killed; its exit reports the
                        // failure. The pidfd makes sure a reused pid is never hit.
                        tokio::spawn(async move {
                            tokio::time::sleep(timeout).await;
                            let _ = send_signal(&pidfd, libc::SIGKILL);
                        });
                        self.execs.insert(
                            pid,
                            ExecWaiter::Probe {
                                name: name.to_string(),
                                generation,
                            },
                        );
                    }
                    Err(e) => reply(false, e.to_string()),
                }
            }
        }
    }

    fn on_health(&mut self, name: &str, generation: u64, passed: bool, detail: &str) {
        let Some(m) = self.containers.get_mut(name) else {
            return;
        };
        let Some(check) = m.config.lifecycle.healthcheck.clone() else {
            return;
        };
        let State::Running(run) = &mut m.state else {
            return;
        };
        if run.generation != generation {
            return;
        }
        let since = run.since.elapsed();
        let Some(health) = run.health.as_mut() else {
            return;
        };
        if let Some(now) = health.record(passed, since, &check) {
            match now {
                Health::Unhealthy => log::warn!(
                    "{name}: unhealthy after {} failed checks: {detail}",
                    health.failures
                ),
                _ => log::info!("{name}: {}", now.as_str()),
            }
            if now == Health::Unhealthy && m.config.lifecycle.restart_on_unhealthy {
                log::warn!("{name}: restarting because it is unhealthy (restart_on_unhealthy)");
                m.restart_requested = true;
                self.send_stop(name, None);
            }
        }
        self.schedule(
            Duration::from_millis(check.interval_ms),
            Event::HealthDue {
                name: name.to_string(),
                generation,
            },
        );
    }

    /// Begins the orderly shutdown: dependents stop before what they depend on, then the
    /// onshutdown tasks run.
    pub fn shutdown(&mut self) {
        if matches!(
            self.phase,
            Phase::Stopping | Phase::ShutdownTasks | Phase::Finished
        ) {
            return;
        }
        self.phase = Phase::Stopping;
        if let Some(applying) = self.applying.take() {
            log::warn!("apply: interrupted by the shutdown");
            let _ = applying.done.send(ApplyOutcome {
                failed: Vec::new(),
                interrupted: Some("the host began shutting down before the apply finished".into()),
            });
        }
        // A task still running at shutdown (onboot) is stopped like a service.
        self.advance();
    }

    /// True once every service has stopped and every onshutdown task has run.
    pub fn finished(&self) -> bool {
        self.phase == Phase::Finished && self.running() == 0
    }

    /// Kills whatever is left of every container, each whole cgroup at once.
    pub fn kill_all(&mut self) {
        for (name, m) in &self.containers {
            if let (Some(_), Some(instance)) = (m.state.run(), &m.instance) {
                log::warn!("{name}: still running at the shutdown deadline: killing its cgroup");
                if let Err(e) = instance.cgroup().kill_all() {
                    log::warn!("{name}: {e}");
                }
            }
        }
        self.phase = Phase::Finished;
    }

    /// Number of containers whose main process has not been reaped yet.
    pub fn running(&self) -> usize {
        self.containers
            .values()
            .filter(|m| m.state.run().is_some())
            .count()
    }

    /// True once the boot tasks have run and the services that can start have started.
    pub fn booted(&self) -> bool {
        self.phase != Phase::Boot
    }

    // ---- control operations (the API) ----

    fn managed(&self, name: &str) -> Result<&Managed, ControlError> {
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
        if m.state.run().is_some() || matches!(m.state, State::BackingOff { .. }) {
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
            m.state = State::Waiting;
        }
        self.start(name);
        self.advance();
        match &self.managed(name)?.state {
            State::Failed(why) => Err(ControlError::Failed(why.clone())),
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
            State::Running(_) => {}
            State::BackingOff { .. } | State::Waiting => {
                if let Some(m) = self.containers.get_mut(name) {
                    m.held = true;
                    m.state = State::Stopped;
                }
                return Ok(());
            }
            State::Stopping(_) => return Ok(()),
            _ => return Err(ControlError::Conflict(format!("{name} is not running"))),
        }
        if let Some(m) = self.containers.get_mut(name) {
            m.held = true;
        }
        self.send_stop(name, timeout_ms.map(Duration::from_millis));
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

    /// Makes the running host follow `new`: removed containers stop (dependents first) and
    /// are forgotten, changed ones stop and start again with their new definition, added
    /// ones start when their dependencies allow, updated ones take their new supervision
    /// settings, and the rest is not touched (same process). A file with anything that
    /// cannot change live is refused whole, before anything changes; so is an apply while
    /// the host boots, shuts down, or is still finishing the previous apply.
    ///
    /// Returns once the change has begun; `done` resolves when the stops have completed and
    /// the new definitions have been started. With `dry_run`, only the plan.
    pub fn apply(&mut self, new: &HostConfig, dry_run: bool) -> Result<ApplyStarted, ApplyError> {
        match self.phase {
            Phase::Running => {}
            Phase::Boot => {
                return Err(ApplyError::Conflict(
                    "the host is still booting (its onboot tasks run): apply once it is ready"
                        .into(),
                ));
            }
            Phase::Halted => {
                return Err(ApplyError::Conflict(
                    "the boot halted (an onboot task with on_failure = \"halt\" failed) and no service runs: fix the host file and reboot".into(),
                ));
            }
            Phase::Stopping | Phase::ShutdownTasks | Phase::Finished => {
                return Err(ApplyError::Conflict("the host is shutting down".into()));
            }
        }
        if self.applying.is_some() {
            let pending: Vec<&str> = self
                .containers
                .iter()
                .filter(|(_, m)| m.retire.is_some())
                .map(|(n, _)| n.as_str())
                .collect();
            return Err(ApplyError::Conflict(format!(
                "the previous apply is still stopping {}; try again once it has finished",
                pending.join(", ")
            )));
        }
        let plan = apply::plan(&self.config, new);
        let mut refusals = apply::refusals(&self.config, new);
        refusals.extend(apply::missing_images(&self.config, new, &plan, |image| {
            // A boot pull of the running host file is known here, pulled or not yet: its
            // containers wait for it as they would at boot.
            if self.pulls.contains_key(image) {
                Ok(())
            } else {
                self.runtime.paths.open_image(image).map(drop)
            }
        }));
        if !refusals.is_empty() {
            return Err(ApplyError::Rejected(refusals));
        }
        if dry_run {
            return Ok(ApplyStarted {
                plan,
                warnings: Vec::new(),
                done: None,
            });
        }
        log::info!(
            "apply: {} added, {} removed, {} restarted, {} updated in place, {} unchanged",
            plan.added.len(),
            plan.removed.len(),
            plan.restarted.len(),
            plan.updated.len(),
            plan.unchanged.len()
        );
        let userns = self.userns_after(new, &plan);
        for name in &plan.removed {
            if let Some(m) = self.containers.get_mut(name) {
                m.retire = Some(Retire::Remove);
            }
        }
        for name in &plan.restarted {
            if let (Some(m), Some(c)) = (self.containers.get_mut(name), new.containers.get(name)) {
                m.retire = Some(Retire::Replace(
                    Box::new(c.clone()),
                    userns.get(name).copied(),
                ));
            }
        }
        // Only settings read later differ (or nothing but the file position): take them.
        for name in plan.updated.iter().chain(&plan.unchanged) {
            if let (Some(m), Some(c)) = (self.containers.get_mut(name), new.containers.get(name)) {
                m.config = c.clone();
            }
        }
        for name in &plan.added {
            if let Some(c) = new.containers.get(name) {
                self.containers.insert(
                    name.clone(),
                    Managed::new(c.clone(), userns.get(name).copied()),
                );
            }
        }
        // A boot pull of an image no longer named is not retried (a running one finishes).
        self.pulls.retain(|image, pull| {
            new.images.contains_key(image) || matches!(pull.state, PullState::Running { .. })
        });
        let mut warnings = Vec::new();
        for e in self.networks.set_members(new) {
            log::error!("container networks: {e}");
            warnings.push(format!("container networks: {e}"));
        }
        self.config = new.clone();
        let (done, outcome) = tokio::sync::oneshot::channel();
        self.applying = Some(Applying {
            starting: plan.starting(),
            done,
        });
        self.advance();
        Ok(ApplyStarted {
            plan,
            warnings,
            done: Some(outcome),
        })
    }

    /// User namespace ranges under the new file: containers that run on keep theirs, a
    /// replaced `auto` one keeps its own, and new ranges overlap none of those nor the
    /// ranges of containers still stopping.
    fn userns_after(&self, new: &HostConfig, plan: &Plan) -> BTreeMap<String, IdMap> {
        use keel_config::UserNamespace;
        let mut fixed = BTreeMap::new();
        let mut taken = Vec::new();
        for (name, m) in &self.containers {
            let Some(map) = m.userns else { continue };
            let still_auto = m.config.isolation.userns == Some(UserNamespace::Auto)
                && new
                    .containers
                    .get(name)
                    .is_some_and(|c| c.isolation.userns == Some(UserNamespace::Auto));
            if plan.removed.contains(name) || (plan.restarted.contains(name) && !still_auto) {
                taken.push(map);
            } else {
                fixed.insert(name.clone(), map);
            }
        }
        allocate_userns_around(&new.containers, &fixed, &taken)
    }

    /// Stops the containers an apply retires, dependents first, and removes or replaces
    /// each once its process is gone.
    fn advance_apply(&mut self) {
        let stopping: BTreeMap<String, Vec<String>> = self
            .containers
            .iter()
            .filter(|(_, m)| m.retire.is_some() && m.state.run().is_some())
            .map(|(name, m)| {
                let deps = m.config.lifecycle.depends_on.iter();
                (name.clone(), deps.map(|d| d.name.clone()).collect())
            })
            .collect();
        for name in apply::stoppable(&stopping) {
            if self
                .containers
                .get(&name)
                .is_some_and(|m| matches!(m.state, State::Running(_)))
            {
                self.send_stop(&name, None);
            }
        }
        let stopped: Vec<String> = self
            .containers
            .iter()
            .filter(|(_, m)| m.retire.is_some() && m.state.run().is_none())
            .map(|(name, _)| name.clone())
            .collect();
        for name in stopped {
            self.retire(&name);
        }
    }

    /// Removes a stopped container for good, or gives it its new definition.
    fn retire(&mut self, name: &str) {
        let dir = self.runtime.paths.containers.join(name);
        let Some(m) = self.containers.get_mut(name) else {
            return;
        };
        match m.retire.take() {
            None => {}
            Some(Retire::Remove) => {
                remove_cgroup(name, m);
                self.containers.remove(name);
                remove_container_dir(name, &dir);
                log::info!("{name}: removed (keel apply)");
            }
            Some(Retire::Replace(config, userns)) => {
                if let Some(instance) = m.instance.take() {
                    let cgroup = instance.cgroup();
                    if !cgroup.is_empty() {
                        let _ = cgroup.kill_all();
                    }
                    // Removed now if it is empty, so the new definition's limits start from
                    // scratch; one still emptying is reused, and its limits rewritten.
                    if let Err(e) = cgroup.remove()
                        && e.raw_os_error() != Some(libc::EBUSY)
                    {
                        log::warn!("{name}: removing cgroup {}: {e}", cgroup.path().display());
                    }
                }
                // A new container: a fresh writable layer, logs and counters.
                remove_container_dir(name, &dir);
                m.config = *config;
                m.userns = userns;
                m.state = State::Waiting;
                m.restarts = 0;
                m.failures = 0;
                m.last_delay = None;
                m.last_exit = None;
                m.held = false;
                m.restart_requested = false;
                m.log = None;
                log::info!("{name}: starting with its new definition (keel apply)");
            }
        }
    }

    /// Reports the apply in progress once nothing is left for it to stop.
    fn finish_apply(&mut self) {
        if self.applying.is_none() || self.containers.values().any(|m| m.retire.is_some()) {
            return;
        }
        let Some(applying) = self.applying.take() else {
            return;
        };
        let failed: Vec<(String, String)> = applying
            .starting
            .iter()
            .filter_map(|name| match &self.containers.get(name)?.state {
                State::Failed(why) => Some((name.clone(), why.clone())),
                _ => None,
            })
            .collect();
        log::info!(
            "apply: done{}",
            if failed.is_empty() {
                String::new()
            } else {
                format!(" ({} could not start)", failed.len())
            }
        );
        let _ = applying.done.send(ApplyOutcome {
            failed,
            interrupted: None,
        });
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
            "failure": match &m.state { State::Failed(why) => Some(why.clone()), _ => None },
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
    ) -> Result<ExecStarted, ControlError> {
        let (pid, _pidfd, stdout, stderr) = self.spawn_exec(name, argv, env, false)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.execs.insert(pid, ExecWaiter::Api(tx));
        let (Some(stdout), Some(stderr)) = (stdout, stderr) else {
            return Err(ControlError::Failed("exec output pipes".into()));
        };
        Ok(ExecStarted {
            pid,
            stdout,
            stderr,
            exit: rx,
        })
    }

    /// Starts an exec; with `quiet` its output goes to /dev/null (health probes).
    fn spawn_exec(
        &mut self,
        name: &str,
        argv: &[String],
        env: &[String],
        quiet: bool,
    ) -> Result<(libc::pid_t, OwnedFd, Option<OwnedFd>, Option<OwnedFd>), ControlError> {
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
        let (stdio, readers) = if quiet {
            ([dev_null.as_raw_fd(); 3], None)
        } else {
            let out = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
                .map_err(|e| ControlError::Failed(e.to_string()))?;
            let err = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
                .map_err(|e| ControlError::Failed(e.to_string()))?;
            let stdio = [dev_null.as_raw_fd(), out.1.as_raw_fd(), err.1.as_raw_fd()];
            (stdio, Some((out, err)))
        };
        let spawned = instance
            .spawn_exec(&mut self.runtime, &run.pidfd, argv, env, stdio)
            .map_err(ControlError::Failed)?;
        let steps: Vec<String> = Vec::new();
        tokio::spawn(report_start_failure(
            format!("{name} (exec)"),
            spawned.error_pipe,
            steps,
        ));
        let (stdout, stderr) = match readers {
            Some(((out_r, _out_w), (err_r, _err_w))) => (Some(out_r), Some(err_r)),
            None => (None, None),
        };
        Ok((spawned.pid, spawned.pidfd, stdout, stderr))
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

    /// Removes the cgroups of stopped containers (best effort, at the end of shutdown).
    /// Drops unpacked layers that no image of this host file uses (a host file changed
    /// since they were unpacked). Keeps everything if any image cannot be read: deleting
    /// a layer still needed costs an unpack, keeping an unneeded one only disk.
    fn collect_layer_garbage(&self) {
        // Images pulled at boot that the host file no longer names go first, with the
        // blobs only they used; their layers then go below.
        let pulled: std::collections::BTreeSet<String> = self.pulls.keys().cloned().collect();
        match keel_image::gc::collect_layout_garbage(&self.runtime.paths.pulled, &pulled) {
            Ok(c) if c == keel_image::gc::LayoutCollected::default() => {}
            Ok(c) => log::info!(
                "image store: removed {} images no longer named, {} blobs ({} KiB)",
                c.images,
                c.blobs,
                c.bytes / 1024
            ),
            Err(e) => log::warn!("image store: collecting garbage: {e}"),
        }
        let mut keep = std::collections::BTreeSet::new();
        let images: std::collections::BTreeSet<&String> =
            self.containers.values().map(|m| &m.config.image).collect();
        for image in images {
            if self.pulls.contains_key(image) {
                // Pulled again this boot; its layers are kept if it is already here.
                if let Ok(layout) = self.runtime.paths.open_pulled_image(image) {
                    keep.extend(
                        layout
                            .layers()
                            .into_iter()
                            .filter_map(|l| l.digest.strip_prefix("sha256:").map(str::to_string)),
                    );
                }
                continue;
            }
            match self.runtime.paths.open_image(image) {
                Ok(layout) => keep.extend(
                    layout
                        .layers()
                        .into_iter()
                        .filter_map(|l| l.digest.strip_prefix("sha256:").map(str::to_string)),
                ),
                Err(e) => {
                    log::warn!("layer store: not collected: {e}");
                    return;
                }
            }
        }
        match crate::store::collect_garbage(&self.runtime.paths.layers, &keep) {
            Ok(c) if c == crate::store::Collected::default() => {}
            Ok(c) => log::info!(
                "layer store: removed {} unused layers, {} partial unpacks, {} stale links",
                c.layers,
                c.partial,
                c.links
            ),
            Err(e) => log::warn!("layer store: collecting garbage: {e}"),
        }
    }

    /// Removes Keel's NAT table once no container runs.
    pub fn teardown_networks(&mut self) {
        if let Err(e) = self.networks.teardown() {
            log::warn!("container networks: {e}");
        }
    }

    pub fn remove_cgroups(&self) {
        for (name, m) in &self.containers {
            if let Some(i) = &m.instance
                && let Err(e) = i.cgroup().remove()
            {
                log::warn!(
                    "{name}: cannot remove cgroup {}: {e}",
                    i.cgroup().path().display()
                );
            }
        }
    }
}

/// Sends `event` back to the supervisor after `delay`.
fn schedule(events: &UnboundedSender<Event>, delay: Duration, event: Event) {
    let events = events.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let _ = events.send(event);
    });
}

fn send_signal(pidfd: &OwnedFd, signal: i32) -> std::io::Result<()> {
    // SAFETY: pidfd_send_signal on a pidfd we own, with no siginfo.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Kills whatever is left in a finished container's cgroup and removes it.
fn remove_cgroup(name: &str, managed: &Managed) {
    let Some(instance) = &managed.instance else {
        return;
    };
    let cgroup = instance.cgroup().clone();
    if !cgroup.is_empty() {
        let _ = cgroup.kill_all();
    }
    let name = name.to_string();
    // Killed processes leave the cgroup asynchronously; rmdir succeeds once they have.
    tokio::spawn(async move {
        let mut delay = Duration::from_millis(5);
        for _ in 0..12 {
            match cgroup.remove() {
                Ok(()) => return,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(e) => {
                    log::warn!(
                        "{name}: cannot remove cgroup {}: {e}",
                        cgroup.path().display()
                    );
                    return;
                }
            }
        }
        log::warn!(
            "{name}: cgroup {} still busy; left in place",
            cgroup.path().display()
        );
    });
}

/// Deletes a finished container's directory (overlay upper and work, mount point, notify
/// socket). Never through a mount: something still mounted on its root (not expected: the
/// overlay lives in the container's own mount namespace) keeps the directory.
fn remove_container_dir(name: &str, dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    let rootfs = dir.join("rootfs");
    if let (Ok(root), Ok(parent)) = (std::fs::metadata(&rootfs), std::fs::metadata(dir))
        && root.dev() != parent.dev()
    {
        log::warn!(
            "{name}: {} is still mounted; left in place",
            rootfs.display()
        );
        return;
    }
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            log::warn!("{name}: removing {}: {e}", dir.display());
        }
        _ => {}
    }
}

/// Where automatically allocated user namespace ranges start (like /etc/subuid's usual
/// first range), and how many ids each gets.
pub const AUTO_USERNS_START: u32 = 100_000;
pub const AUTO_USERNS_SIZE: u32 = 65_536;

/// Gives every container with a user namespace its id range: explicit maps as written,
/// `auto` ones the next free block of 65536 ids after AUTO_USERNS_START that overlaps no
/// other range. Containers are taken in name order, so a name keeps its range as long as
/// the set of user-namespaced containers before it does not change.
pub fn allocate_userns(containers: &BTreeMap<String, Container>) -> BTreeMap<String, IdMap> {
    allocate_userns_around(containers, &BTreeMap::new(), &[])
}

/// [`allocate_userns`] on a running host: the containers in `fixed` keep the ranges they
/// run with, and no new range overlaps those nor `taken` (ranges of containers still
/// stopping).
pub fn allocate_userns_around(
    containers: &BTreeMap<String, Container>,
    fixed: &BTreeMap<String, IdMap>,
    taken: &[IdMap],
) -> BTreeMap<String, IdMap> {
    use keel_config::UserNamespace;
    let mut out = BTreeMap::new();
    let span = |m: &IdMap| {
        [
            (u64::from(m.uid), u64::from(m.uid) + u64::from(m.size)),
            (u64::from(m.gid), u64::from(m.gid) + u64::from(m.size)),
        ]
    };
    let mut taken: Vec<(u64, u64)> = taken.iter().flat_map(span).collect();
    for (name, map) in fixed {
        if containers.contains_key(name) {
            out.insert(name.clone(), *map);
            taken.extend(span(map));
        }
    }
    for (name, c) in containers {
        if out.contains_key(name) {
            continue;
        }
        if let Some(UserNamespace::Map { uid, gid, size }) = c.isolation.userns {
            out.insert(name.clone(), IdMap { uid, gid, size });
            taken.push((u64::from(uid), u64::from(uid) + u64::from(size)));
            taken.push((u64::from(gid), u64::from(gid) + u64::from(size)));
        }
    }
    let mut next = u64::from(AUTO_USERNS_START);
    for (name, c) in containers {
        if c.isolation.userns != Some(UserNamespace::Auto) || out.contains_key(name) {
            continue;
        }
        let size = u64::from(AUTO_USERNS_SIZE);
        while let Some(&(_, end)) = taken
            .iter()
            .find(|(start, end)| next < *end && *start < next + size)
        {
            next = end.div_ceil(size) * size;
        }
        let Ok(base) = u32::try_from(next) else { break };
        if base.checked_add(AUTO_USERNS_SIZE).is_none() {
            log::error!("{name}: no free user namespace range left");
            break;
        }
        out.insert(
            name.clone(),
            IdMap {
                uid: base,
                gid: base,
                size: AUTO_USERNS_SIZE,
            },
        );
        taken.push((next, next + size));
        next += size;
    }
    out
}

/// How a process ended, as reaped by PID 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exited with code {c}"),
            ExitStatus::Signal(s) => {
                let name = nix::sys::signal::Signal::try_from(*s)
                    .map(|s| s.as_str())
                    .unwrap_or("unknown signal");
                write!(f, "killed by {name} ({s})")
            }
        }
    }
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

/// Logs why a child failed before its execve, if it did.
/// Boot pulls retry after 5 s, doubling up to 5 minutes: the registry may be coming up.
fn pull_backoff(failures: u32) -> Duration {
    Duration::from_secs((5u64 << failures.saturating_sub(1).min(6)).min(300))
}

/// Lets a held container go on once its network namespace is on its bridge. If that fails,
/// the gate is dropped and the container fails before its first step (and is restarted by
/// its policy like any other failure).
fn release_when_attached(
    networks: &mut ContainerNetworks,
    name: &str,
    pid: libc::pid_t,
    gate: crate::spawn::Gate,
) {
    let name = name.to_string();
    match networks.attach(&name, pid as u32) {
        Some(attach) => {
            tokio::spawn(async move {
                match attach.await {
                    Ok(()) => {
                        if let Err(e) = gate.open() {
                            log::error!("{name}: releasing it after network setup: {e}");
                        }
                    }
                    Err(e) => log::error!("{name}: network setup failed: {e}"),
                }
            });
        }
        None => {
            log::error!("{name}: held for a network it has none of");
        }
    }
}

async fn report_start_failure(name: String, pipe: OwnedFd, steps: Vec<String>) {
    if rustix::io::ioctl_fionbio(&pipe, true).is_err() {
        return;
    }
    // SAFETY: the fd stays open inside AsyncFd for as long as it is registered.
    let Ok(pipe) = (unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(pipe, tokio::io::Interest::READABLE)
    }) else {
        return;
    };
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < buf.len() {
        let Ok(mut guard) = pipe.readable().await else {
            return;
        };
        match guard.try_io(|fd| {
            rustix::io::read(fd.get_ref(), &mut buf[got..]).map_err(std::io::Error::from)
        }) {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => got += n,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Ok(Err(_)) => return,
            Err(_would_block) => {}
        }
    }
    if let Some(message) = describe_failure(&steps, &buf[..got]) {
        log::error!("{name}: container setup failed: {message}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_and_resets_after_a_long_run() {
        let b = Backoff::default();
        let short = Duration::from_millis(50);
        let mut d = b.next(None, short);
        assert_eq!(d, Duration::from_millis(100));
        for expected in [200, 400, 800, 1600] {
            d = b.next(Some(d), short);
            assert_eq!(d, Duration::from_millis(expected));
        }
        assert_eq!(
            b.next(Some(Duration::from_secs(50)), short),
            Duration::from_secs(60)
        );
        assert_eq!(
            b.next(Some(Duration::from_secs(60)), short),
            Duration::from_secs(60)
        );
        assert_eq!(
            b.next(Some(Duration::from_secs(60)), Duration::from_secs(11)),
            Duration::from_millis(100)
        );
    }

    fn with_userns(
        modes: &[(&str, Option<keel_config::UserNamespace>)],
    ) -> BTreeMap<String, Container> {
        let text = "[host]\nhostname = \"h\"\n[images.i]\nlayout = \"x\"\n";
        let mut config = HostConfig::parse(std::path::Path::new("h.toml"), text).unwrap();
        let template: Container = {
            let t = format!("{text}[containers.c]\nimage = \"i\"\n");
            HostConfig::parse(std::path::Path::new("h.toml"), &t)
                .unwrap()
                .containers["c"]
                .clone()
        };
        for (name, mode) in modes {
            let mut c = template.clone();
            c.isolation.userns = *mode;
            config.containers.insert(name.to_string(), c);
        }
        config.containers
    }

    #[test]
    fn user_namespace_ranges_never_overlap() {
        use keel_config::UserNamespace::{Auto, Map};
        let containers = with_userns(&[
            ("a", Some(Auto)),
            ("b", None),
            (
                "c",
                Some(Map {
                    uid: 165_536,
                    gid: 165_536,
                    size: 1000,
                }),
            ),
            ("d", Some(Auto)),
            ("e", Some(Auto)),
        ]);
        let maps = allocate_userns(&containers);
        assert!(!maps.contains_key("b"));
        assert_eq!(
            maps["a"],
            IdMap {
                uid: 100_000,
                gid: 100_000,
                size: 65_536
            }
        );
        assert_eq!(
            maps["c"],
            IdMap {
                uid: 165_536,
                gid: 165_536,
                size: 1000
            }
        );
        // 165536.. is taken by c, so d moves past it to the next aligned block.
        let mut ranges: Vec<(u32, u32)> = maps.values().map(|m| (m.uid, m.uid + m.size)).collect();
        ranges.sort();
        for pair in ranges.windows(2) {
            assert!(pair[0].1 <= pair[1].0, "overlap in {ranges:?}");
        }
        assert!(maps["d"].uid > 165_536 && maps["e"].uid > maps["d"].uid);
        // The same set gives the same ranges.
        assert_eq!(allocate_userns(&containers), maps);
    }

    #[test]
    fn running_containers_keep_their_ranges_and_new_ones_avoid_every_range_in_use() {
        use keel_config::UserNamespace::{Auto, Map};
        let containers = with_userns(&[("a", Some(Auto)), ("b", Some(Auto)), ("c", Some(Auto))]);
        let range = |uid| IdMap {
            uid,
            gid: uid,
            size: AUTO_USERNS_SIZE,
        };
        // b runs with a range a fresh allocation would give a; a is new; a range of a
        // container still stopping is taken too.
        let fixed: BTreeMap<String, IdMap> = [("b".to_string(), range(100_000))].into();
        let taken = [range(165_536)];
        let maps = allocate_userns_around(&containers, &fixed, &taken);
        assert_eq!(maps["b"], range(100_000));
        // Past both, at the next aligned block.
        assert_eq!(maps["a"], range(4 * AUTO_USERNS_SIZE));
        assert_eq!(maps["c"], range(5 * AUTO_USERNS_SIZE));
        // An explicit map is taken as written.
        let explicit = with_userns(&[(
            "e",
            Some(Map {
                uid: 500_000,
                gid: 500_000,
                size: 10,
            }),
        )]);
        assert_eq!(
            allocate_userns_around(&explicit, &BTreeMap::new(), &taken)["e"].uid,
            500_000
        );
    }

    const APPLY_BASE: &str = r#"
[host]
hostname = "h"

[images.box]
layout = "unused at run time"

[containers.a]
image = "box"
command = ["sleep", "1000"]
depends_on = ["network-online"]

[containers.b]
image = "box"
command = ["sleep", "2000"]
env = { MODE = "one" }
depends_on = ["network-online"]

[containers.c]
image = "box"
command = ["sleep", "3000"]
depends_on = ["network-online"]
"#;

    /// A supervisor over APPLY_BASE whose image store holds `box`, its network offline so
    /// that nothing starts.
    fn idle_supervisor(dir: &Path) -> Supervisor {
        // An OCI layout with one image, `box`, of no layers: enough for open_image.
        let images = dir.join("images");
        let blobs = images.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        let blob = |bytes: &str| {
            let digest = crate::state::sha256_hex(bytes.as_bytes());
            std::fs::write(blobs.join(&digest), bytes).unwrap();
            (format!("sha256:{digest}"), bytes.len())
        };
        let (config, config_size) = blob(
            r#"{"architecture":"amd64","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":[]}}"#,
        );
        let (manifest, manifest_size) = blob(&format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":{config_size}}},"layers":[]}}"#
        ));
        std::fs::write(
            images.join("index.json"),
            format!(
                r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{manifest}","size":{manifest_size},"annotations":{{"org.opencontainers.image.ref.name":"box"}}}}]}}"#
            ),
        )
        .unwrap();
        std::fs::write(
            images.join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        let paths = Paths {
            images,
            pulled: dir.join("pulled"),
            layers: dir.join("layers"),
            containers: dir.join("containers"),
            logs: dir.join("logs"),
            volumes: dir.join("volumes"),
        };
        let config = HostConfig::parse(Path::new("h.toml"), APPLY_BASE).unwrap();
        let (events, _) = tokio::sync::mpsc::unbounded_channel();
        Supervisor::new(&config, paths, Cgroup::at(dir.join("cgroup")), events, None)
    }

    fn names_and_states(s: &Supervisor) -> Vec<(String, &'static str)> {
        s.statuses()
            .into_iter()
            .map(|st| (st.name, st.state))
            .collect()
    }

    #[test]
    fn apply_refuses_whole_then_applies_the_plan() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = idle_supervisor(dir.path());
        let parse = |text: &str| HostConfig::parse(Path::new("apply:HOST.toml"), text).unwrap();
        let good = parse(
            &APPLY_BASE
                .replace("MODE = \"one\"", "MODE = \"two\"")
                .replace("[containers.c]", "[containers.d]"),
        );
        // Not while booting.
        assert!(matches!(
            s.apply(&good, true),
            Err(ApplyError::Conflict(m)) if m.contains("booting")
        ));
        s.set_phase(Phase::Running);

        // Refused whole: a boot-time setting, and an image the host does not have.
        let bad = parse(
            &APPLY_BASE.replace("hostname = \"h\"", "hostname = \"x\"").replace(
                "[containers.c]\nimage = \"box\"",
                "[images.ghost]\nlayout = \"/nonexistent\"\n\n[containers.c]\nimage = \"ghost\"",
            ),
        );
        let Err(ApplyError::Rejected(refusals)) = s.apply(&bad, false) else {
            panic!("accepted a file that cannot be applied");
        };
        let keys: Vec<&str> = refusals.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["host.hostname", "images.ghost"]);
        let before = vec![
            ("a".to_string(), "waiting"),
            ("b".to_string(), "waiting"),
            ("c".to_string(), "waiting"),
        ];
        assert_eq!(names_and_states(&s), before);
        assert_eq!(s.config().hostname, "h");

        // A dry run plans and changes nothing.
        let dry = s.apply(&good, true).unwrap();
        assert!(dry.done.is_none());
        assert_eq!(
            (
                dry.plan.unchanged,
                dry.plan.restarted,
                dry.plan.removed,
                dry.plan.added
            ),
            (
                vec!["a".into()],
                vec!["b".into()],
                vec!["c".into()],
                vec!["d".into()]
            )
        );
        assert_eq!(names_and_states(&s), before);

        // The real thing: nothing runs, so it is done at once.
        let mut started = s.apply(&good, false).unwrap();
        assert!(started.warnings.is_empty(), "{:?}", started.warnings);
        let outcome = started.done.as_mut().unwrap().try_recv().unwrap();
        assert_eq!(outcome, ApplyOutcome::default());
        assert_eq!(
            names_and_states(&s),
            [
                ("a".to_string(), "waiting"),
                ("b".to_string(), "waiting"),
                ("d".to_string(), "waiting")
            ]
        );
        assert_eq!(s.containers["b"].config.env["MODE"], "two");
        assert_eq!(s.config().containers.len(), 3);
        // Applying the same file again changes nothing.
        let again = s.apply(&good, false).unwrap();
        assert_eq!(again.plan.unchanged, ["a", "b", "d"]);
    }

    #[test]
    fn restart_policies_decide_like_docker() {
        use ExitStatus::{Code, Signal};
        let no = RestartPolicy::No;
        assert_eq!(decide(no, Code(0), 0), Decision::Done { completed: true });
        assert_eq!(decide(no, Code(1), 1), Decision::Done { completed: false });
        for p in [RestartPolicy::Always, RestartPolicy::UnlessStopped] {
            assert_eq!(decide(p, Code(0), 0), Decision::Restart);
            assert_eq!(decide(p, Signal(9), 5), Decision::Restart);
        }
        let on_failure = RestartPolicy::OnFailure { max: Some(2) };
        assert_eq!(
            decide(on_failure, Code(0), 0),
            Decision::Done { completed: true }
        );
        assert_eq!(decide(on_failure, Code(1), 1), Decision::Restart);
        assert_eq!(decide(on_failure, Signal(9), 2), Decision::Restart);
        assert_eq!(decide(on_failure, Code(1), 3), Decision::GiveUp);
        assert_eq!(
            decide(RestartPolicy::OnFailure { max: None }, Code(1), 1000),
            Decision::Restart
        );
    }

    #[test]
    fn exit_statuses_read_well() {
        assert_eq!(ExitStatus::Code(3).to_string(), "exited with code 3");
        assert_eq!(ExitStatus::Signal(9).to_string(), "killed by SIGKILL (9)");
    }
}
