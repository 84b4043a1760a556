//! The signals that power the machine off (SIGTERM, SIGUSR2, SIGPWR), reboot it (SIGINT,
//! which the kernel sends on Ctrl-Alt-Del) or ask for statistics (SIGUSR1), with their
//! sender checked.
//!
//! A container sharing the host's pid namespace (`pid = "host"`) sees PID 1 as pid 1 and, as
//! root, may signal it. So these signals are read from a signalfd, which says who sent each:
//! the kernel (`SI_KERNEL`) and processes of the host are obeyed; a process in a container's
//! cgroup, in another mount namespace, or one gone before it could be checked is not, and
//! the refusal is logged.

use std::io;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd, siginfo};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// What a signal from a trusted sender asks of PID 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerRequest {
    PowerOff,
    Reboot,
    Stats,
}

/// si_code of a signal the kernel itself sent (include/uapi/asm-generic/siginfo.h).
const SI_KERNEL: i32 = 0x80;

pub struct PowerSignals {
    fd: AsyncFd<SignalFd>,
}

impl PowerSignals {
    /// Blocks the signals (so that only the signalfd sees them) and opens the signalfd.
    /// Processes PID 1 starts get an empty mask again (the container child resets it,
    /// std::process::Command does too).
    pub fn new() -> io::Result<PowerSignals> {
        let mut mask = SigSet::empty();
        for signal in [
            Signal::SIGTERM,
            Signal::SIGUSR2,
            Signal::SIGPWR,
            Signal::SIGINT,
            Signal::SIGUSR1,
        ] {
            mask.add(signal);
        }
        mask.thread_block().map_err(io::Error::from)?;
        let fd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(io::Error::from)?;
        // SAFETY: the SignalFd owns its fd and the AsyncFd owns the SignalFd, so the fd
        // stays open for exactly as long as it is registered.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(PowerSignals { fd })
    }

    /// The next request from a trusted sender; refused ones are logged and skipped.
    pub async fn next(&mut self) -> PowerRequest {
        loop {
            let info = match self.read().await {
                Ok(info) => info,
                Err(e) => {
                    // Never a busy loop: a broken signalfd is logged once and then ignored.
                    log::error!("reading the power signals: {e}; they are no longer obeyed");
                    return std::future::pending().await;
                }
            };
            let signal = info.ssi_signo as i32;
            let Some(request) = request_of(signal) else {
                continue;
            };
            let name = Signal::try_from(signal).map_or("?", Signal::as_str);
            match sender_verdict(&info) {
                Ok(()) => return request,
                Err(why) => log::warn!(
                    "ignored {name} from pid {}: {why}; only the kernel and the host's own \
                     processes may power off or reboot the machine",
                    info.ssi_pid
                ),
            }
        }
    }

    async fn read(&mut self) -> io::Result<siginfo> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| {
                fd.get_ref()
                    .read_signal()
                    .map_err(io::Error::from)?
                    .ok_or_else(|| io::ErrorKind::WouldBlock.into())
            }) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}

fn request_of(signal: i32) -> Option<PowerRequest> {
    match signal {
        libc::SIGTERM | libc::SIGUSR2 | libc::SIGPWR => Some(PowerRequest::PowerOff),
        libc::SIGINT => Some(PowerRequest::Reboot),
        libc::SIGUSR1 => Some(PowerRequest::Stats),
        _ => None,
    }
}

/// Whether the sender of `info` may ask PID 1 to power off: Ok, or why not.
fn sender_verdict(info: &siginfo) -> Result<(), String> {
    if info.ssi_code == SI_KERNEL {
        return Ok(());
    }
    crate::host_process::verdict(info.ssi_pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_is_always_obeyed_and_a_gone_sender_never() {
        // SAFETY: signalfd_siginfo is plain integers; all-zero is a valid value.
        let mut info: siginfo = unsafe { std::mem::zeroed() };
        info.ssi_code = SI_KERNEL;
        assert_eq!(sender_verdict(&info), Ok(()));
        info.ssi_code = 0; // SI_USER
        info.ssi_pid = u32::MAX;
        assert!(sender_verdict(&info).is_err());
        info.ssi_pid = std::process::id();
        assert_eq!(sender_verdict(&info), Ok(()), "a process of the host");
    }

    #[test]
    fn only_power_signals_are_requests() {
        assert_eq!(request_of(libc::SIGTERM), Some(PowerRequest::PowerOff));
        assert_eq!(request_of(libc::SIGINT), Some(PowerRequest::Reboot));
        assert_eq!(request_of(libc::SIGHUP), None);
    }
}
