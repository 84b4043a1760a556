//! Image layers unpacked before a container's first start, by a process of their own
//! (`keel-init --unpack`): in its own cgroup (memory and task limits), killed past
//! [`UNPACK_TIMEOUT`], checked against the unpack limits. PID 1 never decompresses or parses a
//! layer itself; it only waits for the exit, like a boot pull's.
//!
//! One unpack serves every container of the same image and id shift. Its failure fails
//! those containers with its message; `keel start` (or a host file that changes the image)
//! tries again.

use super::*;

/// How long an unpack may run before it is killed.
pub(super) const UNPACK_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Where the unpacker leaves why it failed, one file an unpack.
const UNPACK_ERRORS: &str = "/run/keel/unpack";

/// The longest failure message read back.
const ERROR_MAX: u64 = 4096;

/// An image and the id shift its layers are unpacked with.
pub(super) type UnpackKey = (String, Option<(u32, u32, u32)>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum UnpackState {
    Running { pid: libc::pid_t },
    Done,
    Failed(String),
}

/// Whether a container's layers are in the store.
pub(super) enum LayersReady {
    Ready,
    Pending,
    Failed(String),
}

fn key_of(image: &str, userns: Option<IdMap>) -> UnpackKey {
    (image.to_string(), userns.map(|m| (m.uid, m.gid, m.size)))
}

fn error_file(serial: u64) -> std::path::PathBuf {
    Path::new(UNPACK_ERRORS).join(format!("{serial}.error"))
}

impl Supervisor {
    /// Whether the layers of `name`'s image are unpacked; starts the unpack if nothing has
    /// yet. Pending means: wait, `advance` runs again when the unpack ends.
    pub(super) fn layers_ready(&mut self, name: &str) -> LayersReady {
        let Some(m) = self.containers.get(name) else {
            return LayersReady::Pending;
        };
        let key = key_of(&m.config.image, m.userns);
        match self.unpacks.get(&key) {
            Some(UnpackState::Done) => return LayersReady::Ready,
            Some(UnpackState::Running { .. }) => return LayersReady::Pending,
            Some(UnpackState::Failed(why)) => return LayersReady::Failed(why.clone()),
            None => {}
        }
        // Already in the store (an earlier boot, another container of the image): a look at
        // the store's directory entries, no child needed.
        let shift = m.userns.map(|map| keel_image::unpack::IdShift {
            uid: map.uid,
            gid: map.gid,
            size: map.size,
        });
        let paths = &self.runtime.paths;
        let unpacked = paths.open_image(&m.config.image).is_ok_and(|layout| {
            keel_image::layer_store::unpacked_layers(&layout, &paths.layers, shift).is_ok()
        });
        if unpacked {
            self.unpacks.insert(key, UnpackState::Done);
            return LayersReady::Ready;
        }
        match self.spawn_unpack(&key) {
            Ok(pid) => {
                log::info!("image {}: unpacking (pid {pid})", key.0);
                self.unpacks.insert(key, UnpackState::Running { pid });
                self.schedule(UNPACK_TIMEOUT, Event::UnpackTimeout { pid });
                LayersReady::Pending
            }
            Err(e) => {
                let why = format!("image {}: cannot start the unpack: {e}", key.0);
                self.unpacks.insert(key, UnpackState::Failed(why.clone()));
                LayersReady::Failed(why)
            }
        }
    }

    fn spawn_unpack(&mut self, key: &UnpackKey) -> std::io::Result<libc::pid_t> {
        std::fs::create_dir_all(UNPACK_ERRORS)?;
        let mut command = std::process::Command::new("/proc/self/exe");
        command.arg("--unpack").arg(&key.0);
        // The error file is named after a counter, not the image: names are not paths.
        self.unpack_serial += 1;
        let file = error_file(self.unpack_serial);
        let _ = std::fs::remove_file(&file);
        command.arg(&file);
        if let Some((uid, gid, size)) = key.1 {
            command.args([uid.to_string(), gid.to_string(), size.to_string()]);
        }
        let child = command.stdin(std::process::Stdio::null()).spawn()?;
        let pid = child.id() as libc::pid_t;
        self.unpack_errors.insert(pid, file);
        Ok(pid)
    }

    /// An unpack process ended; false when `pid` is not one.
    pub(super) fn on_unpack_exit(&mut self, pid: libc::pid_t, status: ExitStatus) -> bool {
        let Some(key) = self
            .unpacks
            .iter()
            .find(|(_, s)| **s == UnpackState::Running { pid })
            .map(|(k, _)| k.clone())
        else {
            return false;
        };
        let file = self.unpack_errors.remove(&pid);
        let state = if status == ExitStatus::Code(0) {
            log::info!("image {}: unpacked", key.0);
            UnpackState::Done
        } else {
            let written = file.as_ref().and_then(|f| {
                use std::io::Read;
                let mut text = String::new();
                std::fs::File::open(f)
                    .ok()?
                    .take(ERROR_MAX)
                    .read_to_string(&mut text)
                    .ok()?;
                Some(text)
            });
            let why = match written {
                Some(text) if !text.trim().is_empty() => text.trim().to_string(),
                _ => format!("unpacking image {}: the unpack process {status}", key.0),
            };
            log::error!("{why}");
            UnpackState::Failed(why)
        };
        if let Some(file) = file {
            let _ = std::fs::remove_file(file);
        }
        self.unpacks.insert(key, state);
        self.advance();
        true
    }

    /// The time limit of the unpack `pid`: it is killed if it still runs.
    pub(super) fn unpack_timed_out(&mut self, pid: libc::pid_t) {
        let running = self
            .unpacks
            .iter()
            .any(|(_, s)| *s == UnpackState::Running { pid });
        if running {
            log::error!(
                "unpack pid {pid} still runs after {} s: killing it",
                UNPACK_TIMEOUT.as_secs()
            );
            // Still ours: its exit has not been reaped (that would have ended Running).
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// Whether an unpack is running.
    pub(super) fn unpacking(&self) -> bool {
        self.unpacks
            .values()
            .any(|s| matches!(s, UnpackState::Running { .. }))
    }

    /// Forgets a failed unpack of `image`, so that the next start tries again.
    pub(super) fn retry_failed_unpacks(&mut self, image: &str) {
        self.unpacks
            .retain(|(name, _), state| name != image || !matches!(state, UnpackState::Failed(_)));
    }
}
