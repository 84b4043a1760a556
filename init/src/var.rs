//! /var: the only place a Keel host keeps anything across reboots (volumes, the image store,
//! logs, Keel's state). It lives on a data disk found by its ext4 label `KEEL-VAR`; a blank
//! disk whose serial or GPT partition name is `KEEL-VAR` is formatted on first boot. A disk
//! that already holds something else is never formatted.
//!
//! Before it is mounted, the filesystem is checked (`e2fsck -p`: after a power cut this
//! replays the journal); one with errors the check cannot repair is not mounted read-write,
//! and /var falls back to a tmpfs with a loud error rather than risk the data.
//!
//! Then first-boot provisioning runs once per disk and is recorded
//! ([`crate::state::PROVISIONED`]); every boot is counted.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::state;
use nix::mount::{MsFlags, mount};

use serde::{Deserialize, Serialize};

use crate::blockdev::{self, BlockDevice, Probe};
use crate::var_growth;

/// The label (ext4), serial (virtio) or partition name (GPT) of the data disk.
pub const DATA_LABEL: &str = "KEEL-VAR";
/// e2fsprogs inside the root image (`keel build` copies them with their libraries).
pub const MKE2FS: &str = "/usr/sbin/mke2fs";
pub const E2FSCK: &str = "/usr/sbin/e2fsck";
/// Per-boot counter and the boot it was last written by.
pub const BOOTS: &str = "/var/lib/keel/boots.json";
/// The host's identity, made on first boot, kept with the data.
pub const MACHINE_ID: &str = "/var/lib/keel/machine-id";

const VAR: &str = "/var";

/// What /var turned out to be.
#[derive(Debug)]
pub enum Var {
    /// The data disk, mounted; `formatted` on this boot.
    Disk {
        device: BlockDevice,
        uuid: Option<String>,
        formatted: bool,
        check: String,
    },
    /// A tmpfs, and why: nothing written to /var outlives this boot.
    Tmpfs { why: String },
}

/// What to do with the disks present, decided from their probes alone (no side effects,
/// so it is unit-tested).
#[derive(Debug, PartialEq, Eq)]
enum VarDiskPlan {
    CheckAndMount(usize),
    FormatAndMount(usize),
    Refuse(String),
    NoDisk,
}

fn plan(disks: &[(BlockDevice, Probe)]) -> VarDiskPlan {
    let labelled: Vec<usize> = disks
        .iter()
        .enumerate()
        .filter(|(_, (_, p))| p.fstype == Some("ext4") && p.label.as_deref() == Some(DATA_LABEL))
        .map(|(i, _)| i)
        .collect();
    match labelled.as_slice() {
        [one] => return VarDiskPlan::CheckAndMount(*one),
        [_, _, ..] => {
            let names: Vec<&str> = labelled.iter().map(|i| disks[*i].0.name.as_str()).collect();
            return VarDiskPlan::Refuse(format!(
                "{} filesystems are labelled {DATA_LABEL} ({}); remove all but one",
                names.len(),
                names.join(", ")
            ));
        }
        [] => {}
    }
    let named = |(d, _): &&(BlockDevice, Probe)| {
        d.serial.as_deref() == Some(DATA_LABEL) || d.partname.as_deref() == Some(DATA_LABEL)
    };
    let designated: Vec<(usize, &(BlockDevice, Probe))> =
        disks.iter().enumerate().filter(|(_, d)| named(d)).collect();
    match designated.as_slice() {
        [] => VarDiskPlan::NoDisk,
        [(i, (_, probe))] if probe.blank => VarDiskPlan::FormatAndMount(*i),
        [(_, (device, probe))] => VarDiskPlan::Refuse(format!(
            "{} is designated {DATA_LABEL} but holds {} and no ext4 filesystem labelled {DATA_LABEL}; it is not formatted, in case that is data",
            device.node.display(),
            probe.fstype.unwrap_or("something that is not blank")
        )),
        more => VarDiskPlan::Refuse(format!(
            "{} disks are designated {DATA_LABEL}; remove all but one",
            more.len()
        )),
    }
}

/// Finds, checks (or formats) and mounts the data disk on /var; falls back to a tmpfs.
pub fn setup() -> Var {
    let disks: Vec<(BlockDevice, Probe)> = blockdev::list()
        .into_iter()
        .filter_map(|d| {
            let p = blockdev::probe(&d.node).ok()?;
            Some((d, p))
        })
        .collect();
    let outcome = match plan(&disks) {
        VarDiskPlan::NoDisk => Err(format!(
            "no data disk (an ext4 filesystem labelled {DATA_LABEL}, or a blank disk with serial or partition name {DATA_LABEL})"
        )),
        VarDiskPlan::Refuse(why) => Err(why),
        VarDiskPlan::CheckAndMount(i) => {
            let (device, probe) = &disks[i];
            grow_partition(device);
            check(&device.node).and_then(|check| {
                mount_ext4(&device.node)?;
                match var_growth::grow_ext4(&device.node, Path::new(VAR)) {
                    Ok(Some(size)) => log::info!("/var grown to {} MiB", size >> 20),
                    Ok(None) => {}
                    Err(e) => log::warn!("/var keeps its size: {e}"),
                }
                Ok(Var::Disk {
                    device: device.clone(),
                    uuid: probe.uuid.clone(),
                    formatted: false,
                    check,
                })
            })
        }
        VarDiskPlan::FormatAndMount(i) => {
            let device = &disks[i].0;
            grow_partition(device);
            format(&device.node)
                .and_then(|()| mount_ext4(&device.node))
                .map(|()| Var::Disk {
                    device: device.clone(),
                    uuid: blockdev::probe(&device.node).ok().and_then(|p| p.uuid),
                    formatted: true,
                    check: "new filesystem".into(),
                })
        }
    };
    match outcome {
        Ok(var) => var,
        Err(why) => {
            if let Err(e) = mount(
                Some("var"),
                VAR,
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                Some("mode=0755"),
            ) {
                // On an initramfs-only host / is a writable tmpfs: /var is simply on it.
                log::debug!("tmpfs on /var: {e}");
            }
            Var::Tmpfs { why }
        }
    }
}

/// A `KEEL-VAR` partition takes the room after it on its disk (see var_growth.rs); a
/// failure leaves it as it was and only costs the room.
fn grow_partition(device: &BlockDevice) {
    if device.partname.as_deref() != Some(DATA_LABEL) {
        return;
    }
    match var_growth::grow_partition(device) {
        Ok(Some(grown)) => log::info!(
            "{} grown from {} MiB to {} MiB, to the end of its disk",
            device.node.display(),
            grown.from >> 20,
            grown.to >> 20
        ),
        Ok(None) => {}
        Err(e) => log::warn!("{} keeps its size: {e}", device.node.display()),
    }
}

/// Runs one of the e2fsprogs tools, its output going to the log.
fn run(tool: &str, args: &[&str], node: &Path) -> Result<(i32, String), String> {
    let output = Command::new(tool)
        .args(args)
        .arg(node)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin")
        .output()
        .map_err(|e| format!("cannot run {tool}: {e}"))?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        log::info!("{}: {line}", Path::new(tool).display());
    }
    // A tool killed by a signal has no code: treat it as an operational error.
    Ok((output.status.code().unwrap_or(8), text))
}

/// `e2fsck -p`: replays the journal after a crash and repairs what is safe to repair.
fn check(node: &Path) -> Result<String, String> {
    let (code, _) = run(E2FSCK, &["-p"], node)?;
    // e2fsck(8): 0 clean, 1 errors corrected, 2 corrected and a reboot is advised (only
    // for a mounted root), 4 and up: uncorrected errors or the check itself failed.
    match code {
        0 => Ok("clean".into()),
        1 | 2 => Ok("errors corrected".into()),
        _ => Err(format!(
            "e2fsck -p {} found errors it cannot repair safely (exit {code}); not mounting it. Repair it offline (e2fsck -f {}) and boot again",
            node.display(),
            node.display()
        )),
    }
}

fn format(node: &Path) -> Result<(), String> {
    log::info!(
        "formatting blank data disk {} as ext4 ({DATA_LABEL})",
        node.display()
    );
    // Lazy inode-table and journal initialisation: the kernel zeroes them in the background,
    // so first boot does not write the whole disk.
    let (code, text) = run(
        MKE2FS,
        &[
            "-q",
            "-F",
            "-t",
            "ext4",
            "-L",
            DATA_LABEL,
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1",
        ],
        node,
    )?;
    if code == 0 {
        Ok(())
    } else {
        Err(format!(
            "mke2fs {} failed (exit {code}): {}",
            node.display(),
            text.trim()
        ))
    }
}

fn mount_ext4(node: &Path) -> Result<(), String> {
    mount(
        Some(node),
        VAR,
        Some("ext4"),
        MsFlags::MS_NOATIME,
        // A metadata error later makes /var read-only instead of spreading the damage.
        Some("errors=remount-ro"),
    )
    .map_err(|e| format!("mount {} on /var: {e}", node.display()))
}

/// The first-boot record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Provisioned {
    /// Seconds since the epoch, by the guest's clock at the time.
    pub at: u64,
    pub boot_id: String,
    pub machine_id: String,
    /// The data disk's filesystem UUID; `None` when /var was a tmpfs.
    pub disk_uuid: Option<String>,
    /// The directories made. (Volumes are not made here: their first use makes them,
    /// filled from the image, see keel_supervisor::volume_store.)
    pub directories: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Boots {
    pub count: u64,
    pub boot_id: String,
}

/// What [`provision`] found and did.
#[derive(Debug)]
pub struct ProvisionReport {
    pub provisioned: Provisioned,
    /// Provisioning ran on this boot.
    pub first_boot: bool,
    pub boots: u64,
    pub machine_id: String,
    /// Interrupted writes deleted.
    pub swept: Vec<PathBuf>,
}

/// The directories Keel's state lives in.
const DIRECTORIES: &[&str] = &[
    "/var/lib/keel",
    "/var/lib/keel/volumes",
    "/var/lib/keel/images",
    "/var/lib/keel/layers",
    "/var/log/keel",
];

/// Sweeps interrupted writes, then runs first-boot provisioning unless it is recorded,
/// counts this boot and returns the machine id. `root` prefixes every path (tests).
pub fn provision(root: &Path, disk_uuid: Option<&str>) -> Result<ProvisionReport, String> {
    let at = |p: &str| root.join(p.trim_start_matches('/'));
    for dir in DIRECTORIES {
        fs::create_dir_all(at(dir)).map_err(|e| format!("mkdir {dir}: {e}"))?;
    }
    let swept = state::remove_stale_temporaries(&at(state::STATE_DIR));
    let boot_id = fs::read_to_string(at("/proc/sys/kernel/random/boot_id"))
        .or_else(|_| fs::read_to_string("/proc/sys/kernel/random/boot_id"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();

    let machine_id = match fs::read_to_string(at(MACHINE_ID)) {
        Ok(id) if is_machine_id(id.trim()) => id.trim().to_string(),
        _ => {
            let id = new_machine_id()?;
            state::write_atomic(&at(MACHINE_ID), format!("{id}\n").as_bytes(), 0o444)
                .map_err(|e| format!("writing {MACHINE_ID}: {e}"))?;
            id
        }
    };

    let recorded = match fs::read(at(state::PROVISIONED)) {
        Ok(bytes) => match serde_json::from_slice::<Provisioned>(&bytes) {
            Ok(p) => Some(p),
            Err(e) => {
                // Never half-written (it is renamed into place): a record we cannot read
                // comes from something else. Provisioning again is safe (it only creates).
                log::error!(
                    "{} is unreadable ({e}); provisioning again",
                    state::PROVISIONED
                );
                None
            }
        },
        Err(_) => None,
    };
    let (provisioned, first_boot) = match recorded {
        Some(p) => (p, false),
        None => {
            let p = Provisioned {
                at: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                boot_id: boot_id.clone(),
                machine_id: machine_id.clone(),
                disk_uuid: disk_uuid.map(str::to_string),
                directories: DIRECTORIES.iter().map(|d| d.to_string()).collect(),
            };
            let json = serde_json::to_vec_pretty(&p).map_err(|e| e.to_string())?;
            state::write_atomic(&at(state::PROVISIONED), &json, 0o644)
                .map_err(|e| format!("recording provisioning: {e}"))?;
            (p, true)
        }
    };

    let previous = fs::read(at(BOOTS))
        .ok()
        .and_then(|b| serde_json::from_slice::<Boots>(&b).ok());
    let boots = Boots {
        count: previous.map_or(1, |b| b.count + 1),
        boot_id,
    };
    let json = serde_json::to_vec(&boots).map_err(|e| e.to_string())?;
    state::write_atomic(&at(BOOTS), &json, 0o644).map_err(|e| format!("writing {BOOTS}: {e}"))?;

    Ok(ProvisionReport {
        provisioned,
        first_boot,
        boots: boots.count,
        machine_id,
        swept,
    })
}

fn is_machine_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

fn new_machine_id() -> Result<String, String> {
    let mut bytes = [0u8; 16];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .map_err(|e| format!("reading /dev/urandom: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(name: &str, serial: Option<&str>, probe: Probe) -> (BlockDevice, Probe) {
        (
            BlockDevice {
                name: name.into(),
                node: Path::new("/dev").join(name),
                serial: serial.map(str::to_string),
                partname: None,
                size_bytes: 1 << 30,
            },
            probe,
        )
    }

    fn ext4(label: &str) -> Probe {
        Probe {
            fstype: Some("ext4"),
            label: Some(label.into()),
            uuid: Some("u".into()),
            blank: false,
        }
    }

    fn blank() -> Probe {
        Probe {
            blank: true,
            ..Probe::default()
        }
    }

    #[test]
    fn a_labelled_filesystem_is_checked_a_blank_designated_disk_formatted() {
        let root = disk("vda", Some("keel-root"), Probe::default());
        assert_eq!(
            plan(&[root.clone(), disk("vdb", None, ext4(DATA_LABEL))]),
            VarDiskPlan::CheckAndMount(1)
        );
        assert_eq!(
            plan(&[root.clone(), disk("vdb", Some(DATA_LABEL), blank())]),
            VarDiskPlan::FormatAndMount(1)
        );
        // A blank disk nobody designated is left alone.
        assert_eq!(
            plan(&[root.clone(), disk("vdb", None, blank())]),
            VarDiskPlan::NoDisk
        );
        assert_eq!(plan(&[]), VarDiskPlan::NoDisk);
    }

    #[test]
    fn a_designated_disk_holding_anything_else_is_never_formatted() {
        let p = plan(&[disk("vdb", Some(DATA_LABEL), ext4("OTHER"))]);
        assert!(
            matches!(&p, VarDiskPlan::Refuse(why) if why.contains("not formatted")),
            "{p:?}"
        );
        let p = plan(&[disk("vdb", Some(DATA_LABEL), Probe::default())]);
        assert!(matches!(&p, VarDiskPlan::Refuse(_)), "{p:?}");
        let p = plan(&[
            disk("vdb", None, ext4(DATA_LABEL)),
            disk("vdc", None, ext4(DATA_LABEL)),
        ]);
        assert!(
            matches!(&p, VarDiskPlan::Refuse(why) if why.contains("vdb, vdc")),
            "{p:?}"
        );
    }

    #[test]
    fn provisioning_runs_once_and_boots_are_counted() {
        let root = tempfile::tempdir().unwrap();
        let first = provision(root.path(), Some("u1")).unwrap();
        assert!(first.first_boot);
        assert_eq!(first.boots, 1);
        assert!(root.path().join("var/lib/keel/volumes").is_dir());
        assert!(is_machine_id(&first.machine_id));

        // An interrupted write of a later boot is swept, and the record is kept.
        fs::write(root.path().join("var/lib/keel/.boots.json.tmp"), b"{\"cou").unwrap();
        let second = provision(root.path(), Some("u1")).unwrap();
        assert!(!second.first_boot);
        assert_eq!(second.boots, 2);
        assert_eq!(second.machine_id, first.machine_id);
        assert_eq!(second.provisioned, first.provisioned);
        assert_eq!(second.swept.len(), 1);
    }
}
