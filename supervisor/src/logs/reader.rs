//! Reading a container's log files back (the API's `logs`): the live file and its rotations
//! opened together so a rotation while they are read moves nothing, the entries selected by
//! `since` and `tail` found by reading backwards, then the live file followed through
//! rotations and truncations. The writer ([`super::ContainerLog`]) and this reader are the
//! two halves of the one owner of the log files' format.

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use keel_api::parse_log_line;

/// Log files are read in pieces of this size, with a yield to the runtime after each.
const READ_CHUNK: usize = 64 * 1024;
/// A log line without a newline after this many bytes is passed on there.
const MAX_LOG_LINE: usize = 1 << 20;
/// Rotated log files are looked for up to this number.
const MAX_ROTATED: u32 = 1000;

/// Where the lines read go (the API's connection).
pub trait LineSink {
    /// Why the sink stopped taking lines (its client went away).
    type Error;
    /// Takes one line, without its newline.
    fn line(&mut self, raw: &[u8]) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// Why reading stopped.
#[derive(Debug)]
pub enum ReadFailure<E> {
    /// The sink refused a line.
    Sink(E),
    /// Reading a log file failed.
    Read(io::Error),
}

/// A container's log files, opened together so that a rotation while they are read moves
/// nothing under us: oldest first, the live `NAME.log` (if it exists) last.
pub struct LogSet {
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
    pub fn open(dir: &Path, name: &str) -> io::Result<Option<LogSet>> {
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
                if since_yield >= READ_CHUNK {
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
    pub async fn replay<S: LineSink>(
        self,
        since_ms: Option<u64>,
        tail: Option<u64>,
        sink: &mut S,
    ) -> Result<Live, ReadFailure<S::Error>> {
        let (first, offset) = self
            .start(since_ms, tail)
            .await
            .map_err(ReadFailure::Read)?;
        let last = self.files.len().saturating_sub(1);
        let live = self.live;
        let mut follow = Live::default();
        for (index, file) in self.files.into_iter().enumerate().skip(first) {
            let mut partial = Vec::new();
            let from = if index == first { offset } else { 0 };
            let pos = read_forward(&file, from, &mut partial, sink).await?;
            if live && index == last {
                follow = Live {
                    key: Some(file_key(&file).map_err(ReadFailure::Read)?),
                    file: Some(file),
                    pos,
                    partial,
                };
            } else if !partial.is_empty() {
                // A rotated file is complete even if its last line has no newline.
                sink.line(&partial).await.map_err(ReadFailure::Sink)?;
            }
        }
        Ok(follow)
    }
}

/// The live log file of a `logs -f`.
#[derive(Default)]
pub struct Live {
    file: Option<File>,
    /// Device and inode of `file`, to notice the path being rotated away.
    key: Option<(u64, u64)>,
    /// Read up to here (`partial` included).
    pos: u64,
    /// The start of a line whose newline has not been written yet.
    partial: Vec<u8>,
}

impl Live {
    pub async fn poll<S: LineSink>(
        &mut self,
        path: &Path,
        sink: &mut S,
    ) -> Result<(), ReadFailure<S::Error>> {
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
                sink.line(&std::mem::take(&mut self.partial))
                    .await
                    .map_err(ReadFailure::Sink)?;
            }
            *self = Live::default();
            if let Some(file) = open_existing(path).map_err(ReadFailure::Read)? {
                self.key = Some(file_key(&file).map_err(ReadFailure::Read)?);
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
async fn read_forward<S: LineSink>(
    file: &File,
    mut pos: u64,
    partial: &mut Vec<u8>,
    sink: &mut S,
) -> Result<u64, ReadFailure<S::Error>> {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let n = match file.read_at(&mut buf, pos) {
            Ok(0) => return Ok(pos),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ReadFailure::Read(e)),
        };
        pos += n as u64;
        let mut rest = buf.get(..n).unwrap_or_default();
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            let (line, after) = rest.split_at(i);
            if partial.is_empty() {
                sink.line(line).await.map_err(ReadFailure::Sink)?;
            } else {
                partial.extend_from_slice(line);
                sink.line(&std::mem::take(partial))
                    .await
                    .map_err(ReadFailure::Sink)?;
            }
            rest = after.get(1..).unwrap_or_default();
        }
        partial.extend_from_slice(rest);
        if partial.len() > MAX_LOG_LINE {
            sink.line(&std::mem::take(partial))
                .await
                .map_err(ReadFailure::Sink)?;
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
            let n = self.pos.min(READ_CHUNK as u64);
            let mut chunk = vec![0u8; n as usize];
            file.read_exact_at(&mut chunk, self.pos - n)?;
            chunk.extend_from_slice(&self.buf);
            self.buf = chunk;
            self.pos -= n;
        }
    }
}
