//! Volumes made on first use and emptied when their container goes (the store's layout is
//! crate::volume_store's; the copy is crate::copy_up's, run by `keel-init --populate`).
//!
//! A container whose new volume is being filled waits, like one whose layers are being
//! unpacked; one copy serves every container waiting for the same volume. A failed copy
//! fails those containers with its message; `keel start` tries again.

use super::*;
use crate::instance::VolumeOrigin;
use crate::volume_store::VolumeStore;

/// How long a copy-up may run before it is killed.
const POPULATE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How long emptying the trash may run.
const TRASH_TIMEOUT: Duration = Duration::from_secs(60 * 60);

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum PopulateState {
    Running(Helper),
    Failed(String),
}

impl PopulateState {
    pub(super) fn helper(&self) -> Option<&Helper> {
        match self {
            PopulateState::Running(helper) => Some(helper),
            PopulateState::Failed(_) => None,
        }
    }
}

impl Supervisor {
    fn volume_store(&self) -> VolumeStore {
        VolumeStore::new(&self.runtime.paths.volumes)
    }

    /// Whether every volume of `name` (prepared) exists; makes the missing ones. Pending
    /// means: wait, `advance` runs again when the copy has ended.
    pub(super) fn volumes_ready(&mut self, name: &str) -> Readiness {
        let Some(m) = self.containers.get(name) else {
            return Readiness::Pending;
        };
        let Some(instance) = &m.instance else {
            return Readiness::Pending;
        };
        let planned = match instance.volumes(&self.runtime, &m.config) {
            Ok(planned) => planned,
            Err(e) => return Readiness::Failed(e.to_string()),
        };
        let (owner, userns, image) = (
            instance.root_owner(),
            instance.userns(),
            m.config.image.clone(),
        );
        let mut pending = false;
        for volume in planned.into_iter().filter(|v| v.is_new()) {
            match self.populates.get(&volume.dir) {
                Some(PopulateState::Running(_)) => {
                    pending = true;
                    continue;
                }
                Some(PopulateState::Failed(why)) => return Readiness::Failed(why.clone()),
                None => {}
            }
            if volume.origin == VolumeOrigin::Empty {
                if let Err(e) = self.volume_store().create_empty(&volume.dir, owner) {
                    return Readiness::Failed(format!(
                        "making the volume {}: {e}",
                        volume.dir.display()
                    ));
                }
                log::info!(
                    "{name}: volume {} made empty (nocopy)",
                    volume.dir.display()
                );
                continue;
            }
            let mut args: Vec<std::ffi::OsString> = vec![
                image.clone().into(),
                volume.target.clone().into(),
                volume.dir.clone().into(),
            ];
            args.extend(shift_args(userns.map(|m| (m.uid, m.gid, m.size))));
            match self.spawn_helper("populate", &args, POPULATE_TIMEOUT) {
                Ok(helper) => {
                    log::info!(
                        "{name}: filling the new volume {} from the image's {} (pid {})",
                        volume.dir.display(),
                        volume.target,
                        helper.pid
                    );
                    self.populates
                        .insert(volume.dir, PopulateState::Running(helper));
                    pending = true;
                }
                Err(e) => {
                    return Readiness::Failed(format!(
                        "cannot start the copy into the volume {}: {e}",
                        volume.dir.display()
                    ));
                }
            }
        }
        if pending {
            Readiness::Pending
        } else {
            Readiness::Ready
        }
    }

    /// A copy-up or trash helper ended; false when `pid` is not one.
    pub(super) fn on_volume_helper_exit(&mut self, pid: libc::pid_t, status: ExitStatus) -> bool {
        if let Some(helper) = self.trash_helper.take_if(|h| h.pid == pid) {
            if let Err(why) = helper.outcome(status, "emptying the volume trash") {
                log::error!("{why}");
            } else if self.trash_again {
                self.empty_trash();
            }
            return true;
        }
        let Some((dir, helper)) = running_helper(&self.populates, pid, PopulateState::helper)
        else {
            return false;
        };
        match helper.outcome(status, &format!("filling the volume {}", dir.display())) {
            Ok(()) => {
                log::info!("volume {} made", dir.display());
                self.populates.remove(&dir);
            }
            Err(why) => {
                log::error!("{why}");
                self.populates.insert(dir, PopulateState::Failed(why));
            }
        }
        self.advance();
        true
    }

    /// Whether a copy-up is running.
    pub(super) fn populating(&self) -> bool {
        self.populates
            .values()
            .any(|s| matches!(s, PopulateState::Running(_)))
    }

    /// Forgets failed copies, so that the next start tries again.
    pub(super) fn retry_failed_populates(&mut self) {
        self.populates
            .retain(|_, s| matches!(s, PopulateState::Running(_)));
    }

    /// At boot: interrupted copies and the anonymous volumes of containers no longer in
    /// the host file go to the trash, and the trash is emptied.
    pub(super) fn tidy_volume_store(&mut self) {
        let store = self.volume_store();
        match store.sweep_staging() {
            Ok(0) => {}
            Ok(n) => log::warn!("volume store: {n} interrupted volume copies discarded"),
            Err(e) => log::warn!("volume store: sweeping interrupted copies: {e}"),
        }
        let names: std::collections::BTreeSet<&str> =
            self.containers.keys().map(String::as_str).collect();
        match store.discard_orphans(&names) {
            Ok(gone) if gone.is_empty() => {}
            Ok(gone) => log::info!(
                "volume store: the anonymous volumes of {} (no longer in the host file) removed",
                gone.join(", ")
            ),
            Err(e) => log::warn!("volume store: removing orphaned anonymous volumes: {e}"),
        }
        if !store.trash_is_empty() {
            self.empty_trash();
        }
    }

    /// A container removed for good takes its anonymous volumes with it.
    pub(super) fn discard_anonymous_volumes(&mut self, name: &str) {
        match self.volume_store().discard_anonymous(name) {
            Ok(false) => {}
            Ok(true) => {
                log::info!("{name}: its anonymous volumes removed");
                self.empty_trash();
            }
            Err(e) => log::warn!("{name}: removing its anonymous volumes: {e}"),
        }
    }

    /// Starts the helper that empties the trash (or asks the running one to go again).
    fn empty_trash(&mut self) {
        if self.trash_helper.is_some() {
            self.trash_again = true;
            return;
        }
        self.trash_again = false;
        let root: std::ffi::OsString = self.runtime.paths.volumes.clone().into();
        match self.spawn_helper("empty-trash", &[root], TRASH_TIMEOUT) {
            Ok(helper) => self.trash_helper = Some(helper),
            Err(e) => log::warn!("volume store: cannot start emptying the trash: {e}"),
        }
    }
}
