//! `[update]`: the host's OS version and how an A/B update of it is judged (issue 14).
//!
//! The version orders builds: an update must carry a newer one, and systemd-boot sorts the
//! two slots' boot entries by it (newest first). It is digits and dots only (`1.4.0`,
//! `2026.12.8`) so that Keel's comparison and systemd-boot's `strverscmp_improved` agree on
//! every value a host file can hold: component by component, numerically, a longer version
//! newer than its prefix.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use crate::{ConfigError, Container, Kind, Locator, parse_duration_ms};

/// The version of a host file without `[update] version`.
pub const DEFAULT_VERSION: &str = "0";
/// How long a new system gets to prove itself when `[update] health_timeout` is not set.
pub const DEFAULT_HEALTH_TIMEOUT_MS: u64 = 5 * 60 * 1000;
const MAX_VERSION_LEN: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdatePolicy {
    /// This build's version (`[update] version`).
    pub version: String,
    /// After an update, the new system must be ready, online and have every critical
    /// container running (and healthy, where it has a health check) within this, or the
    /// boot counts as failed.
    pub health_timeout_ms: u64,
    /// The containers an update is judged by: `[update] critical`, else every service.
    pub critical: Vec<String>,
    /// Public keys (PEM files, relative to the host file) whose signatures an update must
    /// carry: `keel build` puts them in the root image.
    pub trusted_keys: Vec<String>,
    /// When an installed update may reboot the host: `None`, at once; else a daily window
    /// in UTC.
    pub reboot_window: Option<RebootWindow>,
}

/// A daily time window in UTC, `HH:MM-HH:MM`; it may wrap past midnight (`23:00-01:00`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebootWindow {
    /// Minutes after midnight UTC.
    pub start: u32,
    pub end: u32,
}

impl RebootWindow {
    pub fn parse(text: &str) -> Option<RebootWindow> {
        let minutes = |t: &str| -> Option<u32> {
            let (h, m) = t.split_once(':')?;
            if h.len() != 2 || m.len() != 2 {
                return None;
            }
            let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
            (h < 24 && m < 60).then_some(h * 60 + m)
        };
        let (start, end) = text.split_once('-')?;
        let (start, end) = (minutes(start)?, minutes(end)?);
        (start != end).then_some(RebootWindow { start, end })
    }

    /// Seconds from `now` (seconds since the Unix epoch, UTC) until the window opens: 0
    /// inside it.
    pub fn wait_seconds(&self, now: u64) -> u64 {
        let day = 24 * 3600;
        let second = now % day;
        let (start, end) = (u64::from(self.start) * 60, u64::from(self.end) * 60);
        let inside = if start < end {
            (start..end).contains(&second)
        } else {
            second >= start || second < end
        };
        if inside {
            0
        } else {
            (start + day - second) % day
        }
    }
}

pub(crate) mod raw {
    use super::*;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Update {
        pub version: Option<Spanned<String>>,
        pub health_timeout: Option<Spanned<String>>,
        pub critical: Option<Spanned<Vec<Spanned<String>>>>,
        #[serde(default)]
        pub trusted_keys: Vec<Spanned<String>>,
        pub reboot_window: Option<Spanned<String>>,
    }
}

pub(crate) fn validate(
    loc: &Locator<'_>,
    raw: Option<&Spanned<raw::Update>>,
    containers: &BTreeMap<String, Container>,
) -> Result<UpdatePolicy, ConfigError> {
    let raw = raw.map(Spanned::get_ref);
    let version = match raw.and_then(|u| u.version.as_ref()) {
        None => DEFAULT_VERSION.to_string(),
        Some(v) => {
            if let Err(why) = check_version(v.get_ref()) {
                return Err(loc.at(v, "update.version", why));
            }
            v.get_ref().clone()
        }
    };
    let health_timeout_ms = match raw.and_then(|u| u.health_timeout.as_ref()) {
        None => DEFAULT_HEALTH_TIMEOUT_MS,
        Some(text) => parse_duration_ms(text.get_ref())
            .filter(|ms| *ms >= 1000)
            .ok_or_else(|| {
                loc.at(
                    text,
                    "update.health_timeout",
                    "expected a duration of at least 1s, such as \"90s\" or \"5m\"",
                )
            })?,
    };
    let critical = match raw.and_then(|u| u.critical.as_ref()) {
        None => containers
            .iter()
            .filter(|(_, c)| c.lifecycle.kind == Kind::Service)
            .map(|(name, _)| name.clone())
            .collect(),
        Some(list) => {
            let mut names = Vec::new();
            for (i, name) in list.get_ref().iter().enumerate() {
                let key = format!("update.critical[{i}]");
                match containers.get(name.get_ref()) {
                    None => {
                        return Err(loc.at(
                            name,
                            key,
                            format!("no container named `{}` in [containers]", name.get_ref()),
                        ));
                    }
                    Some(c) if c.lifecycle.kind != Kind::Service => {
                        return Err(loc.at(
                            name,
                            key,
                            format!(
                                "`{}` is a task, not a service: only a service can be judged running",
                                name.get_ref()
                            ),
                        ));
                    }
                    Some(_) if names.contains(name.get_ref()) => {
                        return Err(loc.at(
                            name,
                            key,
                            format!("`{}` is listed twice", name.get_ref()),
                        ));
                    }
                    Some(_) => names.push(name.get_ref().clone()),
                }
            }
            names
        }
    };
    let mut trusted_keys = Vec::new();
    for (i, key) in raw.map_or(&[][..], |u| &u.trusted_keys).iter().enumerate() {
        let path = key.get_ref();
        if path.is_empty() || trusted_keys.contains(path) {
            return Err(loc.at(
                key,
                format!("update.trusted_keys[{i}]"),
                "expected the path of a public key file (PEM), each once",
            ));
        }
        trusted_keys.push(path.clone());
    }
    let reboot_window = match raw.and_then(|u| u.reboot_window.as_ref()) {
        None => None,
        Some(text) => Some(RebootWindow::parse(text.get_ref()).ok_or_else(|| {
            loc.at(
                text,
                "update.reboot_window",
                "expected a daily window in UTC, \"HH:MM-HH:MM\" (such as \"02:00-04:00\"; it may wrap past midnight)",
            )
        })?),
    };
    Ok(UpdatePolicy {
        version,
        health_timeout_ms,
        critical,
        trusted_keys,
        reboot_window,
    })
}

/// Why `version` is not a Keel version, if it is not.
pub fn check_version(version: &str) -> Result<(), String> {
    let ok = !version.is_empty()
        && version.len() <= MAX_VERSION_LEN
        && version.split('.').all(|part| {
            !part.is_empty() && part.len() <= 18 && part.bytes().all(|b| b.is_ascii_digit())
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{version}` is not a version: expected numbers separated by dots, such as \"1.4.0\" or \"2026.12.8\" (at most {MAX_VERSION_LEN} characters)"
        ))
    }
}

/// Orders two versions [`check_version`] accepts: by each dot-separated number in turn, a
/// version newer than its own prefix (`1.4` < `1.4.1`), leading zeros ignored. Text that is
/// not a version sorts before every version, and equal to other such text.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let parse = |v: &str| -> Option<Vec<u64>> {
        check_version(v).ok()?;
        v.split('.').map(|p| p.parse().ok()).collect()
    };
    match (parse(a), parse(b)) {
        (Some(a), Some(b)) => a.cmp(&b),
        (Some(_), None) => Ordering::Greater,
        (None, Some(_)) => Ordering::Less,
        (None, None) => Ordering::Equal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_by_number_like_systemd_boot() {
        use Ordering::*;
        for (a, b, want) in [
            ("1.4.0", "1.4.0", Equal),
            ("1.10", "1.9", Greater),
            ("1.4", "1.4.1", Less),
            ("2", "1.99.99", Greater),
            ("01.2", "1.2", Equal),
            ("2026.12.8", "2026.12.10", Less),
            ("0", "0.1", Less),
            ("x", "0", Less),
        ] {
            assert_eq!(compare_versions(a, b), want, "{a} vs {b}");
        }
    }

    #[test]
    fn reboot_windows_open_daily_in_utc() {
        let w = RebootWindow::parse("02:00-04:00").unwrap();
        let at = |h: u64, m: u64| 20_000 * 86_400 + h * 3600 + m * 60;
        assert_eq!(w.wait_seconds(at(2, 0)), 0);
        assert_eq!(w.wait_seconds(at(3, 59)), 0);
        assert_eq!(w.wait_seconds(at(4, 0)), 22 * 3600);
        assert_eq!(w.wait_seconds(at(1, 30)), 30 * 60);
        let wraps = RebootWindow::parse("23:00-01:00").unwrap();
        assert_eq!(wraps.wait_seconds(at(23, 30)), 0);
        assert_eq!(wraps.wait_seconds(at(0, 30)), 0);
        assert_eq!(wraps.wait_seconds(at(1, 0)), 22 * 3600);
        for bad in [
            "",
            "2:00-04:00",
            "02:00",
            "02:00-02:00",
            "24:00-01:00",
            "02:60-03:00",
            "a",
        ] {
            assert_eq!(RebootWindow::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn only_dotted_numbers_are_versions() {
        for good in ["0", "1.4.0", "2026.12.8", "999999999999999999"] {
            assert!(check_version(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "1..2",
            ".1",
            "1.",
            "v1",
            "1.4-rc1",
            "1+2",
            "1 2",
            "1234567890123456789",
            "1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1",
        ] {
            assert!(check_version(bad).is_err(), "{bad}");
        }
    }
}
