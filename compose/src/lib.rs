//! A Compose file becomes a Keel host file (`keel compose convert`, and `keel build`/`keel
//! run` given a compose file).
//!
//! The Compose Specification is mapped key by key (docs/compose.md has the table): each
//! service becomes a container, its image an `[images.NAME]` pulled from its registry (or
//! the one an overlay host file names), named volumes stay named volumes, bridge networks
//! become `[networks.NAME]`. What Keel cannot express is an error or a warning naming the
//! file, line, service and key and saying what to do instead; nothing is dropped silently.
//! The output is a readable host file, commented where the translation is not obvious, and
//! it is checked by keel_config like any host file.

mod emit;
mod interpolate;
mod lifecycle;
mod limits;
mod network;
mod service;
mod storage;
mod units;
mod yaml;

use std::fmt;
use std::path::{Path, PathBuf};

pub use emit::Overlay;
pub use interpolate::Variables;
use yaml::Node;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The file cannot be converted as it is.
    Error,
    /// Converted, but something means less (or other) on Keel than under Docker.
    Warning,
}

/// One finding, located: `docker-compose.yml:12: services.web.build: ...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub file: PathBuf,
    pub line: usize,
    /// The service it is about, if any.
    pub service: Option<String>,
    /// The key's path: `services.web.ports[1]`, `volumes.data`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let severity = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(
            f,
            "{}:{}: {severity}: {}: {}",
            self.file.display(),
            self.line,
            self.key,
            self.message
        )
    }
}

/// A converted compose file.
#[derive(Debug, Clone)]
pub struct Converted {
    /// The host file's text.
    pub host_file: String,
    /// What the reader should know (warnings only: errors fail the conversion).
    pub warnings: Vec<Diagnostic>,
}

/// What a conversion is given.
pub struct Input<'a> {
    /// The compose file's path (for messages, and the directory `env_file`s are found in).
    pub path: &'a Path,
    pub text: &'a str,
    pub variables: &'a Variables,
    /// A partial host file whose tables replace or extend what the conversion makes.
    pub overlay: Option<&'a Overlay>,
}

/// Converts a compose file; Err holds every error found (and the warnings).
pub fn convert(input: &Input<'_>) -> Result<Converted, Vec<Diagnostic>> {
    let mut cx = Context {
        file: input.path.to_path_buf(),
        dir: input
            .path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default(),
        service: None,
        findings: Vec::new(),
    };
    let root = match yaml::parse(input.text) {
        Ok(root) => root,
        Err(e) => {
            cx.error(
                e.line,
                "",
                format!("not YAML a compose file can be: {}", e.message),
            );
            return Err(cx.findings);
        }
    };
    let root = interpolate_tree(&mut cx, root, input.variables, "");
    let host = convert_root(&mut cx, &root, input.variables, input.overlay);
    // In the order of the file.
    cx.findings.sort_by_key(|d| d.line);
    if cx.findings.iter().any(|d| d.severity == Severity::Error) {
        return Err(cx.findings);
    }
    Ok(Converted {
        host_file: host,
        warnings: cx.findings,
    })
}

/// Where a conversion is and what it found.
pub(crate) struct Context {
    pub file: PathBuf,
    pub dir: PathBuf,
    /// The service being converted.
    pub service: Option<String>,
    pub findings: Vec<Diagnostic>,
}

impl Context {
    fn push(&mut self, severity: Severity, line: usize, key: &str, message: String) {
        self.findings.push(Diagnostic {
            severity,
            file: self.file.clone(),
            line,
            service: self.service.clone(),
            key: key.to_string(),
            message,
        });
    }

    pub fn error(&mut self, line: usize, key: &str, message: impl Into<String>) {
        self.push(Severity::Error, line, key, message.into());
    }

    pub fn warn(&mut self, line: usize, key: &str, message: impl Into<String>) {
        self.push(Severity::Warning, line, key, message.into());
    }

    /// A scalar's text, or an error naming what it is instead.
    pub fn text<'n>(&mut self, node: &'n Node, key: &str) -> Option<&'n str> {
        match node.text() {
            Some(text) => Some(text),
            None => {
                self.error(
                    node.line,
                    key,
                    format!("expected a value, found {}", node.kind()),
                );
                None
            }
        }
    }

    /// A boolean, or an error.
    pub fn bool(&mut self, node: &Node, key: &str) -> Option<bool> {
        let value = node.bool();
        if value.is_none() {
            self.error(node.line, key, "expected true or false");
        }
        value
    }

    /// A string or a list of strings (Compose allows either in many places).
    pub fn strings(&mut self, node: &Node, key: &str) -> Option<Vec<String>> {
        if let Some(text) = node.text() {
            return Some(vec![text.to_string()]);
        }
        let Some(items) = node.items() else {
            self.error(
                node.line,
                key,
                format!("expected a list, found {}", node.kind()),
            );
            return None;
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            out.push(self.text(item, &format!("{key}[{i}]"))?.to_string());
        }
        Some(out)
    }
}

/// Applies interpolation to every value of the tree (keys are left alone, as Compose does).
fn interpolate_tree(cx: &mut Context, node: Node, vars: &Variables, key: &str) -> Node {
    let value = match node.value {
        yaml::Value::Scalar { text, plain } => match interpolate::interpolate(&text, vars) {
            Ok(text) => yaml::Value::Scalar { text, plain },
            Err(e) => {
                cx.error(node.line, key, e);
                yaml::Value::Scalar { text, plain }
            }
        },
        yaml::Value::Seq(items) => yaml::Value::Seq(
            items
                .into_iter()
                .enumerate()
                .map(|(i, n)| interpolate_tree(cx, n, vars, &format!("{key}[{i}]")))
                .collect(),
        ),
        yaml::Value::Map(entries) => yaml::Value::Map(
            entries
                .into_iter()
                .map(|(k, n)| {
                    let path = if key.is_empty() {
                        k.name.clone()
                    } else {
                        format!("{key}.{}", k.name)
                    };
                    (k, interpolate_tree(cx, n, vars, &path))
                })
                .collect(),
        ),
        yaml::Value::Null => yaml::Value::Null,
    };
    Node {
        line: node.line,
        value,
    }
}

/// The whole file: its top-level keys, then each service.
fn convert_root(
    cx: &mut Context,
    root: &Node,
    vars: &Variables,
    overlay: Option<&Overlay>,
) -> String {
    let mut host = emit::HostFile::new(&cx.file);
    let Some(entries) = root.entries() else {
        cx.error(root.line, "", "a compose file is a mapping with `services`");
        return String::new();
    };
    let mut services = None;
    for (key, node) in entries {
        match key.name.as_str() {
            "services" => services = Some(node),
            "volumes" => storage::top_level_volumes(cx, node, &mut host),
            "networks" => network::top_level_networks(cx, node, &mut host),
            // The project name: it names the host unless the overlay does.
            "name" => {
                if let Some(name) = cx.text(node, "name") {
                    host.project = Some(name.to_string());
                }
            }
            "version" => cx.warn(
                key.line,
                "version",
                "obsolete (the Compose Specification ignores it); left out",
            ),
            "secrets" | "configs" => cx.error(
                key.line,
                &key.name,
                format!(
                    "top-level `{}` are not supported: put the file in an image layer, or on the host and mount it with a host-path volume (`/srv/app/secret:/run/secrets/NAME:ro`)",
                    key.name
                ),
            ),
            "include" => cx.error(
                key.line,
                "include",
                "`include` is not supported: merge the included files into one compose file first (`docker compose config` prints the merged file)",
            ),
            name if name.starts_with("x-") => {}
            other => cx.error(key.line, other, format!("unknown top-level key `{other}`")),
        }
    }
    let Some(services) = services else {
        cx.error(root.line, "services", "the file has no `services`");
        return String::new();
    };
    let Some(service_entries) = services.entries() else {
        cx.error(services.line, "services", "expected a mapping of services");
        return String::new();
    };
    let names: Vec<String> = service_entries
        .iter()
        .map(|(k, _)| k.name.clone())
        .collect();
    for (key, node) in service_entries {
        cx.service = Some(key.name.clone());
        service::convert(
            cx, &key.name, key.line, node, &names, vars, &mut host, overlay,
        );
        cx.service = None;
    }
    host.render(cx, overlay)
}
