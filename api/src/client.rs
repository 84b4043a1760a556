//! A blocking client: one request at a time over a unix socket or any byte stream.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::ops::ControlFlow;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{
    ApiError, ApplyReport, ContainerStatus, Envelope, ErrorCode, ExecInput, LogEntry,
    PROTOCOL_VERSION, Request, Response, Stats, Stream, WindowSize,
};

/// A response line longer than this is treated as a broken server rather than buffered.
const MAX_RESPONSE_LINE: usize = 16 << 20;

trait Conn: Read + Write + Send {}
impl<T: Read + Write + Send> Conn for T {}

/// A connection to Keel's control API.
///
/// Every request gets a fresh `id` and lines carrying another one are skipped, so a client
/// that connects to the virtio-serial port right after another one went away mid-response
/// does not mistake the leftovers for its answer. Transport failures are reported as
/// [`ErrorCode::Internal`] errors whose message says what failed; after one, or after a
/// streaming callback stopped early, the client is unusable and every call fails.
pub struct Client {
    conn: BufReader<Box<dyn Conn>>,
    /// A handle on the same socket to set timeouts with, when it is one.
    socket: Option<UnixStream>,
    next_id: u64,
    current_id: u64,
    /// Whether a line of the current response has arrived.
    response_started: bool,
    broken: bool,
}

fn transport(context: &str, e: io::Error) -> ApiError {
    let what = match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "timed out".to_owned(),
        _ => e.to_string(),
    };
    ApiError::internal(format!("{context}: {what}"))
}

impl Client {
    /// Connects to a unix socket: PID 1's `/run/keel/api.sock` inside a guest, or the host
    /// end of a VM's virtio-serial port (`DIR/api.sock` of `keel run DIR`).
    pub fn connect_unix(path: impl AsRef<Path>) -> Result<Client, ApiError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path)
            .map_err(|e| transport(&format!("cannot connect to {}", path.display()), e))?;
        Client::connect_unix_stream(stream)
    }

    /// Uses a connected unix socket (one end of a socketpair, a socket passed in).
    pub fn connect_unix_stream(stream: UnixStream) -> Result<Client, ApiError> {
        let socket = stream
            .try_clone()
            .map_err(|e| transport("cannot duplicate the socket", e))?;
        let mut client = Client::connect_stream(stream);
        client.socket = Some(socket);
        Ok(client)
    }

    /// Uses an already open byte stream (a serial device, a socketpair in tests...).
    pub fn connect_stream(stream: impl Read + Write + Send + 'static) -> Client {
        // Random ids (not counters from 0) so that two successive clients never share one;
        // 53 bits keep them exact for JSON readers that use doubles.
        let seed = RandomState::new().hash_one(std::process::id()) & ((1 << 53) - 1);
        Client {
            conn: BufReader::new(Box::new(stream)),
            socket: None,
            next_id: seed,
            current_id: 0,
            response_started: false,
            broken: false,
        }
    }

    /// Bounds each wait for a response line (only for unix socket connections; `None`, the
    /// default, waits forever).
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), ApiError> {
        if let Some(socket) = &self.socket {
            socket
                .set_read_timeout(timeout)
                .map_err(|e| transport("cannot set the socket timeout", e))?;
        }
        Ok(())
    }

    /// Sends one request; read its response with [`Client::next_response`].
    pub fn send(&mut self, request: Request) -> Result<(), ApiError> {
        if self.broken {
            return Err(ApiError::internal(
                "the connection is unusable after an earlier failure",
            ));
        }
        self.next_id = (self.next_id + 1) & ((1 << 53) - 1);
        self.current_id = self.next_id;
        self.response_started = false;
        let envelope = Envelope {
            version: PROTOCOL_VERSION,
            id: Some(self.current_id),
            request,
        };
        let line = envelope.to_line();
        let sent = self.conn.get_mut().write_all(line.as_bytes());
        let sent = sent.and_then(|()| self.conn.get_mut().flush());
        sent.map_err(|e| {
            self.broken = true;
            transport("cannot send the request", e)
        })
    }

    /// The next line of the current response, skipping lines of other requests.
    pub fn next_response(&mut self) -> Result<Response, ApiError> {
        let result = self.read_response();
        if result.is_err() {
            self.broken = true;
        }
        result
    }

    fn read_response(&mut self) -> Result<Response, ApiError> {
        if self.broken {
            return Err(ApiError::internal(
                "the connection is unusable after an earlier failure",
            ));
        }
        loop {
            let line = self.read_line()?;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match Response::from_line(&line) {
                Ok((_, Some(id))) if id != self.current_id => {}
                Ok((response, _)) => {
                    self.response_started = true;
                    return Ok(response);
                }
                // A torn line left over from a client that went away mid-response can only
                // come before the first line of ours.
                Err(_) if !self.response_started => {}
                Err(e) => {
                    return Err(ApiError::internal(format!(
                        "the API sent an invalid line ({e}): {}",
                        String::from_utf8_lossy(&line)
                    )));
                }
            }
        }
    }

    fn read_line(&mut self) -> Result<Vec<u8>, ApiError> {
        let mut line = Vec::new();
        loop {
            let buf = match self.conn.fill_buf() {
                Ok(buf) => buf,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(transport("reading the response", e)),
            };
            if buf.is_empty() {
                return Err(ApiError::internal(
                    "the API closed the connection before the end of its response",
                ));
            }
            let (used, done) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            line.extend_from_slice(&buf[..used]);
            self.conn.consume(used);
            if done {
                line.pop();
                return Ok(line);
            }
            if line.len() > MAX_RESPONSE_LINE {
                return Err(ApiError::internal(format!(
                    "the API sent a line longer than {MAX_RESPONSE_LINE} bytes"
                )));
            }
        }
    }

    /// Sends `request` and returns the value of its final `ok` line, or its error. Stream
    /// lines (of `logs` and `exec`) are skipped; an `exec`'s exit code is returned as a
    /// number. Use [`Client::logs`] and [`Client::exec`] to see the streams.
    pub fn call(&mut self, request: Request) -> Result<Value, ApiError> {
        self.send(request)?;
        loop {
            match self.next_response()? {
                Response::Ok(value) => return Ok(value),
                Response::Error(e) => return Err(e),
                Response::Exit(code) => return Ok(Value::from(code)),
                Response::Log(_) | Response::Out(_) | Response::Progress(_) => {}
            }
        }
    }

    fn call_typed<T: DeserializeOwned>(&mut self, request: Request) -> Result<T, ApiError> {
        let value = self.call(request)?;
        serde_json::from_value(value)
            .map_err(|e| ApiError::internal(format!("the API's answer is not as expected: {e}")))
    }

    /// `ps`.
    pub fn ps(&mut self) -> Result<Vec<ContainerStatus>, ApiError> {
        self.call_typed(Request::Ps)
    }

    /// `inspect`: the container's status and configuration as a JSON object.
    pub fn inspect(&mut self, name: &str) -> Result<Value, ApiError> {
        self.call(Request::Inspect { name: name.into() })
    }

    /// `stats` of one container or (with `None`) of all.
    pub fn stats(&mut self, name: Option<&str>) -> Result<Vec<Stats>, ApiError> {
        self.call_typed(Request::Stats {
            name: name.map(str::to_owned),
        })
    }

    /// `apply`: the text of a host file; the report comes once the change has been made
    /// (with `dry_run`, at once, and nothing changes).
    pub fn apply(&mut self, host_file: &str, dry_run: bool) -> Result<ApplyReport, ApiError> {
        self.call_typed(Request::Apply {
            host_file: host_file.to_owned(),
            dry_run,
        })
    }

    /// `logs`: calls `on_entry` for each entry until the end of the logs (or, with `follow`,
    /// until `on_entry` breaks, the connection ends or an error occurs). Breaking leaves the
    /// rest of the response unread, so the client is then unusable: drop it.
    pub fn logs(
        &mut self,
        name: &str,
        follow: bool,
        since_ms: Option<u64>,
        tail: Option<u64>,
        mut on_entry: impl FnMut(LogEntry) -> ControlFlow<()>,
    ) -> Result<(), ApiError> {
        self.send(Request::Logs {
            name: name.into(),
            follow,
            since_ms,
            tail,
        })?;
        loop {
            match self.next_response()? {
                Response::Log(entry) => {
                    if on_entry(entry).is_break() {
                        self.broken = true;
                        return Ok(());
                    }
                }
                Response::Ok(_) => return Ok(()),
                Response::Error(e) => return Err(e),
                other => return Err(unexpected(&other)),
            }
        }
    }

    /// `exec`: calls `on_output` with each chunk of output and returns the exit code (128 +
    /// N if signal N killed the process).
    pub fn exec(
        &mut self,
        name: &str,
        argv: Vec<String>,
        env: Vec<String>,
        on_output: impl FnMut(Stream, &[u8]),
    ) -> Result<i32, ApiError> {
        self.start_exec(name, argv, env, false, None)?;
        self.finish_exec(on_output)
    }

    /// Sends an `exec` request with `stdin` and `tty` (see [`Request::Exec`]); with either,
    /// returns the sender its input goes through, to use from another thread while
    /// [`Client::finish_exec`] reads the output. Input needs a unix socket connection.
    /// `upgrade`: sends the request, waits for the host to accept it, streams `uki` then
    /// `root_image` (`sizes` bytes each) as [`UpgradeData`] lines, calling `progress` with
    /// the bytes sent so far, and returns the host's report.
    pub fn upgrade(
        &mut self,
        manifest: String,
        signature: String,
        reboot: bool,
        files: [(&mut dyn Read, u64); 2],
        mut progress: impl FnMut(u64),
    ) -> Result<crate::UpgradeReport, ApiError> {
        self.send(Request::Upgrade {
            manifest,
            signature,
            reboot,
        })?;
        match self.next_response()? {
            Response::Progress(_) => {}
            Response::Error(e) => return Err(e),
            other => return Err(unexpected(&other)),
        }
        let mut buf = vec![0u8; crate::UPGRADE_CHUNK];
        let mut sent = 0u64;
        for (file, size) in files {
            let mut left = size;
            while left > 0 {
                let want = (left as usize).min(buf.len());
                file.read_exact(&mut buf[..want])
                    .map_err(|e| ApiError::internal(format!("reading the update: {e}")))?;
                let line = serde_json::to_string(&crate::UpgradeData {
                    data: crate::base64_encode(&buf[..want]),
                })
                .unwrap_or_default()
                    + "\n";
                if let Err(e) = self.conn.get_mut().write_all(line.as_bytes()) {
                    self.broken = true;
                    return Err(transport("sending the update", e));
                }
                left -= want as u64;
                sent += want as u64;
                progress(sent);
            }
        }
        if let Err(e) = self.conn.get_mut().flush() {
            self.broken = true;
            return Err(transport("sending the update", e));
        }
        loop {
            match self.next_response()? {
                Response::Ok(value) => {
                    return serde_json::from_value(value).map_err(|e| {
                        ApiError::internal(format!("the API sent an invalid upgrade report: {e}"))
                    });
                }
                Response::Error(e) => return Err(e),
                Response::Progress(_) => {}
                other => return Err(unexpected(&other)),
            }
        }
    }

    pub fn start_exec(
        &mut self,
        name: &str,
        argv: Vec<String>,
        env: Vec<String>,
        stdin: bool,
        tty: Option<WindowSize>,
    ) -> Result<Option<ExecInputSender>, ApiError> {
        let sender = if stdin || tty.is_some() {
            let socket = self
                .socket
                .as_ref()
                .ok_or_else(|| ApiError::internal("exec input needs a unix socket connection"))?;
            let stream = socket
                .try_clone()
                .map_err(|e| transport("cannot duplicate the socket", e))?;
            Some(ExecInputSender { stream })
        } else {
            None
        };
        self.send(Request::Exec {
            name: name.into(),
            argv,
            env,
            stdin,
            tty,
        })?;
        Ok(sender)
    }

    /// Reads an `exec`'s output, calling `on_output` with each chunk, and returns the exit
    /// code (128 + N if signal N killed the process).
    pub fn finish_exec(
        &mut self,
        mut on_output: impl FnMut(Stream, &[u8]),
    ) -> Result<i32, ApiError> {
        loop {
            match self.next_response()? {
                Response::Out(out) => {
                    let data = out.data().ok_or_else(|| {
                        ApiError::internal("the API sent output that is not base64")
                    })?;
                    on_output(out.stream, &data);
                }
                Response::Exit(code) => return Ok(code),
                Response::Error(e) => return Err(e),
                other => return Err(unexpected(&other)),
            }
        }
    }
}

/// Sends an interactive exec's input (see [`ExecInput`]) on the connection its request went
/// out on.
pub struct ExecInputSender {
    stream: UnixStream,
}

impl ExecInputSender {
    pub fn send(&mut self, input: &ExecInput) -> io::Result<()> {
        self.stream.write_all(input.to_line().as_bytes())
    }
}

fn unexpected(response: &Response) -> ApiError {
    ApiError::new(
        ErrorCode::Internal,
        format!(
            "the API sent an unexpected line: {}",
            response.to_line(None).trim_end()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Output;
    use std::thread;

    /// A server on the other end of a socketpair that answers each request with `answer`.
    fn fake_server(
        answer: impl Fn(Envelope) -> Vec<String> + Send + 'static,
    ) -> (Client, thread::JoinHandle<Vec<Envelope>>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || {
            let mut seen = Vec::new();
            let mut reader = BufReader::new(theirs.try_clone().unwrap());
            let mut writer = theirs;
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap() > 0 {
                let envelope = Envelope::decode(line.as_bytes()).unwrap();
                for out in answer(envelope.clone()) {
                    writer.write_all(out.as_bytes()).unwrap();
                }
                seen.push(envelope);
                line.clear();
            }
            seen
        });
        (Client::connect_stream(ours), server)
    }

    #[test]
    fn calls_and_skips_other_ids() {
        let (mut client, server) = fake_server(|e| {
            let id = e.id;
            let stale = id.map(|i| i + 1000);
            match e.request {
                Request::Ps => vec![
                    // Leftovers of another client: a torn line, then lines of another id.
                    "\"stream\":\"stdout\"}}\n".into(),
                    Response::Log(LogEntry {
                        ts_ms: 1,
                        stream: Stream::Stdout,
                        line: "old".into(),
                    })
                    .to_line(stale),
                    Response::Ok(Value::Null).to_line(stale),
                    Response::Ok(serde_json::json!([{
                        "name": "web", "kind": "service", "state": "running", "pid": 7,
                        "uptime_ms": 5, "restarts": 1, "health": null, "last_exit": "exit 0"
                    }]))
                    .to_line(id),
                ],
                Request::Start { .. } => {
                    vec![Response::Error(ApiError::conflict("already running")).to_line(id)]
                }
                Request::Logs { .. } => vec![
                    Response::Log(LogEntry {
                        ts_ms: 2,
                        stream: Stream::Stderr,
                        line: "a".into(),
                    })
                    .to_line(id),
                    Response::Ok(Value::Null).to_line(id),
                ],
                Request::Exec { .. } => vec![
                    Response::Out(Output::new(Stream::Stdout, b"hi\n")).to_line(id),
                    Response::Exit(3).to_line(id),
                ],
                _ => vec![Response::Ok(Value::Null).to_line(id)],
            }
        });
        let ps = client.ps().unwrap();
        assert_eq!((ps[0].name.as_str(), ps[0].pid), ("web", Some(7)));
        let err = client
            .call(Request::Start { name: "web".into() })
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::Conflict);
        let mut entries = Vec::new();
        client
            .logs("web", false, None, Some(1), |e| {
                entries.push(e);
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(entries.len(), 1);
        let mut out = Vec::new();
        let code = client
            .exec("web", vec!["echo".into(), "hi".into()], vec![], |s, d| {
                assert_eq!(s, Stream::Stdout);
                out.extend_from_slice(d);
            })
            .unwrap();
        assert_eq!((code, out.as_slice()), (3, &b"hi\n"[..]));
        assert_eq!(client.call(Request::Poweroff).unwrap(), Value::Null);
        drop(client);
        let seen = server.join().unwrap();
        assert_eq!(seen.len(), 5);
        assert!(seen.iter().all(|e| e.version == 1 && e.id.is_some()));
        let ids: std::collections::HashSet<_> = seen.iter().map(|e| e.id).collect();
        assert_eq!(ids.len(), 5, "every request gets its own id");
    }

    #[test]
    fn transport_failures_are_internal_errors() {
        let missing = Client::connect_unix("/nonexistent/keel.sock")
            .err()
            .unwrap();
        assert_eq!(missing.code, ErrorCode::Internal);
        assert!(
            missing.message.contains("/nonexistent/keel.sock"),
            "{missing}"
        );

        // The server hangs up without answering.
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        let mut closed = Client::connect_stream(ours);
        let err = closed.call(Request::Ps).unwrap_err();
        assert_eq!(err.code, ErrorCode::Internal, "{err}");
        assert!(
            closed.call(Request::Ps).is_err(),
            "a broken client stays broken"
        );
    }

    #[test]
    fn timeouts_apply_to_unix_sockets() {
        let dir = std::env::temp_dir().join(format!("keel-api-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let mut client = Client::connect_unix(&path).unwrap();
        let (_silent, _) = listener.accept().unwrap();
        client
            .set_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let err = client.call(Request::Ps).unwrap_err();
        assert!(err.message.contains("timed out"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
