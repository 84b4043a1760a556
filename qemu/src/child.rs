//! Waiting for a child process with timeouts, and killing it, without polling and without ever
//! signalling a recycled PID.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ExitStatus};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::Pid;

/// A child process and a thread that waits for it.
///
/// The waiter blocks in `waitid(WNOWAIT)`, which reports the exit without reaping, and then
/// reaps under the state lock. `kill` signals under the same lock only while the child is
/// unreaped, so the PID it signals is always still ours (a zombie PID is not reused).
pub(crate) struct ChildWatch {
    pid: u32,
    state: Mutex<ChildState>,
    exited: Condvar,
}

struct ChildState {
    child: Child,
    status: Option<ExitStatus>,
}

impl ChildWatch {
    /// Takes ownership of `child` and starts its waiter thread. If the thread cannot be
    /// created the child is killed and reaped, so it never outlives an error.
    pub(crate) fn spawn(child: Child) -> io::Result<Arc<ChildWatch>> {
        let watch = Arc::new(ChildWatch {
            pid: child.id(),
            state: Mutex::new(ChildState {
                child,
                status: None,
            }),
            exited: Condvar::new(),
        });
        let waiter = Arc::clone(&watch);
        let spawned = thread::Builder::new()
            .name(format!("qemu-wait-{}", watch.pid))
            .spawn(move || waiter.wait_and_reap());
        if let Err(e) = spawned {
            let mut state = watch.lock();
            let _ = state.child.kill();
            let _ = state.child.wait();
            return Err(e);
        }
        Ok(watch)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    fn lock(&self) -> MutexGuard<'_, ChildState> {
        // A panic while holding the lock cannot leave ChildState inconsistent (it is two plain
        // fields written together), so poisoning is ignored.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait_and_reap(&self) {
        let pid = Pid::from_raw(self.pid as i32);
        // Any outcome other than EINTR (normally: the child exited) means it is time to reap.
        while let Err(Errno::EINTR) =
            waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT)
        {}
        let mut state = self.lock();
        let status = match state.child.try_wait() {
            Ok(Some(status)) => status,
            // Only possible if someone else reaped our child behind std's back; report it as
            // exit code 255 rather than leave every waiter stuck.
            Ok(None) | Err(_) => ExitStatus::from_raw(255 << 8),
        };
        state.status = Some(status);
        drop(state);
        self.exited.notify_all();
    }

    /// The exit status, if the child has exited (and been reaped).
    pub(crate) fn status(&self) -> Option<ExitStatus> {
        self.lock().status
    }

    /// Waits up to `timeout` for the child to exit.
    pub(crate) fn wait_timeout(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now().checked_add(timeout);
        let mut state = self.lock();
        loop {
            if let Some(status) = state.status {
                return Some(status);
            }
            let remaining = match deadline {
                Some(deadline) => deadline.saturating_duration_since(Instant::now()),
                // A timeout too large to represent is "forever".
                None => Duration::from_secs(3600),
            };
            if remaining.is_zero() {
                return None;
            }
            state = self
                .exited
                .wait_timeout(state, remaining)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Waits for the child to exit, however long it takes.
    pub(crate) fn wait(&self) -> ExitStatus {
        loop {
            if let Some(status) = self.wait_timeout(Duration::MAX) {
                return status;
            }
        }
    }

    /// Sends SIGKILL if the child has not been reaped yet, then waits (bounded) for the reap.
    pub(crate) fn kill(&self) -> Option<ExitStatus> {
        {
            let mut state = self.lock();
            if state.status.is_none() {
                // Failure means it already exited: the waiter is about to reap it.
                let _ = state.child.kill();
            }
        }
        // SIGKILL cannot be ignored; the bound only guards against an unkillable (D-state) QEMU.
        self.wait_timeout(Duration::from_secs(10))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn waits_and_kills() {
        let child = Command::new("sh")
            .args(["-c", "exit 3"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let watch = ChildWatch::spawn(child).unwrap();
        let status = watch.wait_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(status.code(), Some(3));
        assert_eq!(watch.status(), Some(status));

        let child = Command::new("sleep").arg("100").spawn().unwrap();
        let watch = ChildWatch::spawn(child).unwrap();
        assert_eq!(watch.wait_timeout(Duration::from_millis(50)), None);
        let status = watch.kill().unwrap();
        assert_eq!(status.signal(), Some(9));
        // Killing again after the reap must not signal anything.
        assert_eq!(watch.kill(), Some(status));
        assert_eq!(watch.wait(), status);
    }
}
