//! Pulling images from an OCI distribution (registry v2) endpoint into an OCI image layout.
//!
//! [`pull`] fetches a manifest by tag or digest (a multi-platform index resolves to its
//! linux/amd64 image), then the config and every layer, and records the image in the
//! layout's `index.json` under an `org.opencontainers.image.ref.name` annotation, so that
//! [`ImageLayout::open_ref`](crate::layout::ImageLayout::open_ref) opens it.
//!
//! - **Integrity.** Every blob is checked against its descriptor's size and SHA-256; a
//!   manifest pulled by digest must hash to that digest. Blobs are downloaded into
//!   `blobs/sha256/<hex>.partial` and renamed into place only once verified, so a crash
//!   never leaves a blob that is later trusted as complete. Blobs already in the layout
//!   (verified again) are not downloaded: several images share one layout's blobs.
//! - **Resumption.** A dropped blob download continues with `Range: bytes=N-` when the
//!   server answers `206 Partial Content`, and restarts from zero otherwise.
//! - **Retries.** Connection errors, `5xx` and `429` are retried with exponential backoff
//!   ([`backoff_delay`]), honouring `Retry-After`; authentication failures and unknown
//!   manifests or blobs are not.
//! - **Authentication.** Anonymous first; a `401` with a `Bearer` challenge gets a token
//!   from the challenge's realm (with basic credentials when configured), cached per scope;
//!   a `Basic` challenge is answered with the configured credentials.
//! - **Transport.** HTTPS through rustls (ring) with Mozilla's roots, or with
//!   [`RegistryAuth::ca_pem`] as the only trusted roots; plain HTTP only for a registry
//!   marked [`RegistryAuth::insecure`]. Redirects (registries send blob downloads to
//!   storage) are followed, and credentials are never sent to another host.
//!
//! Host names are resolved by ureq through `getaddrinfo`. Keel's binaries link glibc
//! statically, and static glibc (2.34 and later, Debian 12 has 2.36) has the `files` and
//! `dns` lookups built in: it reads `/etc/nsswitch.conf`, `/etc/hosts` and
//! `/etc/resolv.conf` and queries the name servers itself, without loading any NSS module
//! (checked with strace). Other NSS services (mdns, systemd-resolved's `resolve`) are not
//! available; a registry is then named by address or through `/etc/hosts`.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use base64::Engine;
use sha2::{Digest as _, Sha256};
use ureq::http::{Response, StatusCode};
use ureq::{Agent, Body};

use crate::digest::{hex, is_sha256_hex};
use crate::layout::{
    MEDIA_TYPE_DOCKER_LAYER_GZIP, MEDIA_TYPE_LAYER_GZIP, MEDIA_TYPE_LAYER_TAR,
    MEDIA_TYPE_LAYER_ZSTD,
};

const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const MEDIA_TYPE_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_TYPE_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// The `Accept` header of manifest requests: every manifest and index type Keel reads.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// Manifests and configs are small; a bigger answer is refused rather than buffered.
const MAX_JSON: u64 = 16 << 20;
/// Redirect chains longer than this are refused.
const MAX_REDIRECTS: u32 = 10;
/// The first retry waits this long; each further one twice as long ([`backoff_delay`]).
const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// No backoff (nor `Retry-After`) waits longer than this.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A server's `Retry-After` is honoured up to this long.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(120);
/// Progress callbacks during a download come at most this often (plus start and end).
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// Errors from [`pull`] and [`Reference`] parsing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// Writing into the destination layout failed.
    #[error(transparent)]
    Layout(#[from] crate::ImageError),
    /// The image reference does not parse.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference {
        /// The reference as given.
        reference: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The registry refused the credentials (or demands some and none were given).
    #[error("unauthorized: check [registries.\"{registry}\"] username/password ({detail})")]
    Unauthorized {
        /// The registry (`host[:port]`).
        registry: String,
        /// What the registry or token service said.
        detail: String,
    },
    /// The registry has no such manifest.
    #[error("manifest unknown: {reference}")]
    ManifestUnknown {
        /// `repository:tag` or `repository@digest`.
        reference: String,
    },
    /// The registry has no such blob.
    #[error("blob unknown: {repository}@{digest}")]
    BlobUnknown {
        /// The repository.
        repository: String,
        /// The blob's digest.
        digest: String,
    },
    /// An unexpected HTTP status (after retries, for retryable ones).
    #[error("{url}: HTTP {status}{detail}")]
    Http {
        /// The requested URL.
        url: String,
        /// The status code.
        status: u16,
        /// The registry's error message, if any (with a leading `: `).
        detail: String,
    },
    /// The connection failed (after retries, for retryable failures).
    #[error("{url}: {source}")]
    Transport {
        /// The requested URL.
        url: String,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The registry answered something that breaks the protocol.
    #[error("{url}: {reason}")]
    Protocol {
        /// The requested URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// [`RegistryAuth::ca_pem`] holds no usable certificate.
    #[error("invalid CA certificate: {0}")]
    InvalidCa(String),
    /// Content did not hash to the digest that names it.
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        /// Which blob or manifest.
        what: String,
        /// The expected digest.
        expected: String,
        /// The digest of what was received.
        actual: String,
    },
    /// Content did not have the size its descriptor promised.
    #[error("size mismatch for {what}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        /// Which blob.
        what: String,
        /// The descriptor's size.
        expected: u64,
        /// The size received (at least).
        actual: u64,
    },
    /// A digest that is not a well-formed sha256 digest.
    #[error("unsupported or malformed digest {0:?} (only sha256 is supported)")]
    UnsupportedDigest(String),
    /// A manifest, config or layer media type Keel cannot use.
    #[error("unsupported media type {media_type:?} for {what}")]
    UnsupportedMediaType {
        /// What carried it.
        what: String,
        /// The media type.
        media_type: String,
    },
    /// A multi-platform index has no linux/amd64 image.
    #[error("{reference}: no linux/amd64 image in the index (platforms: {available:?})")]
    NoMatchingPlatform {
        /// The reference pulled.
        reference: String,
        /// The platforms the index lists.
        available: Vec<String>,
    },
    /// A JSON document did not parse.
    #[error("invalid {what}: {source}")]
    Json {
        /// Which document.
        what: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A local file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl RegistryError {
    fn io(context: impl Into<String>, source: io::Error) -> Self {
        RegistryError::Io {
            context: context.into(),
            source,
        }
    }
}

/// A parsed image reference: `[host[:port]/]repository[:tag][@sha256:hex]`.
///
/// Parsing follows Docker's normalisation: a first component without `.` or `:` (and
/// other than `localhost`) is part of the repository on `docker.io`, where single-name
/// repositories live under `library/`. Without tag and digest the tag is `latest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `host[:port]` as named (`docker.io` for Docker Hub).
    pub registry: String,
    /// The repository path, e.g. `library/busybox`.
    pub repository: String,
    /// The tag, if any.
    pub tag: Option<String>,
    /// `sha256:<hex>`, if pulled by digest (wins over the tag).
    pub digest: Option<String>,
}

impl Reference {
    /// The `host[:port]` the API is reached at: `registry-1.docker.io` for Docker Hub.
    pub fn api_host(&self) -> &str {
        if self.registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }

    /// What the manifest is requested by: the digest if there is one, else the tag.
    pub fn manifest_reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// `repository:tag` or `repository@digest`, as used in error messages.
    fn short(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => format!("{}@{d}", self.repository),
            (None, Some(t)) => format!("{}:{t}", self.repository),
            (None, None) => self.repository.clone(),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = RegistryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| RegistryError::InvalidReference {
            reference: s.to_owned(),
            reason: reason.to_owned(),
        };
        if s.is_empty() {
            return Err(bad("empty"));
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("contains whitespace"));
        }
        let (name_tag, digest) = match s.split_once('@') {
            Some((n, d)) => (n, Some(d)),
            None => (s, None),
        };
        if let Some(d) = digest {
            match d.strip_prefix("sha256:") {
                Some(h) if is_sha256_hex(h) => {}
                _ => {
                    return Err(bad(
                        "the digest must be sha256: and 64 lowercase hex digits",
                    ));
                }
            }
        }
        let (name, tag) = match name_tag.rfind(':') {
            Some(i) if !name_tag[i + 1..].contains('/') => {
                (&name_tag[..i], Some(&name_tag[i + 1..]))
            }
            _ => (name_tag, None),
        };
        let (mut registry, mut repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_owned(), rest.to_owned())
            }
            _ => ("docker.io".to_owned(), name.to_owned()),
        };
        if registry == "index.docker.io" {
            registry = "docker.io".to_owned();
        }
        if registry == "docker.io" && !repository.contains('/') {
            repository = format!("library/{repository}");
        }
        if !valid_registry(&registry) {
            return Err(bad("invalid registry host[:port]"));
        }
        if repository.is_empty() || repository.len() > 255 {
            return Err(bad("the repository must have 1 to 255 characters"));
        }
        if !repository.split('/').all(valid_path_component) {
            return Err(bad(
                "repository components are lowercase letters and digits, separated by '.', '_', '__' or '-'",
            ));
        }
        if let Some(t) = tag
            && !valid_tag(t)
        {
            return Err(bad(
                "a tag is 1 to 128 of [A-Za-z0-9_.-] and does not start with '.' or '-'",
            ));
        }
        let tag = match (tag, digest) {
            (None, None) => Some("latest".to_owned()),
            (t, _) => t.map(str::to_owned),
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest: digest.map(str::to_owned),
        })
    }
}

fn valid_registry(r: &str) -> bool {
    let valid_port =
        |p: &str| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit());
    if let Some(rest) = r.strip_prefix('[') {
        // `[ipv6]` or `[ipv6]:port`
        let Some((addr, tail)) = rest.split_once(']') else {
            return false;
        };
        let addr_ok = !addr.is_empty() && addr.chars().all(|c| c.is_ascii_hexdigit() || c == ':');
        return addr_ok && (tail.is_empty() || tail.strip_prefix(':').is_some_and(valid_port));
    }
    let (host, port) = match r.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (r, None),
    };
    !host.is_empty()
        && !host.starts_with(['.', '-'])
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        && port.is_none_or(valid_port)
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-')) {
            return false;
        }
    }
    true
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`
fn valid_tag(t: &str) -> bool {
    let ok = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-';
    !t.is_empty() && t.len() <= 128 && !t.starts_with(['.', '-']) && t.bytes().all(ok)
}

/// How to reach and authenticate to one registry.
#[derive(Clone, Default)]
pub struct RegistryAuth {
    /// User name for basic authentication or for the token service.
    pub username: Option<String>,
    /// Password (or token) going with `username`.
    pub password: Option<String>,
    /// PEM certificates to trust instead of the built-in Mozilla roots (e.g. a private CA).
    pub ca_pem: Option<Vec<u8>>,
    /// Speak plain HTTP instead of HTTPS.
    pub insecure: bool,
}

impl fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("ca_pem", &self.ca_pem.as_ref().map(|p| p.len()))
            .field("insecure", &self.insecure)
            .finish()
    }
}

/// What a blob is, for progress reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobKind {
    /// An image manifest or index.
    Manifest,
    /// The image configuration.
    Config,
    /// A layer; `index` counts from 0 (the bottom layer) up to `count - 1`.
    Layer {
        /// Position of the layer, bottom first.
        index: usize,
        /// Number of layers in the image.
        count: usize,
    },
}

/// Where a blob download stands, for progress reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobState {
    /// The blob was already in the layout and verified: nothing to download.
    Present,
    /// Bytes are arriving (`done` of `total`).
    Downloading,
    /// The transfer failed and is retried (resuming at `done` when the server allows it).
    Retrying {
        /// Which retry this is, from 1.
        attempt: u32,
        /// Why the previous try failed.
        reason: String,
    },
    /// The blob is downloaded, verified and in place.
    Done,
}

/// One progress report, passed to [`PullOptions::progress`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// `sha256:<hex>` of the blob.
    pub digest: String,
    /// What the blob is.
    pub kind: BlobKind,
    /// Bytes of the blob on disk so far.
    pub done: u64,
    /// The blob's size.
    pub total: u64,
    /// What is happening.
    pub state: BlobState,
}

/// The progress callback type.
pub type ProgressFn = Box<dyn FnMut(Progress) + Send>;

/// Options for [`pull`].
pub struct PullOptions {
    /// Credentials and transport settings for the registry.
    pub auth: RegistryAuth,
    /// How many times a failed request or interrupted download is retried.
    pub retries: u32,
    /// Called with progress reports (several per second at most during a download).
    pub progress: Option<ProgressFn>,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            auth: RegistryAuth::default(),
            retries: 5,
            progress: None,
        }
    }
}

impl fmt::Debug for PullOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PullOptions")
            .field("auth", &self.auth)
            .field("retries", &self.retries)
            .field("progress", &self.progress.as_ref().map(|_| "<callback>"))
            .finish()
    }
}

/// The wait before retry number `attempt` (from 0): 0.5 s, 1 s, 2 s, ... up to 30 s.
pub fn backoff_delay(attempt: u32) -> Duration {
    let factor = 1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX);
    BACKOFF_BASE.saturating_mul(factor).min(BACKOFF_MAX)
}

/// An authentication challenge from a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Challenge {
    /// The scheme, lowercased (`bearer`, `basic`).
    scheme: String,
    /// The parameters, names lowercased (`realm`, `service`, `scope`, ...).
    params: HashMap<String, String>,
}

/// Parses a `WWW-Authenticate` value such as
/// `Bearer realm="https://auth.example/token",service="registry",scope="repository:a:pull"`.
/// Only the first challenge of a header listing several is returned.
fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = match header.find(char::is_whitespace) {
        Some(i) => (&header[..i], header[i..].trim_start()),
        None => (header, ""),
    };
    if scheme.is_empty()
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return None;
    }
    let mut params = HashMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let mut name = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' || c.is_whitespace() {
                break;
            }
            name.push(c);
            chars.next();
        }
        if name.is_empty() {
            break;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek() != Some(&'=') {
            // A token68 value or the start of a second challenge: stop here.
            break;
        }
        chars.next();
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n);
                        }
                    }
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' || c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        params.insert(name.to_ascii_lowercase(), value);
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

/// Pulls `reference` into the OCI image layout at `dest_layout` (created if missing) and
/// names it `ref_name` in its `index.json`, replacing an earlier image of that name.
/// Returns the `sha256:` digest of the image manifest recorded (for a multi-platform
/// index, the linux/amd64 manifest's).
pub fn pull(
    reference: &Reference,
    options: PullOptions,
    dest_layout: &Path,
    ref_name: &str,
) -> Result<String, RegistryError> {
    // The fields are public: check what a caller may have built by hand before it goes
    // into URLs.
    let valid = valid_registry(&reference.registry)
        && !reference.repository.is_empty()
        && reference.repository.split('/').all(valid_path_component)
        && reference.tag.as_deref().is_none_or(valid_tag)
        && reference
            .digest
            .as_deref()
            .is_none_or(|d| d.strip_prefix("sha256:").is_some_and(is_sha256_hex));
    if !valid {
        return Err(RegistryError::InvalidReference {
            reference: reference.to_string(),
            reason: "invalid registry, repository, tag or digest".to_owned(),
        });
    }
    if ref_name.is_empty() {
        return Err(RegistryError::InvalidReference {
            reference: ref_name.to_owned(),
            reason: "the layout reference name is empty".to_owned(),
        });
    }
    let blobs = dest_layout.join("blobs").join("sha256");
    fs::create_dir_all(&blobs)
        .map_err(|e| RegistryError::io(format!("creating {}", blobs.display()), e))?;
    // One pull at a time per layout: they share `.partial` files and index.json.
    let _lock = lock_dir(dest_layout)?;

    let PullOptions {
        auth,
        retries,
        progress,
    } = options;
    let mut puller = Puller {
        client: Client::new(reference, auth, retries)?,
        reference,
        blobs,
        progress,
    };

    // The top-level manifest or index.
    let (bytes, media_type) = puller.fetch_manifest(reference.manifest_reference())?;
    if let Some(want) = &reference.digest {
        check_digest(&bytes, want, &format!("manifest {}", reference.short()))?;
    }
    let (manifest_bytes, manifest_type) = if is_index(&media_type) {
        let desc = select_platform(reference, &bytes)?;
        let (b, mt) = puller.fetch_manifest(&desc.digest)?;
        check_digest(&b, &desc.digest, &format!("manifest {}", desc.digest))?;
        if b.len() as u64 != desc.size {
            return Err(RegistryError::SizeMismatch {
                what: format!("manifest {}", desc.digest),
                expected: desc.size,
                actual: b.len() as u64,
            });
        }
        if is_index(&mt) {
            return Err(RegistryError::UnsupportedMediaType {
                what: format!("manifest {} (nested index)", desc.digest),
                media_type: mt,
            });
        }
        (b, mt)
    } else {
        (bytes, media_type)
    };
    if manifest_type != MEDIA_TYPE_MANIFEST && manifest_type != MEDIA_TYPE_DOCKER_MANIFEST {
        return Err(RegistryError::UnsupportedMediaType {
            what: format!("manifest {}", reference.short()),
            media_type: manifest_type,
        });
    }
    let manifest_digest = format!("sha256:{}", hex(&Sha256::digest(&manifest_bytes)));
    let manifest: serde_json::Value =
        serde_json::from_slice(&manifest_bytes).map_err(|e| RegistryError::Json {
            what: format!("manifest {manifest_digest}"),
            source: e,
        })?;

    let config = BlobDesc::from_json(manifest.get("config"), "manifest config")?;
    if config.media_type != MEDIA_TYPE_CONFIG && config.media_type != MEDIA_TYPE_DOCKER_CONFIG {
        return Err(RegistryError::UnsupportedMediaType {
            what: format!("config {}", config.digest),
            media_type: config.media_type,
        });
    }
    let layers = manifest
        .get("layers")
        .and_then(|l| l.as_array())
        .ok_or_else(|| RegistryError::Protocol {
            url: reference.to_string(),
            reason: format!("manifest {manifest_digest} has no layers list"),
        })?
        .iter()
        .map(|l| BlobDesc::from_json(Some(l), "manifest layer"))
        .collect::<Result<Vec<_>, _>>()?;
    for l in &layers {
        if ![
            MEDIA_TYPE_LAYER_TAR,
            MEDIA_TYPE_LAYER_GZIP,
            MEDIA_TYPE_LAYER_ZSTD,
            MEDIA_TYPE_DOCKER_LAYER_GZIP,
        ]
        .contains(&l.media_type.as_str())
        {
            return Err(RegistryError::UnsupportedMediaType {
                what: format!("layer {}", l.digest),
                media_type: l.media_type.clone(),
            });
        }
    }

    puller.fetch_blob(&config, BlobKind::Config)?;
    let count = layers.len();
    for (index, layer) in layers.iter().enumerate() {
        puller.fetch_blob(layer, BlobKind::Layer { index, count })?;
    }
    puller.store_blob(&manifest_bytes, &manifest_digest)?;
    crate::layout_index::list_manifest(
        dest_layout,
        &manifest_type,
        &manifest_digest,
        manifest_bytes.len() as u64,
        ref_name,
    )?;
    Ok(manifest_digest)
}

/// The fields of a descriptor that a pull uses.
#[derive(Debug, Clone)]
struct BlobDesc {
    media_type: String,
    digest: String,
    size: u64,
}

impl BlobDesc {
    fn from_json(v: Option<&serde_json::Value>, what: &str) -> Result<Self, RegistryError> {
        let bad = |reason: &str| RegistryError::Protocol {
            url: what.to_owned(),
            reason: reason.to_owned(),
        };
        let v = v.ok_or_else(|| bad("missing descriptor"))?;
        let digest = v
            .get("digest")
            .and_then(|d| d.as_str())
            .ok_or_else(|| bad("descriptor without digest"))?
            .to_owned();
        match digest.strip_prefix("sha256:") {
            Some(h) if is_sha256_hex(h) => {}
            _ => return Err(RegistryError::UnsupportedDigest(digest)),
        }
        let size = v
            .get("size")
            .and_then(|s| s.as_u64())
            .ok_or_else(|| bad("descriptor without a valid size"))?;
        let media_type = v
            .get("mediaType")
            .and_then(|m| m.as_str())
            .unwrap_or_default()
            .to_owned();
        Ok(BlobDesc {
            media_type,
            digest,
            size,
        })
    }

    fn hex(&self) -> &str {
        // Validated in from_json.
        self.digest.strip_prefix("sha256:").unwrap_or(&self.digest)
    }
}

fn is_index(media_type: &str) -> bool {
    media_type == MEDIA_TYPE_INDEX || media_type == MEDIA_TYPE_DOCKER_LIST
}

fn check_digest(bytes: &[u8], expected: &str, what: &str) -> Result<(), RegistryError> {
    let actual = format!("sha256:{}", hex(&Sha256::digest(bytes)));
    if actual != expected {
        return Err(RegistryError::DigestMismatch {
            what: what.to_owned(),
            expected: expected.to_owned(),
            actual,
        });
    }
    Ok(())
}

/// Picks the linux/amd64 manifest of an index (the only entry if it lists one).
fn select_platform(reference: &Reference, bytes: &[u8]) -> Result<BlobDesc, RegistryError> {
    let index: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| RegistryError::Json {
            what: format!("image index {}", reference.short()),
            source: e,
        })?;
    let entries = index
        .get("manifests")
        .and_then(|m| m.as_array())
        .cloned()
        .unwrap_or_default();
    let platform = |e: &serde_json::Value| {
        let p = e.get("platform");
        let field = |k: &str| {
            p.and_then(|p| p.get(k))
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_owned()
        };
        (field("os"), field("architecture"))
    };
    let chosen = entries
        .iter()
        .find(|e| platform(e) == ("linux".to_owned(), "amd64".to_owned()))
        .or(match entries.as_slice() {
            // A lone entry that does not say its platform is taken as it is.
            [one] if one.get("platform").is_none() => Some(one),
            _ => None,
        });
    match chosen {
        Some(e) => BlobDesc::from_json(Some(e), "image index entry"),
        None => Err(RegistryError::NoMatchingPlatform {
            reference: reference.to_string(),
            available: entries
                .iter()
                .map(|e| {
                    let (os, arch) = platform(e);
                    format!("{os}/{arch}")
                })
                .collect(),
        }),
    }
}

struct Puller<'a> {
    client: Client,
    reference: &'a Reference,
    blobs: PathBuf,
    progress: Option<ProgressFn>,
}

impl Puller<'_> {
    fn report(&mut self, desc: &BlobDesc, kind: BlobKind, done: u64, state: BlobState) {
        if let Some(cb) = self.progress.as_mut() {
            cb(Progress {
                digest: desc.digest.clone(),
                kind,
                done,
                total: desc.size,
                state,
            });
        }
    }

    /// GETs a manifest by tag or digest; returns its bytes and media type.
    fn fetch_manifest(&mut self, reference: &str) -> Result<(Vec<u8>, String), RegistryError> {
        let url = self.client.url(&format!(
            "/v2/{}/manifests/{reference}",
            self.reference.repository
        ));
        let mut resp = self.client.get(&url, Some(MANIFEST_ACCEPT), 0)?;
        let status = resp.status();
        if status == StatusCode::NOT_FOUND {
            return Err(RegistryError::ManifestUnknown {
                reference: if reference.starts_with("sha256:") {
                    format!("{}@{reference}", self.reference.repository)
                } else {
                    format!("{}:{reference}", self.reference.repository)
                },
            });
        }
        if status != StatusCode::OK {
            return Err(self.client.status_error(&url, resp));
        }
        let content_type = header(&resp, "content-type")
            .and_then(|c| c.split(';').next())
            .map(|c| c.trim().to_owned())
            .unwrap_or_default();
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(MAX_JSON)
            .read_to_vec()
            .map_err(|e| transport_error(&url, e))?;
        let doc: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| RegistryError::Json {
                what: format!("manifest {}", self.reference.short()),
                source: e,
            })?;
        let media_type = match doc.get("mediaType").and_then(|m| m.as_str()) {
            Some(m) => m.to_owned(),
            None if !content_type.is_empty() && content_type != "application/json" => content_type,
            None if doc.get("manifests").is_some() => MEDIA_TYPE_INDEX.to_owned(),
            None => MEDIA_TYPE_MANIFEST.to_owned(),
        };
        Ok((bytes, media_type))
    }

    /// Writes a small verified blob (the manifest) into place.
    fn store_blob(&mut self, bytes: &[u8], digest: &str) -> Result<(), RegistryError> {
        let hex_part = digest.strip_prefix("sha256:").unwrap_or(digest);
        let final_path = self.blobs.join(hex_part);
        let partial = self.blobs.join(format!("{hex_part}.partial"));
        let ctx = |e| RegistryError::io(format!("writing {}", partial.display()), e);
        let mut f = File::create(&partial).map_err(ctx)?;
        f.write_all(bytes).map_err(ctx)?;
        f.sync_all().map_err(ctx)?;
        fs::rename(&partial, &final_path)
            .map_err(|e| RegistryError::io(format!("renaming {}", partial.display()), e))?;
        sync_dir(&self.blobs)
    }

    /// Downloads one blob into the layout, resuming interrupted transfers, unless it is
    /// already there.
    fn fetch_blob(&mut self, desc: &BlobDesc, kind: BlobKind) -> Result<(), RegistryError> {
        let final_path = self.blobs.join(desc.hex());
        if final_path.exists() {
            if file_matches(&final_path, desc)? {
                self.report(desc, kind, desc.size, BlobState::Present);
                return Ok(());
            }
            fs::remove_file(&final_path)
                .map_err(|e| RegistryError::io(format!("removing {}", final_path.display()), e))?;
        }
        let partial = self.blobs.join(format!("{}.partial", desc.hex()));
        let io_err = |what: &str, e| RegistryError::io(format!("{what} {}", partial.display()), e);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&partial)
            .map_err(|e| io_err("opening", e))?;
        let mut have = file.metadata().map_err(|e| io_err("reading", e))?.len();
        if have > desc.size {
            file.set_len(0).map_err(|e| io_err("truncating", e))?;
            have = 0;
        }
        // A prefix left by an earlier (crashed) pull is hashed and continued; the final
        // digest check covers it.
        let mut hasher = Sha256::new();
        if have > 0 {
            file.seek(SeekFrom::Start(0))
                .map_err(|e| io_err("reading", e))?;
            let copied = io::copy(&mut (&mut file).take(have), &mut HashWriter(&mut hasher))
                .map_err(|e| io_err("reading", e))?;
            if copied != have {
                return Err(io_err(
                    "reading",
                    io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank"),
                ));
            }
        }
        file.seek(SeekFrom::Start(have))
            .map_err(|e| io_err("seeking", e))?;

        let url = self.client.url(&format!(
            "/v2/{}/blobs/{}",
            self.reference.repository, desc.digest
        ));
        let restart = |file: &mut File, hasher: &mut Sha256| -> Result<(), RegistryError> {
            file.set_len(0).map_err(|e| io_err("truncating", e))?;
            file.seek(SeekFrom::Start(0))
                .map_err(|e| io_err("seeking", e))?;
            *hasher = Sha256::new();
            Ok(())
        };
        let mut failures = 0u32;
        let mut restarts = 0u32;
        // Bytes left by an earlier pull: if the result does not verify, they are the likely
        // culprit, and the download is done once more from scratch.
        let mut inherited = have > 0;
        self.report(desc, kind, have, BlobState::Downloading);
        loop {
            while have < desc.size {
                let resp = self.client.get(&url, None, have)?;
                let status = resp.status();
                match status {
                    StatusCode::PARTIAL_CONTENT if have > 0 => {
                        let start = header(&resp, "content-range").and_then(content_range_start);
                        if start != Some(have) {
                            return Err(RegistryError::Protocol {
                                url,
                                reason: format!(
                                    "asked for bytes {have}- but got Content-Range {:?}",
                                    header(&resp, "content-range")
                                ),
                            });
                        }
                    }
                    StatusCode::OK => {
                        if have > 0 {
                            restart(&mut file, &mut hasher)?;
                            have = 0;
                        }
                    }
                    StatusCode::RANGE_NOT_SATISFIABLE if have > 0 && restarts < 2 => {
                        restarts += 1;
                        restart(&mut file, &mut hasher)?;
                        have = 0;
                        continue;
                    }
                    StatusCode::NOT_FOUND => {
                        let _ = fs::remove_file(&partial);
                        return Err(RegistryError::BlobUnknown {
                            repository: self.reference.repository.clone(),
                            digest: desc.digest.clone(),
                        });
                    }
                    _ => return Err(self.client.status_error(&url, resp)),
                }

                let before = have;
                let mut reader = resp.into_body().into_reader();
                let mut buf = vec![0u8; 64 << 10];
                let mut last_report = Instant::now();
                let outcome: Result<(), String> = loop {
                    match reader.read(&mut buf) {
                        Ok(0) => {
                            if have < desc.size {
                                break Err(format!(
                                    "connection closed after {have} of {} bytes",
                                    desc.size
                                ));
                            }
                            break Ok(());
                        }
                        Ok(n) => {
                            let n64 = n as u64;
                            if have + n64 > desc.size {
                                drop(file);
                                let _ = fs::remove_file(&partial);
                                return Err(RegistryError::SizeMismatch {
                                    what: format!("blob {}", desc.digest),
                                    expected: desc.size,
                                    actual: have + n64,
                                });
                            }
                            file.write_all(&buf[..n])
                                .map_err(|e| io_err("writing", e))?;
                            hasher.update(&buf[..n]);
                            have += n64;
                            if last_report.elapsed() >= PROGRESS_INTERVAL {
                                last_report = Instant::now();
                                self.report(desc, kind, have, BlobState::Downloading);
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => break Err(e.to_string()),
                    }
                };
                if let Err(reason) = outcome {
                    if have > before {
                        // Progress was made: the server is alive, keep the retry budget.
                        failures = 0;
                    }
                    if failures >= self.client.retries {
                        return Err(RegistryError::Transport {
                            url,
                            source: reason.into(),
                        });
                    }
                    failures += 1;
                    self.report(
                        desc,
                        kind,
                        have,
                        BlobState::Retrying {
                            attempt: failures,
                            reason,
                        },
                    );
                    std::thread::sleep(backoff_delay(failures - 1));
                }
            }
            let actual = format!("sha256:{}", hex(&hasher.clone().finalize()));
            if actual == desc.digest {
                break;
            }
            if inherited {
                inherited = false;
                restart(&mut file, &mut hasher)?;
                have = 0;
                continue;
            }
            drop(file);
            let _ = fs::remove_file(&partial);
            return Err(RegistryError::DigestMismatch {
                what: format!("blob {}", desc.digest),
                expected: desc.digest.clone(),
                actual,
            });
        }
        file.sync_all().map_err(|e| io_err("syncing", e))?;
        drop(file);
        fs::rename(&partial, &final_path).map_err(|e| io_err("renaming", e))?;
        sync_dir(&self.blobs)?;
        self.report(desc, kind, desc.size, BlobState::Done);
        Ok(())
    }
}

struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Whether a file has the descriptor's size and digest.
fn file_matches(path: &Path, desc: &BlobDesc) -> Result<bool, RegistryError> {
    let ctx = |e| RegistryError::io(format!("reading {}", path.display()), e);
    let file = File::open(path).map_err(ctx)?;
    if file.metadata().map_err(ctx)?.len() != desc.size {
        return Ok(false);
    }
    let mut hasher = Sha256::new();
    io::copy(&mut io::BufReader::new(file), &mut HashWriter(&mut hasher)).map_err(ctx)?;
    Ok(hex(&hasher.finalize()) == desc.hex())
}

/// `bytes START-END/TOTAL` → START.
fn content_range_start(v: &str) -> Option<u64> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    rest.split('-').next()?.trim().parse().ok()
}

fn sync_dir(dir: &Path) -> Result<(), RegistryError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| RegistryError::io(format!("syncing {}", dir.display()), e))
}

/// Holds an exclusive `flock` on the layout directory while a pull writes into it.
fn lock_dir(dir: &Path) -> Result<File, RegistryError> {
    let ctx = |e: io::Error| RegistryError::io(format!("locking {}", dir.display()), e);
    let f = File::open(dir).map_err(ctx)?;
    rustix::fs::flock(f.as_fd(), rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| ctx(e.into()))?;
    Ok(f)
}

fn header<'r>(resp: &'r Response<Body>, name: &str) -> Option<&'r str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

fn transport_error(url: &str, e: ureq::Error) -> RegistryError {
    RegistryError::Transport {
        url: url.to_owned(),
        source: Box::new(e),
    }
}

/// Whether a transport error is worth retrying (the network, not the request, failed).
fn retryable(e: &ureq::Error) -> bool {
    matches!(
        e,
        ureq::Error::Io(_)
            | ureq::Error::Timeout(_)
            | ureq::Error::ConnectionFailed
            | ureq::Error::HostNotFound
            | ureq::Error::Protocol(_)
            | ureq::Error::BodyStalled
    )
}

/// How requests to the registry's host are authorised.
enum AuthMode {
    /// Nothing sent (yet).
    Anonymous,
    /// `Authorization: Basic ...` on every request.
    Basic(String),
    /// `Authorization: Bearer <token>` with tokens from the realm, per scope.
    Bearer,
}

/// An HTTP client for one repository on one registry.
struct Client {
    agent: Agent,
    scheme: &'static str,
    /// `host[:port]` of the API.
    host: String,
    /// The registry as the user named it (for error messages).
    registry: String,
    scope: String,
    auth: RegistryAuth,
    mode: AuthMode,
    /// `Authorization` header values from the token service, by scope.
    tokens: HashMap<String, String>,
    retries: u32,
}

impl Client {
    fn new(reference: &Reference, auth: RegistryAuth, retries: u32) -> Result<Self, RegistryError> {
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(pem) = &auth.ca_pem {
            let mut certs = Vec::new();
            for item in ureq::tls::parse_pem(pem) {
                match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => certs.push(c),
                    Ok(_) => {}
                    Err(e) => return Err(RegistryError::InvalidCa(e.to_string())),
                }
            }
            if certs.is_empty() {
                return Err(RegistryError::InvalidCa(
                    "no CERTIFICATE block in the PEM data".to_owned(),
                ));
            }
            tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
        }
        let agent = Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .user_agent(concat!("keel/", env!("CARGO_PKG_VERSION")))
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            .tls_config(tls.build())
            .build()
            .new_agent();
        Ok(Client {
            agent,
            scheme: if auth.insecure { "http" } else { "https" },
            host: reference.api_host().to_owned(),
            registry: reference.registry.clone(),
            scope: format!("repository:{}:pull", reference.repository),
            auth,
            mode: AuthMode::Anonymous,
            tokens: HashMap::new(),
            retries,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme, self.host)
    }

    fn authorization(&self) -> Option<String> {
        match &self.mode {
            AuthMode::Anonymous => None,
            AuthMode::Basic(h) => Some(h.clone()),
            AuthMode::Bearer => self.tokens.get(&self.scope).cloned(),
        }
    }

    fn basic_header(&self) -> Option<String> {
        let user = self.auth.username.as_deref()?;
        let pass = self.auth.password.as_deref().unwrap_or("");
        Some(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        ))
    }

    fn unauthorized(&self, detail: impl Into<String>) -> RegistryError {
        RegistryError::Unauthorized {
            registry: self.registry.clone(),
            detail: detail.into(),
        }
    }

    /// GET with retries (connection errors, 5xx, 429), authentication and redirects.
    /// `range_from > 0` asks for the bytes from that offset on.
    fn get(
        &mut self,
        url: &str,
        accept: Option<&str>,
        range_from: u64,
    ) -> Result<Response<Body>, RegistryError> {
        let mut attempt = 0;
        loop {
            let wait = match self.get_once(url, accept, range_from) {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    if status != 429 && !(500..600).contains(&status) {
                        return Ok(resp);
                    }
                    if attempt >= self.retries {
                        return Err(self.status_error(url, resp));
                    }
                    retry_after(&resp).unwrap_or_else(|| backoff_delay(attempt))
                }
                Err(Failure::Retryable(_)) if attempt < self.retries => backoff_delay(attempt),
                Err(Failure::Retryable(e) | Failure::Fatal(e)) => return Err(e),
            };
            attempt += 1;
            std::thread::sleep(wait.min(RETRY_AFTER_MAX));
        }
    }

    /// One GET, answering one authentication challenge and following redirects.
    fn get_once(
        &mut self,
        url: &str,
        accept: Option<&str>,
        range_from: u64,
    ) -> Result<Response<Body>, Failure> {
        let mut current = url.to_owned();
        let mut authenticated = false;
        let mut redirects = 0;
        loop {
            let same_host = authority(&current) == Some(self.host.as_str());
            let mut req = self.agent.get(&current);
            if let Some(a) = accept {
                req = req.header("Accept", a);
            }
            if range_from > 0 {
                req = req.header("Range", format!("bytes={range_from}-"));
            }
            if same_host && let Some(h) = self.authorization() {
                req = req.header("Authorization", h);
            }
            let resp = req.call().map_err(|e| {
                if retryable(&e) {
                    Failure::Retryable(transport_error(&current, e))
                } else {
                    Failure::Fatal(transport_error(&current, e))
                }
            })?;
            let status = resp.status().as_u16();
            match status {
                301 | 302 | 303 | 307 | 308 => {
                    redirects += 1;
                    let location = header(&resp, "location").ok_or_else(|| {
                        Failure::Fatal(RegistryError::Protocol {
                            url: current.clone(),
                            reason: format!("HTTP {status} without Location"),
                        })
                    })?;
                    let next = resolve_location(&current, location);
                    if redirects > MAX_REDIRECTS {
                        return Err(Failure::Fatal(RegistryError::Protocol {
                            url: url.to_owned(),
                            reason: "too many redirects".to_owned(),
                        }));
                    }
                    if next.starts_with("http://") && !self.auth.insecure {
                        return Err(Failure::Fatal(RegistryError::Protocol {
                            url: current,
                            reason: format!("refusing a redirect to plain HTTP ({next})"),
                        }));
                    }
                    current = next;
                }
                401 if same_host && !authenticated => {
                    authenticated = true;
                    self.authenticate(&current, &resp)?;
                    current = url.to_owned();
                    redirects = 0;
                }
                401 | 403 => {
                    let detail = error_detail(resp);
                    return Err(Failure::Fatal(self.unauthorized(if detail.is_empty() {
                        format!("HTTP {status} from {current}")
                    } else {
                        detail
                    })));
                }
                _ => return Ok(resp),
            }
        }
    }

    /// Answers a 401's challenge: picks the scheme and, for Bearer, gets a token.
    fn authenticate(&mut self, url: &str, resp: &Response<Body>) -> Result<(), Failure> {
        let challenge = resp
            .headers()
            .get_all("www-authenticate")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(parse_challenge)
            .find(|c| c.scheme == "bearer" || c.scheme == "basic");
        let Some(challenge) = challenge else {
            return Err(Failure::Fatal(self.unauthorized(format!(
                "HTTP 401 from {url} without a usable WWW-Authenticate challenge"
            ))));
        };
        if challenge.scheme == "basic" {
            let Some(h) = self.basic_header() else {
                return Err(Failure::Fatal(self.unauthorized(
                    "the registry requires credentials and none are set",
                )));
            };
            self.mode = AuthMode::Basic(h);
            return Ok(());
        }
        let Some(realm) = challenge.params.get("realm") else {
            return Err(Failure::Fatal(
                self.unauthorized("Bearer challenge without a realm"),
            ));
        };
        let scope = challenge
            .params
            .get("scope")
            .cloned()
            .unwrap_or_else(|| self.scope.clone());
        let mut token_url = format!("{realm}{}", if realm.contains('?') { '&' } else { '?' });
        if let Some(service) = challenge.params.get("service") {
            token_url.push_str(&format!("service={}&", url_encode(service)));
        }
        token_url.push_str(&format!("scope={}", url_encode(&scope)));
        if token_url.starts_with("http://") && !self.auth.insecure {
            return Err(Failure::Fatal(RegistryError::Protocol {
                url: token_url,
                reason: "refusing a token service on plain HTTP".to_owned(),
            }));
        }
        let mut req = self.agent.get(&token_url);
        if let Some(h) = self.basic_header() {
            req = req.header("Authorization", h);
        }
        let mut resp = req.call().map_err(|e| {
            if retryable(&e) {
                Failure::Retryable(transport_error(&token_url, e))
            } else {
                Failure::Fatal(transport_error(&token_url, e))
            }
        })?;
        let status = resp.status().as_u16();
        match status {
            200 => {}
            401 | 403 => {
                let detail = error_detail(resp);
                return Err(Failure::Fatal(self.unauthorized(format!(
                    "token service {realm}: HTTP {status}{}",
                    if detail.is_empty() {
                        String::new()
                    } else {
                        format!(": {detail}")
                    }
                ))));
            }
            429 | 500..=599 => {
                return Err(Failure::Retryable(self.status_error(&token_url, resp)));
            }
            _ => return Err(Failure::Fatal(self.status_error(&token_url, resp))),
        }
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_JSON)
            .read_to_vec()
            .map_err(|e| Failure::Retryable(transport_error(&token_url, e)))?;
        let doc: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
            Failure::Fatal(RegistryError::Json {
                what: format!("token from {realm}"),
                source: e,
            })
        })?;
        let token = doc
            .get("token")
            .or_else(|| doc.get("access_token"))
            .and_then(|t| t.as_str())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Failure::Fatal(RegistryError::Protocol {
                    url: token_url.clone(),
                    reason: "token response without a token".to_owned(),
                })
            })?;
        self.tokens
            .insert(self.scope.clone(), format!("Bearer {token}"));
        self.mode = AuthMode::Bearer;
        Ok(())
    }

    /// An error for an unexpected status, with the registry's error message if it sent one.
    fn status_error(&self, url: &str, resp: Response<Body>) -> RegistryError {
        let status = resp.status().as_u16();
        if status == 401 || status == 403 {
            return self.unauthorized(error_detail(resp));
        }
        let detail = error_detail(resp);
        RegistryError::Http {
            url: url.to_owned(),
            status,
            detail: if detail.is_empty() {
                detail
            } else {
                format!(": {detail}")
            },
        }
    }
}

enum Failure {
    Retryable(RegistryError),
    Fatal(RegistryError),
}

/// The `errors[].message` of a registry error body (or the start of a non-JSON body).
fn error_detail(mut resp: Response<Body>) -> String {
    let Ok(body) = resp.body_mut().with_config().limit(64 << 10).read_to_vec() else {
        return String::new();
    };
    if let Ok(doc) = serde_json::from_slice::<serde_json::Value>(&body) {
        if let Some(errors) = doc.get("errors").and_then(|e| e.as_array()) {
            let msgs: Vec<String> = errors
                .iter()
                .map(|e| {
                    let code = e.get("code").and_then(|c| c.as_str()).unwrap_or("");
                    let msg = e.get("message").and_then(|m| m.as_str()).unwrap_or("");
                    match (code.is_empty(), msg.is_empty()) {
                        (false, false) => format!("{code}: {msg}"),
                        (false, true) => code.to_owned(),
                        _ => msg.to_owned(),
                    }
                })
                .collect();
            return msgs.join("; ");
        }
        if let Some(d) = doc.get("details").and_then(|d| d.as_str()) {
            return d.to_owned();
        }
    }
    let text = String::from_utf8_lossy(&body);
    text.trim().chars().take(200).collect()
}

/// `Retry-After` in seconds (an HTTP date is not interpreted: the backoff applies).
fn retry_after(resp: &Response<Body>) -> Option<Duration> {
    header(resp, "retry-after")?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// The `host[:port]` of an absolute URL.
fn authority(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let auth = &rest[..end];
    Some(auth.rsplit_once('@').map_or(auth, |(_, h)| h))
}

/// Resolves a `Location` header against the URL it answered.
fn resolve_location(base: &str, location: &str) -> String {
    if location.starts_with("http://") || location.starts_with("https://") {
        return location.to_owned();
    }
    let scheme = base.split_once("://").map_or("https", |(s, _)| s);
    if let Some(rest) = location.strip_prefix("//") {
        return format!("{scheme}://{rest}");
    }
    let host = authority(base).unwrap_or("");
    if location.starts_with('/') {
        return format!("{scheme}://{host}{location}");
    }
    // Relative to the base's directory.
    let path = base
        .split_once("://")
        .map(|(_, r)| r)
        .and_then(|r| r.find('/').map(|i| &r[i..]))
        .unwrap_or("/");
    let path = path.split(['?', '#']).next().unwrap_or("/");
    let dir = path.rsplit_once('/').map_or("", |(d, _)| d);
    format!("{scheme}://{host}{dir}/{location}")
}

/// Percent-encodes a query parameter value.
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Reference {
        s.parse().unwrap()
    }

    #[test]
    fn parses_references() {
        assert_eq!(
            r("busybox"),
            Reference {
                registry: "docker.io".into(),
                repository: "library/busybox".into(),
                tag: Some("latest".into()),
                digest: None,
            }
        );
        assert_eq!(r("busybox").api_host(), "registry-1.docker.io");
        assert_eq!(r("user/app:1.2").repository, "user/app");
        assert_eq!(r("user/app:1.2").tag.as_deref(), Some("1.2"));
        assert_eq!(r("docker.io/nginx").repository, "library/nginx");
        assert_eq!(r("index.docker.io/nginx").registry, "docker.io");

        let x = r("host:5000/a/b:tag");
        assert_eq!(x.registry, "host:5000");
        assert_eq!(x.repository, "a/b");
        assert_eq!(x.tag.as_deref(), Some("tag"));
        assert_eq!(x.api_host(), "host:5000");
        assert_eq!(x.to_string(), "host:5000/a/b:tag");

        let x = r("host:5000/a/b");
        assert_eq!(x.registry, "host:5000");
        assert_eq!(x.tag.as_deref(), Some("latest"));

        let d = format!("sha256:{}", "ab".repeat(32));
        let x = r(&format!("quay.io/a/b@{d}"));
        assert_eq!(x.registry, "quay.io");
        assert_eq!(x.tag, None);
        assert_eq!(x.digest.as_deref(), Some(d.as_str()));
        assert_eq!(x.manifest_reference(), d);
        let x = r(&format!("localhost/a:v1@{d}"));
        assert_eq!(x.registry, "localhost");
        assert_eq!(x.tag.as_deref(), Some("v1"));
        assert_eq!(x.manifest_reference(), d);
        assert_eq!(x.to_string(), format!("localhost/a:v1@{d}"));
        assert_eq!(r("127.0.0.1:5000/x").registry, "127.0.0.1:5000");
        assert_eq!(r("[::1]:5000/x").registry, "[::1]:5000");
        assert_eq!(r("a/b__c/d-e.f_g:V_1.0-x").repository, "a/b__c/d-e.f_g");

        for bad in [
            "",
            "Busybox",
            "a b",
            "host:5000/a/B",
            "busybox:",
            "busybox:.x",
            "a//b",
            "a/b/",
            "host:50x0/a",
            "busybox@sha256:abc",
            "busybox@md5:0123",
            "a/b_-c",
            "a/.b",
        ] {
            assert!(
                matches!(
                    bad.parse::<Reference>(),
                    Err(RegistryError::InvalidReference { .. })
                ),
                "{bad:?} should not parse"
            );
        }
        let long_tag = format!("a:{}", "t".repeat(129));
        assert!(long_tag.parse::<Reference>().is_err());
    }

    #[test]
    fn parses_challenges() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "https://auth.docker.io/token");
        assert_eq!(c.params["service"], "registry.docker.io");
        assert_eq!(c.params["scope"], "repository:library/busybox:pull");

        let c = parse_challenge(r#"Basic realm="basic-realm""#).unwrap();
        assert_eq!(c.scheme, "basic");
        assert_eq!(c.params["realm"], "basic-realm");

        // Commas and escapes inside quotes, unquoted values, spaces around '='.
        let c = parse_challenge(
            r#"bearer Realm = "https://x/t?a=1,b=2" , service=reg, scope="repository:a:pull,push", note="say \"hi\"""#,
        )
        .unwrap();
        assert_eq!(c.params["realm"], "https://x/t?a=1,b=2");
        assert_eq!(c.params["service"], "reg");
        assert_eq!(c.params["scope"], "repository:a:pull,push");
        assert_eq!(c.params["note"], r#"say "hi""#);

        let c = parse_challenge("Basic").unwrap();
        assert!(c.params.is_empty());
        assert!(parse_challenge("").is_none());
        assert!(parse_challenge("\"x\" realm=y").is_none());
    }

    #[test]
    fn backoff_schedule() {
        let secs: Vec<f64> = (0..8).map(|a| backoff_delay(a).as_secs_f64()).collect();
        assert_eq!(secs, vec![0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]);
        assert_eq!(backoff_delay(1000), BACKOFF_MAX);
        assert_eq!(backoff_delay(u32::MAX), BACKOFF_MAX);
    }

    #[test]
    fn url_helpers() {
        assert_eq!(authority("https://h:5000/v2/x"), Some("h:5000"));
        assert_eq!(authority("http://u:p@h/x?y"), Some("h"));
        assert_eq!(authority("https://h"), Some("h"));
        assert_eq!(
            resolve_location("https://r/v2/a/blobs/x", "https://s3/b?sig=1"),
            "https://s3/b?sig=1"
        );
        assert_eq!(
            resolve_location("https://r/v2/a/blobs/x", "/other"),
            "https://r/other"
        );
        assert_eq!(
            resolve_location("http://r:1/v2/a/blobs/x?q", "y"),
            "http://r:1/v2/a/blobs/y"
        );
        assert_eq!(resolve_location("https://r/x", "//cdn/z"), "https://cdn/z");
        assert_eq!(
            url_encode("repository:a/b:pull"),
            "repository%3Aa%2Fb%3Apull"
        );
        assert_eq!(content_range_start("bytes 100-199/200"), Some(100));
        assert_eq!(content_range_start("bytes */200"), None);
    }

    #[test]
    fn debug_redacts_password() {
        let a = RegistryAuth {
            username: Some("u".into()),
            password: Some("secret".into()),
            ..Default::default()
        };
        assert!(!format!("{a:?}").contains("secret"));
    }
}
