//! Container escape attempts, run inside Keel containers by the isolation tests.
//!
//! Each attempt prints one line, `escape: <name> blocked (<why>)` or
//! `escape: <name> ALLOWED (<what happened>)`, then the program prints
//! `escape: done blocked=<n> allowed=<m>` and exits 0. "blocked" means a security layer
//! refused: EPERM, EACCES, EROFS, ENOSYS (seccomp), or a masked path that reads empty. An
//! error from further in (EINVAL, EBADF, ENXIO...) means the call got past every layer and
//! reached its handler, so it counts as ALLOWED. So does an attempt that could not be made at
//! all: the suite fails closed rather than calling an untested door shut.
//!
//! Everything is safe to run as root on an ordinary machine: what succeeds there is undone
//! (the tmpfs is unmounted, the sysctl gets its own value back, Ctrl-Alt-Del its old mode) or
//! harmless (sysrq `h` prints help, finit_module gets /dev/null, nodes are only opened).
//!
//! The program never starts a thread, so a forked child may use anything the parent could.
//! `--report-euid` prints `euid=<n>` and exits: that is how the setuid copy reports back.

use std::ffi::{CString, c_int, c_long, c_void};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::ptr;

/// Present on a Keel host (the initramfs carries it) and absent from every container image:
/// reading it proves the container reached the host's root.
const HOST_MARKER: &str = "/etc/keel/host.toml";

/// The unprivileged identity the setuid attempt drops to before exec.
const UNPRIVILEGED: libc::uid_t = 1000;

/// Not exported by every libc version; values from linux/keyctl.h.
const KEYCTL_GET_KEYRING_ID: c_long = 0;
const KEY_SPEC_SESSION_KEYRING: c_long = -3;

fn main() -> ExitCode {
    // `keel-escape --notify READY=1`: a minimal sd_notify sender, so the lifecycle tests
    // can exercise NOTIFY_SOCKET from a busybox image.
    if std::env::args_os().nth(1).is_some_and(|a| a == "--notify") {
        let message = std::env::args().nth(2).unwrap_or_else(|| "READY=1".into());
        let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
            eprintln!("keel-escape --notify: NOTIFY_SOCKET is not set");
            return ExitCode::FAILURE;
        };
        let sent = std::os::unix::net::UnixDatagram::unbound()
            .and_then(|s| s.send_to(message.as_bytes(), &socket));
        return match sent {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!(
                    "keel-escape --notify: {}: {e}",
                    std::path::Path::new(&socket).display()
                );
                ExitCode::FAILURE
            }
        };
    }
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "--signal-pid1")
    {
        return signal_pid1();
    }
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "--report-euid")
    {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        println!("euid={euid}");
        return ExitCode::SUCCESS;
    }
    // Before anything of ours is open: every fd above 2 now came from whoever started us.
    let inherited = inherited_fds();
    let scratch = Scratch::create();
    let mut report = Report::default();
    report.run("mount", || mount(&scratch));
    report.run("unshare-user", || {
        unshare(libc::CLONE_NEWUSER, "CLONE_NEWUSER")
    });
    report.run("unshare-net", || {
        unshare(libc::CLONE_NEWNET, "CLONE_NEWNET")
    });
    report.run("ptrace", ptrace);
    report.run("read-kcore", read_kcore);
    report.run("sys-firmware", sys_firmware);
    report.run("write-proc-sys", write_proc_sys);
    report.run("sysrq-trigger", sysrq_trigger);
    report.run("load-module", load_module);
    report.run("reboot", reboot);
    report.run("raw-socket", raw_socket);
    report.run("mknod-block", || mknod_block(&scratch));
    report.run("dev-mem", || dev_mem(&scratch));
    report.run("keyctl", keyctl);
    report.run("io-uring", io_uring);
    report.run("setuid-nnp", || setuid_nnp(&scratch));
    report.run("inherited-fd", || inherited_fd(&inherited, &scratch));
    report.run("volume-mknod", volume_mknod);
    report.run("tmpfs-mknod", || tmpfs_mknod(&scratch));
    report.run("init-overwrite", init_overwrite);
    report.run("api-socket", api_socket);
    scratch.remove();
    report.finish();
    ExitCode::SUCCESS
}

#[derive(Debug)]
struct Outcome {
    allowed: bool,
    detail: String,
}

fn blocked(detail: impl Into<String>) -> Outcome {
    Outcome {
        allowed: false,
        detail: detail.into(),
    }
}

fn allowed(detail: impl Into<String>) -> Outcome {
    Outcome {
        allowed: true,
        detail: detail.into(),
    }
}

/// An attempt that could not be made is not evidence of a wall.
fn not_attempted(why: impl std::fmt::Display) -> Outcome {
    allowed(format!("inconclusive, not attempted: {why}"))
}

/// The refusals of the security layers: capabilities and DAC (EPERM, EACCES), read-only
/// mounts (EROFS), seccomp (EPERM, or ENOSYS for syscalls it pretends not to know).
fn refused(errno: i32) -> bool {
    matches!(
        errno,
        libc::EPERM | libc::EACCES | libc::EROFS | libc::ENOSYS
    )
}

/// The verdict on a call that failed with `errno`.
fn failed(what: &str, errno: i32) -> Outcome {
    if refused(errno) {
        blocked(format!("{what}: {}", errname(errno)))
    } else {
        allowed(format!("{what} reached the kernel: {}", errname(errno)))
    }
}

fn failed_io(what: &str, e: &io::Error) -> Outcome {
    match e.raw_os_error() {
        Some(errno) => failed(what, errno),
        None => not_attempted(format!("{what}: {e}")),
    }
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn errname(errno: i32) -> String {
    let name = match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ESRCH => "ESRCH",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::ENOEXEC => "ENOEXEC",
        libc::ENOSYS => "ENOSYS",
        libc::ENOKEY => "ENOKEY",
        libc::EPROTONOSUPPORT => "EPROTONOSUPPORT",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        _ => return format!("errno {errno}"),
    };
    name.to_string()
}

/// A raw syscall's result: the kernel's value, or the errno it set.
fn sys(ret: c_long) -> Result<c_long, i32> {
    if ret < 0 { Err(errno()) } else { Ok(ret) }
}

fn cstring(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("paths built here have no NUL")
}

#[derive(Default)]
struct Report {
    blocked: u32,
    allowed: u32,
}

impl Report {
    fn run(&mut self, name: &str, attempt: impl FnOnce() -> Outcome) {
        let outcome = attempt();
        let verdict = if outcome.allowed {
            self.allowed += 1;
            "ALLOWED"
        } else {
            self.blocked += 1;
            "blocked"
        };
        // One attempt, one line: the tests parse the console line by line.
        let detail = outcome.detail.replace(['\n', '\r'], " ");
        say(&format!("escape: {name} {verdict} ({detail})"));
    }

    fn finish(&self) {
        say(&format!(
            "escape: done blocked={} allowed={}",
            self.blocked, self.allowed
        ));
    }
}

/// Printed and flushed at once, so a crash in the next attempt cannot swallow the line.
fn say(line: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// A private directory under /tmp for the nodes, mount points and copies the attempts make.
struct Scratch {
    dir: Result<PathBuf, String>,
}

impl Scratch {
    fn create() -> Scratch {
        let dir = PathBuf::from(format!("/tmp/keel-escape.{}", std::process::id()));
        let made = fs::create_dir_all(&dir)
            // 0755: the setuid attempt's unprivileged child must reach its copy in here.
            .and_then(|()| fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)))
            .map(|()| dir.clone())
            .map_err(|e| format!("cannot create {}: {e}", dir.display()));
        Scratch { dir: made }
    }

    /// A path in the scratch directory with nothing left there by an earlier run.
    fn path(&self, name: &str) -> Result<PathBuf, Outcome> {
        let dir = self.dir.as_ref().map_err(not_attempted)?;
        let path = dir.join(name);
        let _ = fs::remove_file(&path);
        let _ = fs::remove_dir(&path);
        Ok(path)
    }

    fn fresh_dir(&self, name: &str) -> Result<PathBuf, Outcome> {
        let path = self.path(name)?;
        fs::create_dir(&path)
            .map_err(|e| not_attempted(format!("mkdir {}: {e}", path.display())))?;
        Ok(path)
    }

    /// Not remove_dir_all: if an unmount ever failed, that would walk into the mount.
    fn remove(&self) {
        if let Ok(dir) = &self.dir {
            for name in ["mnt", "j", "devtmp"] {
                let _ = fs::remove_dir(dir.join(name));
            }
            for name in ["blk", "mem", "suid-escape"] {
                let _ = fs::remove_file(dir.join(name));
            }
            let _ = fs::remove_dir(dir);
        }
    }
}

enum ChildEnd {
    Exited(i32),
    Signaled(i32),
}

/// Runs `f` in a forked child and returns how the child ended; `f`'s result is its exit
/// code. Attempts that would change the calling process (unshare, setuid, chroot) run here.
fn in_child(f: impl FnOnce() -> i32) -> Result<ChildEnd, i32> {
    // Anything still buffered would be written twice, once by each process.
    let _ = io::stdout().flush();
    // SAFETY: the program is single-threaded, so the child is a complete copy of it.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(errno()),
        0 => {
            // Unwinding out of here would run the rest of the parent's program in the child.
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(125);
            // SAFETY: _exit ends the child without running the parent's atexit handlers.
            unsafe { libc::_exit(code) }
        }
        pid => reap(pid),
    }
}

fn reap(pid: libc::pid_t) -> Result<ChildEnd, i32> {
    let mut status = 0;
    loop {
        // SAFETY: status is a valid out-pointer; pid is our own child.
        let ret = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        if ret == pid {
            break;
        }
        if errno() != libc::EINTR {
            return Err(errno());
        }
    }
    if libc::WIFEXITED(status) {
        Ok(ChildEnd::Exited(libc::WEXITSTATUS(status)))
    } else {
        Ok(ChildEnd::Signaled(libc::WTERMSIG(status)))
    }
}

/// A child killed by SIGSYS met a seccomp filter that kills rather than returns an error.
fn signaled(signal: i32) -> Outcome {
    if signal == libc::SIGSYS {
        blocked("the child was killed by SIGSYS (seccomp)")
    } else {
        not_attempted(format!("the child died of signal {signal}"))
    }
}

/// Child exit codes from this base up carry an errno (the largest Linux errno is 133).
const ERRNO_EXIT: i32 = 100;

/// A fresh scratch directory `name` and the result of mounting a 64k tmpfs on it with
/// `flags` (0 or the errno).
fn mount_tmpfs_at(
    scratch: &Scratch,
    name: &str,
    flags: libc::c_ulong,
) -> Result<(PathBuf, CString, i32), Outcome> {
    let dir = scratch.fresh_dir(name)?;
    let target = cstring(&dir);
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let ret = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            flags,
            c"size=64k".as_ptr().cast(),
        )
    };
    let errno = if ret == 0 { 0 } else { errno() };
    Ok((dir, target, errno))
}

fn mount(scratch: &Scratch) -> Outcome {
    let (dir, target, error) = match mount_tmpfs_at(
        scratch,
        "mnt",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
    ) {
        Ok(mounted) => mounted,
        Err(outcome) => return outcome,
    };
    let outcome = if error == 0 {
        // SAFETY: target is a valid path string.
        let undone = unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } == 0;
        allowed(format!(
            "mounted a tmpfs on {}, {}",
            dir.display(),
            if undone {
                "unmounted it again"
            } else {
                "and could not unmount it"
            }
        ))
    } else {
        failed("mount", error)
    };
    let _ = fs::remove_dir(&dir);
    outcome
}

fn unshare(flag: c_int, name: &str) -> Outcome {
    let child = in_child(|| {
        // SAFETY: unshare only changes the calling (child) process.
        if unsafe { libc::unshare(flag) } == 0 {
            0
        } else {
            errno()
        }
    });
    match child {
        Ok(ChildEnd::Exited(0)) => allowed(format!("unshare({name}) succeeded in a child")),
        Ok(ChildEnd::Exited(e)) => failed(&format!("unshare({name})"), e),
        Ok(ChildEnd::Signaled(signal)) => signaled(signal),
        Err(e) => not_attempted(format!("fork: {}", errname(e))),
    }
}

/// A host process cannot even be named from a private pid namespace, so this attaches to a
/// sibling: without CAP_SYS_PTRACE the seccomp profile refuses ptrace as a whole. Processes of
/// another pid namespace showing up in /proc would be a leak of their own.
fn ptrace() -> Outcome {
    let foreign = foreign_pid_namespaces();
    let _ = io::stdout().flush();
    // SAFETY: single-threaded; the child only ever calls pause().
    let pid = unsafe { libc::fork() };
    if pid == -1 {
        return not_attempted(format!("fork: {}", errname(errno())));
    }
    if pid == 0 {
        loop {
            // SAFETY: pause has no preconditions; the parent kills us.
            unsafe { libc::pause() };
        }
    }
    let null = ptr::null_mut::<c_void>();
    // SAFETY: PTRACE_ATTACH takes no addr/data; pid is our child.
    let outcome = match sys(unsafe { libc::ptrace(libc::PTRACE_ATTACH, pid, null, null) }) {
        Ok(_) => {
            let mut status = 0;
            // SAFETY: waits for the attach stop of our own child, then lets it go.
            unsafe {
                libc::waitpid(pid, &mut status, libc::__WALL);
                libc::ptrace(libc::PTRACE_DETACH, pid, null, null);
            }
            allowed("attached to a sibling process")
        }
        Err(e) => failed("ptrace(PTRACE_ATTACH)", e),
    };
    // SAFETY: pid is our child, still unreaped.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = reap(pid);
    match foreign {
        Some(pids) if !pids.is_empty() => allowed(format!(
            "{}; processes of another pid namespace are visible: {}",
            outcome.detail,
            pids.join(" ")
        )),
        _ => outcome,
    }
}

/// Pids in /proc whose pid namespace is not ours (None if ours cannot be read).
fn foreign_pid_namespaces() -> Option<Vec<String>> {
    let own = fs::read_link("/proc/self/ns/pid").ok()?;
    let mut foreign: Vec<String> = fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        .filter(|n| fs::read_link(format!("/proc/{n}/ns/pid")).is_ok_and(|ns| ns != own))
        .collect();
    foreign.truncate(8);
    Some(foreign)
}

fn read_kcore() -> Outcome {
    let mut file = match File::open("/proc/kcore") {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return blocked("no /proc/kcore"),
        Err(e) => return failed_io("open /proc/kcore", &e),
    };
    let mut buf = [0u8; 64];
    match file.read(&mut buf) {
        Ok(0) => blocked("/proc/kcore reads empty (masked)"),
        Ok(n) => allowed(format!(
            "read {n} bytes of /proc/kcore{}",
            if buf.starts_with(b"\x7fELF") {
                ", an ELF header"
            } else {
                ""
            }
        )),
        Err(e) => failed_io("read /proc/kcore", &e),
    }
}

fn sys_firmware() -> Outcome {
    match fs::read_dir("/sys/firmware") {
        Ok(entries) => {
            let mut names: Vec<String> = entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            if names.is_empty() {
                blocked("/sys/firmware lists no entries (masked)")
            } else {
                allowed(format!("/sys/firmware lists {}", names.join(" ")))
            }
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => blocked("no /sys/firmware"),
        Err(e) => failed_io("list /sys/firmware", &e),
    }
}

fn write_proc_sys() -> Outcome {
    let path = "/proc/sys/vm/overcommit_memory";
    // The value goes back unchanged: what matters is whether the write is accepted.
    let value = match fs::read_to_string(path) {
        Ok(v) => v,
        Err(e) => return failed_io(&format!("read {path}"), &e),
    };
    let mut file = match OpenOptions::new().write(true).open(path) {
        Ok(f) => f,
        Err(e) => return failed_io(&format!("open {path} for writing"), &e),
    };
    if is_device(&file) {
        return blocked(format!("{path} is masked by a device node"));
    }
    match file.write_all(value.as_bytes()) {
        Ok(()) => allowed(format!("wrote {} back to {path}", value.trim())),
        Err(e) => failed_io(&format!("write {path}"), &e),
    }
}

/// A proc file masked by binding /dev/null over it accepts writes that go nowhere.
fn is_device(file: &File) -> bool {
    use std::os::unix::fs::FileTypeExt;
    file.metadata()
        .is_ok_and(|m| m.file_type().is_char_device())
}

fn sysrq_trigger() -> Outcome {
    let mut file = match OpenOptions::new().write(true).open("/proc/sysrq-trigger") {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            return blocked("no /proc/sysrq-trigger");
        }
        Err(e) => return failed_io("open /proc/sysrq-trigger for writing", &e),
    };
    if is_device(&file) {
        return blocked("/proc/sysrq-trigger is masked by a device node");
    }
    // `h` only prints the SysRq help to the kernel log.
    match file.write_all(b"h") {
        Ok(()) => allowed("wrote h to /proc/sysrq-trigger"),
        Err(e) => failed_io("write /proc/sysrq-trigger", &e),
    }
}

fn load_module() -> Outcome {
    // /dev/null is no module: past the capability check the loader can only reject it.
    let null = File::open("/dev/null").ok();
    let fd = null.as_ref().map_or(-1, AsRawFd::as_raw_fd);
    // SAFETY: finit_module reads nothing through its pointer but a NUL-terminated string.
    let ret = unsafe { libc::syscall(libc::SYS_finit_module, fd, c"".as_ptr(), 0) };
    match sys(ret) {
        Ok(_) => allowed("finit_module accepted /dev/null"),
        Err(e) => failed("finit_module(/dev/null)", e),
    }
}

fn reboot() -> Outcome {
    let before = fs::read_to_string("/proc/sys/kernel/ctrl-alt-del").ok();
    // CAD_OFF only makes Ctrl-Alt-Del signal init instead of rebooting, and in a child pid
    // namespace the kernel answers EINVAL for it once the caller passed the checks.
    // SAFETY: the last argument is unused by this command.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_reboot,
            libc::LINUX_REBOOT_MAGIC1,
            libc::LINUX_REBOOT_MAGIC2,
            libc::LINUX_REBOOT_CMD_CAD_OFF,
            ptr::null::<c_void>(),
        )
    };
    match sys(ret) {
        Ok(_) => {
            // Only the initial pid namespace gets here: give the machine its old setting back.
            let restored = match before.as_deref().map(str::trim) {
                Some("0") => "it was off already",
                // SAFETY: as above; CAD_ON restores the default of rebooting at once.
                Some(_) => match sys(unsafe {
                    libc::syscall(
                        libc::SYS_reboot,
                        libc::LINUX_REBOOT_MAGIC1,
                        libc::LINUX_REBOOT_MAGIC2,
                        libc::LINUX_REBOOT_CMD_CAD_ON,
                        ptr::null::<c_void>(),
                    )
                }) {
                    Ok(_) => "turned it back on",
                    Err(_) => "could not turn it back on",
                },
                None => "its previous state was unreadable",
            };
            allowed(format!(
                "reboot(CAD_OFF) took effect in the initial pid namespace; {restored}"
            ))
        }
        Err(e) => failed("reboot(LINUX_REBOOT_CMD_CAD_OFF)", e),
    }
}

fn raw_socket() -> Outcome {
    // SAFETY: socket has no pointer arguments.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    if fd >= 0 {
        // SAFETY: fd was just returned to us and is closed once.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
        allowed("opened an AF_INET SOCK_RAW ICMP socket")
    } else {
        failed("socket(AF_INET, SOCK_RAW, IPPROTO_ICMP)", errno())
    }
}

/// mknod(2) of `kind` at `path`, then open(2) read-only: a container may be allowed to make
/// nodes (CAP_MKNOD, as in Docker) as long as its mounts are nodev and it cannot use them.
fn make_and_open(
    path: &Path,
    kind: libc::mode_t,
    (major, minor): (u32, u32),
    what: &str,
) -> Result<OwnedFd, Outcome> {
    let node = cstring(path);
    // SAFETY: node is a valid path string.
    let ret = unsafe { libc::mknod(node.as_ptr(), kind | 0o600, libc::makedev(major, minor)) };
    if ret != 0 {
        return Err(failed(&format!("mknod {what} {major}:{minor}"), errno()));
    }
    // SAFETY: as above; the node is only opened, never read or written here.
    let fd = unsafe { libc::open(node.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        let e = errno();
        return Err(if refused(e) {
            blocked(format!(
                "mknod {what} {major}:{minor} worked, opening it was refused: {}",
                errname(e)
            ))
        } else {
            allowed(format!(
                "mknod {what} {major}:{minor} worked and open reached the driver: {}",
                errname(e)
            ))
        });
    }
    // SAFETY: fd was just returned to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn mknod_block(scratch: &Scratch) -> Outcome {
    let path = match scratch.path("blk") {
        Ok(p) => p,
        Err(outcome) => return outcome,
    };
    let dev = first_disk();
    let outcome = match make_and_open(&path, libc::S_IFBLK, dev, "block device") {
        Ok(_fd) => allowed(format!(
            "created and opened block device {}:{} at {}",
            dev.0,
            dev.1,
            path.display()
        )),
        Err(outcome) => outcome,
    };
    let _ = fs::remove_file(&path);
    outcome
}

fn read_some(fd: &OwnedFd) -> Result<usize, i32> {
    let mut buf = [0u8; 16];
    // SAFETY: buf is writable for its whole length.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    usize::try_from(n).map_err(|_| errno())
}

fn dev_mem(scratch: &Scratch) -> Outcome {
    let (fd, how) = match File::open("/dev/mem") {
        Ok(f) => (OwnedFd::from(f), "/dev/mem".to_string()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            let path = match scratch.path("mem") {
                Ok(p) => p,
                Err(outcome) => return outcome,
            };
            let made = make_and_open(&path, libc::S_IFCHR, (1, 1), "char device");
            let _ = fs::remove_file(&path);
            match made {
                Ok(fd) => (
                    fd,
                    format!("no /dev/mem, but a node 1:1 at {}", path.display()),
                ),
                Err(outcome) => {
                    return Outcome {
                        detail: format!("no /dev/mem; {}", outcome.detail),
                        ..outcome
                    };
                }
            }
        }
        Err(e) => return failed_io("open /dev/mem", &e),
    };
    // Opening it already took CAP_SYS_RAWIO; a lockdown refusing the read is the host's
    // doing, not the container's.
    match read_some(&fd) {
        Ok(n) => allowed(format!("opened {how} and read {n} bytes")),
        Err(e) => allowed(format!("opened {how}; reading it failed: {}", errname(e))),
    }
}

fn keyctl() -> Outcome {
    // SAFETY: KEYCTL_GET_KEYRING_ID takes two integers and no pointers.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            KEYCTL_GET_KEYRING_ID,
            KEY_SPEC_SESSION_KEYRING,
            0,
        )
    };
    match sys(ret) {
        Ok(id) => allowed(format!("session keyring id {id}")),
        Err(e) => failed("keyctl(KEYCTL_GET_KEYRING_ID)", e),
    }
}

fn io_uring() -> Outcome {
    // struct io_uring_params is 120 bytes of integers; zeroed asks for nothing special.
    let mut params = [0u64; 15];
    // SAFETY: params is writable and as large as the kernel's struct io_uring_params.
    let ret = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    match sys(ret) {
        Ok(fd) => {
            // SAFETY: the kernel just returned this fd to us; it is closed once.
            drop(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
            allowed("io_uring_setup created a ring")
        }
        Err(e) => failed("io_uring_setup", e),
    }
}

/// A setuid-root copy of this program, run by an unprivileged child: with no_new_privs the
/// exec keeps the child's euid.
fn setuid_nnp(scratch: &Scratch) -> Outcome {
    let path = match scratch.path("suid-escape") {
        Ok(p) => p,
        Err(outcome) => return outcome,
    };
    if let Err(e) = fs::copy("/proc/self/exe", &path) {
        return not_attempted(format!("copying /proc/self/exe: {e}"));
    }
    let mut notes = Vec::new();
    if let Err(e) = std::os::unix::fs::chown(&path, Some(0), Some(0)) {
        notes.push(format!("chown root:root failed: {e}"));
    }
    if let Err(e) = fs::set_permissions(&path, fs::Permissions::from_mode(0o4755)) {
        notes.push(format!("chmod 04755 failed: {e}"));
    }
    let outcome = run_setuid_copy(&path);
    let _ = fs::remove_file(&path);
    if notes.is_empty() {
        outcome
    } else {
        Outcome {
            detail: format!("{}; {}", outcome.detail, notes.join("; ")),
            ..outcome
        }
    }
}

fn run_setuid_copy(path: &Path) -> Outcome {
    let prog = cstring(path);
    let argv = [
        c"suid-escape".as_ptr(),
        c"--report-euid".as_ptr(),
        ptr::null(),
    ];
    let envp = [ptr::null()];
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return not_attempted(format!("pipe2: {}", errname(errno())));
    }
    // SAFETY: pipe2 just returned these two fds to us.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let child = in_child(|| {
        let fail = |step: &str| {
            let line = format!("error={step}:{}\n", errno());
            // SAFETY: fd 1 is the pipe by now (or still our stdout); line is a valid buffer.
            unsafe { libc::write(1, line.as_ptr().cast(), line.len()) };
            127
        };
        // SAFETY: plain fd and credential calls in the child; argv and envp are
        // NULL-terminated arrays of NUL-terminated strings that outlive execve.
        unsafe {
            if libc::dup2(write_end.as_raw_fd(), 1) < 0 {
                return 127;
            }
            if libc::setgroups(0, ptr::null()) != 0 {
                return fail("setgroups");
            }
            if libc::setgid(UNPRIVILEGED) != 0 {
                return fail("setgid");
            }
            if libc::setuid(UNPRIVILEGED) != 0 {
                return fail("setuid");
            }
            libc::execve(prog.as_ptr(), argv.as_ptr(), envp.as_ptr());
        }
        fail("execve")
    });
    // Our copy of the write end must go, or the read below never sees EOF.
    drop(write_end);
    let mut output = String::new();
    let _ = File::from(read_end).read_to_string(&mut output);
    match child {
        Ok(ChildEnd::Signaled(signal)) => return signaled(signal),
        Err(e) => return not_attempted(format!("fork: {}", errname(e))),
        Ok(ChildEnd::Exited(_)) => {}
    }
    let value = |key: &str| {
        output
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::to_owned)
    };
    if let Some(euid) = value("euid=") {
        if euid == "0" {
            return allowed(format!(
                "uid {UNPRIVILEGED} ran a setuid-root binary and got euid 0"
            ));
        }
        let nnp = fs::read_to_string("/proc/self/status")
            .is_ok_and(|s| s.lines().any(|l| l == "NoNewPrivs:\t1"));
        return blocked(if nnp {
            format!("no_new_privs kept euid {euid}")
        } else {
            format!("euid stayed {euid} without no_new_privs (a nosuid mount?)")
        });
    }
    match value("error=").and_then(|e| {
        let (step, errno) = e.split_once(':')?;
        Some((step.to_string(), errno.parse::<i32>().ok()?))
    }) {
        Some((step, e)) if step == "execve" => failed("execve of the setuid copy", e),
        Some((step, e)) => not_attempted(format!("{step}({UNPRIVILEGED}): {}", errname(e))),
        None => not_attempted(format!("the child printed {output:?}")),
    }
}

/// Open fds above 2, listed before the program opened any of its own.
fn inherited_fds() -> Vec<RawFd> {
    let Ok(entries) = fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    let listed: Vec<RawFd> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    // The listing's own fd is in there: it is closed by now, so F_GETFD tells it apart.
    listed
        .into_iter()
        // SAFETY: F_GETFD only queries the descriptor table.
        .filter(|fd| unsafe { libc::fcntl(*fd, libc::F_GETFD) } != -1)
        .collect()
}

/// Where `..` from a leaked directory fd leads: runc's CVE-2024-21626 climbed out of the
/// container this way through an fd opened on the host before pivot_root.
fn climb_from(fd: RawFd) -> String {
    let child = in_child(|| {
        // SAFETY: fchdir, chdir and access only change or query the child's own state.
        unsafe {
            if libc::fchdir(fd) != 0 {
                return ERRNO_EXIT + errno();
            }
            for _ in 0..64 {
                libc::chdir(c"..".as_ptr());
            }
            let marker = CString::new(&HOST_MARKER[1..]).expect("no NUL");
            i32::from(libc::access(marker.as_ptr(), libc::R_OK) == 0)
        }
    });
    match child {
        Ok(ChildEnd::Exited(1)) => format!("climbing .. from it reaches the host's {HOST_MARKER}"),
        Ok(ChildEnd::Exited(0)) => "climbing .. from it does not reach the host marker".into(),
        Ok(ChildEnd::Exited(code)) if code >= ERRNO_EXIT => {
            format!("fchdir: {}", errname(code - ERRNO_EXIT))
        }
        _ => "could not climb from it".into(),
    }
}

fn inherited_fd(inherited: &[RawFd], scratch: &Scratch) -> Outcome {
    if Path::new(HOST_MARKER).exists() {
        return allowed(format!(
            "the host's {HOST_MARKER} is visible in the container"
        ));
    }
    if !inherited.is_empty() {
        let leaks: Vec<String> = inherited
            .iter()
            .map(|fd| {
                let target = fs::read_link(format!("/proc/self/fd/{fd}"))
                    .map_or_else(|e| format!("? ({e})"), |t| t.display().to_string());
                format!("fd {fd} -> {target}: {}", climb_from(*fd))
            })
            .collect();
        return allowed(format!("inherited {}", leaks.join("; ")));
    }
    // No fd to climb from: try the classic chroot escape, which only works where the root
    // was set by chroot rather than pivot_root.
    let jail = match scratch.fresh_dir("j") {
        Ok(dir) => cstring(&dir),
        Err(outcome) => return outcome,
    };
    let root_id = |path: &std::ffi::CStr| {
        // SAFETY: st is a valid out-buffer for stat.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: path is a valid string and st a valid out-pointer.
        (unsafe { libc::stat(path.as_ptr(), &mut st) } == 0).then_some((st.st_dev, st.st_ino))
    };
    let before = root_id(c"/");
    let child = in_child(|| {
        let marker = CString::new(HOST_MARKER).expect("no NUL");
        // SAFETY: chroot, chdir and access only change or query the child's own state.
        unsafe {
            if libc::chroot(jail.as_ptr()) != 0 {
                return ERRNO_EXIT + errno();
            }
            // The cwd stayed outside the new root, so `..` is not stopped by it.
            for _ in 0..64 {
                libc::chdir(c"..".as_ptr());
            }
            if libc::chroot(c".".as_ptr()) != 0 {
                return ERRNO_EXIT + errno();
            }
            if libc::access(marker.as_ptr(), libc::R_OK) == 0 {
                return 10;
            }
        }
        if root_id(c"/") != before { 11 } else { 0 }
    });
    let _ = fs::remove_dir(scratch.dir.as_ref().map_or(Path::new(""), |d| d).join("j"));
    match child {
        Ok(ChildEnd::Exited(0)) => {
            blocked("no inherited fds; the chroot trick stayed inside the root")
        }
        Ok(ChildEnd::Exited(10)) => {
            allowed(format!("the chroot trick reached the host's {HOST_MARKER}"))
        }
        Ok(ChildEnd::Exited(11)) => allowed("the chroot trick reached another root"),
        Ok(ChildEnd::Exited(code)) if code >= ERRNO_EXIT => {
            let e = code - ERRNO_EXIT;
            if refused(e) {
                blocked(format!("no inherited fds; chroot: {}", errname(e)))
            } else {
                not_attempted(format!("chroot: {}", errname(e)))
            }
        }
        Ok(ChildEnd::Exited(code)) => not_attempted(format!("the child exited {code}")),
        Ok(ChildEnd::Signaled(signal)) => signaled(signal),
        Err(e) => not_attempted(format!("fork: {}", errname(e))),
    }
}

/// The guest's first disk as (major, minor), or sd's first disk: the node works even without
/// such a disk (open then fails with ENXIO, past every check).
fn first_disk() -> (u32, u32) {
    fs::read_to_string("/sys/block/vda/dev")
        .ok()
        .and_then(|d| {
            let (major, minor) = d.trim().split_once(':')?;
            Some((major.parse().ok()?, minor.parse().ok()?))
        })
        .unwrap_or((8, 0))
}

/// A block device node made in the directory `dir`, then opened.
fn block_node_in(dir: &Path, what: &str) -> Outcome {
    let path = dir.join(format!("keel-escape-blk.{}", std::process::id()));
    let _ = fs::remove_file(&path);
    let dev = first_disk();
    let outcome = match make_and_open(&path, libc::S_IFBLK, dev, "block device") {
        Ok(_fd) => allowed(format!(
            "created and opened block device {}:{} in {what}",
            dev.0, dev.1
        )),
        Err(outcome) => Outcome {
            detail: format!("in {what}: {}", outcome.detail),
            ..outcome
        },
    };
    let _ = fs::remove_file(&path);
    outcome
}

/// The volume the host file gives the container (KEEL_ESCAPE_VOLUME): writable, so the
/// container can make nodes there; they must not work (nodev, the device policy).
fn volume_mknod() -> Outcome {
    let Some(dir) = std::env::var_os("KEEL_ESCAPE_VOLUME") else {
        return not_attempted("KEEL_ESCAPE_VOLUME is not set");
    };
    block_node_in(Path::new(&dir), "a volume")
}

/// A tmpfs of the container's own, mounted without nodev (possible with CAP_SYS_ADMIN): only
/// the device policy stands between a node there and the disk.
fn tmpfs_mknod(scratch: &Scratch) -> Outcome {
    let (dir, target, error) = match mount_tmpfs_at(scratch, "devtmp", 0) {
        Ok(mounted) => mounted,
        Err(outcome) => return outcome,
    };
    if error != 0 {
        let outcome = failed("mount tmpfs without nodev", error);
        let _ = fs::remove_dir(&dir);
        return outcome;
    }
    let outcome = block_node_in(&dir, "a tmpfs mounted without nodev");
    // SAFETY: target is a valid path string.
    unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    let _ = fs::remove_dir(&dir);
    outcome
}

/// /dev/init, the reaper Keel binds into the container: making its bind writable is the
/// container's own business, changing the file is not (CVE-2019-5736). ETXTBSY counts as
/// getting through: only the running reaper stood in the way, not a wall.
fn init_overwrite() -> Outcome {
    let init = Path::new("/dev/init");
    if !init.exists() {
        return not_attempted("no /dev/init (the container needs init = true)");
    }
    let target = cstring(init);
    let mut notes = Vec::new();
    for (flags, what) in [
        (libc::MS_REMOUNT | libc::MS_BIND, "bind remount rw"),
        (libc::MS_REMOUNT, "superblock remount rw"),
    ] {
        // SAFETY: target is a valid path string; the other pointers may be null.
        let ret = unsafe {
            libc::mount(
                ptr::null(),
                target.as_ptr(),
                ptr::null(),
                flags,
                ptr::null(),
            )
        };
        notes.push(if ret == 0 {
            format!("{what}: ok")
        } else {
            format!("{what}: {}", errname(errno()))
        });
    }
    let before =
        fs::metadata(init).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()));
    match OpenOptions::new().write(true).open(init) {
        Ok(_) => {
            return allowed(format!(
                "opened /dev/init for writing ({})",
                notes.join(", ")
            ));
        }
        Err(e) if e.raw_os_error().is_some_and(|e| !refused(e)) => {
            return allowed(format!(
                "opening /dev/init for writing reached the file: {} ({})",
                errname(e.raw_os_error().unwrap_or(0)),
                notes.join(", ")
            ));
        }
        Err(e) => notes.push(format!("open for writing: {e}")),
    }
    match fs::set_permissions(init, fs::Permissions::from_mode(0o4755)) {
        Ok(()) => {
            if let Ok(mode) = before {
                let _ = fs::set_permissions(init, fs::Permissions::from_mode(mode & 0o7777));
            }
            allowed(format!(
                "chmod 4755 /dev/init worked ({})",
                notes.join(", ")
            ))
        }
        Err(e) if e.raw_os_error().is_some_and(refused) => {
            blocked(format!("chmod: {e}; {}", notes.join(", ")))
        }
        Err(e) => allowed(format!("chmod reached the file: {e}; {}", notes.join(", "))),
    }
}

/// PID 1's API socket, if the host file gave the container its directory
/// (KEEL_ESCAPE_API): root in a container must not be served.
fn api_socket() -> Outcome {
    let Some(path) = std::env::var_os("KEEL_ESCAPE_API") else {
        return not_attempted("KEEL_ESCAPE_API is not set");
    };
    let mut stream = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) => return failed_io("connect to the API socket", &e),
    };
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(10)));
    // A server that refuses may answer and close before reading: the answer is read even
    // if the request could not be written.
    let written = stream.write_all(b"{\"version\":1,\"request\":{\"op\":\"ps\"}}\n");
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.contains(&b'\n') {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if answer.is_empty() && written.is_ok() => {
                return failed_io("read the answer", &e);
            }
            Err(_) => break,
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    if let (Err(e), false) = (&written, answer.contains("forbidden")) {
        return failed_io("write a request", e);
    }
    let first: String = answer
        .lines()
        .next()
        .unwrap_or("")
        .chars()
        .take(160)
        .collect();
    if answer.contains("forbidden") {
        blocked(format!("the API refused: {first}"))
    } else if answer.is_empty() {
        blocked("the API closed the connection without an answer")
    } else {
        allowed(format!("the API answered: {first}"))
    }
}

/// `--signal-pid1`, for a container sharing the host's pid namespace: SIGUSR1 (statistics)
/// and SIGTERM (power off) to pid 1, which must ignore both from a container. Only the test
/// can judge (by PID 1's log and the host staying up); this reports what was sent, then waits.
fn signal_pid1() -> ExitCode {
    let mut sent = Vec::new();
    for (signal, name) in [(libc::SIGUSR1, "SIGUSR1"), (libc::SIGTERM, "SIGTERM")] {
        // SAFETY: kill has no pointer arguments.
        let ret = unsafe { libc::kill(1, signal) };
        sent.push(if ret == 0 {
            format!("{name} sent")
        } else {
            format!("{name}: {}", errname(errno()))
        });
    }
    say(&format!("escape: signal-pid1 {}", sent.join(", ")));
    // Alive until the container is stopped: PID 1 checks a sender through its /proc entry,
    // and one that is gone could not be told apart from any other refusal.
    loop {
        // SAFETY: pause has no preconditions.
        unsafe { libc::pause() };
    }
}
