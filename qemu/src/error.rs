//! The one error type of this crate.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while booting, driving or talking to a VM.
///
/// Errors about the guest (a line that never came, QEMU exiting early) carry the tail of the
/// console and QEMU's stderr, because that is what one needs to see to understand them.
/// `Debug` prints the same as `Display`, so that a test's `unwrap()` shows those lines as
/// lines rather than one escaped string.
#[derive(thiserror::Error)]
pub enum QemuError {
    /// The QEMU binary (`qemu-system-x86_64` on `PATH`, or `KEEL_QEMU`) does not exist.
    #[error(
        "{} was not found; install QEMU (Debian/Ubuntu: apt-get install qemu-system-x86) or point KEEL_QEMU at it", .0.display()
    )]
    NotInstalled(PathBuf),

    /// QEMU is there but could not be started.
    #[error("could not start {}: {source}", binary.display())]
    Spawn {
        binary: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A file the VM needs does not exist or is not a regular file.
    #[error("{what} {} does not exist or is not a file", path.display())]
    MissingFile { what: &'static str, path: PathBuf },

    /// QEMU arguments are strings; a path that is not UTF-8 cannot be passed faithfully.
    #[error("path is not valid UTF-8: {}", .0.display())]
    NonUtf8Path(PathBuf),

    /// A disk of the configuration cannot be attached as given.
    #[error("disk {}: {problem}", path.display())]
    BadDisk { path: PathBuf, problem: String },

    /// `KEEL_ACCEL` holds something other than `kvm`, `tcg` or `auto`.
    #[error("KEEL_ACCEL={0:?} is not one of kvm, tcg, auto")]
    BadAccel(String),

    /// `KEEL_ACCEL=kvm` forced KVM, and the guest showed no sign of life.
    #[error(
        "KEEL_ACCEL=kvm forced KVM, but the guest printed nothing within {waited:?}: KVM does not run guests here ({detail}); unset KEEL_ACCEL to fall back to TCG automatically, or set KEEL_ACCEL=tcg"
    )]
    KvmNoLifeSign { waited: Duration, detail: String },

    /// QEMU exited before the VM was up (before its QMP socket accepted a connection).
    #[error("QEMU exited during startup ({status}); its stderr:\n{stderr}")]
    EarlyExit { status: String, stderr: String },

    /// QEMU neither came up nor exited in time.
    #[error("QEMU did not open its QMP socket within {0:?}")]
    StartTimeout(Duration),

    /// No console line containing `needle` appeared in time.
    #[error(
        "timed out after {timeout:?} waiting for a console line containing {needle:?}; last console lines:\n{tail}"
    )]
    LineTimeout {
        needle: String,
        timeout: Duration,
        tail: String,
    },

    /// The console ended (QEMU exited) before a line containing `needle` appeared.
    #[error(
        "QEMU exited ({status}) before a console line containing {needle:?} appeared; last console lines:\n{tail}"
    )]
    ExitedBeforeLine {
        needle: String,
        status: String,
        tail: String,
    },

    /// QEMU was still running when `wait_exit` gave up.
    #[error("QEMU did not exit within {0:?}")]
    ExitTimeout(Duration),

    /// The QMP connection failed at the socket level.
    #[error("QMP connection: {0}")]
    QmpIo(#[source] io::Error),

    /// QEMU sent something that is not QMP as we know it.
    #[error("QMP protocol error: {0}")]
    QmpProtocol(String),

    /// QEMU answered a command with an error.
    #[error("QMP command {command:?} failed: {class}: {desc}")]
    QmpCommand {
        command: String,
        class: String,
        desc: String,
    },

    /// `http_get` was asked about a guest port that is not published.
    #[error("guest port {0} is not published by this VM")]
    PortNotPublished(u16),

    /// `http_get` gave up; `last` is the last failure seen.
    #[error("GET http://127.0.0.1:{host_port}{path} failed: {last}")]
    Http {
        host_port: u16,
        path: String,
        last: String,
    },

    /// Any other I/O failure on the host side; `context` says what we were doing.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl fmt::Debug for QemuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl QemuError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> QemuError {
        let context = context.into();
        move |source| QemuError::Io { context, source }
    }
}
