//! A container's output: appended to its log file and, optionally, echoed on the console
//! with the container's name in front.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};

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
                "keel: warning: {dropped} container output lines were not echoed to a busy console (see /var/log/keel)\n"
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
        // Prefer ending a write at a line boundary, so PID 1's own log lines (written
        // through another fd) fall between lines.
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

const MAX_LINE: usize = 16 * 1024;

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

/// Copies everything read from `pipe` (the container's stdout and stderr) until EOF.
pub async fn pump(
    name: String,
    pipe: OwnedFd,
    log_path: std::path::PathBuf,
    console: Option<Arc<Console>>,
) {
    if let Err(e) = rustix::io::ioctl_fionbio(&pipe, true) {
        log::warn!("{name}: cannot make the output pipe non-blocking: {e}");
        return;
    }
    // SAFETY: the fd stays open (owned by `pipe` inside AsyncFd) for as long as it is registered.
    let pipe = match unsafe { AsyncFd::register_with_interest(pipe, Interest::READABLE) } {
        Ok(p) => p,
        Err(e) => {
            log::warn!("{name}: cannot watch the output pipe: {e}");
            return;
        }
    };
    let mut file: Option<File> = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| log::warn!("{name}: cannot open {}: {e}", log_path.display()))
        .ok();
    let prefix = format!("[{name}] ");
    let mut lines = LineSplitter::default();
    let mut dropped = 0u64;
    let mut emit = |line: &[u8]| {
        if let Some(f) = file.as_mut() {
            let _ = f.write_all(line).and_then(|_| f.write_all(b"\n"));
        }
        if let Some(console) = &console {
            let mut out = Vec::with_capacity(prefix.len() + line.len() + 1);
            out.extend_from_slice(prefix.as_bytes());
            out.extend_from_slice(line);
            out.push(b'\n');
            if !console.line(&out) {
                dropped += 1;
            }
        }
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let mut guard = match pipe.readable().await {
            Ok(g) => g,
            Err(e) => {
                log::warn!("{name}: output pipe: {e}");
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
                    "{name}: reading output (fd {}): {e}",
                    pipe.get_ref().as_raw_fd()
                );
                break;
            }
            Err(_would_block) => {}
        }
    }
    lines.finish(&mut emit);
    if dropped > 0 {
        log::warn!(
            "{name}: {dropped} output lines were not echoed to a busy console (they are in {})",
            log_path.display()
        );
    }
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
}
