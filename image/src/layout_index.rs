//! The one writer of an OCI layout's `index.json` (and of its `oci-layout` marker, when the
//! layout is new): a manifest is listed under a ref name, replacing an entry of that name and
//! keeping every other entry as it is ([`list_manifest`]), or a new layout's index gets its
//! one manifest ([`new_index`]); the file is replaced atomically and durably. Callers hold
//! the layout's lock (`flock` on its directory) while they write.

use std::fs;
use std::io;
use std::path::Path;

use crate::ImageError;
use crate::atomic::write_atomic;
use crate::layout::{MEDIA_TYPE_INDEX, REF_NAME_ANNOTATION};

/// The `oci-layout` marker of a layout this crate creates.
#[cfg_attr(not(any(feature = "builder", feature = "pull")), allow(dead_code))]
pub(crate) const LAYOUT_MARKER: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// Lists the manifest `digest` (`media_type`, `size` bytes) in `dir`'s `index.json` under
/// `ref_name`, creating the index (and the `oci-layout` marker) if the layout is new.
// Pulls and archives list manifests; the guest side only collects garbage.
#[cfg_attr(not(any(feature = "builder", feature = "pull")), allow(dead_code))]
pub(crate) fn list_manifest(
    dir: &Path,
    media_type: &str,
    digest: &str,
    size: u64,
    ref_name: &str,
) -> Result<(), ImageError> {
    let marker = dir.join("oci-layout");
    if !marker.exists() {
        write_atomic(&marker, LAYOUT_MARKER, 0o644)
            .map_err(|e| ImageError::io(format!("writing {}", marker.display()), e))?;
    }
    let path = dir.join("index.json");
    let invalid = |reason: &str| ImageError::InvalidLayout {
        path: dir.to_owned(),
        reason: reason.to_owned(),
    };
    let mut index: serde_json::Value = match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| ImageError::Json {
            what: path.display().to_string(),
            source: e,
        })?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_INDEX,
            "manifests": [],
        }),
        Err(e) => return Err(ImageError::io(format!("reading {}", path.display()), e)),
    };
    let manifests = index
        .as_object_mut()
        .ok_or_else(|| invalid("index.json is not a JSON object"))?
        .entry("manifests")
        .or_insert_with(|| serde_json::Value::Array(Vec::new()))
        .as_array_mut()
        .ok_or_else(|| invalid("index.json has no manifests list"))?;
    manifests.retain(|m| m["annotations"][REF_NAME_ANNOTATION].as_str() != Some(ref_name));
    manifests.push(entry(media_type, digest, size, Some(ref_name)));
    write_index(dir, &index)
}

/// Writes a new layout's `index.json` (and marker) listing one manifest, named `ref_name`
/// if given; whatever index was there is replaced.
#[cfg_attr(not(feature = "builder"), allow(dead_code))]
pub(crate) fn new_index(
    dir: &Path,
    media_type: &str,
    digest: &str,
    size: u64,
    ref_name: Option<&str>,
) -> Result<(), ImageError> {
    let marker = dir.join("oci-layout");
    write_atomic(&marker, LAYOUT_MARKER, 0o644)
        .map_err(|e| ImageError::io(format!("writing {}", marker.display()), e))?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_INDEX,
        "manifests": [entry(media_type, digest, size, ref_name)],
    });
    write_index(dir, &index)
}

/// An index entry: a manifest's descriptor, with its ref name as an annotation.
fn entry(media_type: &str, digest: &str, size: u64, ref_name: Option<&str>) -> serde_json::Value {
    let mut entry = serde_json::json!({
        "mediaType": media_type,
        "digest": digest,
        "size": size,
    });
    if let Some(name) = ref_name {
        entry["annotations"] = serde_json::json!({ REF_NAME_ANNOTATION: name });
    }
    entry
}

/// Replaces `dir`'s `index.json` with `index` (garbage collection drops entries with it).
pub(crate) fn write_index(dir: &Path, index: &serde_json::Value) -> Result<(), ImageError> {
    let path = dir.join("index.json");
    let bytes = serde_json::to_vec_pretty(index).map_err(|e| ImageError::Json {
        what: "index.json".into(),
        source: e,
    })?;
    write_atomic(&path, &bytes, 0o644)
        .map_err(|e| ImageError::io(format!("writing {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::MEDIA_TYPE_MANIFEST;

    #[test]
    fn index_update_replaces_same_name() {
        let tmp = tempfile::tempdir().unwrap();
        let d1 = format!("sha256:{}", "1".repeat(64));
        let d2 = format!("sha256:{}", "2".repeat(64));
        list_manifest(tmp.path(), MEDIA_TYPE_MANIFEST, &d1, 10, "a").unwrap();
        list_manifest(tmp.path(), MEDIA_TYPE_MANIFEST, &d1, 10, "b").unwrap();
        list_manifest(tmp.path(), MEDIA_TYPE_MANIFEST, &d2, 20, "a").unwrap();
        let idx: serde_json::Value =
            serde_json::from_slice(&fs::read(tmp.path().join("index.json")).unwrap()).unwrap();
        let m = idx["manifests"].as_array().unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0]["annotations"][REF_NAME_ANNOTATION], "b");
        assert_eq!(m[1]["annotations"][REF_NAME_ANNOTATION], "a");
        assert_eq!(m[1]["digest"], d2.as_str());
        assert!(tmp.path().join("oci-layout").exists());
    }
}
