//! Kernel-module dependency closure without `modules.dep`.
//!
//! Debian's kernel package leaves `modules.dep` to depmod at install time, so the
//! dependencies are read straight from each module's ELF `.modinfo` section: NUL-separated
//! `key=value` strings, of which `name=`, `depends=a,b`, `softdep=pre: x post: y` and
//! `alias=` matter here. Module names use `_` where file names may use `-`; both are
//! normalised to `_`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Errors from scanning a module tree or computing a closure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModuleError {
    /// An I/O operation failed; `context` says on what.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A `.ko` file is not a parseable little-endian ELF64 object with `.modinfo`.
    #[error("{path}: malformed kernel module: {reason}")]
    Elf {
        /// The module file.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
    /// The requested module is neither in the tree nor built in.
    #[error("unknown kernel module {name:?}{}", needed_by.as_ref().map(|n| format!(" (needed by {n})")).unwrap_or_default())]
    Unknown {
        /// The module name.
        name: String,
        /// The module that depends on it, if it was not requested directly.
        needed_by: Option<String>,
    },
    /// The module exists only compressed, which this crate does not decompress.
    #[error(
        "{path}: compressed modules ({format}) are not supported; use a kernel package with uncompressed .ko files"
    )]
    Compressed {
        /// The module file.
        path: PathBuf,
        /// `xz` or `zst`.
        format: &'static str,
    },
}

fn io_err(context: impl Into<String>, source: io::Error) -> ModuleError {
    ModuleError::Io {
        context: context.into(),
        source,
    }
}

/// A module to load, as returned by [`ModuleIndex::closure`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleRef {
    /// Normalised module name (`_`, not `-`).
    pub name: String,
    /// Absolute path of the `.ko` file.
    pub path: PathBuf,
    /// Path relative to the modules directory, e.g. `kernel/drivers/net/virtio_net.ko`.
    pub rel_path: PathBuf,
}

#[derive(Debug, Clone, Default)]
struct ModuleInfo {
    rel_path: PathBuf,
    depends: Vec<String>,
    softdep_pre: Vec<String>,
    softdep_post: Vec<String>,
    compressed: Option<&'static str>,
}

/// An index of the modules under a `lib/modules/<version>` directory.
#[derive(Debug, Clone)]
pub struct ModuleIndex {
    root: PathBuf,
    modules: BTreeMap<String, ModuleInfo>,
    builtin: BTreeSet<String>,
    /// Exact (non-glob) aliases, used to resolve soft dependencies such as `crc32c`.
    aliases: BTreeMap<String, BTreeSet<String>>,
}

/// Module names treat `-` and `_` alike; the kernel reports `_`.
pub fn normalize_name(name: &str) -> String {
    name.replace('-', "_")
}

impl ModuleIndex {
    /// Scans `modules_dir/kernel` recursively and reads `modules.builtin`.
    pub fn scan(modules_dir: &Path) -> Result<Self, ModuleError> {
        let root = std::path::absolute(modules_dir)
            .map_err(|e| io_err(format!("resolving {}", modules_dir.display()), e))?;
        let mut files = Vec::new();
        walk(&root, Path::new("kernel"), &mut files)?;
        files.sort();

        let mut index = ModuleIndex {
            root,
            modules: BTreeMap::new(),
            builtin: BTreeSet::new(),
            aliases: BTreeMap::new(),
        };
        for rel in files {
            let file_name = rel
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            let (stem, compressed) = if let Some(s) = file_name.strip_suffix(".ko") {
                (s, None)
            } else if let Some(s) = file_name.strip_suffix(".ko.xz") {
                (s, Some("xz"))
            } else if let Some(s) = file_name.strip_suffix(".ko.zst") {
                (s, Some("zst"))
            } else {
                continue;
            };
            let mut info = ModuleInfo {
                rel_path: rel.clone(),
                compressed,
                ..ModuleInfo::default()
            };
            let mut name = normalize_name(stem);
            let mut aliases = Vec::new();
            if compressed.is_none() {
                let path = index.root.join(&rel);
                let modinfo = read_modinfo(&path)?;
                for (key, value) in modinfo_pairs(&modinfo) {
                    match key {
                        "name" if !value.is_empty() => name = normalize_name(value),
                        "depends" => info.depends.extend(
                            value
                                .split(',')
                                .filter(|d| !d.is_empty())
                                .map(normalize_name),
                        ),
                        "softdep" => {
                            parse_softdep(value, &mut info.softdep_pre, &mut info.softdep_post)
                        }
                        "alias" if !value.contains(['*', '?', '[']) => {
                            aliases.push(value.to_owned())
                        }
                        _ => {}
                    }
                }
                // After the loop: `name=` may come after the aliases in the section.
                for alias in aliases.drain(..) {
                    index.aliases.entry(alias).or_default().insert(name.clone());
                }
                info.depends.sort();
                info.depends.dedup();
            }
            // The walk is sorted, so a duplicate name deterministically keeps the first.
            index.modules.entry(name).or_insert(info);
        }

        match fs::read_to_string(index.root.join("modules.builtin")) {
            Ok(list) => {
                for line in list.lines() {
                    let base = line.rsplit('/').next().unwrap_or(line);
                    if let Some(stem) = base.strip_suffix(".ko") {
                        index.builtin.insert(normalize_name(stem));
                    }
                }
            }
            // Without the list every request must be satisfied by a .ko file.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("reading modules.builtin", e)),
        }
        Ok(index)
    }

    /// Number of loadable modules found.
    pub fn len(&self) -> usize {
        self.modules.len()
    }

    /// True when no loadable module was found.
    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    /// True if `name` is compiled into the kernel.
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&normalize_name(name))
    }

    /// The modules needed to load `wanted`, in load order: every module comes after all of
    /// its dependencies and soft pre-dependencies. Built-in modules are skipped; soft
    /// dependencies are included only when present in the tree. The order is deterministic
    /// (requests in the given order, dependencies sorted by name), and dependency cycles
    /// are broken rather than followed.
    pub fn closure(&self, wanted: &[&str]) -> Result<Vec<ModuleRef>, ModuleError> {
        let mut state = HashMap::new();
        let mut out = Vec::new();
        for w in wanted {
            self.visit(&normalize_name(w), None, &mut state, &mut out)?;
        }
        Ok(out)
    }

    /// Names a request may refer to: the module itself, or the modules behind an alias.
    fn resolve(&self, name: &str) -> Vec<String> {
        if self.modules.contains_key(name) || self.builtin.contains(name) {
            return vec![name.to_owned()];
        }
        self.aliases
            .get(name)
            .map(|set| set.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Depth-first post-order walk. `needed_by` is `Some` for hard dependencies, which
    /// must exist; soft dependencies go through [`Self::visit_optional`].
    fn visit(
        &self,
        name: &str,
        needed_by: Option<&str>,
        state: &mut HashMap<String, bool>,
        out: &mut Vec<ModuleRef>,
    ) -> Result<(), ModuleError> {
        let targets = self.resolve(name);
        if targets.is_empty() {
            return Err(ModuleError::Unknown {
                name: name.to_owned(),
                needed_by: needed_by.map(str::to_owned),
            });
        }
        for target in targets {
            self.visit_module(&target, state, out)?;
        }
        Ok(())
    }

    fn visit_optional(
        &self,
        name: &str,
        state: &mut HashMap<String, bool>,
        out: &mut Vec<ModuleRef>,
    ) -> Result<(), ModuleError> {
        for target in self.resolve(name) {
            self.visit_module(&target, state, out)?;
        }
        Ok(())
    }

    fn visit_module(
        &self,
        name: &str,
        state: &mut HashMap<String, bool>,
        out: &mut Vec<ModuleRef>,
    ) -> Result<(), ModuleError> {
        // Present in `state` means done (true) or on the current path (false, a cycle):
        // either way there is nothing more to do.
        if state.contains_key(name) {
            return Ok(());
        }
        let Some(info) = self.modules.get(name) else {
            // Built in: nothing to load.
            return Ok(());
        };
        if let Some(format) = info.compressed {
            return Err(ModuleError::Compressed {
                path: self.root.join(&info.rel_path),
                format,
            });
        }
        state.insert(name.to_owned(), false);
        for dep in &info.depends {
            self.visit(dep, Some(name), state, out)?;
        }
        for pre in &info.softdep_pre {
            self.visit_optional(pre, state, out)?;
        }
        out.push(ModuleRef {
            name: name.to_owned(),
            path: self.root.join(&info.rel_path),
            rel_path: info.rel_path.clone(),
        });
        state.insert(name.to_owned(), true);
        for post in &info.softdep_post {
            self.visit_optional(post, state, out)?;
        }
        Ok(())
    }
}

/// Collects module-looking files below `root/rel`, without following symlinks.
fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<(), ModuleError> {
    let dir = root.join(rel);
    let entries =
        fs::read_dir(&dir).map_err(|e| io_err(format!("reading {}", dir.display()), e))?;
    for e in entries {
        let e = e.map_err(|e| io_err(format!("reading {}", dir.display()), e))?;
        let ft = e
            .file_type()
            .map_err(|err| io_err(format!("inspecting {}", e.path().display()), err))?;
        let child = rel.join(e.file_name());
        if ft.is_dir() {
            walk(root, &child, out)?;
        } else if ft.is_file() {
            out.push(child);
        }
    }
    Ok(())
}

/// `softdep=pre: a b post: c` (either part optional).
fn parse_softdep(value: &str, pre: &mut Vec<String>, post: &mut Vec<String>) {
    let mut target: Option<&mut Vec<String>> = None;
    for tok in value.split_whitespace() {
        match tok {
            "pre:" => target = Some(&mut *pre),
            "post:" => target = Some(&mut *post),
            name => {
                if let Some(t) = target.as_deref_mut() {
                    t.push(normalize_name(name));
                }
            }
        }
    }
}

fn modinfo_pairs(section: &[u8]) -> impl Iterator<Item = (&str, &str)> {
    section
        .split(|&b| b == 0)
        .filter_map(|s| std::str::from_utf8(s).ok()?.split_once('='))
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

const SHDR_SIZE: usize = 64;
/// Section headers are tiny; a limit keeps a corrupt count from allocating gigabytes.
const MAX_SECTIONS: u64 = 1 << 16;
const MAX_SECTION_BYTES: u64 = 64 << 20;

/// Reads the `.modinfo` section of a little-endian ELF64 relocatable object, reading only
/// the headers and the two sections needed rather than the whole (often large) file.
fn read_modinfo(path: &Path) -> Result<Vec<u8>, ModuleError> {
    let elf = |reason| ModuleError::Elf {
        path: path.to_owned(),
        reason,
    };
    let file =
        fs::File::open(path).map_err(|e| io_err(format!("opening {}", path.display()), e))?;
    let read_at = |off: u64, len: u64| -> Result<Vec<u8>, ModuleError> {
        if len > MAX_SECTION_BYTES {
            return Err(elf("section too large"));
        }
        let mut buf = vec![0u8; usize::try_from(len).map_err(|_| elf("section too large"))?];
        file.read_exact_at(&mut buf, off).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                elf("truncated file")
            } else {
                io_err(format!("reading {}", path.display()), e)
            }
        })?;
        Ok(buf)
    };

    let ehdr = read_at(0, 64)?;
    if &ehdr[..4] != b"\x7fELF" {
        return Err(elf("not an ELF file"));
    }
    if ehdr[4] != 2 {
        return Err(elf("not ELF64"));
    }
    if ehdr[5] != 1 {
        return Err(elf("not little-endian"));
    }
    let e_shoff = u64_at(&ehdr, 0x28).ok_or(elf("short header"))?;
    let e_shentsize = u16_at(&ehdr, 0x3a).ok_or(elf("short header"))?;
    let mut e_shnum = u64::from(u16_at(&ehdr, 0x3c).ok_or(elf("short header"))?);
    let mut e_shstrndx = u32::from(u16_at(&ehdr, 0x3e).ok_or(elf("short header"))?);
    if usize::from(e_shentsize) != SHDR_SIZE || e_shoff == 0 {
        return Err(elf("no usable section header table"));
    }
    // Extended numbering: the real counts live in section 0.
    if e_shnum == 0 || e_shstrndx == 0xffff {
        let sh0 = read_at(e_shoff, SHDR_SIZE as u64)?;
        if e_shnum == 0 {
            e_shnum = u64_at(&sh0, 32).ok_or(elf("bad section 0"))?;
        }
        if e_shstrndx == 0xffff {
            e_shstrndx = u32_at(&sh0, 40).ok_or(elf("bad section 0"))?;
        }
    }
    if e_shnum == 0 || e_shnum > MAX_SECTIONS || u64::from(e_shstrndx) >= e_shnum {
        return Err(elf("bad section count or string table index"));
    }
    let shdrs = read_at(e_shoff, e_shnum * SHDR_SIZE as u64)?;
    let section = |i: usize| -> Option<(u32, u64, u64, u32)> {
        let base = i * SHDR_SIZE;
        // (name offset, file offset, size, type)
        Some((
            u32_at(&shdrs, base)?,
            u64_at(&shdrs, base + 24)?,
            u64_at(&shdrs, base + 32)?,
            u32_at(&shdrs, base + 4)?,
        ))
    };
    let (_, str_off, str_size, _) =
        section(e_shstrndx as usize).ok_or(elf("bad string table header"))?;
    let strtab = read_at(str_off, str_size)?;
    for i in 0..e_shnum as usize {
        let (name_off, off, size, sh_type) = section(i).ok_or(elf("bad section header"))?;
        let name = strtab
            .get(name_off as usize..)
            .and_then(|s| s.split(|&b| b == 0).next())
            .ok_or(elf("bad section name offset"))?;
        if name == b".modinfo" {
            // SHT_NOBITS would have no bytes in the file.
            if sh_type == 8 {
                return Err(elf(".modinfo has no contents"));
            }
            return read_at(off, size);
        }
    }
    Err(elf("no .modinfo section"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Emits a minimal valid ELF64 relocatable object: header, a `.modinfo` section with
    /// the given strings, `.shstrtab`, and the section header table (null, .modinfo,
    /// .shstrtab).
    pub(crate) fn fake_module(modinfo: &[&str]) -> Vec<u8> {
        let mut info = Vec::new();
        for s in modinfo {
            info.extend_from_slice(s.as_bytes());
            info.push(0);
        }
        let shstrtab = b"\0.modinfo\0.shstrtab\0".to_vec();
        let info_off = 64u64;
        let str_off = info_off + info.len() as u64;
        let sh_off = (str_off + shstrtab.len() as u64).next_multiple_of(8);

        let mut f = vec![0u8; 64];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // ELFCLASS64
        f[5] = 1; // little-endian
        f[6] = 1; // EV_CURRENT
        f[16..18].copy_from_slice(&1u16.to_le_bytes()); // ET_REL
        f[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[0x28..0x30].copy_from_slice(&sh_off.to_le_bytes());
        f[0x34..0x36].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        f[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes()); // e_shentsize
        f[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes()); // e_shnum
        f[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes()); // e_shstrndx
        f.extend_from_slice(&info);
        f.extend_from_slice(&shstrtab);
        f.resize(sh_off as usize, 0);
        let shdr = |name: u32, ty: u32, off: u64, size: u64| {
            let mut h = vec![0u8; 64];
            h[0..4].copy_from_slice(&name.to_le_bytes());
            h[4..8].copy_from_slice(&ty.to_le_bytes());
            h[24..32].copy_from_slice(&off.to_le_bytes());
            h[32..40].copy_from_slice(&size.to_le_bytes());
            h[48..56].copy_from_slice(&1u64.to_le_bytes());
            h
        };
        f.extend(shdr(0, 0, 0, 0));
        f.extend(shdr(1, 1, info_off, info.len() as u64)); // SHT_PROGBITS
        f.extend(shdr(10, 3, str_off, shstrtab.len() as u64)); // SHT_STRTAB
        f
    }

    fn tree(mods: &[(&str, &[&str])], builtin: &[&str]) -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        for (rel, info) in mods {
            let p = tmp.path().join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, fake_module(info)).unwrap();
        }
        let list: String = builtin.iter().map(|b| format!("{b}\n")).collect();
        fs::write(tmp.path().join("modules.builtin"), list).unwrap();
        tmp
    }

    fn names(v: &[ModuleRef]) -> Vec<&str> {
        v.iter().map(|m| m.name.as_str()).collect()
    }

    #[test]
    fn closure_orders_dependencies_first() {
        let t = tree(
            &[
                (
                    "kernel/drivers/net/virtio_net.ko",
                    &["name=virtio_net", "depends=net_failover,virtio-ring,virtio"],
                ),
                (
                    "kernel/drivers/net/net_failover.ko",
                    &["name=net_failover", "depends=failover"],
                ),
                (
                    "kernel/net/core/failover.ko",
                    &["name=failover", "depends="],
                ),
                (
                    "kernel/drivers/virtio/virtio_ring.ko",
                    &["name=virtio_ring", "depends=virtio"],
                ),
                (
                    "kernel/drivers/virtio/virtio.ko",
                    &["name=virtio", "depends="],
                ),
                (
                    "kernel/fs/ext4/ext4.ko",
                    &[
                        "name=ext4",
                        "depends=crc16,mbcache",
                        "softdep=pre: crc32c absent post: jbd_post",
                    ],
                ),
                ("kernel/lib/crc16.ko", &["depends="]),
                ("kernel/fs/mbcache.ko", &["name=mbcache", "depends="]),
                (
                    "kernel/crypto/crc32c_generic.ko",
                    &["name=crc32c_generic", "alias=crc32c", "alias=crypto-crc32c"],
                ),
                ("kernel/fs/jbd-post.ko", &["name=jbd_post"]),
                (
                    "kernel/drivers/input/evdev.ko",
                    &["name=evdev", "depends=button"],
                ),
            ],
            &[
                "kernel/drivers/acpi/button.ko",
                "kernel/arch/x86/amd-uncore.ko",
            ],
        );
        let idx = ModuleIndex::scan(t.path()).unwrap();
        assert_eq!(idx.len(), 11);
        assert!(idx.is_builtin("amd-uncore"));

        let c = idx.closure(&["virtio_net"]).unwrap();
        assert_eq!(
            names(&c),
            [
                "failover",
                "net_failover",
                "virtio",
                "virtio_ring",
                "virtio_net"
            ]
        );
        assert_eq!(c[4].rel_path, Path::new("kernel/drivers/net/virtio_net.ko"));
        assert_eq!(c[4].path, t.path().join("kernel/drivers/net/virtio_net.ko"));
        assert!(c[4].path.is_absolute());

        // Softdeps: pre before, post after, absent ones ignored, aliases resolved.
        let c = idx.closure(&["ext4"]).unwrap();
        assert_eq!(
            names(&c),
            ["crc16", "mbcache", "crc32c_generic", "ext4", "jbd_post"]
        );

        // Built-in requests and dependencies are skipped; duplicates appear once.
        let c = idx
            .closure(&["button", "evdev", "virtio", "evdev"])
            .unwrap();
        assert_eq!(names(&c), ["evdev", "virtio"]);

        // Deterministic across runs and index rebuilds.
        let again = ModuleIndex::scan(t.path()).unwrap();
        assert_eq!(
            again.closure(&["ext4", "virtio_net"]).unwrap(),
            idx.closure(&["ext4", "virtio_net"]).unwrap()
        );
    }

    #[test]
    fn unknown_compressed_and_cycles() {
        let t = tree(
            &[
                ("kernel/a.ko", &["name=a", "depends=b"]),
                ("kernel/b.ko", &["name=b", "depends=c"]),
                ("kernel/c.ko", &["name=c", "depends=a"]),
                (
                    "kernel/needs_ghost.ko",
                    &["name=needs_ghost", "depends=ghost"],
                ),
            ],
            &[],
        );
        fs::write(t.path().join("kernel/packed.ko.xz"), b"not scanned").unwrap();
        let idx = ModuleIndex::scan(t.path()).unwrap();
        let c = idx.closure(&["a"]).unwrap();
        assert_eq!(names(&c), ["c", "b", "a"]);

        match idx.closure(&["nope"]) {
            Err(e @ ModuleError::Unknown { .. }) => assert!(e.to_string().contains("\"nope\"")),
            other => panic!("unexpected {other:?}"),
        }
        match idx.closure(&["needs_ghost"]) {
            Err(e @ ModuleError::Unknown { .. }) => {
                assert!(
                    e.to_string().contains("ghost")
                        && e.to_string().contains("needed by needs_ghost")
                )
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            idx.closure(&["packed"]),
            Err(ModuleError::Compressed { format: "xz", .. })
        ));
    }

    #[test]
    fn rejects_malformed_elf() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir_all(tmp.path().join("kernel")).unwrap();
        let mut bad = fake_module(&["name=x"]);
        bad.truncate(100);
        fs::write(tmp.path().join("kernel/x.ko"), bad).unwrap();
        assert!(matches!(
            ModuleIndex::scan(tmp.path()),
            Err(ModuleError::Elf {
                reason: "truncated file",
                ..
            })
        ));
        fs::write(tmp.path().join("kernel/x.ko"), b"#!/bin/sh\n").unwrap();
        assert!(matches!(
            ModuleIndex::scan(tmp.path()),
            Err(ModuleError::Elf { .. })
        ));
    }

    #[test]
    fn real_debian_tree() {
        let dir = Path::new("/tmp/k/x/lib/modules/6.1.0-56-amd64");
        if !dir.is_dir() {
            eprintln!("{} not present; skipping", dir.display());
            return;
        }
        let idx = ModuleIndex::scan(dir).unwrap();
        assert!(idx.len() > 1000);
        let c = idx
            .closure(&["virtio_net", "virtio_pci", "overlay", "button", "evdev"])
            .unwrap();
        let pos = |n: &str| c.iter().position(|m| m.name == n);
        let net = pos("virtio_net").expect("virtio_net");
        for dep in ["virtio_ring", "virtio", "failover", "net_failover"] {
            let p = pos(dep).unwrap_or_else(|| panic!("{dep} missing from {:?}", names(&c)));
            assert!(
                p < net,
                "{dep} must load before virtio_net: {:?}",
                names(&c)
            );
        }
        assert!(pos("overlay").is_some());
        assert!(
            c.iter()
                .all(|m| m.path.is_file() && m.rel_path.starts_with("kernel"))
        );
    }
}
