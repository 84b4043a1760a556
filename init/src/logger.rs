//! PID 1's log: every record goes to the console as `keel: ...` and to /dev/kmsg, so it is
//! visible on the serial line and in `dmesg` alike.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::Mutex;

use log::{Level, LevelFilter, Log, Metadata, Record};

struct Logger {
    console: Mutex<Option<File>>,
    kmsg: Mutex<Option<File>>,
}

/// The kernel's syslog facility for daemons, so dmesg tells Keel from kernel messages.
const FACILITY_DAEMON: u8 = 3 << 3;

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
        if let Ok(mut console) = self.console.lock()
            && let Some(c) = console.as_mut()
        {
            let _ = c.write_all(line.as_bytes());
        }
        if let Ok(mut kmsg) = self.kmsg.lock()
            && let Some(k) = kmsg.as_mut()
        {
            let priority = FACILITY_DAEMON
                + match record.level() {
                    Level::Error => 3,
                    Level::Warn => 4,
                    Level::Info => 6,
                    Level::Debug | Level::Trace => 7,
                };
            // /dev/kmsg takes one record per write and caps its length.
            let mut record = format!("<{priority}>{line}");
            record.truncate(1000);
            let _ = k.write_all(record.as_bytes());
        }
    }

    fn flush(&self) {}
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
    let console = OpenOptions::new().write(true).open("/dev/console").ok();
    let kmsg = OpenOptions::new().write(true).open("/dev/kmsg").ok();
    let logger = Box::leak(Box::new(Logger {
        console: Mutex::new(console),
        kmsg: Mutex::new(kmsg),
    }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(LevelFilter::Info);
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
}
