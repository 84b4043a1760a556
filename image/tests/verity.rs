//! The hash tree against cryptsetup's: `veritysetup format` over the same data must write
//! the same bytes and report the same root hash, and `veritysetup verify` must accept our
//! tree (and refuse it once a data block changes).

#![cfg(feature = "builder")]

use std::io::Write;
use std::path::Path;
use std::process::Command;

use keel_image::verity::append_hash_tree;

/// `veritysetup ARGS`, failing loudly (never skipping) when the tool is missing.
fn veritysetup(args: &[&str]) -> std::process::Output {
    let program = ["/usr/sbin/veritysetup", "/sbin/veritysetup"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .unwrap_or("veritysetup");
    match Command::new(program).args(args).output() {
        Ok(out) => out,
        Err(e) => panic!(
            "cannot run veritysetup ({e}): install cryptsetup-bin (run scripts/install-deps)"
        ),
    }
}

fn common(salt: &str, data_blocks: u64) -> Vec<String> {
    [
        "--no-superblock",
        "--data-block-size",
        "4096",
        "--hash-block-size",
        "4096",
        "--hash",
        "sha256",
        "--salt",
        salt,
        "--data-blocks",
        &data_blocks.to_string(),
        "--hash-offset",
        &(data_blocks * 4096).to_string(),
    ]
    .map(String::from)
    .to_vec()
}

fn run(args: &[String]) -> std::process::Output {
    veritysetup(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Deterministic, non-repeating data.
fn data(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn cross_check(len: usize) {
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours.img");
    let theirs = dir.path().join("theirs.img");
    let content = data(len);
    std::fs::File::create(&ours)
        .unwrap()
        .write_all(&content)
        .unwrap();
    let salt: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(37)).collect();
    let tree = append_hash_tree(&ours, &salt).unwrap();

    let mut padded = content.clone();
    padded.resize(tree.data_blocks as usize * 4096, 0);
    std::fs::write(&theirs, &padded).unwrap();
    let mut args = vec!["format".to_string()];
    args.extend(common(&tree.salt, tree.data_blocks));
    args.extend([theirs.display().to_string(), theirs.display().to_string()]);
    let out = run(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "veritysetup format failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let root = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Root hash:"))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no root hash in {stdout}"));
    assert_eq!(tree.root_hash, root, "{len} bytes");
    let (a, b) = (
        std::fs::read(&ours).unwrap(),
        std::fs::read(&theirs).unwrap(),
    );
    assert_eq!(a.len(), b.len(), "{len} bytes: tree sizes differ");
    assert!(a == b, "{len} bytes: the hash trees differ");
    assert_eq!(
        a.len() as u64,
        (tree.data_blocks + tree.hash_blocks) * 4096,
        "{len} bytes"
    );

    let mut verify = vec!["verify".to_string()];
    verify.extend(common(&tree.salt, tree.data_blocks));
    verify.extend([
        ours.display().to_string(),
        ours.display().to_string(),
        tree.root_hash.clone(),
    ]);
    let out = run(&verify);
    assert!(
        out.status.success(),
        "veritysetup verify refused our tree: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // One flipped bit in the last data block must be caught.
    let mut corrupt = a;
    corrupt[tree.data_blocks as usize * 4096 - 1] ^= 1;
    std::fs::write(&ours, &corrupt).unwrap();
    let out = run(&verify);
    assert!(
        !out.status.success(),
        "veritysetup verify accepted corrupted data ({len} bytes)"
    );
}

#[test]
fn one_block_matches_veritysetup() {
    cross_check(100);
}

#[test]
fn one_level_matches_veritysetup() {
    cross_check(3 * 4096 + 1);
}

#[test]
fn two_levels_match_veritysetup() {
    cross_check(130 * 4096);
}

#[test]
fn three_levels_match_veritysetup() {
    cross_check((128 * 128 + 1) * 4096 - 5);
}
