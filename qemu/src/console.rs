//! The guest's serial console (and QEMU's stderr), split into lines as bytes arrive, with
//! waiting for a line under a condition variable.

use std::borrow::Cow;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// A byte stream normalised to lines: `\n` ends a line and trailing `\r`s are dropped, so
/// `\r\n` from a serial console and plain `\n` read the same. Bytes are decoded (lossily, as
/// UTF-8) only per complete line, so a multi-byte character split across reads survives.
#[derive(Debug, Default)]
pub(crate) struct LineBuf {
    lines: Vec<String>,
    partial: Vec<u8>,
    closed: bool,
}

impl LineBuf {
    pub(crate) fn push(&mut self, mut bytes: &[u8]) {
        while let Some(nl) = bytes.iter().position(|&b| b == b'\n') {
            self.partial.extend_from_slice(&bytes[..nl]);
            let line = decode(&self.partial).into_owned();
            self.lines.push(line);
            self.partial.clear();
            bytes = &bytes[nl + 1..];
        }
        self.partial.extend_from_slice(bytes);
    }

    /// End of stream: an unterminated last line becomes a line.
    pub(crate) fn close(&mut self) {
        if !self.partial.is_empty() {
            self.push(b"\n");
        }
        self.closed = true;
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed
    }

    /// Complete lines so far.
    pub(crate) fn lines(&self) -> &[String] {
        &self.lines
    }

    /// Index of the first complete line at or after `from` that contains `needle`.
    pub(crate) fn find(&self, from: usize, needle: &str) -> Option<usize> {
        self.lines
            .get(from..)?
            .iter()
            .position(|l| l.contains(needle))
            .map(|i| from + i)
    }

    /// Everything so far, one `\n` after each complete line, then any partial line.
    pub(crate) fn text(&self) -> String {
        let mut text = String::new();
        for line in &self.lines {
            text.push_str(line);
            text.push('\n');
        }
        text.push_str(&decode(&self.partial));
        text
    }

    /// The last `n` lines (counting a partial line), for error messages.
    pub(crate) fn tail(&self, n: usize) -> String {
        let partial = decode(&self.partial);
        let keep = if partial.is_empty() {
            n
        } else {
            n.saturating_sub(1)
        };
        let start = self.lines.len().saturating_sub(keep);
        let mut text = self.lines[start..].join("\n");
        if !partial.is_empty() {
            if start < self.lines.len() {
                text.push('\n');
            }
            text.push_str(&partial);
        }
        if text.is_empty() {
            text.push_str("(no output)");
        }
        text
    }
}

fn decode(bytes: &[u8]) -> Cow<'_, str> {
    let end = bytes.iter().rposition(|&b| b != b'\r').map_or(0, |i| i + 1);
    String::from_utf8_lossy(&bytes[..end])
}

/// How many console lines error messages quote.
pub(crate) const TAIL_LINES: usize = 40;

/// The shared state between the reader threads and the `Vm`.
#[derive(Debug, Default)]
pub(crate) struct ConsoleState {
    /// The guest's serial console (QEMU's stdout).
    pub(crate) out: LineBuf,
    /// QEMU's own stderr.
    pub(crate) err: LineBuf,
    /// Where `wait_for_line` resumes: one past the last line it matched.
    pub(crate) cursor: usize,
    /// When the guest last wrote to its console: the sign of life a boot is watched for.
    pub(crate) last_output: Option<Instant>,
}

impl ConsoleState {
    /// Bytes from the guest's console.
    pub(crate) fn push_out(&mut self, bytes: &[u8]) {
        self.out.push(bytes);
        self.last_output = Some(Instant::now());
    }
}

/// What became of a boot while [`Console::wait_first_output`] watched it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FirstOutput {
    /// The guest wrote to its console.
    Seen,
    /// QEMU closed the console (it exited) before the guest wrote anything.
    Closed,
    /// Nothing within the time allowed.
    Silent,
}

/// Why [`Console::wait_for`] returned without a line.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum WaitError {
    /// The deadline passed; carries the console tail.
    Timeout(String),
    /// The stream closed first; carries the console tail.
    Closed(String),
}

#[derive(Debug, Default)]
pub(crate) struct Console {
    state: Mutex<ConsoleState>,
    changed: Condvar,
}

impl Console {
    pub(crate) fn lock(&self) -> MutexGuard<'_, ConsoleState> {
        // Every mutation is a single call on plain data; a panicking holder cannot leave it
        // half-updated in a way that matters for reading logs.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies `f` to the state and wakes every waiter.
    pub(crate) fn update(&self, f: impl FnOnce(&mut ConsoleState)) {
        f(&mut self.lock());
        self.changed.notify_all();
    }

    /// Waits until `ready` yields a value, or the deadline passes (`None`).
    fn wait_until<T>(
        &self,
        timeout: Duration,
        mut ready: impl FnMut(&mut ConsoleState) -> Option<T>,
    ) -> Result<T, MutexGuard<'_, ConsoleState>> {
        let deadline = Instant::now().checked_add(timeout);
        let mut state = self.lock();
        loop {
            if let Some(value) = ready(&mut state) {
                return Ok(value);
            }
            let remaining = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => Duration::from_secs(3600),
            };
            if remaining.is_zero() {
                return Err(state);
            }
            state = self
                .changed
                .wait_timeout(state, remaining)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Waits for a complete console line containing `needle`. With `from_cursor`, only lines
    /// after the cursor count and a match moves the cursor past it; otherwise the whole log is
    /// searched and the cursor is left alone.
    pub(crate) fn wait_for(
        &self,
        needle: &str,
        from_cursor: bool,
        timeout: Duration,
    ) -> Result<String, WaitError> {
        enum Outcome {
            Found(String),
            Closed(String),
        }
        let waited = self.wait_until(timeout, |state| {
            let from = if from_cursor { state.cursor } else { 0 };
            if let Some(i) = state.out.find(from, needle) {
                if from_cursor {
                    state.cursor = i + 1;
                }
                return Some(Outcome::Found(state.out.lines()[i].clone()));
            }
            state
                .out
                .is_closed()
                .then(|| Outcome::Closed(state.out.tail(TAIL_LINES)))
        });
        match waited {
            Ok(Outcome::Found(line)) => Ok(line),
            Ok(Outcome::Closed(tail)) => Err(WaitError::Closed(tail)),
            Err(state) => Err(WaitError::Timeout(state.out.tail(TAIL_LINES))),
        }
    }

    /// Waits until both QEMU output streams have reached end of file; false on timeout.
    /// Waits up to `timeout` for the guest's first console byte.
    pub(crate) fn wait_first_output(&self, timeout: Duration) -> FirstOutput {
        let waited = self.wait_until(timeout, |state| {
            if state.last_output.is_some() {
                Some(FirstOutput::Seen)
            } else {
                state.out.is_closed().then_some(FirstOutput::Closed)
            }
        });
        waited.unwrap_or(FirstOutput::Silent)
    }

    pub(crate) fn wait_closed(&self, timeout: Duration) -> bool {
        self.wait_until(timeout, |s| {
            (s.out.is_closed() && s.err.is_closed()).then_some(())
        })
        .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread;

    #[test]
    fn splits_and_normalises_lines() {
        let mut buf = LineBuf::default();
        buf.push(b"one\r\ntw");
        buf.push(b"o\r");
        buf.push(b"\nthree\nfour\r\r\n\npar");
        assert_eq!(buf.lines(), ["one", "two", "three", "four", ""]);
        assert_eq!(buf.text(), "one\ntwo\nthree\nfour\n\npar");
        assert_eq!(buf.tail(2), "\npar");
        assert_eq!(buf.tail(3), "four\n\npar");
        assert_eq!(buf.find(0, "par"), None, "partial lines do not match");
        buf.close();
        assert!(buf.is_closed());
        assert_eq!(buf.find(0, "par"), Some(5));
        assert_eq!(buf.tail(1), "par");
        assert_eq!(LineBuf::default().tail(5), "(no output)");
    }

    #[test]
    fn utf8_split_across_reads() {
        let mut buf = LineBuf::default();
        let bytes = "héllo\n".as_bytes();
        buf.push(&bytes[..2]);
        buf.push(&bytes[2..]);
        assert_eq!(buf.lines(), ["héllo"]);
    }

    #[test]
    fn find_from_positions() {
        let mut buf = LineBuf::default();
        buf.push(b"a x\nb\nc x\n");
        assert_eq!(buf.find(0, "x"), Some(0));
        assert_eq!(buf.find(1, "x"), Some(2));
        assert_eq!(buf.find(3, "x"), None);
        assert_eq!(buf.find(99, "x"), None);
    }

    #[test]
    fn cursor_moves_only_for_wait_for_line() {
        let console = Console::default();
        console.update(|s| s.out.push(b"boot: ready\nsvc up\nboot: ready again\n"));
        let t = Duration::from_millis(10);
        assert_eq!(console.wait_for("ready", true, t).unwrap(), "boot: ready");
        assert_eq!(
            console.wait_for("ready", true, t).unwrap(),
            "boot: ready again"
        );
        assert!(matches!(
            console.wait_for("ready", true, t),
            Err(WaitError::Timeout(_))
        ));
        // The whole-log search still finds the first one and leaves the cursor alone.
        assert_eq!(console.wait_for("ready", false, t).unwrap(), "boot: ready");
        assert_eq!(console.wait_for("svc", false, t).unwrap(), "svc up");
        assert!(console.wait_for("svc", true, t).is_err());
        console.update(|s| s.out.push(b"svc down\n"));
        assert_eq!(console.wait_for("svc", true, t).unwrap(), "svc down");
    }

    #[test]
    fn waiter_wakes_on_new_line_and_on_close() {
        let console = Arc::new(Console::default());
        let writer = Arc::clone(&console);
        let handle = thread::spawn(move || {
            thread::sleep(Duration::from_millis(50));
            writer.update(|s| s.out.push(b"hello "));
            writer.update(|s| s.out.push(b"world\r\n"));
            thread::sleep(Duration::from_millis(50));
            writer.update(|s| {
                s.out.push(b"last words");
                s.out.close();
                s.err.close();
            });
        });
        let line = console
            .wait_for("world", true, Duration::from_secs(10))
            .unwrap();
        assert_eq!(line, "hello world");
        match console.wait_for("never", true, Duration::from_secs(10)) {
            Err(WaitError::Closed(tail)) => assert_eq!(tail, "hello world\nlast words"),
            other => panic!("{other:?}"),
        }
        assert!(console.wait_closed(Duration::from_secs(10)));
        handle.join().unwrap();
    }

    #[test]
    fn timeout_carries_tail() {
        let console = Console::default();
        console.update(|s| s.out.push(b"something else\n"));
        let start = Instant::now();
        let err = console
            .wait_for("never", false, Duration::from_millis(100))
            .unwrap_err();
        assert!(start.elapsed() >= Duration::from_millis(100));
        assert_eq!(err, WaitError::Timeout("something else".into()));
    }
}
