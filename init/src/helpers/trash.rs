//! `keel-init --empty-trash ERROR_FILE VOLUME_ROOT`: deletes the volumes the volume store
//! moved to its trash (the anonymous volumes of removed containers, interrupted copies).
//! A volume can be large: PID 1 does not wait on this.

use std::path::Path;

use keel_supervisor::volume_store::VolumeStore;

pub(super) fn run(_host_file: &Path, args: &[String]) -> Result<(), String> {
    let [root] = args else {
        return Err("usage: keel-init --empty-trash ERROR_FILE VOLUME_ROOT".into());
    };
    super::enter_helper_cgroup()?;
    let removed = VolumeStore::new(root)
        .empty_trash()
        .map_err(|e| format!("emptying the volume trash in {root}: {e}"))?;
    super::say(&format!(
        "keel: volume store: {removed} removed volumes deleted"
    ));
    Ok(())
}
