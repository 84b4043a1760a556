//! What the supervisor's host tests share: a cgroup of their own under the host's cgroup2.

use std::path::PathBuf;

/// The host's cgroup2 mount: the unified hierarchy or the hybrid layout's v2 part.
pub fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .find_map(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            (fields.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(fields[1]))
        })
        .expect("no cgroup2 mount on this host")
}

/// A fresh cgroup `keel-TAG-PID` under the host's cgroup2, removed on drop.
pub struct TestCgroup(pub PathBuf);

impl TestCgroup {
    pub fn new(tag: &str) -> TestCgroup {
        let path = cgroup2_root().join(format!("keel-{tag}-{}", std::process::id()));
        std::fs::create_dir(&path).expect("creating a test cgroup");
        TestCgroup(path)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}
