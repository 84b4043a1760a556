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
        /// Cleared when the supervisor takes the event: until then the container's notify
        /// socket queues no other (see crate::notify).
        queued: ReadyQueued,
    },
    /// Time to try pulling a boot image again.
    PullRetry {
        image: String,
    },
    /// A helper process's time limit (an unpack, a copy-up): killed if it still runs.
    HelperTimeout {
        serial: u64,
    },
}

/// The flag that keeps one container's notify socket to one queued `Ready` at a time, so a
/// container sending READY=1 in a loop cannot grow the event queue. Events compare equal
/// whatever their flags.
#[derive(Debug, Clone, Default)]
pub struct ReadyQueued(pub std::sync::Arc<std::sync::atomic::AtomicBool>);

impl ReadyQueued {
    /// The supervisor has taken the event: the next READY=1 may be queued.
    pub fn taken(&self) {
        self.0.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

impl PartialEq for ReadyQueued {
    fn eq(&self, _: &ReadyQueued) -> bool {
        true
    }
}

impl Eq for ReadyQueued {}
