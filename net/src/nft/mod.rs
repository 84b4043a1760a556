//! NAT and isolation for container networks: one nftables table, `ip keel`, programmed over
//! a NETLINK_NETFILTER socket (the filter rules that keep networks apart: `isolation`).
//!
//! The guest has no `nft` binary and no libnftnl, so the table is encoded here with
//! netlink-packet-netfilter's typed nf_tables messages. The crate has no nat, masq, fib or
//! ct expressions; those are emitted raw (`Expressions::Other`) with the attribute numbers
//! of the kernel uapi header `linux/netfilter/nf_tables.h`, quoted next to each constant.
//!
//! Every change is one nfnetlink batch, which the kernel applies as a single transaction:
//! either the whole new table is in place afterwards, or nothing changed.
//!
//! The socket is blocking with a receive timeout because PID 1 calls this from its event
//! loop and must never hang on the kernel.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use netlink_packet_core::{
    DefaultNla, ErrorBuffer, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST, NLMSG_ERROR,
    NetlinkBuffer, NetlinkHeader, NetlinkMessage,
};
use netlink_packet_netfilter::nftables::{
    Bitwise, ChainAttribute, ChainMessage, Cmp, DataAttribute, Expressions, Hook, Immediate,
    InetHookNumber, ListAttribute, Meta, MetaKey, NfTablesMessage, Operator, Payload, Register,
    RuleAttribute, RuleMessage, TableAttribute, TableMessage, Verdict, VerdictAttribute,
};
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

mod isolation;

/// One network whose containers are NATed: the bridge they hang off and its subnet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatNetwork {
    /// The bridge's interface name: traffic leaving through it goes to containers, anything
    /// else leaves the host.
    pub bridge: String,
    /// Any address of the subnet; the host bits are masked off.
    pub subnet: Ipv4Addr,
    pub prefix_len: u8,
    /// Rewrite outbound connections to the host's address, so containers reach networks
    /// that have no route back to the private subnet.
    pub masquerade: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

/// A host port forwarded to a container, as `docker run -p` does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishedPort {
    pub protocol: Protocol,
    /// Only connections to this host address are forwarded; `None` forwards connections to
    /// any of the host's own addresses, whatever DHCP handed out.
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub container_ip: Ipv4Addr,
    pub container_port: u16,
}

/// Everything table `ip keel` holds. It is always replaced as a whole, so the caller keeps
/// the desired state and never has to compute deltas.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub networks: Vec<NatNetwork>,
    pub ports: Vec<PublishedPort>,
}

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// Caught before anything is sent, so the kernel state is untouched.
    #[error("invalid nftables ruleset: {0}")]
    Invalid(String),
    #[error("cannot open or set up the NETLINK_NETFILTER socket ({what}): {source}")]
    Socket {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot send the nftables batch ({len} bytes) to the kernel: {source}")]
    Send {
        len: usize,
        #[source]
        source: io::Error,
    },
    #[error("cannot receive the kernel's nftables replies: {0}")]
    Receive(#[source] io::Error),
    /// The kernel refused the batch; `message` names the first message it refused. The
    /// transaction was aborted, so the previous table (if any) is still in place.
    #[error("kernel refused nftables message `{message}`: {}{hint}",
        io::Error::from_raw_os_error(*errno))]
    Kernel {
        message: String,
        errno: i32,
        hint: &'static str,
    },
    #[error(
        "no reply from the kernel within {timeout:?}: {missing} of {total} nftables messages unanswered"
    )]
    Timeout {
        timeout: Duration,
        missing: usize,
        total: usize,
    },
    #[error("malformed netlink reply from the kernel: {0}")]
    Malformed(String),
}

/// Kernel modules the rules need (the guest has no modprobe helper, so nothing autoloads).
/// nf_tables itself carries the meta, cmp, payload, bitwise and immediate expressions; the
/// others are the `nat` chain type, and the dnat (`nft_nat`), masquerade (`nft_masq`),
/// `fib daddr type` (`nft_fib_ipv4` on top of `nft_fib`) and `ct status` (`nft_ct`)
/// expressions. Their dependencies (nfnetlink, nf_conntrack, nf_nat, nf_defrag_ipv4, ...)
/// come from Keel's module closure. Names as in the Debian 6.1 kernel.
pub const KERNEL_MODULES: &[&str] = &[
    "nf_tables",
    "nft_chain_nat",
    "nft_nat",
    "nft_masq",
    "nft_fib",
    "nft_fib_ipv4",
    "nft_ct",
];

/// How long one receive may block: the kernel answers a batch synchronously during
/// `send`, so anything longer means the replies were lost, and PID 1 must move on.
const RECV_TIMEOUT: Duration = Duration::from_secs(2);

const TABLE: &str = "keel";
const CHAIN_PREROUTING: &str = "prerouting";
const CHAIN_OUTPUT: &str = "output";
const CHAIN_POSTROUTING: &str = "postrouting";

// include/uapi/linux/netfilter/nfnetlink.h: the batch messages' res_id names the subsystem.
const NFNL_SUBSYS_NFTABLES: u16 = 10;

// include/uapi/linux/netfilter.h
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;

// nf_tables.h, enum nft_payload_bases
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;

// nf_tables.h, enum nft_fib_attributes / nft_fib_result / nft_fib_flags
const NFTA_FIB_DREG: u16 = 1;
const NFTA_FIB_RESULT: u16 = 2;
const NFTA_FIB_FLAGS: u16 = 3;
const NFT_FIB_RESULT_ADDRTYPE: u32 = 3;
const NFTA_FIB_F_DADDR: u32 = 1 << 1;
// include/uapi/linux/rtnetlink.h: the address type `fib ... type local` compares with.
const RTN_LOCAL: u32 = 2;

// nf_tables.h, enum nft_ct_attributes / nft_ct_keys
const NFTA_CT_DREG: u16 = 1;
const NFTA_CT_KEY: u16 = 2;
const NFT_CT_STATUS: u32 = 2;
// include/uapi/linux/netfilter/nf_conntrack_common.h: IPS_DST_NAT = 1 << IPS_DST_NAT_BIT (5)
const IPS_DST_NAT: u32 = 1 << 5;

// nf_tables.h, enum nft_nat_attributes / nft_nat_types
const NFTA_NAT_TYPE: u16 = 1;
const NFTA_NAT_FAMILY: u16 = 2;
const NFTA_NAT_REG_ADDR_MIN: u16 = 3;
const NFTA_NAT_REG_PROTO_MIN: u16 = 5;
const NFT_NAT_DNAT: u32 = 1;
// include/uapi/linux/netfilter.h, NFPROTO_IPV4
const NFPROTO_IPV4: u32 = 2;

// include/uapi/linux/if.h: meta iifname/oifname load this many bytes, NUL padded.
const IFNAMSIZ: usize = 16;

// Register numbers as the kernel reads them (NFT_REG_1, NFT_REG_2: 16-byte registers).
const REG_1: u32 = 1;
const REG_2: u32 = 2;

/// Replaces table `ip keel` atomically (one batch: add table, delete table, add table,
/// chains, rules — so an old table never lingers and a bad batch changes nothing).
pub fn apply(ruleset: &Ruleset) -> Result<(), NftError> {
    let batch = apply_batch(ruleset, 1)?;
    send_batch(&batch)
}

/// Deletes table `ip keel` if present.
pub fn remove() -> Result<(), NftError> {
    // Adding the table first makes the delete succeed whether or not it existed: there
    // is no "delete if exists" in Linux 6.1 (NFT_MSG_DESTROYTABLE came in 6.3).
    let mut b = Batch::new(1);
    b.push("add table ip keel", add_table(), NLM_F_CREATE);
    b.push("delete table ip keel", delete_table(), 0);
    send_batch(&b.finish())
}

/// One netlink message of a batch and what it does, for error reports: the kernel only
/// tells which sequence number it refused.
#[derive(Clone, Debug)]
struct Message {
    seq: u32,
    what: String,
    bytes: Vec<u8>,
}

/// Messages in order, from batch begin to batch end, each already serialized.
struct Batch {
    next_seq: u32,
    messages: Vec<Message>,
}

impl Batch {
    fn new(first_seq: u32) -> Self {
        let mut b = Batch {
            next_seq: first_seq,
            messages: Vec::new(),
        };
        b.push_control("batch begin", ControlMessage::BatchBegin);
        b
    }

    fn push_control(&mut self, what: &str, msg: ControlMessage) {
        let header = NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, NFNL_SUBSYS_NFTABLES);
        self.push_raw(what, NetfilterMessage::new(header, msg), NLM_F_REQUEST);
    }

    fn push(&mut self, what: &str, msg: NfTablesMessage, flags: u16) {
        let header = NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0);
        self.push_raw(
            what,
            NetfilterMessage::new(header, msg),
            NLM_F_REQUEST | NLM_F_ACK | flags,
        );
    }

    fn push_raw(&mut self, what: &str, msg: NetfilterMessage, flags: u16) {
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.next_seq;
        let mut nl = NetlinkMessage::new(header, msg.into());
        nl.finalize();
        let mut bytes = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut bytes);
        self.messages.push(Message {
            seq: self.next_seq,
            what: what.to_string(),
            bytes,
        });
        self.next_seq = self.next_seq.wrapping_add(1);
    }

    fn finish(mut self) -> Vec<Message> {
        self.push_control("batch end", ControlMessage::BatchEnd);
        self.messages
    }
}

/// The whole replacement of table `ip keel`, batch begin and end included.
fn apply_batch(ruleset: &Ruleset, first_seq: u32) -> Result<Vec<Message>, NftError> {
    validate(ruleset)?;
    let mut b = Batch::new(first_seq);
    b.push("add table ip keel", add_table(), NLM_F_CREATE);
    b.push("delete table ip keel", delete_table(), 0);
    b.push("add table ip keel", add_table(), NLM_F_CREATE);
    for (name, hook, priority) in [
        (CHAIN_PREROUTING, InetHookNumber::PreRouting, -100),
        (CHAIN_OUTPUT, InetHookNumber::LocalOut, -100),
        (CHAIN_POSTROUTING, InetHookNumber::PostRouting, 100),
    ] {
        b.push(
            &format!("add chain ip keel {name} (type nat, priority {priority})"),
            add_chain("nat", name, hook, priority),
            NLM_F_CREATE,
        );
    }
    for port in &ruleset.ports {
        let proto = match port.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        let host = port
            .host_ip
            .map_or_else(|| "local".to_string(), |ip| ip.to_string());
        for chain in [CHAIN_PREROUTING, CHAIN_OUTPUT] {
            b.push(
                &format!(
                    "add rule ip keel {chain}: {proto} {host}:{} dnat to {}:{}",
                    port.host_port, port.container_ip, port.container_port
                ),
                add_rule(chain, dnat_rule(port)),
                NLM_F_CREATE | NLM_F_APPEND,
            );
        }
    }
    for net in &ruleset.networks {
        let subnet = format!("{}/{}", network_address(net), net.prefix_len);
        let rules = [
            (
                net.masquerade,
                format!("ip saddr {subnet} oifname != {} masquerade", net.bridge),
                outbound_masquerade_rule(net),
            ),
            (
                true,
                format!("ip saddr 127.0.0.0/8 oifname {} masquerade", net.bridge),
                loopback_masquerade_rule(net),
            ),
            (
                true,
                format!(
                    "ct status dnat ip saddr {subnet} oifname {} masquerade",
                    net.bridge
                ),
                hairpin_masquerade_rule(net),
            ),
        ];
        for (wanted, text, exprs) in rules {
            if wanted {
                b.push(
                    &format!("add rule ip keel postrouting: {text}"),
                    add_rule(CHAIN_POSTROUTING, exprs),
                    NLM_F_CREATE | NLM_F_APPEND,
                );
            }
        }
    }
    for (name, hook, priority) in isolation::CHAINS {
        b.push(
            &format!("add chain ip keel {name} (type filter, priority {priority})"),
            add_chain("filter", name, hook, priority),
            NLM_F_CREATE,
        );
    }
    for rule in isolation::rules(&ruleset.networks) {
        b.push(
            &format!("add rule ip keel {}: {}", rule.chain, rule.text),
            add_rule(rule.chain, rule.exprs),
            NLM_F_CREATE | NLM_F_APPEND,
        );
    }
    Ok(b.finish())
}

/// Rejects what the kernel would reject less legibly, or silently misinterpret (a 16-byte
/// interface name would be truncated and match a different bridge).
fn validate(ruleset: &Ruleset) -> Result<(), NftError> {
    for net in &ruleset.networks {
        if net.bridge.is_empty() || net.bridge.len() >= IFNAMSIZ || net.bridge.contains('\0') {
            return Err(NftError::Invalid(format!(
                "bridge name {:?} must be 1 to {} bytes without NUL",
                net.bridge,
                IFNAMSIZ - 1
            )));
        }
        if net.prefix_len > 32 {
            return Err(NftError::Invalid(format!(
                "network {}/{} on {}: prefix length above 32",
                net.subnet, net.prefix_len, net.bridge
            )));
        }
    }
    for port in &ruleset.ports {
        if port.host_port == 0 || port.container_port == 0 {
            return Err(NftError::Invalid(format!(
                "published port {} -> {}:{}: port 0 cannot be published",
                port.host_port, port.container_ip, port.container_port
            )));
        }
    }
    Ok(())
}

fn add_table() -> NfTablesMessage {
    NfTablesMessage::NewTable(TableMessage {
        attributes: vec![TableAttribute::Name(TABLE.to_string())],
    })
}

fn delete_table() -> NfTablesMessage {
    NfTablesMessage::DeleteTable(TableMessage {
        attributes: vec![TableAttribute::Name(TABLE.to_string())],
    })
}

fn add_chain(kind: &str, name: &str, hook: InetHookNumber, priority: i32) -> NfTablesMessage {
    NfTablesMessage::NewChain(ChainMessage {
        attributes: vec![
            ChainAttribute::Table(TABLE.to_string()),
            ChainAttribute::Name(name.to_string()),
            ChainAttribute::Hook(vec![
                Hook::Number(hook.into()),
                // The kernel reads the priority as a signed 32-bit value.
                Hook::Priority(priority as u32),
            ]),
            ChainAttribute::Policy(NF_ACCEPT),
            ChainAttribute::Type(kind.to_string()),
        ],
    })
}

fn add_rule(chain: &str, exprs: Vec<Expressions>) -> NfTablesMessage {
    NfTablesMessage::NewRule(RuleMessage {
        attributes: vec![
            RuleAttribute::Table(TABLE.to_string()),
            RuleAttribute::Chain(chain.to_string()),
            RuleAttribute::Expressions(exprs.into_iter().map(ListAttribute::from).collect()),
        ],
    })
}

/// `fib daddr type local [ip daddr HOST_IP] meta l4proto P th dport HOST_PORT
/// dnat ip to CONTAINER_IP:CONTAINER_PORT`.
fn dnat_rule(port: &PublishedPort) -> Vec<Expressions> {
    let mut e = vec![
        // The packet is addressed to one of the host's own addresses.
        raw_expr(
            "fib",
            vec![
                nla_u32(NFTA_FIB_DREG, REG_1),
                nla_u32(NFTA_FIB_RESULT, NFT_FIB_RESULT_ADDRTYPE),
                nla_u32(NFTA_FIB_FLAGS, NFTA_FIB_F_DADDR),
            ],
        ),
        // The address type is a host-endian u32, like everything the kernel computes.
        cmp(Operator::Equal, RTN_LOCAL.to_ne_bytes().to_vec()),
    ];
    if let Some(ip) = port.host_ip {
        e.push(payload(NFT_PAYLOAD_NETWORK_HEADER, 16, 4));
        e.push(cmp(Operator::Equal, ip.octets().to_vec()));
    }
    let l4proto = match port.protocol {
        Protocol::Tcp => libc::IPPROTO_TCP as u8,
        Protocol::Udp => libc::IPPROTO_UDP as u8,
    };
    e.push(meta(MetaKey::L4Proto));
    e.push(cmp(Operator::Equal, vec![l4proto]));
    // th dport: the destination port is at offset 2 of both the TCP and the UDP header.
    e.push(payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2));
    e.push(cmp(Operator::Equal, port.host_port.to_be_bytes().to_vec()));
    e.push(immediate(REG_1, port.container_ip.octets().to_vec()));
    e.push(immediate(REG_2, port.container_port.to_be_bytes().to_vec()));
    e.push(dnat_expr(REG_1, REG_2));
    e
}

/// `nat dnat ip addr_min reg A proto_min reg P`; the kernel takes max = min and derives
/// the NF_NAT_RANGE_* flags from which registers are present.
fn dnat_expr(addr_reg: u32, port_reg: u32) -> Expressions {
    raw_expr(
        "nat",
        vec![
            nla_u32(NFTA_NAT_TYPE, NFT_NAT_DNAT),
            nla_u32(NFTA_NAT_FAMILY, NFPROTO_IPV4),
            nla_u32(NFTA_NAT_REG_ADDR_MIN, addr_reg),
            nla_u32(NFTA_NAT_REG_PROTO_MIN, port_reg),
        ],
    )
}

/// Outbound NAT: `ip saddr SUBNET oifname != BRIDGE masquerade`.
fn outbound_masquerade_rule(net: &NatNetwork) -> Vec<Expressions> {
    let mut e = saddr_in(network_address(net), net.prefix_len);
    e.push(meta(MetaKey::Oifname));
    e.push(cmp(Operator::NotEqual, ifname(&net.bridge)));
    e.push(masquerade());
    e
}

/// `ip saddr 127.0.0.0/8 oifname BRIDGE masquerade`: a connection from the host's
/// loopback DNATed to a container would otherwise leave with a 127.x source the
/// container cannot answer.
fn loopback_masquerade_rule(net: &NatNetwork) -> Vec<Expressions> {
    let mut e = saddr_in(Ipv4Addr::new(127, 0, 0, 0), 8);
    e.push(meta(MetaKey::Oifname));
    e.push(cmp(Operator::Equal, ifname(&net.bridge)));
    e.push(masquerade());
    e
}

/// Hairpin: `ct status dnat ip saddr SUBNET oifname BRIDGE masquerade`. A container that
/// reaches a neighbour through a published port on the host's address would get the
/// reply straight from the neighbour over the bridge, bypassing the host's conntrack
/// entry, and drop it.
fn hairpin_masquerade_rule(net: &NatNetwork) -> Vec<Expressions> {
    let mut e = ct_status_dnat(Operator::NotEqual);
    e.extend(saddr_in(network_address(net), net.prefix_len));
    e.push(meta(MetaKey::Oifname));
    e.push(cmp(Operator::Equal, ifname(&net.bridge)));
    e.push(masquerade());
    e
}

/// `ct status & dnat` compared with 0 by `op`: NotEqual matches connections a published
/// port's DNAT made, Equal all others.
fn ct_status_dnat(op: Operator) -> Vec<Expressions> {
    vec![
        raw_expr(
            "ct",
            vec![
                nla_u32(NFTA_CT_DREG, REG_1),
                nla_u32(NFTA_CT_KEY, NFT_CT_STATUS),
            ],
        ),
        // ct status is a host-endian u32 bit set.
        Expressions::Bitwise(vec![
            Bitwise::SourceRegister(Register::Reg1),
            Bitwise::DestinationRegister(Register::Reg1),
            Bitwise::Length(4),
            Bitwise::Mask(DataAttribute::Value(IPS_DST_NAT.to_ne_bytes().to_vec())),
            Bitwise::Xor(DataAttribute::Value(vec![0; 4])),
        ]),
        cmp(op, vec![0; 4]),
    ]
}

/// Offsets of the source and destination addresses in the IPv4 header.
const SADDR_OFFSET: u32 = 12;
const DADDR_OFFSET: u32 = 16;

/// `ip saddr NET/LEN`; nothing for /0, which matches everything.
fn saddr_in(net: Ipv4Addr, prefix_len: u8) -> Vec<Expressions> {
    addr_in(SADDR_OFFSET, net, prefix_len)
}

/// `ip saddr` or `ip daddr` (by header offset) in NET/LEN; nothing for /0.
fn addr_in(offset: u32, net: Ipv4Addr, prefix_len: u8) -> Vec<Expressions> {
    if prefix_len == 0 {
        return Vec::new();
    }
    let mask = prefix_mask(prefix_len);
    let mut e = vec![payload(NFT_PAYLOAD_NETWORK_HEADER, offset, 4)];
    if prefix_len < 32 {
        e.push(Expressions::Bitwise(vec![
            Bitwise::SourceRegister(Register::Reg1),
            Bitwise::DestinationRegister(Register::Reg1),
            Bitwise::Length(4),
            Bitwise::Mask(DataAttribute::Value(mask.to_be_bytes().to_vec())),
            Bitwise::Xor(DataAttribute::Value(vec![0; 4])),
        ]));
    }
    e.push(cmp(Operator::Equal, net.octets().to_vec()));
    e
}

fn prefix_mask(prefix_len: u8) -> u32 {
    match prefix_len {
        0 => 0,
        n => u32::MAX << (32 - u32::from(n.min(32))),
    }
}

fn network_address(net: &NatNetwork) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.subnet) & prefix_mask(net.prefix_len))
}

/// The interface name as meta oifname loads it: IFNAMSIZ bytes, NUL padded.
fn ifname(name: &str) -> Vec<u8> {
    let mut v = name.as_bytes().to_vec();
    v.resize(IFNAMSIZ, 0);
    v
}

fn meta(key: MetaKey) -> Expressions {
    Expressions::Meta(vec![
        Meta::DestinationRegister(Register::Reg1),
        Meta::Key(key),
    ])
}

fn payload(base: u32, offset: u32, len: u32) -> Expressions {
    Expressions::Payload(vec![
        Payload::DestinationRegister(Register::Reg1),
        Payload::Base(base),
        Payload::Offset(offset),
        Payload::Len(len),
    ])
}

fn cmp(op: Operator, data: Vec<u8>) -> Expressions {
    Expressions::Cmp(vec![
        Cmp::SourceRegister(Register::Reg1),
        Cmp::Op(op),
        Cmp::Data(DataAttribute::Value(data)),
    ])
}

fn immediate(reg: u32, data: Vec<u8>) -> Expressions {
    Expressions::Immediate(vec![
        Immediate::DestinationRegister(Register::from(reg)),
        Immediate::Data(DataAttribute::Value(data)),
    ])
}

/// Plain masquerade: no flags, no port range (NFTA_EXPR_DATA stays empty).
fn masquerade() -> Expressions {
    raw_expr("masq", Vec::new())
}

/// An expression netlink-packet-netfilter has no type for.
fn raw_expr(name: &str, attributes: Vec<DefaultNla>) -> Expressions {
    Expressions::Other {
        expression_type: name.to_string(),
        attributes,
    }
}

/// nf_tables attributes are big endian (NLA_BE32) on the wire.
fn nla_u32(kind: u16, value: u32) -> DefaultNla {
    DefaultNla::new(kind, value.to_be_bytes().to_vec())
}

/// Sends one batch and waits for the kernel's verdict on every message in it.
fn send_batch(messages: &[Message]) -> Result<(), NftError> {
    let bytes: Vec<u8> = messages
        .iter()
        .flat_map(|m| m.bytes.iter().copied())
        .collect();
    let socket = open_socket(bytes.len())?;
    socket
        .send_to(&bytes, &SocketAddr::new(0, 0), 0)
        .map_err(|source| NftError::Send {
            len: bytes.len(),
            source,
        })?;

    // Every message between begin and end asked for an ACK; batch begin/end are only
    // answered when the kernel rejects the batch as a whole.
    let mut pending: Vec<u32> = messages[1..messages.len().saturating_sub(1)]
        .iter()
        .map(|m| m.seq)
        .collect();
    let total = pending.len();
    let deadline = Instant::now() + RECV_TIMEOUT;
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    while !pending.is_empty() {
        if Instant::now() >= deadline {
            return Err(timeout(pending.len(), total));
        }
        buf.clear();
        match socket.recv(&mut buf, 0) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(timeout(pending.len(), total));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(NftError::Receive(e)),
        }
        for reply in parse_replies(&buf)? {
            match reply {
                Reply::Ack { seq, errno: 0 } => pending.retain(|s| *s != seq),
                Reply::Ack { seq, errno } => return Err(kernel_error(messages, seq, errno)),
                Reply::Other => {}
            }
        }
    }
    Ok(())
}

fn timeout(missing: usize, total: usize) -> NftError {
    NftError::Timeout {
        timeout: RECV_TIMEOUT,
        missing,
        total,
    }
}

fn kernel_error(messages: &[Message], seq: u32, errno: i32) -> NftError {
    let message = messages.iter().find(|m| m.seq == seq).map_or_else(
        || format!("unknown message (sequence {seq})"),
        |m| m.what.clone(),
    );
    let hint = if (errno == libc::ENOENT || errno == libc::EOPNOTSUPP)
        && (message.starts_with("add rule") || message.starts_with("add chain"))
    {
        " (is a kernel module of nft::KERNEL_MODULES missing?)"
    } else {
        ""
    };
    NftError::Kernel {
        message,
        errno,
        hint,
    }
}

fn open_socket(batch_len: usize) -> Result<Socket, NftError> {
    let err = |what| move |source| NftError::Socket { what, source };
    let mut socket = Socket::new(NETLINK_NETFILTER).map_err(err("socket"))?;
    socket.bind_auto().map_err(err("bind"))?;
    // Keep error replies small: the kernel would otherwise echo each refused message.
    socket.set_cap_ack(true).map_err(err("NETLINK_CAP_ACK"))?;
    set_timeout(&socket, libc::SO_RCVTIMEO).map_err(err("SO_RCVTIMEO"))?;
    set_timeout(&socket, libc::SO_SNDTIMEO).map_err(err("SO_SNDTIMEO"))?;
    // A batch is one datagram and must fit the send buffer (about 208 KiB by default).
    // Best effort: without CAP_NET_ADMIN the send reports EMSGSIZE itself.
    if batch_len > 128 * 1024 {
        let size = libc::c_int::try_from(batch_len.saturating_mul(2)).unwrap_or(libc::c_int::MAX);
        let _ = setsockopt_int(&socket, libc::SO_SNDBUFFORCE, size);
        let _ = setsockopt_int(&socket, libc::SO_RCVBUFFORCE, size);
    }
    Ok(socket)
}

fn set_timeout(socket: &Socket, option: libc::c_int) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: RECV_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(RECV_TIMEOUT.subsec_micros() as i32),
    };
    // SAFETY: the fd is a live socket owned by `socket`, and `tv` is a valid timeval whose
    // exact size is passed; the kernel only reads it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn setsockopt_int(socket: &Socket, option: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: the fd is a live socket owned by `socket`, and `value` is a c_int whose exact
    // size is passed; the kernel only reads it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
enum Reply {
    /// NLMSG_ERROR: errno 0 is an ACK.
    Ack {
        seq: u32,
        errno: i32,
    },
    Other,
}

/// Walks the netlink messages of one datagram. Only the headers and error codes are read,
/// so replies the typed parser does not know cannot fail the call.
fn parse_replies(mut data: &[u8]) -> Result<Vec<Reply>, NftError> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let nl = NetlinkBuffer::new_checked(data)
            .map_err(|e| NftError::Malformed(format!("netlink header: {e}")))?;
        let len = nl.length() as usize;
        let seq = nl.sequence_number();
        match nl.message_type() {
            NLMSG_ERROR => {
                let err = ErrorBuffer::new_checked(nl.payload())
                    .map_err(|e| NftError::Malformed(format!("NLMSG_ERROR payload: {e}")))?;
                let errno = err.code().map_or(0, |c| -c.get());
                out.push(Reply::Ack { seq, errno });
            }
            _ => out.push(Reply::Other),
        }
        // Messages are 4-byte aligned within a datagram.
        let advance = (len + 3) & !3;
        if advance == 0 || advance > data.len() {
            break;
        }
        data = &data[advance..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NFT_MSG_NEWTABLE: u16 = NFNL_SUBSYS_NFTABLES << 8;
    const NFT_MSG_DELTABLE: u16 = (NFNL_SUBSYS_NFTABLES << 8) | 2;
    const NFT_MSG_NEWCHAIN: u16 = (NFNL_SUBSYS_NFTABLES << 8) | 3;
    const NFT_MSG_NEWRULE: u16 = (NFNL_SUBSYS_NFTABLES << 8) | 6;
    const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
    const NFNL_MSG_BATCH_END: u16 = 0x11;

    fn sample() -> Ruleset {
        Ruleset {
            networks: vec![
                NatNetwork {
                    bridge: "keel0".into(),
                    subnet: Ipv4Addr::new(10, 88, 0, 7),
                    prefix_len: 16,
                    masquerade: true,
                },
                NatNetwork {
                    bridge: "internal".into(),
                    subnet: Ipv4Addr::new(10, 89, 0, 0),
                    prefix_len: 24,
                    masquerade: false,
                },
            ],
            ports: vec![
                PublishedPort {
                    protocol: Protocol::Tcp,
                    host_ip: None,
                    host_port: 8080,
                    container_ip: Ipv4Addr::new(10, 9, 0, 2),
                    container_port: 80,
                },
                PublishedPort {
                    protocol: Protocol::Udp,
                    host_ip: Some(Ipv4Addr::new(192, 168, 1, 5)),
                    host_port: 53,
                    container_ip: Ipv4Addr::new(10, 88, 0, 3),
                    container_port: 5353,
                },
            ],
        }
    }

    fn header(m: &Message) -> (u16, u16, u32) {
        let nl = NetlinkBuffer::new_checked(&m.bytes[..]).unwrap();
        assert_eq!(nl.length() as usize, m.bytes.len());
        assert!(m.bytes.len().is_multiple_of(4));
        (nl.message_type(), nl.flags(), nl.sequence_number())
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    /// A NUL-terminated string attribute, padded, as the kernel expects it.
    fn str_attr(kind: u16, s: &str) -> Vec<u8> {
        let len = 4 + s.len() + 1;
        let mut v = (len as u16).to_le_bytes().to_vec();
        v.extend(kind.to_le_bytes());
        v.extend(s.as_bytes());
        v.push(0);
        while !v.len().is_multiple_of(4) {
            v.push(0);
        }
        v
    }

    #[test]
    fn batch_structure() {
        let msgs = apply_batch(&sample(), 100).unwrap();
        // begin, add/del/add table, 3 nat chains, 2 ports x 2 chains, 3 + 2 postrouting
        // rules, 2 filter chains, 2 loopback + 2 cross-network + 1 internal rule, end
        assert_eq!(msgs.len(), 1 + 3 + 3 + 4 + 3 + 2 + 2 + 5 + 1);
        let filter_chains = 1 + 3 + 3 + 4 + 3 + 2;
        let types: Vec<u16> = msgs.iter().map(|m| header(m).0).collect();
        assert_eq!(types[0], NFNL_MSG_BATCH_BEGIN);
        assert_eq!(*types.last().unwrap(), NFNL_MSG_BATCH_END);
        assert_eq!(
            &types[1..4],
            &[NFT_MSG_NEWTABLE, NFT_MSG_DELTABLE, NFT_MSG_NEWTABLE]
        );
        assert_eq!(&types[4..7], &[NFT_MSG_NEWCHAIN; 3]);
        assert!(
            types[7..filter_chains]
                .iter()
                .all(|t| *t == NFT_MSG_NEWRULE)
        );
        assert_eq!(
            &types[filter_chains..filter_chains + 2],
            &[NFT_MSG_NEWCHAIN; 2]
        );
        assert!(
            types[filter_chains + 2..types.len() - 1]
                .iter()
                .all(|t| *t == NFT_MSG_NEWRULE)
        );
        for (m, name) in msgs[filter_chains..filter_chains + 2]
            .iter()
            .zip(["input", "forward"])
        {
            assert!(contains(&m.bytes, &str_attr(3, name)), "{name}");
            assert!(contains(&m.bytes, &str_attr(7, "filter")), "{name}");
        }

        // Sequence numbers are consecutive, so a refused one names its message.
        for (i, m) in msgs.iter().enumerate() {
            assert_eq!(header(m).2, 100 + i as u32);
            assert_eq!(m.seq, 100 + i as u32);
        }

        // Batch begin/end: nfgenmsg with res_id = NFNL_SUBSYS_NFTABLES (big endian).
        for m in [&msgs[0], msgs.last().unwrap()] {
            assert_eq!(m.bytes.len(), 20);
            assert_eq!(&m.bytes[16..20], &[0, 0, 0, 10]);
            assert_eq!(header(m).1, NLM_F_REQUEST);
        }

        // Table messages: family ip (2), NFTA_TABLE_NAME "keel".
        for m in &msgs[1..4] {
            assert_eq!(&m.bytes[16..20], &[2, 0, 0, 0]);
            assert_eq!(&m.bytes[20..], &str_attr(1, "keel")[..]);
        }
        assert_eq!(header(&msgs[1]).1, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE);
        assert_eq!(header(&msgs[2]).1, NLM_F_REQUEST | NLM_F_ACK);

        // Chains: names, type nat, policy accept, hook numbers and priorities.
        let chains = [
            ("prerouting", 0u32, -100i32),
            ("output", 3, -100),
            ("postrouting", 4, 100),
        ];
        for (m, (name, hook, prio)) in msgs[4..7].iter().zip(chains) {
            assert!(contains(&m.bytes, &str_attr(1, "keel")));
            assert!(contains(&m.bytes, &str_attr(3, name)), "{name}");
            assert!(contains(&m.bytes, &str_attr(7, "nat")));
            // NFTA_CHAIN_POLICY = 5, NF_ACCEPT
            assert!(contains(&m.bytes, &[8, 0, 5, 0, 0, 0, 0, 1]));
            // NFTA_CHAIN_HOOK (4 | NLA_F_NESTED): NFTA_HOOK_HOOKNUM, NFTA_HOOK_PRIORITY
            let mut hook_nest = vec![20, 0, 4, 0x80, 8, 0, 1, 0];
            hook_nest.extend(hook.to_be_bytes());
            hook_nest.extend([8, 0, 2, 0]);
            hook_nest.extend(prio.to_be_bytes());
            assert!(contains(&m.bytes, &hook_nest), "{name}");
        }

        // Rules go to the right chains.
        let chain_of = |m: &Message| {
            ["prerouting", "output", "postrouting", "input", "forward"]
                .into_iter()
                .find(|c| contains(&m.bytes, &str_attr(2, c)))
                .unwrap()
        };
        let rule_chains: Vec<&str> = msgs[7..filter_chains]
            .iter()
            .chain(&msgs[filter_chains + 2..msgs.len() - 1])
            .map(chain_of)
            .collect();
        assert_eq!(
            rule_chains,
            [
                "prerouting",
                "output",
                "prerouting",
                "output",
                "postrouting",
                "postrouting",
                "postrouting",
                "postrouting",
                "postrouting",
                "input",
                "input",
                "forward",
                "forward",
                "forward"
            ]
        );
    }

    #[test]
    fn networks_are_walled_off_from_loopback_each_other_and_when_internal_the_world() {
        let texts: Vec<String> = isolation::rules(&sample().networks)
            .into_iter()
            .map(|r| format!("{}: {}", r.chain, r.text))
            .collect();
        assert_eq!(
            texts,
            [
                "input: iifname keel0 ip daddr 127.0.0.0/8 ct status != dnat drop",
                "input: iifname internal ip daddr 127.0.0.0/8 ct status != dnat drop",
                "forward: iifname keel0 oifname internal ct status != dnat drop",
                "forward: iifname internal oifname keel0 ct status != dnat drop",
                "forward: iifname internal oifname != internal ct status != dnat drop",
            ]
        );
        // The drop verdict: NFTA_DATA_VERDICT { NFTA_VERDICT_CODE = NF_DROP (0) }.
        let msgs = apply_batch(&sample(), 1).unwrap();
        let last_rule = &msgs[msgs.len() - 2].bytes;
        assert!(contains(
            last_rule,
            &[0x0c, 0x00, 0x02, 0x80, 0x08, 0x00, 0x01, 0x00, 0, 0, 0, 0]
        ));
    }

    #[test]
    fn dnat_expression_bytes() {
        let msgs = apply_batch(&sample(), 1).unwrap();
        let rule = &msgs[7].bytes;

        // immediate reg 2 = port 80 (big endian), hand-encoded:
        let immediate_port: &[u8] = &[
            0x2c, 0x00, 0x01, 0x80, // NFTA_LIST_ELEM, nested, 44 bytes
            0x0e, 0x00, 0x01, 0x00, b'i', b'm', b'm', b'e', b'd', b'i', b'a', b't', b'e', 0, 0,
            0, // NFTA_EXPR_NAME "immediate"
            0x18, 0x00, 0x02, 0x80, // NFTA_EXPR_DATA, nested, 24 bytes
            0x08, 0x00, 0x01, 0x00, 0, 0, 0, 2, // NFTA_IMMEDIATE_DREG = NFT_REG_2
            0x0c, 0x00, 0x02, 0x80, // NFTA_IMMEDIATE_DATA, nested
            0x06, 0x00, 0x01, 0x00, 0x00, 0x50, 0, 0, // NFTA_DATA_VALUE 80
        ];
        assert!(contains(rule, immediate_port));

        // nat dnat ip addr_min reg 1 proto_min reg 2:
        let nat: &[u8] = &[
            0x30, 0x00, 0x01, 0x80, // NFTA_LIST_ELEM, nested, 48 bytes
            0x08, 0x00, 0x01, 0x00, b'n', b'a', b't', 0, // NFTA_EXPR_NAME "nat"
            0x24, 0x00, 0x02, 0x80, // NFTA_EXPR_DATA, nested, 36 bytes
            0x08, 0x00, 0x01, 0x00, 0, 0, 0, 1, // NFTA_NAT_TYPE = NFT_NAT_DNAT
            0x08, 0x00, 0x02, 0x00, 0, 0, 0, 2, // NFTA_NAT_FAMILY = NFPROTO_IPV4
            0x08, 0x00, 0x03, 0x00, 0, 0, 0, 1, // NFTA_NAT_REG_ADDR_MIN = NFT_REG_1
            0x08, 0x00, 0x05, 0x00, 0, 0, 0, 2, // NFTA_NAT_REG_PROTO_MIN = NFT_REG_2
        ];
        assert!(rule.ends_with(nat), "the nat expression is the rule's last");

        // fib daddr type => reg 1:
        let fib: &[u8] = &[
            0x28, 0x00, 0x01, 0x80, // NFTA_LIST_ELEM, nested, 40 bytes
            0x08, 0x00, 0x01, 0x00, b'f', b'i', b'b', 0, // NFTA_EXPR_NAME "fib"
            0x1c, 0x00, 0x02, 0x80, // NFTA_EXPR_DATA, nested, 28 bytes
            0x08, 0x00, 0x01, 0x00, 0, 0, 0, 1, // NFTA_FIB_DREG = NFT_REG_1
            0x08, 0x00, 0x02, 0x00, 0, 0, 0, 3, // NFTA_FIB_RESULT = ADDRTYPE
            0x08, 0x00, 0x03, 0x00, 0, 0, 0, 2, // NFTA_FIB_FLAGS = NFTA_FIB_F_DADDR
        ];
        assert!(contains(rule, fib));
        // cmp eq reg 1 RTN_LOCAL (host endian u32)
        let mut local = vec![0x0c, 0x00, 0x03, 0x80, 0x08, 0x00, 0x01, 0x00];
        local.extend(2u32.to_ne_bytes());
        assert!(contains(rule, &local));
        // th dport 8080: payload base 2 offset 2 len 2, cmp data 0x1f90
        assert!(contains(
            rule,
            &[
                8, 0, 2, 0, 0, 0, 0, 2, 8, 0, 3, 0, 0, 0, 0, 2, 8, 0, 4, 0, 0, 0, 0, 2
            ]
        ));
        assert!(contains(rule, &[6, 0, 1, 0, 0x1f, 0x90, 0, 0]));
        // meta l4proto tcp: cmp data 1 byte 6
        assert!(contains(rule, &[5, 0, 1, 0, 6, 0, 0, 0]));
        // no daddr match without host_ip
        assert!(!contains(rule, &[8, 0, 3, 0, 0, 0, 0, 16]));

        // The UDP port restricted to a host address matches ip daddr and protocol 17.
        let udp = &msgs[9].bytes;
        assert!(contains(
            udp,
            &[8, 0, 3, 0, 0, 0, 0, 16, 8, 0, 4, 0, 0, 0, 0, 4]
        ));
        assert!(contains(udp, &[8, 0, 1, 0, 192, 168, 1, 5]));
        assert!(contains(udp, &[5, 0, 1, 0, 17, 0, 0, 0]));
        assert!(contains(udp, &[6, 0, 1, 0, 0x14, 0xe9, 0, 0])); // 5353
    }

    #[test]
    fn masquerade_rules() {
        let msgs = apply_batch(&sample(), 1).unwrap();
        let masq: &[u8] = &[
            0x14, 0x00, 0x01, 0x80, // NFTA_LIST_ELEM
            0x09, 0x00, 0x01, 0x00, b'm', b'a', b's', b'q', 0, 0, 0, 0, // "masq"
            0x04, 0x00, 0x02, 0x80, // empty NFTA_EXPR_DATA
        ];
        let mut keel0 = vec![0x14, 0, 1, 0];
        keel0.extend(ifname("keel0"));
        // After the 4 dnat rules, before the 2 filter chains and their 5 rules.
        let post = &msgs[11..msgs.len() - 1 - 2 - 5];
        assert_eq!(post.len(), 5);
        for m in post {
            assert!(m.bytes.ends_with(masq));
        }
        // outbound: saddr & 255.255.0.0 == 10.88.0.0, oifname != keel0
        assert!(contains(&post[0].bytes, &[8, 0, 1, 0, 255, 255, 0, 0]));
        assert!(contains(&post[0].bytes, &[8, 0, 1, 0, 10, 88, 0, 0]));
        assert!(contains(&post[0].bytes, &[8, 0, 2, 0, 0, 0, 0, 1])); // NFT_CMP_NEQ
        assert!(contains(&post[0].bytes, &keel0));
        // loopback: 127.0.0.0/8, oifname == keel0
        assert!(contains(&post[1].bytes, &[8, 0, 1, 0, 255, 0, 0, 0]));
        assert!(contains(&post[1].bytes, &[8, 0, 1, 0, 127, 0, 0, 0]));
        assert!(contains(&post[1].bytes, &[8, 0, 2, 0, 0, 0, 0, 0]));
        assert!(contains(&post[1].bytes, &keel0));
        // hairpin: ct status & IPS_DST_NAT != 0
        assert!(contains(&post[2].bytes, &str_attr(1, "ct")));
        assert!(contains(&post[2].bytes, &[8, 0, 2, 0, 0, 0, 0, 2])); // NFTA_CT_KEY status
        let mut dst_nat = vec![8, 0, 1, 0];
        dst_nat.extend(0x20u32.to_ne_bytes());
        assert!(contains(&post[2].bytes, &dst_nat));
        // the second network has no outbound masquerade: loopback and hairpin only
        let mut internal = vec![0x14, 0, 1, 0];
        internal.extend(ifname("internal"));
        assert!(contains(&post[3].bytes, &internal));
        assert!(contains(&post[3].bytes, &[8, 0, 1, 0, 127, 0, 0, 0]));
        assert!(contains(&post[4].bytes, &internal));
        assert!(contains(&post[4].bytes, &str_attr(1, "ct")));
        assert!(contains(&post[4].bytes, &[8, 0, 1, 0, 10, 89, 0, 0]));
    }

    #[test]
    fn empty_ruleset_is_table_and_chains() {
        let msgs = apply_batch(&Ruleset::default(), 1).unwrap();
        // begin, 3 table messages, 3 nat and 2 filter chains, end
        assert_eq!(msgs.len(), 10);
    }

    #[test]
    fn invalid_input_is_refused_before_sending() {
        let mut r = sample();
        r.networks[0].prefix_len = 33;
        assert!(matches!(apply_batch(&r, 1), Err(NftError::Invalid(_))));
        let mut r = sample();
        r.networks[0].bridge = "a-very-long-bridge".into();
        assert!(matches!(apply_batch(&r, 1), Err(NftError::Invalid(_))));
        let mut r = sample();
        r.ports[0].host_port = 0;
        assert!(matches!(apply_batch(&r, 1), Err(NftError::Invalid(_))));
    }

    #[test]
    fn prefix_masks() {
        assert_eq!(prefix_mask(0), 0);
        assert_eq!(prefix_mask(8), 0xff00_0000);
        assert_eq!(prefix_mask(24), 0xffff_ff00);
        assert_eq!(prefix_mask(32), u32::MAX);
        assert!(saddr_in(Ipv4Addr::UNSPECIFIED, 0).is_empty());
        assert_eq!(saddr_in(Ipv4Addr::new(1, 2, 3, 4), 32).len(), 2);
    }

    #[test]
    fn replies_are_parsed() {
        // An NLMSG_ERROR with errno -ENOENT for seq 7, followed by an ACK for seq 8.
        let mut data = Vec::new();
        for (seq, code) in [(7u32, -libc::ENOENT), (8, 0)] {
            data.extend(36u32.to_ne_bytes());
            data.extend(NLMSG_ERROR.to_ne_bytes());
            data.extend(0u16.to_ne_bytes());
            data.extend(seq.to_ne_bytes());
            data.extend(0u32.to_ne_bytes());
            data.extend(code.to_ne_bytes());
            data.extend([0u8; 16]);
        }
        assert_eq!(
            parse_replies(&data).unwrap(),
            vec![
                Reply::Ack {
                    seq: 7,
                    errno: libc::ENOENT
                },
                Reply::Ack { seq: 8, errno: 0 }
            ]
        );
        let msgs = apply_batch(&sample(), 1).unwrap();
        let e = kernel_error(&msgs, 8, libc::ENOENT);
        let text = e.to_string();
        assert!(text.contains("add rule ip keel prerouting"), "{text}");
        assert!(text.contains("KERNEL_MODULES"), "{text}");
    }

    /// Root only, in a private network namespace: a batch the kernel refuses names the
    /// refused message and leaves the previous table untouched.
    #[test]
    fn kernel_refusal_names_the_message_and_changes_nothing() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping kernel_refusal_names_the_message_and_changes_nothing: needs root");
            return;
        }
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            apply(&sample()).unwrap();

            let mut b = Batch::new(1);
            b.push("add table ip keel", add_table(), NLM_F_CREATE);
            b.push("delete table ip keel", delete_table(), 0);
            b.push("add table ip keel", add_table(), NLM_F_CREATE);
            b.push(
                "add rule ip keel missing",
                add_rule("missing", vec![meta(MetaKey::L4Proto)]),
                NLM_F_CREATE | NLM_F_APPEND,
            );
            let err = send_batch(&b.finish()).unwrap_err();
            match &err {
                NftError::Kernel { message, errno, .. } => {
                    assert_eq!(message, "add rule ip keel missing");
                    assert_eq!(*errno, libc::ENOENT);
                }
                other => panic!("{other:?}"),
            }

            // The delete was rolled back: the old chain is still there to append to.
            let mut b = Batch::new(1);
            b.push(
                "add rule ip keel prerouting",
                add_rule(CHAIN_PREROUTING, vec![meta(MetaKey::L4Proto)]),
                NLM_F_CREATE | NLM_F_APPEND,
            );
            send_batch(&b.finish()).unwrap();
            remove().unwrap();
        })
        .join()
        .unwrap();
    }
}
