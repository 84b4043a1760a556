//! The line format of `/var/log/keel/NAME.log`:
//! `<RFC 3339 UTC timestamp with milliseconds> <stdout|stderr|keel> <the line>` (`keel`:
//! a record by the supervisor itself, such as a count of dropped lines).

use crate::time::{format_rfc3339_ms, parse_rfc3339_ms};
use crate::{LogEntry, Stream};

/// Parses one log file line (without its newline); `None` if it is not in the format (a
/// torn or foreign line, which readers skip).
pub fn parse_log_line(line: &str) -> Option<LogEntry> {
    let (ts, rest) = line.split_once(' ')?;
    let ts_ms = parse_rfc3339_ms(ts)?;
    // An empty line is written as "TS stream " but tolerate the trailing space being lost.
    let (stream, text) = rest.split_once(' ').unwrap_or((rest, ""));
    Some(LogEntry {
        ts_ms,
        stream: stream.parse().ok()?,
        line: text.to_owned(),
    })
}

/// The log file line for `entry`, without a newline (the inverse of [`parse_log_line`]).
pub fn format_log_line(entry: &LogEntry) -> String {
    format!(
        "{} {} {}",
        format_rfc3339_ms(entry.ts_ms),
        Stream::as_str(entry.stream),
        entry.line
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_log_lines() {
        assert_eq!(
            parse_log_line("2026-11-27T16:30:00.123Z stdout GET / 200"),
            Some(LogEntry {
                ts_ms: 1_795_797_000_123,
                stream: Stream::Stdout,
                line: "GET / 200".into()
            })
        );
        let e = parse_log_line("2026-11-27T16:30:00.123Z keel 3 lines dropped").unwrap();
        assert_eq!(
            (e.stream, e.line.as_str()),
            (Stream::Keel, "3 lines dropped")
        );
        let e = parse_log_line("2026-11-27T16:30:00.123Z stderr  two  spaces ").unwrap();
        assert_eq!(
            (e.stream, e.line.as_str()),
            (Stream::Stderr, " two  spaces ")
        );
        assert_eq!(
            parse_log_line("2026-11-27T16:30:00.123Z stdout ")
                .unwrap()
                .line,
            ""
        );
        assert_eq!(
            parse_log_line("2026-11-27T16:30:00.123Z stdout")
                .unwrap()
                .line,
            ""
        );
        for bad in [
            "",
            "hello world",
            "2026-11-27T16:30:00.123Z",
            "2026-11-27T16:30:00.123Z stdin x",
            "2026-11-27T16:30:0 stdout x",
        ] {
            assert_eq!(parse_log_line(bad), None, "{bad}");
        }
    }

    #[test]
    fn format_is_the_inverse() {
        let e = LogEntry {
            ts_ms: 1_795_797_000_007,
            stream: Stream::Stderr,
            line: "a b".into(),
        };
        let line = format_log_line(&e);
        assert_eq!(line, "2026-11-27T16:30:00.007Z stderr a b");
        assert_eq!(parse_log_line(&line), Some(e));
    }
}
