//! Host test of the sealed /dev/init: what a container with CAP_SYS_ADMIN could try against
//! its bind of the reaper, tried against a bind of the sealed copy — and, so that the test
//! can fail, against a bind of a plain file on a tmpfs, which is what an initramfs-only host
//! used to bind.
//!
//! Everything happens in a thread with a mount namespace of its own: its mounts go with it.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use keel_supervisor::sealed_reaper::seal;
use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};

/// What a container could do to its /dev/init, each as Ok (it worked) or the error.
fn attacks(target: &Path) -> Vec<(&'static str, io::Result<()>)> {
    let remount = |flags: MsFlags| {
        mount(None::<&str>, target, None::<&str>, flags, None::<&str>).map_err(io::Error::from)
    };
    let write = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open(target)
            .map(drop)
    };
    let chmod = || {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(target, std::fs::Permissions::from_mode(0o4755))
    };
    let xattr = || {
        let path = CString::new(target.as_os_str().as_bytes()).unwrap();
        // SAFETY: both strings are NUL-terminated and the value is a valid buffer.
        let ret = unsafe {
            libc::setxattr(
                path.as_ptr(),
                c"user.keel-test".as_ptr(),
                b"x".as_ptr().cast(),
                1,
                0,
            )
        };
        if ret == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    vec![
        (
            "bind remount rw",
            remount(MsFlags::MS_REMOUNT | MsFlags::MS_BIND),
        ),
        ("write after it", write()),
        ("superblock remount rw", remount(MsFlags::MS_REMOUNT)),
        ("write after that", write()),
        ("chmod 4755", chmod()),
        ("setxattr", xattr()),
    ]
}

/// Binds `source` read-only at a fresh file under `dir`, as the container setup does.
fn bind_like_a_container(source: &Path, dir: &Path) -> std::path::PathBuf {
    let target = dir.join("dev-init");
    std::fs::write(&target, b"").unwrap();
    mount(
        Some(source),
        &target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    mount(
        None::<&str>,
        &target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID,
        None::<&str>,
    )
    .unwrap();
    target
}

#[test]
fn the_sealed_reaper_cannot_be_changed_through_its_bind() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    std::thread::spawn(|| {
        unshare(CloneFlags::CLONE_NEWNS).expect("unshare(CLONE_NEWNS)");
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .unwrap();
        let work = tempfile::tempdir().unwrap();
        let binary = Path::new("/bin/true");

        let sealed = seal(&work.path().join("reaper"), binary).expect("sealing");
        assert_eq!(
            std::fs::read(&sealed).unwrap(),
            std::fs::read(binary).unwrap()
        );
        let sealed_bind = bind_like_a_container(&sealed, &work.path().join("reaper"));
        let sealed_results = attacks(&sealed_bind);

        // The old way: a bind of a file on a writable tmpfs.
        let plain = work.path().join("plain");
        std::fs::create_dir(&plain).unwrap();
        mount(
            Some("tmpfs"),
            &plain,
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        std::fs::copy(binary, plain.join("init")).unwrap();
        let plain_bind = bind_like_a_container(&plain.join("init"), &plain);
        let plain_results = attacks(&plain_bind);

        // Remounting its own bind read-write is the container's business (its mount
        // namespace); every change to the file itself must fail.
        let changed: Vec<String> = sealed_results
            .iter()
            .filter(|(what, r)| r.is_ok() && *what != "bind remount rw")
            .map(|(what, _)| what.to_string())
            .collect();
        assert!(
            changed.is_empty(),
            "the sealed copy could be changed: {changed:?}; all: {sealed_results:?}"
        );
        assert!(
            plain_results
                .iter()
                .any(|(what, r)| *what == "write after it" && r.is_ok()),
            "the attacks must work on a plain tmpfs file, or they prove nothing: {plain_results:?}"
        );
        assert_eq!(
            std::fs::read(&sealed).unwrap(),
            std::fs::read(binary).unwrap(),
            "the sealed copy is unchanged"
        );
    })
    .join()
    .expect("test thread failed");
}
