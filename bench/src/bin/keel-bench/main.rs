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

mod firmware_run;
mod network_run;
mod report;

use firmware_run::*;
use network_run::*;
use report::*;

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

const BENCHMARKS: [&str; 7] = [
    "latency", "boot", "firmware", "updates", "rss", "network", "images",
];
/// The benchmarks that boot QEMU guests (and need a kernel and `keel build`).
const GUEST_BENCHMARKS: [&str; 6] = ["latency", "boot", "firmware", "updates", "rss", "network"];

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
    /// Wall clock from QEMU's start to `keel: ready`: the disk image under OVMF, and the same
    /// build with -kernel.
    firmware_boot_ms: Vec<u64>,
    direct_boot_ms: Vec<u64>,
    /// Per round: (ms to send, check, write and install; ms until the new version
    /// committed itself after its reboot), from the start of the upgrade.
    upgrade_ms: Vec<(u64, u64)>,
    /// Per round: ms from QEMU's start to the old version ready after three failed tries.
    rollback_ms: Vec<u64>,
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
    if cli.only.iter().any(|o| o == "firmware") {
        firmware(cli, &env, &boot_dir, &mut results)?;
    }
    if cli.only.iter().any(|o| o == "updates") {
        updates(cli, &env, &mut results)?;
    }
    if cli.only.iter().any(|o| o == "rss") {
        rss(cli, &env, &mut results)?;
    }
    if ["latency", "boot", "firmware", "updates", "rss"]
        .iter()
        .any(|b| selected(b))
    {
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
