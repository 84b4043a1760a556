//! Boot assessment: an updated system is on trial until it proves itself, then committed.
//!
//! systemd-boot starts an entry that carries a boot counter (`keel-b+3.efi`) after renaming
//! it to count the try (`keel-b+2-1.efi`, named by `LoaderBootCountPath`). This boot is good
//! when PID 1 is ready, the network is online and every critical container (`[update]
//! critical`, by default every service) runs, healthy where it has a health check, within
//! `[update] health_timeout`. Then the counter is dropped from the file name (`keel-b.efi`):
//! committed, and the other slot is the fallback. Otherwise the machine reboots and the
//! loader counts again; with no tries left it sorts the entry last and boots the other slot.
//!
//! This module owns `/var/lib/keel/update-trial.json`, the record of the trial in progress or
//! of the last one that failed, so that the system the machine falls back to can say which
//! version failed and why.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use keel_config::{Kind, UpdatePolicy};
use keel_image::esp::{EntryName, Slot};
use keel_supervisor::Status;
use serde::{Deserialize, Serialize};

use super::{BootSlots, MountedEsp};

/// The trial record.
pub const TRIAL_RECORD: &str = "/var/lib/keel/update-trial.json";

/// What is known of an update's trial, kept across its boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrialRecord {
    pub version: String,
    /// `A` or `B`.
    pub slot: String,
    /// The tries the loader had counted when the last trial boot began.
    pub tries_done: u32,
    /// `trying` while a boot is on trial; why it failed once one did.
    pub outcome: String,
}

impl TrialRecord {
    pub fn load(path: &Path) -> Option<TrialRecord> {
        let text = fs::read_to_string(path).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub fn save(&self, path: &Path) {
        let result = serde_json::to_vec_pretty(self)
            .map_err(|e| e.to_string())
            .and_then(|json| {
                crate::state::write_atomic(path, &json, 0o644).map_err(|e| e.to_string())
            });
        if let Err(e) = result {
            log::warn!("recording the update trial in {}: {e}", path.display());
        }
    }
}

/// The judgement of the moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not yet: what is still missing.
    Waiting(String),
    Good,
    /// The deadline passed: what was still missing.
    Failed(String),
}

/// A boot on trial.
#[derive(Debug)]
pub struct Trial {
    pub slot: Slot,
    pub version: String,
    /// The booted entry's file name, with its counter.
    file: String,
    tries_left: u32,
    deadline: Instant,
    timeout: Duration,
    critical: Vec<String>,
}

impl Trial {
    /// A trial when the booted entry counts tries; `None` for a committed boot.
    pub fn begin(slots: &BootSlots, policy: &UpdatePolicy, started: Instant) -> Option<Trial> {
        let booted = slots.booted?;
        let tries = booted.tries?;
        // The file the loader named in LoaderBootCountPath is the one to rename, exactly.
        let file = slots
            .boot_count_path
            .as_deref()?
            .rsplit(['\\', '/'])
            .next()?
            .to_string();
        let entry = slots.booted_entry()?;
        let timeout = Duration::from_millis(policy.health_timeout_ms);
        let trial = Trial {
            slot: booted.slot,
            version: entry
                .version
                .clone()
                .unwrap_or_else(|| policy.version.clone()),
            file,
            tries_left: tries.left,
            deadline: started + timeout,
            timeout,
            critical: policy.critical.clone(),
        };
        TrialRecord {
            version: trial.version.clone(),
            slot: trial.slot.to_string(),
            tries_done: tries.done,
            outcome: "trying".into(),
        }
        .save(Path::new(TRIAL_RECORD));
        Some(trial)
    }

    /// Judges the boot now: `ready` (PID 1's first `ready`), `online` (the network), the
    /// containers' states.
    pub fn judge(&self, now: Instant, ready: bool, online: bool, statuses: &[Status]) -> Verdict {
        let mut missing = Vec::new();
        if !ready {
            missing.push("PID 1 is not ready".to_string());
        }
        if !online {
            missing.push("the network is not online".to_string());
        }
        for name in &self.critical {
            match statuses.iter().find(|s| &s.name == name) {
                None => missing.push(format!("{name} does not exist")),
                Some(s) if s.kind != Kind::Service => {}
                Some(s) if s.state != "running" => missing.push(format!("{name} is {}", s.state)),
                Some(s) if !matches!(s.health, None | Some("healthy")) => {
                    missing.push(format!("{name} is {}", s.health.unwrap_or("?")))
                }
                Some(_) => {}
            }
        }
        if missing.is_empty() {
            Verdict::Good
        } else if now >= self.deadline {
            Verdict::Failed(format!(
                "not healthy within {} s: {}",
                self.timeout.as_secs(),
                missing.join(", ")
            ))
        } else {
            Verdict::Waiting(missing.join(", "))
        }
    }

    /// Drops the counter from the booted entry's name: the boot loader boots it from now
    /// on, and the other slot is the fallback.
    pub fn commit(&self) -> Result<String, String> {
        let esp = MountedEsp::mount(true)?;
        let dir = esp.entries_dir();
        let committed = EntryName::committed(self.slot).file_name();
        fs::rename(dir.join(&self.file), dir.join(&committed)).map_err(|e| {
            format!(
                "renaming {} to {committed} on the ESP: {e}",
                dir.join(&self.file).display()
            )
        })?;
        drop(esp);
        let _ = fs::remove_file(TRIAL_RECORD);
        Ok(committed)
    }

    /// Records why this boot failed, for the system the machine falls back to.
    pub fn record_failure(&self, why: &str) {
        let mut record = TrialRecord::load(Path::new(TRIAL_RECORD)).unwrap_or(TrialRecord {
            version: self.version.clone(),
            slot: self.slot.to_string(),
            tries_done: 0,
            outcome: String::new(),
        });
        record.outcome = why.to_string();
        record.save(Path::new(TRIAL_RECORD));
    }

    pub fn tries_left(&self) -> u32 {
        self.tries_left
    }
}

/// On a boot that is not on trial: an update that the loader gave up on, as the other slot's
/// entry shows it (no tries left) and the trial record explains it.
pub fn failed_update(slots: &BootSlots) -> Option<String> {
    let other = slots.other_entry()?;
    if !other.name.is_bad() {
        return None;
    }
    let version = other.version.clone().unwrap_or_else(|| "?".into());
    let why = match TrialRecord::load(Path::new(TRIAL_RECORD)) {
        Some(r) if r.version == version && r.outcome != "trying" => r.outcome,
        Some(r) if r.version == version => {
            "its last try never reached the health check (a kernel or stage-1 failure, or a hang the watchdog reset)".into()
        }
        _ => "none of its tries reached PID 1 (a kernel or stage-1 failure)".into(),
    };
    Some(format!(
        "the update to version {version} (slot {}) failed {} boots and was rolled back: {why}",
        other.name.slot,
        other.name.tries.map_or(0, |t| t.done)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_image::esp::Tries;

    fn status(name: &str, state: &'static str, health: Option<&'static str>) -> Status {
        Status {
            name: name.into(),
            kind: Kind::Service,
            state,
            pid: None,
            uptime_ms: None,
            restarts: 0,
            health,
            last_exit: None,
        }
    }

    fn trial(critical: &[&str]) -> (Trial, Instant) {
        let now = Instant::now();
        (
            Trial {
                slot: Slot::B,
                version: "2".into(),
                file: "keel-b+2-1.efi".into(),
                tries_left: 2,
                deadline: now + Duration::from_secs(60),
                timeout: Duration::from_secs(60),
                critical: critical.iter().map(|s| s.to_string()).collect(),
            },
            now,
        )
    }

    #[test]
    fn a_trial_is_good_once_ready_online_and_critical_containers_run_healthy() {
        let (t, now) = trial(&["web", "db"]);
        let running = [
            status("web", "running", Some("healthy")),
            status("db", "running", None),
            status("batch", "exited", None),
        ];
        assert_eq!(t.judge(now, true, true, &running), Verdict::Good);
        assert_eq!(
            t.judge(now, false, true, &running),
            Verdict::Waiting("PID 1 is not ready".into())
        );
        let starting = [
            status("web", "running", Some("starting")),
            status("db", "restarting", None),
        ];
        assert_eq!(
            t.judge(now, true, false, &starting),
            Verdict::Waiting("the network is not online, web is starting, db is restarting".into())
        );
        match t.judge(now + Duration::from_secs(61), true, true, &starting) {
            Verdict::Failed(why) => {
                assert!(
                    why.starts_with("not healthy within 60 s: web is starting"),
                    "{why}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_rolled_back_update_is_reported_from_the_bad_entry() {
        let entry = |slot, tries, version: &str| super::super::SlotEntry {
            name: EntryName { slot, tries },
            file: EntryName { slot, tries }.file_name(),
            version: Some(version.into()),
            root_sha256: None,
        };
        let slots = BootSlots {
            booted: Some(EntryName::committed(Slot::A)),
            boot_count_path: None,
            entries: vec![
                entry(Slot::A, None, "1"),
                entry(Slot::B, Some(Tries { left: 0, done: 3 }), "2"),
            ],
        };
        let report = failed_update(&slots).unwrap();
        assert!(
            report
                .starts_with("the update to version 2 (slot B) failed 3 boots and was rolled back"),
            "{report}"
        );
        let fine = BootSlots {
            entries: vec![entry(Slot::A, None, "1"), entry(Slot::B, None, "0")],
            ..slots
        };
        assert_eq!(failed_update(&fine), None);
    }
}
