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
pub const SECURE_BOOT_KEY: &str = "secure-boot.key.pem";
pub const SECURE_BOOT_CERT: &str = "secure-boot.crt.pem";
pub const SECURE_BOOT_CERT_DER: &str = "secure-boot.crt.der";
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

/// A Secure Boot signing key: RSA 2048 (what UEFI firmware verifies) with a self-signed
/// certificate valid ten years, made with OpenSSL (ring cannot generate RSA keys). The
/// certificate goes into the firmware's `db` (its DER form, for firmware setup screens and
/// enrollment tools); the key signs builds (`keel build --secure-boot-key`).
pub fn secure_boot_key(dir: &Path, name: &str) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let key = dir.join(SECURE_BOOT_KEY);
    let cert = dir.join(SECURE_BOOT_CERT);
    if key.exists() {
        return Err(format!("{} exists: it is never overwritten", key.display()));
    }
    let openssl = |args: &[&std::ffi::OsStr]| -> Result<(), String> {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .map_err(|e| format!("openssl: {e}: install openssl (scripts/install-deps does)"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "openssl: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    };
    let subject = format!("/CN={name}/");
    openssl(&[
        "req".as_ref(),
        "-new".as_ref(),
        "-x509".as_ref(),
        "-newkey".as_ref(),
        "rsa:2048".as_ref(),
        "-sha256".as_ref(),
        "-nodes".as_ref(),
        "-days".as_ref(),
        "3650".as_ref(),
        "-subj".as_ref(),
        subject.as_ref(),
        "-keyout".as_ref(),
        key.as_os_str(),
        "-out".as_ref(),
        cert.as_os_str(),
    ])?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("{}: {e}", key.display()))?;
    let der = dir.join(SECURE_BOOT_CERT_DER);
    openssl(&[
        "x509".as_ref(),
        "-in".as_ref(),
        cert.as_os_str(),
        "-outform".as_ref(),
        "der".as_ref(),
        "-out".as_ref(),
        der.as_os_str(),
    ])?;
    eprintln!(
        "keel: wrote {} (keep it secret: it signs boot files), {} and {} (enroll it in the firmware's db)",
        key.display(),
        cert.display(),
        der.display()
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

    #[test]
    fn a_secure_boot_key_signs_what_sbverify_accepts() {
        let dir = tempfile::tempdir().unwrap();
        secure_boot_key(dir.path(), "Keel test").unwrap();
        let signer = crate::boot_disk::SecureBootSigner {
            key: dir.path().join(SECURE_BOOT_KEY),
            cert: dir.path().join(SECURE_BOOT_CERT),
        };
        let loader = fs::read(keel_image::esp::DEBIAN_SYSTEMD_BOOT).unwrap();
        let signed = signer.sign(&loader).unwrap();
        let file = dir.path().join("signed.efi");
        fs::write(&file, signed).unwrap();
        let verified = std::process::Command::new("sbverify")
            .arg("--cert")
            .arg(dir.path().join(SECURE_BOOT_CERT))
            .arg(&file)
            .output()
            .unwrap();
        assert!(verified.status.success(), "{verified:?}");
        assert!(dir.path().join(SECURE_BOOT_CERT_DER).is_file());
        assert!(
            secure_boot_key(dir.path(), "again").is_err(),
            "never overwritten"
        );
    }
}
