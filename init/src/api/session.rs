//! One client's requests, served one after the other: reading lines, checking requests,
//! and answering them through the main loop.

use keel_supervisor::ExecStdio;

use super::*;

impl<'a> Session<'a> {
    pub(super) fn new(
        conn: &'a Conn,
        input: Vec<u8>,
        calls: &'a mpsc::UnboundedSender<Call>,
        logs_dir: &'a Path,
    ) -> Session<'a> {
        Session {
            conn,
            input,
            discarding: false,
            calls,
            logs_dir,
        }
    }

    pub(super) async fn run(&mut self) {
        loop {
            let line = match self.next_line().await {
                Incoming::Line(line) => line,
                Incoming::TooLong => {
                    let error = ApiError::bad_request(format!(
                        "the request line is longer than {MAX_REQUEST_LINE} bytes"
                    ));
                    if self.send(None, &Response::Error(error)).await.is_err() {
                        return;
                    }
                    continue;
                }
                Incoming::Closed => return,
            };
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let served = match Envelope::decode(&line) {
                Ok(envelope) => self.handle(envelope.id, envelope.request).await,
                Err(Rejection { id, error }) => self.send(id, &Response::Error(error)).await,
            };
            if served.is_err() {
                return;
            }
        }
    }

    pub(super) async fn next_line(&mut self) -> Incoming {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(i) = self.input.iter().position(|&b| b == b'\n') {
                let rest = self.input.split_off(i + 1);
                let mut line = std::mem::replace(&mut self.input, rest);
                line.pop();
                if std::mem::take(&mut self.discarding) {
                    continue;
                }
                return Incoming::Line(line);
            }
            if self.input.len() >= MAX_REQUEST_LINE {
                self.input.clear();
                if !self.discarding {
                    self.discarding = true;
                    return Incoming::TooLong;
                }
            }
            match self.conn.read(&mut buf).await {
                Ok(0) | Err(_) => return Incoming::Closed,
                Ok(n) => self
                    .input
                    .extend_from_slice(buf.get(..n).unwrap_or_default()),
            }
        }
    }

    pub(super) async fn send(&self, id: Option<u64>, response: &Response) -> Result<(), Gone> {
        Ok(self.conn.write_all(response.to_line(id).as_bytes()).await?)
    }

    pub(super) async fn handle(&mut self, id: Option<u64>, request: Request) -> Result<(), Gone> {
        let command = match check(request) {
            Ok(Dispatch::Call(command)) => command,
            Ok(Dispatch::Logs(query)) => return self.logs(id, query).await,
            Ok(Dispatch::Upgrade {
                manifest,
                signature,
                reboot,
            }) => return self.upgrade(id, manifest, signature, reboot).await,
            Err(error) => return self.send(id, &Response::Error(error)).await,
        };
        let is_exec = matches!(command, Command::Exec { .. });
        let response = match self.call(command).await {
            Ok(Reply::Exec(handle)) if is_exec => return self.exec(id, handle).await,
            Ok(reply) if !is_exec => match ok_value(reply) {
                Ok(value) => Response::Ok(value),
                Err(error) => Response::Error(error),
            },
            Ok(_) => Response::Error(ApiError::internal("PID 1 answered exec without a process")),
            Err(error) => Response::Error(error),
        };
        self.send(id, &response).await
    }

    pub(super) async fn call(&self, command: Command) -> Result<Reply, ApiError> {
        let (reply, answer) = oneshot::channel();
        self.calls
            .send(Call { command, reply })
            .map_err(|_| ApiError::internal("PID 1 no longer takes requests (shutting down)"))?;
        answer
            .await
            .map_err(|_| ApiError::internal("PID 1 dropped the request"))?
    }
}

pub(super) enum Incoming {
    Line(Vec<u8>),
    TooLong,
    Closed,
}

/// What a request becomes once checked.
pub(super) enum Dispatch {
    Call(Command),
    Logs(LogsQuery),
    Upgrade {
        manifest: String,
        signature: String,
        reboot: bool,
    },
}

pub(super) struct LogsQuery {
    pub(super) name: String,
    pub(super) follow: bool,
    pub(super) since_ms: Option<u64>,
    pub(super) tail: Option<u64>,
}

/// One client's requests, served one after the other.
pub(super) struct Session<'a> {
    pub(super) conn: &'a Conn,
    /// Received and not consumed yet.
    pub(super) input: Vec<u8>,
    /// Dropping the rest of an over-long request line.
    pub(super) discarding: bool,
    pub(super) calls: &'a mpsc::UnboundedSender<Call>,
    pub(super) logs_dir: &'a Path,
}

/// The connection failed or the client went away: stop serving it.
pub(super) struct Gone;

impl From<io::Error> for Gone {
    fn from(_: io::Error) -> Gone {
        Gone
    }
}

pub(super) fn check_name(name: &str) -> Result<(), ApiError> {
    // The config's rule for names; it also keeps `logs` inside the log directory.
    let mut chars = name.chars();
    let valid = name.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "{name:?} is not a container name"
        )))
    }
}

pub(super) fn check(request: Request) -> Result<Dispatch, ApiError> {
    let command = match request {
        Request::Ps => Command::Ps,
        Request::Inspect { name } => {
            check_name(&name)?;
            Command::Inspect(name)
        }
        Request::Stats { name } => {
            if let Some(name) = &name {
                check_name(name)?;
            }
            Command::Stats(name)
        }
        Request::Start { name } => {
            check_name(&name)?;
            Command::Start(name)
        }
        Request::Stop { name, timeout_ms } => {
            check_name(&name)?;
            Command::Stop { name, timeout_ms }
        }
        Request::Restart { name } => {
            check_name(&name)?;
            Command::Restart(name)
        }
        Request::Kill { name, signal } => {
            check_name(&name)?;
            if !(1..=64).contains(&signal) {
                return Err(ApiError::bad_request(format!(
                    "{signal} is not a signal number (1-64)"
                )));
            }
            Command::Kill { name, signal }
        }
        Request::Logs {
            name,
            follow,
            since_ms,
            tail,
        } => {
            check_name(&name)?;
            return Ok(Dispatch::Logs(LogsQuery {
                name,
                follow,
                since_ms,
                tail,
            }));
        }
        Request::Exec {
            name,
            argv,
            env,
            stdin,
            tty,
        } => {
            check_name(&name)?;
            if argv.is_empty() {
                return Err(ApiError::bad_request("exec needs a command"));
            }
            if tty.is_some_and(|t| t.rows == 0 || t.cols == 0) {
                return Err(ApiError::bad_request(
                    "a terminal needs at least one row and one column",
                ));
            }
            if argv.iter().chain(&env).any(|s| s.contains('\0')) {
                return Err(ApiError::bad_request(
                    "exec arguments and environment cannot contain NUL",
                ));
            }
            if let Some(bad) = env
                .iter()
                .find(|e| e.split_once('=').is_none_or(|(k, _)| k.is_empty()))
            {
                return Err(ApiError::bad_request(format!("{bad:?} is not NAME=value")));
            }
            let stdio = match tty {
                Some(size) => ExecStdio::Terminal {
                    rows: size.rows,
                    cols: size.cols,
                },
                None => ExecStdio::Pipes { stdin },
            };
            Command::Exec {
                name,
                argv,
                env,
                stdio,
            }
        }
        Request::Reboot => Command::Reboot,
        Request::Poweroff => Command::Poweroff,
        Request::Apply { host_file, dry_run } => Command::Apply { host_file, dry_run },
        Request::Status => Command::Status,
        Request::Upgrade {
            manifest,
            signature,
            reboot,
        } => {
            return Ok(Dispatch::Upgrade {
                manifest,
                signature,
                reboot,
            });
        }
    };
    Ok(Dispatch::Call(command))
}

pub(super) fn ok_value(reply: Reply) -> Result<Value, ApiError> {
    let encoded = match reply {
        Reply::Statuses(statuses) => serde_json::to_value(statuses),
        Reply::Stats(stats) => serde_json::to_value(stats),
        Reply::Value(value) => Ok(value),
        Reply::Done => Ok(Value::Null),
        Reply::Exec(_) => return Err(ApiError::internal("PID 1 answered with a process")),
    };
    encoded.map_err(|e| ApiError::internal(format!("encoding the answer: {e}")))
}
