//! Booting Keel in QEMU: the runner behind `keel run` and the harness of the end-to-end tests.
//!
//! [`Vm::boot`] starts `qemu-system-x86_64` with the guest's serial console on a pipe, a QMP
//! socket in a private temporary directory and user-mode networking with the requested
//! [`PortForward`]s. The console is split into lines as it arrives, so tests can
//! [`Vm::wait_for_line`] for milestones, [`Vm::http_get`] a published service and
//! [`Vm::powerdown`] the guest. [`run_interactive`] is `keel run`'s loop around the same.
//!
//! KVM is used only if a probe shows it really runs guests here (see [`kvm_status`]);
//! otherwise QEMU emulates with TCG. `KEEL_ACCEL=kvm|tcg` forces either.

mod accel;
mod child;
mod config;
mod console;
mod error;
mod interactive;
mod qmp;
mod vm;

pub use accel::{ACCEL_ENV, Accel, kvm_status, select_accel};
pub use config::{Disk, MAX_DISK_SERIAL, ParsePortForwardError, PortForward, VmConfig, qemu_args};
pub use error::QemuError;
pub use interactive::{POWEROFF_CLEAN_LINE, run_interactive};
pub use vm::{HttpResponse, Vm};
