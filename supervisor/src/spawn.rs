//! Starting a container process: one clone3 and a precomputed list of steps.
//!
//! Everything the child needs (paths, mount options, argv, envp, capability masks, the
//! seccomp program) is built into a [`SetupPlan`] before cloning. Between clone3 and execve the
//! child only walks that plan with raw, async-signal-safe system calls: no allocation, no
//! locks, no Rust I/O. If a step fails the child writes the step's index and errno to a
//! close-on-exec pipe and exits 127; a clean execve closes the pipe, so the parent reads
//! either a failure or EOF.
//!
//! The order follows runc and crun: namespaces and cgroup (clone3 with CLONE_INTO_CGROUP, so
//! the process never runs outside its cgroup) → mounts → /dev → pivot_root → hostname and
//! sysctls → masked and read-only paths → rlimits → no_new_privs → seccomp (here if
//! no_new_privs is off, since it then needs CAP_SYS_ADMIN) → bounding set → uid/gid →
//! capabilities → seccomp (here if no_new_privs is on, as late as possible) → fds and cwd →
//! execve. [`crate::container::build_plan`] decides the order; this module executes it.

use std::ffi::{CStr, CString, c_char};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::Arc;

use crate::caps::{self, CapSet};
use crate::in_root::InRootPath;
use crate::seccomp::Program;

/// libc's constants are deprecated, overflowing `c_int`s; clone3 takes a u64.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
const CLONE_CLEAR_SIGHAND: u64 = 0x1_0000_0000;

/// Which namespaces the container gets of its own at clone time (mount, uts and ipc always;
/// the cgroup namespace is unshared by the first step, see [`SetupStep::Unshare`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Namespaces {
    /// Mount, uts and ipc namespaces (every container; not an exec, which joins).
    pub mount: bool,
    /// false shares PID 1's pid namespace (`pid = "host"`).
    pub pid: bool,
    /// A network namespace of its own (`network = "none"`).
    pub net: bool,
    /// A time namespace, where the kernel has them.
    pub time: bool,
}

impl Namespaces {
    /// The `setns` flags that join these namespaces from outside (an exec): the cgroup
    /// namespace too (the container's start unshares it as a step), and the user namespace
    /// when the container has one.
    pub fn join_flags(&self, userns: bool) -> libc::c_int {
        let mut flags = libc::CLONE_NEWCGROUP;
        // The start's clone flags are the namespaces it creates; joining takes the same.
        flags |= self.clone_flags() as libc::c_int;
        if userns {
            flags |= libc::CLONE_NEWUSER;
        }
        flags
    }

    fn clone_flags(&self) -> u64 {
        let mut flags = 0;
        if self.mount {
            flags |= (libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC) as u64;
        }
        if self.pid {
            flags |= libc::CLONE_NEWPID as u64;
        }
        if self.net {
            flags |= libc::CLONE_NEWNET as u64;
        }
        if self.time {
            flags |= libc::CLONE_NEWTIME as u64;
        }
        flags
    }
}

/// A user namespace's mapping: container ids 0..size are host ids uid.. and gid...
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMap {
    pub uid: u32,
    pub gid: u32,
    pub size: u32,
}

/// One step the child performs, in order.
#[derive(Debug)]
pub enum SetupStep {
    /// unshare(2). The cgroup namespace is unshared here, not by clone3: a namespace made
    /// at clone time is rooted at the parent's cgroup, not the one CLONE_INTO_CGROUP picked.
    Unshare {
        flags: libc::c_int,
    },
    /// mount(2); `source`/`fstype`/`data` may be absent.
    Mount {
        source: Option<CString>,
        target: CString,
        fstype: Option<CString>,
        flags: libc::c_ulong,
        data: Option<CString>,
    },
    /// mkdir(2), an existing directory is fine.
    Mkdir {
        path: CString,
        mode: libc::mode_t,
    },
    /// A copy of one of the host's device nodes: mknod with the node's type and permission
    /// bits in `mode` (S_IFCHR or S_IFBLK), then its owner. Privileged containers only.
    DeviceNode {
        path: CString,
        mode: libc::mode_t,
        rdev: libc::dev_t,
        uid: libc::uid_t,
        gid: libc::gid_t,
    },
    /// An empty regular file, to bind-mount something over.
    Touch {
        path: CString,
        mode: libc::mode_t,
    },
    Symlink {
        target: CString,
        link: CString,
    },
    /// chdir into the new root, pivot_root(".", "."), detach the old root.
    PivotRoot {
        new_root: CString,
    },
    Hostname {
        name: CString,
    },
    /// Writes `contents` to an existing file (a sysctl under /proc/sys).
    WriteFile {
        path: CString,
        contents: CString,
    },
    /// Hides a path: an empty read-only tmpfs over a directory, /dev/null over anything
    /// else. A path the kernel does not have is skipped.
    Mask {
        path: CString,
    },
    /// Bind-mounts a path onto itself read-only. A missing path is skipped.
    ReadOnly {
        path: CString,
    },
    /// Sets the per-mount flags of an existing mount point (MS_RDONLY, MS_NODEV...): a bind
    /// remount sets every one at once, so each flag to keep must be in `flags`.
    Remount {
        path: CString,
        flags: libc::c_ulong,
    },
    /// Joins the namespaces of the process behind `pidfd` (setns with a pidfd, Linux 5.8).
    Setns {
        pidfd: RawFd,
        flags: libc::c_int,
    },
    /// Forks: the parent waits for the child and exits with its status, the child goes on.
    /// After joining a pid namespace only children are inside it; the parent's death
    /// takes the child along (PR_SET_PDEATHSIG), so killing the parent stops both.
    ForkAndWait,
    /// Brings up `lo` in a network namespace of the container's own.
    LoopbackUp,
    /// An exec's pseudo-terminal, from the container's own devpts (so that ttyname(3) and
    /// tty(1) work inside): opens /dev/pts/ptmx (no symlink followed), unlocks it, opens the
    /// peer through the master (TIOCGPTPEER, never by a path the container controls), sets
    /// its size, becomes a session leader with it as the controlling terminal and its stdio,
    /// and sends the master to PID 1 over `socket` (SCM_RIGHTS).
    Terminal {
        socket: RawFd,
        rows: u16,
        cols: u16,
    },
    Rlimit {
        resource: libc::c_int,
        soft: u64,
        hard: u64,
    },
    Chdir {
        path: CString,
    },
    /// Fails if the working directory is not inside the container's root.
    VerifyCwd,
    NoNewPrivs,
    Seccomp(Arc<Program>),
    DropBounding {
        keep: CapSet,
        last_cap: u32,
    },
    KeepCaps(bool),
    /// setgroups, setresgid, setresuid.
    SwitchUser {
        uid: libc::uid_t,
        gid: libc::gid_t,
        groups: Vec<libc::gid_t>,
    },
    Capabilities(CapSet),
}

impl SetupStep {
    /// How the step is named in errors.
    pub fn describe(&self) -> String {
        fn s(c: &CString) -> String {
            c.to_string_lossy().into_owned()
        }
        match self {
            SetupStep::Unshare { flags } => format!("unshare({flags:#x})"),
            SetupStep::Mount {
                fstype,
                target,
                source,
                ..
            } => match fstype {
                Some(t) => format!("mount {} on {}", s(t), s(target)),
                None => match source {
                    Some(src) => format!("bind-mount {} on {}", s(src), s(target)),
                    None => format!("change propagation of {}", s(target)),
                },
            },
            SetupStep::Mkdir { path, .. } => format!("mkdir {}", s(path)),
            SetupStep::DeviceNode { path, .. } => format!("mknod {}", s(path)),
            SetupStep::Touch { path, .. } => format!("create {}", s(path)),
            SetupStep::Symlink { link, .. } => format!("symlink {}", s(link)),
            SetupStep::PivotRoot { new_root } => format!("pivot_root into {}", s(new_root)),
            SetupStep::Hostname { name } => format!("sethostname {}", s(name)),
            SetupStep::WriteFile { path, .. } => format!("write {}", s(path)),
            SetupStep::Mask { path } => format!("mask {}", s(path)),
            SetupStep::ReadOnly { path } => format!("make {} read-only", s(path)),
            SetupStep::Remount { path, flags } => {
                format!("remount {} {}", s(path), mount_flags_text(*flags))
            }
            SetupStep::Setns { flags, .. } => {
                format!("join the container's namespaces ({flags:#x})")
            }
            SetupStep::ForkAndWait => "fork into the container's pid namespace".into(),
            SetupStep::LoopbackUp => "bring up lo".into(),
            SetupStep::Terminal { .. } => "open a terminal on the container's /dev/pts".into(),
            SetupStep::Rlimit { resource, .. } => format!("setrlimit({resource})"),
            SetupStep::Chdir { path } => format!("chdir to the working directory {}", s(path)),
            SetupStep::VerifyCwd => "verify the working directory is inside the root".into(),
            SetupStep::NoNewPrivs => "set no_new_privs".into(),
            SetupStep::Seccomp(_) => "install the seccomp filter".into(),
            SetupStep::DropBounding { .. } => "drop capabilities from the bounding set".into(),
            SetupStep::KeepCaps(on) => format!("PR_SET_KEEPCAPS {on}"),
            SetupStep::SwitchUser { uid, gid, .. } => format!("switch to uid {uid} gid {gid}"),
            SetupStep::Capabilities(_) => "set capabilities".into(),
        }
    }
}

/// Per-mount flags as mount(8) names them: "ro,nosuid,nodev".
fn mount_flags_text(flags: libc::c_ulong) -> String {
    let names = [
        (libc::MS_RDONLY, "ro"),
        (libc::MS_NOSUID, "nosuid"),
        (libc::MS_NODEV, "nodev"),
        (libc::MS_NOEXEC, "noexec"),
    ];
    let set: Vec<&str> = names
        .iter()
        .filter(|(flag, _)| flags & flag != 0)
        .map(|(_, name)| *name)
        .collect();
    if flags & libc::MS_RDONLY == 0 {
        std::iter::once("rw")
            .chain(set)
            .collect::<Vec<_>>()
            .join(",")
    } else {
        set.join(",")
    }
}

/// Everything the child needs, prepared while allocation is still allowed.
pub struct SetupPlan {
    pub namespaces: Namespaces,
    /// A user namespace of its own: the parent writes the maps, then lets the child go on.
    pub userns: Option<IdMap>,
    /// The child waits before its first step until the caller opens [`Spawned::gate`]
    /// (PID 1 first connects its network namespace to a bridge).
    pub hold: bool,
    pub steps: Vec<SetupStep>,
    /// The container's root directory on the host. Until pivot_root, every path of a step
    /// strictly under it is resolved inside it (openat2 RESOLVE_IN_ROOT), never by path
    /// from the host's root: a symlink the container put there (in its files or in a volume
    /// another container shares), even one swapped in after a check, cannot lead a mount,
    /// mkdir or mknod onto the host (CVE-2021-30465).
    pub rootfs: Option<CString>,
    /// execve candidates tried in order: the program resolved against each PATH entry.
    pub exec_paths: Vec<CString>,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
}

/// Index reported for a failure after the last step (execve itself).
fn exec_step_index(plan: &SetupPlan) -> u32 {
    plan.steps.len() as u32
}

/// What the parent learns from a started child.
pub struct Spawned {
    pub pid: libc::pid_t,
    pub pidfd: OwnedFd,
    /// Readable end of the error pipe: EOF once execve succeeded, or 8 bytes (step, errno).
    pub error_pipe: OwnedFd,
    /// Set for a plan with `hold`: the child goes on once this is opened, and fails at its
    /// first step if it is dropped instead.
    pub gate: Option<Gate>,
}

/// Lets a held child go on.
pub struct Gate(OwnedFd);

impl Gate {
    pub fn open(self) -> io::Result<()> {
        rustix::io::write(&self.0, b"g")?;
        Ok(())
    }
}

/// SetupStep index reported when the child was held and its gate was dropped, not opened.
const HELD_STEP: u32 = u32::MAX;

/// Decodes the error pipe's 8 bytes into a message naming the failed step.
pub fn describe_failure(plan_steps: &[String], bytes: &[u8]) -> Option<String> {
    let raw_step = u32::from_ne_bytes(bytes.get(0..4)?.try_into().ok()?);
    if raw_step == HELD_STEP {
        return Some("PID 1 could not finish preparing the container (see its log)".into());
    }
    let step = raw_step as usize;
    let errno = i32::from_ne_bytes(bytes.get(4..8)?.try_into().ok()?);
    let what = plan_steps
        .get(step)
        .cloned()
        .unwrap_or_else(|| "execve".to_string());
    Some(format!("{what}: {}", io::Error::from_raw_os_error(errno)))
}

/// The PATH a container gets when neither its image nor its host file sets one (Docker's),
/// and the one programs are resolved against without a PATH.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Resolves a program name like execvp: a name with a '/' is used as is, otherwise it is
/// tried in each PATH directory (PATH as the container will see it).
pub fn exec_candidates(program: &str, path_var: Option<&str>) -> Vec<String> {
    if program.contains('/') {
        return vec![program.to_string()];
    }
    let path = path_var.unwrap_or(DEFAULT_PATH);
    path.split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| format!("{}/{program}", dir.trim_end_matches('/')))
        .collect()
}

pub fn cstring(s: impl AsRef<[u8]>) -> io::Result<CString> {
    CString::new(s.as_ref())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "string contains a NUL byte"))
}

pub fn path_cstring(p: &Path) -> io::Result<CString> {
    cstring(p.as_os_str().as_encoded_bytes())
}

/// Starts the child: clone3 into the cgroup with new namespaces, run the plan, execve.
///
/// Must be called from a single-threaded process (PID 1 runs a current-thread runtime).
/// `stdio` are the fds the child gets as 0, 1 and 2.
pub fn spawn(plan: &SetupPlan, cgroup_dir: &OwnedFd, stdio: [RawFd; 3]) -> io::Result<Spawned> {
    let argv: Vec<*const c_char> = plan
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const c_char> = plan
        .envp
        .iter()
        .map(|e| e.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let (err_read, err_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    // The child of a user namespace waits on this until its id maps are written.
    let (sync_read, sync_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    let keep = fds_to_keep(plan, &[err_write.as_raw_fd(), sync_read.as_raw_fd()]);

    let mut pidfd: libc::c_int = -1;
    // SAFETY: clone_args is a plain C struct for which all-zero is a valid value.
    let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
    args.flags = libc::CLONE_PIDFD as u64
        | CLONE_INTO_CGROUP
        | CLONE_CLEAR_SIGHAND
        | plan.namespaces.clone_flags();
    if plan.userns.is_some() {
        args.flags |= libc::CLONE_NEWUSER as u64;
    }
    args.pidfd = &mut pidfd as *mut libc::c_int as u64;
    args.exit_signal = libc::SIGCHLD as u64;
    args.cgroup = cgroup_dir.as_raw_fd() as u64;

    // SAFETY: clone3 with no stack behaves like fork. The caller guarantees we are
    // single-threaded, and the child below only makes async-signal-safe calls on memory
    // prepared before this point, then execs or _exits.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut libc::clone_args,
            std::mem::size_of::<libc::clone_args>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    if ret == 0 {
        // SAFETY: we are the child; see run_child's contract.
        unsafe {
            run_child(
                plan,
                &argv,
                &envp,
                stdio,
                err_write.as_raw_fd(),
                sync_read.as_raw_fd(),
                &keep,
            )
        }
    }
    drop(err_write);
    drop(sync_read);
    // SAFETY: clone3 stored a fresh pidfd that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let pid = ret as libc::pid_t;
    if let Some(map) = plan.userns
        && let Err(e) = write_id_maps(pid, map)
    {
        let _ = rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL);
        return Err(io::Error::new(
            e.kind(),
            format!("writing the user namespace maps: {e}"),
        ));
    }
    let gate = Gate(sync_write);
    let gate = if plan.hold {
        Some(gate)
    } else {
        if plan.userns.is_some() {
            gate.open()?;
        }
        None
    };
    Ok(Spawned {
        pid,
        pidfd,
        error_pipe: err_read,
        gate,
    })
}

/// The descriptors the child keeps when it closes PID 1's: `own` (its pipes) and those the
/// plan's steps use, sorted, without 0-2 (which become the container's stdio).
fn fds_to_keep(plan: &SetupPlan, own: &[RawFd]) -> Vec<RawFd> {
    let mut keep: Vec<RawFd> = own
        .iter()
        .copied()
        .chain(plan.steps.iter().filter_map(|step| match step {
            SetupStep::Setns { pidfd, .. } => Some(*pidfd),
            SetupStep::Terminal { socket, .. } => Some(*socket),
            _ => None,
        }))
        .filter(|fd| *fd > 2)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    keep
}

/// Maps container ids 0..size to the host range. Written by PID 1, which is privileged in
/// the parent namespace, so setgroups(2) stays allowed inside.
fn write_id_maps(pid: libc::pid_t, map: IdMap) -> io::Result<()> {
    std::fs::write(
        format!("/proc/{pid}/uid_map"),
        format!("0 {} {}\n", map.uid, map.size),
    )?;
    std::fs::write(
        format!("/proc/{pid}/gid_map"),
        format!("0 {} {}\n", map.gid, map.size),
    )
}

/// errno of the last failed call.
///
/// # Safety
/// Only reads the thread's errno.
unsafe fn errno() -> libc::c_int {
    // SAFETY: __errno_location always returns the calling thread's errno slot.
    unsafe { *libc::__errno_location() }
}

/// Runs one step. Async-signal-safe: raw system calls on prebuilt data only.
///
/// # Safety
/// Only in the freshly cloned child, see [`run_child`].
/// [`SetupStep::Terminal`]; async-signal-safe (system calls on stack memory only).
///
/// # Safety
/// In the exec child, after joining the container's mount namespace.
unsafe fn open_terminal(socket: RawFd, rows: u16, cols: u16) -> bool {
    /// TIOCGPTPEER, _IO('T', 0x41): not in the libc crate for every target.
    const TIOCGPTPEER: libc::c_ulong = 0x5441;
    // SAFETY: (whole body) system calls on constants, stack structs and descriptors this
    // function opened.
    unsafe {
        let mut how: libc::open_how = std::mem::zeroed();
        how.flags = (libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
        how.resolve = libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
        let master = libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            c"/dev/pts/ptmx".as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        ) as libc::c_int;
        if master < 0 {
            return false;
        }
        let unlock: libc::c_int = 0;
        // Both ioctls fail on anything but a ptmx: a FIFO or file put there is refused.
        let peer = if libc::ioctl(master, libc::TIOCSPTLCK, &unlock) == 0 {
            libc::ioctl(master, TIOCGPTPEER, libc::O_RDWR | libc::O_NOCTTY)
        } else {
            -1
        };
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let ok = peer >= 0
            && libc::ioctl(peer, libc::TIOCSWINSZ, &size) == 0
            && libc::setsid() >= 0
            && libc::ioctl(peer, libc::TIOCSCTTY, 0) == 0
            && (0..3).all(|fd| libc::dup2(peer, fd) == fd)
            && send_fd(socket, master);
        if peer > 2 {
            libc::close(peer);
        }
        libc::close(master);
        libc::close(socket);
        ok
    }
}

/// Sends `fd` over the unix socket `socket` (one byte of data, the fd as SCM_RIGHTS).
///
/// # Safety
/// Async-signal-safe: stack buffers only.
unsafe fn send_fd(socket: RawFd, fd: RawFd) -> bool {
    // SAFETY: (whole body) a msghdr over stack buffers, its control buffer sized and
    // aligned for one descriptor (CMSG_SPACE(4) is 24 bytes; u64s align it).
    unsafe {
        let mut byte = [0u8; 1];
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        let mut control = [0u64; 4];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() {
            return false;
        }
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        libc::sendmsg(socket, &msg, libc::MSG_NOSIGNAL) == 1
    }
}

unsafe fn run_step(step: &SetupStep, root: Option<&CStr>) -> bool {
    // SAFETY: (whole body) libc calls on NUL-terminated strings and plain structs that the
    // parent prepared, or on stack buffers.
    unsafe {
        let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        match step {
            SetupStep::Unshare { flags } => libc::unshare(*flags) == 0,
            SetupStep::Mount {
                source,
                target,
                fstype,
                flags,
                data,
            } => {
                let Some(target) = InRootPath::open(root, target, libc::O_PATH) else {
                    return false;
                };
                libc::mount(
                    ptr(source),
                    target.path(),
                    ptr(fstype),
                    *flags,
                    ptr(data).cast(),
                ) == 0
            }
            SetupStep::Mkdir { path, mode } => {
                let Some((dir, name)) = InRootPath::parent(root, path) else {
                    return false;
                };
                libc::mkdirat(dir.dirfd(), name, *mode) == 0 || errno() == libc::EEXIST
            }
            SetupStep::DeviceNode {
                path,
                mode,
                rdev,
                uid,
                gid,
            } => {
                let Some((dir, name)) = InRootPath::parent(root, path) else {
                    return false;
                };
                libc::mknodat(dir.dirfd(), name, *mode, *rdev) == 0
                    && libc::fchownat(dir.dirfd(), name, *uid, *gid, libc::AT_SYMLINK_NOFOLLOW) == 0
            }
            SetupStep::Touch { path, mode } => {
                let Some(file) =
                    InRootPath::open_mode(root, path, libc::O_CREAT | libc::O_WRONLY, *mode as u64)
                else {
                    return false;
                };
                drop(file);
                true
            }
            SetupStep::Symlink { target, link } => {
                let Some((dir, name)) = InRootPath::parent(root, link) else {
                    return false;
                };
                libc::symlinkat(target.as_ptr(), dir.dirfd(), name) == 0
            }
            SetupStep::PivotRoot { new_root } => {
                libc::chdir(new_root.as_ptr()) == 0
                    && libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) == 0
                    && libc::umount2(c".".as_ptr(), libc::MNT_DETACH) == 0
                    && libc::chdir(c"/".as_ptr()) == 0
            }
            SetupStep::Hostname { name } => {
                libc::sethostname(name.as_ptr(), name.as_bytes().len()) == 0
            }
            SetupStep::WriteFile { path, contents } => {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return false;
                }
                let bytes = contents.as_bytes();
                let ok =
                    libc::write(fd, bytes.as_ptr().cast(), bytes.len()) == bytes.len() as isize;
                libc::close(fd);
                ok
            }
            SetupStep::Mask { path } => {
                let mut st: libc::stat = std::mem::zeroed();
                if libc::stat(path.as_ptr(), &mut st) != 0 {
                    return errno() == libc::ENOENT;
                }
                if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                    libc::mount(
                        c"tmpfs".as_ptr(),
                        path.as_ptr(),
                        c"tmpfs".as_ptr(),
                        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                        c"size=4k,nr_inodes=1".as_ptr().cast(),
                    ) == 0
                } else {
                    libc::mount(
                        c"/dev/null".as_ptr(),
                        path.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    ) == 0
                }
            }
            SetupStep::ReadOnly { path } => {
                let mut st: libc::stat = std::mem::zeroed();
                if libc::stat(path.as_ptr(), &mut st) != 0 {
                    return errno() == libc::ENOENT;
                }
                libc::mount(
                    path.as_ptr(),
                    path.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ) == 0
                    && libc::mount(
                        std::ptr::null(),
                        path.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND
                            | libc::MS_REMOUNT
                            | libc::MS_RDONLY
                            | libc::MS_NOSUID
                            | libc::MS_NODEV
                            | libc::MS_NOEXEC,
                        std::ptr::null(),
                    ) == 0
            }
            SetupStep::Remount { path, flags } => {
                let Some(target) = InRootPath::open(root, path, libc::O_PATH) else {
                    return false;
                };
                libc::mount(
                    std::ptr::null(),
                    target.path(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REMOUNT | *flags,
                    std::ptr::null(),
                ) == 0
            }
            SetupStep::Setns { pidfd, flags } => libc::setns(*pidfd, *flags) == 0,
            SetupStep::ForkAndWait => {
                let child =
                    libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_ulong, 0, 0, 0, 0);
                if child < 0 {
                    return false;
                }
                if child == 0 {
                    // Our parent is outside the pid namespace we are now in, so getppid()
                    // reads 0 (or its pid when the container shares PID 1's namespace);
                    // anything else means it died before prctl and we were re-parented.
                    let ppid = libc::getppid();
                    // If the waiting parent is killed (a timed-out health check), so are we.
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
                    if libc::getppid() != ppid {
                        libc::_exit(137);
                    }
                    return true;
                }
                let mut status = 0;
                while libc::waitpid(child as libc::pid_t, &mut status, 0) < 0 {
                    if errno() != libc::EINTR {
                        libc::_exit(127);
                    }
                }
                if libc::WIFEXITED(status) {
                    libc::_exit(libc::WEXITSTATUS(status));
                }
                libc::_exit(128 + libc::WTERMSIG(status));
            }
            SetupStep::LoopbackUp => {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
                if fd < 0 {
                    return false;
                }
                let mut ifr: libc::ifreq = std::mem::zeroed();
                for (i, b) in b"lo\0".iter().enumerate() {
                    ifr.ifr_name[i] = *b as c_char;
                }
                let ok = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr) == 0 && {
                    ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
                    libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr) == 0
                };
                libc::close(fd);
                ok
            }
            SetupStep::Rlimit {
                resource,
                soft,
                hard,
            } => {
                let limit = libc::rlimit64 {
                    rlim_cur: *soft,
                    rlim_max: *hard,
                };
                libc::prlimit64(
                    0,
                    *resource as libc::__rlimit_resource_t,
                    &limit,
                    std::ptr::null_mut(),
                ) == 0
            }
            SetupStep::Chdir { path } => libc::chdir(path.as_ptr()) == 0,
            SetupStep::Terminal { socket, rows, cols } => open_terminal(*socket, *rows, *cols),
            SetupStep::VerifyCwd => {
                // A page, the most the kernel ever returns: a longer path fails with
                // ENAMETOOLONG, so no error is ever taken for "inside" (CVE-2024-21626
                // slipped through an ERANGE taken that way).
                let mut buf = [0u8; 4096];
                let n = libc::syscall(libc::SYS_getcwd, buf.as_mut_ptr(), buf.len());
                if n < 0 {
                    return false;
                }
                // A directory outside the root reads as "(unreachable)/...".
                if buf[0] != b'/' {
                    *libc::__errno_location() = libc::EXDEV;
                    return false;
                }
                true
            }
            SetupStep::NoNewPrivs => libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0,
            SetupStep::Seccomp(program) => program.install(),
            SetupStep::DropBounding { keep, last_cap } => {
                caps::drop_bounding_except(*keep, *last_cap)
            }
            SetupStep::KeepCaps(on) => caps::set_keepcaps(*on),
            SetupStep::SwitchUser { uid, gid, groups } => {
                libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) == 0
                    && libc::syscall(libc::SYS_setresgid, *gid, *gid, *gid) == 0
                    && libc::syscall(libc::SYS_setresuid, *uid, *uid, *uid) == 0
            }
            SetupStep::Capabilities(keep) => caps::apply(*keep),
        }
    }
}

/// The child side. Only async-signal-safe system calls; never returns.
///
/// # Safety
/// Must only run in a freshly cloned child of a single-threaded parent.
unsafe fn run_child(
    plan: &SetupPlan,
    argv: &[*const c_char],
    envp: &[*const c_char],
    stdio: [RawFd; 3],
    err_fd: RawFd,
    sync_fd: RawFd,
    keep: &[RawFd],
) -> ! {
    // SAFETY: (whole body) raw libc calls on pointers into `plan`, `argv` and `envp`, which
    // the parent built before clone3 and which stay valid in our copy of its memory.
    unsafe {
        let fail = |step: u32| -> ! {
            let code = errno();
            let mut msg = [0u8; 8];
            msg[..4].copy_from_slice(&step.to_ne_bytes());
            msg[4..].copy_from_slice(&code.to_ne_bytes());
            libc::write(err_fd, msg.as_ptr().cast(), msg.len());
            libc::_exit(127);
        };

        // Handlers were cleared by CLONE_CLEAR_SIGHAND, but ignored signals stay ignored
        // across execve and Rust ignores SIGPIPE; the mask is inherited too.
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::setsid();
        // Until execve nobody but PID 1 may look into this process: a container's root could
        // otherwise open /proc/PID/fd/N of an exec joining its namespaces, or ptrace it,
        // while it still holds PID 1's descriptors (CVE-2016-9962). execve makes an
        // ordinary program dumpable again.
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        for (target, fd) in stdio.iter().enumerate() {
            if libc::dup2(*fd, target as libc::c_int) < 0 {
                fail(exec_step_index(plan));
            }
        }
        // PID 1's descriptors are closed, not only marked close-on-exec, before any step
        // touches a path the image controls: a directory fd left open could be climbed out
        // of through /proc/self/fd (CVE-2024-21626). `keep` is sorted and holds what the
        // plan itself uses (the error pipe, the sync pipe, a pidfd to join).
        let mut next = 3u32;
        for &fd in keep {
            let fd = fd as u32;
            if fd > next {
                libc::syscall(libc::SYS_close_range, next, fd - 1, 0u32);
            }
            next = next.max(fd + 1);
        }
        libc::syscall(libc::SYS_close_range, next, u32::MAX, 0u32);
        if plan.userns.is_some() || plan.hold {
            // Until the parent has written the maps our ids mean nothing in the namespace;
            // until it has set up the network there is none.
            let mut byte = 0u8;
            if libc::read(sync_fd, (&mut byte as *mut u8).cast(), 1) != 1 {
                fail(HELD_STEP);
            }
        }
        if plan.userns.is_some() {
            // Become the namespace's root (host uid `map.uid`): files the setup creates
            // belong to the container, and its capabilities are kept.
            if libc::syscall(libc::SYS_setresgid, 0, 0, 0) != 0
                || libc::syscall(libc::SYS_setresuid, 0, 0, 0) != 0
            {
                fail(0);
            }
        }
        libc::close(sync_fd);
        // Files and directories the plan creates get exactly the modes it names.
        libc::umask(0);
        // Paths under the rootfs resolve inside it until pivot_root; after it the container's
        // root is the process's own, and `/` is as far as any path can climb.
        let mut root = plan.rootfs.as_deref();
        for (index, step) in plan.steps.iter().enumerate() {
            if !run_step(step, root) {
                fail(index as u32);
            }
            if matches!(step, SetupStep::PivotRoot { .. }) {
                root = None;
            }
        }
        libc::umask(0o022);
        // Nothing of PID 1's leaks in: every fd above 2 closes at execve, the error pipe too.
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
        let mut last_errno = libc::ENOENT;
        for path in &plan.exec_paths {
            libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
            let e = errno();
            // Like execvp: a missing candidate is not the error to report if another exists.
            if e != libc::ENOENT && e != libc::ENOTDIR {
                last_errno = e;
            }
        }
        *libc::__errno_location() = last_errno;
        fail(exec_step_index(plan));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_resolve_like_execvp() {
        assert_eq!(
            exec_candidates("/bin/httpd", Some("/usr/bin")),
            ["/bin/httpd"]
        );
        assert_eq!(exec_candidates("./run", None), ["./run"]);
        assert_eq!(
            exec_candidates("httpd", Some("/usr/bin:/bin/::/sbin")),
            ["/usr/bin/httpd", "/bin/httpd", "/sbin/httpd"]
        );
        assert_eq!(exec_candidates("sh", None).len(), 6);
    }

    #[test]
    fn failures_name_the_step() {
        let steps = vec![
            "mount overlay on /r".to_string(),
            "pivot_root into /r".to_string(),
        ];
        let mut bytes = 1u32.to_ne_bytes().to_vec();
        bytes.extend(libc::EINVAL.to_ne_bytes());
        let msg = describe_failure(&steps, &bytes).unwrap();
        assert!(
            msg.starts_with("pivot_root into /r: Invalid argument"),
            "{msg}"
        );
        let mut bytes = 2u32.to_ne_bytes().to_vec();
        bytes.extend(libc::ENOENT.to_ne_bytes());
        assert!(
            describe_failure(&steps, &bytes)
                .unwrap()
                .starts_with("execve: No such file")
        );
        assert_eq!(describe_failure(&steps, &[1, 2]), None);
    }

    #[test]
    fn namespace_flags() {
        let all = Namespaces {
            mount: true,
            pid: true,
            net: true,
            time: true,
        }
        .clone_flags();
        for flag in [
            libc::CLONE_NEWNS,
            libc::CLONE_NEWUTS,
            libc::CLONE_NEWIPC,
            libc::CLONE_NEWPID,
            libc::CLONE_NEWNET,
            libc::CLONE_NEWTIME,
        ] {
            assert_ne!(all & flag as u64, 0);
        }
        let host = Namespaces {
            mount: true,
            pid: false,
            net: false,
            time: false,
        }
        .clone_flags();
        assert_eq!(host & (libc::CLONE_NEWPID | libc::CLONE_NEWNET) as u64, 0);
        assert_eq!(
            host & libc::CLONE_NEWCGROUP as u64,
            0,
            "the cgroup namespace is unshared by a step"
        );
    }
}
