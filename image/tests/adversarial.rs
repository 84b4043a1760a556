//! Hostile layers (issue 6, "Store"): one test per class of attack, after containerd's
//! archive breakout tests (`TestBreakouts`), umoci's unpack tests and Docker's archive.
//!
//! Every test builds its tar by hand with the `tar` crate's low-level `Header` (raw name
//! bytes, since `set_path` refuses `..` and invalid names), unpacks it into `layer/`
//! inside a scratch directory that also holds an empty `sentinel/` and a `victim/target`
//! file, and asserts either a clear error naming the entry or a contained result — in
//! both cases nothing outside `layer/` has changed. The rules are in the documentation of
//! `keel_image::unpack`.
//!
//! These tests need root (mknod for whiteouts, trusted.* xattrs, chown) and say so when
//! they fail for lack of it; they never skip.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use keel_image::ImageError;
use keel_image::layer_store::unpack_image;
use keel_image::layout::{ImageLayout, Layer, MEDIA_TYPE_LAYER_TAR};
use keel_image::unpack::{IdShift, UnpackStats, unpack_layer, unpack_layer_shifted};
use tar::EntryType;

mod common;
use common::sha256_hex;

const ORIGINAL: &[u8] = b"original";

// ---------------------------------------------------------------------------------------
// Building hostile tars
// ---------------------------------------------------------------------------------------

/// One tar entry, written byte for byte as given.
struct E {
    kind: EntryType,
    name: Vec<u8>,
    mode: u32,
    uid: u64,
    gid: u64,
    data: Vec<u8>,
    link: Vec<u8>,
    dev: Option<(u32, u32)>,
    pax: Vec<(String, Vec<u8>)>,
}

impl E {
    fn new(kind: EntryType, name: impl AsRef<[u8]>) -> E {
        E {
            kind,
            name: name.as_ref().to_vec(),
            mode: 0o644,
            uid: 0,
            gid: 0,
            data: Vec::new(),
            link: Vec::new(),
            dev: None,
            pax: Vec::new(),
        }
    }
    fn file(name: impl AsRef<[u8]>, data: impl AsRef<[u8]>) -> E {
        E {
            data: data.as_ref().to_vec(),
            ..E::new(EntryType::Regular, name)
        }
    }
    fn dir(name: impl AsRef<[u8]>) -> E {
        E::new(EntryType::Directory, name).mode(0o755)
    }
    fn symlink(name: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> E {
        E {
            link: target.as_ref().to_vec(),
            ..E::new(EntryType::Symlink, name).mode(0o777)
        }
    }
    fn hardlink(name: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> E {
        E {
            link: target.as_ref().to_vec(),
            ..E::new(EntryType::Link, name)
        }
    }
    fn device(kind: EntryType, name: impl AsRef<[u8]>, major: u32, minor: u32) -> E {
        E {
            dev: Some((major, minor)),
            ..E::new(kind, name).mode(0o666)
        }
    }
    fn mode(mut self, mode: u32) -> E {
        self.mode = mode;
        self
    }
    fn owner(mut self, uid: u64, gid: u64) -> E {
        self.uid = uid;
        self.gid = gid;
        self
    }
    fn pax(mut self, key: &str, value: &[u8]) -> E {
        self.pax.push((key.to_owned(), value.to_vec()));
        self
    }
}

/// A tar stream of raw entries.
#[derive(Default)]
struct T(Vec<E>);

impl T {
    fn new() -> T {
        T::default()
    }
    fn e(mut self, e: E) -> T {
        self.0.push(e);
        self
    }
    fn bytes(self) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in self.0 {
            if !e.pax.is_empty() {
                let mut body = Vec::new();
                for (k, v) in &e.pax {
                    let rest = k.len() + v.len() + 3; // ' ', '=', '\n'
                    let mut len = rest + 1;
                    while len != rest + len.to_string().len() {
                        len = rest + len.to_string().len();
                    }
                    body.extend_from_slice(format!("{len} {k}=").as_bytes());
                    body.extend_from_slice(v);
                    body.push(b'\n');
                }
                let h = header(EntryType::XHeader, b"PaxHeader", 0o644, body.len() as u64);
                b.append(&h, &body[..]).unwrap();
            }
            if e.name.len() > 100 {
                long(&mut b, EntryType::GNULongName, &e.name);
            }
            if e.link.len() > 100 {
                long(&mut b, EntryType::GNULongLink, &e.link);
            }
            let mut h = header(e.kind, &e.name, e.mode, e.data.len() as u64);
            h.set_uid(e.uid);
            h.set_gid(e.gid);
            let n = e.link.len().min(100);
            let field = &mut h.as_old_mut().linkname;
            field.fill(0);
            field[..n].copy_from_slice(&e.link[..n]);
            if let Some((major, minor)) = e.dev {
                h.set_device_major(major).unwrap();
                h.set_device_minor(minor).unwrap();
            }
            h.set_cksum();
            b.append(&h, &e.data[..]).unwrap();
        }
        b.into_inner().unwrap()
    }
}

/// A GNU header whose name field holds the first 100 bytes of `name`, as they are.
fn header(kind: EntryType, name: &[u8], mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(1_000_000);
    h.set_uid(0);
    h.set_gid(0);
    let n = name.len().min(100);
    let field = &mut h.as_old_mut().name;
    field.fill(0);
    field[..n].copy_from_slice(&name[..n]);
    h.set_cksum();
    h
}

/// A GNU long name (`L`) or long link (`K`) entry carrying `value` for the next entry.
fn long(b: &mut tar::Builder<Vec<u8>>, kind: EntryType, value: &[u8]) {
    let mut data = value.to_vec();
    data.push(0);
    let h = header(kind, b"././@LongLink", 0, data.len() as u64);
    b.append(&h, &data[..]).unwrap();
}

// ---------------------------------------------------------------------------------------
// The scene: a layer dir among things that must not change
// ---------------------------------------------------------------------------------------

fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root: unpacking creates whiteout char devices (CAP_MKNOD), \
         sets trusted.overlay.* xattrs and chowns; run the suite as root"
    );
}

fn scratch() -> tempfile::TempDir {
    // tmpfs supports trusted.* xattrs for root, which opaque directories need.
    let base = Path::new("/dev/shm");
    let mut b = tempfile::Builder::new();
    b.prefix("keel-adv-");
    if base.is_dir() {
        b.tempdir_in(base).unwrap()
    } else {
        b.tempdir().unwrap()
    }
}

struct Scene {
    _dir: tempfile::TempDir,
    _blobs: tempfile::TempDir,
    outer: PathBuf,
    blobs: PathBuf,
    /// The layer directory the tar is unpacked into.
    layer: PathBuf,
    /// An empty sibling directory that must stay empty (and without xattrs).
    sentinel: PathBuf,
    /// A sibling directory holding `target`.
    victim: PathBuf,
    /// A file outside the layer whose content, mode, owner and links must not change.
    target: PathBuf,
}

impl Scene {
    fn new() -> Scene {
        require_root();
        let dir = scratch();
        let blobs = scratch();
        let outer = dir.path().to_owned();
        let layer = outer.join("layer");
        let sentinel = outer.join("sentinel");
        let victim = outer.join("victim");
        let target = victim.join("target");
        for d in [&layer, &sentinel, &victim] {
            fs::create_dir(d).unwrap();
        }
        fs::write(&target, ORIGINAL).unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o400)).unwrap();
        Scene {
            outer,
            blobs: blobs.path().to_owned(),
            _dir: dir,
            _blobs: blobs,
            layer,
            sentinel,
            victim,
            target,
        }
    }

    fn abs(&self, p: &Path) -> Vec<u8> {
        p.as_os_str().as_bytes().to_vec()
    }

    fn layer_blob(&self, tar: &[u8]) -> Layer {
        let hex = sha256_hex(tar);
        let path = self.blobs.join(&hex);
        fs::write(&path, tar).unwrap();
        Layer {
            digest: format!("sha256:{hex}"),
            media_type: MEDIA_TYPE_LAYER_TAR.to_owned(),
            path,
        }
    }

    fn unpack(&self, t: T) -> Result<UnpackStats, ImageError> {
        let layer = self.layer_blob(&t.bytes());
        unpack_layer(&layer, &self.layer)
    }

    /// Unpacks into a fresh layer dir (for several cases in one scene).
    fn unpack_fresh(&self, name: &str, t: T) -> (PathBuf, Result<UnpackStats, ImageError>) {
        let dest = self.outer.join("layers").join(name);
        fs::create_dir_all(&dest).unwrap();
        let layer = self.layer_blob(&t.bytes());
        let r = unpack_layer(&layer, &dest);
        (dest, r)
    }

    fn path(&self, rel: impl AsRef<[u8]>) -> PathBuf {
        self.layer.join(OsStr::from_bytes(rel.as_ref()))
    }

    /// Nothing outside the layer dirs changed.
    fn assert_contained(&self) {
        let names: BTreeSet<String> = fs::read_dir(&self.outer)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let expected: BTreeSet<String> = ["layer", "sentinel", "victim", "layers"]
            .into_iter()
            .map(String::from)
            .collect();
        assert!(names.is_subset(&expected), "outside the layer: {names:?}");
        assert!(
            fs::read_dir(&self.sentinel).unwrap().next().is_none(),
            "the sentinel dir got entries"
        );
        assert_eq!(xattr(&self.sentinel, "trusted.overlay.opaque"), None);
        assert_eq!(xattr(&self.victim, "trusted.overlay.opaque"), None);
        let victims: Vec<_> = fs::read_dir(&self.victim)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(victims, ["target"], "the victim dir changed");
        let m = fs::symlink_metadata(&self.target).unwrap();
        assert!(m.file_type().is_file(), "the target is no longer a file");
        assert_eq!(
            m.permissions().mode() & 0o7777,
            0o400,
            "target mode changed"
        );
        assert_eq!((m.uid(), m.gid()), (0, 0), "target owner changed");
        assert_eq!(m.nlink(), 1, "the target got a hard link");
        assert_eq!(fs::read(&self.target).unwrap(), ORIGINAL);
    }
}

fn xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = [0u8; 64];
    rustix::fs::lgetxattr(p, name, &mut buf[..])
        .ok()
        .map(|n| buf[..n].to_vec())
}

fn is_whiteout(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_char_device() && m.rdev() == 0)
}

fn exists(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok()
}

/// The unpack failed with an error that names `entry`.
#[track_caller]
fn assert_refused(r: Result<UnpackStats, ImageError>, entry: &str) -> ImageError {
    match r {
        Ok(s) => panic!("entry {entry:?} was accepted: {s:?}"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(entry),
                "the error does not name {entry:?}: {msg}"
            );
            assert!(
                matches!(
                    e,
                    ImageError::UnsafePath { .. } | ImageError::BadEntry { .. }
                ),
                "not a refusal: {e:?}"
            );
            e
        }
    }
}

// ---------------------------------------------------------------------------------------
// Symlinks: data, never followed
// ---------------------------------------------------------------------------------------

#[test]
fn symlink_absolute_and_climbing_targets_are_kept_as_data() {
    let s = Scene::new();
    let abs = s.abs(&s.target);
    s.unpack(
        T::new()
            .e(E::symlink("abs", &abs))
            .e(E::symlink("up", "../../../../../.."))
            .e(E::symlink("dangling", "/does/not/exist"))
            .e(E::dir("d"))
            .e(E::symlink("d/updown", "up/../../victim")),
    )
    .unwrap();
    assert_eq!(
        fs::read_link(s.path("abs")).unwrap().as_os_str().as_bytes(),
        abs
    );
    assert_eq!(
        fs::read_link(s.path("up")).unwrap(),
        Path::new("../../../../../..")
    );
    assert_eq!(
        fs::read_link(s.path("d/updown")).unwrap(),
        Path::new("up/../../victim")
    );
    // The symlink itself got the entry's owner, not its target.
    assert_eq!(fs::symlink_metadata(s.path("abs")).unwrap().uid(), 0);
    s.assert_contained();
}

#[test]
fn symlink_absolute_parent_is_never_followed() {
    // containerd SymlinkAbsolute: localetc -> /etc, then /localetc/unbroken.
    let s = Scene::new();
    let r = s.unpack(
        T::new()
            .e(E::symlink("localetc", s.abs(&s.victim)))
            .e(E::file("/localetc/target", "pwned")),
    );
    let e = assert_refused(r, "/localetc/target");
    assert!(e.to_string().contains("symlink"), "{e}");
    assert!(
        fs::symlink_metadata(s.path("localetc"))
            .unwrap()
            .is_symlink()
    );
    s.assert_contained();
}

#[test]
fn symlink_climbing_parent_is_never_followed() {
    // containerd SymlinkUpAndOut / umoci TestUnpackEntrySymlinkScoping.
    let s = Scene::new();
    for (i, target) in [
        "..",
        "../victim",
        "/dummy/../..",
        "../../../../../../../..",
        "/",
    ]
    .into_iter()
    .enumerate()
    {
        let (_, r) = s.unpack_fresh(
            &format!("c{i}"),
            T::new()
                .e(E::symlink("link", target))
                .e(E::file("link/victim/target", "pwned"))
                .e(E::file("link/target", "pwned")),
        );
        assert_refused(r, "link/victim/target");
    }
    s.assert_contained();
}

#[test]
fn symlink_chains_are_never_followed() {
    // containerd SymlinkMultipleAbsolute and SymlinkMultipleRelative.
    let s = Scene::new();
    let (_, r) = s.unpack_fresh(
        "abs",
        T::new()
            .e(E::dir("dummy"))
            .e(E::symlink("/dummy/etc", s.abs(&s.victim)))
            .e(E::symlink("localetc", "/dummy/etc"))
            .e(E::file("/localetc/target", "pwned")),
    );
    assert_refused(r, "/localetc/target");
    let (_, r) = s.unpack_fresh(
        "rel",
        T::new()
            .e(E::dir("dummy"))
            .e(E::symlink("/dummy/etc", s.abs(&s.victim)))
            .e(E::symlink("localetc", "./dummy/etc"))
            .e(E::file("/dummy/etc/target", "pwned")),
    );
    assert_refused(r, "/dummy/etc/target");
    s.assert_contained();
}

#[test]
fn symlink_parent_is_refused_even_when_it_stays_inside() {
    // Layer producers never write through a symlink, so extraction does not either.
    let s = Scene::new();
    let r = s.unpack(
        T::new()
            .e(E::dir("real"))
            .e(E::symlink("alias", "real"))
            .e(E::file("alias/f", "x")),
    );
    assert_refused(r, "alias/f");
    assert!(!exists(&s.path("real/f")));
    s.assert_contained();
}

#[test]
fn symlink_replaced_by_a_file_is_not_written_through() {
    // containerd SymlinkEmptyFile: a file over a symlink replaces the symlink.
    let s = Scene::new();
    s.unpack(
        T::new()
            .e(E::symlink("passwd", s.abs(&s.target)))
            .e(E::file("passwd", ""))
            .e(E::symlink("other", "../victim/target"))
            .e(E::file("other", "pwned").mode(0o4755)),
    )
    .unwrap();
    let m = fs::symlink_metadata(s.path("passwd")).unwrap();
    assert!(m.is_file() && m.len() == 0);
    assert_eq!(fs::read(s.path("other")).unwrap(), b"pwned");
    s.assert_contained();
}

#[test]
fn symlink_replaced_by_a_directory_is_not_followed() {
    // containerd DirectoryOverrideSymlink(AndHardlink).
    let s = Scene::new();
    s.unpack(
        T::new()
            .e(E::symlink("localetc", s.abs(&s.victim)))
            .e(E::dir("/localetc/"))
            .e(E::file("/localetc/target", "inside")),
    )
    .unwrap();
    assert!(fs::symlink_metadata(s.path("localetc")).unwrap().is_dir());
    assert_eq!(fs::read(s.path("localetc/target")).unwrap(), b"inside");
    s.assert_contained();
}

#[test]
fn symlink_named_like_the_root_is_refused() {
    // containerd SymlinkParentDirectory, SymlinkEmptyFilename, SymlinkParentRelative.
    let s = Scene::new();
    for (i, name) in ["..", "", ".", "/", "a/.."].into_iter().enumerate() {
        let (_, r) = s.unpack_fresh(
            &format!("r{i}"),
            T::new().e(E::symlink(name, s.abs(&s.victim))),
        );
        let e = assert_refused(r, name);
        assert!(e.to_string().contains("layer root"), "{e}");
    }
    let (_, r) = s.unpack_fresh(
        "rel",
        T::new()
            .e(E::symlink("localetc/sub/..", s.abs(&s.victim)))
            .e(E::hardlink("/localetc/localpasswd", "/localetc/target")),
    );
    assert_refused(r, "/localetc/localpasswd");
    s.assert_contained();
}

// ---------------------------------------------------------------------------------------
// Hard links
// ---------------------------------------------------------------------------------------

#[test]
fn hardlink_climbing_out_of_the_root_is_refused() {
    // containerd HardlinkDirectRelative, Docker's "invalid hardlink".
    let s = Scene::new();
    for (i, target) in [
        "../victim/target",
        "a/../../victim/target",
        "../../../../../victim/target",
        "./../victim/target",
    ]
    .into_iter()
    .enumerate()
    {
        let (_, r) = s.unpack_fresh(
            &format!("h{i}"),
            T::new()
                .e(E::dir("a"))
                .e(E::hardlink("localpasswd", target)),
        );
        let e = assert_refused(r, "localpasswd");
        assert!(e.to_string().contains("hard link target"), "{e}");
    }
    s.assert_contained();
}

#[test]
fn hardlink_absolute_target_is_layer_relative() {
    // containerd HardlinkDirectAbsolute, umoci TestUnpackHardlink.
    let s = Scene::new();
    s.unpack(
        T::new()
            .e(E::dir("etc"))
            .e(E::file("/etc/passwd", "inside"))
            .e(E::hardlink("localpasswd", "/etc/passwd")
                .owner(1337, 2020)
                .mode(0o777)),
    )
    .unwrap();
    let a = fs::symlink_metadata(s.path("localpasswd")).unwrap();
    let b = fs::symlink_metadata(s.path("etc/passwd")).unwrap();
    assert_eq!(a.ino(), b.ino());
    // The link's own header is not applied to the target.
    assert_eq!((b.uid(), b.gid(), b.mode() & 0o7777), (0, 0, 0o644));

    // The host's absolute path means a path inside the layer, where it does not exist.
    let (_, r) = s.unpack_fresh("host", T::new().e(E::hardlink("stolen", s.abs(&s.target))));
    let e = assert_refused(r, "stolen");
    assert!(e.to_string().contains("not in the layer"), "{e}");
    s.assert_contained();
}

#[test]
fn hardlink_through_a_symlink_is_refused() {
    // containerd HardlinkRelative, HardlinkDownAndOut, HardlinkAbsolute,
    // HardlinkRelativeLong, HardlinkRelativeUpAndOut.
    let s = Scene::new();
    let abs = String::from_utf8(s.abs(&s.victim)).unwrap();
    for (i, (link, name, target)) in [
        ("breakouts/d1", "../../victim", "/breakouts/d1/target"),
        (
            "breakouts/d1",
            "../downandout/../../victim",
            "/breakouts/d1/target",
        ),
        ("localetc", abs.as_str(), "/localetc/target"),
        (
            "localetc",
            "../../../../../../../victim",
            "/localetc/target",
        ),
        ("localetc", "upandout/../../../victim", "/localetc/target"),
    ]
    .into_iter()
    .enumerate()
    {
        let (_, r) = s.unpack_fresh(
            &format!("h{i}"),
            T::new()
                .e(E::dir("breakouts"))
                .e(E::dir("downandout"))
                .e(E::symlink(link, name))
                .e(E::hardlink("mypasswd", target)),
        );
        let e = assert_refused(r, "mypasswd");
        assert!(e.to_string().contains("symlink"), "{e}");
    }
    s.assert_contained();
}

#[test]
fn hardlink_to_a_symlink_links_the_symlink_itself() {
    // umoci TestUnpackHardlink, containerd HardlinkSymlinkRelative/Absolute/Chmod and
    // HardlinkSymlinkBeforeCreateTarget: the new name is the symlink's inode, and the
    // link's header (owner, mode) never reaches the symlink's target.
    let s = Scene::new();
    s.unpack(
        T::new()
            .e(E::symlink("passwdlink", s.abs(&s.target)))
            .e(E::hardlink("localpasswd", "/passwdlink")
                .owner(1337, 2020)
                .mode(0o777))
            .e(E::symlink("rel", "../../../../../victim/target"))
            .e(E::hardlink("rel-dup", "rel")),
    )
    .unwrap();
    let a = fs::symlink_metadata(s.path("passwdlink")).unwrap();
    let b = fs::symlink_metadata(s.path("localpasswd")).unwrap();
    assert!(b.is_symlink());
    assert_eq!(a.ino(), b.ino());
    assert_eq!(b.uid(), 0);
    assert!(
        fs::symlink_metadata(s.path("rel-dup"))
            .unwrap()
            .is_symlink()
    );
    s.assert_contained();
}

#[test]
fn hardlink_to_itself_a_directory_or_the_root_is_refused() {
    let s = Scene::new();
    let cases: [(&str, T, &str); 4] = [
        (
            "self",
            T::new().e(E::file("h", "x")).e(E::hardlink("h", "/h")),
            "itself",
        ),
        (
            "dir",
            T::new().e(E::dir("d")).e(E::hardlink("h", "d")),
            "directory",
        ),
        ("root", T::new().e(E::hardlink("h", "/")), "layer root"),
        (
            "missing",
            T::new().e(E::hardlink("h", "nope")),
            "not in the layer",
        ),
    ];
    for (name, t, why) in cases {
        let (_, r) = s.unpack_fresh(name, t);
        let e = assert_refused(r, "h");
        assert!(e.to_string().contains(why), "{name}: {e}");
    }
    s.assert_contained();
}

#[test]
fn hardlink_replaced_by_a_file_is_not_written_through() {
    // A later file over a hard link gets a new inode; the other name keeps its content.
    let s = Scene::new();
    s.unpack(
        T::new()
            .e(E::file("orig", "A"))
            .e(E::hardlink("h", "orig"))
            .e(E::file("h", "B")),
    )
    .unwrap();
    assert_eq!(fs::read(s.path("orig")).unwrap(), b"A");
    assert_eq!(fs::read(s.path("h")).unwrap(), b"B");
    assert_eq!(fs::symlink_metadata(s.path("orig")).unwrap().nlink(), 1);
    s.assert_contained();
}

// ---------------------------------------------------------------------------------------
// Whiteouts
// ---------------------------------------------------------------------------------------

#[test]
fn whiteout_with_an_empty_name_is_refused() {
    let s = Scene::new();
    for (i, name) in [".wh.", "etc/.wh.", "/.wh."].into_iter().enumerate() {
        let (_, r) = s.unpack_fresh(&format!("w{i}"), T::new().e(E::file(name, "")));
        let e = assert_refused(r, name);
        assert!(e.to_string().contains("empty name"), "{e}");
    }
    s.assert_contained();
}

#[test]
fn whiteout_of_the_root_is_refused() {
    // containerd WhiteoutRoot and WhiteoutCurrentDirectory.
    let s = Scene::new();
    for (i, name) in [".wh..", "/.wh..", "./.wh..", "etc/.wh.."]
        .into_iter()
        .enumerate()
    {
        let (d, r) = s.unpack_fresh(&format!("w{i}"), T::new().e(E::file(name, "")));
        assert_refused(r, name);
        assert!(xattr(&d, "trusted.overlay.opaque").is_none());
    }
    s.assert_contained();
}

#[test]
fn whiteout_of_dot_dot_is_refused() {
    // containerd WhiteoutParent and WhiteoutRootParent.
    let s = Scene::new();
    for (i, name) in [".wh...", "etc/.wh...", "a/b/.wh..."]
        .into_iter()
        .enumerate()
    {
        let (_, r) = s.unpack_fresh(&format!("w{i}"), T::new().e(E::file(name, "")));
        let e = assert_refused(r, name);
        assert!(e.to_string().contains("parent"), "{e}");
    }
    s.assert_contained();
}

#[test]
fn whiteout_through_a_symlink_is_refused() {
    // containerd WhiteoutSymlinkPath and WhiteoutDeadSymlinkParent.
    let s = Scene::new();
    let (_, r) = s.unpack_fresh(
        "live",
        T::new()
            .e(E::symlink("localetc", s.abs(&s.victim)))
            .e(E::file("localetc/.wh.target", "")),
    );
    assert_refused(r, "localetc/.wh.target");
    let (_, r) = s.unpack_fresh(
        "dead",
        T::new()
            .e(E::symlink("localetc", "/dne"))
            .e(E::file("localetc/.wh.etc", "")),
    );
    assert_refused(r, "localetc/.wh.etc");
    s.assert_contained();
}

#[test]
fn whiteout_of_a_symlink_only_hides_the_name() {
    // containerd WhiteoutSymlink: the lower symlink is hidden, its target untouched.
    let s = Scene::new();
    let stats = s
        .unpack(
            T::new()
                .e(E::file(".wh.localetc", ""))
                .e(E::file("dne/../.wh.etc", "")),
        )
        .unwrap();
    assert_eq!(stats.whiteouts, 2);
    assert!(is_whiteout(&s.path("localetc")));
    // containerd WhiteoutRelativePath: `dne/../.wh.etc` is `.wh.etc`.
    assert!(is_whiteout(&s.path("etc")));
    assert!(!exists(&s.path("dne")) || s.path("dne").is_dir());

    // The same layer has the symlink: the whiteout only hides lower layers.
    let (d, r) = s.unpack_fresh(
        "same",
        T::new()
            .e(E::symlink("localetc", s.abs(&s.victim)))
            .e(E::file(".wh.localetc", "")),
    );
    r.unwrap();
    assert!(
        fs::symlink_metadata(d.join("localetc"))
            .unwrap()
            .is_symlink()
    );
    s.assert_contained();
}

#[test]
fn whiteout_name_used_as_a_directory_is_refused() {
    // containerd WhiteoutDirectoryName keeps `.wh.etc/somefile` literally; a `.wh.` name
    // cannot be a directory in an OCI layer, so Keel refuses it.
    let s = Scene::new();
    let r = s.unpack(T::new().e(E::file(".wh.etc/somefile", "non-empty")));
    let e = assert_refused(r, ".wh.etc/somefile");
    assert!(
        e.to_string().contains("whiteout name used as a directory"),
        "{e}"
    );
    s.assert_contained();
}

#[test]
fn whiteout_of_any_entry_type_is_a_whiteout() {
    // aufs-era layers carry whiteouts as hard links; the type and content do not matter.
    let s = Scene::new();
    s.unpack(
        T::new()
            .e(E::file("base", "b"))
            .e(E::hardlink(".wh.a", "base"))
            .e(E::symlink(".wh.b", s.abs(&s.target)))
            .e(E::dir(".wh.c"))
            .e(E::file(".wh.d", "content is ignored"))
            .e(E::device(EntryType::Block, ".wh.e", 8, 0)),
    )
    .unwrap();
    for n in ["a", "b", "c", "d", "e"] {
        assert!(is_whiteout(&s.path(n)), "{n}");
        assert!(!exists(&s.path(format!(".wh.{n}"))));
    }
    s.assert_contained();
}

#[test]
fn implicit_directory_over_a_whiteout_is_opaque() {
    let s = Scene::new();
    s.unpack(T::new().e(E::file(".wh.d", "")).e(E::file("d/f", "F")))
        .unwrap();
    assert!(s.path("d").is_dir());
    assert_eq!(
        xattr(&s.path("d"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(fs::read(s.path("d/f")).unwrap(), b"F");
    s.assert_contained();
}

// ---------------------------------------------------------------------------------------
// Opaque markers and overlay xattrs
// ---------------------------------------------------------------------------------------

#[test]
fn opaque_marker_in_a_nested_directory() {
    let s = Scene::new();
    let stats = s
        .unpack(
            T::new()
                .e(E::dir("a"))
                .e(E::dir("a/b"))
                .e(E::file("a/b/.wh..wh..opq", ""))
                .e(E::file("x/y/z/.wh..wh..opq", "")),
        )
        .unwrap();
    assert_eq!(stats.opaque_dirs, 2);
    for d in ["a/b", "x/y/z"] {
        assert_eq!(
            xattr(&s.path(d), "trusted.overlay.opaque").as_deref(),
            Some(&b"y"[..])
        );
        assert!(!exists(&s.path(format!("{d}/.wh..wh..opq"))));
    }
    assert_eq!(xattr(&s.path("a"), "trusted.overlay.opaque"), None);
    s.assert_contained();
}

#[test]
fn opaque_marker_with_content_is_only_a_marker() {
    let s = Scene::new();
    s.unpack(
        T::new()
            .e(E::dir("d"))
            .e(E::file("d/.wh..wh..opq", vec![b'x'; 3000]))
            .e(E::file("d/after", "A")),
    )
    .unwrap();
    assert_eq!(
        xattr(&s.path("d"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert!(!exists(&s.path("d/.wh..wh..opq")));
    // The content was skipped, not parsed as headers.
    assert_eq!(fs::read(s.path("d/after")).unwrap(), b"A");
    s.assert_contained();
}

#[test]
fn opaque_marker_at_the_top_marks_the_layer_root() {
    let s = Scene::new();
    s.unpack(T::new().e(E::file(".wh..wh..opq", "")).e(E::file("f", "F")))
        .unwrap();
    assert_eq!(
        xattr(&s.layer, "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert!(!exists(&s.path(".wh..wh..opq")));
    assert!(keel_image::unpack::root_is_opaque(&s.layer));
    assert!(!keel_image::unpack::root_is_opaque(&s.path("f")));
    s.assert_contained();
}

#[test]
fn opaque_marker_through_a_symlink_is_refused() {
    let s = Scene::new();
    let r = s.unpack(
        T::new()
            .e(E::symlink("s", s.abs(&s.sentinel)))
            .e(E::file("s/.wh..wh..opq", "")),
    );
    assert_refused(r, "s/.wh..wh..opq");
    let (_, r) = s.unpack_fresh("up", T::new().e(E::file("../sentinel/.wh..wh..opq", "")));
    assert_refused(r, "../sentinel/.wh..wh..opq");
    s.assert_contained();
}

#[test]
fn opaque_marker_in_weird_places() {
    // As a directory (its children are skipped like aufs metadata), a symlink, a hard
    // link, a device, under aufs' `.wh..wh.plnk`: each only marks its parent.
    let s = Scene::new();
    s.unpack(
        T::new()
            .e(E::file("base", "b"))
            .e(E::dir("a/.wh..wh..opq"))
            .e(E::file("a/.wh..wh..opq/child", "skipped"))
            .e(E::symlink("b/.wh..wh..opq", s.abs(&s.sentinel)))
            .e(E::hardlink("c/.wh..wh..opq", "base"))
            .e(E::device(EntryType::Char, "d/.wh..wh..opq", 1, 3))
            .e(E::file(".wh..wh.plnk/.wh..wh..opq", "aufs"))
            .e(E::file(".wh..wh.plnk/123", "aufs")),
    )
    .unwrap();
    for d in ["a", "b", "c", "d"] {
        assert_eq!(
            xattr(&s.path(d), "trusted.overlay.opaque").as_deref(),
            Some(&b"y"[..]),
            "{d}"
        );
        assert!(!exists(&s.path(format!("{d}/.wh..wh..opq"))), "{d}");
    }
    assert!(!exists(&s.path(".wh..wh.plnk")));
    assert_eq!(xattr(&s.layer, "trusted.overlay.opaque"), None);
    s.assert_contained();
}

#[test]
fn forged_overlay_xattrs_are_dropped() {
    // A layer must not mark directories opaque, redirect or metacopy by itself.
    let s = Scene::new();
    s.unpack(
        T::new()
            .e(E::dir("d")
                .pax("SCHILY.xattr.trusted.overlay.opaque", b"y")
                .pax("SCHILY.xattr.trusted.overlay.redirect", b"/victim")
                .pax("SCHILY.xattr.user.overlay.opaque", b"y")
                .pax("SCHILY.xattr.user.keel", b"kept"))
            .e(E::file("f", "x").pax("SCHILY.xattr.trusted.overlay.metacopy", b"")),
    )
    .unwrap();
    let d = s.path("d");
    assert_eq!(xattr(&d, "trusted.overlay.opaque"), None);
    assert_eq!(xattr(&d, "trusted.overlay.redirect"), None);
    assert_eq!(xattr(&d, "user.overlay.opaque"), None);
    assert_eq!(xattr(&d, "user.keel").as_deref(), Some(&b"kept"[..]));
    assert_eq!(xattr(&s.path("f"), "trusted.overlay.metacopy"), None);
    s.assert_contained();
}

// ---------------------------------------------------------------------------------------
// Duplicate entries
// ---------------------------------------------------------------------------------------

#[test]
fn duplicate_file_the_later_entry_wins() {
    let s = Scene::new();
    s.unpack(
        T::new()
            .e(E::file("f", "first").mode(0o600))
            .e(E::file("f", "second").mode(0o644).owner(7, 8)),
    )
    .unwrap();
    let m = fs::symlink_metadata(s.path("f")).unwrap();
    assert_eq!(fs::read(s.path("f")).unwrap(), b"second");
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o644, 7, 8));
    s.assert_contained();
}

#[test]
fn duplicate_directory_over_a_directory_merges() {
    let s = Scene::new();
    s.unpack(
        T::new()
            .e(E::dir("d").mode(0o700))
            .e(E::file("d/a", "A"))
            .e(E::dir("d").mode(0o750).owner(5, 6))
            .e(E::file("d/b", "B")),
    )
    .unwrap();
    let m = fs::symlink_metadata(s.path("d")).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o750, 5, 6));
    assert_eq!(fs::read(s.path("d/a")).unwrap(), b"A");
    assert_eq!(fs::read(s.path("d/b")).unwrap(), b"B");
    s.assert_contained();
}

#[test]
fn duplicate_file_over_a_directory_removes_the_tree_without_following_links() {
    // The removed tree holds symlinks to the outside and a deep chain of directories.
    let s = Scene::new();
    let mut t = T::new()
        .e(E::dir("d"))
        .e(E::symlink("d/out", s.abs(&s.victim)))
        .e(E::symlink("d/file", s.abs(&s.target)))
        .e(E::hardlink("d/hl", "d/file"))
        .e(E::dir("d/locked").mode(0o000));
    let mut deep = String::from("d/deep");
    for i in 0..600 {
        deep.push_str(if i % 2 == 0 { "/x" } else { "/y" });
    }
    t = t
        .e(E::file(format!("{deep}/leaf"), "L"))
        .e(E::file("d", "now a file"));
    s.unpack(t).unwrap();
    assert_eq!(fs::read(s.path("d")).unwrap(), b"now a file");
    s.assert_contained();
}

#[test]
fn duplicate_directory_over_a_file_replaces_it() {
    let s = Scene::new();
    s.unpack(
        T::new()
            .e(E::file("x", "file"))
            .e(E::dir("x"))
            .e(E::file("x/inner", "I"))
            .e(E::device(EntryType::Fifo, "p", 0, 0))
            .e(E::dir("p")),
    )
    .unwrap();
    assert!(s.path("x").is_dir());
    assert!(s.path("p").is_dir());
    assert_eq!(fs::read(s.path("x/inner")).unwrap(), b"I");
    s.assert_contained();
}

// ---------------------------------------------------------------------------------------
// Names
// ---------------------------------------------------------------------------------------

#[test]
fn invalid_utf8_names_are_kept_as_bytes() {
    let s = Scene::new();
    let dir: &[u8] = b"caf\xe9";
    let file: &[u8] = b"caf\xe9/\xff\xfe";
    s.unpack(
        T::new()
            .e(E::dir(dir))
            .e(E::file(file, "latin-1"))
            .e(E::symlink(b"l\x80", b"\xc0\xaf")),
    )
    .unwrap();
    assert_eq!(fs::read(s.path(file)).unwrap(), b"latin-1");
    assert_eq!(
        fs::read_link(s.path(b"l\x80"))
            .unwrap()
            .as_os_str()
            .as_bytes(),
        b"\xc0\xaf"
    );
    // Errors show such names escaped, unambiguously.
    let (_, r) = s.unpack_fresh("bad", T::new().e(E::file(b"\xff/../../x", "")));
    let e = assert_refused(r, "\\xff/../../x");
    assert!(matches!(e, ImageError::UnsafePath { .. }));
    s.assert_contained();
}

#[test]
fn dot_dot_in_the_middle_of_names() {
    // umoci TestUnpackEntrySanitiseScoping: `/..` stays at the root in an absolute name;
    // a relative name that climbs above the root is refused.
    let s = Scene::new();
    s.unpack(
        T::new()
            .e(E::file("a/../b", "B"))
            .e(E::file("/../file", "F"))
            .e(E::file("/../../../../victim/target", "T"))
            .e(E::file("c/./d/.././e", "E")),
    )
    .unwrap();
    assert_eq!(fs::read(s.path("b")).unwrap(), b"B");
    assert_eq!(fs::read(s.path("file")).unwrap(), b"F");
    assert_eq!(fs::read(s.path("victim/target")).unwrap(), b"T");
    assert_eq!(fs::read(s.path("c/e")).unwrap(), b"E");
    for (i, name) in [
        "../victim/target",
        "a/b/../../../victim/target",
        "a/../../x",
        "..",
    ]
    .into_iter()
    .enumerate()
    {
        let (_, r) = s.unpack_fresh(&format!("c{i}"), T::new().e(E::file(name, "pwned")));
        let e = assert_refused(r, name);
        assert!(matches!(e, ImageError::UnsafePath { .. }), "{e:?}");
    }
    s.assert_contained();
}

#[test]
fn parent_that_is_not_a_directory_is_refused() {
    let s = Scene::new();
    for (i, t) in [
        T::new().e(E::file("f", "x")).e(E::file("f/child", "y")),
        T::new()
            .e(E::device(EntryType::Char, "dev/null", 1, 3))
            .e(E::file("dev/null/x", "y")),
        T::new()
            .e(E::device(EntryType::Fifo, "p", 0, 0))
            .e(E::dir("p/d/")),
    ]
    .into_iter()
    .enumerate()
    {
        let (_, r) = s.unpack_fresh(&format!("c{i}"), t);
        let e = assert_refused(r, "/");
        assert!(e.to_string().contains("not a directory"), "{e}");
    }
    s.assert_contained();
}

#[test]
fn very_long_names() {
    let s = Scene::new();
    let c255 = "n".repeat(255);
    let c256 = "n".repeat(256);
    // A 255-byte component and a deep 4000-byte path are fine (GNU long names).
    let deep: String = std::iter::repeat_n("abcdefg", 500)
        .collect::<Vec<_>>()
        .join("/");
    s.unpack(
        T::new()
            .e(E::file(&c255, "ok"))
            .e(E::file(format!("{deep}/f"), "deep"))
            .e(E::symlink("longlink", "t".repeat(4000))),
    )
    .unwrap();
    assert_eq!(fs::read(s.path(&c255)).unwrap(), b"ok");
    assert_eq!(fs::read(s.path(format!("{deep}/f"))).unwrap(), b"deep");

    let too_deep: String = std::iter::repeat_n("abcdefg", 600)
        .collect::<Vec<_>>()
        .join("/");
    let cases: [(&str, T, &str); 4] = [
        ("name", T::new().e(E::file(&c256, "x")), "NAME_MAX"),
        ("path", T::new().e(E::file(&too_deep, "x")), "PATH_MAX"),
        (
            "symlink",
            T::new().e(E::symlink("sl", "t".repeat(5000))),
            "PATH_MAX",
        ),
        (
            "hardlink",
            T::new()
                .e(E::file("f", "x"))
                .e(E::hardlink("hl", format!("{c256}/f"))),
            "NAME_MAX",
        ),
    ];
    for (name, t, why) in cases {
        let (_, r) = s.unpack_fresh(name, t);
        let e = r.expect_err(name);
        assert!(matches!(e, ImageError::BadEntry { .. }), "{name}: {e:?}");
        assert!(e.to_string().contains(why), "{name}: {e}");
    }
    s.assert_contained();
}

// ---------------------------------------------------------------------------------------
// Devices and modes
// ---------------------------------------------------------------------------------------

#[test]
fn device_nodes_land_inside_the_layer() {
    // Docker allows device nodes in images; Keel creates them inside the layer (they are
    // inert in unprivileged containers, whose root the supervisor mounts nodev).
    let s = Scene::new();
    let stats = s
        .unpack(
            T::new()
                .e(E::device(EntryType::Char, "dev/null", 1, 3))
                .e(E::device(EntryType::Block, "dev/sda", 8, 0).mode(0o660))
                .e(E::device(EntryType::Fifo, "run/fifo", 0, 0).mode(0o600)),
        )
        .unwrap();
    assert_eq!(stats.devices, 3);
    let null = fs::symlink_metadata(s.path("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), rustix::fs::makedev(1, 3));
    let sda = fs::symlink_metadata(s.path("dev/sda")).unwrap();
    assert!(sda.file_type().is_block_device());
    assert_eq!(sda.mode() & 0o7777, 0o660);
    assert!(
        fs::symlink_metadata(s.path("run/fifo"))
            .unwrap()
            .file_type()
            .is_fifo()
    );

    for (i, t) in [
        T::new().e(E::device(EntryType::Block, "../sentinel/sda", 8, 0)),
        T::new()
            .e(E::symlink("dev", s.abs(&s.sentinel)))
            .e(E::device(EntryType::Block, "dev/sda", 8, 0)),
    ]
    .into_iter()
    .enumerate()
    {
        let (_, r) = s.unpack_fresh(&format!("c{i}"), t);
        assert_refused(r, "sda");
    }
    s.assert_contained();
}

#[test]
fn char_device_0_0_is_a_whiteout_in_overlay_form() {
    let s = Scene::new();
    s.unpack(T::new().e(E::device(EntryType::Char, "gone", 0, 0)))
        .unwrap();
    assert!(is_whiteout(&s.path("gone")));
    s.assert_contained();
}

#[test]
fn setuid_setgid_and_sticky_bits_are_kept() {
    let s = Scene::new();
    let t = || {
        T::new()
            .e(E::file("bin/su", "su").mode(0o4755))
            .e(E::file("bin/wall", "wall").mode(0o2755).owner(0, 5))
            .e(E::dir("tmp").mode(0o1777))
    };
    s.unpack(t()).unwrap();
    let mode = |d: &Path, p: &str| fs::symlink_metadata(d.join(p)).unwrap().mode() & 0o7777;
    assert_eq!(mode(&s.layer, "bin/su"), 0o4755);
    assert_eq!(mode(&s.layer, "bin/wall"), 0o2755);
    assert_eq!(mode(&s.layer, "tmp"), 0o1777);

    // Shifted owners too (chown would clear the bits if it came after chmod).
    let shifted = s.outer.join("layers/shifted");
    fs::create_dir_all(&shifted).unwrap();
    let shift = IdShift {
        uid: 100_000,
        gid: 100_000,
        size: 65_536,
    };
    unpack_layer_shifted(&s.layer_blob(&t().bytes()), &shifted, Some(shift)).unwrap();
    let su = fs::symlink_metadata(shifted.join("bin/su")).unwrap();
    assert_eq!((su.mode() & 0o7777, su.uid()), (0o4755, 100_000));
    assert_eq!(mode(&shifted, "bin/wall"), 0o2755);
    assert_eq!(
        fs::symlink_metadata(shifted.join("bin/wall"))
            .unwrap()
            .gid(),
        100_005
    );

    // An owner the user namespace cannot map is refused, not squashed to root.
    let narrow = s.outer.join("layers/narrow");
    fs::create_dir_all(&narrow).unwrap();
    let hostile = T::new().e(E::file("x", "x").mode(0o4755).owner(70_000, 0));
    let e =
        unpack_layer_shifted(&s.layer_blob(&hostile.bytes()), &narrow, Some(shift)).unwrap_err();
    assert!(e.to_string().contains("outside the user namespace"), "{e}");
    s.assert_contained();
}

// ---------------------------------------------------------------------------------------
// Crash safety of the store
// ---------------------------------------------------------------------------------------

/// Writes a one-layer OCI layout around `tar` and returns the layer's hex digest.
fn make_layout(dir: &Path, tar: &[u8]) -> String {
    let digests = common::write_layout(dir, &[(MEDIA_TYPE_LAYER_TAR, tar.to_vec())]);
    digests[0].trim_start_matches("sha256:").to_string()
}

/// A layer big enough to be caught midway: 64 files of 64 KiB.
fn big_layer() -> Vec<u8> {
    let mut t = T::new().e(E::dir("data"));
    for i in 0..64u8 {
        t = t.e(E::file(format!("data/f{i:02}"), vec![i; 64 << 10]));
    }
    t.bytes()
}

fn store_names(store: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(store)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn assert_complete(dir: &Path) {
    for i in 0..64u8 {
        assert_eq!(
            fs::read(dir.join(format!("data/f{i:02}"))).unwrap(),
            vec![i; 64 << 10]
        );
    }
}

/// Replaces the layer blob by a FIFO, so the test controls how much of it is read.
fn blob_fifo(layout: &Path, hex: &str) -> PathBuf {
    let path = layout.join("blobs/sha256").join(hex);
    fs::remove_file(&path).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    path
}

#[test]
fn failing_reader_midway_leaves_no_completed_layer() {
    require_root();
    let dir = scratch();
    let layout = dir.path().join("layout");
    let tar = big_layer();
    let hex = make_layout(&layout, &tar);
    let img = ImageLayout::open(&layout).unwrap();
    let fifo = blob_fifo(&layout, &hex);
    let half = tar[..tar.len() / 2].to_vec();
    // Opened read-write, the FIFO opens at once whenever the unpack gets to it (a loaded
    // machine may take long): the writes wait for the reader, nothing gives up on a timer.
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    let writer = std::thread::spawn(move || {
        // The stream then ends: the reader sees a truncated layer midway.
        let _ = f.write_all(&half);
    });
    let store = dir.path().join("store");
    let e = unpack_image(&img, &store).unwrap_err();
    writer.join().unwrap();
    assert!(
        e.to_string().contains(&hex) || e.to_string().contains("layer"),
        "{e}"
    );
    assert!(store_names(&store).is_empty(), "{:?}", store_names(&store));
}

/// Run by [`killed_unpack_leaves_no_completed_layer_and_is_swept`] in a child process,
/// which it kills midway; a no-op otherwise.
#[test]
fn crash_child_helper() {
    let (Some(layout), Some(store)) = (
        std::env::var_os("KEEL_ADV_CRASH_LAYOUT"),
        std::env::var_os("KEEL_ADV_CRASH_STORE"),
    ) else {
        return;
    };
    let img = ImageLayout::open(Path::new(&layout)).unwrap();
    let _ = unpack_image(&img, Path::new(&store));
    // Only reached if the parent did not kill us; it fails the test then.
    std::process::exit(3);
}

#[test]
fn killed_unpack_leaves_no_completed_layer_and_is_swept() {
    require_root();
    let dir = scratch();
    let layout = dir.path().join("layout");
    let store = dir.path().join("store");
    let tar = big_layer();
    let hex = make_layout(&layout, &tar);
    let fifo = blob_fifo(&layout, &hex);

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_child_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("KEEL_ADV_CRASH_LAYOUT", &layout)
        .env("KEEL_ADV_CRASH_STORE", &store)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    // Read-write: opens at once, and the write below waits for the child to read.
    let mut pipe = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    pipe.write_all(&tar[..tar.len() / 2]).unwrap();
    // Wait until the child has written files into its tmp dir: it is midway.
    let tmp = loop {
        let found = fs::read_dir(&store).ok().and_then(|rd| {
            rd.filter_map(Result::ok).map(|e| e.path()).find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(".tmp-")
                    && fs::read_dir(p.join("data")).is_ok_and(|mut d| d.next().is_some())
            })
        });
        if let Some(p) = found {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "the child never started unpacking"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    // The crash: SIGKILL with the stream still open, so no cleanup code runs.
    child.kill().unwrap();
    child.wait().unwrap();
    drop(pipe);

    // No completed layer; the partial tmp dir is left, under a name never trusted.
    assert!(!exists(&store.join(&hex)), "{:?}", store_names(&store));
    assert!(tmp.is_dir());
    assert!(!tmp.join("data/f63").exists());

    // The next unpack sweeps the leftover and produces the complete layer.
    fs::remove_file(&fifo).unwrap();
    fs::write(&fifo, &tar).unwrap();
    let img = ImageLayout::open(&layout).unwrap();
    let dirs = unpack_image(&img, &store).unwrap();
    assert_eq!(dirs, [store.join(&hex)]);
    assert_complete(&dirs[0]);
    assert_eq!(store_names(&store), [hex]);
}

#[test]
fn stale_tmp_dirs_are_swept_and_never_trusted() {
    require_root();
    let s = Scene::new();
    let layout = s.outer.join("layers/layout");
    let store = s.outer.join("layers/store");
    let tar = big_layer();
    let hex = make_layout(&layout, &tar);
    // Leftovers that look complete, hold links to the outside and hard-to-remove trees.
    for name in [format!(".tmp-{hex}"), format!(".tmp-{hex}-999999-0")] {
        let t = store.join(&name);
        fs::create_dir_all(t.join("data/locked/deeper")).unwrap();
        fs::write(t.join("data/f00"), b"forged").unwrap();
        std::os::unix::fs::symlink(&s.victim, t.join("out")).unwrap();
        std::os::unix::fs::symlink(&s.target, t.join("data/target")).unwrap();
        fs::set_permissions(t.join("data/locked"), fs::Permissions::from_mode(0o000)).unwrap();
    }
    fs::write(store.join(".tmp-file"), b"").unwrap();
    let img = ImageLayout::open(&layout).unwrap();
    let dirs = unpack_image(&img, &store).unwrap();
    assert_complete(&dirs[0]);
    assert_eq!(store_names(&store), [hex]);
    s.assert_contained();
}

#[test]
fn store_entry_that_is_not_a_directory_is_not_trusted() {
    require_root();
    let s = Scene::new();
    let layout = s.outer.join("layers/layout");
    let store = s.outer.join("layers/store");
    let tar = big_layer();
    let hex = make_layout(&layout, &tar);
    fs::create_dir_all(&store).unwrap();
    // A symlink named like the layer, pointing at a directory outside the store.
    std::os::unix::fs::symlink(&s.victim, store.join(&hex)).unwrap();
    let img = ImageLayout::open(&layout).unwrap();
    let dirs = unpack_image(&img, &store).unwrap();
    assert!(fs::symlink_metadata(&dirs[0]).unwrap().is_dir());
    assert_complete(&dirs[0]);
    s.assert_contained();
}

#[test]
fn concurrent_unpacks_of_one_layer_agree() {
    require_root();
    let dir = scratch();
    let layout = dir.path().join("layout");
    let store = dir.path().join("store");
    let tar = big_layer();
    let hex = make_layout(&layout, &tar);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (layout, store) = (layout.clone(), store.clone());
            std::thread::spawn(move || {
                unpack_image(&ImageLayout::open(&layout).unwrap(), &store).unwrap()
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), [store.join(&hex)]);
    }
    assert_complete(&store.join(&hex));
    assert_eq!(store_names(&store), [hex]);
}
