//! Volumes as Docker users expect them, in a booted guest, with an image made by umoci (as
//! root, so its owners are real) whose data directory belongs to a non-root user:
//! - a new named volume starts with the image's content at its target (owners, modes,
//!   symlinks, hard links), so the image's user can write to it;
//! - the copy happens once: what the container deleted stays deleted after a restart;
//! - the image's `Volumes` get an anonymous volume, filled the same way, kept across
//!   restarts and removed with the container (`keel apply` without it), while named
//!   volumes stay;
//! - in a user namespace the copy's owners are the shifted ones, so the container's user
//!   still owns its data;
//! - `:nocopy` starts empty.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use keel_tests::oci_tools::{busybox_rootfs, run, tool, umoci_image};
use keel_tests::{STEP_TIMEOUT, boot_ready};

/// What each container prints: the volume's owner and mode, and what is (still) in it.
const REPORT: &str = r#"v=/var/lib/app
echo "$NAME: run=$(cat $v/runs 2>/dev/null | wc -l) owner=$(stat -c %u:%g:%a $v) seed=$(cat $v/seed 2>/dev/null || echo gone) links=$(stat -c %h $v/keep) symlink=$(readlink $v/link) anon=$(cat /var/lib/anon/seed 2>/dev/null || echo gone) anon_runs=$(cat /var/lib/anon/runs 2>/dev/null | wc -l)"
echo x >> $v/runs && echo x >> /var/lib/anon/runs && rm -f $v/seed /var/lib/anon/seed || echo "$NAME: cannot write"
[ "$(cat $v/runs | wc -l)" -ge 2 ] && exec sleep 3600
exit 1
"#;

fn app_image(work: &Path) {
    let rootfs = work.join("rootfs");
    busybox_rootfs(&rootfs);
    fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:999:999:app:/var/lib/app:/bin/sh\n",
    )
    .unwrap();
    fs::write(rootfs.join("etc/group"), "root:x:0:\napp:x:999:\n").unwrap();
    let data = rootfs.join("var/lib/app");
    let anon = rootfs.join("var/lib/anon");
    fs::create_dir_all(&data).unwrap();
    fs::create_dir_all(&anon).unwrap();
    fs::write(data.join("seed"), "from-image\n").unwrap();
    fs::write(data.join("keep"), "kept\n").unwrap();
    fs::hard_link(data.join("keep"), data.join("keep.link")).unwrap();
    std::os::unix::fs::symlink("seed", data.join("link")).unwrap();
    fs::write(anon.join("seed"), "anon-image\n").unwrap();
    run(Command::new("chown")
        .args(["-hR", "999:999"])
        .arg(&data)
        .arg(&anon));
    run(Command::new("chmod").arg("0750").arg(&data));
    umoci_image(
        work,
        &rootfs,
        &work.join("L"),
        "app",
        false,
        &[
            "--config.env",
            "PATH=/bin",
            "--config.volume",
            "/var/lib/anon",
        ],
    );
}

/// A container running REPORT as the image's user on the named volume `volume`.
fn reporter(name: &str, volume: &str, extra: &str) -> String {
    format!(
        r#"
[containers.{name}]
image = "app"
user = "app"
volumes = ["{volume}:/var/lib/app"]
env = {{ NAME = "{name}" }}
restart = "on-failure"
network = "none"
command = ["sh", "-c", '''{REPORT}''']
{extra}"#
    )
}

fn host_file(with_writer: bool) -> String {
    let writer = if with_writer {
        reporter("writer", "appdata", "")
    } else {
        String::new()
    };
    let jail = reporter("jail", "jaildata", "userns = \"auto\"\n");
    format!(
        r#"[host]
hostname = "volumes"
stop_timeout = "2s"

[images.app]
layout = "L"
ref = "app"
{writer}{jail}
[containers.blank]
image = "app"
volumes = ["blank:/var/lib/app:nocopy"]
restart = "no"
network = "none"
command = ["sh", "-c", 'echo "blank: entries=$(ls -A /var/lib/app | wc -l)"; exec sleep 3600']

[containers.store]
image = "app"
volumes = ["/var/lib/keel/volumes:/store:ro"]
restart = "no"
network = "none"
command = ["sleep", "3600"]
"#
    )
}

#[test]
fn new_volumes_start_with_the_image_content_once_and_anonymous_ones_go_with_their_container() {
    tool("umoci", "umoci");
    let work = tempfile::tempdir().unwrap();
    app_image(work.path());
    // The host file names its layout relative to itself: write it beside L.
    let text = host_file(true);
    let host = boot_ready_in(work.path(), &text);
    let vm = &host.vm;

    for name in ["writer", "jail"] {
        let first = vm.wait_for_line_anywhere(&format!("[{name}] {name}: run=0"), STEP_TIMEOUT);
        let first = first.unwrap();
        assert!(
            first.contains(&format!(
                "{name}: run=0 owner=999:999:750 seed=from-image links=2 symlink=seed anon=anon-image anon_runs=0"
            )),
            "the new volumes hold the image's files, owners and modes: {first}"
        );
        let second = vm
            .wait_for_line_anywhere(&format!("[{name}] {name}: run=1"), STEP_TIMEOUT)
            .unwrap();
        assert!(
            second.contains("seed=gone") && second.contains("anon=gone anon_runs=1"),
            "the copy is made once, and the anonymous volume is kept across a restart: {second}"
        );
    }
    let console = vm.console();
    assert!(
        !console
            .lines()
            .any(|l| l.starts_with('[') && l.ends_with(": cannot write")),
        "the image's user writes to its volume:\n{console}"
    );
    let blank = vm
        .wait_for_line_anywhere("[blank] blank: entries=", STEP_TIMEOUT)
        .unwrap();
    assert!(blank.contains("entries=0"), "nocopy starts empty: {blank}");

    // In the user namespace, the volume's owner is the image's user shifted into the range.
    let shifted = host
        .keel
        .ok(&["exec", "store", "--", "stat", "-c", "%u", "/store/jaildata"]);
    let plain = host
        .keel
        .ok(&["exec", "store", "--", "stat", "-c", "%u", "/store/appdata"]);
    assert_eq!(plain.trim(), "999");
    assert!(
        shifted.trim().parse::<u32>().unwrap() > 65535,
        "the userns copy is owned by the shifted uid: {shifted}"
    );
    let anonymous = host
        .keel
        .ok(&["exec", "store", "--", "ls", "-A", "/store/.image"]);
    assert!(anonymous.contains("writer"), "{anonymous}");

    // Without writer, its anonymous volume goes; the named one stays.
    let next = work.path().join("next.toml");
    fs::write(&next, in_dir(work.path(), &host_file(false))).unwrap();
    host.keel.ok(&["apply", next.to_str().unwrap()]);
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let left = host.keel.ok(&[
            "exec",
            "store",
            "--",
            "sh",
            "-c",
            "ls -A /store/.image /store/.trash 2>/dev/null",
        ]);
        if !left.contains("writer") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "writer's anonymous volume is still there: {left}\n{}",
            vm.console()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let named = host
        .keel
        .ok(&["exec", "store", "--", "cat", "/store/appdata/runs"]);
    assert_eq!(named.lines().count(), 2, "the named volume stays: {named}");
}

/// [`boot_ready`] for a host file whose relative paths point into `dir`.
fn boot_ready_in(dir: &Path, text: &str) -> keel_tests::ReadyHost {
    boot_ready(&in_dir(dir, text))
}

/// The host file `text` with its image layout at `dir`/L.
fn in_dir(dir: &Path, text: &str) -> String {
    text.replace(
        "layout = \"L\"",
        &format!("layout = \"{}\"", dir.join("L").display()),
    )
}
