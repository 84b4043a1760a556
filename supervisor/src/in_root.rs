//! Paths of the container setup resolved inside the container's root, for the clone3 child
//! (crate::spawn) before pivot_root: `openat2(RESOLVE_IN_ROOT)` and `/proc/self/fd/N`
//! names, so that no symlink in the container's files or in a volume it shares, even one
//! swapped in after any check, leads a mount, mkdir or mknod onto the host (the runc
//! CVE-2021-30465 class). Async-signal-safe: raw system calls and stack buffers only.

use std::ffi::{CStr, c_char};

/// A path for a step in the child, resolved safely: either the path itself (a host path, or
/// any path after pivot_root), or an fd opened with `openat2(RESOLVE_IN_ROOT)` under the
/// container's root and named `/proc/self/fd/N` for calls that take a path (mount(2) follows
/// that magic link to exactly the opened file, whatever is swapped in at the path later).
/// Async-signal-safe: raw system calls and a stack buffer; the fd closes on drop.
pub(crate) struct InRootPath<'a> {
    fd: libc::c_int,
    /// `/proc/self/fd/N` and its NUL, or unused when `fd` is -1.
    proc_path: [u8; 32],
    plain: &'a CStr,
}

/// `struct open_how` (linux/openat2.h).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}
const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_IN_ROOT: u64 = 0x10;

impl<'a> InRootPath<'a> {
    /// `path` relative to `root` if it is strictly under it.
    fn relative(root: Option<&CStr>, path: &'a CStr) -> Option<&'a [u8]> {
        let root = root?.to_bytes();
        let bytes = path.to_bytes();
        let rest = bytes.strip_prefix(root)?;
        let rel = rest.strip_prefix(b"/")?;
        (!rel.is_empty()).then_some(rel)
    }

    /// Opens `path` (with `flags`, O_CLOEXEC added) inside `root` when it is under it.
    ///
    /// # Safety
    /// Only in the cloned child: raw system calls on the given strings.
    pub(crate) unsafe fn open(
        root: Option<&CStr>,
        path: &'a CStr,
        flags: libc::c_int,
    ) -> Option<Self> {
        // SAFETY: forwarded to the caller.
        unsafe { Self::open_mode(root, path, flags, 0) }
    }

    /// # Safety
    /// As [`InRootPath::open`].
    pub(crate) unsafe fn open_mode(
        root: Option<&CStr>,
        path: &'a CStr,
        flags: libc::c_int,
        mode: u64,
    ) -> Option<Self> {
        let mut out = InRootPath {
            fd: -1,
            proc_path: [0; 32],
            plain: path,
        };
        let (Some(root), Some(_)) = (root, Self::relative(root, path)) else {
            if flags & libc::O_CREAT != 0 {
                // SAFETY: path is NUL-terminated; the fd is closed on drop.
                out.fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC, mode) };
                return (out.fd >= 0).then_some(out);
            }
            return Some(out);
        };
        let root_len = root.to_bytes().len() + 1;
        // SAFETY: the relative part starts inside `path`'s bytes, which stay NUL-terminated.
        let rel = unsafe { path.as_ptr().add(root_len) };
        // SAFETY: see the callee; root is NUL-terminated.
        out.fd = unsafe { open_in_root(root, rel, flags, mode) };
        if out.fd < 0 {
            return None;
        }
        out.proc_path = proc_fd_path(out.fd);
        Some(out)
    }

    /// The parent directory of `path` (opened inside `root` when under it) and the last
    /// component, for the *at calls.
    ///
    /// # Safety
    /// As [`InRootPath::open`].
    pub(crate) unsafe fn parent(
        root: Option<&CStr>,
        path: &'a CStr,
    ) -> Option<(Self, *const c_char)> {
        let bytes = path.to_bytes_with_nul();
        let slash = bytes.iter().rposition(|b| *b == b'/')?;
        // SAFETY: slash + 1 is within the string (at most its NUL).
        let name = unsafe { path.as_ptr().add(slash + 1) };
        let mut dir = InRootPath {
            fd: libc::AT_FDCWD,
            proc_path: [0; 32],
            plain: path,
        };
        if Self::relative(root, path).is_some() {
            let root = root?;
            let root_len = root.to_bytes().len() + 1;
            // The parent relative to the root: copied to the stack with its own NUL.
            let mut parent = [0u8; 4096];
            let rel = &bytes[root_len..slash.max(root_len)];
            if rel.len() >= parent.len() {
                // SAFETY: only sets this thread's errno.
                unsafe { *libc::__errno_location() = libc::ENAMETOOLONG };
                return None;
            }
            parent[..rel.len()].copy_from_slice(rel);
            let parent_ptr: *const c_char = if rel.is_empty() {
                c".".as_ptr()
            } else {
                parent.as_ptr().cast()
            };
            // SAFETY: root and parent are NUL-terminated.
            dir.fd = unsafe { open_in_root(root, parent_ptr, libc::O_PATH | libc::O_DIRECTORY, 0) };
            if dir.fd < 0 {
                return None;
            }
        } else if slash > 0 {
            // A host path: the parent by path, as before pivot_root is of no concern here.
            let mut parent = [0u8; 4096];
            if slash >= parent.len() {
                // SAFETY: only sets this thread's errno.
                unsafe { *libc::__errno_location() = libc::ENAMETOOLONG };
                return None;
            }
            parent[..slash].copy_from_slice(&bytes[..slash]);
            // SAFETY: parent is NUL-terminated.
            dir.fd = unsafe {
                libc::open(
                    parent.as_ptr().cast(),
                    libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
                )
            };
            if dir.fd < 0 {
                return None;
            }
        } else {
            // "/name": the root directory.
            // SAFETY: a constant path.
            dir.fd = unsafe {
                libc::open(
                    c"/".as_ptr(),
                    libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
                )
            };
            if dir.fd < 0 {
                return None;
            }
        }
        Some((dir, name))
    }

    /// What to hand a call that takes a path.
    pub(crate) fn path(&self) -> *const c_char {
        if self.fd >= 0 {
            self.proc_path.as_ptr().cast()
        } else {
            self.plain.as_ptr()
        }
    }

    pub(crate) fn dirfd(&self) -> libc::c_int {
        self.fd
    }
}

impl Drop for InRootPath<'_> {
    fn drop(&mut self) {
        if self.fd >= 0 {
            // SAFETY: the fd was opened by us and is closed once.
            unsafe { libc::close(self.fd) };
        }
    }
}

/// openat2(root, rel, {flags | O_CLOEXEC, mode, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS}):
/// `..` and absolute symlinks stop at `root`, and /proc magic links are refused.
///
/// # Safety
/// `root` and `rel` must be NUL-terminated strings.
unsafe fn open_in_root(
    root: &CStr,
    rel: *const c_char,
    flags: libc::c_int,
    mode: u64,
) -> libc::c_int {
    // SAFETY: root is NUL-terminated.
    let root_fd = unsafe {
        libc::open(
            root.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if root_fd < 0 {
        return -1;
    }
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode,
        resolve: RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: how is a valid open_how of the size given; rel is NUL-terminated.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root_fd,
            rel,
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    // SAFETY: close keeps errno only if it fails, which it cannot for our own O_PATH fd.
    let saved = unsafe { *libc::__errno_location() };
    // SAFETY: root_fd is ours.
    unsafe { libc::close(root_fd) };
    // SAFETY: restores this thread's errno for the caller's report.
    unsafe { *libc::__errno_location() = saved };
    fd as libc::c_int
}

/// `/proc/self/fd/N` with its NUL, written without allocating.
fn proc_fd_path(fd: libc::c_int) -> [u8; 32] {
    let mut out = [0u8; 32];
    let prefix = b"/proc/self/fd/";
    out[..prefix.len()].copy_from_slice(prefix);
    let mut digits = [0u8; 10];
    let mut n = fd.max(0) as u32;
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        out[prefix.len() + i] = digits[len - 1 - i];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_fd_paths_are_written_without_allocating() {
        let text = |fd| {
            let buf = proc_fd_path(fd);
            let end = buf.iter().position(|b| *b == 0).unwrap();
            String::from_utf8(buf[..end].to_vec()).unwrap()
        };
        assert_eq!(text(0), "/proc/self/fd/0");
        assert_eq!(text(7), "/proc/self/fd/7");
        assert_eq!(text(1048575), "/proc/self/fd/1048575");
        assert_eq!(text(i32::MAX), "/proc/self/fd/2147483647");
    }

    #[test]
    fn only_paths_strictly_under_the_root_resolve_inside_it() {
        let root = c"/run/keel/containers/web/rootfs";
        let rel = |p: &'static CStr| InRootPath::relative(Some(root), p);
        assert_eq!(
            rel(c"/run/keel/containers/web/rootfs/dev/null"),
            Some(&b"dev/null"[..])
        );
        assert_eq!(
            rel(c"/run/keel/containers/web/rootfs"),
            None,
            "the root itself"
        );
        assert_eq!(rel(c"/run/keel/containers/web/rootfs2/x"), None);
        assert_eq!(rel(c"/dev/null"), None);
        assert_eq!(
            InRootPath::relative(None, c"/run/keel/containers/web/rootfs/x"),
            None
        );
    }
}
