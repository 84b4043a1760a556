//! A deterministic newc initramfs writer.
//!
//! Entries are collected first and written sorted by path, so the archive depends only on
//! what was added, never on insertion order, timestamps or the host's owners: mtime 0,
//! uid/gid 0, inode numbers 1, 2, 3... in output order. Missing parent directories are
//! added as 0755 directories; since a parent path is a prefix of its children's paths,
//! byte order places every parent before its children.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use ::cpio::newc::{Builder as EntryBuilder, ModeFileType, trailer};

/// Errors from adding entries to an [`InitramfsBuilder`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CpioError {
    /// The archive path is empty, contains `..`, or is not UTF-8.
    #[error("invalid initramfs path {path:?}: {reason}")]
    InvalidPath {
        /// The path as given.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Reading a host file or directory failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// `add_tree` found something other than a file, directory or symlink.
    #[error(
        "{path}: unsupported file type for an initramfs tree (only files, directories and symlinks)"
    )]
    Unsupported {
        /// The host path.
        path: PathBuf,
    },
}

/// Compression for [`InitramfsBuilder::write_compressed`]. The Debian kernel supports both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// zstd level 3, single-threaded, with a content checksum.
    Zstd,
    /// gzip (deflate level 6) with a zero header timestamp.
    Gzip,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Data {
    Bytes(Vec<u8>),
    Path(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir { mode: u32 },
    File { mode: u32, data: Data },
    Symlink { target: String },
    CharDevice { mode: u32, major: u32, minor: u32 },
}

/// Collects initramfs entries and writes them as a reproducible newc archive.
///
/// Adding a path twice keeps the last entry. Modes are permission bits (`0o755`); the file
/// type bits are set by the method used.
#[derive(Debug, Clone, Default)]
pub struct InitramfsBuilder {
    entries: BTreeMap<String, Node>,
}

/// Turns a path into the archive form: relative, `/`-separated, no `.` or `..`.
fn archive_path(path: &Path) -> Result<String, CpioError> {
    let invalid = |reason| CpioError::InvalidPath {
        path: path.to_owned(),
        reason,
    };
    let mut parts = Vec::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(s) => parts.push(s.to_str().ok_or_else(|| invalid("not UTF-8"))?),
            Component::ParentDir => return Err(invalid("contains ..")),
            Component::Prefix(_) => return Err(invalid("has a prefix")),
        }
    }
    if parts.is_empty() {
        return Err(invalid("names the archive root"));
    }
    Ok(parts.join("/"))
}

fn io_err(context: impl Into<String>, source: io::Error) -> CpioError {
    CpioError::Io {
        context: context.into(),
        source,
    }
}

impl InitramfsBuilder {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    fn insert(&mut self, path: impl AsRef<Path>, node: Node) -> Result<&mut Self, CpioError> {
        self.entries.insert(archive_path(path.as_ref())?, node);
        Ok(self)
    }

    /// Adds a directory.
    pub fn add_dir(&mut self, path: impl AsRef<Path>, mode: u32) -> Result<&mut Self, CpioError> {
        self.insert(
            path,
            Node::Dir {
                mode: mode & 0o7777,
            },
        )
    }

    /// Adds a regular file with the given contents.
    pub fn add_file_from_bytes(
        &mut self,
        path: impl AsRef<Path>,
        mode: u32,
        data: Vec<u8>,
    ) -> Result<&mut Self, CpioError> {
        self.insert(
            path,
            Node::File {
                mode: mode & 0o7777,
                data: Data::Bytes(data),
            },
        )
    }

    /// Adds a regular file whose contents are read from `src` when the archive is written.
    pub fn add_file_from_path(
        &mut self,
        path: impl AsRef<Path>,
        mode: u32,
        src: &Path,
    ) -> Result<&mut Self, CpioError> {
        self.insert(
            path,
            Node::File {
                mode: mode & 0o7777,
                data: Data::Path(src.to_owned()),
            },
        )
    }

    /// Adds a symbolic link pointing at `target`.
    pub fn add_symlink(
        &mut self,
        path: impl AsRef<Path>,
        target: impl AsRef<Path>,
    ) -> Result<&mut Self, CpioError> {
        let target = target.as_ref();
        let target = target
            .to_str()
            .ok_or_else(|| CpioError::InvalidPath {
                path: target.to_owned(),
                reason: "symlink target is not UTF-8",
            })?
            .to_owned();
        self.insert(path, Node::Symlink { target })
    }

    /// Adds a character device node, e.g. `dev/console` (5, 1) with mode 0o600.
    pub fn add_char_device(
        &mut self,
        path: impl AsRef<Path>,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<&mut Self, CpioError> {
        self.insert(
            path,
            Node::CharDevice {
                mode: mode & 0o7777,
                major,
                minor,
            },
        )
    }

    /// Adds the host directory `src_dir` recursively under `dest_prefix` (which may be `/`
    /// for the archive root). Files and directories keep their permission bits and
    /// symlinks stay symlinks; owners are always 0:0. File contents are read at write time.
    pub fn add_tree(
        &mut self,
        dest_prefix: impl AsRef<Path>,
        src_dir: &Path,
    ) -> Result<&mut Self, CpioError> {
        let dest = dest_prefix.as_ref();
        let meta = fs::metadata(src_dir)
            .map_err(|e| io_err(format!("reading {}", src_dir.display()), e))?;
        if !meta.is_dir() {
            return Err(io_err(
                format!("adding tree {}", src_dir.display()),
                io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
            ));
        }
        // The prefix itself is a directory entry, unless it is the archive root.
        if !dest
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::CurDir))
        {
            self.add_dir(dest, meta.permissions().mode())?;
        }
        self.add_tree_inner(dest, src_dir)?;
        Ok(self)
    }

    fn add_tree_inner(&mut self, dest: &Path, src: &Path) -> Result<(), CpioError> {
        let entries =
            fs::read_dir(src).map_err(|e| io_err(format!("reading {}", src.display()), e))?;
        for e in entries {
            let e = e.map_err(|e| io_err(format!("reading {}", src.display()), e))?;
            let path = e.path();
            let meta = fs::symlink_metadata(&path)
                .map_err(|e| io_err(format!("inspecting {}", path.display()), e))?;
            let target = dest.join(e.file_name());
            let ft = meta.file_type();
            if ft.is_dir() {
                self.add_dir(&target, meta.permissions().mode())?;
                self.add_tree_inner(&target, &path)?;
            } else if ft.is_file() {
                self.add_file_from_path(&target, meta.permissions().mode(), &path)?;
            } else if ft.is_symlink() {
                let link = fs::read_link(&path)
                    .map_err(|e| io_err(format!("reading link {}", path.display()), e))?;
                self.add_symlink(&target, link)?;
            } else {
                return Err(CpioError::Unsupported { path });
            }
        }
        Ok(())
    }

    /// Writes the archive (entries sorted by path, then the trailer).
    pub fn write<W: Write>(self, mut out: W) -> io::Result<()> {
        let mut entries = self.entries;
        let paths: Vec<String> = entries.keys().cloned().collect();
        for path in paths {
            let mut parent = path.as_str();
            while let Some((p, _)) = parent.rsplit_once('/') {
                parent = p;
                match entries.get(parent) {
                    Some(Node::Dir { .. }) => {}
                    Some(_) => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidInput,
                            format!(
                                "initramfs: {parent:?} is not a directory but {path:?} is inside it"
                            ),
                        ));
                    }
                    None => {
                        entries.insert(parent.to_owned(), Node::Dir { mode: 0o755 });
                    }
                }
            }
        }

        for (i, (path, node)) in entries.into_iter().enumerate() {
            let ino = u32::try_from(i + 1).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, "too many initramfs entries")
            })?;
            let header = EntryBuilder::new(&path).ino(ino).uid(0).gid(0).mtime(0);
            match node {
                Node::Dir { mode } => {
                    let w = header
                        .mode(mode)
                        .set_mode_file_type(ModeFileType::Directory)
                        .nlink(2)
                        .write(&mut out, 0);
                    w.finish()?;
                }
                Node::Symlink { target } => {
                    let mut w = header
                        .mode(0o777)
                        .set_mode_file_type(ModeFileType::Symlink)
                        .write(&mut out, len32(target.len() as u64, &path)?);
                    w.write_all(target.as_bytes())?;
                    w.finish()?;
                }
                Node::CharDevice { mode, major, minor } => {
                    let w = header
                        .mode(mode)
                        .set_mode_file_type(ModeFileType::Char)
                        .rdev_major(major)
                        .rdev_minor(minor)
                        .write(&mut out, 0);
                    w.finish()?;
                }
                Node::File { mode, data } => {
                    let header = header.mode(mode).set_mode_file_type(ModeFileType::Regular);
                    match data {
                        Data::Bytes(bytes) => {
                            let mut w = header.write(&mut out, len32(bytes.len() as u64, &path)?);
                            w.write_all(&bytes)?;
                            w.finish()?;
                        }
                        Data::Path(src) => {
                            let file = fs::File::open(&src).map_err(|e| annotate(e, &src))?;
                            let len = file.metadata().map_err(|e| annotate(e, &src))?.len();
                            let mut w = header.write(&mut out, len32(len, &path)?);
                            let copied = io::copy(&mut file.take(len), &mut w)
                                .map_err(|e| annotate(e, &src))?;
                            if copied != len {
                                return Err(io::Error::new(
                                    io::ErrorKind::UnexpectedEof,
                                    format!("{} shrank while being archived", src.display()),
                                ));
                            }
                            w.finish()?;
                        }
                    }
                }
            }
        }
        trailer(&mut out)?;
        out.flush()
    }

    /// Writes the archive compressed. The output is as reproducible as the archive: zstd
    /// runs single-threaded and records no time, gzip's header timestamp is zero.
    pub fn write_compressed(self, out: impl Write, compression: Compression) -> io::Result<()> {
        match compression {
            Compression::Zstd => {
                let mut enc = zstd::stream::write::Encoder::new(out, 3)?;
                enc.include_checksum(true)?;
                self.write(&mut enc)?;
                enc.finish()?.flush()
            }
            Compression::Gzip => {
                let mut enc = flate2::GzBuilder::new()
                    .mtime(0)
                    .operating_system(3)
                    .write(out, flate2::Compression::new(6));
                self.write(&mut enc)?;
                enc.finish()?.flush()
            }
        }
    }
}

fn len32(len: u64, path: &str) -> io::Result<u32> {
    u32::try_from(len).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{path}: {len} bytes is too large for newc cpio (4 GiB limit)"),
        )
    })
}

fn annotate(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::cpio::newc::Reader;

    struct Parsed {
        name: String,
        ino: u32,
        mode: u32,
        uid: u32,
        mtime: u32,
        rdev: (u32, u32),
        data: Vec<u8>,
    }

    fn parse(mut archive: &[u8]) -> Vec<Parsed> {
        let mut out = Vec::new();
        loop {
            let mut r = Reader::new(archive).unwrap();
            if r.entry().is_trailer() {
                break;
            }
            let e = r.entry();
            let mut p = Parsed {
                name: e.name().to_owned(),
                ino: e.ino(),
                mode: e.mode(),
                uid: e.uid(),
                mtime: e.mtime(),
                rdev: (e.rdev_major(), e.rdev_minor()),
                data: Vec::new(),
            };
            r.read_to_end(&mut p.data).unwrap();
            out.push(p);
            archive = r.finish().unwrap();
        }
        out
    }

    fn sample(order_reversed: bool) -> InitramfsBuilder {
        type Step = fn(&mut InitramfsBuilder);
        let mut steps: Vec<Step> = vec![
            |b| {
                b.add_file_from_bytes("/init", 0o755, b"#!init".to_vec())
                    .unwrap();
            },
            |b| {
                b.add_char_device("dev/console", 0o600, 5, 1).unwrap();
            },
            |b| {
                b.add_file_from_bytes("lib/modules/6.1/kernel/virtio.ko", 0o644, b"ko".to_vec())
                    .unwrap();
            },
            |b| {
                b.add_symlink("bin/sh", "busybox").unwrap();
            },
            |b| {
                b.add_dir("tmp", 0o1777).unwrap();
            },
        ];
        if order_reversed {
            steps.reverse();
        }
        let mut b = InitramfsBuilder::new();
        for s in steps {
            s(&mut b);
        }
        b
    }

    #[test]
    fn sorted_with_parents_and_sequential_inodes() {
        let mut out = Vec::new();
        sample(false).write(&mut out).unwrap();
        let entries = parse(&out);
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/sh",
                "dev",
                "dev/console",
                "init",
                "lib",
                "lib/modules",
                "lib/modules/6.1",
                "lib/modules/6.1/kernel",
                "lib/modules/6.1/kernel/virtio.ko",
                "tmp"
            ]
        );
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(e.ino, i as u32 + 1);
            assert_eq!((e.uid, e.mtime), (0, 0));
        }
        let by = |n: &str| entries.iter().find(|e| e.name == n).unwrap();
        assert_eq!(by("lib").mode, 0o040755);
        assert_eq!(by("tmp").mode, 0o041777);
        assert_eq!(by("init").mode, 0o100755);
        assert_eq!(by("init").data, b"#!init");
        assert_eq!(by("bin/sh").mode, 0o120777);
        assert_eq!(by("bin/sh").data, b"busybox");
        let console = by("dev/console");
        assert_eq!(console.mode, 0o020600);
        assert_eq!(console.rdev, (5, 1));
        assert!(console.data.is_empty());
    }

    #[test]
    fn deterministic_across_insertion_order_and_compression() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        sample(false).write(&mut a).unwrap();
        sample(true).write(&mut b).unwrap();
        assert_eq!(a, b);
        for c in [Compression::Zstd, Compression::Gzip] {
            let mut ca = Vec::new();
            let mut cb = Vec::new();
            sample(false).write_compressed(&mut ca, c).unwrap();
            sample(true).write_compressed(&mut cb, c).unwrap();
            assert_eq!(ca, cb, "{c:?}");
            let plain = match c {
                Compression::Zstd => zstd::stream::decode_all(&ca[..]).unwrap(),
                Compression::Gzip => {
                    let mut v = Vec::new();
                    flate2::read::GzDecoder::new(&ca[..])
                        .read_to_end(&mut v)
                        .unwrap();
                    v
                }
            };
            assert_eq!(plain, a);
        }
    }

    #[test]
    fn add_tree_keeps_modes_and_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(src.join("sub")).unwrap();
        fs::write(src.join("run.sh"), b"echo").unwrap();
        fs::set_permissions(src.join("run.sh"), fs::Permissions::from_mode(0o750)).unwrap();
        fs::write(src.join("sub/data"), b"d").unwrap();
        fs::set_permissions(src.join("sub/data"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::set_permissions(src.join("sub"), fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink("../run.sh", src.join("sub/link")).unwrap();

        let mut b = InitramfsBuilder::new();
        b.add_tree("/opt/app", &src).unwrap();
        let mut out = Vec::new();
        b.write(&mut out).unwrap();
        let entries = parse(&out);
        let by = |n: &str| {
            entries
                .iter()
                .find(|e| e.name == n)
                .unwrap_or_else(|| panic!("{n}"))
        };
        assert_eq!(by("opt").mode, 0o040755);
        assert_eq!(by("opt/app/run.sh").mode, 0o100750);
        assert_eq!(by("opt/app/run.sh").data, b"echo");
        assert_eq!(by("opt/app/sub").mode, 0o040700);
        assert_eq!(by("opt/app/sub/data").mode, 0o100600);
        assert_eq!(by("opt/app/sub/link").mode, 0o120777);
        assert_eq!(by("opt/app/sub/link").data, b"../run.sh");

        // The archive root as prefix.
        let mut b = InitramfsBuilder::new();
        b.add_tree("/", &src).unwrap();
        let mut out = Vec::new();
        b.write(&mut out).unwrap();
        assert_eq!(parse(&out)[0].name, "run.sh");
    }

    #[test]
    fn rejects_bad_paths_and_file_parents() {
        let mut b = InitramfsBuilder::new();
        assert!(matches!(
            b.add_dir("../x", 0o755),
            Err(CpioError::InvalidPath { .. })
        ));
        assert!(matches!(
            b.add_dir("/", 0o755),
            Err(CpioError::InvalidPath { .. })
        ));
        b.add_file_from_bytes("f", 0o644, vec![]).unwrap();
        b.add_file_from_bytes("f/g", 0o644, vec![]).unwrap();
        let err = b.write(Vec::new()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
