//! Build-time registry pulls: the host file's `[registries]` settings, and progress on
//! stderr for long downloads.

use std::path::Path;
use std::time::{Duration, Instant};

use keel_config::HostConfig;
use keel_image::registry::{BlobState, Progress, PullOptions, Reference, RegistryAuth};

/// The `[registries]` entry for `reference`'s registry, as the registry client wants it.
pub fn auth_for(config: &HostConfig, reference: &Reference) -> Result<RegistryAuth, String> {
    let Some(entry) = config.registry(&reference.registry, reference.api_host()) else {
        return Ok(RegistryAuth::default());
    };
    let ca_pem = match &entry.ca {
        None => None,
        Some(path) => {
            let path = config.base_dir().join(path);
            Some(std::fs::read(&path).map_err(|e| {
                format!(
                    "[registries.\"{}\"] ca: cannot read {}: {e}",
                    reference.registry,
                    path.display()
                )
            })?)
        }
    };
    Ok(RegistryAuth {
        username: entry.username.clone(),
        password: entry.password.clone(),
        ca_pem,
        insecure: entry.insecure,
    })
}

/// Pulls image `name` (`reference` in the host file) into the layout `dest` under `name`.
pub fn pull_into(
    config: &HostConfig,
    name: &str,
    reference: &str,
    dest: &Path,
) -> Result<String, String> {
    let parsed: Reference = reference
        .parse()
        .map_err(|e| format!("image {name}: {e}"))?;
    let auth = auth_for(config, &parsed)?;
    let label = format!("image {name} ({reference})");
    let mut last_line = Instant::now();
    let progress_label = label.clone();
    let progress = move |p: Progress| {
        let now = Instant::now();
        let finished = p.done == p.total;
        match &p.state {
            BlobState::Downloading
                if !finished && now.duration_since(last_line) < Duration::from_secs(1) => {}
            BlobState::Downloading => {
                last_line = now;
                eprintln!(
                    "keel: pulling {progress_label}: {} {:?} {} / {} KiB",
                    short(&p.digest),
                    p.kind,
                    p.done / 1024,
                    p.total / 1024
                );
            }
            BlobState::Retrying { attempt, reason } => eprintln!(
                "keel: pulling {progress_label}: {} retry {attempt}: {reason}",
                short(&p.digest)
            ),
            _ => {}
        }
    };
    let options = PullOptions {
        auth,
        progress: Some(Box::new(progress)),
        ..PullOptions::default()
    };
    let started = Instant::now();
    let digest = keel_image::registry::pull(&parsed, options, dest, name)
        .map_err(|e| format!("{label}: {e}"))?;
    eprintln!(
        "keel: pulled {label}: {digest} in {} ms",
        started.elapsed().as_millis()
    );
    Ok(digest)
}

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}
