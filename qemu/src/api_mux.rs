//! The host end of the guest's control API: one unix socket any number of clients connect to
//! (`keel --vm DIR ...`, tests), each handed a virtio-serial port of its own.
//!
//! A virtio-serial port is one byte stream, and QEMU's socket chardev serves one client at a
//! time: with a single port, a `keel logs -f` or a long `keel exec` held up every other
//! command until it ended. The guest serves [`keel_api::VIRTIO_PORT_COUNT`]-many ports
//! instead, each behind a private chardev socket, and this module accepts clients on the
//! public socket, leases each a free port for the life of its connection and copies bytes
//! both ways. When every port is leased, a new client waits for one. A client closing its
//! connection closes its port's chardev connection, which ends whatever the guest was
//! streaming to it.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// How long a leased port's chardev socket may take to accept: QEMU creates it before
/// running the guest, so only a client arriving during QEMU's start waits.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The ports and which of them are leased.
struct PortPool {
    sockets: Vec<PathBuf>,
    leased: Mutex<Vec<bool>>,
    freed: Condvar,
}

/// A port leased to one client; returned to the pool on drop.
struct Lease<'a> {
    pool: &'a PortPool,
    index: usize,
}

impl PortPool {
    /// Waits for a free port and leases it.
    fn lease(&self) -> Lease<'_> {
        let mut leased = self.leased.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(index) = leased.iter().position(|busy| !busy) {
                leased[index] = true;
                return Lease { pool: self, index };
            }
            leased = self
                .freed
                .wait(leased)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let mut leased = self
            .pool
            .leased
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        leased[self.index] = false;
        self.pool.freed.notify_one();
    }
}

/// The public API socket, served until dropped.
pub(crate) struct ApiMux {
    path: PathBuf,
    listener: Arc<UnixListener>,
    stopping: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

/// Binds a socket at `public` that nobody but its owner can ever connect to: it is bound in
/// a fresh 0700 directory beside `public`, made 0600 there, and only then renamed into
/// place (a bind followed by a chmod in place would leave a moment with the umask's mode).
fn bind_private(public: &Path) -> io::Result<UnixListener> {
    let parent = public.parent().unwrap_or(Path::new("."));
    // Whoever may write the directory could swap the socket for one of their own, which the
    // CLI would then talk to: refuse such a directory (unless it is sticky, like /tmp).
    let mode = std::fs::metadata(parent)?.permissions().mode();
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is writable by other users ({:o}): anyone could replace the API socket \
                 there; make it private (chmod go-w) or give another directory",
                parent.display(),
                mode & 0o7777
            ),
        ));
    }
    let staging = parent.join(format!(".api.sock.{}.d", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::DirBuilder::new().mode(0o700).create(&staging)?;
    let staged = staging.join("api.sock");
    let bound = UnixListener::bind(&staged).and_then(|listener| {
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&staged, public)?;
        Ok(listener)
    });
    let _ = std::fs::remove_dir_all(&staging);
    bound
}

impl ApiMux {
    /// Binds `public` (mode 0600: whoever connects controls the guest as root; a stale socket
    /// there is replaced, anything else is an error) and serves it, spreading clients over
    /// the chardev sockets `ports`.
    pub(crate) fn start(public: &Path, ports: Vec<PathBuf>) -> io::Result<ApiMux> {
        match std::fs::symlink_metadata(public) {
            Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(public)?,
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", public.display()),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = Arc::new(bind_private(public)?);
        let pool = Arc::new(PortPool {
            leased: Mutex::new(vec![false; ports.len()]),
            sockets: ports,
            freed: Condvar::new(),
        });
        let stopping = Arc::new(AtomicBool::new(false));
        let accept = {
            let listener = Arc::clone(&listener);
            let stopping = Arc::clone(&stopping);
            thread::Builder::new()
                .name("keel-api-accept".into())
                .spawn(move || accept_loop(&listener, &pool, &stopping))?
        };
        Ok(ApiMux {
            path: public.to_owned(),
            listener,
            stopping,
            accept: Some(accept),
        })
    }
}

impl Drop for ApiMux {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // shutdown(2) on a listening socket wakes a blocked accept(2) with an error.
        let _ = nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(&*self.listener),
            nix::sys::socket::Shutdown::Both,
        );
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: &UnixListener, pool: &Arc<PortPool>, stopping: &AtomicBool) {
    loop {
        let client = listener.accept();
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        match client {
            Ok((client, _)) => {
                let pool = Arc::clone(pool);
                let spawned = thread::Builder::new()
                    .name("keel-api-client".into())
                    .spawn(move || serve_client(client, &pool));
                if let Err(e) = spawned {
                    eprintln!("keel: API socket: cannot serve a client: {e}");
                }
            }
            // EMFILE and the like: the client is refused, the next may be served.
            Err(e) => {
                eprintln!("keel: API socket: accept: {e}");
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Copies one client's bytes to its leased port and back until either side is done.
fn serve_client(client: UnixStream, pool: &PortPool) {
    let lease = pool.lease();
    let Some(guest) = connect(&pool.sockets[lease.index]) else {
        return;
    };
    let (Ok(mut client_out), Ok(mut guest_in)) = (client.try_clone(), guest.try_clone()) else {
        return;
    };
    let down = thread::Builder::new()
        .name("keel-api-down".into())
        .spawn(move || {
            let _ = copy(&mut guest_in, &mut client_out);
            // The guest side ended (QEMU exited) or the client stopped reading: end both.
            let _ = client_out.shutdown(Shutdown::Both);
            let _ = guest_in.shutdown(Shutdown::Both);
        });
    let mut client_in = &client;
    let mut guest_out = &guest;
    let _ = copy(&mut client_in, &mut guest_out);
    // The client sent its last byte. It may only have shut down its sending side and still
    // want the answers (as socat does): wait for it to close the connection entirely (or for
    // the other direction to end, which shuts the socket down here too).
    let mut fds = [PollFd::new(client.as_fd(), PollFlags::empty())];
    while let Err(nix::errno::Errno::EINTR) = poll(&mut fds, PollTimeout::NONE) {}
    let _ = guest.shutdown(Shutdown::Both);
    let _ = client.shutdown(Shutdown::Both);
    if let Ok(down) = down {
        let _ = down.join();
    }
    drop(lease);
}

/// Connects to a port's chardev socket, waiting while QEMU has not created it yet.
fn connect(socket: &Path) -> Option<UnixStream> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        match UnixStream::connect(socket) {
            Ok(stream) => return Some(stream),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                // QEMU offers nothing to wait on before the socket exists.
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                eprintln!("keel: API socket: connecting to {}: {e}", socket.display());
                return None;
            }
        }
    }
}

/// `io::copy` that flushes nothing and stops at the first error.
fn copy(from: &mut impl Read, to: &mut impl Write) -> io::Result<()> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    /// A stand-in for QEMU's chardev: answers each line with `port N: LINE` and keeps the
    /// connection until the client closes.
    fn fake_port(dir: &Path, n: usize) -> PathBuf {
        let path = dir.join(format!("port{n}.sock"));
        let listener = UnixListener::bind(&path).unwrap();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let conn = conn.unwrap();
                let mut out = conn.try_clone().unwrap();
                for line in BufReader::new(conn).lines() {
                    let Ok(line) = line else { break };
                    if writeln!(out, "port {n}: {line}").is_err() {
                        break;
                    }
                }
            }
        });
        path
    }

    fn ask(client: &mut UnixStream, line: &str) -> String {
        writeln!(client, "{line}").unwrap();
        let mut reader = BufReader::new(client.try_clone().unwrap());
        let mut answer = String::new();
        reader.read_line(&mut answer).unwrap();
        answer.trim_end().to_owned()
    }

    #[test]
    fn clients_get_ports_of_their_own_and_wait_when_all_are_leased() {
        let dir = tempfile::tempdir().unwrap();
        let ports = vec![fake_port(dir.path(), 0), fake_port(dir.path(), 1)];
        let public = dir.path().join("api.sock");
        let mux = ApiMux::start(&public, ports).unwrap();
        let mode = std::fs::metadata(&public).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "only the owner may connect");
        // A directory others may write is refused.
        let shared = tempfile::tempdir().unwrap();
        std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let refused = ApiMux::start(&shared.path().join("api.sock"), Vec::new()).err();
        assert!(
            refused
                .as_ref()
                .is_some_and(|e| e.to_string().contains("writable by other users")),
            "{refused:?}"
        );
        let leftovers: Vec<_> = std::fs::read_dir(public.parent().unwrap())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().starts_with(".api.sock"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        let mut a = UnixStream::connect(&public).unwrap();
        let mut b = UnixStream::connect(&public).unwrap();
        let answer_a = ask(&mut a, "ps");
        let answer_b = ask(&mut b, "ps");
        // Two clients at once, on two different ports.
        assert_ne!(answer_a[..6], answer_b[..6], "{answer_a} / {answer_b}");

        // A third waits until one of the two leaves, then gets its port.
        let mut c = UnixStream::connect(&public).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        writeln!(c, "ps").unwrap();
        let mut buf = [0u8; 64];
        assert!(
            c.read(&mut buf).is_err(),
            "served while every port was leased"
        );
        drop(a);
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let n = c.read(&mut buf).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&buf[..n]).trim_end(),
            answer_a,
            "the freed port"
        );

        // A client that only shuts down its sending side still gets its answer.
        let mut d = UnixStream::connect(&public).unwrap();
        drop(b);
        writeln!(d, "inspect").unwrap();
        d.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        BufReader::new(&d).read_line(&mut answer).unwrap();
        assert!(answer.ends_with(": inspect\n"), "{answer:?}");

        drop(mux);
        assert!(!public.exists());
    }
}
