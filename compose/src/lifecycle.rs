//! A service's life cycle in the host file: `depends_on` (with its conditions),
//! `healthcheck`, `restart` (and `deploy.restart_policy`), `stop_grace_period`'s durations and
//! `logging`.

use crate::emit::Section;
use crate::yaml::Node;
use crate::{Context, units};

pub(crate) fn depends_on(
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

pub(crate) fn duration(cx: &mut Context, node: &Node, path: &str) -> Option<u64> {
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

pub(crate) fn healthcheck(cx: &mut Context, node: &Node, path: &str, section: &mut Section) {
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

pub(crate) fn restart(
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

pub(crate) fn logging(cx: &mut Context, node: &Node, path: &str, section: &mut Section) {
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
