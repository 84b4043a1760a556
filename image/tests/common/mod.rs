//! What the image crate's host tests share: writing a small OCI layout around given layers.

use std::fs;
use std::path::Path;

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes an OCI layout at `dir` whose image has `layers` (media type, blob), and returns
/// the layers' digests (`sha256:...`). Each layer's diff_id is its digest: what the
/// uncompressed stream hashes to is not what these tests are about.
pub fn write_layout(dir: &Path, layers: &[(&str, Vec<u8>)]) -> Vec<String> {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8], media_type: &str| {
        let hex = sha256_hex(data);
        fs::write(blobs.join(&hex), data).unwrap();
        serde_json::json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": data.len()})
    };
    let descriptors: Vec<_> = layers.iter().map(|(t, blob)| put(blob, t)).collect();
    let digests: Vec<String> = descriptors
        .iter()
        .map(|d| d["digest"].as_str().unwrap().to_string())
        .collect();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": digests},
    });
    let config = put(
        config.to_string().as_bytes(),
        "application/vnd.oci.image.config.v1+json",
    );
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config, "layers": descriptors,
    });
    let manifest = put(
        manifest.to_string().as_bytes(),
        "application/vnd.oci.image.manifest.v1+json",
    );
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [manifest]});
    fs::write(dir.join("index.json"), index.to_string()).unwrap();
    digests
}
