//! The tools the e2e tests make images with (umoci, skopeo, the static busybox), each a
//! Debian package scripts/install-deps installs: a test fails, naming the package, without it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// The path of a required tool, or a failure naming the Debian package that has it.
pub fn tool(name: &str, package: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin"] {
        let path = Path::new(dir).join(name);
        if path.is_file() {
            return path;
        }
    }
    panic!(
        "`{name}` is missing: install the Debian package `{package}` (scripts/install-deps does)"
    );
}

/// Runs a command to success, or fails the test with its output.
pub fn run(cmd: &mut Command) -> String {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn umoci() -> Command {
    Command::new(tool("umoci", "umoci"))
}

pub fn skopeo() -> Command {
    let mut cmd = Command::new(tool("skopeo", "skopeo"));
    cmd.arg("--insecure-policy");
    cmd
}

/// Makes an OCI layout `layout` holding image `tag` whose single layer is the contents of
/// `rootfs`, the umoci way: init, new, unpack, copy the files in, repack, then `config` args.
/// `rootless` unpacks without needing root (owners are then the caller's).
pub fn umoci_image(
    work: &Path,
    rootfs: &Path,
    layout: &Path,
    tag: &str,
    rootless: bool,
    config: &[&str],
) {
    let image = format!("{}:{tag}", layout.display());
    run(umoci().arg("init").arg("--layout").arg(layout));
    run(umoci().args(["new", "--image", &image]));
    let bundle = work.join(format!("bundle-{tag}"));
    let mut unpack = umoci();
    unpack.arg("unpack");
    if rootless {
        unpack.arg("--rootless");
    }
    run(unpack.args(["--image", &image]).arg(&bundle));
    run(Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", rootfs.display()))
        .arg(bundle.join("rootfs")));
    run(umoci().args(["repack", "--image", &image]).arg(&bundle));
    run(umoci()
        .args(["config", "--image", &image])
        .args(config)
        .arg("--history.created_by")
        .arg("keel e2e test"));
    run(Command::new("rm").arg("-rf").arg(&bundle));
}

/// A root of the static busybox with a link per applet and a minimal passwd/group.
pub fn busybox_rootfs(dir: &Path) {
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.is_file(),
        "/bin/busybox is missing: install the Debian package `busybox-static` (scripts/install-deps does)"
    );
    fs::create_dir_all(dir.join("bin")).unwrap();
    fs::create_dir_all(dir.join("etc")).unwrap();
    fs::create_dir_all(dir.join("tmp")).unwrap();
    fs::copy(busybox, dir.join("bin/busybox")).unwrap();
    let list = run(Command::new(busybox).arg("--list"));
    for applet in list.lines().map(str::trim).filter(|a| !a.is_empty()) {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet)).unwrap();
        }
    }
    fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    fs::write(dir.join("etc/group"), "root:x:0:\n").unwrap();
}

/// The Debian mirror this machine's apt uses (`KEEL_TEST_DEBIAN_MIRROR` overrides it): the
/// first `deb` source of the main archive, in one-line or deb822 form.
pub fn debian_mirror() -> String {
    if let Ok(mirror) = std::env::var("KEEL_TEST_DEBIAN_MIRROR") {
        return mirror;
    }
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    let main_archive = |uri: &str| {
        let uri = uri.trim_end_matches('/');
        (uri.starts_with("http://") || uri.starts_with("https://"))
            && uri.ends_with("/debian")
            && !uri.contains("security")
    };
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        for line in text.lines().map(str::trim) {
            // One-line form: `deb [options] URI SUITE COMPONENTS...`.
            let uri = if let Some(rest) = line.strip_prefix("deb ") {
                let rest = rest.trim_start();
                let rest = match rest.strip_prefix('[') {
                    Some(opts) => opts.split_once(']').map_or("", |(_, r)| r),
                    None => rest,
                };
                rest.split_whitespace().next()
            } else {
                // deb822: `URIs: URI...`.
                line.strip_prefix("URIs:")
                    .and_then(|uris| uris.split_whitespace().next())
            };
            if let Some(uri) = uri.filter(|u| main_archive(u)) {
                return uri.trim_end_matches('/').to_string();
            }
        }
    }
    "http://deb.debian.org/debian".to_string()
}

/// FNV-1a, 64 bits: a stable name for a cache entry.
fn fnv1a(data: &str) -> u64 {
    data.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A Debian bookworm minbase rootfs with `packages`, made by debootstrap once and cached
/// under `~/.cache/keel/test-images/` (`KEEL_TEST_IMAGES` elsewhere), keyed by the command;
/// `tag` names it, `check` is a file it must have. It is built in a temporary directory and
/// renamed into place when complete, so an interrupted build is never reused.
pub fn debian_rootfs(tag: &str, packages: &[&str], check: &str) -> PathBuf {
    let debootstrap = tool("debootstrap", "debootstrap");
    let mirror = debian_mirror();
    let args = [
        "--variant=minbase".to_string(),
        format!("--include={}", packages.join(",")),
        "bookworm".to_string(),
        "TARGET".to_string(),
        mirror,
    ];
    let cache = match std::env::var_os("KEEL_TEST_IMAGES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
            .join(".cache/keel/test-images"),
    };
    let key = format!("debootstrap {}", args.join(" "));
    let done = cache.join(format!("debian-{tag}-{:016x}", fnv1a(&key)));
    if done.join(check).is_file() {
        eprintln!("debian rootfs: cached at {} ({key})", done.display());
        return done;
    }
    fs::create_dir_all(&cache).unwrap();
    // Leftovers of interrupted builds (their process is gone) are removed, never used.
    let prefix = format!(".tmp-debian-{tag}-{:016x}-", fnv1a(&key));
    for entry in fs::read_dir(&cache).unwrap().filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix(&prefix)
            && !Path::new("/proc").join(pid).exists()
        {
            eprintln!("debian rootfs: removing the unfinished {name}");
            run(Command::new("rm").arg("-rf").arg(entry.path()));
        }
    }
    let tmp = cache.join(format!("{prefix}{}", std::process::id()));
    if tmp.exists() {
        run(Command::new("rm").arg("-rf").arg(&tmp));
    }
    eprintln!(
        "debian rootfs: {key} (takes minutes; cached in {})",
        done.display()
    );
    let started = Instant::now();
    let real_args: Vec<String> = args
        .iter()
        .map(|a| {
            if a == "TARGET" {
                tmp.display().to_string()
            } else {
                a.clone()
            }
        })
        .collect();
    let out = Command::new(&debootstrap)
        .args(&real_args)
        .stdin(Stdio::null())
        .output()
        .expect("running debootstrap");
    if !out.status.success() {
        let log = fs::read_to_string(tmp.join("debootstrap/debootstrap.log")).unwrap_or_default();
        let _ = Command::new("rm").arg("-rf").arg(&tmp).status();
        panic!(
            "debootstrap {} failed ({}; it needs root, the network and a cache directory without nodev or noexec; KEEL_TEST_IMAGES moves it):\n{}{}\n{}",
            real_args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            log
        );
    }
    assert!(tmp.join(check).is_file(), "debootstrap made no {check}");
    // Another run may have finished first: either copy is as good.
    if fs::rename(&tmp, &done).is_err() {
        run(Command::new("rm").arg("-rf").arg(&tmp));
    }
    eprintln!("debian rootfs: made in {:.1?}", started.elapsed());
    done
}
