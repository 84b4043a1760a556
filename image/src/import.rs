//! Creating an OCI image layout from local content, like `docker import`.
//!
//! The output is reproducible: layer tars list entries sorted by path with mtime 0,
//! owner 0:0 and empty user/group names; gzip headers carry no timestamp; the config has
//! no `created` time. The same inputs therefore give a bit-identical layout, and so the
//! same manifest digest. Every file lands in the output directory through a temporary
//! file and a rename.

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, Digest, ImageConfigurationBuilder, ImageManifestBuilder,
    MediaType, Os, RootFsBuilder,
};

use crate::ImageError;
use crate::digest::{HashingWriter, sha256_digest};

/// Where the content of one layer comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerSource {
    /// A host directory; its contents become the layer root.
    Dir(PathBuf),
    /// A tar archive (`.tar`, or gzip-compressed `.tar.gz` / `.tgz`), used entry for entry.
    Tar(PathBuf),
    /// A static busybox binary, expanded into a minimal root filesystem.
    Busybox(PathBuf),
}

/// The runtime defaults recorded in the image config (Entrypoint, Cmd, Env, WorkingDir,
/// User): the host file's `[images.NAME]` keys, one type for both.
pub type ImageConfigSpec = keel_config::ImageDefaults;

/// What [`import`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedImage {
    /// `sha256:<hex>` of the manifest.
    pub manifest_digest: String,
    /// Number of layers.
    pub layers: usize,
    /// Total bytes of the image's blobs (compressed layers, config and manifest).
    pub size: u64,
}

/// Writes an OCI image layout to `out_dir` with one gzip layer per source, bottom first.
///
/// `ref_name` becomes the manifest's `org.opencontainers.image.ref.name` annotation. An
/// existing `index.json` in `out_dir` is replaced; existing blobs are kept.
pub fn import(
    sources: &[LayerSource],
    config: &ImageConfigSpec,
    ref_name: Option<&str>,
    out_dir: &Path,
) -> Result<ImportedImage, ImageError> {
    let blobs = out_dir.join("blobs").join("sha256");
    fs::create_dir_all(&blobs)
        .map_err(|e| ImageError::io(format!("creating {}", blobs.display()), e))?;

    let mut layer_descs = Vec::with_capacity(sources.len());
    let mut diff_ids = Vec::with_capacity(sources.len());
    let mut size = 0u64;
    for source in sources {
        let layer = match source {
            LayerSource::Dir(dir) => {
                let entries = collect_dir(dir)?;
                write_layer(&blobs, |w| emit_entries(w, &entries))?
            }
            LayerSource::Busybox(bin) => {
                let entries = busybox_entries(bin)?;
                write_layer(&blobs, |w| emit_entries(w, &entries))?
            }
            LayerSource::Tar(path) => write_layer(&blobs, |w| copy_tar(w, path))?,
        };
        size += layer.size;
        diff_ids.push(layer.diff_id);
        layer_descs.push(Descriptor::new(
            MediaType::ImageLayerGzip,
            layer.size,
            Digest::from_str(&layer.digest)?,
        ));
    }

    let mut exec = ConfigBuilder::default();
    if let Some(e) = &config.entrypoint {
        exec = exec.entrypoint(e.clone());
    }
    if let Some(c) = &config.cmd {
        exec = exec.cmd(c.clone());
    }
    if !config.env.is_empty() {
        exec = exec.env(config.env.clone());
    }
    if let Some(w) = &config.workdir {
        exec = exec.working_dir(w.clone());
    }
    if let Some(u) = &config.user {
        exec = exec.user(u.clone());
    }
    let image_config = ImageConfigurationBuilder::default()
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .config(exec.build()?)
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(diff_ids)
                .build()?,
        )
        .build()?;
    let config_json = to_json(&image_config, "image config")?;
    let config_digest = write_blob(&blobs, &config_json)?;
    size += config_json.len() as u64;

    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(Descriptor::new(
            MediaType::ImageConfig,
            config_json.len() as u64,
            Digest::from_str(&config_digest)?,
        ))
        .layers(layer_descs)
        .build()?;
    let manifest_json = to_json(&manifest, "image manifest")?;
    let manifest_digest = write_blob(&blobs, &manifest_json)?;
    size += manifest_json.len() as u64;

    crate::layout_index::new_index(
        out_dir,
        crate::layout::MEDIA_TYPE_MANIFEST,
        &manifest_digest,
        manifest_json.len() as u64,
        ref_name,
    )?;

    Ok(ImportedImage {
        manifest_digest,
        layers: sources.len(),
        size,
    })
}

fn to_json<T: serde::Serialize>(value: &T, what: &str) -> Result<Vec<u8>, ImageError> {
    serde_json::to_vec(value).map_err(|e| ImageError::Json {
        what: what.to_owned(),
        source: e,
    })
}

/// A temp name unique within this process (and, by the pid, across processes).
fn temp_path(dir: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".tmp-{}-{n}", std::process::id()))
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<(), ImageError> {
    crate::atomic::write_atomic(path, data, 0o644)
        .map_err(|e| ImageError::io(format!("writing {}", path.display()), e))
}

/// Stores a blob under its digest and returns the digest.
fn write_blob(blobs: &Path, data: &[u8]) -> Result<String, ImageError> {
    let digest = sha256_digest(data);
    write_atomic(&blobs.join(&digest["sha256:".len()..]), data)?;
    Ok(digest)
}

struct LayerBlob {
    digest: String,
    diff_id: String,
    size: u64,
}

/// Runs `emit` to produce an uncompressed tar stream and stores it gzip-compressed,
/// hashing both the tar (diff_id) and the blob (digest) on the way.
fn write_layer(
    blobs: &Path,
    emit: impl FnOnce(&mut dyn Write) -> Result<(), ImageError>,
) -> Result<LayerBlob, ImageError> {
    let tmp = temp_path(blobs);
    let result = (|| {
        let file = fs::File::create(&tmp)
            .map_err(|e| ImageError::io(format!("creating {}", tmp.display()), e))?;
        let compressed = HashingWriter::new(BufWriter::new(file));
        let gz = flate2::GzBuilder::new()
            .mtime(0)
            .operating_system(3)
            .write(compressed, flate2::Compression::new(6));
        let mut plain = HashingWriter::new(gz);
        emit(&mut plain)?;
        let (gz, diff_hex, _) = plain.finish();
        let io_err = |e| ImageError::io(format!("writing {}", tmp.display()), e);
        let (buffered, digest_hex, size) = gz.finish().map_err(io_err)?.finish();
        let file = buffered.into_inner().map_err(|e| io_err(e.into_error()))?;
        file.sync_all().map_err(io_err)?;
        let dest = blobs.join(&digest_hex);
        fs::rename(&tmp, &dest)
            .map_err(|e| ImageError::io(format!("renaming to {}", dest.display()), e))?;
        Ok(LayerBlob {
            digest: format!("sha256:{digest_hex}"),
            diff_id: format!("sha256:{diff_hex}"),
            size,
        })
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

enum Content {
    Dir,
    File(PathBuf),
    Bytes(Vec<u8>),
    Symlink(PathBuf),
    HardLink(PathBuf),
    Device(tar::EntryType, u32, u32),
}

struct TreeEntry {
    path: PathBuf,
    mode: u32,
    content: Content,
}

/// Walks `root` into entries sorted by path bytes. Files with several links inside the
/// tree become hard links to the first path in that order.
fn collect_dir(root: &Path) -> Result<Vec<TreeEntry>, ImageError> {
    let meta =
        fs::metadata(root).map_err(|e| ImageError::io(format!("reading {}", root.display()), e))?;
    if !meta.is_dir() {
        return Err(ImageError::BadSource {
            path: root.to_owned(),
            reason: "not a directory".into(),
        });
    }
    let mut found = Vec::new();
    walk(root, Path::new(""), &mut found)?;
    found.sort_by(|a, b| {
        a.0.path
            .as_os_str()
            .as_bytes()
            .cmp(b.0.path.as_os_str().as_bytes())
    });
    let mut first_link: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut out = Vec::with_capacity(found.len());
    for (mut entry, inode) in found {
        if let Some(key) = inode {
            if let Some(first) = first_link.get(&key) {
                entry.content = Content::HardLink(first.clone());
            } else {
                first_link.insert(key, entry.path.clone());
            }
        }
        out.push(entry);
    }
    Ok(out)
}

type Found = (TreeEntry, Option<(u64, u64)>);

fn walk(root: &Path, rel: &Path, out: &mut Vec<Found>) -> Result<(), ImageError> {
    let dir = root.join(rel);
    let entries =
        fs::read_dir(&dir).map_err(|e| ImageError::io(format!("reading {}", dir.display()), e))?;
    for e in entries {
        let e = e.map_err(|e| ImageError::io(format!("reading {}", dir.display()), e))?;
        let host = e.path();
        let meta = fs::symlink_metadata(&host)
            .map_err(|e| ImageError::io(format!("inspecting {}", host.display()), e))?;
        let path = rel.join(e.file_name());
        let mode = meta.permissions().mode() & 0o7777;
        let ft = meta.file_type();
        let dev = || (rdev_major(meta.rdev()), rdev_minor(meta.rdev()));
        let (content, inode) = if ft.is_dir() {
            walk(root, &path, out)?;
            (Content::Dir, None)
        } else if ft.is_file() {
            let inode = (meta.nlink() > 1).then(|| (meta.dev(), meta.ino()));
            (Content::File(host), inode)
        } else if ft.is_symlink() {
            let target = fs::read_link(&host)
                .map_err(|e| ImageError::io(format!("reading link {}", host.display()), e))?;
            (Content::Symlink(target), None)
        } else if ft.is_char_device() {
            let (ma, mi) = dev();
            (Content::Device(tar::EntryType::Char, ma, mi), None)
        } else if ft.is_block_device() {
            let (ma, mi) = dev();
            (Content::Device(tar::EntryType::Block, ma, mi), None)
        } else if ft.is_fifo() {
            (Content::Device(tar::EntryType::Fifo, 0, 0), None)
        } else {
            // Sockets cannot be archived; like docker, leave them out.
            continue;
        };
        out.push((
            TreeEntry {
                path,
                mode,
                content,
            },
            inode,
        ));
    }
    Ok(())
}

fn rdev_major(dev: u64) -> u32 {
    (((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff)) as u32
}

fn rdev_minor(dev: u64) -> u32 {
    (((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff)) as u32
}

/// A minimal busybox root: the binary, one symlink per applet, passwd and group.
fn busybox_entries(bin: &Path) -> Result<Vec<TreeEntry>, ImageError> {
    let bad = |reason: String| ImageError::BadSource {
        path: bin.to_owned(),
        reason,
    };
    let out = Command::new(bin)
        .arg("--list")
        .output()
        .map_err(|e| bad(format!("cannot run `--list`: {e}")))?;
    if !out.status.success() {
        return Err(bad(format!("`--list` failed: {}", out.status)));
    }
    let list =
        String::from_utf8(out.stdout).map_err(|_| bad("`--list` printed non-UTF-8".into()))?;
    let mut applets: Vec<&str> = list
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox")
        .collect();
    if let Some(bad_name) = applets
        .iter()
        .find(|a| a.contains('/') || **a == "." || **a == "..")
    {
        return Err(bad(format!(
            "`--list` printed an invalid applet name {bad_name:?}"
        )));
    }
    if applets.is_empty() {
        return Err(bad("`--list` printed no applets; is this busybox?".into()));
    }
    applets.sort_unstable();
    applets.dedup();

    let dir = |p: &str, mode| TreeEntry {
        path: PathBuf::from(p),
        mode,
        content: Content::Dir,
    };
    let mut entries = vec![
        dir("bin", 0o755),
        dir("dev", 0o755),
        dir("etc", 0o755),
        dir("proc", 0o755),
        dir("root", 0o700),
        dir("sys", 0o755),
        dir("tmp", 0o1777),
        dir("var", 0o755),
        TreeEntry {
            path: PathBuf::from("bin/busybox"),
            mode: 0o755,
            content: Content::File(bin.to_owned()),
        },
        TreeEntry {
            path: PathBuf::from("etc/passwd"),
            mode: 0o644,
            content: Content::Bytes(
                b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n".to_vec(),
            ),
        },
        TreeEntry {
            path: PathBuf::from("etc/group"),
            mode: 0o644,
            content: Content::Bytes(b"root:x:0:\nnogroup:x:65534:\n".to_vec()),
        },
    ];
    entries.extend(applets.into_iter().map(|a| TreeEntry {
        path: Path::new("bin").join(a),
        mode: 0o777,
        content: Content::Symlink(PathBuf::from("busybox")),
    }));
    entries.sort_by(|a, b| {
        a.path
            .as_os_str()
            .as_bytes()
            .cmp(b.path.as_os_str().as_bytes())
    });
    Ok(entries)
}

/// Reads exactly `remaining` bytes, failing instead of silently archiving a file that
/// shrank while being read (which would corrupt the tar stream).
struct Exact<R> {
    inner: R,
    remaining: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let cap = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..cap])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while being archived",
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

fn emit_entries(w: &mut dyn Write, entries: &[TreeEntry]) -> Result<(), ImageError> {
    let mut tar = tar::Builder::new(w);
    for e in entries {
        let err = |err: io::Error| ImageError::io(format!("archiving {}", e.path.display()), err);
        let mut h = tar::Header::new_gnu();
        h.set_mode(e.mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(0);
        match &e.content {
            Content::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                tar.append_data(&mut h, &e.path, io::empty()).map_err(err)?;
            }
            Content::Bytes(data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                tar.append_data(&mut h, &e.path, &data[..]).map_err(err)?;
            }
            Content::File(src) => {
                let file = fs::File::open(src)
                    .map_err(|x| ImageError::io(format!("opening {}", src.display()), x))?;
                let len = file
                    .metadata()
                    .map_err(|x| ImageError::io(format!("inspecting {}", src.display()), x))?
                    .len();
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(len);
                let data = Exact {
                    inner: BufReader::new(file),
                    remaining: len,
                };
                tar.append_data(&mut h, &e.path, data).map_err(err)?;
            }
            Content::Symlink(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                tar.append_link(&mut h, &e.path, target).map_err(err)?;
            }
            Content::HardLink(target) => {
                h.set_entry_type(tar::EntryType::Link);
                tar.append_link(&mut h, &e.path, target).map_err(err)?;
            }
            Content::Device(kind, major, minor) => {
                h.set_entry_type(*kind);
                h.set_device_major(*major).map_err(err)?;
                h.set_device_minor(*minor).map_err(err)?;
                tar.append_data(&mut h, &e.path, io::empty()).map_err(err)?;
            }
        }
    }
    tar.into_inner()
        .map_err(|e| ImageError::io("finishing layer tar", e))?;
    Ok(())
}

/// Passes everything read through to a writer.
struct Tee<'a, R> {
    inner: R,
    out: &'a mut dyn Write,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.out.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// Copies a tar archive byte for byte (decompressing gzip), so every entry keeps its
/// original order and metadata, while parsing it to make sure it is a well-formed tar.
fn copy_tar(w: &mut dyn Write, path: &Path) -> Result<(), ImageError> {
    let bad = |reason: String| ImageError::BadSource {
        path: path.to_owned(),
        reason,
    };
    let file = fs::File::open(path)
        .map_err(|e| ImageError::io(format!("opening {}", path.display()), e))?;
    let mut reader = BufReader::new(file);
    // Sniff instead of trusting the extension: `.tar` files are sometimes gzip.
    let gzip = io::BufRead::fill_buf(&mut reader)
        .map_err(|e| ImageError::io(format!("reading {}", path.display()), e))?
        .starts_with(&[0x1f, 0x8b]);
    let input: Box<dyn Read> = if gzip {
        Box::new(flate2::read::MultiGzDecoder::new(reader))
    } else {
        Box::new(reader)
    };
    let mut archive = tar::Archive::new(Tee {
        inner: input,
        out: w,
    });
    let mut count = 0u64;
    for entry in archive
        .entries()
        .map_err(|e| bad(format!("not a tar archive: {e}")))?
    {
        entry.map_err(|e| bad(format!("bad tar entry: {e}")))?;
        count += 1;
    }
    if count == 0 {
        return Err(bad("empty or not a tar archive".into()));
    }
    // The end-of-archive blocks and any record padding belong to the layer too.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(|e| bad(format!("reading tar trailer: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{ImageLayout, MEDIA_TYPE_LAYER_GZIP};

    fn layer_entries(path: &Path) -> Vec<(String, tar::EntryType, tar::Header, Vec<u8>)> {
        let f = fs::File::open(path).unwrap();
        let mut a = tar::Archive::new(flate2::read::GzDecoder::new(f));
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let name = String::from_utf8(e.path_bytes().into_owned()).unwrap();
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (name, e.header().entry_type(), e.header().clone(), data)
            })
            .collect()
    }

    fn sample_dir(root: &Path) {
        fs::create_dir_all(root.join("sub/deeper")).unwrap();
        fs::write(root.join("hello.txt"), b"hello").unwrap();
        fs::set_permissions(root.join("hello.txt"), fs::Permissions::from_mode(0o640)).unwrap();
        fs::write(root.join("sub/deeper/run"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(
            root.join("sub/deeper/run"),
            fs::Permissions::from_mode(0o4755),
        )
        .unwrap();
        std::os::unix::fs::symlink("hello.txt", root.join("link")).unwrap();
        fs::hard_link(root.join("hello.txt"), root.join("sub/hard.txt")).unwrap();
    }

    fn spec() -> ImageConfigSpec {
        ImageConfigSpec {
            entrypoint: Some(vec!["/bin/sh".into(), "-c".into()]),
            cmd: Some(vec!["echo hi".into()]),
            env: vec!["PATH=/bin".into(), "A=b".into()],
            workdir: Some("/srv".into()),
            user: Some("65534:65534".into()),
        }
    }

    fn all_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_owned()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push((
                        p.strip_prefix(dir).unwrap().to_owned(),
                        fs::read(&p).unwrap(),
                    ));
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn imports_dir_reproducibly_and_reads_back() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        sample_dir(&src);
        let out_a = tmp.path().join("a");
        let out_b = tmp.path().join("b");
        let sources = [LayerSource::Dir(src.clone())];
        let a = import(&sources, &spec(), Some("demo:1"), &out_a).unwrap();
        // A later mtime on the source must not change anything.
        fs::write(src.join("hello.txt"), b"hello").unwrap();
        let b = import(&sources, &spec(), Some("demo:1"), &out_b).unwrap();
        assert_eq!(a, b);
        assert_eq!(all_files(&out_a), all_files(&out_b));
        assert_eq!(a.layers, 1);
        let leftovers = all_files(&out_a)
            .into_iter()
            .filter(|(p, _)| p.to_string_lossy().contains(".tmp-"))
            .count();
        assert_eq!(leftovers, 0);

        let img = ImageLayout::open_ref(&out_a, "demo:1").unwrap();
        assert_eq!(img.manifest_digest(), a.manifest_digest);
        let cfg = img.config();
        assert_eq!(cfg.architecture().to_string(), "amd64");
        assert_eq!(cfg.os().to_string(), "linux");
        assert!(cfg.created().is_none());
        let c = cfg.config().as_ref().unwrap();
        assert_eq!(c.entrypoint().as_ref().unwrap(), &["/bin/sh", "-c"]);
        assert_eq!(c.cmd().as_ref().unwrap(), &["echo hi"]);
        assert_eq!(c.env().as_ref().unwrap(), &["PATH=/bin", "A=b"]);
        assert_eq!(c.working_dir().as_deref(), Some("/srv"));
        assert_eq!(c.user().as_deref(), Some("65534:65534"));

        let layers = img.layers();
        assert_eq!(layers.len(), 1);
        assert_eq!(layers[0].media_type, MEDIA_TYPE_LAYER_GZIP);
        let mut plain = Vec::new();
        flate2::read::GzDecoder::new(fs::File::open(&layers[0].path).unwrap())
            .read_to_end(&mut plain)
            .unwrap();
        assert_eq!(&cfg.rootfs().diff_ids()[0], &sha256_digest(&plain));
        let total: u64 = all_files(&out_a.join("blobs/sha256"))
            .iter()
            .map(|(_, d)| d.len() as u64)
            .sum();
        assert_eq!(a.size, total);

        let entries = layer_entries(&layers[0].path);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "hello.txt",
                "link",
                "sub",
                "sub/deeper",
                "sub/deeper/run",
                "sub/hard.txt"
            ]
        );
        for (name, _, h, _) in &entries {
            assert_eq!(h.mtime().unwrap(), 0, "{name}");
            assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (0, 0), "{name}");
            assert_eq!(h.username_bytes().unwrap_or_default(), b"", "{name}");
            assert_eq!(h.groupname_bytes().unwrap_or_default(), b"", "{name}");
        }
        let get = |n: &str| entries.iter().find(|e| e.0 == n).unwrap();
        assert_eq!(get("hello.txt").3, b"hello");
        assert_eq!(get("hello.txt").2.mode().unwrap(), 0o640);
        assert_eq!(get("sub/deeper/run").2.mode().unwrap(), 0o4755);
        assert_eq!(get("link").1, tar::EntryType::Symlink);
        assert_eq!(
            get("link").2.link_name_bytes().unwrap().as_ref(),
            b"hello.txt"
        );
        assert_eq!(get("sub").1, tar::EntryType::Directory);
        assert_eq!(get("sub/hard.txt").1, tar::EntryType::Link);
        assert_eq!(
            get("sub/hard.txt").2.link_name_bytes().unwrap().as_ref(),
            b"hello.txt"
        );

        // Without a ref name there is one unnamed manifest.
        let out_c = tmp.path().join("c");
        import(&sources, &ImageConfigSpec::default(), None, &out_c).unwrap();
        assert!(
            ImageLayout::open(&out_c)
                .unwrap()
                .config()
                .config()
                .as_ref()
                .unwrap()
                .env()
                .is_none()
        );
    }

    #[test]
    fn imported_layers_unpack_back_to_the_source() {
        let tmp = tempfile::Builder::new()
            .prefix("keel-import-")
            .tempdir_in("/dev/shm")
            .unwrap();
        let src = tmp.path().join("src");
        sample_dir(&src);
        let out = tmp.path().join("layout");
        import(
            &[LayerSource::Dir(src.clone())],
            &ImageConfigSpec::default(),
            None,
            &out,
        )
        .unwrap();
        let img = ImageLayout::open(&out).unwrap();
        let dirs = crate::layer_store::unpack_image(&img, &tmp.path().join("store")).unwrap();
        let root = &dirs[0];
        assert_eq!(fs::read(root.join("hello.txt")).unwrap(), b"hello");
        assert_eq!(
            fs::read_link(root.join("link")).unwrap(),
            Path::new("hello.txt")
        );
        let run = fs::metadata(root.join("sub/deeper/run")).unwrap();
        assert_eq!(run.permissions().mode() & 0o7777, 0o4755);
        assert_eq!((run.uid(), run.gid(), run.mtime()), (0, 0, 0));
        assert_eq!(
            fs::metadata(root.join("sub/hard.txt")).unwrap().ino(),
            fs::metadata(root.join("hello.txt")).unwrap().ino()
        );
    }

    #[test]
    fn imports_tar_sources_verbatim() {
        let tmp = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in [("z-last-but-first", &b"1"[..]), ("a/file", &b"2"[..])] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o600);
            h.set_mtime(12345);
            h.set_uid(1000);
            b.append_data(&mut h, name, data).unwrap();
        }
        let tar_bytes = b.into_inner().unwrap();
        fs::write(tmp.path().join("plain.tar"), &tar_bytes).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&tar_bytes).unwrap();
        fs::write(tmp.path().join("packed.tgz"), gz.finish().unwrap()).unwrap();

        let out = tmp.path().join("out");
        let sources = [
            LayerSource::Tar(tmp.path().join("plain.tar")),
            LayerSource::Tar(tmp.path().join("packed.tgz")),
        ];
        import(&sources, &ImageConfigSpec::default(), None, &out).unwrap();
        let img = ImageLayout::open(&out).unwrap();
        assert_eq!(img.layers().len(), 2);
        // Both layers are the original tar, so same diff_id and (deterministic gzip) same blob.
        let ids = img.config().rootfs().diff_ids();
        assert_eq!(ids[0], sha256_digest(&tar_bytes));
        assert_eq!(ids[1], ids[0]);
        assert_eq!(img.layers()[0].digest, img.layers()[1].digest);
        let entries = layer_entries(&img.layers()[0].path);
        assert_eq!(entries[0].0, "z-last-but-first");
        assert_eq!(entries[0].2.mtime().unwrap(), 12345);
        assert_eq!(entries[0].2.uid().unwrap(), 1000);

        fs::write(tmp.path().join("junk.tar"), vec![7u8; 2048]).unwrap();
        let r = import(
            &[LayerSource::Tar(tmp.path().join("junk.tar"))],
            &ImageConfigSpec::default(),
            None,
            &tmp.path().join("junk"),
        );
        assert!(matches!(r, Err(ImageError::BadSource { .. })), "{r:?}");
        let stray = all_files(&tmp.path().join("junk"))
            .into_iter()
            .filter(|(p, _)| p.to_string_lossy().contains(".tmp-"))
            .count();
        assert_eq!(stray, 0);
    }

    #[test]
    fn imports_busybox_rootfs() {
        let busybox = Path::new("/bin/busybox");
        if !busybox.is_file() {
            eprintln!("/bin/busybox not present; skipping");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("bb");
        let spec = ImageConfigSpec {
            cmd: Some(vec!["/bin/sh".into()]),
            ..ImageConfigSpec::default()
        };
        let sources = [LayerSource::Busybox(busybox.to_owned())];
        let first = import(&sources, &spec, Some("busybox"), &out).unwrap();
        let again = import(&sources, &spec, Some("busybox"), &tmp.path().join("bb2")).unwrap();
        assert_eq!(first.manifest_digest, again.manifest_digest);

        let img = ImageLayout::open(&out).unwrap();
        let entries = layer_entries(&img.layers()[0].path);
        let get = |n: &str| {
            entries
                .iter()
                .find(|e| e.0 == n)
                .unwrap_or_else(|| panic!("{n} missing"))
        };
        let sh = get("bin/sh");
        assert_eq!(sh.1, tar::EntryType::Symlink);
        assert_eq!(sh.2.link_name_bytes().unwrap().as_ref(), b"busybox");
        assert_eq!(get("bin/busybox").2.mode().unwrap(), 0o755);
        assert_eq!(get("bin/busybox").3, fs::read(busybox).unwrap());
        assert_eq!(get("tmp").2.mode().unwrap(), 0o1777);
        assert_eq!(get("root").2.mode().unwrap(), 0o700);
        assert!(
            String::from_utf8_lossy(&get("etc/passwd").3)
                .starts_with("root:x:0:0:root:/root:/bin/sh\n")
        );
        assert_eq!(get("etc/group").3, b"root:x:0:\nnogroup:x:65534:\n");
        for d in ["dev", "etc", "proc", "sys", "var"] {
            assert_eq!(get(d).1, tar::EntryType::Directory);
        }
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(names, sorted);
    }
}
