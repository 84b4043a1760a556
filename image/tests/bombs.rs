//! Adversarial layers against the unpack limits (image/src/unpack_limits.rs): decompression
//! bombs in gzip and zstd, oversized PAX headers and GNU long names, sparse files, and an
//! image whose layers together are too large. Each is refused with an error naming the
//! layer and the limit, and leaves no layer in the store.
//!
//! The bombs are streamed through the encoders, never held whole: a gigabyte of zeros costs
//! the test a megabyte.

use std::fs;
use std::io::{self, Read, Write};

use keel_image::ImageError;
use keel_image::layer_store::unpack_image_limited;
use keel_image::layout::{
    ImageLayout, MEDIA_TYPE_LAYER_GZIP, MEDIA_TYPE_LAYER_TAR, MEDIA_TYPE_LAYER_ZSTD,
};
use keel_image::unpack_limits::UnpackLimits;

mod common;
use common::write_layout as make_layout;

/// A 512-byte tar header: `kind`, `name`, a `size` claimed in octal.
fn tar_header(kind: u8, name: &str, size: u64) -> [u8; 512] {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::new(kind));
    h.set_path(name).unwrap();
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_000_000);
    h.set_size(size);
    h.set_cksum();
    *h.as_bytes()
}

/// A tar stream of one file of `size` zeros, through `out`, never in memory whole.
fn zeros_file(out: &mut impl Write, name: &str, size: u64) {
    out.write_all(&tar_header(b'0', name, size)).unwrap();
    io::copy(&mut io::repeat(0).take(size), out).unwrap();
    let pad = (512 - size % 512) % 512;
    out.write_all(&vec![0; pad as usize]).unwrap();
}

fn end_of_archive(out: &mut impl Write) {
    out.write_all(&[0; 1024]).unwrap();
}

fn gzip(write: impl FnOnce(&mut flate2::write::GzEncoder<Vec<u8>>)) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    write(&mut e);
    e.finish().unwrap()
}

fn zstd(write: impl FnOnce(&mut zstd::stream::Encoder<'static, Vec<u8>>)) -> Vec<u8> {
    let mut e = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
    write(&mut e);
    e.finish().unwrap()
}

/// Unpacks the layout made of `layers` with `limits`; returns the error and checks that the
/// store holds no layer afterwards.
fn refused(layers: &[(&str, Vec<u8>)], limits: UnpackLimits) -> (Vec<String>, String) {
    let dir = tempfile::tempdir().unwrap();
    let digests = make_layout(&dir.path().join("layout"), layers);
    let image = ImageLayout::open(&dir.path().join("layout")).unwrap();
    let store = dir.path().join("store");
    let error = match unpack_image_limited(&image, &store, None, &limits) {
        Err(e @ ImageError::LimitExceeded { .. }) => e.to_string(),
        Err(other) => panic!("refused, but not by a limit: {other}"),
        Ok(dirs) => panic!("the layers were unpacked: {dirs:?}"),
    };
    let left: Vec<String> = fs::read_dir(&store)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "l")
        .collect();
    assert!(left.is_empty(), "the store kept {left:?} after: {error}");
    (digests, error)
}

fn small_limit() -> UnpackLimits {
    UnpackLimits {
        max_unpacked_bytes: 32 << 20,
        ..UnpackLimits::default()
    }
}

#[test]
fn a_gzip_bomb_stops_at_the_size_limit() {
    // 256 MiB of zeros in about a megabyte.
    let blob = gzip(|e| {
        zeros_file(e, "bomb", 256 << 20);
        end_of_archive(e);
    });
    assert!(blob.len() < 4 << 20, "{}", blob.len());
    let (digests, error) = refused(&[(MEDIA_TYPE_LAYER_GZIP, blob)], small_limit());
    assert!(error.contains(&digests[0]), "{error}");
    assert!(
        error.contains("unpacks to more than the limit of 33554432 bytes"),
        "{error}"
    );
}

#[test]
fn a_zstd_bomb_is_refused_by_its_ratio_under_the_default_limits() {
    let blob = zstd(|e| {
        zeros_file(e, "bomb", 1 << 30);
        end_of_archive(e);
    });
    let (digests, error) = refused(&[(MEDIA_TYPE_LAYER_ZSTD, blob)], UnpackLimits::default());
    assert!(error.contains(&digests[0]), "{error}");
    assert!(error.contains("decompression bomb"), "{error}");
}

#[test]
fn a_pax_header_bomb_is_refused_before_it_is_read() {
    // A PAX header claiming 2 GiB of records: the tar reader would allocate it whole.
    let blob = gzip(|e| {
        e.write_all(&tar_header(b'x', "PaxHeader", 2 << 30))
            .unwrap();
        io::copy(&mut io::repeat(b'a').take(8 << 20), e).unwrap();
    });
    let (digests, error) = refused(&[(MEDIA_TYPE_LAYER_GZIP, blob)], UnpackLimits::default());
    assert!(error.contains(&digests[0]), "{error}");
    assert!(
        error.contains("PAX extended header of 2147483648 bytes"),
        "{error}"
    );
}

#[test]
fn a_long_name_bomb_is_refused_before_it_is_read() {
    let blob = gzip(|e| {
        e.write_all(&tar_header(b'L', "././@LongLink", 1 << 30))
            .unwrap();
        io::copy(&mut io::repeat(b'n').take(8 << 20), e).unwrap();
    });
    let (_, error) = refused(&[(MEDIA_TYPE_LAYER_GZIP, blob)], UnpackLimits::default());
    assert!(
        error.contains("GNU long name of 1073741824 bytes"),
        "{error}"
    );
}

#[test]
fn sparse_files_are_refused() {
    let mut tar = tar_header(b'S', "holes", 0).to_vec();
    tar.extend([0; 1024]);
    let (_, error) = refused(&[(MEDIA_TYPE_LAYER_TAR, tar)], UnpackLimits::default());
    assert!(error.contains("sparse"), "{error}");
}

#[test]
fn an_image_whose_layers_together_are_too_large_is_refused() {
    // Two layers of 20 MiB each under a 32 MiB limit: each alone fits, both do not.
    let layer = |name: &str| {
        gzip(|e| {
            zeros_file(e, name, 20 << 20);
            end_of_archive(e);
        })
    };
    let (digests, error) = refused(
        &[
            (MEDIA_TYPE_LAYER_GZIP, layer("one")),
            (MEDIA_TYPE_LAYER_GZIP, layer("two")),
        ],
        small_limit(),
    );
    assert!(error.contains(&digests[1]), "the second layer: {error}");
    assert!(
        error.contains("the image's layers unpack to more"),
        "{error}"
    );
}

#[test]
fn an_ordinary_image_within_the_limits_unpacks() {
    let blob = gzip(|e| {
        zeros_file(e, "data", 4 << 20);
        end_of_archive(e);
    });
    let dir = tempfile::tempdir().unwrap();
    make_layout(&dir.path().join("layout"), &[(MEDIA_TYPE_LAYER_GZIP, blob)]);
    let image = ImageLayout::open(&dir.path().join("layout")).unwrap();
    let dirs =
        unpack_image_limited(&image, &dir.path().join("store"), None, &small_limit()).unwrap();
    assert_eq!(fs::metadata(dirs[0].join("data")).unwrap().len(), 4 << 20);
}
