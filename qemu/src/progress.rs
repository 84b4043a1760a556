//! What `keel run` tells its user while the guest boots: the milestones reached (when the
//! console goes to a file rather than the terminal), the ready line with the address of each
//! published port, and a boot that has gone silent.

use std::time::{Duration, Instant};

use crate::accel::Accel;
use crate::config::PortForward;

/// How long a guest that is not ready yet may print nothing before it is reported as stuck.
/// Under TCG a loaded machine can be quiet for tens of seconds (module loading, a slow DHCP
/// server); under KVM everything is several times faster.
pub(crate) fn stall_after(accel: Accel) -> Duration {
    match accel {
        Accel::Tcg => Duration::from_secs(60),
        Accel::Kvm => Duration::from_secs(20),
    }
}

/// A console line that marks a step of the boot, and how the progress line names it.
struct Milestone {
    needle: &'static str,
    says: &'static str,
}

/// In boot order. The guest's lines come from init's logger (`keel: ...`).
const MILESTONES: [Milestone; 5] = [
    Milestone {
        needle: "keel: stage 1: ",
        says: "stage 1 running",
    },
    Milestone {
        needle: "switching root",
        says: "root image mounted",
    },
    Milestone {
        needle: "keel: network: online",
        says: "network up",
    },
    Milestone {
        needle: ": started pid=",
        says: "containers starting",
    },
    Milestone {
        needle: READY_NEEDLE,
        says: "ready",
    },
];

/// The line init prints once every container that must start has.
const READY_NEEDLE: &str = "keel: ready uptime_ms=";

/// The state of the reports, fed the console as it grows.
pub(crate) struct BootProgress {
    /// Print milestones: the console itself is not on the terminal.
    compact: bool,
    publish: Vec<PortForward>,
    started: Instant,
    stall_after: Duration,
    /// Milestones reached so far (a prefix of [`MILESTONES`] is not required: a host without
    /// containers never prints `started`).
    reached: [bool; MILESTONES.len()],
    output_seen: bool,
    ready: bool,
    /// The silence already reported, by when it began.
    reported_silence_since: Option<Instant>,
    last_line: String,
}

impl BootProgress {
    pub(crate) fn new(compact: bool, publish: &[PortForward], accel: Accel, now: Instant) -> Self {
        BootProgress {
            compact,
            publish: publish.to_vec(),
            started: now,
            stall_after: stall_after(accel),
            reached: [false; MILESTONES.len()],
            output_seen: false,
            ready: false,
            reported_silence_since: None,
            last_line: String::new(),
        }
    }

    /// The lines to print, given the console lines that arrived since the last call and when
    /// the guest last printed anything.
    pub(crate) fn update(
        &mut self,
        new_lines: &[String],
        last_output: Option<Instant>,
        now: Instant,
    ) -> Vec<String> {
        let mut report = Vec::new();
        if last_output.is_some() && !self.output_seen {
            self.output_seen = true;
            if self.compact {
                report.push(format!("keel: {} kernel started", self.elapsed(now)));
            }
        }
        for line in new_lines {
            if !line.trim().is_empty() {
                self.last_line.clone_from(line);
            }
            for (i, milestone) in MILESTONES.iter().enumerate() {
                if self.reached[i] || !line.contains(milestone.needle) {
                    continue;
                }
                self.reached[i] = true;
                if milestone.needle == READY_NEEDLE {
                    self.ready = true;
                    report.push(self.ready_line(now));
                } else if self.compact {
                    report.push(format!("keel: {} {}", self.elapsed(now), milestone.says));
                }
            }
        }
        if !self.ready {
            let silent_since = last_output.unwrap_or(self.started);
            if now.saturating_duration_since(silent_since) >= self.stall_after
                && self.reported_silence_since != Some(silent_since)
            {
                self.reported_silence_since = Some(silent_since);
                let last = if self.last_line.is_empty() {
                    "nothing at all".to_owned()
                } else {
                    format!("{:?}", self.last_line)
                };
                report.push(format!(
                    "keel: the guest looks stuck: no console output for {} s (last seen: {last}); Ctrl-C stops it",
                    now.saturating_duration_since(silent_since).as_secs()
                ));
            }
        }
        report
    }

    fn elapsed(&self, now: Instant) -> String {
        format!(
            "[{:5.1} s]",
            now.saturating_duration_since(self.started).as_secs_f64()
        )
    }

    fn ready_line(&self, now: Instant) -> String {
        let mut line = format!(
            "keel: ready after {:.1} s",
            now.saturating_duration_since(self.started).as_secs_f64()
        );
        for (i, fwd) in self.publish.iter().enumerate() {
            line.push_str(if i == 0 { ": " } else { ", " });
            line.push_str(&format!(
                "http://127.0.0.1:{}/ (guest port {})",
                fwd.host, fwd.guest
            ));
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn milestones_in_compact_mode_and_the_ready_line() {
        let t0 = Instant::now();
        let publish = [PortForward {
            host: 8080,
            guest: 80,
        }];
        let mut p = BootProgress::new(true, &publish, Accel::Tcg, t0);
        assert!(p.update(&[], None, t0 + Duration::from_secs(1)).is_empty());
        let t = t0 + Duration::from_secs(2);
        let out = p.update(
            &lines("[    0.1] x\nkeel: stage 1: finding the root image\nkeel: stage 1: /dev/vda mounted read-only on /sysroot; switching root\n"),
            Some(t),
            t,
        );
        assert_eq!(out.len(), 3, "{out:?}");
        assert!(out[0].ends_with("kernel started"), "{out:?}");
        assert!(out[1].ends_with("stage 1 running"), "{out:?}");
        assert!(out[2].ends_with("root image mounted"), "{out:?}");
        let out = p.update(
            &lines("keel: network: online\nkeel: web: started pid=42\nkeel: b: started pid=43\nkeel: ready uptime_ms=3000\n"),
            Some(t),
            t,
        );
        assert_eq!(out.len(), 3, "{out:?}");
        assert_eq!(
            out[2],
            "keel: ready after 2.0 s: http://127.0.0.1:8080/ (guest port 80)"
        );
        // Once ready, a quiet guest is a healthy idle host.
        assert!(
            p.update(&[], Some(t), t + Duration::from_secs(600))
                .is_empty()
        );
    }

    #[test]
    fn on_the_terminal_only_the_ready_line_and_stalls() {
        let t0 = Instant::now();
        let mut p = BootProgress::new(false, &[], Accel::Tcg, t0);
        let t = t0 + Duration::from_secs(1);
        assert!(
            p.update(&lines("keel: network: online\n"), Some(t), t)
                .is_empty()
        );
        // Silent for a minute: reported once, with the last line seen.
        let out = p.update(&[], Some(t), t + Duration::from_secs(61));
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(out[0].contains("looks stuck"), "{out:?}");
        assert!(out[0].contains("network: online"), "{out:?}");
        assert!(
            p.update(&[], Some(t), t + Duration::from_secs(90))
                .is_empty()
        );
        // Output again, then silence again: a second report.
        let t2 = t + Duration::from_secs(100);
        assert!(p.update(&lines("more\n"), Some(t2), t2).is_empty());
        assert_eq!(
            p.update(&[], Some(t2), t2 + Duration::from_secs(60)).len(),
            1
        );
        let out = p.update(&lines("keel: ready uptime_ms=1\n"), Some(t2), t2);
        assert_eq!(out, ["keel: ready after 101.0 s".to_owned()]);
    }

    #[test]
    fn a_guest_that_never_prints_is_reported() {
        let t0 = Instant::now();
        let mut p = BootProgress::new(false, &[], Accel::Kvm, t0);
        let out = p.update(&[], None, t0 + Duration::from_secs(20));
        assert_eq!(out.len(), 1);
        assert!(out[0].contains("last seen: nothing at all"), "{out:?}");
    }
}
