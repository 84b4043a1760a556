//! Keel's benchmark suite (issue 3, "Benchmark"): container start latency against crun in
//! the same guest boot, boot time against a busybox + crun initramfs, and PID 1's RSS.
//!
//! Three binaries share this library:
//! - `keel-bench` (host): builds the guests, boots them with keel-qemu, writes the report;
//! - `keel-bench-guest` (guest PID 1): starts the same container N times with Keel's
//!   start path and with `crun run`, and prints `bench:` lines;
//! - `keel-bench-stamp` (payload): prints its CLOCK_MONOTONIC time and exits.
//!
//! Performance is measured here and only here: the test suite has no timing assertions.

pub mod host;
pub mod lines;
pub mod oci;
pub mod stats;
