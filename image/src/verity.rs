//! dm-verity for the root image.
//!
//! **Guest side** ([`VerityParams`]): stage 1 reads the root hash, salt and data size from
//! the kernel command line (`keel.verity.roothash=`, `keel.verity.salt=`,
//! `keel.verity.blocks=`) and loads the dm table [`VerityParams::table`] gives.
//!
//! **Builder side** ([`append_hash_tree`]): the hash tree goes on the same file, right after
//! the (4096-padded) data, in the kernel's on-disk format version 1 without a superblock
//! (what `veritysetup format --no-superblock` writes): 4096-byte data and hash blocks,
//! sha256, each digest `sha256(salt || block)`; level 0 holds the digests of the data
//! blocks, level N+1 those of level N's blocks, 128 to a block, zero-padded; the levels are
//! stored top first from the hash start, and the root hash is the digest of the top block.

use std::fmt;

/// Data and hash block size, in bytes.
pub const BLOCK_SIZE: u64 = 4096;

/// Bytes of a sha256 digest, and so of the root hash and of the salt Keel uses.
pub const DIGEST_BYTES: usize = 32;

/// The command-line parameters stage 1 reads.
pub const ROOT_HASH_PARAM: &str = "keel.verity.roothash=";
pub const SALT_PARAM: &str = "keel.verity.salt=";
pub const BLOCKS_PARAM: &str = "keel.verity.blocks=";

/// What the dm-verity target needs beside the device: the hash tree starts at block
/// `data_blocks` of the same device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerityParams {
    /// Lowercase hex sha256.
    pub root_hash: String,
    /// Lowercase hex, 32 bytes.
    pub salt: String,
    /// 4096-byte blocks of verified data, which is also where the hash tree starts.
    pub data_blocks: u64,
}

impl VerityParams {
    /// The dm table line for a device holding both the data and, after it, the hash tree:
    /// `0 <sectors> verity 1 <dev> <dev> 4096 4096 <data blocks> <hash start> sha256
    /// <root hash> <salt>`.
    pub fn table(&self, device: &str) -> String {
        format!(
            "0 {sectors} verity 1 {device} {device} {BLOCK_SIZE} {BLOCK_SIZE} {blocks} {blocks} sha256 {root} {salt}",
            sectors = self.data_blocks * (BLOCK_SIZE / 512),
            blocks = self.data_blocks,
            root = self.root_hash,
            salt = self.salt,
        )
    }

    /// The `keel.verity.*` parameters, space-separated, for the kernel command line.
    pub fn cmdline(&self) -> String {
        format!(
            "{ROOT_HASH_PARAM}{} {SALT_PARAM}{} {BLOCKS_PARAM}{}",
            self.root_hash, self.salt, self.data_blocks
        )
    }

    /// The parameters on a kernel command line: `None` when it has none of them, an error
    /// when it has only some, one twice, or a malformed one (a root that cannot be
    /// verified must not be mounted unverified).
    pub fn from_cmdline(cmdline: &str) -> Result<Option<VerityParams>, String> {
        let mut root_hash = None;
        let mut salt = None;
        let mut blocks = None;
        for word in cmdline.split_ascii_whitespace() {
            let (slot, value, param) = if let Some(v) = word.strip_prefix(ROOT_HASH_PARAM) {
                (&mut root_hash, v, ROOT_HASH_PARAM)
            } else if let Some(v) = word.strip_prefix(SALT_PARAM) {
                (&mut salt, v, SALT_PARAM)
            } else if let Some(v) = word.strip_prefix(BLOCKS_PARAM) {
                (&mut blocks, v, BLOCKS_PARAM)
            } else {
                continue;
            };
            if slot.replace(value).is_some() {
                return Err(format!("{param} is given twice"));
            }
        }
        let (root_hash, salt, blocks) = match (root_hash, salt, blocks) {
            (None, None, None) => return Ok(None),
            (Some(r), Some(s), Some(b)) => (r, s, b),
            _ => {
                return Err(format!(
                    "dm-verity needs all of {ROOT_HASH_PARAM}, {SALT_PARAM} and {BLOCKS_PARAM}"
                ));
            }
        };
        check_hex(ROOT_HASH_PARAM, root_hash)?;
        check_hex(SALT_PARAM, salt)?;
        let data_blocks = blocks
            .parse::<u64>()
            .ok()
            .filter(|b| *b > 0 && b.checked_mul(BLOCK_SIZE).is_some())
            .ok_or_else(|| format!("{BLOCKS_PARAM}{blocks}: expected a positive block count"))?;
        Ok(Some(VerityParams {
            root_hash: root_hash.to_ascii_lowercase(),
            salt: salt.to_ascii_lowercase(),
            data_blocks,
        }))
    }
}

impl fmt::Display for VerityParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "root hash {}, {} data blocks",
            self.root_hash, self.data_blocks
        )
    }
}

fn check_hex(param: &str, value: &str) -> Result<(), String> {
    if value.len() != DIGEST_BYTES * 2 || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "{param}{value}: expected {} hex digits",
            DIGEST_BYTES * 2
        ));
    }
    Ok(())
}

#[cfg(feature = "builder")]
pub use builder::{HashTree, VerityError, append_hash_tree};

#[cfg(feature = "builder")]
mod builder {
    use std::fs::{File, OpenOptions};
    use std::io;
    use std::os::unix::fs::FileExt;
    use std::path::{Path, PathBuf};

    use sha2::{Digest, Sha256};

    use super::{BLOCK_SIZE, DIGEST_BYTES, VerityParams};

    const BLOCK: usize = BLOCK_SIZE as usize;
    const HASHES_PER_BLOCK: u64 = BLOCK_SIZE / DIGEST_BYTES as u64;
    /// Blocks read per system call while hashing a level.
    const CHUNK_BLOCKS: usize = 256;

    /// What [`append_hash_tree`] wrote: the manifest records it, the command line carries
    /// [`HashTree::params`].
    #[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
    pub struct HashTree {
        /// Lowercase hex.
        pub root_hash: String,
        /// Lowercase hex.
        pub salt: String,
        /// 4096-byte blocks of data (the padded file before the tree).
        pub data_blocks: u64,
        /// 4096-byte blocks of the tree, right after the data.
        pub hash_blocks: u64,
    }

    impl HashTree {
        pub fn params(&self) -> VerityParams {
            VerityParams {
                root_hash: self.root_hash.clone(),
                salt: self.salt.clone(),
                data_blocks: self.data_blocks,
            }
        }
    }

    #[derive(Debug, thiserror::Error)]
    pub enum VerityError {
        #[error("{path}: {context}: {source}")]
        Io {
            path: PathBuf,
            context: &'static str,
            #[source]
            source: io::Error,
        },
        #[error("{0}: an empty file cannot be protected with dm-verity")]
        Empty(PathBuf),
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn digest(salt: &[u8], block: &[u8]) -> [u8; DIGEST_BYTES] {
        let mut hasher = Sha256::new();
        hasher.update(salt);
        hasher.update(block);
        hasher.finalize().into()
    }

    /// Blocks at each level, level 0 (the data's digests) first; empty for a single data
    /// block, whose digest is the root hash itself (as the kernel computes `levels`).
    pub(super) fn level_blocks(data_blocks: u64) -> Vec<u64> {
        let mut levels = Vec::new();
        let mut below = data_blocks;
        while below > 1 {
            below = below.div_ceil(HASHES_PER_BLOCK);
            levels.push(below);
        }
        levels
    }

    /// Pads `path` with zeros to a multiple of 4096 bytes and appends its dm-verity hash
    /// tree, reading the file a chunk at a time and writing each level in place (a level
    /// is hashed from the one below it, read back from the file).
    pub fn append_hash_tree(path: &Path, salt: &[u8]) -> Result<HashTree, VerityError> {
        let io_err = |context| {
            let path = path.to_path_buf();
            move |source| VerityError::Io {
                path,
                context,
                source,
            }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err("opening"))?;
        let len = file.metadata().map_err(io_err("reading metadata"))?.len();
        let data_blocks = len.div_ceil(BLOCK_SIZE);
        if data_blocks == 0 {
            return Err(VerityError::Empty(path.to_path_buf()));
        }
        file.set_len(data_blocks * BLOCK_SIZE)
            .map_err(io_err("padding to a block"))?;

        let levels = level_blocks(data_blocks);
        // Top level first: level i starts after every level above it.
        let mut starts = vec![0; levels.len()];
        let mut position = data_blocks;
        for i in (0..levels.len()).rev() {
            starts[i] = position;
            position += levels[i];
        }
        let hash_blocks = position - data_blocks;

        let mut source = (0, data_blocks);
        for (i, &blocks) in levels.iter().enumerate() {
            let written = hash_level(&file, salt, source, starts[i]).map_err(io_err("hashing"))?;
            debug_assert_eq!(written, blocks);
            source = (starts[i], blocks);
        }
        // The root is the digest of the one block at the top: the top hash block, or the
        // data itself when it is a single block.
        let mut top = vec![0u8; BLOCK];
        file.read_exact_at(&mut top, source.0 * BLOCK_SIZE)
            .map_err(io_err("reading the top block"))?;
        file.sync_all().map_err(io_err("syncing"))?;
        Ok(HashTree {
            root_hash: hex(&digest(salt, &top)),
            salt: hex(salt),
            data_blocks,
            hash_blocks,
        })
    }

    /// Hashes the `count` blocks at `start` into consecutive hash blocks from `dest`;
    /// returns how many hash blocks were written.
    fn hash_level(
        file: &File,
        salt: &[u8],
        (start, count): (u64, u64),
        dest: u64,
    ) -> io::Result<u64> {
        let mut chunk = vec![0u8; CHUNK_BLOCKS * BLOCK];
        let mut out = vec![0u8; BLOCK];
        let mut filled = 0;
        let mut written = 0;
        let mut done = 0;
        while done < count {
            let n = (count - done).min(CHUNK_BLOCKS as u64) as usize;
            let chunk = &mut chunk[..n * BLOCK];
            file.read_exact_at(chunk, (start + done) * BLOCK_SIZE)?;
            for block in chunk.chunks_exact(BLOCK) {
                out[filled..filled + DIGEST_BYTES].copy_from_slice(&digest(salt, block));
                filled += DIGEST_BYTES;
                if filled == BLOCK {
                    file.write_all_at(&out, (dest + written) * BLOCK_SIZE)?;
                    written += 1;
                    filled = 0;
                }
            }
            done += n as u64;
        }
        if filled > 0 {
            out[filled..].fill(0);
            file.write_all_at(&out, (dest + written) * BLOCK_SIZE)?;
            written += 1;
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: &str = "4a5b6c7d8e9f00112233445566778899aabbccddeeff00112233445566778899";
    const SALT: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn the_table_names_the_device_twice_and_starts_the_hashes_after_the_data() {
        let p = VerityParams {
            root_hash: ROOT.into(),
            salt: SALT.into(),
            data_blocks: 1000,
        };
        assert_eq!(
            p.table("/dev/vda"),
            format!("0 8000 verity 1 /dev/vda /dev/vda 4096 4096 1000 1000 sha256 {ROOT} {SALT}")
        );
    }

    #[test]
    fn parameters_round_trip_through_the_command_line() {
        let p = VerityParams {
            root_hash: ROOT.into(),
            salt: SALT.into(),
            data_blocks: 7,
        };
        let cmdline = format!("console=ttyS0 keel.root=UUID=x {} quiet", p.cmdline());
        assert_eq!(VerityParams::from_cmdline(&cmdline), Ok(Some(p)));
        assert_eq!(
            VerityParams::from_cmdline("console=ttyS0 keel.root=UUID=x"),
            Ok(None)
        );
        // Upper case hex is accepted and normalised.
        let upper = format!(
            "{ROOT_HASH_PARAM}{} {SALT_PARAM}{SALT} {BLOCKS_PARAM}1",
            ROOT.to_uppercase()
        );
        assert_eq!(
            VerityParams::from_cmdline(&upper)
                .unwrap()
                .unwrap()
                .root_hash,
            ROOT
        );
    }

    #[test]
    fn partial_duplicate_or_malformed_parameters_are_errors() {
        let ok_root = format!("{ROOT_HASH_PARAM}{ROOT}");
        let ok_salt = format!("{SALT_PARAM}{SALT}");
        for bad in [
            ok_root.clone(),
            format!("{ok_root} {ok_salt}"),
            format!("{ok_salt} {BLOCKS_PARAM}5"),
            format!("{ok_root} {ok_root} {ok_salt} {BLOCKS_PARAM}5"),
            format!("{ok_root} {ok_salt} {BLOCKS_PARAM}0"),
            format!("{ok_root} {ok_salt} {BLOCKS_PARAM}-1"),
            format!("{ok_root} {ok_salt} {BLOCKS_PARAM}x"),
            format!("{ok_root} {ok_salt} {BLOCKS_PARAM}18446744073709551615"),
            format!("{ROOT_HASH_PARAM}{} {ok_salt} {BLOCKS_PARAM}5", &ROOT[2..]),
            format!("{ROOT_HASH_PARAM}{ROOT}00 {ok_salt} {BLOCKS_PARAM}5"),
            format!("{ok_root} {SALT_PARAM}{}zz {BLOCKS_PARAM}5", &SALT[2..]),
            format!("{ok_root} {SALT_PARAM} {BLOCKS_PARAM}5"),
        ] {
            assert!(
                VerityParams::from_cmdline(&bad).is_err(),
                "{bad:?} was accepted"
            );
        }
    }

    #[cfg(feature = "builder")]
    mod tree {
        use std::io::Write;

        use sha2::{Digest, Sha256};

        use super::super::builder::level_blocks;
        use super::super::*;

        fn h(salt: &[u8], block: &[u8]) -> Vec<u8> {
            let mut hasher = Sha256::new();
            hasher.update(salt);
            hasher.update(block);
            hasher.finalize().to_vec()
        }

        fn hex(b: &[u8]) -> String {
            b.iter().map(|b| format!("{b:02x}")).collect()
        }

        /// The hash block holding these digests, zero-padded.
        fn hash_block(digests: &[Vec<u8>]) -> Vec<u8> {
            let mut block = digests.concat();
            assert!(block.len() <= 4096);
            block.resize(4096, 0);
            block
        }

        fn data(blocks: usize, tail: usize) -> Vec<u8> {
            (0..blocks * 4096 + tail)
                .map(|i| (i * 7 + i / 4096) as u8)
                .collect()
        }

        #[test]
        fn levels_are_counted_as_the_kernel_does() {
            assert_eq!(level_blocks(1), Vec::<u64>::new());
            assert_eq!(level_blocks(2), [1]);
            assert_eq!(level_blocks(128), [1]);
            assert_eq!(level_blocks(129), [2, 1]);
            assert_eq!(level_blocks(128 * 128), [128, 1]);
            assert_eq!(level_blocks(128 * 128 + 1), [129, 2, 1]);
        }

        #[test]
        fn a_small_file_is_padded_and_gets_one_level() {
            let salt = [7u8; 32];
            let mut file = tempfile::NamedTempFile::new().unwrap();
            let content = data(2, 100);
            file.write_all(&content).unwrap();
            let tree = append_hash_tree(file.path(), &salt).unwrap();
            assert_eq!(tree.data_blocks, 3);
            assert_eq!(tree.hash_blocks, 1);
            assert_eq!(tree.salt, hex(&salt));

            let mut padded = content.clone();
            padded.resize(3 * 4096, 0);
            let level0 = hash_block(&padded.chunks(4096).map(|b| h(&salt, b)).collect::<Vec<_>>());
            let written = std::fs::read(file.path()).unwrap();
            assert_eq!(written.len(), 4 * 4096);
            assert_eq!(&written[..3 * 4096], &padded[..]);
            assert_eq!(&written[3 * 4096..], &level0[..]);
            assert_eq!(tree.root_hash, hex(&h(&salt, &level0)));
        }

        #[test]
        fn two_levels_are_stored_top_first() {
            let salt = [1u8; 32];
            let mut file = tempfile::NamedTempFile::new().unwrap();
            let content = data(130, 0);
            file.write_all(&content).unwrap();
            let tree = append_hash_tree(file.path(), &salt).unwrap();
            assert_eq!((tree.data_blocks, tree.hash_blocks), (130, 3));

            let digests: Vec<_> = content.chunks(4096).map(|b| h(&salt, b)).collect();
            let level0 = [hash_block(&digests[..128]), hash_block(&digests[128..])];
            let level1 = hash_block(&[h(&salt, &level0[0]), h(&salt, &level0[1])]);
            let written = std::fs::read(file.path()).unwrap();
            let block = |i: usize| &written[i * 4096..(i + 1) * 4096];
            assert_eq!(block(130), &level1[..]);
            assert_eq!(block(131), &level0[0][..]);
            assert_eq!(block(132), &level0[1][..]);
            assert_eq!(written.len(), 133 * 4096);
            assert_eq!(tree.root_hash, hex(&h(&salt, &level1)));
            let params = tree.params();
            assert_eq!(params.data_blocks, 130);
            assert!(params.table("/dev/vda").contains(" 130 130 sha256 "));
        }

        #[test]
        fn one_block_is_its_own_root() {
            let salt = [2u8; 32];
            let mut file = tempfile::NamedTempFile::new().unwrap();
            file.write_all(b"x").unwrap();
            let tree = append_hash_tree(file.path(), &salt).unwrap();
            assert_eq!((tree.data_blocks, tree.hash_blocks), (1, 0));
            let mut block = b"x".to_vec();
            block.resize(4096, 0);
            assert_eq!(tree.root_hash, hex(&h(&salt, &block)));
        }

        #[test]
        fn an_empty_file_is_refused() {
            let file = tempfile::NamedTempFile::new().unwrap();
            assert!(matches!(
                append_hash_tree(file.path(), &[0; 32]),
                Err(VerityError::Empty(_))
            ));
        }
    }
}
