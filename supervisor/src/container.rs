//! From a container definition and its image to a [`SetupPlan`]: pure logic, testable without root.

use std::io;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use keel_config::{Container, Isolation, NetworkMode};

use crate::caps::CapSet;
use crate::seccomp::Program;
use crate::spawn::{
    DEFAULT_PATH, IdMap, Namespaces, SetupPlan, SetupStep, cstring, exec_candidates, path_cstring,
};
use crate::user::ResolvedUser;

/// The parts of an OCI image configuration that decide how the process starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageProcess {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub workdir: Option<String>,
    /// The image's `User`, used unless the host file names one.
    pub user: Option<String>,
    /// The image's StopSignal, used unless the host file names one.
    pub stop_signal: Option<i32>,
    /// The image's Volumes: paths that get a volume of their own.
    pub volumes: Vec<String>,
    /// The image's ExposedPorts, as `80/tcp`.
    pub exposed_ports: Vec<String>,
}

impl ImageProcess {
    pub fn from_oci(config: &oci_spec::image::ImageConfiguration) -> ImageProcess {
        let Some(c) = config.config() else {
            return ImageProcess::default();
        };
        ImageProcess {
            entrypoint: c.entrypoint().clone().unwrap_or_default(),
            cmd: c.cmd().clone().unwrap_or_default(),
            env: c.env().clone().unwrap_or_default(),
            workdir: c.working_dir().clone().filter(|w| !w.is_empty()),
            user: c.user().clone().filter(|u| !u.is_empty()),
            stop_signal: c
                .stop_signal()
                .as_deref()
                .and_then(keel_config::parse_signal),
            volumes: c.volumes().clone().unwrap_or_default(),
            exposed_ports: c.exposed_ports().clone().unwrap_or_default(),
        }
    }
}

/// The process a container runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSpec {
    pub argv: Vec<String>,
    /// Who runs it: the host file's `user`, else the image's `User`, else root.
    pub user: Option<String>,
    /// Image variables first, overridden by name from the host file.
    pub env: Environment,
    pub workdir: String,
}

/// A process's environment, kept as a map until the plan is built: a name is set once, in
/// the order names were first set, and setting it again replaces its value in place
/// (Docker's rules for image, host-file and exec variables).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Environment {
    /// `NAME=value`, one per name.
    entries: Vec<String>,
}

impl Environment {
    /// Sets `name` to `value`, replacing an earlier value in its place.
    pub fn set(&mut self, name: &str, value: &str) {
        let entry = format!("{name}={value}");
        match self.position(name) {
            Some(i) => self.entries[i] = entry,
            None => self.entries.push(entry),
        }
    }

    /// Sets `name` only if it is not set.
    pub fn set_default(&mut self, name: &str, value: &str) {
        if self.get(name).is_none() {
            self.set(name, value);
        }
    }

    /// Sets a `NAME=value` entry; an entry without `=` is ignored.
    pub fn set_entry(&mut self, entry: &str) {
        if let Some((name, value)) = entry.split_once('=') {
            self.set(name, value);
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.position(name)
            .and_then(|i| self.entries[i].split_once('='))
            .map(|(_, value)| value)
    }

    fn position(&self, name: &str) -> Option<usize> {
        self.entries
            .iter()
            .position(|e| e.split_once('=').is_some_and(|(n, _)| n == name))
    }
}

impl std::ops::Deref for Environment {
    type Target = [String];

    /// The `NAME=value` entries, in order: what execve gets.
    fn deref(&self) -> &[String] {
        &self.entries
    }
}

impl<const N: usize> PartialEq<[&str; N]> for Environment {
    fn eq(&self, other: &[&str; N]) -> bool {
        self.entries == *other
    }
}

/// Docker's rules: a host-file `entrypoint` replaces the image's and drops the image's Cmd;
/// a host-file `command` replaces the Cmd; argv = entrypoint + cmd.
pub fn resolve_process(
    name: &str,
    image: &ImageProcess,
    container: &Container,
) -> Result<ProcessSpec, crate::setup_error::SetupError> {
    let (entrypoint, cmd) = match (&container.entrypoint, &container.command) {
        (Some(ep), Some(cmd)) => (ep.clone(), cmd.clone()),
        (Some(ep), None) => (ep.clone(), Vec::new()),
        (None, Some(cmd)) => (image.entrypoint.clone(), cmd.clone()),
        (None, None) => (image.entrypoint.clone(), image.cmd.clone()),
    };
    let argv: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if argv.is_empty() {
        return Err(crate::setup_error::SetupError::NothingToRun);
    }

    let mut env = Environment::default();
    for var in &image.env {
        env.set_entry(var);
    }
    for (k, v) in &container.env {
        env.set(k, v);
    }
    env.set_default("PATH", DEFAULT_PATH);
    env.set_default(
        "HOSTNAME",
        container.isolation.hostname.as_deref().unwrap_or(name),
    );

    let workdir = container
        .workdir
        .clone()
        .or_else(|| image.workdir.clone())
        .unwrap_or_else(|| "/".into());
    // The image's values are hostile input; the host file's were checked when it was read,
    // and are checked again here like any other.
    use keel_config::container_path::{PathUse, check};
    for (what, path, usage) in [
        ("working directory", &workdir, PathUse::WorkingDir),
        ("program", &argv[0], PathUse::Program),
    ] {
        check(path, usage).map_err(|problem| crate::setup_error::SetupError::UnsafePath {
            what,
            path: path.clone(),
            problem,
        })?;
    }
    Ok(ProcessSpec {
        argv,
        user: container
            .isolation
            .user
            .clone()
            .or_else(|| image.user.clone()),
        env,
        workdir,
    })
}

/// Where a container's files live on the host.
#[derive(Debug, Clone)]
pub struct ContainerDirs {
    pub upper: PathBuf,
    pub work: PathBuf,
    pub rootfs: PathBuf,
    /// The directory the overlay is mounted from: relative `lowerdir`s resolve against it
    /// (see [`keel_image::layer_store::short_lowers`]).
    pub lower_root: PathBuf,
}

impl ContainerDirs {
    pub fn under(state_dir: &Path, name: &str) -> ContainerDirs {
        let base = state_dir.join(name);
        ContainerDirs {
            upper: base.join("upper"),
            work: base.join("work"),
            rootfs: base.join("rootfs"),
            lower_root: PathBuf::from("/"),
        }
    }

    pub fn create(&self) -> io::Result<()> {
        for dir in [&self.upper, &self.work, &self.rootfs] {
            std::fs::create_dir_all(dir)?;
        }
        Ok(())
    }
}

/// Overlay options; `lower_bottom_first` comes from the image (bottom layer first) and
/// overlayfs wants the topmost lower first.
pub fn overlay_options(lower_bottom_first: &[PathBuf], dirs: &ContainerDirs) -> String {
    let lower: Vec<String> = lower_bottom_first
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect();
    format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        dirs.upper.display(),
        dirs.work.display()
    )
}

/// A volume or tmpfs as the child mounts it: the host side is resolved by the parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtraMount {
    Bind {
        source: PathBuf,
        target: String,
        readonly: bool,
        /// Set-user-ID works on it (the host file's `:suid`).
        suid: bool,
        /// The source mount's own MS_NOEXEC/MS_RDONLY/MS_NOSUID: a remount must restate them
        /// (inside a user namespace the kernel refuses to clear a flag of the source's).
        source_flags: libc::c_ulong,
    },
    Tmpfs {
        target: String,
        size: u64,
    },
    /// A single file (a socket) bound onto an empty file Keel creates in the container's
    /// own /dev, so no image path is involved.
    DevFile {
        source: PathBuf,
        target: String,
    },
    /// A file Keel keeps current (/etc/hosts, /etc/resolv.conf) bound read-only over the
    /// image's, which is created empty first when the image has none.
    EtcFile {
        source: PathBuf,
        target: String,
    },
}

impl ExtraMount {
    pub fn target(&self) -> &str {
        match self {
            ExtraMount::Bind { target, .. }
            | ExtraMount::Tmpfs { target, .. }
            | ExtraMount::DevFile { target, .. }
            | ExtraMount::EtcFile { target, .. } => target,
        }
    }
}

/// Everything that shapes the setup plan besides the process itself.
pub struct Security {
    pub isolation: Isolation,
    pub user: ResolvedUser,
    pub capabilities: CapSet,
    pub last_cap: u32,
    /// None for privileged containers.
    pub seccomp: Option<Arc<Program>>,
    /// Whether the kernel has time namespaces.
    pub time_namespace: bool,
    pub mounts: Vec<ExtraMount>,
    /// A user namespace of its own. Its overlay is then mounted by the parent (PID 1) before
    /// clone3: mounted from inside, overlayfs could not use its trusted.* xattrs.
    pub userns: Option<IdMap>,
    /// What is bound at /dev/init for `init = true`: the sealed copy of PID 1's binary
    /// (crate::sealed_reaper).
    pub reaper: Option<PathBuf>,
}

/// Docker's masked paths: kernel information and controls a container has no business with.
pub const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/sys/devices/virtual/powercap",
    "/sys/firmware",
];

/// Docker's read-only paths.
pub const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The device nodes every container gets, bound from the host's devtmpfs.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// Where Keel's reaping init appears inside a container with `init = true`.
pub const CONTAINER_INIT: &str = "/dev/init";

/// The argv that runs `process` under Keel's reaping init.
pub fn wrap_with_init(argv: &[String]) -> Vec<String> {
    let mut wrapped = vec![
        CONTAINER_INIT.to_string(),
        "--reap".to_string(),
        "--".to_string(),
    ];
    wrapped.extend(argv.iter().cloned());
    wrapped
}

/// The namespaces a container has of its own: decided here for its start, and joined by
/// its execs.
pub fn namespaces_of(iso: &Isolation, time_namespace: bool) -> Namespaces {
    Namespaces {
        mount: true,
        pid: !iso.host_pid,
        net: iso.network.is_own(),
        time: time_namespace,
    }
}

/// A container's open-files limit when its host file sets none: Docker's (1048576 soft and
/// hard, from containerd's `LimitNOFILE=infinity`), which images such as redis expect when
/// they raise their own. Never above PID 1's, which is raised to `fs.nr_open` (1048576 by
/// default) at boot, so the setrlimit needs no privilege even in a user namespace.
const DEFAULT_NOFILE: (u64, u64) = (1 << 20, 1 << 20);

/// The container's resource limits, for its main process and its execs alike.
fn rlimit_steps(iso: &Isolation) -> io::Result<Vec<SetupStep>> {
    let mut steps = Vec::new();
    if !iso.rlimits.contains_key("nofile") {
        steps.push(SetupStep::Rlimit {
            resource: libc::RLIMIT_NOFILE as libc::c_int,
            soft: DEFAULT_NOFILE.0,
            hard: DEFAULT_NOFILE.1,
        });
    }
    for (limit, value) in &iso.rlimits {
        let resource = rlimit_resource(limit).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unknown rlimit {limit}"),
            )
        })?;
        steps.push(SetupStep::Rlimit {
            resource,
            soft: value.soft,
            hard: value.hard,
        });
    }
    Ok(steps)
}

/// What of the host's /dev a privileged container's /dev copies: everything but what every
/// container's /dev gets of its own (devpts and its ptmx, shm, mqueue, the fd links).
const OWN_DEV_ENTRIES: &[&str] = &[
    "pts", "shm", "mqueue", "ptmx", "fd", "stdin", "stdout", "stderr",
];

/// Steps that recreate the device tree under `host_dev` (directories, device nodes with
/// their modes and owners, symlinks) in the container's /dev, read now in PID 1: the plan
/// runs in the child, which may not allocate.
fn host_device_steps(host_dev: &Path, root: &Path) -> io::Result<Vec<SetupStep>> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut steps = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(host_dev.join(&relative))?
            .filter_map(Result::ok)
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let name = entry.file_name();
            if relative.as_os_str().is_empty()
                && OWN_DEV_ENTRIES
                    .iter()
                    .any(|own| name == std::ffi::OsStr::new(own))
            {
                continue;
            }
            let Ok(meta) = entry.metadata() else {
                continue; // gone since read_dir
            };
            let rel = relative.join(&name);
            let inside = path_cstring(&root.join("dev").join(&rel))?;
            let kind = meta.file_type();
            if kind.is_dir() {
                steps.push(SetupStep::Mkdir {
                    path: inside,
                    mode: meta.mode() & 0o7777,
                });
                pending.push(rel);
            } else if kind.is_char_device() || kind.is_block_device() {
                steps.push(SetupStep::DeviceNode {
                    path: inside,
                    mode: meta.mode(),
                    rdev: meta.rdev(),
                    uid: meta.uid(),
                    gid: meta.gid(),
                });
            } else if kind.is_symlink() {
                let target = std::fs::read_link(entry.path())?;
                steps.push(SetupStep::Symlink {
                    target: path_cstring(&target)?,
                    link: inside,
                });
            }
            // Sockets and fifos in the host's /dev belong to host services, not to copies.
        }
    }
    Ok(steps)
}

/// setrlimit resource numbers by the names the host file uses.
fn rlimit_resource(name: &str) -> Option<libc::c_int> {
    Some(match name {
        "as" => libc::RLIMIT_AS,
        "core" => libc::RLIMIT_CORE,
        "cpu" => libc::RLIMIT_CPU,
        "data" => libc::RLIMIT_DATA,
        "fsize" => libc::RLIMIT_FSIZE,
        "locks" => libc::RLIMIT_LOCKS,
        "memlock" => libc::RLIMIT_MEMLOCK,
        "msgqueue" => libc::RLIMIT_MSGQUEUE,
        "nice" => libc::RLIMIT_NICE,
        "nofile" => libc::RLIMIT_NOFILE,
        "nproc" => libc::RLIMIT_NPROC,
        "rss" => libc::RLIMIT_RSS,
        "rtprio" => libc::RLIMIT_RTPRIO,
        "rttime" => libc::RLIMIT_RTTIME,
        "sigpending" => libc::RLIMIT_SIGPENDING,
        "stack" => libc::RLIMIT_STACK,
        _ => return None,
    } as libc::c_int)
}

/// Every directory from the root down to `target`, for mkdir -p inside the rootfs.
fn ancestors_and_self(target: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut path = String::new();
    for component in target.split('/').filter(|c| !c.is_empty()) {
        path.push('/');
        path.push_str(component);
        out.push(path.clone());
    }
    out
}

/// Refuses a mount target that passes through a symlink in the container's files: before
/// pivot_root an absolute symlink would resolve on the host and mount over host paths.
/// `layers_top_first` are the overlay upper then the lowers, topmost first.
pub fn check_mount_target(layers_top_first: &[PathBuf], target: &str) -> Result<(), String> {
    for path in ancestors_and_self(target) {
        let rel = path.trim_start_matches('/');
        for layer in layers_top_first {
            match std::fs::symlink_metadata(layer.join(rel)) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    return Err(format!(
                        "mount target {target}: {path} is a symbolic link in the container's files"
                    ));
                }
                // The topmost layer that has the path decides.
                Ok(_) => break,
                Err(_) => continue,
            }
        }
    }
    Ok(())
}

/// The tail every process started in a container shares (its main process and every exec):
/// working directory, then runc's order of privilege drops.
fn privilege_steps(workdir: &str, security: &Security) -> io::Result<Vec<SetupStep>> {
    let iso = &security.isolation;
    let mut steps = vec![
        SetupStep::Chdir {
            path: cstring(workdir)?,
        },
        SetupStep::VerifyCwd,
    ];
    if iso.no_new_privileges {
        steps.push(SetupStep::NoNewPrivs);
    }
    let mut seccomp = security
        .seccomp
        .as_ref()
        .map(|p| SetupStep::Seccomp(p.clone()))
        .into_iter();
    if !iso.no_new_privileges {
        // Without no_new_privs, installing a filter needs CAP_SYS_ADMIN: do it while we have it.
        steps.extend(seccomp.by_ref());
    }
    steps.push(SetupStep::DropBounding {
        keep: security.capabilities,
        last_cap: security.last_cap,
    });
    let user = &security.user;
    steps.push(SetupStep::KeepCaps(true));
    steps.push(SetupStep::SwitchUser {
        uid: user.uid,
        gid: user.gid,
        groups: user.additional_gids.clone(),
    });
    steps.push(SetupStep::KeepCaps(false));
    steps.push(SetupStep::Capabilities(security.capabilities));
    // With no_new_privs the filter goes last, so it need not allow the setup calls above.
    steps.extend(seccomp);
    Ok(steps)
}

/// A process started inside a running container (`keel exec`, exec health checks): it joins
/// the container's namespaces through `container_pidfd`, forks so that it is inside the
/// pid namespace too, and drops privileges exactly like the container's main process.
/// Its cgroup is the container's (the caller clones into it).
/// The pseudo-terminal an exec runs on: the socket its master goes back over, and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecTerminal {
    pub socket: RawFd,
    pub rows: u16,
    pub cols: u16,
}

pub fn build_exec_plan(
    container_pidfd: RawFd,
    namespaces: libc::c_int,
    argv: &[String],
    env: &Environment,
    workdir: &str,
    security: &Security,
    terminal: Option<ExecTerminal>,
) -> io::Result<SetupPlan> {
    if argv.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "nothing to run",
        ));
    }
    let mut steps = vec![
        SetupStep::Setns {
            pidfd: container_pidfd,
            flags: namespaces,
        },
        SetupStep::ForkAndWait,
    ];
    // In the container's mount and pid namespaces, still privileged: the terminal comes
    // from the container's devpts, and the process in the pid namespace leads its session.
    if let Some(t) = terminal {
        steps.push(SetupStep::Terminal {
            socket: t.socket,
            rows: t.rows,
            cols: t.cols,
        });
    }
    steps.extend(rlimit_steps(&security.isolation)?);
    steps.extend(privilege_steps(workdir, security)?);
    let path_var = env.iter().find_map(|e| e.strip_prefix("PATH="));
    Ok(SetupPlan {
        userns: None,
        hold: false,
        namespaces: Namespaces {
            pid: false,
            net: false,
            time: false,
            mount: false,
        },
        steps,
        rootfs: None,
        exec_paths: exec_candidates(&argv[0], path_var)
            .iter()
            .map(cstring)
            .collect::<io::Result<_>>()?,
        argv: argv.iter().map(cstring).collect::<io::Result<_>>()?,
        envp: env.iter().map(cstring).collect::<io::Result<_>>()?,
    })
}

/// The ordered setup steps and the exec of one container.
pub fn build_plan(
    name: &str,
    process: &ProcessSpec,
    overlay: &str,
    dirs: &ContainerDirs,
    security: &Security,
) -> io::Result<SetupPlan> {
    use libc::{
        MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_PRIVATE, MS_RDONLY, MS_REC, MS_STRICTATIME,
    };
    let iso = &security.isolation;
    let privileged = iso.privileged;
    let root = &dirs.rootfs;
    let at = |rel: &str| path_cstring(&root.join(rel.trim_start_matches('/')));
    let c = |s: &str| cstring(s);
    let mount = |source: &str,
                 target: &str,
                 fstype: &str,
                 flags: libc::c_ulong,
                 data: Option<&str>|
     -> io::Result<SetupStep> {
        Ok(SetupStep::Mount {
            source: Some(c(source)?),
            target: at(target)?,
            fstype: Some(c(fstype)?),
            flags,
            data: data.map(c).transpose()?,
        })
    };
    let bind = |source: &str, target: &str, flags: libc::c_ulong| -> io::Result<SetupStep> {
        Ok(SetupStep::Mount {
            source: Some(c(source)?),
            target: at(target)?,
            fstype: None,
            flags: MS_BIND | flags,
            data: None,
        })
    };
    let mkdir = |rel: &str, mode: libc::mode_t| -> io::Result<SetupStep> {
        Ok(SetupStep::Mkdir {
            path: at(rel)?,
            mode,
        })
    };
    // Device nodes made inside a container's files must not work: only the ones Keel
    // binds in from the host do (Docker gets the same from its device cgroup).
    let nodev = if privileged { 0 } else { MS_NODEV };

    let mut steps = vec![
        SetupStep::Unshare {
            flags: libc::CLONE_NEWCGROUP,
        },
        // Nothing the container mounts may propagate back to the host.
        SetupStep::Mount {
            source: None,
            target: c("/")?,
            fstype: None,
            flags: MS_REC | MS_PRIVATE,
            data: None,
        },
    ];
    if security.userns.is_some() {
        // The parent's overlay arrived locked (it came from a more privileged mount
        // namespace) and pivot_root refuses a locked new root: bind it onto itself.
        let rootfs = path_cstring(root)?;
        steps.push(SetupStep::Mount {
            source: Some(rootfs.clone()),
            target: rootfs,
            fstype: None,
            flags: MS_BIND | MS_REC,
            data: None,
        });
    } else {
        // The lowerdirs are relative to the layer store (see `layer_store::short_lowers`).
        steps.push(SetupStep::Chdir {
            path: path_cstring(&dirs.lower_root)?,
        });
        steps.push(SetupStep::Mount {
            source: Some(c("overlay")?),
            target: path_cstring(root)?,
            fstype: Some(c("overlay")?),
            flags: nodev,
            data: Some(c(overlay)?),
        });
    }
    steps.extend([
        mkdir("proc", 0o555)?,
        mount(
            "proc",
            "proc",
            "proc",
            MS_NOSUID | MS_NODEV | MS_NOEXEC,
            None,
        )?,
        mkdir("sys", 0o555)?,
    ]);
    let sys_flags = MS_NOSUID | MS_NODEV | MS_NOEXEC;
    if security.userns.is_some() && iso.network == NetworkMode::Host {
        // sysfs may only be mounted by the owner of the network namespace; a user-namespaced
        // container on the host network gets the host's, read-only (as rootless runc does).
        steps.push(bind("/sys", "sys", MS_REC)?);
        steps.push(SetupStep::Remount {
            path: at("sys")?,
            flags: MS_RDONLY | sys_flags,
        });
        // The host's cgroup2 came along under sys/fs/cgroup, locked to the bind: cover it,
        // since cgroup2 cannot be mounted straight over a mount of the same superblock.
        steps.push(mount(
            "tmpfs",
            "sys/fs/cgroup",
            "tmpfs",
            sys_flags,
            Some("size=4k,mode=755"),
        )?);
    } else {
        steps.push(mount(
            "sysfs",
            "sys",
            "sysfs",
            sys_flags | if privileged { 0 } else { MS_RDONLY },
            None,
        )?);
    }
    steps.extend([
        // The container's own cgroup (it has a cgroup namespace) appears as the root.
        mount(
            "cgroup2",
            "sys/fs/cgroup",
            "cgroup2",
            MS_NOSUID | MS_NODEV | MS_NOEXEC | if privileged { 0 } else { MS_RDONLY },
            None,
        )?,
        mkdir("dev", 0o755)?,
    ]);
    // A /dev of the container's own, like Docker's: what the set-up and the container create
    // there never reaches the host's devtmpfs. A privileged container gets copies of the
    // host's device nodes as they are at its start (no `nodev`); the others get the few
    // harmless ones, bound from the host.
    steps.push(mount(
        "tmpfs",
        "dev",
        "tmpfs",
        MS_NOSUID | MS_STRICTATIME | if privileged { 0 } else { MS_NODEV },
        Some("mode=755,size=65536k"),
    )?);
    if privileged {
        steps.extend(host_device_steps(Path::new("/dev"), root)?);
    } else {
        for node in DEVICES {
            let target = format!("dev/{node}");
            steps.push(SetupStep::Touch {
                path: at(&target)?,
                mode: 0o666,
            });
            steps.push(bind(&format!("/dev/{node}"), &target, 0)?);
        }
    }
    let shm = format!("mode=1777,size={}", iso.shm_size);
    steps.extend([
        mkdir("dev/pts", 0o755)?,
        mount(
            "devpts",
            "dev/pts",
            "devpts",
            MS_NOSUID | MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
        )?,
        mkdir("dev/shm", 0o1777)?,
        mount(
            "shm",
            "dev/shm",
            "tmpfs",
            MS_NOSUID | MS_NODEV | MS_NOEXEC,
            Some(&shm),
        )?,
        mkdir("dev/mqueue", 0o755)?,
        mount(
            "mqueue",
            "dev/mqueue",
            "mqueue",
            MS_NOSUID | MS_NODEV | MS_NOEXEC,
            None,
        )?,
    ]);
    for (link, target) in [
        ("dev/ptmx", "pts/ptmx"),
        ("dev/fd", "/proc/self/fd"),
        ("dev/stdin", "/proc/self/fd/0"),
        ("dev/stdout", "/proc/self/fd/1"),
        ("dev/stderr", "/proc/self/fd/2"),
    ] {
        steps.push(SetupStep::Symlink {
            target: c(target)?,
            link: at(link)?,
        });
    }
    if iso.init {
        steps.push(SetupStep::Touch {
            path: at(CONTAINER_INIT)?,
            mode: 0o755,
        });
        let reaper = security.reaper.as_ref().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "init = true, but there is no sealed reaper to bind at /dev/init",
            )
        })?;
        steps.push(bind(&reaper.to_string_lossy(), CONTAINER_INIT, 0)?);
        steps.push(SetupStep::Remount {
            path: at(CONTAINER_INIT)?,
            flags: MS_RDONLY | MS_NOSUID | MS_NODEV,
        });
    }
    for extra in &security.mounts {
        if let ExtraMount::DevFile { source, target } = extra {
            steps.push(SetupStep::Touch {
                path: at(target)?,
                mode: 0o666,
            });
            steps.push(bind(&source.to_string_lossy(), target, 0)?);
            continue;
        }
        if let ExtraMount::EtcFile { source, target } = extra {
            let parent = Path::new(target).parent().unwrap_or(Path::new("/"));
            for dir in ancestors_and_self(&parent.to_string_lossy()) {
                steps.push(mkdir(&dir, 0o755)?);
            }
            steps.push(SetupStep::Touch {
                path: at(target)?,
                mode: 0o644,
            });
            steps.push(bind(&source.to_string_lossy(), target, 0)?);
            steps.push(SetupStep::Remount {
                path: at(target)?,
                flags: MS_RDONLY | MS_NOSUID | nodev,
            });
            continue;
        }
        for dir in ancestors_and_self(extra.target()) {
            steps.push(mkdir(&dir, 0o755)?);
        }
        match extra {
            ExtraMount::Bind {
                source,
                target,
                readonly,
                suid,
                source_flags,
            } => {
                let source = source.to_string_lossy();
                steps.push(bind(&source, target, MS_REC)?);
                // A bind mount takes the source's flags; these must be set by a remount.
                // Device nodes never work on a volume (unless the container is privileged).
                let mut flags = nodev | source_flags;
                if !*suid {
                    flags |= MS_NOSUID;
                }
                if *readonly {
                    flags |= MS_RDONLY;
                }
                steps.push(SetupStep::Remount {
                    path: at(target)?,
                    flags,
                });
            }
            ExtraMount::DevFile { .. } | ExtraMount::EtcFile { .. } => {}
            ExtraMount::Tmpfs { target, size } => {
                steps.push(mount(
                    "tmpfs",
                    target,
                    "tmpfs",
                    MS_NOSUID | MS_NODEV,
                    Some(&format!("mode=1777,size={size}")),
                )?);
            }
        }
    }

    steps.push(SetupStep::PivotRoot {
        new_root: path_cstring(root)?,
    });
    if iso.readonly_rootfs {
        steps.push(SetupStep::Remount {
            path: c("/")?,
            flags: MS_RDONLY | nodev,
        });
    }
    if iso.network.is_own() {
        // eth0, on a bridged network, is PID 1's to configure from outside.
        steps.push(SetupStep::LoopbackUp);
    }
    let hostname = iso.hostname.as_deref().unwrap_or(name);
    steps.push(SetupStep::Hostname { name: c(hostname)? });
    for (key, value) in &iso.sysctls {
        steps.push(SetupStep::WriteFile {
            path: c(&format!("/proc/sys/{}", key.replace('.', "/")))?,
            contents: c(value)?,
        });
    }
    if !privileged {
        for path in MASKED_PATHS {
            steps.push(SetupStep::Mask { path: c(path)? });
        }
        for path in READONLY_PATHS {
            steps.push(SetupStep::ReadOnly { path: c(path)? });
        }
    }
    steps.extend(rlimit_steps(iso)?);
    steps.extend(privilege_steps(&process.workdir, security)?);

    let argv = if iso.init {
        wrap_with_init(&process.argv)
    } else {
        process.argv.clone()
    };
    let path_var = process.env.get("PATH");
    let exec_paths = exec_candidates(&argv[0], path_var)
        .iter()
        .map(cstring)
        .collect::<io::Result<_>>()?;
    Ok(SetupPlan {
        userns: security.userns,
        hold: matches!(iso.network, NetworkMode::Bridged(_)),
        namespaces: namespaces_of(iso, security.time_namespace),
        steps,
        rootfs: Some(path_cstring(root)?),
        exec_paths,
        argv: argv.iter().map(cstring).collect::<io::Result<_>>()?,
        envp: process.env.iter().map(cstring).collect::<io::Result<_>>()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container() -> Container {
        let text = "[host]\nhostname = \"h\"\n[images.img]\nlayout = \"x\"\n[containers.c]\nimage = \"img\"\n";
        keel_config::HostConfig::parse(Path::new("h.toml"), text)
            .unwrap()
            .containers["c"]
            .clone()
    }

    fn image() -> ImageProcess {
        ImageProcess {
            entrypoint: vec!["/bin/httpd".into()],
            cmd: vec!["-f".into()],
            env: vec!["PATH=/bin".into(), "A=image".into()],
            workdir: Some("/www".into()),
            user: None,
            ..ImageProcess::default()
        }
    }

    #[test]
    fn the_image_config_gives_stop_signal_volumes_and_ports() {
        let config: oci_spec::image::ImageConfiguration = serde_json::from_str(
            r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},
                "config":{"StopSignal":"SIGQUIT","Volumes":{"/var/lib/db":{}},
                          "ExposedPorts":{"5432/tcp":{}},"User":"postgres"}}"#,
        )
        .unwrap();
        let image = ImageProcess::from_oci(&config);
        assert_eq!(image.stop_signal, Some(libc::SIGQUIT));
        assert_eq!(image.volumes, ["/var/lib/db"]);
        assert_eq!(image.exposed_ports, ["5432/tcp"]);
        assert_eq!(image.user.as_deref(), Some("postgres"));
    }

    #[test]
    fn the_image_decides_when_the_host_file_is_silent() {
        let p = resolve_process("web", &image(), &container()).unwrap();
        assert_eq!(p.argv, ["/bin/httpd", "-f"]);
        assert_eq!(p.env, ["PATH=/bin", "A=image", "HOSTNAME=web"]);
        assert_eq!(p.workdir, "/www");
    }

    #[test]
    fn the_host_file_user_wins_over_the_image_user() {
        let mut img = image();
        img.user = Some("www-data".into());
        assert_eq!(
            resolve_process("web", &img, &container())
                .unwrap()
                .user
                .as_deref(),
            Some("www-data")
        );
        let mut c = container();
        c.isolation.user = Some("1000:1000".into());
        assert_eq!(
            resolve_process("web", &img, &c).unwrap().user.as_deref(),
            Some("1000:1000")
        );
        assert_eq!(
            resolve_process("web", &image(), &container()).unwrap().user,
            None
        );
    }

    #[test]
    fn command_replaces_cmd_and_keeps_the_entrypoint() {
        let mut c = container();
        c.command = Some(vec!["-p".into(), "80".into()]);
        assert_eq!(
            resolve_process("web", &image(), &c).unwrap().argv,
            ["/bin/httpd", "-p", "80"]
        );
    }

    #[test]
    fn entrypoint_replaces_both() {
        let mut c = container();
        c.entrypoint = Some(vec!["/bin/sh".into()]);
        assert_eq!(
            resolve_process("web", &image(), &c).unwrap().argv,
            ["/bin/sh"]
        );
        c.command = Some(vec!["-c".into(), "true".into()]);
        assert_eq!(
            resolve_process("web", &image(), &c).unwrap().argv,
            ["/bin/sh", "-c", "true"]
        );
    }

    #[test]
    fn host_env_overrides_by_name_and_workdir_wins() {
        let mut c = container();
        c.env.insert("A".into(), "host".into());
        c.env.insert("B".into(), "new".into());
        c.workdir = Some("/srv".into());
        let p = resolve_process("web", &image(), &c).unwrap();
        assert_eq!(p.env, ["PATH=/bin", "A=host", "B=new", "HOSTNAME=web"]);
        assert_eq!(p.workdir, "/srv");
    }

    #[test]
    fn defaults_fill_path_and_workdir() {
        let img = ImageProcess {
            cmd: vec!["sh".into()],
            ..Default::default()
        };
        let p = resolve_process("x", &img, &container()).unwrap();
        assert_eq!(p.env[0], format!("PATH={DEFAULT_PATH}"));
        assert_eq!(p.workdir, "/");
    }

    #[test]
    fn an_image_cannot_point_the_process_into_pid1s_descriptors() {
        let refused = |img: ImageProcess| match resolve_process("x", &img, &container()) {
            Err(crate::setup_error::SetupError::UnsafePath { what, .. }) => what,
            other => panic!("expected a refusal, got {other:?}"),
        };
        let mut img = image();
        img.workdir = Some("/proc/self/fd/7".into());
        assert_eq!(refused(img), "working directory");
        let mut img = image();
        img.workdir = Some("/../../..".into());
        assert_eq!(refused(img), "working directory");
        let mut img = image();
        img.entrypoint = vec!["/proc/self/fd/7/../../../bin/sh".into()];
        assert_eq!(refused(img), "program");
        let mut img = image();
        img.entrypoint = vec!["/dev/fd/3".into()];
        assert_eq!(refused(img), "program");
    }

    #[test]
    fn nothing_to_run_is_an_error() {
        assert!(resolve_process("x", &ImageProcess::default(), &container()).is_err());
    }

    #[test]
    fn short_lowers_fit_hundreds_of_layers_in_a_page() {
        let store = tempfile::tempdir().unwrap();
        let lowers: Vec<PathBuf> = (0..250)
            .map(|i| store.path().join(format!("{i:064x}")))
            .collect();
        for dir in &lowers {
            std::fs::create_dir(dir).unwrap();
        }
        let short = keel_image::layer_store::short_lowers(store.path(), &lowers).unwrap();
        let dirs = ContainerDirs::under(Path::new("/run/keel/containers"), "a-long-container-name");
        let opts = overlay_options(&short, &dirs);
        assert!(opts.len() < 4096, "{} bytes", opts.len());
        for (name, dir) in short.iter().zip(&lowers) {
            assert_eq!(
                std::fs::canonicalize(store.path().join(name)).unwrap(),
                std::fs::canonicalize(dir).unwrap()
            );
        }
        // Idempotent, and a link that points elsewhere is an error.
        assert_eq!(
            keel_image::layer_store::short_lowers(store.path(), &lowers).unwrap(),
            short
        );
        let link = store.path().join(&short[0]);
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink("../elsewhere", &link).unwrap();
        assert!(keel_image::layer_store::short_lowers(store.path(), &lowers[..1]).is_err());
    }

    #[test]
    fn overlay_puts_the_top_layer_first() {
        let dirs = ContainerDirs::under(Path::new("/run/keel/containers"), "web");
        let opts = overlay_options(&["/l/base".into(), "/l/site".into()], &dirs);
        assert_eq!(
            opts,
            "lowerdir=/l/site:/l/base,upperdir=/run/keel/containers/web/upper,workdir=/run/keel/containers/web/work"
        );
    }

    fn security(isolation: Isolation) -> Security {
        let capabilities = CapSet::from_names(&isolation.capabilities()).unwrap();
        Security {
            seccomp: Some(Arc::new(
                crate::seccomp::docker_default(&isolation.capabilities()).unwrap(),
            )),
            isolation,
            user: ResolvedUser {
                uid: 1000,
                gid: 1000,
                additional_gids: vec![10],
                home: "/home/u".into(),
            },
            capabilities,
            last_cap: 40,
            time_namespace: true,
            mounts: vec![
                ExtraMount::Bind {
                    source: "/var/lib/keel/volumes/data".into(),
                    target: "/srv/data".into(),
                    readonly: true,
                    suid: false,
                    source_flags: libc::MS_NOEXEC,
                },
                ExtraMount::Tmpfs {
                    target: "/run".into(),
                    size: 1 << 20,
                },
            ],
            userns: None,
            reaper: Some("/run/keel/reaper/sealed/init".into()),
        }
    }

    fn names(plan: &SetupPlan) -> Vec<String> {
        plan.steps.iter().map(SetupStep::describe).collect()
    }

    fn position(names: &[String], needle: &str) -> usize {
        names
            .iter()
            .position(|n| n.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in {names:#?}"))
    }

    #[test]
    fn a_hostname_other_than_the_name_is_the_utsname_and_hostname_variable() {
        let dirs = ContainerDirs::under(Path::new("/run/keel/containers"), "web");
        let mut c = container();
        c.isolation.hostname = Some("shop-1".into());
        let p = resolve_process("web", &image(), &c).unwrap();
        assert!(p.env.iter().any(|e| e == "HOSTNAME=shop-1"), "{:?}", p.env);
        let plan = build_plan("web", &p, "lowerdir=/a", &dirs, &security(c.isolation)).unwrap();
        position(&names(&plan), "sethostname shop-1");
    }

    #[test]
    fn the_plan_follows_the_runc_order() {
        let dirs = ContainerDirs::under(Path::new("/run/keel/containers"), "web");
        let p = resolve_process("web", &image(), &container()).unwrap();
        let mut iso = container().isolation;
        iso.sysctls.insert("kernel.shmmax".into(), "1000000".into());
        iso.rlimits.insert(
            "nofile".into(),
            keel_config::Rlimit {
                soft: 1024,
                hard: 2048,
            },
        );
        iso.readonly_rootfs = true;
        let plan = build_plan("web", &p, "lowerdir=/a", &dirs, &security(iso)).unwrap();
        let names = names(&plan);
        let pos = |needle: &str| position(&names, needle);
        assert!(
            names[0].starts_with("unshare"),
            "the cgroup namespace comes first: {names:#?}"
        );
        assert!(names[1].contains("change propagation of /"), "{names:#?}");
        assert!(pos("mount overlay") < pos("mount proc"));
        assert!(
            pos("mount tmpfs on /run/keel/containers/web/rootfs/dev")
                < pos("bind-mount /dev/null on /run/keel/containers/web/rootfs/dev/null")
        );
        assert!(
            pos("mkdir /run/keel/containers/web/rootfs/srv/data")
                < pos("bind-mount /var/lib/keel/volumes/data on")
        );
        assert!(
            pos("bind-mount /var/lib/keel/volumes/data")
                < pos("remount /run/keel/containers/web/rootfs/srv/data ro,nosuid,nodev,noexec"),
            "a volume is nodev and nosuid, and keeps its source's noexec: {names:#?}"
        );
        assert!(pos("mount mqueue") < pos("pivot_root"));
        assert!(pos("mount tmpfs on /run/keel/containers/web/rootfs/run") < pos("pivot_root"));
        assert!(pos("pivot_root") < pos("remount / ro,nodev"));
        assert!(pos("pivot_root") < pos("sethostname web"));
        assert!(
            pos("write /proc/sys/kernel/shmmax") < pos("make /proc/sys read-only"),
            "sysctls before /proc/sys goes read-only"
        );
        assert!(pos("mask /proc/kcore") < pos("chdir to the working directory /www"));
        assert!(pos("setrlimit") < pos("switch to uid 1000"));
        assert!(pos("chdir") < pos("verify the working directory"));
        assert!(pos("set no_new_privs") < pos("drop capabilities from the bounding set"));
        assert!(pos("drop capabilities") < pos("switch to uid"));
        assert!(
            pos("PR_SET_KEEPCAPS true") < pos("switch to uid")
                && pos("switch to uid") < pos("set capabilities")
        );
        assert_eq!(
            pos("install the seccomp filter"),
            names.len() - 1,
            "with no_new_privs the filter comes last"
        );
        assert_eq!(plan.exec_paths, [cstring("/bin/httpd").unwrap()]);
        assert_eq!(plan.argv.len(), 2);
        assert_eq!(
            plan.namespaces,
            Namespaces {
                mount: true,
                pid: true,
                net: false,
                time: true
            }
        );
    }

    #[test]
    fn an_environment_sets_each_name_once_in_first_set_order() {
        let mut env = Environment::default();
        env.set_entry("PATH=/bin");
        env.set("A", "1");
        env.set_entry("not an entry");
        env.set("PATH", "/usr/bin");
        env.set_default("A", "2");
        env.set_default("B", "x=y");
        assert_eq!(env, ["PATH=/usr/bin", "A=1", "B=x=y"]);
        assert_eq!(env.get("B"), Some("x=y"));
        assert_eq!(env.get("C"), None);
    }

    #[test]
    fn an_exec_joins_exactly_the_namespaces_the_start_made() {
        let mut iso = container().isolation;
        let base = libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
        assert_eq!(
            namespaces_of(&iso, true).join_flags(false),
            base | libc::CLONE_NEWCGROUP | libc::CLONE_NEWPID | libc::CLONE_NEWTIME
        );
        iso.host_pid = true;
        iso.network = NetworkMode::None;
        assert_eq!(
            namespaces_of(&iso, false).join_flags(true),
            base | libc::CLONE_NEWCGROUP | libc::CLONE_NEWNET | libc::CLONE_NEWUSER
        );
    }

    #[test]
    fn without_no_new_privs_seccomp_goes_before_the_capability_drop() {
        let dirs = ContainerDirs::under(Path::new("/c"), "web");
        let p = resolve_process("web", &image(), &container()).unwrap();
        let mut iso = container().isolation;
        iso.no_new_privileges = false;
        let names = names(&build_plan("web", &p, "lowerdir=/a", &dirs, &security(iso)).unwrap());
        assert!(!names.iter().any(|n| n == "set no_new_privs"));
        assert!(
            position(&names, "install the seccomp filter") < position(&names, "drop capabilities")
        );
    }

    #[test]
    fn volumes_are_nodev_and_nosuid_unless_asked_or_privileged() {
        let dirs = ContainerDirs::under(Path::new("/c"), "v");
        let p = resolve_process("v", &image(), &container()).unwrap();
        let volume = |suid: bool| ExtraMount::Bind {
            source: "/var/lib/keel/volumes/v".into(),
            target: "/v".into(),
            readonly: false,
            suid,
            source_flags: 0,
        };
        let remount_of = |iso: Isolation, suid: bool| {
            let mut security = security(iso);
            security.mounts = vec![volume(suid)];
            let plan = build_plan("v", &p, "lowerdir=/a", &dirs, &security).unwrap();
            names(&plan)
                .into_iter()
                .find(|n| n.starts_with("remount /c/v/rootfs/v "))
                .unwrap_or_else(|| panic!("no remount of the volume in {:#?}", names(&plan)))
        };
        let iso = container().isolation;
        assert_eq!(
            remount_of(iso.clone(), false),
            "remount /c/v/rootfs/v rw,nosuid,nodev"
        );
        assert_eq!(
            remount_of(iso.clone(), true),
            "remount /c/v/rootfs/v rw,nodev"
        );
        let mut privileged = iso;
        privileged.privileged = true;
        assert_eq!(
            remount_of(privileged, false),
            "remount /c/v/rootfs/v rw,nosuid"
        );
    }

    #[test]
    fn privileged_containers_keep_the_kernel_views() {
        let dirs = ContainerDirs::under(Path::new("/c"), "p");
        let p = resolve_process("p", &image(), &container()).unwrap();
        let mut iso = container().isolation;
        iso.privileged = true;
        let mut sec = security(iso);
        sec.seccomp = None;
        let plan = build_plan("p", &p, "lowerdir=/a", &dirs, &sec).unwrap();
        let names = names(&plan);
        // A /dev of its own (never the host's devtmpfs, which its links would change), not
        // nodev, holding copies of the host's device nodes.
        assert!(!names.iter().any(|n| n.contains("devtmpfs")), "{names:#?}");
        let dev_mount = plan.steps.iter().find_map(|s| match s {
            SetupStep::Mount {
                fstype: Some(t),
                target,
                flags,
                ..
            } if t.as_bytes() == b"tmpfs" && target.as_bytes() == b"/c/p/rootfs/dev" => {
                Some(*flags)
            }
            _ => None,
        });
        assert_eq!(dev_mount.map(|f| f & libc::MS_NODEV), Some(0), "{names:#?}");
        assert!(
            names.iter().any(|n| n == "mknod /c/p/rootfs/dev/null"),
            "{names:#?}"
        );
        assert!(
            !names
                .iter()
                .any(|n| n == "mknod /c/p/rootfs/dev/pts" || n.ends_with("/dev/pts/ptmx")),
            "devpts is the container's own: {names:#?}"
        );
        assert!(
            !names.iter().any(|n| n.starts_with("mask ")
                || n.starts_with("make /proc")
                || n.contains("seccomp")),
            "{names:#?}"
        );
        assert!(
            matches!(&plan.steps[3], SetupStep::Mount { flags: 0, .. }),
            "the rootfs is not nodev"
        );
    }

    #[test]
    fn no_network_brings_up_loopback_and_init_wraps_the_command() {
        let dirs = ContainerDirs::under(Path::new("/c"), "n");
        let p = resolve_process("n", &image(), &container()).unwrap();
        let mut iso = container().isolation;
        iso.network = NetworkMode::None;
        iso.init = true;
        iso.host_pid = true;
        let plan = build_plan("n", &p, "lowerdir=/a", &dirs, &security(iso)).unwrap();
        let names = names(&plan);
        assert!(position(&names, "pivot_root") < position(&names, "bring up lo"));
        assert!(
            position(
                &names,
                "bind-mount /run/keel/reaper/sealed/init on /c/n/rootfs/dev/init"
            ) < position(&names, "pivot_root")
        );
        assert_eq!(
            plan.namespaces,
            Namespaces {
                mount: true,
                pid: false,
                net: true,
                time: true
            }
        );
        let argv: Vec<String> = plan
            .argv
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(argv, ["/dev/init", "--reap", "--", "/bin/httpd", "-f"]);
        assert_eq!(plan.exec_paths, [cstring("/dev/init").unwrap()]);
    }

    #[test]
    fn a_user_namespace_has_its_overlay_mounted_by_the_parent_and_binds_sys() {
        let dirs = ContainerDirs::under(Path::new("/c"), "u");
        let p = resolve_process("u", &image(), &container()).unwrap();
        let mut sec = security(container().isolation);
        sec.userns = Some(IdMap {
            uid: 100_000,
            gid: 100_000,
            size: 65_536,
        });
        let plan = build_plan("u", &p, "lowerdir=/a", &dirs, &sec).unwrap();
        let names = names(&plan);
        assert!(
            !names.iter().any(|n| n.contains("mount overlay")),
            "{names:#?}"
        );
        assert!(
            position(&names, "bind-mount /sys on /c/u/rootfs/sys")
                < position(&names, "remount /c/u/rootfs/sys ro,nosuid,nodev,noexec")
        );
        assert!(!names.iter().any(|n| n.contains("mount sysfs")));
        assert_eq!(plan.userns, sec.userns);
    }

    #[test]
    fn mount_targets_through_symlinks_are_refused() {
        let upper = tempfile::tempdir().unwrap();
        let lower = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(lower.path().join("srv")).unwrap();
        std::os::unix::fs::symlink("/etc", lower.path().join("data")).unwrap();
        let layers = vec![upper.path().to_path_buf(), lower.path().to_path_buf()];
        assert!(check_mount_target(&layers, "/srv/data").is_ok());
        let e = check_mount_target(&layers, "/data/x").unwrap_err();
        assert!(e.contains("/data is a symbolic link"), "{e}");
        // A directory in the upper layer decides over a symlink below it.
        std::fs::create_dir_all(upper.path().join("data")).unwrap();
        assert!(check_mount_target(&layers, "/data/x").is_ok());
        // A symlink the container left in its upper layer is caught on the next start.
        std::os::unix::fs::symlink("/", upper.path().join("srv")).unwrap();
        assert!(check_mount_target(&layers, "/srv/data").is_err());
    }
}
