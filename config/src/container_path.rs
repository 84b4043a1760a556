//! The rules for a path inside a container that the host file or an image names: a working
//! directory, a mount target, a program. The same rules for both, since an image is as
//! hostile as any input: such a path is resolved by Keel while it still holds host
//! resources (before pivot_root, or with PID 1's descriptors around), so it must not climb
//! (`..`) or lead into a kernel view of Keel's own process (`/proc/self/fd/N`, `/dev/fd`:
//! CVE-2024-21626 reached the host through exactly such a working directory).

use std::fmt;

/// Paths that are kernel views of the process resolving them, not the container's files.
const KERNEL_VIEWS: &[&str] = &[
    "/proc",
    "/dev/fd",
    "/dev/stdin",
    "/dev/stdout",
    "/dev/stderr",
];

/// PATH_MAX: longer paths cannot be resolved in one call anyway.
const MAX_LEN: usize = 4095;

/// What a path is used for: the rules differ only in what is allowed at the edges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathUse {
    /// A working directory: absolute, `/` allowed.
    WorkingDir,
    /// Where a volume or tmpfs is mounted: absolute, not `/` itself.
    MountTarget,
    /// A program to run: a bare name is looked up in PATH and a relative path
    /// (`./run`) is taken from the working directory; either way no `..` and no kernel view.
    Program,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathProblem {
    NotAbsolute,
    IsRoot,
    Climbs,
    KernelView(&'static str),
    TooLong,
    Nul,
}

impl fmt::Display for PathProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathProblem::NotAbsolute => f.write_str("it must be an absolute path"),
            PathProblem::IsRoot => f.write_str("it must not be `/` itself"),
            PathProblem::Climbs => f.write_str("it must not contain `..`"),
            PathProblem::KernelView(view) => write!(
                f,
                "it must not lead into {view} (a kernel view of the process resolving it, \
                 not the container's files)"
            ),
            PathProblem::TooLong => write!(f, "it is longer than {MAX_LEN} bytes"),
            PathProblem::Nul => f.write_str("it contains a NUL byte"),
        }
    }
}

/// Checks `path` for `usage`.
pub fn check(path: &str, usage: PathUse) -> Result<(), PathProblem> {
    if path.len() > MAX_LEN {
        return Err(PathProblem::TooLong);
    }
    if path.contains('\0') {
        return Err(PathProblem::Nul);
    }
    let absolute = path.starts_with('/');
    match usage {
        PathUse::WorkingDir | PathUse::MountTarget if !absolute => {
            return Err(PathProblem::NotAbsolute);
        }
        // A bare program name is looked up in PATH, which the checks below do not concern.
        PathUse::Program if !path.contains('/') => return Ok(()),
        _ => {}
    }
    let components: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if components.contains(&"..") {
        return Err(PathProblem::Climbs);
    }
    if usage == PathUse::MountTarget && components.is_empty() {
        return Err(PathProblem::IsRoot);
    }
    if absolute {
        // Compared component-wise, so that `//proc/./self` is caught and `/process` is not.
        let normal = format!("/{}", components.join("/"));
        if let Some(view) = KERNEL_VIEWS
            .iter()
            .find(|v| normal == **v || normal.starts_with(&format!("{v}/")))
        {
            return Err(PathProblem::KernelView(view));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn working_directories() {
        let ok = |p: &str| check(p, PathUse::WorkingDir);
        assert_eq!(ok("/"), Ok(()));
        assert_eq!(ok("/srv/app"), Ok(()));
        assert_eq!(ok("/process"), Ok(()), "only whole components count");
        assert_eq!(ok("srv"), Err(PathProblem::NotAbsolute));
        assert_eq!(ok("/srv/../.."), Err(PathProblem::Climbs));
        assert_eq!(ok("/proc/self/fd/7"), Err(PathProblem::KernelView("/proc")));
        assert_eq!(
            ok("//proc/./self/cwd"),
            Err(PathProblem::KernelView("/proc"))
        );
        assert_eq!(ok("/dev/fd/3"), Err(PathProblem::KernelView("/dev/fd")));
        assert_eq!(
            ok(&format!("/{}", "a".repeat(5000))),
            Err(PathProblem::TooLong)
        );
    }

    #[test]
    fn mount_targets() {
        let ok = |p: &str| check(p, PathUse::MountTarget);
        assert_eq!(ok("/var/lib/db"), Ok(()));
        assert_eq!(ok("/"), Err(PathProblem::IsRoot));
        assert_eq!(ok("//./"), Err(PathProblem::IsRoot));
        assert_eq!(ok("/../../etc"), Err(PathProblem::Climbs));
        assert_eq!(ok("/proc"), Err(PathProblem::KernelView("/proc")));
        assert_eq!(ok("data"), Err(PathProblem::NotAbsolute));
    }

    #[test]
    fn programs() {
        let ok = |p: &str| check(p, PathUse::Program);
        assert_eq!(ok("httpd"), Ok(()));
        assert_eq!(ok("./run"), Ok(()));
        assert_eq!(ok("/usr/bin/env"), Ok(()));
        assert_eq!(ok("../../bin/sh"), Err(PathProblem::Climbs));
        assert_eq!(ok("/proc/self/fd/5/../sh"), Err(PathProblem::Climbs));
        assert_eq!(ok("/proc/self/exe"), Err(PathProblem::KernelView("/proc")));
        assert_eq!(ok("/dev/fd/4"), Err(PathProblem::KernelView("/dev/fd")));
    }
}
