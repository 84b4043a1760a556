//! The host's phases: boot tasks, services in dependency order, the ordered stop and the
//! shutdown tasks.

use super::*;

/// Whether a dependency is met, pending, or can never be met.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Readiness {
    Met,
    Pending,
    Never(String),
}

impl Supervisor {
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Unit tests drive the apply logic without starting anything (no root).
    #[cfg(test)]
    pub(super) fn set_phase(&mut self, phase: Phase) {
        self.phase = phase;
    }

    /// Starts the boot: onboot tasks in file order, then the services.
    pub fn start_all(&mut self) {
        self.collect_layer_garbage();
        self.tidy_volume_store();
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
    pub(super) fn in_order(&self, kind: Kind) -> Vec<String> {
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
    pub(super) fn advance(&mut self) {
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
    pub(super) fn snapshot(&self) -> (Phase, Vec<(&'static str, u64)>) {
        (
            self.phase,
            self.containers
                .values()
                .map(|m| (m.state.name(), m.generation))
                .collect(),
        )
    }

    /// Runs the tasks of `kind` one at a time in file order.
    pub(super) fn advance_tasks(&mut self, kind: Kind) {
        for name in self.in_order(kind) {
            let Some(m) = self.containers.get(&name) else {
                continue;
            };
            match &m.state {
                ContainerState::Waiting => {
                    // A task whose image is still being pulled holds the sequence.
                    if self.image_ready(&m.config.image) {
                        self.start(&name);
                    }
                    return;
                }
                ContainerState::Running(_)
                | ContainerState::Stopping(_)
                | ContainerState::BackingOff { .. } => return,
                ContainerState::Exited { code: Some(0) } | ContainerState::Stopped => continue,
                ContainerState::Exited { .. } | ContainerState::Failed(_) => {
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

    pub(super) fn readiness(&self, dep: &Dependency) -> Readiness {
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
            (ContainerState::Running(run), Condition::Started) if run.ready => Readiness::Met,
            (ContainerState::Running(run), Condition::Healthy)
                if run
                    .health
                    .as_ref()
                    .is_some_and(|h| h.health == Health::Healthy) =>
            {
                Readiness::Met
            }
            (ContainerState::Exited { code: Some(0) }, Condition::CompletedSuccessfully) => {
                Readiness::Met
            }
            (ContainerState::Exited { code }, _)
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
            (ContainerState::Failed(why), _) => {
                Readiness::Never(format!("{} failed: {why}", dep.name))
            }
            (ContainerState::Stopped, _) => Readiness::Pending,
            _ => Readiness::Pending,
        }
    }

    /// Starts every waiting service whose dependencies are met; fails the ones whose
    /// dependencies never will be (loudly: nothing waits in silence).
    pub(super) fn start_ready_services(&mut self) {
        // An onboot task waits while services run only when `keel apply` added or changed
        // it: such tasks run now, one at a time in file order, as at boot.
        let task_busy = self.containers.values().any(|m| {
            m.config.lifecycle.kind == Kind::OnBoot
                && matches!(
                    m.state,
                    ContainerState::Running(_)
                        | ContainerState::Stopping(_)
                        | ContainerState::BackingOff { .. }
                )
        });
        let next_task = if task_busy {
            None
        } else {
            self.in_order(Kind::OnBoot).into_iter().find(|name| {
                self.containers
                    .get(name)
                    .is_some_and(|m| matches!(m.state, ContainerState::Waiting) && !m.held)
            })
        };
        for name in next_task.into_iter().chain(self.in_order(Kind::Service)) {
            let Some(m) = self.containers.get(&name) else {
                continue;
            };
            if !matches!(m.state, ContainerState::Waiting)
                || m.held
                || !self.image_ready(&m.config.image)
            {
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
                    m.state = ContainerState::Failed(format!("dependency {why}"));
                }
            } else if !pending {
                self.start(&name);
            }
        }
    }

    /// During shutdown, stops every service no running service depends on.
    pub(super) fn advance_stop(&mut self) {
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
                ContainerState::Running(_) => {
                    still_running = true;
                    let has_running_dependent = self.containers.iter().any(|(other, o)| {
                        other != name
                            && matches!(
                                o.state,
                                ContainerState::Running(_) | ContainerState::Stopping(_)
                            )
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
                ContainerState::Stopping(_) => still_running = true,
                ContainerState::Waiting | ContainerState::BackingOff { .. } => {
                    if let Some(m) = self.containers.get_mut(name) {
                        m.state = ContainerState::Stopped;
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

    /// True once the boot tasks have run and the services that can start have started: no
    /// image is still being unpacked and no new volume filled for them (boot pulls, which
    /// wait for the network and may take minutes, are not waited for).
    pub fn booted(&self) -> bool {
        self.phase != Phase::Boot && !self.unpacking() && !self.populating()
    }

    // ---- control operations (the API) ----
}
