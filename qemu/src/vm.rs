//! A running QEMU: its console, its QMP socket, its published ports and its lifetime.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use crate::accel::{Accel, KVM_LIFE_SIGN_TIMEOUT, announce_tcg, choose_accel, record_kvm_boot};
use crate::api_mux::ApiMux;
use crate::binary::{private_dir, qemu_binary};
use crate::child::ChildWatch;
use crate::config::{API_PORT_COUNT, PortForward, VmConfig, qemu_args};
use crate::console::{Console, FirstOutput, TAIL_LINES, WaitError};
use crate::error::QemuError;
use crate::qmp::QmpClient;

/// How long QEMU may take to open its QMP socket. It does so before running any guest code,
/// normally within a few hundred milliseconds; the margin is for loaded CI machines.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Bound on each QMP read or write.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause between HTTP attempts while the guest is not listening yet.
const HTTP_RETRY_BACKOFF: Duration = Duration::from_millis(100);

/// A response to [`Vm::http_get`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    /// In the order received, names as sent.
    pub headers: Vec<(String, String)>,
    /// Decoded lossily as UTF-8.
    pub body: String,
}

impl HttpResponse {
    /// The first header named `name` (case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A running QEMU.
///
/// Dropping it kills QEMU. If the drop happens during a panic (a failing test), the whole
/// guest console and QEMU's stderr are printed to stderr first.
pub struct Vm {
    watch: Arc<ChildWatch>,
    console: Arc<Console>,
    qmp: Mutex<Option<QmpClient>>,
    qmp_path: PathBuf,
    forwards: Vec<PortForward>,
    api_socket: PathBuf,
    accel: Accel,
    kvm_refused: Option<String>,
    echo: Option<JoinHandle<()>>,
    /// Serves `api_socket`; stopped after Drop::drop has killed QEMU.
    _api: ApiMux,
    // Last: removed only after Drop::drop has killed QEMU.
    _dir: TempDir,
}

impl Vm {
    /// Starts QEMU and returns once its QMP socket answers and, under KVM, the guest has shown
    /// a sign of life.
    ///
    /// The accelerator is [`choose_accel`]'s. A KVM boot is watched: a guest that writes
    /// nothing to its console within [`KVM_LIFE_SIGN_TIMEOUT`] (or whose QEMU dies first) is
    /// killed, the machine remembers that KVM does not run guests here, one line says so on
    /// stderr, and the same configuration boots again under TCG. When `KEEL_ACCEL=kvm` forced
    /// KVM, that is [`QemuError::KvmNoLifeSign`] instead.
    ///
    /// QEMU runs in its own process group, so a Ctrl-C at the terminal reaches only us, with
    /// the console on its stdout (stdin is `/dev/null`). Host ports given as 0 are picked here:
    /// we bind `127.0.0.1:0`, note the port and close it before QEMU binds it, so another
    /// process could take it in between; QEMU then fails to start with a hostfwd error.
    pub fn boot(mut cfg: VmConfig) -> Result<Vm, QemuError> {
        match &cfg.firmware {
            None => {
                check_file("kernel", &cfg.kernel)?;
                if let Some(initrd) = &cfg.initrd {
                    check_file("initrd", initrd)?;
                }
            }
            Some(firmware) => {
                check_file("firmware", &firmware.code)?;
                check_file("firmware variables", &firmware.vars)?;
            }
        }
        for disk in &cfg.disks {
            check_file("disk image", &disk.path)?;
            if let Some(problem) = disk.serial_problem() {
                return Err(QemuError::BadDisk {
                    path: disk.path.clone(),
                    problem,
                });
            }
        }
        let qemu = qemu_binary(cfg.qemu.as_deref());
        let choice = choose_accel(&qemu)?;
        cfg.publish = resolve_ports(&cfg.publish)?;
        if let Some(why) = &choice.kvm_refused {
            announce_tcg(why);
        }
        let mut vm = Vm::launch(&cfg, &qemu, choice.accel)?;
        vm.kvm_refused = choice.kvm_refused;
        if vm.accel != Accel::Kvm {
            return Ok(vm);
        }
        let why = match vm.console.wait_first_output(KVM_LIFE_SIGN_TIMEOUT) {
            FirstOutput::Seen => {
                record_kvm_boot(&qemu, Ok(()));
                return Ok(vm);
            }
            FirstOutput::Silent => format!(
                "a Linux guest under KVM printed nothing within {} s although the KVM probe passed",
                KVM_LIFE_SIGN_TIMEOUT.as_secs()
            ),
            FirstOutput::Closed => {
                let status = vm.watch.wait_timeout(Duration::from_secs(2));
                let stderr = vm.console.lock().err.tail(1);
                let status = status.map_or_else(|| "still running".to_owned(), |s| s.to_string());
                format!(
                    "QEMU under KVM exited ({status}) before the guest printed anything: {stderr}"
                )
            }
        };
        drop(vm);
        record_kvm_boot(&qemu, Err(why.clone()));
        if choice.forced {
            return Err(QemuError::KvmNoLifeSign {
                waited: KVM_LIFE_SIGN_TIMEOUT,
                detail: why,
            });
        }
        announce_tcg(&why);
        let mut vm = Vm::launch(&cfg, &qemu, Accel::Tcg)?;
        vm.kvm_refused = Some(why);
        Ok(vm)
    }

    /// Starts `qemu` for `cfg` under `accel` and waits for its QMP socket.
    fn launch(cfg: &VmConfig, qemu: &Path, accel: Accel) -> Result<Vm, QemuError> {
        let dir = private_dir().map_err(QemuError::io("creating a private temporary directory"))?;
        let qmp_path = dir.path().join("qmp.sock");
        let mut cfg = cfg.clone();
        let api_socket = cfg
            .api_socket
            .get_or_insert_with(|| dir.path().join("api.sock"))
            .clone();
        check_socket_path(&api_socket)?;
        let api_ports: Vec<PathBuf> = (0..API_PORT_COUNT)
            .map(|i| dir.path().join(format!("api-port{i}.sock")))
            .collect();
        let args = qemu_args(&cfg, accel, &qmp_path, &api_ports);
        let log = match &cfg.console_log {
            Some(path) => Some(File::create(path).map_err(QemuError::io(format!(
                "creating console log {}",
                path.display()
            )))?),
            None => None,
        };

        let mut child = Command::new(qemu)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => QemuError::NotInstalled(qemu.to_owned()),
                _ => QemuError::Spawn {
                    binary: qemu.to_owned(),
                    source: e,
                },
            })?;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let watch = ChildWatch::spawn(child).map_err(QemuError::io("starting a thread"))?;
        let api = match ApiMux::start(&api_socket, api_ports) {
            Ok(api) => api,
            Err(e) => {
                watch.kill();
                return Err(QemuError::Io {
                    context: format!("serving the API socket {}", api_socket.display()),
                    source: e,
                });
            }
        };

        // From here on, an early return drops `vm`, which kills QEMU.
        let mut vm = Vm {
            watch,
            console: Arc::new(Console::default()),
            qmp: Mutex::new(None),
            qmp_path,
            forwards: cfg.publish.clone(),
            api_socket,
            accel,
            kvm_refused: None,
            echo: None,
            _api: api,
            _dir: dir,
        };
        let echo = if cfg.echo_console {
            let (tx, rx) = mpsc::channel();
            vm.echo = Some(spawn_named("qemu-echo", move || echo_stdout(rx))?);
            Some(tx)
        } else {
            None
        };
        let console = Arc::clone(&vm.console);
        match stdout {
            Some(out) => drop(spawn_named("qemu-console", move || {
                read_console(out, &console, log, echo)
            })?),
            None => console.update(|s| s.out.close()),
        }
        let console = Arc::clone(&vm.console);
        let echo_stderr = cfg.echo_console;
        match stderr {
            Some(err) => drop(spawn_named("qemu-stderr", move || {
                read_stderr(err, &console, echo_stderr)
            })?),
            None => console.update(|s| s.err.close()),
        }

        match vm.connect_qmp(START_TIMEOUT) {
            Ok(client) => {
                *vm.qmp.lock().unwrap_or_else(PoisonError::into_inner) = Some(client);
                Ok(vm)
            }
            // A QEMU that exits during startup explains itself on stderr; that beats any
            // socket error.
            Err(e) => match vm.watch.wait_timeout(Duration::from_millis(500)) {
                Some(status) => Err(vm.early_exit(status)),
                None => Err(e),
            },
        }
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.watch.pid()
    }

    /// The accelerator QEMU runs with; under TCG everything in the guest is several times
    /// slower, which timeouts may want to allow for.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// Why this boot runs under TCG although KVM was not ruled out by `KEEL_ACCEL`: the probe
    /// failed, an earlier boot on this machine showed KVM cannot run guests, or this very boot
    /// did and was restarted under TCG.
    pub fn kvm_refused(&self) -> Option<&str> {
        self.kvm_refused.as_deref()
    }

    /// When the guest last wrote to its console (`None`: not yet).
    pub fn last_output(&self) -> Option<Instant> {
        self.console.lock().last_output
    }

    /// The console's complete lines from index `from` on, and the index to continue from.
    pub fn lines_from(&self, from: usize) -> (Vec<String>, usize) {
        let state = self.console.lock();
        let lines = state.out.lines();
        let from = from.min(lines.len());
        (lines[from..].to_vec(), lines.len())
    }

    /// The ports published, with automatic host ports resolved.
    pub fn published(&self) -> &[PortForward] {
        &self.forwards
    }

    /// The host port forwarded to guest TCP port `guest`, if it is published.
    pub fn host_port(&self, guest: u16) -> Option<u16> {
        self.forwards
            .iter()
            .find(|f| f.guest == guest)
            .map(|f| f.host)
    }

    /// The unix socket QEMU listens on for the guest's control API (the host end of its
    /// virtio-serial ports, one free port per client): [`VmConfig::api_socket`], or a socket in this VM's
    /// private directory. Connect with `keel_api::Client::connect_unix` or `keel
    /// --api-socket PATH`.
    pub fn api_socket(&self) -> &Path {
        &self.api_socket
    }

    /// The whole console so far, lines separated by `\n`.
    pub fn console(&self) -> String {
        self.console.lock().out.text()
    }

    /// Everything QEMU itself wrote to its stderr so far.
    pub fn qemu_stderr(&self) -> String {
        self.console.lock().err.text()
    }

    /// Waits for a complete console line containing `needle` that comes after the line the
    /// previous `wait_for_line` matched (from the start, the first time), and returns it.
    /// Successive calls thus follow the boot in order.
    ///
    /// Only complete lines match: a prompt not followed by a newline is not seen until the line
    /// is finished (or QEMU exits). On timeout, or if QEMU exits first, the error carries the
    /// last console lines.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> Result<String, QemuError> {
        self.wait_line(needle, true, timeout)
    }

    /// Like [`Vm::wait_for_line`], but searches the whole console and does not move the
    /// cursor.
    pub fn wait_for_line_anywhere(
        &self,
        needle: &str,
        timeout: Duration,
    ) -> Result<String, QemuError> {
        self.wait_line(needle, false, timeout)
    }

    fn wait_line(
        &self,
        needle: &str,
        from_cursor: bool,
        timeout: Duration,
    ) -> Result<String, QemuError> {
        match self.console.wait_for(needle, from_cursor, timeout) {
            Ok(line) => Ok(line),
            Err(WaitError::Timeout(tail)) => Err(QemuError::LineTimeout {
                needle: needle.to_owned(),
                timeout,
                tail,
            }),
            Err(WaitError::Closed(mut tail)) => {
                // The console closes as QEMU exits; the reap follows within moments.
                let status = self
                    .watch
                    .wait_timeout(Duration::from_secs(1))
                    .map_or_else(|| "still running".to_owned(), |s| s.to_string());
                let stderr = self.console.lock().err.tail(TAIL_LINES);
                if stderr != "(no output)" {
                    tail.push_str("\nQEMU stderr:\n");
                    tail.push_str(&stderr);
                }
                Err(QemuError::ExitedBeforeLine {
                    needle: needle.to_owned(),
                    status,
                    tail,
                })
            }
        }
    }

    /// Runs a QMP command and returns its `return` value. Asynchronous events are skipped.
    /// One connection is kept open and reused; after a connection-level failure the next call
    /// reconnects.
    pub fn qmp(&self, command: &str, arguments: Option<Value>) -> Result<Value, QemuError> {
        let mut guard = self.qmp.lock().unwrap_or_else(PoisonError::into_inner);
        let client = match guard.as_mut() {
            Some(client) => client,
            None => guard.insert(self.connect_qmp(Duration::from_secs(2))?),
        };
        let result = client.execute(command, arguments);
        if matches!(result, Err(QemuError::QmpIo(_) | QemuError::QmpProtocol(_))) {
            *guard = None;
        }
        result
    }

    /// Presses the ACPI power button (`system_powerdown`). Returns once QEMU has accepted the
    /// request; use [`Vm::wait_exit`] to wait for the guest to act on it.
    pub fn powerdown(&self) -> Result<(), QemuError> {
        self.qmp("system_powerdown", None).map(drop)
    }

    /// Waits for QEMU to exit. When it returns `Ok`, the console is complete (its last bytes
    /// have been read), unless something else still holds QEMU's stdout open.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, QemuError> {
        let start = Instant::now();
        let status = self
            .watch
            .wait_timeout(timeout)
            .ok_or(QemuError::ExitTimeout(timeout))?;
        let grace = timeout
            .saturating_sub(start.elapsed())
            .max(Duration::from_secs(1));
        self.console.wait_closed(grace);
        Ok(status)
    }

    /// Kills QEMU (SIGKILL) and reaps it. Does nothing if it already exited.
    pub fn kill(&mut self) {
        self.watch.kill();
    }

    /// `GET path` over HTTP/1.0 to the host port forwarded to `guest_port`, retried every
    /// 100 ms until `timeout` while the connection is refused, reset or closed without an
    /// answer: the guest may not be listening yet, and QEMU's user-mode network accepts on
    /// the host side before it knows whether the guest will.
    pub fn http_get(
        &self,
        guest_port: u16,
        path: &str,
        timeout: Duration,
    ) -> Result<HttpResponse, QemuError> {
        let host_port = self
            .host_port(guest_port)
            .ok_or(QemuError::PortNotPublished(guest_port))?;
        http_get_retrying(host_port, path, timeout, || self.watch.status().is_none())
    }

    /// The watcher of the QEMU process, for waiting on it from another thread.
    pub(crate) fn watch(&self) -> Arc<ChildWatch> {
        Arc::clone(&self.watch)
    }

    /// Waits until everything echoed has been written to stdout (after QEMU exited).
    pub(crate) fn finish_echo(&mut self) {
        if self.console.wait_closed(Duration::from_secs(5))
            && let Some(echo) = self.echo.take()
        {
            let _ = echo.join();
        }
    }

    /// Connects to the QMP socket, retrying while QEMU has not created it yet.
    fn connect_qmp(&self, wait: Duration) -> Result<QmpClient, QemuError> {
        let deadline = Instant::now() + wait;
        loop {
            match UnixStream::connect(&self.qmp_path) {
                Ok(stream) => return QmpClient::handshake(stream, QMP_TIMEOUT),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    if Instant::now() >= deadline {
                        return Err(QemuError::StartTimeout(wait));
                    }
                    // Waiting on the exit condition doubles as the retry backoff and notices
                    // a QEMU that died meanwhile at once.
                    if let Some(status) = self.watch.wait_timeout(Duration::from_millis(20)) {
                        return Err(QemuError::QmpProtocol(format!(
                            "QEMU has exited ({status})"
                        )));
                    }
                }
                Err(e) => return Err(QemuError::QmpIo(e)),
            }
        }
    }

    fn early_exit(&self, status: ExitStatus) -> QemuError {
        self.console.wait_closed(Duration::from_secs(2));
        let state = self.console.lock();
        let mut stderr = state.err.tail(TAIL_LINES);
        let console = state.out.tail(10);
        if console != "(no output)" {
            stderr.push_str("\nconsole:\n");
            stderr.push_str(&console);
        }
        QemuError::EarlyExit {
            status: status.to_string(),
            stderr,
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.watch.kill();
        if thread::panicking() {
            // Let the readers catch the last bytes, so the dump ends where the guest did.
            self.console.wait_closed(Duration::from_secs(2));
            let state = self.console.lock();
            let pid = self.watch.pid();
            let mut dump = format!("===== keel-qemu: guest console (QEMU pid {pid}) =====\n");
            dump.push_str(&state.out.text());
            if !dump.ends_with('\n') {
                dump.push('\n');
            }
            let stderr = state.err.text();
            if !stderr.is_empty() {
                dump.push_str("===== keel-qemu: QEMU stderr =====\n");
                dump.push_str(&stderr);
                if !dump.ends_with('\n') {
                    dump.push('\n');
                }
            }
            dump.push_str("===== keel-qemu: end of guest console =====");
            eprintln!("{dump}");
        }
    }
}

fn check_file(what: &'static str, path: &Path) -> Result<(), QemuError> {
    if !path.is_file() {
        return Err(QemuError::MissingFile {
            what,
            path: path.to_owned(),
        });
    }
    if path.to_str().is_none() {
        return Err(QemuError::NonUtf8Path(path.to_owned()));
    }
    Ok(())
}

/// A unix socket path must be UTF-8 (QEMU arguments are strings) and fit in sun_path.
fn check_socket_path(path: &Path) -> Result<(), QemuError> {
    let Some(text) = path.to_str() else {
        return Err(QemuError::NonUtf8Path(path.to_owned()));
    };
    if text.len() >= 108 {
        return Err(QemuError::Io {
            context: format!("API socket {text}"),
            source: io::Error::new(
                io::ErrorKind::InvalidInput,
                "a unix socket path must be shorter than 108 bytes",
            ),
        });
    }
    Ok(())
}

/// Replaces host port 0 by a free port. All listeners are held until every port is picked so
/// that two automatic forwards never get the same one.
fn resolve_ports(publish: &[PortForward]) -> Result<Vec<PortForward>, QemuError> {
    let mut held = Vec::new();
    let mut resolved = Vec::with_capacity(publish.len());
    for fwd in publish {
        if fwd.host != 0 {
            resolved.push(*fwd);
            continue;
        }
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(QemuError::io("picking a free host port"))?;
        let port = listener
            .local_addr()
            .map_err(QemuError::io("picking a free host port"))?
            .port();
        held.push(listener);
        resolved.push(PortForward {
            host: port,
            guest: fwd.guest,
        });
    }
    Ok(resolved)
}

fn spawn_named(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, QemuError> {
    thread::Builder::new()
        .name(name.to_owned())
        .spawn(f)
        .map_err(QemuError::io(format!("starting thread {name}")))
}

/// Reads QEMU's stdout (the guest console) until EOF. The log file is written before the
/// line becomes visible to waiters, so a test that saw a line finds it in the log too; echo
/// goes through a channel so that a slow terminal never stalls this thread (and so QEMU).
fn read_console(
    mut stdout: ChildStdout,
    console: &Console,
    mut log: Option<File>,
    echo: Option<Sender<Vec<u8>>>,
) {
    let mut buf = [0u8; 8192];
    loop {
        let n = match stdout.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let chunk = &buf[..n];
        if let Some(file) = &mut log
            && let Err(e) = file.write_all(chunk)
        {
            eprintln!("keel-qemu: writing the console log failed ({e}); logging stopped");
            log = None;
        }
        if let Some(tx) = &echo {
            // The echo thread only goes away if stdout broke; nothing to do about that.
            let _ = tx.send(chunk.to_vec());
        }
        console.update(|s| s.push_out(chunk));
    }
    console.update(|s| s.out.close());
}

fn echo_stdout(rx: Receiver<Vec<u8>>) {
    let stdout = io::stdout();
    for chunk in rx {
        let mut out = stdout.lock();
        if out.write_all(&chunk).and_then(|()| out.flush()).is_err() {
            break;
        }
    }
}

fn read_stderr(mut stderr: ChildStderr, console: &Console, echo: bool) {
    let mut buf = [0u8; 4096];
    loop {
        let n = match stderr.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if echo {
            // Our stderr going away is no reason to stop capturing.
            let _ = io::stderr().write_all(&buf[..n]);
        }
        console.update(|s| s.err.push(&buf[..n]));
    }
    console.update(|s| s.err.close());
}

/// The retry loop of [`Vm::http_get`]; `alive` says whether retrying still makes sense.
fn http_get_retrying(
    host_port: u16,
    path: &str,
    timeout: Duration,
    alive: impl Fn() -> bool,
) -> Result<HttpResponse, QemuError> {
    let deadline = Instant::now() + timeout;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let error = match http_get_once(host_port, path, remaining) {
            Ok(response) => return Ok(response),
            Err(error) => error,
        };
        let transient = matches!(
            error.kind(),
            io::ErrorKind::ConnectionRefused
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::UnexpectedEof
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::NotConnected
        );
        let alive = alive();
        if !transient || !alive || remaining <= HTTP_RETRY_BACKOFF {
            let mut last = error.to_string();
            if !alive {
                last.push_str(" (QEMU has exited)");
            } else if transient {
                last.push_str(&format!(" (still failing after {timeout:?})"));
            }
            return Err(QemuError::Http {
                host_port,
                path: path.to_owned(),
                last,
            });
        }
        // An external socket offers nothing to wait on; a short sleep is the backoff.
        thread::sleep(HTTP_RETRY_BACKOFF);
    }
}

fn http_get_once(port: u16, path: &str, timeout: Duration) -> io::Result<HttpResponse> {
    // Zero would mean "no timeout" to the socket calls (or be rejected by them).
    let timeout = timeout.max(Duration::from_millis(1));
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: keel-qemu\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    if raw.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed without a response",
        ));
    }
    parse_http_response(&raw).map_err(|m| io::Error::new(io::ErrorKind::InvalidData, m))
}

fn parse_http_response(raw: &[u8]) -> Result<HttpResponse, String> {
    let (head, body) = [&b"\r\n\r\n"[..], b"\n\n"]
        .iter()
        .filter_map(|sep| {
            raw.windows(sep.len())
                .position(|w| w == *sep)
                .map(|i| (i, sep.len()))
        })
        .min()
        .map(|(i, len)| (&raw[..i], &raw[i + len..]))
        .ok_or("response ended inside its headers")?;
    let head = String::from_utf8_lossy(head);
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let status = match (parts.next(), parts.next()) {
        (Some(version), Some(code)) if version.starts_with("HTTP/") => code.parse().ok(),
        _ => None,
    }
    .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_owned(), value.trim().to_owned()))
        .collect();
    Ok(HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(body).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_http_responses() {
        let r = parse_http_response(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-A:  b c \r\n\r\nhello\r\n\r\nworld",
        )
        .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("text/plain"));
        assert_eq!(r.header("x-a"), Some("b c"));
        assert_eq!(r.header("missing"), None);
        assert_eq!(r.body, "hello\r\n\r\nworld");

        let r = parse_http_response(b"HTTP/1.0 404 Not Found\n\n").unwrap();
        assert_eq!((r.status, r.headers.len(), r.body.as_str()), (404, 0, ""));

        assert!(parse_http_response(b"HTTP/1.0 200 OK\r\nX: y\r\n").is_err());
        assert!(parse_http_response(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse_http_response(b"HTTP/1.0 abc\r\n\r\n").is_err());
    }

    #[test]
    fn http_get_retries_until_the_server_listens() {
        // Find a port, free it, and start listening on it only after a while.
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = thread::spawn(move || {
            thread::sleep(Duration::from_millis(300));
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).unwrap();
            // First connection: hang up without answering, like slirp when the guest is not
            // listening yet.
            drop(listener.accept().unwrap());
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.ends_with(b"\r\n\r\n") {
                let n = stream.read(&mut buf).unwrap();
                assert!(n > 0);
                request.extend_from_slice(&buf[..n]);
            }
            stream
                .write_all(b"HTTP/1.0 200 OK\r\nServer: fake\r\n\r\nbody")
                .unwrap();
            String::from_utf8(request).unwrap()
        });
        let response =
            http_get_retrying(port, "/index.html", Duration::from_secs(20), || true).unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.header("server"), Some("fake"));
        assert_eq!(response.body, "body");
        let request = server.join().unwrap();
        assert!(
            request.starts_with("GET /index.html HTTP/1.0\r\n"),
            "{request}"
        );
    }

    #[test]
    fn http_get_gives_up() {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let start = Instant::now();
        let err = http_get_retrying(port, "/", Duration::from_millis(300), || true).unwrap_err();
        assert!(start.elapsed() >= Duration::from_millis(200));
        assert!(err.to_string().contains("still failing"), "{err}");
        // A dead QEMU stops the retries at once.
        let err = http_get_retrying(port, "/", Duration::from_secs(30), || false).unwrap_err();
        assert!(err.to_string().contains("QEMU has exited"), "{err}");
    }

    #[test]
    fn resolves_automatic_ports() {
        let fixed = PortForward {
            host: 8080,
            guest: 80,
        };
        let auto = |guest| PortForward { host: 0, guest };
        let ports = resolve_ports(&[fixed, auto(22), auto(443)]).unwrap();
        assert_eq!(ports[0], fixed);
        assert_eq!((ports[1].guest, ports[2].guest), (22, 443));
        assert!(ports[1].host != 0 && ports[2].host != 0);
        assert_ne!(ports[1].host, ports[2].host);
    }

    #[test]
    fn vm_can_be_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Vm>();
    }

    #[test]
    fn boot_checks_files_first() {
        let err = Vm::boot(VmConfig::new("/nonexistent/vmlinuz"))
            .err()
            .unwrap();
        assert!(
            matches!(&err, QemuError::MissingFile { what: "kernel", .. }),
            "{err}"
        );
    }
}
