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
//!
//! [`transport`] accepts connections (the unix socket) and serves the virtio-serial ports
//! ([`port`]); [`session`] reads a client's requests and answers them; [`exec`] and [`logs`]
//! stream their responses. This file holds what the main loop and the API exchange.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keel_api::{Envelope, MAX_REQUEST_LINE, Output, Rejection, Request, Response, Stream};
use serde_json::Value;
use tokio::io::unix::AsyncFd;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

mod exec;
mod logs;
mod port;
mod session;
mod transport;
mod upgrade;

use port::PortConn;
use session::*;
use transport::*;

pub use transport::{find_virtio_port, listen_unix, serve, serve_virtio};

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
/// `logs` responses are written in pieces of this size.
const CHUNK: usize = 64 * 1024;
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
    /// `argv` is not empty; no string holds a NUL; `env` entries are `NAME=value`; a
    /// terminal has at least one row and column.
    Exec {
        name: String,
        argv: Vec<String>,
        env: Vec<String>,
        stdio: keel_supervisor::ExecStdio,
    },
    Reboot,
    Poweroff,
    /// The text of a new host file, unparsed: the main loop parses and judges it.
    Apply {
        host_file: String,
        dry_run: bool,
    },
    /// The slots and versions (`keel_api::HostStatus`).
    Status,
    /// An update's signed manifest: accept it (→ `Value`, a `crate::update::Accepted`) or
    /// refuse it.
    UpgradeBegin {
        manifest: String,
        signature: String,
    },
    /// The accepted update's files are staged and match: install them (→ `Value`, a
    /// `keel_api::UpgradeReport`, once written), then reboot if `reboot`.
    UpgradeInstall {
        reboot: bool,
    },
    /// The accepted update will not arrive whole.
    UpgradeAbort {
        why: String,
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

/// A process started by `exec`: where its output comes from (the API makes the descriptors
/// non-blocking), the write end of its stdin pipe if it has one, whether the client sends
/// input lines, and its exit code, sent once it has been reaped (128 + N for signal N).
pub struct ExecHandle {
    pub output: keel_supervisor::ExecOutput,
    pub stdin: Option<OwnedFd>,
    pub interactive: bool,
    pub exit: oneshot::Receiver<i32>,
}

impl std::fmt::Debug for ExecHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecHandle")
            .field("stdin", &self.stdin)
            .field("interactive", &self.interactive)
            .finish_non_exhaustive()
    }
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
        Client::connect_unix_stream(ours).unwrap()
    }

    #[test]
    fn an_interactive_exec_gets_its_input_and_its_end_over_the_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let mut client = server(dir.path(), |command| match command {
            Command::Exec {
                stdio: keel_supervisor::ExecStdio::Pipes { stdin: true },
                ..
            } => {
                let (in_r, in_w) = rustix::pipe::pipe().unwrap();
                let (out_r, out_w) = rustix::pipe::pipe().unwrap();
                let (err_r, err_w) = rustix::pipe::pipe().unwrap();
                let (tx, exit) = oneshot::channel();
                // The process: upper-cases its input until its end, then exits 0.
                std::thread::spawn(move || {
                    let mut input = std::fs::File::from(in_r);
                    let mut text = String::new();
                    std::io::Read::read_to_string(&mut input, &mut text).unwrap();
                    rustix::io::write(&out_w, text.to_uppercase().as_bytes()).unwrap();
                    drop((out_w, err_w));
                    let _ = tx.send(0);
                });
                Ok(Reply::Exec(ExecHandle {
                    output: keel_supervisor::ExecOutput::Pipes {
                        stdout: out_r,
                        stderr: err_r,
                    },
                    stdin: Some(in_w),
                    interactive: true,
                    exit,
                }))
            }
            _ => Err(ApiError::internal("unexpected")),
        });
        let mut input = client
            .start_exec("web", vec!["cat".into()], vec![], true, None)
            .unwrap()
            .unwrap();
        for chunk in ["hello ", "world"] {
            input
                .send(&keel_api::ExecInput::data(chunk.as_bytes()))
                .unwrap();
        }
        input
            .send(&keel_api::ExecInput {
                eof: true,
                ..Default::default()
            })
            .unwrap();
        let mut out = Vec::new();
        let code = client
            .finish_exec(|_, data| out.extend_from_slice(data))
            .unwrap();
        assert_eq!(
            (code, String::from_utf8(out).unwrap()),
            (0, "HELLO WORLD".into())
        );
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
                    output: keel_supervisor::ExecOutput::Pipes {
                        stdout: out_r,
                        stderr: err_r,
                    },
                    stdin: None,
                    interactive: false,
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
