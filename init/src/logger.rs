//! PID 1's log: every record goes to the console as `keel: ...` and to /dev/kmsg, so it is
//! visible on the serial line and in `dmesg` alike.
//!
//! Logging must never stop PID 1: no lock is held while writing (a panic hook that logs
//! cannot deadlock on one), nothing here can panic on odd text (kmsg records are cut on a
//! character boundary), and the console never blocks PID 1. Once the runtime is up, lines go
//! through the supervisor's console queue, the same one container output takes (bounded,
//! written by its own task, dropped lines counted); before that they are written directly
//! to a non-blocking console, waiting a bounded moment when it is full.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use keel_supervisor::logs::Console;
use log::{Level, LevelFilter, Log, Metadata, Record};

struct Logger {
    console: Option<File>,
    kmsg: Option<File>,
    queue: OnceLock<Arc<Console>>,
    /// Cleared when the queue's writer will not run again.
    queued: AtomicBool,
}

/// The kernel's syslog facility for daemons, so dmesg tells Keel from kernel messages.
const FACILITY_DAEMON: u8 = 3 << 3;

/// /dev/kmsg takes one record per write and caps its length.
const KMSG_RECORD_MAX: usize = 1000;

/// The longest a line waits for a full console before the queue exists; then it is dropped.
const DIRECT_WRITE_PATIENCE: Duration = Duration::from_secs(1);

static LOGGER: OnceLock<Logger> = OnceLock::new();

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        let target = metadata.target();
        // Library chatter (netlink attribute size warnings, DHCP state tracing) stays out
        // unless it is a real error.
        if !target.starts_with("keel") {
            return metadata.level() <= Level::Error;
        }
        metadata.level() <= Level::Info
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = format_line(record.level(), &record.args().to_string());
        match self
            .queue
            .get()
            .filter(|_| self.queued.load(Ordering::Relaxed))
        {
            Some(queue) => {
                queue.line(line.as_bytes());
            }
            None => {
                if let Some(console) = &self.console {
                    write_bounded(console, line.as_bytes());
                }
            }
        }
        if let Some(kmsg) = &self.kmsg {
            let priority = FACILITY_DAEMON
                + match record.level() {
                    Level::Error => 3,
                    Level::Warn => 4,
                    Level::Info => 6,
                    Level::Debug | Level::Trace => 7,
                };
            let record = kmsg_record(priority, &line);
            let _ = (&*kmsg).write_all(record.as_bytes());
        }
    }

    fn flush(&self) {}
}

/// `<priority>line`, cut to what /dev/kmsg takes, on a character boundary.
fn kmsg_record(priority: u8, line: &str) -> String {
    let mut record = format!("<{priority}>{line}");
    if record.len() > KMSG_RECORD_MAX {
        let mut end = KMSG_RECORD_MAX;
        while !record.is_char_boundary(end) {
            end -= 1;
        }
        record.truncate(end);
    }
    record
}

/// Writes `bytes` to the non-blocking console, waiting for it to drain for at most
/// [`DIRECT_WRITE_PATIENCE`]; what does not fit by then is dropped.
fn write_bounded(console: &File, mut bytes: &[u8]) {
    let deadline = Instant::now() + DIRECT_WRITE_PATIENCE;
    while !bytes.is_empty() {
        match rustix::io::write(console, bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(rustix::io::Errno::INTR) => {}
            Err(rustix::io::Errno::AGAIN) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return;
                }
                let fd = console.as_fd();
                let mut fds = [rustix::event::PollFd::new(
                    &fd,
                    rustix::event::PollFlags::OUT,
                )];
                let timeout = rustix::event::Timespec::try_from(left).ok();
                let _ = rustix::event::poll(&mut fds, timeout.as_ref());
            }
            Err(_) => return,
        }
    }
}

/// `keel: message` for info, `keel: error: message` and `keel: warning: message` otherwise.
pub fn format_line(level: Level, message: &str) -> String {
    match level {
        Level::Error => format!("keel: error: {message}\n"),
        Level::Warn => format!("keel: warning: {message}\n"),
        _ => format!("keel: {message}\n"),
    }
}

/// Installs the logger; /dev/kmsg is optional (it exists once /dev is mounted).
pub fn init() {
    let console = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open("/dev/console")
        .ok();
    let kmsg = OpenOptions::new().write(true).open("/dev/kmsg").ok();
    let logger = LOGGER.get_or_init(|| Logger {
        console,
        kmsg,
        queue: OnceLock::new(),
        queued: AtomicBool::new(false),
    });
    if log::set_logger(logger).is_ok() {
        log::set_max_level(LevelFilter::Info);
    }
}

/// From now on, console lines go through `queue` (the supervisor's console), in order with
/// container output and without ever waiting for the console.
pub fn use_console_queue(queue: Arc<Console>) {
    if let Some(logger) = LOGGER.get()
        && logger.queue.set(queue).is_ok()
    {
        logger.queued.store(true, Ordering::Relaxed);
    }
}

/// Back to direct console writes, for the end (power off, giving up) when the queue's writer
/// task will not run again: what is still queued is written out first.
pub fn stop_console_queue() {
    let Some(logger) = LOGGER.get() else {
        return;
    };
    if !logger.queued.swap(false, Ordering::Relaxed) {
        return;
    }
    if let (Some(queue), Some(console)) = (logger.queue.get(), &logger.console) {
        write_bounded(console, &queue.take_pending());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_marked() {
        assert_eq!(format_line(Level::Info, "ready"), "keel: ready\n");
        assert_eq!(format_line(Level::Error, "x"), "keel: error: x\n");
        assert_eq!(format_line(Level::Warn, "y"), "keel: warning: y\n");
    }

    #[test]
    fn a_long_non_ascii_record_is_cut_on_a_character_boundary() {
        // 'é' is two bytes: at an odd cut a byte truncate would panic.
        for prefix in ["", "x"] {
            let line = format!("keel: {prefix}{}\n", "é".repeat(800));
            let record = kmsg_record(30, &line);
            assert!(record.len() <= KMSG_RECORD_MAX, "{}", record.len());
            assert!(record.len() >= KMSG_RECORD_MAX - 3);
            assert!(record.starts_with("<30>keel: "));
        }
        assert_eq!(kmsg_record(6, "keel: short\n"), "<6>keel: short\n");
    }
}
