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

const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const MEDIA_TYPE_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_TYPE_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// JSON documents are small; refusing big ones keeps a hostile layout from exhausting memory.
const MAX_JSON_BLOB: u64 = 16 << 20;
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
    fn from_media_type(media_type: &str) -> Result<Self, ImageError> {
        match media_type {
            MEDIA_TYPE_LAYER_TAR => Ok(LayerCompression::None),
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
    manifest: ImageManifest,
    config: ImageConfiguration,
    layers: Vec<Layer>,
}

impl ImageLayout {
    /// Opens the layout at `dir`, which must list exactly one image manifest (use
    /// [`ImageLayout::open_ref`] for layouts holding several).
    pub fn open(dir: &Path) -> Result<Self, ImageError> {
        Self::open_impl(dir, None)
    }

    /// Opens the layout at `dir`, selecting the manifest whose
    /// `org.opencontainers.image.ref.name` annotation equals `ref_name`.
    pub fn open_ref(dir: &Path, ref_name: &str) -> Result<Self, ImageError> {
        Self::open_impl(dir, Some(ref_name))
    }

    /// The layout directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `sha256:<hex>` of the selected manifest.
    pub fn manifest_digest(&self) -> &str {
        &self.manifest_digest
    }

    /// The selected manifest.
    pub fn manifest(&self) -> &ImageManifest {
        &self.manifest
    }

    /// The image configuration (entrypoint, env, ...).
    pub fn config(&self) -> &ImageConfiguration {
        &self.config
    }

    /// The layers, bottom first.
    pub fn layers(&self) -> Vec<Layer> {
        self.layers.clone()
    }

    fn open_impl(dir: &Path, ref_name: Option<&str>) -> Result<Self, ImageError> {
        let invalid = |reason: String| ImageError::InvalidLayout {
            path: dir.to_owned(),
            reason,
        };
        let marker_path = dir.join("oci-layout");
        let marker = fs::read(&marker_path).map_err(|e| invalid(format!("oci-layout: {e}")))?;
        let marker: serde_json::Value =
            serde_json::from_slice(&marker).map_err(|e| ImageError::Json {
                what: marker_path.display().to_string(),
                source: e,
            })?;
        match marker.get("imageLayoutVersion").and_then(|v| v.as_str()) {
            Some(v) if v.starts_with("1.") => {}
            other => return Err(invalid(format!("unsupported imageLayoutVersion {other:?}"))),
        }

        let index_path = dir.join("index.json");
        let index_bytes = fs::read(&index_path).map_err(|e| invalid(format!("index.json: {e}")))?;
        let index: ImageIndex = parse_json(&index_bytes, "index.json")?;

        let mut desc = select_manifest(index.manifests(), ref_name)?;
        let mut depth = 0;
        let manifest_bytes = loop {
            let media_type = desc.media_type().to_string();
            let bytes = read_json_blob(dir, &desc, &format!("{media_type} {}", desc.digest()))?;
            match media_type.as_str() {
                MEDIA_TYPE_MANIFEST | MEDIA_TYPE_DOCKER_MANIFEST => break bytes,
                MEDIA_TYPE_INDEX | MEDIA_TYPE_DOCKER_LIST => {
                    depth += 1;
                    if depth > MAX_INDEX_DEPTH {
                        return Err(invalid("image indexes nested too deeply".into()));
                    }
                    let nested: ImageIndex = parse_json(&bytes, "nested image index")?;
                    desc = select_platform(nested.manifests())?;
                }
                other => return Err(ImageError::UnsupportedMediaType(other.to_owned())),
            }
        };
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
        if config.rootfs().diff_ids().len() != layers.len() {
            return Err(invalid(format!(
                "config lists {} diff_ids but the manifest has {} layers",
                config.rootfs().diff_ids().len(),
                layers.len()
            )));
        }

        Ok(ImageLayout {
            dir: dir.to_owned(),
            manifest_digest,
            manifest,
            config,
            layers,
        })
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, ImageError> {
    serde_json::from_slice(bytes).map_err(|e| ImageError::Json {
        what: what.to_owned(),
        source: e,
    })
}

fn ref_names(descs: &[Descriptor]) -> Vec<String> {
    descs
        .iter()
        .filter_map(|d| d.annotations().as_ref()?.get(REF_NAME_ANNOTATION).cloned())
        .collect()
}

fn is_manifest_or_index(d: &Descriptor) -> bool {
    matches!(
        d.media_type().to_string().as_str(),
        MEDIA_TYPE_MANIFEST
            | MEDIA_TYPE_INDEX
            | MEDIA_TYPE_DOCKER_MANIFEST
            | MEDIA_TYPE_DOCKER_LIST
    )
}

fn select_manifest(descs: &[Descriptor], ref_name: Option<&str>) -> Result<Descriptor, ImageError> {
    let candidates: Vec<&Descriptor> = descs.iter().filter(|d| is_manifest_or_index(d)).collect();
    match ref_name {
        Some(wanted) => candidates
            .iter()
            .find(|d| {
                d.annotations()
                    .as_ref()
                    .and_then(|a| a.get(REF_NAME_ANNOTATION))
                    .is_some_and(|r| r == wanted)
            })
            .map(|d| (*d).clone())
            .ok_or_else(|| ImageError::RefNotFound {
                wanted: wanted.to_owned(),
                refs: ref_names(descs),
            }),
        None => match candidates.as_slice() {
            [] => Err(ImageError::NoManifest),
            [one] => Ok((*one).clone()),
            many => Err(ImageError::AmbiguousManifest {
                count: many.len(),
                refs: ref_names(descs),
            }),
        },
    }
}

/// Picks the linux/amd64 entry of a multi-platform index (Keel only runs x86_64 guests).
fn select_platform(descs: &[Descriptor]) -> Result<Descriptor, ImageError> {
    let candidates: Vec<&Descriptor> = descs.iter().filter(|d| is_manifest_or_index(d)).collect();
    if let [one] = candidates.as_slice() {
        return Ok((*one).clone());
    }
    candidates
        .iter()
        .find(|d| {
            d.platform().as_ref().is_some_and(|p| {
                p.architecture().to_string() == "amd64" && p.os().to_string() == "linux"
            })
        })
        .map(|d| (*d).clone())
        .ok_or(ImageError::NoManifest)
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
    if desc.size() > MAX_JSON_BLOB {
        return Err(ImageError::BadSource {
            path,
            reason: format!(
                "{what} is {} bytes, larger than the {MAX_JSON_BLOB} limit",
                desc.size()
            ),
        });
    }
    let file = fs::File::open(&path)
        .map_err(|e| ImageError::io(format!("opening {}", path.display()), e))?;
    let mut bytes = Vec::new();
    // One byte more than promised is enough to detect an oversized blob.
    file.take(desc.size() + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ImageError::io(format!("reading {}", path.display()), e))?;
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
}
