//! The pieces of Keel's PID 1, as a library so that other guest programs (the start-latency
//! benchmark's guest) boot the same way. `main.rs` is PID 1 itself.

pub mod api;
pub mod blockdev;
pub mod cmdline;
pub mod delivery;
pub mod dm;
pub mod early;
pub mod etc;
pub mod helpers;
pub mod host_process;
pub mod logger;
pub mod modules;
pub mod net;
pub mod power;
pub mod power_signals;
pub mod puller;
pub mod reaper;
pub mod slots;
pub mod stage1;
pub mod state;
pub mod update;
pub mod var;
pub mod var_growth;
pub mod watchdog;
