//! `logs`: the entries keel_supervisor::logs reads back (rotations included, `since` and `tail`),
//! then following the current one.

use super::*;
use keel_supervisor::logs::{LineSink, LogSet, ReadFailure};

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
            Err(ReadFailure::Sink(Gone)) => return Err(Gone),
            Err(ReadFailure::Read(e)) => {
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
                        Err(ReadFailure::Sink(Gone)) => return Err(Gone),
                        Err(ReadFailure::Read(e)) => {
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

    async fn take_line(&mut self, raw: &[u8]) -> Result<(), Gone> {
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

impl LineSink for Sink<'_> {
    type Error = Gone;

    fn line(&mut self, raw: &[u8]) -> impl Future<Output = Result<(), Gone>> + Send {
        self.take_line(raw)
    }
}
