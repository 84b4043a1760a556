//! The host file a conversion writes: what the converter collects, merged with an overlay
//! host file, rendered as readable TOML with comments where the mapping is not obvious.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::Context;

/// A partial host file given beside a compose file: `[host]` and any other top-level table
/// it has are taken as they are; an `[images.NAME]` replaces the pull the converter would
/// write for the image it names NAME; a `[networks.NAME]` replaces that network; the keys
/// of a `[containers.NAME]` replace or extend the converted service's.
#[derive(Debug, Clone)]
pub struct Overlay {
    pub path: PathBuf,
    table: toml::Table,
}

impl Overlay {
    pub fn parse(path: &Path, text: &str) -> Result<Overlay, String> {
        let table: toml::Table =
            toml::from_str(text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Overlay {
            path: path.to_path_buf(),
            table,
        })
    }

    fn section(&self, name: &str) -> Option<&toml::Table> {
        self.table.get(name).and_then(toml::Value::as_table)
    }

    /// The overlay's `[images.NAME]`, if it has one.
    pub fn has_image(&self, name: &str) -> bool {
        self.section("images").is_some_and(|t| t.contains_key(name))
    }
}

/// One `key = value` of a section, with the comment above it.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub key: String,
    pub value: toml::Value,
    pub comment: Option<String>,
}

/// A `[kind.NAME]` section being built.
#[derive(Debug, Clone, Default)]
pub(crate) struct Section {
    pub name: String,
    pub comment: Option<String>,
    pub entries: Vec<Entry>,
}

impl Section {
    pub fn set(&mut self, key: &str, value: impl Into<toml::Value>) {
        self.set_commented(key, value, None::<String>);
    }

    pub fn set_commented(
        &mut self,
        key: &str,
        value: impl Into<toml::Value>,
        comment: Option<impl Into<String>>,
    ) {
        let entry = Entry {
            key: key.to_string(),
            value: value.into(),
            comment: comment.map(Into::into),
        };
        match self.entries.iter_mut().find(|e| e.key == key) {
            Some(existing) => *existing = entry,
            None => self.entries.push(entry),
        }
    }
}

/// Everything the conversion makes, in the order it is written.
pub(crate) struct HostFile {
    source: String,
    pub project: Option<String>,
    /// Compose network names declared at the top level, and their Keel names.
    pub declared_networks: Vec<(String, String)>,
    /// Compose volume keys declared at the top level, and their Keel volume names.
    pub declared_volumes: Vec<(String, String)>,
    pub networks: Vec<Section>,
    /// Image name, the reference it is pulled from, and the first service using it.
    pub images: Vec<(String, String, String)>,
    pub containers: Vec<Section>,
}

impl HostFile {
    pub fn new(path: &Path) -> HostFile {
        HostFile {
            source: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| path.display().to_string()),
            project: None,
            declared_networks: Vec::new(),
            declared_volumes: Vec::new(),
            networks: Vec::new(),
            images: Vec::new(),
            containers: Vec::new(),
        }
    }

    /// The Keel image name for `reference` (its repository's last part, plus its tag when
    /// another reference already took that name), registered on first use.
    pub fn image_for(&mut self, reference: &str, service: &str) -> String {
        if let Some((name, _, _)) = self.images.iter().find(|(_, r, _)| r == reference) {
            return name.clone();
        }
        let without_digest = reference.split('@').next().unwrap_or(reference);
        let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
        let (repo, tag) = last.split_once(':').unwrap_or((last, ""));
        let clean = |s: &str| -> String {
            s.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                        c
                    } else {
                        '-'
                    }
                })
                .collect()
        };
        let mut name = clean(repo);
        if self.images.iter().any(|(n, _, _)| *n == name) && !tag.is_empty() {
            name = format!("{name}-{}", clean(tag));
        }
        let base = name.clone();
        let mut n = 2;
        while self.images.iter().any(|(existing, _, _)| *existing == name) {
            name = format!("{base}-{n}");
            n += 1;
        }
        name.truncate(64);
        self.images
            .push((name.clone(), reference.to_string(), service.to_string()));
        name
    }

    /// The host file's text.
    pub fn render(&self, cx: &Context, overlay: Option<&Overlay>) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# Made from {} by `keel compose convert`: each service is a container,",
            self.source
        );
        out.push_str(
            "# its image is pulled at build time, named volumes live in /var/lib/keel/volumes.\n",
        );
        if let Some(overlay) = overlay {
            let _ = writeln!(
                out,
                "# Tables from {} are merged in.",
                overlay.path.display()
            );
        }
        out.push('\n');

        match overlay.and_then(|o| o.section("host")) {
            Some(host) => render_table(&mut out, "host", host),
            None => {
                let name =
                    self.project
                        .clone()
                        .or_else(|| {
                            cx.dir.canonicalize().ok().and_then(|d| {
                                d.file_name().map(|n| n.to_string_lossy().into_owned())
                            })
                        })
                        .map(|n| hostname_of(&n))
                        .unwrap_or_else(|| "compose".into());
                out.push_str(
                    "# The project's name (set [host] in an overlay file to change it).\n",
                );
                let _ = writeln!(out, "[host]\nhostname = {}\n", toml::Value::from(name));
            }
        }
        if !overlay.is_some_and(|o| o.table.contains_key("network")) {
            out.push_str("# The machine's network: DHCP on its first interface (give [network] in an overlay file\n# for static addresses or more interfaces).\n[network.interfaces.eth0]\ndhcp4 = true\n\n");
        }
        if let Some(overlay) = overlay {
            for (key, value) in &overlay.table {
                if matches!(key.as_str(), "host" | "images" | "networks" | "containers") {
                    continue;
                }
                if let Some(table) = value.as_table() {
                    let mut wrapped = toml::Table::new();
                    wrapped.insert(key.clone(), toml::Value::Table(table.clone()));
                    out.push_str(&toml::to_string(&wrapped).unwrap_or_default());
                    out.push('\n');
                }
            }
        }

        let overlay_section = |kind: &str, name: &str| {
            overlay
                .and_then(|o| o.section(kind))
                .and_then(|t| t.get(name))
                .and_then(toml::Value::as_table)
        };
        for network in &self.networks {
            match overlay_section("networks", &network.name) {
                Some(table) => {
                    render_table(&mut out, &format!("networks.{}", key(&network.name)), table)
                }
                None => render_section(&mut out, "networks", network, None),
            }
        }
        for (name, reference, service) in &self.images {
            match overlay_section("images", name) {
                Some(table) => render_table(&mut out, &format!("images.{}", key(name)), table),
                None => {
                    let _ = writeln!(
                        out,
                        "# {service}'s image, pulled by `keel build` (give [images.{name}] in an overlay file for a local layout or archive).\n[images.{}]\npull = {}\n",
                        key(name),
                        toml::Value::from(reference.as_str())
                    );
                }
            }
        }
        if let Some(images) = overlay.and_then(|o| o.section("images")) {
            for (name, value) in images {
                if !self.images.iter().any(|(n, _, _)| n == name)
                    && let Some(table) = value.as_table()
                {
                    render_table(&mut out, &format!("images.{}", key(name)), table);
                }
            }
        }
        for container in &self.containers {
            render_section(
                &mut out,
                "containers",
                container,
                overlay_section("containers", &container.name),
            );
        }
        if let Some(containers) = overlay.and_then(|o| o.section("containers")) {
            for (name, value) in containers {
                if !self.containers.iter().any(|c| c.name == *name)
                    && let Some(table) = value.as_table()
                {
                    render_table(&mut out, &format!("containers.{}", key(name)), table);
                }
            }
        }
        while out.ends_with("\n\n") {
            out.pop();
        }
        out
    }
}

fn render_section(out: &mut String, kind: &str, section: &Section, overlay: Option<&toml::Table>) {
    if let Some(comment) = &section.comment {
        comment_lines(out, comment);
    }
    let _ = writeln!(out, "[{kind}.{}]", key(&section.name));
    for entry in &section.entries {
        if overlay.is_some_and(|o| o.contains_key(&entry.key)) {
            continue;
        }
        if let Some(comment) = &entry.comment {
            comment_lines(out, comment);
        }
        let _ = writeln!(out, "{} = {}", key(&entry.key), entry.value);
    }
    if let Some(overlay) = overlay {
        for (k, v) in overlay {
            let _ = writeln!(out, "{} = {v}", key(k));
        }
    }
    out.push('\n');
}

fn render_table(out: &mut String, header: &str, table: &toml::Table) {
    let _ = writeln!(out, "[{header}]");
    for (k, v) in table {
        let _ = writeln!(out, "{} = {v}", key(k));
    }
    out.push('\n');
}

fn comment_lines(out: &mut String, comment: &str) {
    for line in comment.lines() {
        let _ = writeln!(out, "# {line}");
    }
}

/// A TOML key: bare when it can be.
pub(crate) fn key(name: &str) -> String {
    if !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        name.to_string()
    } else {
        toml::Value::from(name).to_string()
    }
}

/// A project name as a hostname: letters, digits and `-`.
fn hostname_of(name: &str) -> String {
    let mut host: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    host = host.trim_matches('-').to_string();
    host.truncate(64);
    if host.is_empty() {
        "compose".into()
    } else {
        host
    }
}
