//! An update bundle: what `keel upgrade` sends a running host. The build output's
//! `update.json` (the [`UpdateManifest`]: version, digests and sizes of the UKI and the root
//! image) and `update.sig` (an ed25519 signature of `update.json`'s exact bytes, base64),
//! with the two files the manifest describes. A host installs a bundle only when a key its
//! root image trusts (`[update] trusted_keys`, in [`TRUSTED_KEYS_DIR`]) signed it and its
//! version is newer than the running one; the digests are checked before the slot is
//! touched, and again once it is written.
//!
//! Keys are ed25519 in the usual PEM forms (PKCS#8 `PRIVATE KEY`, SubjectPublicKeyInfo
//! `PUBLIC KEY`), as `keel pki update-key` writes them and OpenSSL reads them.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

pub const MANIFEST_FILE: &str = "update.json";
pub const SIGNATURE_FILE: &str = "update.sig";
/// Where the root image keeps the public keys it trusts to sign updates.
pub const TRUSTED_KEYS_DIR: &str = "/usr/share/keel/update-keys";
/// The bundle format this Keel writes and reads.
pub const FORMAT: u32 = 1;

/// The DER prefix of an ed25519 SubjectPublicKeyInfo: the key's 32 bytes follow.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateManifest {
    pub format: u32,
    pub hostname: String,
    pub version: String,
    /// The unified kernel image (`keel.efi`).
    pub uki_sha256: String,
    pub uki_bytes: u64,
    /// The root image (`root.img`), its dm-verity tree included.
    pub root_image_sha256: String,
    pub root_image_bytes: u64,
    /// The dm-verity root hash on the UKI's command line, when the image has one.
    pub verity_root_hash: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("not a PEM {0}")]
    Pem(&'static str),
    #[error("not an ed25519 key: {0}")]
    Key(String),
    #[error("the signature is not base64 of 64 bytes")]
    SignatureFormat,
    #[error("no trusted key signed this update ({0} keys tried)")]
    Untrusted(usize),
    #[error("the host trusts no update key: build it with [update] trusted_keys")]
    NoTrustedKeys,
    #[error("the manifest: {0}")]
    Manifest(String),
}

fn pem_body(text: &str, label: &'static str) -> Result<Vec<u8>, BundleError> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin).ok_or(BundleError::Pem(label))? + begin.len();
    let stop = text[start..].find(&end).ok_or(BundleError::Pem(label))? + start;
    let body: String = text[start..stop].split_whitespace().collect();
    STANDARD.decode(body).map_err(|_| BundleError::Pem(label))
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// A new signing key: (private key PEM, public key PEM).
pub fn generate_key() -> Result<(String, String), BundleError> {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
        .map_err(|_| BundleError::Key("the system's random source failed".into()))?;
    let pair =
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|e| BundleError::Key(e.to_string()))?;
    Ok((
        pem("PRIVATE KEY", pkcs8.as_ref()),
        public_key_pem(pair.public_key().as_ref()),
    ))
}

pub fn public_key_pem(key: &[u8]) -> String {
    let mut der = SPKI_PREFIX.to_vec();
    der.extend_from_slice(key);
    pem("PUBLIC KEY", &der)
}

/// The 32 bytes of an ed25519 public key in PEM.
pub fn parse_public_key(text: &str) -> Result<[u8; 32], BundleError> {
    let der = pem_body(text, "PUBLIC KEY")?;
    let key = der
        .strip_prefix(&SPKI_PREFIX[..])
        .ok_or_else(|| BundleError::Key("not an ed25519 SubjectPublicKeyInfo".into()))?;
    key.try_into()
        .map_err(|_| BundleError::Key(format!("{} key bytes, not 32", key.len())))
}

/// Signs `message` with the PEM private key: the base64 text of `update.sig`.
pub fn sign(private_pem: &str, message: &[u8]) -> Result<String, BundleError> {
    let der = pem_body(private_pem, "PRIVATE KEY")?;
    let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
        .map_err(|e| BundleError::Key(e.to_string()))?;
    Ok(STANDARD.encode(pair.sign(message).as_ref()) + "\n")
}

/// The public key of a PEM private key.
pub fn public_key_of(private_pem: &str) -> Result<[u8; 32], BundleError> {
    let der = pem_body(private_pem, "PRIVATE KEY")?;
    let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
        .map_err(|e| BundleError::Key(e.to_string()))?;
    pair.public_key()
        .as_ref()
        .try_into()
        .map_err(|_| BundleError::Key("not 32 bytes".into()))
}

/// Checks `signature` (the base64 text) of `message` against the trusted keys; the index of
/// the key that signed it.
pub fn verify(trusted: &[[u8; 32]], message: &[u8], signature: &str) -> Result<usize, BundleError> {
    if trusted.is_empty() {
        return Err(BundleError::NoTrustedKeys);
    }
    let signature = STANDARD
        .decode(signature.trim())
        .ok()
        .filter(|s| s.len() == 64)
        .ok_or(BundleError::SignatureFormat)?;
    trusted
        .iter()
        .position(|key| {
            UnparsedPublicKey::new(&ED25519, key)
                .verify(message, &signature)
                .is_ok()
        })
        .ok_or(BundleError::Untrusted(trusted.len()))
}

impl UpdateManifest {
    /// Parses `update.json` and checks every field a host relies on.
    pub fn parse(bytes: &[u8]) -> Result<UpdateManifest, BundleError> {
        let m: UpdateManifest =
            serde_json::from_slice(bytes).map_err(|e| BundleError::Manifest(e.to_string()))?;
        let hex64 = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
        if m.format != FORMAT {
            return Err(BundleError::Manifest(format!(
                "format {} (this Keel reads format {FORMAT})",
                m.format
            )));
        }
        if !hex64(&m.uki_sha256)
            || !hex64(&m.root_image_sha256)
            || m.verity_root_hash.as_deref().is_some_and(|h| !hex64(h))
        {
            return Err(BundleError::Manifest(
                "a digest is not 64 hex digits".into(),
            ));
        }
        if m.version.is_empty()
            || m.version.len() > 32
            || !m.version.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        {
            return Err(BundleError::Manifest(format!("version {:?}", m.version)));
        }
        if m.uki_bytes == 0 || m.root_image_bytes == 0 {
            return Err(BundleError::Manifest("an empty file".into()));
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_with_its_key_and_message() {
        let (private, public) = generate_key().unwrap();
        let (_, other) = generate_key().unwrap();
        let key = parse_public_key(&public).unwrap();
        assert_eq!(public_key_of(&private).unwrap(), key);
        let other = parse_public_key(&other).unwrap();
        let sig = sign(&private, b"update.json bytes").unwrap();
        assert_eq!(
            verify(&[other, key], b"update.json bytes", &sig).unwrap(),
            1
        );
        assert!(matches!(
            verify(&[other], b"update.json bytes", &sig),
            Err(BundleError::Untrusted(1))
        ));
        assert!(verify(&[key], b"update.json byteS", &sig).is_err());
        assert!(matches!(
            verify(&[], b"x", &sig),
            Err(BundleError::NoTrustedKeys)
        ));
        assert!(matches!(
            verify(&[key], b"x", "not base64!"),
            Err(BundleError::SignatureFormat)
        ));
    }

    #[test]
    fn openssl_keys_are_read() {
        // `openssl genpkey -algorithm ed25519` and `openssl pkey -pubout` of it.
        let private = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIBBsTsGdvnETSBXa2g1oULd1BCwCmbMXT1OZW9jXqAOQ\n-----END PRIVATE KEY-----\n";
        let public = parse_public_key(&public_key_pem(&public_key_of(private).unwrap())).unwrap();
        let sig = sign(private, b"m").unwrap();
        assert_eq!(verify(&[public], b"m", &sig).unwrap(), 0);
    }

    #[test]
    fn manifests_are_checked() {
        let good = UpdateManifest {
            format: FORMAT,
            hostname: "h".into(),
            version: "2.1".into(),
            uki_sha256: "a".repeat(64),
            uki_bytes: 10,
            root_image_sha256: "b".repeat(64),
            root_image_bytes: 20,
            verity_root_hash: None,
        };
        let json = serde_json::to_vec(&good).unwrap();
        assert_eq!(UpdateManifest::parse(&json).unwrap(), good);
        for bad in [
            UpdateManifest {
                format: 2,
                ..good.clone()
            },
            UpdateManifest {
                version: "2-rc".into(),
                ..good.clone()
            },
            UpdateManifest {
                uki_sha256: "zz".into(),
                ..good.clone()
            },
            UpdateManifest {
                root_image_bytes: 0,
                ..good.clone()
            },
        ] {
            assert!(UpdateManifest::parse(&serde_json::to_vec(&bad).unwrap()).is_err());
        }
        assert!(UpdateManifest::parse(b"{\"format\":1,\"extra\":true}").is_err());
    }
}
