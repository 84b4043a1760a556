//! PID 1's own file descriptors: the limit raised at boot, the count reported, and an
//! exhausted table named as such in the error of the one start it failed.
//!
//! What PID 1 keeps open per running container, and why each must stay open:
//! - its pidfd: signals reach exactly that process, never a recycled pid;
//! - the read ends of its stdout and stderr pipes: the log pumps read them for the whole run
//!   (a closed read end would kill the container with SIGPIPE on its next write);
//! - its log file: appended to as lines arrive, reopened only at rotation.
//!
//! Everything else is opened for the moment it is needed: the cgroup directory for clone3
//! (and each exec), the error pipe until the child has exec'd, the image store's lock while a
//! start reads it.

use std::io;

/// The kernel's ceiling for any process's descriptor limit.
const NR_OPEN: &str = "/proc/sys/fs/nr_open";

/// Raises PID 1's RLIMIT_NOFILE, soft and hard, as far as the kernel allows (`fs.nr_open`,
/// 1048576 by default; the boot default is 1024 soft, 4096 hard, which four descriptors a
/// container exhaust at a few hundred containers). Containers do not inherit it: their plans
/// set their own limit. Returns the new limit.
pub fn raise_limit() -> io::Result<u64> {
    let ceiling = std::fs::read_to_string(NR_OPEN)
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let limit = libc::rlimit64 {
        rlim_cur: ceiling,
        rlim_max: ceiling,
    };
    // SAFETY: prlimit64 on our own process with a valid struct; the old value is not asked.
    if unsafe { libc::prlimit64(0, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ceiling)
}

/// PID 1's descriptor limit (soft).
pub fn limit() -> Option<u64> {
    let mut limit = libc::rlimit64 {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit64 reading our own limit into a valid struct.
    (unsafe { libc::prlimit64(0, libc::RLIMIT_NOFILE, std::ptr::null(), &mut limit) } == 0)
        .then_some(limit.rlim_cur)
}

/// How many descriptors PID 1 has open now.
pub fn open_count() -> Option<usize> {
    // The directory's own descriptor is one of the entries.
    Some(
        std::fs::read_dir("/proc/self/fd")
            .ok()?
            .count()
            .saturating_sub(1),
    )
}

/// `error`, and when it is the descriptor table running out, how full PID 1's is: the one
/// start that failed says why, instead of a bare "Too many open files".
pub fn explain(error: &io::Error) -> String {
    match error.raw_os_error() {
        Some(libc::EMFILE) | Some(libc::ENFILE) => format!(
            "{error} (PID 1 has {} descriptors open, limit {})",
            open_count().map_or("?".into(), |n| n.to_string()),
            limit().map_or("?".into(), |n| n.to_string()),
        ),
        _ => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_explains() {
        let before = open_count().unwrap();
        let file = std::fs::File::open("/proc/self/status").unwrap();
        assert!(open_count().unwrap() > before || before > 1000);
        drop(file);
        assert!(limit().unwrap() >= 1);
        let e = io::Error::from_raw_os_error(libc::EMFILE);
        assert!(
            explain(&e).contains("descriptors open, limit"),
            "{}",
            explain(&e)
        );
        let e = io::Error::from_raw_os_error(libc::ENOENT);
        assert!(!explain(&e).contains("descriptors"));
    }
}
