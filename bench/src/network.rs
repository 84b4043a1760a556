//! The container-networking benchmark (issue 5): the host file of its guest, the four paths
//! a transfer takes, and the summary of what `keel-bench-tcp send` measured on each.
//!
//! One guest runs four containers from one image (busybox plus `keel-bench-tcp`): `sink`
//! and `src` on the default bridge, `hostsink` and `hostsrc` on the host's network. `sink`
//! serves on [`SINK_PORT`] and is published on [`PUBLISHED_PORT`]; `hostsink` serves on
//! [`HOST_SINK_PORT`]. `src` and `hostsrc` run the tool's sending agent; keel-bench `exec`s
//! `keel-bench-tcp ask` beside it for each transfer, so every transfer starts from the
//! sending container's main process, in its network namespace.

use std::net::Ipv4Addr;
use std::path::Path;

use crate::stats::{self, Summary};
use crate::tcp::Transfer;

/// Where `sink` listens, in its own network namespace.
pub const SINK_PORT: u16 = 5001;
/// Where `hostsink` listens, on the host's network.
pub const HOST_SINK_PORT: u16 = 5002;
/// The host port published to `sink`'s [`SINK_PORT`].
pub const PUBLISHED_PORT: u16 = 8081;
/// Where the tool sits in the image.
pub const TOOL: &str = "/bin/keel-bench-tcp";
/// The unix socket of the sending agent in `src` and `hostsrc` (in each one's own root).
pub const AGENT_SOCKET: &str = "/keel-bench-tcp.sock";

/// The four ways a transfer goes, in the order a round starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Path4 {
    /// `src` → `sink` by name: veth, bridge keel0, veth, two network namespaces.
    Bridge,
    /// `hostsrc` → 127.0.0.1:`hostsink`: the guest's loopback.
    Loopback,
    /// `hostsrc` → the guest's own address, published port: nftables DNAT to `sink`.
    Published,
    /// `hostsrc` → `sink`'s bridge address: the same route as published, without the NAT.
    Direct,
}

impl Path4 {
    pub const ALL: [Path4; 4] = [
        Path4::Bridge,
        Path4::Loopback,
        Path4::Published,
        Path4::Direct,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Path4::Bridge => "bridge",
            Path4::Loopback => "loopback",
            Path4::Published => "published",
            Path4::Direct => "direct",
        }
    }

    /// The container the sender runs in.
    pub fn client(self) -> &'static str {
        match self {
            Path4::Bridge => "src",
            _ => "hostsrc",
        }
    }
}

/// The guest's addresses a run needs besides names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    /// The guest's own address on eth0 (QEMU's user network gives 10.0.2.15).
    pub guest: Ipv4Addr,
    /// `sink`'s address on the bridge.
    pub sink: Ipv4Addr,
    /// `src`'s address on the bridge.
    pub src: Ipv4Addr,
    /// The bridge's own address (the host's side of keel0).
    pub gateway: Ipv4Addr,
}

impl Addresses {
    /// (host, port) the sender connects to on `path`.
    pub fn target(&self, path: Path4) -> (String, u16) {
        match path {
            Path4::Bridge => ("sink".into(), SINK_PORT),
            Path4::Loopback => ("127.0.0.1".into(), HOST_SINK_PORT),
            Path4::Published => (self.guest.to_string(), PUBLISHED_PORT),
            Path4::Direct => (self.sink.to_string(), SINK_PORT),
        }
    }

    /// The local address a transfer on `path` must leave from: proof that the sender
    /// really was in the namespace (and took the route) the path is about.
    pub fn expected_from(&self, path: Path4) -> Ipv4Addr {
        match path {
            Path4::Bridge => self.src,
            Path4::Loopback => Ipv4Addr::LOCALHOST,
            Path4::Published => self.guest,
            Path4::Direct => self.gateway,
        }
    }

    /// The command line, run with `exec` in the sending container, that has its agent
    /// (the container's main process, in its network namespace) send `bytes` on `path`.
    pub fn send_argv(&self, path: Path4, bytes: u64) -> Vec<String> {
        let (host, port) = self.target(path);
        vec![
            TOOL.into(),
            "ask".into(),
            AGENT_SOCKET.into(),
            host,
            port.to_string(),
            bytes.to_string(),
        ]
    }
}

/// The host file of the networking guest. `tool_root` is a directory holding
/// `bin/keel-bench-tcp`, imported as the image's second layer.
pub fn host_file(busybox: &Path, tool_root: &Path) -> String {
    format!(
        r#"# keel-bench: container networking (TCP throughput over the bridge, published ports)
[host]
hostname = "netbench"
stop_timeout = "2s"

[network.interfaces.eth0]
dhcp4 = true

[images.net]
layers = ["busybox:{busybox}", "{tool_root}"]
env = ["PATH=/bin"]

[containers.sink]
image = "net"
network = "bridge"
ports = ["{PUBLISHED_PORT}:{SINK_PORT}"]
command = ["{TOOL}", "serve", "{SINK_PORT}"]

[containers.src]
image = "net"
network = "bridge"
command = ["{TOOL}", "agent", "{AGENT_SOCKET}"]

[containers.hostsink]
image = "net"
command = ["{TOOL}", "serve", "{HOST_SINK_PORT}"]

[containers.hostsrc]
image = "net"
command = ["{TOOL}", "agent", "{AGENT_SOCKET}"]
"#,
        busybox = busybox.display(),
        tool_root = tool_root.display(),
    )
}

/// The bridge addresses as keel-config assigns them (from the containers' names, the same
/// on every boot): (sink, src, gateway), `sink` checked to be published on
/// [`PUBLISHED_PORT`]. The guest's own address is left unspecified.
pub fn bridge_addresses(host: &keel_config::HostConfig) -> Result<Addresses, String> {
    let attachment = |name: &str| match host.containers.get(name).map(|c| &c.isolation.network) {
        Some(keel_config::NetworkMode::Bridged(a)) => Ok(a),
        other => Err(format!("{name} is not on a bridge: {other:?}")),
    };
    let sink = attachment("sink")?;
    if !sink
        .ports
        .iter()
        .any(|p| p.host_port == PUBLISHED_PORT && p.container_port == SINK_PORT)
    {
        return Err(format!("sink does not publish {PUBLISHED_PORT}: {sink:?}"));
    }
    let network = host
        .networks
        .get(&sink.network)
        .ok_or(format!("no network {}", sink.network))?;
    Ok(Addresses {
        guest: Ipv4Addr::UNSPECIFIED,
        sink: sink.address,
        src: attachment("src")?.address,
        gateway: network.gateway,
    })
}

/// The IPv4 address in `ip -o -4 addr show DEV` output (`2: eth0    inet 10.0.2.15/24 ...`).
pub fn parse_ip_addr(output: &str) -> Option<Ipv4Addr> {
    output.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        words.find(|w| *w == "inet")?;
        words.next()?.split('/').next()?.parse().ok()
    })
}

/// Throughput of each transfer in MB/s (10^6 bytes per second).
pub fn throughputs(transfers: &[Transfer]) -> Vec<f64> {
    transfers.iter().map(Transfer::mb_per_s).collect()
}

/// Time of each transfer in ms.
pub fn times_ms(transfers: &[Transfer]) -> Vec<f64> {
    transfers.iter().map(|t| t.ns as f64 / 1e6).collect()
}

/// The median of the per-round ratios a / b of two paths' throughputs (rounds are paired:
/// the same index ran in the same round, minutes apart at most).
pub fn paired_ratio(a: &[Transfer], b: &[Transfer]) -> Option<Summary> {
    let ratios: Vec<f64> = a
        .iter()
        .zip(b)
        .map(|(x, y)| x.mb_per_s() / y.mb_per_s())
        .collect();
    stats::summarize(&ratios)
}

/// The order of the paths in round `round`: rotated by one each round, so no path always
/// runs first (right after the exec of the previous round's last) or last.
pub fn round_order(round: usize) -> [Path4; 4] {
    let mut order = Path4::ALL;
    order.rotate_left(round % Path4::ALL.len());
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_file_is_a_valid_keel_host() {
        let dir = tempfile::tempdir().unwrap();
        let text = host_file(Path::new("/bin/busybox"), Path::new("/tmp/tool root"));
        let host = keel_config::HostConfig::parse(&dir.path().join("net.toml"), &text).unwrap();
        assert_eq!(host.containers.len(), 4);
        let a = bridge_addresses(&host).unwrap();
        assert_eq!(a.sink.octets()[..2], [10, 88]);
        assert_eq!(a.src.octets()[..2], [10, 88]);
        assert_ne!(a.sink, a.src);
        assert_eq!(a.gateway, Ipv4Addr::new(10, 88, 0, 1));
        for name in ["hostsink", "hostsrc"] {
            assert!(matches!(
                host.containers[name].isolation.network,
                keel_config::NetworkMode::Host
            ));
        }
        assert!(matches!(
            host.containers["src"].isolation.network,
            keel_config::NetworkMode::Bridged(_)
        ));
    }

    #[test]
    fn targets_and_command_lines() {
        let a = Addresses {
            guest: Ipv4Addr::new(10, 0, 2, 15),
            sink: Ipv4Addr::new(10, 88, 1, 2),
            src: Ipv4Addr::new(10, 88, 3, 4),
            gateway: Ipv4Addr::new(10, 88, 0, 1),
        };
        assert_eq!(a.expected_from(Path4::Bridge), a.src);
        assert_eq!(a.expected_from(Path4::Loopback), Ipv4Addr::LOCALHOST);
        assert_eq!(a.expected_from(Path4::Published), a.guest);
        assert_eq!(a.expected_from(Path4::Direct), a.gateway);
        assert_eq!(
            a.send_argv(Path4::Bridge, 64 << 20),
            [TOOL, "ask", AGENT_SOCKET, "sink", "5001", "67108864"]
        );
        assert_eq!(a.target(Path4::Loopback), ("127.0.0.1".into(), 5002));
        assert_eq!(a.target(Path4::Published), ("10.0.2.15".into(), 8081));
        assert_eq!(a.target(Path4::Direct), ("10.88.1.2".into(), 5001));
        assert_eq!(Path4::Bridge.client(), "src");
        assert_eq!(Path4::Direct.client(), "hostsrc");
    }

    #[test]
    fn ip_addr_output() {
        let out = "2: eth0    inet 10.0.2.15/24 brd 10.0.2.255 scope global eth0\\       valid_lft forever preferred_lft forever\n";
        assert_eq!(parse_ip_addr(out), Some(Ipv4Addr::new(10, 0, 2, 15)));
        assert_eq!(parse_ip_addr("2: eth0 mtu 1500\n"), None);
        assert_eq!(parse_ip_addr(""), None);
    }

    #[test]
    fn rounds_rotate_and_ratios_pair() {
        assert_eq!(round_order(0), Path4::ALL);
        assert_eq!(round_order(1)[0], Path4::Loopback);
        assert_eq!(round_order(3)[0], Path4::Direct);
        assert_eq!(round_order(4), Path4::ALL);
        let t = |bytes, ns| Transfer {
            bytes,
            ns,
            from: None,
        };
        let a = [t(100, 1_000), t(100, 2_000), t(100, 1_000)];
        let b = [t(100, 2_000), t(100, 2_000), t(100, 4_000)];
        let r = paired_ratio(&a, &b).unwrap();
        assert_eq!((r.min, r.median, r.max), (1.0, 2.0, 4.0));
        assert_eq!(times_ms(&[t(1, 2_500_000)]), [2.5]);
        assert_eq!(throughputs(&[t(1_000_000, 1_000_000_000)]), [1.0]);
    }
}
