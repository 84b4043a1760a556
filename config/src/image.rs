//! `[images.NAME]`: where each image comes from (layers, an archive, a layout, a registry),
//! its defaults, and their validation.

use super::*;

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// An existing OCI image layout directory (for example one written by `keel import`).
    Layout(PathBuf),
    /// Layers to import at build time, bottom first.
    Layers(Vec<LayerSpec>),
    /// An oci-archive or docker-archive tarball (`docker save`, `skopeo copy ...
    /// docker-archive:`), imported at build time.
    Archive(PathBuf),
    /// An image in an OCI distribution registry.
    Pull { reference: String, at: PullAt },
}

/// When a registry image is fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullAt {
    /// By `keel build`, which embeds it in the OS image.
    Build,
    /// By the booted host, before the containers using it start (the OS image stays
    /// small; the registry must be reachable from the host).
    Boot,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerSpec {
    /// A directory or a tarball (`.tar`, `.tar.gz`, `.tgz`), resolved against the host file.
    Path(PathBuf),
    /// A root filesystem made of a static busybox binary and its applet links.
    Busybox(PathBuf),
}

/// The image configuration written into an imported image (ignored for `layout` images,
/// whose own configuration is used).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageDefaults {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub source: ImageSource,
    /// Which image of a layout or archive holding several: a tag or a `sha256:` digest.
    pub reference: Option<String>,
    pub defaults: ImageDefaults,
}

pub(crate) fn validate_image(
    loc: &Locator<'_>,
    key: &str,
    image: &Spanned<raw::Image>,
) -> Result<Image, ConfigError> {
    let i = image.get_ref();
    let given: Vec<&str> = [
        ("layout", i.layout.is_some()),
        ("layers", i.layers.is_some()),
        ("archive", i.archive.is_some()),
        ("pull", i.pull.is_some()),
    ]
    .into_iter()
    .filter_map(|(k, set)| set.then_some(k))
    .collect();
    if given.len() != 1 {
        let what = if given.is_empty() {
            "expected one of `layout = \"DIR\"`, `layers = [...]`, `archive = \"FILE.tar\"` or `pull = \"REGISTRY/REPO:TAG\"`".to_string()
        } else {
            format!(
                "`{}` exclude each other: an image comes from exactly one source",
                given.join("` and `")
            )
        };
        let at = given
            .get(1)
            .map_or(key.to_string(), |k| format!("{key}.{k}"));
        return Err(loc.at(image, at, what));
    }
    let source = match (&i.layout, &i.layers, &i.archive, &i.pull) {
        (Some(layout), _, _, _) => {
            if layout.get_ref().is_empty() {
                return Err(loc.at(
                    layout,
                    format!("{key}.layout"),
                    "expected the path of an OCI image layout directory",
                ));
            }
            ImageSource::Layout(PathBuf::from(layout.get_ref()))
        }
        (_, _, Some(archive), _) => {
            if archive.get_ref().is_empty() {
                return Err(loc.at(
                    archive,
                    format!("{key}.archive"),
                    "expected the path of an oci-archive or docker-archive tarball",
                ));
            }
            ImageSource::Archive(PathBuf::from(archive.get_ref()))
        }
        (_, _, _, Some(pull)) => {
            if !valid_image_reference(pull.get_ref()) {
                return Err(loc.at(
                    pull,
                    format!("{key}.pull"),
                    "expected an image reference such as \"registry.example:5000/team/app:1.2\" or \"nginx@sha256:<64 hex>\"",
                ));
            }
            let at = match i.pull_at.as_ref().map(|a| a.get_ref().as_str()) {
                None | Some("build") => PullAt::Build,
                Some("boot") => PullAt::Boot,
                Some(other) => {
                    let at = i.pull_at.as_ref().unwrap_or(pull);
                    return Err(loc.at(
                        at,
                        format!("{key}.pull_at"),
                        format!("unknown `{other}`: expected \"build\" or \"boot\""),
                    ));
                }
            };
            ImageSource::Pull {
                reference: pull.get_ref().clone(),
                at,
            }
        }
        (None, Some(layers), None, None) => {
            if layers.get_ref().is_empty() {
                return Err(loc.at(
                    layers,
                    format!("{key}.layers"),
                    "expected at least one layer",
                ));
            }
            let mut specs = Vec::new();
            for (n, layer) in layers.get_ref().iter().enumerate() {
                let text = layer.get_ref();
                let spec = match text.strip_prefix("busybox:") {
                    Some(binary) if !binary.is_empty() => LayerSpec::Busybox(PathBuf::from(binary)),
                    Some(_) => {
                        return Err(loc.at(
                            layer,
                            format!("{key}.layers[{n}]"),
                            "expected `busybox:PATH`, the path of a static busybox binary",
                        ));
                    }
                    None if text.is_empty() => {
                        return Err(loc.at(
                            layer,
                            format!("{key}.layers[{n}]"),
                            "expected a directory, a tarball or `busybox:PATH`",
                        ));
                    }
                    None => LayerSpec::Path(PathBuf::from(text)),
                };
                specs.push(spec);
            }
            ImageSource::Layers(specs)
        }
        (None, None, None, None) => unreachable_source(),
    };
    if let Some(at) = &i.pull_at
        && i.pull.is_none()
    {
        return Err(loc.at(at, format!("{key}.pull_at"), "`pull_at` goes with `pull`"));
    }
    if let Some(r) = &i.reference
        && !matches!(source, ImageSource::Layout(_) | ImageSource::Archive(_))
    {
        return Err(loc.at(
            r,
            format!("{key}.ref"),
            "`ref` picks an image in a `layout` or an `archive` (a `pull` reference names its tag or digest itself)",
        ));
    }
    let imported = matches!(source, ImageSource::Layers(_));
    for (what, set) in [
        ("entrypoint", i.entrypoint.is_some()),
        ("cmd", i.cmd.is_some()),
        ("env", !i.env.is_empty()),
        ("workdir", i.workdir.is_some()),
        ("user", i.user.is_some()),
    ] {
        if set && !imported {
            return Err(loc.at(
                image,
                format!("{key}.{what}"),
                format!("`{what}` describes an image imported from `layers`; an existing image brings its own configuration (override it in the container instead)"),
            ));
        }
    }
    for (n, var) in i.env.iter().enumerate() {
        if var
            .get_ref()
            .split_once('=')
            .is_none_or(|(name, _)| name.is_empty())
        {
            return Err(loc.at(var, format!("{key}.env[{n}]"), "expected `NAME=value`"));
        }
    }
    if let Some(workdir) = &i.workdir {
        check_absolute(loc, workdir, &format!("{key}.workdir"))?;
    }
    Ok(Image {
        source,
        reference: i.reference.as_ref().map(|r| r.get_ref().clone()),
        defaults: ImageDefaults {
            entrypoint: i.entrypoint.clone(),
            cmd: i.cmd.clone(),
            env: i.env.iter().map(|v| v.get_ref().clone()).collect(),
            workdir: i.workdir.as_ref().map(|w| w.get_ref().clone()),
            user: i.user.clone(),
        },
    })
}

/// The source selection above has covered every combination with exactly one source.
pub(crate) fn unreachable_source() -> ImageSource {
    ImageSource::Layers(Vec::new())
}

/// `[REGISTRY/]REPO[:TAG][@sha256:HEX]`, in the distribution spec's grammar (loosely: the
/// registry client parses it exactly).
pub(crate) fn valid_image_reference(text: &str) -> bool {
    let (name, digest) = match text.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (text, None),
    };
    if let Some(d) = digest {
        let hex = d.strip_prefix("sha256:").unwrap_or("");
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return false;
        }
    }
    !name.is_empty()
        && !name.starts_with('/')
        && !name.ends_with('/')
        && !name.contains("//")
        && name.chars().all(|c| {
            c.is_ascii_lowercase()
                || c.is_ascii_digit()
                || "._-/:".contains(c)
                || c.is_ascii_uppercase()
        })
}
