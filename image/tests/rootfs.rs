//! The root image's pieces on their own: the host's e2fsprogs run from a staged tree with
//! nothing but what was copied, and mkfs.erofs gives the same bytes for the same tree.

#![cfg(feature = "builder")]

use std::path::Path;
use std::process::Command;

use keel_image::erofs::{self, Compression};
use keel_image::os::{E2FSCK, MKE2FS};
use keel_image::rootfs::Staging;

fn host_program(name: &str) -> &'static Path {
    ["/sbin", "/usr/sbin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .map(|p| Box::leak(p.into_boxed_path()) as &Path)
        .unwrap_or_else(|| panic!("{name} is missing: install e2fsprogs"))
}

fn run(command: &mut Command) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{command:?} failed: {text}");
    text
}

#[test]
fn staged_e2fsprogs_format_and_check_a_disk_in_a_chroot() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root to chroot into the staged tree; run the suite as root"
    );
    let dir = tempfile::tempdir().unwrap();
    let staging = Staging::new(&dir.path().join("root")).unwrap();
    let mut copied = staging
        .add_host_program(host_program("mke2fs"), MKE2FS)
        .unwrap();
    copied.extend(
        staging
            .add_host_program(host_program("e2fsck"), E2FSCK)
            .unwrap(),
    );
    assert!(
        copied
            .iter()
            .any(|(_, d)| d == "/lib64/ld-linux-x86-64.so.2"),
        "{copied:?}"
    );
    assert!(copied.iter().any(|(_, d)| d.ends_with("/libext2fs.so.2")));
    // Nothing else: no /etc (mke2fs.conf is optional), no /proc, no /dev.
    staging.add_dir("tmp").unwrap();
    staging.normalize_modes().unwrap();
    let disk = staging.path("tmp/var.img").unwrap();
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let root = staging.root();
    run(Command::new("chroot").arg(root).args([
        MKE2FS,
        "-F",
        "-q",
        "-t",
        "ext4",
        "-L",
        "KEEL-VAR",
        "/tmp/var.img",
    ]));
    let check = run(Command::new("chroot")
        .arg(root)
        .args([E2FSCK, "-f", "-n", "/tmp/var.img"]));
    assert!(check.contains("KEEL-VAR"), "{check}");
    // The host's tools read what the staged ones wrote: a real ext4 with that label.
    let label = run(Command::new(host_program("e2label")).arg(&disk));
    assert_eq!(label.trim(), "KEEL-VAR");
}

fn stage_sample(root: &Path, reverse: bool) {
    let staging = Staging::new(root).unwrap();
    let mut files: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| {
            (
                format!("d{}/f{i}", i % 5),
                vec![b'a' + (i % 26) as u8; i * 1000],
            )
        })
        .collect();
    if reverse {
        files.reverse();
    }
    for (name, data) in &files {
        staging.add_file_from_bytes(name, 0o600, data).unwrap();
    }
    staging
        .add_file_from_bytes("sbin/init", 0o700, b"#!init")
        .unwrap();
    staging.add_dir("etc").unwrap();
    staging.normalize_modes().unwrap();
}

#[test]
fn mkfs_is_reproducible_and_records_the_uuid() {
    let dir = tempfile::tempdir().unwrap();
    let uuid = erofs::uuid_from_digest(&[0x5a; 32]);
    for compression in [Compression::None, Compression::Lz4hc(12)] {
        let mut images = Vec::new();
        for (i, reverse) in [false, true].into_iter().enumerate() {
            let tree = dir.path().join(format!("tree-{compression}-{i}"));
            stage_sample(&tree, reverse);
            let image = dir.path().join(format!("{compression}-{i}.img"));
            erofs::mkfs(&tree, &image, &uuid, compression).unwrap();
            images.push(std::fs::read(&image).unwrap());
        }
        assert!(
            images[0] == images[1],
            "{compression}: two builds of the same tree differ"
        );
        let sb = &images[0][1024..1024 + 128];
        assert_eq!(erofs::superblock_uuid(sb).as_deref(), Some(uuid.as_str()));
        assert_eq!(images[0].len() % 4096, 0);
    }
    assert_eq!(erofs::superblock_uuid(&[0; 128]), None);
    assert!(erofs::mkfs_version().unwrap().starts_with("mkfs.erofs "));
}
