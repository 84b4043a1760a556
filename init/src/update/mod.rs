//! A/B updates on the running host: `keel upgrade` (the API's `upgrade`) hands PID 1 a
//! signed update bundle (keel_image::update_bundle). [`Updater`] is the main loop's part:
//! it checks a bundle before a byte of it is accepted (signature by a key the root image
//! trusts, a newer version, a machine booted from its disk with no update on trial, sizes
//! that fit a slot), then hands the staged files to the `--install-update` helper
//! ([`install`]), which writes the other slot and its boot entry, on trial, away from PID 1's
//! loop. Boot assessment ([`crate::slots::assessment`]) commits or rolls back what it
//! installed.
//!
//! This module owns the staging directory, `/var/lib/keel/update/`: `update.json` (the
//! signed manifest, verbatim), `keel.efi` and `root.img` as received.

pub mod install;

use std::fs;
use std::path::{Path, PathBuf};

use keel_api::{ApiError, HostStatus, SlotStatus, UpgradeReport};
use keel_config::compare_versions;
use keel_image::esp::{EntryName, ROOT_SLOT_SIZE, Slot};
use keel_image::update_bundle::{self, TRUSTED_KEYS_DIR, UpdateManifest};
use serde::{Deserialize, Serialize};

use crate::slots::BootSlots;
use crate::slots::assessment::{self, TRIAL_RECORD, TrialRecord};

/// Where an update is staged while it arrives.
pub const STAGING: &str = "/var/lib/keel/update";
pub const STAGED_MANIFEST: &str = "update.json";
pub const STAGED_UKI: &str = "keel.efi";
pub const STAGED_ROOT: &str = "root.img";
/// Room /var keeps beyond a staged update: the containers' data must not run out of it.
const STAGING_RESERVE: u64 = 256 << 20;

/// What the API session needs to receive an accepted update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    pub slot: String,
    pub version: String,
    pub staging: PathBuf,
    pub uki_bytes: u64,
    pub uki_sha256: String,
    pub root_image_bytes: u64,
    pub root_image_sha256: String,
}

/// An install helper at work.
#[derive(Debug)]
pub struct Installing {
    pub pid: libc::pid_t,
    pub error_file: PathBuf,
    pub report: UpgradeReport,
    /// The API call waiting for the outcome.
    pub reply: Option<tokio::sync::oneshot::Sender<Result<crate::api::Reply, ApiError>>>,
}

/// The main loop's update state.
#[derive(Debug, Default)]
pub struct Updater {
    /// The running version: the booted entry's, else the host file's.
    pub running_version: String,
    /// The host file's hostname: an update must be a build of this host.
    pub hostname: String,
    /// An update accepted and being received or installed.
    accepted: Option<Accepted>,
    pub installing: Option<Installing>,
}

impl Updater {
    pub fn new(running_version: String, hostname: String) -> Updater {
        // What a power cut or a reboot interrupted: never installed, never resumed.
        if Path::new(STAGING).exists() {
            log::info!("removing {STAGING}: an update that did not finish arriving");
            let _ = fs::remove_dir_all(STAGING);
        }
        Updater {
            running_version,
            hostname,
            ..Updater::default()
        }
    }

    /// Checks a bundle's manifest and signature; on success the update is accepted and its
    /// staging directory emptied. `on_trial`: this boot is itself an update on trial.
    pub fn begin(
        &mut self,
        manifest_text: &str,
        signature: &str,
        on_trial: bool,
    ) -> Result<Accepted, ApiError> {
        let refuse = |why: String| Err(ApiError::bad_request(format!("update refused: {why}")));
        if self.accepted.is_some() || self.installing.is_some() {
            return Err(ApiError::new(
                keel_api::ErrorCode::Conflict,
                "an update is already being installed",
            ));
        }
        if on_trial {
            return refuse(
                "this boot is itself an update on trial; wait until it is committed or rolled back"
                    .into(),
            );
        }
        let trusted = trusted_keys(Path::new(TRUSTED_KEYS_DIR));
        if let Err(e) = update_bundle::verify(&trusted, manifest_text.as_bytes(), signature) {
            return refuse(e.to_string());
        }
        let manifest = match UpdateManifest::parse(manifest_text.as_bytes()) {
            Ok(m) => m,
            Err(e) => return refuse(e.to_string()),
        };
        if manifest.hostname != self.hostname {
            return refuse(format!(
                "it is a build of host {:?}, this is {:?}",
                manifest.hostname, self.hostname
            ));
        }
        if compare_versions(&manifest.version, &self.running_version).is_le() {
            return refuse(format!(
                "version {} is not newer than the running {}",
                manifest.version, self.running_version
            ));
        }
        if manifest.root_image_bytes > ROOT_SLOT_SIZE {
            return refuse(format!(
                "the root image is {} bytes; a slot holds {ROOT_SLOT_SIZE}",
                manifest.root_image_bytes
            ));
        }
        // The ESP holds two UKIs and the loader: a UKI of more than 200 MiB is not Keel's.
        if manifest.uki_bytes > 200 << 20 {
            return refuse(format!("a UKI of {} bytes", manifest.uki_bytes));
        }
        let slots = match BootSlots::read() {
            Ok(Some(slots)) => slots,
            Ok(None) => {
                return refuse(
                    "this host was not booted from its disk image by its boot loader (QEMU's -kernel?): it has no slots to update".into(),
                );
            }
            Err(e) => return refuse(format!("reading the boot slots: {e}")),
        };
        let Some(booted) = slots.booted else {
            return refuse("the boot loader did not say which slot booted".into());
        };
        // Installing deletes the other slot's entry: never while it is the last good system.
        if booted.tries.is_some() {
            return refuse(format!(
                "the running system (slot {}) is not committed yet; the other slot is its fallback",
                booted.slot
            ));
        }
        let needed = manifest.uki_bytes + manifest.root_image_bytes + STAGING_RESERVE;
        match nix::sys::statvfs::statvfs(crate::state::STATE_DIR) {
            Ok(fs) => {
                let free = fs.blocks_available().saturating_mul(fs.fragment_size());
                if free < needed {
                    return refuse(format!(
                        "/var has {} MiB free; staging the update needs {} MiB",
                        free >> 20,
                        needed >> 20
                    ));
                }
            }
            Err(e) => return refuse(format!("statvfs /var: {e}")),
        }
        let target = booted.slot.other();
        let staging = PathBuf::from(STAGING);
        let _ = fs::remove_dir_all(&staging);
        fs::create_dir_all(&staging)
            .and_then(|()| fs::write(staging.join(STAGED_MANIFEST), manifest_text))
            .map_err(|e| ApiError::internal(format!("{}: {e}", staging.display())))?;
        let accepted = Accepted {
            slot: target.to_string(),
            version: manifest.version,
            staging,
            uki_bytes: manifest.uki_bytes,
            uki_sha256: manifest.uki_sha256,
            root_image_bytes: manifest.root_image_bytes,
            root_image_sha256: manifest.root_image_sha256,
        };
        log::info!(
            "update to version {} accepted for slot {target}: receiving",
            accepted.version
        );
        self.accepted = Some(accepted.clone());
        Ok(accepted)
    }

    /// The session gave up (a client gone, a digest that did not match): nothing was
    /// written outside the staging directory.
    pub fn abort(&mut self, why: &str) {
        if let Some(a) = self.accepted.take() {
            log::warn!("update to version {} abandoned: {why}", a.version);
            let _ = fs::remove_dir_all(&a.staging);
        }
    }

    /// Starts the install helper on the staged files; `reply` gets the outcome when it ends.
    pub fn install(
        &mut self,
        reboot: bool,
        reply: tokio::sync::oneshot::Sender<Result<crate::api::Reply, ApiError>>,
    ) -> Result<
        (),
        (
            ApiError,
            tokio::sync::oneshot::Sender<Result<crate::api::Reply, ApiError>>,
        ),
    > {
        let refuse = |e: ApiError, reply| Err((e, reply));
        let Some(accepted) = self.accepted.take() else {
            return refuse(ApiError::bad_request("no update was accepted"), reply);
        };
        let error_file = accepted.staging.join("install.error");
        let child = std::process::Command::new("/proc/self/exe")
            .arg("--install-update")
            .arg(&error_file)
            .arg(&accepted.staging)
            .arg(&accepted.slot)
            .stdin(std::process::Stdio::null())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                let _ = fs::remove_dir_all(&accepted.staging);
                return refuse(
                    ApiError::internal(format!("starting the install helper: {e}")),
                    reply,
                );
            }
        };
        log::info!(
            "installing version {} in slot {} (helper pid {})",
            accepted.version,
            accepted.slot,
            child.id()
        );
        let slot = if accepted.slot == "A" {
            Slot::A
        } else {
            Slot::B
        };
        self.installing = Some(Installing {
            pid: child.id() as libc::pid_t,
            error_file,
            report: UpgradeReport {
                version: accepted.version,
                slot: accepted.slot,
                entry: EntryName::on_trial(slot).file_name(),
                rebooting: reboot,
                reboot_in_s: 0,
            },
            reply: Some(reply),
        });
        Ok(())
    }

    /// The install helper `pid` exited with `code` (None: killed): answers the waiting
    /// call. `None` when `pid` is not the install helper; else `Some(None)` (no reboot) or
    /// `Some(Some(seconds))`: reboot into the update then (0: now), the first moment of
    /// `window` if there is one.
    pub fn on_exit(
        &mut self,
        pid: libc::pid_t,
        code: Option<i32>,
        window: Option<keel_config::RebootWindow>,
    ) -> Option<Option<u64>> {
        if self.installing.as_ref().is_none_or(|i| i.pid != pid) {
            return None;
        }
        let mut installing = self.installing.take()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        installing.report.reboot_in_s = window.map_or(0, |w| w.wait_seconds(now));
        let result = match code {
            Some(0) => Ok(installing.report.clone()),
            _ => Err(fs::read_to_string(&installing.error_file)
                .ok()
                .filter(|s| !s.trim().is_empty())
                .unwrap_or_else(|| format!("the install helper ended ({code:?})"))),
        };
        let _ = fs::remove_dir_all(STAGING);
        let reboot = match &result {
            Ok(report) => {
                log::info!(
                    "version {} installed in slot {} ({}, on trial){}",
                    report.version,
                    report.slot,
                    report.entry,
                    match (report.rebooting, report.reboot_in_s) {
                        (false, _) => "; it boots at the next reboot".to_string(),
                        (true, 0) => "; rebooting into it".to_string(),
                        (true, s) => format!(
                            "; rebooting into it in {} min, when [update] reboot_window opens",
                            s.div_ceil(60)
                        ),
                    }
                );
                report.rebooting.then_some(report.reboot_in_s)
            }
            Err(why) => {
                log::error!("installing the update failed: {why}");
                None
            }
        };
        if let Some(reply) = installing.reply.take() {
            let answer = result
                .map_err(|why| ApiError::internal(format!("installing the update: {why}")))
                .and_then(|report| {
                    serde_json::to_value(report)
                        .map(crate::api::Reply::Value)
                        .map_err(|e| ApiError::internal(e.to_string()))
                });
            let _ = reply.send(answer);
        }
        Some(reboot)
    }
}

/// The public keys in `dir` (the root image's trusted keys); unreadable ones are logged.
pub fn trusted_keys(dir: &Path) -> Vec<[u8; 32]> {
    let Ok(listing) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut keys = Vec::new();
    for entry in listing.flatten() {
        match fs::read_to_string(entry.path())
            .map_err(|e| e.to_string())
            .and_then(|t| update_bundle::parse_public_key(&t).map_err(|e| e.to_string()))
        {
            Ok(key) => keys.push(key),
            Err(e) => log::warn!("update key {}: {e}", entry.path().display()),
        }
    }
    keys
}

/// The `status` answer.
pub fn host_status(running_version: &str, trial: Option<String>) -> HostStatus {
    let slots = match BootSlots::read() {
        Ok(Some(slots)) => slots,
        Ok(None) | Err(_) => {
            return HostStatus {
                version: running_version.to_string(),
                boot: "direct".into(),
                slots: Vec::new(),
                update: None,
            };
        }
    };
    let update = trial
        .or_else(|| assessment::failed_update(&slots))
        .or_else(|| {
            TrialRecord::load(Path::new(TRIAL_RECORD))
                .filter(|r| r.outcome != "trying")
                .map(|r| format!("the update to version {} failed: {}", r.version, r.outcome))
        });
    HostStatus {
        version: running_version.to_string(),
        boot: "firmware".into(),
        slots: slots
            .entries
            .iter()
            .map(|e| SlotStatus {
                slot: e.name.slot.to_string(),
                version: e.version.clone(),
                root_sha256: e.root_sha256.clone(),
                entry: e.file.clone(),
                state: match e.name.tries {
                    None => "committed".into(),
                    Some(t) if t.left == 0 => "bad (no tries left)".into(),
                    Some(t) => format!("on trial ({} tries left)", t.left),
                },
                booted: slots.booted.is_some_and(|b| b.slot == e.name.slot),
            })
            .collect(),
        update,
    }
}
