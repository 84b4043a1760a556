//! /etc is generated at boot, never shipped: the root image is read-only, so /etc is a
//! tmpfs holding only what this boot's configuration says. Nothing edits it by hand and
//! nothing in it outlives the boot. (/etc/resolv.conf and /etc/hosts are added by the
//! network code as addresses arrive.)

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nix::mount::{MsFlags, mount};

/// Mounts the tmpfs on /etc when the root is read-only. On an initramfs-only host the root
/// is a writable tmpfs already and /etc is simply a directory on it.
pub fn mount_tmpfs(etc: &Path) -> io::Result<bool> {
    let root_read_only = nix::sys::statvfs::statvfs("/")
        .map(|s| s.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY))
        .unwrap_or(false);
    if !root_read_only {
        fs::create_dir_all(etc)?;
        return Ok(false);
    }
    mount(
        Some("etc"),
        etc,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=8m"),
    )?;
    Ok(true)
}

/// What goes into /etc.
pub struct Identity<'a> {
    pub hostname: &'a str,
    pub machine_id: &'a str,
    /// The host file in force, which /etc/keel/host.toml points at.
    pub effective_host_file: &'a Path,
}

/// Writes the generated files under `etc`.
pub fn generate(etc: &Path, identity: &Identity) -> io::Result<()> {
    fs::create_dir_all(etc.join("keel"))?;
    let files: [(&str, String, u32); 5] = [
        ("hostname", format!("{}\n", identity.hostname), 0o644),
        ("machine-id", format!("{}\n", identity.machine_id), 0o444),
        (
            "os-release",
            format!(
                "NAME=Keel\nID=keel\nPRETTY_NAME=\"Keel {v}\"\nVERSION_ID={v}\nHOME_URL=\"https://keel.invalid/\"\n",
                v = env!("CARGO_PKG_VERSION")
            ),
            0o644,
        ),
        (
            "passwd",
            "root:x:0:0:root:/root:/sbin/nologin\n".into(),
            0o644,
        ),
        ("group", "root:x:0:\n".into(), 0o644),
    ];
    for (name, text, mode) in files {
        let path = etc.join(name);
        // Rewritten at every boot (and on a tmpfs): no need for the state-file dance.
        let _ = fs::remove_file(&path);
        fs::write(&path, text)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
    }
    for (link, target) in [
        ("mtab", Path::new("../proc/self/mounts")),
        ("keel/host.toml", identity.effective_host_file),
    ] {
        let path = etc.join(link);
        let _ = fs::remove_file(&path);
        std::os::unix::fs::symlink(target, &path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_files_name_the_host() {
        let dir = tempfile::tempdir().unwrap();
        let identity = Identity {
            hostname: "edge-1",
            machine_id: "0123456789abcdef0123456789abcdef",
            effective_host_file: Path::new("/run/keel/host.toml"),
        };
        generate(dir.path(), &identity).unwrap();
        // Twice: a reboot on a writable root finds last boot's files.
        generate(dir.path(), &identity).unwrap();
        let read = |f: &str| fs::read_to_string(dir.path().join(f)).unwrap();
        assert_eq!(read("hostname"), "edge-1\n");
        assert_eq!(read("machine-id"), "0123456789abcdef0123456789abcdef\n");
        assert!(read("os-release").contains("ID=keel"));
        assert!(read("passwd").starts_with("root:x:0:0:"));
        assert_eq!(
            fs::read_link(dir.path().join("keel/host.toml")).unwrap(),
            Path::new("/run/keel/host.toml")
        );
    }
}
