//! Addresses and routes: applying a configuration to a link over rtnetlink, and removing
//! what a lost lease or a changed configuration takes away.

use super::*;

/// Applies MTU, addresses and routes, in that order, each replacing what is there. One
/// failure does not keep the rest from being tried: every error is returned.
pub(super) async fn apply(handle: &Handle, name: &str, index: u32, a: &Applied) -> Vec<String> {
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
pub(super) fn route_message(
    index: u32,
    route: &Route,
) -> Option<netlink_packet_route::route::RouteMessage> {
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
pub(super) async fn remove_addresses(handle: &Handle, name: &str, index: u32, gone: &[Prefix]) {
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

/// Removes routes a lease installed; one already gone (with its address) is no error.
pub(super) async fn remove_routes(handle: &Handle, name: &str, index: u32, routes: &[Route]) {
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
