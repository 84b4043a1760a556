//! Linux capabilities for a container's process, with Docker's semantics: the bounding,
//! permitted and effective sets all become the kept set; inheritable and ambient are empty.
//!
//! The parent turns the configured names into a [`CapSet`] and reads [`last_cap`]; the clone3
//! child then calls the `unsafe fn`s below, which only issue raw system calls (no allocation,
//! no locks), in runc's order: [`drop_bounding_except`] → [`set_keepcaps`]`(true)` → switch
//! uid/gid ([`crate::user::switch_to`]) → [`set_keepcaps`]`(false)` → [`apply`].

use thiserror::Error;

/// Kernel capability names without the `CAP_` prefix, indexed by capability number
/// (`include/uapi/linux/capability.h`). Written out here rather than taken from
/// `keel_config::ALL_CAPABILITIES`, whose order is not a contract.
const NAMES: [&str; 41] = [
    "CHOWN",              // 0
    "DAC_OVERRIDE",       // 1
    "DAC_READ_SEARCH",    // 2
    "FOWNER",             // 3
    "FSETID",             // 4
    "KILL",               // 5
    "SETGID",             // 6
    "SETUID",             // 7
    "SETPCAP",            // 8
    "LINUX_IMMUTABLE",    // 9
    "NET_BIND_SERVICE",   // 10
    "NET_BROADCAST",      // 11
    "NET_ADMIN",          // 12
    "NET_RAW",            // 13
    "IPC_LOCK",           // 14
    "IPC_OWNER",          // 15
    "SYS_MODULE",         // 16
    "SYS_RAWIO",          // 17
    "SYS_CHROOT",         // 18
    "SYS_PTRACE",         // 19
    "SYS_PACCT",          // 20
    "SYS_ADMIN",          // 21
    "SYS_BOOT",           // 22
    "SYS_NICE",           // 23
    "SYS_RESOURCE",       // 24
    "SYS_TIME",           // 25
    "SYS_TTY_CONFIG",     // 26
    "MKNOD",              // 27
    "LEASE",              // 28
    "AUDIT_WRITE",        // 29
    "AUDIT_CONTROL",      // 30
    "SETFCAP",            // 31
    "MAC_OVERRIDE",       // 32
    "MAC_ADMIN",          // 33
    "SYSLOG",             // 34
    "WAKE_ALARM",         // 35
    "BLOCK_SUSPEND",      // 36
    "AUDIT_READ",         // 37
    "PERFMON",            // 38
    "BPF",                // 39
    "CHECKPOINT_RESTORE", // 40
];

/// The highest capability number this module knows a name for.
const LAST_KNOWN: u32 = NAMES.len() as u32 - 1;

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets passed as two 32-bit halves.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Errors turning configured names into a [`CapSet`].
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CapsError {
    /// The name is not a capability this kernel interface knows.
    #[error(
        "unknown capability {0:?} (expected a kernel name without the CAP_ prefix, e.g. NET_RAW)"
    )]
    Unknown(String),
}

/// A set of capabilities as the kernel's bit mask (bit n = capability number n).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CapSet(pub u64);

impl CapSet {
    /// Every capability this module knows (numbers 0..=40).
    pub const ALL: CapSet = CapSet((1u64 << (LAST_KNOWN + 1)) - 1);

    /// Builds a set from names without the `CAP_` prefix; the first unknown name is an error.
    pub fn from_names(names: &[String]) -> Result<CapSet, CapsError> {
        names.iter().try_fold(CapSet(0), |set, name| {
            number(name)
                .map(|n| CapSet(set.0 | (1u64 << n)))
                .ok_or_else(|| CapsError::Unknown(name.clone()))
        })
    }

    /// Whether capability `number` is in the set (numbers past 63 never are).
    pub fn contains(&self, number: u32) -> bool {
        number < 64 && self.0 & (1u64 << number) != 0
    }

    /// The names of the known capabilities in the set, in kernel number order.
    pub fn names(&self) -> Vec<&'static str> {
        (0..=LAST_KNOWN)
            .filter(|&n| self.contains(n))
            .map(|n| NAMES[n as usize])
            .collect()
    }

    /// The subset a kernel whose highest capability is `last_cap` can grant. capset(2) fails
    /// with EPERM when asked for a capability the process never had, so on an older kernel
    /// the parent should narrow the set with this (runc likewise skips unknown capabilities).
    pub fn known_to_kernel(self, last_cap: u32) -> CapSet {
        if last_cap >= 63 {
            self
        } else {
            CapSet(self.0 & ((1u64 << (last_cap + 1)) - 1))
        }
    }
}

/// The kernel number of a capability name without the `CAP_` prefix (`"CHOWN"` → 0).
pub fn number(name: &str) -> Option<u32> {
    NAMES.iter().position(|&n| n == name).map(|i| i as u32)
}

/// The highest capability number of the running kernel, from `/proc/sys/kernel/cap_last_cap`;
/// 40 (`CAP_CHECKPOINT_RESTORE`) if that cannot be read. Capped at 63, the width of [`CapSet`].
/// Call in the parent: reading a file allocates.
pub fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .map_or(LAST_KNOWN, |n| n.min(63))
}

/// prctl through `syscall(2)` so that nothing but the system call runs in the child.
///
/// # Safety
/// `option` must be a prctl option whose arguments are plain integers.
unsafe fn prctl(option: libc::c_int, arg2: libc::c_ulong) -> libc::c_long {
    // SAFETY: every caller passes an option that takes integers only, so no pointer is
    // handed to the kernel.
    unsafe {
        libc::syscall(
            libc::SYS_prctl,
            option,
            arg2,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    }
}

/// The thread's current `errno`.
fn errno() -> libc::c_int {
    // SAFETY: __errno_location returns a valid pointer to this thread's errno; reading it
    // does not allocate or lock.
    unsafe { *libc::__errno_location() }
}

/// Drops every capability `0..=last_cap` that is not in `keep` from the bounding set
/// (`PR_CAPBSET_DROP`). A capability the kernel does not know (EINVAL) is skipped.
/// Needs CAP_SETPCAP in the effective set, so call it before the uid switch and [`apply`].
/// Returns false with errno set on the first other failure.
///
/// # Safety
/// Async-signal-safe: meant for the clone3 child, where it makes only raw system calls.
pub unsafe fn drop_bounding_except(keep: CapSet, last_cap: u32) -> bool {
    for n in 0..=last_cap.min(63) {
        if keep.contains(n) {
            continue;
        }
        // SAFETY: PR_CAPBSET_DROP takes the capability number as an integer.
        if unsafe { prctl(libc::PR_CAPBSET_DROP, n as libc::c_ulong) } != 0
            && errno() != libc::EINVAL
        {
            return false;
        }
    }
    true
}

/// Sets or clears `PR_SET_KEEPCAPS`, which keeps the permitted set across the switch from
/// uid 0 to another uid (the effective set is still cleared; [`apply`] restores it).
/// Returns false with errno set on failure.
///
/// # Safety
/// Async-signal-safe: only a raw system call.
pub unsafe fn set_keepcaps(on: bool) -> bool {
    // SAFETY: PR_SET_KEEPCAPS takes an integer flag.
    unsafe { prctl(libc::PR_SET_KEEPCAPS, libc::c_ulong::from(on)) == 0 }
}

/// `struct __user_cap_header_struct`; libc does not bind it.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`: one 32-bit half of each set.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Sets effective = permitted = `keep` and inheritable = empty with capset(2) (version 3),
/// then clears the ambient set. Call after the uid switch: a later setresuid away from 0 would
/// clear the effective set again. A kernel without ambient capabilities (EINVAL, before 4.3)
/// has none to clear. Returns false with errno set on failure.
///
/// # Safety
/// Async-signal-safe: only raw system calls on stack data.
pub unsafe fn apply(keep: CapSet) -> bool {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let low = keep.0 as u32;
    let high = (keep.0 >> 32) as u32;
    let data = [
        CapData {
            effective: low,
            permitted: low,
            inheritable: 0,
        },
        CapData {
            effective: high,
            permitted: high,
            inheritable: 0,
        },
    ];
    // SAFETY: header and data are live, properly laid out kernel structs; version 3 reads
    // exactly two CapData entries.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    };
    if rc != 0 {
        return false;
    }
    // SAFETY: PR_CAP_AMBIENT with PR_CAP_AMBIENT_CLEAR_ALL takes integers only (the trailing
    // arguments must be zero, which `prctl` passes).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_prctl,
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    rc == 0 || errno() == libc::EINVAL
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> CapSet {
        CapSet::from_names(&names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn every_kernel_name_maps_to_its_number() {
        let expected = [
            ("CHOWN", 0),
            ("DAC_OVERRIDE", 1),
            ("DAC_READ_SEARCH", 2),
            ("FOWNER", 3),
            ("FSETID", 4),
            ("KILL", 5),
            ("SETGID", 6),
            ("SETUID", 7),
            ("SETPCAP", 8),
            ("LINUX_IMMUTABLE", 9),
            ("NET_BIND_SERVICE", 10),
            ("NET_BROADCAST", 11),
            ("NET_ADMIN", 12),
            ("NET_RAW", 13),
            ("IPC_LOCK", 14),
            ("IPC_OWNER", 15),
            ("SYS_MODULE", 16),
            ("SYS_RAWIO", 17),
            ("SYS_CHROOT", 18),
            ("SYS_PTRACE", 19),
            ("SYS_PACCT", 20),
            ("SYS_ADMIN", 21),
            ("SYS_BOOT", 22),
            ("SYS_NICE", 23),
            ("SYS_RESOURCE", 24),
            ("SYS_TIME", 25),
            ("SYS_TTY_CONFIG", 26),
            ("MKNOD", 27),
            ("LEASE", 28),
            ("AUDIT_WRITE", 29),
            ("AUDIT_CONTROL", 30),
            ("SETFCAP", 31),
            ("MAC_OVERRIDE", 32),
            ("MAC_ADMIN", 33),
            ("SYSLOG", 34),
            ("WAKE_ALARM", 35),
            ("BLOCK_SUSPEND", 36),
            ("AUDIT_READ", 37),
            ("PERFMON", 38),
            ("BPF", 39),
            ("CHECKPOINT_RESTORE", 40),
        ];
        assert_eq!(expected.len(), 41);
        for (name, n) in expected {
            assert_eq!(number(name), Some(n), "{name}");
        }
        assert_eq!(number("CAP_CHOWN"), None, "the prefix is config's business");
        assert_eq!(number("chown"), None);
        assert_eq!(number(""), None);
    }

    #[test]
    fn config_knows_exactly_the_same_names() {
        let mut ours: Vec<&str> = NAMES.to_vec();
        let mut theirs: Vec<&str> = keel_config::ALL_CAPABILITIES.to_vec();
        ours.sort_unstable();
        theirs.sort_unstable();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn masks() {
        assert_eq!(CapSet::ALL.0, 0x1ff_ffff_ffff);
        assert_eq!(set(&[]), CapSet(0));
        assert_eq!(set(&["CHOWN"]), CapSet(1));
        assert_eq!(
            set(&["KILL", "NET_BIND_SERVICE"]),
            CapSet((1 << 5) | (1 << 10))
        );
        assert_eq!(
            set(&["CHECKPOINT_RESTORE", "MAC_OVERRIDE"]),
            CapSet((1 << 40) | (1 << 32))
        );
        assert_eq!(
            set(&["KILL", "KILL"]),
            CapSet(1 << 5),
            "duplicates are harmless"
        );
        let docker = set(keel_config::DEFAULT_CAPABILITIES);
        assert_eq!(
            docker.0, 0xa80425fb,
            "Docker's default set as CapBnd shows it"
        );
        let all: Vec<String> = NAMES.iter().map(|s| s.to_string()).collect();
        assert_eq!(CapSet::from_names(&all).unwrap(), CapSet::ALL);
    }

    #[test]
    fn unknown_name_is_named_in_the_error() {
        let err = CapSet::from_names(&["KILL".into(), "CAP_KILL".into()]).unwrap_err();
        assert_eq!(err, CapsError::Unknown("CAP_KILL".into()));
        assert!(err.to_string().contains("\"CAP_KILL\""));
    }

    #[test]
    fn contains_and_names_round_trip() {
        let s = set(&["NET_RAW", "CHOWN", "BPF"]);
        assert!(s.contains(0) && s.contains(13) && s.contains(39));
        assert!(!s.contains(1) && !s.contains(64) && !s.contains(u32::MAX));
        assert_eq!(s.names(), ["CHOWN", "NET_RAW", "BPF"], "kernel order");
        for n in 0..=40u32 {
            let one = CapSet(1 << n);
            let names: Vec<String> = one.names().iter().map(|s| s.to_string()).collect();
            assert_eq!(CapSet::from_names(&names).unwrap(), one);
        }
        let all: Vec<String> = CapSet::ALL.names().iter().map(|s| s.to_string()).collect();
        assert_eq!(all.len(), 41);
        assert_eq!(CapSet::from_names(&all).unwrap(), CapSet::ALL);
        assert!(
            CapSet(1 << 50).names().is_empty(),
            "bits without a name are not listed"
        );
    }

    #[test]
    fn narrowing_to_an_older_kernel() {
        assert_eq!(CapSet::ALL.known_to_kernel(40), CapSet::ALL);
        assert_eq!(CapSet::ALL.known_to_kernel(37), CapSet((1 << 38) - 1));
        assert_eq!(CapSet(u64::MAX).known_to_kernel(63), CapSet(u64::MAX));
        assert_eq!(CapSet(u64::MAX).known_to_kernel(200), CapSet(u64::MAX));
    }

    #[test]
    fn last_cap_reads_the_kernel() {
        let n = last_cap();
        assert!((36..=63).contains(&n), "{n}");
    }

    /// What a forked child reports back: its bounding, effective, permitted and inheritable
    /// sets, its ambient set and its uid.
    #[derive(Debug, PartialEq, Eq, Clone, Copy, Default)]
    #[repr(C)]
    struct Report {
        bounding: u64,
        effective: u64,
        permitted: u64,
        inheritable: u64,
        ambient: u64,
        uid: u64,
    }

    /// Child side: reads its own sets with raw system calls only (no /proc, which allocates).
    unsafe fn child_report() -> Option<Report> {
        let mut r = Report::default();
        for n in 0..=63u32 {
            // SAFETY: integer-only prctl options.
            let b = unsafe { prctl(libc::PR_CAPBSET_READ, n as libc::c_ulong) };
            if b == 1 {
                r.bounding |= 1 << n;
            }
            // SAFETY: integer-only prctl options.
            let a = unsafe {
                libc::syscall(
                    libc::SYS_prctl,
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_IS_SET as libc::c_ulong,
                    n as libc::c_ulong,
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                )
            };
            if a == 1 {
                r.ambient |= 1 << n;
            }
        }
        let mut header = CapHeader {
            version: CAPABILITY_VERSION_3,
            pid: 0,
        };
        let mut data = [CapData::default(); 2];
        // SAFETY: valid header and two writable CapData entries, as version 3 requires.
        if unsafe {
            libc::syscall(
                libc::SYS_capget,
                &mut header as *mut CapHeader,
                data.as_mut_ptr(),
            )
        } != 0
        {
            return None;
        }
        r.effective = u64::from(data[0].effective) | (u64::from(data[1].effective) << 32);
        r.permitted = u64::from(data[0].permitted) | (u64::from(data[1].permitted) << 32);
        r.inheritable = u64::from(data[0].inheritable) | (u64::from(data[1].inheritable) << 32);
        // SAFETY: getuid cannot fail.
        r.uid = unsafe { libc::syscall(libc::SYS_getuid) } as u64;
        Some(r)
    }

    /// Forks; the child runs `body` (raw system calls only), then writes its [`Report`] to a
    /// pipe. A failing step exits with its number. Returns the report or that exit code.
    fn in_child(body: impl FnOnce() -> Result<(), i32>) -> Result<Report, i32> {
        let mut fds = [0; 2];
        // SAFETY: fds has room for the two descriptors.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        let (rd, wr) = (fds[0], fds[1]);
        // SAFETY: the child below only makes raw system calls and leaves with _exit, so the
        // test harness's other threads and locks are never touched in it.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let code = match body() {
                Err(step) => step,
                // SAFETY: child side, raw system calls only.
                Ok(()) => match unsafe { child_report() } {
                    None => 100,
                    Some(r) => {
                        let size = std::mem::size_of::<Report>();
                        // SAFETY: r is a live repr(C) struct of `size` bytes.
                        let n = unsafe { libc::write(wr, (&r as *const Report).cast(), size) };
                        if n == size as isize { 0 } else { 101 }
                    }
                },
            };
            // SAFETY: leaving the child without running Rust or libc exit handlers.
            unsafe { libc::_exit(code) };
        }
        // SAFETY: wr is our descriptor and no longer needed here.
        unsafe { libc::close(wr) };
        let mut r = Report::default();
        let size = std::mem::size_of::<Report>();
        // SAFETY: reading at most `size` bytes into a live repr(C) struct of plain integers.
        let n = unsafe { libc::read(rd, (&mut r as *mut Report).cast(), size) };
        // SAFETY: rd is ours.
        unsafe { libc::close(rd) };
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "child died: {status:#x}");
        match libc::WEXITSTATUS(status) {
            0 if n == size as isize => Ok(r),
            0 => Err(102),
            code => Err(code),
        }
    }

    fn is_root() -> bool {
        // SAFETY: geteuid cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            eprintln!("skipped: needs root");
        }
        root
    }

    #[test]
    fn child_keeps_exactly_the_kept_set() {
        if !is_root() {
            return;
        }
        let keep = set(&["KILL", "NET_BIND_SERVICE"]);
        let last = last_cap();
        let report = in_child(|| {
            // SAFETY: forked child, these make raw system calls only.
            unsafe {
                if !drop_bounding_except(keep, last) {
                    return Err(1);
                }
                if !apply(keep) {
                    return Err(2);
                }
            }
            Ok(())
        })
        .unwrap_or_else(|step| panic!("child failed at step {step}"));
        assert_eq!(CapSet(report.bounding), keep, "{report:x?}");
        assert_eq!(CapSet(report.effective), keep, "{report:x?}");
        assert_eq!(CapSet(report.permitted), keep, "{report:x?}");
        assert_eq!(report.inheritable, 0);
        assert_eq!(report.ambient, 0);
    }

    #[test]
    fn caps_survive_the_switch_to_another_uid() {
        if !is_root() {
            return;
        }
        let keep = set(&["KILL", "NET_BIND_SERVICE", "CHOWN"]);
        let last = last_cap();
        let user = crate::user::ResolvedUser {
            uid: 65534,
            gid: 65534,
            additional_gids: vec![],
            home: "/".into(),
        };
        let gids: Vec<libc::gid_t> = vec![65534, 100];
        let report = in_child(|| {
            // SAFETY: forked child, these make raw system calls only; `gids` outlives them.
            unsafe {
                if !drop_bounding_except(keep, last) {
                    return Err(1);
                }
                if !set_keepcaps(true) {
                    return Err(2);
                }
                if !crate::user::switch_to(&user, gids.as_ptr(), gids.len()) {
                    return Err(3);
                }
                if !set_keepcaps(false) {
                    return Err(4);
                }
                if !apply(keep) {
                    return Err(5);
                }
            }
            Ok(())
        })
        .unwrap_or_else(|step| panic!("child failed at step {step}"));
        assert_eq!(report.uid, 65534);
        assert_eq!(CapSet(report.bounding), keep);
        assert_eq!(CapSet(report.effective), keep);
        assert_eq!(CapSet(report.permitted), keep);
        assert_eq!(report.inheritable, 0);
    }

    #[test]
    fn without_keepcaps_the_switch_loses_everything() {
        if !is_root() {
            return;
        }
        let keep = set(&["KILL"]);
        let user = crate::user::ResolvedUser {
            uid: 65534,
            gid: 65534,
            additional_gids: vec![],
            home: "/".into(),
        };
        let result = in_child(|| {
            // SAFETY: forked child, raw system calls only.
            unsafe {
                if !crate::user::switch_to(&user, std::ptr::null(), 0) {
                    return Err(1);
                }
                // The permitted set is gone, so raising KILL must fail.
                if apply(keep) {
                    return Err(2);
                }
            }
            Ok(())
        })
        .unwrap_or_else(|step| panic!("child failed at step {step}"));
        assert_eq!(result.effective, 0);
        assert_eq!(result.permitted, 0);
    }
}
