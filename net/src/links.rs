//! Bridges and veth pairs over rtnetlink.
//!
//! A container's end of the pair is created straight inside its network namespace, already
//! named `eth0` (the peer carries the namespace's pid), so no temporary name ever exists on
//! the host and nothing has to be renamed or moved afterwards.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsFd;

use futures_util::TryStreamExt;
use keel_config::BridgeNetwork;
use netlink_packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkMessage};
use rtnetlink::{
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
};

use crate::NetError;

/// The interface a container sees.
pub const CONTAINER_IFNAME: &str = "eth0";

/// A netlink connection in one network namespace.
#[derive(Clone)]
pub struct Links {
    handle: Handle,
}

impl Links {
    /// A connection in the calling thread's network namespace. Needs a tokio runtime: the
    /// connection runs as a task.
    pub fn connect() -> Result<Links, NetError> {
        let (connection, handle, messages) =
            rtnetlink::new_connection().map_err(|e| NetError::Netlink {
                what: "opening a netlink socket".into(),
                detail: e.to_string(),
            })?;
        drop(messages);
        tokio::spawn(connection);
        Ok(Links { handle })
    }

    /// A connection inside the network namespace of process `pid`.
    ///
    /// A netlink socket belongs to the namespace it was created in, so the calling thread
    /// joins `pid`'s namespace only for the socket(2) call and returns at once; nothing
    /// awaits in between, so no other task ever runs in the wrong namespace.
    pub fn connect_in(pid: u32) -> Result<Links, NetError> {
        let ns = |path: String| {
            File::open(&path).map_err(|e| NetError::Namespace {
                what: format!("opening {path}"),
                detail: e.to_string(),
            })
        };
        let target = ns(format!("/proc/{pid}/ns/net"))?;
        let own = ns("/proc/thread-self/ns/net".to_string())?;
        nix::sched::setns(target.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
            NetError::Namespace {
                what: format!("joining the network namespace of pid {pid}"),
                detail: e.to_string(),
            }
        })?;
        let links = Links::connect();
        if let Err(e) = nix::sched::setns(own.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET) {
            // PID 1 stuck in a container's namespace would configure the wrong machine.
            // Returning to our own namespace cannot fail while we hold its fd, short of a
            // kernel bug; say so as loudly as we can.
            log::error!("returning to PID 1's network namespace failed: {e}");
            return Err(NetError::Namespace {
                what: "returning to PID 1's network namespace".into(),
                detail: e.to_string(),
            });
        }
        links
    }

    async fn find(&self, name: &str) -> Result<Option<LinkMessage>, NetError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(link) => Ok(link),
            // ENODEV: no such link.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(netlink(format!("looking up link {name}"), e)),
        }
    }

    async fn index_of(&self, name: &str) -> Result<u32, NetError> {
        self.find(name)
            .await?
            .map(|l| l.header.index)
            .ok_or_else(|| NetError::Netlink {
                what: format!("link {name}"),
                detail: "not found".into(),
            })
    }

    /// Creates the network's bridge if it is missing, with the gateway address, and brings
    /// it up. Idempotent: two containers starting at once may both call it.
    pub async fn ensure_bridge(&self, network: &BridgeNetwork) -> Result<u32, NetError> {
        let name = &network.bridge;
        let index = match self.find(name).await? {
            Some(link) => link.header.index,
            None => {
                let mut builder = LinkBridge::new(name);
                if let Some(mtu) = network.mtu {
                    builder = builder.mtu(mtu);
                }
                match self.handle.link().add(builder.build()).execute().await {
                    Ok(()) => {}
                    Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {}
                    Err(e) => return Err(netlink(format!("creating bridge {name}"), e)),
                }
                self.index_of(name).await?
            }
        };
        // Connections from the host's loopback to a published port leave through the
        // bridge with a 127.0.0.0/8 source until masqueraded; the kernel drops such packets
        // on a non-loopback device unless told otherwise.
        crate::sysctl(&format!("net/ipv4/conf/{name}/route_localnet"), "1")?;
        self.handle
            .address()
            .add(index, IpAddr::V4(network.gateway), network.prefix_len)
            .replace()
            .execute()
            .await
            .map_err(|e| netlink(format!("adding {} to {name}", network.gateway), e))?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|e| netlink(format!("bringing up {name}"), e))?;
        Ok(index)
    }

    /// Connects process `pid`'s network namespace to `network`: a veth pair whose host end
    /// `host_ifname` joins the bridge, and whose other end is the container's `eth0` with
    /// `address`, the network's MTU and a default route through the gateway.
    pub async fn attach(
        &self,
        pid: u32,
        host_ifname: &str,
        network: &BridgeNetwork,
        address: Ipv4Addr,
    ) -> Result<(), NetError> {
        let bridge = self.ensure_bridge(network).await?;
        // The namespace of a previous run of the same container is torn down
        // asynchronously by the kernel; its pair may still be here.
        if let Some(stale) = self.find(host_ifname).await? {
            let _ = self.handle.link().del(stale.header.index).execute().await;
        }
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(CONTAINER_IFNAME.to_string())
            .setns_by_pid(pid)
            .build();
        let mut builder = LinkVeth::new(host_ifname, CONTAINER_IFNAME)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)));
        if let Some(mtu) = network.mtu {
            builder = builder.mtu(mtu);
        }
        self.handle
            .link()
            .add(builder.build())
            .execute()
            .await
            .map_err(|e| netlink(format!("creating veth pair {host_ifname}"), e))?;
        let host_index = self.index_of(host_ifname).await?;
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(host_index)
                    .controller(bridge)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| netlink(format!("attaching {host_ifname} to {}", network.bridge), e))?;

        let inside = Links::connect_in(pid)?;
        let index = inside.index_of(CONTAINER_IFNAME).await?;
        if let Some(mtu) = network.mtu {
            inside
                .handle
                .link()
                .set(LinkUnspec::new_with_index(index).mtu(mtu).build())
                .execute()
                .await
                .map_err(|e| netlink("setting the container's MTU".into(), e))?;
        }
        inside
            .handle
            .address()
            .add(index, IpAddr::V4(address), network.prefix_len)
            .execute()
            .await
            .map_err(|e| netlink(format!("adding {address} to the container's eth0"), e))?;
        inside
            .handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|e| netlink("bringing up the container's eth0".into(), e))?;
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .output_interface(index)
            .gateway(network.gateway)
            .build();
        inside
            .handle
            .route()
            .add(route)
            .execute()
            .await
            .map_err(|e| netlink(format!("default route via {}", network.gateway), e))?;
        Ok(())
    }

    /// The bridge's master index of `ifname`, for tests and diagnostics.
    pub async fn controller_of(&self, ifname: &str) -> Result<Option<u32>, NetError> {
        Ok(self.find(ifname).await?.and_then(|l| {
            l.attributes.iter().find_map(|a| match a {
                LinkAttribute::Controller(i) => Some(*i),
                _ => None,
            })
        }))
    }
}

fn netlink(what: String, e: rtnetlink::Error) -> NetError {
    NetError::Netlink {
        what,
        detail: e.to_string(),
    }
}

/// The host end's name: unique per container name, within IFNAMSIZ.
pub fn host_ifname(container: &str) -> String {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in container.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    format!("veth{hash:08x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ends_fit_ifnamsiz_and_differ_per_container() {
        let a = host_ifname("web");
        let b = host_ifname("db");
        assert_eq!(a.len(), 12);
        assert_ne!(a, b);
        assert_eq!(a, host_ifname("web"));
    }
}
