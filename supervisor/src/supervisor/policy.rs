//! Restart policy and backoff: pure decisions, no state.

use super::*;

/// Restart backoff: 100 ms doubling to a cap, back to the start once a run lasted 10 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(60),
            reset_after: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// The delay before the next start, given the previous delay and how long the last run lasted.
    pub fn next(&self, previous: Option<Duration>, ran_for: Duration) -> Duration {
        match previous {
            Some(prev) if ran_for < self.reset_after => (prev * 2).min(self.max),
            _ => self.initial,
        }
    }
}

/// What the policy says after an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Restart,
    /// Done for good; `completed` when it exited with code 0.
    Done {
        completed: bool,
    },
    /// on-failure:N ran out of attempts.
    GiveUp,
}

/// Docker's restart policies. `failures` counts failed runs since the last success,
/// including this one.
pub fn decide(policy: RestartPolicy, status: ExitStatus, failures: u32) -> Decision {
    let success = status == ExitStatus::Code(0);
    match policy {
        RestartPolicy::Always | RestartPolicy::UnlessStopped => Decision::Restart,
        RestartPolicy::No => Decision::Done { completed: success },
        RestartPolicy::OnFailure { .. } if success => Decision::Done { completed: true },
        RestartPolicy::OnFailure { max: Some(max) } if failures > max => Decision::GiveUp,
        RestartPolicy::OnFailure { .. } => Decision::Restart,
    }
}
