//! keel-bench: builds the benchmark guests, boots them in QEMU and writes the report
//! (docs/benchmarks.md when run by scripts/bench).
//!
//! It expects the release binaries beside itself: keel, keel-init, keel-bench-guest and
//! keel-bench-stamp (`cargo build --release --workspace --bins`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use clap::Parser;
use keel_bench::host::{self, DynamicBinary, KernelParts};
use keel_bench::lines;
use keel_bench::stats::{self, Summary};

#[derive(Parser)]
#[command(
    name = "keel-bench",
    about = "Benchmark Keel: container start latency vs crun, boot time, PID 1's RSS"
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
    /// Benchmarks to run.
    #[arg(long, value_delimiter = ',', default_value = "latency,boot,rss")]
    only: Vec<String>,
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
    /// Write the markdown report here (stdout otherwise).
    #[arg(long)]
    report: Option<PathBuf>,
}

/// Everything the latency guest may take under TCG (it prints progress only at the end).
const LATENCY_TIMEOUT: Duration = Duration::from_secs(60 * 60);
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// `keel run`'s default guest memory: the boot benchmark uses it for both setups.
const BOOT_MEMORY_MB: u32 = 512;
/// Enough for 100 containers and the latency guest's 2 × N starts.
const BIG_MEMORY_MB: u32 = 1024;

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
}

fn run(cli: &Cli) -> Result<(), String> {
    let started = Instant::now();
    let bin_dir = std::env::current_exe()
        .map_err(|e| format!("current_exe: {e}"))?
        .parent()
        .ok_or("no parent directory for keel-bench")?
        .to_path_buf();
    for bin in ["keel", "keel-init", "keel-bench-guest", "keel-bench-stamp"] {
        if !bin_dir.join(bin).is_file() {
            return Err(format!(
                "{} is missing: build with `cargo build --release --workspace --bins` (scripts/bench does)",
                bin_dir.join(bin).display()
            ));
        }
    }
    if !cli.crun.is_file() {
        return Err(format!(
            "{} is missing: install crun (`apt-get install crun`; scripts/bench does)",
            cli.crun.display()
        ));
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
    let cache = cli.cache.clone().unwrap_or_else(default_cache);
    let parts = KernelParts::fetch(&cache)?;
    let crun = DynamicBinary::resolve(&cli.crun)?;

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
    let report = report(cli, &env, &results, started.elapsed())?;
    match &cli.report {
        Some(path) => write(path, &report)?,
        None => print!("{report}"),
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
        let vm = host::boot(
            &keel_dir.join("vmlinuz"),
            &keel_dir.join("initramfs.img"),
            &env.cmdline,
            BOOT_MEMORY_MB,
            &log,
        )?;
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
        let vm = host::boot(
            &dir.join("vmlinuz"),
            &dir.join("initramfs.img"),
            &env.cmdline,
            BIG_MEMORY_MB,
            &log,
        )?;
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
