//! `keel-init --unpack ERROR_FILE IMAGE [UID GID SIZE]`: unpacks one image's layers into
//! the layer store, as a process of its own.
//!
//! Layers are hostile input, and unpacking one is decompression, tar parsing and file
//! creation driven by it: PID 1 must neither block on that nor share its memory with it.
//! The layers are checked against the host file's `max_unpacked_size` and the fixed limits
//! of keel_image::unpack_limits.

use std::path::Path;

use keel_config::HostConfig;
use keel_image::unpack::IdShift;
use keel_image::unpack_limits::UnpackLimits;
use keel_supervisor::Paths;

const USAGE: &str = "usage: keel-init --unpack ERROR_FILE IMAGE [UID GID SIZE]";

pub(super) fn run(host_file: &Path, args: &[String]) -> Result<(), String> {
    let (image, shift) = parse(args)?;
    unpack(host_file, &image, shift).map_err(|e| format!("unpacking image {image}: {e}"))
}

fn parse(args: &[String]) -> Result<(String, Option<IdShift>), String> {
    match args {
        [image] => Ok((image.clone(), None)),
        [image, shift @ ..] => Ok((image.clone(), Some(super::id_shift(shift, USAGE)?))),
        _ => Err(USAGE.into()),
    }
}

fn unpack(host_file: &Path, image: &str, shift: Option<IdShift>) -> Result<(), String> {
    // First of all: nothing of the layer is read outside the limits.
    super::enter_helper_cgroup()?;
    let config = HostConfig::load(host_file).map_err(|e| e.to_string())?;
    let limits = UnpackLimits {
        max_unpacked_bytes: config.max_unpacked_bytes,
        ..UnpackLimits::default()
    };
    let paths = Paths::default();
    let layout = paths.open_image(image).map_err(|e| e.to_string())?;
    keel_image::layer_store::unpack_image_limited(&layout, &paths.layers, shift, &limits)
        .map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_name_the_image_and_an_optional_shift() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (image, shift) = parse(&args(&["web"])).unwrap();
        assert_eq!((image.as_str(), shift), ("web", None));
        let (_, shift) = parse(&args(&["web", "100000", "100000", "65536"])).unwrap();
        assert_eq!(
            shift,
            Some(IdShift {
                uid: 100000,
                gid: 100000,
                size: 65536
            })
        );
        assert!(parse(&args(&[])).is_err());
        assert!(parse(&args(&["web", "x", "1", "2"])).is_err());
        assert!(parse(&args(&["web", "1", "2"])).is_err());
    }
}
