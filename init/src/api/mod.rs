//! The control API inside PID 1: the server side of the protocol of the `keel-api` crate
//! (docs/api.md), on `/run/keel/api.sock` for root and on the `keel.api` virtio-serial port
//! for the host that runs the VM.
//!
//! Requests that need the supervisor become [`Call`]s on a channel that PID 1's main loop
//! drains; the loop answers each on its oneshot. `logs` is served here, from the log files,
//! so that a slow reader never occupies the main loop.
//!
//! This runs inside PID 1 on its single-threaded runtime, so nothing here may panic or
//! block: sockets and devices go through tokio (`UnixStream`, `AsyncFd`), and log files,
//! which are plain reads from the root tmpfs, are read in bounded chunks with a yield to the
//! runtime after each.

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keel_api::{Envelope, MAX_REQUEST_LINE, Output, Rejection, Request, Response, Stream};
use serde_json::Value;
use tokio::io::unix::AsyncFd;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

mod port;
use port::PortConn;

pub use keel_api::{
    ApiError, ContainerStatus, ErrorCode, LogEntry, Stats, VIRTIO_PORT_COUNT, VIRTIO_PORT_NAME,
    parse_log_line, virtio_port_name,
};

/// Where PID 1 listens.
pub const SOCKET_PATH: &str = keel_api::DEFAULT_SOCKET;
/// Where the supervisor writes `NAME.log` and its rotations `NAME.log.1` (newest) ...
pub const LOGS_DIR: &str = "/var/log/keel";
/// The port's path where udev runs; without udev, [`serve_virtio`] finds the device itself.
pub const VIRTIO_PORT_PATH: &str = "/dev/virtio-ports/keel.api";

/// Root clients are trusted, but a runaway script should not pile up tasks in PID 1.
const MAX_CONNECTIONS: usize = 32;
/// How often `logs -f` looks at the file.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(200);
/// Log files are read, and responses written, in pieces of this size.
const CHUNK: usize = 64 * 1024;
/// A log line without a newline after this many bytes is cut there.
const MAX_LOG_LINE: usize = 1 << 20;
/// Rotated log files are looked for up to this number.
const MAX_ROTATED: u32 = 1000;
/// Exec output read after the exit, from processes the command left behind, is capped.
const MAX_EXEC_DRAIN: usize = 1 << 20;
/// How long [`serve_virtio`] waits for its port to appear at boot.
const PORT_WAIT: Duration = Duration::from_secs(30);

/// What the main loop is asked to do. Names are checked to be syntactically valid container
/// names; whether such a container exists is for the main loop to say (`not_found`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Ps,
    Inspect(String),
    /// `None`: every container.
    Stats(Option<String>),
    Start(String),
    /// `timeout_ms: None`: the container's own grace period.
    Stop {
        name: String,
        timeout_ms: Option<u64>,
    },
    Restart(String),
    /// `signal` is in 1..=64.
    Kill {
        name: String,
        signal: i32,
    },
    /// `argv` is not empty; no string holds a NUL; `env` entries are `NAME=value`.
    Exec {
        name: String,
        argv: Vec<String>,
        env: Vec<String>,
    },
    Reboot,
    Poweroff,
    /// The text of a new host file, unparsed: the main loop parses and judges it.
    Apply {
        host_file: String,
        dry_run: bool,
    },
}

/// The main loop's answer. Expected per command: `Ps` → `Statuses`, `Inspect` → `Value`
/// (an object with `name`, `status` and `config`, see docs/api.md), `Stats` → `Stats`,
/// `Exec` → `Exec`, `Apply` → `Value` (a `keel_api::ApplyReport`, once the apply has
/// finished), the others → `Done` (for `Reboot` and `Poweroff`, before shutting down).
#[derive(Debug)]
pub enum Reply {
    Statuses(Vec<ContainerStatus>),
    Value(Value),
    Stats(Vec<Stats>),
    Done,
    Exec(ExecHandle),
}

/// A process started by `exec`: the read ends of its output pipes (the API makes them
/// non-blocking) and its exit code, sent once it has been reaped (128 + N for signal N).
#[derive(Debug)]
pub struct ExecHandle {
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    pub exit: oneshot::Receiver<i32>,
}

/// One request for the main loop.
#[derive(Debug)]
pub struct Call {
    pub command: Command,
    pub reply: oneshot::Sender<Result<Reply, ApiError>>,
}

impl Call {
    /// Answers the call; a client that has gone away meanwhile is no error.
    pub fn respond(self, result: Result<Reply, ApiError>) {
        let _ = self.reply.send(result);
    }
}

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

async fn serve_uid(
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
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(active: &Arc<AtomicUsize>) -> Slot {
        active.fetch_add(1, Ordering::Relaxed);
        Slot(Arc::clone(active))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn connection(
    stream: UnixStream,
    calls: mpsc::UnboundedSender<Call>,
    logs_dir: PathBuf,
    allowed_uid: u32,
) {
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == allowed_uid => {}
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

fn resolve_port(path: &Path) -> Option<PathBuf> {
    if path.exists() {
        return Some(path.to_owned());
    }
    // /dev/virtio-ports/NAME is a link udev makes; Keel has no udev.
    match (path.parent(), path.file_name().and_then(|n| n.to_str())) {
        (Some(dir), Some(name)) if dir == Path::new("/dev/virtio-ports") => find_virtio_port(name),
        _ => None,
    }
}

async fn serve_port(
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
fn enable_sigio(fd: &OwnedFd) -> io::Result<()> {
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
enum Conn {
    Unix(UnixStream),
    Port(PortConn),
}

impl Conn {
    /// Some bytes, or 0 at the end (the client closed or, on the port, the host end did).
    async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
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

    async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
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

enum Incoming {
    Line(Vec<u8>),
    TooLong,
    Closed,
}

/// What a request becomes once checked.
enum Dispatch {
    Call(Command),
    Logs(LogsQuery),
}

struct LogsQuery {
    name: String,
    follow: bool,
    since_ms: Option<u64>,
    tail: Option<u64>,
}

/// One client's requests, served one after the other.
struct Session<'a> {
    conn: &'a Conn,
    /// Received and not consumed yet.
    input: Vec<u8>,
    /// Dropping the rest of an over-long request line.
    discarding: bool,
    calls: &'a mpsc::UnboundedSender<Call>,
    logs_dir: &'a Path,
}

/// The connection failed or the client went away: stop serving it.
struct Gone;

impl From<io::Error> for Gone {
    fn from(_: io::Error) -> Gone {
        Gone
    }
}

impl<'a> Session<'a> {
    fn new(
        conn: &'a Conn,
        input: Vec<u8>,
        calls: &'a mpsc::UnboundedSender<Call>,
        logs_dir: &'a Path,
    ) -> Session<'a> {
        Session {
            conn,
            input,
            discarding: false,
            calls,
            logs_dir,
        }
    }

    async fn run(&mut self) {
        loop {
            let line = match self.next_line().await {
                Incoming::Line(line) => line,
                Incoming::TooLong => {
                    let error = ApiError::bad_request(format!(
                        "the request line is longer than {MAX_REQUEST_LINE} bytes"
                    ));
                    if self.send(None, &Response::Error(error)).await.is_err() {
                        return;
                    }
                    continue;
                }
                Incoming::Closed => return,
            };
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let served = match Envelope::decode(&line) {
                Ok(envelope) => self.handle(envelope.id, envelope.request).await,
                Err(Rejection { id, error }) => self.send(id, &Response::Error(error)).await,
            };
            if served.is_err() {
                return;
            }
        }
    }

    async fn next_line(&mut self) -> Incoming {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(i) = self.input.iter().position(|&b| b == b'\n') {
                let rest = self.input.split_off(i + 1);
                let mut line = std::mem::replace(&mut self.input, rest);
                line.pop();
                if std::mem::take(&mut self.discarding) {
                    continue;
                }
                return Incoming::Line(line);
            }
            if self.input.len() >= MAX_REQUEST_LINE {
                self.input.clear();
                if !self.discarding {
                    self.discarding = true;
                    return Incoming::TooLong;
                }
            }
            match self.conn.read(&mut buf).await {
                Ok(0) | Err(_) => return Incoming::Closed,
                Ok(n) => self
                    .input
                    .extend_from_slice(buf.get(..n).unwrap_or_default()),
            }
        }
    }

    async fn send(&self, id: Option<u64>, response: &Response) -> Result<(), Gone> {
        Ok(self.conn.write_all(response.to_line(id).as_bytes()).await?)
    }

    async fn handle(&mut self, id: Option<u64>, request: Request) -> Result<(), Gone> {
        let command = match check(request) {
            Ok(Dispatch::Call(command)) => command,
            Ok(Dispatch::Logs(query)) => return self.logs(id, query).await,
            Err(error) => return self.send(id, &Response::Error(error)).await,
        };
        let is_exec = matches!(command, Command::Exec { .. });
        let response = match self.call(command).await {
            Ok(Reply::Exec(handle)) if is_exec => return self.exec(id, handle).await,
            Ok(reply) if !is_exec => match ok_value(reply) {
                Ok(value) => Response::Ok(value),
                Err(error) => Response::Error(error),
            },
            Ok(_) => Response::Error(ApiError::internal("PID 1 answered exec without a process")),
            Err(error) => Response::Error(error),
        };
        self.send(id, &response).await
    }

    async fn call(&self, command: Command) -> Result<Reply, ApiError> {
        let (reply, answer) = oneshot::channel();
        self.calls
            .send(Call { command, reply })
            .map_err(|_| ApiError::internal("PID 1 no longer takes requests (shutting down)"))?;
        answer
            .await
            .map_err(|_| ApiError::internal("PID 1 dropped the request"))?
    }

    /// Streams an exec'd process's output, then its exit code. Anything arriving from the
    /// client meanwhile ends the stream: on the port that is the next client's request (the
    /// previous one went away), and a closed connection leaves nobody to stream to.
    async fn exec(&mut self, id: Option<u64>, handle: ExecHandle) -> Result<(), Gone> {
        let ExecHandle {
            stdout,
            stderr,
            mut exit,
        } = handle;
        let (out, err) = match (pipe_reader(stdout), pipe_reader(stderr)) {
            (Ok(out), Ok(err)) => (out, err),
            (Err(e), _) | (_, Err(e)) => {
                let error = ApiError::internal(format!("cannot read the process's output: {e}"));
                return self.send(id, &Response::Error(error)).await;
            }
        };
        let conn = self.conn;
        let (mut out_open, mut err_open) = (true, true);
        let mut out_buf = vec![0u8; 16 * 1024];
        let mut err_buf = vec![0u8; 16 * 1024];
        let mut input = [0u8; 4096];
        let mut watching = true;
        let code = loop {
            tokio::select! {
                read = read_pipe(&out, &mut out_buf), if out_open => match read {
                    Ok(n @ 1..) => {
                        let data = out_buf.get(..n).unwrap_or_default();
                        self.send(id, &Response::Out(Output::new(Stream::Stdout, data))).await?;
                    }
                    _ => out_open = false,
                },
                read = read_pipe(&err, &mut err_buf), if err_open => match read {
                    Ok(n @ 1..) => {
                        let data = err_buf.get(..n).unwrap_or_default();
                        self.send(id, &Response::Out(Output::new(Stream::Stderr, data))).await?;
                    }
                    _ => err_open = false,
                },
                code = &mut exit => break code,
                read = conn.read(&mut input), if watching => match read {
                    Ok(n @ 1..) => {
                        self.input.extend_from_slice(input.get(..n).unwrap_or_default());
                        return Ok(());
                    }
                    // A unix socket client may have only shut down its sending side (as
                    // socat does): it still wants the answer, and a write will tell if it
                    // is gone. On the port the end of input is the host end closing.
                    Ok(0) if matches!(conn, Conn::Unix(_)) => watching = false,
                    _ => return Err(Gone),
                },
            }
        };
        let code = match code {
            Ok(code) => code,
            Err(_) => {
                let error = ApiError::internal("the process's exit status was lost");
                return self.send(id, &Response::Error(error)).await;
            }
        };
        // Its output is all in the pipes by now; what processes it left behind may still
        // write is not waited for.
        for (fd, open, stream) in [
            (&out, out_open, Stream::Stdout),
            (&err, err_open, Stream::Stderr),
        ] {
            let mut drained = 0;
            while open && drained < MAX_EXEC_DRAIN {
                match rustix::io::read(fd.get_ref(), &mut out_buf[..]) {
                    Ok(n @ 1..) => {
                        drained += n;
                        let data = out_buf.get(..n).unwrap_or_default();
                        self.send(id, &Response::Out(Output::new(stream, data)))
                            .await?;
                    }
                    Err(rustix::io::Errno::INTR) => {}
                    _ => break,
                }
            }
        }
        self.send(id, &Response::Exit(code)).await
    }

    async fn logs(&mut self, id: Option<u64>, query: LogsQuery) -> Result<(), Gone> {
        let set = match LogSet::open(self.logs_dir, &query.name) {
            Ok(Some(set)) => set,
            Ok(None) => {
                let error = ApiError::not_found(format!("no logs for `{}`", query.name));
                return self.send(id, &Response::Error(error)).await;
            }
            Err(e) => {
                let error = ApiError::internal(format!("reading the logs: {e}"));
                return self.send(id, &Response::Error(error)).await;
            }
        };
        let mut sink = Sink::new(self.conn, id, query.since_ms);
        let mut live = match set.replay(query.since_ms, query.tail, &mut sink).await {
            Ok(live) => live,
            Err(Failure::Gone) => return Err(Gone),
            Err(Failure::Read(e)) => {
                sink.flush().await?;
                let error = ApiError::internal(format!("reading the logs: {e}"));
                return self.send(id, &Response::Error(error)).await;
            }
        };
        sink.flush().await?;
        if !query.follow {
            return self.send(id, &Response::Ok(Value::Null)).await;
        }
        let path = self.logs_dir.join(format!("{}.log", query.name));
        let conn = self.conn;
        let mut interval = tokio::time::interval(FOLLOW_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut input = [0u8; 4096];
        loop {
            tokio::select! {
                read = conn.read(&mut input) => match read {
                    // See exec: input means this client is done.
                    Ok(n @ 1..) => {
                        self.input.extend_from_slice(input.get(..n).unwrap_or_default());
                        return Ok(());
                    }
                    _ => return Err(Gone),
                },
                _ = interval.tick() => {
                    match live.poll(&path, &mut sink).await {
                        Ok(()) => {}
                        Err(Failure::Gone) => return Err(Gone),
                        Err(Failure::Read(e)) => {
                            sink.flush().await?;
                            let error = ApiError::internal(format!("following the logs: {e}"));
                            return self.send(id, &Response::Error(error)).await;
                        }
                    }
                    sink.flush().await?;
                }
            }
        }
    }
}

fn pipe_reader(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    rustix::io::ioctl_fionbio(&fd, true)?;
    // SAFETY: as in serve_port, the OwnedFd stays open and unchanged while the AsyncFd owns
    // it.
    unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// Some bytes, 0 at the end.
async fn read_pipe(fd: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut guard = fd.readable().await?;
        match guard.try_io(|fd| Ok(rustix::io::read(fd.get_ref(), &mut *buf)?)) {
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(result) => return result,
            Err(_) => {}
        }
    }
}

fn check_name(name: &str) -> Result<(), ApiError> {
    // The config's rule for names; it also keeps `logs` inside the log directory.
    let mut chars = name.chars();
    let valid = name.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "{name:?} is not a container name"
        )))
    }
}

fn check(request: Request) -> Result<Dispatch, ApiError> {
    let command = match request {
        Request::Ps => Command::Ps,
        Request::Inspect { name } => {
            check_name(&name)?;
            Command::Inspect(name)
        }
        Request::Stats { name } => {
            if let Some(name) = &name {
                check_name(name)?;
            }
            Command::Stats(name)
        }
        Request::Start { name } => {
            check_name(&name)?;
            Command::Start(name)
        }
        Request::Stop { name, timeout_ms } => {
            check_name(&name)?;
            Command::Stop { name, timeout_ms }
        }
        Request::Restart { name } => {
            check_name(&name)?;
            Command::Restart(name)
        }
        Request::Kill { name, signal } => {
            check_name(&name)?;
            if !(1..=64).contains(&signal) {
                return Err(ApiError::bad_request(format!(
                    "{signal} is not a signal number (1-64)"
                )));
            }
            Command::Kill { name, signal }
        }
        Request::Logs {
            name,
            follow,
            since_ms,
            tail,
        } => {
            check_name(&name)?;
            return Ok(Dispatch::Logs(LogsQuery {
                name,
                follow,
                since_ms,
                tail,
            }));
        }
        Request::Exec { name, argv, env } => {
            check_name(&name)?;
            if argv.is_empty() {
                return Err(ApiError::bad_request("exec needs a command"));
            }
            if argv.iter().chain(&env).any(|s| s.contains('\0')) {
                return Err(ApiError::bad_request(
                    "exec arguments and environment cannot contain NUL",
                ));
            }
            if let Some(bad) = env
                .iter()
                .find(|e| e.split_once('=').is_none_or(|(k, _)| k.is_empty()))
            {
                return Err(ApiError::bad_request(format!("{bad:?} is not NAME=value")));
            }
            Command::Exec { name, argv, env }
        }
        Request::Reboot => Command::Reboot,
        Request::Poweroff => Command::Poweroff,
        Request::Apply { host_file, dry_run } => Command::Apply { host_file, dry_run },
    };
    Ok(Dispatch::Call(command))
}

fn ok_value(reply: Reply) -> Result<Value, ApiError> {
    let encoded = match reply {
        Reply::Statuses(statuses) => serde_json::to_value(statuses),
        Reply::Stats(stats) => serde_json::to_value(stats),
        Reply::Value(value) => Ok(value),
        Reply::Done => Ok(Value::Null),
        Reply::Exec(_) => return Err(ApiError::internal("PID 1 answered with a process")),
    };
    encoded.map_err(|e| ApiError::internal(format!("encoding the answer: {e}")))
}

/// Why streaming logs stopped.
enum Failure {
    /// Writing to the client failed.
    Gone,
    /// Reading a log file failed.
    Read(io::Error),
}

impl From<Gone> for Failure {
    fn from(_: Gone) -> Failure {
        Failure::Gone
    }
}

/// Turns log file lines into `log` response lines, filtered by `since`, written in chunks.
struct Sink<'a> {
    conn: &'a Conn,
    id: Option<u64>,
    since_ms: Option<u64>,
    out: String,
}

impl<'a> Sink<'a> {
    fn new(conn: &'a Conn, id: Option<u64>, since_ms: Option<u64>) -> Sink<'a> {
        Sink {
            conn,
            id,
            since_ms,
            out: String::new(),
        }
    }

    async fn line(&mut self, raw: &[u8]) -> Result<(), Gone> {
        let text = String::from_utf8_lossy(raw);
        if let Some(entry) = parse_log_line(&text)
            && self.since_ms.is_none_or(|since| entry.ts_ms >= since)
        {
            self.out.push_str(&Response::Log(entry).to_line(self.id));
            if self.out.len() >= CHUNK {
                self.flush().await?;
            }
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), Gone> {
        if !self.out.is_empty() {
            self.conn.write_all(self.out.as_bytes()).await?;
            self.out.clear();
        }
        Ok(())
    }
}

/// A container's log files, opened together so that a rotation while they are read moves
/// nothing under us: oldest first, the live `NAME.log` (if it exists) last.
struct LogSet {
    files: Vec<File>,
    /// Whether the last file is the live one, whose last line may still be incomplete.
    live: bool,
}

fn file_key(file: &File) -> io::Result<(u64, u64)> {
    let m = file.metadata()?;
    Ok((m.dev(), m.ino()))
}

fn open_existing(path: &Path) -> io::Result<Option<File>> {
    match File::open(path) {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

impl LogSet {
    /// `None` if the container has no log file at all.
    fn open(dir: &Path, name: &str) -> io::Result<Option<LogSet>> {
        // The live file first: should a rotation happen while the rotated ones are opened,
        // its content then shows up again as .1 and is recognized by its inode, whereas
        // opening it last could miss what it held.
        let current = open_existing(&dir.join(format!("{name}.log")))?;
        let mut keys = Vec::new();
        if let Some(file) = &current {
            keys.push(file_key(file)?);
        }
        let mut rotated = Vec::new();
        for n in 1..=MAX_ROTATED {
            let Some(file) = open_existing(&dir.join(format!("{name}.log.{n}")))? else {
                break;
            };
            let key = file_key(&file)?;
            if !keys.contains(&key) {
                keys.push(key);
                rotated.push(file);
            }
        }
        rotated.reverse();
        let live = current.is_some();
        rotated.extend(current);
        Ok((!rotated.is_empty()).then_some(LogSet {
            files: rotated,
            live,
        }))
    }

    /// Where the entries to show begin (file index, byte offset): found by reading backwards
    /// from the end, counting `tail` entries and stopping at the first one before `since`.
    /// Entries are in time order, across the files too.
    async fn start(&self, since_ms: Option<u64>, tail: Option<u64>) -> io::Result<(usize, u64)> {
        if since_ms.is_none() && tail.is_none() {
            return Ok((0, 0));
        }
        let Some(newest) = self.files.last() else {
            return Ok((0, 0));
        };
        let last = self.files.len() - 1;
        // Past everything: where a `tail 0` starts.
        let mut start = (last, newest.metadata()?.len());
        let mut count = 0u64;
        let mut since_yield = 0usize;
        for (index, file) in self.files.iter().enumerate().rev() {
            let mut lines = RevLines::new(file.metadata()?.len());
            if self.live && index == last {
                // An incomplete last line is not shown yet.
                match lines.next(file)? {
                    Some((offset, _)) => start = (index, offset),
                    None => continue,
                }
            }
            while let Some((offset, raw)) = lines.next(file)? {
                since_yield += raw.len() + 1;
                if since_yield >= CHUNK {
                    since_yield = 0;
                    tokio::task::yield_now().await;
                }
                let Some(entry) = parse_log_line(&String::from_utf8_lossy(&raw)) else {
                    continue;
                };
                if tail.is_some_and(|t| count >= t) || since_ms.is_some_and(|s| entry.ts_ms < s) {
                    return Ok(start);
                }
                count += 1;
                start = (index, offset);
            }
        }
        Ok(start)
    }

    /// Sends the entries selected by `since_ms` and `tail`, and returns how to follow the
    /// live file from there.
    async fn replay(
        self,
        since_ms: Option<u64>,
        tail: Option<u64>,
        sink: &mut Sink<'_>,
    ) -> Result<Live, Failure> {
        let (first, offset) = self.start(since_ms, tail).await.map_err(Failure::Read)?;
        let last = self.files.len().saturating_sub(1);
        let live = self.live;
        let mut follow = Live::default();
        for (index, file) in self.files.into_iter().enumerate().skip(first) {
            let mut partial = Vec::new();
            let from = if index == first { offset } else { 0 };
            let pos = read_forward(&file, from, &mut partial, sink).await?;
            if live && index == last {
                follow = Live {
                    key: Some(file_key(&file).map_err(Failure::Read)?),
                    file: Some(file),
                    pos,
                    partial,
                };
            } else if !partial.is_empty() {
                // A rotated file is complete even if its last line has no newline.
                sink.line(&partial).await?;
            }
        }
        Ok(follow)
    }
}

/// The live log file of a `logs -f`.
#[derive(Default)]
struct Live {
    file: Option<File>,
    /// Device and inode of `file`, to notice the path being rotated away.
    key: Option<(u64, u64)>,
    /// Read up to here (`partial` included).
    pos: u64,
    /// The start of a line whose newline has not been written yet.
    partial: Vec<u8>,
}

impl Live {
    async fn poll(&mut self, path: &Path, sink: &mut Sink<'_>) -> Result<(), Failure> {
        if let Some(file) = &self.file {
            self.pos = read_forward(file, self.pos, &mut self.partial, sink).await?;
        }
        let metadata = match std::fs::metadata(path) {
            Ok(m) => m,
            // Between the rename and the new file: keep the old one.
            Err(_) => return Ok(()),
        };
        if Some((metadata.dev(), metadata.ino())) != self.key {
            // Rotated (or created): what the old file got last is complete now.
            if let Some(file) = self.file.take() {
                self.pos = read_forward(&file, self.pos, &mut self.partial, sink).await?;
            }
            if !self.partial.is_empty() {
                sink.line(&std::mem::take(&mut self.partial)).await?;
            }
            *self = Live::default();
            if let Some(file) = open_existing(path).map_err(Failure::Read)? {
                self.key = Some(file_key(&file).map_err(Failure::Read)?);
                self.pos = read_forward(&file, 0, &mut self.partial, sink).await?;
                self.file = Some(file);
            }
        } else if metadata.len() < self.pos {
            // Truncated in place: start over.
            self.pos = 0;
            self.partial.clear();
        }
        Ok(())
    }
}

/// Sends the complete lines of `file` from `pos` on, leaving an incomplete last line in
/// `partial` (which holds the start of a line on entry); returns the new position.
async fn read_forward(
    file: &File,
    mut pos: u64,
    partial: &mut Vec<u8>,
    sink: &mut Sink<'_>,
) -> Result<u64, Failure> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match file.read_at(&mut buf, pos) {
            Ok(0) => return Ok(pos),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Failure::Read(e)),
        };
        pos += n as u64;
        let mut rest = buf.get(..n).unwrap_or_default();
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            let (line, after) = rest.split_at(i);
            if partial.is_empty() {
                sink.line(line).await?;
            } else {
                partial.extend_from_slice(line);
                sink.line(&std::mem::take(partial)).await?;
            }
            rest = after.get(1..).unwrap_or_default();
        }
        partial.extend_from_slice(rest);
        if partial.len() > MAX_LOG_LINE {
            sink.line(&std::mem::take(partial)).await?;
        }
        // Reading from the page cache never waits, but a long file should not hold up the
        // rest of PID 1.
        tokio::task::yield_now().await;
    }
}

/// A file's lines from the last to the first, with their offsets. The first one returned is
/// what follows the last newline (empty if the file ends with one).
struct RevLines {
    /// `buf` holds the bytes from here to the end of the next line to return.
    pos: u64,
    buf: Vec<u8>,
    done: bool,
}

impl RevLines {
    fn new(len: u64) -> RevLines {
        RevLines {
            pos: len,
            buf: Vec::new(),
            done: false,
        }
    }

    fn next(&mut self, file: &File) -> io::Result<Option<(u64, Vec<u8>)>> {
        loop {
            if let Some(i) = self.buf.iter().rposition(|&b| b == b'\n') {
                let line = self.buf.split_off(i + 1);
                self.buf.truncate(i);
                return Ok(Some((self.pos + i as u64 + 1, line)));
            }
            if self.pos == 0 {
                if std::mem::replace(&mut self.done, true) {
                    return Ok(None);
                }
                return Ok(Some((0, std::mem::take(&mut self.buf))));
            }
            let n = self.pos.min(CHUNK as u64);
            let mut chunk = vec![0u8; n as usize];
            file.read_exact_at(&mut chunk, self.pos - n)?;
            chunk.extend_from_slice(&self.buf);
            self.buf = chunk;
            self.pos -= n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_api::{Client, format_log_line};
    use std::io::Write;
    use std::ops::ControlFlow;
    use std::os::unix::net::UnixStream as StdStream;

    fn entry(ts_ms: u64, line: &str) -> String {
        format_log_line(&LogEntry {
            ts_ms,
            stream: if ts_ms.is_multiple_of(2) {
                Stream::Stdout
            } else {
                Stream::Stderr
            },
            line: line.into(),
        }) + "\n"
    }

    /// Runs a session on a socketpair in a thread of its own, with `main_loop` answering the
    /// calls, and returns a client connected to it.
    fn server(
        logs_dir: &Path,
        mut main_loop: impl FnMut(Command) -> Result<Reply, ApiError> + Send + 'static,
    ) -> Client {
        let (ours, theirs) = StdStream::pair().unwrap();
        let logs_dir = logs_dir.to_owned();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                theirs.set_nonblocking(true).unwrap();
                let stream = UnixStream::from_std(theirs).unwrap();
                let (calls, mut requests) = mpsc::unbounded_channel();
                let session = tokio::spawn(async move {
                    let conn = Conn::Unix(stream);
                    Session::new(&conn, Vec::new(), &calls, &logs_dir)
                        .run()
                        .await;
                });
                loop {
                    tokio::select! {
                        Some(call) = requests.recv() => {
                            let Call { command, reply } = call;
                            let _ = reply.send(main_loop(command));
                        }
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {
                            if session.is_finished() {
                                break;
                            }
                        }
                    }
                }
            });
        });
        Client::connect_stream(ours)
    }

    fn collect(
        client: &mut Client,
        name: &str,
        since_ms: Option<u64>,
        tail: Option<u64>,
    ) -> Result<Vec<String>, ApiError> {
        let mut lines = Vec::new();
        client.logs(name, false, since_ms, tail, |e| {
            lines.push(e.line);
            ControlFlow::Continue(())
        })?;
        Ok(lines)
    }

    fn no_main_loop(_: Command) -> Result<Reply, ApiError> {
        Err(ApiError::internal("no main loop in this test"))
    }

    #[test]
    fn logs_apply_since_and_tail_across_rotated_files() {
        let dir = tempfile::tempdir().unwrap();
        let write = |file: &str, text: &str| std::fs::write(dir.path().join(file), text).unwrap();
        // Oldest in .2; .1 has a foreign line and no final newline; the live file ends in an
        // incomplete line that must not show.
        write("web.log.2", &(entry(1000, "a") + &entry(2000, "b")));
        write(
            "web.log.1",
            &(entry(3000, "c") + "garbage\n" + entry(4000, "d").trim_end()),
        );
        write(
            "web.log",
            &(entry(5000, "e") + &entry(6000, "f") + "2026-11-27T16:30:00.123Z std"),
        );
        let mut client = server(dir.path(), no_main_loop);
        let all = ["a", "b", "c", "d", "e", "f"];
        assert_eq!(collect(&mut client, "web", None, None).unwrap(), all);
        for tail in 0..8 {
            let expected = &all[all.len().saturating_sub(tail)..];
            assert_eq!(
                collect(&mut client, "web", None, Some(tail as u64)).unwrap(),
                expected,
                "tail {tail}"
            );
        }
        assert_eq!(
            collect(&mut client, "web", Some(2500), None).unwrap(),
            ["c", "d", "e", "f"]
        );
        assert_eq!(
            collect(&mut client, "web", Some(4000), None).unwrap(),
            ["d", "e", "f"]
        );
        assert_eq!(
            collect(&mut client, "web", Some(1500), Some(3)).unwrap(),
            ["d", "e", "f"]
        );
        assert_eq!(
            collect(&mut client, "web", Some(5500), Some(3)).unwrap(),
            ["f"]
        );
        assert!(
            collect(&mut client, "web", Some(9000), None)
                .unwrap()
                .is_empty()
        );
        let err = collect(&mut client, "nothing", None, None).unwrap_err();
        assert_eq!(err.code, ErrorCode::NotFound);
        let err = collect(&mut client, "../etc/passwd", None, None).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest);
        // Still usable after errors.
        assert_eq!(collect(&mut client, "web", None, Some(1)).unwrap(), ["f"]);
    }

    #[test]
    fn logs_of_rotated_files_only_and_long_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("old.log.1"), entry(10, "only")).unwrap();
        let mut big = String::new();
        for i in 0..20_000u64 {
            big.push_str(&entry(100 + i, &format!("line {i}")));
        }
        std::fs::write(dir.path().join("big.log"), &big).unwrap();
        let mut client = server(dir.path(), no_main_loop);
        assert_eq!(collect(&mut client, "old", None, None).unwrap(), ["only"]);
        assert_eq!(
            collect(&mut client, "old", None, Some(0)).unwrap(),
            Vec::<String>::new()
        );
        let all = collect(&mut client, "big", None, None).unwrap();
        assert_eq!(all.len(), 20_000);
        assert_eq!(all[19_999], "line 19999");
        let tail = collect(&mut client, "big", None, Some(5000)).unwrap();
        assert_eq!(tail.first().map(String::as_str), Some("line 15000"));
        let since = collect(&mut client, "big", Some(100 + 19_990), Some(100)).unwrap();
        assert_eq!(since.len(), 10);
    }

    #[test]
    fn logs_follow_the_file_through_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web.log");
        std::fs::write(
            &path,
            entry(1, "one") + "2026-11-27T16:30:00.000Z stdout tw",
        )
        .unwrap();
        let mut client = server(dir.path(), no_main_loop);
        let writer = {
            let path = path.clone();
            let dir = dir.path().to_owned();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .unwrap();
                f.write_all(b"o\n").unwrap();
                f.write_all(entry(3, "three").as_bytes()).unwrap();
                std::thread::sleep(Duration::from_millis(300));
                // Rotation: the last line written to the old file after the rename still
                // arrives, then the new file's.
                std::fs::rename(&path, dir.join("web.log.1")).unwrap();
                f.write_all(entry(5, "five").as_bytes()).unwrap();
                std::thread::sleep(Duration::from_millis(300));
                std::fs::write(&path, entry(6, "six")).unwrap();
            })
        };
        let mut lines = Vec::new();
        client
            .logs("web", true, None, Some(1), |e| {
                lines.push(e.line);
                if lines.len() == 5 {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
            .unwrap();
        writer.join().unwrap();
        assert_eq!(lines, ["one", "two", "three", "five", "six"]);
    }

    #[test]
    fn commands_go_to_the_main_loop() {
        let dir = tempfile::tempdir().unwrap();
        let mut client = server(dir.path(), |command| match command {
            Command::Ps => Ok(Reply::Statuses(vec![ContainerStatus {
                name: "web".into(),
                kind: "service".into(),
                state: "running".into(),
                pid: Some(12),
                uptime_ms: Some(3),
                restarts: 0,
                health: None,
                last_exit: None,
            }])),
            Command::Inspect(name) => Ok(Reply::Value(serde_json::json!({ "name": name }))),
            Command::Stats(None) => Ok(Reply::Stats(vec![])),
            Command::Start(name) => Err(ApiError::conflict(format!("{name} is running"))),
            Command::Stop {
                name,
                timeout_ms: Some(1000),
            } if name == "web" => Ok(Reply::Done),
            Command::Kill { signal: 9, .. } => Ok(Reply::Done),
            Command::Exec { argv, .. } if argv == ["echo", "hi"] => {
                let (out_r, out_w) = rustix::pipe::pipe().unwrap();
                let (err_r, err_w) = rustix::pipe::pipe().unwrap();
                let (tx, exit) = oneshot::channel();
                rustix::io::write(&out_w, b"hi\n").unwrap();
                rustix::io::write(&err_w, b"warn\n").unwrap();
                drop((out_w, err_w));
                let _ = tx.send(3);
                Ok(Reply::Exec(ExecHandle {
                    stdout: out_r,
                    stderr: err_r,
                    exit,
                }))
            }
            Command::Exec { .. } => Ok(Reply::Done),
            Command::Apply { host_file, dry_run } if host_file.contains("[host]") => {
                let report = keel_api::ApplyReport {
                    dry_run,
                    restarted: vec!["b".into()],
                    unchanged: vec!["a".into()],
                    ..Default::default()
                };
                Ok(Reply::Value(serde_json::to_value(report).unwrap()))
            }
            Command::Apply { .. } => Err(ApiError::bad_request("apply:HOST.toml: invalid")),
            other => Err(ApiError::not_found(format!("{other:?}"))),
        });
        let ps = client.ps().unwrap();
        assert_eq!((ps.len(), ps[0].pid), (1, Some(12)));
        assert_eq!(client.inspect("web").unwrap()["name"], "web");
        assert!(client.stats(None).unwrap().is_empty());
        let err = client
            .call(Request::Start { name: "web".into() })
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::Conflict);
        let stop = Request::Stop {
            name: "web".into(),
            timeout_ms: Some(1000),
        };
        assert_eq!(client.call(stop).unwrap(), Value::Null);
        let kill = |signal| Request::Kill {
            name: "web".into(),
            signal,
        };
        assert_eq!(client.call(kill(9)).unwrap(), Value::Null);
        assert_eq!(
            client.call(kill(0)).unwrap_err().code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            client
                .call(Request::Restart { name: "x".into() })
                .unwrap_err()
                .code,
            ErrorCode::NotFound
        );
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = client
            .exec(
                "web",
                vec!["echo".into(), "hi".into()],
                vec![],
                |s, d| match s {
                    Stream::Stdout => out.extend_from_slice(d),
                    Stream::Stderr | Stream::Keel => err.extend_from_slice(d),
                },
            )
            .unwrap();
        assert_eq!(
            (code, &out[..], &err[..]),
            (3, &b"hi\n"[..], &b"warn\n"[..])
        );
        // A main loop that answers exec without a process is an internal error.
        let e = client
            .exec("web", vec!["x".into()], vec![], |_, _| {})
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Internal);
        let e = client.exec("web", vec![], vec![], |_, _| {}).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        // apply carries the file's text and dry_run there, and the report back.
        let report = client.apply("[host]\nhostname = \"h\"\n", true).unwrap();
        assert!(report.dry_run);
        assert_eq!(
            (report.restarted, report.unchanged),
            (vec!["b".to_string()], vec!["a".to_string()])
        );
        let e = client.apply("nonsense", false).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(e.message.contains("apply:HOST.toml"), "{e}");
        let e = client
            .exec("web", vec!["x".into()], vec!["NOEQUALS".into()], |_, _| {})
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
    }

    /// Raw lines on a socketpair, for what the client does not send.
    fn raw_session(input: &[u8]) -> Vec<Response> {
        let dir = tempfile::tempdir().unwrap();
        let (mut ours, theirs) = StdStream::pair().unwrap();
        let logs_dir = dir.path().to_owned();
        let server = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                theirs.set_nonblocking(true).unwrap();
                let conn = Conn::Unix(UnixStream::from_std(theirs).unwrap());
                // No main loop: commands must fail cleanly.
                let (calls, requests) = mpsc::unbounded_channel();
                drop(requests);
                Session::new(&conn, Vec::new(), &calls, &logs_dir)
                    .run()
                    .await;
            });
        });
        ours.write_all(input).unwrap();
        ours.shutdown(std::net::Shutdown::Write).unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut ours, &mut text).unwrap();
        server.join().unwrap();
        text.lines()
            .map(|l| Response::from_line(l.as_bytes()).unwrap().0)
            .collect()
    }

    fn code(response: &Response) -> ErrorCode {
        match response {
            Response::Error(e) => e.code,
            other => panic!("not an error: {other:?}"),
        }
    }

    #[test]
    fn bad_requests_are_answered_and_the_connection_goes_on() {
        let mut input = b"{\"version\":2,\"request\":{\"op\":\"ps\"}}\n\n   \nnot json\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', MAX_REQUEST_LINE + 10));
        input.extend_from_slice(
            b"\n{\"version\":1,\"request\":{\"op\":\"logs\",\"name\":\"none\"}}\n",
        );
        let responses = raw_session(&input);
        let codes: Vec<ErrorCode> = responses.iter().map(code).collect();
        assert_eq!(
            codes,
            [
                ErrorCode::UnsupportedVersion,
                ErrorCode::BadRequest,
                ErrorCode::BadRequest,
                ErrorCode::NotFound
            ]
        );
        // With the main loop gone, commands fail cleanly.
        let responses = raw_session(b"{\"version\":1,\"request\":{\"op\":\"ps\"}}\n");
        assert_eq!(code(&responses[0]), ErrorCode::Internal);
    }

    #[test]
    fn only_the_allowed_uid_is_served() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run/api.sock");
        let logs = dir.path().to_owned();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let uid = rustix::process::getuid().as_raw();
        runtime.block_on(async {
            // A stale socket is replaced.
            drop(listen_unix(&socket).unwrap());
            let listener = listen_unix(&socket).unwrap();
            let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            let (calls, _requests) = mpsc::unbounded_channel();
            tokio::spawn(serve_uid(listener, calls, logs, uid.wrapping_add(1)));
            let stream = UnixStream::connect(&socket).await.unwrap();
            let mut text = Vec::new();
            let mut buf = [0u8; 1024];
            loop {
                stream.readable().await.unwrap();
                match stream.try_read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => text.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            }
            let (response, _) = Response::from_line(text.trim_ascii_end()).unwrap();
            assert_eq!(code(&response), ErrorCode::Forbidden);
        });
        std::fs::write(dir.path().join("file"), "").unwrap();
        assert!(listen_unix(&dir.path().join("file")).is_err());
    }

    #[test]
    fn finds_no_port_that_is_not_there() {
        assert_eq!(resolve_port(Path::new("/nonexistent/keel.api")), None);
        assert_eq!(find_virtio_port("keel.no-such-port"), None);
    }
}
