//! The DHCPv4 client PID 1 runs, against a real dnsmasq: two network namespaces joined by a
//! veth pair, dnsmasq serving in one, `keel_init::net::run_dhcp_client` in the other (on a
//! thread that entered it). Lease, renewal, expiry with the server gone, a new lease once it
//! is back, and release; and a renewal the server refuses (DHCPNAK), which must drop the
//! lease at once and discover a new one. Needs root, `ip` and dnsmasq (scripts/install-deps
//! installs them); without them it says why and passes. Each test has its own namespaces and
//! interface names, so they run in parallel.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use keel_config::Prefix;
use keel_init::net::{DhcpEvent, run_dhcp_client};
use nix::sched::{CloneFlags, setns};
use tokio::sync::{mpsc, oneshot};

/// The first server's pool; the NAK test's second server hands out `RANGE_B`.
const RANGE_A: (u8, u8) = (50, 60);
const RANGE_B: (u8, u8) = (100, 110);

fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd} >/dev/null")])
        .status()
        .is_ok_and(|s| s.success())
}

/// The namespaces and dnsmasq: removed and killed however the test ends.
struct Fixture {
    server_ns: String,
    client_ns: String,
    server_if: String,
    client_if: String,
    dir: tempfile::TempDir,
    dnsmasq: Option<Child>,
}

impl Fixture {
    /// `tag` (one letter) keeps each test's namespaces and interfaces apart.
    fn new(tag: &str) -> Result<Fixture, String> {
        let id = std::process::id();
        let f = Fixture {
            server_ns: format!("keel-dhcp-s{tag}-{id}"),
            client_ns: format!("keel-dhcp-c{tag}-{id}"),
            server_if: format!("kdhcp{tag}s0"),
            client_if: format!("kdhcp{tag}c0"),
            dir: tempfile::tempdir().map_err(|e| e.to_string())?,
            dnsmasq: None,
        };
        ip(&["netns", "add", &f.server_ns])?;
        ip(&["netns", "add", &f.client_ns])?;
        ip(&[
            "link",
            "add",
            &f.server_if,
            "netns",
            &f.server_ns,
            "type",
            "veth",
            "peer",
            "name",
            &f.client_if,
            "netns",
            &f.client_ns,
        ])?;
        ip(&[
            "-n",
            &f.server_ns,
            "addr",
            "add",
            "10.77.0.1/24",
            "dev",
            &f.server_if,
        ])?;
        ip(&["-n", &f.server_ns, "link", "set", &f.server_if, "up"])?;
        ip(&["-n", &f.server_ns, "link", "set", "lo", "up"])?;
        Ok(f)
    }

    fn leases(&self) -> PathBuf {
        self.dir.path().join("dnsmasq.leases")
    }

    fn start_dnsmasq(&mut self) -> Result<(), String> {
        self.start_dnsmasq_with(RANGE_A, &[])
    }

    /// dnsmasq serving `range` (last octets in 10.77.0.0/24), with `extra` arguments. The
    /// log is appended to, so that it tells the whole story when a test fails.
    fn start_dnsmasq_with(&mut self, range: (u8, u8), extra: &[&str]) -> Result<(), String> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("dnsmasq.log"))
            .map_err(|e| e.to_string())?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.server_ns, "dnsmasq", "--no-daemon"])
            .arg("--conf-file=/dev/null")
            .arg(format!("--interface={}", self.server_if))
            .arg("--bind-interfaces")
            .arg("--except-interface=lo")
            .arg(format!(
                "--dhcp-range=10.77.0.{},10.77.0.{},255.255.255.0,30s",
                range.0, range.1
            ))
            .arg("--dhcp-option=option:router,10.77.0.1")
            .arg("--dhcp-option=option:dns-server,10.77.0.1")
            .arg(format!("--dhcp-leasefile={}", self.leases().display()))
            .arg(format!(
                "--pid-file={}",
                self.dir.path().join("dnsmasq.pid").display()
            ))
            .arg("--port=0")
            .arg("--user=root")
            .arg("--log-dhcp")
            .arg("--log-facility=-")
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("dnsmasq: {e}"))?;
        self.dnsmasq = Some(child);
        Ok(())
    }

    fn stop_dnsmasq(&mut self) {
        if let Some(mut c) = self.dnsmasq.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dnsmasq.log")).unwrap_or_default()
    }

    fn client_addresses(&self) -> String {
        ip(&[
            "-n",
            &self.client_ns,
            "-4",
            "addr",
            "show",
            "dev",
            &self.client_if,
        ])
        .unwrap_or_default()
    }

    fn client_routes(&self) -> String {
        ip(&["-n", &self.client_ns, "-4", "route", "show"]).unwrap_or_default()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.stop_dnsmasq();
        // Deleting the namespaces takes the veth pair with them.
        let _ = ip(&["netns", "del", &self.server_ns]);
        let _ = ip(&["netns", "del", &self.client_ns]);
    }
}

/// Runs the client on its own thread inside `ns`: the thread enters the namespace before it
/// builds its runtime, so every socket the client makes (netlink, raw, UDP) lives there.
fn spawn_client(
    ns: &str,
    interface: &str,
    etc: PathBuf,
) -> (
    mpsc::UnboundedReceiver<DhcpEvent>,
    oneshot::Sender<()>,
    std::thread::JoinHandle<Result<(), String>>,
) {
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = oneshot::channel();
    let path = Path::new("/run/netns").join(ns);
    let interface = interface.to_string();
    let thread = std::thread::spawn(move || {
        let file = File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns: {e}"))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(run_dhcp_client(
            &interface, "keeltest", &etc, events_tx, stop_rx,
        ))
    });
    (events_rx, stop_tx, thread)
}

/// The next event within `limit`, from the test's (non-async) side.
fn next_event(events: &mut mpsc::UnboundedReceiver<DhcpEvent>, limit: Duration) -> DhcpEvent {
    let deadline = std::time::Instant::now() + limit;
    loop {
        match events.try_recv() {
            Ok(e) => {
                eprintln!("event: {e:?}");
                return e;
            }
            Err(mpsc::error::TryRecvError::Disconnected) => panic!("the DHCP client ended"),
            Err(mpsc::error::TryRecvError::Empty) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no DHCP event within {limit:?}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn in_range(address: &Prefix, range: (u8, u8)) -> bool {
    match address.addr {
        std::net::IpAddr::V4(v4) => {
            let o = v4.octets();
            o[..3] == [10, 77, 0] && (range.0..=range.1).contains(&o[3]) && address.len == 24
        }
        _ => false,
    }
}

/// Whether this host can run the test; says why not.
fn runnable() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (network namespaces)");
        return false;
    }
    for cmd in ["ip", "dnsmasq"] {
        if !have(cmd) {
            eprintln!("skipped: `{cmd}` is not installed (scripts/install-deps installs it)");
            return false;
        }
    }
    true
}

#[test]
fn lease_renew_expiry_and_release_against_dnsmasq() {
    if !runnable() {
        return;
    }
    let mut f = Fixture::new("r").expect("network namespaces");
    f.start_dnsmasq().expect("dnsmasq");
    let etc = f.dir.path().join("etc");
    std::fs::create_dir(&etc).unwrap();
    let (mut events, stop, thread) = spawn_client(&f.client_ns, &f.client_if, etc.clone());

    // A lease, on the link and in resolv.conf and hosts.
    let DhcpEvent::Bound {
        address,
        lease_sec,
        renewed: false,
    } = next_event(&mut events, Duration::from_secs(30))
    else {
        panic!("expected a first lease; dnsmasq said:\n{}", f.log());
    };
    assert!(in_range(&address, RANGE_A), "{address}");
    let shown = f.client_addresses();
    assert!(shown.contains(&address.to_string()), "{shown}");
    assert!(f.client_routes().contains("default via 10.77.0.1"));
    let resolv = std::fs::read_to_string(etc.join("resolv.conf")).unwrap();
    assert!(resolv.contains("nameserver 10.77.0.1"), "{resolv}");
    let hosts = std::fs::read_to_string(etc.join("hosts")).unwrap();
    assert!(
        hosts.contains(&format!("{} keeltest", address.addr)),
        "{hosts}"
    );
    eprintln!("lease {address} for {lease_sec} s");

    // Renewed at T1 (half the lease; dnsmasq raises leases under 2 min to 2 min).
    let lease = Duration::from_secs(u64::from(lease_sec));
    assert_eq!(
        next_event(&mut events, lease / 2 + Duration::from_secs(10)),
        DhcpEvent::Renewing
    );
    match next_event(&mut events, Duration::from_secs(10)) {
        DhcpEvent::Bound {
            address: a,
            renewed: true,
            ..
        } => assert_eq!(a, address),
        other => panic!("expected a renewal, got {other:?}"),
    }

    // The server goes away: renewing and rebinding fail, and at expiry the address goes.
    f.stop_dnsmasq();
    assert_eq!(
        next_event(&mut events, lease / 2 + Duration::from_secs(10)),
        DhcpEvent::Renewing
    );
    assert_eq!(
        next_event(&mut events, lease / 2),
        DhcpEvent::Rebinding,
        "T2 is 7/8 of the lease"
    );
    let shown = f.client_addresses();
    assert!(
        shown.contains(&address.to_string()),
        "the address stays while rebinding: {shown}"
    );
    match next_event(&mut events, lease / 4) {
        DhcpEvent::Expired { address: a } => assert_eq!(a, address),
        other => panic!("expected the lease to expire, got {other:?}"),
    }
    let shown = f.client_addresses();
    assert!(
        !shown.contains("10.77.0."),
        "address left after expiry: {shown}"
    );
    assert!(
        !f.client_routes().contains("default"),
        "{}",
        f.client_routes()
    );
    let resolv = std::fs::read_to_string(etc.join("resolv.conf")).unwrap();
    assert!(!resolv.contains("nameserver"), "{resolv}");

    // Back: discovery finds it again.
    f.start_dnsmasq().expect("dnsmasq again");
    let again = match next_event(&mut events, Duration::from_secs(120)) {
        DhcpEvent::Bound {
            address: a,
            renewed: false,
            ..
        } => a,
        other => panic!("expected a new lease, got {other:?}"),
    };
    assert!(in_range(&again, RANGE_A), "{again}");
    assert!(f.client_addresses().contains(&again.to_string()));

    // Release: DHCPRELEASE reaches dnsmasq, the address leaves the link.
    stop.send(()).unwrap();
    match next_event(&mut events, Duration::from_secs(10)) {
        DhcpEvent::Released { address: a } => assert_eq!(a, again),
        other => panic!("expected a release, got {other:?}"),
    }
    thread.join().unwrap().unwrap();
    assert!(!f.client_addresses().contains("10.77.0."));
    let ip_text = again.addr.to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let leases = std::fs::read_to_string(f.leases()).unwrap_or_default();
        let log = f.log();
        if !leases.contains(&ip_text) && log.contains("DHCPRELEASE") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "dnsmasq still holds {ip_text}: {leases}\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_nak_while_renewing_drops_the_lease_at_once_and_discovers_again() {
    if !runnable() {
        return;
    }
    // T1 after 4 s, not half of dnsmasq's two-minute minimum lease: the renewal comes soon.
    const EARLY_T1: &str = "--dhcp-option=option:T1,4";
    let mut f = Fixture::new("n").expect("network namespaces");
    f.start_dnsmasq_with(RANGE_A, &[EARLY_T1]).expect("dnsmasq");
    let etc = f.dir.path().join("etc");
    std::fs::create_dir(&etc).unwrap();
    let (mut events, stop, thread) = spawn_client(&f.client_ns, &f.client_if, etc.clone());
    let DhcpEvent::Bound {
        address,
        lease_sec,
        renewed: false,
    } = next_event(&mut events, Duration::from_secs(30))
    else {
        panic!("expected a first lease; dnsmasq said:\n{}", f.log());
    };
    assert!(in_range(&address, RANGE_A), "{address}");
    assert!(f.client_routes().contains("default via 10.77.0.1"));

    // The server comes back with another pool and authority over the subnet: the client's
    // renewal of an address it no longer hands out gets a DHCPNAK.
    f.stop_dnsmasq();
    f.start_dnsmasq_with(RANGE_B, &[EARLY_T1, "--dhcp-authoritative"])
        .expect("dnsmasq with another range");
    assert_eq!(
        next_event(&mut events, Duration::from_secs(20)),
        DhcpEvent::Renewing
    );
    match next_event(&mut events, Duration::from_secs(20)) {
        DhcpEvent::Nak { address: a } => assert_eq!(a, address),
        other => panic!(
            "expected a DHCPNAK, got {other:?}; dnsmasq said:\n{}",
            f.log()
        ),
    }
    // At once, long before the lease's own end: no address, no route, no server.
    let shown = f.client_addresses();
    assert!(
        !shown.contains(&address.addr.to_string()),
        "address left after the NAK: {shown}"
    );
    assert!(
        !f.client_routes().contains("default"),
        "{}",
        f.client_routes()
    );
    let resolv = std::fs::read_to_string(etc.join("resolv.conf")).unwrap();
    assert!(!resolv.contains("nameserver"), "{resolv}");
    assert!(
        f.log().contains("DHCPNAK"),
        "dnsmasq did not log a NAK:\n{}",
        f.log()
    );

    // Discovery starts over and the new pool's address arrives.
    let again = match next_event(&mut events, Duration::from_secs(30)) {
        DhcpEvent::Bound {
            address: a,
            renewed: false,
            ..
        } => a,
        other => panic!("expected a new lease, got {other:?}"),
    };
    assert!(in_range(&again, RANGE_B), "{again}");
    let shown = f.client_addresses();
    assert!(shown.contains(&again.to_string()), "{shown}");
    assert!(!shown.contains(&address.addr.to_string()), "{shown}");
    assert!(f.client_routes().contains("default via 10.77.0.1"));
    let resolv = std::fs::read_to_string(etc.join("resolv.conf")).unwrap();
    assert!(resolv.contains("nameserver 10.77.0.1"), "{resolv}");
    eprintln!("NAK'd {address} (lease {lease_sec} s), then {again}");

    stop.send(()).unwrap();
    match next_event(&mut events, Duration::from_secs(10)) {
        DhcpEvent::Released { address: a } => assert_eq!(a, again),
        other => panic!("expected a release, got {other:?}"),
    }
    thread.join().unwrap().unwrap();
}
