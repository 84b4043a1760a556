//! What the supervisor learns through its event channel: its own timers, health results,
//! sd_notify readiness.

/// Something the supervisor scheduled for itself, or learned from a socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    RestartDue {
        name: String,
        generation: u64,
    },
    StopDeadline {
        name: String,
        generation: u64,
    },
    HealthDue {
        name: String,
        generation: u64,
    },
    HealthResult {
        name: String,
        generation: u64,
        passed: bool,
        detail: String,
    },
    Ready {
        name: String,
    },
    /// Time to try pulling a boot image again.
    PullRetry {
        image: String,
    },
    /// An image unpack's time limit: killed if it still runs.
    UnpackTimeout {
        pid: libc::pid_t,
    },
}
