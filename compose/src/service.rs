//! One service → one `[containers.NAME]`, key by key.

use std::collections::BTreeMap;

use crate::emit::{HostFile, Overlay, Section};
use crate::interpolate::{Variables, parse_env_file};
use crate::yaml::Node;
use crate::{Context, network, storage, units};

/// Keys read elsewhere in this module, in the order their Keel keys are written.
const HANDLED: &[&str] = &[
    "image",
    "build",
    "entrypoint",
    "command",
    "user",
    "working_dir",
    "environment",
    "env_file",
    "network_mode",
    "networks",
    "ports",
    "expose",
    "volumes",
    "tmpfs",
    "depends_on",
    "healthcheck",
    "restart",
    "deploy",
    "init",
    "read_only",
    "privileged",
    "cap_add",
    "cap_drop",
    "security_opt",
    "sysctls",
    "ulimits",
    "mem_limit",
    "memswap_limit",
    "mem_reservation",
    "cpus",
    "cpu_shares",
    "pids_limit",
    "shm_size",
    "stop_signal",
    "stop_grace_period",
    "pid",
    "logging",
    "hostname",
    "container_name",
    "labels",
    "profiles",
    "platform",
    "pull_policy",
    "stdin_open",
    "tty",
    "links",
    "external_links",
    "extra_hosts",
    "dns",
    "dns_search",
    "dns_opt",
    "devices",
    "secrets",
    "configs",
    "extends",
    "cgroup_parent",
    "ipc",
    "userns_mode",
    "oom_score_adj",
    "oom_kill_disable",
    "mac_address",
    "domainname",
    "scale",
    "restart_policy",
    "runtime",
    "isolation",
    "blkio_config",
    "cpuset",
    "cpu_quota",
    "cpu_period",
    "mem_swappiness",
    "group_add",
    "volumes_from",
    "develop",
    "annotations",
    "attach",
    "cgroup",
    "uts",
    "storage_opt",
];

#[allow(clippy::too_many_arguments)]
pub(crate) fn convert(
    cx: &mut Context,
    name: &str,
    line: usize,
    service: &Node,
    services: &[String],
    vars: &Variables,
    host: &mut HostFile,
    overlay: Option<&Overlay>,
) {
    let base = format!("services.{name}");
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        cx.error(
            line,
            &base,
            "a container name is letters, digits, `-`, `_` and `.`",
        );
        return;
    }
    let Some(entries) = service.entries() else {
        cx.error(line, &base, "expected a mapping");
        return;
    };
    for (key, _) in entries {
        if !HANDLED.contains(&key.name.as_str()) && !key.name.starts_with("x-") {
            cx.error(
                key.line,
                &format!("{base}.{}", key.name),
                format!("unknown service key `{}`", key.name),
            );
        }
    }
    let at = |key: &str| format!("{base}.{key}");
    let field = |key: &str| service.get(key);
    let mut section = Section {
        name: name.to_string(),
        ..Section::default()
    };

    // What Keel does not do at all.
    for (key, advice) in [
        (
            "secrets",
            "mount the file from the host with a host-path volume (`/srv/app/secret:/run/secrets/NAME:ro`) or put it in an image layer",
        ),
        (
            "configs",
            "mount the file from the host with a host-path volume, or put it in an image layer",
        ),
        (
            "extends",
            "write the service out in full (`docker compose config` prints it merged)",
        ),
        (
            "devices",
            "Keel's device policy gives containers the standard few devices; a device needs `privileged = true` (in an overlay)",
        ),
        (
            "extra_hosts",
            "containers of a network find each other by name; other names come from DNS",
        ),
        (
            "dns",
            "containers use the host's resolvers (its /etc/resolv.conf)",
        ),
        (
            "dns_search",
            "containers use the host's resolvers (its /etc/resolv.conf)",
        ),
        (
            "dns_opt",
            "containers use the host's resolvers (its /etc/resolv.conf)",
        ),
        (
            "volumes_from",
            "mount the same named volumes in both services",
        ),
        ("ipc", "each container has its own IPC namespace"),
        (
            "cgroup_parent",
            "Keel puts each container in /sys/fs/cgroup/keel/NAME",
        ),
        (
            "userns_mode",
            "use Keel's `userns` (an overlay's [containers.NAME] table)",
        ),
        ("runtime", "Keel is the runtime"),
        ("isolation", "Keel is the runtime"),
        (
            "storage_opt",
            "the writable layer is a directory under /run/keel",
        ),
        ("uts", "each container has its own UTS namespace"),
        ("cgroup", "each container has its own cgroup namespace"),
    ] {
        if let Some(node) = field(key) {
            cx.error(node.line, &at(key), format!("not supported: {advice}"));
        }
    }
    for (key, note) in [
        (
            "expose",
            "not needed: containers on a network reach each other's ports",
        ),
        ("links", "not needed: services reach each other by name"),
        (
            "external_links",
            "not needed: services reach each other by name",
        ),
        ("container_name", "the container is named after the service"),
        ("labels", "labels have no meaning on Keel"),
        ("annotations", "annotations have no meaning on Keel"),
        ("stdin_open", "use `keel exec -it` for a shell"),
        ("tty", "use `keel exec -it` for a shell"),
        (
            "attach",
            "every container's output is on the console and in /var/log/keel",
        ),
        (
            "pull_policy",
            "images are pulled by `keel build` (or at boot with pull_at = \"boot\")",
        ),
        ("oom_score_adj", "Keel leaves it at 0"),
        ("oom_kill_disable", "the OOM killer stays on"),
        (
            "mac_address",
            "addresses are derived from the container's name",
        ),
        ("domainname", "left to the image"),
        ("develop", "`docker compose watch` has no Keel counterpart"),
        (
            "mem_reservation",
            "Keel sets limits (`memory`, `memory_high`), not reservations",
        ),
        ("mem_swappiness", "the kernel's default applies"),
        ("cpuset", "containers run on every CPU"),
        (
            "blkio_config",
            "use Keel's `io` (an overlay's [containers.NAME] table)",
        ),
        (
            "group_add",
            "supplementary groups come from the image's /etc/group",
        ),
    ] {
        if let Some(node) = field(key) {
            cx.warn(node.line, &at(key), format!("left out: {note}"));
        }
    }
    if let Some(node) = field("profiles") {
        cx.warn(
            node.line,
            &at("profiles"),
            "Keel has no profiles: the service is converted like the others",
        );
    }
    if let Some(node) = field("platform")
        && let Some(text) = cx.text(node, &at("platform"))
        && !matches!(text, "linux/amd64" | "linux/x86_64" | "amd64")
    {
        cx.error(
            node.line,
            &at("platform"),
            format!("`{text}`: Keel hosts run linux/amd64 images"),
        );
    }
    if let Some(node) = field("scale")
        && node.text().is_some_and(|t| t != "1")
    {
        cx.error(
            node.line,
            &at("scale"),
            "Keel runs one container per service: write each replica as a service of its own",
        );
    }

    // The image.
    match (field("image").and_then(|n| n.text().map(|t| (n, t))), field("build")) {
        (Some((_, reference)), build) => {
            let image = host.image_for(reference, name);
            if let Some(build) = build {
                if overlay.is_some_and(|o| o.has_image(&image)) {
                    cx.warn(build.line, &at("build"), format!("left out: the overlay's [images.{image}] is used"));
                } else {
                    cx.warn(build.line, &at("build"), format!("Keel does not build images: `{reference}` is pulled as it is (build and push it first, or give [images.{image}] in an overlay for a local layout or archive)"));
                }
            }
            section.set("image", image);
        }
        (None, Some(build)) => cx.error(
            build.line,
            &at("build"),
            "Keel does not build images: build it (`docker build -t REF .`), push it to a registry or save it (`docker save` / an OCI layout), then give `image: REF` (and [images.NAME] in an overlay for a local file)",
        ),
        (None, None) => cx.error(line, &base, "a service needs `image`"),
    }

    for (key, keel) in [("entrypoint", "entrypoint"), ("command", "command")] {
        if let Some(node) = field(key)
            && let Some(argv) = argv_of(cx, node, &at(key))
        {
            section.set(keel, argv);
        }
    }
    if let Some(node) = field("user")
        && let Some(text) = cx.text(node, &at("user"))
    {
        section.set("user", text);
    }
    if let Some(node) = field("working_dir")
        && let Some(text) = cx.text(node, &at("working_dir"))
    {
        section.set("workdir", text);
    }

    // Environment: env_file first, `environment` over it.
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    if let Some(node) = field("env_file") {
        env_files(cx, node, &at("env_file"), &mut env);
    }
    if let Some(node) = field("environment") {
        environment(cx, node, &at("environment"), vars, &mut env);
    }
    if !env.is_empty() {
        let table: toml::Table = env
            .into_iter()
            .map(|(k, v)| (k, toml::Value::from(v)))
            .collect();
        section.set("env", toml::Value::Table(table));
    }

    // Network and ports.
    let network = network::service_network(cx, service, host, &mut section);
    if let Some(node) = field("ports") {
        let ports = network::ports(cx, node, &at("ports"), &network);
        if !ports.is_empty() {
            section.set("ports", ports);
        }
    }

    // Storage.
    let mut mounts = storage::Mounts::default();
    if let Some(node) = field("volumes") {
        storage::service_volumes(cx, node, &at("volumes"), name, host, &mut mounts);
    }
    if let Some(node) = field("tmpfs") {
        storage::service_tmpfs(cx, node, &at("tmpfs"), &mut mounts);
    }
    if !mounts.volumes.is_empty() {
        let comment = (!mounts.comments.is_empty()).then(|| mounts.comments.join("\n"));
        section.set_commented("volumes", mounts.volumes.clone(), comment);
    }
    if !mounts.tmpfs.is_empty() {
        let table: toml::Table = mounts
            .tmpfs
            .iter()
            .map(|(t, s)| (t.clone(), toml::Value::from(s.as_str())))
            .collect();
        section.set("tmpfs", toml::Value::Table(table));
    }

    // Life cycle.
    if let Some(node) = field("depends_on") {
        depends_on(cx, node, &at("depends_on"), services, &mut section);
    }
    if let Some(node) = field("healthcheck") {
        healthcheck(cx, node, &at("healthcheck"), &mut section);
    }
    restart(cx, field("restart"), field("deploy"), &base, &mut section);
    if let Some(node) = field("stop_signal")
        && let Some(text) = cx.text(node, &at("stop_signal"))
    {
        section.set("stop_signal", text);
    }
    if let Some(node) = field("stop_grace_period")
        && let Some(ms) = duration(cx, node, &at("stop_grace_period"))
    {
        section.set("stop_timeout", units::keel_duration(ms));
    }
    if let Some(node) = field("logging") {
        logging(cx, node, &at("logging"), &mut section);
    }

    // Isolation.
    for (key, keel) in [
        ("init", "init"),
        ("read_only", "readonly_rootfs"),
        ("privileged", "privileged"),
    ] {
        if let Some(node) = field(key)
            && let Some(on) = cx.bool(node, &at(key))
        {
            section.set(keel, on);
        }
    }
    for key in ["cap_add", "cap_drop"] {
        if let Some(node) = field(key)
            && let Some(caps) = cx.strings(node, &at(key))
        {
            section.set(key, caps);
        }
    }
    if let Some(node) = field("security_opt") {
        security_opt(cx, node, &at("security_opt"), &mut section);
    }
    if let Some(node) = field("pid")
        && let Some(text) = cx.text(node, &at("pid"))
    {
        if text == "host" {
            section.set("pid", "host");
        } else {
            cx.error(
                node.line,
                &at("pid"),
                format!("`{text}`: Keel shares the host's pid namespace (`host`) or none"),
            );
        }
    }
    if let Some(node) = field("sysctls") {
        let pairs = key_values(cx, node, &at("sysctls"));
        if !pairs.is_empty() {
            let table: toml::Table = pairs
                .into_iter()
                .map(|(k, v)| (k, toml::Value::from(v)))
                .collect();
            section.set("sysctls", toml::Value::Table(table));
        }
    }
    if let Some(node) = field("ulimits") {
        ulimits(cx, node, &at("ulimits"), &mut section);
    }
    if let Some(node) = field("hostname")
        && let Some(text) = cx.text(node, &at("hostname"))
        && text != name
    {
        section.set_commented(
            "hostname",
            text,
            Some(format!("other containers still reach it as `{name}`")),
        );
    }

    // Resources.
    resources(cx, service, &base, &mut section);
    host.containers.push(section);
}

/// A command: a list as it is; a string split like a shell would, without running one.
fn argv_of(cx: &mut Context, node: &Node, path: &str) -> Option<Vec<String>> {
    if let Some(text) = node.text() {
        return match split_command(text) {
            Ok(argv) => Some(argv),
            Err(e) => {
                cx.error(node.line, path, e);
                None
            }
        };
    }
    cx.strings(node, path)
}

/// Splits `text` into words with shell quoting (`'...'`, `"..."`, `\`), as Compose does.
fn split_command(text: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\n' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err(format!("`{text}`: unterminated quote")),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => word.push(c),
                            Some(c) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => return Err(format!("`{text}`: unterminated quote")),
                        },
                        Some(c) => word.push(c),
                        None => return Err(format!("`{text}`: unterminated quote")),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(c) = chars.next() {
                    word.push(c);
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// `KEY=value` lists or `KEY: value` mappings (sysctls, environment).
fn key_values(cx: &mut Context, node: &Node, path: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(entries) = node.entries() {
        for (key, value) in entries {
            let text = if value.is_null() {
                String::new()
            } else {
                cx.text(value, &format!("{path}.{}", key.name))
                    .unwrap_or("")
                    .to_string()
            };
            out.push((key.name.clone(), text));
        }
    } else if let Some(items) = node.items() {
        for (i, item) in items.iter().enumerate() {
            if let Some(text) = cx.text(item, &format!("{path}[{i}]")) {
                match text.split_once('=') {
                    Some((k, v)) => out.push((k.to_string(), v.to_string())),
                    None => out.push((text.to_string(), String::new())),
                }
            }
        }
    } else {
        cx.error(node.line, path, "expected a list or a mapping");
    }
    out
}

fn environment(
    cx: &mut Context,
    node: &Node,
    path: &str,
    vars: &Variables,
    env: &mut BTreeMap<String, String>,
) {
    // A name without a value takes the variable of the environment compose runs in.
    let bare: Vec<String> = match (node.entries(), node.items()) {
        (Some(entries), _) => entries
            .iter()
            .filter(|(_, v)| v.is_null())
            .map(|(k, _)| k.name.clone())
            .collect(),
        (_, Some(items)) => items
            .iter()
            .filter_map(|i| i.text().filter(|t| !t.contains('=')).map(str::to_string))
            .collect(),
        _ => Vec::new(),
    };
    for (key, value) in key_values(cx, node, path) {
        if bare.contains(&key) {
            match vars.get(&key) {
                Some(value) => {
                    env.insert(key, value.to_string());
                }
                None => cx.warn(
                    node.line,
                    path,
                    format!("`{key}` has no value here and is not set in the environment or .env: left out"),
                ),
            }
            continue;
        }
        env.insert(key, value);
    }
}

fn env_files(cx: &mut Context, node: &Node, path: &str, env: &mut BTreeMap<String, String>) {
    let mut files: Vec<(String, bool, usize)> = Vec::new();
    let items: Vec<&Node> = match node.items() {
        Some(items) => items.iter().collect(),
        None => vec![node],
    };
    for item in items {
        if let Some(text) = item.text() {
            files.push((text.to_string(), true, item.line));
        } else if let Some(p) = item.get("path").and_then(Node::text) {
            let required = item.get("required").and_then(Node::bool).unwrap_or(true);
            files.push((p.to_string(), required, item.line));
        } else {
            cx.error(
                item.line,
                path,
                "expected a file name or { path, required }",
            );
        }
    }
    for (file, required, line) in files {
        let full = cx.dir.join(&file);
        let text = match std::fs::read_to_string(&full) {
            Ok(text) => text,
            Err(_) if !required => continue,
            Err(e) => {
                cx.error(line, path, format!("{}: {e}", full.display()));
                continue;
            }
        };
        for entry in parse_env_file(&text) {
            match entry {
                Ok((k, v)) => {
                    env.insert(k, v);
                }
                Err((n, e)) => cx.error(line, path, format!("{}:{n}: {e}", full.display())),
            }
        }
    }
}

fn depends_on(
    cx: &mut Context,
    node: &Node,
    path: &str,
    services: &[String],
    section: &mut Section,
) {
    let mut conditions: Vec<(String, String, usize)> = Vec::new();
    if let Some(items) = node.items() {
        for item in items {
            if let Some(text) = item.text() {
                conditions.push((text.to_string(), "started".into(), item.line));
            }
        }
    } else if let Some(entries) = node.entries() {
        for (key, value) in entries {
            let at = format!("{path}.{}", key.name);
            let mut condition = "started".to_string();
            for (field, v) in value.entries().unwrap_or_default() {
                match field.name.as_str() {
                    "condition" => match v.text() {
                        Some("service_started") => condition = "started".into(),
                        Some("service_healthy") => condition = "healthy".into(),
                        Some("service_completed_successfully") => {
                            condition = "completed_successfully".into()
                        }
                        other => cx.error(
                            field.line,
                            &format!("{at}.condition"),
                            format!("`{}`: expected service_started, service_healthy or service_completed_successfully", other.unwrap_or("")),
                        ),
                    },
                    "restart" => cx.warn(field.line, &format!("{at}.restart"), "left out: Keel does not restart a service when its dependency restarts"),
                    "required" => {
                        if v.bool() == Some(false) {
                            cx.warn(field.line, &format!("{at}.required"), "Keel waits for every dependency");
                        }
                    }
                    other => cx.error(field.line, &format!("{at}.{other}"), format!("unknown key `{other}`")),
                }
            }
            conditions.push((key.name.clone(), condition, key.line));
        }
    } else {
        cx.error(node.line, path, "expected a list or a mapping");
    }
    for (name, _, line) in &conditions {
        if !services.contains(name) {
            cx.error(
                *line,
                path,
                format!("`{name}` is not a service of this file"),
            );
        }
    }
    if conditions.iter().all(|(_, c, _)| c == "started") {
        let names: Vec<String> = conditions.into_iter().map(|(n, _, _)| n).collect();
        section.set("depends_on", names);
    } else {
        let table: toml::Table = conditions
            .into_iter()
            .map(|(n, c, _)| (n, toml::Value::from(c)))
            .collect();
        section.set("depends_on", toml::Value::Table(table));
    }
}

fn duration(cx: &mut Context, node: &Node, path: &str) -> Option<u64> {
    let text = cx.text(node, path)?;
    let ms = units::duration_ms(text);
    if ms.is_none() {
        cx.error(
            node.line,
            path,
            format!("`{text}` is not a duration (`30s`, `1m30s`)"),
        );
    }
    ms
}

fn healthcheck(cx: &mut Context, node: &Node, path: &str, section: &mut Section) {
    if node.get("disable").and_then(Node::bool) == Some(true) {
        return;
    }
    let mut table = toml::Table::new();
    let mut comment = None;
    match node.get("test") {
        Some(test) => {
            let at = format!("{path}.test");
            let argv = if let Some(text) = test.text() {
                Some(vec![
                    "/bin/sh".to_string(),
                    "-c".to_string(),
                    text.to_string(),
                ])
            } else {
                cx.strings(test, &at).and_then(|list| match list.first().map(String::as_str) {
                    Some("NONE") => None,
                    Some("CMD") => Some(list[1..].to_vec()),
                    Some("CMD-SHELL") => {
                        comment = Some("CMD-SHELL: run by /bin/sh -c in the container".to_string());
                        Some(vec!["/bin/sh".into(), "-c".into(), list[1..].join(" ")])
                    }
                    _ => {
                        cx.error(test.line, &at, "expected [\"CMD\", ...], [\"CMD-SHELL\", \"...\"], [\"NONE\"] or a string");
                        None
                    }
                })
            };
            match argv {
                Some(argv) if !argv.is_empty() => {
                    table.insert("exec".into(), toml::Value::from(argv));
                }
                Some(_) => cx.error(test.line, &at, "the test has no command"),
                None => return,
            }
        }
        None => {
            cx.error(
                node.line,
                path,
                "Keel does not read the image's HEALTHCHECK: give `test` here",
            );
            return;
        }
    }
    for (field, value) in node.entries().unwrap_or_default() {
        let at = format!("{path}.{}", field.name);
        match field.name.as_str() {
            "test" | "disable" => {}
            "interval" | "timeout" | "start_period" => {
                if let Some(ms) = duration(cx, value, &at) {
                    table.insert(
                        field.name.clone(),
                        toml::Value::from(units::keel_duration(ms)),
                    );
                }
            }
            "retries" => match value.text().and_then(|t| t.parse::<i64>().ok()) {
                Some(n) => {
                    table.insert("retries".into(), toml::Value::from(n));
                }
                None => cx.error(field.line, &at, "expected a number"),
            },
            "start_interval" => cx.warn(
                field.line,
                &at,
                "left out: probes run at `interval` from the start",
            ),
            other => cx.error(
                field.line,
                &at,
                format!("unknown healthcheck key `{other}`"),
            ),
        }
    }
    section.set_commented("healthcheck", toml::Value::Table(table), comment);
}

fn restart(
    cx: &mut Context,
    restart: Option<&Node>,
    deploy: Option<&Node>,
    base: &str,
    section: &mut Section,
) {
    let policy = deploy.and_then(|d| d.get("restart_policy"));
    if let Some(node) = restart {
        let path = format!("{base}.restart");
        let Some(text) = cx.text(node, &path) else {
            return;
        };
        let valid = matches!(text, "no" | "always" | "unless-stopped" | "on-failure")
            || text
                .strip_prefix("on-failure:")
                .is_some_and(|n| n.parse::<u32>().is_ok());
        if valid {
            section.set("restart", text);
        } else {
            cx.error(
                node.line,
                &path,
                format!("`{text}`: expected no, always, on-failure[:N] or unless-stopped"),
            );
        }
        return;
    }
    if let Some(policy) = policy {
        let path = format!("{base}.deploy.restart_policy");
        let condition = policy
            .get("condition")
            .and_then(Node::text)
            .unwrap_or("any");
        let attempts = policy.get("max_attempts").and_then(Node::text);
        let keel = match (condition, attempts) {
            ("none", _) => "no".to_string(),
            ("on-failure", Some(n)) => format!("on-failure:{n}"),
            ("on-failure", None) => "on-failure".into(),
            ("any", _) => "always".into(),
            (other, _) => {
                cx.error(
                    policy.line,
                    &path,
                    format!("condition `{other}`: expected none, on-failure or any"),
                );
                return;
            }
        };
        for key in ["delay", "window"] {
            if let Some(n) = policy.get(key) {
                cx.warn(
                    n.line,
                    &format!("{path}.{key}"),
                    "left out: Keel backs off from 100 ms to 60 s",
                );
            }
        }
        section.set("restart", keel);
        return;
    }
    section.set_commented(
        "restart",
        "no",
        Some("Compose's default (Keel's own is \"always\")"),
    );
}

fn logging(cx: &mut Context, node: &Node, path: &str, section: &mut Section) {
    if let Some(driver) = node.get("driver").and_then(Node::text)
        && !matches!(driver, "json-file" | "local")
    {
        cx.warn(
            node.line,
            &format!("{path}.driver"),
            format!(
                "`{driver}`: Keel writes container output to /var/log/keel/NAME.log and the console"
            ),
        );
    }
    let mut logs = toml::Table::new();
    if let Some(options) = node.get("options") {
        for (field, value) in options.entries().unwrap_or_default() {
            let at = format!("{path}.options.{}", field.name);
            match field.name.as_str() {
                "max-size" => match value.text().and_then(units::size_bytes) {
                    Some(bytes) => {
                        logs.insert(
                            "max_size".into(),
                            toml::Value::from(units::keel_size(bytes)),
                        );
                    }
                    None => cx.error(field.line, &at, "expected a size"),
                },
                "max-file" => match value.text().and_then(|t| t.parse::<i64>().ok()) {
                    Some(n) => {
                        logs.insert("max_files".into(), toml::Value::from(n));
                    }
                    None => cx.error(field.line, &at, "expected a number"),
                },
                other => cx.warn(field.line, &at, format!("`{other}` left out")),
            }
        }
    }
    if !logs.is_empty() {
        section.set("logs", toml::Value::Table(logs));
    }
}

fn security_opt(cx: &mut Context, node: &Node, path: &str, section: &mut Section) {
    for option in cx.strings(node, path).unwrap_or_default() {
        match option.replace('=', ":").as_str() {
            "no-new-privileges" | "no-new-privileges:true" => section.set("no_new_privileges", true),
            "no-new-privileges:false" => section.set("no_new_privileges", false),
            other => cx.error(
                node.line,
                path,
                format!("`{other}`: Keel's seccomp profile and capabilities are Docker's defaults; only no-new-privileges is set here (`privileged` lifts everything)"),
            ),
        }
    }
}

fn ulimits(cx: &mut Context, node: &Node, path: &str, section: &mut Section) {
    let Some(entries) = node.entries() else {
        cx.error(node.line, path, "expected a mapping");
        return;
    };
    let mut table = toml::Table::new();
    for (key, value) in entries {
        let at = format!("{path}.{}", key.name);
        let number = |n: &Node| n.text().and_then(|t| t.parse::<i64>().ok());
        let limit = if let Some(n) = number(value) {
            toml::Value::from(n)
        } else if let (Some(soft), Some(hard)) = (
            value.get("soft").and_then(number),
            value.get("hard").and_then(number),
        ) {
            let mut pair = toml::Table::new();
            pair.insert("soft".into(), soft.into());
            pair.insert("hard".into(), hard.into());
            toml::Value::Table(pair)
        } else {
            cx.error(key.line, &at, "expected a number or { soft, hard }");
            continue;
        };
        table.insert(key.name.clone(), limit);
    }
    section.set("rlimits", toml::Value::Table(table));
}

/// Memory, CPU and task limits, from the service or `deploy.resources.limits`.
fn resources(cx: &mut Context, service: &Node, base: &str, section: &mut Section) {
    let deploy = service.get("deploy");
    if let Some(deploy) = deploy {
        for (field, value) in deploy.entries().unwrap_or_default() {
            let at = format!("{base}.deploy.{}", field.name);
            match field.name.as_str() {
                "resources" | "restart_policy" => {}
                "replicas" => {
                    if value.text() != Some("1") {
                        cx.error(field.line, &at, "Keel runs one container per service: write each replica as a service of its own");
                    }
                }
                "mode" | "labels" | "placement" | "update_config" | "rollback_config"
                | "endpoint_mode" => {
                    cx.warn(field.line, &at, "left out: a swarm setting");
                }
                other => cx.error(field.line, &at, format!("unknown deploy key `{other}`")),
            }
        }
    }
    let resources = deploy.and_then(|d| d.get("resources"));
    let limits = resources.and_then(|r| r.get("limits"));
    if let Some(reservations) = resources.and_then(|r| r.get("reservations")) {
        cx.warn(
            reservations.line,
            &format!("{base}.deploy.resources.reservations"),
            "left out: Keel sets limits, not reservations",
        );
    }
    let pick = |key: &str, limit_key: &str| -> Option<(&Node, String)> {
        service
            .get(key)
            .map(|n| (n, format!("{base}.{key}")))
            .or_else(|| {
                limits
                    .and_then(|l| l.get(limit_key))
                    .map(|n| (n, format!("{base}.deploy.resources.limits.{limit_key}")))
            })
    };
    let mut memory = None;
    if let Some((node, at)) = pick("mem_limit", "memory")
        && let Some(text) = cx.text(node, &at)
    {
        match units::size_bytes(text) {
            Some(bytes) => {
                memory = Some(bytes);
                section.set("memory", units::keel_size(bytes));
            }
            None => cx.error(node.line, &at, format!("`{text}` is not a size")),
        }
    }
    if let Some(node) = service.get("memswap_limit")
        && let Some(text) = cx.text(node, &format!("{base}.memswap_limit"))
        && text != "-1"
    {
        match (units::size_bytes(text), memory) {
            (Some(total), Some(memory)) if total >= memory => section.set_commented(
                "memory_swap",
                units::keel_size(total - memory),
                Some("memswap_limit less mem_limit: Keel's is the swap alone"),
            ),
            _ => cx.error(
                node.line,
                &format!("{base}.memswap_limit"),
                "expected a size at least mem_limit (and mem_limit)",
            ),
        }
    }
    if let Some((node, at)) = pick("cpus", "cpus")
        && let Some(text) = cx.text(node, &at)
    {
        match text.parse::<f64>() {
            Ok(cpus) if cpus > 0.0 => section.set("cpus", cpus),
            _ => cx.error(node.line, &at, format!("`{text}` is not a number of CPUs")),
        }
    }
    if let Some((node, at)) = pick("pids_limit", "pids")
        && let Some(text) = cx.text(node, &at)
    {
        match text.parse::<i64>() {
            Ok(n) if n > 0 => section.set("pids", n),
            Ok(_) => {}
            Err(_) => cx.error(node.line, &at, format!("`{text}` is not a number")),
        }
    }
    if let Some(node) = service.get("cpu_shares")
        && let Some(shares) = node.text().and_then(|t| t.parse::<u64>().ok())
    {
        section.set_commented(
            "cpu_weight",
            units::cpu_weight(shares) as i64,
            Some(format!("cpu_shares {shares}, converted as runc does")),
        );
    }
    for key in ["cpu_quota", "cpu_period"] {
        if let Some(node) = service.get(key) {
            cx.warn(node.line, &format!("{base}.{key}"), "left out: use `cpus`");
        }
    }
    if let Some(node) = service.get("shm_size")
        && let Some(text) = cx.text(node, &format!("{base}.shm_size"))
    {
        match units::size_bytes(text) {
            Some(bytes) => section.set("shm_size", units::keel_size(bytes)),
            None => cx.error(
                node.line,
                &format!("{base}.shm_size"),
                format!("`{text}` is not a size"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_split_like_a_shell() {
        assert_eq!(
            split_command("redis-server --save 60 1").unwrap(),
            ["redis-server", "--save", "60", "1"]
        );
        assert_eq!(
            split_command(r#"sh -c 'echo "a b"; exit 3'"#).unwrap(),
            ["sh", "-c", "echo \"a b\"; exit 3"]
        );
        assert_eq!(
            split_command(r#"echo "x\"y" z\ w"#).unwrap(),
            ["echo", "x\"y", "z w"]
        );
        assert!(split_command("echo 'open").is_err());
    }
}
