//! `keel run`: boot, show the console, and turn Ctrl-C into an orderly guest shutdown.

use std::process::ExitStatus;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::config::VmConfig;
use crate::error::QemuError;
use crate::progress::BootProgress;
use crate::vm::Vm;

/// The console line the guest's init prints right before `reboot(2)` on an orderly shutdown.
pub const POWEROFF_CLEAN_LINE: &str = "keel: poweroff clean";

enum Event {
    Signal(i32),
    Exited,
}

/// How often the loop looks at the console for progress to report.
const PROGRESS_TICK: Duration = Duration::from_millis(250);

/// Boots `cfg` and runs until QEMU exits. `keel run` sets `cfg.echo_console` to show the
/// console on the terminal (or `console_log` to send it to a file instead, and then stderr
/// gets a compact progress line per boot milestone). Either way stderr says when the guest is
/// ready, with the address of each published port, and reports a boot that has printed
/// nothing for a while as stuck.
///
/// The first SIGINT or SIGTERM presses the guest's ACPI power button; a second one, or
/// `shutdown_deadline` passing without QEMU exiting, kills QEMU. Returns the exit code for
/// `keel run`: 0 only if QEMU exited 0 and the console showed [`POWEROFF_CLEAN_LINE`]; 128 +
/// the signal number (130 for Ctrl-C) if QEMU had to be killed; 1 otherwise.
///
/// Meant to be the last thing a process does: signal handlers cannot be fully uninstalled, so
/// after it returns SIGINT and SIGTERM no longer terminate the process.
pub fn run_interactive(cfg: VmConfig, shutdown_deadline: Duration) -> Result<i32, QemuError> {
    // Installed before the boot, so that a Ctrl-C during startup is ours too.
    let mut signals = Signals::new([SIGINT, SIGTERM])
        .map_err(QemuError::io("installing SIGINT/SIGTERM handlers"))?;
    let signals_handle = signals.handle();
    let (tx, rx) = mpsc::channel();
    let signal_tx = tx.clone();
    let signal_thread = thread::Builder::new()
        .name("keel-signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if signal_tx.send(Event::Signal(signal)).is_err() {
                    break;
                }
            }
        })
        .map_err(QemuError::io("starting the signal thread"))?;

    let result = drive(cfg, shutdown_deadline, tx, &rx);
    signals_handle.close();
    let _ = signal_thread.join();
    result
}

fn drive(
    cfg: VmConfig,
    shutdown_deadline: Duration,
    tx: mpsc::Sender<Event>,
    rx: &mpsc::Receiver<Event>,
) -> Result<i32, QemuError> {
    let compact = !cfg.echo_console;
    let mut vm = Vm::boot(cfg)?;
    let mut progress = BootProgress::new(compact, vm.published(), vm.accel(), Instant::now());
    let mut next_line = 0;
    let watch = vm.watch();
    thread::Builder::new()
        .name("keel-exit".into())
        .spawn(move || {
            watch.wait();
            let _ = tx.send(Event::Exited);
        })
        .map_err(QemuError::io("starting the exit thread"))?;

    let mut shutdown: Option<(i32, Instant)> = None;
    let mut killed_by = None;
    loop {
        let wait = match shutdown {
            None => PROGRESS_TICK,
            Some((_, deadline)) => deadline
                .saturating_duration_since(Instant::now())
                .min(PROGRESS_TICK),
        };
        let event = rx.recv_timeout(wait);
        if shutdown.is_none() {
            let (lines, next) = vm.lines_from(next_line);
            next_line = next;
            for report in progress.update(&lines, vm.last_output(), Instant::now()) {
                eprintln!("{report}");
            }
        }
        match event {
            Ok(Event::Exited) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Ok(Event::Signal(signal)) => match shutdown {
                None => {
                    eprintln!(
                        "\nkeel: asking the guest to power off (Ctrl-C again or wait {} s to force)",
                        shutdown_deadline.as_secs()
                    );
                    if let Err(e) = vm.powerdown() {
                        eprintln!("keel: could not ask the guest to power off: {e}; killing QEMU");
                        vm.kill();
                        killed_by = Some(signal);
                        break;
                    }
                    shutdown = Some((signal, Instant::now() + shutdown_deadline));
                }
                Some((first, _)) => {
                    eprintln!("keel: killing QEMU");
                    vm.kill();
                    killed_by = Some(first);
                    break;
                }
            },
            Err(mpsc::RecvTimeoutError::Timeout)
                if shutdown.is_none_or(|(_, deadline)| Instant::now() < deadline) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {
                eprintln!(
                    "keel: the guest did not power off within {} s; killing QEMU",
                    shutdown_deadline.as_secs()
                );
                vm.kill();
                killed_by = shutdown.map(|(signal, _)| signal);
                break;
            }
        }
    }
    // Already exited or killed: this only collects the status and the console's last bytes.
    let status = vm.wait_exit(Duration::from_secs(15))?;
    vm.finish_echo();
    let clean = vm
        .console()
        .lines()
        .any(|line| line.contains(POWEROFF_CLEAN_LINE));
    Ok(exit_code(status, clean, killed_by))
}

fn exit_code(status: ExitStatus, clean_line_seen: bool, killed_by: Option<i32>) -> i32 {
    match killed_by {
        Some(signal) => 128 + signal,
        None if status.success() && clean_line_seen => 0,
        None => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn exit_codes() {
        let ok = ExitStatus::from_raw(0);
        let failed = ExitStatus::from_raw(1 << 8);
        let sigkilled = ExitStatus::from_raw(9);
        assert_eq!(exit_code(ok, true, None), 0);
        // A guest that panicked (or rebooted) also makes QEMU exit 0 under -no-reboot.
        assert_eq!(exit_code(ok, false, None), 1);
        assert_eq!(exit_code(failed, true, None), 1);
        assert_eq!(exit_code(sigkilled, true, Some(SIGINT)), 130);
        assert_eq!(exit_code(sigkilled, false, Some(SIGTERM)), 143);
    }
}
