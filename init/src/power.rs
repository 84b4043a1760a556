//! The ACPI power button (QEMU's `system_powerdown`), read from its evdev input device.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

const EV_KEY: u16 = 1;
const KEY_POWER: u16 = 116;
/// struct input_event on 64-bit: timeval (16 bytes), type, code (u16 each), value (i32).
const EVENT_SIZE: usize = 24;

/// True if the raw event is a press of the power key.
pub fn is_power_press(event: &[u8]) -> bool {
    if event.len() < EVENT_SIZE {
        return false;
    }
    let kind = u16::from_ne_bytes([event[16], event[17]]);
    let code = u16::from_ne_bytes([event[18], event[19]]);
    let value = i32::from_ne_bytes([event[20], event[21], event[22], event[23]]);
    kind == EV_KEY && code == KEY_POWER && value == 1
}

/// The event devices whose input device calls itself a power button.
pub fn power_button_devices(sys_class_input: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(sys_class_input) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("event"))
        .filter(|e| {
            std::fs::read_to_string(e.path().join("device/name"))
                .is_ok_and(|n| n.trim() == "Power Button")
        })
        .map(|e| Path::new("/dev/input").join(e.file_name()))
        .collect();
    found.sort();
    found
}

/// Resolves when any power button is pressed; never resolves if there is none.
pub async fn pressed() {
    let devices = power_button_devices(Path::new("/sys/class/input"));
    if devices.is_empty() {
        log::warn!("no ACPI power button found: system_powerdown will not be seen");
        return std::future::pending().await;
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for device in devices {
        let tx = tx.clone();
        tokio::spawn(async move {
            match watch(&device).await {
                Ok(()) => {
                    let _ = tx.send(());
                }
                Err(e) => log::warn!("{}: {e}", device.display()),
            }
        });
    }
    drop(tx);
    if rx.recv().await.is_none() {
        std::future::pending::<()>().await;
    }
}

async fn watch(device: &Path) -> io::Result<()> {
    use rustix::fs::{Mode, OFlags};
    let fd: OwnedFd = rustix::fs::open(
        device,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: the fd stays open, owned by the AsyncFd, for as long as it is registered.
    let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
        .map_err(io::Error::from)?;
    let mut buf = [0u8; EVENT_SIZE * 16];
    loop {
        let mut guard = fd.readable().await?;
        match guard
            .try_io(|f| rustix::io::read(f.get_ref().as_fd(), &mut buf).map_err(io::Error::from))
        {
            Ok(Ok(0)) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "input device went away",
                ));
            }
            Ok(Ok(n)) => {
                if buf[..n].chunks_exact(EVENT_SIZE).any(is_power_press) {
                    return Ok(());
                }
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: u16, code: u16, value: i32) -> Vec<u8> {
        let mut e = vec![0u8; 16];
        e.extend(kind.to_ne_bytes());
        e.extend(code.to_ne_bytes());
        e.extend(value.to_ne_bytes());
        e
    }

    #[test]
    fn only_a_power_key_press_counts() {
        assert!(is_power_press(&event(EV_KEY, KEY_POWER, 1)));
        assert!(!is_power_press(&event(EV_KEY, KEY_POWER, 0)), "release");
        assert!(!is_power_press(&event(EV_KEY, 30, 1)), "another key");
        assert!(!is_power_press(&event(0, 0, 0)), "sync");
        assert!(!is_power_press(&[0; 8]));
    }

    #[test]
    fn power_buttons_are_found_by_name() {
        let dir = tempfile::tempdir().unwrap();
        for (ev, name) in [
            ("event0", "Power Button"),
            ("event1", "AT Translated Set 2 keyboard"),
            ("event2", "Power Button"),
        ] {
            std::fs::create_dir_all(dir.path().join(ev).join("device")).unwrap();
            std::fs::write(dir.path().join(ev).join("device/name"), format!("{name}\n")).unwrap();
        }
        assert_eq!(
            power_button_devices(dir.path()),
            [
                PathBuf::from("/dev/input/event0"),
                PathBuf::from("/dev/input/event2")
            ]
        );
    }
}
