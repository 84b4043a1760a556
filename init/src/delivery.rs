//! Where the host file comes from, highest priority first (as Fedora CoreOS takes its
//! Ignition config):
//! 1. QEMU fw_cfg `opt/keel/config` (`keel run --config FILE`), so one built image serves
//!    many hosts;
//! 2. `host.toml` at the top of a disk or partition whose filesystem (ext4 or ISO 9660) is
//!    labelled `KEEL-CONFIG`, mounted read-only just long enough to read it;
//! 3. `keel.config=` on the kernel command line: the file zstd-compressed, then base64;
//! 4. the file `keel build` baked into the image.
//!
//! A source that is present but invalid is rejected whole, with its errors logged, and the
//! next one is used: a bad delivery never leaves the host without its baked configuration.

use std::io::Read;
use std::path::Path;

use base64::Engine;
use keel_config::HostConfig;

/// Where the kernel's qemu_fw_cfg driver shows the fw_cfg file `opt/keel/config`.
pub const FW_CFG_CONFIG: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/keel/config/raw";
/// The kernel command-line parameter carrying a compressed, base64 host file.
pub const CMDLINE_PARAM: &str = "keel.config=";
/// Where PID 1 keeps the host file it runs with, for its helpers (`--pull`) to read.
pub const EFFECTIVE: &str = "/run/keel/host.toml";
/// Decompressed host files larger than this are refused.
const MAX_CONFIG: u64 = 1 << 20;

/// The host file in force and where it came from.
pub struct Delivered {
    pub config: HostConfig,
    pub text: String,
    pub source: &'static str,
    /// The sha256 of the file as delivered, which a `keel apply` records as its base.
    pub base_sha256: String,
}

/// The label of a config disk's filesystem.
pub const CONFIG_LABEL: &str = "KEEL-CONFIG";
/// The file read from a config disk.
pub const CONFIG_DISK_FILE: &str = "host.toml";
const CONFIG_DISK_MOUNT: &str = "/run/keel/config-disk";

/// The host file on a disk labelled KEEL-CONFIG: `Ok(None)` without such a disk, an error
/// for a disk that cannot be mounted or lacks the file.
pub fn read_config_disk() -> Result<Option<String>, String> {
    let Some((device, probe)) = crate::blockdev::find(|_, p| {
        p.label.as_deref() == Some(CONFIG_LABEL) && matches!(p.fstype, Some("ext4" | "iso9660"))
    }) else {
        return Ok(None);
    };
    let fstype = probe.fstype.unwrap_or("ext4");
    let target = Path::new(CONFIG_DISK_MOUNT);
    std::fs::create_dir_all(target).map_err(|e| format!("mkdir {CONFIG_DISK_MOUNT}: {e}"))?;
    use nix::mount::MsFlags;
    nix::mount::mount(
        Some(&device.node),
        target,
        Some(if fstype == "iso9660" {
            "iso9660"
        } else {
            "ext4"
        }),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        // ext4 would replay a dirty journal even read-only: the config disk is not ours to
        // write.
        (fstype == "ext4").then_some("noload"),
    )
    .map_err(|e| format!("mounting {} ({fstype}): {e}", device.node.display()))?;
    let file = target.join(CONFIG_DISK_FILE);
    let text = match read_optional(&file) {
        Ok(Some(text)) => Ok(Some(text)),
        Ok(None) => Err(format!(
            "{} is labelled {CONFIG_LABEL} but has no /{CONFIG_DISK_FILE}",
            device.node.display()
        )),
        Err(e) => Err(e),
    };
    if let Err(e) = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH) {
        log::warn!("unmounting {CONFIG_DISK_MOUNT}: {e}");
    }
    text
}

/// Picks the host file: the first present source that is valid. Returns it (or `None`
/// when no source is valid) and one message per source that was present but rejected.
/// `config_disk` is what [`read_config_disk`] found.
pub fn choose(
    fw_cfg: &Path,
    config_disk: Result<Option<String>, String>,
    cmdline: &str,
    baked: &Path,
) -> (Option<Delivered>, Vec<String>) {
    let mut rejected = Vec::new();
    let mut try_text = |text: Result<Option<String>, String>,
                        label: &Path,
                        source: &'static str|
     -> Option<Delivered> {
        match text {
            Ok(None) => None,
            Ok(Some(text)) => match HostConfig::parse(label, &text) {
                Ok(config) => Some(Delivered {
                    config,
                    base_sha256: crate::state::sha256_hex(text.as_bytes()),
                    text,
                    source,
                }),
                Err(e) => {
                    rejected.push(format!("{source}: {e}; ignored"));
                    None
                }
            },
            Err(e) => {
                rejected.push(format!("{source}: {e}; ignored"));
                None
            }
        }
    };
    let from_fw_cfg = read_optional(fw_cfg);
    if let Some(d) = try_text(from_fw_cfg, Path::new("fw_cfg:opt/keel/config"), "fw_cfg") {
        return (Some(d), rejected);
    }
    let disk_label = format!("{CONFIG_LABEL}:/{CONFIG_DISK_FILE}");
    if let Some(d) = try_text(config_disk, Path::new(&disk_label), "the config disk") {
        return (Some(d), rejected);
    }
    let from_cmdline = decode_cmdline(cmdline);
    if let Some(d) = try_text(
        from_cmdline,
        Path::new(CMDLINE_PARAM),
        "the kernel command line",
    ) {
        return (Some(d), rejected);
    }
    let baked_text = read_optional(baked).and_then(|t| t.ok_or_else(|| "missing".to_string()));
    let d = try_text(baked_text.map(Some), baked, "the image");
    (d, rejected)
}

fn read_optional(path: &Path) -> Result<Option<String>, String> {
    match std::fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| format!("{} is not UTF-8", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("reading {}: {e}", path.display())),
    }
}

/// The host file carried by `keel.config=` (the last one wins, as the kernel's own
/// parameters do), if any.
pub fn decode_cmdline(cmdline: &str) -> Result<Option<String>, String> {
    let Some(encoded) = cmdline
        .split_whitespace()
        .filter_map(|arg| arg.strip_prefix(CMDLINE_PARAM))
        .next_back()
    else {
        return Ok(None);
    };
    let compressed = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim_end_matches('='))
        .or_else(|_| {
            base64::engine::general_purpose::STANDARD_NO_PAD.decode(encoded.trim_end_matches('='))
        })
        .map_err(|e| format!("keel.config= is not base64: {e}"))?;
    let mut decoder = ruzstd::decoding::StreamingDecoder::new(compressed.as_slice())
        .map_err(|e| format!("keel.config= is not zstd: {e}"))?;
    let mut text = String::new();
    (&mut decoder)
        .take(MAX_CONFIG + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("keel.config= does not decompress to text: {e}"))?;
    if text.len() as u64 > MAX_CONFIG {
        return Err(format!(
            "keel.config= is over {MAX_CONFIG} bytes decompressed"
        ));
    }
    Ok(Some(text))
}

/// The `keel.config=` argument for `text` (what `keel run` and tests put on the command
/// line).
pub fn encode_cmdline(text: &str) -> Result<String, String> {
    let compressed = ruzstd::encoding::compress_to_vec(
        text.as_bytes(),
        ruzstd::encoding::CompressionLevel::Fastest,
    );
    Ok(format!(
        "{CMDLINE_PARAM}{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(compressed)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "[host]\nhostname = \"from-a\"\n";
    const B: &str = "[host]\nhostname = \"from-b\"\n";

    #[test]
    fn the_command_line_form_round_trips_and_the_last_wins() {
        let a = encode_cmdline(A).unwrap();
        let b = encode_cmdline(B).unwrap();
        assert_eq!(
            decode_cmdline(&format!("console=ttyS0 {a} quiet"))
                .unwrap()
                .as_deref(),
            Some(A)
        );
        assert_eq!(
            decode_cmdline(&format!("{a} {b}")).unwrap().as_deref(),
            Some(B)
        );
        assert_eq!(decode_cmdline("console=ttyS0").unwrap(), None);
        assert!(
            decode_cmdline("keel.config=%%%")
                .unwrap_err()
                .contains("base64")
        );
        assert!(
            decode_cmdline("keel.config=aGVsbG8")
                .unwrap_err()
                .contains("zstd")
        );
    }

    #[test]
    fn fw_cfg_wins_then_the_command_line_then_the_image_and_bad_ones_fall_through() {
        let dir = tempfile::tempdir().unwrap();
        let fw = dir.path().join("fw");
        let baked = dir.path().join("host.toml");
        std::fs::write(&baked, "[host]\nhostname = \"baked\"\n").unwrap();
        let cmdline = encode_cmdline(B).unwrap();

        let (d, rejected) = choose(&fw, Ok(None), &cmdline, &baked);
        assert_eq!(d.unwrap().config.hostname, "from-b");
        assert!(rejected.is_empty());

        std::fs::write(&fw, A).unwrap();
        let (d, _) = choose(&fw, Ok(None), &cmdline, &baked);
        let d = d.unwrap();
        assert_eq!((d.config.hostname.as_str(), d.source), ("from-a", "fw_cfg"));

        // An invalid delivery is rejected whole, named, and the next source is used.
        std::fs::write(&fw, "[host]\nhostname = \"x\"\nbogus = 1\n").unwrap();
        let (d, rejected) = choose(&fw, Ok(None), "", &baked);
        assert_eq!(d.unwrap().source, "the image");
        assert!(
            rejected[0].contains("fw_cfg") && rejected[0].contains("bogus"),
            "{rejected:?}"
        );

        let (d, rejected) = choose(
            &dir.path().join("none"),
            Ok(None),
            "",
            &dir.path().join("none"),
        );
        assert!(d.is_none());
        assert!(rejected[0].contains("missing"), "{rejected:?}");
    }

    #[test]
    fn the_config_disk_comes_after_fw_cfg_and_before_the_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let fw = dir.path().join("fw");
        let baked = dir.path().join("host.toml");
        std::fs::write(&baked, "[host]\nhostname = \"baked\"\n").unwrap();
        let cmdline = encode_cmdline(B).unwrap();
        let disk = || Ok(Some("[host]\nhostname = \"from-disk\"\n".to_string()));

        let (d, _) = choose(&fw, disk(), &cmdline, &baked);
        let d = d.unwrap();
        assert_eq!(
            (d.config.hostname.as_str(), d.source),
            ("from-disk", "the config disk")
        );

        std::fs::write(&fw, A).unwrap();
        let (d, _) = choose(&fw, disk(), &cmdline, &baked);
        assert_eq!(d.unwrap().source, "fw_cfg");

        // A config disk that is there but unusable is reported, and the next source used.
        std::fs::remove_file(&fw).unwrap();
        let (d, rejected) = choose(&fw, Err("no /host.toml".into()), &cmdline, &baked);
        assert_eq!(d.unwrap().config.hostname, "from-b");
        assert!(rejected[0].contains("config disk"), "{rejected:?}");
        let (d, rejected) = choose(&fw, Ok(Some("[host]\nnope = 1\n".into())), "", &baked);
        assert_eq!(d.unwrap().source, "the image");
        assert!(
            rejected[0].contains("KEEL-CONFIG") && rejected[0].contains("nope"),
            "{rejected:?}"
        );
    }
}
