//! Whether a process belongs to the host rather than to a container: the test PID 1 applies
//! before it obeys a power signal or serves the API socket.
//!
//! uid 0 is not enough: root in a container without a user namespace is uid 0 too, and a
//! container may be given the socket's directory as a volume or share the host's pid
//! namespace. A host process is outside every container's cgroup and in PID 1's own mount
//! and pid namespaces.

/// The cgroup every container's cgroup is under (see keel_supervisor::cgroup).
const CONTAINER_CGROUPS: &str = "/keel/";

/// Ok if `pid` is a process of the host; otherwise why not, for the log and the refusal.
pub fn verdict(pid: u32) -> Result<(), String> {
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map_err(|_| "the process exited before it could be checked".to_string())?;
    if let Some(container) = container_of(&cgroup) {
        return Err(format!("it runs in container {container}"));
    }
    for ns in ["mnt", "pid"] {
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}"));
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}"));
        match (ours, theirs) {
            (Ok(a), Ok(b)) if a == b => {}
            (Ok(_), Ok(_)) => return Err(format!("it runs in another {ns} namespace")),
            _ => return Err(format!("its {ns} namespace could not be read")),
        }
    }
    Ok(())
}

/// The container whose cgroup a /proc/PID/cgroup text names, if any.
fn container_of(proc_cgroup: &str) -> Option<String> {
    proc_cgroup.lines().find_map(|line| {
        let path = line.strip_prefix("0::")?;
        let rest = path.strip_prefix(CONTAINER_CGROUPS)?;
        Some(rest.split('/').next().unwrap_or(rest).to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_container_cgroup_names_the_container() {
        assert_eq!(container_of("0::/keel/web\n"), Some("web".into()));
        assert_eq!(container_of("0::/keel/web/sub\n"), Some("web".into()));
        assert_eq!(container_of("0::/init\n"), None);
        assert_eq!(container_of("0::/keelish\n"), None);
        assert_eq!(container_of("1:name=x:/keel/a\n"), None, "only the v2 line");
    }

    #[test]
    fn this_process_is_of_the_host_and_a_gone_one_is_not() {
        assert_eq!(verdict(std::process::id()), Ok(()));
        assert!(verdict(u32::MAX).unwrap_err().contains("exited"));
    }
}
