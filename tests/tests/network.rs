//! End-to-end host networking: a second NIC found by its MAC and configured statically
//! (IPv4 and IPv6 addresses, MTU, specific routes), an `ip=` kernel argument that wins over
//! the host file's DHCP for eth0, SLAAC from QEMU's router advertisements (fec0::/64), an
//! optional DHCP NIC nobody answers that does not hold up `network: online`, and the
//! generated /etc/hosts and /etc/resolv.conf, all read back from inside a container on the
//! host network.

use std::path::Path;

use keel_qemu::Vm;
use keel_tests::{BOOT_TIMEOUT, STEP_TIMEOUT, build_host, vm_config};

const SECOND_MAC: &str = "52:54:00:12:34:99";
/// A third NIC on a hub with no other port: its DHCP requests reach nobody.
const SILENT_MAC: &str = "52:54:00:12:34:aa";

/// `second` finds the second NIC with `matcher`; `extra` is more of the host file.
fn write_host(dir: &Path, eth0: &str, matcher: &str, extra: &str) -> std::path::PathBuf {
    let host = dir.join("host.toml");
    std::fs::write(
        &host,
        format!(
            r#"[host]
hostname = "nettest"
stop_timeout = "2s"

[network.interfaces.eth0]
{eth0}

[network.interfaces.second]
match = {{ {matcher} }}
addresses = ["10.1.0.7/24", "fd01::7/64"]
mtu = 1400
routes = [{{ to = "10.9.0.0/16", via = "10.1.0.2" }}, {{ to = "fd09::/48", via = "fd01::1" }}]
dns = ["10.1.0.3"]
{extra}
[images.bb]
layers = ["busybox:/bin/busybox"]
env = ["PATH=/bin"]

# The host network and the host's /etc, read-only: what the guest itself has. Everything
# but SLAAC is configured before containers start; the router advertisement may come later,
# so the container waits (at most a minute) for eth0's autoconfigured address.
[containers.show]
image = "bb"
kind = "onboot"
volumes = ["/etc:/hostetc:ro"]
command = ["sh", "-c", "i=0; until ip -o addr show dev eth0 | grep -q 'inet6 fec0:'; do i=$((i+1)); [ $i -gt 300 ] && echo show: no slaac && break; sleep 0.2; done; ip -o addr; ip -o link; ip route; ip -6 route; sed 's/^/hosts: /' /hostetc/hosts; sed 's/^/resolv: /' /hostetc/resolv.conf; echo show: done"]
"#
        ),
    )
    .unwrap();
    host
}

/// Boots with a second NIC on its own restricted user network, plus extra kernel arguments;
/// `silent` adds a third NIC on an empty hub.
fn boot_with_second_nic(dir: &Path, cmdline: &str, silent: bool) -> Vm {
    let mut config = vm_config(dir, &[]);
    config.cmdline.push_str(cmdline);
    config.extra_args.extend(
        [
            "-netdev",
            "user,id=n1,net=10.1.0.0/24,restrict=on",
            "-device",
            &format!("virtio-net-pci,netdev=n1,mac={SECOND_MAC}"),
        ]
        .map(String::from),
    );
    if silent {
        config.extra_args.extend(
            [
                "-netdev",
                "hubport,id=n2,hubid=7",
                "-device",
                &format!("virtio-net-pci,netdev=n2,mac={SILENT_MAC}"),
            ]
            .map(String::from),
        );
    }
    Vm::boot(config).expect("QEMU starts")
}

/// eth0 got an address from QEMU's router advertisement, logged and seen in the container.
fn assert_slaac_on_eth0(console: &str, lines: &[String]) {
    let all = lines.join("\n");
    assert!(console.contains("eth0: slaac fec0::"), "{console}");
    assert!(has(lines, &["eth0", "inet6 fec0::", "/64"]), "{all}");
}

/// The container's output lines, without the console prefix.
fn shown(console: &str) -> Vec<String> {
    console
        .lines()
        .filter_map(|l| {
            l.split_once("[show] ")
                .map(|(_, rest)| rest.trim().to_string())
        })
        .collect()
}

fn has(lines: &[String], all: &[&str]) -> bool {
    lines
        .iter()
        .any(|l| all.iter().all(|needle| l.contains(needle)))
}

#[test]
fn a_nic_matched_by_mac_is_static_and_ip_on_the_cmdline_wins_over_dhcp() {
    let work = tempfile::tempdir().unwrap();
    let host = write_host(
        work.path(),
        "dhcp4 = true",
        &format!("mac = \"{SECOND_MAC}\""),
        &format!(
            "\n[network.interfaces.silent]\nmatch = {{ mac = \"{SILENT_MAC}\" }}\ndhcp4 = \"optional\"\n"
        ),
    );
    let dir = build_host(&host, &work.path().join("out"));
    let mut vm = boot_with_second_nic(
        &dir,
        " ip=10.0.2.99::10.0.2.2:255.255.255.0:cmdhost:eth0:none",
        true,
    );
    vm.wait_for_line_anywhere("network: online", BOOT_TIMEOUT)
        .unwrap();
    vm.wait_for_line_anywhere("eth0: slaac fec0::", STEP_TIMEOUT)
        .unwrap();
    vm.wait_for_line_anywhere("[show] show: done", STEP_TIMEOUT)
        .unwrap();
    vm.wait_for_line_anywhere("keel: ready uptime_ms=", STEP_TIMEOUT)
        .unwrap();
    let console = vm.console();
    let lines = shown(&console);
    let all = lines.join("\n");

    // eth0: the command line's static address, not a DHCP lease.
    assert!(
        console.contains(
            "eth0: [network.interfaces.eth0] skipped: the kernel command line already configures it"
        ),
        "{console}"
    );
    assert!(has(&lines, &["eth0", "inet 10.0.2.99/24"]), "{all}");
    assert!(!all.contains("10.0.2.15"), "no DHCP lease on eth0:\n{all}");
    assert!(has(&lines, &["default via 10.0.2.2", "eth0"]), "{all}");

    // The second NIC, whatever the kernel named it: found by MAC, static v4 and v6, MTU.
    let link = lines
        .iter()
        .find(|l| l.contains(&format!("link/ether {SECOND_MAC}")))
        .unwrap_or_else(|| panic!("no link with {SECOND_MAC}:\n{all}"));
    assert!(link.contains("mtu 1400"), "{link}");
    let name = link
        .split(':')
        .nth(1)
        .map(str::trim)
        .unwrap_or_else(|| panic!("no name in {link}"));
    assert!(has(&lines, &[name, "inet 10.1.0.7/24"]), "{all}");
    assert!(has(&lines, &[name, "inet6 fd01::7/64"]), "{all}");
    assert!(
        has(
            &lines,
            &["10.9.0.0/16 via 10.1.0.2", &format!("dev {name}")]
        ),
        "{all}"
    );
    assert!(
        has(&lines, &["fd09::/48 via fd01::1", &format!("dev {name}")]),
        "{all}"
    );
    assert!(
        console.contains(&format!("{name}: matched by [network.interfaces.second]")),
        "{console}"
    );

    // /etc/hosts names the host on the first address configured (the command line's);
    // resolv.conf has the second NIC's server.
    assert!(has(&lines, &["hosts: 127.0.0.1 localhost"]), "{all}");
    assert!(
        has(&lines, &["hosts: ::1 localhost ip6-localhost"]),
        "{all}"
    );
    assert!(has(&lines, &["hosts: 10.0.2.99 nettest"]), "{all}");
    assert!(has(&lines, &["resolv: nameserver 10.1.0.3"]), "{all}");
    assert_slaac_on_eth0(&console, &lines);

    // The optional NIC gets no lease, yet the host was online and containers started
    // without waiting for it: neither the first-lease wait nor an acquisition timeout
    // came before `network: online`.
    assert!(
        console.contains(": DHCP optional: boot goes on without waiting for a lease"),
        "{console}"
    );
    let online = console.find("network: online").unwrap();
    assert!(!console[..online].contains("no DHCP lease"), "{console}");
    assert!(!console.contains("no DHCP lease after"), "{console}");
    assert!(!console.contains("network: offline"), "{console}");

    vm.powerdown().unwrap();
    vm.wait_for_line_anywhere("keel: poweroff clean", STEP_TIMEOUT)
        .unwrap();
    assert!(vm.wait_exit(STEP_TIMEOUT).unwrap().success());
}

#[test]
fn a_dhcp_lease_names_the_host_and_a_driver_match_takes_the_next_nic() {
    let work = tempfile::tempdir().unwrap();
    // eth0 (by name) comes first, so the virtio_net match takes the other NIC.
    let host = write_host(work.path(), "dhcp4 = true", "driver = \"virtio_net\"", "");
    let dir = build_host(&host, &work.path().join("out"));
    let mut vm = boot_with_second_nic(&dir, "", false);
    vm.wait_for_line_anywhere("[show] show: done", BOOT_TIMEOUT)
        .unwrap();
    // Logged once DAD is done, which the container does not wait for.
    vm.wait_for_line_anywhere("eth0: slaac fec0::", STEP_TIMEOUT)
        .unwrap();
    let console = vm.console();
    // Online only once the required lease is there.
    let lease = console
        .find("eth0: DHCP lease 10.0.2.15/24")
        .unwrap_or_else(|| panic!("no lease logged:\n{console}"));
    let online = console
        .find("network: online")
        .unwrap_or_else(|| panic!("never online:\n{console}"));
    assert!(lease < online, "{console}");
    let lines = shown(&console);
    let all = lines.join("\n");
    assert!(has(&lines, &["eth0", "inet 10.0.2.15/24"]), "{all}");
    // eth0 comes first in the host file's order, so its lease names the host.
    assert!(has(&lines, &["hosts: 10.0.2.15 nettest"]), "{all}");
    assert!(has(&lines, &["resolv: nameserver 10.0.2.3"]), "{all}");
    assert!(has(&lines, &["resolv: nameserver 10.1.0.3"]), "{all}");
    assert!(
        has(&lines, &[&format!("link/ether {SECOND_MAC}"), "mtu 1400"]),
        "{all}"
    );
    assert!(!has(&lines, &["eth0", "10.1.0.7"]), "{all}");
    assert!(has(&lines, &["inet 10.1.0.7/24"]), "{all}");
    assert_slaac_on_eth0(&console, &lines);
    vm.powerdown().unwrap();
    vm.wait_for_line_anywhere("keel: poweroff clean", STEP_TIMEOUT)
        .unwrap();
    assert!(vm.wait_exit(STEP_TIMEOUT).unwrap().success());
}
