//! Container networks.
//!
//! - [`ipam`]: which address each container gets on its network (pure logic).
//! - [`links`]: the bridge of every network and a veth pair per container, over rtnetlink.
//! - [`nft`]: outbound NAT and published ports, an nftables table replaced atomically over
//!   netlink.
//! - [`hosts`]: the /etc/hosts and /etc/resolv.conf containers see.

pub mod nft;
