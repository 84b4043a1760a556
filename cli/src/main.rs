//! `keel`: build a Keel host from its host file and boot it in QEMU.

mod boot_disk;
mod build;
mod compose;
mod control;
mod disks;
mod pki;
mod pull;
mod terminal;
mod upgrade;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use keel_config::HostConfig;
use keel_qemu::{PortForward, VmConfig};

#[derive(Parser)]
#[command(
    name = "keel",
    version,
    about = "Build Keel hosts and boot them in QEMU"
)]
struct Cli {
    /// Drive the VM that `keel run DIR` runs, through DIR/api.sock (the host end of its
    /// virtio-serial control port). Without it, the API commands use /run/keel/api.sock, as
    /// inside a guest.
    #[arg(long, global = true, value_name = "DIR")]
    vm: Option<PathBuf>,
    /// The control API's unix socket, overriding --vm.
    #[arg(long, global = true, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// With a compose file: a partial host file merged into the conversion ([host], an
    /// [images.NAME] for a local image, keys of a [containers.NAME]).
    #[arg(long, global = true, value_name = "HOST.toml")]
    overlay: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum ComposeCommand {
    /// Translate a compose file into a Keel host file (to stdout, or -o FILE); errors and
    /// warnings name the file, line, service and key.
    Convert {
        compose_file: PathBuf,
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Write an ed25519 key pair that signs updates: DIR/update-key.pem (private, 0600) and
    /// DIR/update-key.pub.pem (for [update] trusted_keys).
    UpdateKey {
        #[arg(short, long)]
        out: PathBuf,
    },
    /// Write an RSA key and self-signed certificate that sign boot files for UEFI Secure
    /// Boot: DIR/secure-boot.key.pem (0600), DIR/secure-boot.crt.pem (for keel build
    /// --secure-boot-cert) and DIR/secure-boot.crt.der (to enroll in the firmware's db).
    SecureBootKey {
        #[arg(short, long)]
        out: PathBuf,
        /// The certificate's common name.
        #[arg(long, default_value = "Keel Secure Boot signing key")]
        name: String,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Keys: `keel pki update-key -o DIR`.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
    /// Compose files: `keel compose convert docker-compose.yml -o host.toml`. (`check`,
    /// `build` and `run` also take a compose file directly.)
    Compose {
        #[command(subcommand)]
        command: ComposeCommand,
    },
    /// Validate a host file and report the first error with its file, line and key.
    Check { host_file: PathBuf },
    /// Build a bootable kernel, stage-1 initramfs and erofs root image (and manifest.json)
    /// from a host file.
    Build {
        host_file: PathBuf,
        /// Output directory [default: out/<hostname>]
        #[arg(short, long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        inputs: Inputs,
    },
    /// Boot a host in QEMU (building it first when given a host file) the way a machine boots
    /// it: UEFI firmware (OVMF) starts the disk image, which the guest writes like its own
    /// disk. With no argument, boots the bundled example with port 8080 published to its web
    /// server.
    Run {
        /// A host file, a directory written by `keel build`, or a raw disk image.
        target: Option<PathBuf>,
        /// Forward 127.0.0.1:HOST on this machine to the guest's GUEST port (TCP).
        #[arg(short, long, value_name = "HOST:GUEST")]
        publish: Vec<PortForward>,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 512)]
        memory: u32,
        /// Write the console to this file instead of the terminal.
        #[arg(long)]
        console: Option<PathBuf>,
        /// Where to build when given a host file [default: out/<hostname>]
        #[arg(short, long)]
        out: Option<PathBuf>,
        /// How long the guest gets to power off after Ctrl-C before QEMU is killed.
        #[arg(long, default_value_t = 60)]
        shutdown_timeout: u64,
        /// Give the guest this host file instead of the one built into the image, through
        /// QEMU's fw_cfg (`opt/keel/config`); it is validated first. The image must hold
        /// the images it names.
        #[arg(long, value_name = "HOST.toml")]
        config: Option<PathBuf>,
        /// Size of the data disk (DIR/data.img, the guest's /var) when it is created; an
        /// existing one is kept as it is.
        #[arg(long, value_name = "SIZE", default_value = "4G", value_parser = disks::parse_size)]
        data_size: u64,
        /// No data disk: /var is a tmpfs, lost at power-off. A disk image always has its
        /// /var partition, so this boots the build directly (implies --direct-kernel).
        #[arg(long)]
        no_data_disk: bool,
        /// Boot with QEMU's -kernel instead of firmware: the build's kernel, initramfs and
        /// root image directly, /var on DIR/data.img. Seconds faster; no boot loader, so no
        /// A/B updates.
        #[arg(long)]
        direct_kernel: bool,
        /// Boot with Secure Boot enforced: Debian's OVMF with its test ("snakeoil") keys
        /// enrolled, which starts only binaries signed with /usr/share/ovmf/PkKek-1-snakeoil.key
        /// (`keel build --secure-boot-key`)
        #[arg(long)]
        secure_boot: bool,
        /// The disk image is extended to this size before a firmware boot if it is smaller
        /// (never shrunk); the guest grows /var into the room.
        #[arg(long, value_name = "SIZE", default_value = "8G", value_parser = disks::parse_size)]
        disk_size: u64,
        #[command(flatten)]
        inputs: Inputs,
    },
    /// Make an OCI image layout from directories, tarballs or `busybox:PATH`, one layer
    /// each, bottom first (like `docker import`).
    Import {
        #[arg(required = true)]
        sources: Vec<String>,
        #[arg(short, long)]
        out: PathBuf,
        /// Entrypoint, one argument per flag.
        #[arg(long = "entrypoint")]
        entrypoint: Vec<String>,
        /// Cmd, one argument per flag.
        #[arg(long = "cmd")]
        cmd: Vec<String>,
        /// NAME=value, repeatable.
        #[arg(long = "env")]
        env: Vec<String>,
        #[arg(long)]
        workdir: Option<String>,
        #[arg(long)]
        user: Option<String>,
        /// Reference name recorded in index.json.
        #[arg(long = "ref")]
        ref_name: Option<String>,
    },
    /// List the containers of a running host: state, pid, uptime, restarts, health, last exit.
    Ps {
        /// The statuses as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Show a container's log (stdout to stdout, stderr to stderr).
    Logs {
        name: String,
        /// Keep following the log as it grows.
        #[arg(short, long)]
        follow: bool,
        /// Only entries since then: a duration back from now (10m, 1h30m, 45s) or an RFC 3339
        /// time (2026-11-27T16:30:00Z).
        #[arg(long, value_name = "DURATION|RFC3339")]
        since: Option<String>,
        /// Only the last N entries.
        #[arg(long, value_name = "N")]
        tail: Option<u64>,
        /// Prefix each line with its time.
        #[arg(short, long)]
        timestamps: bool,
    },
    /// Start a stopped container.
    Start { name: String },
    /// Stop a container (its stop signal, then SIGKILL); it stays stopped until `start`.
    Stop {
        name: String,
        /// Seconds between the stop signal and SIGKILL [default: the container's]
        #[arg(short = 't', long = "time", value_name = "SECONDS")]
        time: Option<f64>,
    },
    /// Restart a container.
    Restart { name: String },
    /// Send a signal to a container's main process (its restart policy then applies).
    Kill {
        /// A name (KILL, SIGTERM, hup) or a number.
        #[arg(short, long, default_value = "KILL")]
        signal: String,
        name: String,
    },
    /// A container's status and configuration, as JSON.
    Inspect { name: String },
    /// cgroup counters: CPU time, memory, pids, OOM kills.
    Stats {
        /// One container [default: all]
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Run a command in a running container (its namespaces, cgroup and security settings);
    /// exits with the command's exit code.
    Exec {
        /// NAME=value added to the container's environment, repeatable.
        #[arg(short, long)]
        env: Vec<String>,
        /// Pass standard input to the command (else it reads /dev/null).
        #[arg(short, long)]
        interactive: bool,
        /// Run the command on a terminal of its own in the container, sized and raw like
        /// this one (Ctrl-C goes to the command); stdout and stderr come together.
        #[arg(short, long)]
        tty: bool,
        name: String,
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "CMD"
        )]
        command: Vec<String>,
    },
    /// Make a running host follow a new host file, without a reboot: only containers whose
    /// definition changed are restarted; an invalid file, or one changing what needs a
    /// reboot, is refused whole.
    Apply {
        host_file: PathBuf,
        /// Show what would change, and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Send a newer build of the host (a `keel build` output directory, signed with
    /// --sign-key) to the running host: it is written to the slot that did not boot and booted
    /// on trial; the host commits it once healthy or falls back to the running version.
    Upgrade {
        dir: PathBuf,
        /// Install it, but boot it only at the next reboot.
        #[arg(long)]
        no_reboot: bool,
    },
    /// The host's version and root slots: which booted, their versions and digests, an
    /// update on trial or rolled back.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Reboot the host.
    Reboot,
    /// Power the host off.
    Poweroff,
}

#[derive(clap::Args)]
struct Inputs {
    /// The static init binary [default: target/<triple>/init/keel-init if built, else
    /// keel-init beside this program]
    #[arg(long, env = "KEEL_INIT")]
    init: Option<PathBuf>,
    /// Download cache for the kernel package [default: ~/.cache/keel]
    #[arg(long, env = "KEEL_CACHE")]
    cache: Option<PathBuf>,
    /// Also write the disk image as qcow2 (disk.qcow2, via qemu-img) beside the raw disk.img
    #[arg(long, value_enum, default_value = "raw")]
    format: boot_disk::DiskFormat,
    /// Sign the update bundle (update.sig) with this ed25519 private key (PEM, made by
    /// `keel pki update-key`): hosts that trust its public key accept the build as an update
    #[arg(long, value_name = "KEY.pem", env = "KEEL_UPDATE_KEY")]
    sign_key: Option<PathBuf>,
    /// Sign systemd-boot and the UKI for UEFI Secure Boot with this RSA key (PEM; made by
    /// `keel pki secure-boot-key`), whose certificate the firmware's db must hold
    #[arg(long, value_name = "KEY.pem", requires = "secure_boot_cert")]
    secure_boot_key: Option<PathBuf>,
    /// The certificate of --secure-boot-key (PEM)
    #[arg(long, value_name = "CERT.pem", requires = "secure_boot_key")]
    secure_boot_cert: Option<PathBuf>,
}

impl Inputs {
    fn options(&self) -> Result<build::BuildOptions, String> {
        let init = match &self.init {
            Some(p) => p.clone(),
            None => {
                let exe = std::env::current_exe().map_err(|e| e.to_string())?;
                // The size-optimised build (profile `init`, target/<triple>/init/) unless the
                // one beside this program is newer: a stale small init must never win.
                let beside = exe.with_file_name("keel-init");
                let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
                let small = exe
                    .parent()
                    .and_then(Path::parent)
                    .map(|dir| dir.join("init/keel-init"));
                match small {
                    Some(small) if modified(&small) >= modified(&beside) && small.is_file() => {
                        small
                    }
                    _ => beside,
                }
            }
        };
        let cache_dir = self
            .cache
            .clone()
            .or_else(keel_qemu::cache_dir)
            .unwrap_or_else(|| PathBuf::from("/var/cache/keel"));
        Ok(build::BuildOptions {
            init,
            cache_dir,
            disk_format: self.format,
            sign_key: self.sign_key.clone(),
            secure_boot: self
                .secure_boot_key
                .clone()
                .zip(self.secure_boot_cert.clone())
                .map(|(key, cert)| boot_disk::SecureBootSigner { key, cert }),
        })
    }
}

/// The bundled example, so `keel run` works before a user writes any file.
const EXAMPLE_HOST: &str = include_str!("../../examples/hello/host.toml");
const EXAMPLE_PAGE: &str = include_str!("../../examples/hello/site/www/index.html");

fn write_example(cache: &Path) -> Result<PathBuf, String> {
    let dir = cache.join("example-hello");
    std::fs::create_dir_all(dir.join("site/www")).map_err(|e| format!("{}: {e}", dir.display()))?;
    std::fs::write(dir.join("host.toml"), EXAMPLE_HOST).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("site/www/index.html"), EXAMPLE_PAGE).map_err(|e| e.to_string())?;
    Ok(dir.join("host.toml"))
}

enum Failure {
    Config(String),
    Other(String),
}

impl From<String> for Failure {
    fn from(s: String) -> Failure {
        Failure::Other(s)
    }
}

/// A host file, or a compose file converted with `overlay`.
fn load(path: &Path, overlay: Option<&Path>) -> Result<(HostConfig, String), Failure> {
    compose::load(path, overlay)
}

fn default_out(config: &HostConfig) -> PathBuf {
    PathBuf::from("out").join(&config.hostname)
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(Failure::Config(e)) => {
            eprintln!("keel: {e}");
            ExitCode::from(2)
        }
        Err(Failure::Other(e)) => {
            eprintln!("keel: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, Failure> {
    let target = control::Target::new(cli.vm, cli.api_socket);
    let overlay = cli.overlay;
    let action = match cli.command {
        Command::Ps { json } => control::Action::Ps { json },
        Command::Logs {
            name,
            follow,
            since,
            tail,
            timestamps,
        } => control::Action::Logs {
            name,
            follow,
            since,
            tail,
            timestamps,
        },
        Command::Start { name } => control::Action::Start { name },
        Command::Stop { name, time } => control::Action::Stop {
            name,
            timeout_s: time,
        },
        Command::Restart { name } => control::Action::Restart { name },
        Command::Kill { signal, name } => control::Action::Kill { name, signal },
        Command::Inspect { name } => control::Action::Inspect { name },
        Command::Stats { name, json } => control::Action::Stats { name, json },
        Command::Exec {
            env,
            interactive,
            tty,
            name,
            command,
        } => control::Action::Exec {
            name,
            command,
            env,
            interactive,
            tty,
        },
        Command::Reboot => control::Action::Reboot,
        Command::Upgrade { dir, no_reboot } => control::Action::Upgrade {
            dir,
            reboot: !no_reboot,
        },
        Command::Status { json } => control::Action::Status { json },
        Command::Poweroff => control::Action::Poweroff,
        Command::Apply { host_file, dry_run } => control::Action::Apply { host_file, dry_run },
        other => return run_local(other, overlay.as_deref()),
    };
    Ok(control::run(&target, action))
}

/// The commands that do not talk to a running host.
fn run_local(command: Command, overlay: Option<&Path>) -> Result<ExitCode, Failure> {
    match command {
        Command::Pki {
            command: PkiCommand::UpdateKey { out },
        } => {
            pki::update_key(&out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Pki {
            command: PkiCommand::SecureBootKey { out, name },
        } => {
            pki::secure_boot_key(&out, &name)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Compose {
            command:
                ComposeCommand::Convert {
                    compose_file,
                    output,
                },
        } => {
            let text = compose::convert(&compose_file, overlay)?;
            // The result must be a host file Keel takes, or the conversion has a bug.
            let beside = compose_file.with_extension("keel.toml");
            if let Err(e) = HostConfig::parse(output.as_deref().unwrap_or(&beside), &text) {
                eprintln!("{text}");
                return Err(Failure::Config(format!(
                    "the converted host file is not valid: {e}"
                )));
            }
            match output {
                Some(path) => {
                    std::fs::write(&path, &text)
                        .map_err(|e| format!("writing {}: {e}", path.display()))?;
                    eprintln!("keel: wrote {}", path.display());
                }
                None => print!("{text}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { host_file } => {
            let (c, _) = load(&host_file, overlay)?;
            println!(
                "{}: ok ({} images, {} containers)",
                host_file.display(),
                c.images.len(),
                c.containers.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Build {
            host_file,
            out,
            inputs,
        } => {
            let (config, text) = load(&host_file, overlay)?;
            let out = out.unwrap_or_else(|| default_out(&config));
            build::build(&config, &text, &out, &inputs.options()?)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            target,
            mut publish,
            memory,
            console,
            out,
            shutdown_timeout,
            config,
            data_size,
            no_data_disk,
            direct_kernel,
            secure_boot,
            disk_size,
            inputs,
        } => {
            let options = inputs.options()?;
            let mut delivered = Vec::new();
            if let Some(path) = &config {
                load(path, None)?;
                delivered = fw_cfg_config_args(path);
            }
            let target = match target {
                Some(t) => t,
                None => {
                    if publish.is_empty() {
                        publish.push(PortForward {
                            host: 8080,
                            guest: 80,
                        });
                    }
                    write_example(&options.cache_dir)?
                }
            };
            let direct_kernel = direct_kernel || no_data_disk;
            let is_host_file = matches!(
                target.extension().and_then(|e| e.to_str()),
                Some("toml" | "yml" | "yaml")
            );
            let (dir, disk_file) = if target.is_dir() {
                (target, None)
            } else if is_host_file || !target.is_file() {
                let (config, text) = load(&target, overlay)?;
                let out = out.unwrap_or_else(|| default_out(&config));
                build::build(&config, &text, &out, &options)?;
                (out, None)
            } else {
                // A disk image: its directory holds the API socket, as a build's does.
                if direct_kernel {
                    return Err(Failure::Other(format!(
                        "{} is a disk image: --direct-kernel (and --no-data-disk) boot a build directory",
                        target.display()
                    )));
                }
                let dir = match target.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                    _ => PathBuf::from("."),
                };
                (dir, Some(target))
            };
            let (cmdline, disks, firmware) = if direct_kernel {
                let manifest = build::read_manifest(&dir)?;
                let disks =
                    disks::run_disks(&dir, &manifest, (!no_data_disk).then_some(data_size))?;
                (manifest.cmdline, disks, None)
            } else {
                let disk = disk_file.unwrap_or_else(|| dir.join(boot_disk::DISK_FILE));
                let (disk, firmware) = disks::firmware_machine(&disk, disk_size, secure_boot)?;
                (String::new(), vec![disk], Some(firmware))
            };
            for p in publish.iter().filter(|p| p.host != 0) {
                eprintln!(
                    "keel: publishing 127.0.0.1:{} -> guest port {}",
                    p.host, p.guest
                );
            }
            // The host end of the guest's control port: `keel --vm DIR ...` connects there.
            let api_socket = dir.join("api.sock");
            eprintln!(
                "keel: control API on {} (keel --vm {} ps)",
                api_socket.display(),
                dir.display()
            );
            let vm = VmConfig {
                kernel: dir.join("vmlinuz"),
                initrd: Some(dir.join("initramfs.img")),
                cmdline,
                firmware,
                memory_mb: memory,
                publish,
                echo_console: console.is_none(),
                console_log: console,
                api_socket: Some(api_socket.clone()),
                disks,
                extra_args: delivered,
                ..VmConfig::default()
            };
            let code = keel_qemu::run_interactive(vm, Duration::from_secs(shutdown_timeout))
                .map_err(|e| e.to_string());
            // QEMU leaves its listening socket behind; nobody answers there any more.
            let _ = std::fs::remove_file(&api_socket);
            let code = code?;
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
        }
        Command::Import {
            sources,
            out,
            entrypoint,
            cmd,
            env,
            workdir,
            user,
            ref_name,
        } => {
            let sources: Vec<keel_image::import::LayerSource> = sources
                .iter()
                .map(|s| match s.strip_prefix("busybox:") {
                    Some(b) => keel_image::import::LayerSource::Busybox(b.into()),
                    None if Path::new(s).is_dir() => keel_image::import::LayerSource::Dir(s.into()),
                    None => keel_image::import::LayerSource::Tar(s.into()),
                })
                .collect();
            let spec = keel_image::import::ImageConfigSpec {
                entrypoint: (!entrypoint.is_empty()).then_some(entrypoint),
                cmd: (!cmd.is_empty()).then_some(cmd),
                env,
                workdir,
                user,
            };
            let image = keel_image::import::import(&sources, &spec, ref_name.as_deref(), &out)
                .map_err(|e| e.to_string())?;
            println!(
                "{} {} ({} layers, {} bytes)",
                out.display(),
                image.manifest_digest,
                image.layers,
                image.size
            );
            Ok(ExitCode::SUCCESS)
        }
        // Dispatched by run() before coming here.
        _ => Err(Failure::Other("internal error: misrouted command".into())),
    }
}

/// QEMU arguments that hand `host_file` to the guest as fw_cfg `opt/keel/config`, where
/// PID 1 takes it over the host file built into the image.
pub fn fw_cfg_config_args(host_file: &Path) -> Vec<String> {
    vec![
        "-fw_cfg".to_string(),
        format!(
            "name=opt/keel/config,file={}",
            host_file.to_string_lossy().replace(',', ",,")
        ),
    ]
}
