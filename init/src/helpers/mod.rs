//! `keel-init --MODE ERROR_FILE ARGS...`: the helper processes PID 1 starts for work it must
//! not do itself (see keel_supervisor's supervisor/helpers.rs): unpacking an image's layers,
//! filling a new volume from an image, emptying the volume trash.
//!
//! Each moves itself into the helper cgroup (memory and task limits, see
//! keel_supervisor::cgroup::UNPACK_CGROUP) before it reads anything hostile, and on failure
//! writes why to ERROR_FILE, where PID 1 reads it back, and to the console.

mod populate;
mod trash;
mod unpack;

use std::path::Path;

use keel_supervisor::cgroup::{CGROUP_ROOT, UNPACK_CGROUP};

/// Runs helper `mode` (`--unpack` and so on) with `args` (ERROR_FILE and what follows) and
/// returns its exit status; None if `mode` is not a helper's.
pub fn run(host_file: &Path, mode: &str, args: &[String]) -> Option<i32> {
    let run: fn(&Path, &[String]) -> Result<(), String> = match mode {
        "--unpack" => unpack::run,
        "--populate" => populate::run,
        "--empty-trash" => trash::run,
        "--install-update" => crate::update::install::run,
        _ => return None,
    };
    let Some((error_file, rest)) = args.split_first() else {
        eprintln!("keel: {mode}: the first argument names the error file");
        return Some(2);
    };
    Some(match run(host_file, rest) {
        Ok(()) => 0,
        // PID 1 logs it from the error file; the console gets it only if that fails.
        Err(message) => {
            if let Err(write) = std::fs::write(error_file, &message) {
                say(&format!(
                    "keel: error: {message} (and writing {error_file}: {write})"
                ));
            }
            1
        }
    })
}

/// One line to the console in one write: helpers run side by side.
fn say(line: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

/// Moves this process into the helper cgroup; refuses to go on without its limits.
fn enter_helper_cgroup() -> Result<(), String> {
    let procs = Path::new(CGROUP_ROOT)
        .join(UNPACK_CGROUP)
        .join("cgroup.procs");
    std::fs::write(&procs, "0").map_err(|e| {
        format!(
            "cannot enter the helper cgroup ({}): {e}; refusing to go on without its limits",
            procs.display()
        )
    })
}

/// An id shift from its three arguments UID GID SIZE.
fn id_shift(args: &[String], usage: &str) -> Result<keel_image::unpack::IdShift, String> {
    let number = |s: &String| s.parse::<u32>().map_err(|_| format!("{s:?}: {usage}"));
    match args {
        [uid, gid, size] => Ok(keel_image::unpack::IdShift {
            uid: number(uid)?,
            gid: number(gid)?,
            size: number(size)?,
        }),
        _ => Err(usage.to_string()),
    }
}
