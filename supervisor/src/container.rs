//! From a container definition and its image to a [`Plan`]: pure logic, testable without root.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use keel_config::Container;

use crate::spawn::{Namespaces, Plan, Step, cstring, exec_candidates, path_cstring};

/// The parts of an OCI image configuration that decide how the process starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageProcess {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub workdir: Option<String>,
}

impl ImageProcess {
    pub fn from_oci(config: &oci_spec::image::ImageConfiguration) -> ImageProcess {
        let Some(c) = config.config() else {
            return ImageProcess::default();
        };
        ImageProcess {
            entrypoint: c.entrypoint().clone().unwrap_or_default(),
            cmd: c.cmd().clone().unwrap_or_default(),
            env: c.env().clone().unwrap_or_default(),
            workdir: c.working_dir().clone().filter(|w| !w.is_empty()),
        }
    }
}

/// The process a container runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSpec {
    pub argv: Vec<String>,
    /// NAME=value, image variables first, overridden by name from the host file.
    pub env: Vec<String>,
    pub workdir: String,
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Docker's rules: a host-file `entrypoint` replaces the image's and drops the image's Cmd;
/// a host-file `command` replaces the Cmd; argv = entrypoint + cmd.
pub fn resolve_process(
    name: &str,
    image: &ImageProcess,
    container: &Container,
) -> Result<ProcessSpec, String> {
    let (entrypoint, cmd) = match (&container.entrypoint, &container.command) {
        (Some(ep), Some(cmd)) => (ep.clone(), cmd.clone()),
        (Some(ep), None) => (ep.clone(), Vec::new()),
        (None, Some(cmd)) => (image.entrypoint.clone(), cmd.clone()),
        (None, None) => (image.entrypoint.clone(), image.cmd.clone()),
    };
    let argv: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if argv.is_empty() {
        return Err("nothing to run: the image has no Entrypoint or Cmd and the host file sets no `command`".into());
    }

    let mut env: BTreeMap<String, (usize, String)> = BTreeMap::new();
    let mut order = 0;
    let mut set = |k: &str, v: &str, env: &mut BTreeMap<String, (usize, String)>| {
        let position = env.get(k).map(|(p, _)| *p).unwrap_or_else(|| {
            order += 1;
            order
        });
        env.insert(k.to_string(), (position, v.to_string()));
    };
    for var in &image.env {
        if let Some((k, v)) = var.split_once('=') {
            set(k, v, &mut env);
        }
    }
    for (k, v) in &container.env {
        set(k, v, &mut env);
    }
    if !env.contains_key("PATH") {
        set("PATH", DEFAULT_PATH, &mut env);
    }
    if !env.contains_key("HOSTNAME") {
        set("HOSTNAME", name, &mut env);
    }
    let mut ordered: Vec<(usize, String)> = env
        .into_iter()
        .map(|(k, (p, v))| (p, format!("{k}={v}")))
        .collect();
    ordered.sort();

    let workdir = container
        .workdir
        .clone()
        .or_else(|| image.workdir.clone())
        .unwrap_or_else(|| "/".into());
    Ok(ProcessSpec {
        argv,
        env: ordered.into_iter().map(|(_, e)| e).collect(),
        workdir,
    })
}

/// Where a container's files live on the host.
#[derive(Debug, Clone)]
pub struct ContainerDirs {
    pub upper: PathBuf,
    pub work: PathBuf,
    pub rootfs: PathBuf,
}

impl ContainerDirs {
    pub fn under(state_dir: &Path, name: &str) -> ContainerDirs {
        let base = state_dir.join(name);
        ContainerDirs {
            upper: base.join("upper"),
            work: base.join("work"),
            rootfs: base.join("rootfs"),
        }
    }

    pub fn create(&self) -> io::Result<()> {
        for dir in [&self.upper, &self.work, &self.rootfs] {
            std::fs::create_dir_all(dir)?;
        }
        Ok(())
    }
}

/// Overlay options; `lower_bottom_first` comes from the image (bottom layer first) and
/// overlayfs wants the topmost lower first.
pub fn overlay_options(lower_bottom_first: &[PathBuf], dirs: &ContainerDirs) -> String {
    let lower: Vec<String> = lower_bottom_first
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect();
    format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        dirs.upper.display(),
        dirs.work.display()
    )
}

/// The ordered setup steps and the exec of one container.
pub fn build_plan(
    name: &str,
    process: &ProcessSpec,
    overlay: &str,
    dirs: &ContainerDirs,
    namespaces: Namespaces,
) -> io::Result<Plan> {
    use libc::{MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_PRIVATE, MS_RDONLY, MS_REC, MS_STRICTATIME};
    let root = &dirs.rootfs;
    let at = |rel: &str| path_cstring(&root.join(rel));
    let mount = |source: Option<&str>,
                 target: &str,
                 fstype: Option<&str>,
                 flags: libc::c_ulong,
                 data: Option<&str>|
     -> io::Result<Step> {
        Ok(Step::Mount {
            source: source.map(cstring).transpose()?,
            target: at(target)?,
            fstype: fstype.map(cstring).transpose()?,
            flags,
            data: data.map(cstring).transpose()?,
        })
    };
    let mkdir = |rel: &str, mode: libc::mode_t| -> io::Result<Step> {
        Ok(Step::Mkdir {
            path: at(rel)?,
            mode,
        })
    };

    let mut steps = vec![
        Step::Unshare {
            flags: libc::CLONE_NEWCGROUP,
        },
        // Nothing the container mounts may propagate back to the host.
        Step::Mount {
            source: None,
            target: cstring("/")?,
            fstype: None,
            flags: MS_REC | MS_PRIVATE,
            data: None,
        },
        Step::Mount {
            source: Some(cstring("overlay")?),
            target: path_cstring(root)?,
            fstype: Some(cstring("overlay")?),
            flags: 0,
            data: Some(cstring(overlay)?),
        },
        mkdir("proc", 0o555)?,
        mount(
            Some("proc"),
            "proc",
            Some("proc"),
            MS_NOSUID | MS_NODEV | MS_NOEXEC,
            None,
        )?,
        mkdir("sys", 0o555)?,
        mount(
            Some("sysfs"),
            "sys",
            Some("sysfs"),
            MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY,
            None,
        )?,
        // The container's own cgroup (it has a cgroup namespace) appears as the root.
        mount(
            Some("cgroup2"),
            "sys/fs/cgroup",
            Some("cgroup2"),
            MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY,
            None,
        )?,
        mkdir("dev", 0o755)?,
        mount(
            Some("tmpfs"),
            "dev",
            Some("tmpfs"),
            MS_NOSUID | MS_STRICTATIME,
            Some("mode=755,size=65536k"),
        )?,
    ];
    for (node, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        steps.push(Step::CharDevice {
            path: at(&format!("dev/{node}"))?,
            mode: 0o666,
            major,
            minor,
        });
    }
    steps.extend([
        mkdir("dev/pts", 0o755)?,
        mount(
            Some("devpts"),
            "dev/pts",
            Some("devpts"),
            MS_NOSUID | MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
        )?,
        mkdir("dev/shm", 0o1777)?,
        mount(
            Some("shm"),
            "dev/shm",
            Some("tmpfs"),
            MS_NOSUID | MS_NODEV | MS_NOEXEC,
            Some("mode=1777,size=65536k"),
        )?,
        mkdir("dev/mqueue", 0o755)?,
        mount(
            Some("mqueue"),
            "dev/mqueue",
            Some("mqueue"),
            MS_NOSUID | MS_NODEV | MS_NOEXEC,
            None,
        )?,
    ]);
    for (link, target) in [
        ("dev/ptmx", "pts/ptmx"),
        ("dev/fd", "/proc/self/fd"),
        ("dev/stdin", "/proc/self/fd/0"),
        ("dev/stdout", "/proc/self/fd/1"),
        ("dev/stderr", "/proc/self/fd/2"),
        ("dev/core", "/proc/kcore"),
    ] {
        steps.push(Step::Symlink {
            target: cstring(target)?,
            link: at(link)?,
        });
    }
    steps.extend([
        Step::PivotRoot {
            new_root: path_cstring(root)?,
        },
        Step::Hostname {
            name: cstring(name)?,
        },
        Step::Chdir {
            path: cstring(&process.workdir)?,
        },
    ]);

    let path_var = process.env.iter().find_map(|e| e.strip_prefix("PATH="));
    let exec_paths = exec_candidates(&process.argv[0], path_var)
        .iter()
        .map(cstring)
        .collect::<io::Result<_>>()?;
    Ok(Plan {
        namespaces,
        steps,
        exec_paths,
        argv: process
            .argv
            .iter()
            .map(cstring)
            .collect::<io::Result<_>>()?,
        envp: process.env.iter().map(cstring).collect::<io::Result<_>>()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_config::RestartPolicy;

    fn container() -> Container {
        Container {
            image: "img".into(),
            entrypoint: None,
            command: None,
            env: BTreeMap::new(),
            workdir: None,
            restart: RestartPolicy::Always,
            console: true,
            isolation: keel_config::Isolation {
                network: keel_config::NetworkMode::Host,
                host_pid: false,
                userns: None,
                readonly_rootfs: false,
                privileged: false,
                init: false,
                cap_add: vec![],
                cap_drop: vec![],
                no_new_privileges: true,
                user: None,
                sysctls: BTreeMap::new(),
                rlimits: BTreeMap::new(),
                shm_size: 64 << 20,
                tmpfs: vec![],
                volumes: vec![],
            },
            resources: Default::default(),
        }
    }

    fn image() -> ImageProcess {
        ImageProcess {
            entrypoint: vec!["/bin/httpd".into()],
            cmd: vec!["-f".into()],
            env: vec!["PATH=/bin".into(), "A=image".into()],
            workdir: Some("/www".into()),
        }
    }

    #[test]
    fn the_image_decides_when_the_host_file_is_silent() {
        let p = resolve_process("web", &image(), &container()).unwrap();
        assert_eq!(p.argv, ["/bin/httpd", "-f"]);
        assert_eq!(p.env, ["PATH=/bin", "A=image", "HOSTNAME=web"]);
        assert_eq!(p.workdir, "/www");
    }

    #[test]
    fn command_replaces_cmd_and_keeps_the_entrypoint() {
        let mut c = container();
        c.command = Some(vec!["-p".into(), "80".into()]);
        assert_eq!(
            resolve_process("web", &image(), &c).unwrap().argv,
            ["/bin/httpd", "-p", "80"]
        );
    }

    #[test]
    fn entrypoint_replaces_both() {
        let mut c = container();
        c.entrypoint = Some(vec!["/bin/sh".into()]);
        assert_eq!(
            resolve_process("web", &image(), &c).unwrap().argv,
            ["/bin/sh"]
        );
        c.command = Some(vec!["-c".into(), "true".into()]);
        assert_eq!(
            resolve_process("web", &image(), &c).unwrap().argv,
            ["/bin/sh", "-c", "true"]
        );
    }

    #[test]
    fn host_env_overrides_by_name_and_workdir_wins() {
        let mut c = container();
        c.env.insert("A".into(), "host".into());
        c.env.insert("B".into(), "new".into());
        c.workdir = Some("/srv".into());
        let p = resolve_process("web", &image(), &c).unwrap();
        assert_eq!(p.env, ["PATH=/bin", "A=host", "B=new", "HOSTNAME=web"]);
        assert_eq!(p.workdir, "/srv");
    }

    #[test]
    fn defaults_fill_path_and_workdir() {
        let img = ImageProcess {
            cmd: vec!["sh".into()],
            ..Default::default()
        };
        let p = resolve_process("x", &img, &container()).unwrap();
        assert_eq!(p.env[0], format!("PATH={DEFAULT_PATH}"));
        assert_eq!(p.workdir, "/");
    }

    #[test]
    fn nothing_to_run_is_an_error() {
        assert!(resolve_process("x", &ImageProcess::default(), &container()).is_err());
    }

    #[test]
    fn overlay_puts_the_top_layer_first() {
        let dirs = ContainerDirs::under(Path::new("/run/keel/containers"), "web");
        let opts = overlay_options(&["/l/base".into(), "/l/site".into()], &dirs);
        assert_eq!(
            opts,
            "lowerdir=/l/site:/l/base,upperdir=/run/keel/containers/web/upper,workdir=/run/keel/containers/web/work"
        );
    }

    #[test]
    fn the_plan_mounts_before_pivoting_and_pivots_before_exec_setup() {
        let dirs = ContainerDirs::under(Path::new("/run/keel/containers"), "web");
        let p = resolve_process("web", &image(), &container()).unwrap();
        let plan = build_plan("web", &p, "lowerdir=/a", &dirs, Namespaces { pid: true }).unwrap();
        let names: Vec<String> = plan.steps.iter().map(Step::describe).collect();
        let pos = |needle: &str| {
            names
                .iter()
                .position(|n| n.contains(needle))
                .unwrap_or_else(|| panic!("{needle} in {names:?}"))
        };
        assert!(
            names[0].starts_with("unshare"),
            "the cgroup namespace comes first: {names:?}"
        );
        assert!(names[1].contains("(bind/propagation) on /"), "{names:?}");
        assert!(pos("mount overlay") < pos("mount proc"));
        assert!(
            pos("mount tmpfs on /run/keel/containers/web/rootfs/dev")
                < pos("mknod /run/keel/containers/web/rootfs/dev/null")
        );
        assert!(pos("mount mqueue") < pos("pivot_root"));
        assert!(pos("pivot_root") < pos("sethostname web"));
        assert!(pos("sethostname") < pos("chdir to the working directory /www"));
        assert_eq!(plan.exec_paths, [cstring("/bin/httpd").unwrap()]);
        assert_eq!(plan.argv.len(), 2);
    }
}
