//! The Keel host file: one TOML file declares a whole host (hostname, network, images and
//! containers), like a compose file for a machine.
//!
//! `keel build` parses and validates it on the build machine; the init parses the same file
//! again inside the guest. Every error names the file, the line and column, and the dotted key,
//! and says what was expected. Unknown keys are errors, so a typo never silently becomes a
//! default. See `docs/config.md` for every key.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

mod container;
pub mod container_path;
mod image;
mod lifecycle;
mod network;
mod networks;
mod registry;
mod update;

use image::validate_image;
pub use image::{Image, ImageDefaults, ImageSource, LayerSpec, PullAt};
use registry::validate_registries;
pub use registry::{REGISTRY_CA_DIR, Registry, registry_ca_file_name};
pub use update::{
    DEFAULT_HEALTH_TIMEOUT_MS, DEFAULT_VERSION, RebootWindow, UpdatePolicy, check_version,
    compare_versions,
};

pub use network::{Interface, LinkMatch, Prefix, Route, parse_mac};
pub use networks::{Attachment, BridgeNetwork, DEFAULT_NETWORK, Protocol, PublishedPort};

pub use lifecycle::{
    Condition, Dependency, HealthCheck, HealthProbe, Kind, Lifecycle, LogConfig, NETWORK_ONLINE,
    RestartPolicy, TaskFailure, find_cycle, parse_signal,
};

pub use container::{
    ALL_CAPABILITIES, CPU_PERIOD_US, DEFAULT_CAPABILITIES, IoLimits, Isolation, NetworkMode,
    RLIMITS, Resources, Rlimit, Tmpfs, UserNamespace, Volume, VolumeSource,
};

/// A configuration error, located in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based; 0 when the error is about the file as a whole (it could not be read).
    pub line: usize,
    pub column: usize,
    /// Dotted path of the offending key, e.g. `containers.web.memory`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// The name of a host whose file names none and whose network offers none.
pub const DEFAULT_HOSTNAME: &str = "keel";

/// What one image may unpack to unless the host file says otherwise: 8 GiB.
pub const DEFAULT_MAX_UNPACKED_BYTES: u64 = 8 << 30;

/// A validated host file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    /// Where the file was read from; relative layer paths are resolved against its directory.
    pub path: PathBuf,
    /// The host file's `hostname`, or [`DEFAULT_HOSTNAME`] until the network names the host.
    pub hostname: String,
    /// The host file names no host: a DHCP lease's hostname (or `ip=`'s) is taken.
    pub hostname_from_network: bool,
    /// Extra kernel modules to load at boot, beside the ones Keel always needs.
    pub modules: Vec<String>,
    /// Default time a container gets between its stop signal and SIGKILL.
    pub stop_timeout_ms: u64,
    /// The whole shutdown (services, onshutdown tasks, unmount) must fit in this.
    pub shutdown_timeout_ms: u64,
    /// `keel build` protects the root image with dm-verity (`[host] verity = true`).
    pub verity: bool,
    /// The most one image's layers may unpack to (`[host] max_unpacked_size`).
    pub max_unpacked_bytes: u64,
    pub interfaces: BTreeMap<String, Interface>,
    /// Registries by `HOST[:PORT]`.
    pub registries: BTreeMap<String, Registry>,
    /// Bridged container networks: the declared ones, plus `bridge` when a container uses it.
    pub networks: BTreeMap<String, BridgeNetwork>,
    pub images: BTreeMap<String, Image>,
    pub containers: BTreeMap<String, Container>,
    /// `[update]`: this build's version and how an update to it is judged.
    pub update: UpdatePolicy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub image: String,
    /// Replaces the image's Entrypoint when set.
    pub entrypoint: Option<Vec<String>>,
    /// Replaces the image's Cmd when set.
    pub command: Option<Vec<String>>,
    /// Added to (and overriding by name) the image's Env.
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub restart: RestartPolicy,
    /// Echo the container's output on the console, prefixed with its name.
    pub console: bool,
    pub isolation: Isolation,
    pub resources: Resources,
    pub lifecycle: Lifecycle,
    pub logs: LogConfig,
    /// Position in the host file: one-shot tasks run in this order.
    pub order: usize,
}

impl HostConfig {
    /// Reads and validates a host file.
    pub fn load(path: &Path) -> Result<HostConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            key: String::new(),
            message: format!("cannot read the host file: {e}"),
        })?;
        Self::parse(path, &text)
    }

    /// Validates host-file text; `path` names the file in errors and anchors relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<HostConfig, ConfigError> {
        let located = Locator { file: path, text };
        let deserializer = toml::de::Deserializer::parse(text)
            .map_err(|e| located.error(e.span(), String::new(), e.message().to_string()))?;
        let raw: raw::HostFile = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            // Spanned<T> shows up in the path as a private serde field: leave it out.
            let key = e
                .path()
                .to_string()
                .split('.')
                .filter(|part| !part.starts_with("$__serde_spanned"))
                .collect::<Vec<_>>()
                .join(".");
            let inner = e.into_inner();
            let message = inner
                .message()
                .replace("expected i64", "expected an integer");
            located.error(inner.span(), key, message)
        })?;
        validate(&located, raw)
    }

    /// The `[registries]` entry of a registry, named as the image reference writes it
    /// (`docker.io`) or as its API is reached (`registry-1.docker.io`).
    pub fn registry(&self, named: &str, api_host: &str) -> Option<&Registry> {
        self.registries
            .get(named)
            .or_else(|| self.registries.get(api_host))
    }

    /// The directory relative paths in the file are resolved against.
    pub fn base_dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }
}

struct Locator<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Locator<'_> {
    fn error(&self, span: Option<Range<usize>>, key: String, message: String) -> ConfigError {
        let (line, column) = span
            .map(|s| line_column(self.text, s.start))
            .unwrap_or((0, 0));
        ConfigError {
            file: self.file.to_path_buf(),
            line,
            column,
            key: if key == "." { String::new() } else { key },
            message,
        }
    }

    fn at<T>(
        &self,
        value: &Spanned<T>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        self.error(Some(value.span()), key.into(), message.into())
    }
}

/// 1-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, column)
}

/// The file as written, before validation: every table refuses unknown keys.
mod raw {
    use super::*;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct HostFile {
        pub host: Spanned<Host>,
        #[serde(default)]
        pub network: Network,
        #[serde(default)]
        pub networks: BTreeMap<String, Spanned<networks::raw::Network>>,
        #[serde(default)]
        pub registries: BTreeMap<String, Spanned<Registry>>,
        #[serde(default)]
        pub images: BTreeMap<String, Spanned<Image>>,
        #[serde(default)]
        pub containers: BTreeMap<String, Spanned<Container>>,
        pub update: Option<Spanned<update::raw::Update>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Host {
        pub hostname: Option<Spanned<String>>,
        #[serde(default)]
        pub modules: Vec<Spanned<String>>,
        pub stop_timeout: Option<Spanned<String>>,
        pub shutdown_timeout: Option<Spanned<String>>,
        #[serde(default)]
        pub verity: bool,
        pub max_unpacked_size: Option<Spanned<container::raw::Size>>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Network {
        #[serde(default)]
        pub interfaces: BTreeMap<String, Spanned<network::raw::Interface>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Registry {
        pub username: Option<String>,
        pub password: Option<String>,
        pub password_file: Option<Spanned<String>>,
        pub ca: Option<Spanned<String>>,
        #[serde(default)]
        pub insecure: bool,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Image {
        pub layout: Option<Spanned<String>>,
        pub layers: Option<Spanned<Vec<Spanned<String>>>>,
        pub archive: Option<Spanned<String>>,
        pub pull: Option<Spanned<String>>,
        #[serde(rename = "ref")]
        pub reference: Option<Spanned<String>>,
        pub pull_at: Option<Spanned<String>>,
        pub entrypoint: Option<Vec<String>>,
        pub cmd: Option<Vec<String>>,
        #[serde(default)]
        pub env: Vec<Spanned<String>>,
        pub workdir: Option<Spanned<String>>,
        pub user: Option<String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Container {
        pub image: Spanned<String>,
        pub entrypoint: Option<Vec<String>>,
        pub command: Option<Vec<String>>,
        #[serde(default)]
        pub env: BTreeMap<String, String>,
        pub workdir: Option<Spanned<String>>,
        pub memory: Option<Spanned<Size>>,
        pub pids: Option<Spanned<i64>>,
        pub restart: Option<Spanned<String>>,
        #[serde(default = "yes")]
        pub console: bool,
        pub pid: Option<Spanned<String>>,
        pub network: Option<Spanned<String>>,
        pub ports: Option<Spanned<Vec<Spanned<String>>>>,
        pub ipv4_address: Option<Spanned<String>>,
        pub userns: Option<Spanned<container::raw::Userns>>,
        #[serde(default)]
        pub readonly_rootfs: bool,
        pub hostname: Option<Spanned<String>>,
        #[serde(default)]
        pub privileged: bool,
        #[serde(default)]
        pub init: bool,
        pub cap_add: Option<Spanned<Vec<String>>>,
        pub cap_drop: Option<Spanned<Vec<String>>>,
        #[serde(default = "yes")]
        pub no_new_privileges: bool,
        pub user: Option<Spanned<String>>,
        pub sysctls: Option<Spanned<BTreeMap<String, String>>>,
        pub rlimits: Option<Spanned<BTreeMap<String, container::raw::RlimitValue>>>,
        pub shm_size: Option<Spanned<container::raw::Size>>,
        pub tmpfs: Option<Spanned<BTreeMap<String, container::raw::Size>>>,
        pub volumes: Option<Spanned<Vec<String>>>,
        pub memory_high: Option<Spanned<container::raw::Size>>,
        pub memory_swap: Option<Spanned<container::raw::Size>>,
        pub cpus: Option<Spanned<f64>>,
        pub cpu_weight: Option<Spanned<i64>>,
        pub io: Option<Spanned<container::raw::Io>>,
        pub kind: Option<Spanned<String>>,
        pub on_failure: Option<Spanned<String>>,
        pub depends_on: Option<Spanned<lifecycle::raw::DependsOn>>,
        pub healthcheck: Option<Spanned<lifecycle::raw::HealthCheck>>,
        #[serde(default)]
        pub restart_on_unhealthy: bool,
        #[serde(default)]
        pub notify: bool,
        pub stop_signal: Option<Spanned<String>>,
        pub stop_timeout: Option<Spanned<String>>,
        pub logs: Option<Spanned<lifecycle::raw::Logs>>,
    }

    fn yes() -> bool {
        true
    }

    /// A byte count written as an integer or as a string with a unit suffix.
    #[derive(Deserialize)]
    #[serde(untagged)]
    pub enum Size {
        Bytes(i64),
        Text(String),
    }
}

fn validate(loc: &Locator<'_>, raw: raw::HostFile) -> Result<HostConfig, ConfigError> {
    let host = raw.host.get_ref();
    let hostname = match &host.hostname {
        Some(name) => {
            if !valid_hostname(name.get_ref()) {
                return Err(loc.at(
                    name,
                    "host.hostname",
                    format!("`{}` is not a valid hostname: expected 1-64 letters, digits, `-` or `.`, not starting or ending with `-`", name.get_ref()),
                ));
            }
            name.get_ref().clone()
        }
        None => DEFAULT_HOSTNAME.to_string(),
    };
    let hostname_from_network = host.hostname.is_none();
    let mut modules = Vec::new();
    for (i, module) in host.modules.iter().enumerate() {
        let name = module.get_ref();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(loc.at(
                module,
                format!("host.modules[{i}]"),
                format!("`{name}` is not a kernel module name"),
            ));
        }
        modules.push(name.clone());
    }
    let stop_timeout_ms = match &host.stop_timeout {
        None => 10_000,
        Some(text) => parse_duration_ms(text.get_ref()).ok_or_else(|| {
            loc.at(
                text,
                "host.stop_timeout",
                "expected a duration such as \"10s\", \"500ms\" or \"2m\"",
            )
        })?,
    };

    let shutdown_timeout_ms = match &host.shutdown_timeout {
        // Saturating: a stop_timeout of years must not wrap around to a short shutdown.
        None => stop_timeout_ms.saturating_mul(3).max(30_000),
        Some(text) => parse_duration_ms(text.get_ref())
            .filter(|ms| *ms >= 1000)
            .ok_or_else(|| {
                loc.at(
                    text,
                    "host.shutdown_timeout",
                    "expected a duration of at least 1s, such as \"60s\" or \"2m\"",
                )
            })?,
    };

    let max_unpacked_bytes = match &host.max_unpacked_size {
        None => DEFAULT_MAX_UNPACKED_BYTES,
        Some(value) => container::size(loc, value, "host.max_unpacked_size".into(), 1 << 20)?,
    };

    let mut interfaces = BTreeMap::new();
    for (name, iface) in &raw.network.interfaces {
        let key = format!("network.interfaces.{name}");
        interfaces.insert(
            name.clone(),
            network::validate_interface(loc, &key, name, iface)?,
        );
    }
    network::check_duplicates(loc, &raw.network.interfaces, &interfaces)?;

    let mut networks = networks::validate_networks(loc, &raw.networks)?;
    let registries = validate_registries(loc, &raw.registries)?;

    let mut images = BTreeMap::new();
    for (name, image) in &raw.images {
        let key = format!("images.{name}");
        check_name(loc, image, &key, name)?;
        images.insert(name.clone(), validate_image(loc, &key, image)?);
    }

    let mut containers = BTreeMap::new();
    for (name, container) in &raw.containers {
        let key = format!("containers.{name}");
        check_name(loc, container, &key, name)?;
        let c = container.get_ref();
        if !images.contains_key(c.image.get_ref()) {
            let known: Vec<&str> = images.keys().map(String::as_str).collect();
            return Err(loc.at(
                &c.image,
                format!("{key}.image"),
                format!(
                    "no image named `{}` in [images]; expected one of: {}",
                    c.image.get_ref(),
                    if known.is_empty() {
                        "(none defined)".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
        let mut validated = validate_container(loc, &key, c, stop_timeout_ms, &networks)?;
        validated.order = container.span().start;
        containers.insert(name.clone(), validated);
    }
    let graph = raw
        .containers
        .iter()
        .filter_map(|(name, spanned)| {
            let c = containers.get(name)?;
            Some((
                name.clone(),
                (c.lifecycle.clone(), c.restart, spanned.span()),
            ))
        })
        .collect();
    lifecycle::check_graph(loc, &graph)?;
    let spans = raw
        .containers
        .iter()
        .map(|(name, c)| (name.clone(), c.span()))
        .collect();
    networks::assign_addresses(loc, &spans, &mut networks, &mut containers)?;
    let update = update::validate(loc, raw.update.as_ref(), &containers)?;

    Ok(HostConfig {
        path: loc.file.to_path_buf(),
        hostname,
        hostname_from_network,
        modules,
        stop_timeout_ms,
        shutdown_timeout_ms,
        verity: host.verity,
        max_unpacked_bytes,
        interfaces,
        registries,
        networks,
        images,
        containers,
        update,
    })
}

/// Image and container names become directory and cgroup names.
fn check_name<T>(
    loc: &Locator<'_>,
    at: &Spanned<T>,
    key: &str,
    name: &str,
) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(loc.at(at, key, format!("`{name}` is not a valid name: expected up to 64 letters, digits, `-`, `_` or `.`, starting with a letter or digit")))
    }
}

fn check_absolute(loc: &Locator<'_>, path: &Spanned<String>, key: &str) -> Result<(), ConfigError> {
    container_path::check(path.get_ref(), container_path::PathUse::WorkingDir)
        .map_err(|problem| loc.at(path, key, format!("`{}`: {problem}", path.get_ref())))
}

fn validate_container(
    loc: &Locator<'_>,
    key: &str,
    c: &raw::Container,
    default_stop_timeout_ms: u64,
    networks: &BTreeMap<String, BridgeNetwork>,
) -> Result<Container, ConfigError> {
    for name in c.env.keys() {
        if name.is_empty() || name.contains('=') {
            return Err(loc.error(
                None,
                format!("{key}.env"),
                format!("`{name}` is not a valid environment variable name"),
            ));
        }
    }
    if let Some(workdir) = &c.workdir {
        check_absolute(loc, workdir, &format!("{key}.workdir"))?;
    }
    if c.command.as_ref().is_some_and(Vec::is_empty)
        && c.entrypoint.as_ref().is_none_or(Vec::is_empty)
    {
        return Err(loc.error(
            None,
            format!("{key}.command"),
            "an empty `command` with no `entrypoint` leaves nothing to run".into(),
        ));
    }
    let memory_max = match &c.memory {
        None => None,
        Some(size) => {
            let bytes = match size.get_ref() {
                raw::Size::Bytes(n) => u64::try_from(*n).ok(),
                raw::Size::Text(t) => parse_size(t),
            };
            match bytes {
                Some(b) if b >= 1 << 20 => Some(b),
                Some(_) => {
                    return Err(loc.at(
                        size,
                        format!("{key}.memory"),
                        "a memory limit below 1M leaves no room to start a process",
                    ));
                }
                None => {
                    return Err(loc.at(
                        size,
                        format!("{key}.memory"),
                        "expected a size such as \"64M\", \"1G\" or a byte count",
                    ));
                }
            }
        }
    };
    let pids_max = match &c.pids {
        None => None,
        Some(n) if *n.get_ref() >= 1 => Some(*n.get_ref() as u64),
        Some(n) => {
            return Err(loc.at(
                n,
                format!("{key}.pids"),
                "expected a positive number of processes",
            ));
        }
    };
    let kind = lifecycle::kind(loc, &c.kind, format!("{key}.kind"))?;
    let restart = lifecycle::restart(loc, &c.restart, format!("{key}.restart"), kind)?;
    let healthcheck = lifecycle::healthcheck(loc, &c.healthcheck, format!("{key}.healthcheck"))?;
    if c.restart_on_unhealthy && healthcheck.is_none() {
        return Err(loc.error(
            None,
            format!("{key}.restart_on_unhealthy"),
            "needs a `healthcheck` to know when the container is unhealthy".into(),
        ));
    }
    let lifecycle = Lifecycle {
        kind,
        on_failure: lifecycle::on_failure(loc, &c.on_failure, format!("{key}.on_failure"), kind)?,
        depends_on: lifecycle::depends_on(loc, &c.depends_on, format!("{key}.depends_on"))?,
        healthcheck,
        restart_on_unhealthy: c.restart_on_unhealthy,
        notify: c.notify,
        stop_signal: lifecycle::stop_signal(loc, &c.stop_signal, format!("{key}.stop_signal"))?,
        stop_timeout_ms: lifecycle::stop_timeout(
            loc,
            &c.stop_timeout,
            format!("{key}.stop_timeout"),
            default_stop_timeout_ms,
        )?,
    };
    let logs = lifecycle::logs(loc, &c.logs, format!("{key}.logs"))?;
    let host_pid = match &c.pid {
        None => false,
        Some(mode) => match mode.get_ref().as_str() {
            "private" => false,
            "host" => true,
            other => {
                return Err(loc.at(
                    mode,
                    format!("{key}.pid"),
                    format!(
                        "unknown pid namespace mode `{other}`: expected \"private\" or \"host\""
                    ),
                ));
            }
        },
    };
    if let Some(user) = &c.user
        && (user.get_ref().is_empty()
            || user.get_ref().split(':').count() > 2
            || user.get_ref().contains(char::is_whitespace))
    {
        return Err(loc.at(
            user,
            format!("{key}.user"),
            "expected `user`, `uid`, `user:group` or `uid:gid`",
        ));
    }
    if let Some(hostname) = &c.hostname
        && !valid_hostname(hostname.get_ref())
    {
        return Err(loc.at(
            hostname,
            format!("{key}.hostname"),
            format!("`{}` is not a valid hostname: expected 1-64 letters, digits, `-` or `.`, not starting or ending with `-`", hostname.get_ref()),
        ));
    }
    let network =
        networks::container_network(loc, key, &c.network, &c.ports, &c.ipv4_address, networks)?;
    let own_network = network.is_own();
    let isolation = Isolation {
        network,
        hostname: c.hostname.as_ref().map(|h| h.get_ref().clone()),
        host_pid,
        userns: container::userns(loc, &c.userns, format!("{key}.userns"))?,
        readonly_rootfs: c.readonly_rootfs,
        privileged: c.privileged,
        init: c.init,
        cap_add: container::capabilities(loc, &c.cap_add, format!("{key}.cap_add"), true)?,
        cap_drop: container::capabilities(loc, &c.cap_drop, format!("{key}.cap_drop"), true)?,
        no_new_privileges: c.no_new_privileges,
        user: c.user.as_ref().map(|u| u.get_ref().clone()),
        sysctls: container::sysctls(loc, &c.sysctls, format!("{key}.sysctls"), own_network)?,
        rlimits: container::rlimits(loc, &c.rlimits, format!("{key}.rlimits"))?,
        shm_size: container::optional_size(loc, &c.shm_size, format!("{key}.shm_size"), 4096)?
            .unwrap_or(64 << 20),
        tmpfs: container::tmpfs(loc, &c.tmpfs, format!("{key}.tmpfs"))?,
        volumes: container::volumes(loc, &c.volumes, format!("{key}.volumes"))?,
    };
    if isolation.privileged
        && isolation.userns.is_some()
        && let Some(u) = &c.userns
    {
        return Err(loc.at(u, format!("{key}.userns"), "`privileged` and `userns` exclude each other: a privileged container is root on the host"));
    }
    if isolation.host_pid
        && isolation.userns.is_some()
        && let Some(u) = &c.userns
    {
        return Err(loc.at(u, format!("{key}.userns"), "`userns` needs the container's own pid namespace: it cannot be combined with pid = \"host\""));
    }
    let resources = Resources {
        memory_max,
        memory_high: container::optional_size(
            loc,
            &c.memory_high,
            format!("{key}.memory_high"),
            1 << 20,
        )?,
        memory_swap_max: container::optional_size(
            loc,
            &c.memory_swap,
            format!("{key}.memory_swap"),
            0,
        )?,
        cpu_max: container::cpus(loc, &c.cpus, format!("{key}.cpus"))?,
        cpu_weight: container::cpu_weight(loc, &c.cpu_weight, format!("{key}.cpu_weight"))?,
        pids_max,
        io: container::io(loc, &c.io, format!("{key}.io"))?,
    };
    Ok(Container {
        image: c.image.get_ref().clone(),
        entrypoint: c.entrypoint.clone(),
        command: c.command.clone(),
        env: c.env.clone(),
        workdir: c.workdir.as_ref().map(|w| w.get_ref().clone()),
        restart,
        console: c.console,
        isolation,
        resources,
        lifecycle,
        logs,
        order: 0,
    })
}

/// 1-64 letters, digits, `-` or `.`, not starting or ending with `-`.
pub fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
}

/// Parses "64M", "1G", "512k", "100" (bytes); binary units.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return None,
    };
    n.checked_mul(1u64 << shift)
}

/// Parses "10s", "500ms", "2m" into milliseconds.
/// The longest duration a host file may give (30 days): every timer and deadline computed
/// from a duration then stays far from overflowing.
pub const MAX_DURATION_MS: u64 = 30 * 24 * 3600 * 1000;

pub fn parse_duration_ms(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let factor = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        _ => return None,
    };
    n.checked_mul(factor).filter(|ms| *ms <= MAX_DURATION_MS)
}

#[cfg(test)]
mod tests;
