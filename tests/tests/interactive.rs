//! `keel exec -i` and `-it` through the VM's API socket (the runner's multiplexer onto a
//! virtio-serial port), as a user at a terminal would use them:
//! - `-it`: the command runs on a terminal of the container's own devpts (`tty` names
//!   /dev/pts/N inside), sized like the caller's terminal and following its resizes; Ctrl-C
//!   interrupts the foreground command, not the session; the exit status comes back;
//! - `-i`: standard input streams to the command, a whole MiB of it intact, and its end is
//!   the command's end of input;
//! - a container that planted a FIFO where its devpts' ptmx was (it may mount, with
//!   SYS_ADMIN) gets no terminal: the ptmx ioctls refuse it and the exec ends with 127.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_tests::{STEP_TIMEOUT, boot_ready, running};

const HOST: &str = r#"
[host]
hostname = "interactive"
stop_timeout = "2s"

[images.box]
layers = ["busybox:/bin/busybox"]
env = ["PATH=/bin"]

[containers.idle]
image = "box"
network = "none"
command = ["sleep", "1000000"]

[containers.planted]
image = "box"
network = "none"
cap_add = ["SYS_ADMIN"]
command = ["sh", "-c", "mount -t tmpfs none /dev/pts && mkfifo /dev/pts/ptmx && echo planted && exec sleep 1000000"]
"#;

/// A pseudo-terminal pair on the test machine: the test is the user at the master.
struct Pty {
    master: OwnedFd,
    slave: OwnedFd,
}

fn winsize(rows: u16, cols: u16) -> libc::winsize {
    libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

fn openpty(rows: u16, cols: u16) -> Pty {
    let (mut master, mut slave) = (-1, -1);
    let size = winsize(rows, cols);
    // SAFETY: openpty writes two descriptors; the name and termios pointers may be null.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: openpty just opened both; nothing else owns them.
    unsafe {
        Pty {
            master: OwnedFd::from_raw_fd(master),
            slave: OwnedFd::from_raw_fd(slave),
        }
    }
}

/// Resizes the terminal as a terminal emulator does: its foreground process gets SIGWINCH.
fn resize(master: &OwnedFd, rows: u16, cols: u16) {
    let size = winsize(rows, cols);
    // SAFETY: TIOCSWINSZ reads one winsize.
    let r = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    assert_eq!(r, 0);
}

/// Everything the terminal shows, collected by a thread.
#[derive(Clone, Default)]
struct Screen(Arc<Mutex<Vec<u8>>>);

impl Screen {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Waits until the screen shows `needle` after byte `from`; returns where it ends.
    fn wait_for(&self, needle: &str, from: usize) -> usize {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let text = self.text();
            if let Some(at) = text.get(from..).and_then(|t| t.find(needle)) {
                return from + at + needle.len();
            }
            assert!(
                Instant::now() < deadline,
                "the terminal never showed {needle:?}; it shows:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn wait_exit(child: &mut Child) -> i32 {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        assert!(Instant::now() < deadline, "keel exec did not end");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn exec_with_a_terminal_and_with_standard_input() {
    let host = boot_ready(HOST);
    let keel = &host.keel;
    keel.wait_for("idle", "running", running);

    // -i without a terminal: a MiB through wc, then the end of input ends cat.
    let mut child = keel
        .command(&["exec", "-i", "idle", "--", "sh", "-c", "wc -c; echo done"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let block = vec![b'x'; 1 << 20];
        stdin.write_all(&block).unwrap();
        // Dropping stdin is the end of input.
    });
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    writer.join().unwrap();
    assert_eq!(wait_exit(&mut child), 0);
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["1048576", "done"]
    );

    // -it at a 30x100 terminal whose session keel leads, as in a real shell.
    let pty = openpty(30, 100);
    let slave = || Stdio::from(pty.slave.try_clone().unwrap());
    let mut command = keel.command(&["exec", "-it", "idle", "sh"]);
    command.stdin(slave()).stdout(slave()).stderr(slave());
    // SAFETY: setsid and ioctl are async-signal-safe, as pre_exec requires.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().unwrap();
    let screen = Screen::default();
    let master = std::fs::File::from(pty.master.try_clone().unwrap());
    {
        let screen = screen.clone();
        let mut master = master.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = master.read(&mut buf) {
                screen.0.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
    }
    // Typed at the keyboard: keys, Enter as a carriage return.
    let type_keys = |master: &mut std::fs::File, keys: &str| {
        master.write_all(keys.as_bytes()).unwrap();
    };
    let type_line = |line: &str| type_keys(&mut master.try_clone().unwrap(), &format!("{line}\r"));

    type_line("tty; stty size; echo m-$((6*7))");
    let mut seen = screen.wait_for("m-42", 0);
    let text = screen.text();
    assert!(
        text.contains("/dev/pts/"),
        "tty names the container's devpts: {text}"
    );
    assert!(text.contains("30 100"), "the caller's size: {text}");

    // A resize reaches the terminal in the container (at the client's next poll).
    resize(&pty.master, 40, 120);
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        type_line("echo size=$(stty size)");
        let end = screen.wait_for("size=", seen) + 8;
        std::thread::sleep(Duration::from_millis(100));
        if screen
            .text()
            .get(seen..)
            .is_some_and(|t| t.contains("size=40 120"))
        {
            seen = end;
            break;
        }
        seen = end;
        assert!(
            Instant::now() < deadline,
            "the size never followed:\n{}",
            screen.text()
        );
    }

    // Ctrl-C interrupts the foreground command; the shell goes on (an interactive shell
    // abandons the rest of a line whose command SIGINT killed: the status is asked after).
    type_line("sleep 1000");
    let deadline = Instant::now() + STEP_TIMEOUT;
    while !keel
        .ok(&["exec", "idle", "--", "ps", "-o", "args"])
        .lines()
        .any(|l| l.trim() == "sleep 1000")
    {
        assert!(Instant::now() < deadline, "sleep 1000 never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    type_keys(&mut master.try_clone().unwrap(), "\x03");
    seen = screen.wait_for("^C", seen);
    type_line("echo status=$?");
    seen = screen.wait_for("status=130", seen);

    type_line("exit 7");
    assert_eq!(wait_exit(&mut child), 7, "{}", &screen.text()[seen..]);

    // A FIFO for a ptmx: the ioctls refuse it, and the client hears so.
    host.vm
        .wait_for_line_anywhere("[planted] planted", STEP_TIMEOUT)
        .unwrap();
    let mut client = keel_api::Client::connect_unix(keel.socket()).unwrap();
    client.set_timeout(Some(STEP_TIMEOUT)).unwrap();
    let size = keel_api::WindowSize { rows: 24, cols: 80 };
    let _input = client
        .start_exec("planted", vec!["tty".into()], vec![], false, Some(size))
        .unwrap();
    let code = client.finish_exec(|_, _| {}).unwrap();
    assert_eq!(code, 127, "no terminal from a planted ptmx");
}
