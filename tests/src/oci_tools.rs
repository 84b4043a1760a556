//! The tools the e2e tests make images with (umoci, skopeo, the static busybox), each a
//! Debian package scripts/install-deps installs: a test fails, naming the package, without it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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
