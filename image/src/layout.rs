//! Reading an OCI image layout directory (`oci-layout`, `index.json`, `blobs/sha256/...`).
//!
//! Every JSON blob that is trusted (nested indexes, the manifest, the config) is checked
//! against its descriptor's size and SHA-256 digest. Layer blobs are only located here;
//! [`unpack`](crate::unpack) verifies them while streaming, so they are read once.

use std::fs;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest};

use crate::ImageError;
use crate::digest::{hex, is_sha256_hex};

/// The annotation naming a manifest in `index.json`.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// Media type of an uncompressed OCI layer.
pub const MEDIA_TYPE_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// Media type of a gzip-compressed OCI layer.
pub const MEDIA_TYPE_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Media type of a zstd-compressed OCI layer.
pub const MEDIA_TYPE_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// Media type of a gzip-compressed Docker layer.
pub const MEDIA_TYPE_DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Media type of an uncompressed Docker layer.
pub const MEDIA_TYPE_DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";

/// Media type of an OCI image manifest.
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of an OCI image index.
pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of a Docker image manifest (schema 2).
pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Media type of a Docker manifest list (Docker's multi-platform index).
pub const MEDIA_TYPE_DOCKER_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";
/// Media type of an OCI image config.
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of a Docker image config.
pub const MEDIA_TYPE_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// The annotation containerd (and `docker save` since Docker 25) puts the full image name in.
const CONTAINERD_NAME_ANNOTATION: &str = "io.containerd.image.name";

/// The only platform Keel runs.
const WANTED_PLATFORM: &str = "linux/amd64";

/// JSON documents are small; refusing big ones keeps a hostile layout from exhausting memory.
pub(crate) const MAX_JSON_BLOB: u64 = 16 << 20;
/// Nested indexes deeper than this are refused rather than followed forever.
const MAX_INDEX_DEPTH: usize = 4;

/// One layer of an image, bottom layer first in [`ImageLayout::layers`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// `sha256:<hex>` of the (compressed) blob.
    pub digest: String,
    /// The layer's media type (one of the supported `MEDIA_TYPE_LAYER_*`).
    pub media_type: String,
    /// Path of the blob file.
    pub path: PathBuf,
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LayerCompression {
    None,
    Gzip,
    Zstd,
}

impl LayerCompression {
    pub(crate) fn from_media_type(media_type: &str) -> Result<Self, ImageError> {
        match media_type {
            MEDIA_TYPE_LAYER_TAR | MEDIA_TYPE_DOCKER_LAYER_TAR => Ok(LayerCompression::None),
            MEDIA_TYPE_LAYER_GZIP | MEDIA_TYPE_DOCKER_LAYER_GZIP => Ok(LayerCompression::Gzip),
            MEDIA_TYPE_LAYER_ZSTD => Ok(LayerCompression::Zstd),
            other => Err(ImageError::UnsupportedMediaType(other.to_owned())),
        }
    }
}

impl Layer {
    /// The hex part of the digest (validated when the layout was opened).
    pub(crate) fn digest_hex(&self) -> Result<&str, ImageError> {
        match self.digest.strip_prefix("sha256:") {
            Some(h) if is_sha256_hex(h) => Ok(h),
            _ => Err(ImageError::UnsupportedDigest(self.digest.clone())),
        }
    }

    pub(crate) fn compression(&self) -> Result<LayerCompression, ImageError> {
        LayerCompression::from_media_type(&self.media_type)
    }
}

/// Wraps a compressed layer stream in the matching decoder.
pub(crate) fn decompress<'a, R: Read + 'a>(
    compression: LayerCompression,
    reader: R,
) -> Result<Box<dyn Read + 'a>, ImageError> {
    Ok(match compression {
        LayerCompression::None => Box::new(reader),
        LayerCompression::Gzip => Box::new(MultiGzDecoder::new(reader)),
        LayerCompression::Zstd => Box::new(ZstdFrames::new(BufReader::new(reader))),
    })
}

/// A pure-Rust zstd decoder over a stream of several frames. ruzstd's `StreamingDecoder`
/// handles one frame, but zstd layers may hold several (and skippable frames, as written
/// by zstd:chunked), which the format defines as plain concatenation.
struct ZstdFrames<R: Read> {
    source: Option<R>,
    current: Option<FrameReader<R>>,
}

/// The magic number is read ahead to spot skippable frames, then replayed to the decoder.
type FrameReader<R> = ruzstd::decoding::StreamingDecoder<
    io::Chain<io::Cursor<[u8; 4]>, R>,
    ruzstd::decoding::FrameDecoder,
>;

impl<R: Read> ZstdFrames<R> {
    fn new(source: R) -> Self {
        Self {
            source: Some(source),
            current: None,
        }
    }

    /// Starts the next data frame, skipping skippable frames. Returns false at end of input.
    fn next_frame(&mut self) -> io::Result<bool> {
        loop {
            let Some(mut source) = self.source.take() else {
                return Ok(false);
            };
            let mut magic = [0u8; 4];
            let mut got = 0;
            while got < magic.len() {
                match source.read(&mut magic[got..]) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            match got {
                0 => return Ok(false),
                4 => {}
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "truncated zstd frame header",
                    ));
                }
            }
            if (0x184D_2A50..=0x184D_2A5F).contains(&u32::from_le_bytes(magic)) {
                let mut len = [0u8; 4];
                source.read_exact(&mut len)?;
                let len = u64::from(u32::from_le_bytes(len));
                let skipped = io::copy(&mut (&mut source).take(len), &mut io::sink())?;
                if skipped != len {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "truncated zstd skippable frame",
                    ));
                }
                self.source = Some(source);
                continue;
            }
            let chained = io::Cursor::new(magic).chain(source);
            let dec = ruzstd::decoding::StreamingDecoder::new(chained)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            self.current = Some(dec);
            return Ok(true);
        }
    }
}

impl<R: Read> Read for ZstdFrames<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if let Some(dec) = self.current.as_mut() {
                let n = dec.read(buf)?;
                if n > 0 {
                    return Ok(n);
                }
                if let Some(dec) = self.current.take() {
                    // The decoder parsed the header, so the replayed magic is used up.
                    let (_, source) = dec.into_inner().into_inner();
                    self.source = Some(source);
                }
            }
            if !self.next_frame()? {
                return Ok(0);
            }
        }
    }
}

/// An opened, verified OCI image layout with one selected manifest.
#[derive(Debug, Clone)]
pub struct ImageLayout {
    dir: PathBuf,
    manifest_digest: String,
    manifest_media_type: String,
    manifest_size: u64,
    manifest: ImageManifest,
    config: ImageConfiguration,
    layers: Vec<Layer>,
}

/// A transport protocol of an exposed port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortProtocol {
    /// `N/tcp`, or a bare `N`.
    Tcp,
    /// `N/udp`.
    Udp,
    /// `N/sctp`.
    Sctp,
}

/// The runtime defaults an image config carries, normalised: missing lists are empty,
/// empty strings are `None`, ports and volumes are sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeDefaults {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env`, `NAME=value` in the image's order.
    pub env: Vec<String>,
    /// `WorkingDir`.
    pub workdir: Option<String>,
    /// `User` (`user`, `uid`, `user:group`, ...).
    pub user: Option<String>,
    /// `ExposedPorts` (`80/tcp`, `53/udp`, `8080`), sorted; malformed keys are left out
    /// (see [`RuntimeDefaults::ignored_ports`]).
    pub exposed_ports: Vec<(u16, PortProtocol)>,
    /// `ExposedPorts` keys that are not `PORT[/tcp|udp|sctp]`.
    pub ignored_ports: Vec<String>,
    /// `Volumes`, sorted.
    pub volumes: Vec<String>,
    /// `StopSignal` (`SIGTERM`, `15`, `SIGRTMIN+3`), as written.
    pub stop_signal: Option<String>,
}

/// Parses an `ExposedPorts` key: `80/tcp`, `53/udp`, `9/sctp` or `8080` (tcp).
fn parse_port(key: &str) -> Option<(u16, PortProtocol)> {
    let (port, proto) = match key.split_once('/') {
        Some((p, proto)) => (p, proto.to_ascii_lowercase()),
        None => (key, "tcp".to_owned()),
    };
    let proto = match proto.as_str() {
        "tcp" => PortProtocol::Tcp,
        "udp" => PortProtocol::Udp,
        "sctp" => PortProtocol::Sctp,
        _ => return None,
    };
    match port.parse::<u16>() {
        Ok(n) if n > 0 && port.bytes().all(|b| b.is_ascii_digit()) => Some((n, proto)),
        _ => None,
    }
}

impl ImageLayout {
    /// Opens the layout at `dir`, which must list exactly one image (use
    /// [`ImageLayout::open_ref`] for layouts holding several). An image index (OCI image
    /// index or Docker manifest list, possibly nested) resolves to its linux/amd64 manifest.
    pub fn open(dir: &Path) -> Result<Self, ImageError> {
        Self::open_impl(dir, None)
    }

    /// Opens the layout at `dir`, selecting an image by `reference`:
    /// - a digest (`sha256:<hex>`) of a manifest or index listed in `index.json` or in an
    ///   index it lists: exactly that one (an index then resolves to linux/amd64);
    /// - otherwise a name, matched against each entry's
    ///   `org.opencontainers.image.ref.name` (and `io.containerd.image.name`) annotation:
    ///   exactly; else with Docker's normalisation (`docker.io/library/`, `:latest`); else
    ///   by the tag alone (`t` finds `example.com/app:t`, `app:t` finds an entry named `t`).
    ///   Several different images matching equally well is an error naming them.
    pub fn open_ref(dir: &Path, reference: &str) -> Result<Self, ImageError> {
        Self::open_impl(dir, Some(reference))
    }

    /// The layout directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `sha256:<hex>` of the selected manifest.
    pub fn manifest_digest(&self) -> &str {
        &self.manifest_digest
    }

    /// The media type of the selected manifest (OCI or Docker schema 2).
    pub fn manifest_media_type(&self) -> &str {
        &self.manifest_media_type
    }

    /// The size in bytes of the selected manifest blob.
    pub fn manifest_size(&self) -> u64 {
        self.manifest_size
    }

    /// The selected manifest.
    pub fn manifest(&self) -> &ImageManifest {
        &self.manifest
    }

    /// The image configuration (entrypoint, env, ...).
    pub fn config(&self) -> &ImageConfiguration {
        &self.config
    }

    /// The config's Entrypoint, Cmd, Env, WorkingDir, User, ExposedPorts, Volumes and
    /// StopSignal.
    pub fn runtime_defaults(&self) -> RuntimeDefaults {
        let Some(c) = self.config.config() else {
            return RuntimeDefaults::default();
        };
        let non_empty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
        let mut exposed_ports = Vec::new();
        let mut ignored_ports = Vec::new();
        for key in c.exposed_ports().iter().flatten() {
            match parse_port(key) {
                Some(p) => exposed_ports.push(p),
                None => ignored_ports.push(key.clone()),
            }
        }
        exposed_ports.sort();
        exposed_ports.dedup();
        ignored_ports.sort();
        let mut volumes = c.volumes().clone().unwrap_or_default();
        volumes.sort();
        RuntimeDefaults {
            entrypoint: c.entrypoint().clone().unwrap_or_default(),
            cmd: c.cmd().clone().unwrap_or_default(),
            env: c.env().clone().unwrap_or_default(),
            workdir: non_empty(c.working_dir()),
            user: non_empty(c.user()),
            exposed_ports,
            ignored_ports,
            volumes,
            stop_signal: non_empty(c.stop_signal()),
        }
    }

    /// The layers, bottom first.
    pub fn layers(&self) -> Vec<Layer> {
        self.layers.clone()
    }

    fn open_impl(dir: &Path, reference: Option<&str>) -> Result<Self, ImageError> {
        let invalid = |reason: String| ImageError::InvalidLayout {
            path: dir.to_owned(),
            reason,
        };
        let marker_path = dir.join("oci-layout");
        let marker = fs::read(&marker_path).map_err(|e| invalid(format!("oci-layout: {e}")))?;
        check_layout_marker(&marker, &marker_path.display().to_string()).map_err(&invalid)?;

        let index_path = dir.join("index.json");
        let index_bytes = fs::read(&index_path).map_err(|e| invalid(format!("index.json: {e}")))?;
        let index: ImageIndex = parse_json(&index_bytes, "index.json")?;

        let (desc, manifest_bytes) = resolve_manifest(index.manifests(), reference, |d, what| {
            read_json_blob(dir, d, what)
        })?;
        let manifest: ImageManifest = parse_json(&manifest_bytes, "image manifest")?;
        let manifest_digest = desc.digest().to_string();

        let config_desc = manifest.config();
        let config_type = config_desc.media_type().to_string();
        if config_type != MEDIA_TYPE_CONFIG && config_type != MEDIA_TYPE_DOCKER_CONFIG {
            return Err(ImageError::UnsupportedMediaType(config_type));
        }
        let config_bytes = read_json_blob(dir, config_desc, "image config")?;
        let config: ImageConfiguration = parse_json(&config_bytes, "image config")?;

        let mut layers = Vec::with_capacity(manifest.layers().len());
        for l in manifest.layers() {
            let media_type = l.media_type().to_string();
            LayerCompression::from_media_type(&media_type)?;
            let path = blob_path(dir, l)?;
            layers.push(Layer {
                digest: l.digest().to_string(),
                media_type,
                path,
            });
        }
        check_diff_ids(&config, layers.len()).map_err(invalid)?;

        Ok(ImageLayout {
            dir: dir.to_owned(),
            manifest_digest,
            manifest_media_type: desc.media_type().to_string(),
            manifest_size: desc.size(),
            manifest,
            config,
            layers,
        })
    }
}

/// Checks an `oci-layout` file's content; the error is the reason.
pub(crate) fn check_layout_marker(marker: &[u8], what: &str) -> Result<(), String> {
    let marker: serde_json::Value =
        serde_json::from_slice(marker).map_err(|e| format!("{what}: {e}"))?;
    match marker.get("imageLayoutVersion").and_then(|v| v.as_str()) {
        Some(v) if v.starts_with("1.") => Ok(()),
        other => Err(format!("unsupported imageLayoutVersion {other:?}")),
    }
}

/// The config must list one diff_id per manifest layer; the error is the reason.
pub(crate) fn check_diff_ids(config: &ImageConfiguration, layers: usize) -> Result<(), String> {
    let diff_ids = config.rootfs().diff_ids().len();
    if diff_ids == layers {
        Ok(())
    } else {
        Err(format!(
            "config lists {diff_ids} diff_ids but the manifest has {layers} layers"
        ))
    }
}

pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &str,
) -> Result<T, ImageError> {
    serde_json::from_slice(bytes).map_err(|e| ImageError::Json {
        what: what.to_owned(),
        source: e,
    })
}

/// The names an index entry goes by (its ref.name and containerd image-name annotations).
fn entry_names(d: &Descriptor) -> Vec<String> {
    let Some(a) = d.annotations() else {
        return Vec::new();
    };
    [REF_NAME_ANNOTATION, CONTAINERD_NAME_ANNOTATION]
        .iter()
        .filter_map(|k| a.get(*k).cloned())
        .collect()
}

fn ref_names(descs: &[Descriptor]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for n in descs.iter().flat_map(entry_names) {
        if !names.contains(&n) {
            names.push(n);
        }
    }
    names
}

fn is_manifest(d: &Descriptor) -> bool {
    matches!(
        d.media_type().to_string().as_str(),
        MEDIA_TYPE_MANIFEST | MEDIA_TYPE_DOCKER_MANIFEST
    )
}

fn is_index(d: &Descriptor) -> bool {
    matches!(
        d.media_type().to_string().as_str(),
        MEDIA_TYPE_INDEX | MEDIA_TYPE_DOCKER_LIST
    )
}

fn is_manifest_or_index(d: &Descriptor) -> bool {
    is_manifest(d) || is_index(d)
}

/// The tag of an image reference: what follows the last `:` after the last `/` (so a
/// registry port is not taken for a tag), without any `@digest`.
fn tag_of(reference: &str) -> Option<&str> {
    let name = reference.split('@').next().unwrap_or(reference);
    let last = name.rsplit('/').next().unwrap_or(name);
    last.rsplit_once(':')
        .map(|(_, t)| t)
        .filter(|t| !t.is_empty())
}

/// Docker's normalisation of a reference: no default registry or `library/` prefix (and
/// no `localhost/`, which podman and skopeo add), `:latest` when untagged.
fn normalize_reference(reference: &str) -> String {
    let mut r = reference;
    for prefix in [
        "docker.io/library/",
        "index.docker.io/library/",
        "docker.io/",
        "index.docker.io/",
        "localhost/",
    ] {
        if let Some(rest) = r.strip_prefix(prefix) {
            r = rest;
            break;
        }
    }
    if tag_of(r).is_none() && !r.contains('@') {
        format!("{r}:latest")
    } else {
        r.to_owned()
    }
}

/// How well a recorded image name matches a requested reference; lower is better, `None`
/// is no match. Besides exact and normalised equality, a short form matches: the tag alone
/// (`t` for `example.com/app:t`, and `app:t` for a name that is only `t`), or the
/// name's last path components (`app:t` for `example.com/app:t`).
pub(crate) fn reference_match(name: &str, wanted: &str) -> Option<u8> {
    if name == wanted {
        Some(0)
    } else if normalize_reference(name) == normalize_reference(wanted) {
        Some(1)
    } else if tag_of(name) == Some(wanted)
        || tag_of(wanted) == Some(name)
        || (tag_of(wanted).is_some()
            && name
                .strip_suffix(wanted)
                .is_some_and(|rest| rest.ends_with('/')))
    {
        Some(2)
    } else {
        None
    }
}

/// Picks among `items` (each with its names and an identity, e.g. a digest) the ones whose
/// names best match `wanted`: `Ok(None)` if none does, an error if several different
/// identities tie.
pub(crate) fn best_reference_match<'a, T>(
    items: &'a [T],
    wanted: &str,
    names: impl Fn(&T) -> Vec<String>,
    identity: impl Fn(&T) -> String,
) -> Result<Option<&'a T>, ImageError> {
    let mut best: Option<u8> = None;
    let mut found: Vec<(&T, String)> = Vec::new();
    for item in items {
        let Some(score) = names(item)
            .iter()
            .filter_map(|n| reference_match(n, wanted))
            .min()
        else {
            continue;
        };
        match best {
            Some(b) if score > b => continue,
            Some(b) if score == b => {}
            _ => {
                best = Some(score);
                found.clear();
            }
        }
        found.push((item, identity(item)));
    }
    let Some((first, first_id)) = found.first() else {
        return Ok(None);
    };
    if found.iter().all(|(_, id)| id == first_id) {
        return Ok(Some(*first));
    }
    Err(ImageError::AmbiguousReference {
        wanted: wanted.to_owned(),
        matches: found
            .iter()
            .map(|(item, id)| format!("{} ({id})", names(item).join(", ")))
            .collect(),
    })
}

/// Selects the image `reference` names among the entries of `index.json` (see
/// [`ImageLayout::open_ref`]) and follows indexes down to the linux/amd64 image manifest.
/// `read` returns a JSON blob's bytes, verified against the descriptor's size and digest.
/// Returns the manifest's descriptor and bytes.
pub(crate) fn resolve_manifest(
    top: &[Descriptor],
    reference: Option<&str>,
    mut read: impl FnMut(&Descriptor, &str) -> Result<Vec<u8>, ImageError>,
) -> Result<(Descriptor, Vec<u8>), ImageError> {
    let mut desc = match reference {
        Some(wanted) if wanted.starts_with("sha256:") => find_by_digest(top, wanted, &mut read)?,
        Some(wanted) => {
            let candidates: Vec<Descriptor> = top
                .iter()
                .filter(|d| is_manifest_or_index(d))
                .cloned()
                .collect();
            best_reference_match(&candidates, wanted, entry_names, |d| d.digest().to_string())?
                .cloned()
                .ok_or_else(|| ImageError::RefNotFound {
                    wanted: wanted.to_owned(),
                    refs: ref_names(top),
                })?
        }
        None => {
            let candidates: Vec<&Descriptor> =
                top.iter().filter(|d| is_manifest_or_index(d)).collect();
            match candidates.as_slice() {
                [] => return Err(ImageError::NoManifest),
                [one] => (*one).clone(),
                // index.json itself is a multi-platform index (no names, only platforms).
                many if many
                    .iter()
                    .all(|d| d.platform().is_some() && entry_names(d).is_empty()) =>
                {
                    select_platform(top)?
                }
                many => {
                    return Err(ImageError::AmbiguousManifest {
                        count: many.len(),
                        refs: ref_names(top),
                    });
                }
            }
        }
    };
    let mut depth = 0;
    loop {
        let media_type = desc.media_type().to_string();
        if is_manifest(&desc) {
            let bytes = read(&desc, "image manifest")?;
            return Ok((desc, bytes));
        }
        if !is_index(&desc) {
            return Err(ImageError::UnsupportedMediaType(media_type));
        }
        let bytes = read(&desc, "image index")?;
        depth += 1;
        if depth > MAX_INDEX_DEPTH {
            return Err(ImageError::NestedTooDeep(MAX_INDEX_DEPTH));
        }
        let nested: ImageIndex = parse_json(&bytes, "image index")?;
        desc = select_platform(nested.manifests())?;
    }
}

/// Finds the manifest or index with digest `wanted` in `top` or in the indexes it lists.
fn find_by_digest(
    top: &[Descriptor],
    wanted: &str,
    read: &mut impl FnMut(&Descriptor, &str) -> Result<Vec<u8>, ImageError>,
) -> Result<Descriptor, ImageError> {
    match wanted.strip_prefix("sha256:") {
        Some(h) if is_sha256_hex(h) => {}
        _ => return Err(ImageError::UnsupportedDigest(wanted.to_owned())),
    }
    let mut level: Vec<Descriptor> = top.to_vec();
    let mut seen: Vec<String> = Vec::new();
    for _ in 0..=MAX_INDEX_DEPTH {
        if let Some(d) = level
            .iter()
            .find(|d| is_manifest_or_index(d) && d.digest().to_string() == wanted)
        {
            return Ok(d.clone());
        }
        let mut next = Vec::new();
        for d in level.iter().filter(|d| is_manifest_or_index(d)) {
            let digest = d.digest().to_string();
            if seen.contains(&digest) {
                continue;
            }
            seen.push(digest);
            if is_index(d) {
                let bytes = read(d, "image index")?;
                let nested: ImageIndex = parse_json(&bytes, "image index")?;
                next.extend(nested.manifests().iter().cloned());
            }
        }
        if next.is_empty() {
            break;
        }
        level = next;
    }
    Err(ImageError::RefNotFound {
        wanted: wanted.to_owned(),
        refs: seen,
    })
}

fn platform_name(d: &Descriptor) -> String {
    match d.platform() {
        Some(p) => {
            let mut s = format!("{}/{}", p.os(), p.architecture());
            if let Some(v) = p.variant() {
                s.push('/');
                s.push_str(v);
            }
            s
        }
        None => format!("unspecified ({})", d.digest()),
    }
}

/// Picks the linux/amd64 entry of a multi-platform index (Keel only runs x86_64 guests),
/// preferring one without a variant (or `v1`/`v2`) to one needing newer CPUs. A single
/// entry without a platform is taken as it is.
fn select_platform(descs: &[Descriptor]) -> Result<Descriptor, ImageError> {
    let candidates: Vec<&Descriptor> = descs.iter().filter(|d| is_manifest_or_index(d)).collect();
    let amd64: Vec<&&Descriptor> = candidates
        .iter()
        .filter(|d| {
            d.platform().as_ref().is_some_and(|p| {
                p.architecture().to_string() == "amd64" && p.os().to_string() == "linux"
            })
        })
        .collect();
    let baseline = amd64.iter().find(|d| {
        d.platform()
            .as_ref()
            .and_then(|p| p.variant().as_deref())
            .is_none_or(|v| v == "v1" || v == "v2")
    });
    if let Some(d) = baseline.or(amd64.first()) {
        return Ok((**d).clone());
    }
    if let [one] = candidates.as_slice()
        && one.platform().is_none()
    {
        return Ok((*one).clone());
    }
    if candidates.is_empty() {
        return Err(ImageError::NoManifest);
    }
    Err(ImageError::NoMatchingPlatform {
        wanted: WANTED_PLATFORM.to_owned(),
        available: candidates.iter().map(|d| platform_name(d)).collect(),
    })
}

/// The blob path for a descriptor, refusing anything but well-formed sha256 digests (the
/// digest becomes a path component).
pub(crate) fn blob_path(dir: &Path, desc: &Descriptor) -> Result<PathBuf, ImageError> {
    let digest = desc.digest().to_string();
    match digest.strip_prefix("sha256:") {
        Some(h) if is_sha256_hex(h) => Ok(dir.join("blobs").join("sha256").join(h)),
        _ => Err(ImageError::UnsupportedDigest(digest)),
    }
}

/// Reads a small blob fully and checks its size and digest against the descriptor.
fn read_json_blob(dir: &Path, desc: &Descriptor, what: &str) -> Result<Vec<u8>, ImageError> {
    let path = blob_path(dir, desc)?;
    let what = format!("{what} ({})", path.display());
    let file = fs::File::open(&path).map_err(|e| ImageError::io(format!("opening {what}"), e))?;
    read_verified(file, desc, &path, &what)
}

/// Reads a small blob (at most [`MAX_JSON_BLOB`] bytes) from `reader` and checks its size
/// and digest against `desc`. `path` and `what` name the blob in errors.
pub(crate) fn read_verified(
    reader: impl Read,
    desc: &Descriptor,
    path: &Path,
    what: &str,
) -> Result<Vec<u8>, ImageError> {
    if desc.size() > MAX_JSON_BLOB {
        return Err(ImageError::BadSource {
            path: path.to_owned(),
            reason: format!(
                "{what} is {} bytes, larger than the {MAX_JSON_BLOB} limit",
                desc.size()
            ),
        });
    }
    let mut bytes = Vec::new();
    // One byte more than promised is enough to detect an oversized blob.
    reader
        .take(desc.size() + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ImageError::io(format!("reading {what}"), e))?;
    if bytes.len() as u64 != desc.size() {
        return Err(ImageError::SizeMismatch {
            what: what.to_owned(),
            expected: desc.size(),
            actual: bytes.len() as u64,
        });
    }
    let actual = format!(
        "sha256:{}",
        hex(&<sha2::Sha256 as sha2::Digest>::digest(&bytes))
    );
    let expected = desc.digest().to_string();
    if actual != expected {
        return Err(ImageError::DigestMismatch {
            what: what.to_owned(),
            expected,
            actual,
        });
    }
    Ok(bytes)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::digest::sha256_digest;
    use std::io::Write;

    /// Writes a blob into a layout under construction and returns its descriptor JSON.
    pub(crate) fn put_blob(dir: &Path, media_type: &str, data: &[u8]) -> serde_json::Value {
        let digest = sha256_digest(data);
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs).unwrap();
        fs::write(blobs.join(&digest["sha256:".len()..]), data).unwrap();
        serde_json::json!({"mediaType": media_type, "digest": digest, "size": data.len()})
    }

    /// Builds a layout by hand (independently of `import`) with the given layers.
    pub(crate) fn make_layout(dir: &Path, layers: &[(&str, Vec<u8>)], diff_ids: &[String]) {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let layer_descs: Vec<_> = layers.iter().map(|(mt, d)| put_blob(dir, mt, d)).collect();
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Cmd": ["/bin/sh"], "Env": ["A=1"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let config_desc = put_blob(dir, MEDIA_TYPE_CONFIG, config.to_string().as_bytes());
        let manifest = serde_json::json!({
            "schemaVersion": 2, "mediaType": MEDIA_TYPE_MANIFEST,
            "config": config_desc, "layers": layer_descs,
        });
        let mdesc = put_blob(dir, MEDIA_TYPE_MANIFEST, manifest.to_string().as_bytes());
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [mdesc]});
        fs::write(dir.join("index.json"), index.to_string()).unwrap();
    }

    pub(crate) fn tar_with_file(name: &str, data: &[u8]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, data).unwrap();
        b.into_inner().unwrap()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn opens_hand_made_layout() {
        let tmp = tempfile::tempdir().unwrap();
        let tar = tar_with_file("hello", b"hi");
        let gz = gzip(&tar);
        make_layout(
            tmp.path(),
            &[
                (MEDIA_TYPE_LAYER_GZIP, gz.clone()),
                (MEDIA_TYPE_LAYER_TAR, tar.clone()),
            ],
            &[sha256_digest(&tar), sha256_digest(&tar)],
        );
        let l = ImageLayout::open(tmp.path()).unwrap();
        assert_eq!(
            l.config()
                .config()
                .as_ref()
                .unwrap()
                .cmd()
                .as_ref()
                .unwrap(),
            &vec!["/bin/sh".to_string()]
        );
        let layers = l.layers();
        assert_eq!(layers.len(), 2);
        assert_eq!(layers[0].digest, sha256_digest(&gz));
        assert_eq!(layers[0].media_type, MEDIA_TYPE_LAYER_GZIP);
        assert_eq!(fs::read(&layers[0].path).unwrap(), gz);
        assert!(l.manifest_digest().starts_with("sha256:"));
        assert_eq!(l.manifest().layers().len(), 2);

        // Ref lookup fails when the only manifest has no name.
        assert!(matches!(
            ImageLayout::open_ref(tmp.path(), "nope"),
            Err(ImageError::RefNotFound { .. })
        ));
    }

    #[test]
    fn detects_tampered_config_and_bad_media_type() {
        let tmp = tempfile::tempdir().unwrap();
        let tar = tar_with_file("f", b"x");
        make_layout(
            tmp.path(),
            &[(MEDIA_TYPE_LAYER_TAR, tar.clone())],
            &[sha256_digest(&tar)],
        );
        // Corrupt every blob that is a config (the one containing "rootfs").
        for e in fs::read_dir(tmp.path().join("blobs/sha256")).unwrap() {
            let p = e.unwrap().path();
            let data = fs::read(&p).unwrap();
            if data.windows(6).any(|w| w == b"rootfs") {
                let tampered = String::from_utf8(data).unwrap().replace("A=1", "A=2");
                fs::write(&p, tampered).unwrap();
            }
        }
        assert!(matches!(
            ImageLayout::open(tmp.path()),
            Err(ImageError::DigestMismatch { .. })
        ));

        let tmp2 = tempfile::tempdir().unwrap();
        make_layout(tmp2.path(), &[("application/x-foo", tar)], &[String::new()]);
        assert!(matches!(
            ImageLayout::open(tmp2.path()),
            Err(ImageError::UnsupportedMediaType(m)) if m == "application/x-foo"
        ));
        assert!(matches!(
            ImageLayout::open(&tmp2.path().join("missing")),
            Err(ImageError::InvalidLayout { .. })
        ));
    }

    #[test]
    fn selects_by_ref_and_refuses_ambiguity() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let tar = tar_with_file("f", b"x");
        make_layout(
            dir,
            &[(MEDIA_TYPE_LAYER_TAR, tar.clone())],
            &[sha256_digest(&tar)],
        );
        let index: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
        let mut a = index["manifests"][0].clone();
        let mut b = a.clone();
        a["annotations"] = serde_json::json!({REF_NAME_ANNOTATION: "a"});
        b["annotations"] = serde_json::json!({REF_NAME_ANNOTATION: "b"});
        let two = serde_json::json!({"schemaVersion": 2, "manifests": [a, b]});
        fs::write(dir.join("index.json"), two.to_string()).unwrap();
        match ImageLayout::open(dir) {
            Err(ImageError::AmbiguousManifest { count, refs }) => {
                assert_eq!(count, 2);
                assert_eq!(refs, vec!["a".to_string(), "b".to_string()]);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(ImageLayout::open_ref(dir, "b").unwrap().layers().len(), 1);
    }

    #[test]
    fn zstd_multi_frame_with_skippable_frame() {
        // Hand-made zstd frames using raw (uncompressed) blocks, so the test does not need
        // an encoder: magic, frame header descriptor (single segment, 1-byte size), size,
        // then one last raw block.
        fn raw_frame(data: &[u8]) -> Vec<u8> {
            assert!(data.len() < 256);
            let mut f = vec![0x28, 0xb5, 0x2f, 0xfd, 0x20, data.len() as u8];
            let block_header = ((data.len() as u32) << 3) | 1; // last block, raw
            f.extend_from_slice(&block_header.to_le_bytes()[..3]);
            f.extend_from_slice(data);
            f
        }
        let mut stream = raw_frame(b"hello ");
        stream.extend_from_slice(&[0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 9, 9, 9]);
        stream.extend(raw_frame(b"world"));
        let mut out = String::new();
        decompress(LayerCompression::Zstd, &stream[..])
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(out, "hello world");
    }

    #[test]
    fn reference_matching() {
        let m = reference_match;
        assert_eq!(m("t", "t"), Some(0));
        assert_eq!(m("docker.io/library/alpine:latest", "alpine"), Some(1));
        assert_eq!(m("localhost/app:1", "app:1"), Some(1));
        assert_eq!(m("example.com/app:1", "1"), Some(2));
        assert_eq!(m("1", "example.com/app:1"), Some(2));
        assert_eq!(m("example.com/team/app:1", "app:1"), Some(2));
        assert_eq!(m("example.com/team/myapp:1", "app:1"), None);
        assert_eq!(m("registry:5000/app", "5000/app"), None);
        assert_eq!(m("example.com/app:1", "2"), None);
        assert_eq!(tag_of("registry:5000/app"), None);
        assert_eq!(tag_of("registry:5000/app:v1@sha256:abc"), Some("v1"));
    }

    #[test]
    fn runtime_defaults_from_config() {
        assert_eq!(parse_port("80/tcp"), Some((80, PortProtocol::Tcp)));
        assert_eq!(parse_port("53/UDP"), Some((53, PortProtocol::Udp)));
        assert_eq!(parse_port("8080"), Some((8080, PortProtocol::Tcp)));
        assert_eq!(parse_port("9/sctp"), Some((9, PortProtocol::Sctp)));
        for bad in ["0/tcp", "70000", "+1", "80/icmp", "80-90/tcp", ""] {
            assert_eq!(parse_port(bad), None, "{bad}");
        }

        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let tar = tar_with_file("f", b"x");
        make_layout(
            dir,
            &[(MEDIA_TYPE_LAYER_TAR, tar.clone())],
            &[sha256_digest(&tar)],
        );
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {
                "Entrypoint": ["/e"], "Cmd": ["c"], "Env": ["A=1", "B=2"],
                "WorkingDir": "", "User": "nobody",
                "ExposedPorts": {"80/tcp": {}, "53/udp": {}, "bogus": {}},
                "Volumes": {"/v2": {}, "/v1": {}}, "StopSignal": "SIGQUIT",
            },
            "rootfs": {"type": "layers", "diff_ids": [sha256_digest(&tar)]},
        });
        let config_desc = put_blob(dir, MEDIA_TYPE_CONFIG, config.to_string().as_bytes());
        let layer_desc = put_blob(dir, MEDIA_TYPE_LAYER_TAR, &tar);
        let manifest = serde_json::json!({
            "schemaVersion": 2, "mediaType": MEDIA_TYPE_MANIFEST,
            "config": config_desc, "layers": [layer_desc],
        });
        let mdesc = put_blob(dir, MEDIA_TYPE_MANIFEST, manifest.to_string().as_bytes());
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [mdesc]});
        fs::write(dir.join("index.json"), index.to_string()).unwrap();

        let d = ImageLayout::open(dir).unwrap().runtime_defaults();
        assert_eq!(
            d,
            RuntimeDefaults {
                entrypoint: vec!["/e".into()],
                cmd: vec!["c".into()],
                env: vec!["A=1".into(), "B=2".into()],
                workdir: None,
                user: Some("nobody".into()),
                exposed_ports: vec![(53, PortProtocol::Udp), (80, PortProtocol::Tcp)],
                ignored_ports: vec!["bogus".into()],
                volumes: vec!["/v1".into(), "/v2".into()],
                stop_signal: Some("SIGQUIT".into()),
            }
        );
    }
}
