//! Images pulled at boot (`pull_at = "boot"`) by a process of their own, with retries.

use super::*;

/// A boot pull, run by a process of its own (`keel-init --pull IMAGE`).
pub(super) struct Pull {
    pub(super) state: PullState,
    pub(super) failures: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PullState {
    /// Waiting for the network, or for its retry time.
    Waiting,
    Running {
        pid: libc::pid_t,
    },
    Done,
}

/// Boot pulls retry after 5 s, doubling up to 5 minutes: the registry may be coming up.
pub(super) fn pull_backoff(failures: u32) -> Duration {
    Duration::from_secs((5u64 << failures.saturating_sub(1).min(6)).min(300))
}

impl Supervisor {
    /// Whether image `name` can be prepared: embedded, or pulled at boot already.
    pub(super) fn image_ready(&self, image: &str) -> bool {
        self.pulls
            .get(image)
            .is_none_or(|p| p.state == PullState::Done)
    }

    /// Starts the waiting boot pulls, once the network is online.
    pub(super) fn start_pulls(&mut self) {
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
    pub(super) fn on_pull_exit(&mut self, pid: libc::pid_t, status: ExitStatus) -> bool {
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
}
