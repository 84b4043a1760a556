//! The pieces of `keel-bench-tcp` (bench/src/bin/tcp.rs) worth testing on their own: name
//! resolution through /etc/hosts, byte counts with units, and the one result line the host
//! side parses back.
//!
//! Static glibc has no NSS (see .cargo/config.toml), so `ToSocketAddrs` cannot resolve a
//! container name: the tool reads /etc/hosts itself, which is where Keel writes the names
//! of the containers on a bridged network.

use std::net::IpAddr;

/// Bytes the sender writes per `write` call.
pub const SEND_BUFFER: usize = 128 << 10;
/// Bytes the server reads per `read` call.
pub const RECEIVE_BUFFER: usize = 1 << 20;

/// The address of `name` in a hosts(5) file: the first line that lists it (canonical name
/// or alias, compared case-insensitively); `#` starts a comment.
pub fn lookup_hosts(hosts: &str, name: &str) -> Option<IpAddr> {
    hosts.lines().find_map(|line| {
        let line = line.split('#').next().unwrap_or("");
        let mut fields = line.split_whitespace();
        let addr: IpAddr = fields.next()?.parse().ok()?;
        fields.any(|n| n.eq_ignore_ascii_case(name)).then_some(addr)
    })
}

/// An IP address as written, else `name` looked up in `hosts` (the text of /etc/hosts).
pub fn resolve(name: &str, hosts: &str) -> Option<IpAddr> {
    name.parse().ok().or_else(|| lookup_hosts(hosts, name))
}

/// A byte count: digits with an optional binary unit, `K`, `M` or `G` (`64M` is 64 MiB).
pub fn parse_bytes(text: &str) -> Option<u64> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last()? {
        (i, 'k' | 'K') => (&text[..i], 10),
        (i, 'm' | 'M') => (&text[..i], 20),
        (i, 'g' | 'G') => (&text[..i], 30),
        _ => (text, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

/// One transfer, as the sender measured it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    /// Bytes the server counted (the sender checks they are the ones it wrote).
    pub bytes: u64,
    /// CLOCK_MONOTONIC from before `connect` to the server's reply.
    pub ns: u64,
    /// The sender's local address on the connection: which network namespace and
    /// interface it really left from.
    pub from: Option<IpAddr>,
}

impl Transfer {
    /// The sender's output line, `tcp: bytes=N ns=T[ from=ADDRESS]`.
    pub fn line(&self) -> String {
        let mut line = format!("tcp: bytes={} ns={}", self.bytes, self.ns);
        if let Some(from) = self.from {
            line += &format!(" from={from}");
        }
        line
    }

    /// Parses [`Transfer::line`] out of a command's output (the first line that is one).
    pub fn parse(output: &str) -> Option<Transfer> {
        output.lines().find_map(|line| {
            let rest = line.trim().strip_prefix("tcp: ")?;
            let mut bytes = None;
            let mut ns = None;
            let mut from = None;
            for word in rest.split_whitespace() {
                match word.split_once('=') {
                    Some(("bytes", v)) => bytes = v.parse().ok(),
                    Some(("ns", v)) => ns = v.parse().ok(),
                    Some(("from", v)) => from = v.parse().ok(),
                    _ => {}
                }
            }
            Some(Transfer {
                bytes: bytes?,
                ns: ns?,
                from,
            })
        })
    }

    /// Decimal megabytes (10^6 bytes) per second.
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / (self.ns.max(1) as f64 / 1e9) / 1e6
    }
}

/// The server's reply after the sender's end of stream: the byte count, in decimal, and a
/// newline. None unless the whole reply is exactly that.
pub fn parse_reply(reply: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(reply).ok()?;
    let digits = text.strip_suffix('\n')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const HOSTS: &str = "127.0.0.1\tlocalhost\n\
                         ::1\tlocalhost ip6-localhost ip6-loopback\n\
                         # 10.88.0.9 commented\n\
                         10.88.0.1\tgateway   keel0 # the bridge\n\
                         10.88.12.7\tsink\n\
                         not-an-address sink\n\
                         10.88.200.3 src Src.Alias\n\
                         10.88.0.99 sink\n";

    #[test]
    fn hosts_file_lookup() {
        let v4 = |a, b, c, d| Some(IpAddr::V4(Ipv4Addr::new(a, b, c, d)));
        assert_eq!(lookup_hosts(HOSTS, "sink"), v4(10, 88, 12, 7));
        assert_eq!(lookup_hosts(HOSTS, "src"), v4(10, 88, 200, 3));
        assert_eq!(lookup_hosts(HOSTS, "src.alias"), v4(10, 88, 200, 3));
        assert_eq!(lookup_hosts(HOSTS, "keel0"), v4(10, 88, 0, 1));
        assert_eq!(lookup_hosts(HOSTS, "localhost"), v4(127, 0, 0, 1));
        assert_eq!(
            lookup_hosts(HOSTS, "ip6-loopback"),
            Some(IpAddr::V6(Ipv6Addr::LOCALHOST))
        );
        assert_eq!(lookup_hosts(HOSTS, "commented"), None);
        assert_eq!(lookup_hosts(HOSTS, "the"), None);
        assert_eq!(lookup_hosts(HOSTS, "sin"), None);
        assert_eq!(lookup_hosts("", "sink"), None);
    }

    #[test]
    fn addresses_need_no_hosts_file() {
        assert_eq!(
            resolve("10.0.2.15", ""),
            Some(IpAddr::V4(Ipv4Addr::new(10, 0, 2, 15)))
        );
        assert_eq!(resolve("::1", ""), Some(IpAddr::V6(Ipv6Addr::LOCALHOST)));
        assert_eq!(
            resolve("sink", HOSTS),
            Some(IpAddr::V4(Ipv4Addr::new(10, 88, 12, 7)))
        );
        assert_eq!(resolve("nowhere", HOSTS), None);
    }

    #[test]
    fn byte_counts() {
        assert_eq!(parse_bytes("1"), Some(1));
        assert_eq!(parse_bytes("131072"), Some(131072));
        assert_eq!(parse_bytes("128K"), Some(128 << 10));
        assert_eq!(parse_bytes("64M"), Some(64 << 20));
        assert_eq!(parse_bytes("64m"), Some(64 << 20));
        assert_eq!(parse_bytes("2G"), Some(2 << 30));
        for bad in ["", "M", "-1", "1.5M", "12MB", "1 M", "x"] {
            assert_eq!(parse_bytes(bad), None, "{bad:?}");
        }
        assert_eq!(parse_bytes("99999999999999999999"), None);
        assert_eq!(parse_bytes("17179869184G"), None);
    }

    #[test]
    fn result_lines_round_trip() {
        let t = Transfer {
            bytes: 64 << 20,
            ns: 500_000_000,
            from: None,
        };
        assert_eq!(t.line(), "tcp: bytes=67108864 ns=500000000");
        assert_eq!(Transfer::parse(&t.line()), Some(t));
        let from = Transfer {
            from: Some(IpAddr::V4(Ipv4Addr::new(10, 88, 3, 4))),
            ..t
        };
        assert_eq!(
            from.line(),
            "tcp: bytes=67108864 ns=500000000 from=10.88.3.4"
        );
        assert_eq!(Transfer::parse(&from.line()), Some(from));
        assert_eq!(
            Transfer::parse("noise\n  tcp: bytes=1 ns=2  \nmore"),
            Some(Transfer {
                bytes: 1,
                ns: 2,
                from: None
            })
        );
        assert_eq!(Transfer::parse("tcp: bytes=1"), None);
        assert_eq!(Transfer::parse("tcp: error connecting"), None);
        assert!((t.mb_per_s() - 134.217728).abs() < 1e-9);
    }

    #[test]
    fn replies() {
        assert_eq!(parse_reply(b"67108864\n"), Some(67108864));
        assert_eq!(parse_reply(b"0\n"), Some(0));
        for bad in [&b""[..], b"\n", b"12", b"12\n\n", b"1 2\n", b"-1\n"] {
            assert_eq!(parse_reply(bad), None, "{bad:?}");
        }
    }
}
