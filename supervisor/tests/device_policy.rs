//! Host test of the device policy: the real program, loaded by the kernel's verifier and
//! attached to a real cgroup v2, deciding for a real process.
//!
//! A shell is started in a fresh cgroup under the host's cgroup2 mount (on a v1/v2 hybrid
//! host the eBPF device hook applies to the v2 cgroup all the same). It may open /dev/null
//! and make device nodes, but opening a block device or /dev/mem through a node it made in
//! a plain directory is refused — the case `nodev` mounts alone do not cover.

use std::path::Path;
use std::process::Command;

use keel_supervisor::device_policy::{self, DEFAULT_RULES};

mod common;
use common::TestCgroup;

#[test]
fn the_policy_refuses_devices_a_container_made_on_a_path_without_nodev() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    let cgroup = TestCgroup::new("devtest");
    let program = device_policy::load(DEFAULT_RULES).expect("the verifier takes the program");
    let dir = std::fs::File::open(&cgroup.0).expect("opening the cgroup");
    device_policy::attach(&program, &dir.into()).expect("attaching the program");
    drop(program);
    // What a privileged container gets must load too (the verifier refuses dead code).
    device_policy::load(device_policy::UNRESTRICTED).expect("the verifier takes the open policy");

    let scratch = tempfile::tempdir().expect("scratch dir");
    let at = |name: &str| scratch.path().join(name).display().to_string();
    let (block, mem) = (at("blk"), at("mem"));
    // The shell joins the cgroup first; every later open is decided by the program.
    let script = format!(
        "echo $$ > {procs} || exit 90
         head -c 1 /dev/zero > /dev/null || exit 91
         mknod {block} b 7 0 || exit 92
         mknod {mem} c 1 1 || exit 93
         head -c 1 {block} 2> {block}.err && exit 94
         head -c 1 {mem} 2> {mem}.err && exit 95
         exit 0",
        procs = cgroup.0.join("cgroup.procs").display(),
    );
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg(&script)
        .output()
        .expect("running sh");
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    assert!(
        out.status.success(),
        "exit {:?} (90 join, 91 /dev/zero refused, 92/93 mknod refused, 94 block device \
         opened, 95 /dev/mem opened); stderr {}; block: {}; mem: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr),
        read(&format!("{block}.err")),
        read(&format!("{mem}.err")),
    );
    for err in [format!("{block}.err"), format!("{mem}.err")] {
        assert!(
            read(&err).contains("Operation not permitted"),
            "{err}: {}",
            read(&err)
        );
    }
    assert!(Path::new(&block).exists(), "mknod itself stays allowed");
}
