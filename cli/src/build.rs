//! `keel build`: a host file becomes a bootable kernel + initramfs, with a manifest that
//! records the kernel package and a digest of every input.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use keel_config::{HostConfig, ImageSource, LayerSpec, PullAt};
use keel_image::archive::{copy_image, import_archive};
use keel_image::cpio::Compression;
use keel_image::import::{LayerSource, import};
use keel_image::kernel::fetch_kernel;
use keel_image::layout::ImageLayout;
use keel_image::modules::ModuleIndex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use keel_image::os::{BASE_MODULES, CMDLINE};

pub struct BuildOptions {
    pub init: PathBuf,
    pub cache_dir: PathBuf,
}

/// What `keel build` wrote, also saved as `manifest.json` beside the boot files.
#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub hostname: String,
    pub kernel: KernelInfo,
    pub cmdline: String,
    pub modules: Vec<String>,
    /// sha256 of every input, by role.
    pub inputs: BTreeMap<String, String>,
    pub initramfs_sha256: String,
    pub initramfs_bytes: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct KernelInfo {
    pub package: String,
    pub package_version: String,
    pub release: String,
    pub deb_sha256: String,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_file(path: &Path) -> Result<String, String> {
    let mut file = fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = std::io::Read::read(&mut file, &mut buf)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Builds the host into `out` (vmlinuz, initramfs.img, manifest.json).
pub fn build(config: &HostConfig, out: &Path, options: &BuildOptions) -> Result<Manifest, String> {
    let started = Instant::now();
    let mut inputs = BTreeMap::new();
    let host_text =
        fs::read(&config.path).map_err(|e| format!("{}: {e}", config.path.display()))?;
    inputs.insert("host.toml".to_string(), sha256_hex(&host_text));
    let init = fs::read(&options.init).map_err(|e| {
        format!(
            "the init binary {}: {e} (build it with `cargo build --release`, or pass --init)",
            options.init.display()
        )
    })?;
    inputs.insert("init".to_string(), sha256_hex(&init));

    let kernel =
        fetch_kernel(&options.cache_dir.join("kernel")).map_err(|e| format!("kernel: {e}"))?;
    let index =
        ModuleIndex::scan(&kernel.modules_dir).map_err(|e| format!("kernel modules: {e}"))?;
    // Bridges, veth pairs and NAT only for a host that has container networks.
    let network_modules = if config.networks.is_empty() {
        Vec::new()
    } else {
        keel_net::kernel_modules()
    };
    let wanted: Vec<&str> = BASE_MODULES
        .iter()
        .copied()
        .chain(network_modules)
        .chain(config.modules.iter().map(String::as_str))
        .collect();
    let modules = index
        .closure(&wanted)
        .map_err(|e| format!("kernel modules: {e}"))?;

    let mut initramfs = keel_image::os::base_initramfs().map_err(|e| e.to_string())?;
    initramfs
        .add_dir("etc/keel", 0o755)
        .map_err(|e| e.to_string())?;
    initramfs
        .add_file_from_bytes("init", 0o755, init)
        .map_err(|e| e.to_string())?;
    initramfs
        .add_file_from_bytes("etc/keel/host.toml", 0o644, host_text)
        .map_err(|e| e.to_string())?;

    let module_root = Path::new("lib/modules").join(&kernel.version);
    let mut load_list = String::from("# written by keel build: dependencies first\n");
    for m in &modules {
        let dest = module_root.join(&m.rel_path);
        initramfs
            .add_file_from_path(&dest, 0o644, &m.path)
            .map_err(|e| format!("{}: {e}", m.path.display()))?;
        inputs.insert(format!("module:{}", m.name), sha256_file(&m.path)?);
        load_list += &format!("/{}\n", dest.display());
    }
    initramfs
        .add_file_from_bytes("lib/modules/keel.load", 0o644, load_list.into_bytes())
        .map_err(|e| e.to_string())?;

    let staging = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
    // Every image goes into one layout, so a layer shared by several is stored once.
    let shared = staging.path().join("images");
    let mut embedded = 0;
    let mut boot_cas: Vec<PathBuf> = Vec::new();
    for (name, image) in &config.images {
        let digest = match &image.source {
            ImageSource::Layout(dir) => {
                let dir = config.base_dir().join(dir);
                // Opening verifies the layout's JSON; copying verifies every blob.
                let layout = match &image.reference {
                    Some(r) => ImageLayout::open_ref(&dir, r),
                    None => ImageLayout::open(&dir),
                }
                .map_err(|e| format!("image {name} ({}): {e}", dir.display()))?;
                copy_image(&layout, &shared, name)
                    .map_err(|e| format!("image {name} ({}): {e}", dir.display()))?
            }
            ImageSource::Layers(layers) => {
                let sources: Vec<LayerSource> = layers
                    .iter()
                    .map(|l| match l {
                        LayerSpec::Busybox(binary) => LayerSource::Busybox(binary.clone()),
                        LayerSpec::Path(p) => {
                            let p = config.base_dir().join(p);
                            if p.is_dir() {
                                LayerSource::Dir(p)
                            } else {
                                LayerSource::Tar(p)
                            }
                        }
                    })
                    .collect();
                let dir = staging.path().join("imports").join(name);
                import(&sources, &image.defaults, Some(name), &dir)
                    .map_err(|e| format!("image {name}: {e}"))?;
                let layout = ImageLayout::open(&dir).map_err(|e| format!("image {name}: {e}"))?;
                copy_image(&layout, &shared, name).map_err(|e| format!("image {name}: {e}"))?
            }
            ImageSource::Archive(path) => {
                let path = config.base_dir().join(path);
                import_archive(&path, image.reference.as_deref(), &shared, name)
                    .map_err(|e| format!("image {name} ({}): {e}", path.display()))?
            }
            ImageSource::Pull {
                reference,
                at: PullAt::Build,
            } => {
                // Pulled into a cache layout first, so a rebuild downloads nothing it has.
                let cache = options.cache_dir.join("images");
                crate::pull::pull_into(config, name, reference, &cache)?;
                let layout = ImageLayout::open_ref(&cache, name)
                    .map_err(|e| format!("image {name} ({reference}): {e}"))?;
                copy_image(&layout, &shared, name)
                    .map_err(|e| format!("image {name} ({reference}): {e}"))?
            }
            ImageSource::Pull {
                reference,
                at: PullAt::Boot,
            } => {
                // The host pulls it; it only needs its registry's CA, if one is set.
                let parsed: keel_image::registry::Reference = reference
                    .parse()
                    .map_err(|e| format!("image {name}: {e}"))?;
                let auth = crate::pull::auth_for(config, &parsed)?;
                if let Some(pem) = auth.ca_pem {
                    let path = Path::new(keel_config::REGISTRY_CA_DIR)
                        .join(keel_config::registry_ca_file_name(&parsed.registry));
                    let path = path.strip_prefix("/").unwrap_or(&path).to_path_buf();
                    if !boot_cas.contains(&path) {
                        initramfs
                            .add_file_from_bytes(&path, 0o644, pem)
                            .map_err(|e| format!("image {name}: registry CA: {e}"))?;
                        boot_cas.push(path);
                    }
                }
                inputs.insert(
                    format!("image:{name}"),
                    format!("pull at boot: {reference}"),
                );
                continue;
            }
        };
        inputs.insert(format!("image:{name}"), digest);
        embedded += 1;
    }
    if embedded > 0 {
        initramfs
            .add_tree("usr/share/keel/images", &shared)
            .map_err(|e| format!("images: {e}"))?;
    }

    fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let initramfs_path = out.join("initramfs.img");
    let tmp = out.join(".initramfs.img.tmp");
    let file = fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    initramfs
        .write_compressed(std::io::BufWriter::new(file), Compression::Zstd)
        .map_err(|e| format!("writing the initramfs: {e}"))?;
    fs::rename(&tmp, &initramfs_path).map_err(|e| format!("{}: {e}", initramfs_path.display()))?;
    let vmlinuz = out.join("vmlinuz");
    fs::copy(&kernel.vmlinuz, &vmlinuz).map_err(|e| format!("{}: {e}", vmlinuz.display()))?;

    let manifest = Manifest {
        hostname: config.hostname.clone(),
        kernel: KernelInfo {
            package: kernel.package.clone(),
            package_version: kernel.package_version.clone(),
            release: kernel.version.clone(),
            deb_sha256: kernel.deb_sha256.clone(),
        },
        cmdline: CMDLINE.to_string(),
        modules: modules.iter().map(|m| m.name.clone()).collect(),
        inputs,
        initramfs_sha256: sha256_file(&initramfs_path)?,
        initramfs_bytes: fs::metadata(&initramfs_path)
            .map_err(|e| e.to_string())?
            .len(),
    };
    let json = serde_json::to_string_pretty(&manifest).map_err(|e| e.to_string())?;
    fs::write(out.join("manifest.json"), json + "\n").map_err(|e| format!("manifest: {e}"))?;
    eprintln!(
        "keel: built {} in {} ms: kernel {} ({}), {} modules, {} images, initramfs {} KiB",
        out.display(),
        started.elapsed().as_millis(),
        kernel.version,
        kernel.package_version,
        modules.len(),
        config.images.len(),
        manifest.initramfs_bytes / 1024
    );
    Ok(manifest)
}

/// Reads a build directory's manifest.
pub fn read_manifest(dir: &Path) -> Result<Manifest, String> {
    let path = dir.join("manifest.json");
    let text = fs::read_to_string(&path).map_err(|e| {
        format!(
            "{}: {e} (is this a `keel build` output directory?)",
            path.display()
        )
    })?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}
