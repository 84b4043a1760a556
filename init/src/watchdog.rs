//! The hardware watchdog (`/dev/watchdog`: QEMU's i6300esb, a server's iTCO or BMC
//! watchdog): PID 1 feeds it from its event loop, so a PID 1 that hangs is reset by the
//! hardware. On a machine booted on trial after an update, that reset is one more failed try
//! for the boot loader to count. A machine without a watchdog device runs without one.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::time::Duration;

const DEVICE: &str = "/dev/watchdog";
/// `WDIOC_SETTIMEOUT`: `_IOWR('W', 6, int)`.
const WDIOC_SETTIMEOUT: libc::c_ulong = 0xC004_5706;

/// How long PID 1 may go without feeding the watchdog before the machine is reset: far
/// beyond any pause of a healthy event loop, even under emulation.
pub const TIMEOUT: Duration = Duration::from_secs(60);
/// How often PID 1 feeds it.
pub const FEED_EVERY: Duration = Duration::from_secs(10);

pub struct Watchdog {
    device: File,
}

impl Watchdog {
    /// Opens and arms the watchdog; `None` (logged) when the machine has none.
    pub fn open() -> Option<Watchdog> {
        let device = match OpenOptions::new().write(true).open(DEVICE) {
            Ok(d) => d,
            Err(e) => {
                log::info!("no hardware watchdog ({DEVICE}: {e}): a hung PID 1 is not reset");
                return None;
            }
        };
        let mut seconds: libc::c_int = TIMEOUT.as_secs() as libc::c_int;
        // SAFETY: WDIOC_SETTIMEOUT reads and writes one int through the pointer, which
        // points at a local that outlives the call.
        let rc = unsafe { libc::ioctl(device.as_raw_fd(), WDIOC_SETTIMEOUT, &mut seconds) };
        if rc < 0 {
            log::warn!(
                "watchdog: cannot set a {} s timeout: {}; it keeps its own ({} s if it said)",
                TIMEOUT.as_secs(),
                std::io::Error::last_os_error(),
                seconds
            );
        }
        log::info!("watchdog {DEVICE} armed: reset after {seconds} s without PID 1");
        Some(Watchdog { device })
    }

    pub fn feed(&mut self) {
        if let Err(e) = self.device.write_all(b"\0") {
            log::warn!("feeding the watchdog: {e}");
        }
    }

    /// Disarms it for an orderly power-off or reboot ("magic close"), where the kernel
    /// allows it; otherwise it resets the machine after the reboot began, which is harmless.
    pub fn disarm(mut self) {
        let _ = self.device.write_all(b"V");
    }
}
