//! Garbage collection of an OCI image layout: the images a host no longer names, and the
//! blobs no remaining image reaches.
//!
//! For the layout of images pulled at boot: a host file that stops naming an image must
//! not keep its layers on the data disk forever.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::Path;

use crate::ImageError;
use crate::layout::{ImageLayout, REF_NAME_ANNOTATION};

/// What a collection removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LayoutCollected {
    pub images: usize,
    pub blobs: usize,
    pub bytes: u64,
}

/// Keeps in the layout at `dir` only the images named (ref.name annotation) in `keep`,
/// and the blobs they reach (manifest, config, layers). `index.json` is rewritten
/// atomically first, so a crash in between leaves unreferenced blobs, never a listed
/// image missing one. A missing layout is no error. Holds the layout's `flock`, like every
/// writer of it.
pub fn collect_layout_garbage(
    dir: &Path,
    keep: &BTreeSet<String>,
) -> Result<LayoutCollected, ImageError> {
    let mut collected = LayoutCollected::default();
    let index_path = dir.join("index.json");
    let text = match fs::read(&index_path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(collected),
        Err(e) => {
            return Err(ImageError::io(
                format!("reading {}", index_path.display()),
                e,
            ));
        }
    };
    let lock =
        fs::File::open(dir).map_err(|e| ImageError::io(format!("opening {}", dir.display()), e))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| ImageError::io(format!("locking {}", dir.display()), e.into()))?;
    let mut index: serde_json::Value = serde_json::from_slice(&text).map_err(|e| {
        ImageError::io(
            format!("parsing {}", index_path.display()),
            io::Error::other(e),
        )
    })?;
    let name_of = |m: &serde_json::Value| {
        m["annotations"][REF_NAME_ANNOTATION]
            .as_str()
            .map(str::to_string)
    };
    let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
    let (kept, dropped): (Vec<_>, Vec<_>) = manifests
        .into_iter()
        .partition(|m| name_of(m).is_some_and(|n| keep.contains(&n)));
    collected.images = dropped.len();
    // What the kept images reach; an image that does not open keeps everything (better a
    // full disk than a broken image).
    let mut reachable = BTreeSet::new();
    for m in &kept {
        let Some(name) = name_of(m) else { continue };
        let layout = ImageLayout::open_ref(dir, &name)?;
        reachable.insert(layout.manifest_digest().to_string());
        if let Some(d) = m["digest"].as_str() {
            reachable.insert(d.to_string());
        }
        reachable.insert(layout.manifest().config().digest().to_string());
        for layer in layout.layers() {
            reachable.insert(layer.digest);
        }
    }
    if collected.images > 0 {
        index["manifests"] = serde_json::Value::Array(kept);
        crate::layout_index::write_index(dir, &index)?;
    }
    let blobs = dir.join("blobs").join("sha256");
    let entries = match fs::read_dir(&blobs) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(collected),
        Err(e) => return Err(ImageError::io(format!("reading {}", blobs.display()), e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| ImageError::io(format!("reading {}", blobs.display()), e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // A partial download is resumed by the next pull of its image (or replaced).
        if name.ends_with(".partial") || reachable.contains(&format!("sha256:{name}")) {
            continue;
        }
        let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
        fs::remove_file(entry.path())
            .map_err(|e| ImageError::io(format!("removing {}", entry.path().display()), e))?;
        collected.blobs += 1;
        collected.bytes += size;
    }
    Ok(collected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::copy_image;
    use crate::import::{LayerSource, import};

    fn image(dir: &Path, name: &str, file: &str) -> ImageLayout {
        let root = dir.join(format!("{name}-root"));
        fs::create_dir_all(&root).unwrap();
        fs::write(root.join(file), name).unwrap();
        let layout = dir.join(format!("{name}-layout"));
        import(
            &[LayerSource::Dir(root)],
            &keel_config::ImageDefaults::default(),
            Some(name),
            &layout,
        )
        .unwrap();
        ImageLayout::open(&layout).unwrap()
    }

    #[test]
    fn images_not_kept_go_with_the_blobs_only_they_reach() {
        let work = tempfile::tempdir().unwrap();
        let store = work.path().join("store");
        copy_image(&image(work.path(), "a", "x"), &store, "a").unwrap();
        copy_image(&image(work.path(), "b", "y"), &store, "b").unwrap();
        let blobs = || fs::read_dir(store.join("blobs/sha256")).unwrap().count();
        let before = blobs();
        fs::write(store.join("blobs/sha256/0000.partial"), "half").unwrap();

        let keep: BTreeSet<String> = ["a".to_string()].into();
        let c = collect_layout_garbage(&store, &keep).unwrap();
        assert_eq!(c.images, 1);
        assert!(c.blobs >= 2, "{c:?}");
        assert_eq!(blobs(), before - c.blobs + 1);
        ImageLayout::open_ref(&store, "a").unwrap();
        assert!(ImageLayout::open_ref(&store, "b").is_err());
        assert!(store.join("blobs/sha256/0000.partial").exists());
        // Nothing more the second time; no layout is no error.
        assert_eq!(
            collect_layout_garbage(&store, &keep).unwrap(),
            LayoutCollected::default()
        );
        assert_eq!(
            collect_layout_garbage(&work.path().join("none"), &keep).unwrap(),
            LayoutCollected::default()
        );
    }
}
