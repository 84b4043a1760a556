//! Helper processes: the work PID 1 hands to a process of its own because the input is
//! hostile or the work long (`keel-init --unpack`, `--populate`, `--empty-trash`). Each is
//! `keel-init --MODE ERROR_FILE ARGS...`: it writes why it failed to ERROR_FILE, which PID 1
//! reads back when it reaps it, and it is killed past its time limit. The limit names the
//! helper by a serial, not by its pid, which a later process may have been given.

use super::*;

/// Where helpers leave why they failed, one file each.
const HELPER_ERRORS: &str = "/run/keel/helpers";

/// The longest failure message read back.
const ERROR_MAX: u64 = 4096;

/// A running helper process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Helper {
    pub pid: libc::pid_t,
    pub serial: u64,
    error_file: std::path::PathBuf,
    /// The helper cgroup's OOM kills when it started: more at its end name the cause.
    oom_kills: Option<u64>,
}

/// The helper cgroup (every helper moves itself there first).
fn helper_cgroup() -> crate::cgroup::Cgroup {
    crate::cgroup::Cgroup::at(
        Path::new(crate::cgroup::CGROUP_ROOT).join(crate::cgroup::UNPACK_CGROUP),
    )
}

impl Helper {
    /// Ok if it exited 0; else what it wrote to its error file, or `otherwise` and its
    /// status. Its error file is removed either way.
    pub(super) fn outcome(&self, status: ExitStatus, otherwise: &str) -> Result<(), String> {
        let written = (status != ExitStatus::Code(0))
            .then(|| {
                use std::io::Read;
                let mut text = String::new();
                std::fs::File::open(&self.error_file)
                    .ok()?
                    .take(ERROR_MAX)
                    .read_to_string(&mut text)
                    .ok()?;
                Some(text)
            })
            .flatten();
        let _ = std::fs::remove_file(&self.error_file);
        if status == ExitStatus::Code(0) {
            return Ok(());
        }
        let cgroup = helper_cgroup();
        let oom = status == ExitStatus::Signal(libc::SIGKILL)
            && cgroup.keyed("memory.events", "oom_kill") > self.oom_kills;
        if oom {
            let limit = cgroup
                .number("memory.max")
                .map_or_else(|| "its limit".to_string(), |b| format!("{} MiB", b >> 20));
            return Err(format!(
                "{otherwise}: the helper ran out of memory ({limit}, the helper cgroup's memory.max; on a host whose /var is a tmpfs, the files it writes count too: give the host a data disk)"
            ));
        }
        Err(match written {
            Some(text) if !text.trim().is_empty() => text.trim().to_string(),
            _ => format!("{otherwise}: the helper process {status}"),
        })
    }
}

/// A helper's `UID GID SIZE` arguments for a user namespace's id shift (none without one).
pub(super) fn shift_args(shift: Option<(u32, u32, u32)>) -> Vec<std::ffi::OsString> {
    shift
        .map(|(uid, gid, size)| [uid, gid, size].map(|n| n.to_string().into()).to_vec())
        .unwrap_or_default()
}

/// The helper `pid` among the running ones of `states`, with its key.
pub(super) fn running_helper<K: Clone, S>(
    states: &BTreeMap<K, S>,
    pid: libc::pid_t,
    helper: fn(&S) -> Option<&Helper>,
) -> Option<(K, Helper)> {
    states.iter().find_map(|(key, state)| {
        helper(state)
            .filter(|h| h.pid == pid)
            .map(|h| (key.clone(), h.clone()))
    })
}

/// Whether what a container's start waits for (its layers, its new volumes) is there.
pub(super) enum Readiness {
    Ready,
    /// A helper is making it: `advance` tries the start again when it ends.
    Pending,
    Failed(String),
}

impl Supervisor {
    /// Whether `name`'s start may go on past `gate`; a failed gate fails the container.
    pub(super) fn passes(&mut self, name: &str, gate: fn(&mut Self, &str) -> Readiness) -> bool {
        match gate(self, name) {
            Readiness::Ready => true,
            Readiness::Pending => false,
            Readiness::Failed(why) => {
                log::error!("{name}: cannot be started: {why}");
                if let Some(m) = self.containers.get_mut(name) {
                    m.state = ContainerState::Failed(why);
                }
                false
            }
        }
    }

    /// Starts `keel-init --MODE ERROR_FILE ARGS...`, to be killed after `limit`.
    pub(super) fn spawn_helper(
        &mut self,
        mode: &str,
        args: &[std::ffi::OsString],
        limit: Duration,
    ) -> std::io::Result<Helper> {
        std::fs::create_dir_all(HELPER_ERRORS)?;
        self.helper_serial += 1;
        let serial = self.helper_serial;
        // Named after the serial: image and volume names are not paths.
        let error_file = Path::new(HELPER_ERRORS).join(format!("{serial}.error"));
        let _ = std::fs::remove_file(&error_file);
        let child = std::process::Command::new("/proc/self/exe")
            .arg(format!("--{mode}"))
            .arg(&error_file)
            .args(args)
            .stdin(std::process::Stdio::null())
            .spawn()?;
        let helper = Helper {
            pid: child.id() as libc::pid_t,
            serial,
            error_file,
            oom_kills: helper_cgroup().keyed("memory.events", "oom_kill"),
        };
        self.schedule(limit, Event::HelperTimeout { serial });
        Ok(helper)
    }

    /// The time limit of helper `serial`: it is killed if it still runs.
    pub(super) fn helper_timed_out(&mut self, serial: u64) {
        let running = self
            .unpacks
            .values()
            .filter_map(UnpackState::helper)
            .chain(self.populates.values().filter_map(PopulateState::helper))
            .chain(self.trash_helper.as_ref())
            .find(|h| h.serial == serial);
        if let Some(helper) = running {
            log::error!(
                "helper pid {} still runs at its time limit: killing it",
                helper.pid
            );
            // Still ours: its exit has not been reaped (that would have ended its state).
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(helper.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}
