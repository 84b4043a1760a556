//! The OCI runtime configuration (`config.json`) crun gets: the same namespaces, mounts,
//! masked and read-only paths, capabilities, no_new_privs, limits and seccomp profile as a
//! Keel container with default isolation.
//!
//! Written with serde_json rather than oci-spec's runtime types: the document is small,
//! every field is spelled out here next to the Keel behaviour it mirrors, and the workspace
//! keeps oci-spec with its image feature only.

use keel_supervisor::container::{MASKED_PATHS, READONLY_PATHS};
use serde_json::{Value, json};

/// What one container looks like; the defaults of a Keel container otherwise.
#[derive(Debug, Clone)]
pub struct Spec<'a> {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub hostname: &'a str,
    /// Absolute path of the root filesystem directory.
    pub rootfs: &'a str,
    /// cgroup v2 path relative to the hierarchy's root, e.g. `/keel-bench/crun-7`.
    pub cgroups_path: &'a str,
    pub memory_max: u64,
    pub pids_max: u64,
    /// Size of /dev/shm (Keel's default is 64 MiB).
    pub shm_size: u64,
    /// Give crun the Docker-equivalent seccomp profile Keel installs.
    pub seccomp: bool,
    /// A time namespace, as Keel gives containers when the kernel has them.
    pub time_namespace: bool,
}

/// The config.json document.
pub fn config(spec: &Spec<'_>) -> Value {
    let caps: Vec<String> = keel_config::DEFAULT_CAPABILITIES
        .iter()
        .map(|c| format!("CAP_{c}"))
        .collect();
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "mount"}),
        json!({"type": "uts"}),
        json!({"type": "ipc"}),
        json!({"type": "cgroup"}),
    ];
    if spec.time_namespace {
        namespaces.push(json!({"type": "time"}));
    }
    let mut linux = json!({
        "namespaces": namespaces,
        "cgroupsPath": spec.cgroups_path,
        "resources": {
            "memory": {"limit": spec.memory_max},
            "pids": {"limit": spec.pids_max},
        },
        "maskedPaths": MASKED_PATHS,
        "readonlyPaths": READONLY_PATHS,
    });
    if spec.seccomp {
        linux["seccomp"] = seccomp_profile();
    }
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": spec.args,
            "env": spec.env,
            "cwd": "/",
            "capabilities": {
                "bounding": caps,
                "effective": caps,
                "permitted": caps,
            },
            "noNewPrivileges": true,
        },
        // Writable like Keel's overlay root (whether crun can actually write to it depends
        // on the directory it is given): `readonly` would add a remount Keel does not do.
        "root": {"path": spec.rootfs, "readonly": false},
        "hostname": spec.hostname,
        "mounts": mounts(spec.shm_size),
        "linux": linux,
    })
}

/// Keel's container mounts (supervisor/src/container.rs `build_plan`), in OCI form. /dev is
/// not `nodev` here: crun creates the device nodes inside it, Keel bind-mounts them.
fn mounts(shm_size: u64) -> Value {
    json!([
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", format!("size={shm_size}")]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
    ])
}

/// Keel's seccomp source. Its allow-list is private to the supervisor and written as
/// syscall numbers (`libc::SYS_read`); crun wants names. Reading the names out of the very
/// table Keel compiles keeps the two profiles identical without a second copy to maintain.
const KEEL_SECCOMP_SOURCE: &str = include_str!("../../supervisor/src/seccomp.rs");

/// Names of the system calls in the `const NAME: &[i64] = &[ ... ];` table of the source.
fn table_names(source: &str, table: &str) -> Vec<String> {
    let header = format!("const {table}: &[i64] = &[");
    let Some(start) = source.find(&header) else {
        return Vec::new();
    };
    let body = &source[start + header.len()..];
    let body = &body[..body.find("];").unwrap_or(body.len())];
    body.split(',')
        .filter_map(|entry| {
            let entry = entry.trim();
            let name = entry
                .strip_prefix("libc::SYS_")
                .map(str::to_string)
                .or_else(|| entry.strip_prefix("SYS_").map(str::to_ascii_lowercase))?;
            Some(name)
        })
        .collect()
}

/// The system calls Keel allows unconditionally.
pub fn always_allowed() -> Vec<String> {
    table_names(KEEL_SECCOMP_SOURCE, "ALWAYS")
}

/// Of Keel's capability-gated groups, the one Docker's 14 default capabilities unlock:
/// SYS_CHROOT → chroot (a test checks no other default capability gates anything).
const GATED_FOR_DEFAULT_CAPS: &[&str] = &["chroot"];

/// `personality(2)` values and the clone namespace-flag mask, as in Keel's profile.
const PERSONALITIES: [u64; 5] = [0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];
const CLONE_NAMESPACE_FLAGS: u64 = 0x7E02_0000;
const AF_VSOCK: u64 = 40;

/// Keel's default profile for Docker's 14 capabilities in OCI form: EPERM by default, the
/// same allow-list, socket except AF_VSOCK, five personalities, clone without namespace
/// flags, clone3 → ENOSYS. x86_64 only (Keel kills i386 and refuses x32 calls).
pub fn seccomp_profile() -> Value {
    let mut names = always_allowed();
    names.extend(GATED_FOR_DEFAULT_CAPS.iter().map(|s| s.to_string()));
    let mut syscalls = vec![json!({"names": names, "action": "SCMP_ACT_ALLOW"})];
    syscalls.push(json!({
        "names": ["socket"], "action": "SCMP_ACT_ALLOW",
        "args": [{"index": 0, "value": AF_VSOCK, "op": "SCMP_CMP_NE"}],
    }));
    for persona in PERSONALITIES {
        syscalls.push(json!({
            "names": ["personality"], "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": persona, "op": "SCMP_CMP_EQ"}],
        }));
    }
    syscalls.push(json!({
        "names": ["clone"], "action": "SCMP_ACT_ALLOW",
        "args": [{"index": 0, "value": CLONE_NAMESPACE_FLAGS, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}],
    }));
    syscalls.push(json!({
        "names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::ENOSYS,
    }));
    json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": libc::EPERM,
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": syscalls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec<'static> {
        Spec {
            args: vec!["/bin/true".into()],
            env: vec!["PATH=/bin".into()],
            hostname: "bench",
            rootfs: "/run/bench/rootfs",
            cgroups_path: "/keel-bench/crun-1",
            memory_max: 64 << 20,
            pids_max: 64,
            shm_size: 64 << 20,
            seccomp: true,
            time_namespace: true,
        }
    }

    #[test]
    fn the_allow_list_is_read_from_keels_table() {
        let names = always_allowed();
        assert!(names.len() > 250, "only {} names parsed", names.len());
        for expected in ["read", "write", "execve", "cachestat", "io_pgetevents"] {
            assert!(names.iter().any(|n| n == expected), "{expected} missing");
        }
        for denied in [
            "mount",
            "unshare",
            "ptrace",
            "kexec_load",
            "clone3",
            "io_uring_setup",
        ] {
            assert!(!names.iter().any(|n| n == denied), "{denied} allowed");
        }
        assert!(names.iter().all(|n| {
            n.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        }));
    }

    #[test]
    fn only_sys_chroot_of_the_default_caps_gates_syscalls() {
        let start = KEEL_SECCOMP_SOURCE
            .find("const GATED:")
            .expect("GATED table");
        let gated = &KEEL_SECCOMP_SOURCE[start..];
        let gated = &gated[..gated.find("\n];").expect("end of GATED")];
        let gating: Vec<&str> = keel_config::DEFAULT_CAPABILITIES
            .iter()
            .copied()
            .filter(|cap| gated.contains(&format!("(\"{cap}\"")))
            .collect();
        assert_eq!(gating, ["SYS_CHROOT"]);
        assert!(gated.contains("(\"SYS_CHROOT\", &[libc::SYS_chroot])"));
    }

    #[test]
    fn config_mirrors_keel_defaults() {
        let c = config(&spec());
        assert_eq!(
            c["process"]["capabilities"]["bounding"]
                .as_array()
                .unwrap()
                .len(),
            14
        );
        assert_eq!(c["process"]["noNewPrivileges"], true);
        assert_eq!(c["linux"]["resources"]["memory"]["limit"], 64 << 20);
        assert_eq!(c["linux"]["resources"]["pids"]["limit"], 64);
        assert_eq!(
            c["linux"]["maskedPaths"].as_array().unwrap().len(),
            MASKED_PATHS.len()
        );
        assert_eq!(
            c["linux"]["readonlyPaths"].as_array().unwrap().len(),
            READONLY_PATHS.len()
        );
        let ns: Vec<&str> = c["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(ns, ["pid", "mount", "uts", "ipc", "cgroup", "time"]);
        assert!(
            !ns.contains(&"network"),
            "host network, like Keel's default"
        );
        assert_eq!(c["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ERRNO");
        let mut without = spec();
        without.seccomp = false;
        assert!(config(&without)["linux"].get("seccomp").is_none());
    }
}
