//! `keel-init --pull IMAGE`: pulls one `pull_at = "boot"` image of the host file into the
//! host's pulled-image layout, as a process of its own.
//!
//! PID 1 starts it rather than pulling itself: a pull is minutes of blocking network and
//! disk I/O, during which PID 1 must go on reaping, supervising and answering the API.
//! The exit status tells PID 1 whether the image is ready.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use keel_config::{HostConfig, ImageSource, REGISTRY_CA_DIR, registry_ca_file_name};
use keel_image::registry::{BlobState, Progress, PullOptions, Reference, RegistryAuth};

/// Pulls `image` of the host file at `host_file` into the layout `dest`; returns the exit
/// status for PID 1 (0: ready).
pub fn run(host_file: &Path, image: &str, dest: &Path) -> i32 {
    match pull(host_file, image, dest) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("keel: pulling image {image}: {e}");
            1
        }
    }
}

fn pull(host_file: &Path, image: &str, dest: &Path) -> Result<(), String> {
    let config = HostConfig::load(host_file).map_err(|e| e.to_string())?;
    let Some(ImageSource::Pull { reference, .. }) = config.images.get(image).map(|i| &i.source)
    else {
        return Err(format!("the host file has no registry image `{image}`"));
    };
    let parsed: Reference = reference.parse().map_err(|e| format!("{reference}: {e}"))?;
    let entry = config.registry(&parsed.registry, parsed.api_host());
    let mut auth = RegistryAuth::default();
    if let Some(entry) = entry {
        auth.username = entry.username.clone();
        auth.password = entry.password.clone();
        auth.insecure = entry.insecure;
        if entry.ca.is_some() {
            let path = PathBuf::from(REGISTRY_CA_DIR).join(registry_ca_file_name(&parsed.registry));
            auth.ca_pem =
                Some(std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?);
        }
    }
    let started = Instant::now();
    let mut last = Instant::now();
    let label = format!("{image} ({reference})");
    let progress_label = label.clone();
    let progress = move |p: Progress| match &p.state {
        BlobState::Downloading if p.done < p.total && last.elapsed() < Duration::from_secs(2) => {}
        BlobState::Downloading => {
            last = Instant::now();
            println!(
                "keel: pulling {progress_label}: {:?} {} / {} KiB",
                p.kind,
                p.done / 1024,
                p.total / 1024
            );
        }
        BlobState::Retrying { attempt, reason } => {
            println!("keel: pulling {progress_label}: retry {attempt}: {reason}")
        }
        _ => {}
    };
    let options = PullOptions {
        auth,
        progress: Some(Box::new(progress)),
        ..PullOptions::default()
    };
    let digest =
        keel_image::registry::pull(&parsed, options, dest, image).map_err(|e| e.to_string())?;
    println!(
        "keel: pulled {label}: {digest} in {} ms",
        started.elapsed().as_millis()
    );
    Ok(())
}
