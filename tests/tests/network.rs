//! End-to-end host networking: a second NIC found by its MAC and configured statically
//! (IPv4 and IPv6 addresses, MTU, specific routes), an `ip=` kernel argument that wins over
//! the host file's DHCP for eth0, and the generated /etc/hosts and /etc/resolv.conf, all
//! read back from inside a container on the host network.

use std::path::Path;

use keel_qemu::Vm;
use keel_tests::{BOOT_TIMEOUT, STEP_TIMEOUT, build_host, vm_config};

const SECOND_MAC: &str = "52:54:00:12:34:99";

/// `second` finds the second NIC with `matcher`.
fn write_host(dir: &Path, eth0: &str, matcher: &str) -> std::path::PathBuf {
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

[images.bb]
layers = ["busybox:/bin/busybox"]
env = ["PATH=/bin"]

# The host network and the host's /etc, read-only: what the guest itself has.
[containers.show]
image = "bb"
kind = "onboot"
volumes = ["/etc:/hostetc:ro"]
command = ["sh", "-c", "sleep 3; ip -o addr; ip -o link; ip route; ip -6 route; sed 's/^/hosts: /' /hostetc/hosts; sed 's/^/resolv: /' /hostetc/resolv.conf; echo show: done"]
"#
        ),
    )
    .unwrap();
    host
}

/// Boots with a second NIC on its own restricted user network, plus extra kernel arguments.
fn boot_with_second_nic(dir: &Path, cmdline: &str) -> Vm {
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
    Vm::boot(config).expect("QEMU starts")
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
    );
    let dir = build_host(&host, &work.path().join("out"));
    let mut vm = boot_with_second_nic(
        &dir,
        " ip=10.0.2.99::10.0.2.2:255.255.255.0:cmdhost:eth0:none",
    );
    vm.wait_for_line_anywhere("[show] show: done", BOOT_TIMEOUT)
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

    vm.powerdown().unwrap();
    vm.wait_for_line_anywhere("keel: poweroff clean", STEP_TIMEOUT)
        .unwrap();
    assert!(vm.wait_exit(STEP_TIMEOUT).unwrap().success());
}

#[test]
fn a_dhcp_lease_names_the_host_and_a_driver_match_takes_the_next_nic() {
    let work = tempfile::tempdir().unwrap();
    // eth0 (by name) comes first, so the virtio_net match takes the other NIC.
    let host = write_host(work.path(), "dhcp4 = true", "driver = \"virtio_net\"");
    let dir = build_host(&host, &work.path().join("out"));
    let mut vm = boot_with_second_nic(&dir, "");
    vm.wait_for_line_anywhere("[show] show: done", BOOT_TIMEOUT)
        .unwrap();
    let console = vm.console();
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
    vm.powerdown().unwrap();
    vm.wait_for_line_anywhere("keel: poweroff clean", STEP_TIMEOUT)
        .unwrap();
    assert!(vm.wait_exit(STEP_TIMEOUT).unwrap().success());
}
