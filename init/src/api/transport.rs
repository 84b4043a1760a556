//! The two transports: the unix socket (root processes of the host only: SO_PEERCRED and
//! crate::host_process) with a task per connection,
//! and the virtio-serial ports (port.rs) that successive host clients share.

use super::*;

/// Binds the API socket (normally [`SOCKET_PATH`]), mode 0600, creating its directory and
/// replacing a stale socket. Must be called within the tokio runtime.
pub fn listen_unix(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    // Only root is served anyway (SO_PEERCRED); the mode keeps others from even connecting.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves connections on `listener` forever, each in a task of its own. Only peers with uid
/// 0 are served; others get a `forbidden` error line and are closed.
pub async fn serve(listener: UnixListener, calls: mpsc::UnboundedSender<Call>, logs_dir: PathBuf) {
    serve_uid(listener, calls, logs_dir, 0).await;
}

pub(super) async fn serve_uid(
    listener: UnixListener,
    calls: mpsc::UnboundedSender<Call>,
    logs_dir: PathBuf,
    allowed_uid: u32,
) {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Typically EMFILE: retrying at once would spin.
                log::warn!("api: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if active.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            // try_write: an unanswered peer must not hold up the accept loop.
            let line = Response::Error(ApiError::internal("too many connections")).to_line(None);
            let _ = stream.try_write(line.as_bytes());
            continue;
        }
        let slot = Slot::take(&active);
        let calls = calls.clone();
        let logs_dir = logs_dir.clone();
        tokio::spawn(async move {
            let _slot = slot;
            connection(stream, calls, logs_dir, allowed_uid).await;
        });
    }
}

/// A place among the MAX_CONNECTIONS, given back on drop.
pub(super) struct Slot(Arc<AtomicUsize>);

impl Slot {
    pub(super) fn take(active: &Arc<AtomicUsize>) -> Slot {
        active.fetch_add(1, Ordering::Relaxed);
        Slot(Arc::clone(active))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(super) async fn connection(
    stream: UnixStream,
    calls: mpsc::UnboundedSender<Call>,
    logs_dir: PathBuf,
    allowed_uid: u32,
) {
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == allowed_uid => {
            // Root in a container is uid 0 too: only the host's own processes are served.
            let host = match cred.pid() {
                Some(pid) if pid > 0 => crate::host_process::verdict(pid as u32),
                _ => Err("its pid is unknown".to_string()),
            };
            if let Err(why) = host {
                log::warn!(
                    "api: refused a connection from pid {}: {why}",
                    cred.pid().unwrap_or(0)
                );
                let line = Response::Error(ApiError::forbidden(format!(
                    "the Keel API serves only the host's own processes, not containers ({why})"
                )))
                .to_line(None);
                let _ = stream.try_write(line.as_bytes());
                return;
            }
        }
        Ok(cred) => {
            let line = Response::Error(ApiError::forbidden(format!(
                "the Keel API is for root only (you are uid {})",
                cred.uid()
            )))
            .to_line(None);
            let _ = stream.try_write(line.as_bytes());
            return;
        }
        Err(e) => {
            log::warn!("api: cannot read the peer's credentials: {e}");
            return;
        }
    }
    let conn = Conn::Unix(stream);
    Session::new(&conn, Vec::new(), &calls, &logs_dir)
        .run()
        .await;
}

/// Serves the protocol on the virtio-serial port at `path` (normally [`VIRTIO_PORT_PATH`];
/// where that udev link is missing, the port is found by name in /sys/class/virtio-ports),
/// waiting up to 30 s for it to appear. The port is one byte stream that successive host
/// clients share: requests are served one after the other, and a client going away (the
/// host end closing) ends whatever was being streamed to it. Whoever can open the host end
/// is trusted as root. Returns only if the port cannot be used (logged).
///
/// Only a `required` port's absence is worth a warning: a runner may give fewer ports than
/// [`VIRTIO_PORT_COUNT`].
pub fn serve_virtio(
    path: &Path,
    calls: mpsc::UnboundedSender<Call>,
    logs_dir: PathBuf,
    required: bool,
) -> impl Future<Output = ()> + Send + 'static {
    let path = path.to_owned();
    async move {
        match serve_port(&path, &calls, &logs_dir).await {
            Err(e) if required || e.kind() != io::ErrorKind::NotFound => log::warn!(
                "api: virtio-serial port {}: {e}; the API is not reachable from the host",
                path.display()
            ),
            _ => {}
        }
    }
}

/// The device node of the virtio-serial port named `name` (`/dev/vportNpM`), from sysfs.
pub fn find_virtio_port(name: &str) -> Option<PathBuf> {
    std::fs::read_dir("/sys/class/virtio-ports")
        .ok()?
        .flatten()
        .find(|entry| {
            std::fs::read_to_string(entry.path().join("name")).is_ok_and(|n| n.trim_end() == name)
        })
        .map(|entry| Path::new("/dev").join(entry.file_name()))
}

pub(super) fn resolve_port(path: &Path) -> Option<PathBuf> {
    if path.exists() {
        return Some(path.to_owned());
    }
    // /dev/virtio-ports/NAME is a link udev makes; Keel has no udev.
    match (path.parent(), path.file_name().and_then(|n| n.to_str())) {
        (Some(dir), Some(name)) if dir == Path::new("/dev/virtio-ports") => find_virtio_port(name),
        _ => None,
    }
}

pub(super) async fn serve_port(
    path: &Path,
    calls: &mpsc::UnboundedSender<Call>,
    logs_dir: &Path,
) -> io::Result<()> {
    use rustix::fs::{Mode, OFlags};
    use tokio::signal::unix::{SignalKind, signal};

    // Installed before O_ASYNC is set: SIGIO's default action would kill any process but
    // PID 1. The port's waits subscribe to it (port.rs).
    let _sigio = signal(SignalKind::io())?;
    let mut waited = Duration::ZERO;
    let device = loop {
        if let Some(device) = resolve_port(path) {
            break device;
        }
        if waited >= PORT_WAIT {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "no such port after 30 s (is the virtio_console module loaded?)",
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        waited += Duration::from_millis(250);
    };
    let fd: OwnedFd = rustix::fs::open(
        &device,
        OFlags::RDWR | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY,
        Mode::empty(),
    )?;
    enable_sigio(&fd)?;
    log::info!("api: serving on virtio-serial port {}", device.display());

    let mut conn = Conn::Port(PortConn::new(fd));
    let mut buf = vec![0u8; 4096];
    loop {
        let Conn::Port(port) = &conn else {
            return Ok(());
        };
        let first = match port.next_client(&mut buf).await {
            Ok(first) => first,
            Err(e) => {
                log::warn!("api: reading {}: {e}", device.display());
                tokio::time::sleep(Duration::from_secs(5)).await;
                continue;
            }
        };
        port.begin_session();
        Session::new(&conn, first, calls, logs_dir).run().await;
        // The session's state goes with it; the open port stays.
        conn = match conn {
            Conn::Port(port) => Conn::Port(PortConn::new(port.into_fd())),
            unix @ Conn::Unix(_) => unix,
        };
    }
}

/// Asks for SIGIO on the port's events (the driver sends one when the host end connects).
pub(super) fn enable_sigio(fd: &OwnedFd) -> io::Result<()> {
    use rustix::fs::{OFlags, fcntl_getfl, fcntl_setfl};
    let pid = libc::pid_t::try_from(std::process::id()).unwrap_or(1);
    // SAFETY: F_SETOWN takes an integer argument and touches no memory of ours; the fd is
    // valid for the duration of the call since we borrow it.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETOWN, pid) } < 0 {
        return Err(io::Error::last_os_error());
    }
    fcntl_setfl(fd, fcntl_getfl(fd)? | OFlags::ASYNC)?;
    Ok(())
}

/// The two transports, with the few operations a session needs. Both are cancel safe: data
/// is only taken from the kernel inside a synchronous non-blocking call.
pub(super) enum Conn {
    Unix(UnixStream),
    Port(PortConn),
}

impl Conn {
    /// Some bytes, or 0 at the end (the client closed or, on the port, the host end did).
    pub(super) async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let result = match self {
                Conn::Unix(stream) => {
                    stream.readable().await?;
                    stream.try_read(buf)
                }
                Conn::Port(port) => return port.read(buf).await,
            };
            match result {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                result => return result,
            }
        }
    }

    pub(super) async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let result = match self {
                Conn::Unix(stream) => {
                    stream.writable().await?;
                    stream.try_write(data)
                }
                Conn::Port(port) => return port.write_all(data).await,
            };
            match result {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => data = data.get(n..).unwrap_or_default(),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
