//! IPv6 SLAAC: the kernel's router-advertisement settings per link, and watching the
//! addresses it configures.

use super::*;

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
pub(super) fn slaac_address(
    msg: &AddressMessage,
    links: &[(u32, String)],
) -> Option<(String, Prefix)> {
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
pub(super) async fn watch_addresses<S>(mut messages: S, state: Shared)
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
