//! keel-bench: builds the benchmark guests, boots them in QEMU and writes the report
//! (docs/benchmarks.md when run by scripts/bench).
//!
//! It expects the release binaries beside itself: keel, keel-init, keel-bench-guest,
//! keel-bench-stamp and keel-bench-tcp (`cargo build --release --workspace --bins`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use clap::Parser;
use keel_bench::host::{self, DynamicBinary, KernelParts};
use keel_bench::images;
use keel_bench::lines;
use keel_bench::network::{self, Addresses, Path4};
use keel_bench::stats::{self, Summary};
use keel_bench::tcp::{self, Transfer};

#[derive(Parser)]
#[command(
    name = "keel-bench",
    about = "Benchmark Keel: container start latency vs crun, boot time, PID 1's RSS, container networking, image import + unpack"
)]
struct Cli {
    /// Measured starts per runtime and metric.
    #[arg(long, default_value_t = 200)]
    n: usize,
    /// Unmeasured starts before them.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Boots per setup in the boot benchmark.
    #[arg(long, default_value_t = 5)]
    boots: usize,
    /// Container counts for the RSS benchmark.
    #[arg(long, value_delimiter = ',', default_value = "0,10,100")]
    rss_counts: Vec<usize>,
    /// Interleaved rounds of the networking benchmark (each: every path once with
    /// --net-bytes, then every path once with 1 byte).
    #[arg(long, default_value_t = 15)]
    net_n: usize,
    /// Bytes per throughput transfer in the networking benchmark (K, M, G: binary units).
    #[arg(long, default_value = "64M", value_parser = parse_byte_count)]
    net_bytes: u64,
    /// Benchmarks to run: latency, boot, rss, network, images (images runs on the host, as
    /// root, without QEMU).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "latency,boot,rss,network,images"
    )]
    only: Vec<String>,
    /// Measured rounds of the images benchmark (after one warm-up round).
    #[arg(long, default_value_t = 7)]
    images_n: usize,
    /// Containers of one image in the images benchmark's disk-use comparison.
    #[arg(long, default_value_t = 10)]
    images_containers: usize,
    /// File content of the images benchmark's image, in MB (10^6 bytes).
    #[arg(long, default_value_t = 100)]
    images_mb: u64,
    /// Layers of the images benchmark's image.
    #[arg(long, default_value_t = 4)]
    images_layers: usize,
    #[arg(long, default_value = "umoci")]
    umoci: PathBuf,
    #[arg(long, default_value = "skopeo")]
    skopeo: PathBuf,
    /// Write the images benchmark's markdown report here (stdout otherwise); left alone when
    /// it does not run.
    #[arg(long)]
    images_report: Option<PathBuf>,
    /// Where the guests and their console logs are written [default: a temporary directory]
    #[arg(long)]
    work: Option<PathBuf>,
    /// Download cache for the kernel package [default: ~/.cache/keel]
    #[arg(long, env = "KEEL_CACHE")]
    cache: Option<PathBuf>,
    #[arg(long, default_value = "/usr/bin/crun")]
    crun: PathBuf,
    #[arg(long, default_value = "/bin/busybox")]
    busybox: PathBuf,
    /// Extra words for the latency guest's kernel command line (`keel_bench.crun_debug=1`,
    /// `keel_bench.aslr=1`).
    #[arg(long)]
    guest_args: Option<String>,
    /// Write the markdown report of latency, boot and rss here (stdout otherwise); left
    /// alone when none of them runs.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Write the networking benchmark's markdown report here (stdout otherwise); left alone
    /// when it does not run.
    #[arg(long)]
    network_report: Option<PathBuf>,
}

fn parse_byte_count(text: &str) -> Result<u64, String> {
    match tcp::parse_bytes(text) {
        Some(n) if n > 0 => Ok(n),
        _ => Err(format!("expected a byte count such as 64M, not {text:?}")),
    }
}

const BENCHMARKS: [&str; 5] = ["latency", "boot", "rss", "network", "images"];
/// The benchmarks that boot QEMU guests (and need a kernel and `keel build`).
const GUEST_BENCHMARKS: [&str; 4] = ["latency", "boot", "rss", "network"];

/// Everything the latency guest may take under TCG (it prints progress only at the end).
const LATENCY_TIMEOUT: Duration = Duration::from_secs(60 * 60);
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// `keel run`'s default guest memory: the boot benchmark uses it for both setups.
const BOOT_MEMORY_MB: u32 = 512;
/// Enough for 100 containers and the latency guest's 2 × N starts.
const BIG_MEMORY_MB: u32 = 1024;
/// How long the networking guest's containers get to come up and answer a first transfer.
const NET_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// The longest one `exec` of the sender may take (also bounds every other API call).
const NET_EXEC_TIMEOUT: Duration = Duration::from_secs(300);
/// The warm-up transfer on each path before the measured rounds.
const NET_WARMUP_BYTES: u64 = 1 << 20;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keel-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

struct Env {
    bin_dir: PathBuf,
    work: PathBuf,
    cache: PathBuf,
    parts: KernelParts,
    crun: DynamicBinary,
    /// The `keel build` command line, shared by every guest.
    cmdline: String,
}

#[derive(Default)]
struct Results {
    latency: BTreeMap<(String, String), Summary>,
    latency_info: Vec<String>,
    latency_seconds: u64,
    accel: String,
    keel_boot_ms: Vec<u64>,
    baseline_boot_ms: Vec<u64>,
    rss: Vec<(usize, u64)>,
    network: Option<NetResults>,
}

#[derive(Default)]
struct NetResults {
    addresses: Option<Addresses>,
    /// Throughput transfers per path, round by round.
    bulk: BTreeMap<Path4, Vec<Transfer>>,
    /// 1-byte transfers per path, round by round.
    small: BTreeMap<Path4, Vec<Transfer>>,
    /// Paths that never completed a warm-up transfer, with the last error.
    unavailable: BTreeMap<Path4, String>,
    /// Wall time of the boot and of the measured rounds.
    boot_seconds: u64,
    rounds_seconds: u64,
    accel: String,
}

fn run(cli: &Cli) -> Result<(), String> {
    let started = Instant::now();
    if let Some(unknown) = cli.only.iter().find(|o| !BENCHMARKS.contains(&o.as_str())) {
        return Err(format!(
            "unknown benchmark {unknown:?}: expected {}",
            BENCHMARKS.join(", ")
        ));
    }
    let selected = |name: &str| cli.only.iter().any(|o| o == name);
    if selected("images") && !nix::unistd::geteuid().is_root() {
        return Err(
            "the images benchmark runs as root (`sudo scripts/bench --only images`); \
             `--only latency,boot,rss,network` leaves it out"
                .into(),
        );
    }
    let temp;
    let work = match &cli.work {
        Some(w) => w.clone(),
        None => {
            temp = tempfile::Builder::new()
                .prefix("keel-bench-")
                .tempdir()
                .map_err(|e| format!("temporary directory: {e}"))?;
            temp.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    if GUEST_BENCHMARKS.iter().any(|b| selected(b)) {
        guests(cli, &work, started)?;
    }
    // Host-side, no QEMU: its report goes to a section of its own.
    if selected("images") {
        let opts = images::Options {
            work: work.join("images"),
            busybox: cli.busybox.clone(),
            umoci: cli.umoci.clone(),
            skopeo: cli.skopeo.clone(),
            budget: cli.images_mb * 1_000_000,
            layers: cli.images_layers,
            rounds: cli.images_n,
            containers: cli.images_containers,
        };
        let results = images::run(&opts)?;
        let report = images_report(cli, &opts, &results);
        match &cli.images_report {
            Some(path) => write(path, &report)?,
            None => print!("{report}"),
        }
    }
    Ok(())
}

/// The benchmarks that boot guests (latency, boot, rss, network).
fn guests(cli: &Cli, work: &Path, started: Instant) -> Result<(), String> {
    let selected = |name: &str| cli.only.iter().any(|o| o == name);
    let work = work.to_path_buf();
    let bin_dir = std::env::current_exe()
        .map_err(|e| format!("current_exe: {e}"))?
        .parent()
        .ok_or("no parent directory for keel-bench")?
        .to_path_buf();
    let mut needed = vec!["keel", "keel-init"];
    if selected("latency") {
        needed.extend(["keel-bench-guest", "keel-bench-stamp"]);
    }
    if selected("network") {
        needed.push("keel-bench-tcp");
    }
    for bin in needed {
        if !bin_dir.join(bin).is_file() {
            return Err(format!(
                "{} is missing: build with `cargo build --release --workspace --bins` (scripts/bench does)",
                bin_dir.join(bin).display()
            ));
        }
    }
    let crun_needed = selected("latency") || selected("boot");
    if crun_needed && !cli.crun.is_file() {
        return Err(format!(
            "{} is missing: install crun (`apt-get install crun`; scripts/bench does)",
            cli.crun.display()
        ));
    }
    let cache = cli.cache.clone().unwrap_or_else(default_cache);
    let parts = KernelParts::fetch(&cache)?;
    // Only the latency and boot guests carry crun.
    let crun = if crun_needed {
        DynamicBinary::resolve(&cli.crun)?
    } else {
        DynamicBinary {
            path: cli.crun.clone(),
            libraries: Vec::new(),
        }
    };

    // One real `keel build` first: its manifest gives the command line every guest boots
    // with, and proves the guests load the same modules as a Keel host.
    let boot_dir = work.join("boot-keel");
    let host_file = work.join("boot-host.toml");
    write(&host_file, &host::boot_host_file(&cli.busybox))?;
    eprintln!("keel-bench: keel build {}", host_file.display());
    host::keel_build(&bin_dir.join("keel"), &host_file, &boot_dir, &cache)?;
    let manifest = host::read_manifest(&boot_dir)?;
    host::check_same_modules(&parts, &manifest)?;
    let cmdline = manifest["cmdline"]
        .as_str()
        .ok_or("manifest.json has no cmdline")?
        .to_string();

    let env = Env {
        bin_dir,
        work,
        cache,
        parts,
        crun,
        cmdline,
    };
    let mut results = Results::default();
    if cli.only.iter().any(|o| o == "latency") {
        latency(cli, &env, &mut results)?;
    }
    if cli.only.iter().any(|o| o == "boot") {
        boot(cli, &env, &boot_dir, &mut results)?;
    }
    if cli.only.iter().any(|o| o == "rss") {
        rss(cli, &env, &mut results)?;
    }
    if selected("latency") || selected("boot") || selected("rss") {
        let report = report(cli, &env, &results, started.elapsed())?;
        match &cli.report {
            Some(path) => write(path, &report)?,
            None => print!("{report}"),
        }
    }
    // Last of the guests: its report goes to a section of its own.
    if selected("network") {
        let net_started = Instant::now();
        network(cli, &env, &mut results)?;
        let report = network_report(cli, &env, &results, net_started.elapsed());
        match &cli.network_report {
            Some(path) => write(path, &report)?,
            None => print!("{report}"),
        }
    }
    Ok(())
}

fn default_cache() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"))
        .join("keel")
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

fn latency(cli: &Cli, env: &Env, results: &mut Results) -> Result<(), String> {
    let image = host::import_bench_image(
        &cli.busybox,
        &env.bin_dir.join("keel-bench-stamp"),
        &env.work,
    )?;
    let initrd = env.work.join("latency-initramfs.img");
    host::latency_initramfs(
        &env.parts,
        &env.bin_dir.join("keel-bench-guest"),
        &image,
        &env.crun,
        &initrd,
    )?;
    let cmdline = format!(
        "{} rdinit=/bench keel_bench.n={} keel_bench.warmup={} {}",
        env.cmdline,
        cli.n,
        cli.warmup,
        cli.guest_args.as_deref().unwrap_or("")
    );
    eprintln!(
        "keel-bench: start latency, {} + {} warm-up starts per runtime and metric",
        cli.n, cli.warmup
    );
    let started = Instant::now();
    let log = env.work.join("console-latency.log");
    let mut vm = host::boot(
        &env.parts.kernel.vmlinuz,
        &initrd,
        &cmdline,
        BIG_MEMORY_MB,
        &log,
    )?;
    results.accel = accel_name(&vm);
    vm.wait_exit(LATENCY_TIMEOUT)
        .map_err(|e| format!("latency guest: {e} (console: {})", log.display()))?;
    results.latency_seconds = started.elapsed().as_secs();
    let console = vm.console();
    if let Some(error) = console.lines().find(|l| l.contains("bench: error")) {
        return Err(format!(
            "latency guest: {error} (console: {})",
            log.display()
        ));
    }
    if !console.lines().any(|l| l.contains("bench: done")) {
        return Err(format!(
            "latency guest stopped before `bench: done` (console: {})",
            log.display()
        ));
    }
    for line in console.lines() {
        if let Some(s) = lines::parse_summary(line) {
            eprintln!("keel-bench: {}", line.trim());
            results.latency.insert((s.runtime, s.metric), s.summary);
        } else if line.contains("bench: info") {
            eprintln!("keel-bench: {}", line.trim());
            results.latency_info.push(line.trim().to_string());
        }
    }
    Ok(())
}

fn boot(cli: &Cli, env: &Env, keel_dir: &Path, results: &mut Results) -> Result<(), String> {
    let image = env.work.join("box-image");
    let _ = std::fs::remove_dir_all(&image);
    // The same single busybox layer `keel build` imports for the Keel host (imports are
    // reproducible, so it is bit for bit the same layer).
    keel_image::import::import(
        &[keel_image::import::LayerSource::Busybox(
            cli.busybox.clone(),
        )],
        &keel_image::import::ImageConfigSpec {
            env: vec!["PATH=/bin".into()],
            ..Default::default()
        },
        Some("box"),
        &image,
    )
    .map_err(|e| format!("importing the box image: {e}"))?;
    let baseline = env.work.join("baseline-initramfs.img");
    host::baseline_initramfs(
        &env.parts,
        &cli.busybox,
        &env.crun,
        &image,
        // crun 1.8.1 cannot start containers with a time namespace (see the guest).
        false,
        &baseline,
    )?;
    eprintln!("keel-bench: boot, {} boots per setup", cli.boots);
    // Alternating, so slow phases of the host hit both setups alike.
    for i in 0..cli.boots {
        let log = env.work.join(format!("console-boot-keel-{i}.log"));
        let vm = host::boot_build(keel_dir, &env.cmdline, BOOT_MEMORY_MB, &log)?;
        results.accel = accel_name(&vm);
        let line = host::wait_line(&vm, "keel: ready", BOOT_TIMEOUT)?;
        let ms = lines::number(&line, "uptime_ms").ok_or(format!("no uptime in {line:?}"))?;
        if let Some(failure) = vm
            .console()
            .lines()
            .find(|l| l.contains("cannot be started") || l.contains("setup failed"))
        {
            return Err(format!("keel boot: {failure} (console: {})", log.display()));
        }
        eprintln!("keel-bench: keel boot {i}: ready at {ms} ms");
        results.keel_boot_ms.push(ms);
        drop(vm);

        let log = env.work.join(format!("console-boot-baseline-{i}.log"));
        let vm = host::boot(
            &env.parts.kernel.vmlinuz,
            &baseline,
            &env.cmdline,
            BOOT_MEMORY_MB,
            &log,
        )?;
        let line = host::wait_line(&vm, "baseline: ready", BOOT_TIMEOUT)?;
        let state = host::wait_line(&vm, "baseline: box", BOOT_TIMEOUT)?;
        if !state.contains("box running") {
            return Err(format!(
                "baseline boot: {state} (console: {})",
                log.display()
            ));
        }
        let console = vm.console();
        if let Some(failure) = console
            .lines()
            .find(|l| l.contains("baseline: crun failed") || l.contains("baseline: dhcp failed"))
        {
            return Err(format!(
                "baseline boot: {failure} (console: {})",
                log.display()
            ));
        }
        let ms = lines::number(&line, "uptime_ms").ok_or(format!("no uptime in {line:?}"))?;
        eprintln!("keel-bench: baseline boot {i}: ready at {ms} ms");
        results.baseline_boot_ms.push(ms);
    }
    Ok(())
}

fn rss(cli: &Cli, env: &Env, results: &mut Results) -> Result<(), String> {
    for &count in &cli.rss_counts {
        let host_file = env.work.join(format!("rss-{count}.toml"));
        write(&host_file, &host::rss_host_file(&cli.busybox, count))?;
        let dir = env.work.join(format!("rss-{count}"));
        host::keel_build(&env.bin_dir.join("keel"), &host_file, &dir, &env.cache)?;
        let log = env.work.join(format!("console-rss-{count}.log"));
        // Each build has its own root image, so its own root UUID on the command line.
        let cmdline = host::read_manifest(&dir)?["cmdline"]
            .as_str()
            .ok_or("manifest.json has no cmdline")?
            .to_string();
        let vm = host::boot_build(&dir, &cmdline, BIG_MEMORY_MB, &log)?;
        results.accel = accel_name(&vm);
        let line = host::wait_line(&vm, "keel: pid1 rss_kb=", BOOT_TIMEOUT)?;
        let kb = lines::number(&line, "rss_kb").ok_or(format!("no rss in {line:?}"))?;
        let containers = lines::number(&line, "containers").unwrap_or(0);
        if containers != count as u64 {
            return Err(format!("expected {count} containers: {line}"));
        }
        // Started is not running: make sure none of them failed to start.
        if let Some(failure) = vm
            .console()
            .lines()
            .find(|l| l.contains("cannot be started") || l.contains("setup failed"))
        {
            return Err(format!("rss boot with {count} containers: {failure}"));
        }
        eprintln!("keel-bench: PID 1 RSS with {count} containers: {kb} KiB");
        results.rss.push((count, kb));
    }
    Ok(())
}

/// The networking guest's control API: `exec` of argv lists, `ps` polling.
struct Guest {
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

fn network(cli: &Cli, env: &Env, results: &mut Results) -> Result<(), String> {
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

fn network_report(cli: &Cli, env: &Env, r: &Results, elapsed: Duration) -> String {
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

fn images_report(cli: &Cli, opts: &images::Options, r: &images::Results) -> String {
    let mut command = String::from("scripts/bench --only images");
    if cli.images_n != 7 {
        let _ = write!(command, " --images-n {}", cli.images_n);
    }
    if cli.images_containers != 10 {
        let _ = write!(command, " --images-containers {}", cli.images_containers);
    }
    if cli.images_mb != 100 {
        let _ = write!(command, " --images-mb {}", cli.images_mb);
    }
    if cli.images_layers != 4 {
        let _ = write!(command, " --images-layers {}", cli.images_layers);
    }
    let fs = command_line(
        "findmnt",
        &["-no", "FSTYPE,SOURCE", "-T", &opts.work.to_string_lossy()],
    )
    .split_whitespace()
    .collect::<Vec<_>>()
    .join(" ");
    let machine = format!(
        "{} CPUs ({}), {} MiB RAM, host kernel {}, work directory on {fs}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        memory_mib(),
        command_line("uname", &["-r"]),
    );
    let versions = format!(
        "{}, {}",
        command_line(&cli.umoci.to_string_lossy(), &["--version"]),
        command_line(&cli.skopeo.to_string_lossy(), &["--version"]),
    );
    let date = command_line("date", &["-u", "+%Y-%m-%d"]);
    images::report(r, opts, &command, &date, &machine, &versions)
}

fn memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| {
                l.strip_prefix("MemTotal:")?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
        })
        .map_or(0, |kb| kb / 1024)
}

fn accel_name(vm: &keel_qemu::Vm) -> String {
    format!("{:?}", vm.accel()).to_lowercase()
}

fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")?
                    .split_once(':')
                    .map(|(_, m)| m.trim().to_string())
            })
        })
        .unwrap_or_else(|| "unknown".into())
}

fn ms(v: f64) -> String {
    format!("{:.2}", v / 1000.0)
}

fn median(values: &[u64]) -> Option<Summary> {
    let v: Vec<f64> = values.iter().map(|&x| x as f64).collect();
    stats::summarize(&v)
}

fn report(cli: &Cli, env: &Env, r: &Results, elapsed: Duration) -> Result<String, String> {
    let mut out = String::new();
    let w = &mut out;
    let kernel = &env.parts.kernel;
    let qemu = command_line("qemu-system-x86_64", &["--version"]);
    let crun_version = command_line(&env.crun.path.to_string_lossy(), &["--version"]);
    let date = command_line("date", &["-u", "+%Y-%m-%d"]);
    let host_kernel = command_line("uname", &["-r"]);
    let _ = writeln!(w, "## Results ({date})\n");
    let _ = writeln!(
        w,
        "Machine: {} host CPUs ({}), host kernel {host_kernel}; guests: {} vCPUs, accelerator **{}**, \
         {qemu}; guest kernel {} (Debian package {}); {crun_version}. \
         Whole run: {} min{}.\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        host::CPUS,
        r.accel,
        kernel.version,
        kernel.package_version,
        elapsed.as_secs() / 60,
        if r.latency_seconds > 0 {
            format!(" (start-latency guest: {} min)", r.latency_seconds / 60)
        } else {
            String::new()
        }
    );

    if !r.latency.is_empty() {
        let _ = writeln!(
            w,
            "### Container start latency (ms; N = {} per row, after {} warm-up starts, one guest boot)\n",
            cli.n, cli.warmup
        );
        let cell = |runtime: &str, metric: &str| -> String {
            r.latency
                .get(&(runtime.to_string(), metric.to_string()))
                .map_or_else(
                    || "–".to_string(),
                    |s| format!("**{}** ({}–{})", ms(s.median), ms(s.p10), ms(s.p90)),
                )
        };
        let ratio = |a: &str, b: &str, metric: &str| -> String {
            let get = |rt: &str| r.latency.get(&(rt.to_string(), metric.to_string()));
            match (get(a), get(b)) {
                (Some(x), Some(y)) => format!("**{:.2}**", x.median / y.median),
                _ => "–".to_string(),
            }
        };
        let _ = writeln!(
            w,
            "Median (p10–p90) in ms. crun gets Keel's own seccomp profile (the fair comparison); \
             the crun-without-seccomp column (crun's default when a spec has none) favours crun.\n"
        );
        let _ = writeln!(
            w,
            "| metric | Keel | crun, same seccomp profile | **Keel / crun** | crun without seccomp | Keel / crun without seccomp | no container (fork + exec) |"
        );
        let _ = writeln!(w, "|---|---|---|---|---|---|---|");
        for (metric, title) in [
            (
                "start_to_first_instruction_us",
                "start → payload's first instruction",
            ),
            ("start_to_exit_us", "start → exit of /bin/true (busybox)"),
        ] {
            let _ = writeln!(
                w,
                "| {title} | {} | {} | {} | {} | {} | {} |",
                cell("keel", metric),
                cell("crun", metric),
                ratio("keel", "crun", metric),
                cell("crun-noseccomp", metric),
                ratio("keel", "crun-noseccomp", metric),
                cell("bare", metric),
            );
        }
        let _ = writeln!(w, "\nGuest report: `{}`\n", r.latency_info.join("`, `"));
    }

    if let (Some(k), Some(b)) = (median(&r.keel_boot_ms), median(&r.baseline_boot_ms)) {
        let _ = writeln!(
            w,
            "### Boot: guest uptime when the host is ready with one container (ms, {} boots each)\n",
            cli.boots
        );
        let _ = writeln!(w, "| setup | median | min | max | all boots |");
        let _ = writeln!(w, "|---|---|---|---|---|");
        for (name, s, all) in [
            ("Keel (`keel: ready`)", k, &r.keel_boot_ms),
            (
                "busybox sh + udhcpc + crun (`baseline: ready`)",
                b,
                &r.baseline_boot_ms,
            ),
        ] {
            let all: Vec<String> = all.iter().map(u64::to_string).collect();
            let _ = writeln!(
                w,
                "| {name} | **{:.0}** | {:.0} | {:.0} | {} |",
                s.median,
                s.min,
                s.max,
                all.join(", ")
            );
        }
        let _ = writeln!(
            w,
            "\nKeel / baseline (medians): **{:.2}**\n",
            k.median / b.median
        );
    }

    if !r.rss.is_empty() {
        let _ = writeln!(w, "### PID 1's RSS right after `keel: ready`\n");
        let _ = writeln!(w, "| running containers | VmRSS of PID 1 (KiB) |");
        let _ = writeln!(w, "|---|---|");
        for (count, kb) in &r.rss {
            let _ = writeln!(w, "| {count} | **{kb}** |");
        }
        let _ = writeln!(w);
    }
    Ok(out)
}
