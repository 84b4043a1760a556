//! Booting Keel in QEMU: the runner behind `keel run` and the harness of the end-to-end tests.
//!
//! [`Vm::boot`] starts `qemu-system-x86_64` with the guest's serial console on a pipe, a QMP
//! socket in a private temporary directory and user-mode networking with the requested
//! [`PortForward`]s. The console is split into lines as it arrives, so tests can
//! [`Vm::wait_for_line`] for milestones, [`Vm::http_get`] a published service and
//! [`Vm::powerdown`] the guest. [`run_interactive`] is `keel run`'s loop around the same.
//!
//! KVM is used only where it really runs guests: a probe rules it out cheaply, and every KVM
//! boot must show a sign of life within seconds or is booted again under TCG, with the
//! verdict remembered for the machine's uptime (see [`choose_accel`]). `KEEL_ACCEL=kvm|tcg`
//! forces either; `KEEL_QEMU` names another QEMU binary.

mod accel;
mod api_mux;
mod binary;
mod child;
mod config;
mod console;
mod error;
mod interactive;
mod kvm_verdict;
mod progress;
mod qmp;
mod vm;

pub use accel::{ACCEL_ENV, Accel, AccelChoice, KVM_LIFE_SIGN_TIMEOUT, choose_accel, kvm_status};
pub use binary::{DEFAULT_QEMU, QEMU_ENV};
pub use config::{
    Disk, Firmware, MAX_DISK_SERIAL, OVMF_CODE, OVMF_CODE_SECURE_BOOT, OVMF_VARS_SNAKEOIL,
    OVMF_VARS_TEMPLATE, ParsePortForwardError, PortForward, VmConfig, qemu_args,
};
pub use error::QemuError;
pub use interactive::{POWEROFF_CLEAN_LINE, run_interactive};
pub use kvm_verdict::cache_dir;
pub use vm::{HttpResponse, Vm};
