//! Health checks: the accounting (pure) and the TCP and HTTP probes (async, in PID 1).
//! Exec probes run inside the container and are started by the supervisor like any exec.

use std::net::Ipv4Addr;
use std::time::Duration;

use keel_config::HealthCheck;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// No verdict yet (the first probe has not passed).
    Starting,
    Healthy,
    Unhealthy,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Starting => "starting",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

/// One running container's health, fed with probe results.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthState {
    pub health: Health,
    pub failures: u32,
}

impl Default for HealthState {
    fn default() -> HealthState {
        HealthState {
            health: Health::Starting,
            failures: 0,
        }
    }
}

impl HealthState {
    /// Records a probe result `since_start` after the container started; returns the new
    /// health when it changed. Docker's rules: a pass makes it healthy at once; failures
    /// inside the start period do not count; `retries` consecutive failures make it
    /// unhealthy.
    pub fn record(
        &mut self,
        passed: bool,
        since_start: Duration,
        check: &HealthCheck,
    ) -> Option<Health> {
        let before = self.health;
        if passed {
            self.failures = 0;
            self.health = Health::Healthy;
        } else if since_start >= Duration::from_millis(check.start_period_ms)
            || self.health == Health::Healthy
        {
            self.failures += 1;
            if self.failures >= check.retries {
                self.health = Health::Unhealthy;
            }
        }
        (self.health != before).then_some(self.health)
    }
}

/// Connects to `addr`:`port` within `timeout`: the container's own address on a bridged
/// network, 127.0.0.1 on the host's.
pub async fn probe_tcp(addr: Ipv4Addr, port: u16, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect((addr, port))).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("tcp :{port}: {e}")),
        Err(_) => Err(format!(
            "tcp :{port}: no answer within {} ms",
            timeout.as_millis()
        )),
    }
}

/// GETs http://`addr`:`port``path`; healthy on a 2xx or 3xx status.
pub async fn probe_http(
    addr: Ipv4Addr,
    port: u16,
    path: &str,
    timeout: Duration,
) -> Result<(), String> {
    let request = async {
        let mut stream = tokio::net::TcpStream::connect((addr, port))
            .await
            .map_err(|e| e.to_string())?;
        let req = format!(
            "GET {path} HTTP/1.0\r\nHost: localhost\r\nUser-Agent: keel-healthcheck\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut head = vec![0u8; 256];
        let mut got = 0;
        while got < head.len() && !head[..got].contains(&b'\n') {
            let n = stream
                .read(&mut head[got..])
                .await
                .map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            got += n;
        }
        status_of(&head[..got]).ok_or_else(|| "no HTTP status line".to_string())
    };
    match tokio::time::timeout(timeout, request).await {
        Ok(Ok(status)) if (200..400).contains(&status) => Ok(()),
        Ok(Ok(status)) => Err(format!("http :{port}{path}: status {status}")),
        Ok(Err(e)) => Err(format!("http :{port}{path}: {e}")),
        Err(_) => Err(format!(
            "http :{port}{path}: no answer within {} ms",
            timeout.as_millis()
        )),
    }
}

/// The status code of an HTTP response's first line.
fn status_of(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let text = std::str::from_utf8(line).ok()?;
    let mut parts = text.split_whitespace();
    parts.next().filter(|v| v.starts_with("HTTP/"))?;
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_config::HealthProbe;

    fn check(retries: u32, start_period_ms: u64) -> HealthCheck {
        HealthCheck {
            probe: HealthProbe::Tcp { port: 1 },
            interval_ms: 1000,
            timeout_ms: 500,
            retries,
            start_period_ms,
        }
    }

    #[test]
    fn failures_in_the_start_period_do_not_count() {
        let c = check(2, 5000);
        let mut h = HealthState::default();
        assert_eq!(h.record(false, Duration::from_secs(1), &c), None);
        assert_eq!(h.record(false, Duration::from_secs(2), &c), None);
        assert_eq!(h.failures, 0);
        assert_eq!(h.record(false, Duration::from_secs(6), &c), None);
        assert_eq!(
            h.record(false, Duration::from_secs(7), &c),
            Some(Health::Unhealthy)
        );
    }

    #[test]
    fn a_pass_heals_and_resets_the_count() {
        let c = check(3, 0);
        let mut h = HealthState::default();
        assert_eq!(h.record(true, Duration::ZERO, &c), Some(Health::Healthy));
        assert_eq!(h.record(false, Duration::from_secs(1), &c), None);
        assert_eq!(h.record(false, Duration::from_secs(2), &c), None);
        assert_eq!(h.record(true, Duration::from_secs(3), &c), None);
        assert_eq!(h.failures, 0);
        for s in 4..6 {
            assert_eq!(h.record(false, Duration::from_secs(s), &c), None);
        }
        assert_eq!(
            h.record(false, Duration::from_secs(6), &c),
            Some(Health::Unhealthy)
        );
        assert_eq!(
            h.record(true, Duration::from_secs(7), &c),
            Some(Health::Healthy)
        );
    }

    #[test]
    fn a_failure_after_healthy_counts_even_in_the_start_period() {
        let c = check(1, 60_000);
        let mut h = HealthState::default();
        h.record(true, Duration::ZERO, &c);
        assert_eq!(
            h.record(false, Duration::from_secs(1), &c),
            Some(Health::Unhealthy)
        );
    }

    #[test]
    fn http_status_lines() {
        assert_eq!(status_of(b"HTTP/1.0 200 OK\r\nServer: x\r\n"), Some(200));
        assert_eq!(status_of(b"HTTP/1.1 503 Busy\r\n"), Some(503));
        assert_eq!(status_of(b"garbage\r\n"), None);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn probes_reach_a_local_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 512];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let ok = std::str::from_utf8(&buf[..n])
                    .unwrap_or("")
                    .starts_with("GET /ok ");
                let reply: &[u8] = if ok {
                    b"HTTP/1.0 200 OK\r\n\r\n"
                } else {
                    b"HTTP/1.0 500 No\r\n\r\n"
                };
                let _ = s.write_all(reply).await;
            }
        });
        assert_eq!(
            probe_tcp(Ipv4Addr::LOCALHOST, port, Duration::from_secs(2)).await,
            Ok(())
        );
        assert_eq!(
            probe_http(Ipv4Addr::LOCALHOST, port, "/ok", Duration::from_secs(2)).await,
            Ok(())
        );
        assert!(
            probe_http(Ipv4Addr::LOCALHOST, port, "/bad", Duration::from_secs(2))
                .await
                .unwrap_err()
                .contains("status 500")
        );
        // A port nobody listens on.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        assert!(
            probe_tcp(Ipv4Addr::LOCALHOST, closed, Duration::from_secs(2))
                .await
                .is_err()
        );
    }
}
