//! `keel pki`: the keys a fleet's updates are signed with. `update-key -o DIR` writes an
//! ed25519 key pair: `DIR/update-key.pem` (private, 0600: it signs builds, `keel build
//! --sign-key`) and `DIR/update-key.pub.pem` (public: hosts list it in `[update]
//! trusted_keys` and accept only updates it signed).

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use keel_image::update_bundle;

pub const PRIVATE_FILE: &str = "update-key.pem";
pub const PUBLIC_FILE: &str = "update-key.pub.pem";

pub fn update_key(dir: &Path) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let private_path = dir.join(PRIVATE_FILE);
    let public_path = dir.join(PUBLIC_FILE);
    let (private, public) = update_bundle::generate_key().map_err(|e| e.to_string())?;
    // create_new: a key that signs a fleet's updates is never overwritten by accident.
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&private_path)
        .map_err(|e| format!("{}: {e}", private_path.display()))?;
    file.write_all(private.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("{}: {e}", private_path.display()))?;
    fs::write(&public_path, public).map_err(|e| format!("{}: {e}", public_path.display()))?;
    eprintln!(
        "keel: wrote {} (keep it secret: it signs updates) and {} (list it in [update] trusted_keys)",
        private_path.display(),
        public_path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_pair_is_written_once() {
        let dir = tempfile::tempdir().unwrap();
        update_key(dir.path()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.path().join(PRIVATE_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let private = fs::read_to_string(dir.path().join(PRIVATE_FILE)).unwrap();
        let public = fs::read_to_string(dir.path().join(PUBLIC_FILE)).unwrap();
        assert_eq!(
            update_bundle::public_key_of(&private).unwrap(),
            update_bundle::parse_public_key(&public).unwrap()
        );
        assert!(update_key(dir.path()).is_err(), "never overwritten");
    }
}
