//! `keel-init --unpack IMAGE ERROR_FILE [UID GID SIZE]`: unpacks one image's layers into
//! the layer store, as a process of its own.
//!
//! Layers are hostile input, and unpacking one is decompression, tar parsing and file
//! creation driven by it: PID 1 must neither block on that nor share its memory with it.
//! So PID 1 starts this, and this moves itself into the unpack cgroup (memory and task
//! limits, see keel_supervisor::cgroup::UNPACK_CGROUP) before it opens a layer; PID 1 kills
//! it past its time limit. The layers are checked against the host file's
//! `max_unpacked_size` and the fixed limits of keel_image::unpack_limits. Why it failed goes
//! to the console and to ERROR_FILE, where PID 1 reads it for the container's state.

use std::path::Path;

use keel_config::HostConfig;
use keel_image::unpack::IdShift;
use keel_image::unpack_limits::UnpackLimits;
use keel_supervisor::Paths;
use keel_supervisor::cgroup::{CGROUP_ROOT, UNPACK_CGROUP};

/// Runs the unpack described by `args` (what follows `--unpack`); the exit status for
/// PID 1 (0: every layer is in the store).
pub fn run(host_file: &Path, args: &[String]) -> i32 {
    let (image, error_file, shift) = match parse(args) {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("keel: --unpack: {e}");
            return 2;
        }
    };
    match unpack(host_file, &image, shift) {
        Ok(()) => 0,
        Err(e) => {
            let message = format!("unpacking image {image}: {e}");
            eprintln!("keel: error: {message}");
            if let Err(write) = std::fs::write(&error_file, &message) {
                eprintln!("keel: error: writing {error_file}: {write}");
            }
            1
        }
    }
}

fn parse(args: &[String]) -> Result<(String, String, Option<IdShift>), String> {
    let usage = "usage: keel-init --unpack IMAGE ERROR_FILE [UID GID SIZE]";
    match args {
        [image, error_file] => Ok((image.clone(), error_file.clone(), None)),
        [image, error_file, uid, gid, size] => {
            let number = |s: &str| s.parse::<u32>().map_err(|_| format!("{s:?}: {usage}"));
            Ok((
                image.clone(),
                error_file.clone(),
                Some(IdShift {
                    uid: number(uid)?,
                    gid: number(gid)?,
                    size: number(size)?,
                }),
            ))
        }
        _ => Err(usage.into()),
    }
}

fn unpack(host_file: &Path, image: &str, shift: Option<IdShift>) -> Result<(), String> {
    // First of all: nothing of the layer is read outside the limits.
    let procs = Path::new(CGROUP_ROOT)
        .join(UNPACK_CGROUP)
        .join("cgroup.procs");
    std::fs::write(&procs, "0").map_err(|e| {
        format!(
            "cannot enter the unpack cgroup ({}): {e}; refusing to unpack without its limits",
            procs.display()
        )
    })?;
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
    fn arguments_name_the_image_the_error_file_and_an_optional_shift() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (image, file, shift) = parse(&args(&["web", "/run/e"])).unwrap();
        assert_eq!(
            (image.as_str(), file.as_str(), shift),
            ("web", "/run/e", None)
        );
        let (_, _, shift) = parse(&args(&["web", "/run/e", "100000", "100000", "65536"])).unwrap();
        assert_eq!(
            shift,
            Some(IdShift {
                uid: 100000,
                gid: 100000,
                size: 65536
            })
        );
        assert!(parse(&args(&["web"])).is_err());
        assert!(parse(&args(&["web", "/e", "x", "1", "2"])).is_err());
    }
}
