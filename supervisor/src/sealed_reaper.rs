//! The binary containers with `init = true` run as /dev/init: a copy of PID 1's own binary
//! that no container can change, whatever the host's layout and whatever it was granted.
//!
//! Binding PID 1's binary itself would expose a host file: on an initramfs-only host it
//! lives on a writable tmpfs, and a container with CAP_SYS_ADMIN can remount its bind of it
//! read-write and change the host's init (CVE-2019-5736 overwrote runc's binary this way,
//! through /proc/self/exe). So the copy sits alone on a private tmpfs that is made
//! read-only, and containers get it through an overlay that has only lower layers: such an
//! overlay is read-only for good (no remount makes it writable, since there is no upper
//! layer to write to), so /dev/init can be neither written, chmod-ed nor given xattrs, and
//! what a container does to its own mount of it stays in its mount namespace.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::mount::{MsFlags, mount};

/// Where the sealed copy is set up, once per boot.
pub const SEALED_REAPER_DIR: &str = "/run/keel/reaper";

/// The sealed copy's path, set up on first use; a failure is returned (and retried by the
/// next container that needs it) rather than remembered.
pub fn sealed_reaper() -> io::Result<PathBuf> {
    static SEALED: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut sealed = SEALED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(path) = sealed.as_ref() {
        return Ok(path.clone());
    }
    let path = seal(Path::new(SEALED_REAPER_DIR), Path::new("/proc/self/exe"))?;
    *sealed = Some(path.clone());
    Ok(path)
}

/// Copies `binary` into a read-only tmpfs at `dir` and returns its path through a
/// lower-only overlay: `dir/tmpfs/bin/init` is the copy, `dir/sealed/init` what containers get.
pub fn seal(dir: &Path, binary: &Path) -> io::Result<PathBuf> {
    let context =
        |what: String| move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
    let tmpfs = dir.join("tmpfs");
    let sealed = dir.join("sealed");
    let target = sealed.join("init");
    if target.is_file() {
        // Set up by an earlier run of this code in the same boot (PID 1 re-executed).
        return Ok(target);
    }
    std::fs::create_dir_all(&tmpfs).map_err(context(format!("creating {}", tmpfs.display())))?;
    std::fs::create_dir_all(&sealed).map_err(context(format!("creating {}", sealed.display())))?;
    let size = std::fs::metadata(binary)
        .map_err(context(format!("reading {}", binary.display())))?
        .len();
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    // Room for the copy and the two directories, no more.
    let options = format!("mode=0700,size={}", size + (64 << 10));
    mount(
        Some("tmpfs"),
        &tmpfs,
        Some("tmpfs"),
        flags,
        Some(options.as_str()),
    )
    .map_err(|e| context(format!("mounting a tmpfs on {}", tmpfs.display()))(e.into()))?;
    let result = fill_and_seal(&tmpfs, &sealed, binary, flags);
    if result.is_err() {
        let _ = nix::mount::umount2(&sealed, nix::mount::MntFlags::MNT_DETACH);
        let _ = nix::mount::umount2(&tmpfs, nix::mount::MntFlags::MNT_DETACH);
    }
    result.map(|()| target)
}

fn fill_and_seal(tmpfs: &Path, sealed: &Path, binary: &Path, flags: MsFlags) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let bin = tmpfs.join("bin");
    let empty = tmpfs.join("empty");
    std::fs::create_dir(&bin)?;
    std::fs::create_dir(&empty)?;
    let copy = bin.join("init");
    std::fs::copy(binary, &copy)
        .map_err(|e| io::Error::new(e.kind(), format!("copying {}: {e}", binary.display())))?;
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o555))?;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o555))?;
    // Two lower layers and no upper: overlayfs wants at least two lowers then.
    let options = format!("lowerdir={}:{}", bin.display(), empty.display());
    mount(
        Some("overlay"),
        sealed,
        Some("overlay"),
        flags | MsFlags::MS_RDONLY,
        Some(options.as_str()),
    )
    .map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("mounting the sealed overlay on {}: {e}", sealed.display()),
        )
    })?;
    // The copy itself can no longer change either, not even from the host's side.
    mount(
        None::<&str>,
        tmpfs,
        None::<&str>,
        flags | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("making {} read-only: {e}", tmpfs.display()),
        )
    })
}
