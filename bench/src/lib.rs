//! Keel's benchmark suite (issue 3, "Benchmark"): container start latency against crun in
//! the same guest boot, boot time against a busybox + crun initramfs, and PID 1's RSS; and
//! (issue 5) TCP throughput between containers over the bridge against the guest's loopback;
//! and (issue 6) image import + unpack against skopeo and umoci, on the host.
//!
//! Four binaries share this library:
//! - `keel-bench` (host): builds the guests, boots them with keel-qemu, writes the report;
//! - `keel-bench-guest` (guest PID 1): starts the same container N times with Keel's
//!   start path and with `crun run`, and prints `bench:` lines;
//! - `keel-bench-stamp` (payload): prints its CLOCK_MONOTONIC time and exits;
//! - `keel-bench-tcp` (in the networking guest's containers): a TCP sink and sender that
//!   times a transfer.
//!
//! Performance is measured here and only here: the test suite has no timing assertions.

pub mod host;
pub mod images;
pub mod lines;
pub mod network;
pub mod oci;
pub mod stats;
pub mod tcp;
