//! Hand-written cgroup v2: a handful of files under /sys/fs/cgroup.
//!
//! Layout: PID 1 lives in the leaf `init` (the root may not delegate controllers while a
//! non-root cgroup holds processes, so nothing but kernel threads stays in the root), and
//! every container gets `keel/<name>`. Controllers are enabled at the root and in `keel`.

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

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
    Ok(Cgroup { path: keel })
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

/// Resource limits written into a container's cgroup before its process starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    pub memory_max: Option<u64>,
    pub pids_max: Option<u64>,
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
    /// written as "max" so a reused cgroup never keeps a stale value.
    pub fn child(&self, name: &str, limits: &Limits) -> io::Result<Cgroup> {
        let cgroup = Cgroup {
            path: self.path.join(name),
        };
        create_dir(&cgroup.path)?;
        cgroup.write("memory.max", &limit_value(limits.memory_max))?;
        cgroup.write("pids.max", &limit_value(limits.pids_max))?;
        Ok(cgroup)
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

fn limit_value(limit: Option<u64>) -> String {
    limit.map_or_else(|| "max".to_string(), |n| n.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

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
                &Limits {
                    memory_max: Some(64 << 20),
                    pids_max: None,
                },
            )
            .unwrap();
        assert_eq!(child.read("memory.max").unwrap(), "67108864");
        assert_eq!(child.read("pids.max").unwrap(), "max");
        // Reuse keeps the directory and rewrites every limit.
        let again = parent
            .child(
                "web",
                &Limits {
                    memory_max: None,
                    pids_max: Some(10),
                },
            )
            .unwrap();
        assert_eq!(again.read("memory.max").unwrap(), "max");
        assert_eq!(again.read("pids.max").unwrap(), "10");
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
