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

/// An image and the id shift its layers are unpacked with.
pub(super) type UnpackKey = (String, Option<(u32, u32, u32)>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum UnpackState {
    Running(Helper),
    Done,
    Failed(String),
}

impl UnpackState {
    pub(super) fn helper(&self) -> Option<&Helper> {
        match self {
            UnpackState::Running(helper) => Some(helper),
            _ => None,
        }
    }
}

fn key_of(image: &str, userns: Option<IdMap>) -> UnpackKey {
    (image.to_string(), userns.map(|m| (m.uid, m.gid, m.size)))
}

impl Supervisor {
    /// Whether the layers of `name`'s image are unpacked; starts the unpack if nothing has
    /// yet. Pending means: wait, `advance` runs again when the unpack ends.
    pub(super) fn layers_ready(&mut self, name: &str) -> Readiness {
        let Some(m) = self.containers.get(name) else {
            return Readiness::Pending;
        };
        let key = key_of(&m.config.image, m.userns);
        match self.unpacks.get(&key) {
            Some(UnpackState::Done) => return Readiness::Ready,
            Some(UnpackState::Running(_)) => return Readiness::Pending,
            Some(UnpackState::Failed(why)) => return Readiness::Failed(why.clone()),
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
            return Readiness::Ready;
        }
        let mut args = vec![key.0.clone().into()];
        args.extend(shift_args(key.1));
        match self.spawn_helper("unpack", &args, UNPACK_TIMEOUT) {
            Ok(helper) => {
                log::info!("image {}: unpacking (pid {})", key.0, helper.pid);
                self.unpacks.insert(key, UnpackState::Running(helper));
                Readiness::Pending
            }
            Err(e) => {
                let why = format!("image {}: cannot start the unpack: {e}", key.0);
                self.unpacks.insert(key, UnpackState::Failed(why.clone()));
                Readiness::Failed(why)
            }
        }
    }

    /// An unpack process ended; false when `pid` is not one.
    pub(super) fn on_unpack_exit(&mut self, pid: libc::pid_t, status: ExitStatus) -> bool {
        let Some((key, helper)) = running_helper(&self.unpacks, pid, UnpackState::helper) else {
            return false;
        };
        let state = match helper.outcome(status, &format!("unpacking image {}", key.0)) {
            Ok(()) => {
                log::info!("image {}: unpacked", key.0);
                UnpackState::Done
            }
            Err(why) => {
                log::error!("{why}");
                UnpackState::Failed(why)
            }
        };
        self.unpacks.insert(key, state);
        self.advance();
        true
    }

    /// Whether an unpack is running.
    pub(super) fn unpacking(&self) -> bool {
        self.unpacks
            .values()
            .any(|s| matches!(s, UnpackState::Running(_)))
    }

    /// Forgets a failed unpack of `image`, so that the next start tries again.
    pub(super) fn retry_failed_unpacks(&mut self, image: &str) {
        self.unpacks
            .retain(|(name, _), state| name != image || !matches!(state, UnpackState::Failed(_)));
    }
}
