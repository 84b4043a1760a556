//! A service's limits and privileges in the host file: `security_opt`, `ulimits` and the
//! resources (`mem_limit`, `cpus`, `deploy.resources`...).

use crate::emit::Section;
use crate::yaml::Node;
use crate::{Context, units};

pub(crate) fn security_opt(cx: &mut Context, node: &Node, path: &str, section: &mut Section) {
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

pub(crate) fn ulimits(cx: &mut Context, node: &Node, path: &str, section: &mut Section) {
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
pub(crate) fn resources(cx: &mut Context, service: &Node, base: &str, section: &mut Section) {
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
