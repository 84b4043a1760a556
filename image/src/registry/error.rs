//! What a pull can fail with.

use super::*;

/// Errors from [`pull`] and [`Reference`] parsing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The content or the destination layout failed a check of the image crate's: a digest
    /// or size that does not match its descriptor, a malformed digest, an unwritable
    /// layout (one set of those errors for pulls, archives and layouts alike).
    #[error(transparent)]
    Image(#[from] crate::ImageError),
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
    pub(super) fn io(context: impl Into<String>, source: io::Error) -> Self {
        RegistryError::Io {
            context: context.into(),
            source,
        }
    }
}
