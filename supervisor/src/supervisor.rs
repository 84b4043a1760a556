//! The supervision state machine: start, watch, restart with backoff, stop.
//!
//! The supervisor never waits for children itself. PID 1 owns reaping (one `waitpid(-1)`
//! loop for every child, containers and orphans alike) and hands each container exit to
//! [`Supervisor::on_exit`]; restarts come back through the event channel as
//! [`Event::RestartDue`]. Everything runs on PID 1's single thread.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_config::{Container, HostConfig, RestartPolicy};
use tokio::sync::mpsc::UnboundedSender;

use crate::cgroup::Cgroup;
use crate::instance::{Instance, Runtime};
use crate::logs::{Console, pump};
use crate::spawn::{IdMap, Step, describe_failure};

/// Where the supervisor finds images and keeps its state in the guest.
#[derive(Debug, Clone)]
pub struct Paths {
    /// OCI image layouts, one directory per image name.
    pub images: PathBuf,
    /// Unpacked layers shared by every container of an image.
    pub layers: PathBuf,
    /// Per-container overlay upper, work and mount point directories.
    pub containers: PathBuf,
    pub logs: PathBuf,
    /// Named volumes, one directory each, created on first use.
    pub volumes: PathBuf,
}

impl Default for Paths {
    fn default() -> Paths {
        Paths {
            images: "/usr/share/keel/images".into(),
            layers: "/var/lib/keel/layers".into(),
            containers: "/run/keel/containers".into(),
            logs: "/var/log/keel".into(),
            volumes: "/var/lib/keel/volumes".into(),
        }
    }
}

/// Something the supervisor scheduled for itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    RestartDue { name: String, generation: u64 },
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

#[derive(Debug)]
enum State {
    /// Not started yet, or stopped for good.
    Idle,
    Running {
        pid: libc::pid_t,
        pidfd: OwnedFd,
        since: Instant,
        /// memory.events oom_kill when it started, to tell an OOM kill from a kill -9.
        oom_kills_before: u64,
    },
    BackingOff {
        generation: u64,
    },
    /// Will not run again: its policy says so, or it cannot be prepared.
    Done,
}

struct Managed {
    config: Container,
    prepared: Option<Instance>,
    /// The container's user namespace range, if it has one.
    userns: Option<IdMap>,
    state: State,
    restarts: u64,
    last_delay: Option<Duration>,
    generation: u64,
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
    use keel_config::UserNamespace;
    let mut out = BTreeMap::new();
    let mut taken: Vec<(u64, u64)> = Vec::new();
    for (name, c) in containers {
        if let Some(UserNamespace::Map { uid, gid, size }) = c.isolation.userns {
            out.insert(name.clone(), IdMap { uid, gid, size });
            taken.push((u64::from(uid), u64::from(uid) + u64::from(size)));
            taken.push((u64::from(gid), u64::from(gid) + u64::from(size)));
        }
    }
    let mut next = u64::from(AUTO_USERNS_START);
    for (name, c) in containers {
        if c.isolation.userns != Some(UserNamespace::Auto) {
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

pub struct Supervisor {
    runtime: Runtime,
    events: UnboundedSender<Event>,
    console: Option<Arc<Console>>,
    dev_null: Option<OwnedFd>,
    backoff: Backoff,
    containers: BTreeMap<String, Managed>,
    stopping: bool,
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
                (
                    name.clone(),
                    Managed {
                        config: c.clone(),
                        prepared: None,
                        userns: userns.get(name).copied(),
                        state: State::Idle,
                        restarts: 0,
                        last_delay: None,
                        generation: 0,
                    },
                )
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
            stopping: false,
        }
    }

    /// Starts every container. A container that fails to start is logged and does not
    /// stop the others.
    pub fn start_all(&mut self) {
        for dir in [
            &self.runtime.paths.layers,
            &self.runtime.paths.containers,
            &self.runtime.paths.logs,
        ] {
            if let Err(e) = std::fs::create_dir_all(dir) {
                log::error!("cannot create {}: {e}", dir.display());
            }
        }
        let names: Vec<String> = self.containers.keys().cloned().collect();
        for name in names {
            self.start(&name);
        }
    }

    fn start(&mut self, name: &str) {
        if self.stopping {
            return;
        }
        let Some(managed) = self.containers.get_mut(name) else {
            return;
        };
        if managed.prepared.is_none() {
            match Instance::prepare(&self.runtime, name, &managed.config, managed.userns) {
                Ok(p) => managed.prepared = Some(p),
                Err(e) => {
                    log::error!("{name}: cannot be started: {e}");
                    managed.state = State::Done;
                    return;
                }
            }
        }
        let Some(prepared) = managed.prepared.as_ref() else {
            return;
        };
        let plan = match prepared.plan(&mut self.runtime) {
            Ok(plan) => plan,
            Err(e) => {
                log::error!("{name}: cannot be started: {e}");
                managed.state = State::Done;
                return;
            }
        };
        let Some(dev_null) = self.dev_null.as_ref() else {
            log::error!("{name}: cannot be started without /dev/null");
            managed.state = State::Done;
            return;
        };
        // Leftovers of a previous run (possible when it shared the host pid namespace)
        // must not share the cgroup with the new one.
        if !prepared.cgroup().is_empty() {
            let _ = prepared.cgroup().kill_all();
        }
        let (out_read, out_write) = match rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        {
            Ok(p) => p,
            Err(e) => {
                log::error!("{name}: cannot create the output pipe: {e}");
                self.schedule_restart(name, Duration::ZERO);
                return;
            }
        };
        let stdio = [
            dev_null.as_raw_fd(),
            out_write.as_raw_fd(),
            out_write.as_raw_fd(),
        ];
        let oom_kills_before = prepared
            .cgroup()
            .keyed("memory.events", "oom_kill")
            .unwrap_or(0);
        match prepared.spawn(&plan, stdio) {
            Ok(spawned) => {
                drop(out_write);
                log::info!("{name}: started pid={}", spawned.pid);
                let log_path = self.runtime.paths.logs.join(format!("{name}.log"));
                let console = if managed.config.console {
                    self.console.clone()
                } else {
                    None
                };
                tokio::spawn(pump(name.to_string(), out_read, log_path, console));
                let steps = plan.steps.iter().map(Step::describe).collect();
                tokio::spawn(report_start_failure(
                    name.to_string(),
                    spawned.error_pipe,
                    steps,
                ));
                managed.state = State::Running {
                    pid: spawned.pid,
                    pidfd: spawned.pidfd,
                    since: Instant::now(),
                    oom_kills_before,
                };
            }
            Err(e) => {
                log::error!("{name}: clone3 failed: {e}");
                self.schedule_restart(name, Duration::ZERO);
            }
        }
    }

    /// Counters of every container, for the log or an API.
    pub fn stats(&self) -> Vec<(String, Stats)> {
        self.containers
            .iter()
            .map(|(name, m)| {
                let (state, pid) = match &m.state {
                    State::Idle => ("idle", None),
                    State::Running { pid, .. } => ("running", Some(*pid)),
                    State::BackingOff { .. } => ("restarting", None),
                    State::Done => ("stopped", None),
                };
                let mut stats = Stats {
                    state,
                    pid,
                    restarts: m.restarts,
                    ..Stats::default()
                };
                if let Some(p) = &m.prepared {
                    let cg = p.cgroup();
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

    /// Handles the exit of a reaped child; false when `pid` is not a container's main process.
    pub fn on_exit(&mut self, pid: libc::pid_t, status: ExitStatus) -> bool {
        let Some((name, managed)) = self
            .containers
            .iter_mut()
            .find(|(_, m)| matches!(m.state, State::Running { pid: p, .. } if p == pid))
        else {
            return false;
        };
        let name = name.clone();
        let (ran_for, oom_kills_before) = match &managed.state {
            State::Running {
                since,
                oom_kills_before,
                ..
            } => (since.elapsed(), *oom_kills_before),
            _ => (Duration::ZERO, 0),
        };
        managed.state = State::Idle;
        // The kernel's OOM killer sends SIGKILL: memory.events tells it from a kill -9.
        let oom_kills = managed
            .prepared
            .as_ref()
            .and_then(|p| p.cgroup().keyed("memory.events", "oom_kill"))
            .unwrap_or(0);
        if oom_kills > oom_kills_before {
            let limit = managed
                .config
                .resources
                .memory_max
                .map_or_else(|| "no limit".to_string(), |m| format!("memory.max {m}"));
            log::warn!(
                "{name}: out of memory: killed by the OOM killer ({limit}, oom_kill {oom_kills})"
            );
        }
        let status_text =
            if status == ExitStatus::Signal(libc::SIGKILL) && oom_kills > oom_kills_before {
                "OOM-killed".to_string()
            } else {
                status.to_string()
            };
        let status = status_text;
        if self.stopping {
            log::info!(
                "{name}: {status} after {} ms (stopped)",
                ran_for.as_millis()
            );
            managed.state = State::Done;
            remove_cgroup(&name, managed);
            return true;
        }
        match managed.config.restart {
            RestartPolicy::No => {
                log::info!(
                    "{name}: {status} after {} ms; restart policy \"no\": not restarting",
                    ran_for.as_millis()
                );
                managed.state = State::Done;
                remove_cgroup(&name, managed);
            }
            RestartPolicy::Always
            | RestartPolicy::UnlessStopped
            | RestartPolicy::OnFailure { .. } => {
                let delay = self.backoff.next(managed.last_delay, ran_for);
                log::info!(
                    "{name}: {status} after {} ms; restarting in {} ms (restart #{})",
                    ran_for.as_millis(),
                    delay.as_millis(),
                    managed.restarts + 1
                );
                self.schedule_restart(&name, delay);
            }
        }
        true
    }

    fn schedule_restart(&mut self, name: &str, delay: Duration) {
        let Some(managed) = self.containers.get_mut(name) else {
            return;
        };
        managed.generation += 1;
        managed.restarts += 1;
        managed.last_delay = Some(delay.max(self.backoff.initial));
        let generation = managed.generation;
        managed.state = State::BackingOff { generation };
        let events = self.events.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = events.send(Event::RestartDue { name, generation });
        });
    }

    pub fn on_event(&mut self, event: Event) {
        match event {
            Event::RestartDue { name, generation } => {
                let due = self.containers.get(&name).is_some_and(
                    |m| matches!(m.state, State::BackingOff { generation: g } if g == generation),
                );
                if due {
                    self.start(&name);
                }
            }
        }
    }

    /// Begins an orderly stop: no more restarts, SIGTERM to every container's main process.
    pub fn stop_all(&mut self) {
        self.stopping = true;
        for (name, managed) in &mut self.containers {
            match &managed.state {
                State::Running { pidfd, pid, .. } => {
                    log::info!("{name}: sending SIGTERM to pid {pid}");
                    if let Err(e) =
                        rustix::process::pidfd_send_signal(pidfd, rustix::process::Signal::TERM)
                    {
                        log::warn!("{name}: SIGTERM failed: {e}");
                    }
                }
                State::BackingOff { .. } | State::Idle => managed.state = State::Done,
                State::Done => {}
            }
        }
    }

    /// Kills whatever is left of every container, its whole cgroup at once.
    pub fn kill_all(&mut self) {
        for (name, managed) in &self.containers {
            if let (State::Running { .. }, Some(prepared)) = (&managed.state, &managed.prepared) {
                log::warn!("{name}: still running after the stop timeout: killing its cgroup");
                if let Err(e) = prepared.cgroup().kill_all() {
                    log::warn!("{name}: {e}");
                }
            }
        }
    }

    /// Number of containers whose main process has not been reaped yet.
    pub fn running(&self) -> usize {
        self.containers
            .values()
            .filter(|m| matches!(m.state, State::Running { .. }))
            .count()
    }

    /// Removes the cgroups of stopped containers (best effort, at shutdown).
    pub fn remove_cgroups(&self) {
        for (name, managed) in &self.containers {
            if let Some(prepared) = &managed.prepared
                && let Err(e) = prepared.cgroup().remove()
            {
                log::warn!(
                    "{name}: cannot remove cgroup {}: {e}",
                    prepared.cgroup().path().display()
                );
            }
        }
    }
}

/// Kills whatever is left in a finished container's cgroup and removes it.
fn remove_cgroup(name: &str, managed: &Managed) {
    let Some(prepared) = &managed.prepared else {
        return;
    };
    let cgroup = prepared.cgroup().clone();
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

/// Logs why a child failed before its execve, if it did.
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
    fn exit_statuses_read_well() {
        assert_eq!(ExitStatus::Code(3).to_string(), "exited with code 3");
        assert_eq!(ExitStatus::Signal(9).to_string(), "killed by SIGKILL (9)");
    }
}
