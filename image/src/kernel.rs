//! Fetching Debian's kernel package, cached.
//!
//! `linux-image-amd64` is a metapackage; apt resolves it to the real package
//! (`linux-image-<abi>-amd64`), which is downloaded with `apt-get download` into
//! `<cache>/debs/` and unpacked with `dpkg-deb -x` into `<cache>/<package>_<version>/`.
//! Unpacking goes to a temporary directory that is renamed into place only once complete,
//! together with a small marker file recording the deb it came from, so an interrupted
//! unpack is never trusted. When apt cannot resolve the metapackage (offline, no package
//! lists), the newest complete cached unpack is used instead.
//!
//! Setting `KEEL_KERNEL_DEB=/path/to/linux-image-*.deb` uses that file instead of apt.

use std::cmp::Ordering;
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::digest::sha256_file;

/// The environment variable naming a kernel `.deb` to use instead of downloading one.
pub const KERNEL_DEB_ENV: &str = "KEEL_KERNEL_DEB";
/// The Debian metapackage that depends on the current kernel image package.
pub const METAPACKAGE: &str = "linux-image-amd64";

const MARKER: &str = ".keel-kernel";
const HINT: &str = "run `apt-get update` (and check access to the Debian archive), \
                    or set KEEL_KERNEL_DEB=/path/to/linux-image-*.deb";

/// An unpacked Debian kernel package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// Kernel release, e.g. `6.1.0-56-amd64` (the `lib/modules/` directory name).
    pub version: String,
    /// File name of the `.deb` it came from.
    pub package: String,
    /// Debian package version, e.g. `6.1.192-2`.
    pub package_version: String,
    /// The kernel image.
    pub vmlinuz: PathBuf,
    /// `.../lib/modules/<version>`.
    pub modules_dir: PathBuf,
    /// SHA-256 (hex) of the `.deb`.
    pub deb_sha256: String,
}

/// Errors from [`fetch_kernel`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KernelError {
    /// An I/O operation failed; `context` says on what.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A required host tool is not installed.
    #[error(
        "`{tool}` not found: install it (apt/dpkg are needed to fetch the kernel), or set KEEL_KERNEL_DEB=/path/to/linux-image-*.deb"
    )]
    ToolMissing {
        /// The missing program.
        tool: String,
    },
    /// A host tool failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// apt could not tell which package is the kernel, and nothing usable is cached.
    #[error("cannot resolve {METAPACKAGE} to a kernel package ({reason}); {HINT}")]
    Resolve {
        /// What went wrong.
        reason: String,
    },
    /// `apt-get download` failed.
    #[error("downloading {package} failed: {detail}; {HINT}")]
    Download {
        /// The package being downloaded.
        package: String,
        /// What went wrong.
        detail: String,
    },
    /// A downloaded or cached deb does not match the archive's checksum.
    #[error("{path}: SHA-256 {actual} does not match the archive's {expected}")]
    ChecksumMismatch {
        /// The deb.
        path: PathBuf,
        /// The checksum apt knows.
        expected: String,
        /// The checksum of the file.
        actual: String,
    },
    /// The package does not look like a kernel image package.
    #[error("{path}: not a usable kernel package: {reason}")]
    BadPackage {
        /// The deb or unpack directory.
        path: PathBuf,
        /// What is missing.
        reason: String,
    },
}

fn io_err(context: impl Into<String>, source: io::Error) -> KernelError {
    KernelError::Io {
        context: context.into(),
        source,
    }
}

/// Returns the Debian kernel, unpacked under `cache_dir`, downloading it if needed.
///
/// See the [module docs](self) for the cache layout and the offline behaviour.
pub fn fetch_kernel(cache_dir: &Path) -> Result<Kernel, KernelError> {
    let override_deb = std::env::var_os(KERNEL_DEB_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    // Several `keel build`s may start on a cold cache at once (the tests do): one downloads
    // and unpacks, the others wait and then find it cached.
    fs::create_dir_all(cache_dir)
        .map_err(|e| io_err(format!("creating {}", cache_dir.display()), e))?;
    let lock_path = cache_dir.join(".lock");
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| io_err(format!("opening {}", lock_path.display()), e))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| io_err(format!("locking {}", lock_path.display()), e.into()))?;
    let kernel = fetch_with(cache_dir, override_deb.as_deref(), &Apt);
    drop(lock);
    kernel
}

/// What [`fetch_with`] needs from the package manager; a trait so tests can run the whole
/// cache logic without network access.
trait PackageSource {
    /// The concrete package a metapackage depends on.
    fn resolve(&self, metapackage: &str) -> Result<String, KernelError>;
    /// The candidate version of a package.
    fn show(&self, package: &str) -> Result<PackageInfo, KernelError>;
    /// Downloads `package=version` into `dir`.
    fn download(&self, package: &str, version: &str, dir: &Path) -> Result<(), KernelError>;
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct PackageInfo {
    version: String,
    /// Basename of the archive's `Filename:`, which is what `apt-get download` writes.
    filename: String,
    sha256: Option<String>,
}

struct Apt;

fn run(cmd: &mut Command) -> Result<String, KernelError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let command = std::iter::once(program.clone())
        .chain(cmd.get_args().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    let out = cmd.output().map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            KernelError::ToolMissing { tool: program }
        } else {
            io_err(format!("running {command}"), e)
        }
    })?;
    if !out.status.success() {
        return Err(KernelError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl PackageSource for Apt {
    fn resolve(&self, metapackage: &str) -> Result<String, KernelError> {
        let out = run(Command::new("apt-cache").args(["depends", metapackage]))?;
        parse_depends(&out).ok_or_else(|| KernelError::Resolve {
            reason: format!("`apt-cache depends {metapackage}` lists no linux-image dependency"),
        })
    }

    fn show(&self, package: &str) -> Result<PackageInfo, KernelError> {
        let out = run(Command::new("apt-cache").args(["show", "--no-all-versions", package]))?;
        parse_show(&out).ok_or_else(|| KernelError::Resolve {
            reason: format!("`apt-cache show {package}` gave no Version/Filename"),
        })
    }

    fn download(&self, package: &str, version: &str, dir: &Path) -> Result<(), KernelError> {
        // apt warns "Download is performed unsandboxed as root" when the _apt user cannot
        // write to `dir`; that is harmless, so only the exit status counts.
        run(Command::new("apt-get")
            .args(["download", "-q", &format!("{package}={version}")])
            .current_dir(dir))
        .map(|_| ())
        .map_err(|e| match e {
            KernelError::Command { stderr, .. } => KernelError::Download {
                package: package.to_owned(),
                detail: stderr,
            },
            other => other,
        })
    }
}

/// The first real `linux-image-*` dependency in `apt-cache depends` output.
fn parse_depends(out: &str) -> Option<String> {
    out.lines().find_map(|l| {
        let l = l.trim().trim_start_matches('|');
        let pkg = l.strip_prefix("Depends:")?.trim();
        (pkg.starts_with("linux-image-") && !pkg.starts_with('<')).then(|| pkg.to_owned())
    })
}

/// Version, file name and checksum from the first record of `apt-cache show`.
fn parse_show(out: &str) -> Option<PackageInfo> {
    let record = out.split("\n\n").next()?;
    let field = |name: &str| {
        record.lines().find_map(|l| {
            l.strip_prefix(name)
                .and_then(|r| r.strip_prefix(':'))
                .map(|v| v.trim().to_owned())
        })
    };
    let filename = field("Filename")?;
    let filename = filename.rsplit('/').next()?.to_owned();
    Some(PackageInfo {
        version: field("Version")?,
        filename,
        sha256: field("SHA256"),
    })
}

fn fetch_with(
    cache_dir: &Path,
    override_deb: Option<&Path>,
    source: &dyn PackageSource,
) -> Result<Kernel, KernelError> {
    fs::create_dir_all(cache_dir)
        .map_err(|e| io_err(format!("creating {}", cache_dir.display()), e))?;
    if let Some(deb) = override_deb {
        return from_local_deb(cache_dir, deb);
    }

    let resolved = source
        .resolve(METAPACKAGE)
        .and_then(|pkg| source.show(&pkg).map(|info| (pkg, info)));
    let (package, info) = match resolved {
        Ok(r) => r,
        Err(e) => {
            // Offline: any complete unpack beats failing.
            return match newest_cached(cache_dir)? {
                Some(k) => Ok(k),
                None => Err(e),
            };
        }
    };

    let unpack_dir = cache_dir.join(format!("{package}_{}", info.version));
    if let Some(k) = load_cached(&unpack_dir)? {
        return Ok(k);
    }

    let debs = cache_dir.join("debs");
    fs::create_dir_all(&debs).map_err(|e| io_err(format!("creating {}", debs.display()), e))?;
    let deb = debs.join(&info.filename);
    let have = deb.is_file() && matches_checksum(&deb, info.sha256.as_deref())?;
    if !have {
        if let Err(e) = source.download(&package, &info.version, &debs) {
            // apt-cache answers from its local lists even offline, so a failed download
            // is the usual offline symptom: an older complete unpack beats failing.
            return match newest_cached(cache_dir)? {
                Some(k) => Ok(k),
                None => Err(e),
            };
        }
        if !deb.is_file() {
            return Err(KernelError::Download {
                package,
                detail: format!("apt-get reported success but {} is missing", deb.display()),
            });
        }
        if let Some(expected) = &info.sha256 {
            let actual =
                sha256_file(&deb).map_err(|e| io_err(format!("hashing {}", deb.display()), e))?;
            if &actual != expected {
                // Never leave a bad deb where the next run would find it.
                let _ = fs::remove_file(&deb);
                return Err(KernelError::ChecksumMismatch {
                    path: deb,
                    expected: expected.clone(),
                    actual,
                });
            }
        }
    }
    unpack(cache_dir, &deb, &unpack_dir, &info.version)
}

fn matches_checksum(deb: &Path, expected: Option<&str>) -> Result<bool, KernelError> {
    match expected {
        None => Ok(true),
        Some(expected) => Ok(sha256_file(deb)
            .map_err(|e| io_err(format!("hashing {}", deb.display()), e))?
            == expected),
    }
}

fn from_local_deb(cache_dir: &Path, deb: &Path) -> Result<Kernel, KernelError> {
    if !deb.is_file() {
        return Err(KernelError::BadPackage {
            path: deb.to_owned(),
            reason: format!("no such file (from {KERNEL_DEB_ENV})"),
        });
    }
    let fields = run(Command::new("dpkg-deb")
        .arg("-f")
        .arg(deb)
        .args(["Package", "Version"]))?;
    let field = |name: &str| {
        fields.lines().find_map(|l| {
            l.strip_prefix(name)
                .and_then(|r| r.strip_prefix(':'))
                .map(|v| v.trim().to_owned())
        })
    };
    let (Some(package), Some(version)) = (field("Package"), field("Version")) else {
        return Err(KernelError::BadPackage {
            path: deb.to_owned(),
            reason: "no Package/Version in its control file".into(),
        });
    };
    let unpack_dir = cache_dir.join(format!("{package}_{version}"));
    let sha = sha256_file(deb).map_err(|e| io_err(format!("hashing {}", deb.display()), e))?;
    if let Some(k) = load_cached(&unpack_dir)? {
        if k.deb_sha256 == sha {
            return Ok(k);
        }
        // Same name and version but different bytes (a rebuilt deb): the deb wins.
        fs::remove_dir_all(&unpack_dir)
            .map_err(|e| io_err(format!("removing {}", unpack_dir.display()), e))?;
    }
    unpack(cache_dir, deb, &unpack_dir, &version)
}

/// Unpacks `deb` into `unpack_dir` through a temporary directory.
fn unpack(
    cache_dir: &Path,
    deb: &Path,
    unpack_dir: &Path,
    version: &str,
) -> Result<Kernel, KernelError> {
    let name = unpack_dir
        .file_name()
        .map(OsStr::to_string_lossy)
        .unwrap_or_default()
        .into_owned();
    let tmp = cache_dir.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| io_err(format!("removing {}", tmp.display()), e))?;
    }
    fs::create_dir(&tmp).map_err(|e| io_err(format!("creating {}", tmp.display()), e))?;
    let result = (|| {
        run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&tmp))?;
        // Validate before committing, so a non-kernel deb never lands in the cache.
        locate(&tmp)?;
        let sha = sha256_file(deb).map_err(|e| io_err(format!("hashing {}", deb.display()), e))?;
        let package = deb
            .file_name()
            .map(OsStr::to_string_lossy)
            .unwrap_or_default()
            .into_owned();
        let marker = format!("package={package}\npackage_version={version}\ndeb_sha256={sha}\n");
        fs::write(tmp.join(MARKER), marker)
            .map_err(|e| io_err(format!("writing marker in {}", tmp.display()), e))?;
        if unpack_dir.exists() {
            fs::remove_dir_all(unpack_dir)
                .map_err(|e| io_err(format!("removing {}", unpack_dir.display()), e))?;
        }
        fs::rename(&tmp, unpack_dir).map_err(|e| {
            io_err(
                format!("renaming {} to {}", tmp.display(), unpack_dir.display()),
                e,
            )
        })
    })();
    if let Err(e) = result {
        // Best effort; the next run removes a leftover tmp dir of the same name anyway.
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    load_cached(unpack_dir)?.ok_or_else(|| KernelError::BadPackage {
        path: unpack_dir.to_owned(),
        reason: "unpack vanished".into(),
    })
}

/// Finds `(version, vmlinuz, modules_dir)` in an unpacked kernel package.
fn locate(root: &Path) -> Result<(String, PathBuf, PathBuf), KernelError> {
    let bad = |reason: String| KernelError::BadPackage {
        path: root.to_owned(),
        reason,
    };
    // Debian 12 ships /lib/modules; merged-/usr releases ship /usr/lib/modules.
    let base = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|p| root.join(p))
        .find(|p| p.is_dir())
        .ok_or_else(|| bad("no lib/modules directory".into()))?;
    let mut versions = Vec::new();
    for e in fs::read_dir(&base).map_err(|e| io_err(format!("reading {}", base.display()), e))? {
        let e = e.map_err(|e| io_err(format!("reading {}", base.display()), e))?;
        if e.path().is_dir() {
            versions.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    let version = match versions.as_slice() {
        [one] => one.clone(),
        other => {
            return Err(bad(format!(
                "expected one kernel under {}, found {other:?}",
                base.display()
            )));
        }
    };
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{version}"));
    if !vmlinuz.is_file() {
        return Err(bad(format!("no boot/vmlinuz-{version}")));
    }
    let modules_dir = base.join(&version);
    Ok((version, vmlinuz, modules_dir))
}

/// Loads a complete unpack; `None` if the directory or its marker is missing.
fn load_cached(dir: &Path) -> Result<Option<Kernel>, KernelError> {
    let marker = match fs::read_to_string(dir.join(MARKER)) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(format!("reading {}", dir.join(MARKER).display()), e)),
    };
    let get = |key: &str| {
        marker
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_owned)
    };
    let (Some(package), Some(package_version), Some(deb_sha256)) =
        (get("package"), get("package_version"), get("deb_sha256"))
    else {
        return Ok(None);
    };
    let (version, vmlinuz, modules_dir) = locate(dir)?;
    Ok(Some(Kernel {
        version,
        package,
        package_version,
        vmlinuz,
        modules_dir,
        deb_sha256,
    }))
}

/// The complete cached unpack with the highest Debian package version.
fn newest_cached(cache_dir: &Path) -> Result<Option<Kernel>, KernelError> {
    let mut best: Option<Kernel> = None;
    let entries = match fs::read_dir(cache_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(format!("reading {}", cache_dir.display()), e)),
    };
    for e in entries {
        let e = e.map_err(|e| io_err(format!("reading {}", cache_dir.display()), e))?;
        let name = e.file_name();
        if !name.to_string_lossy().starts_with("linux-image-") {
            continue;
        }
        // A broken cache entry should not hide a good one.
        let Ok(Some(k)) = load_cached(&e.path()) else {
            continue;
        };
        let newer = match &best {
            None => true,
            Some(b) => match compare_versions(&k.package_version, &b.package_version) {
                Ordering::Equal => k.version > b.version,
                o => o == Ordering::Greater,
            },
        };
        if newer {
            best = Some(k);
        }
    }
    Ok(best)
}

/// Compares two Debian package versions (`[epoch:]upstream[-revision]`) like
/// `dpkg --compare-versions`.
fn compare_versions(a: &str, b: &str) -> Ordering {
    fn split(v: &str) -> (u64, &str, &str) {
        let (epoch, rest) = match v.split_once(':') {
            Some((e, r)) if !e.is_empty() && e.bytes().all(|c| c.is_ascii_digit()) => {
                (e.parse().unwrap_or(u64::MAX), r)
            }
            _ => (0, v),
        };
        match rest.rsplit_once('-') {
            Some((up, rev)) => (epoch, up, rev),
            None => (epoch, rest, ""),
        }
    }
    let (ea, ua, ra) = split(a);
    let (eb, ub, rb) = split(b);
    ea.cmp(&eb)
        .then_with(|| verrevcmp(ua.as_bytes(), ub.as_bytes()))
        .then_with(|| verrevcmp(ra.as_bytes(), rb.as_bytes()))
}

/// dpkg's `verrevcmp`: alternating non-digit runs (letters sort before other characters,
/// `~` before everything, even the end) and numeric runs.
fn verrevcmp(a: &[u8], b: &[u8]) -> Ordering {
    fn order(c: u8) -> i32 {
        match c {
            0 => 0,
            c if c.is_ascii_digit() => 0,
            c if c.is_ascii_alphabetic() => i32::from(c),
            b'~' => -1,
            c => i32::from(c) + 256,
        }
    }
    let at = |s: &[u8], i: usize| s.get(i).copied().unwrap_or(0);
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        while (i < a.len() && !a[i].is_ascii_digit()) || (j < b.len() && !b[j].is_ascii_digit()) {
            let (ac, bc) = (order(at(a, i)), order(at(b, j)));
            if ac != bc {
                return ac.cmp(&bc);
            }
            i += 1;
            j += 1;
        }
        while at(a, i) == b'0' {
            i += 1;
        }
        while at(b, j) == b'0' {
            j += 1;
        }
        let mut first_diff = Ordering::Equal;
        while at(a, i).is_ascii_digit() && at(b, j).is_ascii_digit() {
            if first_diff == Ordering::Equal {
                first_diff = at(a, i).cmp(&at(b, j));
            }
            i += 1;
            j += 1;
        }
        if at(a, i).is_ascii_digit() {
            return Ordering::Greater;
        }
        if at(b, j).is_ascii_digit() {
            return Ordering::Less;
        }
        if first_diff != Ordering::Equal {
            return first_diff;
        }
    }
    Ordering::Equal
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// Builds a tiny but real kernel .deb with dpkg-deb.
    fn fake_deb(dir: &Path, abi: &str, version: &str) -> PathBuf {
        let pkg = format!("linux-image-{abi}");
        let root = dir.join(format!("build-{abi}-{version}"));
        fs::create_dir_all(root.join("DEBIAN")).unwrap();
        fs::write(
            root.join("DEBIAN/control"),
            format!("Package: {pkg}\nVersion: {version}\nArchitecture: amd64\nMaintainer: test <t@example.invalid>\nDescription: fake kernel\n"),
        )
        .unwrap();
        fs::create_dir_all(root.join("boot")).unwrap();
        fs::write(root.join(format!("boot/vmlinuz-{abi}")), b"kernel").unwrap();
        let mods = root.join(format!("lib/modules/{abi}/kernel/drivers"));
        fs::create_dir_all(&mods).unwrap();
        fs::write(mods.join("x.ko"), b"module").unwrap();
        let deb = dir.join(format!("{pkg}_{version}_amd64.deb"));
        run(Command::new("dpkg-deb")
            .args(["--build", "-Zgzip"])
            .arg(&root)
            .arg(&deb))
        .unwrap();
        deb
    }

    fn have_dpkg_deb() -> bool {
        Command::new("dpkg-deb").arg("--version").output().is_ok()
    }

    struct FakeApt {
        deb: Option<PathBuf>,
        sha256: Option<String>,
        version: &'static str,
        fail_download: bool,
        downloads: Cell<u32>,
    }

    fn fake(deb: Option<&Path>, sha256: Option<String>) -> FakeApt {
        FakeApt {
            deb: deb.map(Path::to_owned),
            sha256,
            version: "9.9.1-1",
            fail_download: false,
            downloads: Cell::new(0),
        }
    }

    impl PackageSource for FakeApt {
        fn resolve(&self, metapackage: &str) -> Result<String, KernelError> {
            assert_eq!(metapackage, METAPACKAGE);
            match &self.deb {
                Some(_) => Ok("linux-image-9.9.0-1-amd64".into()),
                None => Err(KernelError::Resolve {
                    reason: "offline".into(),
                }),
            }
        }
        fn show(&self, _package: &str) -> Result<PackageInfo, KernelError> {
            Ok(PackageInfo {
                version: self.version.into(),
                filename: format!("linux-image-9.9.0-1-amd64_{}_amd64.deb", self.version),
                sha256: self.sha256.clone(),
            })
        }
        fn download(&self, _package: &str, _version: &str, dir: &Path) -> Result<(), KernelError> {
            self.downloads.set(self.downloads.get() + 1);
            if self.fail_download {
                return Err(KernelError::Download {
                    package: "x".into(),
                    detail: "network unreachable".into(),
                });
            }
            let deb = self.deb.as_ref().unwrap();
            let name = format!("linux-image-9.9.0-1-amd64_{}_amd64.deb", self.version);
            fs::copy(deb, dir.join(name)).unwrap();
            Ok(())
        }
    }

    #[test]
    fn parses_apt_output() {
        let deps = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(
            parse_depends(deps).as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        assert_eq!(parse_depends("linux-image-amd64\n"), None);
        let show = "Package: linux-image-6.1.0-56-amd64\nVersion: 6.1.192-2\nFilename: pool/updates/main/l/linux-signed-amd64/linux-image-6.1.0-56-amd64_6.1.192-2_amd64.deb\nSHA256: abc\n\nPackage: other\nVersion: 1\n";
        assert_eq!(
            parse_show(show),
            Some(PackageInfo {
                version: "6.1.192-2".into(),
                filename: "linux-image-6.1.0-56-amd64_6.1.192-2_amd64.deb".into(),
                sha256: Some("abc".into()),
            })
        );
    }

    #[test]
    fn debian_version_order() {
        use Ordering::*;
        for (a, b, o) in [
            ("6.1.192-2", "6.1.176-1", Greater),
            ("6.1.192-2", "6.1.192-10", Less),
            ("1.0~rc1", "1.0", Less),
            ("1.0", "1.0-0", Equal),
            ("1.0", "1.0-1", Less),
            ("1:0.1", "2.0", Greater),
            ("1.0a", "1.0+", Less),
            ("1.002", "1.2", Equal),
            ("2.30", "2.3", Greater),
        ] {
            assert_eq!(compare_versions(a, b), o, "{a} vs {b}");
            assert_eq!(compare_versions(b, a), o.reverse(), "{b} vs {a}");
        }
    }

    #[test]
    fn downloads_verifies_caches_and_falls_back_offline() {
        if !have_dpkg_deb() {
            eprintln!("dpkg-deb not installed; skipping");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let deb = fake_deb(tmp.path(), "9.9.0-1-amd64", "9.9.1-1");
        let sha = sha256_file(&deb).unwrap();
        let cache = tmp.path().join("cache");

        // A wrong checksum is refused and the bad deb removed.
        let bad = fake(Some(&deb), Some("0".repeat(64)));
        assert!(matches!(
            fetch_with(&cache, None, &bad),
            Err(KernelError::ChecksumMismatch { .. })
        ));
        assert!(!cache.join("debs").join(deb.file_name().unwrap()).exists());

        let apt = fake(Some(&deb), Some(sha.clone()));
        let k = fetch_with(&cache, None, &apt).unwrap();
        assert_eq!(apt.downloads.get(), 1);
        assert_eq!(k.version, "9.9.0-1-amd64");
        assert_eq!(k.package, "linux-image-9.9.0-1-amd64_9.9.1-1_amd64.deb");
        assert_eq!(k.package_version, "9.9.1-1");
        assert_eq!(k.deb_sha256, sha);
        assert_eq!(fs::read(&k.vmlinuz).unwrap(), b"kernel");
        assert!(k.modules_dir.join("kernel/drivers/x.ko").is_file());
        assert!(
            k.modules_dir
                .starts_with(cache.join("linux-image-9.9.0-1-amd64_9.9.1-1"))
        );

        // Second run: cached, no download.
        assert_eq!(fetch_with(&cache, None, &apt).unwrap(), k);
        assert_eq!(apt.downloads.get(), 1);

        // An interrupted unpack (no marker) is not trusted.
        let partial = cache.join("linux-image-9.9.9-1-amd64_99.0-1");
        fs::create_dir_all(partial.join("lib/modules/9.9.9-1-amd64")).unwrap();

        // Offline: the newest complete cached unpack is used.
        let older = fake_deb(tmp.path(), "9.8.0-1-amd64", "9.8.1-1");
        let k_old = fetch_with(&cache, Some(&older), &apt).unwrap();
        assert_eq!(k_old.package_version, "9.8.1-1");
        let offline = fake(None, None);
        assert_eq!(fetch_with(&cache, None, &offline).unwrap(), k);

        // Stale lists offline: a newer version resolves but cannot be downloaded.
        let newer = FakeApt {
            version: "9.9.2-1",
            fail_download: true,
            ..fake(Some(&deb), None)
        };
        assert_eq!(fetch_with(&cache, None, &newer).unwrap(), k);
        assert_eq!(newer.downloads.get(), 1);
        assert!(matches!(
            fetch_with(&tmp.path().join("empty2"), None, &newer),
            Err(KernelError::Download { .. })
        ));

        // Offline with an empty cache: the resolve error, with its hint.
        let err = fetch_with(&tmp.path().join("empty"), None, &offline).unwrap_err();
        assert!(err.to_string().contains("apt-get update"), "{err}");
    }

    #[test]
    fn override_deb_is_unpacked_and_reused() {
        if !have_dpkg_deb() {
            eprintln!("dpkg-deb not installed; skipping");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let deb = fake_deb(tmp.path(), "1.2.3-test", "1.2.3-1");
        let cache = tmp.path().join("cache");
        let offline = fake(None, None);
        let k = fetch_with(&cache, Some(&deb), &offline).unwrap();
        assert_eq!(k.version, "1.2.3-test");
        assert_eq!(k.deb_sha256, sha256_file(&deb).unwrap());
        let again = fetch_with(&cache, Some(&deb), &offline).unwrap();
        assert_eq!(again, k);
        let leftovers: Vec<_> = fs::read_dir(&cache)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
            .collect();
        assert!(leftovers.is_empty());

        assert!(matches!(
            fetch_with(&cache, Some(&tmp.path().join("missing.deb")), &offline),
            Err(KernelError::BadPackage { .. })
        ));

        // A deb that is not a kernel is refused and not cached.
        let dir = tmp.path().join("notkernel");
        fs::create_dir_all(dir.join("DEBIAN")).unwrap();
        fs::write(
            dir.join("DEBIAN/control"),
            "Package: linux-image-bogus\nVersion: 1\nArchitecture: amd64\nMaintainer: t <t@example.invalid>\nDescription: x\n",
        )
        .unwrap();
        let bogus = tmp.path().join("bogus.deb");
        run(Command::new("dpkg-deb")
            .arg("--build")
            .arg(&dir)
            .arg(&bogus))
        .unwrap();
        assert!(matches!(
            fetch_with(&cache, Some(&bogus), &offline),
            Err(KernelError::BadPackage { .. })
        ));
        assert!(!cache.join("linux-image-bogus_1").exists());
    }

    #[test]
    fn real_fetch_when_requested() {
        // Downloads ~70 MB from the Debian archive, so only on request:
        // KEEL_TEST_FETCH_KERNEL=/some/cache/dir cargo test -p keel-image real_fetch
        let Some(cache) = std::env::var_os("KEEL_TEST_FETCH_KERNEL") else {
            eprintln!("KEEL_TEST_FETCH_KERNEL not set; skipping the real download");
            return;
        };
        let cache = PathBuf::from(cache);
        let k = fetch_with(&cache, None, &Apt).unwrap();
        assert!(k.vmlinuz.is_file());
        assert!(k.modules_dir.join("kernel").is_dir());
        assert_eq!(
            sha256_file(&cache.join("debs").join(&k.package)).unwrap(),
            k.deb_sha256
        );
        // Cached now: the same answer without apt.
        let offline = fake(None, None);
        assert_eq!(fetch_with(&cache, None, &offline).unwrap(), k);
    }

    #[test]
    fn real_apt_resolves_metapackage() {
        // Read-only apt queries; skipped where apt or its package lists are unavailable.
        let Ok(pkg) = Apt.resolve(METAPACKAGE) else {
            eprintln!("apt-cache cannot resolve {METAPACKAGE}; skipping");
            return;
        };
        assert!(pkg.starts_with("linux-image-"), "{pkg}");
        let info = Apt.show(&pkg).unwrap();
        assert!(info.filename.ends_with(".deb"), "{info:?}");
        assert!(info.filename.starts_with(&pkg), "{info:?}");
        assert_eq!(info.sha256.as_ref().map(String::len), Some(64));
    }
}
