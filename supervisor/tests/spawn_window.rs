//! Host test of the window between clone3 and execve, held open: a child spawned with
//! `hold` waits on its gate before its first step, which is exactly where a process joining a
//! running container (`keel exec`) sits while a hostile container root could look at it.
//!
//! - It holds none of its parent's descriptors but its two pipes (CVE-2024-21626: a leaked
//!   directory fd is a way out of the root), although the parent has others open and not
//!   close-on-exec.
//! - It is not dumpable: a process of the same uid and the same capabilities, without
//!   CAP_SYS_PTRACE — container root in a default container, once an exec has dropped to
//!   the container's set — cannot open its /proc/PID/fd (CVE-2016-9962).
//!
//! The spawning runs in a helper process that clears CAP_SYS_PTRACE from its effective set
//! first, so the held child and the peeking process have the same capabilities and only
//! dumpability decides.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};

use keel_supervisor::spawn::{Namespaces, SetupPlan, spawn};

mod common;
use common::TestCgroup;

/// In a forked child (same uid and capabilities as the held one, CAP_SYS_PTRACE not
/// effective): tries to read where the held process's fd 0 points. Returns 0 on success,
/// else the errno.
fn peek_without_ptrace_cap(pid: libc::pid_t) -> i32 {
    let path = CString::new(format!("/proc/{pid}/fd/0")).unwrap();
    // SAFETY: the child only makes raw system calls on memory prepared before the fork,
    // then _exits.
    unsafe {
        let child = libc::fork();
        if child == 0 {
            let mut buf = [0u8; 256];
            let n = libc::readlink(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len());
            libc::_exit(if n >= 0 { 0 } else { *libc::__errno_location() });
        }
        let mut status = 0;
        libc::waitpid(child, &mut status, 0);
        libc::WEXITSTATUS(status)
    }
}

/// Drops CAP_SYS_PTRACE from this process's effective and permitted sets (staying uid 0,
/// like container root): what it spawns and forks then has exactly the same sets, so the
/// capability check of ptrace between two of them passes and only dumpability decides.
fn drop_ptrace_capability() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let mut data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    let ptrace_bit = 1u32 << 19; // CAP_SYS_PTRACE
    // SAFETY: header and data are the kernel's structs, data has room for two.
    unsafe {
        assert_eq!(
            libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()),
            0
        );
        data[0].effective &= !ptrace_bit;
        data[0].permitted &= !ptrace_bit;
        assert_eq!(
            libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()),
            0
        );
    }
}

/// Waits until the held child sits in read(2) on its gate: by then it has done everything
/// it does before its first step.
fn wait_at_gate(pid: libc::pid_t) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let syscall = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
        // x86_64: read is syscall 0.
        if syscall.starts_with("0 ") {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the child never reached its gate: {syscall}"
        );
        std::thread::yield_now();
    }
}

/// Run in a process of its own by the test below (it changes its capabilities): spawns the
/// held child, prints its pid, waits for a line on stdin (the test has looked at the child
/// with full privileges meanwhile), then peeks as container root would and lets it go.
#[test]
fn held_child_helper() {
    if std::env::var_os("KEEL_SPAWN_WINDOW_HELPER").is_none() {
        return;
    }
    drop_ptrace_capability();
    let cgroup = TestCgroup::new("spawntest");
    let cgroup_dir: OwnedFd = std::fs::File::open(&cgroup.0).unwrap().into();

    // Descriptors of the parent a careless child would keep: one not even close-on-exec.
    let leaked_dir: OwnedFd = std::fs::File::open("/").unwrap().into();
    // SAFETY: F_SETFD on our own open fd.
    unsafe { libc::fcntl(leaked_dir.as_raw_fd(), libc::F_SETFD, 0) };
    let null = std::fs::File::open("/dev/null").unwrap();

    let plan = SetupPlan {
        namespaces: Namespaces {
            mount: false,
            pid: false,
            net: false,
            time: false,
        },
        userns: None,
        hold: true,
        steps: Vec::new(),
        rootfs: None,
        exec_paths: vec![CString::new("/bin/true").unwrap()],
        argv: vec![CString::new("true").unwrap()],
        envp: Vec::new(),
    };
    let fd = null.as_raw_fd();
    let spawned = spawn(&plan, &cgroup_dir, [fd, fd, fd]).expect("spawn");
    let pid = spawned.pid;
    println!("held-pid={pid} leaked-fd={}", leaked_dir.as_raw_fd());
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    let peek = peek_without_ptrace_cap(pid);

    spawned
        .gate
        .expect("held")
        .open()
        .expect("opening the gate");
    let mut status = 0;
    // SAFETY: pid is our child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    drop(cgroup);
    assert!(
        peek == libc::EACCES || peek == libc::EPERM,
        "a process with the same uid and capabilities read the held child's fds (result {peek})"
    );
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{status}"
    );
}

#[test]
fn the_held_child_has_no_leaked_fds_and_cannot_be_inspected() {
    use std::io::{BufRead, Write};
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    let mut helper = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "held_child_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("KEEL_SPAWN_WINDOW_HELPER", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("running the helper");
    let mut lines = std::io::BufReader::new(helper.stdout.take().unwrap()).lines();
    let (pid, leaked) = loop {
        let line = lines
            .next()
            .expect("the helper ended before spawning")
            .unwrap();
        // libtest may have printed `test held_child_helper ... ` on the same line.
        if let Some((_, rest)) = line.split_once("held-pid=") {
            let (pid, leaked) = rest.split_once(" leaked-fd=").unwrap();
            break (pid.parse::<i32>().unwrap(), leaked.parse::<i32>().unwrap());
        }
    };
    // With every privilege (as PID 1): where the child is, what it holds.
    wait_at_gate(pid);
    let fds: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("listing the held child's fds")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    writeln!(helper.stdin.take().unwrap(), "go").unwrap();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = helper.wait().unwrap();

    let mut extra: Vec<i32> = fds.into_iter().filter(|fd| *fd > 2).collect();
    extra.sort_unstable();
    assert!(
        !extra.contains(&leaked) && extra.len() <= 2,
        "the held child kept fds above 2 {extra:?} (leaked: {leaked}): only its error and \
         sync pipes may stay"
    );
    assert!(status.success(), "the helper failed:\n{}", rest.join("\n"));
}
