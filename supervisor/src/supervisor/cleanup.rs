//! Clean-up: removing a container's cgroup and directory, tearing down its networks, and
//! collecting the layers no image needs any more.

use super::*;

/// Kills whatever is left in a finished container's cgroup and removes it.
pub(super) fn remove_cgroup(name: &str, managed: &Managed) {
    let Some(instance) = &managed.instance else {
        return;
    };
    let cgroup = instance.cgroup().clone();
    if !cgroup.is_empty() {
        let _ = cgroup.kill_all();
    }
    let name = name.to_string();
    // Killed processes leave the cgroup asynchronously; rmdir succeeds once they have.
    tokio::spawn(async move {
        let mut delay = Duration::from_millis(5);
        for _ in 0..12 {
            match cgroup.remove() {
                Ok(()) => return,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(e) => {
                    log::warn!(
                        "{name}: cannot remove cgroup {}: {e}",
                        cgroup.path().display()
                    );
                    return;
                }
            }
        }
        log::warn!(
            "{name}: cgroup {} still busy; left in place",
            cgroup.path().display()
        );
    });
}

/// Deletes a finished container's directory (overlay upper and work, mount point, notify
/// socket). Never through a mount: something still mounted on its root (not expected: the
/// overlay lives in the container's own mount namespace) keeps the directory.
pub(super) fn remove_container_dir(name: &str, dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    let rootfs = dir.join("rootfs");
    if let (Ok(root), Ok(parent)) = (std::fs::metadata(&rootfs), std::fs::metadata(dir))
        && root.dev() != parent.dev()
    {
        log::warn!(
            "{name}: {} is still mounted; left in place",
            rootfs.display()
        );
        return;
    }
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            log::warn!("{name}: removing {}: {e}", dir.display());
        }
        _ => {}
    }
}

impl Supervisor {
    /// Drops unpacked layers that no image of this host file uses (a host file changed
    /// since they were unpacked). Keeps everything if any image cannot be read: deleting
    /// a layer still needed costs an unpack, keeping an unneeded one only disk.
    pub(super) fn collect_layer_garbage(&self) {
        // Images pulled at boot that the host file no longer names go first, with the
        // blobs only they used; their layers then go below.
        let pulled: std::collections::BTreeSet<String> = self.pulls.keys().cloned().collect();
        match keel_image::gc::collect_layout_garbage(&self.runtime.paths.pulled, &pulled) {
            Ok(c) if c == keel_image::gc::LayoutCollected::default() => {}
            Ok(c) => log::info!(
                "image store: removed {} images no longer named, {} blobs ({} KiB)",
                c.images,
                c.blobs,
                c.bytes / 1024
            ),
            Err(e) => log::warn!("image store: collecting garbage: {e}"),
        }
        let mut keep = std::collections::BTreeSet::new();
        let images: std::collections::BTreeSet<&String> =
            self.containers.values().map(|m| &m.config.image).collect();
        for image in images {
            if self.pulls.contains_key(image) {
                // Pulled again this boot; its layers are kept if it is already here.
                if let Ok(layout) = self.runtime.paths.open_pulled_image(image) {
                    keep.extend(
                        layout
                            .layers()
                            .into_iter()
                            .filter_map(|l| l.digest.strip_prefix("sha256:").map(str::to_string)),
                    );
                }
                continue;
            }
            match self.runtime.paths.open_image(image) {
                Ok(layout) => keep.extend(
                    layout
                        .layers()
                        .into_iter()
                        .filter_map(|l| l.digest.strip_prefix("sha256:").map(str::to_string)),
                ),
                Err(e) => {
                    log::warn!("layer store: not collected: {e}");
                    return;
                }
            }
        }
        match keel_image::layer_store::collect_garbage(&self.runtime.paths.layers, &keep) {
            Ok(c) if c == keel_image::layer_store::Collected::default() => {}
            Ok(c) => log::info!(
                "layer store: removed {} unused layers, {} partial unpacks, {} stale links",
                c.layers,
                c.partial,
                c.links
            ),
            Err(e) => log::warn!("layer store: collecting garbage: {e}"),
        }
    }

    /// Removes Keel's NAT table once no container runs.
    pub fn teardown_networks(&mut self) {
        if let Err(e) = self.networks.teardown() {
            log::warn!("container networks: {e}");
        }
    }

    /// Removes the cgroups of stopped containers (best effort, at the end of shutdown).
    pub fn remove_cgroups(&self) {
        for (name, m) in &self.containers {
            if let Some(i) = &m.instance
                && let Err(e) = i.cgroup().remove()
            {
                log::warn!(
                    "{name}: cannot remove cgroup {}: {e}",
                    i.cgroup().path().display()
                );
            }
        }
    }
}
