//! The container network throughput benchmark: guests, the transfers, and its report.

use crate::*;

/// The networking guest's control API: `exec` of argv lists, `ps` polling.
pub(crate) struct Guest {
    api: keel_api::Client,
}

impl Guest {
    fn connect(vm: &keel_qemu::Vm) -> Result<Guest, String> {
        let mut api = keel_api::Client::connect_unix(vm.api_socket())
            .map_err(|e| format!("control API {}: {e}", vm.api_socket().display()))?;
        api.set_timeout(Some(NET_EXEC_TIMEOUT))
            .map_err(|e| format!("control API: {e}"))?;
        Ok(Guest { api })
    }

    /// Runs argv in the container: (exit code, stdout and stderr as they came).
    fn exec(&mut self, container: &str, argv: &[String]) -> Result<(i32, String), String> {
        let mut output = Vec::new();
        let code = self
            .api
            .exec(container, argv.to_vec(), Vec::new(), |_, bytes| {
                output.extend_from_slice(bytes)
            })
            .map_err(|e| format!("exec {argv:?} in {container}: {e}"))?;
        Ok((code, String::from_utf8_lossy(&output).into_owned()))
    }

    fn wait_running(&mut self, name: &str, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let ps = self.api.ps().map_err(|e| format!("ps: {e}"))?;
            if ps.iter().any(|c| c.name == name && c.state == "running") {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("{name} is not running after {timeout:?}: {ps:?}"));
            }
            // Each ps is a round trip to the guest; this only keeps the loop from spinning.
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// One transfer of `bytes` on `path`, measured by the sender in the guest.
    fn send(&mut self, addrs: &Addresses, path: Path4, bytes: u64) -> Result<Transfer, String> {
        let argv = addrs.send_argv(path, bytes);
        let (code, out) = self.exec(path.client(), &argv)?;
        let from = Some(std::net::IpAddr::V4(addrs.expected_from(path)));
        match Transfer::parse(&out) {
            Some(t) if code == 0 && t.bytes == bytes && t.from == from => Ok(t),
            _ => Err(format!(
                "{} `{}` in {} (expected from={}) exited {code}: {}",
                path.name(),
                argv.join(" "),
                path.client(),
                addrs.expected_from(path),
                out.trim()
            )),
        }
    }

    /// [`Guest::send`] until it succeeds (the server may still be binding, the port's
    /// rules still being written) or `timeout` has passed; then the last error.
    fn send_until_ok(
        &mut self,
        addrs: &Addresses,
        path: Path4,
        bytes: u64,
        timeout: Duration,
    ) -> Result<Transfer, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.send(addrs, path, bytes) {
                Ok(t) => return Ok(t),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

pub(crate) fn network(cli: &Cli, env: &Env, results: &mut Results) -> Result<(), String> {
    let mut net = NetResults::default();
    // The image's second layer: a directory holding the probe at /bin/keel-bench-tcp.
    let tool_root = env.work.join("net-tool");
    let _ = std::fs::remove_dir_all(&tool_root);
    std::fs::create_dir_all(tool_root.join("bin"))
        .map_err(|e| format!("{}: {e}", tool_root.display()))?;
    let tool = env.bin_dir.join("keel-bench-tcp");
    std::fs::copy(&tool, tool_root.join("bin/keel-bench-tcp"))
        .map_err(|e| format!("copying {}: {e}", tool.display()))?;
    let host_file = env.work.join("network-host.toml");
    let text = network::host_file(&cli.busybox, &tool_root);
    write(&host_file, &text)?;
    let parsed = keel_config::HostConfig::parse(&host_file, &text).map_err(|e| e.to_string())?;
    let bridge = network::bridge_addresses(&parsed)?;
    let sink = bridge.sink;
    let dir = env.work.join("network");
    eprintln!("keel-bench: keel build {}", host_file.display());
    host::keel_build(&env.bin_dir.join("keel"), &host_file, &dir, &env.cache)?;
    let manifest = host::read_manifest(&dir)?;
    let cmdline = manifest["cmdline"]
        .as_str()
        .ok_or("manifest.json has no cmdline")?;

    let log = env.work.join("console-network.log");
    let with_log = |e: String| format!("{e} (console: {})", log.display());
    let booted = Instant::now();
    let vm = host::boot_build(&dir, cmdline, BIG_MEMORY_MB, &log)?;
    net.accel = accel_name(&vm);
    host::wait_line(&vm, "keel: ready", BOOT_TIMEOUT).map_err(with_log)?;
    let mut guest = Guest::connect(&vm).map_err(with_log)?;
    for name in ["sink", "src", "hostsink", "hostsrc"] {
        guest
            .wait_running(name, NET_READY_TIMEOUT)
            .map_err(with_log)?;
    }
    let show_eth0 = |what: &str| -> Vec<String> {
        ["ip", "-o", "-4", "addr", "show", what]
            .map(String::from)
            .to_vec()
    };
    let (_, out) = guest.exec("hostsrc", &show_eth0("eth0"))?;
    let guest_ip = network::parse_ip_addr(&out)
        .ok_or_else(|| with_log(format!("no IPv4 address on the guest's eth0: {out}")))?;
    // The name the bridge path uses, as the sending container sees it.
    let grep_sink = ["grep", "-w", "sink", "/etc/hosts"].map(String::from);
    let (_, out) = guest.exec("src", &grep_sink)?;
    if tcp::lookup_hosts(&out, "sink") != Some(std::net::IpAddr::V4(sink)) {
        return Err(with_log(format!(
            "src's /etc/hosts does not give sink {sink}, the address keel-config assigns it: {out}"
        )));
    }
    let addrs = Addresses {
        guest: guest_ip,
        ..bridge
    };
    net.addresses = Some(addrs);
    net.boot_seconds = booted.elapsed().as_secs();
    eprintln!("keel-bench: network guest up: eth0 {guest_ip}, sink {sink}");

    // A first transfer on every path proves the servers listen and the rules are in place;
    // it is not measured.
    for path in Path4::ALL {
        match guest.send_until_ok(&addrs, path, NET_WARMUP_BYTES, NET_READY_TIMEOUT) {
            Ok(t) => eprintln!(
                "keel-bench: network warm-up {}: {:.1} MB/s",
                path.name(),
                t.mb_per_s()
            ),
            Err(e) => {
                eprintln!("keel-bench: network: {} unavailable: {e}", path.name());
                net.unavailable.insert(path, e);
            }
        }
    }
    if net.unavailable.len() == Path4::ALL.len() {
        return Err(with_log("network: no path carried a transfer".into()));
    }
    eprintln!(
        "keel-bench: network, {} rounds of {} bytes and 1 byte per path",
        cli.net_n, cli.net_bytes
    );
    let rounds = Instant::now();
    // Round 0 is a full-size warm-up (the emulator translates each path's code on its first
    // big transfer), not recorded.
    for round in 0..=cli.net_n {
        let order = network::round_order(round);
        let available = order.iter().filter(|p| !net.unavailable.contains_key(p));
        let mut line = if round == 0 {
            "keel-bench: network warm-up round:".to_string()
        } else {
            format!("keel-bench: network round {round}:")
        };
        let mut bulk = Vec::new();
        let mut small = Vec::new();
        for &path in available.clone() {
            let t = guest.send(&addrs, path, cli.net_bytes).map_err(with_log)?;
            let _ = write!(line, " {} {:.1} MB/s", path.name(), t.mb_per_s());
            bulk.push((path, t));
        }
        for &path in available {
            let t = guest.send(&addrs, path, 1).map_err(with_log)?;
            let _ = write!(line, ", {} 1 B {:.2} ms", path.name(), t.ns as f64 / 1e6);
            small.push((path, t));
        }
        eprintln!("{line}");
        if round > 0 {
            for (path, t) in bulk {
                net.bulk.entry(path).or_default().push(t);
            }
            for (path, t) in small {
                net.small.entry(path).or_default().push(t);
            }
        }
    }
    net.rounds_seconds = rounds.elapsed().as_secs();
    if let Some(failure) = vm
        .console()
        .lines()
        .find(|l| l.contains("cannot be started") || l.contains("setup failed"))
    {
        return Err(with_log(format!("network guest: {failure}")));
    }
    results.network = Some(net);
    Ok(())
}

pub(crate) fn network_report(cli: &Cli, env: &Env, r: &Results, elapsed: Duration) -> String {
    let mut out = String::new();
    let w = &mut out;
    let Some(net) = &r.network else {
        return out;
    };
    let kernel = &env.parts.kernel;
    let qemu = command_line("qemu-system-x86_64", &["--version"]);
    let date = command_line("date", &["-u", "+%Y-%m-%d"]);
    let host_kernel = command_line("uname", &["-r"]);
    let mut command = String::from("scripts/bench --only network");
    if cli.net_n != 15 {
        let _ = write!(command, " --net-n {}", cli.net_n);
    }
    if cli.net_bytes != 64 << 20 {
        if cli.net_bytes.is_multiple_of(1 << 20) {
            let _ = write!(command, " --net-bytes {}M", cli.net_bytes >> 20);
        } else {
            let _ = write!(command, " --net-bytes {}", cli.net_bytes);
        }
    }
    let _ = writeln!(w, "### Results ({date})\n");
    let _ = writeln!(
        w,
        "`{command}`. Machine: {} host CPUs ({}), host kernel {host_kernel}; guest: {} vCPUs, \
         {BIG_MEMORY_MB} MiB, accelerator **{}**, {qemu}; guest kernel {} (Debian package {}). \
         One boot; N = {} rounds of {} MiB and of 1 byte per path; boot to containers up {} s, \
         rounds {} s, whole run {} s.\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        host::CPUS,
        net.accel,
        kernel.version,
        kernel.package_version,
        cli.net_n,
        cli.net_bytes as f64 / f64::from(1u32 << 20),
        net.boot_seconds,
        net.rounds_seconds,
        elapsed.as_secs()
    );
    if net.accel == "tcg" {
        let _ = writeln!(
            w,
            "**Under TCG the absolute figures are meaningless** (every byte is copied by \
             emulated instructions); only the ratios, measured in the same boot with \
             interleaved rounds, say something.\n"
        );
    }
    let (guest_ip, sink_ip) = net.addresses.map_or_else(
        || ("?".to_string(), "?".to_string()),
        |a| (a.guest.to_string(), a.sink.to_string()),
    );
    let route = |path: Path4| -> String {
        match path {
            Path4::Bridge => format!(
                "`src` → `sink`:{} by name (veth → keel0 → veth)",
                network::SINK_PORT
            ),
            Path4::Loopback => format!(
                "`hostsrc` → 127.0.0.1:{} (`hostsink`, host network)",
                network::HOST_SINK_PORT
            ),
            Path4::Published => format!(
                "`hostsrc` → {guest_ip}:{} (published, DNAT → `sink`:{})",
                network::PUBLISHED_PORT,
                network::SINK_PORT
            ),
            Path4::Direct => format!(
                "`hostsrc` → {sink_ip}:{} (`sink`'s bridge address)",
                network::SINK_PORT
            ),
        }
    };
    let _ = writeln!(
        w,
        "| path | sender → receiver | throughput, MB/s: median (p10–p90) | 1-byte connection, ms: median (p10–p90) |"
    );
    let _ = writeln!(w, "|---|---|---|---|");
    let summary = |values: Vec<f64>, digits: usize| -> String {
        stats::summarize(&values).map_or_else(
            || "–".to_string(),
            |s| {
                format!(
                    "**{:.digits$}** ({:.digits$}–{:.digits$})",
                    s.median, s.p10, s.p90
                )
            },
        )
    };
    for path in Path4::ALL {
        if let Some(e) = net.unavailable.get(&path) {
            let _ = writeln!(
                w,
                "| {} | {} | not measured: `{}` | – |",
                path.name(),
                route(path),
                e.replace('|', "\\|").replace('\n', " ")
            );
            continue;
        }
        let bulk = net.bulk.get(&path).map(Vec::as_slice).unwrap_or_default();
        let small = net.small.get(&path).map(Vec::as_slice).unwrap_or_default();
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} |",
            path.name(),
            route(path),
            summary(network::throughputs(bulk), 1),
            summary(network::times_ms(small), 2),
        );
    }
    let _ = writeln!(w);
    let medians = |path: Path4| -> Option<(f64, f64)> {
        let bulk = stats::summarize(&network::throughputs(net.bulk.get(&path)?))?;
        let small = stats::summarize(&network::times_ms(net.small.get(&path)?))?;
        Some((bulk.median, small.median))
    };
    let _ = writeln!(
        w,
        "| ratio | of the medians | median of the per-round ratios (p10–p90) | 1-byte connection: difference of the medians |"
    );
    let _ = writeln!(w, "|---|---|---|---|");
    for (a, b, title) in [
        (
            Path4::Bridge,
            Path4::Loopback,
            "bridge / loopback (target ≥ 0.9)",
        ),
        (Path4::Published, Path4::Direct, "published / direct"),
    ] {
        match (medians(a), medians(b), net.bulk.get(&a), net.bulk.get(&b)) {
            (Some((ta, la)), Some((tb, lb)), Some(xa), Some(xb)) => {
                let paired = network::paired_ratio(xa, xb).map_or_else(
                    || "–".to_string(),
                    |s| format!("{:.2} ({:.2}–{:.2})", s.median, s.p10, s.p90),
                );
                let _ = writeln!(
                    w,
                    "| {title} | **{:.2}** | {paired} | {:+.2} ms |",
                    ta / tb,
                    la - lb
                );
            }
            _ => {
                let _ = writeln!(w, "| {title} | – | – | – |");
            }
        }
    }
    let _ = writeln!(w);
    out
}
