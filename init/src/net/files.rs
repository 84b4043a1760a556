//! /etc/resolv.conf and /etc/hosts, rendered from what every link applied, and the
//! hostname a lease offers.

use super::*;

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
pub(super) fn adopt_hostname_from(state: &Shared, offered: &str, from: &str) {
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

pub(super) fn write_files(state: &Shared) {
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
pub(super) fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    keel_image::atomic::write_atomic(path, text.as_bytes(), 0o644)
}
