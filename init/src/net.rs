//! Host networking over rtnetlink: loopback, links matched by name, MAC or driver, static
//! IPv4/IPv6 addresses and routes, MTU, DHCPv4 (mozim, plus our own DHCPNAK watch while
//! renewing), IPv6 SLAAC by the kernel, the kernel command line's `ip=`, the network-online
//! signal, and /etc/resolv.conf and /etc/hosts. No `ip`, no dhclient.

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
struct State {
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

impl State {
    fn new(hostname: &str, etc: Option<&Path>, online: Option<watch::Sender<bool>>) -> State {
        State {
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

/// What a DHCP client did to its interface, for tests and anyone watching.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DhcpEvent {
    /// A lease was applied; `renewed` when it extends the address already there.
    Bound {
        address: Prefix,
        lease_sec: u32,
        renewed: bool,
    },
    /// T1 passed: asking the server that gave the lease to extend it.
    Renewing,
    /// T2 passed without an answer: asking any server.
    Rebinding,
    /// The lease ran out unrenewed: its address and routes were removed.
    Expired { address: Prefix },
    /// A server refused the renewal (DHCPNAK): address, routes and DNS were removed at once
    /// and discovery started over.
    Nak { address: Prefix },
    /// DHCPRELEASE was sent (or tried) and the address and routes removed.
    Released { address: Prefix },
}

/// A running DHCP client: `stop` asks it to release its lease and end.
struct ClientHandle {
    name: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// The DHCP clients `configure` started, so that shutdown can release their leases.
static CLIENTS: Mutex<Vec<ClientHandle>> = Mutex::new(Vec::new());

/// Releases every DHCP lease (DHCPRELEASE, then the address and routes removed), waiting
/// at most `limit` so that an unreachable server never holds up shutdown.
pub async fn release_dhcp(limit: Duration) {
    let clients = match CLIENTS.lock() {
        Ok(mut c) => std::mem::take(&mut *c),
        Err(_) => return,
    };
    let mut tasks = Vec::new();
    for c in clients {
        // A client that already ended has nothing to release.
        if c.stop.send(()).is_ok() {
            tasks.push((c.name, c.task));
        }
    }
    let deadline = tokio::time::Instant::now() + limit;
    for (name, task) in tasks {
        if tokio::time::timeout_at(deadline, task).await.is_err() {
            log::warn!(
                "{name}: DHCP release did not finish within {} ms",
                limit.as_millis()
            );
        }
    }
}

type Shared = Arc<Mutex<State>>;

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

    let mut initial = State::new(hostname, None, Some(online));
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

/// Finds the link a table is for, waiting for it as for a named one: drivers register
/// their interfaces asynchronously after the module loads. Returns its kernel name,
/// index and MAC.
async fn resolve(
    handle: &Handle,
    link: &LinkMatch,
    taken: &[String],
) -> Result<(String, u32, Vec<u8>), String> {
    let start = Instant::now();
    loop {
        let name = match link {
            LinkMatch::Name(name) => Some(name.clone()),
            other => find_in_sysfs(Path::new(SYS_CLASS_NET), other, taken),
        };
        if let Some(name) = name
            && let Some((index, mac)) = find_link(handle, &name).await?
        {
            return Ok((name, index, mac));
        }
        if start.elapsed() > LINK_TIMEOUT {
            return Err(format!(
                "no interface {} appeared within {} s",
                describe_match(link),
                LINK_TIMEOUT.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn describe_match(link: &LinkMatch) -> String {
    match link {
        LinkMatch::Name(name) => format!("named {name}"),
        LinkMatch::Mac(mac) => format!("with MAC {}", format_mac(mac)),
        LinkMatch::Driver(driver) => format!("with driver {driver}"),
    }
}

fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The first link under `root` (/sys/class/net) that a MAC or driver match selects and
/// that nothing configured yet, by name order. Only links with a `device` (hardware, not
/// bridges, VLANs or bonds that borrow a MAC) are candidates.
pub fn find_in_sysfs(root: &Path, link: &LinkMatch, taken: &[String]) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(root)
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    names.into_iter().find(|name| {
        let dir = root.join(name);
        if !dir.join("device").exists() {
            return false;
        }
        match link {
            LinkMatch::Name(n) => n == name,
            LinkMatch::Mac(mac) => std::fs::read_to_string(dir.join("address"))
                .ok()
                .and_then(|text| keel_config::parse_mac(text.trim()))
                .is_some_and(|found| found == *mac),
            LinkMatch::Driver(driver) => {
                !taken.contains(name)
                    && std::fs::read_link(dir.join("device/driver"))
                        .ok()
                        .is_some_and(|target| {
                            target
                                .file_name()
                                .is_some_and(|f| f.to_string_lossy() == *driver)
                        })
            }
        }
    })
}

async fn set_up(handle: &Handle, index: u32) -> Result<(), String> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|e| format!("bringing up link {index}: {e}"))
}

/// The (accept_ra, autoconf) values for a link: with SLAAC on, router advertisements are
/// accepted (2 when the link forwards, where 1 would make the kernel ignore them) and
/// addresses autoconfigured from their prefixes; with it off, neither.
pub fn ra_settings(slaac: bool, forwarding: bool) -> (&'static str, &'static str) {
    match (slaac, forwarding) {
        (false, _) => ("0", "0"),
        (true, false) => ("1", "1"),
        (true, true) => ("2", "1"),
    }
}

/// Writes a link's accept_ra and autoconf under `root` (/proc/sys/net/ipv6/conf). A kernel
/// without IPv6 has no such directory: nothing to do then.
pub fn configure_slaac(root: &Path, name: &str, slaac: bool) {
    let dir = root.join(name);
    if !dir.is_dir() {
        if slaac {
            log::info!("{name}: no IPv6 on this link; no SLAAC");
        }
        return;
    }
    let forwarding = std::fs::read_to_string(dir.join("forwarding")).is_ok_and(|f| f.trim() != "0");
    let (accept_ra, autoconf) = ra_settings(slaac, forwarding);
    for (key, value) in [("accept_ra", accept_ra), ("autoconf", autoconf)] {
        if let Err(e) = std::fs::write(dir.join(key), value) {
            log::error!("{name}: setting {key} = {value}: {e}");
        }
    }
}

/// A global (or site-local) IPv6 address the kernel autoconfigured on one of `links` and
/// finished DAD for:
/// (link name, address). Static addresses are permanent; SLAAC's have lifetimes.
fn slaac_address(msg: &AddressMessage, links: &[(u32, String)]) -> Option<(String, Prefix)> {
    let (_, name) = links.iter().find(|(i, _)| *i == msg.header.index)?;
    // Site scope too: the kernel puts fec0::/10 (QEMU's default prefix) there.
    if !matches!(
        msg.header.scope,
        AddressScope::Universe | AddressScope::Site
    ) {
        return None;
    }
    let flags = msg
        .attributes
        .iter()
        .find_map(|a| match a {
            AddressAttribute::Flags(f) => Some(*f),
            _ => None,
        })
        .unwrap_or_else(|| AddressFlags::from_bits_retain(u32::from(msg.header.flags.bits())));
    if flags.intersects(AddressFlags::Permanent | AddressFlags::Tentative | AddressFlags::Dadfailed)
    {
        return None;
    }
    let addr = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(ip @ IpAddr::V6(_)) => Some(*ip),
        _ => None,
    })?;
    Some((
        name.clone(),
        Prefix {
            addr,
            len: msg.header.prefix_len,
        },
    ))
}

/// Follows RTM_NEWADDR/RTM_DELADDR for IPv6: logs each address SLAAC gives a link
/// (`eth0: slaac fec0::5054:ff:fe12:3456/64`) and keeps them for /etc/hosts.
async fn watch_addresses<S>(mut messages: S, state: Shared)
where
    S: futures_util::Stream<
            Item = (
                rtnetlink::packet_core::NetlinkMessage<RouteNetlinkMessage>,
                SocketAddr,
            ),
        > + Unpin,
{
    while let Some((message, _)) = messages.next().await {
        let (msg, added) = match message.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(m)) => (m, true),
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelAddress(m)) => (m, false),
            _ => continue,
        };
        let changed = match state.lock() {
            Ok(mut s) => {
                let mut del = msg.clone();
                if !added {
                    // A deleted address carries the flags it had: match it whatever they were.
                    del.attributes
                        .retain(|a| !matches!(a, AddressAttribute::Flags(_)));
                    del.header.flags = Default::default();
                }
                match slaac_address(&del, &s.slaac_links) {
                    Some(found) if added && !s.slaac.contains(&found) => {
                        log::info!("{}: slaac {}", found.0, found.1);
                        s.slaac.push(found);
                        true
                    }
                    Some(found) if !added && s.slaac.contains(&found) => {
                        log::info!("{}: slaac {} gone", found.0, found.1);
                        s.slaac.retain(|f| *f != found);
                        true
                    }
                    _ => false,
                }
            }
            Err(_) => false,
        };
        if changed {
            write_files(&state);
        }
    }
}

/// Applies MTU, addresses and routes, in that order, each replacing what is there. One
/// failure does not keep the rest from being tried: every error is returned.
async fn apply(handle: &Handle, name: &str, index: u32, a: &Applied) -> Vec<String> {
    let mut errors = Vec::new();
    if let Some(mtu) = a.mtu
        && let Err(e) = handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).build())
            .execute()
            .await
    {
        errors.push(format!("{name}: setting mtu {mtu}: {e}"));
    }
    for address in &a.addresses {
        if let Err(e) = handle
            .address()
            .add(index, address.addr, address.len)
            .replace()
            .execute()
            .await
        {
            errors.push(format!("{name}: adding {address}: {e}"));
        }
    }
    for route in &a.routes {
        let result = match route_message(index, route) {
            Some(msg) => handle
                .route()
                .add(msg)
                .replace()
                .execute()
                .await
                .map_err(|e| e.to_string()),
            None => Err("the destination and the gateway differ in IP version".into()),
        };
        if let Err(e) = result {
            let via = route.via.map(|v| format!(" via {v}")).unwrap_or_default();
            errors.push(format!("{name}: route {}{via}: {e}", route.to));
        }
    }
    errors
}

/// The netlink message for a route through `index`; `None` when its families disagree.
fn route_message(index: u32, route: &Route) -> Option<netlink_packet_route::route::RouteMessage> {
    let len = route.to.len;
    match (route.to.addr, route.via) {
        (IpAddr::V4(to), via) => {
            let b = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(to, len)
                .output_interface(index);
            match via {
                Some(IpAddr::V4(gw)) => Some(b.gateway(gw).build()),
                Some(IpAddr::V6(_)) => None,
                None => Some(b.scope(RouteScope::Link).build()),
            }
        }
        (IpAddr::V6(to), via) => {
            let b = RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(to, len)
                .output_interface(index);
            match via {
                Some(IpAddr::V6(gw)) => Some(b.gateway(gw).build()),
                Some(IpAddr::V4(_)) => None,
                None => Some(b.build()),
            }
        }
    }
}

/// Removes addresses a link had but should no longer have (a lease that moved).
async fn remove_addresses(handle: &Handle, name: &str, index: u32, gone: &[Prefix]) {
    for p in gone {
        let mut found = handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(p.addr)
            .set_prefix_length_filter(p.len)
            .execute();
        loop {
            match found.try_next().await {
                Ok(Some(msg)) => {
                    if let Err(e) = handle.address().del(msg).execute().await {
                        log::warn!("{name}: removing {p}: {e}");
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    log::warn!("{name}: looking up {p}: {e}");
                    break;
                }
            }
        }
    }
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
    // RFC 3442: with classless static routes the Router option is ignored; a route whose
    // router is 0.0.0.0 is on-link.
    let routes: Vec<Route> = match &lease.classless_routes {
        Some(routes) => routes
            .iter()
            .filter(|r| {
                r.prefix_length <= 32 && !(r.prefix_length == 0 && r.router.is_unspecified())
            })
            .map(|r| Route {
                to: Prefix {
                    addr: IpAddr::V4(r.destination),
                    len: r.prefix_length,
                },
                via: (!r.router.is_unspecified()).then_some(IpAddr::V4(r.router)),
            })
            .collect(),
        None => lease
            .gateways
            .as_ref()
            .and_then(|g| g.first().copied())
            .map(|gw| Route {
                to: Prefix::default_for(&IpAddr::V4(gw)),
                via: Some(IpAddr::V4(gw)),
            })
            .into_iter()
            .collect(),
    };
    Applied {
        addresses: vec![Prefix {
            addr: IpAddr::V4(lease.yiaddr),
            len: prefix_len,
        }],
        routes,
        dns: lease
            .dns_srvs
            .iter()
            .flatten()
            .map(|s| IpAddr::V4(*s))
            .collect(),
        search,
        mtu: lease.mtu.filter(|m| *m >= 576).map(u32::from),
    }
}

/// One DHCP interface's client and where its leases go.
struct Dhcp {
    handle: Handle,
    name: String,
    index: u32,
    mac: Vec<u8>,
    /// The host file's `mtu`, which wins over the lease's.
    mtu: Option<u32>,
    state: Shared,
    /// The link's network-online slot; `None` for `dhcp4 = "optional"`.
    slot: Option<usize>,
    events: Option<mpsc::UnboundedSender<DhcpEvent>>,
}

impl Dhcp {
    fn emit(&self, event: DhcpEvent) {
        if let Some(tx) = &self.events {
            let _ = tx.send(event);
        }
    }

    /// Sets this link's entry in the shared state and rewrites resolv.conf and /etc/hosts.
    fn publish(&self, a: Applied) {
        if let Ok(mut s) = self.state.lock() {
            match s.links.iter_mut().find(|(n, _)| *n == self.name) {
                Some((_, slot)) => *slot = a,
                None => s.links.push((self.name.clone(), a)),
            }
        }
        write_files(&self.state);
    }

    /// Takes a lease's addressing off the link: routes first (they go through the address),
    /// then its servers out of resolv.conf; a required link takes the host offline.
    async fn unapply(&self, a: &Applied) {
        remove_routes(&self.handle, &self.name, self.index, &a.routes).await;
        remove_addresses(&self.handle, &self.name, self.index, &a.addresses).await;
        self.publish(Applied::from_config(&Interface::dhcp4(&self.name)));
        set_online(&self.state, self.slot, false);
    }
}

/// The lease currently applied to the link.
struct Bound {
    lease: DhcpV4Lease,
    applied: Applied,
    expires: tokio::time::Instant,
}

impl Bound {
    fn address(&self) -> Prefix {
        self.applied.addresses.first().copied().unwrap_or(Prefix {
            addr: IpAddr::V4(self.lease.yiaddr),
            len: 32,
        })
    }
}

/// What woke the lease loop.
enum Step {
    Ran(Result<DhcpV4State, mozim::DhcpError>),
    AcquireTimeout,
    Retry,
    Expired,
    Nak(Nak),
    Stop,
}

/// Runs DHCPv4 on one interface the way PID 1 does, in the calling thread's network
/// namespace (its netlink socket is created here), writing resolv.conf and hosts into `etc`.
/// `events` hears every lease applied or removed; `stop` releases the lease and returns.
pub async fn run_dhcp_client(
    name: &str,
    hostname: &str,
    etc: &Path,
    events: mpsc::UnboundedSender<DhcpEvent>,
    stop: oneshot::Receiver<()>,
) -> Result<(), String> {
    let (connection, handle, messages) =
        rtnetlink::new_connection().map_err(|e| format!("netlink: {e}"))?;
    drop(messages);
    let connection = tokio::spawn(connection);
    let (index, mac) = find_link(&handle, name)
        .await?
        .ok_or_else(|| format!("no interface {name}"))?;
    set_up(&handle, index).await?;
    let mut s = State::new(hostname, Some(etc), None);
    s.links.push((
        name.to_string(),
        Applied::from_config(&Interface::dhcp4(name)),
    ));
    let state: Shared = Arc::new(Mutex::new(s));
    let (first, _) = oneshot::channel();
    run_dhcp(
        Dhcp {
            handle,
            name: name.to_string(),
            index,
            mac,
            mtu: None,
            state,
            slot: None,
            events: Some(events),
        },
        first,
        stop,
    )
    .await;
    connection.abort();
    Ok(())
}

/// Acquires a lease, reports the first through `first`, then renews at T1 and rebinds at
/// T2 for as long as the host runs. Every lease updates the shared state, resolv.conf and
/// /etc/hosts; a lease that expires unrenewed is taken off the link and discovery starts
/// over, as is one a server refuses (DHCPNAK: mozim drops those while renewing and
/// rebinding, so a [`NakWatch`] listens beside it then). `stop` sends DHCPRELEASE, removes
/// the address and ends the client.
async fn run_dhcp(d: Dhcp, first: oneshot::Sender<()>, mut stop: oneshot::Receiver<()>) {
    let name = d.name.as_str();
    let mut first = Some(first);
    let mut config = DhcpV4Config::new(name);
    config.set_iface_index(d.index);
    if let Err(e) = config.set_iface_mac_raw(&d.mac) {
        log::error!("{name}: DHCP: bad MAC address: {e}");
        return;
    }
    // A host that waits to be named by the server does not offer a name of its own.
    let offered_name = d
        .state
        .lock()
        .ok()
        .filter(|s| !s.adopt_hostname)
        .map(|s| s.hostname.clone());
    if let Some(hostname) = offered_name {
        config.set_host_name(&hostname);
    }
    // No mozim timeout: it would also cut renewing short (after 30 s, long before T2) and
    // drop the lease. Acquisition is bounded below instead.
    config.set_timeout_sec(0);
    let mut client = match DhcpV4Client::init(config, None).await {
        Ok(c) => c,
        Err(e) => {
            log::error!("{name}: DHCP client: {e}");
            return;
        }
    };
    let mut retry = Duration::from_secs(1);
    let mut backoff: Option<tokio::time::Instant> = None;
    let mut acquiring = true;
    let mut bound: Option<Bound> = None;
    // Open from T1 until the lease is extended or lost.
    let mut naks: Option<NakWatch> = None;
    loop {
        let expires = bound.as_ref().map(|b| b.expires);
        let far = tokio::time::Instant::now() + Duration::from_secs(86_400);
        let step = {
            let run = async {
                if acquiring {
                    match tokio::time::timeout(ACQUIRE_TIMEOUT, client.run()).await {
                        Ok(r) => Step::Ran(r),
                        Err(_) => Step::AcquireTimeout,
                    }
                } else {
                    Step::Ran(client.run().await)
                }
            };
            let nak = async {
                match &naks {
                    Some(w) => w.next(&d.mac).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = &mut stop => Step::Stop,
                nak = nak, if naks.is_some() => Step::Nak(nak),
                _ = tokio::time::sleep_until(expires.unwrap_or(far)), if expires.is_some() => {
                    Step::Expired
                }
                _ = tokio::time::sleep_until(backoff.unwrap_or(far)), if backoff.is_some() => {
                    Step::Retry
                }
                step = run, if backoff.is_none() => step,
            }
        };
        match step {
            Step::Stop => {
                if let Some(b) = bound.take() {
                    if let Err(e) = client.release(&b.lease).await {
                        log::warn!("{name}: DHCPRELEASE: {e}");
                    }
                    d.unapply(&b.applied).await;
                    log::info!("{name}: DHCP lease released");
                    d.emit(DhcpEvent::Released {
                        address: b.address(),
                    });
                }
                return;
            }
            Step::Retry => backoff = None,
            Step::Nak(nak) => {
                naks = None;
                client.clean_up();
                acquiring = true;
                if let Some(b) = bound.take() {
                    log::warn!(
                        "{name}: DHCPNAK from {}: the lease on {} is refused{}; removing its address, routes and DNS and discovering again",
                        nak.server.map_or("a server".to_string(), |s| s.to_string()),
                        b.address(),
                        nak.message
                            .map(|m| format!(" (\"{m}\")"))
                            .unwrap_or_default()
                    );
                    d.unapply(&b.applied).await;
                    d.emit(DhcpEvent::Nak {
                        address: b.address(),
                    });
                }
            }
            Step::Expired => {
                naks = None;
                if let Some(b) = bound.take() {
                    expire(&d, &b).await;
                }
                client.clean_up();
                acquiring = true;
            }
            Step::AcquireTimeout => {
                log::warn!(
                    "{name}: no DHCP lease within {} s; retrying in {} s",
                    ACQUIRE_TIMEOUT.as_secs(),
                    retry.as_secs()
                );
                client.clean_up();
                backoff = Some(tokio::time::Instant::now() + retry);
                retry = (retry * 2).min(Duration::from_secs(60));
            }
            Step::Ran(Err(e)) => {
                naks = None;
                log::warn!("{name}: DHCP: {e}; retrying in {} s", retry.as_secs());
                // The address stays until the lease's own expiry, renewed or not.
                client.clean_up();
                acquiring = true;
                backoff = Some(tokio::time::Instant::now() + retry);
                retry = (retry * 2).min(Duration::from_secs(60));
            }
            Step::Ran(Ok(DhcpV4State::Done(lease))) => {
                naks = None;
                retry = Duration::from_secs(1);
                acquiring = false;
                let mut a = lease_to_applied(&lease);
                if d.mtu.is_some() {
                    a.mtu = d.mtu;
                }
                let errors = apply(&d.handle, name, d.index, &a).await;
                for e in &errors {
                    log::error!("{e}");
                }
                let renewed = bound
                    .as_ref()
                    .is_some_and(|b| b.applied.addresses == a.addresses);
                if let Some(old) = &bound {
                    // A NAK or an expiry in between can bring a different address or router:
                    // what the new lease no longer has goes.
                    let gone_routes: Vec<Route> = old
                        .applied
                        .routes
                        .iter()
                        .filter(|r| !a.routes.contains(r))
                        .cloned()
                        .collect();
                    remove_routes(&d.handle, name, d.index, &gone_routes).await;
                    let gone: Vec<Prefix> = old
                        .applied
                        .addresses
                        .iter()
                        .filter(|p| !a.addresses.contains(p))
                        .copied()
                        .collect();
                    if !gone.is_empty() {
                        log::info!(
                            "{name}: the lease moved from {}",
                            gone.iter()
                                .map(Prefix::to_string)
                                .collect::<Vec<_>>()
                                .join(",")
                        );
                        remove_addresses(&d.handle, name, d.index, &gone).await;
                    }
                }
                log::info!(
                    "{name}: DHCP lease {}{} (lease {} s)",
                    if renewed { "renewed: " } else { "" },
                    describe(&a),
                    lease.lease_time_sec
                );
                if let Some(offered) = &lease.host_name {
                    adopt_hostname_from(&d.state, offered, &format!("{name}'s DHCP lease"));
                }
                let b = Bound {
                    expires: tokio::time::Instant::now()
                        + Duration::from_secs(lease.lease_time_sec.into()),
                    lease: *lease,
                    applied: a.clone(),
                };
                d.emit(DhcpEvent::Bound {
                    address: b.address(),
                    lease_sec: b.lease.lease_time_sec,
                    renewed,
                });
                bound = Some(b);
                d.publish(a);
                set_online(&d.state, d.slot, true);
                if let Some(tx) = first.take() {
                    let _ = tx.send(());
                }
            }
            Step::Ran(Ok(DhcpV4State::Renewing)) => {
                acquiring = false;
                log::info!("{name}: DHCP renewing (T1)");
                naks = naks.or_else(|| NakWatch::open_logged(name, d.index));
                d.emit(DhcpEvent::Renewing);
            }
            Step::Ran(Ok(DhcpV4State::Rebinding)) => {
                acquiring = false;
                log::info!("{name}: DHCP rebinding (T2): the server did not answer");
                naks = naks.or_else(|| NakWatch::open_logged(name, d.index));
                d.emit(DhcpEvent::Rebinding);
            }
            Step::Ran(Ok(DhcpV4State::InitReboot)) => {
                naks = None;
                // Out of rebinding, this is mozim saying the lease ran out.
                if let Some(b) = bound.take() {
                    expire(&d, &b).await;
                }
                acquiring = true;
            }
            Step::Ran(Ok(DhcpV4State::Selecting)) => {}
        }
    }
}

/// A lease that ran out: off the link, out of resolv.conf and hosts.
async fn expire(d: &Dhcp, b: &Bound) {
    d.unapply(&b.applied).await;
    log::warn!(
        "{}: DHCP lease on {} expired unrenewed; address and routes removed, discovering again",
        d.name,
        b.address()
    );
    d.emit(DhcpEvent::Expired {
        address: b.address(),
    });
}

/// Removes routes a lease installed; one already gone (with its address) is no error.
async fn remove_routes(handle: &Handle, name: &str, index: u32, routes: &[Route]) {
    for r in routes {
        let Some(msg) = route_message(index, r) else {
            continue;
        };
        match handle.route().del(msg).execute().await {
            Ok(()) => {}
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => {}
            Err(e) => log::warn!("{name}: removing route {}: {e}", r.to),
        }
    }
}

/// A DHCPNAK seen on a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nak {
    /// Option 54: the server that refused.
    pub server: Option<Ipv4Addr>,
    /// Option 56: its reason, if it gave one.
    pub message: Option<String>,
}

const DHCP_CLIENT_PORT: u16 = 68;
const DHCP_MAGIC: [u8; 4] = [99, 130, 83, 99];
const DHCPNAK: u8 = 6;

/// Decodes an IPv4 packet (from its IP header on, as a packet socket of type SOCK_DGRAM
/// gives it): a DHCPNAK sent to the client port for hardware address `mac`, else `None`.
pub fn parse_nak(packet: &[u8], mac: &[u8]) -> Option<Nak> {
    let first = *packet.first()?;
    let ihl = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || ihl < 20 || packet.len() < ihl + 8 || packet[9] != 17 {
        return None;
    }
    // More fragments, or a fragment offset: DHCP replies are never fragmented in practice.
    if u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff != 0 {
        return None;
    }
    let udp = &packet[ihl..];
    if u16::from_be_bytes([udp[2], udp[3]]) != DHCP_CLIENT_PORT {
        return None;
    }
    let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    let bootp = udp.get(8..udp_len.min(udp.len()))?;
    // BOOTREPLY, Ethernet, 6-byte hardware addresses, our chaddr, then the magic cookie.
    if bootp.len() < 240
        || bootp[..3] != [2, 1, 6]
        || mac.len() != 6
        || bootp[28..34] != *mac
        || bootp[236..240] != DHCP_MAGIC
    {
        return None;
    }
    let mut nak = Nak {
        server: None,
        message: None,
    };
    let mut kind = None;
    let mut options = &bootp[240..];
    while let Some((&code, rest)) = options.split_first() {
        match code {
            0 => {
                options = rest;
                continue;
            }
            255 => break,
            _ => {}
        }
        let (&len, rest) = rest.split_first()?;
        let value = rest.get(..usize::from(len))?;
        match (code, value) {
            (53, [t]) => kind = Some(*t),
            (54, [a, b, c, d]) => nak.server = Some(Ipv4Addr::new(*a, *b, *c, *d)),
            (56, text) => nak.message = Some(String::from_utf8_lossy(text).into_owned()),
            _ => {}
        }
        options = &rest[usize::from(len)..];
    }
    (kind == Some(DHCPNAK)).then_some(nak)
}

/// The classic BPF program a [`NakWatch`] runs in the kernel: unfragmented UDP to port 68
/// passes, everything else on the link stays out of user space. Offsets start at the IP
/// header (SOCK_DGRAM).
fn nak_filter() -> [libc::sock_filter; 9] {
    let op = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    [
        op(0x30, 0, 0, 9),                           // ldb [9]: the IP protocol
        op(0x15, 0, 6, 17),                          // jeq #17 (UDP), else drop
        op(0x28, 0, 0, 6),                           // ldh [6]: flags and fragment offset
        op(0x45, 4, 0, 0x1fff),                      // jset #0x1fff: a later fragment, drop
        op(0xb1, 0, 0, 0),                           // ldxb 4*([0]&0xf): the IP header's length
        op(0x48, 0, 0, 2),                           // ldh [x+2]: the UDP destination port
        op(0x15, 0, 1, u32::from(DHCP_CLIENT_PORT)), // jeq #68, else drop
        op(0x06, 0, 0, 0xffff),                      // ret: the packet
        op(0x06, 0, 0, 0),                           // ret: nothing
    ]
}

/// A packet socket on one link that sees every DHCP reply (UDP to port 68, broadcast or
/// unicast) beside mozim's own sockets: mozim 0.3.4 drops a DHCPNAK to its renewal or
/// rebinding request and would keep a refused address until expiry.
struct NakWatch {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

impl NakWatch {
    fn open(index: u32) -> std::io::Result<NakWatch> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let os_error = std::io::Error::last_os_error;
        // Protocol 0: nothing is queued before the bind below picks the link and IPv4.
        // SAFETY: socket(2) with constant arguments; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if raw < 0 {
            return Err(os_error());
        }
        // SAFETY: `raw` is a descriptor socket(2) just returned, owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let filter = nak_filter();
        let prog = libc::sock_fprog {
            len: filter.len() as libc::c_ushort,
            filter: filter.as_ptr().cast_mut(),
        };
        // SAFETY: `prog` and the `filter` it points to outlive the call, which copies them;
        // the length passed is `prog`'s size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ATTACH_FILTER,
                (&raw const prog).cast(),
                std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(os_error());
        }
        // SAFETY: sockaddr_ll is plain old data, for which all-zero bytes are a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as libc::c_ushort;
        addr.sll_protocol = (libc::ETH_P_IP as u16).to_be();
        addr.sll_ifindex = index as libc::c_int;
        // SAFETY: `addr` is a valid, initialised sockaddr_ll and its exact size is passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(os_error());
        }
        // SAFETY: the OwnedFd stays open and is not replaced for as long as the AsyncFd owns it.
        let fd = unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(std::io::Error::from)?;
        Ok(NakWatch { fd })
    }

    fn open_logged(name: &str, index: u32) -> Option<NakWatch> {
        match NakWatch::open(index) {
            Ok(w) => Some(w),
            Err(e) => {
                log::warn!(
                    "{name}: cannot watch for DHCPNAK: {e}; a refused lease lasts until it expires"
                );
                None
            }
        }
    }

    /// The next DHCPNAK for `mac`; never returns if the socket fails.
    async fn next(&self, mac: &[u8]) -> Nak {
        use std::os::fd::AsRawFd;
        let mut buf = [0u8; 2048];
        loop {
            let Ok(mut ready) = self.fd.readable().await else {
                return std::future::pending().await;
            };
            let got = ready.try_io(|fd| {
                nix::sys::socket::recv(
                    fd.as_raw_fd(),
                    &mut buf,
                    nix::sys::socket::MsgFlags::empty(),
                )
                .map_err(std::io::Error::from)
            });
            match got {
                Ok(Ok(n)) => {
                    if let Some(nak) = buf.get(..n).and_then(|p| parse_nak(p, mac)) {
                        return nak;
                    }
                }
                Ok(Err(e)) => {
                    log::warn!("DHCPNAK watch: {e}");
                    return std::future::pending().await;
                }
                Err(_would_block) => {}
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
    let mut servers: Vec<IpAddr> = Vec::new();
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

/// Takes `offered` as the machine's name when the host file left it to the network; the
/// next rewrite of /etc/hosts names it.
fn adopt_hostname_from(state: &Shared, offered: &str, from: &str) {
    let Ok(mut s) = state.lock() else { return };
    if !s.adopt_hostname || s.hostname == offered {
        return;
    }
    if !keel_config::valid_hostname(offered) {
        log::warn!("hostname `{offered}` from {from} is not a valid hostname; ignored");
        return;
    }
    match nix::unistd::sethostname(offered) {
        Ok(()) => {
            log::info!("hostname: {offered} (from {from})");
            s.hostname = offered.to_string();
        }
        Err(e) => log::error!("sethostname {offered} (from {from}): {e}"),
    }
}

/// Renders /etc/hosts: loopback names, and the hostname on the first address configured
/// (127.0.1.1, Debian's convention, while there is none, so the name always resolves).
pub fn render_hosts(hostname: &str, applied: &[Applied]) -> String {
    let mut out = String::from(
        "# written by keel\n127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n",
    );
    let first = applied
        .iter()
        .flat_map(|a| &a.addresses)
        .map(|p| p.addr)
        .find(|ip| !ip.is_loopback());
    match first {
        Some(ip) => out += &format!("{ip} {hostname}\n"),
        None => out += &format!("127.0.1.1 {hostname}\n"),
    }
    out
}

fn write_files(state: &Shared) {
    let files = match state.lock() {
        Ok(s) => {
            let mut applied: Vec<Applied> = s.links.iter().map(|(_, a)| a.clone()).collect();
            // Autoconfigured addresses name the host only when nothing configured one.
            applied.push(Applied {
                addresses: s.slaac.iter().map(|(_, p)| *p).collect(),
                routes: Vec::new(),
                dns: Vec::new(),
                search: Vec::new(),
                mtu: None,
            });
            let resolv_conf = render_resolv_conf(&applied);
            if s.containers_follow
                && let Err(e) = keel_net::update_resolv_conf(&resolv_conf)
            {
                log::error!("{e}");
            }
            [
                (s.resolv_conf.clone(), resolv_conf),
                (s.hosts.clone(), render_hosts(&s.hostname, &applied)),
            ]
        }
        Err(_) => return,
    };
    for (path, text) in files {
        if let Err(e) = write_atomically(&path, &text) {
            log::error!("cannot write {}: {e}", path.display());
        }
    }
}

/// Readers (containers sharing the host's /etc files) see the old file or the new one,
/// never half of one.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{}.tmp", name.unwrap_or_default()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
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
        let mut s = State::new("h", Some(Path::new("/nonexistent")), Some(tx));
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
        let mut none = State::new("h", None, Some(tx));
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
