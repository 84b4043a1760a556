//! Copy-up on the host (root): a new volume gets the image's tree at its target with owners,
//! modes, extended attributes, times and hard links; nothing the image's symlinks point at
//! is followed; device nodes stay out; an interrupted copy is redone, never trusted; and
//! through a real overlay of layers, a whiteout hides what it deletes.

use std::ffi::CString;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use keel_supervisor::copy_up::{PopulateJob, Populated, copy_from_root, populate};
use keel_supervisor::volume_store::VolumeStore;

fn job(image_lowers: Vec<PathBuf>, layer_root: &Path, target: &str, store: &Path) -> PopulateJob {
    let volume = store.join("data");
    PopulateJob {
        layer_root: layer_root.to_path_buf(),
        lowers: image_lowers,
        target: target.into(),
        staging: VolumeStore::staging_for(&volume),
        volume,
        scratch: store.join(".scratch"),
        empty_owner: (100000, 100000),
    }
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap();
}

fn set_mtime(path: &Path, secs: i64) {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let times = [
        libc::timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
    ];
    // SAFETY: a valid C string and two timespecs, as utimensat takes them.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0, "utimensat {}", path.display());
}

fn get_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = [0u8; 256];
    // SAFETY: valid C strings and a buffer of the size given.
    let len =
        unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (len >= 0).then(|| buf[..len as usize].to_vec())
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: valid C strings and a value of the length given.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "setxattr {name} on {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

fn mknod(path: &Path, mode: u32, dev: u64) {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid C string.
    let r = unsafe { libc::mknod(c.as_ptr(), mode, dev) };
    assert_eq!(r, 0, "mknod {}", path.display());
}

/// An image root with a redis-like data directory at /var/lib/app.
fn image_root(root: &Path) {
    let data = root.join("var/lib/app");
    std::fs::create_dir_all(data.join("sub")).unwrap();
    std::fs::write(data.join("dump.rdb"), b"REDIS0011").unwrap();
    std::fs::set_permissions(data.join("dump.rdb"), PermissionsExt::from_mode(0o640)).unwrap();
    chown(&data.join("dump.rdb"), 999, 998);
    set_xattr(&data.join("dump.rdb"), "user.origin", b"image");
    std::fs::hard_link(data.join("dump.rdb"), data.join("sub/same.rdb")).unwrap();
    std::fs::write(data.join("sub/setuid"), b"#!/bin/sh\n").unwrap();
    // Owner first: a chown clears set-user-ID.
    chown(&data.join("sub/setuid"), 999, 998);
    std::fs::set_permissions(data.join("sub/setuid"), PermissionsExt::from_mode(0o4755)).unwrap();
    // Symlinks out of the image and to the host: copied as symlinks, never followed.
    symlink("../../../../etc/shadow", data.join("escape")).unwrap();
    symlink("/etc/shadow", data.join("absolute")).unwrap();
    chown(&data.join("absolute"), 999, 998);
    mknod(&data.join("fifo"), libc::S_IFIFO | 0o620, 0);
    mknod(
        &data.join("null"),
        libc::S_IFCHR | 0o666,
        libc::makedev(1, 3),
    );
    std::fs::set_permissions(data.join("sub"), PermissionsExt::from_mode(0o700)).unwrap();
    chown(&data.join("sub"), 999, 998);
    set_mtime(&data.join("sub"), 1_000_000_000);
    set_mtime(&data.join("dump.rdb"), 1_100_000_000);
    std::fs::set_permissions(&data, PermissionsExt::from_mode(0o750)).unwrap();
    chown(&data, 999, 998);
    set_mtime(&data, 1_200_000_000);
    // A symlinked target: the volume's mount would refuse it, so the copy does too.
    std::fs::create_dir_all(root.join("srv")).unwrap();
    symlink("/var/lib/app", root.join("srv/link")).unwrap();
}

#[test]
fn a_new_volume_gets_the_image_tree_with_owners_modes_xattrs_times_and_links() {
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let root = work.path().join("image");
    image_root(&root);
    let store = work.path().join("volumes");
    std::fs::create_dir_all(&store).unwrap();
    let job = job(Vec::new(), &root, "/var/lib/app", &store);

    // A copy a power cut interrupted: its staging directory holds a half tree.
    std::fs::create_dir_all(job.staging.join("half")).unwrap();
    let outcome = copy_from_root(&job, &root).unwrap();
    let Populated::Copied(stats) = outcome else {
        panic!("{outcome:?}");
    };
    assert!(
        !job.staging.exists(),
        "the staging directory is renamed away"
    );
    let v = &job.volume;
    assert!(
        !v.join("half").exists(),
        "nothing of the interrupted copy is kept"
    );

    let meta = |p: &str| std::fs::symlink_metadata(v.join(p)).unwrap();
    assert_eq!(
        (meta("").uid(), meta("").gid(), meta("").mode() & 0o7777),
        (999, 998, 0o750)
    );
    assert_eq!(
        meta("").mtime(),
        1_200_000_000,
        "the root's times are the image directory's"
    );
    assert_eq!(std::fs::read(v.join("dump.rdb")).unwrap(), b"REDIS0011");
    assert_eq!(
        (meta("dump.rdb").uid(), meta("dump.rdb").mode() & 0o7777),
        (999, 0o640)
    );
    assert_eq!(meta("dump.rdb").mtime(), 1_100_000_000);
    assert_eq!(
        get_xattr(&v.join("dump.rdb"), "user.origin").as_deref(),
        Some(&b"image"[..])
    );
    assert_eq!(
        meta("sub/same.rdb").ino(),
        meta("dump.rdb").ino(),
        "hard links stay links"
    );
    assert_eq!(
        meta("sub/setuid").mode() & 0o7777,
        0o4755,
        "the mode is set after the owner"
    );
    assert_eq!(
        (meta("sub").mode() & 0o7777, meta("sub").mtime()),
        (0o700, 1_000_000_000)
    );
    assert_eq!(
        std::fs::read_link(v.join("escape")).unwrap(),
        Path::new("../../../../etc/shadow")
    );
    assert_eq!(
        std::fs::read_link(v.join("absolute")).unwrap(),
        Path::new("/etc/shadow")
    );
    assert_eq!(meta("absolute").uid(), 999, "a symlink keeps its owner");
    assert!(meta("fifo").file_type().is_fifo_like(), "a FIFO is kept");
    assert!(!v.join("null").exists(), "device nodes are left out");
    assert_eq!(
        (
            stats.files,
            stats.hardlinks,
            stats.symlinks,
            stats.fifos,
            stats.skipped
        ),
        (2, 1, 2, 1, 1)
    );

    // Once: the volume exists, and a second copy changes nothing in it.
    std::fs::remove_file(v.join("dump.rdb")).unwrap();
    assert_eq!(copy_from_root(&job, &root).unwrap(), Populated::Existed);
    assert!(!v.join("dump.rdb").exists());
}

trait FifoLike {
    fn is_fifo_like(&self) -> bool;
}

impl FifoLike for std::fs::FileType {
    fn is_fifo_like(&self) -> bool {
        std::os::unix::fs::FileTypeExt::is_fifo(self)
    }
}

#[test]
fn a_target_the_image_lacks_gives_an_empty_volume_of_the_containers_root() {
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let root = work.path().join("image");
    image_root(&root);
    let store = work.path().join("volumes");
    std::fs::create_dir_all(&store).unwrap();
    let job = job(Vec::new(), &root, "/nothing/here", &store);
    assert_eq!(copy_from_root(&job, &root).unwrap(), Populated::Empty);
    let meta = std::fs::metadata(&job.volume).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (100000, 100000, 0o755)
    );
    assert_eq!(std::fs::read_dir(&job.volume).unwrap().count(), 0);
}

#[test]
fn a_target_through_a_symlink_is_refused_and_leaves_no_volume() {
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let root = work.path().join("image");
    image_root(&root);
    let store = work.path().join("volumes");
    std::fs::create_dir_all(&store).unwrap();
    let job = job(Vec::new(), &root, "/srv/link", &store);
    let e = copy_from_root(&job, &root).unwrap_err();
    assert!(e.to_string().contains("symlink"), "{e}");
    assert!(!job.volume.exists() && !job.staging.exists());
}

#[test]
fn through_the_image_layers_a_whiteout_hides_what_it_deletes() {
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let layers = work.path().join("layers");
    let (bottom, top) = (layers.join("l0"), layers.join("l1"));
    std::fs::create_dir_all(bottom.join("data")).unwrap();
    std::fs::create_dir_all(top.join("data")).unwrap();
    std::fs::write(bottom.join("data/kept"), "bottom").unwrap();
    std::fs::write(bottom.join("data/deleted"), "bottom").unwrap();
    std::fs::write(bottom.join("data/replaced"), "bottom").unwrap();
    // Overlayfs' whiteout: a 0:0 character device.
    mknod(&top.join("data/deleted"), libc::S_IFCHR, 0);
    std::fs::write(top.join("data/replaced"), "top").unwrap();
    let store = work.path().join("volumes");
    std::fs::create_dir_all(&store).unwrap();
    let job = job(vec!["l0".into(), "l1".into()], &layers, "/data", &store);

    // populate leaves the mount namespace it is called in: give it a process of its own.
    // SAFETY: the child only runs populate and exits; it never returns into the harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let code = match populate(&job) {
            Ok(Populated::Copied(_)) => 0,
            Ok(other) => {
                eprintln!("populate: {other:?}");
                1
            }
            Err(e) => {
                eprintln!("populate: {e}");
                1
            }
        };
        // SAFETY: ends the forked child without running the harness's exit handlers.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for the child forked above.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "populate failed"
    );
    let read = |name: &str| std::fs::read_to_string(job.volume.join(name)).ok();
    assert_eq!(read("kept").as_deref(), Some("bottom"));
    assert_eq!(read("replaced").as_deref(), Some("top"));
    assert!(
        std::fs::symlink_metadata(job.volume.join("deleted")).is_err(),
        "the whiteout hides the deleted file"
    );
    assert!(!job.scratch.exists(), "the scratch directory is removed");
}
