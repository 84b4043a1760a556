//! End-to-end: `keel exec` and exec health checks on a busy host. Beside a container that
//! forks all the time, hundreds of fast execs each return with the right output and exit
//! status (one in four hung before the API port stopped losing answers it owed a client the
//! guest's driver had not announced yet), exec probes at a short interval never miss, and a
//! slow exec does not hold up another client's `ps`.

use keel_tests::{boot_ready, running};

const HOST: &str = r#"
[host]
hostname = "execs"
stop_timeout = "2s"

[images.box]
layers = ["busybox:/bin/busybox"]
env = ["PATH=/bin"]

[containers.busy]
image = "box"
network = "none"
command = ["sh", "-c", "while :; do usleep 2000; done"]

[containers.idle]
image = "box"
network = "none"
command = ["sleep", "1000000"]

# Every probe leaves a line; a probe that hung past its timeout would make the container
# unhealthy, and restart_on_unhealthy would restart it.
[containers.probed]
image = "box"
network = "none"
command = ["sleep", "1000000"]
volumes = ["probes:/probes"]
healthcheck = { exec = ["sh", "-c", "echo x >> /probes/count"], interval = "100ms", timeout = "3s", retries = 1 }
restart_on_unhealthy = true
"#;

/// How many execs of fast commands the test runs.
const FAST_EXECS: usize = 200;

#[test]
fn execs_beside_a_busy_container_all_return() {
    let host = boot_ready(HOST);
    let keel = &host.keel;
    keel.wait_for("busy", "running", running);
    keel.wait_for("idle", "running", running);

    // Fast commands, each checked for its output and status (KeelCli fails a call that does
    // not return within its step timeout).
    let mib = 1 << 20;
    for i in 0..FAST_EXECS {
        let marker = format!("hi-{i}");
        let (args, code, expected): (Vec<&str>, i32, String) = match i % 4 {
            0 => (vec!["true"], 0, String::new()),
            1 => (vec!["echo", &marker], 0, format!("{marker}\n")),
            2 => (
                vec!["sh", "-c", "echo out; echo err >&2; exit 7"],
                7,
                "out\n".into(),
            ),
            _ if i % 20 == 3 => (
                vec!["sh", "-c", "head -c 1048576 /dev/zero | tr '\\0' a"],
                0,
                "a".repeat(mib),
            ),
            _ => (vec!["sh", "-c", "exit 3"], 3, String::new()),
        };
        let mut argv = vec!["exec", "idle", "--"];
        argv.extend(&args);
        let output = keel.run(&argv);
        assert_eq!(
            output.status.code(),
            Some(code),
            "exec #{i} {args:?}: stderr {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            stdout == expected,
            "exec #{i} {args:?}: {} bytes of stdout, expected {}: {:?}",
            stdout.len(),
            expected.len(),
            stdout.get(..80.min(stdout.len()))
        );
        if i % 4 == 2 {
            assert!(
                String::from_utf8_lossy(&output.stderr).contains("err"),
                "exec #{i}: stderr {:?}",
                output.stderr
            );
        }
    }

    // The exec probes run all along (every 100 ms): once a hundred have, none of them may
    // have failed. How many ran by now depends on the machine's speed, so wait for the
    // hundredth (each look is one more exec beside the busy container).
    let deadline = std::time::Instant::now() + keel_tests::STEP_TIMEOUT;
    loop {
        let probes = keel
            .ok(&["exec", "probed", "--", "sh", "-c", "wc -l < /probes/count"])
            .trim()
            .parse::<u64>()
            .unwrap();
        if probes >= 100 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {probes} probes ran"
        );
    }
    let probed = keel.status("probed");
    assert_eq!(probed["health"], "healthy", "{probed}");
    assert_eq!(probed["restarts"], 0, "a probe failed: {probed}");

    // A slow exec holds one client; another client's ps is served meanwhile.
    std::thread::scope(|scope| {
        let slow = scope.spawn(|| keel.run(&["exec", "idle", "--", "sleep", "30"]));
        // The slow exec has started once its process shows in the container.
        let deadline = std::time::Instant::now() + keel_tests::STEP_TIMEOUT;
        while !keel.ok(&["exec", "idle", "--", "ps"]).contains("sleep 30") {
            assert!(
                std::time::Instant::now() < deadline,
                "the slow exec never started"
            );
        }
        let names = keel.names();
        assert!(names.contains(&"busy".to_string()), "{names:?}");
        assert!(
            !slow.is_finished(),
            "ps was only served after the slow exec ended"
        );
        let output = slow.join().unwrap();
        assert!(output.status.success(), "{output:?}");
    });
}
