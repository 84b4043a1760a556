//! Host networking over rtnetlink: loopback, links matched by name, MAC or driver, static
//! IPv4/IPv6 addresses and routes, MTU, DHCPv4 (mozim), the kernel command line's `ip=`,
//! and /etc/resolv.conf and /etc/hosts. No `ip`, no dhclient.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use keel_config::{Interface, LinkMatch, Prefix, Route};
use mozim::{DhcpV4Client, DhcpV4Config, DhcpV4Lease, DhcpV4State};
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use tokio::sync::{mpsc, oneshot};
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
    resolv_conf: PathBuf,
    hosts: PathBuf,
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
/// returns once each has its first lease (or gave up waiting).
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

    let state: Shared = Arc::new(Mutex::new(State {
        hostname: hostname.to_string(),
        links: Vec::new(),
        resolv_conf: RESOLV_CONF.into(),
        hosts: HOSTS.into(),
    }));
    // /etc/hosts names the host from the start, even before (or without) any address.
    write_files(&state);

    let cmdline_text = std::fs::read_to_string(PROC_CMDLINE).unwrap_or_default();
    let args = cmdline::parse(&cmdline_text);
    for e in &args.errors {
        log::error!("kernel command line: {e}; ignored");
    }
    let mut plan: Vec<(String, Interface, Source)> = Vec::new();
    for arg in &args.ip {
        if let Some(h) = &arg.hostname {
            log::info!(
                "{}: ip= hostname `{h}` ignored: the host file names the machine",
                arg.interface
            );
        }
        plan.push((arg.interface.clone(), arg.to_interface(), Source::Cmdline));
    }
    for (label, config) in interfaces {
        plan.push((label.clone(), config.clone(), Source::HostFile));
    }

    // Kernel names already configured, with what configured them.
    let mut taken: Vec<(String, String)> = Vec::new();
    let mut pending = Vec::new();
    for (label, config, source) in plan {
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
            continue;
        }
        taken.push((name.clone(), what.clone()));
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
            pending.push((name, rx));
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
    // RFC 3442: with classless static routes the Router option is ignored.
    let gateway = match &lease.classless_routes {
        Some(routes) => routes
            .iter()
            .find(|r| r.prefix_length == 0)
            .map(|r| r.router),
        None => lease.gateways.as_ref().and_then(|g| g.first().copied()),
    };
    Applied {
        addresses: vec![Prefix {
            addr: IpAddr::V4(lease.yiaddr),
            len: prefix_len,
        }],
        routes: gateway
            .map(|gw| Route {
                to: Prefix::default_for(&IpAddr::V4(gw)),
                via: Some(IpAddr::V4(gw)),
            })
            .into_iter()
            .collect(),
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

    /// Takes a lease's addressing off the link: routes first (they go through the address).
    async fn unapply(&self, a: &Applied) {
        remove_routes(&self.handle, &self.name, self.index, &a.routes).await;
        remove_addresses(&self.handle, &self.name, self.index, &a.addresses).await;
        self.publish(Applied::from_config(&Interface::dhcp4(&self.name)));
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
    let state: Shared = Arc::new(Mutex::new(State {
        hostname: hostname.to_string(),
        links: vec![(
            name.to_string(),
            Applied::from_config(&Interface::dhcp4(name)),
        )],
        resolv_conf: etc.join("resolv.conf"),
        hosts: etc.join("hosts"),
    }));
    let (first, _) = oneshot::channel();
    run_dhcp(
        Dhcp {
            handle,
            name: name.to_string(),
            index,
            mac,
            mtu: None,
            state,
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
/// over. `stop` sends DHCPRELEASE, removes the address and ends the client.
async fn run_dhcp(d: Dhcp, first: oneshot::Sender<()>, mut stop: oneshot::Receiver<()>) {
    let name = d.name.as_str();
    let mut first = Some(first);
    let mut config = DhcpV4Config::new(name);
    config.set_iface_index(d.index);
    if let Err(e) = config.set_iface_mac_raw(&d.mac) {
        log::error!("{name}: DHCP: bad MAC address: {e}");
        return;
    }
    let hostname = d
        .state
        .lock()
        .map(|s| s.hostname.clone())
        .unwrap_or_default();
    config.set_host_name(&hostname);
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
            tokio::select! {
                biased;
                _ = &mut stop => Step::Stop,
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
            Step::Expired => {
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
                log::warn!("{name}: DHCP: {e}; retrying in {} s", retry.as_secs());
                // The address stays until the lease's own expiry, renewed or not.
                client.clean_up();
                acquiring = true;
                backoff = Some(tokio::time::Instant::now() + retry);
                retry = (retry * 2).min(Duration::from_secs(60));
            }
            Step::Ran(Ok(DhcpV4State::Done(lease))) => {
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
                if let Some(tx) = first.take() {
                    let _ = tx.send(());
                }
            }
            Step::Ran(Ok(DhcpV4State::Renewing)) => {
                acquiring = false;
                log::info!("{name}: DHCP renewing (T1)");
                d.emit(DhcpEvent::Renewing);
            }
            Step::Ran(Ok(DhcpV4State::Rebinding)) => {
                acquiring = false;
                log::info!("{name}: DHCP rebinding (T2): the server did not answer");
                d.emit(DhcpEvent::Rebinding);
            }
            Step::Ran(Ok(DhcpV4State::InitReboot)) => {
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
            let applied: Vec<Applied> = s.links.iter().map(|(_, a)| a.clone()).collect();
            [
                (s.resolv_conf.clone(), render_resolv_conf(&applied)),
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
}
