//! Bounds on what one hostile layer can make its unpacker do: read a gzip or zstd bomb,
//! allocate a huge PAX header or GNU long name, or expand a sparse file.
//!
//! [`TarGuard`] sits between the decompressor and the tar reader and follows the tar framing
//! itself (512-byte headers, data padded to 512 bytes), so it sees every header before the
//! `tar` crate acts on it: the crate reads a PAX record or a GNU long name into memory
//! whole, whatever size its header claims. It refuses
//!
//! - a PAX (`x`, `g`) or GNU long-name (`L`, `K`) header larger than
//!   [`UnpackLimits::max_header_bytes`];
//! - sparse files (GNU `S` entries, PAX `GNU.sparse.*` records): their holes would be
//!   written out as zeros, a few bytes of layer becoming gigabytes of disk;
//! - a layer whose tar stream grows past [`UnpackLimits::max_unpacked_bytes`];
//! - a stream that expands more than [`UnpackLimits::max_ratio`] times its compressed size
//!   (past the first [`RATIO_FLOOR`] bytes, so small layers of zeros stay fine).
//!
//! A refusal is kept in the guard ([`TarGuard::violation`]): the unpacker reports it rather
//! than whatever error the tar reader made of the failed read.

use std::cell::{Cell, RefCell};
use std::io::{self, Read};
use std::rc::Rc;

/// The tar block size.
const BLOCK: usize = 512;

/// Below this many bytes of tar stream the expansion ratio is not checked: a small layer of
/// zeros compresses a thousandfold legitimately.
pub const RATIO_FLOOR: u64 = 64 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackLimits {
    /// The most bytes of tar stream (contents and headers) one layer, and one image's
    /// layers together, may unpack to.
    pub max_unpacked_bytes: u64,
    /// The largest PAX extended header or GNU long name or link.
    pub max_header_bytes: u64,
    /// The most the tar stream may expand over the compressed layer.
    pub max_ratio: u64,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        UnpackLimits {
            max_unpacked_bytes: 8 << 30,
            max_header_bytes: 1 << 20,
            max_ratio: 1000,
        }
    }
}

/// Counts the bytes read through it into a shared cell (the compressed side of a layer).
pub(crate) struct CountingReader<R> {
    inner: R,
    count: Rc<Cell<u64>>,
}

impl<R> CountingReader<R> {
    pub(crate) fn new(inner: R, count: Rc<Cell<u64>>) -> Self {
        CountingReader { inner, count }
    }
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

/// Where the guard is in the tar framing.
#[derive(Debug)]
enum Framing {
    /// Collecting a header block.
    Header {
        block: Box<[u8; BLOCK]>,
        filled: usize,
    },
    /// Inside an entry's data (padding included); `pax` collects a PAX header's records.
    Data {
        remaining: u64,
        pax: Option<Vec<u8>>,
    },
}

/// The tar stream of one layer, checked as it passes (see the module documentation).
pub(crate) struct TarGuard<R> {
    inner: R,
    limits: UnpackLimits,
    /// How many bytes of tar stream this layer may still unpack to (the image's budget).
    budget: u64,
    compressed: Rc<Cell<u64>>,
    total: u64,
    framing: Framing,
    violation: Rc<RefCell<Option<String>>>,
}

impl<R: Read> TarGuard<R> {
    /// `budget` is what is left of the image's [`UnpackLimits::max_unpacked_bytes`];
    /// `compressed` counts the layer's compressed bytes as they are read.
    pub(crate) fn new(
        inner: R,
        limits: UnpackLimits,
        budget: u64,
        compressed: Rc<Cell<u64>>,
    ) -> Self {
        TarGuard {
            inner,
            limits,
            budget: budget.min(limits.max_unpacked_bytes),
            compressed,
            total: 0,
            framing: Framing::Header {
                block: Box::new([0; BLOCK]),
                filled: 0,
            },
            violation: Rc::new(RefCell::new(None)),
        }
    }

    /// Where a refusal is kept once made.
    pub(crate) fn violation(&self) -> Rc<RefCell<Option<String>>> {
        Rc::clone(&self.violation)
    }

    fn refuse(&self, why: String) -> io::Error {
        let error = io::Error::new(io::ErrorKind::InvalidData, why.clone());
        self.violation.borrow_mut().get_or_insert(why);
        error
    }

    /// Follows the framing over `bytes`, which just passed.
    fn follow(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            match &mut self.framing {
                Framing::Header { block, filled } => {
                    let take = (BLOCK - *filled).min(bytes.len());
                    block[*filled..*filled + take].copy_from_slice(&bytes[..take]);
                    *filled += take;
                    bytes = &bytes[take..];
                    if *filled == BLOCK {
                        let header = std::mem::replace(block, Box::new([0; BLOCK]));
                        self.framing = self.after_header(&header)?;
                    }
                }
                Framing::Data { remaining, pax } => {
                    let take = (*remaining).min(bytes.len() as u64) as usize;
                    if let Some(records) = pax.as_mut() {
                        records.extend_from_slice(&bytes[..take]);
                    }
                    *remaining -= take as u64;
                    bytes = &bytes[take..];
                    if *remaining == 0 {
                        let records = pax.take();
                        self.framing = Framing::Header {
                            block: Box::new([0; BLOCK]),
                            filled: 0,
                        };
                        if let Some(records) = records
                            && contains(&records, b"GNU.sparse.")
                        {
                            return Err(self.refuse(
                                "a PAX header describes a sparse file (GNU.sparse.*); sparse \
                                 files are refused"
                                    .into(),
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks one complete header block and returns the framing of its data.
    fn after_header(&self, header: &[u8; BLOCK]) -> io::Result<Framing> {
        let kind = header[156];
        let size = entry_size(header)
            .ok_or_else(|| self.refuse("a tar header has an unreadable size field".into()))?;
        let name = header_name(header);
        match kind {
            b'x' | b'g' | b'L' | b'K' if size > self.limits.max_header_bytes => {
                let what = match kind {
                    b'x' | b'g' => "PAX extended header",
                    b'L' => "GNU long name",
                    _ => "GNU long link name",
                };
                return Err(self.refuse(format!(
                    "a {what} of {size} bytes (before {name:?}) is larger than the limit of {} \
                     bytes",
                    self.limits.max_header_bytes
                )));
            }
            b'S' => {
                return Err(self.refuse(format!(
                    "{name:?} is a GNU sparse file; sparse files are refused"
                )));
            }
            _ => {}
        }
        let padded = size.div_ceil(BLOCK as u64) * BLOCK as u64;
        if padded == 0 {
            return Ok(Framing::Header {
                block: Box::new([0; BLOCK]),
                filled: 0,
            });
        }
        Ok(Framing::Data {
            remaining: padded,
            pax: (kind == b'x' || kind == b'g').then(Vec::new),
        })
    }

    /// Counts `n` more bytes of stream against the size and ratio limits.
    fn count(&mut self, n: usize) -> io::Result<()> {
        self.total += n as u64;
        if self.total > self.budget {
            let limit = self.budget;
            return Err(self.refuse(if limit < self.limits.max_unpacked_bytes {
                format!(
                    "the image's layers unpack to more than the limit of {} bytes \
                     (max_unpacked_size)",
                    self.limits.max_unpacked_bytes
                )
            } else {
                format!(
                    "the layer unpacks to more than the limit of {limit} bytes (max_unpacked_size)"
                )
            }));
        }
        let compressed = self.compressed.get().max(1);
        if self.total > RATIO_FLOOR && self.total / compressed > self.limits.max_ratio {
            return Err(self.refuse(format!(
                "the layer expands more than {} times: {compressed} compressed bytes gave {} \
                 (a decompression bomb)",
                self.limits.max_ratio, self.total
            )));
        }
        Ok(())
    }

    /// Bytes of tar stream read so far.
    pub(crate) fn total(&self) -> u64 {
        self.total
    }
}

impl<R: Read> Read for TarGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(why) = self.violation.borrow().as_ref() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, why.clone()));
        }
        let n = self.inner.read(buf)?;
        self.count(n)?;
        self.follow(&buf[..n])?;
        Ok(n)
    }
}

/// The size field of a header: octal text, or base-256 when its first byte has the high
/// bit set (GNU, for sizes of 8 GiB and more).
fn entry_size(header: &[u8; BLOCK]) -> Option<u64> {
    let field = &header[124..136];
    if field[0] & 0x80 != 0 {
        let mut value: u64 = u64::from(field[0] & 0x7f);
        for b in &field[1..] {
            value = value.checked_mul(256)?.checked_add(u64::from(*b))?;
        }
        return Some(value);
    }
    let text: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|b| *b == b' ')
        .take_while(|b| (b'0'..=b'7').contains(b))
        .collect();
    if text.is_empty() {
        return Some(0);
    }
    let mut value: u64 = 0;
    for digit in text {
        value = value.checked_mul(8)?.checked_add(u64::from(digit - b'0'))?;
    }
    Some(value)
}

/// The header's own name field, for messages.
fn header_name(header: &[u8; BLOCK]) -> String {
    let name = &header[..100];
    let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    String::from_utf8_lossy(&name[..end]).into_owned()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: u8, size: &[u8]) -> [u8; BLOCK] {
        let mut h = [0u8; BLOCK];
        h[..4].copy_from_slice(b"name");
        h[124..124 + size.len()].copy_from_slice(size);
        h[156] = kind;
        h
    }

    #[test]
    fn sizes_are_read_in_octal_and_base_256() {
        assert_eq!(entry_size(&header(b'0', b"00000000012\0")), Some(10));
        assert_eq!(entry_size(&header(b'0', b"     12 \0")), Some(10));
        assert_eq!(entry_size(&header(b'0', b"")), Some(0));
        let mut big = [0u8; 12];
        big[0] = 0x80;
        big[11] = 1;
        big[10] = 2;
        assert_eq!(entry_size(&header(b'0', &big)), Some(513));
    }

    fn guard(stream: Vec<u8>, limits: UnpackLimits) -> (io::Result<u64>, Option<String>) {
        let compressed = Rc::new(Cell::new(stream.len() as u64));
        let mut g = TarGuard::new(io::Cursor::new(stream), limits, u64::MAX, compressed);
        let violation = g.violation();
        let result = io::copy(&mut g, &mut io::sink());
        let why = violation.borrow().clone();
        (result, why)
    }

    #[test]
    fn an_oversized_pax_header_is_refused_before_it_is_read() {
        let mut stream = header(b'x', b"00040000000\0").to_vec(); // 4 MiB claimed
        stream.extend(vec![b'a'; 4096]);
        let (result, why) = guard(stream, UnpackLimits::default());
        assert!(result.is_err());
        assert!(
            why.unwrap()
                .contains("PAX extended header of 8388608 bytes")
        );
    }

    #[test]
    fn sparse_entries_are_refused() {
        let (_, why) = guard(header(b'S', b"0\0").to_vec(), UnpackLimits::default());
        assert!(why.unwrap().contains("GNU sparse file"));
        let records = b"30 GNU.sparse.major=1\n".to_vec();
        let mut stream = header(b'x', format!("{:o}\0", records.len()).as_bytes()).to_vec();
        stream.extend(&records);
        stream.resize(2 * BLOCK, 0);
        let (_, why) = guard(stream, UnpackLimits::default());
        assert!(why.unwrap().contains("sparse"));
    }

    #[test]
    fn the_total_and_the_ratio_are_bounded() {
        let limits = UnpackLimits {
            max_unpacked_bytes: 4096,
            ..UnpackLimits::default()
        };
        let mut stream = header(b'0', b"00000020000\0").to_vec(); // 8 KiB file
        stream.extend(vec![0; 8192]);
        let (_, why) = guard(stream, limits);
        assert!(why.unwrap().contains("more than the limit of 4096 bytes"));

        // 100 MiB of stream from "1 KiB" of compressed input.
        let compressed = Rc::new(Cell::new(1024));
        let zeros = io::repeat(0).take(100 << 20);
        let mut g = TarGuard::new(zeros, UnpackLimits::default(), u64::MAX, compressed);
        let violation = g.violation();
        assert!(io::copy(&mut g, &mut io::sink()).is_err());
        assert!(
            violation
                .borrow()
                .as_ref()
                .unwrap()
                .contains("decompression bomb")
        );
    }

    #[test]
    fn an_ordinary_stream_passes_and_is_counted() {
        let mut stream = header(b'0', b"00000000005\0").to_vec();
        stream.extend(b"hello");
        stream.resize(2 * BLOCK, 0);
        stream.extend([0; 2 * BLOCK]);
        let (result, why) = guard(stream, UnpackLimits::default());
        assert_eq!(result.unwrap(), 4 * BLOCK as u64);
        assert_eq!(why, None);
    }
}
