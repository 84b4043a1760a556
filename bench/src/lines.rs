//! The console lines the guests print and the host parses. They are the only channel from
//! guest to host (the serial console), so both sides use these functions.

use crate::stats::Summary;

/// `bench: keel start_to_first_instruction_us median=... p10=... p90=... min=... max=... n=...`
pub fn format_summary(runtime: &str, metric: &str, s: &Summary) -> String {
    format!(
        "bench: {runtime} {metric} median={:.0} p10={:.0} p90={:.0} min={:.0} max={:.0} n={}",
        s.median, s.p10, s.p90, s.min, s.max, s.n
    )
}

/// One `bench:` summary line, parsed back.
#[derive(Debug, Clone, PartialEq)]
pub struct SummaryLine {
    pub runtime: String,
    pub metric: String,
    pub summary: Summary,
}

/// Parses a line written by [`format_summary`]; anything else gives None. The line may
/// carry a prefix (QEMU's console has none, but a log file might).
pub fn parse_summary(line: &str) -> Option<SummaryLine> {
    let rest = &line[line.find("bench: ")? + "bench: ".len()..];
    let mut words = rest.split_whitespace();
    let runtime = words.next()?.to_string();
    let metric = words.next()?.to_string();
    let mut field = |name: &str| -> Option<f64> {
        let word = words.next()?;
        word.strip_prefix(name)?.strip_prefix('=')?.parse().ok()
    };
    let median = field("median")?;
    let p10 = field("p10")?;
    let p90 = field("p90")?;
    let min = field("min")?;
    let max = field("max")?;
    let n = field("n")? as usize;
    Some(SummaryLine {
        runtime,
        metric,
        summary: Summary {
            n,
            median,
            p10,
            p90,
            min,
            max,
        },
    })
}

/// The value of `key=` in a line such as `keel: ready uptime_ms=1234`.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// `field` parsed as a number.
pub fn number(line: &str, key: &str) -> Option<u64> {
    field(line, key)?.parse().ok()
}

/// Milliseconds from /proc/uptime's first field ("12.34 5.67"): what the baseline's shell
/// init prints is computed the same way.
pub fn uptime_ms(proc_uptime: &str) -> Option<u64> {
    let first = proc_uptime.split_whitespace().next()?;
    let (secs, frac) = first.split_once('.').unwrap_or((first, "0"));
    let secs: u64 = secs.parse().ok()?;
    let centis: u64 = format!("{frac:0<2}").get(..2)?.parse().ok()?;
    Some(secs * 1000 + centis * 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_round_trip() {
        let s = Summary {
            n: 200,
            median: 1234.4,
            p10: 1000.0,
            p90: 2000.6,
            min: 900.0,
            max: 5000.0,
        };
        let line = format_summary("keel", "start_to_exit_us", &s);
        assert_eq!(
            line,
            "bench: keel start_to_exit_us median=1234 p10=1000 p90=2001 min=900 max=5000 n=200"
        );
        let parsed = parse_summary(&line).unwrap();
        assert_eq!(parsed.runtime, "keel");
        assert_eq!(parsed.metric, "start_to_exit_us");
        assert_eq!(parsed.summary.n, 200);
        assert_eq!(parsed.summary.median, 1234.0);
        assert!(parse_summary("bench: info crun_seccomp=on").is_none());
        assert!(parse_summary("keel: ready uptime_ms=5").is_none());
    }

    #[test]
    fn fields_and_uptime() {
        let line = "keel: pid1 rss_kb=2048 containers=10";
        assert_eq!(number(line, "rss_kb"), Some(2048));
        assert_eq!(number(line, "containers"), Some(10));
        assert_eq!(number(line, "missing"), None);
        assert_eq!(uptime_ms("12.34 20.00\n"), Some(12340));
        assert_eq!(uptime_ms("3.5 1.0"), Some(3500));
        assert_eq!(uptime_ms("7 1"), Some(7000));
        assert_eq!(uptime_ms(""), None);
    }
}
