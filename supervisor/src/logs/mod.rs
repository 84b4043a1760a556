//! A container's output: timestamped lines in its log file (rotated by size) and, optionally,
//! echoed on the console with the container's name in front.
//!
//! Use: one [`ContainerLog`] per container, opened at its first start and kept across
//! restarts (its size accounting assumes it is the only writer of the file, and an old
//! instance's pumps may still be draining when the next one starts). The container gets two
//! pipes, one for stdout and one for stderr, each copied by a [`pump`] task:
//!
//! ```ignore
//! let echo = if container.console { console.clone() } else { None };
//! let log = ContainerLog::open(name, Path::new("/var/log/keel"), container.logs, echo);
//! tokio::spawn(pump(log.clone(), Stream::Stdout, stdout_read));
//! tokio::spawn(pump(log.clone(), Stream::Stderr, stderr_read));
//! // later, from the supervisor:
//! log.note("exited with code 1 after 5 ms");
//! ```
//!
//! The file `<dir>/<name>.log` holds one record per line, in the format of [`format_line`]:
//! `2026-11-27T16:30:00.123Z stdout hello`. When a record would take the file past
//! `max_size`, it becomes `<name>.log.1` (older ones shift up to `<name>.log.<max_files>`,
//! the oldest is dropped) and a new file starts; with `max_files = 0` the file is emptied.
//!
//! Nothing here waits for a container's reader: a line that cannot be written (disk full,
//! I/O error, a console too busy) is dropped and counted ([`ContainerLog::dropped`]), and
//! the file gets a `keel` record saying how many were lost once writing works again.

mod reader;

pub use reader::{LineSink, Live, LogSet, ReadFailure};

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use keel_config::LogConfig;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// The console for container echo. Lines are queued and written by a task of their own as
/// fast as the serial line takes them, so a slow console never stalls PID 1 or a container;
/// past [`CONSOLE_QUEUE`] bytes of backlog whole lines are dropped and counted.
#[derive(Debug)]
pub struct Console {
    fd: AsyncFd<OwnedFd>,
    queue: Mutex<Backlog>,
    wake: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct Backlog {
    bytes: VecDeque<u8>,
    dropped_lines: u64,
}

/// How much echo may wait for the console before lines are dropped.
pub const CONSOLE_QUEUE: usize = 256 * 1024;

impl Console {
    /// Opens the console and starts its writer task (call inside the runtime).
    pub fn open(path: &Path) -> io::Result<Arc<Console>> {
        use rustix::fs::{Mode, OFlags};
        let fd = rustix::fs::open(
            path,
            OFlags::WRONLY | OFlags::NOCTTY | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        // SAFETY: the fd stays open, owned by the AsyncFd, for as long as it is registered.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::WRITABLE) }
            .map_err(io::Error::from)?;
        let console = Arc::new(Console {
            fd,
            queue: Mutex::new(Backlog::default()),
            wake: tokio::sync::Notify::new(),
        });
        tokio::spawn(write_out(console.clone()));
        Ok(console)
    }

    /// Takes everything not yet written out of the queue: for a last direct write when the
    /// writer task will not run again (PID 1 powering off or giving up).
    pub fn take_pending(&self) -> Vec<u8> {
        match self.queue.lock() {
            Ok(mut queue) => queue.bytes.drain(..).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Queues one whole line (with its newline); false if it was dropped.
    pub fn line(&self, bytes: &[u8]) -> bool {
        let Ok(mut queue) = self.queue.lock() else {
            return false;
        };
        if queue.bytes.len() + bytes.len() > CONSOLE_QUEUE {
            queue.dropped_lines += 1;
            return false;
        }
        queue.bytes.extend(bytes);
        drop(queue);
        self.wake.notify_one();
        true
    }
}

/// Writes the backlog out, whole lines per write where it can, waiting for the console
/// to take more when it is full.
async fn write_out(console: Arc<Console>) {
    let mut chunk = Vec::with_capacity(4096);
    loop {
        chunk.clear();
        let dropped = {
            let Ok(mut queue) = console.queue.lock() else {
                return;
            };
            let take = queue.bytes.len().min(4096);
            let (a, b) = queue.bytes.as_slices();
            chunk.extend(a.iter().chain(b.iter()).take(take));
            std::mem::take(&mut queue.dropped_lines)
        };
        if dropped > 0 {
            let note = format!(
                "keel: warning: {dropped} lines were not echoed to a busy console (container output is in /var/log/keel, PID 1's in dmesg)\n"
            );
            if let Ok(mut queue) = console.queue.lock() {
                queue.bytes.extend(note.as_bytes());
            }
            continue;
        }
        if chunk.is_empty() {
            console.wake.notified().await;
            continue;
        }
        // Prefer ending a write at a line boundary, so that whatever else writes to the
        // console (the kernel) falls between lines.
        let end = chunk
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(chunk.len(), |nl| nl + 1);
        let Ok(mut guard) = console.fd.writable().await else {
            return;
        };
        match guard
            .try_io(|fd| rustix::io::write(fd.get_ref(), &chunk[..end]).map_err(io::Error::from))
        {
            Ok(Ok(n)) => {
                if let Ok(mut queue) = console.queue.lock() {
                    let written = n.min(queue.bytes.len());
                    queue.bytes.drain(..written);
                }
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            // The console is gone: nothing more will be echoed.
            Ok(Err(_)) => return,
            Err(_would_block) => {}
        }
    }
}

/// Splits a byte stream into lines, holding back an unfinished last line (up to a bound,
/// so a stream without newlines cannot grow memory without limit).
#[derive(Debug, Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
}

/// Longer lines are cut into pieces of this size.
pub const MAX_LINE: usize = 16 * 1024;

impl LineSplitter {
    pub fn push(&mut self, chunk: &[u8], mut emit: impl FnMut(&[u8])) {
        self.pending.extend_from_slice(chunk);
        let mut start = 0;
        while let Some(nl) = self.pending[start..].iter().position(|b| *b == b'\n') {
            emit(&self.pending[start..start + nl]);
            start += nl + 1;
        }
        self.pending.drain(..start);
        while self.pending.len() >= MAX_LINE {
            let rest = self.pending.split_off(MAX_LINE);
            emit(&self.pending);
            self.pending = rest;
        }
    }

    pub fn finish(&mut self, mut emit: impl FnMut(&[u8])) {
        if !self.pending.is_empty() {
            emit(&self.pending);
            self.pending.clear();
        }
    }
}

/// Where a log line came from: the record format and the timestamps are the control
/// API's ([`keel_api`]), so the writer here and the reader there cannot drift apart.
pub use keel_api::Stream;

/// Length of a timestamp as written: `2026-11-27T16:30:00.123Z`.
const TIMESTAMP_LEN: usize = 24;
/// The last instant a four-digit year can write (9999-12-31T23:59:59.999Z).
const MAX_MS: u64 = 253_402_300_799_999;

/// Milliseconds since the epoch; an instant before it (a clock not yet set cannot go that
/// far back, but a bad RTC might) counts as the epoch.
fn unix_ms(ts: SystemTime) -> u64 {
    ts.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn push_timestamp(out: &mut Vec<u8>, ms: u64) {
    out.extend_from_slice(keel_api::format_rfc3339_ms(ms.min(MAX_MS)).as_bytes());
}

/// Appends one record; a newline inside `line` becomes a space, so a record is always one
/// line of the file.
fn push_record(out: &mut Vec<u8>, ts: SystemTime, stream: Stream, line: &[u8]) {
    push_timestamp(out, unix_ms(ts));
    out.push(b' ');
    out.extend_from_slice(stream.as_str().as_bytes());
    out.push(b' ');
    push_one_line(out, line);
}

fn push_one_line(out: &mut Vec<u8>, line: &[u8]) {
    out.extend(line.iter().map(|b| if *b == b'\n' { b' ' } else { *b }));
    out.push(b'\n');
}

/// The on-disk line format, shared with the API's reader:
/// `<RFC 3339 UTC with ms> <stdout|stderr|keel> <line>\n`, for example
/// `2026-11-27T16:30:00.123Z stdout hello\n`. The line's bytes are kept as they are (they
/// need not be UTF-8), except that a newline in them becomes a space.
pub fn format_line(ts: SystemTime, stream: Stream, line: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(TIMESTAMP_LEN + 8 + line.len() + 1);
    push_record(&mut out, ts, stream, line);
    out
}

/// Reads back a record written by [`format_line`] (with or without its newline):
/// milliseconds since the epoch, the stream, and the line. None for anything else, such as
/// a record cut short by a full disk.
pub fn parse_line(text: &str) -> Option<(u64, Stream, String)> {
    let entry = keel_api::parse_log_line(text.strip_suffix('\n').unwrap_or(text))?;
    Some((entry.ts_ms, entry.stream, entry.line))
}

/// How long to leave the disk alone after the log file could not be opened or rotated, so
/// that a flood against a broken directory costs no system call per line.
const PAUSE_AFTER_FAILURE: Duration = Duration::from_secs(1);
/// At most one warning in PID 1's own log per container in this time.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// One container's log: the file with rotation, the console echo, drop counters. Shared by
/// its two pumps (and by the supervisor, for [`ContainerLog::note`]).
#[derive(Debug)]
pub struct ContainerLog {
    name: String,
    /// `[name] `, in front of every echoed line.
    echo_prefix: Vec<u8>,
    console: Option<Arc<Console>>,
    file: Mutex<LogFile>,
    dropped: AtomicU64,
}

/// The current file and what is known about it without asking the kernel.
#[derive(Debug)]
struct LogFile {
    name: String,
    path: PathBuf,
    max_size: u64,
    max_files: u32,
    /// Opened with O_APPEND, so writes land at the end even after a truncation.
    file: Option<File>,
    /// Bytes in `file`, counted as they are written.
    size: u64,
    /// Lines are dropped without trying the disk until then.
    paused_until: Option<Instant>,
    /// Lines lost from the file since the last `keel` record about them.
    unreported: u64,
    last_error: String,
    warned_at: Option<Instant>,
    /// Reused for every record.
    buf: Vec<u8>,
}

impl ContainerLog {
    /// Opens (or creates) `<dir>/<name>.log`, appending to what an earlier run left. Never
    /// fails: if the file cannot be opened, lines are dropped (and counted) until it can be,
    /// which is tried again at most once a second.
    pub fn open(
        name: &str,
        dir: &Path,
        config: LogConfig,
        console: Option<Arc<Console>>,
    ) -> Arc<ContainerLog> {
        Self::at(name, dir.join(format!("{name}.log")), config, console)
    }

    fn at(
        name: &str,
        path: PathBuf,
        config: LogConfig,
        console: Option<Arc<Console>>,
    ) -> Arc<ContainerLog> {
        let mut file = LogFile {
            name: name.to_string(),
            path,
            max_size: config.max_size,
            max_files: config.max_files,
            file: None,
            size: 0,
            paused_until: None,
            unreported: 0,
            last_error: String::new(),
            warned_at: None,
            buf: Vec::with_capacity(MAX_LINE + 64),
        };
        file.reopen();
        Arc::new(ContainerLog {
            name: name.to_string(),
            echo_prefix: format!("[{name}] ").into_bytes(),
            console,
            file: Mutex::new(file),
            dropped: AtomicU64::new(0),
        })
    }

    /// Timestamps `line` (wall clock, UTC) and appends it to the file, rotating first if
    /// it would not fit; echoes it on the console if this container has echo. Never waits:
    /// a line that cannot be written or echoed is counted in [`ContainerLog::dropped`].
    pub fn write_line(&self, stream: Stream, line: &[u8]) {
        let mut lost = !self.lock().append(SystemTime::now(), stream, line);
        if let Some(console) = &self.console {
            let mut out = Vec::with_capacity(self.echo_prefix.len() + line.len() + 1);
            out.extend_from_slice(&self.echo_prefix);
            push_one_line(&mut out, line);
            lost |= !console.line(&out);
        }
        if lost {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Lines lost to write errors or a full console (a line lost to both counts once).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// A line from Keel itself about this container (stream `keel`), such as "exited with
    /// code 1". Only written to the file: PID 1's own log already reaches the console.
    pub fn note(&self, text: &str) {
        if !self
            .lock()
            .append(SystemTime::now(), Stream::Keel, text.as_bytes())
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn lock(&self) -> MutexGuard<'_, LogFile> {
        // A panic while writing leaves nothing half-updated that matters more than the log.
        self.file.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl LogFile {
    /// Writes one line as one record or, when a record of it would not fit in `max_size`,
    /// as several; false if any of it was lost.
    fn append(&mut self, ts: SystemTime, stream: Stream, line: &[u8]) -> bool {
        if let Some(until) = self.paused_until {
            if Instant::now() < until {
                return self.lost();
            }
            self.paused_until = None;
        }
        if self.file.is_none() && !self.reopen() {
            return self.lost();
        }
        if self.unreported > 0 {
            let note = format!("{} lines were lost: {}", self.unreported, self.last_error);
            if self.record(ts, Stream::Keel, note.as_bytes()) {
                self.unreported = 0;
            }
        }
        let header = (TIMESTAMP_LEN + 1 + stream.as_str().len() + 1 + 1) as u64;
        let room = usize::try_from(self.max_size.saturating_sub(header))
            .unwrap_or(usize::MAX)
            .max(1);
        let mut pieces = line.chunks(room);
        let first = pieces.next().unwrap_or_default();
        // After one failure the rest would most likely fail the same way.
        let written = self.record(ts, stream, first) && pieces.all(|p| self.record(ts, stream, p));
        written || self.lost()
    }

    /// Formats and writes one record, rotating first if needed; one write attempt only.
    fn record(&mut self, ts: SystemTime, stream: Stream, payload: &[u8]) -> bool {
        self.buf.clear();
        push_record(&mut self.buf, ts, stream, payload);
        let len = self.buf.len() as u64;
        if self.size > 0 && self.size.saturating_add(len) > self.max_size && !self.rotate() {
            return false;
        }
        let Some(file) = self.file.as_mut() else {
            return false;
        };
        match file.write(&self.buf) {
            Ok(n) if n == self.buf.len() => {
                self.size += len;
                true
            }
            Ok(n) => {
                self.size += n as u64;
                // End the torn record, so that the next one starts a line of its own.
                if n > 0 && matches!(file.write(b"\n"), Ok(1)) {
                    self.size += 1;
                }
                self.failed(&io::Error::from(io::ErrorKind::StorageFull));
                false
            }
            Err(e) => {
                self.failed(&e);
                false
            }
        }
    }

    /// Makes room: shifts the numbered files up and starts a new file. False (and the
    /// disk left alone for a while) if the file could not be kept within `max_size`.
    fn rotate(&mut self) -> bool {
        if self.max_files > 0 {
            for k in (1..self.max_files).rev() {
                // Until there have been that many rotations some of these do not exist.
                let _ = std::fs::rename(self.numbered(k), self.numbered(k + 1));
            }
            match std::fs::rename(&self.path, self.numbered(1)) {
                Ok(()) => {
                    self.file = None;
                    return self.reopen();
                }
                // Someone removed the file under us: start a new one.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.file = None;
                    return self.reopen();
                }
                // Losing the current file's content beats growing past the limit.
                Err(e) => self.failed(&e),
            }
        }
        let Some(file) = self.file.as_ref() else {
            return false;
        };
        match file.set_len(0) {
            Ok(()) => {
                self.size = 0;
                true
            }
            Err(e) => {
                self.pause(&e);
                false
            }
        }
    }

    fn numbered(&self, k: u32) -> PathBuf {
        let mut path = self.path.clone().into_os_string();
        path.push(format!(".{k}"));
        path.into()
    }

    /// Opens the file for appending; on failure the disk is left alone for a while.
    fn reopen(&mut self) -> bool {
        let opened = OpenOptions::new()
            .create(true)
            .append(true)
            // Output may hold secrets; a symlink planted in the log directory must not
            // redirect it.
            .mode(0o640)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&self.path);
        match opened {
            Ok(file) => {
                // The one stat per file: the size is counted from here on.
                self.size = file.metadata().map_or(0, |m| m.len());
                self.file = Some(file);
                true
            }
            Err(e) => {
                self.pause(&e);
                false
            }
        }
    }

    fn pause(&mut self, e: &io::Error) {
        self.file = None;
        self.paused_until = Some(Instant::now() + PAUSE_AFTER_FAILURE);
        self.failed(e);
    }

    fn failed(&mut self, e: &io::Error) {
        self.last_error = e.to_string();
        let quiet = self.warned_at.is_some_and(|t| t.elapsed() < WARN_EVERY);
        if !quiet {
            self.warned_at = Some(Instant::now());
            log::warn!(
                "{}: cannot write {}: {e}; its lines are dropped until it can",
                self.name,
                self.path.display()
            );
        }
    }

    fn lost(&mut self) -> bool {
        self.unreported += 1;
        false
    }
}

/// Copies one pipe (a container's stdout or its stderr) into the log, line by line, until
/// EOF. A last line without a newline is written too.
pub async fn pump(log: Arc<ContainerLog>, stream: Stream, pipe: OwnedFd) {
    let name = log.name.clone();
    if let Err(e) = rustix::io::ioctl_fionbio(&pipe, true) {
        log::warn!("{name}: cannot make the {stream} pipe non-blocking: {e}");
        return;
    }
    // SAFETY: the fd stays open (owned by `pipe` inside AsyncFd) for as long as it is registered.
    let pipe = match unsafe { AsyncFd::register_with_interest(pipe, Interest::READABLE) } {
        Ok(p) => p,
        Err(e) => {
            log::warn!("{name}: cannot watch the {stream} pipe: {e}");
            return;
        }
    };
    let mut lines = LineSplitter::default();
    let mut emit = |line: &[u8]| log.write_line(stream, line);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let mut guard = match pipe.readable().await {
            Ok(g) => g,
            Err(e) => {
                log::warn!("{name}: {stream} pipe: {e}");
                break;
            }
        };
        match guard
            .try_io(|fd| rustix::io::read(fd.get_ref().as_fd(), &mut buf).map_err(io::Error::from))
        {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => lines.push(&buf[..n], &mut emit),
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => {
                log::warn!(
                    "{name}: reading {stream} (fd {}): {e}",
                    pipe.get_ref().as_raw_fd()
                );
                break;
            }
            Err(_would_block) => {}
        }
    }
    lines.finish(&mut emit);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<String> {
        let mut out = Vec::new();
        let mut s = LineSplitter::default();
        for c in chunks {
            s.push(c, |l| out.push(String::from_utf8_lossy(l).into_owned()));
        }
        s.finish(|l| out.push(String::from_utf8_lossy(l).into_owned()));
        out
    }

    #[test]
    fn lines_are_reassembled_across_chunks() {
        assert_eq!(split(&[b"a\nb", b"c\n", b"\nd"]), ["a", "bc", "", "d"]);
    }

    #[test]
    fn a_line_without_end_is_cut_at_the_bound() {
        let big = vec![b'x'; MAX_LINE * 2 + 5];
        let out = split(&[&big]);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].len(), MAX_LINE);
        assert_eq!(out[2].len(), 5);
    }

    #[test]
    fn records_round_trip() {
        let ts = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_797_000_123);
        let line = format_line(ts, Stream::Stdout, b"hello  world ");
        assert_eq!(line, b"2026-11-27T16:30:00.123Z stdout hello  world \n");
        let parsed = parse_line(std::str::from_utf8(&line).unwrap());
        assert_eq!(
            parsed,
            Some((1_795_797_000_123, Stream::Stdout, "hello  world ".into()))
        );
        for stream in [Stream::Stdout, Stream::Stderr, Stream::Keel] {
            let line = format_line(ts, stream, b"");
            let text = String::from_utf8(line).unwrap();
            assert_eq!(
                parse_line(&text),
                Some((1_795_797_000_123, stream, String::new()))
            );
        }
        // A record is always one line of the file.
        assert_eq!(
            format_line(ts, Stream::Keel, b"a\nb"),
            b"2026-11-27T16:30:00.123Z keel a b\n"
        );
        assert_eq!(
            parse_line("2026-11-27T16:30:00.123Z stderr"),
            Some((1_795_797_000_123, Stream::Stderr, String::new()))
        );
        for bad in [
            "",
            "hello",
            "2026-11-27T16:30:00.123Z",
            "2026-11-27T16:30:00.123Z stdin x",
            "2026-11-27T16:30:00.1",
        ] {
            assert_eq!(parse_line(bad), None, "{bad}");
        }
    }

    fn config(max_size: u64, max_files: u32) -> LogConfig {
        LogConfig {
            max_size,
            max_files,
        }
    }

    /// Every record of a file, checked to parse.
    fn records(path: &Path) -> Vec<(Stream, String)> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| {
                let (_, stream, text) = parse_line(l).unwrap_or_else(|| panic!("bad record {l:?}"));
                (stream, text)
            })
            .collect()
    }

    fn file_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_flood_rotates_within_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let log = ContainerLog::open("web", dir.path(), config(4096, 2), None);
        for i in 0..10_000 {
            log.write_line(Stream::Stdout, format!("line {i}").as_bytes());
        }
        assert_eq!(log.dropped(), 0);
        assert_eq!(
            file_names(dir.path()),
            ["web.log", "web.log.1", "web.log.2"]
        );
        let mut all = Vec::new();
        for name in ["web.log.2", "web.log.1", "web.log"] {
            let path = dir.path().join(name);
            let size = std::fs::metadata(&path).unwrap().len();
            assert!(size <= 4096, "{name} has {size} bytes");
            // Rotation happens only when the next record would not fit.
            assert!(
                size > 4096 - 64 || name == "web.log",
                "{name} has {size} bytes"
            );
            all.extend(records(&path));
        }
        assert_eq!(
            log.lock().size,
            std::fs::metadata(dir.path().join("web.log")).unwrap().len()
        );
        // Oldest retained first, newest last, nothing missing in between.
        let numbers: Vec<u32> = all
            .iter()
            .map(|(stream, text)| {
                assert_eq!(*stream, Stream::Stdout);
                text.strip_prefix("line ").unwrap().parse().unwrap()
            })
            .collect();
        assert_eq!(*numbers.last().unwrap(), 9_999);
        assert!(numbers.len() > 100);
        assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1));
    }

    #[test]
    fn without_rotated_files_the_log_is_emptied() {
        let dir = tempfile::tempdir().unwrap();
        let log = ContainerLog::open("web", dir.path(), config(4096, 0), None);
        for i in 0..1000 {
            log.write_line(Stream::Stderr, format!("line {i}").as_bytes());
        }
        assert_eq!(file_names(dir.path()), ["web.log"]);
        let records = records(&dir.path().join("web.log"));
        assert_eq!(
            records.last().unwrap(),
            &(Stream::Stderr, "line 999".to_string())
        );
        assert!(std::fs::metadata(dir.path().join("web.log")).unwrap().len() <= 4096);
    }

    #[test]
    fn a_line_longer_than_the_file_is_split_into_records() {
        let dir = tempfile::tempdir().unwrap();
        let log = ContainerLog::open("web", dir.path(), config(4096, 5), None);
        log.write_line(Stream::Stdout, &vec![b'x'; MAX_LINE]);
        let mut text = String::new();
        for name in [
            "web.log.4",
            "web.log.3",
            "web.log.2",
            "web.log.1",
            "web.log",
        ] {
            let path = dir.path().join(name);
            assert!(std::fs::metadata(&path).unwrap().len() <= 4096);
            for (stream, t) in records(&path) {
                assert_eq!(stream, Stream::Stdout);
                text.push_str(&t);
            }
        }
        assert_eq!(text, "x".repeat(MAX_LINE));
    }

    #[test]
    fn an_existing_log_is_appended_to_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web.log");
        std::fs::write(&path, vec![b'.'; 4000]).unwrap();
        let log = ContainerLog::open("web", dir.path(), config(4096, 1), None);
        log.write_line(Stream::Stdout, &[b'y'; 100]);
        assert_eq!(
            std::fs::metadata(dir.path().join("web.log.1"))
                .unwrap()
                .len(),
            4000
        );
        assert_eq!(records(&path), [(Stream::Stdout, "y".repeat(100))]);
    }

    #[test]
    fn an_unopenable_file_drops_and_counts_lines() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("web.log")).unwrap();
        let log = ContainerLog::open("web", dir.path(), config(4096, 2), None);
        for i in 0..100 {
            log.write_line(Stream::Stdout, format!("line {i}").as_bytes());
        }
        log.note("exited with code 1");
        assert_eq!(log.dropped(), 101);
        assert_eq!(file_names(dir.path()), ["web.log"]);

        // Once the file can be written again, it says what was lost.
        std::fs::remove_dir(dir.path().join("web.log")).unwrap();
        log.lock().paused_until = None;
        log.write_line(Stream::Stdout, b"back");
        assert_eq!(log.dropped(), 101);
        let records = records(&dir.path().join("web.log"));
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].0, Stream::Keel);
        assert!(
            records[0].1.starts_with("101 lines were lost: "),
            "{}",
            records[0].1
        );
        assert_eq!(records[1], (Stream::Stdout, "back".to_string()));
    }

    #[test]
    fn a_full_disk_drops_and_counts_lines() {
        // Every write to /dev/full fails with ENOSPC.
        let log = ContainerLog::at("full", PathBuf::from("/dev/full"), config(4096, 2), None);
        assert!(log.lock().file.is_some());
        for i in 0..1000 {
            log.write_line(Stream::Stdout, format!("line {i}").as_bytes());
        }
        log.note("exited with code 1");
        assert_eq!(log.dropped(), 1001);
        let file = log.lock();
        assert_eq!(file.unreported, 1001);
        assert_eq!(file.size, 0);
        assert!(file.file.is_some());
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap()
    }

    #[test]
    fn pumps_copy_both_pipes_until_eof() {
        let dir = tempfile::tempdir().unwrap();
        let log = ContainerLog::open("web", dir.path(), config(1 << 20, 2), None);
        let (out_read, out_write) = rustix::pipe::pipe().unwrap();
        let (err_read, err_write) = rustix::pipe::pipe().unwrap();
        runtime().block_on(async {
            let out = tokio::spawn(pump(log.clone(), Stream::Stdout, out_read));
            let err = tokio::spawn(pump(log.clone(), Stream::Stderr, err_read));
            rustix::io::write(&out_write, b"one\ntw").unwrap();
            tokio::task::yield_now().await;
            rustix::io::write(&out_write, b"o\n\nno newline at the end").unwrap();
            drop(out_write);
            out.await.unwrap();
            rustix::io::write(&err_write, b"oops\n").unwrap();
            drop(err_write);
            err.await.unwrap();
        });
        log.note("exited with code 1");
        let s = |stream, text: &str| (stream, text.to_string());
        assert_eq!(
            records(&dir.path().join("web.log")),
            [
                s(Stream::Stdout, "one"),
                s(Stream::Stdout, "two"),
                s(Stream::Stdout, ""),
                s(Stream::Stdout, "no newline at the end"),
                s(Stream::Stderr, "oops"),
                s(Stream::Keel, "exited with code 1"),
            ]
        );
        assert_eq!(log.dropped(), 0);
    }

    #[test]
    fn lines_are_echoed_with_the_name_and_without_timestamp() {
        let dir = tempfile::tempdir().unwrap();
        let (read, write) = rustix::pipe::pipe().unwrap();
        runtime().block_on(async {
            let path = format!("/proc/self/fd/{}", write.as_raw_fd());
            let console = Console::open(Path::new(&path)).unwrap();
            drop(write);
            let log = ContainerLog::open("web", dir.path(), config(1 << 20, 2), Some(console));
            log.write_line(Stream::Stdout, b"hello");
            log.write_line(Stream::Stderr, b"oops");
            log.note("not echoed");
            rustix::io::ioctl_fionbio(&read, true).unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 256];
            for _ in 0..1000 {
                if got.len() >= 23 {
                    break;
                }
                tokio::task::yield_now().await;
                if let Ok(n) = rustix::io::read(&read, &mut buf) {
                    got.extend_from_slice(&buf[..n]);
                }
            }
            assert_eq!(got, b"[web] hello\n[web] oops\n");
            assert_eq!(log.dropped(), 0);
        });
    }
}
