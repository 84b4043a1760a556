//! The local side of `keel exec -t`: the user's terminal in raw mode (every key, Ctrl-C
//! included, goes to the process's terminal in the container, whose line discipline acts on
//! it), its size, and SIGWINCH for its changes.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use keel_api::WindowSize;
use nix::sys::termios::{self, SetArg, Termios};

/// Set by SIGWINCH: the terminal's size changed.
static RESIZED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigwinch(_: libc::c_int) {
    RESIZED.store(true, Ordering::Relaxed);
}

/// Standard input in raw mode until dropped.
pub struct RawTerminal {
    saved: Termios,
}

impl RawTerminal {
    /// Puts standard input (which must be a terminal) in raw mode and starts watching
    /// SIGWINCH.
    pub fn enter() -> Result<RawTerminal, String> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd())
            .map_err(|e| format!("-t needs a terminal on standard input: {e}"))?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw)
            .map_err(|e| format!("cannot put the terminal in raw mode: {e}"))?;
        let action = nix::sys::signal::SigAction::new(
            nix::sys::signal::SigHandler::Handler(on_sigwinch),
            nix::sys::signal::SaFlags::SA_RESTART,
            nix::sys::signal::SigSet::empty(),
        );
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        if let Err(e) = unsafe { nix::sys::signal::sigaction(nix::sys::signal::SIGWINCH, &action) }
        {
            eprintln!("keel: the terminal's size will not follow changes: {e}");
        }
        Ok(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

/// The size of the terminal on `fd`; 24x80 if it has none.
pub fn size_of(fd: BorrowedFd<'_>) -> WindowSize {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize to the pointer, which lives across the call.
    let ok = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::TIOCGWINSZ,
            &mut size,
        )
    } == 0;
    if ok && size.ws_row > 0 && size.ws_col > 0 {
        WindowSize {
            rows: size.ws_row,
            cols: size.ws_col,
        }
    } else {
        WindowSize { rows: 24, cols: 80 }
    }
}

/// Whether the terminal was resized since the last call.
pub fn take_resized() -> bool {
    RESIZED.swap(false, Ordering::Relaxed)
}
