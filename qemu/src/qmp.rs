//! A minimal QMP (QEMU Machine Protocol) client: newline-separated JSON objects over a unix
//! socket. QEMU greets, we negotiate capabilities, then each command gets exactly one reply
//! (`return` or `error`) while asynchronous `event`s may arrive at any point and are skipped.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::error::QemuError;

pub(crate) struct QmpClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl QmpClient {
    /// Reads the greeting and leaves capabilities-negotiation mode. `timeout` bounds every
    /// single read and write, now and for later commands.
    pub(crate) fn handshake(stream: UnixStream, timeout: Duration) -> Result<Self, QemuError> {
        stream
            .set_read_timeout(Some(timeout))
            .map_err(QemuError::QmpIo)?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(QemuError::QmpIo)?;
        let writer = stream.try_clone().map_err(QemuError::QmpIo)?;
        let mut client = QmpClient {
            reader: BufReader::new(stream),
            writer,
            next_id: 1,
        };
        let greeting = client.read_message()?;
        if !greeting.contains_key("QMP") {
            return Err(QemuError::QmpProtocol(format!(
                "expected a greeting, got {}",
                Value::Object(greeting)
            )));
        }
        client.execute("qmp_capabilities", None)?;
        Ok(client)
    }

    /// Runs `command` and returns its `return` value.
    pub(crate) fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QemuError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(QemuError::QmpIo)?;

        loop {
            let mut reply = self.read_message()?;
            if reply.contains_key("event") {
                continue;
            }
            // A reply to an earlier command that timed out on our side: not ours.
            if reply.get("id").is_some_and(|v| *v != json!(id)) {
                continue;
            }
            if let Some(value) = reply.remove("return") {
                return Ok(value);
            }
            if let Some(error) = reply.get("error") {
                let field = |name| {
                    error
                        .get(name)
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_owned()
                };
                return Err(QemuError::QmpCommand {
                    command: command.to_owned(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return Err(QemuError::QmpProtocol(format!(
                "unexpected message {}",
                Value::Object(reply)
            )));
        }
    }

    fn read_message(&mut self) -> Result<Map<String, Value>, QemuError> {
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).map_err(QemuError::QmpIo)?;
            if n == 0 {
                return Err(QemuError::QmpProtocol("QEMU closed the connection".into()));
            }
            if line.trim().is_empty() {
                continue;
            }
            return match serde_json::from_str(&line) {
                Ok(Value::Object(map)) => Ok(map),
                Ok(other) => Err(QemuError::QmpProtocol(format!(
                    "expected a JSON object, got {other}"
                ))),
                Err(e) => Err(QemuError::QmpProtocol(format!(
                    "bad JSON {:?}: {e}",
                    line.trim_end()
                ))),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::thread;

    /// A fake QMP server: greets, then answers each request with whatever `script` says,
    /// recording the requests it saw.
    fn fake_server(
        script: impl Fn(&Value) -> Vec<String> + Send + 'static,
    ) -> (tempfile::TempDir, thread::JoinHandle<Vec<Value>>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let handle = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut writer = stream.try_clone().unwrap();
            writer
                .write_all(
                    b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}}, \"capabilities\": [\"oob\"]}}\r\n",
                )
                .unwrap();
            let mut seen = Vec::new();
            for line in BufReader::new(stream).lines() {
                let request: Value = serde_json::from_str(&line.unwrap()).unwrap();
                for reply in script(&request) {
                    writer.write_all(reply.as_bytes()).unwrap();
                    writer.write_all(b"\r\n").unwrap();
                }
                seen.push(request);
            }
            seen
        });
        (dir, handle)
    }

    fn connect(dir: &tempfile::TempDir) -> Result<QmpClient, QemuError> {
        let stream = UnixStream::connect(dir.path().join("qmp.sock")).unwrap();
        QmpClient::handshake(stream, Duration::from_secs(10))
    }

    #[test]
    fn handshake_events_and_errors() {
        let (dir, server) = fake_server(|req| {
            let id = &req["id"];
            match req["execute"].as_str().unwrap() {
                "qmp_capabilities" => vec![format!(r#"{{"return": {{}}, "id": {id}}}"#)],
                "query-status" => vec![
                    r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RTC_CHANGE", "data": {"offset": 0}}"#.into(),
                    // A late reply to some other command must be skipped too.
                    r#"{"return": {"stale": true}, "id": 999}"#.into(),
                    String::new(),
                    format!(r#"{{"return": {{"status": "running", "running": true}}, "id": {id}}}"#),
                ],
                "system_powerdown" => vec![
                    format!(r#"{{"return": {{}}, "id": {id}}}"#),
                    r#"{"event": "POWERDOWN", "timestamp": {"seconds": 3, "microseconds": 4}}"#.into(),
                ],
                _ => vec![format!(
                    r#"{{"error": {{"class": "CommandNotFound", "desc": "The command nope has not been found"}}, "id": {id}}}"#
                )],
            }
        });
        let mut client = connect(&dir).unwrap();
        let status = client.execute("query-status", None).unwrap();
        assert_eq!(status["status"], "running");
        assert_eq!(client.execute("system_powerdown", None).unwrap(), json!({}));
        // The POWERDOWN event left over from the previous command is skipped here.
        match client.execute("nope", Some(json!({"x": 1}))) {
            Err(QemuError::QmpCommand {
                command,
                class,
                desc,
            }) => {
                assert_eq!(command, "nope");
                assert_eq!(class, "CommandNotFound");
                assert!(desc.contains("nope"));
            }
            other => panic!("{other:?}"),
        }
        drop(client);
        let seen = server.join().unwrap();
        let commands: Vec<_> = seen.iter().map(|r| r["execute"].clone()).collect();
        assert_eq!(
            commands,
            [
                "qmp_capabilities",
                "query-status",
                "system_powerdown",
                "nope"
            ]
        );
        assert!(seen[0].get("arguments").is_none());
        assert_eq!(seen[3]["arguments"], json!({"x": 1}));
        let ids: Vec<_> = seen.iter().map(|r| r["id"].as_u64().unwrap()).collect();
        assert_eq!(ids, [1, 2, 3, 4]);
    }

    #[test]
    fn connection_closed_mid_command() {
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join("qmp.sock")).unwrap();
        let server = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut writer = stream.try_clone().unwrap();
            let mut lines = BufReader::new(stream).lines();
            writer.write_all(b"{\"QMP\": {}}\n").unwrap();
            lines.next().unwrap().unwrap();
            writer.write_all(b"{\"return\": {}}\n").unwrap();
            // Read the next command, then hang up without answering, as a dying QEMU does.
            lines.next().unwrap().unwrap();
        });
        let mut client = connect(&dir).unwrap();
        let err = client.execute("quit", None).unwrap_err();
        assert!(
            matches!(&err, QemuError::QmpProtocol(m) if m.contains("closed")),
            "{err}"
        );
        server.join().unwrap();
    }

    #[test]
    fn rejects_a_bad_greeting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream.write_all(b"{\"hello\": 1}\n").unwrap();
        });
        let err = connect(&dir).err().unwrap();
        assert!(matches!(err, QemuError::QmpProtocol(_)), "{err}");
        server.join().unwrap();
    }
}
