//! Supervision keys: restart policy, dependencies, health checks, one-shot tasks, stop
//! signal and grace, logs.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use toml::Spanned;

use crate::{ConfigError, Locator, parse_duration_ms, parse_size};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    No,
    Always,
    /// Restart after a non-zero exit (or a kill), at most `max` times if given.
    OnFailure {
        max: Option<u32>,
    },
    /// Like `always`, except after an explicit stop (through the API), which sticks.
    UnlessStopped,
}

/// When a dependency counts as satisfied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Condition {
    /// Its process started (or, for a container with `notify = true`, it sent READY=1).
    Started,
    /// Its health check passed.
    Healthy,
    /// It ran to completion with exit code 0.
    CompletedSuccessfully,
    /// Not a container: every required host interface has its address (static ones
    /// applied, required DHCP leases bound). Written `depends_on = ["network-online"]`.
    NetworkOnline,
}

/// The name `depends_on` uses for the network-online condition; no container may take it.
pub const NETWORK_ONLINE: &str = "network-online";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dependency {
    pub name: String,
    pub condition: Condition,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthProbe {
    /// Runs inside the container (its namespaces, cgroup and security); healthy on exit 0.
    Exec(Vec<String>),
    /// A TCP connection to this port on the container's address.
    Tcp { port: u16 },
    /// An HTTP GET; healthy on a 2xx or 3xx answer.
    Http { port: u16, path: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub probe: HealthProbe,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Consecutive failures that make the container unhealthy.
    pub retries: u32,
    /// Failures during this time after a start do not count.
    pub start_period_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kind {
    /// A long-running container.
    #[default]
    Service,
    /// Runs to completion, in file order, before any service starts.
    OnBoot,
    /// Runs to completion, in file order, when the host shuts down (after the services stop).
    OnShutdown,
}

/// What a failed one-shot task does to the boot or shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TaskFailure {
    /// Report it and go on.
    #[default]
    Continue,
    /// Stop the sequence: no services start (onboot), or shutdown skips the remaining tasks.
    Halt,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lifecycle {
    pub kind: Kind,
    pub on_failure: TaskFailure,
    pub depends_on: Vec<Dependency>,
    pub healthcheck: Option<HealthCheck>,
    pub restart_on_unhealthy: bool,
    /// Readiness through an sd_notify socket (`NOTIFY_SOCKET`, `READY=1`).
    pub notify: bool,
    /// The host file's `stop_signal`; without one the image's StopSignal, else SIGTERM.
    pub stop_signal: Option<i32>,
    pub stop_timeout_ms: u64,
}

impl Default for Lifecycle {
    fn default() -> Lifecycle {
        Lifecycle {
            kind: Kind::Service,
            on_failure: TaskFailure::Continue,
            depends_on: Vec::new(),
            healthcheck: None,
            restart_on_unhealthy: false,
            notify: false,
            stop_signal: None,
            stop_timeout_ms: 10_000,
        }
    }
}

/// Per-container log files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogConfig {
    /// Rotate when the file reaches this size.
    pub max_size: u64,
    /// Rotated files kept beside the current one.
    pub max_files: u32,
}

impl Default for LogConfig {
    fn default() -> LogConfig {
        LogConfig {
            max_size: 10 << 20,
            max_files: 3,
        }
    }
}

/// Signal names a stop signal may use.
const SIGNALS: &[(&str, i32)] = &[
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("KILL", 9),
    ("USR1", 10),
    ("USR2", 12),
    ("TERM", 15),
    ("WINCH", 28),
    ("PWR", 30),
];

/// "SIGTERM", "TERM" or "15".
pub fn parse_signal(text: &str) -> Option<i32> {
    if let Ok(n) = text.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let upper = text.to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    SIGNALS
        .iter()
        .find(|(name, _)| *name == bare)
        .map(|(_, n)| *n)
}

pub(crate) mod raw {
    use super::*;

    #[derive(Deserialize)]
    #[serde(untagged)]
    pub enum DependsOn {
        Names(Vec<String>),
        Conditions(BTreeMap<String, String>),
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct HealthCheck {
        pub exec: Option<Vec<String>>,
        pub tcp: Option<Spanned<i64>>,
        pub http: Option<Spanned<String>>,
        pub interval: Option<Spanned<String>>,
        pub timeout: Option<Spanned<String>>,
        pub retries: Option<Spanned<i64>>,
        pub start_period: Option<Spanned<String>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Logs {
        pub max_size: Option<Spanned<String>>,
        pub max_files: Option<Spanned<i64>>,
    }
}

pub(crate) fn restart(
    loc: &Locator<'_>,
    value: &Option<Spanned<String>>,
    key: String,
    kind: Kind,
) -> Result<RestartPolicy, ConfigError> {
    let Some(v) = value else {
        return Ok(if kind == Kind::Service {
            RestartPolicy::Always
        } else {
            RestartPolicy::No
        });
    };
    let expected =
        "expected \"no\", \"always\", \"on-failure\", \"on-failure:N\" or \"unless-stopped\"";
    let policy = match v.get_ref().as_str() {
        "no" => RestartPolicy::No,
        "always" => RestartPolicy::Always,
        "unless-stopped" => RestartPolicy::UnlessStopped,
        "on-failure" => RestartPolicy::OnFailure { max: None },
        other => match other.strip_prefix("on-failure:").map(str::parse::<u32>) {
            Some(Ok(max)) if max > 0 => RestartPolicy::OnFailure { max: Some(max) },
            _ => {
                return Err(loc.at(
                    v,
                    key,
                    format!("unknown restart policy `{other}`: {expected}"),
                ));
            }
        },
    };
    if kind != Kind::Service
        && matches!(policy, RestartPolicy::Always | RestartPolicy::UnlessStopped)
    {
        return Err(loc.at(v, key, "a one-shot task runs to completion: its restart policy can only be \"no\" or \"on-failure[:N]\""));
    }
    Ok(policy)
}

pub(crate) fn kind(
    loc: &Locator<'_>,
    value: &Option<Spanned<String>>,
    key: String,
) -> Result<Kind, ConfigError> {
    match value {
        None => Ok(Kind::Service),
        Some(v) => match v.get_ref().as_str() {
            "service" => Ok(Kind::Service),
            "onboot" => Ok(Kind::OnBoot),
            "onshutdown" => Ok(Kind::OnShutdown),
            other => Err(loc.at(
                v,
                key,
                format!(
                    "unknown kind `{other}`: expected \"service\", \"onboot\" or \"onshutdown\""
                ),
            )),
        },
    }
}

pub(crate) fn on_failure(
    loc: &Locator<'_>,
    value: &Option<Spanned<String>>,
    key: String,
    kind: Kind,
) -> Result<TaskFailure, ConfigError> {
    let Some(v) = value else {
        return Ok(TaskFailure::Continue);
    };
    if kind == Kind::Service {
        return Err(loc.at(
            v,
            key,
            "`on_failure` is for one-shot tasks (kind = \"onboot\" or \"onshutdown\")",
        ));
    }
    match v.get_ref().as_str() {
        "continue" => Ok(TaskFailure::Continue),
        "halt" => Ok(TaskFailure::Halt),
        other => Err(loc.at(
            v,
            key,
            format!("unknown `{other}`: expected \"continue\" or \"halt\""),
        )),
    }
}

pub(crate) fn depends_on(
    loc: &Locator<'_>,
    value: &Option<Spanned<raw::DependsOn>>,
    key: String,
) -> Result<Vec<Dependency>, ConfigError> {
    let Some(v) = value else {
        return Ok(Vec::new());
    };
    let pairs: Vec<(String, Condition)> = match v.get_ref() {
        raw::DependsOn::Names(names) => names
            .iter()
            .map(|n| {
                let condition = if n == NETWORK_ONLINE {
                    Condition::NetworkOnline
                } else {
                    Condition::Started
                };
                (n.clone(), condition)
            })
            .collect(),
        raw::DependsOn::Conditions(map) => {
            let mut out = Vec::new();
            for (name, condition) in map {
                if name == NETWORK_ONLINE {
                    if condition != "online" {
                        return Err(loc.at(
                            v,
                            key,
                            format!("`{NETWORK_ONLINE}` takes the condition \"online\" (or list it by name: depends_on = [\"{NETWORK_ONLINE}\"]), not `{condition}`"),
                        ));
                    }
                    out.push((name.clone(), Condition::NetworkOnline));
                    continue;
                }
                let condition = match condition.as_str() {
                    "started" => Condition::Started,
                    "healthy" => Condition::Healthy,
                    "completed_successfully" => Condition::CompletedSuccessfully,
                    other => {
                        return Err(loc.at(
                            v,
                            key,
                            format!("`{name}`: unknown condition `{other}`: expected \"started\", \"healthy\" or \"completed_successfully\""),
                        ));
                    }
                };
                out.push((name.clone(), condition));
            }
            out
        }
    };
    Ok(pairs
        .into_iter()
        .map(|(name, condition)| Dependency { name, condition })
        .collect())
}

fn duration(
    loc: &Locator<'_>,
    value: &Option<Spanned<String>>,
    key: String,
    default: u64,
) -> Result<u64, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => parse_duration_ms(v.get_ref()).ok_or_else(|| {
            loc.at(
                v,
                key,
                "expected a duration such as \"10s\", \"500ms\" or \"2m\"",
            )
        }),
    }
}

pub(crate) fn stop_timeout(
    loc: &Locator<'_>,
    value: &Option<Spanned<String>>,
    key: String,
    default: u64,
) -> Result<u64, ConfigError> {
    duration(loc, value, key, default)
}

pub(crate) fn stop_signal(
    loc: &Locator<'_>,
    value: &Option<Spanned<String>>,
    key: String,
) -> Result<Option<i32>, ConfigError> {
    match value {
        None => Ok(None),
        Some(v) => parse_signal(v.get_ref()).map(Some).ok_or_else(|| {
            loc.at(
                v,
                key,
                "expected a signal such as \"SIGTERM\", \"SIGINT\", \"SIGQUIT\" or a number",
            )
        }),
    }
}

pub(crate) fn healthcheck(
    loc: &Locator<'_>,
    value: &Option<Spanned<raw::HealthCheck>>,
    key: String,
) -> Result<Option<HealthCheck>, ConfigError> {
    let Some(v) = value else { return Ok(None) };
    let h = v.get_ref();
    let port = |p: &Spanned<i64>, k: String| -> Result<u16, ConfigError> {
        u16::try_from(*p.get_ref())
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| loc.at(p, k, "expected a TCP port from 1 to 65535"))
    };
    let probe = match (&h.exec, &h.tcp, &h.http) {
        (Some(cmd), None, None) if !cmd.is_empty() => HealthProbe::Exec(cmd.clone()),
        (None, Some(p), None) => HealthProbe::Tcp { port: port(p, format!("{key}.tcp"))? },
        (None, None, Some(url)) => {
            // http = ":8080/healthz" or "8080/healthz" or "http://localhost:8080/healthz"
            let text = url.get_ref();
            let rest = text.strip_prefix("http://").map(|r| r.split_once(':').map_or(r, |(_, p)| p)).unwrap_or(text);
            let rest = rest.trim_start_matches(':');
            let (port_text, path) = rest.split_once('/').map_or((rest, "/".to_string()), |(p, path)| (p, format!("/{path}")));
            let port = port_text.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                loc.at(url, format!("{key}.http"), "expected \"PORT/path\" or \"http://localhost:PORT/path\"")
            })?;
            HealthProbe::Http { port, path }
        }
        _ => return Err(loc.at(v, key, "a health check needs exactly one of `exec = [...]`, `tcp = PORT` or `http = \"PORT/path\"`")),
    };
    let interval_ms = duration(loc, &h.interval, format!("{key}.interval"), 10_000)?;
    let timeout_ms = duration(loc, &h.timeout, format!("{key}.timeout"), 5_000)?;
    if interval_ms == 0 || timeout_ms == 0 {
        return Err(loc.at(v, key, "interval and timeout must be longer than zero"));
    }
    let retries = match &h.retries {
        None => 3,
        Some(r) => u32::try_from(*r.get_ref())
            .ok()
            .filter(|r| *r >= 1)
            .ok_or_else(|| loc.at(r, format!("{key}.retries"), "expected a positive number"))?,
    };
    let start_period_ms = duration(loc, &h.start_period, format!("{key}.start_period"), 0)?;
    Ok(Some(HealthCheck {
        probe,
        interval_ms,
        timeout_ms,
        retries,
        start_period_ms,
    }))
}

pub(crate) fn logs(
    loc: &Locator<'_>,
    value: &Option<Spanned<raw::Logs>>,
    key: String,
) -> Result<LogConfig, ConfigError> {
    let Some(v) = value else {
        return Ok(LogConfig::default());
    };
    let l = v.get_ref();
    let mut out = LogConfig::default();
    if let Some(size) = &l.max_size {
        out.max_size = parse_size(size.get_ref())
            .filter(|s| *s >= 4096)
            .ok_or_else(|| {
                loc.at(
                    size,
                    format!("{key}.max_size"),
                    "expected a size of at least 4k, such as \"10M\"",
                )
            })?;
    }
    if let Some(files) = &l.max_files {
        out.max_files = u32::try_from(*files.get_ref())
            .ok()
            .filter(|n| *n <= 100)
            .ok_or_else(|| {
                loc.at(
                    files,
                    format!("{key}.max_files"),
                    "expected 0 to 100 rotated files",
                )
            })?;
    }
    Ok(out)
}

/// Checks that every dependency exists and can meet its condition, and that the
/// dependencies form no cycle (naming it if they do). `spans` locates each container.
pub(crate) fn check_graph(
    loc: &Locator<'_>,
    containers: &BTreeMap<String, (Lifecycle, RestartPolicy, std::ops::Range<usize>)>,
) -> Result<(), ConfigError> {
    for (name, (lifecycle, _, span)) in containers {
        let key = format!("containers.{name}.depends_on");
        if name == NETWORK_ONLINE {
            return Err(loc.error(
                Some(span.clone()),
                format!("containers.{name}"),
                format!("`{NETWORK_ONLINE}` names the network-online condition in depends_on: choose another container name"),
            ));
        }
        for dep in &lifecycle.depends_on {
            if dep.condition == Condition::NetworkOnline {
                continue;
            }
            let Some((target, target_restart, _)) = containers.get(&dep.name) else {
                return Err(loc.error(
                    Some(span.clone()),
                    key,
                    format!(
                        "depends on `{}`, which is not a container in this file",
                        dep.name
                    ),
                ));
            };
            if dep.name == *name {
                return Err(loc.error(
                    Some(span.clone()),
                    key,
                    "a container cannot depend on itself".into(),
                ));
            }
            if dep.condition == Condition::Healthy && target.healthcheck.is_none() {
                return Err(loc.error(
                    Some(span.clone()),
                    key,
                    format!(
                        "waits for `{}` to be healthy, but `{}` has no healthcheck",
                        dep.name, dep.name
                    ),
                ));
            }
            if dep.condition == Condition::CompletedSuccessfully
                && matches!(
                    target_restart,
                    RestartPolicy::Always | RestartPolicy::UnlessStopped
                )
            {
                return Err(loc.error(
                    Some(span.clone()),
                    key,
                    format!("waits for `{}` to complete, but `{}` restarts forever (restart = always/unless-stopped)", dep.name, dep.name),
                ));
            }
            if target.kind == Kind::OnShutdown && lifecycle.kind != Kind::OnShutdown {
                return Err(loc.error(
                    Some(span.clone()),
                    key,
                    format!(
                        "`{}` only runs at shutdown: nothing can wait for it",
                        dep.name
                    ),
                ));
            }
        }
    }
    if let Some(cycle) = find_cycle(containers.iter().map(|(n, (l, _, _))| {
        (
            n.as_str(),
            l.depends_on.iter().map(|d| d.name.as_str()).collect(),
        )
    })) {
        let first = &cycle[0];
        let span = containers.get(first.as_str()).map(|(_, _, s)| s.clone());
        return Err(loc.error(
            span,
            format!("containers.{first}.depends_on"),
            format!("dependency cycle: {}", cycle.join(" -> ")),
        ));
    }
    Ok(())
}

/// A cycle in a dependency graph, as names ending where they start.
pub fn find_cycle<'a>(graph: impl Iterator<Item = (&'a str, Vec<&'a str>)>) -> Option<Vec<String>> {
    let graph: BTreeMap<&str, Vec<&str>> = graph.collect();
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit<'a>(
        node: &'a str,
        graph: &BTreeMap<&'a str, Vec<&'a str>>,
        marks: &mut BTreeMap<&'a str, Mark>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let start = path.iter().position(|n| *n == node).unwrap_or(0);
                let mut cycle: Vec<String> = path[start..].iter().map(|s| s.to_string()).collect();
                cycle.push(node.to_string());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(node, Mark::Open);
        path.push(node);
        for next in graph.get(node).into_iter().flatten() {
            if graph.contains_key(next)
                && let Some(cycle) = visit(next, graph, marks, path)
            {
                return Some(cycle);
            }
        }
        path.pop();
        marks.insert(node, Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    let names: BTreeSet<&str> = graph.keys().copied().collect();
    for node in names {
        if let Some(cycle) = visit(node, &graph, &mut marks, &mut Vec::new()) {
            return Some(cycle);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_name_or_number() {
        assert_eq!(parse_signal("SIGTERM"), Some(15));
        assert_eq!(parse_signal("int"), Some(2));
        assert_eq!(parse_signal("9"), Some(9));
        assert_eq!(parse_signal("SIGNOPE"), None);
        assert_eq!(parse_signal("0"), None);
    }

    #[test]
    fn cycles_are_found_and_named() {
        let g = vec![
            ("a", vec!["b"]),
            ("b", vec!["c"]),
            ("c", vec!["a"]),
            ("d", vec![]),
        ];
        assert_eq!(find_cycle(g.into_iter()).unwrap(), ["a", "b", "c", "a"]);
        let g = vec![("a", vec!["b", "c"]), ("b", vec!["c"]), ("c", vec![])];
        assert_eq!(find_cycle(g.into_iter()), None);
    }
}
