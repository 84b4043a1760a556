//! The DHCPv4 life cycle (mozim): the first lease, renew at T1, rebind at T2, expiry, a
//! NAK acted on at once, release at shutdown.

use super::*;

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
pub(super) struct ClientHandle {
    pub(super) name: String,
    pub(super) stop: oneshot::Sender<()>,
    pub(super) task: JoinHandle<()>,
}

/// The DHCP clients `configure` started, so that shutdown can release their leases.
pub(super) static CLIENTS: Mutex<Vec<ClientHandle>> = Mutex::new(Vec::new());

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
pub(super) struct Dhcp {
    pub(super) handle: Handle,
    pub(super) name: String,
    pub(super) index: u32,
    pub(super) mac: Vec<u8>,
    /// The host file's `mtu`, which wins over the lease's.
    pub(super) mtu: Option<u32>,
    pub(super) state: Shared,
    /// The link's network-online slot; `None` for `dhcp4 = "optional"`.
    pub(super) slot: Option<usize>,
    pub(super) events: Option<mpsc::UnboundedSender<DhcpEvent>>,
}

impl Dhcp {
    pub(super) fn emit(&self, event: DhcpEvent) {
        if let Some(tx) = &self.events {
            let _ = tx.send(event);
        }
    }

    /// Sets this link's entry in the shared state and rewrites resolv.conf and /etc/hosts.
    pub(super) fn publish(&self, a: Applied) {
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
    pub(super) async fn unapply(&self, a: &Applied) {
        remove_routes(&self.handle, &self.name, self.index, &a.routes).await;
        remove_addresses(&self.handle, &self.name, self.index, &a.addresses).await;
        self.publish(Applied::from_config(&Interface::dhcp4(&self.name)));
        set_online(&self.state, self.slot, false);
    }
}

/// The lease currently applied to the link.
pub(super) struct Bound {
    pub(super) lease: DhcpV4Lease,
    pub(super) applied: Applied,
    pub(super) expires: tokio::time::Instant,
}

impl Bound {
    pub(super) fn address(&self) -> Prefix {
        self.applied.addresses.first().copied().unwrap_or(Prefix {
            addr: IpAddr::V4(self.lease.yiaddr),
            len: 32,
        })
    }
}

/// What woke the lease loop.
pub(super) enum LeaseWake {
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
    let mut s = NetworkState::new(hostname, Some(etc), None);
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
pub(super) async fn run_dhcp(d: Dhcp, first: oneshot::Sender<()>, mut stop: oneshot::Receiver<()>) {
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
                        Ok(r) => LeaseWake::Ran(r),
                        Err(_) => LeaseWake::AcquireTimeout,
                    }
                } else {
                    LeaseWake::Ran(client.run().await)
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
                _ = &mut stop => LeaseWake::Stop,
                nak = nak, if naks.is_some() => LeaseWake::Nak(nak),
                _ = tokio::time::sleep_until(expires.unwrap_or(far)), if expires.is_some() => {
                    LeaseWake::Expired
                }
                _ = tokio::time::sleep_until(backoff.unwrap_or(far)), if backoff.is_some() => {
                    LeaseWake::Retry
                }
                step = run, if backoff.is_none() => step,
            }
        };
        match step {
            LeaseWake::Stop => {
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
            LeaseWake::Retry => backoff = None,
            LeaseWake::Nak(nak) => {
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
            LeaseWake::Expired => {
                naks = None;
                if let Some(b) = bound.take() {
                    expire(&d, &b).await;
                }
                client.clean_up();
                acquiring = true;
            }
            LeaseWake::AcquireTimeout => {
                log::warn!(
                    "{name}: no DHCP lease within {} s; retrying in {} s",
                    ACQUIRE_TIMEOUT.as_secs(),
                    retry.as_secs()
                );
                client.clean_up();
                backoff = Some(tokio::time::Instant::now() + retry);
                retry = (retry * 2).min(Duration::from_secs(60));
            }
            LeaseWake::Ran(Err(e)) => {
                naks = None;
                log::warn!("{name}: DHCP: {e}; retrying in {} s", retry.as_secs());
                // The address stays until the lease's own expiry, renewed or not.
                client.clean_up();
                acquiring = true;
                backoff = Some(tokio::time::Instant::now() + retry);
                retry = (retry * 2).min(Duration::from_secs(60));
            }
            LeaseWake::Ran(Ok(DhcpV4State::Done(lease))) => {
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
            LeaseWake::Ran(Ok(DhcpV4State::Renewing)) => {
                acquiring = false;
                log::info!("{name}: DHCP renewing (T1)");
                naks = naks.or_else(|| NakWatch::open_logged(name, d.index));
                d.emit(DhcpEvent::Renewing);
            }
            LeaseWake::Ran(Ok(DhcpV4State::Rebinding)) => {
                acquiring = false;
                log::info!("{name}: DHCP rebinding (T2): the server did not answer");
                naks = naks.or_else(|| NakWatch::open_logged(name, d.index));
                d.emit(DhcpEvent::Rebinding);
            }
            LeaseWake::Ran(Ok(DhcpV4State::InitReboot)) => {
                naks = None;
                // Out of rebinding, this is mozim saying the lease ran out.
                if let Some(b) = bound.take() {
                    expire(&d, &b).await;
                }
                acquiring = true;
            }
            LeaseWake::Ran(Ok(DhcpV4State::Selecting)) => {}
        }
    }
}

/// A lease that ran out: off the link, out of resolv.conf and hosts.
pub(super) async fn expire(d: &Dhcp, b: &Bound) {
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
