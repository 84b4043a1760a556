//! The root image: an erofs file system made by erofs-utils' `mkfs.erofs`, reproducibly
//! (one fixed timestamp, every file owned by root, no xattrs from the build machine, a
//! UUID the caller derives from the inputs).

use std::fmt;
use std::path::Path;
use std::process::Command;
use std::str::FromStr;

const MKFS: &str = "mkfs.erofs";

/// How file data is stored in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain blocks.
    None,
    /// lz4hc at the given level (1-12); the kernel decompresses with its lz4 decompressor.
    Lz4hc(u8),
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compression::None => write!(f, "none"),
            Compression::Lz4hc(level) => write!(f, "lz4hc,{level}"),
        }
    }
}

impl FromStr for Compression {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?}: expected none, lz4hc or lz4hc,LEVEL (1-12)");
        match s.split_once(',') {
            None if s == "none" => Ok(Compression::None),
            None if s == "lz4hc" => Ok(Compression::Lz4hc(9)),
            Some(("lz4hc", level)) => level
                .parse()
                .ok()
                .filter(|l| (1..=12).contains(l))
                .map(Compression::Lz4hc)
                .ok_or_else(bad),
            _ => Err(bad()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ErofsError {
    #[error(
        "{MKFS} was not found: install erofs-utils (scripts/install-deps does, or apt-get install erofs-utils)"
    )]
    NotInstalled,
    #[error("running {MKFS}: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("{MKFS} {args} failed ({status}): {stderr}")]
    Failed {
        args: String,
        status: String,
        stderr: String,
    },
    #[error("{0:?} is not a UUID (expected 8-4-4-4-12 hex digits)")]
    BadUuid(String),
}

/// `mkfs.erofs`'s version line (for the build's record of its inputs).
pub fn mkfs_version() -> Result<String, ErofsError> {
    let out = Command::new(MKFS).arg("-V").output().map_err(spawn_error)?;
    // erofs-utils 1.5 has no version option: it prints its banner, then rejects `-V`.
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .find(|l| l.starts_with(MKFS))
        .unwrap_or(MKFS)
        .trim()
        .to_string())
}

fn spawn_error(e: std::io::Error) -> ErofsError {
    if e.kind() == std::io::ErrorKind::NotFound {
        ErofsError::NotInstalled
    } else {
        ErofsError::Spawn(e)
    }
}

/// The arguments `mkfs` passes (without the program name).
pub fn mkfs_args(tree: &Path, image: &Path, uuid: &str, compression: Compression) -> Vec<String> {
    let mut args = vec![
        "--quiet".to_string(),
        // Every file gets this mtime and the superblock this build time.
        "-T0".to_string(),
        format!("-U{uuid}"),
        "--all-root".to_string(),
        // The build machine's xattrs (security labels, capabilities of copied host files)
        // are not the image's.
        "-x-1".to_string(),
    ];
    if let Compression::Lz4hc(level) = compression {
        args.push(format!("-zlz4hc,{level}"));
    }
    args.push(image.to_string_lossy().into_owned());
    args.push(tree.to_string_lossy().into_owned());
    args
}

/// Makes `image` (replacing it) from the directory `tree`.
pub fn mkfs(
    tree: &Path,
    image: &Path,
    uuid: &str,
    compression: Compression,
) -> Result<(), ErofsError> {
    if !is_uuid(uuid) {
        return Err(ErofsError::BadUuid(uuid.to_string()));
    }
    // mkfs.erofs writes into an existing file without truncating it first.
    match std::fs::remove_file(image) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ErofsError::Spawn(e)),
    }
    let args = mkfs_args(tree, image, uuid, compression);
    let out = Command::new(MKFS)
        .args(&args)
        .output()
        .map_err(spawn_error)?;
    if !out.status.success() {
        return Err(ErofsError::Failed {
            args: args.join(" "),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A UUID made of the first 16 bytes of a digest, marked as RFC 9562 version 8 (custom),
/// so the same inputs always give the same file-system UUID.
pub fn uuid_from_digest(digest: &[u8; 32]) -> String {
    let mut b: [u8; 16] = digest[..16].try_into().expect("16 of 32 bytes");
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    crate::os::format_uuid(&b)
}

/// Offset of the erofs superblock in the image, and of its fields stage 1 reads.
pub const SUPERBLOCK_OFFSET: u64 = 1024;
pub const MAGIC: u32 = 0xE0F5_E1E2;
/// Offset of the 16-byte UUID inside the superblock.
pub const UUID_OFFSET_IN_SUPERBLOCK: usize = 48;

/// The UUID in an erofs superblock (the 128 bytes at [`SUPERBLOCK_OFFSET`]), formatted as
/// `mkfs.erofs -U` takes it; `None` when the magic is not erofs'.
pub fn superblock_uuid(superblock: &[u8]) -> Option<String> {
    let magic = u32::from_le_bytes(superblock.get(..4)?.try_into().ok()?);
    if magic != MAGIC {
        return None;
    }
    let raw = superblock.get(UUID_OFFSET_IN_SUPERBLOCK..UUID_OFFSET_IN_SUPERBLOCK + 16)?;
    Some(crate::os::format_uuid(raw.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_versioned_and_checked() {
        let u = uuid_from_digest(&[0xff; 32]);
        assert_eq!(u, "ffffffff-ffff-8fff-bfff-ffffffffffff");
        assert!(is_uuid(&u));
        assert!(is_uuid(&uuid_from_digest(&[0; 32])));
        for bad in [
            "",
            "x",
            "ffffffff-ffff-8fff-bfff-fffffffffff",
            "gfffffff-ffff-8fff-bfff-ffffffffffff",
        ] {
            assert!(!is_uuid(bad), "{bad}");
        }
    }

    #[test]
    fn compression_parses() {
        assert_eq!("none".parse(), Ok(Compression::None));
        assert_eq!("lz4hc".parse(), Ok(Compression::Lz4hc(9)));
        assert_eq!("lz4hc,12".parse(), Ok(Compression::Lz4hc(12)));
        for bad in ["lz4", "lz4hc,0", "lz4hc,13", "zstd", ""] {
            assert!(bad.parse::<Compression>().is_err(), "{bad}");
        }
        assert_eq!(Compression::Lz4hc(12).to_string(), "lz4hc,12");
    }

    #[test]
    fn arguments_are_reproducible() {
        let args = mkfs_args(
            Path::new("/s"),
            Path::new("/o/root.img"),
            "00000000-0000-8000-8000-000000000000",
            Compression::Lz4hc(12),
        );
        assert_eq!(
            args,
            [
                "--quiet",
                "-T0",
                "-U00000000-0000-8000-8000-000000000000",
                "--all-root",
                "-x-1",
                "-zlz4hc,12",
                "/o/root.img",
                "/s"
            ]
        );
    }
}
