//! One service → one `[containers.NAME]`, key by key.

use std::collections::BTreeMap;

use crate::emit::{HostFile, Overlay, Section};
use crate::interpolate::{Variables, parse_env_file};
use crate::lifecycle::{depends_on, duration, healthcheck, logging, restart};
use crate::limits::{resources, security_opt, ulimits};
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
