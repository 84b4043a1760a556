//! `keel-init --populate ERROR_FILE IMAGE TARGET VOLUME_DIR [UID GID SIZE]`: makes the new
//! volume VOLUME_DIR from what the image (its layers shifted by UID GID SIZE for a user
//! namespace) has at TARGET; see keel_supervisor::copy_up.

use std::path::{Path, PathBuf};

use keel_supervisor::Paths;
use keel_supervisor::copy_up::{self, PopulateJob, Populated};
use keel_supervisor::spawn::IdMap;
use keel_supervisor::volume_store::VolumeStore;

const USAGE: &str = "usage: keel-init --populate ERROR_FILE IMAGE TARGET VOLUME_DIR [UID GID SIZE]";

pub(super) fn run(_host_file: &Path, args: &[String]) -> Result<(), String> {
    let (image, target, volume, shift) = match args {
        [image, target, volume, shift @ ..] => {
            let shift = if shift.is_empty() {
                None
            } else {
                Some(super::id_shift(shift, USAGE)?)
            };
            (image, target, PathBuf::from(volume), shift)
        }
        _ => return Err(USAGE.into()),
    };
    let fail = |e: &dyn std::fmt::Display| {
        format!(
            "filling the volume {} from image {image}'s {target}: {e}",
            volume.display()
        )
    };
    // Before a byte of the image is read.
    super::enter_helper_cgroup().map_err(|e| fail(&e))?;
    let paths = Paths::default();
    let layout = paths.open_image(image).map_err(|e| fail(&e))?;
    let userns = shift.map(|s| IdMap {
        uid: s.uid,
        gid: s.gid,
        size: s.size,
    });
    let lowers = keel_supervisor::instance::image_lowers(&paths, &layout, image, userns)
        .map_err(|e| fail(&e))?;
    let short =
        keel_image::layer_store::short_lowers(&paths.layers, &lowers).map_err(|e| fail(&e))?;
    let job = PopulateJob {
        layer_root: paths.layers.clone(),
        lowers: short,
        target: target.clone(),
        staging: VolumeStore::staging_for(&volume),
        volume: volume.clone(),
        scratch: copy_up::scratch_dir(std::process::id()),
        empty_owner: shift.map_or((0, 0), |s| (s.uid, s.gid)),
    };
    match copy_up::populate(&job).map_err(|e| fail(&e))? {
        Populated::Copied(stats) => super::say(&format!(
            "keel: volume {}: {} files ({} KiB), {} directories, {} symlinks, {} hard links copied from {target}{}",
            volume.display(),
            stats.files,
            stats.bytes / 1024,
            stats.directories,
            stats.symlinks,
            stats.hardlinks,
            if stats.skipped > 0 {
                format!(" ({} device nodes or sockets left out)", stats.skipped)
            } else {
                String::new()
            }
        )),
        Populated::Empty => super::say(&format!(
            "keel: volume {}: the image has nothing at {target}; it starts empty",
            volume.display()
        )),
        Populated::Existed => {}
    }
    Ok(())
}
