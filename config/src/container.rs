//! Container isolation and resource keys: their types and validation.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use crate::{ConfigError, Locator, parse_size};

/// Every capability Linux 6.1 knows, without the `CAP_` prefix.
pub const ALL_CAPABILITIES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// Docker's default capability set (moby `oci/caps/defaults.go`), the 14 a container gets
/// unless the host file adds or drops some.
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// Resource limits resolvable by `rlimits`, as setrlimit(2) names them without `RLIMIT_`.
pub const RLIMITS: &[&str] = &[
    "as",
    "core",
    "cpu",
    "data",
    "fsize",
    "locks",
    "memlock",
    "msgqueue",
    "nice",
    "nofile",
    "nproc",
    "rss",
    "rtprio",
    "rttime",
    "sigpending",
    "stack",
];

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum NetworkMode {
    /// Share the host's network namespace (the default: a machine's services usually serve
    /// on the machine's own addresses).
    #[default]
    Host,
    /// A network namespace with only a loopback interface.
    None,
    /// A network namespace of its own, on a bridge through a veth pair.
    Bridged(crate::Attachment),
}

impl NetworkMode {
    /// Whether the container gets a network namespace of its own.
    pub fn is_own(&self) -> bool {
        !matches!(self, NetworkMode::Host)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserNamespace {
    /// Keel picks a free range of 65536 ids per container.
    Auto,
    /// Container id 0 maps to host `uid`/`gid`, for `size` ids.
    Map { uid: u32, gid: u32, size: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    pub soft: u64,
    pub hard: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeSource {
    /// A directory in the host's persistent store, created on first use.
    Named(String),
    /// An absolute path on the host.
    Host(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub source: VolumeSource,
    pub target: String,
    pub readonly: bool,
    /// Set-user-ID and file capabilities work on the volume (`:suid`); off by default, like
    /// Docker's `nosuid`. Device nodes never work on a volume.
    pub suid: bool,
    /// A new named volume starts empty instead of with the image's content at its target
    /// (`:nocopy`, Docker's `volume-nocopy`). Meaningless for host paths.
    pub nocopy: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tmpfs {
    pub target: String,
    pub size: u64,
}

/// Everything that bounds what a container may see and do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Isolation {
    pub network: NetworkMode,
    /// The container's hostname (its UTS namespace's, and `HOSTNAME`); its name if unset.
    pub hostname: Option<String>,
    /// Share PID 1's pid namespace (`pid = "host"`, like `docker run --pid=host`).
    pub host_pid: bool,
    pub userns: Option<UserNamespace>,
    pub readonly_rootfs: bool,
    /// The documented escape hatch: all capabilities, no seccomp, no masked paths, writable
    /// /sys and /proc/sys, the host's devices.
    pub privileged: bool,
    /// Keel's minimal reaping init runs as the container's pid 1.
    pub init: bool,
    /// Capability names without `CAP_`; `cap_drop` may hold `ALL`.
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    pub no_new_privileges: bool,
    /// `user`, `uid`, `user:group` or `uid:gid`; resolved against the image's /etc files.
    pub user: Option<String>,
    pub sysctls: BTreeMap<String, String>,
    pub rlimits: BTreeMap<String, Rlimit>,
    /// Size of /dev/shm.
    pub shm_size: u64,
    pub tmpfs: Vec<Tmpfs>,
    pub volumes: Vec<Volume>,
}

impl Isolation {
    /// The capability names (without `CAP_`) the container's process keeps.
    pub fn capabilities(&self) -> Vec<String> {
        if self.privileged {
            return ALL_CAPABILITIES.iter().map(|c| c.to_string()).collect();
        }
        let drop_all = self.cap_drop.iter().any(|c| c == "ALL");
        let mut caps: Vec<String> = if drop_all {
            Vec::new()
        } else {
            DEFAULT_CAPABILITIES
                .iter()
                .filter(|c| !self.cap_drop.iter().any(|d| d == *c))
                .map(|c| c.to_string())
                .collect()
        };
        for add in &self.cap_add {
            if add == "ALL" {
                return ALL_CAPABILITIES.iter().map(|c| c.to_string()).collect();
            }
            if !caps.contains(add) {
                caps.push(add.clone());
            }
        }
        caps.sort_by_key(|c| ALL_CAPABILITIES.iter().position(|k| k == c));
        caps
    }
}

/// cgroup v2 limits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    pub memory_max: Option<u64>,
    pub memory_high: Option<u64>,
    pub memory_swap_max: Option<u64>,
    /// cpu.max as (quota, period) in microseconds.
    pub cpu_max: Option<(u64, u64)>,
    pub cpu_weight: Option<u64>,
    pub pids_max: Option<u64>,
    pub io: Option<IoLimits>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IoLimits {
    /// A block device path as the guest names it, e.g. `/dev/vda`.
    pub device: String,
    pub read_bps: Option<u64>,
    pub write_bps: Option<u64>,
    pub read_iops: Option<u64>,
    pub write_iops: Option<u64>,
    pub weight: Option<u64>,
}

/// The cpu.max period Keel writes; `cpus = 1.5` becomes a quota of 150000 per 100000.
pub const CPU_PERIOD_US: u64 = 100_000;

pub(crate) mod raw {
    use super::*;

    #[derive(Deserialize)]
    #[serde(untagged)]
    pub enum Size {
        Bytes(i64),
        Text(String),
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    pub enum Userns {
        Mode(String),
        Map(UsernsMap),
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct UsernsMap {
        pub uid: u32,
        pub gid: u32,
        #[serde(default = "default_userns_size")]
        pub size: u32,
    }

    fn default_userns_size() -> u32 {
        65536
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    pub enum RlimitValue {
        Both(i64),
        Pair { soft: i64, hard: i64 },
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Io {
        pub device: Spanned<String>,
        pub read_bps: Option<Spanned<Size>>,
        pub write_bps: Option<Spanned<Size>>,
        pub read_iops: Option<Spanned<i64>>,
        pub write_iops: Option<Spanned<i64>>,
        pub weight: Option<Spanned<i64>>,
    }
}

pub(crate) fn size(
    loc: &Locator<'_>,
    value: &Spanned<raw::Size>,
    key: String,
    min: u64,
) -> Result<u64, ConfigError> {
    let bytes = match value.get_ref() {
        raw::Size::Bytes(n) => u64::try_from(*n).ok(),
        raw::Size::Text(t) => parse_size(t),
    };
    match bytes {
        Some(b) if b >= min => Ok(b),
        Some(_) => Err(loc.at(value, key, format!("must be at least {min} bytes"))),
        None => Err(loc.at(
            value,
            key,
            "expected a size such as \"64M\", \"1G\" or a byte count",
        )),
    }
}

pub(crate) fn optional_size(
    loc: &Locator<'_>,
    value: &Option<Spanned<raw::Size>>,
    key: String,
    min: u64,
) -> Result<Option<u64>, ConfigError> {
    value.as_ref().map(|v| size(loc, v, key, min)).transpose()
}

fn positive(
    loc: &Locator<'_>,
    value: &Option<Spanned<i64>>,
    key: String,
    range: (i64, i64),
) -> Result<Option<u64>, ConfigError> {
    match value {
        None => Ok(None),
        Some(v) if (range.0..=range.1).contains(v.get_ref()) => Ok(Some(*v.get_ref() as u64)),
        Some(v) => Err(loc.at(
            v,
            key,
            format!("expected a number from {} to {}", range.0, range.1),
        )),
    }
}

pub(crate) fn capabilities(
    loc: &Locator<'_>,
    list: &Option<Spanned<Vec<String>>>,
    key: String,
    allow_all: bool,
) -> Result<Vec<String>, ConfigError> {
    let Some(list) = list else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for name in list.get_ref() {
        let upper = name.to_ascii_uppercase();
        let bare = upper.strip_prefix("CAP_").unwrap_or(&upper).to_string();
        if !(ALL_CAPABILITIES.contains(&bare.as_str()) || (allow_all && bare == "ALL")) {
            return Err(loc.at(list, key, format!("unknown capability `{name}`: expected names like \"NET_ADMIN\" or \"CAP_SYS_TIME\"{}", if allow_all { ", or \"ALL\"" } else { "" })));
        }
        out.push(bare);
    }
    Ok(out)
}

pub(crate) fn userns(
    loc: &Locator<'_>,
    value: &Option<Spanned<raw::Userns>>,
    key: String,
) -> Result<Option<UserNamespace>, ConfigError> {
    let Some(v) = value else { return Ok(None) };
    match v.get_ref() {
        raw::Userns::Mode(m) if m == "auto" => Ok(Some(UserNamespace::Auto)),
        raw::Userns::Mode(m) => Err(loc.at(
            v,
            key,
            format!("unknown userns `{m}`: expected \"auto\" or {{ uid = N, gid = N, size = N }}"),
        )),
        raw::Userns::Map(m) => {
            if m.uid == 0 || m.gid == 0 || m.size == 0 {
                return Err(loc.at(v, key, "a user namespace must map to a non-zero host uid and gid, with a non-zero size"));
            }
            if m.uid.checked_add(m.size).is_none() || m.gid.checked_add(m.size).is_none() {
                return Err(loc.at(v, key, "the mapped range runs past the largest uid/gid"));
            }
            Ok(Some(UserNamespace::Map {
                uid: m.uid,
                gid: m.gid,
                size: m.size,
            }))
        }
    }
}

/// Only sysctls a container's own namespaces isolate; net.* only with its own network.
pub(crate) fn sysctls(
    loc: &Locator<'_>,
    value: &Option<Spanned<BTreeMap<String, String>>>,
    key: String,
    own_network: bool,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let Some(v) = value else {
        return Ok(BTreeMap::new());
    };
    const IPC: &[&str] = &[
        "kernel.msgmax",
        "kernel.msgmnb",
        "kernel.msgmni",
        "kernel.sem",
        "kernel.shmall",
        "kernel.shmmax",
        "kernel.shmmni",
        "kernel.shm_rmid_forced",
    ];
    for name in v.get_ref().keys() {
        let namespaced = IPC.contains(&name.as_str())
            || name.starts_with("fs.mqueue.")
            || (name.starts_with("net.") && own_network);
        if !namespaced {
            let why = if name.starts_with("net.") {
                "net.* sysctls need the container's own network (network = \"none\", \"bridge\" or a named network)"
            } else {
                "only namespaced sysctls (kernel.msg*, kernel.sem, kernel.shm*, fs.mqueue.*, net.*) may be set"
            };
            return Err(loc.at(
                v,
                key,
                format!("sysctl `{name}` would change the host: {why}"),
            ));
        }
    }
    Ok(v.get_ref().clone())
}

pub(crate) fn rlimits(
    loc: &Locator<'_>,
    value: &Option<Spanned<BTreeMap<String, raw::RlimitValue>>>,
    key: String,
) -> Result<BTreeMap<String, Rlimit>, ConfigError> {
    let Some(v) = value else {
        return Ok(BTreeMap::new());
    };
    let mut out = BTreeMap::new();
    for (name, limit) in v.get_ref() {
        if !RLIMITS.contains(&name.as_str()) {
            return Err(loc.at(
                v,
                key,
                format!(
                    "unknown rlimit `{name}`: expected one of {}",
                    RLIMITS.join(", ")
                ),
            ));
        }
        let (soft, hard) = match limit {
            raw::RlimitValue::Both(n) => (*n, *n),
            raw::RlimitValue::Pair { soft, hard } => (*soft, *hard),
        };
        if soft < 0 || hard < 0 || soft > hard {
            return Err(loc.at(
                v,
                key,
                format!("rlimit `{name}`: expected 0 <= soft <= hard"),
            ));
        }
        out.insert(
            name.clone(),
            Rlimit {
                soft: soft as u64,
                hard: hard as u64,
            },
        );
    }
    Ok(out)
}

fn container_path(
    loc: &Locator<'_>,
    at: &Spanned<impl Sized>,
    key: &str,
    path: &str,
) -> Result<(), ConfigError> {
    crate::container_path::check(path, crate::container_path::PathUse::MountTarget)
        .map_err(|problem| loc.at(at, key, format!("`{path}`: {problem}")))
}

pub(crate) fn volumes(
    loc: &Locator<'_>,
    value: &Option<Spanned<Vec<String>>>,
    key: String,
) -> Result<Vec<Volume>, ConfigError> {
    let Some(v) = value else {
        return Ok(Vec::new());
    };
    let mut out: Vec<Volume> = Vec::new();
    for spec in v.get_ref() {
        let parts: Vec<&str> = spec.split(':').collect();
        let bad_spec = || {
            loc.at(
                v,
                &key,
                format!(
                    "`{spec}`: expected \"NAME:/path\" or \"/host/path:/path\", optionally \
                     followed by options such as \":ro\" or \":ro,suid\" (ro, rw, suid, nocopy)"
                ),
            )
        };
        let (source, target, options) = match parts.as_slice() {
            [s, t] => (*s, *t, ""),
            [s, t, o] => (*s, *t, *o),
            _ => return Err(bad_spec()),
        };
        let (mut readonly, mut suid, mut nocopy) = (false, false, false);
        for option in options.split(',').filter(|o| !o.is_empty()) {
            match option {
                "ro" => readonly = true,
                "rw" => readonly = false,
                "suid" => suid = true,
                "nocopy" => nocopy = true,
                _ => return Err(bad_spec()),
            }
        }
        container_path(loc, v, &key, target)?;
        let source = if source.starts_with('/') {
            VolumeSource::Host(PathBuf::from(source))
        } else if !source.is_empty()
            && source
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !source.starts_with('.')
        {
            VolumeSource::Named(source.to_string())
        } else {
            return Err(loc.at(v, &key, format!("`{source}` is neither a volume name (letters, digits, -, _, .) nor an absolute host path")));
        };
        if nocopy && matches!(source, VolumeSource::Host(_)) {
            return Err(loc.at(
                v,
                &key,
                format!("`{spec}`: nocopy is for named volumes (a host path is never filled from the image)"),
            ));
        }
        if out.iter().any(|o| o.target == target) {
            return Err(loc.at(v, &key, format!("two volumes are mounted on `{target}`")));
        }
        out.push(Volume {
            source,
            target: target.to_string(),
            readonly,
            suid,
            nocopy,
        });
    }
    Ok(out)
}

pub(crate) fn tmpfs(
    loc: &Locator<'_>,
    value: &Option<Spanned<BTreeMap<String, raw::Size>>>,
    key: String,
) -> Result<Vec<Tmpfs>, ConfigError> {
    let Some(v) = value else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for (target, size) in v.get_ref() {
        container_path(loc, v, &key, target)?;
        let bytes = match size {
            raw::Size::Bytes(n) => u64::try_from(*n).ok(),
            raw::Size::Text(t) => parse_size(t),
        }
        .filter(|b| *b >= 4096)
        .ok_or_else(|| {
            loc.at(
                v,
                &key,
                format!("tmpfs `{target}`: expected a size of at least 4k, such as \"16M\""),
            )
        })?;
        out.push(Tmpfs {
            target: target.clone(),
            size: bytes,
        });
    }
    Ok(out)
}

pub(crate) fn cpus(
    loc: &Locator<'_>,
    value: &Option<Spanned<f64>>,
    key: String,
) -> Result<Option<(u64, u64)>, ConfigError> {
    match value {
        None => Ok(None),
        Some(v) if v.get_ref().is_finite() && *v.get_ref() >= 0.01 && *v.get_ref() <= 1024.0 => {
            Ok(Some((
                (v.get_ref() * CPU_PERIOD_US as f64).round() as u64,
                CPU_PERIOD_US,
            )))
        }
        Some(v) => Err(loc.at(
            v,
            key,
            "expected a number of CPUs from 0.01 to 1024, such as 1.5",
        )),
    }
}

pub(crate) fn cpu_weight(
    loc: &Locator<'_>,
    value: &Option<Spanned<i64>>,
    key: String,
) -> Result<Option<u64>, ConfigError> {
    positive(loc, value, key, (1, 10_000))
}

pub(crate) fn io(
    loc: &Locator<'_>,
    value: &Option<Spanned<raw::Io>>,
    key: String,
) -> Result<Option<IoLimits>, ConfigError> {
    let Some(v) = value else { return Ok(None) };
    let io = v.get_ref();
    if !io.device.get_ref().starts_with("/dev/") {
        return Err(loc.at(
            &io.device,
            format!("{key}.device"),
            "expected a block device path such as \"/dev/vda\"",
        ));
    }
    Ok(Some(IoLimits {
        device: io.device.get_ref().clone(),
        read_bps: optional_size(loc, &io.read_bps, format!("{key}.read_bps"), 1)?,
        write_bps: optional_size(loc, &io.write_bps, format!("{key}.write_bps"), 1)?,
        read_iops: positive(
            loc,
            &io.read_iops,
            format!("{key}.read_iops"),
            (1, i64::MAX),
        )?,
        write_iops: positive(
            loc,
            &io.write_iops,
            format!("{key}.write_iops"),
            (1, i64::MAX),
        )?,
        weight: positive(loc, &io.weight, format!("{key}.weight"), (1, 10_000))?,
    }))
}
