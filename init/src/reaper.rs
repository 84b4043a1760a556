//! `keel-init --reap -- CMD...`: the minimal init a container gets with `init = true` (like
//! `docker run --init`). It runs CMD as its only child, forwards the signals a supervisor
//! sends, reaps every orphan that lands on it, and exits with CMD's status.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;

/// Signals passed on to the child instead of acting on the reaper.
const FORWARDED: &[libc::c_int] = &[
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGTERM,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
    libc::SIGCONT,
    libc::SIGALRM,
    libc::SIGPIPE,
];

/// The exit code a shell would report for a status.
pub fn exit_code(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        1
    }
}

/// Runs the reaper; never returns.
pub fn run(command: &[std::ffi::OsString]) -> ! {
    let fail = |msg: &str| -> ! {
        eprintln!("keel-init --reap: {msg}");
        std::process::exit(127)
    };
    if command.is_empty() {
        fail("no command given (usage: keel-init --reap -- CMD [ARG]...)");
    }
    let argv: Vec<CString> = command
        .iter()
        .map(|a| {
            CString::new(a.as_bytes()).unwrap_or_else(|_| fail("an argument contains a NUL byte"))
        })
        .collect();
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());

    // SAFETY: plain signal-set manipulation on stack values; the process is single-threaded.
    let (waited, old_mask) = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        for sig in FORWARDED {
            libc::sigaddset(&mut set, *sig);
        }
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigprocmask(libc::SIG_BLOCK, &set, &mut old);
        (set, old)
    };

    // SAFETY: fork in a single-threaded process (no lock can be held by another thread);
    // the child only restores its signal mask and execs.
    let child = unsafe { libc::fork() };
    if child < 0 {
        fail(&format!("fork: {}", std::io::Error::last_os_error()));
    }
    if child == 0 {
        // SAFETY: in the child: restore the mask and exec; _exit if that fails.
        unsafe {
            libc::sigprocmask(libc::SIG_SETMASK, &old_mask, std::ptr::null_mut());
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            libc::execvp(argv_ptrs[0], argv_ptrs.as_ptr());
            libc::_exit(127);
        }
    }

    loop {
        let mut info: libc::siginfo_t = unsafe_zeroed();
        // SAFETY: waits for one of the blocked signals into a stack siginfo.
        let sig = unsafe { libc::sigwaitinfo(&waited, &mut info) };
        if sig < 0 {
            continue;
        }
        if sig != libc::SIGCHLD {
            // SAFETY: signalling our own child by pid; it is not reaped while we run here.
            unsafe { libc::kill(child, sig) };
            continue;
        }
        loop {
            let mut status: libc::c_int = 0;
            // SAFETY: reaps any child without blocking.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            if pid == child {
                std::process::exit(exit_code(status));
            }
        }
    }
}

fn unsafe_zeroed() -> libc::siginfo_t {
    // SAFETY: siginfo_t is a plain C struct; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_shell_exit_codes() {
        assert_eq!(exit_code(3 << 8), 3);
        assert_eq!(exit_code(libc::SIGKILL), 137);
        assert_eq!(exit_code(libc::SIGTERM), 143);
    }
}
