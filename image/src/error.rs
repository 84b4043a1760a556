//! The error type shared by [`layout`](crate::layout), [`unpack`](crate::unpack) and
//! `import`.

use std::io;
use std::path::PathBuf;

/// Errors from reading, unpacking or creating OCI images.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// An I/O operation failed; `context` says on what.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, usually with the path involved.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The directory is not a usable OCI image layout.
    #[error("{path}: not a valid OCI image layout: {reason}")]
    InvalidLayout {
        /// The layout directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A JSON document (index, manifest, config) did not parse.
    #[error("invalid {what}: {source}")]
    Json {
        /// Which document.
        what: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// Building an OCI document failed.
    #[error("building OCI document: {0}")]
    Spec(#[from] oci_spec::OciSpecError),
    /// Content did not hash to the digest that names it.
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        /// Which blob.
        what: String,
        /// The digest the descriptor promised.
        expected: String,
        /// The digest of what was actually read.
        actual: String,
    },
    /// Content did not have the size its descriptor promised.
    #[error("size mismatch for {what}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        /// Which blob.
        what: String,
        /// The size from the descriptor.
        expected: u64,
        /// The actual size.
        actual: u64,
    },
    /// A digest uses an algorithm other than sha256, or is malformed.
    #[error("unsupported or malformed digest {0:?} (only sha256 is supported)")]
    UnsupportedDigest(String),
    /// A media type this crate cannot handle.
    #[error("unsupported media type {0:?}")]
    UnsupportedMediaType(String),
    /// `index.json` lists no image manifest.
    #[error("index.json lists no image manifest")]
    NoManifest,
    /// `index.json` lists several manifests and no reference name was given.
    #[error("index.json lists {count} manifests; open one by reference name (known: {refs:?})")]
    AmbiguousManifest {
        /// How many manifests there are.
        count: usize,
        /// Their `org.opencontainers.image.ref.name` annotations.
        refs: Vec<String>,
    },
    /// No manifest carries the requested reference name.
    #[error("no manifest with reference name {wanted:?} (known: {refs:?})")]
    RefNotFound {
        /// The requested reference name.
        wanted: String,
        /// The reference names present.
        refs: Vec<String>,
    },
    /// Several different images match a reference equally well.
    #[error("reference {wanted:?} is ambiguous: it matches {matches:?}")]
    AmbiguousReference {
        /// The requested reference.
        wanted: String,
        /// The matching images: their names and digests.
        matches: Vec<String>,
    },
    /// An image index has no manifest for the platform Keel runs.
    #[error("no {wanted} image in the index (available: {available:?})")]
    NoMatchingPlatform {
        /// The platform wanted (`linux/amd64`).
        wanted: String,
        /// The platforms the index offers.
        available: Vec<String>,
    },
    /// Image indexes nested deeper than Keel follows.
    #[error("image indexes nested more than {0} deep")]
    NestedTooDeep(usize),
    /// A layer entry would be written outside the destination.
    /// A layer that must already be in the store is not (see
    /// crate::layer_store::unpacked_layers).
    #[error("layer {layer} is not unpacked in {}", store.display())]
    NotUnpacked { layer: String, store: PathBuf },
    /// A layer went past one of the unpack limits (crate::unpack_limits).
    #[error("layer {layer}: {reason}")]
    LimitExceeded { layer: String, reason: String },
    #[error("layer entry {path:?}: {reason}")]
    UnsafePath {
        /// The entry name as found in the tar.
        path: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// A layer entry cannot be applied.
    #[error("layer entry {path:?}: {reason}")]
    BadEntry {
        /// The entry name as found in the tar.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// An import source is unusable.
    #[error("import source {path}: {reason}")]
    BadSource {
        /// The source path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl ImageError {
    /// Wraps an I/O error with a description of the failed operation.
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        ImageError::Io {
            context: context.into(),
            source,
        }
    }
}
