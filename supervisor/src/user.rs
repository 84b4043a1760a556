//! A container's user, resolved like runc's `libcontainer/user` (`GetExecUser`) against the
//! IMAGE's own `/etc/passwd` and `/etc/group`, never the host's. Keel is a static binary, where
//! glibc NSS does not work, so the files are parsed here.
//!
//! The parent resolves ([`read_merged`] + [`resolve`]); the clone3 child only calls
//! [`switch_to`], which makes raw system calls.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use thiserror::Error;

/// The highest id accepted: `(uid_t)-1` means "unchanged" to the set*id calls.
const MAX_ID: u64 = 4_294_967_294;

/// Symlinks followed before giving up with ELOOP, as the kernel's MAXSYMLINKS.
const MAX_SYMLINK_HOPS: u32 = 40;

/// Largest file [`read_merged`] reads: the image is untrusted and this runs in PID 1.
const MAX_FILE_SIZE: u64 = 16 << 20;

/// Overlay's marker for a directory that hides the same directory in lower layers.
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// The identity a container's process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups from `/etc/group` membership, without `gid`.
    pub additional_gids: Vec<u32>,
    /// The home directory from `/etc/passwd`, `/` without an entry.
    pub home: String,
}

impl ResolvedUser {
    /// The list for setgroups(2) as Docker builds it: the primary gid first, then the
    /// supplementary ones. Build it in the parent and keep it alive for [`switch_to`].
    pub fn setgroups_list(&self) -> Vec<libc::gid_t> {
        std::iter::once(self.gid)
            .chain(self.additional_gids.iter().copied())
            .collect()
    }
}

/// Why a user spec could not be resolved.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum UserError {
    /// A user name with no entry in the image's passwd file.
    #[error("user {0:?} not found in the image's /etc/passwd")]
    UnknownUser(String),
    /// A user name, but the image has no passwd file to look it up in.
    #[error("user {0:?} cannot be resolved: the image has no /etc/passwd")]
    NoPasswd(String),
    /// A group name with no entry in the image's group file.
    #[error("group {0:?} not found in the image's /etc/group")]
    UnknownGroup(String),
    /// A group name, but the image has no group file to look it up in.
    #[error("group {0:?} cannot be resolved: the image has no /etc/group")]
    NoGroup(String),
    /// A numeric uid or gid above 4294967294.
    #[error("id {0} is out of range (the largest usable id is 4294967294)")]
    IdOutOfRange(String),
    /// Not of the form `user`, `user:group`, or with a third part.
    #[error("invalid user spec {0:?}: expected user, uid, user:group or uid:gid")]
    InvalidSpec(String),
}

/// One usable line of a passwd file.
struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

/// One usable line of a group file.
struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: &'a str,
}

/// An id in a passwd or group file or a spec: ASCII digits only (`u32::from_str` would
/// also take a `+`), at most [`MAX_ID`].
fn parse_id(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u64>()
        .ok()
        .filter(|&n| n <= MAX_ID)
        .map(|n| n as u32)
}

/// Lines worth parsing: not blank, not comments. Trimmed so CRLF files parse too.
fn data_lines(file: &str) -> impl Iterator<Item = &str> {
    file.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

/// `name:password:uid:gid:gecos:home:shell`; other lines are skipped silently, as an
/// image's file is not ours to complain about.
fn passwd_entries(file: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    data_lines(file).filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() != 7 {
            return None;
        }
        Some(PasswdEntry {
            name: f[0],
            uid: parse_id(f[2])?,
            gid: parse_id(f[3])?,
            home: f[5],
        })
    })
}

/// `name:password:gid:member,member`; other lines are skipped silently.
fn group_entries(file: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    data_lines(file).filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() != 4 {
            return None;
        }
        Some(GroupEntry {
            name: f[0],
            gid: parse_id(f[2])?,
            members: f[3],
        })
    })
}

/// Whether a spec part is meant as a number. Digits only: runc treats any numeric user
/// as a uid, even when a user has that name.
fn is_numeric(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Resolves a container's user spec against the image's passwd and group files.
///
/// `spec` is `None` (root), `"name"`, `"uid"`, `"name:group"`, `"uid:gid"`, `"name:gid"` or
/// `"uid:group"`; an empty user part means root. `passwd`/`group` are the image's files'
/// contents, `None` if it has none. As in runc (`GetExecUser`):
/// - a numeric user is always a uid; without a passwd entry it runs with gid 0, home `/`
///   and no supplementary groups;
/// - a user name must be in passwd (first match wins);
/// - an explicit group replaces the primary gid (a name must be in /etc/group, a number need
///   not be), and then, as in runc, no supplementary groups are added;
/// - otherwise the supplementary groups are every group listing the user's name as a
///   member, deduplicated, without the primary gid.
pub fn resolve(
    spec: Option<&str>,
    passwd: Option<&str>,
    group: Option<&str>,
) -> Result<ResolvedUser, UserError> {
    let spec = spec.unwrap_or("");
    let mut parts = spec.split(':');
    let user_part = parts.next().unwrap_or("");
    let group_part = parts.next().unwrap_or("");
    if parts.next().is_some() {
        return Err(UserError::InvalidSpec(spec.to_string()));
    }

    let mut resolved = ResolvedUser {
        uid: 0,
        gid: 0,
        additional_gids: Vec::new(),
        home: "/".to_string(),
    };

    let wanted_uid = if user_part.is_empty() {
        Some(0)
    } else if is_numeric(user_part) {
        Some(parse_id(user_part).ok_or_else(|| UserError::IdOutOfRange(user_part.to_string()))?)
    } else {
        None
    };
    let entry = passwd.and_then(|p| {
        passwd_entries(p).find(|e| match wanted_uid {
            Some(uid) => e.uid == uid,
            None => e.name == user_part,
        })
    });
    let user_name = match (entry, wanted_uid) {
        (Some(e), _) => {
            resolved.uid = e.uid;
            resolved.gid = e.gid;
            if !e.home.is_empty() {
                resolved.home = e.home.to_string();
            }
            Some(e.name)
        }
        (None, Some(uid)) => {
            resolved.uid = uid;
            None
        }
        (None, None) if passwd.is_some() => {
            return Err(UserError::UnknownUser(user_part.to_string()));
        }
        (None, None) => return Err(UserError::NoPasswd(user_part.to_string())),
    };

    if !group_part.is_empty() {
        let numeric = if is_numeric(group_part) {
            Some(
                parse_id(group_part)
                    .ok_or_else(|| UserError::IdOutOfRange(group_part.to_string()))?,
            )
        } else {
            None
        };
        resolved.gid = match numeric {
            // A number needs no entry, and an entry could only say the same number.
            Some(gid) => gid,
            None => {
                let file = group.ok_or_else(|| UserError::NoGroup(group_part.to_string()))?;
                group_entries(file)
                    .find(|g| g.name == group_part)
                    .map(|g| g.gid)
                    .ok_or_else(|| UserError::UnknownGroup(group_part.to_string()))?
            }
        };
    } else if let (Some(name), Some(file)) = (user_name, group) {
        for g in group_entries(file) {
            let member = g.members.split(',').map(str::trim).any(|m| m == name);
            if member && g.gid != resolved.gid && !resolved.additional_gids.contains(&g.gid) {
                resolved.additional_gids.push(g.gid);
            }
        }
    }
    Ok(resolved)
}

/// Switches to `user`'s identity: setgroups(ngids, gids), setresgid, then setresuid, as raw
/// system calls. Raw because glibc's wrappers broadcast set*id to every thread it believes
/// exists, and a clone3 child inherits that belief from the multithreaded parent. To keep
/// capabilities across the switch, set keepcaps first ([`crate::caps::set_keepcaps`]).
/// Returns false with errno set on the first failure.
///
/// # Safety
/// Async-signal-safe: for the clone3 child. `gids` must point to `ngids` readable gids (it
/// may be null when `ngids` is 0); the caller keeps that memory alive, e.g. the Vec from
/// [`ResolvedUser::setgroups_list`] built before the clone.
pub unsafe fn switch_to(user: &ResolvedUser, gids: *const libc::gid_t, ngids: usize) -> bool {
    // SAFETY: the caller guarantees `gids` covers `ngids` entries; the kernel only reads them.
    if unsafe { libc::syscall(libc::SYS_setgroups, ngids, gids) } != 0 {
        return false;
    }
    let (uid, gid) = (user.uid as libc::c_ulong, user.gid as libc::c_ulong);
    // SAFETY: integer arguments only.
    if unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) } != 0 {
        return false;
    }
    // SAFETY: integer arguments only.
    unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) == 0 }
}

/// What one merged-view name turned out to be.
enum Entry {
    /// Absent, or hidden by a whiteout.
    Missing,
    /// A directory, with the layers contributing to it, top first (overlay merges them).
    Dir(Vec<usize>),
    /// Anything else, taken from the topmost layer that has it.
    Other(usize, Metadata),
}

fn is_whiteout(meta: &Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

fn is_opaque(dir: &Path) -> io::Result<bool> {
    let mut value = [0u8; 2];
    match rustix::fs::lgetxattr(dir, OPAQUE_XATTR, &mut value) {
        Ok(n) => Ok(&value[..n] == b"y"),
        // No xattr, no xattr support, or a value too long to be "y".
        Err(rustix::io::Errno::NODATA | rustix::io::Errno::NOTSUP | rustix::io::Errno::RANGE) => {
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

fn symlink_metadata_opt(path: &Path) -> io::Result<Option<Metadata>> {
    match std::fs::symlink_metadata(path) {
        Ok(m) => Ok(Some(m)),
        Err(e)
            if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Looks `rel` up in the merged view, given the layers in which its parent is a merged
/// directory. Overlay's rules: the topmost layer with the name decides; a whiteout hides it; a
/// directory merges with the same directory below until an opaque one, or a lower whiteout or
/// non-directory, ends the merge.
fn lookup(layers: &[PathBuf], parent_dirs: &[usize], rel: &Path) -> io::Result<Entry> {
    let mut dirs = Vec::new();
    for &i in parent_dirs {
        let p = layers[i].join(rel);
        let Some(meta) = symlink_metadata_opt(&p)? else {
            continue;
        };
        if is_whiteout(&meta) {
            break;
        }
        if !meta.is_dir() {
            if dirs.is_empty() {
                return Ok(Entry::Other(i, meta));
            }
            break;
        }
        dirs.push(i);
        if is_opaque(&p)? {
            break;
        }
    }
    Ok(if dirs.is_empty() {
        Entry::Missing
    } else {
        Entry::Dir(dirs)
    })
}

/// Reads a file from a merged image view given as layer directories top first (the overlay
/// upper first, then the lower layers from the top one down), without mounting anything.
///
/// The first layer that has the path decides; a whiteout (a 0/0 character device) or an opaque
/// parent directory (`trusted.overlay.opaque=y`) in a higher layer hides it. Symlinks are
/// resolved component by component against the merged root (absolute targets and `..` never
/// leave it), at most 40 hops (then ELOOP), so nothing outside the layer directories is read.
/// Returns `None` if the path does not exist; an error if it is a directory (EISDIR), passes
/// through a non-directory (ENOTDIR), is not a regular file, or is larger than 16 MiB.
pub fn read_merged(layers_top_first: &[PathBuf], path: &str) -> io::Result<Option<Vec<u8>>> {
    if layers_top_first.is_empty() {
        return Ok(None);
    }
    let all: Vec<usize> = (0..layers_top_first.len()).collect();
    // The resolved directories so far, each with its contributing layers; `..` pops.
    let mut stack: Vec<(OsString, Vec<usize>)> = Vec::new();
    let mut todo: VecDeque<OsString> = VecDeque::new();
    push_front_components(&mut todo, Path::new(path));
    let mut hops = 0;

    while let Some(name) = todo.pop_front() {
        if name == ".." {
            stack.pop();
            continue;
        }
        let parent_dirs = stack.last().map_or(&all, |(_, d)| d);
        let rel: PathBuf = stack
            .iter()
            .map(|(n, _)| n.as_os_str())
            .chain([name.as_os_str()])
            .collect();
        match lookup(layers_top_first, parent_dirs, &rel)? {
            Entry::Missing => return Ok(None),
            Entry::Dir(dirs) => stack.push((name, dirs)),
            Entry::Other(layer, meta) if meta.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    return Err(io::Error::from_raw_os_error(libc::ELOOP));
                }
                let target = std::fs::read_link(layers_top_first[layer].join(&rel))?;
                if target.is_absolute() {
                    stack.clear();
                }
                push_front_components(&mut todo, &target);
            }
            Entry::Other(_, _) if !todo.is_empty() => {
                return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
            }
            Entry::Other(layer, meta) if meta.is_file() => {
                return read_regular(&layers_top_first[layer], &rel).map(Some);
            }
            Entry::Other(_, _) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("/{} in the image is not a regular file", rel.display()),
                ));
            }
        }
    }
    // The path named a directory (or the root itself).
    Err(io::Error::from_raw_os_error(libc::EISDIR))
}

/// Queues a path's components (after what is already queued is prepended, as a symlink's
/// target replaces the link). `.` is dropped; `..` is kept to pop the stack at its turn.
fn push_front_components(todo: &mut VecDeque<OsString>, path: &Path) {
    let names: Vec<OsString> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect();
    for n in names.into_iter().rev() {
        todo.push_front(n);
    }
}

/// Opens `rel` beneath `layer` refusing every symlink (openat2 RESOLVE_NO_SYMLINKS|BENEATH),
/// so a layer changed after the lookup still cannot redirect the read, and reads it with
/// the size cap.
fn read_regular(layer: &Path, rel: &Path) -> io::Result<Vec<u8>> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let root = rustix::fs::open(
        layer,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    // O_NONBLOCK so that a FIFO swapped in after the lookup cannot block PID 1.
    let flags =
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NOCTTY | OFlags::NONBLOCK;
    let resolve = ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS | ResolveFlags::BENEATH;
    let fd = match rustix::fs::openat2(&root, rel, flags, Mode::empty(), resolve) {
        Ok(fd) => fd,
        // Before Linux 5.6: the lookup above already checked every component.
        Err(rustix::io::Errno::NOSYS) => rustix::fs::openat(&root, rel, flags, Mode::empty())?,
        Err(e) => return Err(e.into()),
    };
    let mut file = File::from(fd);
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("/{} in the image is not a regular file", rel.display()),
        ));
    }
    let mut data = Vec::new();
    (&mut file).take(MAX_FILE_SIZE + 1).read_to_end(&mut data)?;
    if data.len() as u64 > MAX_FILE_SIZE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "/{} in the image is larger than {MAX_FILE_SIZE} bytes",
                rel.display()
            ),
        ));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "\
# a comment
root:x:0:0:root:/root:/bin/sh

daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
app:x:1000:1000:App:/home/app:/bin/sh
app:x:1001:1001:Second app entry:/nowhere:/bin/sh
nohome:x:1002:1002:::/bin/sh
short:x:1003:1003
toolong:x:1004:1004:a:b:c:d
wordy:x:abc:1005::/w:/bin/sh
big:x:4294967295:1:::/bin/sh
huge:x:99999999999:1:::/bin/sh
plus:x:+7:1:::/bin/sh
max:x:4294967294:4294967294::/max:/bin/sh
crlf:x:1006:1006::/crlf:/bin/sh\r
";

    const GROUP: &str = "\
# groups
root:x:0:root
wheel:x:10:root, app
app:x:1000:
staff:x:50:app,daemon
staff-again:x:50:app
audio:x:29:daemon,application
video:x:44:app
selfref:x:1000:app
broken:x:60
nonnum:x:sixty:app
";

    fn ok(spec: Option<&str>) -> ResolvedUser {
        resolve(spec, Some(PASSWD), Some(GROUP)).unwrap()
    }

    fn user(uid: u32, gid: u32, gids: &[u32], home: &str) -> ResolvedUser {
        ResolvedUser {
            uid,
            gid,
            additional_gids: gids.to_vec(),
            home: home.into(),
        }
    }

    #[test]
    fn no_spec_is_root_with_its_groups_and_home() {
        assert_eq!(ok(None), user(0, 0, &[10], "/root"));
        assert_eq!(ok(Some("")), ok(None));
        assert_eq!(ok(Some("root")), ok(None));
        assert_eq!(ok(Some("0")), ok(None));
    }

    #[test]
    fn root_without_files() {
        assert_eq!(resolve(None, None, None).unwrap(), user(0, 0, &[], "/"));
        assert_eq!(
            resolve(Some("0"), None, None).unwrap(),
            user(0, 0, &[], "/")
        );
    }

    #[test]
    fn name_takes_uid_gid_home_and_member_groups() {
        // wheel (10), staff (50, listed twice), video (44); selfref is the primary gid;
        // audio lists "application", which is not "app".
        assert_eq!(
            ok(Some("app")),
            user(1000, 1000, &[10, 50, 44], "/home/app")
        );
        assert_eq!(ok(Some("daemon")), user(1, 1, &[50, 29], "/usr/sbin"));
    }

    #[test]
    fn first_passwd_match_wins() {
        assert_eq!(ok(Some("app")).uid, 1000);
    }

    #[test]
    fn numeric_uid_with_entry_uses_the_entry() {
        assert_eq!(ok(Some("1000")), ok(Some("app")));
        assert_eq!(
            ok(Some("1001")),
            user(1001, 1001, &[10, 50, 44, 1000], "/nowhere"),
            "groups by its name; selfref's 1000 is not its primary gid"
        );
    }

    #[test]
    fn numeric_uid_without_entry_is_gid_0_home_slash_no_groups() {
        assert_eq!(ok(Some("4242")), user(4242, 0, &[], "/"));
        assert_eq!(
            resolve(Some("4242"), None, None).unwrap(),
            user(4242, 0, &[], "/")
        );
        assert_eq!(
            ok(Some("4294967294")),
            user(4294967294, 4294967294, &[], "/max")
        );
    }

    #[test]
    fn unknown_name_is_an_error_naming_it_and_the_image_file() {
        let err = ok_err(Some("nobody"));
        assert_eq!(err, UserError::UnknownUser("nobody".into()));
        let msg = err.to_string();
        assert!(
            msg.contains("\"nobody\"") && msg.contains("image's /etc/passwd"),
            "{msg}"
        );
        let err = resolve(Some("app"), None, Some(GROUP)).unwrap_err();
        assert_eq!(err, UserError::NoPasswd("app".into()));
        assert!(err.to_string().contains("image has no /etc/passwd"));
    }

    fn ok_err(spec: Option<&str>) -> UserError {
        resolve(spec, Some(PASSWD), Some(GROUP)).unwrap_err()
    }

    #[test]
    fn explicit_group_overrides_the_primary_gid() {
        // As runc: an explicit group also means no supplementary groups.
        assert_eq!(ok(Some("app:staff")), user(1000, 50, &[], "/home/app"));
        assert_eq!(ok(Some("app:44")), user(1000, 44, &[], "/home/app"));
        assert_eq!(
            ok(Some("app:7777")),
            user(1000, 7777, &[], "/home/app"),
            "number need not exist"
        );
        assert_eq!(ok(Some("1000:1000")), user(1000, 1000, &[], "/home/app"));
        assert_eq!(ok(Some("4242:4343")), user(4242, 4343, &[], "/"));
        assert_eq!(ok(Some("4242:video")), user(4242, 44, &[], "/"));
        assert_eq!(ok(Some(":video")), user(0, 44, &[], "/root"));
        assert_eq!(
            ok(Some("root:")),
            ok(None),
            "an empty group part is no group"
        );
        assert_eq!(
            resolve(Some("4242:4343"), None, None).unwrap(),
            user(4242, 4343, &[], "/")
        );
    }

    #[test]
    fn group_name_must_exist() {
        assert_eq!(
            ok_err(Some("app:nogroup")),
            UserError::UnknownGroup("nogroup".into())
        );
        assert!(
            ok_err(Some("app:nogroup"))
                .to_string()
                .contains("image's /etc/group")
        );
        assert_eq!(
            resolve(Some("app:staff"), Some(PASSWD), None).unwrap_err(),
            UserError::NoGroup("staff".into())
        );
        // Lines that did not parse do not count.
        assert_eq!(
            ok_err(Some("app:broken")),
            UserError::UnknownGroup("broken".into())
        );
        assert_eq!(
            ok_err(Some("app:nonnum")),
            UserError::UnknownGroup("nonnum".into())
        );
    }

    #[test]
    fn ids_must_fit_and_not_be_minus_one() {
        assert_eq!(
            ok_err(Some("4294967295")),
            UserError::IdOutOfRange("4294967295".into())
        );
        assert_eq!(
            ok_err(Some("99999999999999999999999")),
            UserError::IdOutOfRange("99999999999999999999999".into())
        );
        assert_eq!(
            ok_err(Some("app:4294967295")),
            UserError::IdOutOfRange("4294967295".into())
        );
        // Not digits only: a name, and there is no such user.
        assert_eq!(ok_err(Some("-1")), UserError::UnknownUser("-1".into()));
        assert_eq!(ok_err(Some("+7")), UserError::UnknownUser("+7".into()));
    }

    #[test]
    fn malformed_lines_are_skipped() {
        for name in [
            "short",
            "toolong",
            "wordy",
            "big",
            "huge",
            "plus",
            "# a comment",
        ] {
            assert_eq!(
                ok_err(Some(name)),
                UserError::UnknownUser(name.into()),
                "{name}"
            );
        }
        assert_eq!(ok(Some("crlf")), user(1006, 1006, &[], "/crlf"));
        assert_eq!(
            ok(Some("nohome")),
            user(1002, 1002, &[], "/"),
            "empty home is /"
        );
        let garbage = "\n\n:::\n::::::\nx\n\u{0}\n";
        assert_eq!(
            resolve(Some("5"), Some(garbage), Some(garbage)).unwrap(),
            user(5, 0, &[], "/")
        );
        assert_eq!(
            resolve(None, Some(garbage), Some(garbage)).unwrap(),
            user(0, 0, &[], "/")
        );
    }

    #[test]
    fn bad_spec() {
        assert_eq!(
            ok_err(Some("a:b:c")),
            UserError::InvalidSpec("a:b:c".into())
        );
    }

    #[test]
    fn setgroups_list_puts_the_primary_gid_first() {
        assert_eq!(ok(Some("app")).setgroups_list(), [1000, 10, 50, 44]);
        assert_eq!(ok(Some("4242")).setgroups_list(), [0]);
    }

    // ---- read_merged ----

    use std::os::unix::fs::symlink;

    /// A temp dir on a filesystem that takes trusted.* xattrs (tmpfs or ext4 as root);
    /// /dev/shm first because it is tmpfs more often than /tmp.
    fn tempdir() -> tempfile::TempDir {
        for base in ["/dev/shm", "/tmp"] {
            let Ok(d) = tempfile::Builder::new()
                .prefix("keel-user-")
                .tempdir_in(base)
            else {
                continue;
            };
            let flags = rustix::fs::XattrFlags::empty();
            if rustix::fs::setxattr(d.path(), OPAQUE_XATTR, b"n", flags).is_ok() {
                return d;
            }
        }
        tempfile::tempdir().unwrap()
    }

    fn layers(root: &Path, n: usize) -> Vec<PathBuf> {
        (0..n)
            .map(|i| {
                let p = root.join(format!("layer{i}"));
                std::fs::create_dir_all(&p).unwrap();
                p
            })
            .collect()
    }

    fn write(layer: &Path, rel: &str, data: &str) {
        let p = layer.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }

    fn whiteout(layer: &Path, rel: &str) {
        let p = layer.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &p,
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
    }

    fn opaque(layer: &Path, rel: &str) {
        let p = layer.join(rel);
        std::fs::create_dir_all(&p).unwrap();
        rustix::fs::setxattr(&p, OPAQUE_XATTR, b"y", rustix::fs::XattrFlags::empty()).unwrap();
    }

    fn read(layers: &[PathBuf], path: &str) -> Option<String> {
        read_merged(layers, path)
            .unwrap()
            .map(|b| String::from_utf8(b).unwrap())
    }

    fn is_root() -> bool {
        // SAFETY: geteuid cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            eprintln!("skipped: needs root");
        }
        root
    }

    #[test]
    fn upper_overrides_lower() {
        let d = tempdir();
        let l = layers(d.path(), 3);
        write(&l[2], "etc/passwd", "bottom");
        write(&l[2], "etc/group", "bottom group");
        write(&l[1], "etc/passwd", "middle");
        assert_eq!(read(&l, "/etc/passwd").as_deref(), Some("middle"));
        assert_eq!(
            read(&l, "/etc/group").as_deref(),
            Some("bottom group"),
            "directories merge"
        );
        assert_eq!(
            read(&l, "etc/passwd").as_deref(),
            Some("middle"),
            "relative means from the root"
        );
        assert_eq!(read(&l, "/etc/./../etc//passwd").as_deref(), Some("middle"));
        write(&l[0], "etc/passwd", "upper");
        assert_eq!(read(&l, "/etc/passwd").as_deref(), Some("upper"));
        assert_eq!(read(&l, "/etc/shadow"), None);
        assert_eq!(read(&l, "/nonexistent/passwd"), None);
        assert_eq!(read(&[], "/etc/passwd"), None);
    }

    #[test]
    fn whiteout_hides() {
        if !is_root() {
            return;
        }
        let d = tempdir();
        let l = layers(d.path(), 3);
        write(&l[2], "etc/passwd", "bottom");
        write(&l[2], "etc/group", "bottom group");
        whiteout(&l[1], "etc/passwd");
        assert_eq!(read(&l, "/etc/passwd"), None);
        write(&l[0], "etc/passwd", "recreated");
        assert_eq!(
            read(&l, "/etc/passwd").as_deref(),
            Some("recreated"),
            "above a whiteout counts"
        );
        // A whiteout of a whole directory hides everything below it.
        whiteout(&l[1], "etc2");
        write(&l[2], "etc2/passwd", "x");
        assert_eq!(read(&l, "/etc2/passwd"), None);
        // A whiteout in the top layer of a name that only a lower one has.
        whiteout(&l[0], "etc/group");
        assert_eq!(read(&l, "/etc/group"), None);
    }

    #[test]
    fn opaque_dir_hides_lower_children() {
        if !is_root() {
            return;
        }
        let d = tempdir();
        let l = layers(d.path(), 3);
        write(&l[2], "etc/passwd", "bottom");
        write(&l[2], "etc/group", "bottom group");
        write(&l[1], "etc/group", "middle group");
        opaque(&l[1], "etc");
        assert_eq!(read(&l, "/etc/passwd"), None);
        assert_eq!(read(&l, "/etc/group").as_deref(), Some("middle group"));
        // A plain directory above the opaque one still merges with it.
        write(&l[0], "etc/hostname", "top");
        assert_eq!(read(&l, "/etc/group").as_deref(), Some("middle group"));
        assert_eq!(read(&l, "/etc/passwd"), None);
        // A file over a lower directory hides its contents too.
        write(&l[0], "var", "a file");
        write(&l[2], "var/passwd", "below");
        assert_eq!(
            read_merged(&l, "/var/passwd").unwrap_err().raw_os_error(),
            Some(libc::ENOTDIR)
        );
    }

    #[test]
    fn relative_symlinked_etc_resolves_inside_the_layer_root() {
        let d = tempdir();
        let l = layers(d.path(), 2);
        write(&l[1], "private/etc/passwd", "private");
        symlink("private/etc", l[0].join("etc")).unwrap();
        assert_eq!(
            read(&l, "/etc/passwd").as_deref(),
            Some("private"),
            "link in one layer, target in another"
        );
        // `..` in a target cannot climb above the merged root.
        std::fs::remove_file(l[0].join("etc")).unwrap();
        symlink("../../../../../../private/etc", l[0].join("etc")).unwrap();
        assert_eq!(read(&l, "/etc/passwd").as_deref(), Some("private"));
        // A link to a link.
        std::fs::remove_file(l[0].join("etc")).unwrap();
        symlink("/alias", l[0].join("etc")).unwrap();
        symlink("private/./etc/", l[1].join("alias")).unwrap();
        assert_eq!(read(&l, "/etc/passwd").as_deref(), Some("private"));
    }

    #[test]
    fn absolute_symlink_resolves_inside_the_root_not_the_host() {
        let d = tempdir();
        let l = layers(d.path(), 2);
        write(&l[1], "etc/passwd", "image passwd");
        write(&l[1], "etc/real-group", "image group");
        symlink("/etc/passwd", l[0].join("pw")).unwrap();
        assert_eq!(read(&l, "/pw").as_deref(), Some("image passwd"));
        // The host has an /etc/hostname; the image does not.
        symlink("/etc/hostname", l[0].join("hn")).unwrap();
        assert_eq!(read(&l, "/hn"), None);
        std::fs::create_dir_all(l[0].join("etc")).unwrap();
        symlink("../etc/real-group", l[0].join("etc/group")).unwrap();
        assert_eq!(read(&l, "/etc/group").as_deref(), Some("image group"));
        // The host's / through a symlinked directory in the middle of the path.
        symlink("/", l[0].join("up")).unwrap();
        assert_eq!(
            read(&l, "/up/up/etc/passwd").as_deref(),
            Some("image passwd")
        );
    }

    #[test]
    fn too_many_hops_is_eloop() {
        let d = tempdir();
        let l = layers(d.path(), 1);
        symlink("b", l[0].join("a")).unwrap();
        symlink("a", l[0].join("b")).unwrap();
        assert_eq!(
            read_merged(&l, "/a").unwrap_err().raw_os_error(),
            Some(libc::ELOOP)
        );
        // A chain of exactly 40 is fine, 41 is not.
        write(&l[0], "target", "end");
        for i in 0..40 {
            let next = if i == 39 {
                "target".to_string()
            } else {
                format!("c{}", i + 1)
            };
            symlink(next, l[0].join(format!("c{i}"))).unwrap();
        }
        assert_eq!(read(&l, "/c0").as_deref(), Some("end"));
        symlink("c0", l[0].join("c-1")).unwrap();
        assert_eq!(
            read_merged(&l, "/c-1").unwrap_err().raw_os_error(),
            Some(libc::ELOOP)
        );
    }

    #[test]
    fn directories_and_special_files_are_errors() {
        let d = tempdir();
        let l = layers(d.path(), 1);
        write(&l[0], "etc/passwd", "x");
        assert_eq!(
            read_merged(&l, "/etc").unwrap_err().raw_os_error(),
            Some(libc::EISDIR)
        );
        assert_eq!(
            read_merged(&l, "/").unwrap_err().raw_os_error(),
            Some(libc::EISDIR)
        );
        assert_eq!(
            read_merged(&l, "/etc/passwd/x").unwrap_err().raw_os_error(),
            Some(libc::ENOTDIR)
        );
        rustix::fs::mknodat(
            rustix::fs::CWD,
            l[0].join("etc/group"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert_eq!(
            read_merged(&l, "/etc/group").unwrap_err().kind(),
            io::ErrorKind::InvalidData,
            "a FIFO is not read (it would block)"
        );
    }

    #[test]
    fn resolves_from_a_merged_image() {
        let d = tempdir();
        let l = layers(d.path(), 2);
        write(&l[1], "etc/passwd", PASSWD);
        write(&l[1], "etc/group", GROUP);
        let passwd = read_merged(&l, "/etc/passwd").unwrap().unwrap();
        let group = read_merged(&l, "/etc/group").unwrap().unwrap();
        let passwd = String::from_utf8_lossy(&passwd);
        let group = String::from_utf8_lossy(&group);
        assert_eq!(
            resolve(Some("app"), Some(&passwd), Some(&group)).unwrap(),
            user(1000, 1000, &[10, 50, 44], "/home/app")
        );
    }
}
