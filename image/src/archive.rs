//! Bringing images made by other tools into an OCI image layout: oci-archive and
//! docker-archive tarballs ([`import_archive`]) and images of other layouts
//! ([`copy_image`]).
//!
//! The destination is a layout that may already hold other images: blobs are stored
//! content-addressed (a blob already present is not written again), and the image is added
//! to `index.json` under a caller-given `org.opencontainers.image.ref.name`, replacing an
//! entry of the same name. `keel build` uses this to put every image of a host into one
//! layout, so that layers shared by images are stored once.
//!
//! Every blob is verified while it is copied: its size and SHA-256 must match the
//! descriptor that names it (a Docker layer, which no descriptor names, must match its
//! `diff_id` in the image config). Nothing is read into memory but JSON documents;
//! layers stream from the archive into a temporary file that is renamed into place once
//! verified. `index.json` is written last, so it never names an incomplete image, and the
//! destination directory is `flock`ed while it is changed.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use oci_spec::image::{
    Descriptor, Digest, ImageConfiguration, ImageIndex, ImageManifest, MediaType,
};
use serde::Deserialize;

use crate::ImageError;
use crate::digest::{HashingReader, HashingWriter, is_sha256_hex, sha256_digest};
use crate::layout::{
    ImageLayout, LayerCompression, MAX_JSON_BLOB, MEDIA_TYPE_CONFIG, MEDIA_TYPE_DOCKER_CONFIG,
    MEDIA_TYPE_LAYER_GZIP, MEDIA_TYPE_LAYER_TAR, MEDIA_TYPE_LAYER_ZSTD, MEDIA_TYPE_MANIFEST,
    best_reference_match, blob_path, check_diff_ids, check_layout_marker, decompress, parse_json,
    read_verified, resolve_manifest,
};

/// Buffer size for streaming blobs.
const COPY_BUFFER: usize = 256 << 10;
/// Symlinks and hard links inside an archive are followed at most this many times.
const MAX_LINK_HOPS: usize = 8;

/// Imports one image from an **oci-archive** (an OCI image layout in a tar, as written by
/// `skopeo copy ... oci-archive:`) or a **docker-archive** (`docker save`, `skopeo copy ...
/// docker-archive:`) into the OCI image layout at `dest`, and returns the `sha256:<hex>`
/// digest of its manifest. The format is detected from the archive's content; a gzip- or
/// zstd-compressed archive is accepted too.
///
/// `reference` selects the image: for an oci-archive a name of `index.json` or a digest
/// (see [`ImageLayout::open_ref`]; an index resolves to linux/amd64); for a docker-archive
/// one of the `RepoTags` (Docker's normalisation applies: `t` finds
/// `docker.io/library/t:latest`) or the image id (the config's `sha256:` digest). `None`
/// takes the only image and is an error naming the choices if there are several.
///
/// `dest` is created if missing, or may be a layout holding other images; the image is
/// listed in its `index.json` under `ref_name`, replacing any entry of that name. Layers of
/// a docker-archive keep their compression (usually none); their manifest is rewritten in
/// OCI form, with the config blob unchanged (so the image id stays the same).
pub fn import_archive(
    archive: &Path,
    reference: Option<&str>,
    dest: &Path,
    ref_name: &str,
) -> Result<String, ImageError> {
    let writer = LayoutWriter::open(dest, ref_name)?;
    let tar = TarArchive::open(archive, &writer.dir)?;
    if tar.has("oci-layout") && tar.has("index.json") {
        import_oci_archive(&tar, reference, &writer, ref_name)
    } else if tar.has("manifest.json") {
        import_docker_archive(&tar, reference, &writer, ref_name)
    } else {
        Err(ImageError::BadSource {
            path: archive.to_owned(),
            reason: "neither an oci-archive (no oci-layout and index.json) nor a \
                     docker-archive (no manifest.json)"
                .into(),
        })
    }
}

/// Copies the image selected in `src` (its manifest, config and layers, each verified)
/// into the layout at `dest`, listed in `dest`'s `index.json` under `ref_name` (replacing
/// an entry of that name), and returns the manifest digest. Blobs `dest` already has are
/// not written again. `dest` is created if missing; it may be `src`'s own directory.
pub fn copy_image(src: &ImageLayout, dest: &Path, ref_name: &str) -> Result<String, ImageError> {
    let writer = LayoutWriter::open(dest, ref_name)?;
    let manifest_desc = Descriptor::new(
        MediaType::from(src.manifest_media_type()),
        src.manifest_size(),
        Digest::from_str(src.manifest_digest())?,
    );
    let source = LayoutSource { dir: src.dir() };
    let (reader, path, what) = source.open(&manifest_desc, "manifest")?;
    let manifest_bytes = read_verified(reader, &manifest_desc, &path, &what)?;
    copy_oci_image(&source, &manifest_desc, &manifest_bytes, &writer, ref_name)
}

// ---------------------------------------------------------------------------------------
// Sources of OCI blobs.

/// Where the blobs of an OCI layout come from.
trait BlobSource {
    /// Opens the blob `desc` names; also returns a path and a description of it (`kind`
    /// plus where it is) for messages.
    fn open(
        &self,
        desc: &Descriptor,
        kind: &str,
    ) -> Result<(Box<dyn Read + '_>, PathBuf, String), ImageError>;
}

/// A layout directory.
struct LayoutSource<'a> {
    dir: &'a Path,
}

impl BlobSource for LayoutSource<'_> {
    fn open(
        &self,
        desc: &Descriptor,
        kind: &str,
    ) -> Result<(Box<dyn Read + '_>, PathBuf, String), ImageError> {
        let path = blob_path(self.dir, desc)?;
        let what = format!("{kind} {} ({})", desc.digest(), path.display());
        let file = File::open(&path).map_err(|e| ImageError::io(format!("opening {what}"), e))?;
        Ok((
            Box::new(BufReader::with_capacity(COPY_BUFFER, file)),
            path,
            what,
        ))
    }
}

/// The layout inside an oci-archive.
struct ArchiveSource<'a> {
    tar: &'a TarArchive,
}

impl BlobSource for ArchiveSource<'_> {
    fn open(
        &self,
        desc: &Descriptor,
        kind: &str,
    ) -> Result<(Box<dyn Read + '_>, PathBuf, String), ImageError> {
        let digest = desc.digest().to_string();
        let member = match digest.strip_prefix("sha256:") {
            Some(h) if is_sha256_hex(h) => format!("blobs/sha256/{h}"),
            _ => return Err(ImageError::UnsupportedDigest(digest)),
        };
        let what = format!("{kind} {member} in {}", self.tar.path.display());
        let (reader, _, _) = self.tar.open_member(&member)?;
        Ok((
            Box::new(BufReader::with_capacity(COPY_BUFFER, reader)),
            self.tar.path.clone(),
            what,
        ))
    }
}

/// Copies one image manifest (already read and verified: `manifest_bytes`), its config and
/// its layers from `src` into `writer`'s layout, and lists it under `ref_name`.
fn copy_oci_image(
    src: &dyn BlobSource,
    manifest_desc: &Descriptor,
    manifest_bytes: &[u8],
    writer: &LayoutWriter,
    ref_name: &str,
) -> Result<String, ImageError> {
    let manifest: ImageManifest = parse_json(manifest_bytes, "image manifest")?;
    let config_desc = manifest.config();
    let config_type = config_desc.media_type().to_string();
    if config_type != MEDIA_TYPE_CONFIG && config_type != MEDIA_TYPE_DOCKER_CONFIG {
        return Err(ImageError::UnsupportedMediaType(config_type));
    }
    let (reader, path, what) = src.open(config_desc, "image config")?;
    let config_bytes = read_verified(reader, config_desc, &path, &what)?;
    let config: ImageConfiguration = parse_json(&config_bytes, &what)?;
    check_diff_ids(&config, manifest.layers().len())
        .map_err(|reason| ImageError::BadSource { path, reason })?;
    for layer in manifest.layers() {
        LayerCompression::from_media_type(layer.media_type().as_ref())?;
    }

    // Layers first, the index last: the index never names an image with missing blobs.
    for layer in manifest.layers() {
        let (mut reader, _, what) = src.open(layer, "layer")?;
        writer.put(
            &mut reader,
            layer.digest().as_ref(),
            Some(layer.size()),
            &what,
        )?;
    }
    writer.put(
        &mut &config_bytes[..],
        config_desc.digest().as_ref(),
        Some(config_desc.size()),
        "image config",
    )?;
    let digest = manifest_desc.digest().to_string();
    writer.put(
        &mut &manifest_bytes[..],
        &digest,
        Some(manifest_desc.size()),
        "image manifest",
    )?;
    writer.add_to_index(
        manifest_desc.media_type().as_ref(),
        &digest,
        manifest_desc.size(),
        ref_name,
    )?;
    Ok(digest)
}

fn import_oci_archive(
    tar: &TarArchive,
    reference: Option<&str>,
    writer: &LayoutWriter,
    ref_name: &str,
) -> Result<String, ImageError> {
    let marker = tar.read_small("oci-layout", 4096)?;
    check_layout_marker(&marker, "oci-layout").map_err(|reason| ImageError::BadSource {
        path: tar.path.clone(),
        reason,
    })?;
    let index_bytes = tar.read_small("index.json", MAX_JSON_BLOB)?;
    let index: ImageIndex = parse_json(
        &index_bytes,
        &format!("index.json in {}", tar.path.display()),
    )?;
    let source = ArchiveSource { tar };
    let (desc, manifest_bytes) = resolve_manifest(index.manifests(), reference, |d, kind| {
        let (reader, path, what) = source.open(d, kind)?;
        read_verified(reader, d, &path, &what)
    })?;
    copy_oci_image(&source, &desc, &manifest_bytes, writer, ref_name)
}

// ---------------------------------------------------------------------------------------
// docker-archive.

/// One image of a docker-archive's `manifest.json`.
#[derive(Debug, Deserialize)]
struct DockerImage {
    /// The config's member name: `<hex>.json`, or `blobs/sha256/<hex>` since Docker 25.
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    /// Layer member names, bottom first: `<id>/layer.tar`, `<hex>.tar`,
    /// `blobs/sha256/<hex>`.
    #[serde(rename = "Layers", default)]
    layers: Vec<String>,
}

impl DockerImage {
    fn names(&self) -> Vec<String> {
        self.repo_tags.clone().unwrap_or_default()
    }

    /// How the image is named in messages: its tags, else its config member.
    fn label(&self) -> String {
        match self.repo_tags.as_deref() {
            Some(tags) if !tags.is_empty() => tags.join(", "),
            _ => self.config.clone(),
        }
    }
}

/// The digest a member name carries: `blobs/sha256/<hex>` or `<hex>.json` / `<hex>.tar`.
fn digest_in_name(name: &str) -> Option<String> {
    let hex = name
        .strip_prefix("blobs/sha256/")
        .or_else(|| name.strip_suffix(".json"))
        .or_else(|| name.strip_suffix(".tar"))?;
    is_sha256_hex(hex).then(|| format!("sha256:{hex}"))
}

fn import_docker_archive(
    tar: &TarArchive,
    reference: Option<&str>,
    writer: &LayoutWriter,
    ref_name: &str,
) -> Result<String, ImageError> {
    let archive = tar.path.display().to_string();
    let bytes = tar.read_small("manifest.json", MAX_JSON_BLOB)?;
    let images: Vec<DockerImage> = parse_json(&bytes, &format!("manifest.json in {archive}"))?;
    let labels = || images.iter().map(DockerImage::label).collect::<Vec<_>>();

    // Configs are small: read each one at most once.
    let mut configs: HashMap<String, Vec<u8>> = HashMap::new();
    let mut config_of = |image: &DockerImage| -> Result<Vec<u8>, ImageError> {
        if let Some(c) = configs.get(&image.config) {
            return Ok(c.clone());
        }
        let c = tar.read_small(&image.config, MAX_JSON_BLOB)?;
        configs.insert(image.config.clone(), c.clone());
        Ok(c)
    };

    let image = match reference {
        None => match images.as_slice() {
            [] => return Err(ImageError::NoManifest),
            [one] => one,
            many => {
                return Err(ImageError::AmbiguousManifest {
                    count: many.len(),
                    refs: labels(),
                });
            }
        },
        Some(wanted) if wanted.starts_with("sha256:") => {
            let mut found = None;
            let mut ids = Vec::new();
            for image in &images {
                let id = sha256_digest(&config_of(image)?);
                if id == wanted {
                    found = Some(image);
                    break;
                }
                ids.push(id);
            }
            found.ok_or_else(|| ImageError::RefNotFound {
                wanted: wanted.to_owned(),
                refs: ids,
            })?
        }
        Some(wanted) => {
            best_reference_match(&images, wanted, DockerImage::names, |i| i.config.clone())?
                .ok_or_else(|| ImageError::RefNotFound {
                    wanted: wanted.to_owned(),
                    refs: labels(),
                })?
        }
    };

    let config_bytes = config_of(image)?;
    let config_digest = sha256_digest(&config_bytes);
    let config_what = format!("image config {} in {archive}", image.config);
    if let Some(named) = digest_in_name(&image.config)
        && named != config_digest
    {
        return Err(ImageError::DigestMismatch {
            what: config_what,
            expected: named,
            actual: config_digest,
        });
    }
    let config: ImageConfiguration = parse_json(&config_bytes, &config_what)?;
    check_diff_ids(&config, image.layers.len()).map_err(|reason| ImageError::BadSource {
        path: tar.path.clone(),
        reason: format!("{}: {reason}", image.label()),
    })?;

    let mut layers = Vec::with_capacity(image.layers.len());
    for (name, diff_id) in image.layers.iter().zip(config.rootfs().diff_ids()) {
        let (member, _, resolved) = tar.open_member(name)?;
        let what = if &resolved == name {
            format!("layer {name} in {archive}")
        } else {
            format!("layer {name} (-> {resolved}) in {archive}")
        };
        let mut reader = BufReader::with_capacity(COPY_BUFFER, member);
        let compression = sniff_compression(&mut reader, &what)?;
        let staged = writer.stage(&mut reader, u64::MAX, &what)?;
        if let Some(named) = digest_in_name(&resolved).filter(|_| resolved.starts_with("blobs/"))
            && named != staged.digest
        {
            return Err(ImageError::DigestMismatch {
                what,
                expected: named,
                actual: staged.digest.clone(),
            });
        }
        let actual_diff_id = match compression {
            LayerCompression::None => staged.digest.clone(),
            c => {
                let file = File::open(&staged.tmp)
                    .map_err(|e| ImageError::io(format!("reopening {what}"), e))?;
                let mut hashing =
                    HashingReader::new(decompress(c, BufReader::with_capacity(COPY_BUFFER, file))?);
                io::copy(&mut hashing, &mut io::sink())
                    .map_err(|e| ImageError::io(format!("decompressing {what}"), e))?;
                let (hex, _) = hashing
                    .finish()
                    .map_err(|e| ImageError::io(format!("decompressing {what}"), e))?;
                format!("sha256:{hex}")
            }
        };
        if &actual_diff_id != diff_id {
            return Err(ImageError::DigestMismatch {
                what: format!("{what} (uncompressed content, the config's diff_id)"),
                expected: diff_id.clone(),
                actual: actual_diff_id,
            });
        }
        let media_type = match compression {
            LayerCompression::None => MEDIA_TYPE_LAYER_TAR,
            LayerCompression::Gzip => MEDIA_TYPE_LAYER_GZIP,
            LayerCompression::Zstd => MEDIA_TYPE_LAYER_ZSTD,
        };
        layers.push(serde_json::json!({
            "mediaType": media_type,
            "digest": staged.digest,
            "size": staged.size,
        }));
        staged.commit()?;
    }

    writer.put(
        &mut &config_bytes[..],
        &config_digest,
        Some(config_bytes.len() as u64),
        &config_what,
    )?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "config": {
            "mediaType": MEDIA_TYPE_CONFIG,
            "digest": config_digest,
            "size": config_bytes.len(),
        },
        "layers": layers,
    });
    let manifest_bytes = serde_json::to_vec(&manifest).map_err(|e| ImageError::Json {
        what: "image manifest".into(),
        source: e,
    })?;
    let digest = sha256_digest(&manifest_bytes);
    writer.put(
        &mut &manifest_bytes[..],
        &digest,
        Some(manifest_bytes.len() as u64),
        "image manifest",
    )?;
    writer.add_to_index(
        MEDIA_TYPE_MANIFEST,
        &digest,
        manifest_bytes.len() as u64,
        ref_name,
    )?;
    Ok(digest)
}

/// Tells a compressed stream from a plain one by its magic number, without consuming it.
fn sniff_compression(
    reader: &mut impl BufRead,
    what: &str,
) -> Result<LayerCompression, ImageError> {
    let head = reader
        .fill_buf()
        .map_err(|e| ImageError::io(format!("reading {what}"), e))?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        LayerCompression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        LayerCompression::Zstd
    } else {
        LayerCompression::None
    })
}

// ---------------------------------------------------------------------------------------
// The archive: a tar indexed once, its members then read in place.

#[derive(Debug, Clone)]
enum Member {
    /// A regular file: where its data starts in the (uncompressed) tar, and its size.
    File { offset: u64, size: u64 },
    /// A symlink or hard link, its target already made a member name.
    Link(String),
    /// An entry that cannot be read in place (a GNU sparse file).
    Unsupported,
}

struct TarArchive {
    /// The archive as given, for messages.
    path: PathBuf,
    /// The uncompressed tar: the archive itself, or an unlinked decompressed copy.
    file: File,
    members: HashMap<String, Member>,
}

/// A member name: `/`-separated, without `.`, empty components or a leading `/`; `None`
/// for names climbing with `..` above the archive's root.
fn member_name<'a>(base: &[&'a str], path: &'a str) -> Option<String> {
    let mut parts: Vec<&str> = if path.starts_with('/') {
        Vec::new()
    } else {
        base.to_vec()
    };
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

impl TarArchive {
    /// Indexes the archive at `path`; a compressed one is first decompressed into an
    /// unlinked temporary file in `scratch`.
    fn open(path: &Path, scratch: &Path) -> Result<Self, ImageError> {
        let io_err = |what: &str, e| ImageError::io(format!("{what} {}", path.display()), e);
        let file = File::open(path).map_err(|e| io_err("opening", e))?;
        let mut reader = BufReader::with_capacity(COPY_BUFFER, file);
        let compression = sniff_compression(&mut reader, &path.display().to_string())?;
        let file = if compression == LayerCompression::None {
            // The sniffing read ahead; the index below reads from the start.
            let mut file = reader.into_inner();
            file.seek(SeekFrom::Start(0))
                .map_err(|e| io_err("reading", e))?;
            file
        } else {
            let tmp = temp_path(scratch, "archive");
            let mut out = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(|e| ImageError::io(format!("creating {}", tmp.display()), e))?;
            // Unlinked at once: the space is freed however this ends.
            fs::remove_file(&tmp)
                .map_err(|e| ImageError::io(format!("removing {}", tmp.display()), e))?;
            let mut plain = decompress(compression, reader)?;
            let mut buffered = BufWriter::with_capacity(COPY_BUFFER, &mut out);
            io::copy(&mut plain, &mut buffered).map_err(|e| io_err("decompressing", e))?;
            buffered.flush().map_err(|e| io_err("decompressing", e))?;
            drop(buffered);
            out.seek(SeekFrom::Start(0))
                .map_err(|e| io_err("decompressing", e))?;
            out
        };

        let mut members = HashMap::new();
        {
            let mut archive = tar::Archive::new(&file);
            let entries = archive
                .entries_with_seek()
                .map_err(|e| io_err("reading", e))?;
            for entry in entries {
                let entry = entry.map_err(|e| io_err("reading", e))?;
                let raw = entry.path_bytes();
                let Ok(raw) = std::str::from_utf8(&raw) else {
                    continue;
                };
                let Some(name) = member_name(&[], raw) else {
                    continue;
                };
                let member = match entry.header().entry_type() {
                    tar::EntryType::Regular | tar::EntryType::Continuous => Member::File {
                        offset: entry.raw_file_position(),
                        size: entry.size(),
                    },
                    tar::EntryType::Symlink | tar::EntryType::Link => {
                        let Some(target) = entry.link_name_bytes() else {
                            continue;
                        };
                        let Ok(target) = std::str::from_utf8(&target) else {
                            continue;
                        };
                        let base: Vec<&str> = if entry.header().entry_type().is_symlink() {
                            let mut parts: Vec<&str> = name.split('/').collect();
                            parts.pop();
                            parts
                        } else {
                            Vec::new()
                        };
                        match member_name(&base, target) {
                            Some(t) => Member::Link(t),
                            None => continue,
                        }
                    }
                    tar::EntryType::GNUSparse => Member::Unsupported,
                    _ => continue,
                };
                // As with tar itself, a later entry of the same name wins.
                members.insert(name, member);
            }
        }
        Ok(TarArchive {
            path: path.to_owned(),
            file,
            members,
        })
    }

    fn missing(&self, name: &str, reason: &str) -> ImageError {
        ImageError::BadSource {
            path: self.path.clone(),
            reason: format!("member {name}: {reason}"),
        }
    }

    /// Follows links to the regular file `name` stands for: `(offset, size, its name)`.
    fn locate(&self, name: &str) -> Result<(u64, u64, String), ImageError> {
        let mut current = name.to_owned();
        for _ in 0..=MAX_LINK_HOPS {
            match self.members.get(&current) {
                Some(Member::File { offset, size }) => return Ok((*offset, *size, current)),
                Some(Member::Link(target)) => current = target.clone(),
                Some(Member::Unsupported) => {
                    return Err(self.missing(name, "sparse files are not supported"));
                }
                None => return Err(self.missing(name, "not in the archive")),
            }
        }
        Err(self.missing(name, "too many levels of links"))
    }

    fn has(&self, name: &str) -> bool {
        self.locate(name).is_ok()
    }

    /// A reader of the member `name` (a `/`-separated path), its size, and the name of
    /// the file it is once links are followed.
    fn open_member(&self, name: &str) -> Result<(MemberReader<'_>, u64, String), ImageError> {
        let name = member_name(&[], name).ok_or_else(|| self.missing(name, "invalid name"))?;
        let (offset, size, resolved) = self.locate(&name)?;
        Ok((
            MemberReader {
                file: &self.file,
                pos: offset,
                end: offset.saturating_add(size),
            },
            size,
            resolved,
        ))
    }

    /// Reads a member of at most `limit` bytes.
    fn read_small(&self, name: &str, limit: u64) -> Result<Vec<u8>, ImageError> {
        let (reader, size, _) = self.open_member(name)?;
        if size > limit {
            return Err(self.missing(
                name,
                &format!("{size} bytes, larger than the {limit} limit"),
            ));
        }
        let mut bytes = Vec::new();
        reader
            .take(limit)
            .read_to_end(&mut bytes)
            .map_err(|e| ImageError::io(format!("reading {name} in {}", self.path.display()), e))?;
        Ok(bytes)
    }
}

/// Reads one member's bytes in place with `pread`, so several may be open at once.
struct MemberReader<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for MemberReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end.saturating_sub(self.pos);
        if left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the archive ends inside this member",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

// ---------------------------------------------------------------------------------------
// The destination layout.

/// A temp name in `dir` unique within this process (and, by the pid, across processes).
fn temp_path(dir: &Path, kind: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".tmp-{kind}-{}-{n}", std::process::id()))
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<(), ImageError> {
    crate::atomic::write_atomic(path, data, 0o644)
        .map_err(|e| ImageError::io(format!("writing {}", path.display()), e))
}

/// An OCI layout being added to, locked against other writers for as long as it lives.
struct LayoutWriter {
    dir: PathBuf,
    blobs: PathBuf,
    /// Holds the `flock` on the layout directory.
    _lock: File,
}

/// A blob copied into a temporary file in the blob directory, not yet in place; removed
/// unless committed.
struct Staged<'a> {
    writer: &'a LayoutWriter,
    tmp: PathBuf,
    /// `sha256:<hex>` of the content.
    digest: String,
    size: u64,
    committed: bool,
}

impl Staged<'_> {
    /// Renames the blob into place under its digest.
    fn commit(mut self) -> Result<(), ImageError> {
        let hex = &self.digest["sha256:".len()..];
        let dest = self.writer.blobs.join(hex);
        fs::rename(&self.tmp, &dest)
            .map_err(|e| ImageError::io(format!("renaming to {}", dest.display()), e))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: an error is already being returned.
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

impl LayoutWriter {
    fn open(dir: &Path, ref_name: &str) -> Result<Self, ImageError> {
        if ref_name.is_empty() || ref_name.chars().any(char::is_control) {
            return Err(ImageError::BadSource {
                path: dir.to_owned(),
                reason: format!("invalid reference name {ref_name:?}"),
            });
        }
        let blobs = dir.join("blobs").join("sha256");
        fs::create_dir_all(&blobs)
            .map_err(|e| ImageError::io(format!("creating {}", blobs.display()), e))?;
        let lock =
            File::open(dir).map_err(|e| ImageError::io(format!("opening {}", dir.display()), e))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| ImageError::io(format!("locking {}", dir.display()), e.into()))?;
        let marker = dir.join("oci-layout");
        match fs::read(&marker) {
            Ok(bytes) => check_layout_marker(&bytes, "oci-layout").map_err(|reason| {
                ImageError::InvalidLayout {
                    path: dir.to_owned(),
                    reason,
                }
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                write_atomic(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
            }
            Err(e) => return Err(ImageError::io(format!("reading {}", marker.display()), e)),
        }
        Ok(LayoutWriter {
            dir: dir.to_owned(),
            blobs,
            _lock: lock,
        })
    }

    /// Copies at most `limit` bytes of `reader` into a temporary blob file, hashing them.
    fn stage(
        &self,
        reader: &mut dyn Read,
        limit: u64,
        what: &str,
    ) -> Result<Staged<'_>, ImageError> {
        let tmp = temp_path(&self.blobs, "blob");
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| ImageError::io(format!("creating {}", tmp.display()), e))?;
        let mut staged = Staged {
            writer: self,
            tmp,
            digest: String::new(),
            size: 0,
            committed: false,
        };
        let mut out = HashingWriter::new(BufWriter::with_capacity(COPY_BUFFER, file));
        io::copy(&mut reader.take(limit), &mut out)
            .map_err(|e| ImageError::io(format!("copying {what}"), e))?;
        let (buffered, hex, size) = out.finish();
        let io_err = |e| ImageError::io(format!("writing {}", staged.tmp.display()), e);
        let file = buffered.into_inner().map_err(|e| io_err(e.into_error()))?;
        file.sync_all().map_err(io_err)?;
        staged.digest = format!("sha256:{hex}");
        staged.size = size;
        Ok(staged)
    }

    /// Stores the blob `reader` yields, which must have digest `expected` (and size
    /// `expected_size`, when known): refused, naming `what`, otherwise. A blob the layout
    /// already has is not written again, but the source is still read and verified.
    fn put(
        &self,
        reader: &mut dyn Read,
        expected: &str,
        expected_size: Option<u64>,
        what: &str,
    ) -> Result<u64, ImageError> {
        let hex = match expected.strip_prefix("sha256:") {
            Some(h) if is_sha256_hex(h) => h,
            _ => return Err(ImageError::UnsupportedDigest(expected.to_owned())),
        };
        // One byte more than promised is enough to detect an oversized blob.
        let limit = expected_size.map_or(u64::MAX, |s| s.saturating_add(1));
        let check = |digest: &str, size: u64| -> Result<(), ImageError> {
            if let Some(e) = expected_size
                && e != size
            {
                return Err(ImageError::SizeMismatch {
                    what: what.to_owned(),
                    expected: e,
                    actual: size,
                });
            }
            if digest != expected {
                return Err(ImageError::DigestMismatch {
                    what: what.to_owned(),
                    expected: expected.to_owned(),
                    actual: digest.to_owned(),
                });
            }
            Ok(())
        };
        let existing = fs::symlink_metadata(self.blobs.join(hex));
        if existing.is_ok_and(|m| m.is_file() && expected_size.is_none_or(|s| m.len() == s)) {
            let hashing = HashingReader::new(reader.take(limit));
            let (actual, size) = hashing
                .finish()
                .map_err(|e| ImageError::io(format!("reading {what}"), e))?;
            check(&format!("sha256:{actual}"), size)?;
            return Ok(size);
        }
        let staged = self.stage(reader, limit, what)?;
        check(&staged.digest, staged.size)?;
        let size = staged.size;
        staged.commit()?;
        Ok(size)
    }

    /// Lists a manifest in `index.json` under `ref_name` (crate::layout_index).
    fn add_to_index(
        &self,
        media_type: &str,
        digest: &str,
        size: u64,
        ref_name: &str,
    ) -> Result<(), ImageError> {
        crate::layout_index::list_manifest(&self.dir, media_type, digest, size, ref_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_names() {
        assert_eq!(
            member_name(&[], "./blobs//sha256/x").as_deref(),
            Some("blobs/sha256/x")
        );
        assert_eq!(member_name(&["a"], "../b.tar").as_deref(), Some("b.tar"));
        assert_eq!(member_name(&["a"], "/c").as_deref(), Some("c"));
        assert_eq!(member_name(&[], "../x"), None);
        assert_eq!(member_name(&[], "."), None);
    }

    #[test]
    fn digests_in_names() {
        let h = "a".repeat(64);
        assert_eq!(
            digest_in_name(&format!("{h}.json")),
            Some(format!("sha256:{h}"))
        );
        assert_eq!(
            digest_in_name(&format!("blobs/sha256/{h}")),
            Some(format!("sha256:{h}"))
        );
        assert_eq!(digest_in_name(&format!("{h}/layer.tar")), None);
        assert_eq!(digest_in_name("config.json"), None);
    }
}
