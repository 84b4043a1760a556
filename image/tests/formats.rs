//! Images in the formats other tools write: OCI layouts by umoci and skopeo, oci-archive
//! and docker-archive tarballs, multi-platform indexes, gzip/zstd/uncompressed layers; and
//! tampered, misnamed and truncated blobs, which must be refused naming the blob.
//!
//! umoci and skopeo must be installed (`scripts/install-deps` does): these tests fail
//! rather than skip without them. Unpacking needs root (owners, trusted xattrs).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use keel_image::ImageError;
use keel_image::archive::{copy_image, import_archive};
use keel_image::layer_store::unpack_image;
use keel_image::layout::{ImageLayout, PortProtocol, REF_NAME_ANNOTATION};
use serde_json::{Value, json};
use sha2::Digest as _;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

// ---------------------------------------------------------------------------------------
// Helpers.

/// A scratch directory on tmpfs, which takes the trusted.* xattrs unpacking writes.
fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("keel-formats-")
        .tempdir_in("/dev/shm")
        .unwrap()
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?}: {e} (scripts/install-deps installs skopeo and umoci)")
    });
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sha256(data: &[u8]) -> String {
    let d = sha2::Sha256::digest(data);
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap()
}

/// Every entry under `dir`: `dir`, `-> target`, `file <sha256>` or `whiteout`.
fn tree(dir: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            let ft = fs::symlink_metadata(&path).unwrap().file_type();
            if ft.is_symlink() {
                let t = fs::read_link(&path).unwrap();
                out.insert(rel, format!("-> {}", t.display()));
            } else if ft.is_dir() {
                out.insert(rel, "dir".into());
                walk(root, &path, out);
            } else if ft.is_char_device() {
                out.insert(rel, "whiteout".into());
            } else {
                out.insert(rel, format!("file {}", sha256(&fs::read(&path).unwrap())));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Unpacks `image` into a fresh store and returns the merged view of its layers (later
/// layers win; enough for the images here, which have no whiteouts).
fn unpacked(image: &ImageLayout, store: &Path) -> BTreeMap<String, String> {
    let dirs = unpack_image(image, store).unwrap();
    assert_eq!(dirs.len(), image.layers().len());
    let mut all = BTreeMap::new();
    for d in dirs {
        all.extend(tree(&d));
    }
    all
}

fn blob_names(layout: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// No temporary file is left in a layout after a failed or finished copy.
fn assert_no_temp_files(layout: &Path) {
    for name in blob_names(layout) {
        assert!(!name.starts_with('.'), "left over: {name}");
    }
    for e in fs::read_dir(layout).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert!(!name.starts_with(".tmp"), "left over: {name}");
    }
}

fn index_refs(layout: &Path) -> Vec<String> {
    let index: Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            m["annotations"][REF_NAME_ANNOTATION]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

/// The rootfs the tool-made images hold: busybox, two applet links and a file.
fn make_rootfs(dir: &Path) {
    fs::create_dir_all(dir.join("bin")).unwrap();
    fs::create_dir_all(dir.join("etc")).unwrap();
    fs::copy("/bin/busybox", dir.join("bin/busybox"))
        .expect("/bin/busybox is missing (scripts/install-deps installs busybox-static)");
    std::os::unix::fs::symlink("busybox", dir.join("bin/sh")).unwrap();
    std::os::unix::fs::symlink("busybox", dir.join("bin/ls")).unwrap();
    fs::write(dir.join("etc/hostname"), b"keel\n").unwrap();
}

fn assert_busybox_tree(t: &BTreeMap<String, String>) {
    let busybox = sha256(&fs::read("/bin/busybox").unwrap());
    assert_eq!(
        t.get("bin/busybox"),
        Some(&format!("file {busybox}")),
        "{t:?}"
    );
    assert_eq!(t.get("bin/sh").map(String::as_str), Some("-> busybox"));
    assert_eq!(t.get("bin/ls").map(String::as_str), Some("-> busybox"));
    assert_eq!(
        t.get("etc/hostname"),
        Some(&format!("file {}", sha256(b"keel\n")))
    );
    for k in t.keys() {
        assert!(
            k.starts_with("bin") || k.starts_with("etc"),
            "unexpected {k}"
        );
    }
}

/// An OCI layout written by umoci (tag `t`), with runtime defaults set by `umoci config`.
fn umoci_image(work: &Path) -> PathBuf {
    let layout = work.join("umoci");
    let bundle = work.join("bundle");
    let root = work.join("rootfs");
    make_rootfs(&root);
    let image = format!("{}:t", layout.display());
    run(Command::new("umoci")
        .arg("init")
        .arg("--layout")
        .arg(&layout));
    run(Command::new("umoci").args(["new", "--image", &image]));
    run(Command::new("umoci")
        .args(["unpack", "--rootless", "--image", &image])
        .arg(&bundle));
    run(Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", root.display()))
        .arg(bundle.join("rootfs")));
    run(Command::new("umoci")
        .args(["repack", "--image", &image])
        .arg(&bundle));
    run(Command::new("umoci").args([
        "config",
        "--image",
        &image,
        "--config.entrypoint",
        "/bin/sh",
        "--config.cmd",
        "-c",
        "--config.cmd",
        "echo hi",
        "--config.env",
        "GREETING=hello",
        "--config.workingdir",
        "/srv",
        "--config.user",
        "1000:1000",
        "--config.exposedports",
        "80/tcp",
        "--config.exposedports",
        "53/udp",
        "--config.volume",
        "/data",
        "--config.stopsignal",
        "SIGQUIT",
    ]));
    layout
}

fn assert_umoci_defaults(image: &ImageLayout) {
    let d = image.runtime_defaults();
    assert_eq!(d.entrypoint, ["/bin/sh"]);
    assert_eq!(d.cmd, ["-c", "echo hi"]);
    assert!(d.env.contains(&"GREETING=hello".to_owned()), "{:?}", d.env);
    assert_eq!(d.workdir.as_deref(), Some("/srv"));
    assert_eq!(d.user.as_deref(), Some("1000:1000"));
    assert_eq!(
        d.exposed_ports,
        [(53, PortProtocol::Udp), (80, PortProtocol::Tcp)]
    );
    assert_eq!(d.volumes, ["/data"]);
    assert_eq!(d.stop_signal.as_deref(), Some("SIGQUIT"));
}

/// A layout built by hand, independently of the crate.
struct Hand {
    dir: PathBuf,
}

impl Hand {
    fn new(dir: &Path) -> Hand {
        fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Hand {
            dir: dir.to_owned(),
        }
    }

    fn blob(&self, media_type: &str, data: &[u8]) -> Value {
        let digest = sha256(data);
        fs::write(self.dir.join("blobs/sha256").join(hex_of(&digest)), data).unwrap();
        json!({"mediaType": media_type, "digest": digest, "size": data.len()})
    }

    /// An image of `layers` (media type, blob, uncompressed tar) for `arch`; returns the
    /// manifest descriptor.
    fn image(&self, layers: &[(&str, Vec<u8>, Vec<u8>)], arch: &str) -> Value {
        let descs: Vec<Value> = layers.iter().map(|(mt, b, _)| self.blob(mt, b)).collect();
        let diff_ids: Vec<String> = layers.iter().map(|(_, _, t)| sha256(t)).collect();
        let config = json!({
            "architecture": arch, "os": "linux",
            "config": {"Cmd": ["/bin/sh"], "Env": [format!("ARCH={arch}")]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let config = self.blob(OCI_CONFIG, config.to_string().as_bytes());
        let manifest = json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": config, "layers": descs,
        });
        self.blob(OCI_MANIFEST, manifest.to_string().as_bytes())
    }

    fn index(&self, manifests: Vec<Value>) {
        let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
        fs::write(self.dir.join("index.json"), index.to_string()).unwrap();
    }

    fn blob_path(&self, desc: &Value) -> PathBuf {
        self.dir
            .join("blobs/sha256")
            .join(hex_of(desc["digest"].as_str().unwrap()))
    }
}

fn named(mut desc: Value, name: &str) -> Value {
    desc["annotations"] = json!({REF_NAME_ANNOTATION: name});
    desc
}

fn with_platform(mut desc: Value, arch: &str, variant: Option<&str>) -> Value {
    desc["platform"] = json!({"os": "linux", "architecture": arch});
    if let Some(v) = variant {
        desc["platform"]["variant"] = json!(v);
    }
    desc
}

fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).unwrap()
}

/// A tar of a whole directory (an oci-archive of a layout).
fn tar_dir(dir: &Path) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", dir).unwrap();
    b.into_inner().unwrap()
}

/// A tar with these members, in this order: `(name, Some(data))` files or
/// `(name, None)` followed by a symlink target in `links`.
fn archive_of(members: &[(&str, Vec<u8>)], symlinks: &[(&str, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o444);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    for (name, target) in symlinks {
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_mode(0o777);
        h.set_entry_type(tar::EntryType::Symlink);
        b.append_link(&mut h, name, target).unwrap();
    }
    b.into_inner().unwrap()
}

/// The three layers of the compression tests: gzip, zstd and plain.
fn three_layers() -> Vec<(&'static str, Vec<u8>, Vec<u8>)> {
    let a = tar_of(&[("a.txt", b"gzip layer\n")]);
    let b = tar_of(&[("b.txt", b"zstd layer\n")]);
    let c = tar_of(&[("c.txt", b"plain layer\n")]);
    vec![
        (LAYER_GZIP, gzip(&a), a),
        (LAYER_ZSTD, zstd(&b), b),
        (LAYER_TAR, c.clone(), c),
    ]
}

fn assert_three_layers(t: &BTreeMap<String, String>) {
    assert_eq!(
        t.get("a.txt"),
        Some(&format!("file {}", sha256(b"gzip layer\n")))
    );
    assert_eq!(
        t.get("b.txt"),
        Some(&format!("file {}", sha256(b"zstd layer\n")))
    );
    assert_eq!(
        t.get("c.txt"),
        Some(&format!("file {}", sha256(b"plain layer\n")))
    );
}

/// A docker-archive (classic `docker save` layout, plus a `blobs/sha256` member and a
/// symlinked layer as newer and deduplicating writers make) of the three layers.
fn docker_archive(layers: &[(&str, Vec<u8>, Vec<u8>)]) -> (Vec<u8>, String) {
    docker_archive_with(layers, hex_of(&sha256(&layers[2].1)))
}

/// [`docker_archive`] with the plain layer stored as `blobs/sha256/<plain_hex>`.
fn docker_archive_with(layers: &[(&str, Vec<u8>, Vec<u8>)], plain_hex: &str) -> (Vec<u8>, String) {
    let diff_ids: Vec<String> = layers.iter().map(|(_, _, t)| sha256(t)).collect();
    let config = json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/bin/true"], "ExposedPorts": {"8080/tcp": {}}, "StopSignal": "SIGINT"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })
    .to_string()
    .into_bytes();
    let config_digest = sha256(&config);
    let config_name = format!("{}.json", hex_of(&config_digest));
    let zstd_name = format!("{}.tar", "1".repeat(64));
    let plain_name = format!("blobs/sha256/{plain_hex}");
    let manifest = json!([{
        "Config": config_name,
        "RepoTags": ["example.com/three:1"],
        "Layers": ["aaaa/layer.tar", zstd_name, "cccc/layer.tar"],
    }])
    .to_string()
    .into_bytes();
    let members = vec![
        ("aaaa/layer.tar", layers[0].1.clone()),
        (zstd_name.as_str(), layers[1].1.clone()),
        (plain_name.as_str(), layers[2].1.clone()),
        (config_name.as_str(), config),
        ("manifest.json", manifest),
    ];
    let target = format!("../{plain_name}");
    (
        archive_of(&members, &[("cccc/layer.tar", &target)]),
        config_digest,
    )
}

// ---------------------------------------------------------------------------------------
// Images written by umoci and skopeo.

#[test]
fn umoci_layout_copies_into_a_shared_layout_and_unpacks() {
    let work = scratch();
    let layout = umoci_image(work.path());
    let image = ImageLayout::open_ref(&layout, "t").unwrap();
    assert_umoci_defaults(&image);

    let shared = work.path().join("shared");
    let digest = copy_image(&image, &shared, "umoci").unwrap();
    assert_eq!(digest, image.manifest_digest());
    let copied = ImageLayout::open_ref(&shared, "umoci").unwrap();
    assert_eq!(copied.manifest_digest(), digest);
    assert_umoci_defaults(&copied);
    assert_busybox_tree(&unpacked(&copied, &work.path().join("store")));

    // The same image again, under its name and another: nothing new is stored.
    let blobs = blob_names(&shared);
    assert_eq!(blobs.len(), 3, "manifest, config, one layer: {blobs:?}");
    copy_image(&image, &shared, "umoci").unwrap();
    copy_image(&image, &shared, "again").unwrap();
    assert_eq!(blob_names(&shared), blobs);
    assert_eq!(index_refs(&shared), ["umoci", "again"]);
    assert_no_temp_files(&shared);
    // With two images, open() needs a name.
    assert!(matches!(
        ImageLayout::open(&shared),
        Err(ImageError::AmbiguousManifest { count: 2, .. })
    ));
}

#[test]
fn skopeo_layout_and_archives_import_into_one_layout() {
    let work = scratch();
    let w = work.path();
    let layout = umoci_image(w);
    let src = format!("oci:{}:t", layout.display());
    let skopeo_layout = w.join("skopeo");
    let skopeo_zstd = w.join("skopeo-zstd");
    let oci_archive = w.join("oci.tar");
    let docker_archive = w.join("docker.tar");
    run(Command::new("skopeo")
        .args(["copy", &src])
        .arg(format!("oci:{}:t", skopeo_layout.display())));
    run(Command::new("skopeo")
        .args(["copy", "--dest-compress-format", "zstd", &src])
        .arg(format!("oci:{}:t", skopeo_zstd.display())));
    run(Command::new("skopeo")
        .args(["copy", &src])
        .arg(format!("oci-archive:{}:t", oci_archive.display())));
    run(Command::new("skopeo").args(["copy", &src]).arg(format!(
        "docker-archive:{}:example.com/keel/busybox:t",
        docker_archive.display()
    )));

    let shared = w.join("shared");
    let from_layout = ImageLayout::open_ref(&skopeo_layout, "t").unwrap();
    let d_layout = copy_image(&from_layout, &shared, "skopeo-layout").unwrap();
    let zstd_image = ImageLayout::open_ref(&skopeo_zstd, "t").unwrap();
    assert_eq!(zstd_image.layers()[0].media_type, LAYER_ZSTD);
    let d_zstd = copy_image(&zstd_image, &shared, "skopeo-zstd").unwrap();
    let d_oci = import_archive(&oci_archive, Some("t"), &shared, "oci-archive").unwrap();
    let d_docker = import_archive(&docker_archive, None, &shared, "docker-archive").unwrap();
    // Docker references: full, normalised, by tag alone, by image id.
    let image_id = ImageLayout::open_ref(&shared, "docker-archive")
        .unwrap()
        .manifest()
        .config()
        .digest()
        .to_string();
    for r in [
        "example.com/keel/busybox:t",
        "keel/busybox:t",
        "t",
        &image_id,
    ] {
        let d = import_archive(&docker_archive, Some(r), &shared, "docker-again").unwrap();
        assert_eq!(d, d_docker, "{r}");
    }
    match import_archive(&docker_archive, Some("nope"), &shared, "x") {
        Err(e @ ImageError::RefNotFound { .. }) => {
            eprintln!("refused: {e}");
            assert!(e.to_string().contains("example.com/keel/busybox:t"), "{e}")
        }
        other => panic!("unexpected {other:?}"),
    }
    match import_archive(&oci_archive, Some("nope"), &shared, "x") {
        Err(e @ ImageError::RefNotFound { .. }) => assert!(e.to_string().contains("\"t\""), "{e}"),
        other => panic!("unexpected {other:?}"),
    }

    // skopeo keeps umoci's manifest when copying between OCI forms.
    let umoci_digest = ImageLayout::open_ref(&layout, "t")
        .unwrap()
        .manifest_digest()
        .to_owned();
    assert_eq!(d_layout, umoci_digest);
    assert_eq!(d_oci, umoci_digest);

    let store = w.join("store");
    for (name, digest) in [
        ("skopeo-layout", &d_layout),
        ("skopeo-zstd", &d_zstd),
        ("oci-archive", &d_oci),
        ("docker-archive", &d_docker),
    ] {
        let image = ImageLayout::open_ref(&shared, name).unwrap();
        assert_eq!(image.manifest_digest(), digest, "{name}");
        assert_umoci_defaults(&image);
        assert_busybox_tree(&unpacked(&image, &store));
    }
    // The docker-archive's layer is a plain tar whose digest is its diff_id.
    let docker = ImageLayout::open_ref(&shared, "docker-archive").unwrap();
    assert_eq!(docker.layers()[0].media_type, LAYER_TAR);
    assert_eq!(
        docker.layers()[0].digest,
        docker.config().rootfs().diff_ids()[0]
    );

    // One blob store: the gzip layer shared by three of the images is stored once. Blobs:
    // umoci's manifest, config and gzip layer; the zstd manifest and layer (config shared);
    // the docker manifest and plain layer (config shared).
    assert_eq!(blob_names(&shared).len(), 7, "{:?}", blob_names(&shared));
    assert_no_temp_files(&shared);
    assert_eq!(
        index_refs(&shared),
        [
            "skopeo-layout",
            "skopeo-zstd",
            "oci-archive",
            "docker-archive",
            "docker-again"
        ]
    );
}

// ---------------------------------------------------------------------------------------
// Multi-platform indexes, references.

#[test]
fn multi_arch_index_picks_amd64_and_digests_pick_exactly() {
    let work = scratch();
    let dir = work.path().join("multi");
    let hand = Hand::new(&dir);
    let amd_tar = tar_of(&[("arch", b"amd64\n")]);
    let arm_tar = tar_of(&[("arch", b"arm64\n")]);
    let amd = hand.image(&[(LAYER_TAR, amd_tar.clone(), amd_tar)], "amd64");
    let arm = hand.image(&[(LAYER_TAR, arm_tar.clone(), arm_tar)], "arm64");
    let amd_digest = amd["digest"].as_str().unwrap().to_owned();
    let arm_digest = arm["digest"].as_str().unwrap().to_owned();
    // arm64 first, and an amd64 v3 variant before the baseline one, so neither order nor
    // "first amd64" decides.
    let mut amd_v3 = with_platform(amd.clone(), "amd64", Some("v3"));
    amd_v3["digest"] = json!(arm_digest.clone());
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        with_platform(arm.clone(), "arm64", Some("v8")),
        amd_v3,
        with_platform(amd.clone(), "amd64", None),
    ]});
    let index = hand.blob(OCI_INDEX, index.to_string().as_bytes());
    let index_digest = index["digest"].as_str().unwrap().to_owned();
    // A Docker manifest list nested in an OCI index.
    let list = json!({"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": [
        with_platform(arm.clone(), "arm64", None),
        with_platform(amd.clone(), "amd64", None),
    ]});
    let list = hand.blob(DOCKER_LIST, list.to_string().as_bytes());
    let outer = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [list]});
    let outer = hand.blob(OCI_INDEX, outer.to_string().as_bytes());
    // Only foreign platforms.
    let foreign = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        with_platform(arm.clone(), "arm64", Some("v8")),
        with_platform(arm.clone(), "s390x", None),
    ]});
    let foreign = hand.blob(OCI_INDEX, foreign.to_string().as_bytes());
    hand.index(vec![
        named(index, "example.com/multi:1.0"),
        named(outer, "nested"),
        named(foreign, "foreign"),
    ]);

    let arch = |image: &ImageLayout| image.config().architecture().to_string();
    for r in [
        "example.com/multi:1.0",
        "1.0",
        "multi:1.0",
        "nested",
        &index_digest,
    ] {
        let image = ImageLayout::open_ref(&dir, r).unwrap();
        assert_eq!(image.manifest_digest(), amd_digest, "{r}");
        assert_eq!(arch(&image), "amd64");
    }
    // By digest: exactly that manifest, even a foreign one.
    let image = ImageLayout::open_ref(&dir, &arm_digest).unwrap();
    assert_eq!(image.manifest_digest(), arm_digest);
    assert_eq!(arch(&image), "arm64");
    match ImageLayout::open_ref(&dir, "foreign") {
        Err(e @ ImageError::NoMatchingPlatform { .. }) => {
            eprintln!("refused: {e}");
            let msg = e.to_string();
            assert!(
                msg.contains("linux/arm64/v8") && msg.contains("linux/s390x"),
                "{msg}"
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    let missing = format!("sha256:{}", "0".repeat(64));
    assert!(matches!(
        ImageLayout::open_ref(&dir, &missing),
        Err(ImageError::RefNotFound { .. })
    ));
    match ImageLayout::open(&dir) {
        Err(e @ ImageError::AmbiguousManifest { .. }) => {
            eprintln!("refused: {e}");
            assert!(e.to_string().contains("nested"), "{e}")
        }
        other => panic!("unexpected {other:?}"),
    }

    // The same from an oci-archive, and copied: only the selected platform comes along.
    let archive = work.path().join("multi.tar");
    fs::write(&archive, tar_dir(&dir)).unwrap();
    let dest = work.path().join("dest");
    assert_eq!(
        import_archive(&archive, Some("1.0"), &dest, "amd").unwrap(),
        amd_digest
    );
    assert_eq!(
        import_archive(&archive, Some(&arm_digest), &dest, "arm").unwrap(),
        arm_digest
    );
    assert!(matches!(
        import_archive(&archive, Some("foreign"), &dest, "x"),
        Err(ImageError::NoMatchingPlatform { .. })
    ));
    let amd_image = ImageLayout::open_ref(&dest, "amd").unwrap();
    assert_eq!(amd_image.manifest_digest(), amd_digest);
    let t = unpacked(&amd_image, &work.path().join("store"));
    assert_eq!(t.get("arch"), Some(&format!("file {}", sha256(b"amd64\n"))));
    assert_eq!(arch(&ImageLayout::open_ref(&dest, "arm").unwrap()), "arm64");
    // Two manifests, two configs, two layers: no index blob.
    assert_eq!(blob_names(&dest).len(), 6);

    // index.json itself as the multi-platform index (no names, only platforms).
    let flat = Hand::new(&work.path().join("flat"));
    let amd = flat.image(
        &[(LAYER_TAR, tar_of(&[("a", b"")]), tar_of(&[("a", b"")]))],
        "amd64",
    );
    let arm = flat.image(
        &[(LAYER_TAR, tar_of(&[("b", b"")]), tar_of(&[("b", b"")]))],
        "arm64",
    );
    flat.index(vec![
        with_platform(arm, "arm64", None),
        with_platform(amd.clone(), "amd64", None),
    ]);
    assert_eq!(
        ImageLayout::open(&flat.dir).unwrap().manifest_digest(),
        amd["digest"].as_str().unwrap()
    );

    let copied = work.path().join("copied");
    let nested = ImageLayout::open_ref(&dir, "nested").unwrap();
    assert_eq!(copy_image(&nested, &copied, "n").unwrap(), amd_digest);
    assert_eq!(
        ImageLayout::open(&copied).unwrap().manifest_digest(),
        amd_digest
    );
}

// ---------------------------------------------------------------------------------------
// Layer compressions.

#[test]
fn gzip_zstd_and_plain_layers() {
    let work = scratch();
    let w = work.path();
    let layers = three_layers();
    let dir = w.join("hand");
    let hand = Hand::new(&dir);
    let m = hand.image(&layers, "amd64");
    hand.index(vec![named(m.clone(), "three")]);

    let image = ImageLayout::open(&dir).unwrap();
    let types: Vec<String> = image
        .layers()
        .iter()
        .map(|l| l.media_type.clone())
        .collect();
    assert_eq!(types, [LAYER_GZIP, LAYER_ZSTD, LAYER_TAR]);
    assert_three_layers(&unpacked(&image, &w.join("store1")));

    let dest = w.join("dest");
    copy_image(&image, &dest, "copied").unwrap();
    assert_three_layers(&unpacked(
        &ImageLayout::open_ref(&dest, "copied").unwrap(),
        &w.join("store2"),
    ));

    // oci-archive, plain and gzip-compressed.
    let archive = tar_dir(&dir);
    fs::write(w.join("oci.tar"), &archive).unwrap();
    fs::write(w.join("oci.tar.gz"), gzip(&archive)).unwrap();
    import_archive(&w.join("oci.tar"), None, &dest, "oci").unwrap();
    import_archive(&w.join("oci.tar.gz"), Some("three"), &dest, "oci-gz").unwrap();

    // docker-archive, plain and zstd-compressed: the layers keep their compression.
    let (docker, config_digest) = docker_archive(&layers);
    fs::write(w.join("docker.tar"), &docker).unwrap();
    fs::write(w.join("docker.tar.zst"), zstd(&docker)).unwrap();
    let d1 = import_archive(&w.join("docker.tar"), None, &dest, "docker").unwrap();
    let d2 = import_archive(
        &w.join("docker.tar.zst"),
        Some("example.com/three:1"),
        &dest,
        "docker-zst",
    )
    .unwrap();
    assert_eq!(d1, d2);
    for name in ["oci", "oci-gz", "docker", "docker-zst"] {
        let image = ImageLayout::open_ref(&dest, name).unwrap();
        let types: Vec<String> = image
            .layers()
            .iter()
            .map(|l| l.media_type.clone())
            .collect();
        assert_eq!(types, [LAYER_GZIP, LAYER_ZSTD, LAYER_TAR], "{name}");
        assert_three_layers(&unpacked(&image, &w.join("store3")));
    }
    let docker = ImageLayout::open_ref(&dest, "docker").unwrap();
    assert_eq!(
        docker.manifest().config().digest().to_string(),
        config_digest
    );
    let d = docker.runtime_defaults();
    assert_eq!(d.entrypoint, ["/bin/true"]);
    assert_eq!(d.exposed_ports, [(8080, PortProtocol::Tcp)]);
    assert_eq!(d.stop_signal.as_deref(), Some("SIGINT"));
    // Layers are the same blobs whichever way they came; two configs, two manifests.
    assert_eq!(blob_names(&dest).len(), 7, "{:?}", blob_names(&dest));
    assert_no_temp_files(&dest);
}

#[test]
fn docker_archive_with_several_images_needs_a_reference() {
    let work = scratch();
    let w = work.path();
    let layer = tar_of(&[("f", b"x")]);
    let mut members = vec![("l/layer.tar", layer.clone())];
    let mut entries = Vec::new();
    let mut names = Vec::new();
    for tag in ["a:1", "b:1"] {
        let config = json!({
            "architecture": "amd64", "os": "linux", "config": {"Env": [format!("TAG={tag}")]},
            "rootfs": {"type": "layers", "diff_ids": [sha256(&layer)]},
        })
        .to_string()
        .into_bytes();
        let name = format!("{}.json", hex_of(&sha256(&config)));
        entries.push(json!({"Config": name, "RepoTags": [tag], "Layers": ["l/layer.tar"]}));
        names.push((name, config));
    }
    for (n, c) in &names {
        members.push((n.as_str(), c.clone()));
    }
    members.push((
        "manifest.json",
        Value::Array(entries).to_string().into_bytes(),
    ));
    let archive = w.join("two.tar");
    fs::write(&archive, archive_of(&members, &[])).unwrap();
    let dest = w.join("dest");
    match import_archive(&archive, None, &dest, "x") {
        Err(e @ ImageError::AmbiguousManifest { .. }) => {
            eprintln!("refused: {e}");
            let msg = e.to_string();
            assert!(msg.contains("a:1") && msg.contains("b:1"), "{msg}");
        }
        other => panic!("unexpected {other:?}"),
    }
    import_archive(&archive, Some("b:1"), &dest, "b").unwrap();
    let b = ImageLayout::open_ref(&dest, "b").unwrap();
    assert_eq!(b.runtime_defaults().env, ["TAG=b:1"]);
}

// ---------------------------------------------------------------------------------------
// Refusals: each names the blob.

/// A one-layer gzip image laid out by hand; returns the layer's descriptor.
fn simple_layout(dir: &Path) -> (Hand, Value) {
    let hand = Hand::new(dir);
    let t = tar_of(&[("hello", &[b'h'; 4096][..])]);
    let layer = gzip(&t);
    let m = hand.image(&[(LAYER_GZIP, layer.clone(), t)], "amd64");
    hand.index(vec![named(m, "img")]);
    let desc = json!({"digest": sha256(&layer)});
    (hand, desc)
}

/// The refusal left the destination without the image and without temporary files.
fn assert_not_imported(dest: &Path) {
    if dest.join("index.json").exists() {
        assert!(index_refs(dest).is_empty(), "{:?}", index_refs(dest));
    }
    if dest.join("blobs/sha256").exists() {
        assert_no_temp_files(dest);
    }
}

#[test]
fn tampered_blob_is_refused() {
    let work = scratch();
    let w = work.path();
    let (hand, layer) = simple_layout(&w.join("src"));
    let layer_hex = hex_of(layer["digest"].as_str().unwrap()).to_owned();
    let image = ImageLayout::open(&hand.dir).unwrap();
    // Same size, one byte changed in the middle of the compressed data.
    let path = hand.blob_path(&layer);
    let mut data = fs::read(&path).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0x55;
    fs::write(&path, &data).unwrap();

    let dest = w.join("dest");
    match copy_image(&image, &dest, "x") {
        Err(e @ ImageError::DigestMismatch { .. }) => {
            eprintln!("refused: {e}");
            assert!(e.to_string().contains(&layer_hex), "{e}")
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_not_imported(&dest);

    let archive = w.join("oci.tar");
    fs::write(&archive, tar_dir(&hand.dir)).unwrap();
    match import_archive(&archive, None, &dest, "x") {
        Err(e @ ImageError::DigestMismatch { .. }) => {
            eprintln!("refused: {e}");
            let msg = e.to_string();
            assert!(msg.contains(&format!("blobs/sha256/{layer_hex}")), "{msg}");
            assert!(msg.contains("oci.tar"), "{msg}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_not_imported(&dest);

    // docker-archive: the layer no longer matches its diff_id.
    let layers = three_layers();
    let (docker, _) = docker_archive(&layers);
    let mut docker = docker;
    let pos = docker
        .windows(12)
        .position(|w| w == b"plain layer\n")
        .unwrap();
    docker[pos] = b'P';
    let archive = w.join("docker.tar");
    fs::write(&archive, docker).unwrap();
    match import_archive(&archive, None, &dest, "x") {
        Err(e @ ImageError::DigestMismatch { .. }) => {
            eprintln!("refused: {e}");
            let msg = e.to_string();
            assert!(msg.contains("cccc/layer.tar"), "{msg}");
            assert!(msg.contains(&sha256(&layers[2].2)), "{msg}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_not_imported(&dest);
}

#[test]
fn wrong_digest_is_refused() {
    let work = scratch();
    let w = work.path();
    let dest = w.join("dest");

    // index.json names the manifest by a digest its content does not have (the blob is
    // stored under that name too, so only hashing can tell).
    let (hand, _) = simple_layout(&w.join("src"));
    let index: Value =
        serde_json::from_slice(&fs::read(hand.dir.join("index.json")).unwrap()).unwrap();
    let real = index["manifests"][0]["digest"].as_str().unwrap().to_owned();
    let wrong = format!("sha256:{}", "e".repeat(64));
    fs::copy(
        hand.dir.join("blobs/sha256").join(hex_of(&real)),
        hand.dir.join("blobs/sha256").join(hex_of(&wrong)),
    )
    .unwrap();
    let text = fs::read_to_string(hand.dir.join("index.json"))
        .unwrap()
        .replace(&real, &wrong);
    fs::write(hand.dir.join("index.json"), text).unwrap();
    for r in [ImageLayout::open(&hand.dir).map(|_| ()), {
        let archive = w.join("oci.tar");
        fs::write(&archive, tar_dir(&hand.dir)).unwrap();
        import_archive(&archive, None, &dest, "x").map(|_| ())
    }] {
        match r {
            Err(e @ ImageError::DigestMismatch { .. }) => {
                eprintln!("refused: {e}");
                let msg = e.to_string();
                assert!(msg.contains(hex_of(&wrong)) && msg.contains(&real), "{msg}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_not_imported(&dest);

    // docker-archive: a config whose name is not its digest, and a layer member named
    // blobs/sha256/<hex> whose content has another digest.
    let layers = three_layers();
    let (docker, config_digest) = docker_archive(&layers);
    let bad_config = format!("{}.json", "d".repeat(64));
    let good_config = format!("{}.json", hex_of(&config_digest));
    let renamed = replace_all(&docker, good_config.as_bytes(), bad_config.as_bytes());
    let archive = w.join("docker-config.tar");
    fs::write(&archive, renamed).unwrap();
    match import_archive(&archive, None, &dest, "x") {
        Err(e @ ImageError::DigestMismatch { .. }) => {
            eprintln!("refused: {e}");
            assert!(e.to_string().contains(&bad_config), "{e}")
        }
        other => panic!("unexpected {other:?}"),
    }
    let wrong_hex = "f".repeat(64);
    let (misnamed, _) = docker_archive_with(&layers, &wrong_hex);
    let archive = w.join("docker-layer.tar");
    fs::write(&archive, misnamed).unwrap();
    match import_archive(&archive, None, &dest, "x") {
        Err(e @ ImageError::DigestMismatch { .. }) => {
            eprintln!("refused: {e}");
            assert!(
                e.to_string().contains(&format!("blobs/sha256/{wrong_hex}")),
                "{e}"
            )
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_not_imported(&dest);
}

/// Replaces every occurrence of `from` by `to` (same length, so tar headers stay valid
/// once their checksums are fixed).
fn replace_all(data: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let mut out = data.to_vec();
    let mut i = 0;
    while i + from.len() <= out.len() {
        if &out[i..i + from.len()] == from {
            out[i..i + from.len()].copy_from_slice(to);
            i += from.len();
        } else {
            i += 1;
        }
    }
    // Names live in 512-byte headers: recompute every header checksum (found in the
    // original, whose checksums are still valid; the offsets are the same).
    let mut archive = tar::Archive::new(data);
    let offsets: Vec<u64> = archive
        .entries()
        .unwrap()
        .map(|e| e.unwrap().raw_header_position())
        .collect();
    for off in offsets {
        let off = off as usize;
        let mut header = tar::Header::new_old();
        header.as_mut_bytes().copy_from_slice(&out[off..off + 512]);
        header.set_cksum();
        out[off..off + 512].copy_from_slice(header.as_bytes());
    }
    out
}

#[test]
fn truncated_layer_is_refused() {
    let work = scratch();
    let w = work.path();
    let dest = w.join("dest");
    let (hand, layer) = simple_layout(&w.join("src"));
    let layer_hex = hex_of(layer["digest"].as_str().unwrap()).to_owned();
    let image = ImageLayout::open(&hand.dir).unwrap();
    let path = hand.blob_path(&layer);
    let full = fs::read(&path).unwrap();
    let cut = full.len() / 2;
    fs::write(&path, &full[..cut]).unwrap();

    // In a layout.
    match copy_image(&image, &dest, "x") {
        Err(e @ ImageError::SizeMismatch { .. }) => {
            eprintln!("refused: {e}");
            assert!(e.to_string().contains(&layer_hex), "{e}")
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_not_imported(&dest);

    // In an oci-archive whose member is short.
    let archive = w.join("short-member.tar");
    fs::write(&archive, tar_dir(&hand.dir)).unwrap();
    match import_archive(&archive, None, &dest, "x") {
        Err(e @ ImageError::SizeMismatch { .. }) => {
            eprintln!("refused: {e}");
            assert!(
                e.to_string().contains(&format!("blobs/sha256/{layer_hex}")),
                "{e}"
            )
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_not_imported(&dest);

    // An oci-archive cut off inside the layer (the layer is the biggest member, and the
    // tar crate orders directory entries by name, so it is last but for small JSON files:
    // rebuild with the layer last to be sure).
    fs::write(&path, &full).unwrap();
    let mut members: Vec<(String, Vec<u8>)> = vec![
        (
            "oci-layout".into(),
            fs::read(hand.dir.join("oci-layout")).unwrap(),
        ),
        (
            "index.json".into(),
            fs::read(hand.dir.join("index.json")).unwrap(),
        ),
    ];
    let mut layer_member = None;
    for name in blob_names(&hand.dir) {
        let data = fs::read(hand.dir.join("blobs/sha256").join(&name)).unwrap();
        let member = format!("blobs/sha256/{name}");
        if name == layer_hex {
            layer_member = Some((member, data));
        } else {
            members.push((member, data));
        }
    }
    members.push(layer_member.unwrap());
    let refs: Vec<(&str, Vec<u8>)> = members
        .iter()
        .map(|(n, d)| (n.as_str(), d.clone()))
        .collect();
    let whole = archive_of(&refs, &[]);
    let data_end = whole.len() - 1024 - (512 - full.len() % 512) % 512;
    let archive = w.join("cut.tar");
    fs::write(&archive, &whole[..data_end - full.len() / 2]).unwrap();
    match import_archive(&archive, None, &dest, "x") {
        Err(e) => {
            eprintln!("refused: {e}");
            assert!(e.to_string().contains(&layer_hex), "{e}")
        }
        Ok(d) => panic!("imported a truncated archive as {d}"),
    }
    assert_not_imported(&dest);

    // A docker-archive whose gzip layer is cut short (its tar header says so too).
    let layers = three_layers();
    let mut short = layers.clone();
    let len = short[0].1.len();
    short[0].1.truncate(len - 10);
    let (docker, _) = docker_archive(&short);
    let archive = w.join("docker.tar");
    fs::write(&archive, docker).unwrap();
    match import_archive(&archive, None, &dest, "x") {
        Err(e) => {
            eprintln!("refused: {e}");
            assert!(e.to_string().contains("aaaa/layer.tar"), "{e}")
        }
        Ok(d) => panic!("imported a truncated layer as {d}"),
    }
    assert_not_imported(&dest);
}
