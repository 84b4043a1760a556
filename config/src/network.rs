//! `[network.interfaces.NAME]`: which link a table configures and how.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Deserialize;
use toml::Spanned;

use crate::{ConfigError, Locator};

/// How one network interface is configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Which link the table is for.
    pub link: LinkMatch,
    /// DHCPv4 runs on the link (`dhcp4 = true` or `"optional"`).
    pub dhcp4: bool,
    /// `dhcp4 = "optional"`: the host counts as online without this link's lease, and boot
    /// does not wait for it. Static links and `dhcp4 = true` ones are required.
    pub optional: bool,
    /// IPv6 stateless autoconfiguration from router advertisements (`slaac`, default on).
    pub slaac: bool,
    /// Static addresses, IPv4 and IPv6, in file order.
    pub addresses: Vec<Prefix>,
    /// Static routes, `gateway` included as a default route.
    pub routes: Vec<Route>,
    pub mtu: Option<u32>,
    /// Name servers for /etc/resolv.conf.
    pub dns: Vec<IpAddr>,
}

impl Interface {
    /// A DHCPv4 interface matched by kernel name.
    pub fn dhcp4(name: &str) -> Interface {
        Interface {
            link: LinkMatch::Name(name.to_string()),
            dhcp4: true,
            optional: false,
            slaac: true,
            addresses: Vec::new(),
            routes: Vec::new(),
            mtu: None,
            dns: Vec::new(),
        }
    }
}

/// How a table finds its link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkMatch {
    /// By kernel name: the table's name unless `match` says otherwise.
    Name(String),
    /// By hardware address (/sys/class/net/*/address).
    Mac([u8; 6]),
    /// By driver name (the file name of /sys/class/net/*/device/driver).
    Driver(String),
}

/// An address with its prefix length, or a destination network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Prefix {
    /// Parses `ADDR/LEN`, IPv4 or IPv6.
    pub fn parse(text: &str) -> Option<Prefix> {
        let (addr, len) = text.split_once('/')?;
        let addr: IpAddr = addr.parse().ok()?;
        let len: u8 = len.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (len <= max).then_some(Prefix { addr, len })
    }

    /// The default route's destination for a family.
    pub fn default_for(addr: &IpAddr) -> Prefix {
        Prefix {
            addr: match addr {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            },
            len: 0,
        }
    }
}

/// A static route: `to` through `via`, or on-link when `via` is absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub to: Prefix,
    pub via: Option<IpAddr>,
}

/// Parses `52:54:00:12:34:56` (case-insensitive).
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

pub(crate) mod raw {
    use super::*;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Interface {
        #[serde(rename = "match")]
        pub link: Option<Spanned<Match>>,
        /// `true`, `false` or `"optional"`; checked in `validate_interface`.
        pub dhcp4: Option<Spanned<toml::Value>>,
        pub slaac: Option<bool>,
        pub address: Option<Spanned<String>>,
        pub addresses: Option<Spanned<Vec<Spanned<String>>>>,
        pub gateway: Option<Spanned<String>>,
        #[serde(default)]
        pub routes: Vec<Spanned<Route>>,
        pub mtu: Option<Spanned<i64>>,
        #[serde(default)]
        pub dns: Vec<Spanned<String>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Match {
        pub mac: Option<Spanned<String>>,
        pub driver: Option<Spanned<String>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Route {
        pub to: Spanned<String>,
        pub via: Option<Spanned<String>>,
    }
}

pub(crate) fn validate_interface(
    loc: &Locator<'_>,
    key: &str,
    name: &str,
    iface: &Spanned<raw::Interface>,
) -> Result<Interface, ConfigError> {
    let i = iface.get_ref();
    let (dhcp4, optional) = match &i.dhcp4 {
        None => (false, false),
        Some(v) => match v.get_ref() {
            toml::Value::Boolean(b) => (*b, false),
            toml::Value::String(s) if s == "optional" => (true, true),
            _ => {
                return Err(loc.at(
                    v,
                    format!("{key}.dhcp4"),
                    "expected `true`, `false` or \"optional\"",
                ));
            }
        },
    };
    // How the file spelled it, for the messages below.
    let dhcp4_text = if optional {
        "dhcp4 = \"optional\""
    } else {
        "dhcp4 = true"
    };
    let link = match &i.link {
        // The kernel's limit is IFNAMSIZ - 1; `/` and `:` would break sysfs paths and aliases.
        None if name.is_empty()
            || name.len() > 15
            || name
                .chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace()) =>
        {
            return Err(loc.at(
                iface,
                key,
                format!("`{name}` is not an interface name: expected up to 15 characters without `/`, `:` or spaces, or a `match` to find the link by MAC or driver"),
            ));
        }
        None => LinkMatch::Name(name.to_string()),
        Some(m) => match (&m.get_ref().mac, &m.get_ref().driver) {
            (Some(mac), None) => LinkMatch::Mac(parse_mac(mac.get_ref()).ok_or_else(|| {
                loc.at(
                    mac,
                    format!("{key}.match.mac"),
                    "expected a MAC address such as \"52:54:00:12:34:56\"",
                )
            })?),
            (None, Some(driver)) => {
                let d = driver.get_ref();
                if d.is_empty() || d.contains('/') {
                    return Err(loc.at(
                        driver,
                        format!("{key}.match.driver"),
                        "expected a driver name such as \"virtio_net\"",
                    ));
                }
                LinkMatch::Driver(d.clone())
            }
            _ => {
                return Err(loc.at(
                    m,
                    format!("{key}.match"),
                    "expected exactly one of `mac` or `driver`",
                ));
            }
        },
    };

    let mut addresses = Vec::new();
    if let (Some(_), Some(list)) = (&i.address, &i.addresses) {
        return Err(loc.at(
            list,
            format!("{key}.addresses"),
            "`address` and `addresses` exclude each other: list every address in `addresses`",
        ));
    }
    let single = i.address.as_ref().map(|a| (a, format!("{key}.address")));
    let listed = i.addresses.iter().flat_map(|list| {
        list.get_ref()
            .iter()
            .enumerate()
            .map(|(n, a)| (a, format!("{key}.addresses[{n}]")))
    });
    for (text, at) in single.into_iter().chain(listed) {
        addresses.push(Prefix::parse(text.get_ref()).ok_or_else(|| {
            loc.at(
                text,
                at,
                "expected an address with a prefix length, such as \"10.0.2.15/24\" or \"fd00::2/64\"",
            )
        })?);
    }

    let mut routes = Vec::new();
    if let Some(gw) = &i.gateway {
        let via: IpAddr = gw.get_ref().parse().map_err(|_| {
            loc.at(
                gw,
                format!("{key}.gateway"),
                "expected an IP address such as \"10.0.2.2\"",
            )
        })?;
        routes.push(Route {
            to: Prefix::default_for(&via),
            via: Some(via),
        });
    }
    for (n, route) in i.routes.iter().enumerate() {
        routes.push(validate_route(loc, &format!("{key}.routes[{n}]"), route)?);
    }

    let mtu = match &i.mtu {
        None => None,
        Some(m) => Some(
            u32::try_from(*m.get_ref())
                .ok()
                .filter(|m| (68..=65535).contains(m))
                .ok_or_else(|| {
                    loc.at(m, format!("{key}.mtu"), "expected an MTU from 68 to 65535")
                })?,
        ),
    };

    let mut dns = Vec::new();
    for (n, server) in i.dns.iter().enumerate() {
        dns.push(server.get_ref().parse::<IpAddr>().map_err(|_| {
            loc.at(
                server,
                format!("{key}.dns[{n}]"),
                "expected an IPv4 or IPv6 address",
            )
        })?);
    }

    if dhcp4 {
        // A lease brings its own address, router and servers; static ones beside it would
        // fight the lease on every renewal.
        let conflict = [
            i.address.as_ref().map(|a| (a.span(), "address")),
            i.addresses.as_ref().map(|a| (a.span(), "addresses")),
            i.gateway.as_ref().map(|a| (a.span(), "gateway")),
            i.routes.first().map(|a| (a.span(), "routes")),
            i.dns.first().map(|a| (a.span(), "dns")),
        ];
        if let Some((span, what)) = conflict.into_iter().flatten().next() {
            return Err(loc.error(
                Some(span),
                format!("{key}.{what}"),
                format!("`{what}` and `{dhcp4_text}` exclude each other: DHCP supplies its own"),
            ));
        }
    } else if addresses.is_empty() {
        return Err(loc.at(
            iface,
            key,
            "expected `dhcp4 = true` (or `\"optional\"`) or static `addresses = [\"A.B.C.D/N\", ...]` (or `address`)",
        ));
    }
    Ok(Interface {
        link,
        dhcp4,
        optional,
        slaac: i.slaac.unwrap_or(true),
        addresses,
        routes,
        mtu,
        dns,
    })
}

fn validate_route(
    loc: &Locator<'_>,
    key: &str,
    route: &Spanned<raw::Route>,
) -> Result<Route, ConfigError> {
    let r = route.get_ref();
    let via = match &r.via {
        None => None,
        Some(v) => Some(v.get_ref().parse::<IpAddr>().map_err(|_| {
            loc.at(
                v,
                format!("{key}.via"),
                "expected an IP address such as \"10.0.2.2\" or \"fd00::1\"",
            )
        })?),
    };
    let to = if r.to.get_ref() == "default" {
        match &via {
            Some(v) => Prefix::default_for(v),
            None => {
                return Err(loc.at(
                    &r.to,
                    format!("{key}.to"),
                    "a default route needs `via` (write \"0.0.0.0/0\" or \"::/0\" for an on-link one)",
                ));
            }
        }
    } else {
        Prefix::parse(r.to.get_ref()).ok_or_else(|| {
            loc.at(
                &r.to,
                format!("{key}.to"),
                "expected \"default\" or a network such as \"10.9.0.0/16\" or \"::/0\"",
            )
        })?
    };
    if let (Some(v), Some(at)) = (&via, &r.via)
        && v.is_ipv4() != to.addr.is_ipv4()
    {
        return Err(loc.at(
            at,
            format!("{key}.via"),
            format!("`{v}` and `{to}` are not of the same IP version"),
        ));
    }
    Ok(Route { to, via })
}

/// Two tables for the same link would fight over it: name or MAC may be used once. (Driver
/// matches may repeat: each takes the next link of that driver.)
pub(crate) fn check_duplicates(
    loc: &Locator<'_>,
    raw: &std::collections::BTreeMap<String, Spanned<raw::Interface>>,
    validated: &std::collections::BTreeMap<String, Interface>,
) -> Result<(), ConfigError> {
    let mut seen: Vec<(&LinkMatch, &str)> = Vec::new();
    for (name, iface) in validated {
        if matches!(iface.link, LinkMatch::Driver(_)) {
            continue;
        }
        if let Some((_, first)) = seen.iter().find(|(l, _)| **l == iface.link) {
            let at = raw.get(name).map(Spanned::span);
            return Err(loc.error(
                at,
                format!("network.interfaces.{name}"),
                format!("[network.interfaces.{first}] already configures this link"),
            ));
        }
        seen.push((&iface.link, name));
    }
    Ok(())
}
