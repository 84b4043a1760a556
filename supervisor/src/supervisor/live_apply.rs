//! `keel apply`: changing the containers of a running host to a new host file.

use super::*;

/// A `keel apply` whose stops are still under way.
pub(super) struct Applying {
    /// Added and restarted containers, to report those that could not start.
    pub(super) starting: Vec<String>,
    pub(super) done: tokio::sync::oneshot::Sender<ApplyOutcome>,
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
    pub plan: ApplyPlan,
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

impl Supervisor {
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
                self.runtime
                    .paths
                    .open_image(image)
                    .map(drop)
                    .map_err(|e| e.to_string())
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
        // An image whose definition changed gets a new unpack if its last one failed (its
        // layers are looked up afresh anyway).
        let changed_images: Vec<String> = new
            .images
            .iter()
            .filter(|(name, image)| self.config.images.get(*name) != Some(*image))
            .map(|(name, _)| name.clone())
            .collect();
        for image in &changed_images {
            self.retry_failed_unpacks(image);
        }
        self.retry_failed_populates();
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
    pub(super) fn userns_after(
        &self,
        new: &HostConfig,
        plan: &ApplyPlan,
    ) -> BTreeMap<String, IdMap> {
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
    pub(super) fn advance_apply(&mut self) {
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
                .is_some_and(|m| matches!(m.state, ContainerState::Running(_)))
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
    pub(super) fn retire(&mut self, name: &str) {
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
                self.discard_anonymous_volumes(name);
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
                m.state = ContainerState::Waiting;
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
    pub(super) fn finish_apply(&mut self) {
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
                ContainerState::Failed(why) => Some((name.clone(), why.clone())),
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
}
