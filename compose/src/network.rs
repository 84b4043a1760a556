//! Networks and ports: Compose's bridge networks become `[networks.NAME]` (the `default`
//! network is Keel's `bridge`), a service joins one of them or `network_mode: host|none`,
//! and `ports` become published ports.

use crate::Context;
use crate::emit::{HostFile, Section};
use crate::yaml::Node;

/// Keel's name for the Compose network `name`.
fn keel_network(name: &str) -> String {
    if name == "default" {
        "bridge".into()
    } else {
        name.to_string()
    }
}

/// The top-level `networks`.
pub(crate) fn top_level_networks(cx: &mut Context, node: &Node, host: &mut HostFile) {
    let Some(entries) = node.entries() else {
        if !node.is_null() {
            cx.error(node.line, "networks", "expected a mapping of networks");
        }
        return;
    };
    let mut next_subnet = 0u32;
    for (key, net) in entries {
        let path = format!("networks.{}", key.name);
        let name = keel_network(&key.name);
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            cx.error(
                key.line,
                &path,
                "a network name is letters, digits, `-` and `_`",
            );
            continue;
        }
        let mut section = Section {
            name: name.clone(),
            ..Section::default()
        };
        let mut subnet = None;
        if let Some(fields) = net.entries() {
            for (field, value) in fields {
                let at = format!("{path}.{}", field.name);
                match field.name.as_str() {
                    "driver" => {
                        if let Some(driver) = cx.text(value, &at)
                            && driver != "bridge"
                        {
                            cx.error(
                                field.line,
                                &at,
                                format!("driver `{driver}`: Keel's container networks are bridges"),
                            );
                        }
                    }
                    "internal" => {
                        if cx.bool(value, &at) == Some(true) {
                            section.set_commented(
                                "masquerade",
                                false,
                                Some("internal: no way out but the host and published ports"),
                            );
                        }
                    }
                    "ipam" => subnet = ipam(cx, value, &at, &mut section),
                    "name" => {
                        cx.warn(field.line, &at, "Keel names the network after its key");
                    }
                    "external" => cx.warn(
                        field.line,
                        &at,
                        "Keel makes every network itself; this one is made like the others",
                    ),
                    "driver_opts" | "labels" | "attachable" | "enable_ipv6" => cx.warn(
                        field.line,
                        &at,
                        format!("`{}` has no meaning on Keel; left out", field.name),
                    ),
                    name if name.starts_with("x-") => {}
                    other => cx.error(field.line, &at, format!("unknown network key `{other}`")),
                }
            }
        } else if !net.is_null() {
            cx.error(net.line, &path, "expected a mapping");
        }
        match subnet {
            Some(_) => {}
            // Keel's own default for `bridge`.
            None if name == "bridge" => {}
            None => {
                next_subnet += 1;
                section.set_commented(
                    "subnet",
                    format!("10.89.{next_subnet}.0/24"),
                    Some("Compose picks a subnet at run time; Keel fixes one at build time"),
                );
            }
        }
        if format!("kn-{name}").len() > 15 {
            let short: String = name.chars().take(12).collect();
            section.set_commented(
                "bridge",
                format!("kn-{short}"),
                Some("an interface name has at most 15 characters"),
            );
        }
        host.declared_networks
            .push((key.name.clone(), name.clone()));
        // `bridge` with nothing but defaults needs no table.
        if !(name == "bridge" && section.entries.is_empty()) {
            host.networks.push(section);
        }
    }
}

/// `ipam.config[0]`'s subnet and gateway onto `section`; the subnet if there is one.
fn ipam(cx: &mut Context, node: &Node, path: &str, section: &mut Section) -> Option<String> {
    let configs = node.get("config")?;
    let Some(items) = configs.items() else {
        cx.error(configs.line, &format!("{path}.config"), "expected a list");
        return None;
    };
    if items.len() > 1 {
        cx.error(
            items[1].line,
            &format!("{path}.config[1]"),
            "Keel gives a network one IPv4 subnet",
        );
    }
    let first = items.first()?;
    let mut subnet = None;
    for (field, value) in first.entries().unwrap_or_default() {
        let at = format!("{path}.config[0].{}", field.name);
        match field.name.as_str() {
            "subnet" => {
                if let Some(text) = cx.text(value, &at) {
                    section.set("subnet", text);
                    subnet = Some(text.to_string());
                }
            }
            "gateway" => {
                if let Some(text) = cx.text(value, &at) {
                    section.set("gateway", text);
                }
            }
            "ip_range" | "aux_addresses" => cx.warn(
                field.line,
                &at,
                "Keel derives each container's address from its name (pin one with ipv4_address)",
            ),
            other => cx.error(field.line, &at, format!("unknown ipam key `{other}`")),
        }
    }
    subnet
}

/// The service's network: `network_mode`, or the one network of `networks`, or the default.
pub(crate) fn service_network(
    cx: &mut Context,
    service: &Node,
    host: &HostFile,
    section: &mut Section,
) -> String {
    if let Some(mode) = service.get("network_mode") {
        let path = format!("services.{}.network_mode", section.name);
        let Some(text) = cx.text(mode, &path) else {
            return "none".into();
        };
        return match text {
            "host" | "none" | "bridge" => {
                section.set("network", text);
                text.to_string()
            }
            other => {
                cx.error(
                    mode.line,
                    &path,
                    format!("`{other}`: Keel runs a container on the host's network, on none, or on one bridge network (another container's namespace is not shared)"),
                );
                "none".into()
            }
        };
    }
    let mut chosen = "default".to_string();
    let mut address = None;
    if let Some(networks) = service.get("networks") {
        let path = format!("services.{}.networks", section.name);
        let names: Vec<(String, usize, Option<&Node>)> = if let Some(items) = networks.items() {
            items
                .iter()
                .filter_map(|n| n.text().map(|t| (t.to_string(), n.line, None)))
                .collect()
        } else if let Some(entries) = networks.entries() {
            entries
                .iter()
                .map(|(k, v)| (k.name.clone(), k.line, Some(v)))
                .collect()
        } else {
            cx.error(
                networks.line,
                &path,
                "expected a list or a mapping of networks",
            );
            Vec::new()
        };
        if names.len() > 1 {
            cx.error(
                names[1].1,
                &path,
                "Keel attaches a container to one network: services that must reach it join the same one",
            );
        }
        if let Some((name, line, settings)) = names.into_iter().next() {
            if name != "default" && !host.declared_networks.iter().any(|(n, _)| *n == name) {
                cx.error(
                    line,
                    &path,
                    format!("network `{name}` is not declared under the top-level `networks`"),
                );
            }
            chosen = name;
            for (field, value) in settings.and_then(Node::entries).unwrap_or_default() {
                let at = format!("{path}.{chosen}.{}", field.name);
                match field.name.as_str() {
                    "ipv4_address" => {
                        address = cx.text(value, &at).map(str::to_string);
                    }
                    "aliases" => cx.warn(
                        field.line,
                        &at,
                        "other containers reach this one by its service name only",
                    ),
                    "priority" | "link_local_ips" | "mac_address" | "driver_opts" => cx.warn(
                        field.line,
                        &at,
                        format!("`{}` has no meaning on Keel; left out", field.name),
                    ),
                    other => cx.error(field.line, &at, format!("unknown key `{other}`")),
                }
            }
        }
    }
    let keel = host
        .declared_networks
        .iter()
        .find(|(n, _)| *n == chosen)
        .map(|(_, k)| k.clone())
        .unwrap_or_else(|| keel_network(&chosen));
    section.set("network", keel.clone());
    if let Some(address) = address {
        section.set("ipv4_address", address);
    }
    keel
}

/// `ports` as Keel's published ports.
pub(crate) fn ports(cx: &mut Context, node: &Node, path: &str, network: &str) -> Vec<String> {
    let Some(items) = node.items() else {
        cx.error(node.line, path, "expected a list of ports");
        return Vec::new();
    };
    if network == "host" || network == "none" {
        cx.warn(
            node.line,
            path,
            format!("left out: a container on network `{network}` publishes nothing (on the host network its ports are the host's)"),
        );
        return Vec::new();
    }
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("{path}[{i}]");
        let parsed = match item.entries() {
            Some(_) => long_port(cx, item, &at),
            None => match item.text() {
                Some(text) => short_port(text)
                    .map_err(|e| cx.error(item.line, &at, e))
                    .ok(),
                None => {
                    cx.error(item.line, &at, "expected a port");
                    None
                }
            },
        };
        out.extend(parsed.unwrap_or_default());
    }
    out
}

/// `[IP:][HOST:]CONTAINER[/PROTO]`, ranges allowed, as Keel ports.
fn short_port(text: &str) -> Result<Vec<String>, String> {
    let (spec, proto) = match text.rsplit_once('/') {
        Some((spec, proto)) => (spec, proto),
        None => (text, "tcp"),
    };
    if !matches!(proto, "tcp" | "udp") {
        return Err(format!(
            "`{text}`: protocol `{proto}`: Keel publishes tcp and udp"
        ));
    }
    if spec.starts_with('[') {
        return Err(format!("`{text}`: Keel publishes on IPv4 addresses"));
    }
    let parts: Vec<&str> = spec.split(':').collect();
    let (ip, host, container) = match parts.as_slice() {
        [container] => (None, None, *container),
        [host, container] => (None, Some(*host), *container),
        [ip, host, container] => (Some(*ip), Some(*host), *container),
        _ => {
            return Err(format!(
                "`{text}`: expected [IP:][HOST:]CONTAINER[/PROTOCOL]"
            ));
        }
    };
    let host = match host.filter(|h| !h.is_empty()) {
        Some(host) => host,
        None => {
            return Err(format!(
                "`{text}`: Keel publishes on a host port you choose: write HOST:{container}"
            ));
        }
    };
    let range = |s: &str| -> Result<(u16, u16), String> {
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let a: u16 = a
            .parse()
            .map_err(|_| format!("`{text}`: `{s}` is not a port"))?;
        let b: u16 = b
            .parse()
            .map_err(|_| format!("`{text}`: `{s}` is not a port"))?;
        if a == 0 || b < a {
            return Err(format!("`{text}`: `{s}` is not a port range"));
        }
        Ok((a, b))
    };
    let (h0, h1) = range(host)?;
    let (c0, c1) = range(container)?;
    if h1 - h0 != c1 - c0 {
        return Err(format!(
            "`{text}`: the host and container ranges differ in length"
        ));
    }
    let prefix = ip.map(|ip| format!("{ip}:")).unwrap_or_default();
    let suffix = if proto == "udp" { "/udp" } else { "" };
    Ok((0..=(h1 - h0))
        .map(|i| format!("{prefix}{}:{}{suffix}", h0 + i, c0 + i))
        .collect())
}

/// `{ target, published, host_ip, protocol, mode }`.
fn long_port(cx: &mut Context, node: &Node, path: &str) -> Option<Vec<String>> {
    let mut target = None;
    let mut published = None;
    let mut ip = None;
    let mut proto = "tcp".to_string();
    for (field, value) in node.entries().unwrap_or_default() {
        let at = format!("{path}.{}", field.name);
        match field.name.as_str() {
            "target" => target = cx.text(value, &at).map(str::to_string),
            "published" => published = cx.text(value, &at).map(str::to_string),
            "host_ip" => ip = cx.text(value, &at).map(str::to_string),
            "protocol" => proto = cx.text(value, &at).unwrap_or("tcp").to_string(),
            "mode" | "name" | "app_protocol" => {}
            other => cx.error(field.line, &at, format!("unknown port key `{other}`")),
        }
    }
    let Some(target) = target else {
        cx.error(node.line, path, "a port needs `target`");
        return None;
    };
    let mut short = String::new();
    if let Some(ip) = ip {
        short.push_str(&ip);
        short.push(':');
    }
    short.push_str(published.as_deref().unwrap_or(""));
    short.push(':');
    short.push_str(&target);
    short.push('/');
    short.push_str(&proto);
    match short_port(&short) {
        Ok(ports) => Some(ports),
        Err(e) => {
            cx.error(node.line, path, e);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_ports() {
        assert_eq!(short_port("8080:80").unwrap(), ["8080:80"]);
        assert_eq!(
            short_port("127.0.0.1:5432:5432").unwrap(),
            ["127.0.0.1:5432:5432"]
        );
        assert_eq!(short_port("53:53/udp").unwrap(), ["53:53/udp"]);
        assert_eq!(
            short_port("9000-9001:8000-8001").unwrap(),
            ["9000:8000", "9001:8001"]
        );
        assert!(short_port("80").unwrap_err().contains("HOST:80"));
        assert!(short_port("1-3:1-2").is_err());
        assert!(short_port("80:80/sctp").is_err());
        assert!(short_port("[::1]:80:80").is_err());
    }
}
