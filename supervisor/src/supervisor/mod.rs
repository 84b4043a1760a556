//! The supervision state machine: boot tasks, dependencies, starts, health, restarts with
//! backoff, ordered stops and shutdown tasks, and the control operations behind the API.
//!
//! The supervisor never waits for children itself. PID 1 owns reaping (one `waitpid(-1)`
//! loop for every child: containers, execs and orphans alike) and hands each exit to
//! [`Supervisor::on_exit`]; timers, health results and sd_notify readiness come back
//! through the event channel as [`Event`]s. Everything runs on PID 1's single thread.
//!
//! One file per idea: [`policy`] (restart decisions, backoff), [`managed`] (what is known of
//! each container), [`phases`] (boot tasks, services in dependency order, ordered stop),
//! [`launch`] (starting a process, sending its stop signal), [`exits`] (what an exit means),
//! [`probes`] (health checks), [`pulls`] (images pulled at boot), [`live_apply`] (`keel
//! apply`), [`control`] (the API's operations), [`userns`] (id range allocation) and
//! [`cleanup`]. This file holds the state they share and the event dispatch.

mod cleanup;
mod control;
mod exits;
mod helpers;
mod launch;
mod live_apply;
mod managed;
mod phases;
mod policy;
mod probes;
mod pulls;
mod unpacks;
mod userns;
mod volumes;

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_config::{
    Condition, Container, Dependency, HealthProbe, HostConfig, Kind, RestartPolicy, TaskFailure,
};
use keel_net::ContainerNetworks;
use tokio::sync::mpsc::UnboundedSender;

use crate::apply::{self, ApplyPlan, Refusal};
use crate::cgroup::Cgroup;
use crate::events::Event;
use crate::health::{Health, HealthState};
use crate::instance::{Instance, Runtime, StartError, Started};
use crate::logs::{Console, ContainerLog, Stream, pump};
use crate::paths::Paths;
use crate::setup_error::SetupError;
use crate::spawn::{IdMap, describe_failure};

pub use control::{ControlError, ExecOutput, ExecStarted, ExecStdio, Stats, Status};
pub use exits::ExitStatus;
pub use live_apply::{ApplyError, ApplyOutcome, ApplyStarted};
pub use policy::{Backoff, Decision, decide};
pub use userns::{allocate_userns, allocate_userns_around};

use cleanup::*;
use control::{ExecWaiter, SpawnedExec};
use helpers::*;
use launch::*;
use live_apply::Applying;
use managed::*;
use pulls::*;
use unpacks::*;
use volumes::*;

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
    /// Images whose layers are (being) unpacked by a helper process, by image and id shift.
    unpacks: BTreeMap<UnpackKey, UnpackState>,
    /// New volumes being filled from their image, by volume directory.
    populates: BTreeMap<std::path::PathBuf, PopulateState>,
    /// The helper emptying the volume trash, and whether it must run again when done.
    trash_helper: Option<Helper>,
    trash_again: bool,
    /// Numbers the helper processes.
    helper_serial: u64,
    /// The host file in force: the booted one, then the last one applied.
    config: HostConfig,
    applying: Option<Applying>,
}

/// Sends `event` back to the supervisor after `delay`.
fn schedule(events: &UnboundedSender<Event>, delay: Duration, event: Event) {
    let events = events.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let _ = events.send(event);
    });
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
            unpacks: BTreeMap::new(),
            populates: BTreeMap::new(),
            trash_helper: None,
            trash_again: false,
            helper_serial: 0,
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

    pub fn on_event(&mut self, event: Event) {
        match event {
            Event::HelperTimeout { serial } => self.helper_timed_out(serial),
            Event::PullRetry { image } => {
                if let Some(pull) = self.pulls.get_mut(&image)
                    && pull.state == PullState::Waiting
                {
                    self.start_pulls();
                }
            }
            Event::RestartDue { name, generation } => {
                let due = self.containers.get(&name).is_some_and(
                    |m| matches!(m.state, ContainerState::BackingOff { generation: g } if g == generation),
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
                    && let ContainerState::Stopping(run) = &m.state
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
            Event::Ready { name, queued } => {
                queued.taken();
                if let Some(m) = self.containers.get_mut(&name)
                    && let ContainerState::Running(run) = &mut m.state
                    && !run.ready
                {
                    run.ready = true;
                    log::info!("{name}: ready (READY=1)");
                }
            }
        }
        self.advance();
    }
}

#[cfg(test)]
mod tests {
    use super::userns::AUTO_USERNS_SIZE;
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
            let digest: String =
                sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(bytes))
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
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
