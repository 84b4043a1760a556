//! The DHCPv4 client PID 1 runs, against a real dnsmasq: two network namespaces joined by a
//! veth pair, dnsmasq serving in one, `keel_init::net::run_dhcp_client` in the other (on a
//! thread that entered it). Lease, renewal, expiry with the server gone, a new lease once it
//! is back, and release. Needs root, `ip` and dnsmasq (scripts/install-deps installs them);
//! without them it says why and passes.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use keel_config::Prefix;
use keel_init::net::{DhcpEvent, run_dhcp_client};
use nix::sched::{CloneFlags, setns};
use tokio::sync::{mpsc, oneshot};

const SERVER_IF: &str = "kdhcps0";
const CLIENT_IF: &str = "kdhcpc0";

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
    dir: tempfile::TempDir,
    dnsmasq: Option<Child>,
}

impl Fixture {
    fn new() -> Result<Fixture, String> {
        let id = std::process::id();
        let f = Fixture {
            server_ns: format!("keel-dhcp-s-{id}"),
            client_ns: format!("keel-dhcp-c-{id}"),
            dir: tempfile::tempdir().map_err(|e| e.to_string())?,
            dnsmasq: None,
        };
        ip(&["netns", "add", &f.server_ns])?;
        ip(&["netns", "add", &f.client_ns])?;
        ip(&[
            "link",
            "add",
            SERVER_IF,
            "netns",
            &f.server_ns,
            "type",
            "veth",
            "peer",
            "name",
            CLIENT_IF,
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
            SERVER_IF,
        ])?;
        ip(&["-n", &f.server_ns, "link", "set", SERVER_IF, "up"])?;
        ip(&["-n", &f.server_ns, "link", "set", "lo", "up"])?;
        Ok(f)
    }

    fn leases(&self) -> PathBuf {
        self.dir.path().join("dnsmasq.leases")
    }

    fn start_dnsmasq(&mut self) -> Result<(), String> {
        let log = File::create(self.dir.path().join("dnsmasq.log")).map_err(|e| e.to_string())?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.server_ns, "dnsmasq", "--no-daemon"])
            .arg("--conf-file=/dev/null")
            .arg(format!("--interface={SERVER_IF}"))
            .arg("--bind-interfaces")
            .arg("--except-interface=lo")
            .arg("--dhcp-range=10.77.0.50,10.77.0.60,255.255.255.0,30s")
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
            CLIENT_IF,
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
    etc: PathBuf,
) -> (
    mpsc::UnboundedReceiver<DhcpEvent>,
    oneshot::Sender<()>,
    std::thread::JoinHandle<Result<(), String>>,
) {
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = oneshot::channel();
    let path = Path::new("/run/netns").join(ns);
    let thread = std::thread::spawn(move || {
        let file = File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns: {e}"))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(run_dhcp_client(
            CLIENT_IF, "keeltest", &etc, events_tx, stop_rx,
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

fn in_range(address: &Prefix) -> bool {
    match address.addr {
        std::net::IpAddr::V4(v4) => {
            let o = v4.octets();
            o[..3] == [10, 77, 0] && (50..=60).contains(&o[3]) && address.len == 24
        }
        _ => false,
    }
}

#[test]
fn lease_renew_expiry_and_release_against_dnsmasq() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (network namespaces)");
        return;
    }
    for cmd in ["ip", "dnsmasq"] {
        if !have(cmd) {
            eprintln!("skipped: `{cmd}` is not installed (scripts/install-deps installs it)");
            return;
        }
    }
    let mut f = Fixture::new().expect("network namespaces");
    f.start_dnsmasq().expect("dnsmasq");
    let etc = f.dir.path().join("etc");
    std::fs::create_dir(&etc).unwrap();
    let (mut events, stop, thread) = spawn_client(&f.client_ns, etc.clone());

    // A lease, on the link and in resolv.conf and hosts.
    let DhcpEvent::Bound {
        address,
        lease_sec,
        renewed: false,
    } = next_event(&mut events, Duration::from_secs(30))
    else {
        panic!("expected a first lease; dnsmasq said:\n{}", f.log());
    };
    assert!(in_range(&address), "{address}");
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
    assert!(in_range(&again), "{again}");
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
