//! Host test of the NAT table: real rules, real TCP connections, and never the host's own
//! network namespace.
//!
//! Each test runs in a thread that unshares its network namespace (namespaces are per
//! thread, and sockets stay in the namespace they were created in). A second namespace
//! plays the container: it holds the other end of a veth pair and a TCP server.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use futures_util::TryStreamExt;
use keel_net::nft::{self, NatNetwork, Protocol, PublishedPort, Ruleset};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NetlinkBuffer, NetlinkHeader,
    NetlinkMessage,
};
use netlink_packet_netfilter::nftables::{
    NfTablesMessage, RuleAttribute, RuleMessage, TableAttribute, TableMessage,
};
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use netlink_sys::{Socket, SocketAddr as NlAddr, protocols::NETLINK_NETFILTER};
use nix::sched::{CloneFlags, setns, unshare};
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};

const HOST: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);
const CONTAINER: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 2);

/// Root is needed for namespaces and nftables.
fn should_run(test: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping {test}: needs root");
        return false;
    }
    true
}

/// Runs `f` in a new thread, in a new network namespace of its own.
fn in_private_netns(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        f();
    })
    .join()
    .expect("test thread failed");
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .expect("tokio runtime")
}

async fn link_index(handle: &Handle, name: &str) -> u32 {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    links
        .try_next()
        .await
        .expect("link dump")
        .expect("link exists")
        .header
        .index
}

async fn link_up(handle: &Handle, name: &str) {
    handle
        .link()
        .set(LinkUnspec::new_with_name(name).up().build())
        .execute()
        .await
        .unwrap_or_else(|e| panic!("setting {name} up: {e}"));
}

async fn add_address(handle: &Handle, name: &str, addr: Ipv4Addr) {
    let index = link_index(handle, name).await;
    handle
        .address()
        .add(index, IpAddr::V4(addr), 24)
        .execute()
        .await
        .unwrap_or_else(|e| panic!("adding {addr}/24 to {name}: {e}"));
}

/// In the calling thread's (fresh) namespace: lo up, veth0 = 10.9.0.1/24, and its peer
/// veth1 = 10.9.0.2/24 in a second namespace where a TCP server answers on port 80.
fn setup_host_and_container() -> File {
    let host_ns = File::open("/proc/thread-self/ns/net").expect("open own netns");
    unshare(CloneFlags::CLONE_NEWNET).expect("unshare container netns");
    let container_ns = File::open("/proc/thread-self/ns/net").expect("open container netns");
    setns(&host_ns, CloneFlags::CLONE_NEWNET).expect("setns back to host netns");

    rt().block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection().expect("rtnetlink");
        tokio::spawn(conn);
        link_up(&handle, "lo").await;
        handle
            .link()
            .add(LinkVeth::new("veth0", "veth1").build())
            .execute()
            .await
            .expect("creating veth0/veth1");
        handle
            .link()
            .set(
                LinkUnspec::new_with_name("veth1")
                    .setns_by_fd(container_ns.as_raw_fd())
                    .build(),
            )
            .execute()
            .await
            .expect("moving veth1 to the container netns");
        add_address(&handle, "veth0", HOST).await;
        link_up(&handle, "veth0").await;
    });

    setns(&container_ns, CloneFlags::CLONE_NEWNET).expect("setns to container netns");
    rt().block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection().expect("rtnetlink");
        tokio::spawn(conn);
        link_up(&handle, "lo").await;
        add_address(&handle, "veth1", CONTAINER).await;
        link_up(&handle, "veth1").await;
    });
    // Bound here, the listener lives in the container namespace whatever thread serves it.
    let listener = TcpListener::bind((CONTAINER, 80)).expect("bind 10.9.0.2:80");
    setns(&host_ns, CloneFlags::CLONE_NEWNET).expect("setns back to host netns");

    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let peer = s
                .peer_addr()
                .map(|a| a.ip().to_string())
                .unwrap_or_default();
            let mut buf = [0u8; 4];
            if s.read_exact(&mut buf).is_ok() {
                let _ = s.write_all(format!("pong {peer}\n").as_bytes());
            }
        }
    });

    // Loopback connections DNATed out of veth0 keep their 127.x source until postrouting;
    // the routing code drops them unless route_localnet is on (Keel sets it on bridges).
    // /proc/sys/net is resolved in the opening thread's namespace.
    std::fs::write("/proc/sys/net/ipv4/conf/veth0/route_localnet", "1")
        .expect("route_localnet on veth0");
    container_ns
}

/// Connects, says ping, returns the server's answer (which names the source it saw).
fn exchange(addr: Ipv4Addr, port: u16) -> std::io::Result<String> {
    let mut s =
        TcpStream::connect_timeout(&SocketAddr::from((addr, port)), Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"ping")?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok(answer)
}

fn ruleset(ports: &[(Protocol, Option<Ipv4Addr>, u16)]) -> Ruleset {
    Ruleset {
        networks: vec![NatNetwork {
            bridge: "veth0".into(),
            subnet: HOST,
            prefix_len: 24,
            masquerade: true,
        }],
        ports: ports
            .iter()
            .map(|&(protocol, host_ip, host_port)| PublishedPort {
                protocol,
                host_ip,
                host_port,
                container_ip: CONTAINER,
                container_port: 80,
            })
            .collect(),
    }
}

fn netfilter_request(msg: NfTablesMessage, flags: u16) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | flags;
    header.sequence_number = 1;
    let nf = NetfilterMessage::new(NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0), msg);
    let mut nl = NetlinkMessage::new(header, nf.into());
    nl.finalize();
    let mut bytes = vec![0; nl.buffer_len()];
    nl.serialize(&mut bytes);
    bytes
}

/// Sends one request and returns the message types of the replies up to NLMSG_DONE or
/// the ACK, or the errno of an error reply.
fn query(request: Vec<u8>) -> Result<Vec<u16>, i32> {
    let mut socket = Socket::new(NETLINK_NETFILTER).expect("netfilter socket");
    socket.bind_auto().expect("bind");
    socket
        .send_to(&request, &NlAddr::new(0, 0), 0)
        .expect("send");
    let mut types = Vec::new();
    loop {
        let mut buf = Vec::with_capacity(64 * 1024);
        socket.recv(&mut buf, 0).expect("recv");
        let mut data = &buf[..];
        while !data.is_empty() {
            let nl = NetlinkBuffer::new_checked(data).expect("netlink reply");
            match nl.message_type() {
                NLMSG_DONE => return Ok(types),
                NLMSG_ERROR => {
                    let code = i32::from_ne_bytes(nl.payload()[..4].try_into().expect("errno"));
                    return if code == 0 { Ok(types) } else { Err(-code) };
                }
                t => types.push(t),
            }
            let len = (nl.length() as usize + 3) & !3;
            data = &data[len.min(data.len())..];
        }
    }
}

/// How many rules table `ip keel` holds, from an NFT_MSG_GETRULE dump.
fn rule_count() -> usize {
    const NFT_MSG_NEWRULE: u16 = (10 << 8) | 6;
    let request = netfilter_request(
        NfTablesMessage::GetRule(RuleMessage {
            attributes: vec![RuleAttribute::Table("keel".into())],
        }),
        NLM_F_DUMP,
    );
    let types = query(request).expect("rule dump");
    assert!(types.iter().all(|t| *t == NFT_MSG_NEWRULE), "{types:?}");
    types.len()
}

fn table_exists() -> bool {
    let request = netfilter_request(
        NfTablesMessage::GetTable(TableMessage {
            attributes: vec![TableAttribute::Name("keel".into())],
        }),
        NLM_F_ACK,
    );
    match query(request) {
        Ok(_) => true,
        Err(e) if e == libc::ENOENT => false,
        Err(e) => panic!("NFT_MSG_GETTABLE: errno {e}"),
    }
}

#[test]
fn published_ports_forward_and_are_replaced() {
    if !should_run("published_ports_forward_and_are_replaced") {
        return;
    }
    in_private_netns(|| {
        let _container_ns = setup_host_and_container();
        assert!(!table_exists());

        let full = ruleset(&[
            (Protocol::Tcp, None, 8080),
            (Protocol::Tcp, Some(HOST), 8081),
            (Protocol::Udp, None, 5300),
        ]);
        nft::apply(&full).expect("apply");
        assert!(table_exists());
        // 3 ports x (prerouting + output) + outbound, loopback and hairpin masquerade + the
        // loopback drop in input
        assert_eq!(rule_count(), 10);

        // The host's own address, through the output chain.
        let answer = exchange(HOST, 8080).expect("10.9.0.1:8080 forwarded to the container");
        assert_eq!(answer, "pong 10.9.0.1\n");
        // Loopback: DNAT in output, then masquerade to veth0's address in postrouting.
        let answer = exchange(Ipv4Addr::LOCALHOST, 8080).expect("127.0.0.1:8080 forwarded");
        assert_eq!(answer, "pong 10.9.0.1\n");
        // A port bound to one host address is forwarded on that address only.
        assert_eq!(
            exchange(HOST, 8081).expect("10.9.0.1:8081"),
            "pong 10.9.0.1\n"
        );
        let refused = exchange(Ipv4Addr::LOCALHOST, 8081).expect_err("127.0.0.1:8081");
        assert_eq!(refused.kind(), ErrorKind::ConnectionRefused);

        // Applying again replaces the table rather than appending to it.
        nft::apply(&full).expect("second apply");
        assert_eq!(rule_count(), 10);
        let fewer = ruleset(&[(Protocol::Tcp, None, 8080)]);
        nft::apply(&fewer).expect("apply with one port");
        assert_eq!(rule_count(), 6);
        let refused = exchange(HOST, 8081).expect_err("8081 no longer published");
        assert_eq!(refused.kind(), ErrorKind::ConnectionRefused);
        assert_eq!(
            exchange(HOST, 8080).expect("8080 still published"),
            "pong 10.9.0.1\n"
        );

        // An invalid ruleset is refused as a whole and leaves the table as it was.
        let mut bad = ruleset(&[(Protocol::Tcp, None, 9090)]);
        bad.networks[0].prefix_len = 40;
        let err = nft::apply(&bad).expect_err("prefix length 40");
        assert!(
            err.to_string().starts_with("invalid nftables ruleset"),
            "{err}"
        );
        assert_eq!(rule_count(), 6);

        // No ports: the connection reaches the host itself, where nothing listens.
        nft::apply(&Ruleset::default()).expect("apply empty");
        assert_eq!(rule_count(), 0);
        let refused = exchange(HOST, 8080).expect_err("8080 not published any more");
        assert_eq!(refused.kind(), ErrorKind::ConnectionRefused);

        nft::remove().expect("remove");
        assert!(!table_exists());
        nft::remove().expect("remove when absent");
    });
}

#[test]
fn remove_without_table_succeeds() {
    if !should_run("remove_without_table_succeeds") {
        return;
    }
    in_private_netns(|| {
        assert!(!table_exists());
        nft::remove().expect("remove when absent");
        assert!(!table_exists());
        // Chains and rules need no interface to exist: the bridge may come later.
        let r = Ruleset {
            networks: vec![NatNetwork {
                bridge: "keel-none".into(),
                subnet: Ipv4Addr::new(10, 77, 0, 0),
                prefix_len: 16,
                masquerade: true,
            }],
            ports: vec![],
        };
        nft::apply(&r).expect("apply without the bridge");
        // outbound, loopback and hairpin masquerade; the loopback drop in input
        assert_eq!(rule_count(), 4);
        nft::remove().expect("remove");
        assert!(!table_exists());
    });
}

/// CVE-2020-8558: with route_localnet on the bridge (as Keel sets it), a container that
/// routes 127.0.0.0/8 to its gateway reaches services the host binds to 127.0.0.1. The
/// container here does it with a route; one with NET_RAW would craft the packets. Without
/// the network in the ruleset the connection goes through (so the test can fail); with it,
/// the input rule drops it.
#[test]
fn a_container_cannot_reach_the_hosts_loopback() {
    if !should_run("a_container_cannot_reach_the_hosts_loopback") {
        return;
    }
    in_private_netns(|| {
        let container_ns = setup_host_and_container();
        let host_ns = File::open("/proc/thread-self/ns/net").expect("open own netns");
        let secret = TcpListener::bind((Ipv4Addr::LOCALHOST, 7070)).expect("bind 127.0.0.1:7070");
        std::thread::spawn(move || {
            for stream in secret.incoming() {
                let Ok(mut s) = stream else { continue };
                let _ = s.write_all(b"host loopback service\n");
            }
        });

        // The container's side: no 127/8 of its own, 127/8 via the gateway.
        setns(&container_ns, CloneFlags::CLONE_NEWNET).expect("setns to container netns");
        std::fs::write("/proc/sys/net/ipv4/conf/veth1/route_localnet", "1")
            .expect("route_localnet on veth1");
        rt().block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection().expect("rtnetlink");
            tokio::spawn(conn);
            // Its own 127.0.0.1 goes, and the local routes with it.
            let lo = link_index(&handle, "lo").await;
            let mut addresses = handle.address().get().set_link_index_filter(lo).execute();
            while let Some(address) = addresses.try_next().await.expect("lo's addresses") {
                handle
                    .address()
                    .del(address)
                    .execute()
                    .await
                    .expect("removing an address of lo");
            }
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(Ipv4Addr::new(127, 0, 0, 0), 8)
                .gateway(HOST)
                .build();
            handle
                .route()
                .add(route)
                .execute()
                .await
                .expect("127.0.0.0/8 via the gateway");
        });
        let attempt = |container_ns: &File| {
            setns(container_ns, CloneFlags::CLONE_NEWNET).expect("setns to container netns");
            let result = TcpStream::connect_timeout(
                &SocketAddr::from((Ipv4Addr::LOCALHOST, 7070)),
                Duration::from_secs(2),
            )
            .and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                let mut answer = String::new();
                s.read_to_string(&mut answer)?;
                Ok(answer)
            });
            setns(&host_ns, CloneFlags::CLONE_NEWNET).expect("setns back to host netns");
            result
        };
        setns(&host_ns, CloneFlags::CLONE_NEWNET).expect("setns back to host netns");

        nft::apply(&Ruleset::default()).expect("apply without networks");
        assert_eq!(
            attempt(&container_ns).expect("without the rule the attack works"),
            "host loopback service\n"
        );
        nft::apply(&ruleset(&[])).expect("apply with the network");
        let refused = attempt(&container_ns).expect_err("the input rule drops it");
        assert!(
            matches!(refused.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock),
            "{refused}"
        );
        nft::remove().expect("remove");
    });
}
