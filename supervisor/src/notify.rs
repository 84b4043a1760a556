//! sd_notify readiness: a datagram socket per container with `notify = true`, bound into
//! the container at [`CONTAINER_SOCKET`] and named by `NOTIFY_SOCKET`. `READY=1` marks the
//! container started for `depends_on` (condition "started").

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio::net::UnixDatagram;
use tokio::sync::mpsc::UnboundedSender;

use std::sync::atomic::Ordering;

use crate::events::{Event, ReadyQueued};

/// Where the socket appears inside the container.
pub const CONTAINER_SOCKET: &str = "/dev/notify.sock";

/// True if a notification datagram says the service is ready.
pub fn says_ready(datagram: &[u8]) -> bool {
    datagram
        .split(|b| *b == b'\n')
        .any(|line| line == b"READY=1")
}

/// Binds `path` (removing a stale socket) and forwards READY=1 as [`Event::Ready`] until
/// the supervisor's channel closes.
pub fn listen(name: &str, path: &Path, events: UnboundedSender<Event>) -> std::io::Result<PathBuf> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let socket = UnixDatagram::bind(path)?;
    // Any container user (also a user-namespaced root, a stranger to the host) may notify.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    let name = name.to_string();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        // At most one Ready of this container waits in the event queue at any time.
        let queued = ReadyQueued::default();
        loop {
            match socket.recv(&mut buf).await {
                Ok(n) => {
                    if !says_ready(&buf[..n]) || queued.0.swap(true, Ordering::Relaxed) {
                        continue;
                    }
                    let event = Event::Ready {
                        name: name.clone(),
                        queued: queued.clone(),
                    };
                    if events.send(event).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    log::warn!("{name}: notify socket: {e}");
                    return;
                }
            }
        }
    });
    Ok(path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_is_found_among_other_assignments() {
        assert!(says_ready(b"READY=1"));
        assert!(says_ready(b"STATUS=up\nREADY=1\nMAINPID=7"));
        assert!(!says_ready(b"READY=0"));
        assert!(!says_ready(b"STATUS=READY=1"));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_datagram_becomes_a_ready_event() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n/web.sock");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        listen("web", &path, tx).unwrap();
        let client = std::os::unix::net::UnixDatagram::unbound().unwrap();
        client.send_to(b"STATUS=starting", &path).unwrap();
        client.send_to(b"READY=1\n", &path).unwrap();
        let Some(Event::Ready { name, queued }) = rx.recv().await else {
            panic!("no Ready event");
        };
        assert_eq!(name, "web");

        // A flood while that one is not taken queues nothing more; once taken, the next
        // READY=1 is queued again.
        // The socket queue is short: the listener task must run between sends.
        client.set_nonblocking(true).unwrap();
        let send = |message: &'static [u8]| {
            let client = &client;
            let path = &path;
            async move {
                loop {
                    match client.send_to(message, path) {
                        Ok(_) => return,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            tokio::task::yield_now().await
                        }
                        Err(e) => panic!("send: {e}"),
                    }
                }
            }
        };
        for _ in 0..500 {
            send(b"READY=1").await;
        }
        queued.taken();
        send(b"READY=1").await;
        assert!(matches!(rx.recv().await, Some(Event::Ready { .. })));
        // Everything sent has been read by now (datagrams are read in order, and the
        // one after the flood made it through): the queue holds nothing else.
        tokio::task::yield_now().await;
        assert!(rx.try_recv().is_err(), "the flood queued more events");
    }
}
