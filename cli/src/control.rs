//! The commands that drive a running host through its control API (docs/api.md): tables for
//! people, `--json` for scripts, and exit codes that say what happened.

use std::io::Write;
use std::ops::ControlFlow;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keel_api::{
    ApiError, ApplyReport, Client, ContainerStatus, Envelope, ErrorCode, LogEntry,
    MAX_REQUEST_LINE, Request, Stats, Stream,
};

/// Exit codes of the API commands.
pub mod exit {
    pub const OK: u8 = 0;
    /// The API could not be reached, or failed.
    pub const ERROR: u8 = 1;
    /// Bad usage (also what clap exits with).
    pub const USAGE: u8 = 2;
    /// No such container (or no logs for it).
    pub const NOT_FOUND: u8 = 3;
    /// The container is not in a state that allows it (starting a running one...).
    pub const CONFLICT: u8 = 4;
}

/// The exit code for an API error.
pub fn exit_code(code: ErrorCode) -> u8 {
    match code {
        ErrorCode::NotFound => exit::NOT_FOUND,
        ErrorCode::Conflict => exit::CONFLICT,
        ErrorCode::BadRequest => exit::USAGE,
        ErrorCode::Forbidden
        | ErrorCode::UnsupportedVersion
        | ErrorCode::Internal
        | ErrorCode::Unknown => exit::ERROR,
    }
}

/// Answers that should come at once get this long; stop, restart, exec and logs may
/// legitimately take any time.
const QUICK: Duration = Duration::from_secs(60);

/// Which API to talk to: `--api-socket PATH`, else `--vm DIR` (the host end of the VM's
/// port, `DIR/api.sock`), else PID 1's own socket (inside a guest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub socket: PathBuf,
    /// Set with `--vm`, for a better hint when nobody answers.
    pub vm: Option<PathBuf>,
}

impl Target {
    pub fn new(vm: Option<PathBuf>, api_socket: Option<PathBuf>) -> Target {
        let socket = match (&api_socket, &vm) {
            (Some(socket), _) => socket.clone(),
            (None, Some(dir)) => dir.join("api.sock"),
            (None, None) => PathBuf::from(keel_api::DEFAULT_SOCKET),
        };
        Target { socket, vm }
    }

    fn connect(&self) -> Result<Client, ApiError> {
        Client::connect_unix(&self.socket).map_err(|mut e| {
            if let Some(dir) = &self.vm {
                e.message
                    .push_str(&format!(" (is `keel run {}` running?)", dir.display()));
            } else if self.socket == Path::new(keel_api::DEFAULT_SOCKET) {
                e.message.push_str(
                    " (outside a Keel guest, use --vm DIR for the VM `keel run DIR` runs)",
                );
            }
            e
        })
    }
}

/// An API command, as parsed by main.rs.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Ps {
        json: bool,
    },
    Logs {
        name: String,
        follow: bool,
        since: Option<String>,
        tail: Option<u64>,
        timestamps: bool,
    },
    Start {
        name: String,
    },
    Stop {
        name: String,
        timeout_s: Option<f64>,
    },
    Restart {
        name: String,
    },
    Kill {
        name: String,
        signal: String,
    },
    Inspect {
        name: String,
    },
    Stats {
        name: Option<String>,
        json: bool,
    },
    Exec {
        name: String,
        command: Vec<String>,
        env: Vec<String>,
        interactive: bool,
        tty: bool,
    },
    Reboot,
    Poweroff,
    /// Send the update in a build directory.
    Upgrade {
        dir: std::path::PathBuf,
        reboot: bool,
    },
    Status {
        json: bool,
    },
    Apply {
        host_file: PathBuf,
        dry_run: bool,
    },
}

enum Failure {
    Usage(String),
    Api(ApiError),
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Failure {
        Failure::Api(e)
    }
}

/// Sends standard input (with `interactive`) and, on a terminal, its size changes, until
/// the process ends (this thread then dies with the program).
fn forward_input(mut sender: keel_api::ExecInputSender, interactive: bool, tty: bool) {
    use keel_api::ExecInput;
    let stdin = std::io::stdin();
    let mut reading = interactive;
    let mut buf = [0u8; 4096];
    loop {
        if tty && crate::terminal::take_resized() {
            let resize = ExecInput {
                resize: Some(crate::terminal::size_of(std::io::stdout().as_fd())),
                ..ExecInput::default()
            };
            if sender.send(&resize).is_err() {
                return;
            }
        }
        if !reading {
            if !tty {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
            continue;
        }
        // Waits at most 100 ms, so that a resize is passed on while no key is pressed.
        let mut fds = [nix::poll::PollFd::new(
            stdin.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16)) {
            Ok(0) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => reading = false,
            Ok(_) => match nix::unistd::read(&stdin, &mut buf) {
                Ok(0) | Err(_) => {
                    reading = false;
                    // A pipe's end is the process's end of input; a terminal's user types
                    // the EOF character instead, which its line discipline handles.
                    if !tty
                        && sender
                            .send(&ExecInput {
                                eof: true,
                                ..ExecInput::default()
                            })
                            .is_err()
                    {
                        return;
                    }
                }
                Ok(n) => {
                    if sender.send(&ExecInput::data(&buf[..n])).is_err() {
                        return;
                    }
                }
            },
        }
    }
}

/// Runs `action` against `target`, printing errors as `keel: ...`, and returns the exit code.
pub fn run(target: &Target, action: Action) -> ExitCode {
    match execute(target, action) {
        Ok(code) => ExitCode::from(code),
        Err(Failure::Usage(message)) => {
            eprintln!("keel: {message}");
            ExitCode::from(exit::USAGE)
        }
        Err(Failure::Api(e)) => {
            eprintln!("keel: {}", e.message);
            ExitCode::from(exit_code(e.code))
        }
    }
}

fn quick(target: &Target) -> Result<Client, ApiError> {
    let mut client = target.connect()?;
    client.set_timeout(Some(QUICK))?;
    Ok(client)
}

fn print_json(value: &impl serde::Serialize) -> Result<(), ApiError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| ApiError::internal(format!("encoding JSON: {e}")))?;
    println!("{text}");
    Ok(())
}

fn execute(target: &Target, action: Action) -> Result<u8, Failure> {
    match action {
        Action::Ps { json } => {
            let statuses = quick(target)?.ps()?;
            if json {
                print_json(&statuses)?;
            } else {
                print!("{}", ps_table(&statuses));
            }
        }
        Action::Stats { name, json } => {
            let stats = quick(target)?.stats(name.as_deref())?;
            if json {
                print_json(&stats)?;
            } else {
                print!("{}", stats_table(&stats));
            }
        }
        Action::Inspect { name } => {
            let value = quick(target)?.inspect(&name)?;
            print_json(&value)?;
        }
        Action::Start { name } => {
            quick(target)?.call(Request::Start { name: name.clone() })?;
            println!("{name}");
        }
        Action::Stop { name, timeout_s } => {
            let timeout_ms = match timeout_s {
                None => None,
                Some(s) if s.is_finite() && s >= 0.0 => Some((s * 1000.0).round() as u64),
                Some(s) => return Err(Failure::Usage(format!("-t {s}: not a number of seconds"))),
            };
            let mut client = target.connect()?;
            if let Some(ms) = timeout_ms {
                // The grace period, then the kill, and a margin for the guest to get to it.
                client.set_timeout(Some(Duration::from_millis(ms) + QUICK))?;
            }
            client.call(Request::Stop {
                name: name.clone(),
                timeout_ms,
            })?;
            println!("{name}");
        }
        Action::Restart { name } => {
            target
                .connect()?
                .call(Request::Restart { name: name.clone() })?;
            println!("{name}");
        }
        Action::Kill { name, signal } => {
            let signal = parse_signal(&signal).ok_or_else(|| {
                Failure::Usage(format!("{signal:?} is not a signal (KILL, SIGTERM, 9...)"))
            })?;
            quick(target)?.call(Request::Kill {
                name: name.clone(),
                signal,
            })?;
            println!("{name}");
        }
        Action::Logs {
            name,
            follow,
            since,
            tail,
            timestamps,
        } => {
            let since_ms = match since {
                None => None,
                Some(text) => Some(parse_since(&text, now_ms()).ok_or_else(|| {
                    Failure::Usage(format!(
                        "--since {text:?}: expected a duration (10m, 1h30m, 45s) or an RFC 3339 time"
                    ))
                })?),
            };
            let mut client = target.connect()?;
            let stdout = std::io::stdout();
            let stderr = std::io::stderr();
            let mut broken = false;
            client.logs(&name, follow, since_ms, tail, |entry| {
                let text = log_text(&entry, timestamps);
                let written = match entry.stream {
                    Stream::Stdout => stdout.lock().write_all(text.as_bytes()),
                    Stream::Stderr | Stream::Keel => stderr.lock().write_all(text.as_bytes()),
                };
                // A closed pipe (`keel logs x | head`) is the reader being done.
                if written.is_err() {
                    broken = true;
                    return ControlFlow::Break(());
                }
                ControlFlow::Continue(())
            })?;
            let _ = std::io::stdout().flush();
            if broken {
                return Ok(exit::OK);
            }
        }
        Action::Exec {
            name,
            command,
            mut env,
            interactive,
            tty,
        } => {
            let mut client = target.connect()?;
            // Raw until the end of this block, whatever way it ends.
            let terminal = if tty {
                Some(crate::terminal::RawTerminal::enter().map_err(Failure::Usage)?)
            } else {
                None
            };
            let size = tty.then(|| crate::terminal::size_of(std::io::stdout().as_fd()));
            if tty && !env.iter().any(|e| e.starts_with("TERM=")) {
                // As docker exec -t: programs on the terminal need to know what it is.
                let term = std::env::var("TERM").unwrap_or_else(|_| "xterm".into());
                env.push(format!("TERM={term}"));
            }
            if let Some(sender) = client.start_exec(&name, command, env, interactive, size)? {
                std::thread::spawn(move || forward_input(sender, interactive, tty));
            }
            let code = client.finish_exec(|stream, data| {
                // The process's output is passed on as it is; nowhere to report a closed
                // terminal to.
                let _ = match stream {
                    Stream::Stdout => {
                        let mut out = std::io::stdout().lock();
                        out.write_all(data).and_then(|()| out.flush())
                    }
                    Stream::Stderr | Stream::Keel => std::io::stderr().lock().write_all(data),
                };
            })?;
            drop(terminal);
            return Ok(u8::try_from(code).unwrap_or(255));
        }
        Action::Apply { host_file, dry_run } => {
            let text = read_host_file(&host_file)?;
            // A dry run answers at once; an apply once its containers have stopped (their
            // stop timeouts) and the new ones have started.
            let mut client = if dry_run {
                quick(target)?
            } else {
                target.connect()?
            };
            let report = client.apply(&text, dry_run).map_err(|mut e| {
                if e.code == ErrorCode::BadRequest {
                    // Refused whole: not a usage error of this command, but the file's.
                    e.message = format!("{}: {}", host_file.display(), e.message);
                }
                e
            })?;
            print!("{}", apply_summary(&report));
            for w in &report.warnings {
                eprintln!("keel: warning: {w}");
            }
            for f in &report.failed {
                eprintln!("keel: {}: could not start: {}", f.name, f.error);
            }
            if !report.failed.is_empty() {
                return Ok(exit::ERROR);
            }
        }
        Action::Reboot => {
            quick(target)?.call(Request::Reboot)?;
        }
        Action::Upgrade { dir, reboot } => {
            // No timeout: writing a slot under emulation takes a while.
            let mut client = target.connect()?;
            match crate::upgrade::upgrade(&mut client, &dir, reboot) {
                Ok(line) => println!("{line}"),
                Err(e) => {
                    eprintln!("keel: {e}");
                    return Ok(exit::ERROR);
                }
            }
        }
        Action::Status { json } => {
            let value = quick(target)?.call(Request::Status)?;
            let status: keel_api::HostStatus = serde_json::from_value(value)
                .map_err(|e| ApiError::internal(format!("the status answer: {e}")))?;
            if json {
                print_json(&status)?;
            } else {
                print!("{}", crate::upgrade::status_text(&status));
            }
        }
        Action::Poweroff => {
            quick(target)?.call(Request::Poweroff)?;
        }
    }
    Ok(exit::OK)
}

/// Reads and validates a host file here, as `keel check` does, so that its errors name the
/// file, line and key without a round trip; the host validates it again.
fn read_host_file(path: &Path) -> Result<String, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", path.display())))?;
    keel_config::HostConfig::parse(path, &text).map_err(|e| Failure::Usage(e.to_string()))?;
    let line = Envelope::new(Request::Apply {
        host_file: text.clone(),
        dry_run: false,
    })
    .to_line();
    if line.len() > MAX_REQUEST_LINE {
        return Err(Failure::Usage(format!(
            "{} is too large to send ({} bytes as a request, at most {MAX_REQUEST_LINE})",
            path.display(),
            line.len()
        )));
    }
    Ok(text)
}

/// What `keel apply` did (or, for a dry run, would do), one container a line.
pub fn apply_summary(report: &ApplyReport) -> String {
    let mut rows: Vec<(String, &str)> = Vec::new();
    let (added, removed, restarted, updated) = if report.dry_run {
        (
            "would be added",
            "would be removed",
            "would restart (changed)",
            "would be updated in place",
        )
    } else {
        (
            "added",
            "removed",
            "restarted (changed)",
            "updated in place",
        )
    };
    for (names, what) in [
        (&report.added, added),
        (&report.removed, removed),
        (&report.restarted, restarted),
        (&report.updated, updated),
        (&report.unchanged, "unchanged"),
    ] {
        rows.extend(names.iter().map(|n| (n.clone(), what)));
    }
    rows.sort();
    let table: Vec<Vec<String>> = rows
        .into_iter()
        .map(|(name, what)| vec![name, what.to_owned()])
        .collect();
    let mut out = render_table(&["CONTAINER", "CHANGE"], &table);
    for key in &report.settings {
        out.push_str(&format!(
            "{key}: {}\n",
            if report.dry_run {
                "would change"
            } else {
                "changed"
            }
        ));
    }
    out.push_str(&format!(
        "{}: {} added, {} removed, {} restarted, {} updated in place, {} unchanged\n",
        if report.dry_run {
            "dry run, nothing changed"
        } else {
            "applied"
        },
        report.added.len(),
        report.removed.len(),
        report.restarted.len(),
        report.updated.len(),
        report.unchanged.len()
    ));
    out
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn log_text(entry: &LogEntry, timestamps: bool) -> String {
    let mut text = String::new();
    if timestamps {
        text.push_str(&keel_api::format_rfc3339_ms(entry.ts_ms));
        text.push(' ');
    }
    if entry.stream == Stream::Keel {
        text.push_str("keel: ");
    }
    text.push_str(&entry.line);
    text.push('\n');
    text
}

/// Signal numbers by name (Linux x86_64), for `kill -s`.
const SIGNALS: &[(&str, i32)] = &[
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("ILL", 4),
    ("TRAP", 5),
    ("ABRT", 6),
    ("IOT", 6),
    ("BUS", 7),
    ("FPE", 8),
    ("KILL", 9),
    ("USR1", 10),
    ("SEGV", 11),
    ("USR2", 12),
    ("PIPE", 13),
    ("ALRM", 14),
    ("TERM", 15),
    ("STKFLT", 16),
    ("CHLD", 17),
    ("CONT", 18),
    ("STOP", 19),
    ("TSTP", 20),
    ("TTIN", 21),
    ("TTOU", 22),
    ("URG", 23),
    ("XCPU", 24),
    ("XFSZ", 25),
    ("VTALRM", 26),
    ("PROF", 27),
    ("WINCH", 28),
    ("IO", 29),
    ("POLL", 29),
    ("PWR", 30),
    ("SYS", 31),
];

/// `KILL`, `SIGKILL`, `kill`, `9`, `RTMIN+3` → the signal number.
pub fn parse_signal(text: &str) -> Option<i32> {
    if let Ok(n) = text.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let upper = text.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    if let Some(&(_, n)) = SIGNALS.iter().find(|(s, _)| *s == name) {
        return Some(n);
    }
    let (base, offset) = match name.split_once(['+', '-']) {
        Some((base, n)) => {
            let n: i32 = n.parse().ok()?;
            (base, if name.contains('-') { -n } else { n })
        }
        None => (name, 0),
    };
    let n = match base {
        "RTMIN" => 34 + offset,
        "RTMAX" => 64 + offset,
        _ => return None,
    };
    (34..=64).contains(&n).then_some(n)
}

/// A duration like `90s`, `10m`, `1h30m`, `2d`, `500ms` (a bare number is seconds).
pub fn parse_duration_ms(text: &str) -> Option<u64> {
    if let Ok(secs) = text.parse::<u64>() {
        return secs.checked_mul(1000);
    }
    let mut rest = text;
    let mut total = 0u64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let n: u64 = rest.get(..digits)?.parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(scale)?)?;
        rest = &rest[unit_len..];
    }
    Some(total)
}

/// `--since`: an RFC 3339 time, or a duration back from `now_ms`.
pub fn parse_since(text: &str, now_ms: u64) -> Option<u64> {
    keel_api::parse_rfc3339_ms(text)
        .or_else(|| parse_duration_ms(text).map(|d| now_ms.saturating_sub(d)))
}

/// `3s`, `5m12s`, `2h3m`, `1d4h`.
pub fn format_uptime(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{}m", s / 3600, s / 60 % 60),
        _ => format!("{}d{}h", s / 86_400, s / 3600 % 24),
    }
}

/// Bytes with a binary unit: `512B`, `1.5KiB`, `64.0MiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
}

/// Left-aligned columns two spaces apart, without trailing spaces.
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            line.extend(std::iter::repeat_n(' ', width - cell.chars().count()));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn or_dash<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

pub fn ps_table(statuses: &[ContainerStatus]) -> String {
    let rows: Vec<Vec<String>> = statuses
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.kind.clone(),
                s.state.clone(),
                or_dash(s.pid),
                or_dash(s.uptime_ms.map(format_uptime)),
                s.restarts.to_string(),
                or_dash(s.health.as_ref()),
                or_dash(s.last_exit.as_ref()),
            ]
        })
        .collect();
    render_table(
        &[
            "NAME",
            "KIND",
            "STATE",
            "PID",
            "UPTIME",
            "RESTARTS",
            "HEALTH",
            "LAST EXIT",
        ],
        &rows,
    )
}

pub fn stats_table(stats: &[Stats]) -> String {
    let rows: Vec<Vec<String>> = stats
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                or_dash(
                    s.cpu_usage_usec
                        .map(|us| format!("{:.2}s", us as f64 / 1e6)),
                ),
                or_dash(s.memory_current.map(format_bytes)),
                or_dash(s.memory_peak.map(format_bytes)),
                or_dash(s.pids_current),
                or_dash(s.oom_kills),
            ]
        })
        .collect();
    render_table(
        &["NAME", "CPU", "MEMORY", "PEAK", "PIDS", "OOM KILLS"],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(
        name: &str,
        state: &str,
        pid: Option<i32>,
        uptime_ms: Option<u64>,
    ) -> ContainerStatus {
        ContainerStatus {
            name: name.into(),
            kind: "service".into(),
            state: state.into(),
            pid,
            uptime_ms,
            restarts: 0,
            health: None,
            last_exit: None,
        }
    }

    #[test]
    fn ps_is_an_aligned_table() {
        let mut sleeper = status("sleeper", "running", Some(1234), Some(3_723_000));
        sleeper.restarts = 2;
        sleeper.health = Some("healthy".into());
        sleeper.last_exit = Some("signal KILL".into());
        let mut setup = status("setup", "exited", None, None);
        setup.kind = "onboot".into();
        setup.last_exit = Some("exit 0".into());
        let table = ps_table(&[
            status("web", "running", Some(87), Some(5_000)),
            sleeper,
            setup,
        ]);
        assert_eq!(
            table,
            "\
NAME     KIND     STATE    PID   UPTIME  RESTARTS  HEALTH   LAST EXIT
web      service  running  87    5s      0         -        -
sleeper  service  running  1234  1h2m    2         healthy  signal KILL
setup    onboot   exited   -     -       0         -        exit 0
"
        );
        assert_eq!(
            ps_table(&[]),
            "NAME  KIND  STATE  PID  UPTIME  RESTARTS  HEALTH  LAST EXIT\n"
        );
    }

    #[test]
    fn stats_is_an_aligned_table() {
        let table = stats_table(&[
            Stats {
                name: "web".into(),
                cpu_usage_usec: Some(1_234_567),
                memory_current: Some(3 << 20),
                memory_peak: Some(1536),
                pids_current: Some(1),
                oom_kills: Some(0),
            },
            Stats {
                name: "a".into(),
                cpu_usage_usec: None,
                memory_current: None,
                memory_peak: None,
                pids_current: None,
                oom_kills: None,
            },
        ]);
        assert_eq!(
            table,
            "\
NAME  CPU    MEMORY  PEAK    PIDS  OOM KILLS
web   1.23s  3.0MiB  1.5KiB  1     0
a     -      -       -       -     -
"
        );
    }

    #[test]
    fn formats_durations_and_sizes() {
        assert_eq!(format_uptime(999), "0s");
        assert_eq!(format_uptime(59_999), "59s");
        assert_eq!(format_uptime(60_000), "1m0s");
        assert_eq!(format_uptime(312_000), "5m12s");
        assert_eq!(format_uptime(3_600_000), "1h0m");
        assert_eq!(format_uptime(90_000_000), "1d1h");
        assert_eq!(format_bytes(0), "0B");
        assert_eq!(format_bytes(1023), "1023B");
        assert_eq!(format_bytes(64 << 20), "64.0MiB");
        assert_eq!(format_bytes(u64::MAX), "16384.0PiB");
    }

    #[test]
    fn exit_codes_mean_something() {
        assert_eq!(exit_code(ErrorCode::NotFound), 3);
        assert_eq!(exit_code(ErrorCode::Conflict), 4);
        assert_eq!(exit_code(ErrorCode::BadRequest), 2);
        for code in [
            ErrorCode::Internal,
            ErrorCode::Forbidden,
            ErrorCode::UnsupportedVersion,
            ErrorCode::Unknown,
        ] {
            assert_eq!(exit_code(code), 1, "{code}");
        }
    }

    #[test]
    fn parses_signals() {
        for (text, n) in [
            ("KILL", 9),
            ("SIGKILL", 9),
            ("kill", 9),
            ("sigterm", 15),
            ("9", 9),
            ("HUP", 1),
            ("USR1", 10),
            ("RTMIN", 34),
            ("RTMIN+2", 36),
            ("SIGRTMAX-1", 63),
            ("64", 64),
        ] {
            assert_eq!(parse_signal(text), Some(n), "{text}");
        }
        for bad in ["", "0", "65", "-9", "KIL", "SIG", "RTMIN+40", "RTMAX+1"] {
            assert_eq!(parse_signal(bad), None, "{bad}");
        }
    }

    #[test]
    fn parses_since() {
        let now = 1_795_797_000_000;
        assert_eq!(parse_duration_ms("90"), Some(90_000));
        assert_eq!(parse_duration_ms("10m"), Some(600_000));
        assert_eq!(parse_duration_ms("1h30m"), Some(5_400_000));
        assert_eq!(parse_duration_ms("2d"), Some(172_800_000));
        assert_eq!(parse_duration_ms("1s500ms"), Some(1500));
        for bad in ["", "m", "10x", "1.5h", "-1s", "10 m"] {
            assert_eq!(parse_duration_ms(bad), None, "{bad}");
        }
        assert_eq!(parse_since("10m", now), Some(now - 600_000));
        assert_eq!(
            parse_since("2026-11-27T16:00:00Z", now),
            Some(now - 1_800_000)
        );
        assert_eq!(parse_since("100000d", now), Some(0));
        assert_eq!(parse_since("yesterday", now), None);
    }

    #[test]
    fn targets() {
        let t = Target::new(None, None);
        assert_eq!(t.socket, Path::new("/run/keel/api.sock"));
        let t = Target::new(Some("out/hello".into()), None);
        assert_eq!(t.socket, Path::new("out/hello/api.sock"));
        let t = Target::new(Some("out/hello".into()), Some("/tmp/x.sock".into()));
        assert_eq!(t.socket, Path::new("/tmp/x.sock"));
        let err = Target::new(Some("/nonexistent".into()), None)
            .connect()
            .err()
            .unwrap();
        assert!(err.message.contains("keel run /nonexistent"), "{err}");
    }

    #[test]
    fn apply_reports_for_people() {
        let mut report = ApplyReport {
            dry_run: false,
            added: vec!["d".into()],
            removed: vec!["c".into()],
            restarted: vec!["b".into()],
            updated: vec![],
            unchanged: vec!["a".into()],
            settings: vec!["host.stop_timeout".into()],
            ..ApplyReport::default()
        };
        assert_eq!(
            apply_summary(&report),
            "\
CONTAINER  CHANGE
a          unchanged
b          restarted (changed)
c          removed
d          added
host.stop_timeout: changed
applied: 1 added, 1 removed, 1 restarted, 0 updated in place, 1 unchanged
"
        );
        report.dry_run = true;
        let dry = apply_summary(&report);
        assert!(dry.contains("b          would restart (changed)"), "{dry}");
        assert!(dry.ends_with("dry run, nothing changed: 1 added, 1 removed, 1 restarted, 0 updated in place, 1 unchanged\n"), "{dry}");
    }

    #[test]
    fn apply_validates_the_file_before_sending_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.toml");
        std::fs::write(&path, "[host]\nhostname = \"h\"\nbogus = 1\n").unwrap();
        let Err(Failure::Usage(message)) = read_host_file(&path) else {
            panic!("accepted an invalid file");
        };
        assert!(
            message.contains("host.toml:3:1") && message.contains("bogus"),
            "{message}"
        );
        std::fs::write(&path, "[host]\nhostname = \"h\"\n").unwrap();
        assert!(read_host_file(&path).is_ok());
        let big = format!(
            "[host]\nhostname = \"h\"\n#{}\n",
            "x".repeat(MAX_REQUEST_LINE)
        );
        std::fs::write(&path, big).unwrap();
        let Err(Failure::Usage(message)) = read_host_file(&path) else {
            panic!("accepted a file too large to send");
        };
        assert!(message.contains("too large"), "{message}");
        // Nothing is sent (no host is reached) when the file is invalid.
        let missing = dir.path().join("none.toml");
        let code = run(
            &Target::new(None, Some(dir.path().join("no.sock"))),
            Action::Apply {
                host_file: missing,
                dry_run: false,
            },
        );
        assert_eq!(code, ExitCode::from(exit::USAGE));
    }

    #[test]
    fn log_lines_for_people() {
        let entry = LogEntry {
            ts_ms: 1_795_797_000_123,
            stream: Stream::Keel,
            line: "3 lines dropped".into(),
        };
        assert_eq!(log_text(&entry, false), "keel: 3 lines dropped\n");
        assert_eq!(
            log_text(&entry, true),
            "2026-11-27T16:30:00.123Z keel: 3 lines dropped\n"
        );
    }
}
