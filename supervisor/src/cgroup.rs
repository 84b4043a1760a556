//! Hand-written cgroup v2: a handful of files under /sys/fs/cgroup.
//!
//! Layout: PID 1 lives in the leaf `init` (the root may not delegate controllers while a
//! non-root cgroup holds processes, so nothing but kernel threads stays in the root), and
//! every container gets `keel/<name>`. Controllers are enabled at the root and in `keel`.

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use keel_config::{IoLimits, Resources};
use rustix::fs::{Mode, OFlags};

/// Where Keel mounts the unified hierarchy.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Controllers Keel delegates to containers when the kernel has them.
const WANTED_CONTROLLERS: &[&str] = &["cpu", "io", "memory", "pids"];

/// Moves the calling process (PID 1) into the `init` leaf and delegates controllers to
/// `keel/`, under which every container gets its own cgroup.
pub fn setup_hierarchy(root: &Path) -> io::Result<Cgroup> {
    let init = root.join("init");
    create_dir(&init)?;
    fs::write(init.join("cgroup.procs"), std::process::id().to_string())?;
    let available = fs::read_to_string(root.join("cgroup.controllers"))?;
    let enable = controllers_to_enable(&available);
    fs::write(root.join("cgroup.subtree_control"), &enable)?;
    let keel = root.join("keel");
    create_dir(&keel)?;
    fs::write(keel.join("cgroup.subtree_control"), &enable)?;
    // No container, nor all of them together, can starve PID 1: its memory is protected
    // from reclaim, and the containers together leave it tasks to fork with.
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    if let Some(min) = pid1_memory_min(&meminfo) {
        write_protection(&init.join("memory.min"), &min.to_string());
    }
    // Image unpacking runs in a process of its own in a cgroup of its own, so that a hostile
    // layer's decompressor cannot take the machine's memory (see UNPACK_CGROUP).
    let unpack = root.join(UNPACK_CGROUP);
    create_dir(&unpack)?;
    if let Some(max) = unpack_memory_max(&meminfo) {
        write_protection(&unpack.join("memory.max"), &max.to_string());
    }
    write_protection(&unpack.join("memory.swap.max"), "0");
    write_protection(&unpack.join("pids.max"), "64");
    let task_limits = ["/proc/sys/kernel/pid_max", "/proc/sys/kernel/threads-max"].map(|f| {
        fs::read_to_string(f)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
    });
    if let Some(max) = containers_pids_max(task_limits) {
        write_protection(&keel.join("pids.max"), &max.to_string());
    }
    Ok(Cgroup { path: keel })
}

/// The cgroup (under the root) the image unpacker runs in: `keel-init --unpack` moves itself
/// there before it opens a layer.
pub const UNPACK_CGROUP: &str = "keel-unpack";

/// The unpacker's memory: 1 GiB, or a quarter of a smaller machine.
const UNPACK_MEMORY_MAX: u64 = 1 << 30;

fn unpack_memory_max(meminfo: &str) -> Option<u64> {
    let total = mem_total(meminfo)?;
    Some(UNPACK_MEMORY_MAX.min(total / 4))
}

/// MemTotal in bytes.
fn mem_total(meminfo: &str) -> Option<u64> {
    let kb: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb.saturating_mul(1024))
}

/// Memory PID 1 keeps under pressure: 64 MiB, or an eighth of a smaller machine.
const PID1_MEMORY_MIN: u64 = 64 << 20;
/// Tasks the containers together leave to PID 1 and its helpers.
const PID1_TASK_RESERVE: u64 = 512;

fn pid1_memory_min(meminfo: &str) -> Option<u64> {
    Some(PID1_MEMORY_MIN.min(mem_total(meminfo)? / 8))
}

/// The `pids.max` of all containers together: the kernel's task limit less PID 1's reserve.
fn containers_pids_max([pid_max, threads_max]: [Option<u64>; 2]) -> Option<u64> {
    let limit = match (pid_max, threads_max) {
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => return None,
    };
    Some(
        limit
            .saturating_sub(PID1_TASK_RESERVE)
            .max(PID1_TASK_RESERVE),
    )
}

/// A protection missing (a kernel without the memory controller) is logged, not fatal.
fn write_protection(file: &Path, value: &str) {
    if let Err(e) = fs::write(file, value) {
        log::warn!("writing {value} to {}: {e}", file.display());
    }
}

/// "+cpu +memory ..." for the wanted controllers the kernel offers.
fn controllers_to_enable(available: &str) -> String {
    let available: Vec<&str> = available.split_whitespace().collect();
    WANTED_CONTROLLERS
        .iter()
        .filter(|c| available.contains(c))
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn create_dir(path: &Path) -> io::Result<()> {
    match fs::create_dir(path) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

/// One cgroup directory.
#[derive(Debug, Clone)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    pub fn at(path: impl Into<PathBuf>) -> Cgroup {
        Cgroup { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates (or reuses) the child cgroup `name` and applies `limits`; an unset limit is
    /// written as its default so a reused cgroup never keeps a stale value.
    pub fn child(&self, name: &str, limits: &Resources) -> io::Result<Cgroup> {
        let cgroup = Cgroup {
            path: self.path.join(name),
        };
        create_dir(&cgroup.path)?;
        cgroup.write("memory.max", &limit_value(limits.memory_max))?;
        cgroup.write("memory.high", &limit_value(limits.memory_high))?;
        match limits.memory_swap_max {
            Some(swap) => cgroup.write("memory.swap.max", &swap.to_string())?,
            // Without swap accounting the file does not exist; nothing to reset then.
            None => cgroup.write_if_present("memory.swap.max", "max")?,
        }
        cgroup.write("pids.max", &limit_value(limits.pids_max))?;
        let cpu_max = limits.cpu_max.map_or_else(
            || "max 100000".to_string(),
            |(quota, period)| format!("{quota} {period}"),
        );
        cgroup.write("cpu.max", &cpu_max)?;
        cgroup.write("cpu.weight", &limits.cpu_weight.unwrap_or(100).to_string())?;
        if let Some(io) = &limits.io {
            let device = device_number(&io.device)?;
            let (max, weight) = io_lines(&device, io);
            cgroup.write("io.max", &max)?;
            if let Some(weight) = weight {
                cgroup.write("io.weight", &weight)?;
            }
        }
        Ok(cgroup)
    }

    fn write_if_present(&self, file: &str, value: &str) -> io::Result<()> {
        use std::io::Write;
        let open = fs::OpenOptions::new()
            .write(true)
            .open(self.path.join(file));
        match open.and_then(|mut f| f.write_all(value.as_bytes())) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    /// A number from a flat keyed file such as memory.events (`oom_kill 2`) or cpu.stat.
    pub fn keyed(&self, file: &str, key: &str) -> Option<u64> {
        keyed_value(&self.read(file).ok()?, key)
    }

    /// A single-number file such as memory.current.
    pub fn number(&self, file: &str) -> Option<u64> {
        self.read(file).ok()?.trim().parse().ok()
    }

    /// An O_PATH-free directory fd, as clone3(CLONE_INTO_CGROUP) wants it.
    pub fn open_dir(&self) -> io::Result<OwnedFd> {
        Ok(rustix::fs::open(
            &self.path,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?)
    }

    pub fn write(&self, file: &str, value: &str) -> io::Result<()> {
        fs::write(self.path.join(file), value).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "writing {value:?} to {}: {e}",
                    self.path.join(file).display()
                ),
            )
        })
    }

    pub fn read(&self, file: &str) -> io::Result<String> {
        fs::read_to_string(self.path.join(file))
    }

    /// Kills every process in the cgroup at once (cgroup.kill, Linux 5.14).
    pub fn kill_all(&self) -> io::Result<()> {
        self.write("cgroup.kill", "1")
    }

    /// True when no process is left in the cgroup or below it.
    pub fn is_empty(&self) -> bool {
        self.read("cgroup.events")
            .map(|events| events.lines().any(|l| l == "populated 0"))
            .unwrap_or(true)
    }

    /// Removes the cgroup; fails with EBUSY while processes remain.
    pub fn remove(&self) -> io::Result<()> {
        match fs::remove_dir(&self.path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}

/// "MAJOR:MINOR" of a block device node.
fn device_number(path: &str) -> io::Result<String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = fs::metadata(path)
        .map_err(|e| io::Error::new(e.kind(), format!("io device {path}: {e}")))?;
    if !meta.file_type().is_block_device() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("io device {path} is not a block device"),
        ));
    }
    let rdev = meta.rdev();
    Ok(format!("{}:{}", libc::major(rdev), libc::minor(rdev)))
}

/// The io.max line and the io.weight line (if a weight is set) for one device.
fn io_lines(device: &str, io: &IoLimits) -> (String, Option<String>) {
    let field = |v: Option<u64>| v.map_or_else(|| "max".to_string(), |n| n.to_string());
    let max = format!(
        "{device} rbps={} wbps={} riops={} wiops={}",
        field(io.read_bps),
        field(io.write_bps),
        field(io.read_iops),
        field(io.write_iops)
    );
    (max, io.weight.map(|w| format!("{device} {w}")))
}

fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

fn limit_value(limit: Option<u64>) -> String {
    limit.map_or_else(|| "max".to_string(), |n| n.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid1_keeps_memory_and_tasks() {
        assert_eq!(
            pid1_memory_min("MemTotal:        2048000 kB\nMemFree: 1 kB\n"),
            Some(64 << 20)
        );
        assert_eq!(
            pid1_memory_min("MemTotal:  262144 kB\n"),
            Some(32 << 20),
            "an eighth of a small machine"
        );
        assert_eq!(pid1_memory_min("nothing"), None);
        assert_eq!(
            unpack_memory_max("MemTotal: 2048000 kB\n"),
            Some(512_000 * 1024)
        );
        assert_eq!(unpack_memory_max("MemTotal: 24000000 kB\n"), Some(1 << 30));
        assert_eq!(containers_pids_max([Some(32768), Some(15000)]), Some(14488));
        assert_eq!(containers_pids_max([Some(600), None]), Some(512));
        assert_eq!(containers_pids_max([None, None]), None);
    }

    #[test]
    fn only_available_controllers_are_enabled() {
        assert_eq!(
            controllers_to_enable("cpuset cpu io memory hugetlb pids rdma misc\n"),
            "+cpu +io +memory +pids"
        );
        assert_eq!(controllers_to_enable("memory pids"), "+memory +pids");
        assert_eq!(controllers_to_enable(""), "");
    }

    #[test]
    fn limits_are_written_and_unset_ones_reset_to_max() {
        let dir = tempfile::tempdir().unwrap();
        let parent = Cgroup::at(dir.path());
        let child = parent
            .child(
                "web",
                &Resources {
                    memory_max: Some(64 << 20),
                    cpu_max: Some((150_000, 100_000)),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(child.read("memory.max").unwrap(), "67108864");
        assert_eq!(child.read("pids.max").unwrap(), "max");
        // Reuse keeps the directory and rewrites every limit.
        assert_eq!(child.read("cpu.max").unwrap(), "150000 100000");
        assert_eq!(child.read("cpu.weight").unwrap(), "100");
        assert_eq!(child.read("memory.high").unwrap(), "max");
        assert!(
            !dir.path().join("web/memory.swap.max").exists(),
            "no swap accounting, nothing written"
        );
        let again = parent
            .child(
                "web",
                &Resources {
                    pids_max: Some(10),
                    cpu_weight: Some(50),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(again.read("cpu.max").unwrap(), "max 100000");
        assert_eq!(again.read("cpu.weight").unwrap(), "50");
        assert_eq!(again.read("memory.max").unwrap(), "max");
        assert_eq!(again.read("pids.max").unwrap(), "10");
    }

    #[test]
    fn io_limits_name_the_device() {
        let io = IoLimits {
            device: "/dev/vda".into(),
            read_bps: Some(1 << 20),
            write_iops: Some(100),
            weight: Some(200),
            ..Default::default()
        };
        let (max, weight) = io_lines("254:0", &io);
        assert_eq!(max, "254:0 rbps=1048576 wbps=max riops=max wiops=100");
        assert_eq!(weight.as_deref(), Some("254:0 200"));
        assert!(
            device_number("/dev/null")
                .unwrap_err()
                .to_string()
                .contains("not a block device")
        );
    }

    #[test]
    fn keyed_files_are_parsed() {
        let events = "low 0\nhigh 3\nmax 10\noom 2\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(keyed_value(events, "oom_kill"), Some(1));
        assert_eq!(keyed_value(events, "oom"), Some(2));
        assert_eq!(keyed_value(events, "missing"), None);
    }

    #[test]
    fn populated_state_is_read_from_cgroup_events() {
        let dir = tempfile::tempdir().unwrap();
        let cg = Cgroup::at(dir.path());
        fs::write(dir.path().join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        assert!(!cg.is_empty());
        fs::write(dir.path().join("cgroup.events"), "populated 0\nfrozen 0\n").unwrap();
        assert!(cg.is_empty());
    }
}
