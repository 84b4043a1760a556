//! Why a container could not be prepared, planned or started: one variant per step that can
//! fail on the way from its definition to its clone (the messages are the ones the log and
//! `keel inspect` show).

use std::io;
use std::path::PathBuf;

use keel_image::ImageError;

use crate::caps::CapsError;
use crate::seccomp::SeccompError;
use crate::user::UserError;

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The image is not in the store the container's definition names.
    #[error("image {image} ({}): {source}", store.display())]
    OpenImage {
        image: String,
        store: PathBuf,
        #[source]
        source: ImageError,
    },
    #[error("unpacking image {image}: {source}")]
    Unpack {
        image: String,
        #[source]
        source: ImageError,
    },
    #[error(
        "nothing to run: the image has no Entrypoint or Cmd and the host file sets no `command`"
    )]
    NothingToRun,
    /// A path from the image or the host file that must not be resolved (see
    /// keel_config::container_path).
    #[error("the {what} `{path}` is refused: {problem}")]
    UnsafePath {
        what: &'static str,
        path: String,
        problem: keel_config::container_path::PathProblem,
    },
    #[error("creating {}: {source}", path.display())]
    CreateDirs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("chown {}: {source}", path.display())]
    ChownUpper {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("linking the layers of image {image}: {source}")]
    ShortLinks {
        image: String,
        #[source]
        source: io::Error,
    },
    #[error("cgroup: {0}")]
    Cgroup(#[source] io::Error),
    #[error("reading the image's {file}: {source}")]
    ReadImageFile {
        file: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    User(#[from] UserError),
    #[error(transparent)]
    Capabilities(#[from] CapsError),
    #[error("seccomp: {0}")]
    Seccomp(#[source] SeccompError),
    #[error("volume source {} does not exist on the host", .0.display())]
    MissingVolumeSource(PathBuf),
    /// A volume of the store that its first use should have made (a bug if seen).
    #[error("the volume for {target} ({}) has not been made", .dir.display())]
    VolumeNotMade { target: String, dir: PathBuf },
    /// A mount target that resolves through a symlink of the container's files.
    #[error("{0}")]
    MountTarget(String),
    /// The plan could not be built (a string with a NUL byte, an unknown rlimit).
    #[error("{0}")]
    Plan(#[source] io::Error),
    /// The cgroup directory could not be opened for the clone.
    #[error("{0}")]
    CgroupDir(#[source] io::Error),
    /// The cgroup BPF program that limits device access could not be loaded or attached.
    #[error("{0}")]
    DevicePolicy(#[source] io::Error),
    /// The sealed copy of PID 1's binary for /dev/init could not be set up.
    #[error("setting up /dev/init: {0}")]
    Reaper(#[source] io::Error),
    #[error("clone3: {0}")]
    Clone(String),
}
