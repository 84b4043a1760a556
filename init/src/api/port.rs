//! The control API's virtio-serial port as a transport: one byte stream that successive host
//! clients share, whose "a client is connected" state the driver reports late.
//!
//! Two facts of the virtio_console driver shape this module:
//! - Whether the host end is connected shows only as `POLLHUP` and as `read` returning 0 (no
//!   data, nobody connected). The driver learns of a connection from a control message
//!   handled by a kernel worker, while the client's bytes arrive on the data queue at once: on
//!   a busy guest a request is routinely readable while the driver still says "nobody is
//!   connected". A transport that took that as "the client went away" dropped the request's
//!   answer and left the client waiting forever (`keel exec` hung on a busy host).
//! - Tokio keeps a hangup it has seen once as final, so after one the port would look
//!   readable and writable for ever. The port is therefore not registered with tokio at all:
//!   its wake-ups are SIGIO, which the driver raises on new data and on every change of the
//!   connection state, with a periodic re-check in case a signal is missed.
//!
//! A session ([`PortConn::begin_session`]) trusts a "not connected" from the driver only once
//! it has seen the host end connected, or after [`ANNOUNCE_GRACE`]: the client that sent the
//! request being served is being announced.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::time::Instant;

/// How long a session waits for the driver to announce the client whose request it holds,
/// before taking "not connected" at its word. The announcement normally follows within
/// milliseconds; a saturated single-vCPU guest under TCG has been seen to take hundreds.
pub(super) const ANNOUNCE_GRACE: Duration = Duration::from_secs(5);

/// While waiting for data or a connection, the port is re-read this often in case a SIGIO
/// was missed.
pub(super) const PORT_RECHECK: Duration = Duration::from_secs(2);

/// How long a write waits between attempts while the host end is connected but has not
/// taken the previous bytes yet (the driver raises no signal when it does).
const WRITE_BACKOFF_MAX: Duration = Duration::from_millis(50);

/// The open port, with what the current session has seen of the host end.
pub(super) struct PortConn {
    fd: OwnedFd,
    /// The driver has reported the host end connected during this session.
    host_seen: AtomicBool,
    /// When this session may stop waiting for the host end to be announced.
    announce_deadline: std::sync::Mutex<Instant>,
}

/// One read of the port.
enum PortRead {
    Data(usize),
    /// Connected, nothing to read yet.
    Nothing,
    /// Nothing to read, and the driver says no host client is connected.
    NotConnected,
}

impl PortConn {
    /// Takes the open port (non-blocking, with SIGIO enabled by the caller).
    pub(super) fn new(fd: OwnedFd) -> PortConn {
        PortConn {
            fd,
            host_seen: AtomicBool::new(false),
            announce_deadline: std::sync::Mutex::new(Instant::now()),
        }
    }

    pub(super) fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Starts serving a client whose first bytes were just read (or are about to arrive).
    pub(super) fn begin_session(&self) {
        self.host_seen
            .store(self.host_connected(), Ordering::Relaxed);
        *self
            .announce_deadline
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now() + ANNOUNCE_GRACE;
    }

    /// Reads what the port has: data, nothing yet, or nobody connected.
    fn read_once(&self, buf: &mut [u8]) -> io::Result<PortRead> {
        loop {
            return match rustix::io::read(&self.fd, &mut *buf) {
                Ok(0) => Ok(PortRead::NotConnected),
                Ok(n) => Ok(PortRead::Data(n)),
                Err(rustix::io::Errno::AGAIN) => {
                    self.host_seen.store(true, Ordering::Relaxed);
                    Ok(PortRead::Nothing)
                }
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => Err(e.into()),
            };
        }
    }

    /// The driver's view right now: is a host client connected?
    fn host_connected(&self) -> bool {
        let mut fds = [PollFd::new(&self.fd, PollFlags::OUT)];
        match rustix::event::poll(&mut fds, Some(&rustix::event::Timespec::default())) {
            Ok(_) => !fds[0].revents().contains(PollFlags::HUP),
            Err(_) => false,
        }
    }

    /// Whether "not connected" now means the session's client has gone: it was seen
    /// connected, or it has had its time to be announced.
    fn client_gone(&self) -> bool {
        self.host_seen.load(Ordering::Relaxed)
            || Instant::now()
                >= *self
                    .announce_deadline
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Some bytes, or 0 once the session's client has gone.
    pub(super) async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // Subscribed before looking, so that a SIGIO between the look and the wait counts.
            let mut sigio = signal(SignalKind::io())?;
            match self.read_once(buf)? {
                PortRead::Data(n) => return Ok(n),
                PortRead::Nothing => wait(&mut sigio, PORT_RECHECK).await,
                PortRead::NotConnected if self.client_gone() => return Ok(0),
                PortRead::NotConnected => wait(&mut sigio, self.until_announce_deadline()).await,
            }
        }
    }

    /// Writes all of `data`; `BrokenPipe` once the session's client has gone.
    pub(super) async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        let mut backoff = Duration::from_millis(1);
        while !data.is_empty() {
            let mut sigio = signal(SignalKind::io())?;
            match rustix::io::write(&self.fd, data) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.host_seen.store(true, Ordering::Relaxed);
                    data = data.get(n..).unwrap_or_default();
                    backoff = Duration::from_millis(1);
                }
                Err(rustix::io::Errno::INTR) => {}
                // The driver refuses writes while it thinks nobody is connected, and while the
                // host has not taken earlier bytes.
                Err(rustix::io::Errno::AGAIN) => {
                    if self.host_connected() {
                        self.host_seen.store(true, Ordering::Relaxed);
                        wait(&mut sigio, backoff).await;
                        backoff = (backoff * 2).min(WRITE_BACKOFF_MAX);
                    } else if self.client_gone() {
                        return Err(io::ErrorKind::BrokenPipe.into());
                    } else {
                        wait(&mut sigio, self.until_announce_deadline()).await;
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn until_announce_deadline(&self) -> Duration {
        let deadline = *self
            .announce_deadline
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        deadline
            .saturating_duration_since(Instant::now())
            .min(PORT_RECHECK)
    }

    /// Waits for the port to have something: a first request, or a client connecting.
    /// Returns the bytes read (empty: a client is connected and has not written yet).
    pub(super) async fn next_client(&self, buf: &mut [u8]) -> io::Result<Vec<u8>> {
        loop {
            let mut sigio = signal(SignalKind::io())?;
            match self.read_once(buf)? {
                PortRead::Data(n) => return Ok(buf.get(..n).unwrap_or_default().to_vec()),
                PortRead::Nothing => return Ok(Vec::new()),
                PortRead::NotConnected => wait(&mut sigio, PORT_RECHECK).await,
            }
        }
    }
}

/// Until a SIGIO or `timeout`, whichever first.
async fn wait(sigio: &mut Signal, timeout: Duration) {
    tokio::select! {
        _ = sigio.recv() => {}
        _ = tokio::time::sleep(timeout.max(Duration::from_millis(1))) => {}
    }
}
