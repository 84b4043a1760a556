//! One container's runtime side, without supervision: prepared once (image unpacked,
//! directories, cgroup), then started any number of times. The supervisor drives it; the
//! start-latency benchmark drives it directly, so it measures the same path.

use std::os::fd::{OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

use keel_config::{Container, NetworkMode, VolumeSource};

use crate::caps::{self, CapSet};
use crate::cgroup::Cgroup;
use crate::container::{
    ContainerDirs, ExtraMount, ImageProcess, ProcessSpec, Security, build_plan, check_mount_target,
    overlay_options, resolve_process,
};
use crate::device_policy::DevicePrograms;
use crate::paths::Paths;
use crate::seccomp::ProgramCache;
use crate::setup_error::SetupError;
use crate::spawn::{IdMap, SetupPlan, SetupStep, Spawned, spawn};
use crate::user;

/// What every start shares: where things live, the compiled seccomp programs, kernel facts.
pub struct Runtime {
    pub paths: Paths,
    /// Parent of every container cgroup (`/sys/fs/cgroup/keel`).
    pub cgroups: Cgroup,
    seccomp: ProgramCache,
    devices: DevicePrograms,
    last_cap: u32,
    time_namespace: bool,
}

impl Runtime {
    pub fn new(paths: Paths, cgroups: Cgroup) -> Runtime {
        Runtime {
            paths,
            cgroups,
            seccomp: ProgramCache::new(),
            devices: DevicePrograms::default(),
            last_cap: caps::last_cap(),
            time_namespace: std::path::Path::new("/proc/self/ns/time").exists(),
        }
    }

    /// How many distinct seccomp programs were compiled so far.
    pub fn seccomp_programs(&self) -> usize {
        self.seccomp.compiled()
    }
}

/// A started container process, with what its start knew.
pub struct Started {
    pub spawned: Spawned,
    /// The plan's steps, described, for the error pipe's report.
    pub steps: Vec<String>,
    /// The cgroup's OOM kill count before this run (its own kills are those after).
    pub oom_kills_before: u64,
}

/// Why [`Instance::start`] did not start a process.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The container cannot start as defined (its cgroup, its plan): it fails until its
    /// definition or its files change.
    #[error(transparent)]
    Setup(SetupError),
    /// The clone itself failed (descriptors, memory, pids): the restart policy decides.
    #[error("clone3 failed: {0}")]
    Spawn(String),
}

/// What an exec runs and how its streams are connected.
pub struct ExecSpec<'a> {
    pub argv: &'a [String],
    /// `NAME=value` entries added to the container's environment.
    pub env: &'a [String],
    pub stdio: [RawFd; 3],
    /// A terminal from the container's devpts instead of `stdio`.
    pub terminal: Option<crate::container::ExecTerminal>,
}

/// A prepared container.
///
/// Its definition is not kept here: the supervisor holds it once (a live apply may change
/// it in place) and hands it to every call that needs it.
pub struct Instance {
    name: String,
    process: ProcessSpec,
    /// The image's StopSignal and Volumes.
    image_stop_signal: Option<i32>,
    image_volumes: Vec<String>,
    overlay: String,
    dirs: ContainerDirs,
    /// The overlay upper, then the image layers from the top down.
    layers_top_first: Vec<PathBuf>,
    cgroup: Cgroup,
    userns: Option<IdMap>,
    /// The host side of the container's sd_notify socket, when it has one.
    notify_socket: Option<PathBuf>,
}

impl Instance {
    /// Finds the image's layers in the shared store (unpacked there beforehand), creates
    /// the container's directories and its cgroup with the configured limits.
    ///
    /// With a user namespace (`userns`), the layers are the copies unpacked with their owners
    /// shifted into the container's id range, and its upper directory belongs to its root.
    pub fn prepare(
        runtime: &Runtime,
        name: &str,
        config: &Container,
        userns: Option<IdMap>,
    ) -> Result<Instance, SetupError> {
        let paths = &runtime.paths;
        let layout = paths.open_image(&config.image)?;
        let lowers = image_lowers(paths, &layout, &config.image, userns)?;
        let image = ImageProcess::from_oci(layout.config());
        if !image.exposed_ports.is_empty() {
            log::info!(
                "{name}: image {} exposes {} (publish them with `ports`)",
                config.image,
                image.exposed_ports.join(", ")
            );
        }
        let process = resolve_process(name, &image, config)?;
        let mut dirs = ContainerDirs::under(&paths.containers, name);
        dirs.lower_root = paths.layers.clone();
        dirs.create().map_err(|source| SetupError::CreateDirs {
            path: paths.containers.join(name),
            source,
        })?;
        if let Some(map) = userns {
            std::os::unix::fs::chown(&dirs.upper, Some(map.uid), Some(map.gid)).map_err(
                |source| SetupError::ChownUpper {
                    path: dirs.upper.clone(),
                    source,
                },
            )?;
        }
        let short =
            keel_image::layer_store::short_lowers(&paths.layers, &lowers).map_err(|source| {
                SetupError::ShortLinks {
                    image: config.image.clone(),
                    source,
                }
            })?;
        let overlay = overlay_options(&short, &dirs);
        let cgroup = runtime
            .cgroups
            .child(name, &config.resources)
            .map_err(SetupError::Cgroup)?;
        let layers_top_first = std::iter::once(dirs.upper.clone())
            .chain(lowers.iter().rev().cloned())
            .collect();
        log::info!(
            "{name}: image {} ready ({} layers), runs {:?}",
            config.image,
            lowers.len(),
            process.argv
        );
        Ok(Instance {
            name: name.to_string(),
            process,
            image_stop_signal: image.stop_signal,
            image_volumes: image.volumes,
            overlay,
            dirs,
            layers_top_first,
            cgroup,
            userns,
            notify_socket: None,
        })
    }

    /// Gives the container an sd_notify socket (bound at /dev/notify.sock, NOTIFY_SOCKET).
    pub fn set_notify_socket(&mut self, host_path: PathBuf) {
        self.notify_socket = Some(host_path);
    }

    /// Recreates the container's cgroup if it was removed (after a stop for good), so the
    /// next start has one to clone into.
    fn ensure_cgroup(&mut self, runtime: &Runtime, config: &Container) -> Result<(), SetupError> {
        if self.cgroup.path().is_dir() {
            return Ok(());
        }
        let cgroup = runtime
            .cgroups
            .child(&self.name, &config.resources)
            .map_err(SetupError::Cgroup)?;
        self.cgroup = cgroup;
        Ok(())
    }

    /// The cgroup directory to clone into, opened for the moment of the clone: held open per
    /// container it would cost PID 1 a descriptor for each (see crate::fds).
    fn cgroup_dir(&self) -> std::io::Result<OwnedFd> {
        self.cgroup.open_dir().map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "opening cgroup {}: {}",
                    self.cgroup.path().display(),
                    crate::fds::explain(&e)
                ),
            )
        })
    }

    /// The host file's stop signal, else the image's StopSignal, else SIGTERM.
    pub fn stop_signal(&self, config: &Container) -> i32 {
        config
            .lifecycle
            .stop_signal
            .or(self.image_stop_signal)
            .unwrap_or(libc::SIGTERM)
    }

    pub fn cgroup(&self) -> &Cgroup {
        &self.cgroup
    }

    /// Starts the container's process (`stdio` become its fds 0, 1 and 2): recreates its
    /// cgroup if a stop removed it, builds the plan, clears what a previous run left in the
    /// cgroup and clones. The one call the supervisor makes to start a container.
    pub fn start(
        &mut self,
        runtime: &mut Runtime,
        config: &Container,
        stdio: [RawFd; 3],
    ) -> Result<Started, StartError> {
        self.ensure_cgroup(runtime, config)
            .map_err(StartError::Setup)?;
        let plan = self.plan(runtime, config).map_err(StartError::Setup)?;
        // Opened once for both the device policy and the clone.
        let cgroup_dir = self
            .cgroup_dir()
            .map_err(|e| StartError::Spawn(crate::fds::explain(&e)))?;
        // Before the first process is in the cgroup, and at every start: the container may
        // have been made privileged, or not, since its cgroup was created.
        runtime
            .devices
            .apply(&cgroup_dir, config.isolation.privileged)
            .map_err(|e| StartError::Setup(SetupError::DevicePolicy(e)))?;
        // Leftovers of a previous run (possible when it shared the host pid namespace)
        // must not share the cgroup with the new one.
        if !self.cgroup.is_empty() {
            let _ = self.cgroup.kill_all();
        }
        let oom_kills_before = self.cgroup.keyed("memory.events", "oom_kill").unwrap_or(0);
        let spawned = self
            .spawn_into(&plan, &cgroup_dir, stdio)
            .map_err(|e| StartError::Spawn(crate::fds::explain(&e)))?;
        Ok(Started {
            spawned,
            steps: plan.steps.iter().map(SetupStep::describe).collect(),
            oom_kills_before,
        })
    }

    /// The setup plan of the next start. Built at every start: the container may have
    /// changed its own files (its /etc/passwd, a symlink where a volume goes) since the last.
    pub fn plan(&self, runtime: &mut Runtime, config: &Container) -> Result<SetupPlan, SetupError> {
        let (security, process) = self.security(runtime, config)?;
        build_plan(&self.name, &process, &self.overlay, &self.dirs, &security)
            .map_err(SetupError::Plan)
    }

    /// Starts the container's process; `stdio` become its fds 0, 1 and 2.
    pub fn spawn(&self, plan: &SetupPlan, stdio: [RawFd; 3]) -> std::io::Result<Spawned> {
        self.spawn_into(plan, &self.cgroup_dir()?, stdio)
    }

    /// [`Instance::spawn`] into the container's cgroup already open at `cgroup_dir`.
    fn spawn_into(
        &self,
        plan: &SetupPlan,
        cgroup_dir: &OwnedFd,
        stdio: [RawFd; 3],
    ) -> std::io::Result<Spawned> {
        if plan.userns.is_none() {
            return spawn(plan, cgroup_dir, stdio);
        }
        // The child's mount namespace is a copy of ours taken at clone3: mount the overlay
        // here, clone, and take it away again from PID 1's namespace.
        let root = &self.dirs.rootfs;
        // The lowerdirs are relative to the layer store. PID 1 is single-threaded, so its
        // working directory is nobody else's; it goes back to / right after.
        std::env::set_current_dir(&self.dirs.lower_root)?;
        let mounted = nix::mount::mount(
            Some("overlay"),
            root,
            Some("overlay"),
            nix::mount::MsFlags::MS_NODEV,
            Some(self.overlay.as_str()),
        );
        if let Err(e) = std::env::set_current_dir("/") {
            log::error!("returning to / after mounting {}: {e}", root.display());
        }
        mounted.map_err(|e| {
            std::io::Error::new(
                std::io::Error::from(e).kind(),
                format!("mounting the overlay on {}: {e}", root.display()),
            )
        })?;
        let spawned = spawn(plan, cgroup_dir, stdio);
        if let Err(e) = nix::mount::umount2(root, nix::mount::MntFlags::MNT_DETACH) {
            log::warn!(
                "{}: unmounting {} in PID 1's namespace: {e}",
                self.name,
                root.display()
            );
        }
        spawned
    }

    /// Starts `argv` inside the running container whose main process is `container_pidfd`:
    /// its namespaces, cgroup, user, capabilities and seccomp filter.
    pub fn spawn_exec(
        &self,
        runtime: &mut Runtime,
        config: &Container,
        container_pidfd: &OwnedFd,
        exec: ExecSpec<'_>,
    ) -> Result<Spawned, SetupError> {
        let ExecSpec {
            argv,
            env: extra_env,
            stdio,
            terminal,
        } = exec;
        use std::os::fd::AsRawFd;
        let (security, process) = self.security(runtime, config)?;
        // The namespaces the container's start created, decided in the same place.
        let flags = crate::container::namespaces_of(&config.isolation, runtime.time_namespace)
            .join_flags(self.userns.is_some());
        let mut env = process.env.clone();
        for extra in extra_env {
            env.set_entry(extra);
        }
        let plan = crate::container::build_exec_plan(
            container_pidfd.as_raw_fd(),
            flags,
            argv,
            &env,
            &process.workdir,
            &security,
            terminal,
        )
        .map_err(SetupError::Plan)?;
        let cgroup_dir = self.cgroup_dir().map_err(SetupError::CgroupDir)?;
        spawn(&plan, &cgroup_dir, stdio).map_err(|e| SetupError::Clone(crate::fds::explain(&e)))
    }

    /// The container's volumes: the host file's, then an anonymous one for each of the
    /// image's `Volumes` that nothing of the host file's is mounted on.
    pub fn volumes(
        &self,
        runtime: &Runtime,
        config: &Container,
    ) -> Result<Vec<PlannedVolume>, SetupError> {
        let store = crate::volume_store::VolumeStore::new(&runtime.paths.volumes);
        let iso = &config.isolation;
        let mut planned: Vec<PlannedVolume> = iso
            .volumes
            .iter()
            .map(|volume| {
                let (dir, origin) = match &volume.source {
                    VolumeSource::Named(name) if volume.nocopy => {
                        (store.named(name), VolumeOrigin::Empty)
                    }
                    VolumeSource::Named(name) => (store.named(name), VolumeOrigin::CopiedFromImage),
                    VolumeSource::Host(path) => (path.clone(), VolumeOrigin::HostPath),
                };
                PlannedVolume {
                    dir,
                    target: volume.target.clone(),
                    readonly: volume.readonly,
                    suid: volume.suid,
                    origin,
                }
            })
            .collect();
        for path in &self.image_volumes {
            // `..` here would put the volume's mount anywhere on the host (the mount happens
            // before pivot_root).
            use keel_config::container_path::{PathProblem, PathUse, check};
            match check(path, PathUse::MountTarget) {
                Ok(()) | Err(PathProblem::IsRoot) => {}
                Err(problem) => {
                    return Err(SetupError::UnsafePath {
                        what: "image volume",
                        path: path.clone(),
                        problem,
                    });
                }
            }
            let target = format!("/{}", path.trim_matches('/'));
            let covered = iso
                .volumes
                .iter()
                .map(|v| v.target.as_str())
                .chain(iso.tmpfs.iter().map(|t| t.target.as_str()))
                .any(|t| t.trim_end_matches('/') == target);
            if target == "/" || covered {
                continue;
            }
            planned.push(PlannedVolume {
                dir: store.anonymous(&self.name, &target),
                target,
                readonly: false,
                suid: false,
                origin: VolumeOrigin::CopiedFromImage,
            });
        }
        Ok(planned)
    }

    /// Who owns a new volume the image has nothing for: the container's root.
    pub fn root_owner(&self) -> (u32, u32) {
        self.userns.map_or((0, 0), |m| (m.uid, m.gid))
    }

    /// The user namespace's id range, if the container has one.
    pub fn userns(&self) -> Option<IdMap> {
        self.userns
    }

    /// The user from the container's own /etc files, the capabilities, the cached seccomp
    /// program, and volumes resolved on the host.
    fn security(
        &self,
        runtime: &mut Runtime,
        config: &Container,
    ) -> Result<(Security, ProcessSpec), SetupError> {
        let iso = &config.isolation;
        let read = |file: &'static str| -> Result<Option<String>, SetupError> {
            user::read_merged(&self.layers_top_first, file)
                .map(|bytes| bytes.map(|b| String::from_utf8_lossy(&b).into_owned()))
                .map_err(|source| SetupError::ReadImageFile { file, source })
        };
        let user = user::resolve(
            self.process.user.as_deref(),
            read("/etc/passwd")?.as_deref(),
            read("/etc/group")?.as_deref(),
        )?;
        let mut process = self.process.clone();
        if process.env.get("HOME").is_none() {
            process.env.set("HOME", &user.home);
        }

        let names = iso.capabilities();
        let capabilities = CapSet::from_names(&names)?.known_to_kernel(runtime.last_cap);
        let seccomp: Option<Arc<_>> = if iso.privileged {
            None
        } else {
            Some(runtime.seccomp.get(&names).map_err(SetupError::Seccomp)?)
        };

        let mut mounts = Vec::new();
        for volume in self.volumes(runtime, config)? {
            match volume.origin {
                VolumeOrigin::HostPath if !volume.dir.exists() => {
                    return Err(SetupError::MissingVolumeSource(volume.dir));
                }
                // Made by the supervisor before the start (see its populates).
                VolumeOrigin::CopiedFromImage | VolumeOrigin::Empty if volume.is_new() => {
                    return Err(SetupError::VolumeNotMade {
                        target: volume.target,
                        dir: volume.dir,
                    });
                }
                _ => {}
            }
            mounts.push(ExtraMount::Bind {
                source_flags: locked_mount_flags(&volume.dir),
                source: volume.dir,
                target: volume.target,
                readonly: volume.readonly,
                suid: volume.suid,
            });
        }
        for tmpfs in &iso.tmpfs {
            mounts.push(ExtraMount::Tmpfs {
                target: tmpfs.target.clone(),
                size: tmpfs.size,
            });
        }
        for target in ["/proc", "/sys", "/dev"]
            .into_iter()
            .chain(mounts.iter().map(ExtraMount::target))
        {
            check_mount_target(&self.layers_top_first, target).map_err(SetupError::MountTarget)?;
        }
        let (hosts, resolv) = match &iso.network {
            NetworkMode::Bridged(a) => (
                Some(keel_net::hosts::network_hosts_path(&a.network)),
                Some(keel_net::hosts::resolv_conf_path()),
            ),
            NetworkMode::Host => (None, Some(keel_net::hosts::resolv_conf_path())),
            NetworkMode::None => (None, None),
        };
        for (source, target) in [(hosts, "/etc/hosts"), (resolv, "/etc/resolv.conf")] {
            let Some(source) = source.filter(|s| s.exists()) else {
                continue;
            };
            // An image whose /etc/hosts is a symlink keeps its own: following the link
            // could lead the bind anywhere.
            match check_mount_target(&self.layers_top_first, target) {
                Ok(()) => mounts.push(ExtraMount::EtcFile {
                    source,
                    target: target.into(),
                }),
                Err(e) => log::warn!("{}: keeping the image's {target}: {e}", self.name),
            }
        }
        if let Some(socket) = &self.notify_socket {
            mounts.push(ExtraMount::DevFile {
                source: socket.clone(),
                target: crate::notify::CONTAINER_SOCKET.into(),
            });
            process
                .env
                .set("NOTIFY_SOCKET", crate::notify::CONTAINER_SOCKET);
        }
        let mut user = user;
        user.additional_gids = user.setgroups_list();
        let security = Security {
            isolation: iso.clone(),
            user,
            capabilities,
            last_cap: runtime.last_cap,
            seccomp,
            time_namespace: runtime.time_namespace,
            mounts,
            userns: self.userns,
            reaper: if iso.init {
                Some(crate::sealed_reaper::sealed_reaper().map_err(SetupError::Reaper)?)
            } else {
                None
            },
        };
        Ok((security, process))
    }
}

/// The image's unpacked layers, bottom first, as the container's overlay stacks them: the
/// copies shifted for `userns` if it has one, and none below an opaque layer root.
pub fn image_lowers(
    paths: &crate::paths::Paths,
    layout: &keel_image::layout::ImageLayout,
    image: &str,
    userns: Option<IdMap>,
) -> Result<Vec<PathBuf>, SetupError> {
    let shift = userns.map(|m| keel_image::unpack::IdShift {
        uid: m.uid,
        gid: m.gid,
        size: m.size,
    });
    // Unpacked beforehand by a process of its own (`keel-init --unpack`, see the
    // supervisor's unpacks): PID 1 only looks the layers up.
    let mut lowers = keel_image::layer_store::unpacked_layers(layout, &paths.layers, shift)
        .map_err(|source| SetupError::Unpack {
            image: image.to_string(),
            source,
        })?;
    // An opaque marker at a layer's root hides everything below it, but overlayfs
    // ignores opaqueness on a lower layer's root: leave the hidden layers out instead.
    if let Some(top_opaque) = lowers
        .iter()
        .rposition(|dir| keel_image::unpack::root_is_opaque(dir))
    {
        lowers.drain(..top_opaque);
    }
    Ok(lowers)
}

/// How a volume's directory comes to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeOrigin {
    /// A host path: it must exist, and is mounted as it is.
    HostPath,
    /// A volume of the store made on first use from the image's content at its target
    /// (see crate::copy_up).
    CopiedFromImage,
    /// A named volume with `nocopy`: made empty on first use.
    Empty,
}

/// A volume of the container, resolved on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedVolume {
    pub dir: PathBuf,
    pub target: String,
    pub readonly: bool,
    pub suid: bool,
    pub origin: VolumeOrigin,
}

impl PlannedVolume {
    /// A volume of the store that does not exist yet: its first use makes it.
    pub fn is_new(&self) -> bool {
        self.origin != VolumeOrigin::HostPath && self.dir.symlink_metadata().is_err()
    }
}

/// The flags of the mount `path` is on that a bind remount of it must keep: MS_RDONLY,
/// MS_NOSUID, MS_NOEXEC (MS_NODEV is always set on volumes). Unknown if statvfs fails: then
/// nothing extra, and a remount the kernel refuses names itself in the start error.
fn locked_mount_flags(path: &std::path::Path) -> libc::c_ulong {
    use nix::sys::statvfs::{FsFlags, statvfs};
    let Ok(st) = statvfs(path) else {
        return 0;
    };
    let flags = st.flags();
    let mut out = 0;
    for (fs, ms) in [
        (FsFlags::ST_RDONLY, libc::MS_RDONLY),
        (FsFlags::ST_NOSUID, libc::MS_NOSUID),
        (FsFlags::ST_NOEXEC, libc::MS_NOEXEC),
    ] {
        if flags.contains(fs) {
            out |= ms;
        }
    }
    out
}
