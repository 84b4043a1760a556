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
//!
//! [`reference`] parses image references, [`auth`] holds credentials and challenges,
//! [`client`] speaks HTTP (retries, redirects, tokens), [`blobs`] fetches and stores blobs;
//! this file is the pull itself: manifest, platform, config, layers, index.

mod auth;
mod blobs;
mod client;
mod error;
mod reference;

pub use auth::RegistryAuth;
pub use error::RegistryError;
pub use reference::Reference;

use auth::*;
use blobs::*;
use client::*;
use reference::{valid_path_component, valid_registry, valid_tag};

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
            return Err(crate::ImageError::SizeMismatch {
                what: format!("manifest {}", desc.digest),
                expected: desc.size,
                actual: b.len() as u64,
            }
            .into());
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
            _ => return Err(crate::ImageError::UnsupportedDigest(digest).into()),
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
        return Err(crate::ImageError::DigestMismatch {
            what: what.to_owned(),
            expected: expected.to_owned(),
            actual,
        }
        .into());
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
