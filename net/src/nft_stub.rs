use std::net::Ipv4Addr;
pub struct NatNetwork { pub bridge: String, pub subnet: Ipv4Addr, pub prefix_len: u8, pub masquerade: bool }
#[derive(Clone, Copy, Debug, PartialEq, Eq)] pub enum Protocol { Tcp, Udp }
pub struct PublishedPort { pub protocol: Protocol, pub host_ip: Option<Ipv4Addr>, pub host_port: u16, pub container_ip: Ipv4Addr, pub container_port: u16 }
#[derive(Default)] pub struct Ruleset { pub networks: Vec<NatNetwork>, pub ports: Vec<PublishedPort> }
#[derive(Debug, thiserror::Error)] pub enum NftError { #[error("x")] X }
pub const KERNEL_MODULES: &[&str] = &[];
pub fn apply(_ruleset: &Ruleset) -> Result<(), NftError> { Ok(()) }
pub fn remove() -> Result<(), NftError> { Ok(()) }
