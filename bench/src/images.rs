//! The image benchmark (issue 6): import + unpack throughput of a ~100 MB image against
//! `skopeo copy` + `umoci unpack`, and the disk N containers of one image take.
//!
//! It runs on the host, as root, without QEMU. The input is built once and cached in the
//! work directory: a rootfs of real files of this machine (busybox, then
//! /usr/lib/x86_64-linux-gnu and /usr/share in sorted order until the size budget is
//! reached), split into layers of about equal size, each committed with `umoci repack`
//! (gzip, as umoci writes it), and the image exported with `skopeo copy` to an oci-archive.
//!
//! Each measured round starts from fresh, empty destinations after a `sync`, and runs Keel
//! (`import_archive` then `unpack_image`, in-process) and the baseline (`skopeo copy
//! oci-archive: → oci:` then `umoci unpack`, plus `umoci raw unpack` alone) in an order
//! that alternates from round to round. Every step is followed by a timed `sync`, so the
//! report can show the steps both as the tools do them (Keel syncs what it writes, umoci
//! does not) and made durable.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::stats::{self, Summary};

/// The tag of the benchmark image in every layout and archive.
pub const TAG: &str = "bench";
/// Applets linked to busybox in the image's /bin.
const APPLETS: [&str; 8] = ["sh", "ls", "cat", "cp", "mv", "rm", "echo", "true"];
/// Where the rootfs's files come from, in this order (busybox first).
pub const SOURCES: [&str; 2] = ["/usr/lib/x86_64-linux-gnu", "/usr/share"];

/// One file or symlink of the image's rootfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Absolute path on this machine.
    pub source: PathBuf,
    /// Path inside the rootfs, relative (`usr/share/doc/...`).
    pub dest: PathBuf,
    /// Bytes of content (0 for a symlink).
    pub size: u64,
    pub symlink: bool,
}

/// Regular files and symlinks under `root`, depth first in byte order of their names, so
/// the same machine always yields the same list. Unreadable directories are skipped.
pub fn walk(root: &Path, rel_prefix: &Path, out: &mut Vec<Entry>) {
    let Ok(read) = std::fs::read_dir(root) else {
        return;
    };
    let mut names: Vec<_> = read.filter_map(Result::ok).map(|e| e.file_name()).collect();
    names.sort();
    for name in names {
        let path = root.join(&name);
        let dest = rel_prefix.join(&name);
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let kind = meta.file_type();
        if kind.is_dir() {
            walk(&path, &dest, out);
        } else if kind.is_symlink() {
            out.push(Entry {
                source: path,
                dest,
                size: 0,
                symlink: true,
            });
        } else if kind.is_file() && std::fs::File::open(&path).is_ok() {
            out.push(Entry {
                source: path,
                dest,
                size: meta.len(),
                symlink: false,
            });
        }
    }
}

/// The first entries of `candidates` whose sizes add up to at most `budget` bytes (a file
/// that would overflow it is skipped, later smaller ones still fit), split into `layers`
/// consecutive groups of about `budget / layers` bytes each.
pub fn select_layers(candidates: &[Entry], budget: u64, layers: usize) -> Vec<Vec<Entry>> {
    let layers = layers.max(1);
    let per_layer = budget.div_ceil(layers as u64);
    let mut out: Vec<Vec<Entry>> = vec![Vec::new()];
    let mut total = 0u64;
    let mut in_layer = 0u64;
    for entry in candidates {
        if total + entry.size > budget {
            continue;
        }
        if in_layer > 0 && in_layer + entry.size > per_layer && out.len() < layers {
            out.push(Vec::new());
            in_layer = 0;
        }
        total += entry.size;
        in_layer += entry.size;
        out.last_mut()
            .expect("one group at least")
            .push(entry.clone());
    }
    out
}

/// Disk use of a set of trees as `du -s --block-size=1` counts it: allocated blocks
/// (`st_blocks` × 512) of every file, directory and symlink, each inode once even when
/// hard-linked from several places. Also the apparent size (`st_size`) and inode count.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DiskUse {
    pub bytes: u64,
    pub apparent: u64,
    pub inodes: u64,
}

pub fn disk_use(paths: &[&Path]) -> std::io::Result<DiskUse> {
    let mut seen = HashSet::new();
    let mut total = DiskUse::default();
    for path in paths {
        add_disk_use(path, &mut seen, &mut total)?;
    }
    Ok(total)
}

fn add_disk_use(
    path: &Path,
    seen: &mut HashSet<(u64, u64)>,
    total: &mut DiskUse,
) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    if seen.insert((meta.dev(), meta.ino())) {
        total.bytes += meta.blocks() * 512;
        total.apparent += meta.size();
        total.inodes += 1;
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            add_disk_use(&entry?.path(), seen, total)?;
        }
    }
    Ok(())
}

/// Options of the benchmark (keel-bench's `--images-*`).
#[derive(Debug, Clone)]
pub struct Options {
    pub work: PathBuf,
    pub busybox: PathBuf,
    pub umoci: PathBuf,
    pub skopeo: PathBuf,
    /// Bytes of file content in the image.
    pub budget: u64,
    pub layers: usize,
    /// Measured rounds.
    pub rounds: usize,
    /// Containers of the disk-use comparison.
    pub containers: usize,
}

/// The cached input image.
#[derive(Debug, Clone)]
pub struct Input {
    /// The oci-archive every round imports.
    pub archive: PathBuf,
    pub layers: usize,
    pub files: u64,
    pub symlinks: u64,
    /// Bytes of regular-file content.
    pub content: u64,
    /// Sum of the uncompressed layer tars.
    pub uncompressed: u64,
    /// Sum of the gzip layer blobs.
    pub compressed: u64,
    /// Bytes of the oci-archive.
    pub archive_bytes: u64,
}

/// One measured step: its own time, then the `sync` after it.
#[derive(Debug, Default, Clone, Copy)]
pub struct Step {
    pub run: Duration,
    pub sync: Duration,
}

/// The steps, by name, over all rounds.
#[derive(Debug, Default)]
pub struct Results {
    pub input: Option<Input>,
    pub steps: BTreeMap<&'static str, Vec<Step>>,
    pub disk: Vec<(&'static str, DiskUse)>,
    pub seconds: u64,
    pub build_seconds: Option<u64>,
}

pub const KEEL_IMPORT: &str = "keel import_archive";
pub const KEEL_UNPACK: &str = "keel unpack_image";
pub const SKOPEO_COPY: &str = "skopeo copy";
pub const UMOCI_UNPACK: &str = "umoci unpack";
pub const UMOCI_RAW_UNPACK: &str = "umoci raw unpack";

fn io_err(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> String {
    move |e| format!("{what}: {e}")
}

/// Runs a command, its output captured; an error carries its stderr.
fn run_tool(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?}: {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        ));
    }
    Ok(())
}

fn sync() {
    nix::unistd::sync();
}

fn remove(path: &Path) -> Result<(), String> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("removing {}: {e}", path.display())),
    }
}

/// What the cached input was built from; a different description rebuilds it.
fn input_key(opts: &Options) -> String {
    format!(
        "budget={} layers={} busybox={} sources={} split=per-source\n",
        opts.budget,
        opts.layers,
        opts.busybox.display(),
        SOURCES.join(",")
    )
}

/// Builds the input image (or reuses the cached one in `work/input`).
pub fn build_input(opts: &Options) -> Result<(Input, bool), String> {
    let dir = opts.work.join("input");
    let layout = dir.join("layout");
    let archive = dir.join("image.tar");
    let stamp = dir.join("done");
    let key = input_key(opts);
    let cached = std::fs::read_to_string(&stamp).is_ok_and(|s| s == key);
    if !cached {
        remove(&dir)?;
        std::fs::create_dir_all(&dir).map_err(io_err(dir.display()))?;
        // Half the budget (and the layers) from each source: the libraries are mostly big
        // files, /usr/share mostly small ones.
        let mut groups = Vec::new();
        let mut budget_left = opts.budget;
        let mut layers_left = opts.layers.max(SOURCES.len());
        for (i, source) in SOURCES.iter().enumerate() {
            let mut candidates = Vec::new();
            if i == 0 {
                candidates.push(Entry {
                    source: opts.busybox.clone(),
                    dest: PathBuf::from("bin/busybox"),
                    size: std::fs::metadata(&opts.busybox)
                        .map_err(io_err(opts.busybox.display()))?
                        .len(),
                    symlink: false,
                });
            }
            walk(
                Path::new(source),
                Path::new(source.trim_start_matches('/')),
                &mut candidates,
            );
            let sources_left = (SOURCES.len() - i) as u64;
            let budget = budget_left / sources_left;
            let layers = layers_left / sources_left as usize;
            let selected = select_layers(&candidates, budget, layers);
            budget_left -= selected.iter().flatten().map(|e| e.size).sum::<u64>();
            layers_left -= selected.len();
            groups.extend(selected);
        }
        eprintln!(
            "keel-bench: images: building the input ({} layers, {} files) in {}",
            groups.len(),
            groups.iter().map(Vec::len).sum::<usize>(),
            dir.display()
        );
        let umoci = |args: &[&str]| {
            run_tool(
                Command::new(&opts.umoci)
                    .args(args)
                    .env("TMPDIR", tmp_dir(opts)),
            )
        };
        let image = format!("{}:{TAG}", layout.display());
        umoci(&["init", "--layout", &layout.to_string_lossy()])?;
        umoci(&["new", "--image", &image])?;
        let bundle = dir.join("bundle");
        for (i, group) in groups.iter().enumerate() {
            remove(&bundle)?;
            umoci(&["unpack", "--image", &image, &bundle.to_string_lossy()])?;
            let rootfs = bundle.join("rootfs");
            if i == 0 {
                let bin = rootfs.join("bin");
                std::fs::create_dir_all(&bin).map_err(io_err(bin.display()))?;
                for applet in APPLETS {
                    std::os::unix::fs::symlink("busybox", bin.join(applet))
                        .map_err(io_err(applet))?;
                }
            }
            for entry in group {
                copy_entry(entry, &rootfs)?;
            }
            umoci(&[
                "repack",
                "--image",
                &image,
                "--history.created_by",
                &format!("keel-bench images layer {}", i + 1),
                &bundle.to_string_lossy(),
            ])?;
        }
        remove(&bundle)?;
        umoci(&[
            "config",
            "--image",
            &image,
            "--config.cmd",
            "/bin/sh",
            "--config.env",
            "PATH=/bin",
        ])?;
        umoci(&["gc", "--layout", &layout.to_string_lossy()])?;
        run_tool(
            Command::new(&opts.skopeo)
                .args(["--insecure-policy", "copy", "--quiet"])
                .arg(format!("oci:{image}"))
                .arg(format!("oci-archive:{}:{TAG}", archive.display()))
                .env("TMPDIR", tmp_dir(opts)),
        )?;
    }
    // The figures are read back from the layout, cached or not.
    let image = keel_image::layout::ImageLayout::open_ref(&layout, TAG)
        .map_err(|e| format!("{}: {e}", layout.display()))?;
    let mut input = Input {
        archive: archive.clone(),
        layers: 0,
        files: 0,
        symlinks: 0,
        content: 0,
        uncompressed: 0,
        compressed: 0,
        archive_bytes: std::fs::metadata(&archive)
            .map_err(io_err(archive.display()))?
            .len(),
    };
    for layer in image.layers() {
        input.layers += 1;
        input.compressed += std::fs::metadata(&layer.path)
            .map_err(io_err(layer.path.display()))?
            .len();
        let (tar, files, symlinks, content) = count_layer(&layer, &dir.join("count"))?;
        input.uncompressed += tar;
        input.files += files;
        input.symlinks += symlinks;
        input.content += content;
    }
    if !cached {
        std::fs::write(&stamp, key).map_err(io_err(stamp.display()))?;
    }
    Ok((input, cached))
}

fn tmp_dir(opts: &Options) -> PathBuf {
    opts.work.join("tmp")
}

/// (uncompressed tar bytes, regular files, symlinks, content bytes) of a gzip layer: the
/// tar's size from `gzip -dc`, the rest from unpacking it with Keel into `scratch`.
fn count_layer(
    layer: &keel_image::layout::Layer,
    scratch: &Path,
) -> Result<(u64, u64, u64, u64), String> {
    let blob = &layer.path;
    let mut child = Command::new("gzip")
        .arg("-dc")
        .arg(blob)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("gzip -dc {}: {e}", blob.display()))?;
    let mut stdout = child.stdout.take().expect("piped");
    let tar = std::io::copy(&mut stdout, &mut std::io::sink())
        .map_err(io_err(format!("gzip -dc {}", blob.display())))?;
    let status = child.wait().map_err(io_err("gzip"))?;
    if !status.success() {
        return Err(format!("gzip -dc {}: {status}", blob.display()));
    }
    remove(scratch)?;
    std::fs::create_dir_all(scratch).map_err(io_err(scratch.display()))?;
    let stats = keel_image::unpack::unpack_layer(layer, scratch)
        .map_err(|e| format!("unpacking {}: {e}", blob.display()))?;
    remove(scratch)?;
    Ok((tar, stats.files, stats.symlinks, stats.bytes))
}

fn copy_entry(entry: &Entry, rootfs: &Path) -> Result<(), String> {
    let dest = rootfs.join(&entry.dest);
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(io_err(parent.display()))?;
    }
    if entry.symlink {
        let target = std::fs::read_link(&entry.source).map_err(io_err(entry.source.display()))?;
        std::os::unix::fs::symlink(target, &dest).map_err(io_err(dest.display()))?;
    } else {
        std::fs::copy(&entry.source, &dest).map_err(io_err(entry.source.display()))?;
        // Owner-writable, as in a package: some sources are read-only for everyone.
        let mut perms = std::fs::metadata(&dest)
            .map_err(io_err(dest.display()))?
            .permissions();
        perms.set_mode(perms.mode() | 0o200);
        std::fs::set_permissions(&dest, perms).map_err(io_err(dest.display()))?;
    }
    Ok(())
}

/// Times `f`, then a `sync`.
fn timed(f: impl FnOnce() -> Result<(), String>) -> Result<Step, String> {
    sync();
    let started = Instant::now();
    f()?;
    let run = started.elapsed();
    let started = Instant::now();
    sync();
    Ok(Step {
        run,
        sync: started.elapsed(),
    })
}

fn keel_import(archive: &Path, layout: &Path) -> Result<(), String> {
    keel_image::archive::import_archive(archive, Some(TAG), layout, TAG)
        .map(drop)
        .map_err(|e| format!("import_archive {}: {e}", archive.display()))
}

fn keel_unpack(layout: &Path, store: &Path) -> Result<Vec<PathBuf>, String> {
    let image = keel_image::layout::ImageLayout::open_ref(layout, TAG)
        .map_err(|e| format!("{}: {e}", layout.display()))?;
    keel_image::layer_store::unpack_image(&image, store)
        .map_err(|e| format!("unpack_image into {}: {e}", store.display()))
}

fn skopeo_copy(opts: &Options, archive: &Path, layout: &Path) -> Result<(), String> {
    run_tool(
        Command::new(&opts.skopeo)
            .args(["--insecure-policy", "copy", "--quiet"])
            .arg(format!("oci-archive:{}:{TAG}", archive.display()))
            .arg(format!("oci:{}:{TAG}", layout.display()))
            .env("TMPDIR", tmp_dir(opts)),
    )
}

fn umoci_unpack(opts: &Options, layout: &Path, bundle: &Path, raw: bool) -> Result<(), String> {
    let mut cmd = Command::new(&opts.umoci);
    if raw {
        cmd.args(["raw", "unpack"]);
    } else {
        cmd.arg("unpack");
    }
    run_tool(
        cmd.arg("--image")
            .arg(format!("{}:{TAG}", layout.display()))
            .arg(bundle)
            .env("TMPDIR", tmp_dir(opts)),
    )
}

/// Builds the input, runs the rounds and the disk comparison.
pub fn run(opts: &Options) -> Result<Results, String> {
    let started = Instant::now();
    if !nix::unistd::geteuid().is_root() {
        return Err("the images benchmark runs as root (umoci unpack and Keel's unpack create device nodes and keep owners)".into());
    }
    for tool in [&opts.umoci, &opts.skopeo] {
        if Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .map_or(true, |s| !s.success())
        {
            return Err(format!(
                "{} is missing: install umoci and skopeo (scripts/install-deps does)",
                tool.display()
            ));
        }
    }
    std::fs::create_dir_all(tmp_dir(opts)).map_err(io_err(tmp_dir(opts).display()))?;
    let build_started = Instant::now();
    let (input, cached) = build_input(opts)?;
    let mut results = Results {
        build_seconds: (!cached).then(|| build_started.elapsed().as_secs()),
        ..Results::default()
    };
    eprintln!(
        "keel-bench: images: input {} ({} layers, {} files, {:.1} MB uncompressed, {:.1} MB gzip{})",
        input.archive.display(),
        input.layers,
        input.files,
        input.uncompressed as f64 / 1e6,
        input.compressed as f64 / 1e6,
        if cached { ", cached" } else { "" }
    );
    let runs = opts.work.join("runs");
    remove(&runs)?;
    let archive = input.archive.clone();
    // Round 0 is an unrecorded warm-up: it reads the archive into the page cache and
    // loads both tools' code.
    for round in 0..=opts.rounds {
        let dir = runs.join(format!("round-{round}"));
        std::fs::create_dir_all(&dir).map_err(io_err(dir.display()))?;
        let mut steps: Vec<(&'static str, Step)> = Vec::new();
        let keel = |steps: &mut Vec<(&'static str, Step)>| -> Result<(), String> {
            let layout = dir.join("keel-layout");
            let store = dir.join("keel-store");
            steps.push((KEEL_IMPORT, timed(|| keel_import(&archive, &layout))?));
            steps.push((
                KEEL_UNPACK,
                timed(|| keel_unpack(&layout, &store).map(drop))?,
            ));
            Ok(())
        };
        let baseline = |steps: &mut Vec<(&'static str, Step)>| -> Result<(), String> {
            let layout = dir.join("umoci-layout");
            steps.push((SKOPEO_COPY, timed(|| skopeo_copy(opts, &archive, &layout))?));
            steps.push((
                UMOCI_UNPACK,
                timed(|| umoci_unpack(opts, &layout, &dir.join("umoci-bundle"), false))?,
            ));
            steps.push((
                UMOCI_RAW_UNPACK,
                timed(|| umoci_unpack(opts, &layout, &dir.join("umoci-raw-rootfs"), true))?,
            ));
            Ok(())
        };
        if round % 2 == 0 {
            keel(&mut steps)?;
            baseline(&mut steps)?;
        } else {
            baseline(&mut steps)?;
            keel(&mut steps)?;
        }
        let mut line = if round == 0 {
            "keel-bench: images warm-up round:".to_string()
        } else {
            format!("keel-bench: images round {round}:")
        };
        for (name, step) in &steps {
            let _ = write!(
                line,
                " {name} {:.2} s (+sync {:.2} s);",
                step.run.as_secs_f64(),
                step.sync.as_secs_f64()
            );
        }
        eprintln!("{}", line.trim_end_matches(';'));
        if round > 0 {
            for (name, step) in steps {
                results.steps.entry(name).or_default().push(step);
            }
        }
        remove(&dir)?;
    }
    remove(&runs)?;
    sync();

    eprintln!(
        "keel-bench: images: disk use of {} containers",
        opts.containers
    );
    let disk = opts.work.join("disk");
    remove(&disk)?;
    let keel_layout = disk.join("keel-layout");
    let keel_store = disk.join("keel-store");
    let keel_containers = disk.join("keel-containers");
    keel_import(&archive, &keel_layout)?;
    let lowers = keel_unpack(&keel_layout, &keel_store)?;
    // What Keel's supervisor makes for each container: short links to the layers in the
    // store, and its own (empty) upper, work and mount-point directories.
    keel_image::layer_store::short_lowers(&keel_store, &lowers)
        .map_err(io_err("short layer links"))?;
    for i in 0..opts.containers {
        keel_supervisor::container::ContainerDirs::under(&keel_containers, &format!("c{i}"))
            .create()
            .map_err(io_err(keel_containers.display()))?;
    }
    let umoci_layout = disk.join("umoci-layout");
    let umoci_bundles = disk.join("umoci-bundles");
    skopeo_copy(opts, &archive, &umoci_layout)?;
    for i in 0..opts.containers {
        umoci_unpack(
            opts,
            &umoci_layout,
            &umoci_bundles.join(format!("c{i}")),
            false,
        )?;
    }
    sync();
    let measure = |paths: &[&Path]| disk_use(paths).map_err(io_err("disk use"));
    results.disk = vec![
        ("keel layout", measure(&[&keel_layout])?),
        ("keel store", measure(&[&keel_store])?),
        ("keel containers", measure(&[&keel_containers])?),
        (
            "keel total",
            measure(&[&keel_layout, &keel_store, &keel_containers])?,
        ),
        ("umoci layout", measure(&[&umoci_layout])?),
        ("umoci bundles", measure(&[&umoci_bundles])?),
        ("umoci total", measure(&[&umoci_layout, &umoci_bundles])?),
    ];
    // Cross-check against du itself.
    for (name, paths) in [
        (
            "keel total",
            vec![&keel_layout, &keel_store, &keel_containers],
        ),
        ("umoci total", vec![&umoci_layout, &umoci_bundles]),
    ] {
        let out = Command::new("du")
            .args(["-s", "-c", "--block-size=1"])
            .args(&paths)
            .output()
            .map_err(io_err("du"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let du_total = text
            .lines()
            .last()
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok());
        let ours = results
            .disk
            .iter()
            .find(|(n, _)| *n == name)
            .map(|d| d.1.bytes);
        eprintln!("keel-bench: images: {name}: {ours:?} bytes, du -s -c says {du_total:?}");
        if du_total.is_some() && du_total != ours {
            return Err(format!(
                "disk use of {name}: {ours:?} bytes, but du says {du_total:?}"
            ));
        }
    }
    remove(&disk)?;
    results.input = Some(input);
    results.seconds = started.elapsed().as_secs();
    Ok(results)
}

/// Seconds of each round's steps `names` added up (the round's own, or with each step's
/// trailing sync).
fn totals(r: &Results, names: &[&str], with_sync: bool) -> Vec<f64> {
    let Some(first) = r.steps.get(names[0]) else {
        return Vec::new();
    };
    (0..first.len())
        .map(|i| {
            names
                .iter()
                .map(|n| {
                    let s = r.steps[*n][i];
                    s.run.as_secs_f64() + if with_sync { s.sync.as_secs_f64() } else { 0.0 }
                })
                .sum()
        })
        .collect()
}

/// A row of the throughput table: title, Keel's steps, the baseline's steps, the
/// baseline's name, whether each step's trailing `sync` is counted.
type Row<'a> = (&'a str, &'a [&'a str], &'a [&'a str], &'a str, bool);

/// The markdown section of the report, between the images-results markers.
pub fn report(
    r: &Results,
    opts: &Options,
    command: &str,
    date: &str,
    machine: &str,
    versions: &str,
) -> String {
    let mut out = String::new();
    let w = &mut out;
    let Some(input) = &r.input else {
        return out;
    };
    let mb = |bytes: u64| bytes as f64 / 1e6;
    let _ = writeln!(w, "### Results ({date})\n");
    let _ = writeln!(
        w,
        "`{command}`. Machine: {machine}; {versions}. Image: {} gzip layers (umoci repack), \
         {} files and {} symlinks, **{:.1} MB uncompressed** (layer tars; {:.1} MB of file \
         content), {:.1} MB compressed, oci-archive {:.1} MB. N = {} rounds after one \
         warm-up round; whole run {} s{}.\n",
        input.layers,
        input.files,
        input.symlinks,
        mb(input.uncompressed),
        mb(input.content),
        mb(input.compressed),
        mb(input.archive_bytes),
        opts.rounds,
        r.seconds,
        r.build_seconds
            .map_or_else(String::new, |s| format!(" (building the input: {s} s)"))
    );
    let size = input.uncompressed as f64;
    let fmt = |s: &Summary| {
        format!(
            "**{:.2} s** ({:.2}–{:.2}), {:.0} MB/s",
            s.median,
            s.p10,
            s.p90,
            size / 1e6 / s.median
        )
    };
    let _ = writeln!(
        w,
        "Seconds: median (p10–p90) of N rounds, and MB/s of the uncompressed image at the \
         median. Ratio: Keel's throughput / the baseline's (= baseline time / Keel time); \
         target ≥ 1.5 for import + unpack.\n"
    );
    let _ = writeln!(
        w,
        "| what | Keel | baseline | **ratio** of the medians | median of per-round ratios (p10–p90) |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|");
    let rows: [Row; 6] = [
        (
            "**import + unpack**",
            &[KEEL_IMPORT, KEEL_UNPACK],
            &[SKOPEO_COPY, UMOCI_UNPACK],
            "`skopeo copy` + `umoci unpack`",
            false,
        ),
        (
            "import alone",
            &[KEEL_IMPORT],
            &[SKOPEO_COPY],
            "`skopeo copy oci-archive: oci:`",
            false,
        ),
        (
            "unpack alone",
            &[KEEL_UNPACK],
            &[UMOCI_UNPACK],
            "`umoci unpack`",
            false,
        ),
        (
            "unpack alone, vs umoci's bare layer extraction",
            &[KEEL_UNPACK],
            &[UMOCI_RAW_UNPACK],
            "`umoci raw unpack`",
            false,
        ),
        (
            "import + unpack, each step + `sync`",
            &[KEEL_IMPORT, KEEL_UNPACK],
            &[SKOPEO_COPY, UMOCI_UNPACK],
            "`skopeo copy` + `umoci unpack`",
            true,
        ),
        (
            "unpack alone + `sync`",
            &[KEEL_UNPACK],
            &[UMOCI_UNPACK],
            "`umoci unpack`",
            true,
        ),
    ];
    for (title, keel, base, base_name, with_sync) in rows {
        let k = totals(r, keel, with_sync);
        let b = totals(r, base, with_sync);
        let (Some(ks), Some(bs)) = (stats::summarize(&k), stats::summarize(&b)) else {
            let _ = writeln!(w, "| {title} | – | – | – | – |");
            continue;
        };
        let per_round: Vec<f64> = k.iter().zip(&b).map(|(k, b)| b / k).collect();
        let pr = stats::summarize(&per_round).expect("as many as k");
        let keel_name = if keel.len() == 2 {
            "`import_archive` + `unpack_image`"
        } else if keel[0] == KEEL_IMPORT {
            "`import_archive`"
        } else {
            "`unpack_image`"
        };
        let _ = writeln!(
            w,
            "| {title} | {keel_name}: {} | {base_name}: {} | **{:.2}** | {:.2} ({:.2}–{:.2}) |",
            fmt(&ks),
            fmt(&bs),
            bs.median / ks.median,
            pr.median,
            pr.p10,
            pr.p90
        );
    }
    let _ = writeln!(w);
    let disk = |name: &str| {
        r.disk
            .iter()
            .find(|(n, _)| *n == name)
            .map(|d| d.1)
            .unwrap_or_default()
    };
    let n = opts.containers;
    let _ = writeln!(
        w,
        "**Disk used by {n} containers of the image** (allocated bytes, as `du -s \
         --block-size=1` counts them; apparent size and inodes beside):\n"
    );
    let _ = writeln!(w, "| | Keel | umoci (one bundle per container) |");
    let _ = writeln!(w, "|---|---|---|");
    let cell = |d: DiskUse| {
        format!(
            "{} ({} bytes; apparent {}, {} inodes)",
            human(d.bytes),
            d.bytes,
            human(d.apparent),
            d.inodes
        )
    };
    let _ = writeln!(
        w,
        "| the OCI layout (compressed blobs) | {} | {} |",
        cell(disk("keel layout")),
        cell(disk("umoci layout"))
    );
    let _ = writeln!(
        w,
        "| unpacked | layer store, once: {} | {n} bundles: {} |",
        cell(disk("keel store")),
        cell(disk("umoci bundles"))
    );
    let _ = writeln!(
        w,
        "| per container | {n} × empty upper/work/rootfs dirs: {} | – |",
        cell(disk("keel containers"))
    );
    let kt = disk("keel total");
    let ut = disk("umoci total");
    let _ = writeln!(
        w,
        "| **total** | **{:.1} MB** | **{:.1} MB** |",
        mb(kt.bytes),
        mb(ut.bytes)
    );
    let unpacked_keel = disk("keel store").bytes + disk("keel containers").bytes;
    let unpacked_umoci = disk("umoci bundles").bytes;
    let _ = writeln!(
        w,
        "\numoci / Keel: **{:.1}×** in total, {:.1}× for the unpacked trees alone; each \
         further container costs Keel {} and umoci {}.\n",
        ut.bytes as f64 / kt.bytes.max(1) as f64,
        unpacked_umoci as f64 / unpacked_keel.max(1) as f64,
        human(disk("keel containers").bytes / n.max(1) as u64),
        human(unpacked_umoci / n.max(1) as u64)
    );
    out
}

/// Decimal megabytes, or kilobytes below one megabyte.
fn human(bytes: u64) -> String {
    if bytes >= 1_000_000 {
        format!("{:.1} MB", bytes as f64 / 1e6)
    } else {
        format!("{:.1} kB", bytes as f64 / 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, size: u64) -> Entry {
        Entry {
            source: PathBuf::from("/x").join(name),
            dest: PathBuf::from(name),
            size,
            symlink: false,
        }
    }

    #[test]
    fn layers_split_by_size_within_the_budget() {
        let c: Vec<Entry> = [10, 10, 10, 10, 50, 10, 10, 0]
            .iter()
            .enumerate()
            .map(|(i, &s)| entry(&format!("f{i}"), s))
            .collect();
        let groups = select_layers(&c, 60, 3);
        let names: Vec<Vec<&str>> = groups
            .iter()
            .map(|g| g.iter().map(|e| e.dest.to_str().unwrap()).collect())
            .collect();
        // 50 does not fit the budget any more; 20 bytes a layer.
        assert_eq!(
            names,
            [vec!["f0", "f1"], vec!["f2", "f3"], vec!["f5", "f6", "f7"]]
        );
        assert_eq!(select_layers(&c, 1000, 1).len(), 1);
        assert_eq!(select_layers(&[], 10, 4).len(), 1);
    }

    #[test]
    fn walk_is_sorted_and_disk_use_counts_hard_links_once() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("b")).unwrap();
        std::fs::write(root.join("b/z"), vec![1u8; 10000]).unwrap();
        std::fs::write(root.join("a"), b"x").unwrap();
        std::os::unix::fs::symlink("a", root.join("c")).unwrap();
        std::fs::hard_link(root.join("b/z"), root.join("d")).unwrap();
        let mut out = Vec::new();
        walk(root, Path::new("p"), &mut out);
        let names: Vec<_> = out.iter().map(|e| e.dest.to_str().unwrap()).collect();
        assert_eq!(names, ["p/a", "p/b/z", "p/c", "p/d"]);
        assert!(out[2].symlink && out[2].size == 0);
        let once = disk_use(&[root]).unwrap();
        // root, a, b, b/z (= d), c.
        assert_eq!(once.inodes, 5);
        assert!(once.bytes >= 10000);
        // The same trees twice are still counted once.
        assert_eq!(disk_use(&[root, &root.join("b")]).unwrap(), once);
    }
}
