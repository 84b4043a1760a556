//! Where the supervisor finds images and keeps its state, and opening an image by name.

use std::path::PathBuf;

/// Where the supervisor finds images and keeps its state in the guest.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The OCI image layout holding every image of the host file, each under its name.
    pub images: PathBuf,
    /// The layout `pull_at = "boot"` images are pulled into.
    pub pulled: PathBuf,
    /// Unpacked layers shared by every container of an image.
    pub layers: PathBuf,
    /// Per-container overlay upper, work and mount point directories.
    pub containers: PathBuf,
    pub logs: PathBuf,
    /// Named volumes, one directory each, created on first use.
    pub volumes: PathBuf,
}

impl Paths {
    /// Opens image `name` of the host file (named so in the layout `keel build` embeds),
    /// verifying its manifest and config.
    /// An image pulled at boot is found in [`Paths::pulled`] instead.
    pub fn open_image(
        &self,
        name: &str,
    ) -> Result<keel_image::layout::ImageLayout, crate::setup_error::SetupError> {
        keel_image::layout::ImageLayout::open_ref(&self.images, name)
            .or_else(|embedded| {
                keel_image::layout::ImageLayout::open_ref(&self.pulled, name).map_err(|_| embedded)
            })
            .map_err(|source| crate::setup_error::SetupError::OpenImage {
                image: name.to_owned(),
                store: self.images.clone(),
                source,
            })
    }

    /// Opens image `name` pulled at boot.
    pub fn open_pulled_image(&self, name: &str) -> Result<keel_image::layout::ImageLayout, String> {
        keel_image::layout::ImageLayout::open_ref(&self.pulled, name)
            .map_err(|e| format!("image {name} ({}): {e}", self.pulled.display()))
    }
}

impl Default for Paths {
    fn default() -> Paths {
        Paths {
            images: "/usr/share/keel/images".into(),
            pulled: "/var/lib/keel/images".into(),
            layers: "/var/lib/keel/layers".into(),
            containers: "/run/keel/containers".into(),
            logs: "/var/log/keel".into(),
            volumes: "/var/lib/keel/volumes".into(),
        }
    }
}
