//! Garbage collection of the layer store: unpacked layers no image of the host file uses
//! any more, leftovers of interrupted unpacks, and short links to layers that are gone.

use std::collections::BTreeSet;
use std::io;
use std::path::Path;

/// What a collection removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Collected {
    pub layers: usize,
    pub partial: usize,
    pub links: usize,
}

/// Removes from `store` every unpacked layer whose digest (hex, the directory name up to an
/// `@` id-shift suffix) is not in `keep`, every `.tmp-*` directory (an unpack that never
/// completed is never trusted), and every short link left dangling. Must run before any
/// container of this boot has started: a layer in use is one `keep` names.
pub fn collect_garbage(store: &Path, keep: &BTreeSet<String>) -> io::Result<Collected> {
    let mut collected = Collected::default();
    let entries = match std::fs::read_dir(store) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(collected),
        Err(e) => return Err(e),
    };
    // Unpacks hold a shared lock on the store: only without one is a `.tmp-*` directory
    // certainly abandoned rather than being written right now.
    let store_dir = std::fs::File::open(store)?;
    let exclusive = rustix::fs::flock(
        &store_dir,
        rustix::fs::FlockOperation::NonBlockingLockExclusive,
    )
    .is_ok();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if name == "l" {
            continue;
        }
        let path = entry.path();
        if name.starts_with(".tmp-") {
            if exclusive {
                std::fs::remove_dir_all(&path)?;
                collected.partial += 1;
            }
            continue;
        }
        let digest = name.split('@').next().unwrap_or(name);
        if !keep.contains(digest) {
            std::fs::remove_dir_all(&path)?;
            collected.layers += 1;
        }
    }
    if let Ok(links) = std::fs::read_dir(store.join("l")) {
        for link in links {
            let link = link?.path();
            // metadata() follows the link: NotFound means it dangles.
            if std::fs::metadata(&link).is_err_and(|e| e.kind() == io::ErrorKind::NotFound) {
                std::fs::remove_file(&link)?;
                collected.links += 1;
            }
        }
    }
    Ok(collected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unused_layers_partial_unpacks_and_dangling_links_go() {
        let store = tempfile::tempdir().unwrap();
        let s = store.path();
        for dir in ["aaaa", "bbbb", "bbbb@100000-100000-65536", ".tmp-cccc", "l"] {
            std::fs::create_dir(s.join(dir)).unwrap();
        }
        std::fs::write(s.join("aaaa/file"), "x").unwrap();
        std::os::unix::fs::symlink("../aaaa", s.join("l/keep")).unwrap();
        std::os::unix::fs::symlink("../bbbb", s.join("l/gone")).unwrap();
        let keep: BTreeSet<String> = ["aaaa".to_string()].into();
        let collected = collect_garbage(s, &keep).unwrap();
        assert_eq!(
            collected,
            Collected {
                layers: 2,
                partial: 1,
                links: 1
            }
        );
        assert!(s.join("aaaa/file").exists());
        assert!(s.join("l/keep").exists());
        assert!(!s.join("bbbb").exists() && !s.join(".tmp-cccc").exists());
        // Nothing to do the second time; a missing store is no error.
        assert_eq!(collect_garbage(s, &keep).unwrap(), Collected::default());
        assert_eq!(
            collect_garbage(&s.join("missing"), &keep).unwrap(),
            Collected::default()
        );
    }
}
