//! `keel build` from the outside: reproducible output and located config errors.

use std::process::Command;

use keel_tests::{bin_dir, build_host, workspace_root};

#[test]
fn the_same_inputs_give_a_bit_identical_initramfs_and_root_image() {
    let host = workspace_root().join("examples/hello/host.toml");
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    build_host(&host, a.path());
    build_host(&host, b.path());
    for file in ["initramfs.img", "root.img"] {
        let first = std::fs::read(a.path().join(file)).unwrap();
        let second = std::fs::read(b.path().join(file)).unwrap();
        assert!(
            first == second,
            "two builds of the same host differ in {file}"
        );
    }
    let manifest = |d: &std::path::Path| std::fs::read_to_string(d.join("manifest.json")).unwrap();
    assert_eq!(manifest(a.path()), manifest(b.path()));
    let m: serde_json::Value = serde_json::from_str(&manifest(a.path())).unwrap();
    assert!(
        m["kernel"]["package_version"]
            .as_str()
            .is_some_and(|v| !v.is_empty()),
        "{m}"
    );
    let uuid = m["root_uuid"].as_str().unwrap();
    assert!(
        m["cmdline"]
            .as_str()
            .unwrap()
            .ends_with(&format!(" keel.root=UUID={uuid}")),
        "{m}"
    );
    assert_eq!(m["root_image"], "root.img");
    assert!(m["verity"].is_null(), "{m}");
    let stage1: Vec<&str> = m["stage1_modules"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    for module in ["virtio_blk", "erofs"] {
        assert!(stage1.contains(&module), "{stage1:?}");
    }
    for input in [
        "init",
        "file:/usr/sbin/mke2fs",
        "host.toml",
        "image:web",
        "module:virtio_net",
        "module:overlay",
    ] {
        assert!(
            m["inputs"][input].as_str().is_some_and(|d| d.len() >= 64),
            "no digest for {input}: {m}"
        );
    }
}

#[test]
fn a_bad_host_file_fails_the_build_with_its_location() {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host.toml");
    std::fs::write(
        &host,
        "[host]\nhostname = \"h\"\n\n[containers.web]\nimage = \"web\"\nmemroy = \"64M\"\n",
    )
    .unwrap();
    let out = Command::new(bin_dir().join("keel"))
        .arg("build")
        .arg(&host)
        .arg("-o")
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "config errors exit 2");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{}:6:1: containers.web.memroy: unknown field `memroy`",
            host.display()
        )),
        "{stderr}"
    );
    assert!(
        !dir.path().join("out").exists(),
        "nothing is written for a rejected host file"
    );
}
