//! `logs`: replaying a container's log files (rotations included) with `since` and `tail`,
//! then following the current one.

use super::*;

impl<'a> Session<'a> {
    pub(super) async fn logs(&mut self, id: Option<u64>, query: LogsQuery) -> Result<(), Gone> {
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

/// Why streaming logs stopped.
pub(super) enum Failure {
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
pub(super) struct Sink<'a> {
    pub(super) conn: &'a Conn,
    pub(super) id: Option<u64>,
    pub(super) since_ms: Option<u64>,
    pub(super) out: String,
}

impl<'a> Sink<'a> {
    pub(super) fn new(conn: &'a Conn, id: Option<u64>, since_ms: Option<u64>) -> Sink<'a> {
        Sink {
            conn,
            id,
            since_ms,
            out: String::new(),
        }
    }

    pub(super) async fn line(&mut self, raw: &[u8]) -> Result<(), Gone> {
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

    pub(super) async fn flush(&mut self) -> Result<(), Gone> {
        if !self.out.is_empty() {
            self.conn.write_all(self.out.as_bytes()).await?;
            self.out.clear();
        }
        Ok(())
    }
}

/// A container's log files, opened together so that a rotation while they are read moves
/// nothing under us: oldest first, the live `NAME.log` (if it exists) last.
pub(super) struct LogSet {
    pub(super) files: Vec<File>,
    /// Whether the last file is the live one, whose last line may still be incomplete.
    pub(super) live: bool,
}

pub(super) fn file_key(file: &File) -> io::Result<(u64, u64)> {
    let m = file.metadata()?;
    Ok((m.dev(), m.ino()))
}

pub(super) fn open_existing(path: &Path) -> io::Result<Option<File>> {
    match File::open(path) {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

impl LogSet {
    /// `None` if the container has no log file at all.
    pub(super) fn open(dir: &Path, name: &str) -> io::Result<Option<LogSet>> {
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
    pub(super) async fn start(
        &self,
        since_ms: Option<u64>,
        tail: Option<u64>,
    ) -> io::Result<(usize, u64)> {
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
    pub(super) async fn replay(
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
pub(super) struct Live {
    pub(super) file: Option<File>,
    /// Device and inode of `file`, to notice the path being rotated away.
    pub(super) key: Option<(u64, u64)>,
    /// Read up to here (`partial` included).
    pub(super) pos: u64,
    /// The start of a line whose newline has not been written yet.
    pub(super) partial: Vec<u8>,
}

impl Live {
    pub(super) async fn poll(&mut self, path: &Path, sink: &mut Sink<'_>) -> Result<(), Failure> {
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
pub(super) async fn read_forward(
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
pub(super) struct RevLines {
    /// `buf` holds the bytes from here to the end of the next line to return.
    pub(super) pos: u64,
    pub(super) buf: Vec<u8>,
    pub(super) done: bool,
}

impl RevLines {
    pub(super) fn new(len: u64) -> RevLines {
        RevLines {
            pos: len,
            buf: Vec::new(),
            done: false,
        }
    }

    pub(super) fn next(&mut self, file: &File) -> io::Result<Option<(u64, Vec<u8>)>> {
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
