//! Starting a container's process (cgroup, plan, clone3, output pumps, network gate) and
//! sending its stop signal.

use super::*;

pub(super) fn send_signal(pidfd: &OwnedFd, signal: i32) -> std::io::Result<()> {
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

/// Lets a held container go on once its network namespace is on its bridge. If that fails,
/// the gate is dropped and the container fails before its first step (and is restarted by
/// its policy like any other failure).
pub(super) fn release_when_attached(
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

/// Logs why a child failed before its execve, if it did.
pub(super) async fn report_start_failure(name: String, pipe: OwnedFd, steps: Vec<String>) {
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

impl Supervisor {
    /// Gives `name` its instance (layers looked up, directories and cgroup made) unless it
    /// has one; false if that failed (the container is then Failed).
    fn prepare(&mut self, name: &str) -> bool {
        let Some(managed) = self.containers.get_mut(name) else {
            return false;
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
                    managed.state = ContainerState::Failed(e.to_string());
                    return false;
                }
            }
        }
        true
    }

    pub(super) fn start(&mut self, name: &str) {
        let needs_layers = self
            .containers
            .get(name)
            .is_some_and(|m| m.instance.is_none());
        // Started again by `advance` once a pending gate's helper has ended.
        if needs_layers && !self.passes(name, Self::layers_ready) {
            return;
        }
        if !self.prepare(name) {
            return;
        }
        // A new volume is filled from the image before the first start that mounts it.
        if !self.passes(name, Self::volumes_ready) {
            return;
        }
        let Some(managed) = self.containers.get_mut(name) else {
            return;
        };
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
        let Some(dev_null) = self.dev_null.as_ref() else {
            managed.state = ContainerState::Failed("no /dev/null for stdin".into());
            return;
        };
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
        let Some(instance) = managed.instance.as_mut() else {
            return;
        };
        match instance.start(&mut self.runtime, &managed.config, stdio) {
            Ok(Started {
                spawned,
                steps,
                oom_kills_before,
            }) => {
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
                managed.state = ContainerState::Running(Run {
                    pid: spawned.pid,
                    pidfd: spawned.pidfd,
                    since: Instant::now(),
                    generation,
                    oom_kills_before,
                    ready: !managed.config.lifecycle.notify,
                    health,
                });
            }
            Err(StartError::Setup(e)) => {
                log::error!("{name}: cannot be started: {e}");
                managed.state = ContainerState::Failed(e.to_string());
            }
            Err(e @ StartError::Spawn(_)) => {
                log::error!("{name}: {e}");
                self.after_exit_decision(name, ExitStatus::Code(127), Duration::ZERO);
            }
        }
    }

    pub(super) fn schedule(&self, delay: Duration, event: Event) {
        schedule(&self.events, delay, event);
    }

    /// Sends a container its stop signal and arms the SIGKILL deadline.
    pub(super) fn send_stop(&mut self, name: &str, timeout_override: Option<Duration>) {
        let Some(m) = self.containers.get_mut(name) else {
            return;
        };
        let ContainerState::Running(_) = &m.state else {
            return;
        };
        let ContainerState::Running(run) = std::mem::replace(&mut m.state, ContainerState::Waiting)
        else {
            return;
        };
        let signal = m.instance.as_ref().map_or(
            m.config.lifecycle.stop_signal.unwrap_or(libc::SIGTERM),
            |i| i.stop_signal(&m.config),
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
        m.state = ContainerState::Stopping(run);
        self.schedule(
            timeout,
            Event::StopDeadline {
                name: name.to_string(),
                generation,
            },
        );
    }
}
