//! Boots a kernel the way `keel run` does, for trying the runner by hand:
//!
//! ```text
//! cargo run -p keel-qemu --example run -- KERNEL [INITRD] [CMDLINE]
//! ```
//!
//! Ctrl-C asks the guest to power off; a second Ctrl-C (or 10 s) kills QEMU.

use std::process::ExitCode;
use std::time::Duration;

use keel_qemu::{VmConfig, run_interactive};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(kernel) = args.next() else {
        eprintln!("usage: run KERNEL [INITRD] [CMDLINE]");
        return ExitCode::from(2);
    };
    let mut cfg = VmConfig::new(kernel);
    cfg.echo_console = true;
    cfg.initrd = args.next().filter(|s| !s.is_empty()).map(Into::into);
    if let Some(cmdline) = args.next() {
        cfg.cmdline = cmdline;
    }
    match run_interactive(cfg, Duration::from_secs(10)) {
        Ok(code) => {
            eprintln!("run: exit code {code}");
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
        Err(e) => {
            eprintln!("run: {e}");
            ExitCode::FAILURE
        }
    }
}
