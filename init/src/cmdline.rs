//! The kernel command line's `ip=` and `nameserver=` (dracut's syntax, see
//! dracut.cmdline(7)), turned into the same interface configuration the host file gives.
//!
//! Pure: the caller reads /proc/cmdline. Forms understood:
//!
//! - `ip={dhcp|on|any}`: DHCPv4 on `eth0` (dracut tries every interface; Keel's first NIC
//!   is eth0, and this keeps boot deterministic).
//! - `ip=<iface>:{dhcp|on|any}[:[<mtu>][:<macaddr>]]`
//! - `ip=<client-IP>:[<peer>]:<gateway-IP>:<netmask>:<hostname>:<iface>:{none|off|static|dhcp|on|any}[:[<mtu>][:<macaddr>]]`
//! - the same with `[:[<dns1>][:<dns2>]]` after the method
//! - `<client-IP>` may carry its prefix (`10.0.2.99/24`) with an empty netmask; IPv6
//!   addresses are written in brackets (`[fd00::2]`), and `<netmask>` may be a prefix length.
//! - `nameserver=<IP>`, any number of times: added to every `ip=` interface's servers.
//!
//! An empty `<iface>` means `eth0`. `<macaddr>` (setting the MAC) and `<peer>` are accepted
//! and ignored; `dhcp6`, `auto6`, `either6`, `link6` and `ibft` are reported as unsupported.

use std::net::{IpAddr, Ipv4Addr};

use keel_config::{Interface, LinkMatch, Prefix, Route};

/// The interface an `ip=` without one configures.
pub const DEFAULT_INTERFACE: &str = "eth0";

/// One `ip=` argument, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpArg {
    pub interface: String,
    /// Static addressing, or `None` for DHCP.
    pub address: Option<Prefix>,
    pub gateway: Option<IpAddr>,
    /// The hostname field. Keel's hostname comes from the host file; this is only logged.
    pub hostname: Option<String>,
    pub mtu: Option<u32>,
    pub dns: Vec<IpAddr>,
}

impl IpArg {
    /// The interface configuration this argument asks for, matched by kernel name.
    pub fn to_interface(&self) -> Interface {
        Interface {
            link: LinkMatch::Name(self.interface.clone()),
            dhcp4: self.address.is_none(),
            // The command line's interfaces are the ones boot needs: never optional.
            optional: false,
            slaac: true,
            addresses: self.address.into_iter().collect(),
            routes: self
                .gateway
                .map(|via| Route {
                    to: Prefix::default_for(&via),
                    via: Some(via),
                })
                .into_iter()
                .collect(),
            mtu: self.mtu,
            dns: self.dns.clone(),
        }
    }
}

/// What the command line asks of the network: the arguments it understood, and a message
/// for each `ip=` or `nameserver=` it could not use.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NetworkArgs {
    pub ip: Vec<IpArg>,
    pub errors: Vec<String>,
}

/// Parses every `ip=` and `nameserver=` of a kernel command line.
pub fn parse(cmdline: &str) -> NetworkArgs {
    let mut out = NetworkArgs::default();
    let mut nameservers = Vec::new();
    for word in cmdline.split_whitespace() {
        if let Some(value) = word.strip_prefix("ip=") {
            match parse_ip(value) {
                Ok(arg) => {
                    // A later `ip=` for the same interface replaces the earlier one.
                    out.ip.retain(|a| a.interface != arg.interface);
                    out.ip.push(arg);
                }
                Err(e) => out.errors.push(format!("ip={value}: {e}")),
            }
        } else if let Some(value) = word.strip_prefix("nameserver=") {
            match parse_addr(value) {
                Some(ip) => nameservers.push(ip),
                None => out
                    .errors
                    .push(format!("nameserver={value}: not an IP address")),
            }
        }
    }
    for arg in &mut out.ip {
        for ns in &nameservers {
            if !arg.dns.contains(ns) {
                arg.dns.push(*ns);
            }
        }
    }
    out
}

/// Splits on `:` outside brackets, so that `[fd00::2]` stays one field.
fn fields(value: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in value.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            ':' if depth == 0 => {
                out.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&value[start..]);
    out
}

/// An address, IPv6 optionally in brackets.
fn parse_addr(text: &str) -> Option<IpAddr> {
    let bare = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    bare.parse().ok()
}

fn is_dhcp(method: &str) -> bool {
    matches!(method, "dhcp" | "on" | "any")
}

fn check_method(method: &str) -> Result<bool, String> {
    match method {
        m if is_dhcp(m) => Ok(true),
        "none" | "off" | "static" | "" => Ok(false),
        "dhcp6" | "auto6" | "either6" | "link6" | "ibft" => Err(format!(
            "`{method}` is not supported (only DHCPv4 and static)"
        )),
        other => Err(format!("unknown method `{other}`")),
    }
}

fn parse_ip(value: &str) -> Result<IpArg, String> {
    let mut f = fields(value);
    // A trailing <macaddr> brings its own colons (as in dracut's parser): drop it whole.
    if f.len() >= 8 && keel_config::parse_mac(&f[f.len() - 6..].join(":")).is_some() {
        f.truncate(f.len() - 6);
    }
    match f.len() {
        1 => {
            if !is_dhcp(f[0]) {
                return Err(check_method(f[0])
                    .err()
                    .unwrap_or_else(|| "expected dhcp, or a static configuration".into()));
            }
            Ok(IpArg {
                interface: DEFAULT_INTERFACE.into(),
                address: None,
                gateway: None,
                hostname: None,
                mtu: None,
                dns: Vec::new(),
            })
        }
        2..=4 => {
            // <iface>:<method>[:<mtu>[:<mac>]]
            if !check_method(f[1])? {
                return Err("an interface without an address needs dhcp".into());
            }
            Ok(IpArg {
                interface: interface(f[0]),
                address: None,
                gateway: None,
                hostname: None,
                mtu: parse_mtu(f.get(2).copied())?,
                dns: Vec::new(),
            })
        }
        7..=9 => parse_static(&f),
        _ => Err("expected `dhcp`, `<iface>:dhcp` or `<client-IP>:[<peer>]:<gateway-IP>:<netmask>:<hostname>:<iface>:<method>`".into()),
    }
}

fn interface(text: &str) -> String {
    if text.is_empty() {
        DEFAULT_INTERFACE.into()
    } else {
        text.into()
    }
}

fn parse_mtu(text: Option<&str>) -> Result<Option<u32>, String> {
    match text {
        None | Some("") => Ok(None),
        Some(t) => t
            .parse::<u32>()
            .ok()
            .filter(|m| (68..=65535).contains(m))
            .map(Some)
            .ok_or_else(|| format!("`{t}` is not an MTU")),
    }
}

fn parse_static(f: &[&str]) -> Result<IpArg, String> {
    let dhcp = check_method(f[6])?;
    let iface = interface(f[5]);
    let hostname = Some(f[4]).filter(|h| !h.is_empty()).map(str::to_string);
    // After the method: either <mtu>[:<mac>] or <dns1>[:<dns2>].
    let mut mtu = None;
    let mut dns = Vec::new();
    for (n, extra) in f[7..].iter().enumerate() {
        if extra.is_empty() {
            continue;
        }
        if let Some(ip) = parse_addr(extra) {
            dns.push(ip);
        } else if n == 0 {
            mtu = parse_mtu(Some(extra))?;
        } else if keel_config::parse_mac(extra).is_none() {
            return Err(format!(
                "`{extra}` is neither a name server, an MTU nor a MAC address"
            ));
        }
    }
    if dhcp {
        return Ok(IpArg {
            interface: iface,
            address: None,
            gateway: None,
            hostname,
            mtu,
            dns,
        });
    }
    let (addr_text, prefix_text) = match f[0].split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (f[0], None),
    };
    let addr =
        parse_addr(addr_text).ok_or_else(|| format!("`{}` is not a client address", f[0]))?;
    let len = match (prefix_text, f[3]) {
        (Some(p), "") => prefix_len(p, &addr)?,
        (None, mask) if !mask.is_empty() => prefix_len(mask, &addr)?,
        (Some(_), _) => return Err("give the prefix length or the netmask, not both".into()),
        (None, _) => return Err("a static address needs a netmask or a /prefix".into()),
    };
    let gateway = match f[2] {
        "" => None,
        g => {
            let gw = parse_addr(g).ok_or_else(|| format!("`{g}` is not a gateway address"))?;
            if gw.is_ipv4() != addr.is_ipv4() {
                return Err("the gateway and the client address differ in IP version".into());
            }
            Some(gw)
        }
    };
    Ok(IpArg {
        interface: iface,
        address: Some(Prefix { addr, len }),
        gateway,
        hostname,
        mtu,
        dns,
    })
}

/// A prefix length from `24`, or from a dotted IPv4 netmask such as `255.255.255.0`.
fn prefix_len(text: &str, addr: &IpAddr) -> Result<u8, String> {
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if let Ok(n) = text.parse::<u8>()
        && n <= max
    {
        return Ok(n);
    }
    if addr.is_ipv4()
        && let Ok(mask) = text.parse::<Ipv4Addr>()
    {
        let bits = u32::from(mask);
        let len = bits.leading_ones();
        // Contiguous ones only: 255.0.255.0 is not a netmask.
        if bits.checked_shl(len).unwrap_or(0) == 0 {
            return Ok(len as u8);
        }
    }
    Err(format!("`{text}` is not a netmask or prefix length"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(cmdline: &str) -> IpArg {
        let args = parse(cmdline);
        assert!(args.errors.is_empty(), "{:?}", args.errors);
        assert_eq!(args.ip.len(), 1, "{args:?}");
        args.ip[0].clone()
    }

    fn err(cmdline: &str) -> String {
        let args = parse(cmdline);
        assert!(args.ip.is_empty(), "{args:?}");
        assert_eq!(args.errors.len(), 1, "{args:?}");
        args.errors[0].clone()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn no_ip_argument_configures_nothing() {
        let args = parse("console=ttyS0 quiet rdinit=/init ipv6.disable=0 nip=dhcp");
        assert_eq!(args, NetworkArgs::default());
    }

    #[test]
    fn bare_dhcp_means_eth0() {
        for m in ["dhcp", "on", "any"] {
            let a = one(&format!("console=ttyS0 ip={m}"));
            assert_eq!(a.interface, "eth0");
            assert_eq!(a.address, None);
            assert!(a.to_interface().dhcp4);
        }
    }

    #[test]
    fn interface_dhcp_with_an_mtu_and_a_mac() {
        let a = one("ip=ens3:dhcp");
        assert_eq!(a.interface, "ens3");
        assert_eq!(a.address, None);
        let a = one("ip=eth1:dhcp:1400:52:54:00:12:34:56");
        // Without brackets a MAC splits into more fields than dracut's short form has.
        assert_eq!(a.interface, "eth1");
        assert_eq!(a.mtu, Some(1400));
        let a = one("ip=eth1:on:9000");
        assert_eq!(a.mtu, Some(9000));
        let a = one("ip=10.0.2.99/24::10.0.2.2::h:eth0:none:1400:52:54:00:12:34:56");
        assert_eq!(a.mtu, Some(1400));
        assert_eq!(a.gateway, Some(ip("10.0.2.2")));
    }

    #[test]
    fn the_classic_static_form_with_a_netmask() {
        let a = one("ip=10.0.2.99::10.0.2.2:255.255.255.0:cmdhost:eth0:none");
        assert_eq!(a.interface, "eth0");
        assert_eq!(
            a.address,
            Some(Prefix {
                addr: ip("10.0.2.99"),
                len: 24
            })
        );
        assert_eq!(a.gateway, Some(ip("10.0.2.2")));
        assert_eq!(a.hostname.as_deref(), Some("cmdhost"));
        let i = a.to_interface();
        assert!(!i.dhcp4);
        assert_eq!(i.link, LinkMatch::Name("eth0".into()));
        assert_eq!(i.routes[0].to, Prefix::parse("0.0.0.0/0").unwrap());
    }

    #[test]
    fn static_with_name_servers() {
        let a = one("ip=192.168.1.5::192.168.1.1:255.255.0.0:h:enp1s0:off:192.168.1.1:8.8.8.8");
        assert_eq!(a.address.unwrap().len, 16);
        assert_eq!(a.dns, [ip("192.168.1.1"), ip("8.8.8.8")]);
        let a = one("ip=192.168.1.5::192.168.1.1:255.255.255.0::eth0:none:1.1.1.1");
        assert_eq!(a.dns, [ip("1.1.1.1")]);
        assert_eq!(a.hostname, None);
    }

    #[test]
    fn static_with_an_mtu() {
        let a = one("ip=192.168.1.5::192.168.1.1:24::eth0:none:1500");
        assert_eq!(a.mtu, Some(1500));
        assert!(a.dns.is_empty());
    }

    #[test]
    fn the_prefix_form_and_ipv6_in_brackets() {
        let a = one("ip=10.0.2.99/24::10.0.2.2::cmdhost:eth0:none");
        assert_eq!(a.address.unwrap().len, 24);
        assert_eq!(a.gateway, Some(ip("10.0.2.2")));
        let a = one("ip=[fd00::2]::[fd00::1]:64::eth1:none:[fd00::53]");
        assert_eq!(
            a.address,
            Some(Prefix {
                addr: ip("fd00::2"),
                len: 64
            })
        );
        assert_eq!(a.gateway, Some(ip("fd00::1")));
        assert_eq!(a.dns, [ip("fd00::53")]);
        assert_eq!(
            a.to_interface().routes[0].to,
            Prefix::parse("::/0").unwrap()
        );
    }

    #[test]
    fn an_empty_interface_is_eth0_and_no_gateway_is_fine() {
        let a = one("ip=10.0.2.99:::255.255.255.0:::none");
        assert_eq!(a.interface, "eth0");
        assert_eq!(a.gateway, None);
        assert!(a.to_interface().routes.is_empty());
    }

    #[test]
    fn the_static_form_with_dhcp_is_dhcp() {
        let a = one("ip=::::myhost:eth2:dhcp");
        assert_eq!(a.interface, "eth2");
        assert_eq!(a.address, None);
        assert_eq!(a.hostname.as_deref(), Some("myhost"));
    }

    #[test]
    fn nameserver_arguments_join_every_interface() {
        let args = parse(
            "ip=eth0:dhcp nameserver=9.9.9.9 ip=10.1.0.7/24:::::eth1:none nameserver=[2620:fe::fe]",
        );
        assert!(args.errors.is_empty(), "{:?}", args.errors);
        assert_eq!(args.ip.len(), 2);
        for a in &args.ip {
            assert_eq!(a.dns, [ip("9.9.9.9"), ip("2620:fe::fe")]);
        }
    }

    #[test]
    fn a_later_argument_for_an_interface_wins() {
        let args = parse("ip=eth0:dhcp ip=10.0.2.99/24:::::eth0:none");
        assert_eq!(args.ip.len(), 1);
        assert!(args.ip[0].address.is_some());
    }

    #[test]
    fn unusable_arguments_are_reported_not_guessed() {
        assert!(err("ip=dhcp6").contains("not supported"));
        assert!(err("ip=eth0:auto6").contains("not supported"));
        assert!(err("ip=eth0:none").contains("needs dhcp"));
        assert!(err("ip=10.0.2.99::10.0.2.2:255.0.255.0::eth0:none").contains("netmask"));
        assert!(err("ip=10.0.2.99::10.0.2.2:::eth0:none").contains("netmask"));
        assert!(err("ip=10.0.2.99/24::10.0.2.2:255.255.255.0::eth0:none").contains("not both"));
        assert!(err("ip=10.0.2.999::10.0.2.2:24::eth0:none").contains("client address"));
        assert!(err("ip=10.0.2.9::fd00::1:24::eth0:none").contains("eth0"));
        assert!(err("ip=10.0.2.9::[fd00::1]:24::eth0:none").contains("IP version"));
        assert!(err("ip=10.0.2.9::10.0.2.2:24::eth0:bogus").contains("unknown method"));
        assert!(err("ip=10.0.2.9::10.0.2.2:24::eth0:none:20").contains("MTU"));
        assert!(err("ip=a:b:c:d:e").contains("expected"));
        assert!(err("nameserver=dns.example").contains("not an IP"));
    }
}
