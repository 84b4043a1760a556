//! End-to-end images:
//! - an image of many layers still mounts (overlayfs takes its options in one page, so the
//!   layer paths must be short) with the upper layers winning;
//! - images written by other tools run: an OCI layout made by umoci, and an oci-archive and a
//!   docker-archive made from it by skopeo;
//! - a Debian image (debootstrap + umoci) pushed by skopeo into Debian's `docker-registry`
//!   with htpasswd auth is pulled by `keel build`, and the nginx in it serves a real `curl`
//!   on the test machine through a published port; a wrong password fails the build clearly.
//!
//! The tools (Debian packages `umoci`, `skopeo`, `docker-registry`, `debootstrap`, `curl`,
//! installed by scripts/install-deps) must be there: the tests fail, not skip, without them.
//! The debootstrap rootfs takes minutes to make and is cached under
//! `~/.cache/keel/test-images/` (`KEEL_TEST_IMAGES` elsewhere), keyed by its command.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keel_qemu::Vm;
use keel_tests::oci_tools::{busybox_rootfs, debian_rootfs, run, skopeo, tool, umoci_image};
use keel_tests::{BOOT_TIMEOUT, bin_dir, boot, build_host, vm_config};

const LAYERS: usize = 150;

#[test]
fn an_image_of_150_layers_mounts_with_the_top_layer_winning() {
    let work = tempfile::tempdir().unwrap();
    let mut layers = vec!["\"busybox:/bin/busybox\"".to_string()];
    for i in 0..LAYERS {
        let dir = work.path().join(format!("layer{i}"));
        std::fs::create_dir_all(dir.join("layers")).unwrap();
        std::fs::write(dir.join(format!("layers/{i}")), "").unwrap();
        // Every layer rewrites the same file: the last one must be what the container sees.
        std::fs::write(dir.join("top"), format!("{i}\n")).unwrap();
        layers.push(format!("\"{}\"", dir.display()));
    }
    let host = work.path().join("host.toml");
    std::fs::write(
        &host,
        format!(
            r#"[host]
hostname = "layers"

[images.tall]
layers = [{}]
env = ["PATH=/bin"]

[containers.count]
image = "tall"
kind = "onboot"
network = "none"
command = ["sh", "-c", "echo layers=$(ls /layers | wc -l) top=$(cat /top)"]
"#,
            layers.join(", ")
        ),
    )
    .unwrap();
    let dir = build_host(&host, &work.path().join("out"));
    let vm = boot(&dir, &[]);
    let line = vm.wait_for_line("[count] layers=", BOOT_TIMEOUT).unwrap();
    assert!(
        line.contains(&format!("layers={LAYERS} top={}", LAYERS - 1)),
        "{line}"
    );
}

#[test]
fn umoci_layouts_and_skopeo_oci_and_docker_archives_run() {
    tool("umoci", "umoci");
    tool("skopeo", "skopeo");
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let rootfs = w.join("rootfs");
    busybox_rootfs(&rootfs);
    // The image's own Cmd and Env, not the host file's, print the marker: they must survive
    // every conversion.
    umoci_image(
        w,
        &rootfs,
        &w.join("L"),
        "t",
        true,
        &[
            "--config.env",
            "PATH=/bin",
            "--config.env",
            "GREETING=hello",
            "--config.cmd",
            "sh",
            "--config.cmd",
            "-c",
            "--config.cmd",
            "echo \"marker $GREETING from $SOURCE as $(id -u)\"",
        ],
    );
    run(skopeo().args([
        "copy",
        "--quiet",
        &format!("oci:{}:t", w.join("L").display()),
        &format!("oci-archive:{}:t", w.join("X.tar").display()),
    ]));
    run(skopeo().args([
        "copy",
        "--quiet",
        &format!("oci:{}:t", w.join("L").display()),
        &format!("docker-archive:{}:img:t", w.join("Y.tar").display()),
    ]));

    let host = w.join("host.toml");
    fs::write(
        &host,
        r#"[host]
hostname = "formats"

[images.lay]
layout = "L"
ref = "t"

[images.ociar]
archive = "X.tar"

[images.dockar]
archive = "Y.tar"

[containers.from-layout]
image = "lay"
kind = "onboot"
network = "none"
env = { SOURCE = "umoci-layout" }

[containers.from-oci-archive]
image = "ociar"
kind = "onboot"
network = "none"
env = { SOURCE = "oci-archive" }

[containers.from-docker-archive]
image = "dockar"
kind = "onboot"
network = "none"
env = { SOURCE = "docker-archive" }
"#,
    )
    .unwrap();
    let started = Instant::now();
    let dir = build_host(&host, &w.join("out"));
    eprintln!("keel build: {:.1?}", started.elapsed());
    let started = Instant::now();
    let vm = boot(&dir, &[]);
    // Onboot tasks run one at a time, in file order.
    for (name, source) in [
        ("from-layout", "umoci-layout"),
        ("from-oci-archive", "oci-archive"),
        ("from-docker-archive", "docker-archive"),
    ] {
        let line = vm
            .wait_for_line(&format!("[{name}] marker"), BOOT_TIMEOUT)
            .unwrap();
        assert!(
            line.contains(&format!("[{name}] marker hello from {source} as 0")),
            "{line}"
        );
    }
    eprintln!(
        "boot to the third marker ({}): {:.1?}",
        vm.accel(),
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------
// Registry
// ---------------------------------------------------------------------------------------

const USER: &str = "keel";
const PASS: &str = "s3cret-pass";
/// bcrypt of `PASS` (cost 5): the tests crate has no bcrypt of its own, and docker-registry
/// takes only bcrypt in its htpasswd file.
const PASS_BCRYPT: &str = "$2b$05$FUBDG9qOfDqbBxeY8sJbFuqDp1vMKk6ciOlVe7al1PEsL7lyGET42";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `docker-registry` on 127.0.0.1 with htpasswd basic auth, killed (by pid) and reaped
/// when dropped.
struct Registry {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    fn start() -> Registry {
        let bin = tool("docker-registry", "docker-registry");
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("storage");
        fs::create_dir(&storage).unwrap();
        let htpasswd = dir.path().join("htpasswd");
        fs::write(&htpasswd, format!("{USER}:{PASS_BCRYPT}\n")).unwrap();
        let port = free_port();
        let config = format!(
            "version: 0.1\n\
             log:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: keel-test\n\
             auth:\n  htpasswd:\n    realm: basic-realm\n    path: {}\n",
            storage.display(),
            htpasswd.display()
        );
        let config_path = dir.path().join("config.yml");
        fs::write(&config_path, config).unwrap();
        let log = fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting docker-registry");
        let mut registry = Registry { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = registry.child.try_wait().unwrap() {
                panic!("docker-registry exited with {status}:\n{}", registry.log());
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not listen on 127.0.0.1:{port}:\n{}",
                registry.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// `skopeo copy SRC docker://HOST/DEST` with the registry's credentials.
    fn push(&self, src: &str, dest: &str) {
        run(skopeo()
            .args(["copy", "--quiet", "--dest-tls-verify=false", "--dest-creds"])
            .arg(format!("{USER}:{PASS}"))
            .arg(src)
            .arg(format!("docker://{}/{dest}", self.host())));
    }
}

// ---------------------------------------------------------------------------------------
// The Debian rootfs
// ---------------------------------------------------------------------------------------

fn write_registry_host(path: &Path, registry: &str, password: &str) {
    fs::write(
        path,
        format!(
            r#"[host]
hostname = "debian-web"
stop_timeout = "5s"

[network.interfaces.eth0]
dhcp4 = true

[registries."{registry}"]
username = "{USER}"
password = "{password}"
insecure = true

[images.web]
pull = "{registry}/test/nginx:1"

[containers.web]
image = "web"
network = "bridge"
ports = ["8080:80"]
"#
        ),
    )
    .unwrap();
}

#[test]
fn a_debian_nginx_image_pulled_with_auth_serves_curl_on_the_host() {
    for (name, package) in [
        ("umoci", "umoci"),
        ("skopeo", "skopeo"),
        ("docker-registry", "docker-registry"),
        ("debootstrap", "debootstrap"),
        ("curl", "curl"),
    ] {
        tool(name, package);
    }
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let rootfs = debian_rootfs("nginx", &["nginx-light"], "usr/sbin/nginx");

    // The image: the debootstrap root without apt's downloads, a page of our own, and
    // nginx in the foreground as the image's Cmd (like Docker's nginx images). Owners
    // matter (www-data), so this unpack is not rootless: debootstrap needed root anyway.
    let page = format!(
        "keel e2e: nginx on debian, pulled from a registry ({})\n",
        std::process::id()
    );
    let staged = w.join("rootfs");
    run(Command::new("cp").arg("-a").arg(&rootfs).arg(&staged));
    run(Command::new("sh").arg("-c").arg(
        "cd \"$1\" && rm -rf var/cache/apt/archives/*.deb var/lib/apt/lists/* debootstrap dev/* \
         && mkdir -p var/www/html",
    ).arg("sh").arg(&staged));
    fs::write(staged.join("var/www/html/index.html"), &page).unwrap();
    let layout = w.join("nginx-layout");
    let started = Instant::now();
    umoci_image(
        w,
        &staged,
        &layout,
        "1",
        false,
        &[
            "--config.env",
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--config.cmd",
            "nginx",
            "--config.cmd",
            "-g",
            "--config.cmd",
            "daemon off;",
            "--config.exposedports",
            "80/tcp",
            "--config.stopsignal",
            "SIGQUIT",
        ],
    );
    run(Command::new("rm").arg("-rf").arg(&staged));
    eprintln!("umoci image: {:.1?}", started.elapsed());

    let registry = Registry::start();
    let started = Instant::now();
    registry.push(&format!("oci:{}:1", layout.display()), "test/nginx:1");
    eprintln!("skopeo push: {:.1?}", started.elapsed());
    let reg = registry.host();

    // A wrong password: the build-time pull fails, saying so.
    let bad = w.join("bad.toml");
    write_registry_host(&bad, &reg, "not-the-password");
    let out = Command::new(bin_dir().join("keel"))
        .arg("build")
        .arg(&bad)
        .arg("-o")
        .arg(w.join("bad-out"))
        .stdin(Stdio::null())
        .output()
        .expect("running keel build");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "built with a wrong password:\n{text}"
    );
    assert!(
        text.contains(&format!(
            "unauthorized: check [registries.\"{reg}\"] username/password"
        )),
        "{text}"
    );

    // The right one: pulled at build time, embedded, booted.
    let host = w.join("host.toml");
    write_registry_host(&host, &reg, PASS);
    let started = Instant::now();
    let dir = build_host(&host, &w.join("out"));
    eprintln!("keel build (pull): {:.1?}", started.elapsed());
    drop(registry);

    let started = Instant::now();
    let mut config = vm_config(&dir, &[8080]);
    config.memory_mb = 1024;
    let vm = Vm::boot(config).expect("QEMU starts");
    vm.wait_for_line("keel: ready uptime_ms=", BOOT_TIMEOUT)
        .unwrap();
    eprintln!("boot to ready ({}): {:.1?}", vm.accel(), started.elapsed());
    let port = vm.host_port(8080).expect("8080 is published");
    let url = format!("http://127.0.0.1:{port}/");
    let curl = tool("curl", "curl");
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let (headers, body) = loop {
        let out = Command::new(&curl)
            .args(["-sS", "-f", "--max-time", "10", "-D", "-"])
            .arg(&url)
            .stdin(Stdio::null())
            .output()
            .expect("running curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            // Headers, a blank line, the body.
            let (head, body) = text
                .split_once("\r\n\r\n")
                .unwrap_or_else(|| panic!("no header end in curl's output:\n{text}"));
            break (head.to_string(), body.to_string());
        }
        assert!(
            Instant::now() < deadline,
            "curl {url} kept failing: {}{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Each attempt waits on the guest (connect or read); this only keeps a refused
        // connection from spinning.
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!("boot to nginx's first answer: {:.1?}", started.elapsed());
    assert!(headers.starts_with("HTTP/1.1 200"), "{headers}");
    assert!(
        headers
            .lines()
            .any(|l| l.to_ascii_lowercase().starts_with("server: nginx")),
        "{headers}"
    );
    assert_eq!(body, page);

    // nginx's own 404 for a missing page, through the same path.
    let out = Command::new(&curl)
        .args([
            "-sS",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(format!("{url}missing"))
        .stdin(Stdio::null())
        .output()
        .expect("running curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
}

/// `pull_at = "boot"`: the image is not in the OS image; the booted host pulls it from the
/// registry (QEMU's gateway 10.0.2.2 reaches the test's loopback), with the registry's
/// credentials, and the container using it starts once it is there.
#[test]
fn an_image_pulled_at_boot_runs_once_the_host_pulled_it() {
    tool("umoci", "umoci");
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let rootfs = w.join("rootfs");
    busybox_rootfs(&rootfs);
    umoci_image(
        w,
        &rootfs,
        &w.join("L"),
        "t",
        true,
        &["--config.env", "PATH=/bin"],
    );
    let registry = Registry::start();
    registry.push(&format!("oci:{}:t", w.join("L").display()), "test/bb:1");
    let guest_side = format!("10.0.2.2:{}", registry.port);
    let host = w.join("host.toml");
    fs::write(
        &host,
        format!(
            r#"[host]
hostname = "puller"

[network.interfaces.eth0]
dhcp4 = true

[registries."{guest_side}"]
username = "{USER}"
password = "{PASS}"
insecure = true

[images.bb]
pull = "{guest_side}/test/bb:1"
pull_at = "boot"

[containers.app]
image = "bb"
kind = "onboot"
command = ["sh", "-c", "echo app: running from the pulled image"]
"#
        ),
    )
    .unwrap();
    // The build contacts no registry: 10.0.2.2 means nothing on this side.
    let dir = build_host(&host, &w.join("out"));
    let manifest = fs::read_to_string(dir.join("manifest.json")).unwrap();
    assert!(manifest.contains("pull at boot: 10.0.2."), "{manifest}");

    let vm = boot(&dir, &[]);
    vm.wait_for_line("[app] app: running from the pulled image", BOOT_TIMEOUT)
        .unwrap();
    let console = vm.console();
    let pulled = console
        .find("keel: pulled bb (")
        .unwrap_or_else(|| panic!("no pull reported:\n{console}"));
    let started = console
        .find("app: started")
        .unwrap_or_else(|| panic!("app never started:\n{console}"));
    assert!(
        pulled < started,
        "app started before its image was pulled:\n{console}"
    );
    assert!(
        console.contains("keel: image bb: pulled"),
        "PID 1 did not see the pull end:\n{console}"
    );
}
