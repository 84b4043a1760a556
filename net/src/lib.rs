//! Container networks.
//!
//! - [`links`]: the bridge of every network and a veth pair per container, over rtnetlink.
//! - [`nft`]: outbound NAT and published ports, an nftables table replaced atomically over
//!   netlink.
//! - [`hosts`]: the /etc/hosts and /etc/resolv.conf containers see.
//!
//! Which address a container gets is decided by the host file's validation
//! (`keel_config::Attachment`), so every name is known before anything starts.
//! [`ContainerNetworks`] ties it together for the supervisor.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;

use keel_config::{Attachment, BridgeNetwork, HostConfig, NetworkMode};

pub mod hosts;
pub mod links;
pub mod nft;

pub use links::Links;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{what}: {detail}")]
    Netlink { what: String, detail: String },
    #[error("{what}: {detail}")]
    Namespace { what: String, detail: String },
    #[error("writing /proc/sys/{path}: {detail}")]
    Sysctl { path: String, detail: String },
    #[error("{what}: {detail}")]
    Files { what: String, detail: String },
    #[error("nftables: {0}")]
    Nft(#[from] nft::NftError),
}

/// Kernel modules container networks need, beyond Keel's base set. The guest has no
/// modprobe helper, so nothing is loaded on demand.
pub fn kernel_modules() -> Vec<&'static str> {
    let mut modules = vec!["bridge", "veth"];
    modules.extend(nft::KERNEL_MODULES.iter().copied());
    modules
}

/// Writes a sysctl under /proc/sys.
pub fn sysctl(path: &str, value: &str) -> Result<(), NetError> {
    std::fs::write(format!("/proc/sys/{path}"), value).map_err(|e| NetError::Sysctl {
        path: path.to_string(),
        detail: e.to_string(),
    })
}

/// The containers of `config` on a bridged network, with their attachments.
fn bridged_members(config: &HostConfig) -> BTreeMap<String, Attachment> {
    config
        .containers
        .iter()
        .filter_map(|(name, c)| match &c.isolation.network {
            NetworkMode::Bridged(a) => Some((name.clone(), a.clone())),
            _ => None,
        })
        .collect()
}

/// The bridged networks of a host and which containers' ports are published right now.
pub struct ContainerNetworks {
    networks: BTreeMap<String, BridgeNetwork>,
    members: BTreeMap<String, Attachment>,
    /// Containers whose ports are in the NAT table: those with a running process.
    published: BTreeSet<String>,
    links: Option<Links>,
}

impl ContainerNetworks {
    pub fn new(config: &HostConfig) -> ContainerNetworks {
        ContainerNetworks {
            networks: config.networks.clone(),
            members: bridged_members(config),
            published: BTreeSet::new(),
            links: None,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.networks.is_empty()
    }

    pub fn attachment(&self, container: &str) -> Option<&Attachment> {
        self.members.get(container)
    }

    /// Boot-time setup, before any container starts: forwarding on, each network's hosts
    /// file, the containers' resolv.conf, and the NAT table with no ports yet. Bridges come
    /// with their first container. Returns every error; one does not stop the rest.
    pub fn prepare(&mut self, host_resolv_conf: &str) -> Vec<NetError> {
        let mut errors = Vec::new();
        if self.is_empty() {
            return errors;
        }
        if let Err(e) = sysctl("net/ipv4/ip_forward", "1") {
            errors.push(e);
        }
        errors.extend(self.write_hosts_files());
        if let Err(e) = update_resolv_conf(host_resolv_conf) {
            errors.push(e);
        }
        if let Err(e) = self.program() {
            errors.push(e);
        }
        errors
    }

    /// Takes the bridged containers of `config` as the networks' members (`keel apply`; the
    /// networks themselves must be the ones this was made with). Each network's hosts file
    /// is rewritten in place, so running neighbours see the new names at once, and the NAT
    /// table is reprogrammed once: a container that left, or whose attachment changed (it
    /// is being restarted), loses its published ports now; its next start publishes the
    /// new ones. Returns every error; one does not stop the rest.
    pub fn set_members(&mut self, config: &HostConfig) -> Vec<NetError> {
        let old = std::mem::replace(&mut self.members, bridged_members(config));
        self.published.retain(|name| {
            old.get(name)
                .is_some_and(|a| self.members.get(name) == Some(a))
        });
        let mut errors = self.write_hosts_files();
        if !self.is_empty()
            && let Err(e) = self.program()
        {
            errors.push(e);
        }
        errors
    }

    /// Every network's hosts file, naming its members.
    fn write_hosts_files(&self) -> Vec<NetError> {
        let mut errors = Vec::new();
        for network in self.networks.keys() {
            let members: Vec<(String, std::net::Ipv4Addr)> = self
                .members
                .iter()
                .filter(|(_, a)| a.network == *network)
                .map(|(name, a)| (name.clone(), a.address))
                .collect();
            let path = hosts::network_hosts_path(network);
            if let Err(e) = hosts::write_in_place(&path, &hosts::render_network_hosts(&members)) {
                errors.push(NetError::Files {
                    what: format!("writing {}", path.display()),
                    detail: e.to_string(),
                });
            }
        }
        errors
    }

    /// Starts connecting container `name`, whose first process is `pid`, to its network.
    /// The returned future owns everything it needs; the caller runs it as a task and lets
    /// the container go on only once it succeeded. `None` for a container without a bridged
    /// network.
    pub fn attach(
        &mut self,
        name: &str,
        pid: u32,
    ) -> Option<impl Future<Output = Result<(), NetError>> + 'static> {
        let attachment = self.members.get(name)?.clone();
        let network = self.networks.get(&attachment.network)?.clone();
        let links = match &self.links {
            Some(l) => Ok(l.clone()),
            None => Links::connect().inspect(|l| self.links = Some(l.clone())),
        };
        let ifname = links::host_ifname(name);
        Some(async move {
            links?
                .attach(pid, &ifname, &network, attachment.address)
                .await
        })
    }

    /// Adds (`running`) or removes container `name`'s published ports and reprograms the
    /// NAT table. A container without ports changes nothing.
    pub fn set_published(&mut self, name: &str, running: bool) -> Result<(), NetError> {
        let Some(a) = self.members.get(name) else {
            return Ok(());
        };
        let changed = if running {
            self.published.insert(name.to_string())
        } else {
            self.published.remove(name)
        };
        if changed && !a.ports.is_empty() {
            self.program()?;
        }
        Ok(())
    }

    /// The NAT table for the current state.
    pub fn ruleset(&self) -> nft::Ruleset {
        let networks = self
            .networks
            .values()
            .map(|n| nft::NatNetwork {
                bridge: n.bridge.clone(),
                subnet: n.subnet,
                prefix_len: n.prefix_len,
                masquerade: n.masquerade,
            })
            .collect();
        let mut ports = Vec::new();
        for name in &self.published {
            let Some(a) = self.members.get(name) else {
                continue;
            };
            for p in &a.ports {
                ports.push(nft::PublishedPort {
                    protocol: match p.protocol {
                        keel_config::Protocol::Tcp => nft::Protocol::Tcp,
                        keel_config::Protocol::Udp => nft::Protocol::Udp,
                    },
                    host_ip: p.host_ip,
                    host_port: p.host_port,
                    container_ip: a.address,
                    container_port: p.container_port,
                });
            }
        }
        nft::Ruleset { networks, ports }
    }

    fn program(&self) -> Result<(), NetError> {
        Ok(nft::apply(&self.ruleset())?)
    }

    /// Removes Keel's NAT table (at shutdown, after the containers stopped).
    pub fn teardown(&mut self) -> Result<(), NetError> {
        if self.is_empty() {
            return Ok(());
        }
        self.published.clear();
        Ok(nft::remove()?)
    }
}

/// Refreshes the resolv.conf containers see from the host's current one.
pub fn update_resolv_conf(host_resolv_conf: &str) -> Result<(), NetError> {
    let path = hosts::resolv_conf_path();
    hosts::write_in_place(&path, &hosts::container_resolv_conf(host_resolv_conf)).map_err(|e| {
        NetError::Files {
            what: format!("writing {}", path.display()),
            detail: e.to_string(),
        }
    })
}
