//! Health probes: running them on schedule and acting on their results.

use super::*;

impl Supervisor {
    pub(super) fn run_probe(&mut self, name: &str, generation: u64) {
        let Some(m) = self.containers.get(name) else {
            return;
        };
        let (Some(check), ContainerState::Running(run)) =
            (m.config.lifecycle.healthcheck.clone(), &m.state)
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
                match self.spawn_exec(name, &argv, &[], ExecStdio::Quiet) {
                    Ok(SpawnedExec { pid, pidfd, .. }) => {
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

    pub(super) fn on_health(&mut self, name: &str, generation: u64, passed: bool, detail: &str) {
        let Some(m) = self.containers.get_mut(name) else {
            return;
        };
        let Some(check) = m.config.lifecycle.healthcheck.clone() else {
            return;
        };
        let ContainerState::Running(run) = &mut m.state else {
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
}
