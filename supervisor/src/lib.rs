//! Keel's container life cycle: a container definition and its image become an isolated
//! process, which is watched, restarted with backoff, and stopped in order.
//!
//! - [`apply`]: what a new host file changes on a running host (`keel apply`);
//! - [`container`]: pure logic from definition + image to the process and setup plan;
//! - [`instance`]: one container prepared once and started any number of times;
//! - [`spawn`]: the clone3 child that walks that plan with raw system calls, then execs
//!   (paths under the rootfs resolved inside it by `in_root`);
//! - [`cgroup`]: hand-written cgroup v2 (hierarchy, limits, kill);
//! - [`device_policy`]: the cgroup BPF program that decides which devices may be opened;
//! - [`logs`]: output to per-container log files and the console;
//! - [`paths`], [`events`]: where images and state live, and the supervisor's event type;
//! - [`fds`]: PID 1's descriptor limit and count;
//! - [`sealed_reaper`]: the read-only copy of PID 1's binary that containers run as /dev/init;
//! - [`Supervisor`]: the state machine PID 1 drives.

pub mod apply;
pub mod caps;
pub mod cgroup;
pub mod container;
pub mod copy_up;
pub mod device_policy;
pub mod events;
pub mod fds;
pub mod health;
mod in_root;
pub mod instance;
pub mod logs;
pub mod notify;
pub mod paths;
pub mod sealed_reaper;
pub mod seccomp;
pub mod setup_error;
pub mod spawn;
mod supervisor;
pub mod user;
pub mod volume_store;

pub use events::Event;
pub use instance::{Instance, Runtime};
pub use paths::Paths;
pub use supervisor::{
    ApplyError, ApplyOutcome, ApplyStarted, Backoff, ControlError, Decision, ExecOutput,
    ExecStarted, ExecStdio, ExitStatus, Phase, Stats, Status, Supervisor, decide,
};
