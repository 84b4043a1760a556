//! `keel upgrade OUT_DIR` and `keel status`: an A/B update of a running host, and its slots.
//!
//! The update is the build output's `update.json`, `update.sig`, `keel.efi` and `root.img`
//! (see keel_image::update_bundle); they are checked here first (sizes and digests against
//! the manifest, a signature present) so that a broken build directory fails before the host
//! is asked, and the host checks everything again.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use keel_api::{ApiError, Client, HostStatus};
use keel_image::update_bundle::{MANIFEST_FILE, SIGNATURE_FILE, UpdateManifest};
use sha2::{Digest, Sha256};

/// The files of an update in a build directory, checked against its manifest.
pub struct Bundle {
    pub manifest_text: String,
    pub signature: String,
    pub manifest: UpdateManifest,
}

pub fn read_bundle(dir: &Path) -> Result<Bundle, String> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let manifest_text = std::fs::read_to_string(&manifest_path).map_err(|e| {
        format!(
            "{}: {e} (is {} a `keel build` output?)",
            manifest_path.display(),
            dir.display()
        )
    })?;
    let sig_path = dir.join(SIGNATURE_FILE);
    let signature = std::fs::read_to_string(&sig_path).map_err(|e| {
        format!(
            "{}: {e}: the build is not signed; build it with `keel build --sign-key KEY` (hosts accept only signed updates)",
            sig_path.display()
        )
    })?;
    let manifest = UpdateManifest::parse(manifest_text.as_bytes())
        .map_err(|e| format!("{}: {e}", manifest_path.display()))?;
    Ok(Bundle {
        manifest_text,
        signature,
        manifest,
    })
}

fn file_digest(path: &Path) -> Result<(String, u64), String> {
    let mut file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    Ok((
        hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        len,
    ))
}

/// Sends the update in `dir` to the host behind `client`; returns the report line.
pub fn upgrade(client: &mut Client, dir: &Path, reboot: bool) -> Result<String, String> {
    let bundle = read_bundle(dir)?;
    let m = &bundle.manifest;
    let uki_path = dir.join(crate::boot_disk::UKI_FILE);
    let root_path = dir.join(keel_image::os::ROOT_IMAGE);
    // The host refuses a mismatch too, but only after the transfer.
    for (path, sha, len) in [
        (&uki_path, &m.uki_sha256, m.uki_bytes),
        (&root_path, &m.root_image_sha256, m.root_image_bytes),
    ] {
        let (got, got_len) = file_digest(path)?;
        if &got != sha || got_len != len {
            return Err(format!(
                "{} ({got_len} bytes, sha256 {got}) is not the file update.json describes ({len} bytes, sha256 {sha}): rebuild {}",
                path.display(),
                dir.display()
            ));
        }
    }
    let mut uki = File::open(&uki_path).map_err(|e| format!("{}: {e}", uki_path.display()))?;
    let mut root = File::open(&root_path).map_err(|e| format!("{}: {e}", root_path.display()))?;
    let total = m.uki_bytes + m.root_image_bytes;
    eprintln!(
        "keel: sending version {} ({} MiB)",
        m.version,
        total.div_ceil(1 << 20)
    );
    let mut shown = 0u64;
    let report = client
        .upgrade(
            bundle.manifest_text.clone(),
            bundle.signature.clone(),
            reboot,
            [(&mut uki, m.uki_bytes), (&mut root, m.root_image_bytes)],
            |sent| {
                if sent >= shown + (8 << 20) || sent == total {
                    shown = sent;
                    eprintln!("keel: sent {} / {} MiB", sent >> 20, total >> 20);
                }
            },
        )
        .map_err(|e: ApiError| e.message)?;
    Ok(format!(
        "version {} installed in slot {} ({}, on trial){}",
        report.version,
        report.slot,
        report.entry,
        match (report.rebooting, report.reboot_in_s) {
            (false, _) => ": it boots at the next reboot".to_string(),
            (true, 0) =>
                ": the host reboots into it and commits it once healthy, or falls back".to_string(),
            (true, s) => format!(
                ": the host reboots into it in {} min, when its [update] reboot_window opens",
                s.div_ceil(60)
            ),
        }
    ))
}

/// `keel status` for people.
pub fn status_text(status: &HostStatus) -> String {
    let mut out = format!("version {} ({} boot)\n", status.version, status.boot);
    if !status.slots.is_empty() {
        out += &format!(
            "{:<5} {:<10} {:<22} {:<16} {}\n",
            "SLOT", "VERSION", "STATE", "ENTRY", "ROOT SHA256"
        );
    }
    for s in &status.slots {
        out += &format!(
            "{:<5} {:<10} {:<22} {:<16} {}\n",
            format!("{}{}", s.slot, if s.booted { "*" } else { "" }),
            s.version.as_deref().unwrap_or("?"),
            s.state,
            s.entry,
            s.root_sha256.as_deref().unwrap_or("?"),
        );
    }
    if let Some(update) = &status.update {
        out += &format!("update: {update}\n");
    }
    out
}
