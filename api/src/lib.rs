//! Keel's control API: the protocol PID 1 serves on `/run/keel/api.sock` (and on the
//! `keel.api` virtio-serial port) and a blocking [`Client`] for it.
//!
//! The protocol is line-delimited JSON, versioned by [`PROTOCOL_VERSION`]. A client sends one
//! request line, an [`Envelope`]:
//!
//! ```text
//! {"version":1,"request":{"op":"ps"}}
//! ```
//!
//! and the server answers with [`Response`] lines, the last of which is *final*
//! ([`Response::is_final`]): `{"ok":VALUE}`, `{"error":{"code":..,"message":..}}` or, for
//! `exec`, `{"exit":CODE}`. `logs` first streams `{"log":{..}}` lines and `exec` streams
//! `{"out":{..}}` lines. A connection may carry several requests, one after the other.
//!
//! When a request carries an `id`, every line of its response carries the same `id`: on a
//! byte stream shared by successive clients (the virtio-serial port), a client can so skip
//! what is left of a previous client's response. docs/api.md is the full specification.
//!
//! This crate has no async runtime dependency so that the CLI stays small.

mod b64;
mod client;
mod log;
mod time;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use b64::{decode as base64_decode, encode as base64_encode};
pub use client::{Client, ExecInputSender};
pub use log::{format_log_line, parse_log_line};
pub use time::{format_rfc3339_ms, parse_rfc3339_ms};

/// The protocol version this crate speaks. A server answers any other version with
/// [`ErrorCode::UnsupportedVersion`].
pub const PROTOCOL_VERSION: u32 = 1;

/// Where PID 1 listens inside a Keel guest.
pub const DEFAULT_SOCKET: &str = "/run/keel/api.sock";

/// The name of the virtio-serial port `keel run` gives the guest (`/dev/virtio-ports/keel.api`
/// where udev runs; Keel has no udev, so PID 1 finds it through `/sys/class/virtio-ports`).
pub const VIRTIO_PORT_NAME: &str = "keel.api";

/// How many API ports `keel run` gives the guest: [`VIRTIO_PORT_NAME`], then `keel.api.1`,
/// `keel.api.2`, ... A port is one byte stream that serves one host client at a time, so the
/// runner hands each client connecting to its API socket a free port of its own: that many
/// `keel --vm` commands run at once (a `logs -f` or a long `exec` does not hold up a `ps`).
pub const VIRTIO_PORT_COUNT: usize = 4;

/// The name of API port `index` (0 is [`VIRTIO_PORT_NAME`]).
pub fn virtio_port_name(index: usize) -> String {
    match index {
        0 => VIRTIO_PORT_NAME.to_owned(),
        n => format!("{VIRTIO_PORT_NAME}.{n}"),
    }
}

/// The longest request line a server accepts, newline included.
pub const MAX_REQUEST_LINE: usize = 64 * 1024;

/// One request. On the wire it is an object tagged by `op`, e.g.
/// `{"op":"stop","name":"web","timeout_ms":5000}`; unknown fields are rejected, so that a
/// request meaning more than a server understands fails rather than half-works.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Every container's [`ContainerStatus`], in host-file order.
    Ps,
    /// One container's status and configuration, as a JSON object.
    Inspect {
        name: String,
    },
    /// Resource counters of one container, or of all of them: always a list of [`Stats`].
    Stats {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    Start {
        name: String,
    },
    /// Stop signal, then SIGKILL to the cgroup after `timeout_ms` (default: the container's
    /// configured grace period). The container stays stopped until `start`.
    Stop {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
    Restart {
        name: String,
    },
    /// Sends `signal` (a number, 1–64) to the container's main process; the restart policy
    /// applies to the resulting exit as to any other.
    Kill {
        name: String,
        signal: i32,
    },
    /// Log entries from `/var/log/keel/NAME.log*`: those at or after `since_ms` (Unix epoch
    /// milliseconds), of those the last `tail`; with `follow`, then new ones as they come.
    Logs {
        name: String,
        #[serde(default)]
        follow: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since_ms: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tail: Option<u64>,
    },
    /// Runs `argv` inside the container (its namespaces, cgroup and security settings), with
    /// `env` (`NAME=value`) added to the container's environment. With `stdin`, the client
    /// then sends [`ExecInput`] lines for the process's standard input (else it reads
    /// /dev/null). With `tty`, the process runs on a pseudo-terminal of the container's
    /// devpts of that size, as the leader of its own session (Ctrl-C reaches it as SIGINT);
    /// its output, stdout and stderr together, then comes as `stdout`.
    Exec {
        name: String,
        argv: Vec<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        env: Vec<String>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        stdin: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tty: Option<WindowSize>,
    },
    Reboot,
    Poweroff,
    /// Makes the running host follow a new host file (its text, `host_file`): containers
    /// are added, removed, restarted with a changed definition, or left running. A file that
    /// is invalid, needs images the host lacks, or changes what only a reboot can (hostname,
    /// modules, interfaces, container networks, registries, images) is refused whole
    /// (`bad_request`) and nothing changes. With `dry_run`, only the plan. The answer, an
    /// [`ApplyReport`], comes once the stops have completed and the new definitions have
    /// been started.
    Apply {
        host_file: String,
        #[serde(default)]
        dry_run: bool,
    },
    /// Installs an OS update in the slot that did not boot: `manifest` is the build's
    /// `update.json` text, `signature` its `update.sig`. The host checks the signature
    /// against the keys its root image trusts, the version (newer than the running one) and
    /// the sizes, then answers `progress` `{"accepted":{"slot":"B"}}`; the client then sends
    /// the UKI's bytes and then the root image's as [`UpgradeData`] lines, in order. The
    /// host checks both digests before it touches the slot, writes and re-reads it, installs
    /// the boot entry on trial, and answers `ok` with an [`UpgradeReport`]; with `reboot`,
    /// it then reboots into the update.
    Upgrade {
        manifest: String,
        signature: String,
        #[serde(default)]
        reboot: bool,
    },
    /// The root slots of a host booted from its disk image: which booted, their versions
    /// and root image digests, the update on trial or rolled back ([`HostStatus`]).
    Status,
}

/// Raw bytes per [`UpgradeData`] line: its base64 stays well inside [`MAX_REQUEST_LINE`].
pub const UPGRADE_CHUNK: usize = 32 * 1024;

/// A piece of an `upgrade`'s files: `{"data":"BASE64"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpgradeData {
    pub data: String,
}

/// What an `upgrade` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeReport {
    pub version: String,
    /// `A` or `B`.
    pub slot: String,
    /// The boot entry now on trial, e.g. `keel-b+3.efi`.
    pub entry: String,
    pub rebooting: bool,
    /// With `rebooting`: seconds until the reboot (0: now; more: the host file's `[update]
    /// reboot_window` opens then).
    #[serde(default)]
    pub reboot_in_s: u64,
}

/// One root slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotStatus {
    /// `A` or `B`.
    pub slot: String,
    pub version: Option<String>,
    pub root_sha256: Option<String>,
    /// The boot entry's file on the ESP.
    pub entry: String,
    /// `committed`, `on trial (N tries left)` or `bad (no tries left)`.
    pub state: String,
    pub booted: bool,
}

/// The `status` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostStatus {
    /// The running version (`[update] version` of the booted build).
    pub version: String,
    /// `firmware` (booted from a Keel disk by its boot loader) or `direct` (no slots).
    pub boot: String,
    pub slots: Vec<SlotStatus>,
    /// The update on trial in this boot, or the last one that was rolled back, and why.
    pub update: Option<String>,
}

impl Request {
    /// The `op` tag.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Ps => "ps",
            Request::Inspect { .. } => "inspect",
            Request::Stats { .. } => "stats",
            Request::Start { .. } => "start",
            Request::Stop { .. } => "stop",
            Request::Restart { .. } => "restart",
            Request::Kill { .. } => "kill",
            Request::Logs { .. } => "logs",
            Request::Exec { .. } => "exec",
            Request::Reboot => "reboot",
            Request::Poweroff => "poweroff",
            Request::Apply { .. } => "apply",
            Request::Upgrade { .. } => "upgrade",
            Request::Status => "status",
        }
    }
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowSize {
    pub rows: u16,
    pub cols: u16,
}

/// What a client sends while its `exec` with `stdin` or `tty` runs, one line each:
/// `{"stdin":"BASE64"}` (bytes for the process's input), `{"eof":true}` (its input ends:
/// the pipe is closed; on a terminal, the client sends the terminal's EOF character
/// instead), `{"resize":{"rows":50,"cols":132}}` (the terminal's new size). A line that is
/// none of these ends the stream as any new request does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecInput {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub eof: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resize: Option<WindowSize>,
}

impl ExecInput {
    /// Input bytes.
    pub fn data(bytes: &[u8]) -> ExecInput {
        ExecInput {
            stdin: Some(base64_encode(bytes)),
            ..ExecInput::default()
        }
    }

    /// The line, newline included.
    pub fn to_line(&self) -> String {
        // Plain strings, numbers and bools: serializing cannot fail.
        let mut line = serde_json::to_string(self).unwrap_or_default();
        line.push('\n');
        line
    }

    /// Parses an input line; None if it is not one (a new request, garbage).
    pub fn from_line(line: &[u8]) -> Option<ExecInput> {
        let input: ExecInput = serde_json::from_slice(line).ok()?;
        let any = input.stdin.is_some() || input.eof || input.resize.is_some();
        any.then_some(input)
    }

    /// The input bytes, if the line carries valid ones.
    pub fn bytes(&self) -> Option<Vec<u8>> {
        self.stdin.as_deref().and_then(base64_decode)
    }
}

/// A request line: `{"version":1,"id":7,"request":{...}}` (`id` optional).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub version: u32,
    /// Echoed in every line of the response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub request: Request,
}

impl Envelope {
    /// `request` at the current [`PROTOCOL_VERSION`], without an id.
    pub fn new(request: Request) -> Envelope {
        Envelope {
            version: PROTOCOL_VERSION,
            id: None,
            request,
        }
    }

    /// The request line, newline included.
    pub fn to_line(&self) -> String {
        // Serializing these plain types cannot fail (no maps with non-string keys, no
        // failing Serialize impls), so the fallback is unreachable in practice.
        let mut line = serde_json::to_string(self).unwrap_or_default();
        line.push('\n');
        line
    }

    /// Parses a request line (with or without its newline) the way a server must: the
    /// version is checked before the request, so that a request of a newer version is answered
    /// `unsupported_version`, not `bad_request`. The rejection carries the request's `id` when
    /// it could be read, so that the error line can echo it.
    pub fn decode(line: &[u8]) -> Result<Envelope, Rejection> {
        let value: Value = serde_json::from_slice(line).map_err(|e| Rejection {
            id: None,
            error: ApiError::bad_request(format!("the request is not JSON: {e}")),
        })?;
        let id = value.get("id").and_then(Value::as_u64);
        let reject = |error| Rejection { id, error };
        let Some(object) = value.as_object() else {
            return Err(reject(ApiError::bad_request(
                "the request must be a JSON object",
            )));
        };
        match object.get("version").map(Value::as_u64) {
            None => {
                return Err(reject(ApiError::bad_request(
                    "the request has no `version`",
                )));
            }
            Some(Some(v)) if v == u64::from(PROTOCOL_VERSION) => {}
            Some(_) => {
                return Err(reject(ApiError::new(
                    ErrorCode::UnsupportedVersion,
                    format!("this server speaks protocol version {PROTOCOL_VERSION} only"),
                )));
            }
        }
        let fields = object
            .get("request")
            .and_then(Value::as_object)
            .map_or(0, |r| r.len());
        let envelope: Envelope = serde_json::from_value(value)
            .map_err(|e| reject(ApiError::bad_request(format!("invalid request: {e}"))))?;
        // serde ignores unknown fields of the unit variants despite deny_unknown_fields.
        if matches!(
            envelope.request,
            Request::Ps | Request::Reboot | Request::Poweroff | Request::Status
        ) && fields > 1
        {
            return Err(reject(ApiError::bad_request(format!(
                "invalid request: `{}` takes no arguments",
                envelope.request.op()
            ))));
        }
        Ok(envelope)
    }
}

/// A request line a server refuses, and the id to answer with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub id: Option<u64>,
    pub error: ApiError,
}

/// What went wrong, machine-readably. The CLI maps these to its exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// No container of that name (or no logs for it).
    NotFound,
    /// The request is malformed or its arguments are invalid.
    BadRequest,
    /// The container is not in a state that allows it (starting a running container...).
    Conflict,
    /// The peer is not root.
    Forbidden,
    /// The envelope's `version` is not one the server speaks.
    UnsupportedVersion,
    /// The server failed, or (client side) talking to it failed.
    Internal,
    /// A code this client does not know (sent by a newer server).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "not_found",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::Internal => "internal",
            ErrorCode::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error answer: `{"code":"not_found","message":"no container named \"x\""}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
        }
    }
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::NotFound, message)
    }
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::BadRequest, message)
    }
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::Conflict, message)
    }
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::Forbidden, message)
    }
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::Internal, message)
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

/// Which output of a process a log entry or an exec chunk comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
    /// Log entries only: a record by Keel itself about the log (lines it had to drop...).
    Keel,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
            Stream::Keel => "keel",
        }
    }
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Stream {
    type Err = ();
    fn from_str(s: &str) -> Result<Stream, ()> {
        match s {
            "stdout" => Ok(Stream::Stdout),
            "stderr" => Ok(Stream::Stderr),
            "keel" => Ok(Stream::Keel),
            _ => Err(()),
        }
    }
}

/// One line a container wrote, as stored in its log file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// When PID 1 received the line, Unix epoch milliseconds.
    pub ts_ms: u64,
    pub stream: Stream,
    /// The line without its newline.
    pub line: String,
}

/// A chunk of an exec'd process's output. Raw bytes, so base64: the output need not be UTF-8
/// nor split at line ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Output {
    pub stream: Stream,
    pub data_b64: String,
}

impl Output {
    pub fn new(stream: Stream, data: &[u8]) -> Output {
        Output {
            stream,
            data_b64: base64_encode(data),
        }
    }

    /// The decoded bytes, or `None` if `data_b64` is not valid base64.
    pub fn data(&self) -> Option<Vec<u8>> {
        base64_decode(&self.data_b64)
    }
}

/// A container as `ps` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerStatus {
    pub name: String,
    /// `service`, `onboot` or `onshutdown`.
    pub kind: String,
    /// `waiting`, `starting`, `running`, `restarting`, `stopping`, `exited`, `stopped` or
    /// `failed`. A string rather than an enum so that an older client shows a newer state.
    pub state: String,
    /// The main process, in PID 1's pid namespace, while there is one.
    pub pid: Option<i32>,
    /// Since the current process started, while there is one.
    pub uptime_ms: Option<u64>,
    /// Restarts since boot (by policy or by `restart`).
    pub restarts: u64,
    /// `starting`, `healthy` or `unhealthy`; `None` without a health check.
    pub health: Option<String>,
    /// How the previous process ended, for people: `exit 0`, `exit 3`, `signal KILL`,
    /// `oom`, ...
    pub last_exit: Option<String>,
}

/// A container's cgroup counters; `None` where the kernel does not provide one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub name: String,
    /// `usage_usec` of cpu.stat.
    pub cpu_usage_usec: Option<u64>,
    /// memory.current, bytes.
    pub memory_current: Option<u64>,
    /// memory.peak, bytes.
    pub memory_peak: Option<u64>,
    /// pids.current.
    pub pids_current: Option<u64>,
    /// `oom_kill` of memory.events.
    pub oom_kills: Option<u64>,
}

/// The answer to `apply`: what happened (or, for a dry run, would happen) to each container.
/// Each list is sorted by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyReport {
    pub dry_run: bool,
    /// New containers, started (or waiting for their dependencies).
    pub added: Vec<String>,
    /// Stopped and forgotten.
    pub removed: Vec<String>,
    /// Definition changed: stopped, then started with the new one.
    pub restarted: Vec<String>,
    /// Only supervision settings changed (restart policy, stop timeout, depends_on...):
    /// taken over without a restart.
    pub updated: Vec<String>,
    /// Not touched: same process.
    pub unchanged: Vec<String>,
    /// Host settings changed live (`host.stop_timeout`, `host.shutdown_timeout`).
    #[serde(default)]
    pub settings: Vec<String>,
    /// Added or restarted containers that could not start.
    #[serde(default)]
    pub failed: Vec<ApplyFailure>,
    /// What went wrong without undoing the apply (it could not be saved for the next boot,
    /// the host began shutting down first...).
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// A container an apply could not start, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyFailure {
    pub name: String,
    pub error: String,
}

/// One response line (its `id`, if any, travels beside it: see [`Response::to_line`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    /// Final: success, with the op's value (`null` for commands).
    Ok(Value),
    /// Final: failure.
    Error(ApiError),
    /// A log entry of a `logs` stream.
    Log(LogEntry),
    /// A chunk of an `exec` stream.
    Out(Output),
    /// Final for `exec`: the process's exit code (128 + N if signal N killed it).
    Exit(i32),
    /// A step of a long operation, not final (`upgrade`: `{"accepted":{...}}`).
    Progress(Value),
}

impl Response {
    /// Whether this line ends its response.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Response::Ok(_) | Response::Error(_) | Response::Exit(_)
        )
    }

    /// The line, newline included: `{"ok":[...],"id":7}`.
    pub fn to_line(&self, id: Option<u64>) -> String {
        // Serializing these types cannot fail (see Envelope::to_line). Splicing the id in,
        // rather than going through a Value, keeps the fields in their documented order.
        let mut line = serde_json::to_string(self).unwrap_or_default();
        if let Some(id) = id
            && line.ends_with('}')
        {
            line.pop();
            line.push_str(&format!(",\"id\":{id}}}"));
        }
        line.push('\n');
        line
    }

    /// Parses a response line and its `id`.
    pub fn from_line(line: &[u8]) -> Result<(Response, Option<u64>), serde_json::Error> {
        let mut value: Value = serde_json::from_slice(line)?;
        let id = value
            .as_object_mut()
            .and_then(|o| o.remove("id"))
            .and_then(|id| id.as_u64());
        Ok((serde_json::from_value(value)?, id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn all_requests() -> Vec<Request> {
        vec![
            Request::Ps,
            Request::Inspect { name: "web".into() },
            Request::Stats { name: None },
            Request::Stats {
                name: Some("web".into()),
            },
            Request::Start { name: "web".into() },
            Request::Stop {
                name: "web".into(),
                timeout_ms: Some(1500),
            },
            Request::Stop {
                name: "web".into(),
                timeout_ms: None,
            },
            Request::Restart { name: "web".into() },
            Request::Kill {
                name: "web".into(),
                signal: 9,
            },
            Request::Logs {
                name: "web".into(),
                follow: true,
                since_ms: Some(1_700_000_000_000),
                tail: Some(10),
            },
            Request::Exec {
                name: "web".into(),
                argv: vec!["sh".into(), "-c".into(), "exit 3".into()],
                env: vec!["A=b".into()],
                stdin: false,
                tty: None,
            },
            Request::Exec {
                name: "web".into(),
                argv: vec!["sh".into()],
                env: Vec::new(),
                stdin: true,
                tty: Some(WindowSize {
                    rows: 50,
                    cols: 132,
                }),
            },
            Request::Reboot,
            Request::Poweroff,
            Request::Apply {
                host_file: "[host]\nhostname = \"h\"\n".into(),
                dry_run: true,
            },
            Request::Apply {
                host_file: String::new(),
                dry_run: false,
            },
        ]
    }

    #[test]
    fn exec_input_lines_round_trip_and_requests_are_not_input() {
        let data = ExecInput::data(b"ls\x03\n");
        assert_eq!(data.to_line(), "{\"stdin\":\"bHMDCg==\"}\n");
        let back = ExecInput::from_line(data.to_line().as_bytes()).unwrap();
        assert_eq!(back.bytes().unwrap(), b"ls\x03\n");
        let resize = ExecInput {
            resize: Some(WindowSize {
                rows: 50,
                cols: 132,
            }),
            ..ExecInput::default()
        };
        assert_eq!(
            resize.to_line(),
            "{\"resize\":{\"rows\":50,\"cols\":132}}\n"
        );
        assert_eq!(
            ExecInput::from_line(b"{\"eof\":true}").map(|i| i.eof),
            Some(true)
        );
        // A new request, an empty object or garbage is not input.
        assert_eq!(
            ExecInput::from_line(Envelope::new(Request::Ps).to_line().as_bytes()),
            None
        );
        assert_eq!(ExecInput::from_line(b"{}"), None);
        assert_eq!(ExecInput::from_line(b"{\"stdin\":1}"), None);
    }

    #[test]
    fn requests_round_trip() {
        for request in all_requests() {
            let mut envelope = Envelope::new(request.clone());
            envelope.id = Some(42);
            let line = envelope.to_line();
            assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
            assert_eq!(Envelope::decode(line.as_bytes()), Ok(envelope), "{line}");
            let value: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(value["request"]["op"], request.op());
        }
    }

    #[test]
    fn the_wire_format_is_the_documented_one() {
        assert_eq!(
            Envelope::new(Request::Ps).to_line(),
            "{\"version\":1,\"request\":{\"op\":\"ps\"}}\n"
        );
        let e = Envelope::decode(br#"{"version":1,"request":{"op":"logs","name":"web","tail":1}}"#)
            .unwrap();
        assert_eq!(
            e.request,
            Request::Logs {
                name: "web".into(),
                follow: false,
                since_ms: None,
                tail: Some(1)
            }
        );
        let e =
            Envelope::decode(br#"{"version":1,"request":{"op":"exec","name":"w","argv":["id"]}}"#)
                .unwrap();
        assert_eq!(
            e.request,
            Request::Exec {
                name: "w".into(),
                argv: vec!["id".into()],
                env: vec![],
                stdin: false,
                tty: None,
            }
        );
        let e =
            Envelope::decode(br#"{"version":1,"request":{"op":"apply","host_file":"[host]\n"}}"#)
                .unwrap();
        assert_eq!(
            e.request,
            Request::Apply {
                host_file: "[host]\n".into(),
                dry_run: false
            }
        );
        assert_eq!(Response::Ok(json!(null)).to_line(None), "{\"ok\":null}\n");
        assert_eq!(
            Response::Exit(3).to_line(Some(5)),
            "{\"exit\":3,\"id\":5}\n"
        );
        assert_eq!(
            Response::Error(ApiError::not_found("no container named \"x\"")).to_line(None),
            "{\"error\":{\"code\":\"not_found\",\"message\":\"no container named \\\"x\\\"\"}}\n"
        );
        assert_eq!(
            Response::Log(LogEntry {
                ts_ms: 1,
                stream: Stream::Stderr,
                line: "x".into()
            })
            .to_line(None),
            "{\"log\":{\"ts_ms\":1,\"stream\":\"stderr\",\"line\":\"x\"}}\n"
        );
        assert_eq!(
            Response::Out(Output::new(Stream::Stdout, b"hi\n")).to_line(None),
            "{\"out\":{\"stream\":\"stdout\",\"data_b64\":\"aGkK\"}}\n"
        );
    }

    #[test]
    fn responses_round_trip() {
        let responses = [
            Response::Ok(json!(null)),
            Response::Ok(json!([{"name": "web"}])),
            Response::Error(ApiError::conflict("web is already running")),
            Response::Log(LogEntry {
                ts_ms: 1_790_000_000_123,
                stream: Stream::Stdout,
                line: "hello \"world\"".into(),
            }),
            Response::Out(Output::new(Stream::Stderr, &[0, 255, 10])),
            Response::Exit(130),
        ];
        for r in responses {
            for id in [None, Some(9)] {
                let line = r.to_line(id);
                assert_eq!(
                    Response::from_line(line.as_bytes()).unwrap(),
                    (r.clone(), id)
                );
            }
        }
        assert!(Response::Exit(0).is_final() && Response::Ok(json!(1)).is_final());
        assert!(!Response::Out(Output::new(Stream::Stdout, b"")).is_final());
        let (r, _) = Response::from_line(br#"{"error":{"code":"teapot","message":"m"}}"#).unwrap();
        assert_eq!(r, Response::Error(ApiError::new(ErrorCode::Unknown, "m")));
    }

    #[test]
    fn statuses_and_stats_serialize_every_field() {
        let s = ContainerStatus {
            name: "web".into(),
            kind: "service".into(),
            state: "running".into(),
            pid: Some(42),
            uptime_ms: Some(1000),
            restarts: 0,
            health: None,
            last_exit: None,
        };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["pid"], 42);
        assert!(v.get("health").is_some_and(Value::is_null));
        assert_eq!(serde_json::from_value::<ContainerStatus>(v).unwrap(), s);
        let st = Stats {
            name: "web".into(),
            cpu_usage_usec: Some(1),
            memory_current: Some(2),
            memory_peak: None,
            pids_current: Some(3),
            oom_kills: Some(0),
        };
        let v = serde_json::to_value(&st).unwrap();
        assert_eq!(v["memory_current"], 2);
        assert_eq!(serde_json::from_value::<Stats>(v).unwrap(), st);
    }

    #[test]
    fn apply_reports_round_trip_and_older_fields_default() {
        let report = ApplyReport {
            dry_run: false,
            added: vec!["d".into()],
            removed: vec!["c".into()],
            restarted: vec!["b".into()],
            updated: vec![],
            unchanged: vec!["a".into()],
            settings: vec!["host.stop_timeout".into()],
            failed: vec![ApplyFailure {
                name: "d".into(),
                error: "no such image".into(),
            }],
            warnings: vec!["not saved".into()],
        };
        let v = serde_json::to_value(&report).unwrap();
        assert_eq!(v["failed"][0]["name"], "d");
        assert_eq!(serde_json::from_value::<ApplyReport>(v).unwrap(), report);
        let minimal = json!({"dry_run": true, "added": [], "removed": [], "restarted": [],
            "updated": [], "unchanged": ["a"]});
        let r: ApplyReport = serde_json::from_value(minimal).unwrap();
        assert!(r.dry_run && r.failed.is_empty() && r.warnings.is_empty());
    }

    #[test]
    fn versions_are_checked_before_the_request() {
        let err =
            Envelope::decode(br#"{"version":2,"id":3,"request":{"op":"teleport"}}"#).unwrap_err();
        assert_eq!(err.id, Some(3));
        assert_eq!(err.error.code, ErrorCode::UnsupportedVersion);
        for (line, code) in [
            (
                &br#"{"version":"1","request":{"op":"ps"}}"#[..],
                ErrorCode::UnsupportedVersion,
            ),
            (br#"{"request":{"op":"ps"}}"#, ErrorCode::BadRequest),
            (
                br#"{"version":1,"request":{"op":"teleport"}}"#,
                ErrorCode::BadRequest,
            ),
            (
                br#"{"version":1,"request":{"op":"stop"}}"#,
                ErrorCode::BadRequest,
            ),
            (
                br#"{"version":1,"request":{"op":"ps","name":"x"}}"#,
                ErrorCode::BadRequest,
            ),
            (
                br#"{"version":1,"request":{"op":"kill","name":"x","signal":"KILL"}}"#,
                ErrorCode::BadRequest,
            ),
            (
                br#"{"version":1,"request":{"op":"ps"},"extra":1}"#,
                ErrorCode::BadRequest,
            ),
            (b"[1]", ErrorCode::BadRequest),
            (b"ps", ErrorCode::BadRequest),
        ] {
            let err = Envelope::decode(line)
                .err()
                .unwrap_or_else(|| panic!("accepted {}", String::from_utf8_lossy(line)));
            assert_eq!(err.error.code, code, "{}", String::from_utf8_lossy(line));
        }
    }
}
