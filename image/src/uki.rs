//! A Unified Kernel Image: Debian's systemd EFI stub (`systemd-boot-efi`,
//! `/usr/lib/systemd/boot/efi/linuxx64.efi.stub`) with the kernel, the stage-1 initramfs, the
//! command line (and so the verity root hash) and an os-release added as PE sections. One
//! file that firmware or systemd-boot starts and whose every byte a signature can cover.
//!
//! The sections are added the way `objcopy --add-section` (what ukify does for systemd 252,
//! which has no ukify) would: their headers go into the room the stub leaves after its section
//! table, their data after its last section, each at a file offset and a virtual address
//! aligned as its header says; SizeOfImage grows to cover them. A certificate table (a
//! signature of the stub alone) and the COFF symbols are dropped: they describe another file.

use std::io;

/// Where Debian's `systemd-boot-efi` puts the stub.
pub const DEBIAN_STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";

/// Initialised, read-only data.
const SECTION_FLAGS: u32 = 0x4000_0040;
const SECTION_HEADER: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum UkiError {
    #[error("the EFI stub is not a PE32+ image: {0}")]
    NotPe(&'static str),
    #[error("the EFI stub has room for {room} more section headers, not {wanted}")]
    NoRoom { room: usize, wanted: usize },
    #[error("section name `{0}` is longer than 8 bytes")]
    Name(String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The PE facts a section is added with.
struct Pe {
    /// Offset of the COFF header (after "PE\0\0").
    coff: usize,
    /// Offset of the optional header.
    opt: usize,
    sections: usize,
    table: usize,
    section_align: u32,
    file_align: u32,
    size_of_headers: u32,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn align(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

fn parse(b: &[u8]) -> Result<Pe, UkiError> {
    if b.get(..2) != Some(b"MZ") {
        return Err(UkiError::NotPe("no MZ header"));
    }
    let pe = u32_at(b, 0x3c).ok_or(UkiError::NotPe("truncated"))? as usize;
    if b.get(pe..pe + 4) != Some(b"PE\0\0") {
        return Err(UkiError::NotPe("no PE signature"));
    }
    let coff = pe + 4;
    let sections = u16_at(b, coff + 2).ok_or(UkiError::NotPe("truncated"))? as usize;
    let opt_size = u16_at(b, coff + 16).ok_or(UkiError::NotPe("truncated"))? as usize;
    let opt = coff + 20;
    if u16_at(b, opt) != Some(0x20b) {
        return Err(UkiError::NotPe("not PE32+"));
    }
    let get = |at| u32_at(b, opt + at).ok_or(UkiError::NotPe("truncated"));
    Ok(Pe {
        coff,
        opt,
        sections,
        table: opt + opt_size,
        section_align: get(32)?,
        file_align: get(36)?,
        size_of_headers: get(60)?,
    })
}

/// The stub with `sections` (name, data) added, in order.
pub fn build(stub: &[u8], sections: &[(&str, &[u8])]) -> Result<Vec<u8>, UkiError> {
    let pe = parse(stub)?;
    if pe.section_align == 0 || pe.file_align == 0 {
        return Err(UkiError::NotPe("zero alignment"));
    }
    let table_end = pe.table + pe.sections * SECTION_HEADER;
    let room = (pe.size_of_headers as usize).saturating_sub(table_end) / SECTION_HEADER;
    if room < sections.len() {
        return Err(UkiError::NoRoom {
            room,
            wanted: sections.len(),
        });
    }
    // Where the stub's sections end, in the file and in memory.
    let (mut file_end, mut memory_end) = (pe.size_of_headers as u64, 0u64);
    for i in 0..pe.sections {
        let h = pe.table + i * SECTION_HEADER;
        let get = |at| u32_at(stub, h + at).map(u64::from).unwrap_or(0);
        memory_end = memory_end.max(get(12) + get(8).max(get(16)));
        file_end = file_end.max(get(20) + get(16));
    }
    let mut out = stub
        .get(..file_end as usize)
        .ok_or(UkiError::NotPe("a section lies past the file's end"))?
        .to_vec();
    let (file_align, section_align) = (u64::from(pe.file_align), u64::from(pe.section_align));
    let mut headers = Vec::new();
    for (name, data) in sections {
        if name.len() > 8 {
            return Err(UkiError::Name(name.to_string()));
        }
        let offset = align(out.len() as u64, file_align);
        let address = align(memory_end, section_align);
        let raw_size = align(data.len() as u64, file_align);
        out.resize(offset as usize, 0);
        out.extend_from_slice(data);
        out.resize((offset + raw_size) as usize, 0);
        let mut h = [0u8; SECTION_HEADER];
        h[..name.len()].copy_from_slice(name.as_bytes());
        let too_big = || UkiError::NotPe("a section past 4 GiB");
        put_u32(&mut h, 8, u32::try_from(data.len()).map_err(|_| too_big())?);
        put_u32(&mut h, 12, u32::try_from(address).map_err(|_| too_big())?);
        put_u32(&mut h, 16, u32::try_from(raw_size).map_err(|_| too_big())?);
        put_u32(&mut h, 20, u32::try_from(offset).map_err(|_| too_big())?);
        put_u32(&mut h, 36, SECTION_FLAGS);
        headers.push(h);
        memory_end = address + data.len() as u64;
    }
    for (i, h) in headers.iter().enumerate() {
        let at = table_end + i * SECTION_HEADER;
        out[at..at + SECTION_HEADER].copy_from_slice(h);
    }
    put_u16(&mut out, pe.coff + 2, (pe.sections + sections.len()) as u16);
    // No COFF symbols, no checksum (firmware does not check it), a SizeOfImage that covers
    // the new sections, and no certificate table: a signature of the stub alone.
    put_u32(&mut out, pe.coff + 8, 0);
    put_u32(&mut out, pe.coff + 12, 0);
    let size_of_image = u32::try_from(align(memory_end, section_align))
        .map_err(|_| UkiError::NotPe("an image past 4 GiB"))?;
    put_u32(&mut out, pe.opt + 56, size_of_image);
    put_u32(&mut out, pe.opt + 64, 0);
    let directories = u32_at(&out, pe.opt + 108).unwrap_or(0);
    if directories > 4 {
        // Data directory 4, the certificate table: 8 bytes at 112 + 4 × 8.
        put_u32(&mut out, pe.opt + 112 + 32, 0);
        put_u32(&mut out, pe.opt + 112 + 36, 0);
    }
    Ok(out)
}

/// How many bytes of a UKI [`locate_section`] needs: the headers and the section table.
pub const HEADERS_LEN: usize = 4096;

/// Where section `name`'s data is in a PE file, as (file offset, length), read from the
/// file's first bytes (at least the headers and section table, [`HEADERS_LEN`] does for the
/// stubs Keel uses): PID 1 reads a UKI's `.osrel` without reading its kernel.
pub fn locate_section(head: &[u8], name: &str) -> Result<Option<(u64, u64)>, UkiError> {
    let pe = parse(head)?;
    for i in 0..pe.sections {
        let h = pe.table + i * SECTION_HEADER;
        let raw = head.get(h..h + 8).ok_or(UkiError::NotPe("truncated"))?;
        if raw.split(|b| *b == 0).next() != Some(name.as_bytes()) {
            continue;
        }
        let get = |at| {
            u32_at(head, h + at)
                .map(u64::from)
                .ok_or(UkiError::NotPe("truncated"))
        };
        return Ok(Some((get(20)?, get(8)?.min(get(16)?))));
    }
    Ok(None)
}

/// The sections of a PE image: name, virtual address, data (for tests and `keel inspect`).
pub fn sections(image: &[u8]) -> Result<Vec<(String, u32, Vec<u8>)>, UkiError> {
    let pe = parse(image)?;
    let mut out = Vec::new();
    for i in 0..pe.sections {
        let h = pe.table + i * SECTION_HEADER;
        let raw = image.get(h..h + 8).ok_or(UkiError::NotPe("truncated"))?;
        let name = String::from_utf8_lossy(raw)
            .trim_end_matches('\0')
            .to_string();
        let get = |at| u32_at(image, h + at).unwrap_or(0) as usize;
        let (size, address, offset) = (get(8).min(get(16)), get(12), get(20));
        let data = image
            .get(offset..offset + size)
            .ok_or(UkiError::NotPe("a section lies past the file's end"))?;
        out.push((name, address as u32, data.to_vec()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Debian's stub, which scripts/install-deps installs (`systemd-boot-efi`).
    fn stub() -> Vec<u8> {
        std::fs::read(DEBIAN_STUB).unwrap_or_else(|e| {
            panic!("{DEBIAN_STUB}: {e}: install the Debian package `systemd-boot-efi` (scripts/install-deps does)")
        })
    }

    #[test]
    fn a_section_is_located_from_the_headers_alone() {
        let uki = build(
            &stub(),
            &[(".osrel", b"ID=keel\n"), (".linux", &[7u8; 9000])],
        )
        .unwrap();
        let (offset, len) = locate_section(&uki[..HEADERS_LEN], ".osrel")
            .unwrap()
            .unwrap();
        assert_eq!(&uki[offset as usize..(offset + len) as usize], b"ID=keel\n");
        assert_eq!(locate_section(&uki[..HEADERS_LEN], ".nope").unwrap(), None);
        assert!(locate_section(b"not a PE file", ".osrel").is_err());
    }

    #[test]
    fn sections_are_added_after_the_stubs_own_and_read_back() {
        let stub = stub();
        let kernel = vec![0xabu8; 3 << 20];
        let uki = build(
            &stub,
            &[
                (".osrel", b"ID=keel\n"),
                (".cmdline", b"console=ttyS0 keel.verity.roothash=00"),
                (".linux", &kernel),
                (".initrd", b"070701"),
            ],
        )
        .unwrap();
        let found = sections(&uki).unwrap();
        let before = sections(&stub).unwrap();
        assert_eq!(found.len(), before.len() + 4);
        assert_eq!(
            &found[..before.len()],
            &before[..],
            "the stub's sections are untouched"
        );
        let added: Vec<&str> = found[before.len()..]
            .iter()
            .map(|(n, _, _)| n.as_str())
            .collect();
        assert_eq!(added, [".osrel", ".cmdline", ".linux", ".initrd"]);
        assert_eq!(found[before.len() + 2].2, kernel);
        // Each past the one before, in memory and in the file; the image covers them.
        let last_stub_end = before
            .iter()
            .map(|(_, a, d)| *a as usize + d.len())
            .max()
            .unwrap();
        let mut previous = last_stub_end;
        for (_, address, data) in &found[before.len()..] {
            assert!(*address as usize >= previous);
            previous = *address as usize + data.len();
        }
        let pe = parse(&uki).unwrap();
        assert!(u32_at(&uki, pe.opt + 56).unwrap() as usize >= previous);
        // objdump, an independent PE reader, agrees.
        let path = std::env::temp_dir().join(format!("keel-uki-test-{}.efi", std::process::id()));
        std::fs::write(&path, &uki).unwrap();
        let listing = std::process::Command::new("objdump")
            .arg("-h")
            .arg(&path)
            .output();
        let _ = std::fs::remove_file(&path);
        let listing =
            String::from_utf8_lossy(&listing.expect("objdump (binutils)").stdout).into_owned();
        for name in [
            ".text", ".sdmagic", ".osrel", ".cmdline", ".linux", ".initrd",
        ] {
            assert!(listing.contains(name), "{name} missing:\n{listing}");
        }
    }

    #[test]
    fn what_is_not_a_stub_or_does_not_fit_is_refused() {
        assert!(matches!(build(b"ELF", &[]), Err(UkiError::NotPe(_))));
        let stub = stub();
        let many: Vec<(&str, &[u8])> = (0..16).map(|_| (".x", &b"1"[..])).collect();
        assert!(matches!(build(&stub, &many), Err(UkiError::NoRoom { .. })));
        assert!(matches!(
            build(&stub, &[(".toolongname", b"")]),
            Err(UkiError::Name(_))
        ));
    }
}
