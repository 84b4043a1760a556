//! A hostile OCI image for the end-to-end tests: one gzip layer holding a file of zeros that
//! unpacks to far more than it weighs (a decompression bomb), streamed through the encoder
//! and a hasher so the test never holds it whole.

use std::io::{self, Read, Write};
use std::path::Path;

use sha2::Digest;

/// Writes both of `data` to a hasher (the uncompressed diff_id) and to the encoder.
struct Tee<W: Write> {
    hasher: sha2::Sha256,
    out: W,
}

impl<W: Write> Write for Tee<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes an OCI layout at `dir` whose one layer is a gzip of a `size`-byte file of zeros.
pub fn write_bomb_layout(dir: &Path, size: u64) {
    let mut header = tar::Header::new_gnu();
    header.set_path("bomb").unwrap();
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(1_000_000);
    header.set_size(size);
    header.set_cksum();
    let mut tee = Tee {
        hasher: sha2::Sha256::new(),
        out: flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()),
    };
    tee.write_all(header.as_bytes()).unwrap();
    io::copy(&mut io::repeat(0).take(size), &mut tee).unwrap();
    let pad = (512 - size % 512) % 512;
    tee.write_all(&vec![0; pad as usize + 1024]).unwrap();
    let diff_id = format!("sha256:{}", hex(&tee.hasher.finalize()));
    let blob = tee.out.finish().unwrap();

    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8], media_type: &str| {
        let digest = hex(&sha2::Sha256::digest(data));
        std::fs::write(blobs.join(&digest), data).unwrap();
        serde_json::json!({"mediaType": media_type, "digest": format!("sha256:{digest}"), "size": data.len()})
    };
    let layer = put(&blob, "application/vnd.oci.image.layer.v1.tar+gzip");
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bomb"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    });
    let config = put(
        config.to_string().as_bytes(),
        "application/vnd.oci.image.config.v1+json",
    );
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config, "layers": [layer],
    });
    let manifest = put(
        manifest.to_string().as_bytes(),
        "application/vnd.oci.image.manifest.v1+json",
    );
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [manifest]});
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
}
