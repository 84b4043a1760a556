//! Volumes and tmpfs: Compose's named volumes are Keel's named volumes (filled from the
//! image on first use, as under Docker), absolute binds are host paths of the Keel host,
//! tmpfs mounts keep their size.

use crate::Context;
use crate::emit::HostFile;
use crate::units;
use crate::yaml::Node;

/// Docker gives a tmpfs without a size half the RAM; Keel wants a size.
const DEFAULT_TMPFS: &str = "64M";

fn valid_volume_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The top-level `volumes`.
pub(crate) fn top_level_volumes(cx: &mut Context, node: &Node, host: &mut HostFile) {
    let Some(entries) = node.entries() else {
        if !node.is_null() {
            cx.error(node.line, "volumes", "expected a mapping of volumes");
        }
        return;
    };
    for (key, volume) in entries {
        let path = format!("volumes.{}", key.name);
        let mut name = key.name.clone();
        for (field, value) in volume.entries().unwrap_or_default() {
            let at = format!("{path}.{}", field.name);
            match field.name.as_str() {
                "name" => {
                    if let Some(text) = cx.text(value, &at) {
                        name = text.to_string();
                    }
                }
                "external" => {}
                "driver" => {
                    if cx.text(value, &at).is_some_and(|d| d != "local") {
                        cx.error(
                            field.line,
                            &at,
                            "Keel's volumes are directories on the host's /var (driver `local`)",
                        );
                    }
                }
                "driver_opts" => cx.error(
                    field.line,
                    &at,
                    "driver options (an NFS mount, a device) are not supported: mount the storage on the host and use a host-path volume",
                ),
                "labels" => cx.warn(field.line, &at, "labels have no meaning on Keel; left out"),
                other if other.starts_with("x-") => {}
                other => cx.error(field.line, &at, format!("unknown volume key `{other}`")),
            }
        }
        if !valid_volume_name(&name) {
            cx.error(
                key.line,
                &path,
                format!("`{name}`: a Keel volume name is letters, digits, `-`, `_` and `.`, not starting with `.`"),
            );
            continue;
        }
        host.declared_volumes.push((key.name.clone(), name));
    }
}

/// What a service's `volumes` and `tmpfs` make.
#[derive(Debug, Default)]
pub(crate) struct Mounts {
    pub volumes: Vec<String>,
    /// Target and size.
    pub tmpfs: Vec<(String, String)>,
    pub comments: Vec<String>,
}

/// A service's `volumes`.
pub(crate) fn service_volumes(
    cx: &mut Context,
    node: &Node,
    path: &str,
    service: &str,
    host: &HostFile,
    mounts: &mut Mounts,
) {
    let Some(items) = node.items() else {
        cx.error(node.line, path, "expected a list of volumes");
        return;
    };
    for (i, item) in items.iter().enumerate() {
        let at = format!("{path}[{i}]");
        let spec = if item.entries().is_some() {
            long_volume(cx, item, &at)
        } else if let Some(text) = item.text() {
            short_volume(text)
                .map_err(|e| cx.error(item.line, &at, e))
                .ok()
        } else {
            cx.error(item.line, &at, "expected a volume");
            None
        };
        let Some(spec) = spec else {
            continue;
        };
        if spec.kind == Kind::Tmpfs {
            mounts.tmpfs.push((
                spec.target,
                spec.size.unwrap_or_else(|| DEFAULT_TMPFS.into()),
            ));
            continue;
        }
        let source = match (spec.kind, spec.source.as_deref()) {
            // Anonymous: a named volume of the service's own.
            (Kind::Volume, None) => {
                let name = format!(
                    "{service}{}",
                    spec.target
                        .replace(|c: char| !c.is_ascii_alphanumeric(), "-")
                );
                mounts.comments.push(format!(
                    "{}: an anonymous volume in Compose, the named volume `{name}` here (kept until deleted)",
                    spec.target
                ));
                name
            }
            (Kind::Volume, Some(source)) => {
                match host.declared_volumes.iter().find(|(k, _)| k == source) {
                    Some((_, name)) => name.clone(),
                    None => {
                        cx.error(
                            item.line,
                            &at,
                            format!(
                                "volume `{source}` is not declared under the top-level `volumes`"
                            ),
                        );
                        continue;
                    }
                }
            }
            (Kind::Bind, Some(source)) if source.starts_with('/') => {
                if source == "/var/run/docker.sock" || source == "/run/docker.sock" {
                    cx.error(
                        item.line,
                        &at,
                        "a Keel host has no Docker socket (its control API is /run/keel/api.sock, for host processes only)",
                    );
                    continue;
                }
                cx.warn(
                    item.line,
                    &at,
                    format!("{source} is a path on the Keel host, which must exist there (its root is read-only; /var persists)"),
                );
                source.to_string()
            }
            (Kind::Bind, Some(source)) => {
                cx.error(
                    item.line,
                    &at,
                    format!("`{source}`: a path of the machine running compose means nothing on a Keel host: use a named volume for data, or put the files in an image layer"),
                );
                continue;
            }
            (Kind::Bind, None) | (Kind::Tmpfs, _) => continue,
        };
        let mut options = Vec::new();
        if spec.read_only {
            options.push("ro");
        }
        if spec.nocopy {
            options.push("nocopy");
        }
        let mut volume = format!("{source}:{}", spec.target);
        if !options.is_empty() {
            volume.push(':');
            volume.push_str(&options.join(","));
        }
        mounts.volumes.push(volume);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Volume,
    Bind,
    Tmpfs,
}

#[derive(Debug)]
struct VolumeSpec {
    kind: Kind,
    source: Option<String>,
    target: String,
    read_only: bool,
    nocopy: bool,
    size: Option<String>,
}

/// `SOURCE:TARGET[:MODE]` or `TARGET`.
fn short_volume(text: &str) -> Result<VolumeSpec, String> {
    let parts: Vec<&str> = text.split(':').collect();
    let (source, target, mode) = match parts.as_slice() {
        [target] => (None, *target, ""),
        [source, target] => (Some(*source), *target, ""),
        [source, target, mode] => (Some(*source), *target, *mode),
        _ => return Err(format!("`{text}`: expected SOURCE:TARGET[:MODE]")),
    };
    if !target.starts_with('/') {
        return Err(format!("`{text}`: the target must be an absolute path"));
    }
    let (mut read_only, mut nocopy) = (false, false);
    for option in mode.split(',').filter(|o| !o.is_empty()) {
        match option {
            "ro" => read_only = true,
            "rw" => read_only = false,
            "nocopy" => nocopy = true,
            // SELinux relabelling and macOS consistency: nothing to do here.
            "z" | "Z" | "consistent" | "cached" | "delegated" => {}
            other => return Err(format!("`{text}`: unknown volume option `{other}`")),
        }
    }
    let kind = match source {
        Some(s) if s.starts_with(['/', '.', '~']) => Kind::Bind,
        _ => Kind::Volume,
    };
    Ok(VolumeSpec {
        kind,
        source: source.map(str::to_string),
        target: target.to_string(),
        read_only,
        nocopy,
        size: None,
    })
}

/// `{ type, source, target, read_only, volume: { nocopy }, tmpfs: { size } }`.
fn long_volume(cx: &mut Context, node: &Node, path: &str) -> Option<VolumeSpec> {
    let mut spec = VolumeSpec {
        kind: Kind::Volume,
        source: None,
        target: String::new(),
        read_only: false,
        nocopy: false,
        size: None,
    };
    for (field, value) in node.entries().unwrap_or_default() {
        let at = format!("{path}.{}", field.name);
        match field.name.as_str() {
            "type" => {
                spec.kind = match cx.text(value, &at)? {
                    "volume" => Kind::Volume,
                    "bind" => Kind::Bind,
                    "tmpfs" => Kind::Tmpfs,
                    other => {
                        cx.error(
                            field.line,
                            &at,
                            format!("type `{other}` is not supported (volume, bind and tmpfs are)"),
                        );
                        return None;
                    }
                }
            }
            "source" => spec.source = cx.text(value, &at).map(str::to_string),
            "target" => spec.target = cx.text(value, &at)?.to_string(),
            "read_only" => spec.read_only = cx.bool(value, &at)?,
            "volume" => {
                if let Some(nocopy) = value.get("nocopy") {
                    spec.nocopy = cx.bool(nocopy, &format!("{at}.nocopy"))?;
                }
            }
            "tmpfs" => {
                if let Some(size) = value.get("size") {
                    let text = cx.text(size, &format!("{at}.size"))?;
                    match units::size_bytes(text) {
                        Some(bytes) => spec.size = Some(units::keel_size(bytes)),
                        None => cx.error(
                            size.line,
                            &format!("{at}.size"),
                            format!("`{text}` is not a size"),
                        ),
                    }
                }
            }
            "bind" | "consistency" => {}
            other => cx.error(field.line, &at, format!("unknown volume key `{other}`")),
        }
    }
    if !spec.target.starts_with('/') {
        cx.error(node.line, path, "a volume needs an absolute `target`");
        return None;
    }
    Some(spec)
}

/// A service's `tmpfs`: `/run` or `/run:size=10m,mode=1777`, or a list of them.
pub(crate) fn service_tmpfs(cx: &mut Context, node: &Node, path: &str, mounts: &mut Mounts) {
    let Some(specs) = cx.strings(node, path) else {
        return;
    };
    for spec in specs {
        let (target, options) = spec.split_once(':').unwrap_or((&spec, ""));
        let mut size = DEFAULT_TMPFS.to_string();
        for option in options.split(',').filter(|o| !o.is_empty()) {
            match option.split_once('=') {
                Some(("size", value)) => match units::size_bytes(value) {
                    Some(bytes) => size = units::keel_size(bytes),
                    None => cx.error(node.line, path, format!("`{value}` is not a size")),
                },
                Some(("mode", _)) | Some(("uid", _)) | Some(("gid", _)) => cx.warn(
                    node.line,
                    path,
                    format!("`{option}`: Keel's tmpfs mounts are mode 1777, owned by root"),
                ),
                _ => cx.warn(node.line, path, format!("`{option}` left out")),
            }
        }
        mounts.tmpfs.push((target.to_string(), size));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_volumes() {
        let v = short_volume("data:/var/lib/postgresql/data").unwrap();
        assert_eq!(
            (v.kind, v.source.as_deref(), v.read_only),
            (Kind::Volume, Some("data"), false)
        );
        let v = short_volume("./conf:/etc/nginx/conf.d:ro,z").unwrap();
        assert_eq!((v.kind, v.read_only), (Kind::Bind, true));
        let v = short_volume("/cache").unwrap();
        assert_eq!((v.kind, v.source), (Kind::Volume, None));
        assert!(short_volume("data:relative").is_err());
        assert!(short_volume("data:/x:bogus").is_err());
        assert!(short_volume("data:/x:nocopy").unwrap().nocopy);
    }
}
