//! Host networking over rtnetlink: loopback, links matched by name, MAC or driver, static
//! IPv4/IPv6 addresses and routes, MTU, DHCPv4 (mozim, plus our own DHCPNAK watch while
//! renewing), IPv6 SLAAC by the kernel, the kernel command line's `ip=`, the network-online
//! signal, and /etc/resolv.conf and /etc/hosts. No `ip`, no dhclient.
//!
//! [`links`] finds and raises links, [`addresses`] applies addresses and routes, [`dhcp`] runs
//! the DHCPv4 life cycle with the NAK watch of [`nak`], [`slaac`] follows the kernel's IPv6
//! autoconfiguration, and [`files`] keeps resolv.conf and hosts; this file holds the shared
//! state, the network-online signal and `configure`, which drives the rest.

mod addresses;
mod dhcp;
mod files;
mod links;
mod nak;
mod slaac;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{StreamExt, TryStreamExt};
use keel_config::{Interface, LinkMatch, Prefix, Route};
use mozim::{DhcpV4Client, DhcpV4Config, DhcpV4Lease, DhcpV4State};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage, AddressScope};
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::route::RouteScope;
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::sys::{AsyncSocket, SocketAddr};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::cmdline;

pub use dhcp::{DhcpEvent, lease_to_applied, release_dhcp, run_dhcp_client};
pub use files::{render_hosts, render_resolv_conf};
pub use links::find_in_sysfs;
pub use nak::{Nak, parse_nak};
pub use slaac::{configure_slaac, ra_settings};

use addresses::*;
use dhcp::*;
use files::*;
use links::*;
use nak::*;
use slaac::*;

/// How long boot waits for an interface to appear after its driver loaded.
const LINK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long boot waits for a first DHCP lease before starting containers without it.
const FIRST_LEASE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one DISCOVER/REQUEST round may take before the client starts over. Only the
/// acquiring states are bounded: renewing and rebinding run until T2 and expiry.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);
const SYS_CLASS_NET: &str = "/sys/class/net";
const PROC_CMDLINE: &str = "/proc/cmdline";
const RESOLV_CONF: &str = "/etc/resolv.conf";
const HOSTS: &str = "/etc/hosts";
const IPV6_CONF: &str = "/proc/sys/net/ipv6/conf";

/// Addressing applied to one interface, for the log, resolv.conf and /etc/hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub addresses: Vec<Prefix>,
    pub routes: Vec<Route>,
    pub dns: Vec<IpAddr>,
    pub search: Vec<String>,
    pub mtu: Option<u32>,
}

impl Applied {
    fn from_config(i: &Interface) -> Applied {
        Applied {
            addresses: i.addresses.clone(),
            routes: i.routes.clone(),
            dns: i.dns.clone(),
            search: Vec::new(),
            mtu: i.mtu,
        }
    }
}

/// What every configured link currently has, in configuration order: resolv.conf and
/// /etc/hosts are rendered from all of it whenever any of it changes.
struct NetworkState {
    hostname: String,
    links: Vec<(String, Applied)>,
    /// Links the kernel autoconfigures (index, name), and the global addresses it gave them.
    slaac_links: Vec<(u32, String)>,
    slaac: Vec<(String, Prefix)>,
    resolv_conf: PathBuf,
    hosts: PathBuf,
    /// The containers' copy of resolv.conf (bound into them, so rewritten in place); only
    /// for the real /etc.
    containers_follow: bool,
    /// The host file names no host: a DHCP lease's (or `ip=`'s) hostname is taken.
    adopt_hostname: bool,
    online: Online,
}

impl NetworkState {
    fn new(
        hostname: &str,
        etc: Option<&Path>,
        online: Option<watch::Sender<bool>>,
    ) -> NetworkState {
        NetworkState {
            hostname: hostname.to_string(),
            links: Vec::new(),
            slaac_links: Vec::new(),
            slaac: Vec::new(),
            resolv_conf: etc.map_or(RESOLV_CONF.into(), |e| e.join("resolv.conf")),
            hosts: etc.map_or(HOSTS.into(), |e| e.join("hosts")),
            containers_follow: etc.is_none(),
            adopt_hostname: false,
            online: Online {
                tx: online,
                required: Vec::new(),
                announced: false,
            },
        }
    }
}

/// The network-online signal: true while every required interface is configured (static
/// addressing applied, or a DHCP lease held). `dhcp4 = "optional"` interfaces have no slot.
struct Online {
    tx: Option<watch::Sender<bool>>,
    /// One slot per required interface: configured now?
    required: Vec<bool>,
    /// What was last announced (the channel starts at false).
    announced: bool,
}

impl Online {
    fn add_required(&mut self) -> usize {
        self.required.push(false);
        self.required.len() - 1
    }

    /// Records a slot's state and announces (log line and channel) any change of the whole.
    fn set(&mut self, slot: Option<usize>, configured: bool) {
        if let Some(r) = slot.and_then(|s| self.required.get_mut(s)) {
            *r = configured;
        }
        self.update();
    }

    fn update(&mut self) {
        let now = self.required.iter().all(|r| *r);
        if now == self.announced {
            return;
        }
        self.announced = now;
        log::info!("network: {}", if now { "online" } else { "offline" });
        if let Some(tx) = &self.tx {
            tx.send_replace(now);
        }
    }
}

fn set_online(state: &Shared, slot: Option<usize>, configured: bool) {
    if let Ok(mut s) = state.lock() {
        s.online.set(slot, configured);
    }
}

type Shared = Arc<Mutex<NetworkState>>;

/// Where an interface's configuration came from, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Cmdline,
    HostFile,
}

/// Brings up `lo` and every configured interface: first those the kernel command line's
/// `ip=` configures, then the host file's (a host-file table whose link the command line
/// already configured is skipped). DHCP interfaces keep renewing in the background; this
/// returns once each required one (`dhcp4 = true`) has its first lease or gave up waiting;
/// `dhcp4 = "optional"` ones are not waited for.
///
/// `online` becomes true once every required interface is configured (static addressing
/// applied, or a lease held), false again while a required lease is lost (NAK, expiry),
/// each change logged as `network: online` / `network: offline`. With no required
/// interface it becomes true right after `lo` is up.
///
/// `hostname` is the host file's; with `adopt_hostname` (the file names no host) the name
/// of `ip=` or of a DHCP lease replaces it.
pub async fn configure(
    interfaces: &BTreeMap<String, Interface>,
    hostname: &str,
    adopt_hostname: bool,
    online: watch::Sender<bool>,
) -> Result<(), String> {
    let (mut connection, handle, messages) =
        rtnetlink::new_connection().map_err(|e| format!("netlink: {e}"))?;
    // Address notifications, to report the addresses SLAAC gives.
    let groups = SocketAddr::new(0, libc::RTMGRP_IPV6_IFADDR as u32);
    let monitor = match connection.socket_mut().socket_mut().bind(&groups) {
        Ok(()) => Some(messages),
        Err(e) => {
            log::warn!("netlink: cannot watch IPv6 addresses: {e}; SLAAC addresses go unreported");
            None
        }
    };
    tokio::spawn(connection);

    let lo = link_index(&handle, "lo")
        .await?
        .ok_or("no loopback interface")?;
    set_up(&handle, lo).await?;

    let mut initial = NetworkState::new(hostname, None, Some(online));
    initial.adopt_hostname = adopt_hostname;
    let state: Shared = Arc::new(Mutex::new(initial));
    // /etc/hosts names the host from the start, even before (or without) any address.
    write_files(&state);
    if let Some(messages) = monitor {
        tokio::spawn(watch_addresses(messages, state.clone()));
    }

    let cmdline_text = std::fs::read_to_string(PROC_CMDLINE).unwrap_or_default();
    let args = cmdline::parse(&cmdline_text);
    for e in &args.errors {
        log::error!("kernel command line: {e}; ignored");
    }
    let mut plan: Vec<(String, Interface, Source)> = Vec::new();
    for arg in &args.ip {
        if let Some(h) = &arg.hostname {
            if adopt_hostname {
                adopt_hostname_from(&state, h, "ip= on the kernel command line");
            } else {
                log::info!(
                    "{}: ip= hostname `{h}` ignored: the host file names the machine",
                    arg.interface
                );
            }
        }
        plan.push((arg.interface.clone(), arg.to_interface(), Source::Cmdline));
    }
    for (label, config) in interfaces {
        plan.push((label.clone(), config.clone(), Source::HostFile));
    }
    // Every interface but an optional DHCP one holds the host offline until configured.
    let plan: Vec<(String, Interface, Source, Option<usize>)> = match state.lock() {
        Ok(mut s) => {
            let plan = plan
                .into_iter()
                .map(|(label, config, source)| {
                    let slot =
                        (!(config.dhcp4 && config.optional)).then(|| s.online.add_required());
                    (label, config, source, slot)
                })
                .collect();
            s.online.update();
            plan
        }
        Err(_) => return Err("network state poisoned".into()),
    };

    // Kernel names already configured, with what configured them.
    let mut taken: Vec<(String, String)> = Vec::new();
    let mut pending = Vec::new();
    for (label, config, source, slot) in plan {
        let what = match source {
            Source::Cmdline => "the kernel command line".to_string(),
            Source::HostFile => format!("[network.interfaces.{label}]"),
        };
        let taken_names: Vec<String> = taken.iter().map(|(n, _)| n.clone()).collect();
        let (name, index, mac) = match resolve(&handle, &config.link, &taken_names).await {
            Ok(link) => link,
            Err(e) => {
                log::error!("{what}: {e}");
                continue;
            }
        };
        if let Some((_, by)) = taken.iter().find(|(n, _)| *n == name) {
            log::info!("{name}: {what} skipped: {by} already configures it");
            // What configures the link instead holds its own slot.
            set_online(&state, slot, true);
            continue;
        }
        taken.push((name.clone(), what.clone()));
        // Before the link goes up: the first router advertisement may come right after.
        configure_slaac(Path::new(IPV6_CONF), &name, config.slaac);
        if config.slaac
            && let Ok(mut s) = state.lock()
        {
            s.slaac_links.push((index, name.clone()));
        }
        if let Err(e) = set_up(&handle, index).await {
            log::error!("{name}: {e}");
            continue;
        }
        if name != label {
            log::info!("{name}: matched by {what}");
        }
        if config.dhcp4 {
            if let Some(mtu) = config.mtu {
                let only_mtu = Applied {
                    addresses: Vec::new(),
                    routes: Vec::new(),
                    dns: Vec::new(),
                    search: Vec::new(),
                    mtu: Some(mtu),
                };
                for e in apply(&handle, &name, index, &only_mtu).await {
                    log::error!("{e}");
                }
            }
            // Hold the link's place in the configuration order until its lease comes.
            if let Ok(mut s) = state.lock() {
                s.links
                    .push((name.clone(), Applied::from_config(&Interface::dhcp4(&name))));
            }
            let (tx, rx) = oneshot::channel();
            let (stop_tx, stop_rx) = oneshot::channel();
            let task = tokio::spawn(run_dhcp(
                Dhcp {
                    handle: handle.clone(),
                    name: name.clone(),
                    index,
                    mac,
                    mtu: config.mtu,
                    state: state.clone(),
                    slot,
                    events: None,
                },
                tx,
                stop_rx,
            ));
            if let Ok(mut c) = CLIENTS.lock() {
                c.push(ClientHandle {
                    name: name.clone(),
                    stop: stop_tx,
                    task,
                });
            }
            if config.optional {
                log::info!("{name}: DHCP optional: boot goes on without waiting for a lease");
            } else {
                pending.push((name, rx));
            }
        } else {
            let a = Applied::from_config(&config);
            let errors = apply(&handle, &name, index, &a).await;
            for e in &errors {
                log::error!("{e}");
            }
            log::info!(
                "{name}: static {}{}",
                describe(&a),
                match source {
                    Source::Cmdline => " (from ip= on the kernel command line)",
                    Source::HostFile => "",
                }
            );
            if let Ok(mut s) = state.lock() {
                s.links.push((name, a));
            }
            write_files(&state);
            set_online(&state, slot, true);
        }
    }
    let deadline = tokio::time::Instant::now() + FIRST_LEASE_TIMEOUT;
    for (name, rx) in pending {
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => log::error!("{name}: DHCP client stopped before a lease"),
            Err(_) => log::error!(
                "{name}: no DHCP lease after {} s; going on without it",
                FIRST_LEASE_TIMEOUT.as_secs()
            ),
        }
    }
    Ok(())
}

fn describe(a: &Applied) -> String {
    let mut parts: Vec<String> = a.addresses.iter().map(Prefix::to_string).collect();
    for r in &a.routes {
        parts.push(match (r.to.len, r.via) {
            (0, Some(via)) => format!("router {via}"),
            (_, Some(via)) => format!("route {} via {via}", r.to),
            (_, None) => format!("route {} on-link", r.to),
        });
    }
    if !a.dns.is_empty() {
        let dns: Vec<String> = a.dns.iter().map(IpAddr::to_string).collect();
        parts.push(format!("dns {}", dns.join(",")));
    }
    if let Some(mtu) = a.mtu {
        parts.push(format!("mtu {mtu}"));
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied(addresses: &[&str], dns: &[&str], search: &[&str]) -> Applied {
        Applied {
            addresses: addresses
                .iter()
                .map(|a| Prefix::parse(a).unwrap())
                .collect(),
            routes: Vec::new(),
            dns: dns.iter().map(|d| d.parse().unwrap()).collect(),
            search: search.iter().map(|s| s.to_string()).collect(),
            mtu: None,
        }
    }

    #[test]
    fn resolv_conf_lists_unique_servers_and_domains() {
        let text = render_resolv_conf(&[
            applied(&["10.0.2.15/24"], &["10.0.2.3"], &["example.org"]),
            applied(&[], &["10.0.2.3", "1.1.1.1", "fd00::53"], &[]),
        ]);
        assert_eq!(
            text,
            "# written by keel\nsearch example.org\nnameserver 10.0.2.3\nnameserver 1.1.1.1\nnameserver fd00::53\n"
        );
    }

    #[test]
    fn hosts_name_the_first_address() {
        let text = render_hosts(
            "hello",
            &[
                applied(&[], &[], &[]),
                applied(&["10.0.2.15/24", "fd00::2/64"], &[], &[]),
                applied(&["10.1.0.7/24"], &[], &[]),
            ],
        );
        assert_eq!(
            text,
            "# written by keel\n127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n10.0.2.15 hello\n"
        );
        let v6 = render_hosts("h", &[applied(&["fd00::2/64"], &[], &[])]);
        assert!(v6.ends_with("\nfd00::2 h\n"), "{v6}");
        let none = render_hosts("h", &[]);
        assert!(none.ends_with("\n127.0.1.1 h\n"), "{none}");
    }

    #[test]
    fn files_are_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hosts");
        std::fs::write(&path, "old").unwrap();
        write_atomically(&path, "new\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new\n");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file is left behind");
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
        assert_eq!(a.addresses, [Prefix::parse("10.0.2.15/24").unwrap()]);
        assert_eq!(a.search, ["example.org"]);
        assert_eq!(a.mtu, None, "an MTU below the IPv4 minimum is ignored");
        assert_eq!(describe(&a), "10.0.2.15/24 router 10.0.2.2 dns 10.0.2.3");
    }

    #[test]
    fn static_configuration_is_described_whole() {
        let a = Applied {
            addresses: vec![
                Prefix::parse("10.1.0.7/24").unwrap(),
                Prefix::parse("fd01::7/64").unwrap(),
            ],
            routes: vec![
                Route {
                    to: Prefix::parse("10.9.0.0/16").unwrap(),
                    via: Some("10.1.0.2".parse().unwrap()),
                },
                Route {
                    to: Prefix::parse("::/0").unwrap(),
                    via: Some("fd01::1".parse().unwrap()),
                },
                Route {
                    to: Prefix::parse("10.8.0.0/16").unwrap(),
                    via: None,
                },
            ],
            dns: vec!["fd01::53".parse().unwrap()],
            search: Vec::new(),
            mtu: Some(1400),
        };
        assert_eq!(
            describe(&a),
            "10.1.0.7/24 fd01::7/64 route 10.9.0.0/16 via 10.1.0.2 router fd01::1 route 10.8.0.0/16 on-link dns fd01::53 mtu 1400"
        );
    }

    #[test]
    fn routes_become_messages_of_their_family() {
        use netlink_packet_route::AddressFamily;
        use netlink_packet_route::route::{RouteAddress, RouteAttribute};
        let v4 = route_message(
            3,
            &Route {
                to: Prefix::parse("10.9.0.0/16").unwrap(),
                via: Some("10.1.0.2".parse().unwrap()),
            },
        )
        .unwrap();
        assert_eq!(v4.header.address_family, AddressFamily::Inet);
        assert_eq!(v4.header.destination_prefix_length, 16);
        assert!(v4.attributes.contains(&RouteAttribute::Oif(3)));
        assert!(
            v4.attributes
                .contains(&RouteAttribute::Gateway(RouteAddress::Inet(
                    "10.1.0.2".parse().unwrap()
                )))
        );
        let v6 = route_message(
            3,
            &Route {
                to: Prefix::parse("::/0").unwrap(),
                via: Some("fd01::1".parse().unwrap()),
            },
        )
        .unwrap();
        assert_eq!(v6.header.address_family, AddressFamily::Inet6);
        assert_eq!(v6.header.destination_prefix_length, 0);
        let onlink = route_message(
            3,
            &Route {
                to: Prefix::parse("10.8.0.0/16").unwrap(),
                via: None,
            },
        )
        .unwrap();
        assert_eq!(onlink.header.scope, RouteScope::Link);
        let mixed = Route {
            to: Prefix::parse("10.8.0.0/16").unwrap(),
            via: Some("fd01::1".parse().unwrap()),
        };
        assert!(route_message(3, &mixed).is_none());
    }

    /// A fake /sys/class/net: `eth0` and `eth1` on virtio_net, `br0` without a device.
    fn sysfs() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let drivers = dir.path().join("drivers");
        std::fs::create_dir_all(drivers.join("virtio_net")).unwrap();
        std::fs::create_dir_all(drivers.join("e1000")).unwrap();
        for (name, mac, driver) in [
            ("eth0", "52:54:00:12:34:56", Some("virtio_net")),
            ("eth1", "52:54:00:12:34:99", Some("virtio_net")),
            ("eth2", "52:54:00:12:34:aa", Some("e1000")),
            ("br0", "52:54:00:12:34:99", None),
        ] {
            let link = dir.path().join("net").join(name);
            std::fs::create_dir_all(&link).unwrap();
            std::fs::write(link.join("address"), format!("{mac}\n")).unwrap();
            if let Some(driver) = driver {
                std::fs::create_dir_all(link.join("device")).unwrap();
                std::os::unix::fs::symlink(drivers.join(driver), link.join("device/driver"))
                    .unwrap();
            }
        }
        dir
    }

    #[test]
    fn links_are_found_by_mac_or_driver_in_sysfs() {
        let dir = sysfs();
        let root = dir.path().join("net");
        let mac = LinkMatch::Mac([0x52, 0x54, 0, 0x12, 0x34, 0x99]);
        assert_eq!(find_in_sysfs(&root, &mac, &[]).as_deref(), Some("eth1"));
        let upper = LinkMatch::Mac(keel_config::parse_mac("52:54:00:12:34:AA").unwrap());
        assert_eq!(find_in_sysfs(&root, &upper, &[]).as_deref(), Some("eth2"));
        let virtio = LinkMatch::Driver("virtio_net".into());
        assert_eq!(find_in_sysfs(&root, &virtio, &[]).as_deref(), Some("eth0"));
        assert_eq!(
            find_in_sysfs(&root, &virtio, &["eth0".into()]).as_deref(),
            Some("eth1"),
            "a driver match takes the next link not configured yet"
        );
        assert_eq!(
            find_in_sysfs(&root, &virtio, &["eth0".into(), "eth1".into()]),
            None
        );
        let absent = LinkMatch::Mac([2, 0, 0, 0, 0, 1]);
        assert_eq!(find_in_sysfs(&root, &absent, &[]), None);
        assert_eq!(
            find_in_sysfs(&root, &LinkMatch::Driver("i40e".into()), &[]),
            None
        );
        assert_eq!(
            find_in_sysfs(&dir.path().join("missing"), &virtio, &[]),
            None
        );
    }

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    /// An IPv4/UDP/BOOTP reply as a packet socket of type SOCK_DGRAM hands it over.
    fn dhcp_reply(mac: &[u8], dst_port: u16, options: &[&[u8]]) -> Vec<u8> {
        let mut bootp = vec![0u8; 240];
        bootp[..4].copy_from_slice(&[2, 1, 6, 0]);
        bootp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        bootp[28..28 + mac.len()].copy_from_slice(mac);
        bootp[236..240].copy_from_slice(&DHCP_MAGIC);
        for o in options {
            bootp.extend_from_slice(o);
        }
        bootp.push(255);
        let mut udp = Vec::new();
        udp.extend_from_slice(&67u16.to_be_bytes());
        udp.extend_from_slice(&dst_port.to_be_bytes());
        udp.extend_from_slice(&((bootp.len() + 8) as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(&bootp);
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
        ip[2..4].copy_from_slice(&((udp.len() + 20) as u16).to_be_bytes());
        ip.extend_from_slice(&[10, 77, 0, 1, 255, 255, 255, 255]);
        ip.extend_from_slice(&udp);
        ip
    }

    #[test]
    fn a_dhcpnak_for_us_is_recognised() {
        let nak = dhcp_reply(
            &MAC,
            68,
            &[
                &[53, 1, 6],
                &[0, 0],
                &[54, 4, 10, 77, 0, 1],
                b"\x38\x15address not available",
            ],
        );
        assert_eq!(
            parse_nak(&nak, &MAC),
            Some(Nak {
                server: Some(Ipv4Addr::new(10, 77, 0, 1)),
                message: Some("address not available".into()),
            })
        );
        // Bytes after the UDP payload (Ethernet padding) are ignored.
        let mut padded = nak.clone();
        padded.extend_from_slice(&[0xff; 6]);
        assert!(parse_nak(&padded, &MAC).is_some());
        let bare = dhcp_reply(&MAC, 68, &[&[53, 1, 6]]);
        assert_eq!(
            parse_nak(&bare, &MAC),
            Some(Nak {
                server: None,
                message: None
            })
        );
    }

    #[test]
    fn other_packets_are_not_naks() {
        let ack = dhcp_reply(&MAC, 68, &[&[53, 1, 5], &[54, 4, 10, 77, 0, 1]]);
        assert_eq!(parse_nak(&ack, &MAC), None, "a DHCPACK");
        let other = [2, 0, 0, 0, 0, 9];
        let theirs = dhcp_reply(&other, 68, &[&[53, 1, 6]]);
        assert_eq!(parse_nak(&theirs, &MAC), None, "another client's");
        let to_server = dhcp_reply(&MAC, 67, &[&[53, 1, 6]]);
        assert_eq!(parse_nak(&to_server, &MAC), None, "not to the client port");
        let mut request = dhcp_reply(&MAC, 68, &[&[53, 1, 6]]);
        request[28] = 1;
        assert_eq!(parse_nak(&request, &MAC), None, "a BOOTREQUEST");
        let mut tcp = dhcp_reply(&MAC, 68, &[&[53, 1, 6]]);
        tcp[9] = 6;
        assert_eq!(parse_nak(&tcp, &MAC), None, "not UDP");
        let mut fragment = dhcp_reply(&MAC, 68, &[&[53, 1, 6]]);
        fragment[6] = 0x20;
        assert_eq!(parse_nak(&fragment, &MAC), None, "a fragment");
        let mut cookie = dhcp_reply(&MAC, 68, &[&[53, 1, 6]]);
        cookie[28 + 236] = 0;
        assert_eq!(parse_nak(&cookie, &MAC), None, "no magic cookie");
        // Truncated anywhere: no panic, no NAK.
        let nak = dhcp_reply(&MAC, 68, &[&[54, 4, 10, 77, 0, 1], &[53, 1, 6]]);
        for n in 0..nak.len() - 4 {
            assert_eq!(parse_nak(&nak[..n], &MAC), None, "cut at {n}");
        }
        let overlong = dhcp_reply(&MAC, 68, &[&[53, 1, 6], &[56, 200, b'x']]);
        assert_eq!(parse_nak(&overlong, &MAC), None, "an option past the end");
        assert_eq!(parse_nak(&[], &MAC), None);
        assert_eq!(parse_nak(&[0x60; 40], &MAC), None, "IPv6");
    }

    #[test]
    fn the_nak_filter_jumps_stay_inside_the_program() {
        let f = nak_filter();
        for (i, op) in f.iter().enumerate() {
            if op.code & 0x07 == 0x05 {
                assert!(i + 1 + usize::from(op.jt) < f.len(), "{i}");
                assert!(i + 1 + usize::from(op.jf) < f.len(), "{i}");
            }
        }
        assert_eq!(f[f.len() - 1].k, 0, "it ends by dropping");
    }

    #[test]
    fn router_advertisements_follow_slaac_and_forwarding() {
        assert_eq!(ra_settings(true, false), ("1", "1"));
        assert_eq!(ra_settings(true, true), ("2", "1"));
        assert_eq!(ra_settings(false, false), ("0", "0"));
        assert_eq!(ra_settings(false, true), ("0", "0"));

        let root = tempfile::tempdir().unwrap();
        for (name, forwarding) in [("eth0", "0\n"), ("eth1", "1\n"), ("eth2", "0\n")] {
            let dir = root.path().join(name);
            std::fs::create_dir(&dir).unwrap();
            for key in ["accept_ra", "autoconf"] {
                std::fs::write(dir.join(key), "9\n").unwrap();
            }
            std::fs::write(dir.join("forwarding"), forwarding).unwrap();
        }
        configure_slaac(root.path(), "eth0", true);
        configure_slaac(root.path(), "eth1", true);
        configure_slaac(root.path(), "eth2", false);
        configure_slaac(root.path(), "missing", true);
        let read = |name: &str, key: &str| {
            std::fs::read_to_string(root.path().join(name).join(key)).unwrap()
        };
        assert_eq!(
            (read("eth0", "accept_ra"), read("eth0", "autoconf")),
            ("1".into(), "1".into())
        );
        assert_eq!(
            (read("eth1", "accept_ra"), read("eth1", "autoconf")),
            ("2".into(), "1".into())
        );
        assert_eq!(
            (read("eth2", "accept_ra"), read("eth2", "autoconf")),
            ("0".into(), "0".into())
        );
        assert!(!root.path().join("missing").exists());
    }

    fn address_message(index: u32, addr: &str, len: u8, flags: AddressFlags) -> AddressMessage {
        let mut m = AddressMessage::default();
        m.header.family = netlink_packet_route::AddressFamily::Inet6;
        m.header.index = index;
        m.header.prefix_len = len;
        m.header.scope = AddressScope::Universe;
        m.attributes
            .push(AddressAttribute::Address(addr.parse().unwrap()));
        m.attributes.push(AddressAttribute::Flags(flags));
        m
    }

    #[test]
    fn only_autoconfigured_global_addresses_are_slaac() {
        let links = [(2, "eth0".to_string())];
        let slaac = address_message(2, "fec0::5054:ff:fe12:3456", 64, AddressFlags::empty());
        let mut site = slaac.clone();
        site.header.scope = AddressScope::Site;
        assert!(
            slaac_address(&site, &links).is_some(),
            "fec0::/10 is site scope"
        );
        assert_eq!(
            slaac_address(&slaac, &links),
            Some((
                "eth0".into(),
                Prefix::parse("fec0::5054:ff:fe12:3456/64").unwrap()
            ))
        );
        let tentative = address_message(2, "fec0::1", 64, AddressFlags::Tentative);
        assert_eq!(slaac_address(&tentative, &links), None, "DAD not done");
        let permanent = address_message(2, "fd01::7", 64, AddressFlags::Permanent);
        assert_eq!(slaac_address(&permanent, &links), None, "a static address");
        let elsewhere = address_message(3, "fec0::1", 64, AddressFlags::empty());
        assert_eq!(slaac_address(&elsewhere, &links), None, "not a SLAAC link");
        let mut link_local = address_message(2, "fe80::1", 64, AddressFlags::empty());
        link_local.header.scope = AddressScope::Link;
        assert_eq!(slaac_address(&link_local, &links), None, "link-local");
    }

    #[test]
    fn online_follows_every_required_slot() {
        let (tx, rx) = watch::channel(false);
        let mut s = NetworkState::new("h", Some(Path::new("/nonexistent")), Some(tx));
        let a = s.online.add_required();
        let b = s.online.add_required();
        s.online.update();
        assert!(!*rx.borrow());
        s.online.set(Some(a), true);
        assert!(!*rx.borrow(), "b is not configured yet");
        s.online.set(None, true);
        assert!(!*rx.borrow(), "an optional link changes nothing");
        s.online.set(Some(b), true);
        assert!(*rx.borrow());
        s.online.set(Some(b), false);
        assert!(!*rx.borrow(), "a lost lease takes the host offline");
        s.online.set(Some(b), true);
        assert!(*rx.borrow());

        let (tx, rx) = watch::channel(false);
        let mut none = NetworkState::new("h", None, Some(tx));
        none.online.update();
        assert!(*rx.borrow(), "nothing required: online at once");
    }

    #[test]
    fn classless_routes_replace_the_router_option() {
        let mut lease = DhcpV4Lease::default();
        lease.yiaddr = "10.0.2.15".parse().unwrap();
        lease.subnet_mask = "255.255.255.0".parse().unwrap();
        lease.gateways = Some(vec!["10.0.2.1".parse().unwrap()]);
        lease.classless_routes = Some(vec![
            mozim::DhcpV4ClasslessRoute {
                destination: "0.0.0.0".parse().unwrap(),
                prefix_length: 0,
                router: "10.0.2.2".parse().unwrap(),
            },
            mozim::DhcpV4ClasslessRoute {
                destination: "10.9.0.0".parse().unwrap(),
                prefix_length: 16,
                router: "10.0.2.3".parse().unwrap(),
            },
            mozim::DhcpV4ClasslessRoute {
                destination: "10.8.0.0".parse().unwrap(),
                prefix_length: 16,
                router: "0.0.0.0".parse().unwrap(),
            },
        ]);
        lease.mtu = Some(1400);
        lease.domain_search = Some(vec!["a.example".into(), "b.example".into()]);
        lease.domain_name = Some("ignored.example".into());
        let a = lease_to_applied(&lease);
        assert_eq!(
            describe(&a),
            "10.0.2.15/24 router 10.0.2.2 route 10.9.0.0/16 via 10.0.2.3 route 10.8.0.0/16 on-link mtu 1400"
        );
        assert_eq!(
            a.search,
            ["a.example", "b.example"],
            "option 119 wins over 15"
        );
    }
}
