//! `[networks.NAME]`: bridged container networks, the address each container gets on its
//! network, and the ports it publishes on the host.
//!
//! Addresses are assigned here, at validation, from the container's name alone: the same
//! host file gives every container the same address on every boot and on every machine, so
//! other containers can find it by name from a hosts file written before anything starts.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde::Deserialize;
use toml::Spanned;

use crate::{ConfigError, Container, Locator, NetworkMode};

/// The network `network = "bridge"` names unless the host file declares its own
/// `[networks.bridge]`.
pub const DEFAULT_NETWORK: &str = "bridge";
const DEFAULT_BRIDGE: &str = "keel0";
const DEFAULT_SUBNET: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 88, 0, 0), 16);
/// Linux's IFNAMSIZ less the terminating NUL.
const MAX_IFNAME: usize = 15;

/// A bridge on the host with containers attached by veth pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeNetwork {
    /// The bridge's kernel name.
    pub bridge: String,
    /// The network address (host bits zero).
    pub subnet: Ipv4Addr,
    pub prefix_len: u8,
    /// The bridge's own address, the containers' default route.
    pub gateway: Ipv4Addr,
    /// Outbound NAT to the host's other interfaces.
    pub masquerade: bool,
    pub mtu: Option<u32>,
}

impl BridgeNetwork {
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        mask(addr, self.prefix_len) == self.subnet
    }

    fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet) | !netmask(self.prefix_len))
    }

    fn default_for(name: &str) -> BridgeNetwork {
        BridgeNetwork {
            bridge: default_bridge_name(name),
            subnet: DEFAULT_SUBNET.0,
            prefix_len: DEFAULT_SUBNET.1,
            gateway: Ipv4Addr::new(10, 88, 0, 1),
            masquerade: true,
            mtu: None,
        }
    }
}

/// A container's place on a bridged network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub network: String,
    /// Assigned at validation (see the module comment) unless pinned with `ipv4_address`.
    pub address: Ipv4Addr,
    pub ports: Vec<PublishedPort>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// `[HOST_IP:]HOST_PORT:CONTAINER_PORT[/tcp|/udp]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishedPort {
    pub protocol: Protocol,
    /// Only connections to this one of the host's addresses; any of them when absent.
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub container_port: u16,
}

impl PublishedPort {
    pub fn parse(text: &str) -> Option<PublishedPort> {
        let (ports, protocol) = match text.rsplit_once('/') {
            Some((ports, "tcp")) => (ports, Protocol::Tcp),
            Some((ports, "udp")) => (ports, Protocol::Udp),
            Some(_) => return None,
            None => (text, Protocol::Tcp),
        };
        let parts: Vec<&str> = ports.split(':').collect();
        let (host_ip, host_port, container_port) = match parts.as_slice() {
            [host, container] => (None, *host, *container),
            [ip, host, container] => (Some(ip.parse().ok()?), *host, *container),
            _ => return None,
        };
        let port = |s: &str| s.parse::<u16>().ok().filter(|p| *p != 0);
        Some(PublishedPort {
            protocol,
            host_ip,
            host_port: port(host_port)?,
            container_port: port(container_port)?,
        })
    }
}

impl std::fmt::Display for PublishedPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(ip) = self.host_ip {
            write!(f, "{ip}:")?;
        }
        write!(
            f,
            "{}:{}/{}",
            self.host_port,
            self.container_port,
            self.protocol.as_str()
        )
    }
}

pub(crate) mod raw {
    use super::*;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Network {
        pub subnet: Spanned<String>,
        pub gateway: Option<Spanned<String>>,
        pub bridge: Option<Spanned<String>>,
        #[serde(default = "yes")]
        pub masquerade: bool,
        pub mtu: Option<Spanned<i64>>,
    }

    fn yes() -> bool {
        true
    }
}

fn netmask(len: u8) -> u32 {
    if len == 0 { 0 } else { u32::MAX << (32 - len) }
}

fn mask(addr: Ipv4Addr, len: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(addr) & netmask(len))
}

fn default_bridge_name(network: &str) -> String {
    if network == DEFAULT_NETWORK {
        return DEFAULT_BRIDGE.to_string();
    }
    let mut name = format!("kn-{network}");
    name.truncate(MAX_IFNAME);
    name
}

fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

pub(crate) fn validate_networks(
    loc: &Locator<'_>,
    raw: &BTreeMap<String, Spanned<raw::Network>>,
) -> Result<BTreeMap<String, BridgeNetwork>, ConfigError> {
    let mut out = BTreeMap::new();
    for (name, spanned) in raw {
        let key = format!("networks.{name}");
        if name == "host" || name == "none" {
            return Err(loc.at(
                spanned,
                key,
                format!("`{name}` is a network mode, not a network name"),
            ));
        }
        crate::check_name(loc, spanned, &key, name)?;
        let n = spanned.get_ref();
        let (addr, len) = n
            .subnet
            .get_ref()
            .split_once('/')
            .and_then(|(a, l)| Some((a.parse::<Ipv4Addr>().ok()?, l.parse::<u8>().ok()?)))
            .filter(|(_, len)| (8..=30).contains(len))
            .ok_or_else(|| {
                loc.at(
                    &n.subnet,
                    format!("{key}.subnet"),
                    "expected an IPv4 subnet with a prefix length from 8 to 30, such as \"10.89.0.0/24\"",
                )
            })?;
        if mask(addr, len) != addr {
            return Err(loc.at(
                &n.subnet,
                format!("{key}.subnet"),
                format!(
                    "`{}` has host bits set: expected the network address, {}/{len}",
                    n.subnet.get_ref(),
                    mask(addr, len)
                ),
            ));
        }
        let mut network = BridgeNetwork {
            bridge: default_bridge_name(name),
            subnet: addr,
            prefix_len: len,
            gateway: Ipv4Addr::from(u32::from(addr) + 1),
            masquerade: n.masquerade,
            mtu: None,
        };
        if let Some(gw) = &n.gateway {
            let ip = gw
                .get_ref()
                .parse::<Ipv4Addr>()
                .ok()
                .filter(|ip| network.contains(*ip) && *ip != addr && *ip != network.broadcast())
                .ok_or_else(|| {
                    loc.at(
                        gw,
                        format!("{key}.gateway"),
                        format!(
                            "expected a host address inside {}, such as \"{}\"",
                            n.subnet.get_ref(),
                            Ipv4Addr::from(u32::from(addr) + 1)
                        ),
                    )
                })?;
            network.gateway = ip;
        }
        if let Some(bridge) = &n.bridge {
            if !valid_ifname(bridge.get_ref()) {
                return Err(loc.at(
                    bridge,
                    format!("{key}.bridge"),
                    "expected an interface name of 1-15 letters, digits, `-`, `_` or `.`",
                ));
            }
            network.bridge = bridge.get_ref().clone();
        }
        if let Some(mtu) = &n.mtu {
            let value = *mtu.get_ref();
            if !(576..=65535).contains(&value) {
                return Err(loc.at(
                    mtu,
                    format!("{key}.mtu"),
                    "expected an MTU from 576 to 65535",
                ));
            }
            network.mtu = Some(value as u32);
        }
        for (other_name, other) in &out {
            let other: &BridgeNetwork = other;
            let shorter = network.prefix_len.min(other.prefix_len);
            if mask(network.subnet, shorter) == mask(other.subnet, shorter) {
                return Err(loc.at(
                    &n.subnet,
                    format!("{key}.subnet"),
                    format!(
                        "overlaps network `{other_name}` ({}/{}): each network needs its own subnet",
                        other.subnet, other.prefix_len
                    ),
                ));
            }
            if network.bridge == other.bridge {
                return Err(loc.at(
                    spanned,
                    format!("{key}.bridge"),
                    format!(
                        "bridge `{}` is also network `{other_name}`'s: set `bridge` to tell them apart",
                        network.bridge
                    ),
                ));
            }
        }
        out.insert(name.clone(), network);
    }
    Ok(out)
}

/// What a container's `network`, `ports` and `ipv4_address` keys say, before addresses are
/// assigned.
pub(crate) fn container_network(
    loc: &Locator<'_>,
    key: &str,
    mode: &Option<Spanned<String>>,
    ports: &Option<Spanned<Vec<Spanned<String>>>>,
    pinned: &Option<Spanned<String>>,
    networks: &BTreeMap<String, BridgeNetwork>,
) -> Result<NetworkMode, ConfigError> {
    let name = mode.as_ref().map(|m| m.get_ref().as_str());
    let mode = match (name, mode) {
        (None | Some("host"), _) => NetworkMode::Host,
        (Some("none"), _) => NetworkMode::None,
        (Some(n), Some(at)) => {
            if n != DEFAULT_NETWORK && !networks.contains_key(n) {
                let mut known: Vec<&str> = networks.keys().map(String::as_str).collect();
                if !known.contains(&DEFAULT_NETWORK) {
                    known.insert(0, DEFAULT_NETWORK);
                }
                return Err(loc.at(
                    at,
                    format!("{key}.network"),
                    format!(
                        "unknown network `{n}`: expected \"host\", \"none\" or a network: {}",
                        known
                            .iter()
                            .map(|k| format!("\"{k}\""))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
            NetworkMode::Bridged(Attachment {
                network: n.to_string(),
                address: Ipv4Addr::UNSPECIFIED,
                ports: Vec::new(),
            })
        }
        (Some(_), None) => NetworkMode::Host,
    };
    let bridged = |what: &str, at_span: std::ops::Range<usize>| -> ConfigError {
        loc.error(
            Some(at_span),
            format!("{key}.{what}"),
            format!(
                "`{what}` needs a bridged network: set `network = \"bridge\"` or the name of a [networks] table"
            ),
        )
    };
    let NetworkMode::Bridged(mut attachment) = mode else {
        if let Some(p) = ports {
            return Err(bridged("ports", p.span()));
        }
        if let Some(p) = pinned {
            return Err(bridged("ipv4_address", p.span()));
        }
        return Ok(mode);
    };
    if let Some(list) = ports {
        let mut seen = BTreeSet::new();
        for (i, text) in list.get_ref().iter().enumerate() {
            let port = PublishedPort::parse(text.get_ref()).ok_or_else(|| {
                loc.at(
                    text,
                    format!("{key}.ports[{i}]"),
                    "expected \"HOST_PORT:CONTAINER_PORT\", optionally with a host address in front (\"10.0.2.15:8080:80\") and /tcp or /udp behind",
                )
            })?;
            if !seen.insert((port.protocol, port.host_port, port.host_ip)) {
                return Err(loc.at(
                    text,
                    format!("{key}.ports[{i}]"),
                    format!("host port {} is published twice", port),
                ));
            }
            attachment.ports.push(port);
        }
    }
    if let Some(text) = pinned {
        let network = networks
            .get(&attachment.network)
            .cloned()
            .unwrap_or_else(|| BridgeNetwork::default_for(&attachment.network));
        let addr = text
            .get_ref()
            .parse::<Ipv4Addr>()
            .ok()
            .filter(|a| usable(&network, *a))
            .ok_or_else(|| {
                loc.at(
                    text,
                    format!("{key}.ipv4_address"),
                    format!(
                        "expected a free host address inside network `{}`'s {}/{} (not its network, broadcast or gateway {} address)",
                        attachment.network, network.subnet, network.prefix_len, network.gateway
                    ),
                )
            })?;
        attachment.address = addr;
    }
    Ok(NetworkMode::Bridged(attachment))
}

fn usable(network: &BridgeNetwork, addr: Ipv4Addr) -> bool {
    network.contains(addr)
        && addr != network.subnet
        && addr != network.broadcast()
        && addr != network.gateway
}

/// FNV-1a: stable across Rust versions and machines, unlike std's hasher.
fn name_hash(name: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in name.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

/// Adds the default network when a container uses it, then gives every bridged container
/// without a pinned address one derived from its name: a hash picks a slot in the subnet and
/// a taken slot moves on to the next (pinned addresses first, then containers in name order),
/// so an address changes only if another container's name lands on the same slot.
pub(crate) fn assign_addresses(
    loc: &Locator<'_>,
    spans: &BTreeMap<String, std::ops::Range<usize>>,
    networks: &mut BTreeMap<String, BridgeNetwork>,
    containers: &mut BTreeMap<String, Container>,
) -> Result<(), ConfigError> {
    let uses_default = containers.values().any(
        |c| matches!(&c.isolation.network, NetworkMode::Bridged(a) if a.network == DEFAULT_NETWORK),
    );
    if uses_default && !networks.contains_key(DEFAULT_NETWORK) {
        let default = BridgeNetwork::default_for(DEFAULT_NETWORK);
        for (other_name, other) in networks.iter() {
            let shorter = default.prefix_len.min(other.prefix_len);
            if mask(default.subnet, shorter) == mask(other.subnet, shorter)
                || default.bridge == other.bridge
            {
                return Err(loc.error(
                    None,
                    format!("networks.{other_name}"),
                    format!(
                        "clashes with the default network \"bridge\" ({}/{} on {}): declare [networks.bridge] with another subnet or bridge",
                        default.subnet, default.prefix_len, default.bridge
                    ),
                ));
            }
        }
        networks.insert(DEFAULT_NETWORK.to_string(), default);
    }
    for (network_name, network) in networks.iter() {
        let mut taken: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
        for (name, c) in containers.iter() {
            if let NetworkMode::Bridged(a) = &c.isolation.network
                && a.network == *network_name
                && !a.address.is_unspecified()
                && let Some(previous) = taken.insert(a.address, name.clone())
            {
                return Err(loc.error(
                    spans.get(name).cloned(),
                    format!("containers.{name}.ipv4_address"),
                    format!(
                        "{} is also container `{previous}`'s address on network `{network_name}`",
                        a.address
                    ),
                ));
            }
        }
        let hosts = (1u64 << (32 - network.prefix_len)) - 2;
        for (name, c) in containers.iter_mut() {
            let NetworkMode::Bridged(a) = &mut c.isolation.network else {
                continue;
            };
            if a.network != *network_name || !a.address.is_unspecified() {
                continue;
            }
            // One slot is the gateway's, so `hosts - 1` containers fit.
            if taken.len() as u64 >= hosts - 1 {
                return Err(loc.error(
                    spans.get(name).cloned(),
                    format!("containers.{name}.network"),
                    format!(
                        "network `{network_name}` ({}/{}) has no address left",
                        network.subnet, network.prefix_len
                    ),
                ));
            }
            let mut slot = u64::from(name_hash(name)) % hosts;
            loop {
                let addr = Ipv4Addr::from(u32::from(network.subnet) + 1 + slot as u32);
                if usable(network, addr) && !taken.contains_key(&addr) {
                    a.address = addr;
                    taken.insert(addr, name.clone());
                    break;
                }
                slot = (slot + 1) % hosts;
            }
        }
    }
    // Two containers may not claim the same port on the host, whatever their networks.
    let mut claimed: BTreeMap<(Protocol, u16), (Option<Ipv4Addr>, String)> = BTreeMap::new();
    for (name, c) in containers.iter() {
        let NetworkMode::Bridged(a) = &c.isolation.network else {
            continue;
        };
        for port in &a.ports {
            if let Some((ip, other)) = claimed.get(&(port.protocol, port.host_port))
                && (ip.is_none() || port.host_ip.is_none() || *ip == port.host_ip)
            {
                return Err(loc.error(
                    spans.get(name).cloned(),
                    format!("containers.{name}.ports"),
                    format!(
                        "host port {}/{} is already published by container `{other}`",
                        port.host_port,
                        port.protocol.as_str()
                    ),
                ));
            }
            claimed.insert(
                (port.protocol, port.host_port),
                (port.host_ip, name.clone()),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_ports_parse_in_docker_syntax() {
        assert_eq!(
            PublishedPort::parse("8080:80"),
            Some(PublishedPort {
                protocol: Protocol::Tcp,
                host_ip: None,
                host_port: 8080,
                container_port: 80
            })
        );
        let udp = PublishedPort::parse("10.0.2.15:5353:53/udp").unwrap();
        assert_eq!(udp.protocol, Protocol::Udp);
        assert_eq!(udp.host_ip, Some(Ipv4Addr::new(10, 0, 2, 15)));
        assert_eq!(udp.to_string(), "10.0.2.15:5353:53/udp");
        for bad in [
            "80",
            "0:80",
            "8080:80/sctp",
            "a:b",
            "1:2:3:4",
            "70000:80",
            "x:1:2",
        ] {
            assert_eq!(PublishedPort::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_name_hash_is_fnv1a() {
        // Reference values of 32-bit FNV-1a.
        assert_eq!(name_hash(""), 0x811c_9dc5);
        assert_eq!(name_hash("a"), 0xe40c_292c);
        assert_eq!(name_hash("foobar"), 0xbf9c_f968);
    }

    fn parse(body: &str) -> Result<crate::HostConfig, ConfigError> {
        let text = format!(
            "[host]\nhostname = \"h\"\n[images.bb]\nlayers = [\"busybox:/bin/busybox\"]\n{body}"
        );
        crate::HostConfig::parse(std::path::Path::new("/etc/keel/host.toml"), &text)
    }

    fn attachment(config: &crate::HostConfig, name: &str) -> Attachment {
        match &config.containers[name].isolation.network {
            NetworkMode::Bridged(a) => a.clone(),
            other => panic!("{name}: {other:?}"),
        }
    }

    #[test]
    fn the_default_network_appears_when_used_and_addresses_follow_names() {
        let config = parse(
            "[containers.web]\nimage = \"bb\"\nnetwork = \"bridge\"\nports = [\"8080:80\"]\n\
             [containers.db]\nimage = \"bb\"\nnetwork = \"bridge\"\n\
             [containers.tool]\nimage = \"bb\"\n",
        )
        .unwrap();
        let bridge = &config.networks[DEFAULT_NETWORK];
        assert_eq!(bridge.bridge, "keel0");
        assert_eq!(bridge.gateway, Ipv4Addr::new(10, 88, 0, 1));
        let web = attachment(&config, "web");
        let db = attachment(&config, "db");
        assert!(bridge.contains(web.address) && bridge.contains(db.address));
        assert_ne!(web.address, db.address);
        assert_eq!(web.ports[0].host_port, 8080);
        assert_eq!(
            config.containers["tool"].isolation.network,
            NetworkMode::Host
        );

        // Adding a container elsewhere in the file moves nobody.
        let again = parse(
            "[containers.aaa]\nimage = \"bb\"\nnetwork = \"bridge\"\n\
             [containers.web]\nimage = \"bb\"\nnetwork = \"bridge\"\n\
             [containers.db]\nimage = \"bb\"\nnetwork = \"bridge\"\n",
        )
        .unwrap();
        assert_eq!(attachment(&again, "web").address, web.address);
        assert_eq!(attachment(&again, "db").address, db.address);
    }

    #[test]
    fn no_network_declared_means_no_bridge() {
        let config = parse("[containers.a]\nimage = \"bb\"\nnetwork = \"none\"\n").unwrap();
        assert!(config.networks.is_empty());
    }

    #[test]
    fn a_small_network_fills_up_with_probing_and_then_refuses() {
        let mut body = String::from("[networks.tiny]\nsubnet = \"10.5.0.0/29\"\n");
        // /29: 6 hosts, one the gateway.
        for i in 0..5 {
            body.push_str(&format!(
                "[containers.c{i}]\nimage = \"bb\"\nnetwork = \"tiny\"\n"
            ));
        }
        let config = parse(&body).unwrap();
        let mut addresses: Vec<Ipv4Addr> = (0..5)
            .map(|i| attachment(&config, &format!("c{i}")).address)
            .collect();
        addresses.sort();
        addresses.dedup();
        assert_eq!(addresses.len(), 5);
        assert!(!addresses.contains(&Ipv4Addr::new(10, 5, 0, 1)));
        body.push_str("[containers.c5]\nimage = \"bb\"\nnetwork = \"tiny\"\n");
        let e = parse(&body).unwrap_err();
        assert!(e.message.contains("no address left"), "{e}");
    }

    #[test]
    fn pinned_addresses_are_kept_and_checked() {
        let config = parse(
            "[networks.back]\nsubnet = \"10.7.0.0/24\"\nbridge = \"br-back\"\nmasquerade = false\n\
             [containers.a]\nimage = \"bb\"\nnetwork = \"back\"\nipv4_address = \"10.7.0.50\"\n",
        )
        .unwrap();
        assert_eq!(
            attachment(&config, "a").address,
            Ipv4Addr::new(10, 7, 0, 50)
        );
        assert!(!config.networks["back"].masquerade);
        assert_eq!(config.networks["back"].bridge, "br-back");

        let e = parse(
            "[networks.back]\nsubnet = \"10.7.0.0/24\"\n\
             [containers.a]\nimage = \"bb\"\nnetwork = \"back\"\nipv4_address = \"10.7.0.1\"\n",
        )
        .unwrap_err();
        assert_eq!(e.key, "containers.a.ipv4_address");
        assert!(e.message.contains("gateway"), "{e}");

        let e = parse(
            "[networks.back]\nsubnet = \"10.7.0.0/24\"\n\
             [containers.a]\nimage = \"bb\"\nnetwork = \"back\"\nipv4_address = \"10.7.0.9\"\n\
             [containers.b]\nimage = \"bb\"\nnetwork = \"back\"\nipv4_address = \"10.7.0.9\"\n",
        )
        .unwrap_err();
        assert!(e.message.contains("also container `a`"), "{e}");
    }

    #[test]
    fn bad_networks_are_located_errors() {
        let e = parse("[networks.x]\nsubnet = \"10.7.0.1/24\"\n").unwrap_err();
        assert_eq!((e.key.as_str(), e.line), ("networks.x.subnet", 6));
        assert!(e.message.contains("10.7.0.0/24"), "{e}");
        let e = parse(
            "[networks.x]\nsubnet = \"10.7.0.0/16\"\n[networks.y]\nsubnet = \"10.7.3.0/24\"\n",
        )
        .unwrap_err();
        assert!(e.message.contains("overlaps network `x`"), "{e}");
        let e = parse("[networks.x]\nsubnet = \"10.7.0.0/24\"\nbridge = \"much-too-long-name\"\n")
            .unwrap_err();
        assert_eq!(e.key, "networks.x.bridge");
        let e = parse("[networks.x]\nsubnet = \"10.7.0.0/24\"\nnat = true\n").unwrap_err();
        assert!(e.message.contains("unknown field `nat`"), "{e}");
        let e = parse("[containers.a]\nimage = \"bb\"\nnetwork = \"nope\"\n").unwrap_err();
        assert_eq!(e.key, "containers.a.network");
        assert!(e.message.contains("\"bridge\""), "{e}");
    }

    #[test]
    fn ports_need_a_bridge_and_may_not_collide() {
        let e = parse("[containers.a]\nimage = \"bb\"\nports = [\"80:80\"]\n").unwrap_err();
        assert_eq!(e.key, "containers.a.ports");
        assert!(e.message.contains("bridged network"), "{e}");
        let e = parse(
            "[containers.a]\nimage = \"bb\"\nnetwork = \"bridge\"\nports = [\"80:80\"]\n\
             [containers.b]\nimage = \"bb\"\nnetwork = \"bridge\"\nports = [\"80:8080\"]\n",
        )
        .unwrap_err();
        assert!(
            e.message.contains("already published by container `a`"),
            "{e}"
        );
        // Same port number, different protocols: fine.
        parse(
            "[containers.a]\nimage = \"bb\"\nnetwork = \"bridge\"\nports = [\"53:53/udp\", \"53:53\"]\n",
        )
        .unwrap();
        let e = parse("[containers.a]\nimage = \"bb\"\nnetwork = \"bridge\"\nports = [\"80\"]\n")
            .unwrap_err();
        assert_eq!(e.key, "containers.a.ports[0]");
    }

    #[test]
    fn network_online_is_a_condition_not_a_container() {
        let config = parse(
            "[containers.a]\nimage = \"bb\"\ndepends_on = [\"network-online\"]\n\
             [containers.b]\nimage = \"bb\"\ndepends_on = { network-online = \"online\", a = \"started\" }\n",
        )
        .unwrap();
        let deps = &config.containers["b"].lifecycle.depends_on;
        assert!(
            deps.iter()
                .any(|d| d.name == "network-online"
                    && d.condition == crate::Condition::NetworkOnline)
        );
        assert_eq!(
            config.containers["a"].lifecycle.depends_on[0].condition,
            crate::Condition::NetworkOnline
        );
        let e = parse(
            "[containers.a]\nimage = \"bb\"\ndepends_on = { network-online = \"healthy\" }\n",
        )
        .unwrap_err();
        assert!(e.message.contains("\"online\""), "{e}");
        let e = parse("[containers.network-online]\nimage = \"bb\"\n").unwrap_err();
        assert!(e.message.contains("choose another container name"), "{e}");
    }
}
