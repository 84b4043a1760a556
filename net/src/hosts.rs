//! The name files containers see: a hosts file per network naming every container on it, and
//! a copy of the host's resolv.conf.
//!
//! Both are bind-mounted read-only over the container's /etc files, so they are rewritten in
//! place (a rename would leave the containers holding the old inode).

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// Where the per-network hosts files and the containers' resolv.conf live.
pub const RUN_DIR: &str = "/run/keel/net";

/// The hosts file of network `network`.
pub fn network_hosts_path(network: &str) -> PathBuf {
    Path::new(RUN_DIR).join(network).join("hosts")
}

/// The resolv.conf every container with a network namespace of its own gets.
pub fn resolv_conf_path() -> PathBuf {
    Path::new(RUN_DIR).join("resolv.conf")
}

/// The hosts file of a network: loopback names, then every container on it by name, so
/// `web` resolves wherever its neighbours look it up.
pub fn render_network_hosts(members: &[(String, Ipv4Addr)]) -> String {
    let mut out = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    let mut sorted: Vec<&(String, Ipv4Addr)> = members.iter().collect();
    sorted.sort_by_key(|(name, addr)| (*addr, name.clone()));
    for (name, addr) in sorted {
        out.push_str(&format!("{addr}\t{name}\n"));
    }
    out
}

/// The host's resolv.conf as a container sees it: loopback name servers are the host's own
/// and unreachable from another network namespace, so they are left out.
pub fn container_resolv_conf(host: &str) -> String {
    let mut out = String::new();
    for line in host.lines() {
        let mut words = line.split_whitespace();
        if words.next() == Some("nameserver")
            && let Some(addr) = words.next()
            && addr
                .parse::<std::net::IpAddr>()
                .is_ok_and(|a| a.is_loopback())
        {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Rewrites `path` in place (creating it and its directory when missing).
pub fn write_in_place(path: &Path, contents: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.write_all(contents.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_member_is_named_in_address_order() {
        let text = render_network_hosts(&[
            ("web".into(), Ipv4Addr::new(10, 88, 0, 9)),
            ("db".into(), Ipv4Addr::new(10, 88, 0, 3)),
        ]);
        assert!(text.starts_with("127.0.0.1\tlocalhost\n"));
        let db = text.find("10.88.0.3\tdb\n").unwrap();
        let web = text.find("10.88.0.9\tweb\n").unwrap();
        assert!(db < web);
    }

    #[test]
    fn loopback_name_servers_stay_on_the_host() {
        let host =
            "search example.com\nnameserver 127.0.0.53\nnameserver 10.0.2.3\nnameserver ::1\n";
        assert_eq!(
            container_resolv_conf(host),
            "search example.com\nnameserver 10.0.2.3\n"
        );
    }

    #[test]
    fn rewriting_keeps_the_inode() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/hosts");
        write_in_place(&path, "a much longer first version\n").unwrap();
        let inode = std::fs::metadata(&path).unwrap().ino();
        write_in_place(&path, "short\n").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "short\n");
    }
}
