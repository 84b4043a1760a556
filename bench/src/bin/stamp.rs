//! The start-latency payload: reads CLOCK_MONOTONIC as the very first thing and prints it
//! in nanoseconds. `no_main` skips Rust's runtime setup (stdio, args, stack guard), so
//! what runs before the clock read is the static glibc start code alone.

#![no_main]

use std::ffi::{c_char, c_int};

#[unsafe(no_mangle)]
pub extern "C" fn main(_argc: c_int, _argv: *const *const c_char) -> c_int {
    // SAFETY: timespec is plain data for which all-zero is valid.
    let mut now: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: clock_gettime writes one timespec into memory we own.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) } != 0 {
        return 1;
    }
    let nanos = now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64;
    // Formatted by hand into a stack buffer: no allocation, no std I/O machinery.
    let mut buf = [0u8; 24];
    let mut at = buf.len() - 1;
    buf[at] = b'\n';
    let mut n = nanos;
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let line = &buf[at..];
    // SAFETY: writes bytes of a live buffer to fd 1.
    let written = unsafe { libc::write(1, line.as_ptr().cast(), line.len()) };
    if written == line.len() as isize { 0 } else { 1 }
}
