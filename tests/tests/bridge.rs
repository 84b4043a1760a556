//! End-to-end container networks: bridged containers finding each other by name, outbound
//! NAT to QEMU's gateway, published ports from outside the guest, from the guest itself and
//! from a neighbour (hairpin), networks walled off from each other and an internal one from
//! the outside, `network = "none"` seeing only lo, ports withdrawn with the container; and two guests on a QEMU socket network reaching each other's published ports.
//!
//! Everything inside the guest is checked by `exec` over the control API, so each check
//! waits on its own answer rather than on time. (Debian's busybox 1.35 wget crashes with
//! `-T`, so the busybox `timeout` applet bounds it instead.)

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use keel_api::{Client, Request};
use keel_qemu::Vm;
use keel_tests::{BOOT_TIMEOUT, STEP_TIMEOUT, build_host, vm_config};

const WEB: &str = r#"
[images.bb]
layers = ["busybox:/bin/busybox"]
env = ["PATH=/bin"]

[containers.web]
image = "bb"
network = "bridge"
ports = ["8080:80"]
env = { WHO = "@WHO@" }
command = ["sh", "-c", "mkdir -p /www && echo \"web on $WHO\" > /www/index.html && exec httpd -f -p 80 -h /www"]

[containers.tool]
image = "bb"
network = "bridge"
command = ["sleep", "1000000"]

[containers.hosttool]
image = "bb"
command = ["sleep", "1000000"]
"#;

/// A host serving "web on WHO"; `named` puts `hostname = WHO` in the file, otherwise the
/// host takes the name its DHCP lease offers.
fn write_host(dir: &Path, who: &str, named: bool, extra: &str) -> PathBuf {
    let path = dir.join(format!("{who}.toml"));
    let hostname = if named {
        format!("hostname = \"{who}\"\n")
    } else {
        String::new()
    };
    std::fs::write(
        &path,
        format!(
            "[host]\n{hostname}stop_timeout = \"2s\"\n\n[network.interfaces.eth0]\ndhcp4 = true\n{extra}\n{}",
            WEB.replace("@WHO@", who)
        ),
    )
    .unwrap();
    path
}

/// The guest's control API, and `exec` returning (exit code, output).
struct Guest {
    api: Client,
}

impl Guest {
    fn connect(vm: &Vm) -> Guest {
        let mut api = Client::connect_unix(vm.api_socket()).expect("API socket");
        api.set_timeout(Some(STEP_TIMEOUT)).unwrap();
        Guest { api }
    }

    fn exec(&mut self, container: &str, script: &str) -> (i32, String) {
        let mut output = Vec::new();
        let code = self
            .api
            .exec(
                container,
                vec!["sh".into(), "-c".into(), script.into()],
                Vec::new(),
                |_, bytes| output.extend_from_slice(bytes),
            )
            .unwrap_or_else(|e| panic!("exec in {container}: {e}"));
        (code, String::from_utf8_lossy(&output).into_owned())
    }

    /// Runs `script` until it exits 0 (the container may still be starting), or panics
    /// with its last output after `timeout`.
    fn exec_ok(&mut self, container: &str, script: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let (code, out) = self.exec(container, script);
            if code == 0 {
                return out;
            }
            assert!(
                Instant::now() < deadline,
                "`{script}` in {container} kept failing (exit {code}):\n{out}"
            );
            // Between attempts the guest has to make progress (a process starting); the
            // exec round trip itself paces this loop, this only keeps it from spinning.
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn wait_running(&mut self, name: &str) {
        self.wait_state(name, "running");
    }

    fn wait_state(&mut self, name: &str, state: &str) {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let ps = self.api.ps().expect("ps");
            if ps.iter().any(|c| c.name == name && c.state == state) {
                return;
            }
            assert!(Instant::now() < deadline, "{name} never {state}: {ps:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A one-shot HTTP server on the host's loopback: QEMU's user network forwards guest
/// connections to 10.0.2.2:PORT there.
fn serve_once(body: &'static str) -> (u16, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        if let Ok((stream, _)) = listener.accept() {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let mut stream = stream;
            let _ = write!(
                stream,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (port, handle)
}

fn sockets_dir() -> tempfile::TempDir {
    // A unix socket path must fit in 108 bytes: $TMPDIR may be long, /tmp is not.
    tempfile::Builder::new()
        .prefix("keel-bridge-")
        .tempdir_in("/tmp")
        .unwrap()
}

#[test]
fn bridged_containers_reach_each_other_the_gateway_and_published_ports() {
    let work = tempfile::tempdir().unwrap();
    let host = write_host(
        work.path(),
        "alpha",
        true,
        "[containers.isolated]\nimage = \"bb\"\nnetwork = \"none\"\ncommand = [\"sleep\", \"1000000\"]\n\n\
         [networks.other]\nsubnet = \"10.90.0.0/24\"\nmasquerade = false\n\n\
         [containers.stranger]\nimage = \"bb\"\nnetwork = \"other\"\n\
         command = [\"sh\", \"-c\", \"mkdir -p /www && echo stranger > /www/index.html && exec httpd -f -p 80 -h /www\"]\n",
    );
    let dir = build_host(&host, &work.path().join("out"));
    let sockets = sockets_dir();
    let mut config = vm_config(&dir, &[8080]);
    config.api_socket = Some(sockets.path().join("api.sock"));
    let vm = Vm::boot(config).expect("QEMU starts");
    vm.wait_for_line("keel: ready uptime_ms=", BOOT_TIMEOUT)
        .unwrap();
    let mut guest = Guest::connect(&vm);
    for name in ["web", "tool", "hosttool", "isolated", "stranger"] {
        guest.wait_running(name);
    }

    // From outside the guest: QEMU forwards to 10.0.2.15:8080, DNAT takes it to web:80.
    let page = vm
        .http_get(8080, "/", STEP_TIMEOUT)
        .expect("published port");
    assert_eq!(page.status, 200);
    assert_eq!(page.body.trim(), "web on alpha");

    // A neighbour finds web by name, through the network's hosts file.
    let out = guest.exec_ok("tool", "timeout 5 wget -q -O - http://web/", STEP_TIMEOUT);
    assert_eq!(out.trim(), "web on alpha");
    let (_, hosts) = guest.exec("tool", "cat /etc/hosts; ip -o -4 addr show eth0; ip route");
    assert!(
        hosts.contains("\tweb\n") && hosts.contains("\ttool\n"),
        "{hosts}"
    );
    assert!(hosts.contains("inet 10.88."), "{hosts}");
    assert!(hosts.contains("default via 10.88.0.1 dev eth0"), "{hosts}");
    let (_, resolv) = guest.exec("tool", "cat /etc/resolv.conf");
    assert!(resolv.contains("nameserver 10.0.2.3"), "{resolv}");

    // Out through the masquerade to QEMU's gateway, which relays to the test's listener.
    let (port, served) = serve_once("hello from the gateway");
    let out = guest.exec_ok(
        "tool",
        &format!("timeout 10 wget -q -O - http://10.0.2.2:{port}/"),
        STEP_TIMEOUT,
    );
    assert_eq!(out.trim(), "hello from the gateway");
    served.join().unwrap();

    // From the guest itself, to its loopback and to its own address (output chain).
    for url in ["http://127.0.0.1:8080/", "http://10.0.2.15:8080/"] {
        let out = guest.exec_ok(
            "hosttool",
            &format!("timeout 5 wget -q -O - {url}"),
            STEP_TIMEOUT,
        );
        assert_eq!(out.trim(), "web on alpha", "{url}");
    }
    // From a neighbour on the same bridge through the host's address (hairpin).
    let out = guest.exec_ok(
        "tool",
        "timeout 5 wget -q -O - http://10.0.2.15:8080/",
        STEP_TIMEOUT,
    );
    assert_eq!(out.trim(), "web on alpha");

    // Networks are walled off from each other, and an internal one (masquerade = false)
    // from everything beyond the host; published ports stay open to all.
    let address_of = |guest: &mut Guest, name: &str| {
        let (_, out) = guest.exec(name, "ip -o -4 addr show eth0");
        out.split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .unwrap_or_else(|| panic!("no address for {name}: {out}"))
            .to_string()
    };
    let stranger = address_of(&mut guest, "stranger");
    let web = address_of(&mut guest, "web");
    let out = guest.exec_ok(
        "hosttool",
        &format!("timeout 5 wget -q -O - http://{stranger}/"),
        STEP_TIMEOUT,
    );
    assert_eq!(out.trim(), "stranger", "the host reaches every network");
    for (from, url) in [
        ("tool", format!("http://{stranger}/")),
        ("stranger", format!("http://{web}/")),
    ] {
        let (code, out) = guest.exec(from, &format!("timeout 5 wget -q -O - {url}"));
        assert_ne!(code, 0, "{from} reached {url} on another network: {out}");
    }
    let out = guest.exec_ok(
        "stranger",
        "timeout 5 wget -q -O - http://10.0.2.15:8080/",
        STEP_TIMEOUT,
    );
    assert_eq!(
        out.trim(),
        "web on alpha",
        "a published port is open to every network"
    );
    // The listener is never answered when the wall holds; its thread ends with the test.
    let (port, _unanswered) = serve_once("the internal network got out");
    let (code, out) = guest.exec(
        "stranger",
        &format!("timeout 5 wget -q -O - http://10.0.2.2:{port}/"),
    );
    assert_ne!(code, 0, "an internal network reached the outside: {out}");

    // network = "none": only lo.
    let (_, links) = guest.exec("isolated", "ip -o link");
    let names: Vec<&str> = links
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(str::trim))
        .collect();
    assert_eq!(names, ["lo"], "{links}");

    // A stopped container's ports go with it, and come back with its next start, on the
    // same address.
    let (_, before) = guest.exec("tool", "grep -w web /etc/hosts");
    guest
        .api
        .call(Request::Stop {
            name: "web".into(),
            timeout_ms: Some(2000),
        })
        .expect("stop web");
    guest.wait_state("web", "stopped");
    let (code, out) = guest.exec("hosttool", "timeout 3 wget -q -O - http://127.0.0.1:8080/");
    assert_ne!(code, 0, "the port still answers after web stopped: {out}");
    guest
        .api
        .call(Request::Start { name: "web".into() })
        .expect("start web");
    let out = guest.exec_ok(
        "hosttool",
        "timeout 5 wget -q -O - http://127.0.0.1:8080/",
        STEP_TIMEOUT,
    );
    assert_eq!(out.trim(), "web on alpha");
    let (_, after) = guest.exec("tool", "grep -w web /etc/hosts");
    assert_eq!(before.trim(), after.trim());
    let out = guest.exec_ok("tool", "timeout 5 wget -q -O - http://web/", STEP_TIMEOUT);
    assert_eq!(out.trim(), "web on alpha");
}

#[test]
fn two_guests_on_a_socket_network_reach_each_others_published_ports() {
    let work = tempfile::tempdir().unwrap();
    // The QEMU socket network is a point-to-point link: the first guest listens on a free
    // port, the second connects to it.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut vms = Vec::new();
    let sockets = sockets_dir();
    for (n, who, netdev) in [
        (1, "one", format!("socket,id=lan,listen=127.0.0.1:{port}")),
        (2, "two", format!("socket,id=lan,connect=127.0.0.1:{port}")),
    ] {
        let mac = format!("52:54:00:77:00:0{n}");
        let lan = format!(
            "[network.interfaces.lan]\nmatch = {{ mac = \"{mac}\" }}\naddresses = [\"192.168.77.{n}/24\"]\n\
             [containers.etc]\nimage = \"bb\"\nvolumes = [\"/etc:/hostetc:ro\"]\ncommand = [\"sleep\", \"1000000\"]\n"
        );
        // The second host leaves its name to QEMU's DHCP server.
        let host = write_host(work.path(), who, n == 1, &lan);
        let dir = build_host(&host, &work.path().join(who));
        let mut config = vm_config(&dir, &[]);
        if n == 2 {
            config.user_net.push(format!("hostname={who}"));
        }
        config.api_socket = Some(sockets.path().join(format!("{who}.sock")));
        config.extra_args.extend([
            "-netdev".to_string(),
            netdev,
            "-device".to_string(),
            format!("virtio-net-pci,netdev=lan,mac={mac}"),
        ]);
        vms.push(Vm::boot(config).expect("QEMU starts"));
    }
    for vm in &vms {
        vm.wait_for_line("keel: ready uptime_ms=", BOOT_TIMEOUT)
            .unwrap();
    }
    let mut one = Guest::connect(&vms[0]);
    let mut two = Guest::connect(&vms[1]);
    one.wait_running("web");
    two.wait_running("web");
    let out = one.exec_ok(
        "hosttool",
        "timeout 5 wget -q -O - http://192.168.77.2:8080/",
        STEP_TIMEOUT,
    );
    assert_eq!(out.trim(), "web on two");
    // And from a bridged container of the other guest: masquerade out, DNAT in.
    let out = two.exec_ok(
        "tool",
        "timeout 5 wget -q -O - http://192.168.77.1:8080/",
        STEP_TIMEOUT,
    );
    assert_eq!(out.trim(), "web on one");

    // The unnamed host took the lease's name, for the kernel and in /etc/hosts.
    assert!(
        vms[1]
            .console()
            .contains("keel: hostname: two (from eth0's DHCP lease)"),
        "{}",
        vms[1].console()
    );
    let (_, hosts) = two.exec("etc", "cat /hostetc/hosts");
    assert!(hosts.contains("10.0.2.15 two"), "{hosts}");
}
