//! Host tests of `keel_image::registry::pull`:
//! - against Debian's `docker-registry` (distribution 2.8) on loopback with htpasswd basic
//!   auth, filled by `skopeo copy` (OCI and Docker v2 manifests, a multi-platform index),
//!   over plain HTTP and over TLS with a private CA;
//! - against a tiny in-test HTTP server that speaks the Bearer token flow, redirects blob
//!   downloads to another host name, answers 503 once and cuts a blob download halfway, to
//!   check retries, resumption with `Range`, and that credentials stay on the registry host.
//!
//! `docker-registry` and `skopeo` must be installed (Debian packages `docker-registry` and
//! `skopeo`): the tests fail, not skip, without them.

#![cfg(all(feature = "pull", feature = "builder"))]

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use keel_image::import::{ImageConfigSpec, LayerSource, import};
use keel_image::layout::ImageLayout;
use keel_image::registry::{
    BlobKind, BlobState, Progress, PullOptions, Reference, RegistryAuth, RegistryError, pull,
};
use keel_image::unpack::unpack_layer;
use sha2::{Digest, Sha256};

const USER: &str = "keel";
const PASS: &str = "s3cret-pass";

fn sha256(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    let mut s = String::from("sha256:");
    for b in d.iter() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn require_tool(path: &str, package: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} is missing: install the Debian package `{package}` (scripts/install-deps)"
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `docker-registry` process, killed (by pid) and reaped when dropped.
struct RegistryProcess {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for RegistryProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RegistryProcess {
    /// Starts docker-registry on 127.0.0.1 with htpasswd auth (`USER`/`PASS`) and, if
    /// given, TLS with that certificate and key (PEM).
    fn start(tls: Option<(&str, &str)>) -> Self {
        require_tool("/usr/bin/docker-registry", "docker-registry");
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("storage");
        fs::create_dir(&storage).unwrap();
        let htpasswd = dir.path().join("htpasswd");
        let hash = bcrypt::hash(PASS, 5).unwrap();
        fs::write(&htpasswd, format!("{USER}:{hash}\n")).unwrap();
        let port = free_port();
        let mut tls_yaml = String::new();
        if let Some((cert, key)) = tls {
            let cert_path = dir.path().join("cert.pem");
            let key_path = dir.path().join("key.pem");
            fs::write(&cert_path, cert).unwrap();
            fs::write(&key_path, key).unwrap();
            tls_yaml = format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert_path.display(),
                key_path.display()
            );
        }
        let config = format!(
            "version: 0.1\n\
             log:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: keel-test\n{tls_yaml}\
             auth:\n  htpasswd:\n    realm: basic-realm\n    path: {}\n",
            storage.display(),
            htpasswd.display()
        );
        let config_path = dir.path().join("config.yml");
        fs::write(&config_path, config).unwrap();
        let log = fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut reg = RegistryProcess {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = reg.child.try_wait().unwrap() {
                let log = fs::read_to_string(reg._dir.path().join("registry.log")).unwrap();
                panic!("docker-registry exited with {status}:\n{log}");
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "docker-registry did not listen");
            thread::sleep(Duration::from_millis(50));
        }
        reg
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// `skopeo copy` into the registry (with the test credentials).
fn skopeo_push(src: &str, dest: &str, extra: &[&str]) {
    require_tool("/usr/bin/skopeo", "skopeo");
    let out = Command::new("/usr/bin/skopeo")
        .args(["--insecure-policy", "copy", "--quiet"])
        .args(["--dest-tls-verify=false", "--dest-creds"])
        .arg(format!("{USER}:{PASS}"))
        .args(extra)
        .arg(src)
        .arg(dest)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo copy {src} {dest} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A two-layer source image in an OCI layout, named `v1`.
fn source_layout(root: &Path) -> PathBuf {
    let a = root.join("a");
    let b = root.join("b");
    fs::create_dir_all(a.join("etc")).unwrap();
    fs::create_dir_all(b.join("srv")).unwrap();
    fs::write(a.join("etc/greeting"), "hello from layer a\n").unwrap();
    // Enough incompressible-ish data that the layer is bigger than one read.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let big: Vec<u8> = (0..300_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    fs::write(b.join("srv/data.bin"), &big).unwrap();
    let layout = root.join("src-layout");
    let spec = ImageConfigSpec {
        cmd: Some(vec!["/bin/sh".into()]),
        ..Default::default()
    };
    import(
        &[LayerSource::Dir(a), LayerSource::Dir(b)],
        &spec,
        Some("v1"),
        &layout,
    )
    .unwrap();
    layout
}

fn creds() -> RegistryAuth {
    RegistryAuth {
        username: Some(USER.into()),
        password: Some(PASS.into()),
        insecure: true,
        ..Default::default()
    }
}

fn options(auth: RegistryAuth, log: &Arc<Mutex<Vec<Progress>>>) -> PullOptions {
    let log = Arc::clone(log);
    PullOptions {
        auth,
        retries: 2,
        progress: Some(Box::new(move |p| log.lock().unwrap().push(p))),
    }
}

/// Opens `name` in the layout, unpacks (and so verifies) every layer, and checks the files.
fn check_pulled(layout: &Path, name: &str, digest: &str) {
    let image = ImageLayout::open_ref(layout, name).unwrap();
    assert_eq!(image.manifest_digest(), digest);
    let layers = image.layers();
    assert_eq!(layers.len(), 2);
    let out = tempfile::tempdir().unwrap();
    for (i, layer) in layers.iter().enumerate() {
        let bytes = fs::read(&layer.path).unwrap();
        assert_eq!(sha256(&bytes), layer.digest);
        let dir = out.path().join(i.to_string());
        fs::create_dir(&dir).unwrap();
        unpack_layer(layer, &dir).unwrap();
    }
    assert_eq!(
        fs::read_to_string(out.path().join("0/etc/greeting")).unwrap(),
        "hello from layer a\n"
    );
    assert_eq!(
        fs::metadata(out.path().join("1/srv/data.bin"))
            .unwrap()
            .len(),
        300_000
    );
    // No partial download is left behind.
    for e in fs::read_dir(layout.join("blobs/sha256")).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert!(!name.ends_with(".partial"), "left over: {name}");
    }
}

#[test]
fn pulls_from_docker_registry_with_basic_auth() {
    let reg = RegistryProcess::start(None);
    let work = tempfile::tempdir().unwrap();
    let src = source_layout(work.path());
    let host = reg.host();
    skopeo_push(
        &format!("oci:{}:v1", src.display()),
        &format!("docker://{host}/test/img:v1"),
        &[],
    );
    skopeo_push(
        &format!("oci:{}:v1", src.display()),
        &format!("docker://{host}/test/img:docker"),
        &["--format", "v2s2"],
    );

    let dest = work.path().join("pulled");
    let log = Arc::new(Mutex::new(Vec::new()));

    // OCI manifest, by tag.
    let reference: Reference = format!("{host}/test/img:v1").parse().unwrap();
    let digest = pull(&reference, options(creds(), &log), &dest, "img:v1").unwrap();
    check_pulled(&dest, "img:v1", &digest);
    let src_image = ImageLayout::open_ref(&src, "v1").unwrap();
    assert_eq!(digest, src_image.manifest_digest());
    {
        let log = log.lock().unwrap();
        let done: Vec<_> = log.iter().filter(|p| p.state == BlobState::Done).collect();
        assert_eq!(done.len(), 3, "config and two layers: {log:?}");
        assert!(done.iter().all(|p| p.done == p.total));
        assert!(
            log.iter()
                .any(|p| matches!(p.kind, BlobKind::Layer { index: 1, count: 2 }))
        );
    }

    // Docker v2 manifest into the same layout: the layers are already there.
    log.lock().unwrap().clear();
    let reference: Reference = format!("{host}/test/img:docker").parse().unwrap();
    let docker_digest = pull(&reference, options(creds(), &log), &dest, "img:docker").unwrap();
    assert_ne!(docker_digest, digest);
    check_pulled(&dest, "img:docker", &docker_digest);
    let manifest = fs::read_to_string(
        dest.join("blobs/sha256")
            .join(docker_digest.trim_start_matches("sha256:")),
    )
    .unwrap();
    assert!(manifest.contains("application/vnd.docker.distribution.manifest.v2+json"));
    {
        let log = log.lock().unwrap();
        let present = log
            .iter()
            .filter(|p| p.state == BlobState::Present && matches!(p.kind, BlobKind::Layer { .. }))
            .count();
        assert_eq!(present, 2, "layers deduplicated: {log:?}");
    }
    // The first image is still there.
    check_pulled(&dest, "img:v1", &digest);

    // By digest, replacing the name's earlier entry.
    let reference: Reference = format!("{host}/test/img@{digest}").parse().unwrap();
    let again = pull(&reference, options(creds(), &log), &dest, "img:docker").unwrap();
    assert_eq!(again, digest);
    check_pulled(&dest, "img:docker", &digest);
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(dest.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 2);

    // A wrong password and no credentials are refused clearly, without retries.
    let reference: Reference = format!("{host}/test/img:v1").parse().unwrap();
    let wrong = RegistryAuth {
        password: Some("wrong".into()),
        ..creds()
    };
    let started = Instant::now();
    let err = pull(
        &reference,
        options(wrong, &log),
        &work.path().join("x"),
        "x",
    )
    .unwrap_err();
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "unauthorized: check [registries.\"{host}\"] username/password"
        )),
        "{msg}"
    );
    assert!(started.elapsed() < Duration::from_secs(5), "no retries");
    let anonymous = RegistryAuth {
        insecure: true,
        ..Default::default()
    };
    let err = pull(
        &reference,
        options(anonymous, &log),
        &work.path().join("x"),
        "x",
    )
    .unwrap_err();
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err:?}");

    // An unknown tag.
    let reference: Reference = format!("{host}/test/img:nope").parse().unwrap();
    let err = pull(
        &reference,
        options(creds(), &log),
        &work.path().join("x"),
        "x",
    )
    .unwrap_err();
    assert_eq!(err.to_string(), "manifest unknown: test/img:nope");

    // A wrong digest.
    let reference: Reference = format!("{host}/test/img@sha256:{}", "0".repeat(64))
        .parse()
        .unwrap();
    let err = pull(
        &reference,
        options(creds(), &log),
        &work.path().join("x"),
        "x",
    )
    .unwrap_err();
    assert!(
        matches!(err, RegistryError::ManifestUnknown { .. }),
        "{err:?}"
    );
}

#[test]
fn multi_platform_index_resolves_to_linux_amd64() {
    let reg = RegistryProcess::start(None);
    let work = tempfile::tempdir().unwrap();
    let src = source_layout(work.path());
    let blobs = src.join("blobs/sha256");
    let put = |data: &[u8]| -> String {
        let d = sha256(data);
        fs::write(blobs.join(d.trim_start_matches("sha256:")), data).unwrap();
        d
    };
    // An arm64 twin of the image: same layers, a config saying arm64.
    let amd64 = ImageLayout::open_ref(&src, "v1").unwrap();
    let amd64_manifest =
        fs::read(blobs.join(amd64.manifest_digest().trim_start_matches("sha256:"))).unwrap();
    let mut manifest: serde_json::Value = serde_json::from_slice(&amd64_manifest).unwrap();
    let config_digest = manifest["config"]["digest"].as_str().unwrap().to_owned();
    let mut config: serde_json::Value = serde_json::from_slice(
        &fs::read(blobs.join(config_digest.trim_start_matches("sha256:"))).unwrap(),
    )
    .unwrap();
    config["architecture"] = "arm64".into();
    let config_bytes = serde_json::to_vec(&config).unwrap();
    manifest["config"]["digest"] = put(&config_bytes).into();
    manifest["config"]["size"] = config_bytes.len().into();
    let arm_manifest = serde_json::to_vec(&manifest).unwrap();
    let arm_digest = put(&arm_manifest);
    let mt = "application/vnd.oci.image.manifest.v1+json";
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": mt, "digest": arm_digest, "size": arm_manifest.len(),
             "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
            {"mediaType": mt, "digest": amd64.manifest_digest(), "size": amd64_manifest.len(),
             "platform": {"os": "linux", "architecture": "amd64"}},
        ],
    });
    let index_bytes = serde_json::to_vec(&index).unwrap();
    let index_digest = put(&index_bytes);
    let top = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": index_digest, "size": index_bytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": "multi"},
        }],
    });
    fs::write(src.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();

    let host = reg.host();
    skopeo_push(
        &format!("oci:{}:multi", src.display()),
        &format!("docker://{host}/test/multi:1"),
        &["--all"],
    );
    let log = Arc::new(Mutex::new(Vec::new()));
    let dest = work.path().join("pulled");
    let reference: Reference = format!("{host}/test/multi:1").parse().unwrap();
    let digest = pull(&reference, options(creds(), &log), &dest, "multi").unwrap();
    assert_eq!(digest, amd64.manifest_digest());
    check_pulled(&dest, "multi", &digest);
    // By the index's digest too.
    let reference: Reference = format!("{host}/test/multi@{index_digest}").parse().unwrap();
    let digest = pull(&reference, options(creds(), &log), &dest, "multi").unwrap();
    assert_eq!(digest, amd64.manifest_digest());
}

#[test]
fn pulls_over_tls_with_a_private_ca() {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "keel test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "127.0.0.1");
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let cert = params.signed_by(&key, &issuer).unwrap();

    let reg = RegistryProcess::start(Some((&cert.pem(), &key.serialize_pem())));
    let work = tempfile::tempdir().unwrap();
    let src = source_layout(work.path());
    let host = reg.host();
    skopeo_push(
        &format!("oci:{}:v1", src.display()),
        &format!("docker://{host}/tls/img:v1"),
        &[],
    );
    let reference: Reference = format!("{host}/tls/img:v1").parse().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let tls_auth = RegistryAuth {
        insecure: false,
        ca_pem: Some(ca.pem().into_bytes()),
        ..creds()
    };
    let dest = work.path().join("pulled");
    let digest = pull(&reference, options(tls_auth, &log), &dest, "img").unwrap();
    check_pulled(&dest, "img", &digest);

    // Without the CA the server is not trusted (Mozilla's roots only).
    let no_ca = RegistryAuth {
        insecure: false,
        ..creds()
    };
    let err = pull(
        &reference,
        options(no_ca, &log),
        &work.path().join("x"),
        "x",
    )
    .unwrap_err();
    assert!(matches!(err, RegistryError::Transport { .. }), "{err:?}");

    // Garbage as CA is refused up front.
    let bad_ca = RegistryAuth {
        insecure: false,
        ca_pem: Some(b"not a certificate".to_vec()),
        ..creds()
    };
    let err = pull(
        &reference,
        options(bad_ca, &log),
        &work.path().join("x"),
        "x",
    )
    .unwrap_err();
    assert!(matches!(err, RegistryError::InvalidCa(_)), "{err:?}");
}

/// One request seen by the fake registry.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    host: String,
    headers: HashMap<String, String>,
}

/// A fake registry on 127.0.0.1: Bearer auth through `/token`, the manifest answered
/// 503 once, blob GETs redirected to `localhost:<same port>/storage/...`, and the big
/// layer cut after half of it on its first download. Handles `max_requests` connections
/// (one request each), then stops.
fn fake_registry(
    blobs: HashMap<String, Vec<u8>>,
    manifest: Vec<u8>,
    cut_digest: String,
    honour_range: bool,
) -> (u16, Arc<Mutex<Vec<Seen>>>, thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = Arc::clone(&seen);
    let handle = thread::spawn(move || {
        let mut manifest_failed = false;
        let mut cut = false;
        listener.set_nonblocking(false).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        for stream in listener.incoming() {
            if Instant::now() > deadline {
                break;
            }
            let Ok(mut stream) = stream else { continue };
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() || line.is_empty() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
            let mut headers = HashMap::new();
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':') {
                    headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
                }
            }
            let host = headers.get("host").cloned().unwrap_or_default();
            seen2.lock().unwrap().push(Seen {
                path: path.clone(),
                host: host.clone(),
                headers: headers.clone(),
            });
            let respond =
                |stream: &mut TcpStream, status: &str, hdrs: &[(&str, String)], body: &[u8]| {
                    let mut head = format!(
                        "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n",
                        body.len()
                    );
                    for (k, v) in hdrs {
                        head.push_str(&format!("{k}: {v}\r\n"));
                    }
                    head.push_str("\r\n");
                    let _ = stream.write_all(head.as_bytes());
                    let _ = stream.write_all(body);
                };
            let authorized =
                headers.get("authorization").map(String::as_str) == Some("Bearer tok-123");
            if path == "/stop" {
                respond(&mut stream, "200 OK", &[], b"");
                break;
            }
            if path.starts_with("/token?") {
                let ok = headers.get("authorization").map(String::as_str)
                    == Some("Basic a2VlbDpzM2NyZXQtcGFzcw==")
                    && path.contains("scope=repository%3Afake%2Fimg%3Apull")
                    && path.contains("service=fake");
                if ok {
                    respond(
                        &mut stream,
                        "200 OK",
                        &[],
                        br#"{"token":"tok-123","expires_in":300}"#,
                    );
                } else {
                    respond(
                        &mut stream,
                        "401 Unauthorized",
                        &[],
                        br#"{"details":"bad credentials"}"#,
                    );
                }
                continue;
            }
            if let Some(rest) = path.strip_prefix("/storage/") {
                // The storage host: no registry credentials expected here.
                let Some(data) = blobs.get(rest) else {
                    respond(&mut stream, "404 Not Found", &[], b"");
                    continue;
                };
                if rest == cut_digest && !cut {
                    cut = true;
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
                        data.len()
                    );
                    let _ = stream.write_all(head.as_bytes());
                    let _ = stream.write_all(&data[..data.len() / 2]);
                    let _ = stream.flush();
                    // Dropping the stream cuts the transfer.
                    continue;
                }
                let range = headers
                    .get("range")
                    .and_then(|r| r.strip_prefix("bytes="))
                    .and_then(|r| r.strip_suffix('-'))
                    .and_then(|r| r.parse::<usize>().ok());
                match range {
                    Some(from) if honour_range && from < data.len() => respond(
                        &mut stream,
                        "206 Partial Content",
                        &[(
                            "Content-Range",
                            format!("bytes {from}-{}/{}", data.len() - 1, data.len()),
                        )],
                        &data[from..],
                    ),
                    _ => respond(&mut stream, "200 OK", &[], data),
                }
                continue;
            }
            if !authorized {
                respond(
                    &mut stream,
                    "401 Unauthorized",
                    &[(
                        "WWW-Authenticate",
                        format!(
                            "Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"fake\",scope=\"repository:fake/img:pull\""
                        ),
                    )],
                    br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
                );
                continue;
            }
            if path == "/v2/fake/img/manifests/latest" {
                if !manifest_failed {
                    manifest_failed = true;
                    respond(
                        &mut stream,
                        "503 Service Unavailable",
                        &[("Retry-After", "0".into())],
                        b"",
                    );
                    continue;
                }
                respond(
                    &mut stream,
                    "200 OK",
                    &[(
                        "Content-Type",
                        "application/vnd.oci.image.manifest.v1+json".into(),
                    )],
                    &manifest,
                );
                continue;
            }
            if let Some(digest) = path.strip_prefix("/v2/fake/img/blobs/") {
                respond(
                    &mut stream,
                    "307 Temporary Redirect",
                    &[(
                        "Location",
                        format!("http://localhost:{port}/storage/{digest}"),
                    )],
                    b"",
                );
                continue;
            }
            respond(&mut stream, "404 Not Found", &[], b"");
        }
    });
    (port, seen, handle)
}

fn stop_fake(port: u16, handle: thread::JoinHandle<()>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /stop HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    handle.join().unwrap();
}

/// The blobs and manifest of the test image, served by the fake registry.
fn fake_image(work: &Path) -> (HashMap<String, Vec<u8>>, Vec<u8>, String) {
    let src = source_layout(work);
    let image = ImageLayout::open_ref(&src, "v1").unwrap();
    let mut blobs = HashMap::new();
    for e in fs::read_dir(src.join("blobs/sha256")).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        blobs.insert(format!("sha256:{name}"), fs::read(e.path()).unwrap());
    }
    let manifest = blobs[image.manifest_digest()].clone();
    let big = image.layers()[1].digest.clone();
    assert!(blobs[&big].len() > 200_000);
    (blobs, manifest, big)
}

#[test]
fn resumes_a_cut_download_with_range_and_keeps_credentials_on_the_registry() {
    let work = tempfile::tempdir().unwrap();
    let (blobs, manifest, big) = fake_image(work.path());
    let (port, seen, handle) = fake_registry(blobs, manifest.clone(), big.clone(), true);

    let reference: Reference = format!("127.0.0.1:{port}/fake/img").parse().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let dest = work.path().join("pulled");
    let digest = pull(&reference, options(creds(), &log), &dest, "fake").unwrap();
    assert_eq!(digest, sha256(&manifest));
    check_pulled(&dest, "fake", &digest);
    stop_fake(port, handle);

    let seen = seen.lock().unwrap().clone();
    // The manifest: anonymous (401), with the token (503, Retry-After: 0), again (200).
    let manifests: Vec<bool> = seen
        .iter()
        .filter(|s| s.path == "/v2/fake/img/manifests/latest")
        .map(|s| s.headers.contains_key("authorization"))
        .collect();
    assert_eq!(manifests, vec![false, true, true]);
    // The token was fetched once (cached for the scope).
    assert_eq!(
        seen.iter().filter(|s| s.path.starts_with("/token")).count(),
        1
    );
    // The big layer: one cut download, then a ranged one from where it stopped.
    let storage: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.path == format!("/storage/{big}"))
        .collect();
    assert_eq!(storage.len(), 2, "{storage:?}");
    assert!(!storage[0].headers.contains_key("range"));
    let range = storage[1].headers["range"].clone();
    assert!(
        range.starts_with("bytes=") && range != "bytes=0-",
        "{range}"
    );
    // Credentials never went to the storage host.
    for s in seen.iter().filter(|s| s.path.starts_with("/storage/")) {
        assert!(s.host.starts_with("localhost:"), "{s:?}");
        assert!(!s.headers.contains_key("authorization"), "{s:?}");
    }
    let log = log.lock().unwrap();
    assert!(
        log.iter()
            .any(|p| p.digest == big && matches!(p.state, BlobState::Retrying { .. })),
        "{log:?}"
    );
}

#[test]
fn restarts_a_cut_download_when_the_server_ignores_range() {
    let work = tempfile::tempdir().unwrap();
    let (blobs, manifest, big) = fake_image(work.path());
    let (port, seen, handle) = fake_registry(blobs, manifest.clone(), big.clone(), false);
    let reference: Reference = format!("127.0.0.1:{port}/fake/img:latest").parse().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let dest = work.path().join("pulled");
    let digest = pull(&reference, options(creds(), &log), &dest, "fake").unwrap();
    check_pulled(&dest, "fake", &digest);
    stop_fake(port, handle);
    let n = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.path == format!("/storage/{big}"))
        .count();
    assert_eq!(n, 2);

    // A wrong password for the token service: a clear error, no retries.
    let work2 = tempfile::tempdir().unwrap();
    let (blobs, manifest, big) = fake_image(work2.path());
    let (port, _seen, handle) = fake_registry(blobs, manifest, big, true);
    let reference: Reference = format!("127.0.0.1:{port}/fake/img").parse().unwrap();
    let wrong = RegistryAuth {
        password: Some("nope".into()),
        ..creds()
    };
    let err = pull(
        &reference,
        options(wrong, &log),
        &work2.path().join("x"),
        "x",
    )
    .unwrap_err();
    stop_fake(port, handle);
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "unauthorized: check [registries.\"127.0.0.1:{port}\"] username/password"
        )) && msg.contains("bad credentials"),
        "{msg}"
    );
}

#[test]
fn a_bad_partial_file_is_downloaded_again_and_a_tampered_blob_is_refused() {
    // A `.partial` file with garbage in it (left by a crash during a corrupted download) is
    // continued from, fails verification, and is downloaded again from scratch.
    let work = tempfile::tempdir().unwrap();
    let (blobs, manifest, big) = fake_image(work.path());
    let size = blobs[&big].len();
    let dest = work.path().join("pulled");
    fs::create_dir_all(dest.join("blobs/sha256")).unwrap();
    let hexd = big.trim_start_matches("sha256:").to_owned();
    let partial = dest.join(format!("blobs/sha256/{hexd}.partial"));
    fs::write(&partial, vec![0u8; size / 3]).unwrap();
    let (port, seen, handle) = fake_registry(blobs.clone(), manifest.clone(), String::new(), true);
    let reference: Reference = format!("127.0.0.1:{port}/fake/img").parse().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let digest = pull(&reference, options(creds(), &log), &dest, "fake").unwrap();
    stop_fake(port, handle);
    check_pulled(&dest, "fake", &digest);
    let ranges: Vec<Option<String>> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.path == format!("/storage/{big}"))
        .map(|s| s.headers.get("range").cloned())
        .collect();
    assert_eq!(
        ranges,
        vec![Some(format!("bytes={}-", size / 3)), None],
        "resumed, then restarted"
    );

    // A blob whose bytes do not match its digest is refused, naming the blob, and nothing
    // of it (nor the image) is left in the layout.
    let mut tampered = blobs;
    tampered.get_mut(&big).unwrap()[size / 2] ^= 0xff;
    let (port, _seen, handle) = fake_registry(tampered, manifest, String::new(), true);
    let reference: Reference = format!("127.0.0.1:{port}/fake/img").parse().unwrap();
    let dest = work.path().join("tampered");
    let err = pull(&reference, options(creds(), &log), &dest, "fake").unwrap_err();
    stop_fake(port, handle);
    assert!(
        matches!(&err, RegistryError::Image(keel_image::ImageError::DigestMismatch { what, .. }) if what.contains(&hexd)),
        "{err:?}"
    );
    assert!(err.to_string().contains(&big), "{err}");
    assert!(!dest.join(format!("blobs/sha256/{hexd}")).exists());
    assert!(!dest.join(format!("blobs/sha256/{hexd}.partial")).exists());
    assert!(!dest.join("index.json").exists());
}
