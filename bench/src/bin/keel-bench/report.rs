//! docs/benchmarks.md's sections: the machine, the tables, the ratios.

use crate::*;

pub(crate) fn images_report(cli: &Cli, opts: &images::Options, r: &images::Results) -> String {
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

pub(crate) fn memory_mib() -> u64 {
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

pub(crate) fn accel_name(vm: &keel_qemu::Vm) -> String {
    format!("{:?}", vm.accel()).to_lowercase()
}

pub(crate) fn command_line(program: &str, args: &[&str]) -> String {
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

pub(crate) fn cpu_model() -> String {
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

pub(crate) fn ms(v: f64) -> String {
    format!("{:.2}", v / 1000.0)
}

pub(crate) fn median(values: &[u64]) -> Option<Summary> {
    let v: Vec<f64> = values.iter().map(|&x| x as f64).collect();
    stats::summarize(&v)
}

pub(crate) fn report(
    cli: &Cli,
    env: &Env,
    r: &Results,
    elapsed: Duration,
) -> Result<String, String> {
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

    if let (Some(f), Some(d)) = (median(&r.firmware_boot_ms), median(&r.direct_boot_ms)) {
        let _ = writeln!(
            w,
            "### Boot through firmware: wall clock from QEMU's start to `keel: ready` (ms, {} boots each)\n",
            cli.boots
        );
        let _ = writeln!(w, "| setup | median | min | max | all boots |");
        let _ = writeln!(w, "|---|---|---|---|---|");
        for (name, s, all) in [
            (
                "disk.img under OVMF (firmware, systemd-boot, UKI; /var on KEEL-VAR)",
                f,
                &r.firmware_boot_ms,
            ),
            (
                "the same build with -kernel (/var on a tmpfs)",
                d,
                &r.direct_boot_ms,
            ),
        ] {
            timing_row(w, name, s, all);
        }
        let _ = writeln!(
            w,
            "\nFirmware / -kernel (medians): **{:.2}**\n",
            f.median / d.median
        );
    }

    if !r.upgrade_ms.is_empty() {
        let installed: Vec<u64> = r.upgrade_ms.iter().map(|(i, _)| *i).collect();
        let committed: Vec<u64> = r.upgrade_ms.iter().map(|(_, c)| *c).collect();
        let _ = writeln!(
            w,
            "### A/B update and rollback under OVMF (ms, {} rounds)\n",
            r.upgrade_ms.len()
        );
        let _ = writeln!(w, "| step | median | min | max | all rounds |");
        let _ = writeln!(w, "|---|---|---|---|---|");
        for (name, all) in [
            (
                "`upgrade`: send, check, write and read back the slot, install the entry",
                &installed,
            ),
            (
                "`upgrade` until the new version committed itself (+ reboot, trial)",
                &committed,
            ),
            (
                "rollback: QEMU start to the old version ready after 3 failed tries (verity)",
                &r.rollback_ms,
            ),
        ] {
            if let Some(s) = median(all) {
                timing_row(w, name, s, all);
            }
        }
        let _ = writeln!(w);
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
            timing_row(w, name, s, all);
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

/// One row of a timing table: the median in bold, min, max, then every measurement.
fn timing_row(w: &mut String, name: &str, s: Summary, all: &[u64]) {
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
