//! Host networking over rtnetlink: loopback, static addresses and DHCPv4 (mozim), routes,
//! and /etc/resolv.conf. No `ip`, no dhclient.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use keel_config::Interface;
use mozim::{DhcpV4Client, DhcpV4Config, DhcpV4Lease, DhcpV4State};
use netlink_packet_route::link::LinkAttribute;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use tokio::sync::oneshot;

/// How long boot waits for an interface to appear after its driver loaded.
const LINK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long boot waits for a first DHCP lease before starting containers without it.
const FIRST_LEASE_TIMEOUT: Duration = Duration::from_secs(30);

/// Addressing applied to one interface, for the log and resolv.conf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub search: Vec<String>,
    pub mtu: Option<u16>,
}

/// Brings up `lo` and every configured interface. DHCP interfaces keep renewing in the
/// background; this returns once each has its first lease (or gave up waiting).
pub async fn configure(
    interfaces: &BTreeMap<String, Interface>,
    hostname: &str,
) -> Result<(), String> {
    let (connection, handle, messages) =
        rtnetlink::new_connection().map_err(|e| format!("netlink: {e}"))?;
    // Unsolicited messages are not used; dropping the receiver lets the connection end.
    drop(messages);
    tokio::spawn(connection);

    let lo = link_index(&handle, "lo")
        .await?
        .ok_or("no loopback interface")?;
    set_up(&handle, lo).await?;

    let mut applied = Vec::new();
    let mut pending = Vec::new();
    for (name, config) in interfaces {
        let (index, mac) = match wait_for_link(&handle, name).await {
            Ok(link) => link,
            Err(e) => {
                log::error!("{name}: {e}");
                continue;
            }
        };
        set_up(&handle, index).await?;
        match config {
            Interface::Static {
                address,
                prefix_len,
                gateway,
                dns,
            } => {
                let a = Applied {
                    address: *address,
                    prefix_len: *prefix_len,
                    gateway: *gateway,
                    dns: dns.clone(),
                    search: Vec::new(),
                    mtu: None,
                };
                apply(&handle, name, index, &a).await?;
                log::info!("{name}: static {}", describe(&a));
                applied.push(a);
            }
            Interface::Dhcp4 => {
                let (tx, rx) = oneshot::channel();
                tokio::spawn(run_dhcp(
                    handle.clone(),
                    name.clone(),
                    index,
                    mac,
                    hostname.to_string(),
                    tx,
                ));
                pending.push((name.clone(), rx));
            }
        }
    }
    let deadline = tokio::time::Instant::now() + FIRST_LEASE_TIMEOUT;
    for (name, rx) in pending {
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(a)) => applied.push(a),
            Ok(Err(_)) => log::error!("{name}: DHCP client stopped before a lease"),
            Err(_) => log::error!(
                "{name}: no DHCP lease after {} s; going on without it",
                FIRST_LEASE_TIMEOUT.as_secs()
            ),
        }
    }
    write_resolv_conf(&applied);
    Ok(())
}

fn describe(a: &Applied) -> String {
    let mut s = format!("{}/{}", a.address, a.prefix_len);
    if let Some(gw) = a.gateway {
        s += &format!(" router {gw}");
    }
    if !a.dns.is_empty() {
        let dns: Vec<String> = a.dns.iter().map(Ipv4Addr::to_string).collect();
        s += &format!(" dns {}", dns.join(","));
    }
    if let Some(mtu) = a.mtu {
        s += &format!(" mtu {mtu}");
    }
    s
}

async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>, String> {
    Ok(find_link(handle, name).await?.map(|(i, _)| i))
}

async fn find_link(handle: &Handle, name: &str) -> Result<Option<(u32, Vec<u8>)>, String> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(msg)) => {
            let mac = msg
                .attributes
                .iter()
                .find_map(|a| match a {
                    LinkAttribute::Address(mac) => Some(mac.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            Ok(Some((msg.header.index, mac)))
        }
        Ok(None) => Ok(None),
        // ENODEV: not there (yet).
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(format!("looking up {name}: {e}")),
    }
}

/// Drivers register their interfaces asynchronously after the module loads.
async fn wait_for_link(handle: &Handle, name: &str) -> Result<(u32, Vec<u8>), String> {
    let start = Instant::now();
    loop {
        if let Some(link) = find_link(handle, name).await? {
            return Ok(link);
        }
        if start.elapsed() > LINK_TIMEOUT {
            return Err(format!(
                "interface did not appear within {} s",
                LINK_TIMEOUT.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn set_up(handle: &Handle, index: u32) -> Result<(), String> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|e| format!("bringing up link {index}: {e}"))
}

async fn apply(handle: &Handle, name: &str, index: u32, a: &Applied) -> Result<(), String> {
    if let Some(mtu) = a.mtu {
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .mtu(u32::from(mtu))
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| format!("{name}: setting mtu {mtu}: {e}"))?;
    }
    handle
        .address()
        .add(index, IpAddr::V4(a.address), a.prefix_len)
        .replace()
        .execute()
        .await
        .map_err(|e| format!("{name}: adding {}/{}: {e}", a.address, a.prefix_len))?;
    if let Some(gateway) = a.gateway {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gateway)
            .output_interface(index)
            .build();
        handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(|e| format!("{name}: default route via {gateway}: {e}"))?;
    }
    Ok(())
}

/// The addressing a lease asks for.
pub fn lease_to_applied(lease: &DhcpV4Lease) -> Applied {
    let prefix_len = u32::from(lease.subnet_mask).leading_ones() as u8;
    let mut search: Vec<String> = lease.domain_search.clone().unwrap_or_default();
    if search.is_empty()
        && let Some(domain) = &lease.domain_name
    {
        search.push(domain.clone());
    }
    // RFC 3442: with classless static routes the Router option is ignored.
    let gateway = match &lease.classless_routes {
        Some(routes) => routes
            .iter()
            .find(|r| r.prefix_length == 0)
            .map(|r| r.router),
        None => lease.gateways.as_ref().and_then(|g| g.first().copied()),
    };
    Applied {
        address: lease.yiaddr,
        prefix_len,
        gateway,
        dns: lease.dns_srvs.clone().unwrap_or_default(),
        search,
        mtu: lease.mtu.filter(|m| *m >= 576),
    }
}

/// Acquires a lease, reports it through `first`, then renews for as long as the host runs.
async fn run_dhcp(
    handle: Handle,
    name: String,
    index: u32,
    mac: Vec<u8>,
    hostname: String,
    first: oneshot::Sender<Applied>,
) {
    let mut first = Some(first);
    let mut config = DhcpV4Config::new(&name);
    config.set_iface_index(index);
    if let Err(e) = config.set_iface_mac_raw(&mac) {
        log::error!("{name}: DHCP: bad MAC address: {e}");
        return;
    }
    config.set_host_name(&hostname);
    config.set_timeout_sec(FIRST_LEASE_TIMEOUT.as_secs() as u32);
    let mut client = match DhcpV4Client::init(config, None).await {
        Ok(c) => c,
        Err(e) => {
            log::error!("{name}: DHCP client: {e}");
            return;
        }
    };
    let mut retry = Duration::from_secs(1);
    loop {
        match client.run().await {
            Ok(DhcpV4State::Done(lease)) => {
                retry = Duration::from_secs(1);
                let a = lease_to_applied(&lease);
                match apply(&handle, &name, index, &a).await {
                    Ok(()) => {
                        log::info!(
                            "{name}: DHCP lease {} (lease {} s)",
                            describe(&a),
                            lease.lease_time_sec
                        );
                        if let Some(tx) = first.take() {
                            let _ = tx.send(a);
                        } else {
                            write_resolv_conf(std::slice::from_ref(&a));
                        }
                    }
                    Err(e) => log::error!("{e}"),
                }
            }
            Ok(_) => {}
            Err(e) => {
                log::warn!("{name}: DHCP: {e}; retrying in {} s", retry.as_secs());
                client.clean_up();
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(Duration::from_secs(60));
            }
        }
    }
}

/// Renders resolv.conf for the given interfaces' servers and search domains.
pub fn render_resolv_conf(applied: &[Applied]) -> String {
    let mut out = String::from("# written by keel\n");
    let mut seen = Vec::new();
    for a in applied {
        for d in &a.search {
            if !seen.contains(d) {
                seen.push(d.clone());
            }
        }
    }
    if !seen.is_empty() {
        out += &format!("search {}\n", seen.join(" "));
    }
    let mut servers: Vec<Ipv4Addr> = Vec::new();
    for s in applied.iter().flat_map(|a| &a.dns) {
        if !servers.contains(s) {
            servers.push(*s);
        }
    }
    for s in servers {
        out += &format!("nameserver {s}\n");
    }
    out
}

fn write_resolv_conf(applied: &[Applied]) {
    let text = render_resolv_conf(applied);
    let tmp = "/etc/.resolv.conf.tmp";
    if let Err(e) = std::fs::write(tmp, text).and_then(|_| std::fs::rename(tmp, "/etc/resolv.conf"))
    {
        log::error!("cannot write /etc/resolv.conf: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied(dns: &[&str], search: &[&str]) -> Applied {
        Applied {
            address: "10.0.2.15".parse().unwrap(),
            prefix_len: 24,
            gateway: None,
            dns: dns.iter().map(|d| d.parse().unwrap()).collect(),
            search: search.iter().map(|s| s.to_string()).collect(),
            mtu: None,
        }
    }

    #[test]
    fn resolv_conf_lists_unique_servers_and_domains() {
        let text = render_resolv_conf(&[
            applied(&["10.0.2.3"], &["example.org"]),
            applied(&["10.0.2.3", "1.1.1.1"], &[]),
        ]);
        assert_eq!(
            text,
            "# written by keel\nsearch example.org\nnameserver 10.0.2.3\nnameserver 1.1.1.1\n"
        );
    }

    #[test]
    fn a_lease_becomes_an_address_prefix_and_router() {
        let mut lease = DhcpV4Lease::default();
        lease.yiaddr = "10.0.2.15".parse().unwrap();
        lease.subnet_mask = "255.255.255.0".parse().unwrap();
        lease.gateways = Some(vec!["10.0.2.2".parse().unwrap()]);
        lease.dns_srvs = Some(vec!["10.0.2.3".parse().unwrap()]);
        lease.domain_name = Some("example.org".into());
        lease.mtu = Some(100);
        let a = lease_to_applied(&lease);
        assert_eq!(a.prefix_len, 24);
        assert_eq!(a.gateway, Some("10.0.2.2".parse().unwrap()));
        assert_eq!(a.search, ["example.org"]);
        assert_eq!(a.mtu, None, "an MTU below the IPv4 minimum is ignored");
        assert_eq!(describe(&a), "10.0.2.15/24 router 10.0.2.2 dns 10.0.2.3");
    }
}
