//! What happens when a container's process exits: the restart policy's decision, the
//! failure of a boot task, the end of a stop.

use super::*;

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

impl Supervisor {
    /// Handles the exit of a reaped child; false when `pid` is not one of ours.
    pub fn on_exit(&mut self, pid: libc::pid_t, status: ExitStatus) -> bool {
        if self.on_pull_exit(pid, status)
            || self.on_unpack_exit(pid, status)
            || self.on_volume_helper_exit(pid, status)
        {
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
        let run = match std::mem::replace(&mut m.state, ContainerState::Waiting) {
            ContainerState::Running(run) | ContainerState::Stopping(run) => run,
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
            m.state = ContainerState::Stopped;
        } else if m.held || stopping_host {
            log::info!("{name}: {text} after {} ms (stopped)", ran_for.as_millis());
            m.state = ContainerState::Stopped;
            remove_cgroup(&name, m);
        } else if m.restart_requested {
            m.restart_requested = false;
            log::info!(
                "{name}: {text} after {} ms; restarting as requested",
                ran_for.as_millis()
            );
            m.state = ContainerState::Waiting;
            self.start(&name);
        } else {
            log::info!("{name}: {text} after {} ms", ran_for.as_millis());
            self.after_exit_decision(&name, status, ran_for);
        }
        self.advance();
        true
    }

    /// Applies the restart policy after an exit (or a failed start).
    pub(super) fn after_exit_decision(
        &mut self,
        name: &str,
        status: ExitStatus,
        ran_for: Duration,
    ) {
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
                m.state = ContainerState::BackingOff { generation };
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
                m.state = ContainerState::Exited { code };
                remove_cgroup(name, m);
            }
            Decision::GiveUp => {
                log::error!(
                    "{name}: gave up after {} failed runs (restart = {:?})",
                    m.failures,
                    m.config.restart
                );
                m.state = ContainerState::Exited {
                    code: match status {
                        ExitStatus::Code(c) => Some(c),
                        ExitStatus::Signal(_) => None,
                    },
                };
                remove_cgroup(name, m);
            }
        }
    }
}
