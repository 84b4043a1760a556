//! Docker's default seccomp profile (moby `profiles/seccomp/default.json`) for x86_64,
//! compiled to classic BPF once per distinct capability set and installed in the clone3
//! child with a single seccomp(2) call.
//!
//! The profile follows Docker's semantics: everything not listed fails with EPERM; about 300
//! system calls are allowed unconditionally; `socket`, `personality` and `clone` are allowed
//! for some arguments only; some groups are unlocked by capabilities (`SYS_ADMIN` unlocks
//! mount, unshare, setns, ...). Deviations, each stricter than Docker:
//!
//! - `ptrace`, `process_vm_readv` and `process_vm_writev` need `SYS_PTRACE`. Docker allows
//!   them on kernels >= 4.8, where the kernel's own ptrace checks are sound; Keel's escape
//!   suite asserts that a container cannot even try to trace a process outside it.
//! - i386 (`int 0x80`) system calls kill the process and x32 ones (`nr | 0x4000_0000`) fail
//!   with EPERM. Docker allows both sub-architectures; nothing Keel runs needs them, and
//!   they have a history of bugs.
//! - `io_uring_*` stay blocked (as in Docker since 2023) and the `lsm_*` calls need
//!   `SYS_ADMIN` (moby PR 50097).
//!
//! A `privileged` container gets no filter; that decision is the caller's.
//!
//! seccompiler (pure Rust) builds the body. It has one action for every match, so the one
//! rule with a different action, `clone3` → ENOSYS without `SYS_ADMIN`, is a hand-written
//! prefix (see `clone3_enosys_prefix`). seccompiler emits a linear chain ordered by syscall
//! number, so the hot low-numbered calls (read, write, mmap, ...) are decided in a few
//! instructions.

#[cfg(not(target_arch = "x86_64"))]
compile_error!("the seccomp profile lists x86_64 system call numbers only");

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};
use thiserror::Error;

/// Why a profile could not be built.
#[derive(Debug, Error)]
pub enum SeccompError {
    /// seccompiler rejected the rules; a bug in the tables below, not in the input.
    #[error("seccomp profile does not compile: {0}")]
    Compile(#[from] BackendError),
    /// The kernel refuses programs longer than `BPF_MAXINSNS` instructions.
    #[error("seccomp program has {0} instructions, the kernel accepts at most 4096")]
    TooLarge(usize),
}

/// A compiled filter, ready to be installed any number of times.
#[derive(Clone)]
pub struct Program {
    instructions: Vec<libc::sock_filter>,
    /// `sock_fprog.len`, checked once at compile time so `install` cannot fail on it.
    len: u16,
}

impl std::fmt::Debug for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // libc::sock_filter has no Debug impl without libc's extra_traits feature.
        f.debug_struct("Program")
            .field("instructions", &self.len)
            .finish()
    }
}

impl Program {
    /// Number of BPF instructions.
    pub fn len(&self) -> usize {
        self.instructions.len()
    }

    /// Always false for programs built here; present for API symmetry with `len`.
    pub fn is_empty(&self) -> bool {
        self.instructions.is_empty()
    }

    /// Installs the filter on the calling thread: one seccomp(2) call
    /// (`SECCOMP_SET_MODE_FILTER`, flags 0) on memory prepared at compile time, no
    /// allocation, so it is async-signal-safe and fit for the child of a clone in a
    /// multi-threaded process. Returns false, with errno set, on failure.
    ///
    /// # Safety
    ///
    /// The filter is irreversible and inherited by every child and across execve. The caller
    /// must have set `PR_SET_NO_NEW_PRIVS` or hold `CAP_SYS_ADMIN`, and must only run code
    /// afterwards that copes with the denied system calls (normally: just execve).
    pub unsafe fn install(&self) -> bool {
        let fprog = libc::sock_fprog {
            len: self.len,
            // The kernel only reads through this pointer; the field is `*mut` in the C ABI.
            filter: self.instructions.as_ptr().cast_mut(),
        };
        // SAFETY: `fprog` describes `self.instructions`, which outlives the call, and `len`
        // equals its length; the kernel copies the program before returning.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::c_ulong::from(libc::SECCOMP_SET_MODE_FILTER),
                0 as libc::c_ulong,
                &raw const fprog,
            )
        };
        rc == 0
    }
}

/// Compiles Docker's default profile for a container holding `capabilities`: names without
/// the `CAP_` prefix, e.g. "SYS_ADMIN" (a leading `CAP_` is tolerated). Names that gate no
/// system call are ignored.
pub fn docker_default(capabilities: &[String]) -> Result<Program, SeccompError> {
    compile(Gates::from_names(capabilities))
}

/// Compiles each distinct profile once; PID 1 keeps one cache for all container starts.
///
/// The key is the set of capabilities that change the profile, so two containers whose
/// capability lists differ only in, say, `NET_ADMIN` share one program.
#[derive(Debug, Default)]
pub struct ProgramCache {
    programs: HashMap<Gates, Arc<Program>>,
}

impl ProgramCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// The profile for `capabilities` (see [`docker_default`]), compiled on first use.
    pub fn get(&mut self, capabilities: &[String]) -> Result<Arc<Program>, SeccompError> {
        let gates = Gates::from_names(capabilities);
        if let Some(program) = self.programs.get(&gates) {
            return Ok(Arc::clone(program));
        }
        let program = Arc::new(compile(gates)?);
        self.programs.insert(gates, Arc::clone(&program));
        Ok(program)
    }

    /// How many programs have been compiled so far.
    pub fn compiled(&self) -> usize {
        self.programs.len()
    }
}

// x86_64 numbers that libc 0.2.191 does not define yet. They are kernel ABI, from
// arch/x86/entry/syscalls/syscall_64.tbl (the same values as linux-raw-sys 0.12).
const SYS_IO_PGETEVENTS: i64 = 333;
const SYS_URETPROBE: i64 = 335;
const SYS_CACHESTAT: i64 = 451;
const SYS_MAP_SHADOW_STACK: i64 = 453;
const SYS_FUTEX_WAKE: i64 = 454;
const SYS_FUTEX_WAIT: i64 = 455;
const SYS_FUTEX_REQUEUE: i64 = 456;
const SYS_STATMOUNT: i64 = 457;
const SYS_LISTMOUNT: i64 = 458;
const SYS_LSM_GET_SELF_ATTR: i64 = 459;
const SYS_LSM_SET_SELF_ATTR: i64 = 460;
const SYS_LSM_LIST_MODULES: i64 = 461;
const SYS_SETXATTRAT: i64 = 463;
const SYS_GETXATTRAT: i64 = 464;
const SYS_LISTXATTRAT: i64 = 465;
const SYS_REMOVEXATTRAT: i64 = 466;

/// Docker's unconditional allow-list, restricted to names that exist on x86_64 (the
/// `*32`/`*64`/`*_time64` variants, `socketcall`, `ipc`, `mmap2`, ... are i386 or other
/// architectures only), plus its x86_64 extras `arch_prctl` and `modify_ldt`. `io_uring_*`
/// are absent, as in Docker since moby commit 891241e7e7.
const ALWAYS: &[i64] = &[
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_access,
    libc::SYS_adjtimex,
    libc::SYS_alarm,
    libc::SYS_arch_prctl,
    libc::SYS_bind,
    libc::SYS_brk,
    SYS_CACHESTAT,
    libc::SYS_capget,
    libc::SYS_capset,
    libc::SYS_chdir,
    libc::SYS_chmod,
    libc::SYS_chown,
    libc::SYS_clock_adjtime,
    libc::SYS_clock_getres,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_close,
    libc::SYS_close_range,
    libc::SYS_connect,
    libc::SYS_copy_file_range,
    libc::SYS_creat,
    libc::SYS_dup,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_epoll_create,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_ctl_old,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_wait_old,
    libc::SYS_eventfd,
    libc::SYS_eventfd2,
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_fadvise64,
    libc::SYS_fallocate,
    libc::SYS_fanotify_mark,
    libc::SYS_fchdir,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchmodat2,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_fcntl,
    libc::SYS_fdatasync,
    libc::SYS_fgetxattr,
    libc::SYS_flistxattr,
    libc::SYS_flock,
    libc::SYS_fork,
    libc::SYS_fremovexattr,
    libc::SYS_fsetxattr,
    libc::SYS_fstat,
    libc::SYS_fstatfs,
    libc::SYS_fsync,
    libc::SYS_ftruncate,
    libc::SYS_futex,
    SYS_FUTEX_REQUEUE,
    SYS_FUTEX_WAIT,
    libc::SYS_futex_waitv,
    SYS_FUTEX_WAKE,
    libc::SYS_futimesat,
    libc::SYS_getcpu,
    libc::SYS_getcwd,
    libc::SYS_getdents,
    libc::SYS_getdents64,
    libc::SYS_getegid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getgroups,
    libc::SYS_getitimer,
    libc::SYS_getpeername,
    libc::SYS_getpgid,
    libc::SYS_getpgrp,
    libc::SYS_getpid,
    libc::SYS_getppid,
    libc::SYS_getpriority,
    libc::SYS_getrandom,
    libc::SYS_getresgid,
    libc::SYS_getresuid,
    libc::SYS_getrlimit,
    libc::SYS_get_robust_list,
    libc::SYS_getrusage,
    libc::SYS_getsid,
    libc::SYS_getsockname,
    libc::SYS_getsockopt,
    libc::SYS_get_thread_area,
    libc::SYS_gettid,
    libc::SYS_gettimeofday,
    libc::SYS_getuid,
    libc::SYS_getxattr,
    SYS_GETXATTRAT,
    libc::SYS_inotify_add_watch,
    libc::SYS_inotify_init,
    libc::SYS_inotify_init1,
    libc::SYS_inotify_rm_watch,
    libc::SYS_io_cancel,
    libc::SYS_ioctl,
    libc::SYS_io_destroy,
    libc::SYS_io_getevents,
    SYS_IO_PGETEVENTS,
    libc::SYS_ioprio_get,
    libc::SYS_ioprio_set,
    libc::SYS_io_setup,
    libc::SYS_io_submit,
    libc::SYS_kill,
    libc::SYS_landlock_add_rule,
    libc::SYS_landlock_create_ruleset,
    libc::SYS_landlock_restrict_self,
    libc::SYS_lchown,
    libc::SYS_lgetxattr,
    libc::SYS_link,
    libc::SYS_linkat,
    libc::SYS_listen,
    SYS_LISTMOUNT,
    libc::SYS_listxattr,
    SYS_LISTXATTRAT,
    libc::SYS_llistxattr,
    libc::SYS_lremovexattr,
    libc::SYS_lseek,
    libc::SYS_lsetxattr,
    libc::SYS_lstat,
    libc::SYS_madvise,
    SYS_MAP_SHADOW_STACK,
    libc::SYS_membarrier,
    libc::SYS_memfd_create,
    libc::SYS_memfd_secret,
    libc::SYS_mincore,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_mknod,
    libc::SYS_mknodat,
    libc::SYS_mlock,
    libc::SYS_mlock2,
    libc::SYS_mlockall,
    libc::SYS_mmap,
    libc::SYS_modify_ldt,
    libc::SYS_mprotect,
    libc::SYS_mq_getsetattr,
    libc::SYS_mq_notify,
    libc::SYS_mq_open,
    libc::SYS_mq_timedreceive,
    libc::SYS_mq_timedsend,
    libc::SYS_mq_unlink,
    libc::SYS_mremap,
    libc::SYS_mseal,
    libc::SYS_msgctl,
    libc::SYS_msgget,
    libc::SYS_msgrcv,
    libc::SYS_msgsnd,
    libc::SYS_msync,
    libc::SYS_munlock,
    libc::SYS_munlockall,
    libc::SYS_munmap,
    libc::SYS_name_to_handle_at,
    libc::SYS_nanosleep,
    libc::SYS_newfstatat,
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_pause,
    libc::SYS_pidfd_open,
    libc::SYS_pidfd_send_signal,
    libc::SYS_pipe,
    libc::SYS_pipe2,
    libc::SYS_pkey_alloc,
    libc::SYS_pkey_free,
    libc::SYS_pkey_mprotect,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_prctl,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_preadv2,
    libc::SYS_prlimit64,
    libc::SYS_process_mrelease,
    libc::SYS_pselect6,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_pwritev2,
    libc::SYS_read,
    libc::SYS_readahead,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_recvmmsg,
    libc::SYS_recvmsg,
    libc::SYS_remap_file_pages,
    libc::SYS_removexattr,
    SYS_REMOVEXATTRAT,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_restart_syscall,
    libc::SYS_rmdir,
    libc::SYS_rseq,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigpending,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigqueueinfo,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigsuspend,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_rt_tgsigqueueinfo,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_getattr,
    libc::SYS_sched_getparam,
    libc::SYS_sched_get_priority_max,
    libc::SYS_sched_get_priority_min,
    libc::SYS_sched_getscheduler,
    libc::SYS_sched_rr_get_interval,
    libc::SYS_sched_setaffinity,
    libc::SYS_sched_setattr,
    libc::SYS_sched_setparam,
    libc::SYS_sched_setscheduler,
    libc::SYS_sched_yield,
    libc::SYS_seccomp,
    libc::SYS_select,
    libc::SYS_semctl,
    libc::SYS_semget,
    libc::SYS_semop,
    libc::SYS_semtimedop,
    libc::SYS_sendfile,
    libc::SYS_sendmmsg,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_setfsgid,
    libc::SYS_setfsuid,
    libc::SYS_setgid,
    libc::SYS_setgroups,
    libc::SYS_setitimer,
    libc::SYS_setpgid,
    libc::SYS_setpriority,
    libc::SYS_setregid,
    libc::SYS_setresgid,
    libc::SYS_setresuid,
    libc::SYS_setreuid,
    libc::SYS_setrlimit,
    libc::SYS_set_robust_list,
    libc::SYS_setsid,
    libc::SYS_setsockopt,
    libc::SYS_set_thread_area,
    libc::SYS_set_tid_address,
    libc::SYS_setuid,
    libc::SYS_setxattr,
    SYS_SETXATTRAT,
    libc::SYS_shmat,
    libc::SYS_shmctl,
    libc::SYS_shmdt,
    libc::SYS_shmget,
    libc::SYS_shutdown,
    libc::SYS_sigaltstack,
    libc::SYS_signalfd,
    libc::SYS_signalfd4,
    libc::SYS_socketpair,
    libc::SYS_splice,
    libc::SYS_stat,
    libc::SYS_statfs,
    SYS_STATMOUNT,
    libc::SYS_statx,
    libc::SYS_symlink,
    libc::SYS_symlinkat,
    libc::SYS_sync,
    libc::SYS_sync_file_range,
    libc::SYS_syncfs,
    libc::SYS_sysinfo,
    libc::SYS_tee,
    libc::SYS_tgkill,
    libc::SYS_time,
    libc::SYS_timer_create,
    libc::SYS_timer_delete,
    libc::SYS_timer_getoverrun,
    libc::SYS_timer_gettime,
    libc::SYS_timer_settime,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_gettime,
    libc::SYS_timerfd_settime,
    libc::SYS_times,
    libc::SYS_tkill,
    libc::SYS_truncate,
    libc::SYS_umask,
    libc::SYS_uname,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    SYS_URETPROBE,
    libc::SYS_utime,
    libc::SYS_utimensat,
    libc::SYS_utimes,
    libc::SYS_vfork,
    libc::SYS_vmsplice,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_write,
    libc::SYS_writev,
];

const SYS_ADMIN: &str = "SYS_ADMIN";

/// Docker's capability-gated groups (`includes.caps`), plus ptrace and process_vm_* under
/// `SYS_PTRACE` (see the module docs). `stime` and `umount` do not exist on x86_64.
const GATED: &[(&str, &[i64])] = &[
    ("DAC_READ_SEARCH", &[libc::SYS_open_by_handle_at]),
    (
        SYS_ADMIN,
        &[
            libc::SYS_bpf,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_fanotify_init,
            libc::SYS_fsconfig,
            libc::SYS_fsmount,
            libc::SYS_fsopen,
            libc::SYS_fspick,
            libc::SYS_lookup_dcookie,
            SYS_LSM_GET_SELF_ATTR,
            SYS_LSM_LIST_MODULES,
            SYS_LSM_SET_SELF_ATTR,
            libc::SYS_mount,
            libc::SYS_mount_setattr,
            libc::SYS_move_mount,
            libc::SYS_open_tree,
            libc::SYS_perf_event_open,
            libc::SYS_quotactl,
            libc::SYS_quotactl_fd,
            libc::SYS_setdomainname,
            libc::SYS_sethostname,
            libc::SYS_setns,
            libc::SYS_syslog,
            libc::SYS_umount2,
            libc::SYS_unshare,
        ],
    ),
    ("SYS_BOOT", &[libc::SYS_reboot]),
    ("SYS_CHROOT", &[libc::SYS_chroot]),
    (
        "SYS_MODULE",
        &[
            libc::SYS_delete_module,
            libc::SYS_init_module,
            libc::SYS_finit_module,
        ],
    ),
    ("SYS_PACCT", &[libc::SYS_acct]),
    (
        "SYS_PTRACE",
        &[
            libc::SYS_kcmp,
            libc::SYS_pidfd_getfd,
            libc::SYS_process_madvise,
            libc::SYS_process_vm_readv,
            libc::SYS_process_vm_writev,
            libc::SYS_ptrace,
        ],
    ),
    ("SYS_RAWIO", &[libc::SYS_iopl, libc::SYS_ioperm]),
    (
        "SYS_TIME",
        &[libc::SYS_settimeofday, libc::SYS_clock_settime],
    ),
    ("SYS_TTY_CONFIG", &[libc::SYS_vhangup]),
    (
        "SYS_NICE",
        &[
            libc::SYS_get_mempolicy,
            libc::SYS_mbind,
            libc::SYS_set_mempolicy,
            libc::SYS_set_mempolicy_home_node,
        ],
    ),
    ("SYSLOG", &[libc::SYS_syslog]),
    ("BPF", &[libc::SYS_bpf]),
    ("PERFMON", &[libc::SYS_perf_event_open]),
];

/// `personality(2)` arguments Docker allows: PER_LINUX, PER_LINUX32, UNAME26,
/// UNAME26|PER_LINUX32, and 0xffffffff (query).
const PERSONALITIES: [u64; 5] = [0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];
const AF_VSOCK: u64 = 40;
/// CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER |
/// CLONE_NEWPID | CLONE_NEWNET: Docker's `2114060288`.
const CLONE_NAMESPACE_FLAGS: u64 = 0x7E02_0000;
/// `EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE` (linux/audit.h); not in libc.
const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;

/// The subset of [`GATED`] a container holds, one bit per entry: the cache key, so that
/// capability lists differing only in irrelevant capabilities share one program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Gates(u16);

const _: () = assert!(
    GATED.len() <= u16::BITS as usize,
    "Gates has one bit per group"
);

impl Gates {
    fn from_names(capabilities: &[String]) -> Self {
        let mut bits = 0u16;
        for name in capabilities {
            let name = name.strip_prefix("CAP_").unwrap_or(name);
            if let Some(index) = GATED.iter().position(|(cap, _)| *cap == name) {
                bits |= 1 << index;
            }
        }
        Gates(bits)
    }

    fn holds(self, capability: &str) -> bool {
        GATED
            .iter()
            .position(|(cap, _)| *cap == capability)
            .is_some_and(|index| self.0 & (1 << index) != 0)
    }

    fn syscalls(self) -> impl Iterator<Item = i64> {
        GATED
            .iter()
            .enumerate()
            .filter(move |(index, _)| self.0 & (1 << index) != 0)
            .flat_map(|(_, (_, syscalls))| syscalls.iter().copied())
    }
}

fn compile(gates: Gates) -> Result<Program, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    // In seccompiler an empty rule list means "always matches", so unconditional entries
    // simply overwrite; conditional ones must never narrow an unconditional entry.
    for nr in ALWAYS.iter().copied().chain(gates.syscalls()) {
        rules.insert(nr, Vec::new());
    }

    // Dword comparisons: the kernel truncates these arguments to 32 bits (int domain,
    // unsigned int persona, clone's legacy flags), so only the low word may decide;
    // comparing all 64 bits would let socket(0x1_0000_0028, ..) through as AF_VSOCK.
    allow_if(
        &mut rules,
        libc::SYS_socket,
        vec![arg0(SeccompCmpOp::Ne, AF_VSOCK)?],
    )?;
    for persona in PERSONALITIES {
        allow_if(
            &mut rules,
            libc::SYS_personality,
            vec![arg0(SeccompCmpOp::Eq, persona)?],
        )?;
    }
    let sys_admin = gates.holds(SYS_ADMIN);
    if !sys_admin {
        allow_if(
            &mut rules,
            libc::SYS_clone,
            vec![arg0(SeccompCmpOp::MaskedEq(CLONE_NAMESPACE_FLAGS), 0)?],
        )?;
    }

    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?;
    let body: BpfProgram = filter.try_into()?;

    let mut instructions = Vec::with_capacity(body.len() + CLONE3_PREFIX_LEN);
    if !sys_admin {
        instructions.extend(clone3_enosys_prefix());
    }
    instructions.extend(body.into_iter().map(|insn| libc::sock_filter {
        code: insn.code,
        jt: insn.jt,
        jf: insn.jf,
        k: insn.k,
    }));

    let len = u16::try_from(instructions.len())
        .ok()
        .filter(|&len| usize::from(len) <= libc::BPF_MAXINSNS as usize)
        .ok_or(SeccompError::TooLarge(instructions.len()))?;
    Ok(Program { instructions, len })
}

fn arg0(op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, BackendError> {
    SeccompCondition::new(0, SeccompCmpArgLen::Dword, op, value)
}

/// Adds one alternative (a conjunction of `conditions`) under which `nr` is allowed.
fn allow_if(
    rules: &mut BTreeMap<i64, Vec<SeccompRule>>,
    nr: i64,
    conditions: Vec<SeccompCondition>,
) -> Result<(), BackendError> {
    let rule = SeccompRule::new(conditions)?;
    match rules.entry(nr) {
        Entry::Vacant(entry) => {
            entry.insert(vec![rule]);
        }
        // Already allowed unconditionally: a condition would only restrict it.
        Entry::Occupied(entry) if entry.get().is_empty() => {}
        Entry::Occupied(mut entry) => entry.get_mut().push(rule),
    }
    Ok(())
}

const CLONE3_PREFIX_LEN: usize = 5;

/// `clone3` → ENOSYS for x86_64 callers, then falls through to the seccompiler body.
///
/// Docker returns ENOSYS rather than EPERM for clone3 without CAP_SYS_ADMIN because clone3
/// passes its flags in memory, which seccomp cannot inspect: ENOSYS makes glibc (2.34+) fall
/// back to clone(2), whose flags the body does check, while EPERM would make thread and
/// process creation fail outright. seccompiler gives every match the same action, so this
/// case is written by hand and put first. A non-x86_64 arch jumps straight to the body, whose
/// own architecture check kills the process.
fn clone3_enosys_prefix() -> [libc::sock_filter; CLONE3_PREFIX_LEN] {
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    // Offsets in struct seccomp_data.
    const NR: u32 = 0;
    const ARCH: u32 = 4;
    let insn = |code, k, jt, jf| libc::sock_filter { code, jt, jf, k };
    [
        insn(LD_W_ABS, ARCH, 0, 0),
        insn(JEQ_K, AUDIT_ARCH_X86_64, 0, 3),
        insn(LD_W_ABS, NR, 0, 0),
        insn(JEQ_K, libc::SYS_clone3 as u32, 0, 1),
        insn(
            RET_K,
            libc::SECCOMP_RET_ERRNO | (libc::ENOSYS as u32 & libc::SECCOMP_RET_DATA),
            0,
            0,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::time::Instant;

    /// Docker's and containerd's 14 default capabilities.
    const DOCKER_CAPS: &[&str] = keel_config::DEFAULT_CAPABILITIES;

    fn caps(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn docker_caps_plus(extra: &[&str]) -> Vec<String> {
        let mut all = caps(DOCKER_CAPS);
        all.extend(caps(extra));
        all
    }

    fn words(program: &Program) -> Vec<(u16, u8, u8, u32)> {
        program
            .instructions
            .iter()
            .map(|i| (i.code, i.jt, i.jf, i.k))
            .collect()
    }

    #[test]
    fn profile_compiles_within_kernel_limits() {
        let program = docker_default(&caps(DOCKER_CAPS)).unwrap();
        assert!(!program.is_empty());
        assert!(program.len() <= 4096, "{}", program.len());
        assert_eq!(usize::from(program.len), program.len());
        let everything: Vec<String> = GATED.iter().map(|(cap, _)| cap.to_string()).collect();
        assert!(docker_default(&everything).unwrap().len() <= 4096);
        assert!(docker_default(&[]).is_ok());
    }

    #[test]
    fn allow_list_has_no_duplicates_and_nothing_dangerous() {
        let mut seen = HashSet::new();
        for nr in ALWAYS {
            assert!(seen.insert(*nr), "syscall {nr} listed twice");
        }
        let never = [
            libc::SYS_keyctl,
            libc::SYS_add_key,
            libc::SYS_request_key,
            libc::SYS_userfaultfd,
            libc::SYS_kexec_load,
            libc::SYS_kexec_file_load,
            libc::SYS_io_uring_setup,
            libc::SYS_io_uring_enter,
            libc::SYS_io_uring_register,
            libc::SYS_pivot_root,
            libc::SYS_swapon,
            libc::SYS_swapoff,
            libc::SYS_uselib,
            libc::SYS_nfsservctl,
            174, // create_module
            177, // get_kernel_syms
            178, // query_module
            libc::SYS__sysctl,
            libc::SYS_vserver,
        ];
        let gated: HashSet<i64> = GATED.iter().flat_map(|(_, s)| s.iter().copied()).collect();
        for nr in never {
            assert!(!seen.contains(&nr) && !gated.contains(&nr), "{nr} allowed");
        }
        for nr in gated {
            assert!(
                !seen.contains(&nr),
                "gated syscall {nr} is also unconditional"
            );
        }
        for conditional in [libc::SYS_socket, libc::SYS_personality, libc::SYS_clone] {
            assert!(!seen.contains(&conditional));
        }
        assert!(ALWAYS.len() > 300, "{}", ALWAYS.len());
    }

    #[test]
    fn capability_sets_yield_different_programs() {
        let base = docker_default(&caps(DOCKER_CAPS)).unwrap();
        let admin = docker_default(&docker_caps_plus(&["SYS_ADMIN"])).unwrap();
        let ptrace = docker_default(&docker_caps_plus(&["SYS_PTRACE"])).unwrap();
        let irrelevant = docker_default(&docker_caps_plus(&["NET_ADMIN"])).unwrap();
        let prefixed = docker_default(&caps(&["CAP_SYS_ADMIN"])).unwrap();
        let bare_admin = docker_default(&caps(&["SYS_ADMIN"])).unwrap();
        assert_ne!(words(&base), words(&admin));
        assert_ne!(words(&base), words(&ptrace));
        assert_ne!(words(&admin), words(&ptrace));
        assert_eq!(words(&base), words(&irrelevant));
        assert_eq!(words(&prefixed), words(&bare_admin));
        // Deterministic: the same set compiles to the same instructions.
        assert_eq!(
            words(&base),
            words(&docker_default(&caps(DOCKER_CAPS)).unwrap())
        );
        // Only the non-admin program carries the clone3 prefix.
        assert_eq!(base.instructions[1].k, AUDIT_ARCH_X86_64);
        assert_eq!(base.instructions[3].k, libc::SYS_clone3 as u32);
        assert_ne!(admin.instructions[3].k, libc::SYS_clone3 as u32);
    }

    #[test]
    fn cache_compiles_each_set_once() {
        let mut cache = ProgramCache::new();
        assert_eq!(cache.compiled(), 0);
        let a = cache.get(&caps(DOCKER_CAPS)).unwrap();
        let mut reversed = caps(DOCKER_CAPS);
        reversed.reverse();
        let b = cache.get(&reversed).unwrap();
        let c = cache
            .get(&docker_caps_plus(&["KILL", "NET_ADMIN"]))
            .unwrap();
        assert!(Arc::ptr_eq(&a, &b) && Arc::ptr_eq(&a, &c));
        assert_eq!(cache.compiled(), 1);
        let admin = cache.get(&docker_caps_plus(&["SYS_ADMIN"])).unwrap();
        assert!(!Arc::ptr_eq(&a, &admin));
        assert_eq!(cache.compiled(), 2);
        let _ = cache.get(&docker_caps_plus(&["SYS_ADMIN"])).unwrap();
        let _ = cache.get(&[]).unwrap();
        assert_eq!(cache.compiled(), 3);
    }

    #[test]
    fn compile_time_and_length() {
        let caps = caps(DOCKER_CAPS);
        let rounds = 200u32;
        let start = Instant::now();
        let mut len = 0;
        for _ in 0..rounds {
            len = docker_default(&caps).unwrap().len();
        }
        let per = start.elapsed() / rounds;
        eprintln!(
            "seccomp: docker default profile: {len} instructions, {} us per compile",
            per.as_micros()
        );
    }

    // ---- behaviour: forked children that install the filter and probe system calls ----

    #[derive(Debug, PartialEq, Eq)]
    enum Outcome {
        Exit(i32),
        Signal(i32),
    }

    /// Runs `probe` in a forked child that installs `program` (if any) first. The test
    /// binary is multi-threaded, so the child makes raw system calls only; `probe` returns
    /// the errno it saw (0 for success) as the exit code.
    fn run(program: Option<&Program>, probe: fn() -> i32) -> Outcome {
        // SAFETY: the child below only makes async-signal-safe calls and leaves via _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: raw system calls on memory prepared before fork; no allocation.
            unsafe {
                // No core dumps from the children the filter kills on purpose.
                libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong, 0, 0, 0);
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) != 0 {
                    libc::_exit(120);
                }
                if let Some(program) = program
                    && !program.install()
                {
                    libc::_exit(121);
                }
                libc::_exit(probe());
            }
        }
        let mut status = 0;
        // SAFETY: pid is our child; status is a valid out pointer.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(waited, pid);
        if libc::WIFEXITED(status) {
            Outcome::Exit(libc::WEXITSTATUS(status))
        } else {
            Outcome::Signal(libc::WTERMSIG(status))
        }
    }

    fn errno() -> i32 {
        // SAFETY: __errno_location returns this thread's errno slot.
        unsafe { *libc::__errno_location() }
    }

    /// 0 on success, else the errno.
    fn outcome(rc: libc::c_long) -> i32 {
        if rc < 0 { errno() } else { 0 }
    }

    fn sys(nr: libc::c_long, args: [libc::c_ulong; 5]) -> i32 {
        // SAFETY: each probe passes arguments the kernel validates; pointers are static.
        outcome(unsafe { libc::syscall(nr, args[0], args[1], args[2], args[3], args[4]) })
    }

    fn ptr(s: &'static std::ffi::CStr) -> libc::c_ulong {
        s.as_ptr() as libc::c_ulong
    }

    /// For clone/fork probes: reaps the new child, which exits 7 at once.
    fn forked(rc: libc::c_long) -> i32 {
        if rc == 0 {
            // SAFETY: in the new child: leave immediately.
            unsafe { libc::_exit(7) }
        }
        if rc < 0 {
            return errno();
        }
        let mut status = 0;
        // SAFETY: rc is the pid of our child.
        let waited = unsafe { libc::syscall(libc::SYS_wait4, rc, &mut status, 0, 0) };
        if waited == rc && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 7 {
            0
        } else {
            100
        }
    }

    const NO_SUCH_PID: libc::c_ulong = 0x3fff_fff0;

    fn keyctl() -> i32 {
        // KEYCTL_GET_KEYRING_ID of KEY_SPEC_SESSION_KEYRING (-3), don't create.
        sys(libc::SYS_keyctl, [0, -3i64 as libc::c_ulong, 0, 0, 0])
    }
    fn io_uring_setup() -> i32 {
        sys(libc::SYS_io_uring_setup, [1, 0, 0, 0, 0])
    }
    fn mount_missing_target() -> i32 {
        let target = ptr(c"/nonexistent/keel-seccomp-probe");
        sys(libc::SYS_mount, [ptr(c"none"), target, ptr(c"tmpfs"), 0, 0])
    }
    fn unshare_user() -> i32 {
        sys(
            libc::SYS_unshare,
            [libc::CLONE_NEWUSER as libc::c_ulong, 0, 0, 0, 0],
        )
    }
    fn unshare_nothing() -> i32 {
        sys(libc::SYS_unshare, [0; 5])
    }
    fn clone3_null() -> i32 {
        sys(libc::SYS_clone3, [0; 5])
    }
    fn clone_newnet() -> i32 {
        let flags = (libc::CLONE_NEWNET | libc::SIGCHLD) as libc::c_ulong;
        // SAFETY: fork-like clone (no new stack); the new child exits at once in `forked`.
        forked(unsafe { libc::syscall(libc::SYS_clone, flags, 0, 0, 0, 0) })
    }
    fn clone_plain() -> i32 {
        let flags = libc::SIGCHLD as libc::c_ulong;
        // SAFETY: as in clone_newnet.
        forked(unsafe { libc::syscall(libc::SYS_clone, flags, 0, 0, 0, 0) })
    }
    fn fork_raw() -> i32 {
        // SAFETY: the new child exits at once in `forked`.
        forked(unsafe { libc::syscall(libc::SYS_fork) })
    }
    fn getpid_and_pipe_write() -> i32 {
        // SAFETY: getpid has no arguments.
        if unsafe { libc::syscall(libc::SYS_getpid) } <= 0 {
            return 101;
        }
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: fds has room for two descriptors.
        if unsafe { libc::syscall(libc::SYS_pipe2, fds.as_mut_ptr(), 0) } != 0 {
            return errno();
        }
        let mut byte = [0u8; 1];
        // SAFETY: one byte from a static buffer, one byte into `byte`.
        let (wrote, read) = unsafe {
            (
                libc::syscall(libc::SYS_write, fds[1], b"k".as_ptr(), 1),
                libc::syscall(libc::SYS_read, fds[0], byte.as_mut_ptr(), 1),
            )
        };
        if wrote == 1 && read == 1 && byte[0] == b'k' {
            0
        } else {
            102
        }
    }
    fn socket_vsock() -> i32 {
        sys(
            libc::SYS_socket,
            [40, libc::SOCK_STREAM as libc::c_ulong, 0, 0, 0],
        )
    }
    fn socket_vsock_high_bits() -> i32 {
        sys(
            libc::SYS_socket,
            [0x1_0000_0028, libc::SOCK_STREAM as libc::c_ulong, 0, 0, 0],
        )
    }
    fn socket_inet() -> i32 {
        let family = libc::AF_INET as libc::c_ulong;
        sys(
            libc::SYS_socket,
            [family, libc::SOCK_STREAM as libc::c_ulong, 0, 0, 0],
        )
    }
    fn personality_query() -> i32 {
        sys(libc::SYS_personality, [0xffff_ffff, 0, 0, 0, 0])
    }
    fn personality_read_implies_exec() -> i32 {
        sys(libc::SYS_personality, [0x040_0000, 0, 0, 0, 0])
    }
    fn ptrace_attach_missing() -> i32 {
        let attach = libc::PTRACE_ATTACH as libc::c_ulong;
        sys(libc::SYS_ptrace, [attach, NO_SUCH_PID, 0, 0, 0])
    }
    fn process_vm_readv_missing() -> i32 {
        sys(libc::SYS_process_vm_readv, [NO_SUCH_PID, 0, 0, 0, 0])
    }
    fn reboot_bad_magic() -> i32 {
        // Wrong magic: the kernel answers EINVAL without doing anything.
        sys(libc::SYS_reboot, [1, 2, 3, 0, 0])
    }
    fn chroot_missing() -> i32 {
        sys(
            libc::SYS_chroot,
            [ptr(c"/nonexistent/keel-seccomp-probe"), 0, 0, 0, 0],
        )
    }
    fn x32_getpid() -> i32 {
        sys(0x4000_0000 | libc::SYS_getpid, [0; 5])
    }
    fn i386_getpid() -> i32 {
        let mut eax: u32 = 20; // __NR_getpid in the i386 table
        // SAFETY: int 0x80 enters the compat syscall path; getpid reads no arguments and
        // only eax changes (r8-r11 are declared clobbered for older kernels).
        unsafe {
            core::arch::asm!(
                "int 0x80",
                inout("eax") eax,
                out("r8") _, out("r9") _, out("r10") _, out("r11") _,
                options(nostack),
            );
        }
        // SAFETY: getpid has no arguments.
        let pid = unsafe { libc::syscall(libc::SYS_getpid) };
        if i64::from(eax) == pid { 0 } else { 103 }
    }

    const EPERM: Outcome = Outcome::Exit(libc::EPERM);
    const OK: Outcome = Outcome::Exit(0);

    /// A probe's name, the probe, and what the child must end with.
    type Probe = (&'static str, fn() -> i32, Outcome);

    fn check(program: &Program, probes: &[Probe]) {
        let mut failures = Vec::new();
        for (name, probe, expected) in probes {
            let got = run(Some(program), *probe);
            if got != *expected {
                failures.push(format!("{name}: expected {expected:?}, got {got:?}"));
            }
        }
        assert!(failures.is_empty(), "{failures:#?}");
    }

    #[test]
    fn default_caps_deny_and_allow_like_docker() {
        let program = docker_default(&caps(DOCKER_CAPS)).unwrap();
        check(
            &program,
            &[
                ("keyctl", keyctl, EPERM),
                ("io_uring_setup", io_uring_setup, EPERM),
                ("mount", mount_missing_target, EPERM),
                ("unshare(CLONE_NEWUSER)", unshare_user, EPERM),
                ("clone3", clone3_null, Outcome::Exit(libc::ENOSYS)),
                ("clone(CLONE_NEWNET)", clone_newnet, EPERM),
                ("clone(SIGCHLD)", clone_plain, OK),
                ("fork", fork_raw, OK),
                ("getpid+pipe+write", getpid_and_pipe_write, OK),
                ("socket(AF_VSOCK)", socket_vsock, EPERM),
                ("socket(1<<32|AF_VSOCK)", socket_vsock_high_bits, EPERM),
                ("socket(AF_INET)", socket_inet, OK),
                ("personality(0xffffffff)", personality_query, OK),
                (
                    "personality(READ_IMPLIES_EXEC)",
                    personality_read_implies_exec,
                    EPERM,
                ),
                ("ptrace(ATTACH)", ptrace_attach_missing, EPERM),
                ("process_vm_readv", process_vm_readv_missing, EPERM),
                ("reboot", reboot_bad_magic, EPERM),
                // Docker's defaults include SYS_CHROOT: the kernel's own answer comes back.
                ("chroot", chroot_missing, Outcome::Exit(libc::ENOENT)),
                ("x32 getpid", x32_getpid, EPERM),
            ],
        );
    }

    #[test]
    fn no_caps_gate_chroot() {
        let program = docker_default(&[]).unwrap();
        check(
            &program,
            &[("chroot", chroot_missing, EPERM), ("fork", fork_raw, OK)],
        );
    }

    #[test]
    fn granted_caps_reach_the_kernel() {
        let program =
            docker_default(&docker_caps_plus(&["SYS_ADMIN", "SYS_PTRACE", "SYS_BOOT"])).unwrap();
        // The errnos are the kernel's own answers, so seccomp let the calls through.
        check(
            &program,
            &[
                ("mount", mount_missing_target, Outcome::Exit(libc::ENOENT)),
                ("unshare(0)", unshare_nothing, OK),
                ("clone3", clone3_null, Outcome::Exit(libc::EINVAL)),
                ("clone(SIGCHLD)", clone_plain, OK),
                (
                    "ptrace(ATTACH)",
                    ptrace_attach_missing,
                    Outcome::Exit(libc::ESRCH),
                ),
                ("reboot", reboot_bad_magic, Outcome::Exit(libc::EINVAL)),
                ("keyctl", keyctl, EPERM),
                ("io_uring_setup", io_uring_setup, EPERM),
                ("socket(AF_VSOCK)", socket_vsock, EPERM),
            ],
        );
    }

    #[test]
    fn i386_system_calls_kill_the_process() {
        let program = docker_default(&caps(DOCKER_CAPS)).unwrap();
        // Kernels built or booted without IA-32 emulation fault on int 0x80 anyway.
        let unfiltered = run(None, i386_getpid);
        if unfiltered != OK {
            eprintln!("seccomp: int 0x80 unavailable here ({unfiltered:?}); skipping");
            return;
        }
        assert_eq!(
            run(Some(&program), i386_getpid),
            Outcome::Signal(libc::SIGSYS)
        );
    }
}
