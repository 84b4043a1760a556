//! A compose stack booted as a Keel host: `keel build docker-compose.yml --overlay ...`
//! converts it in memory and builds it. The stack is Debian's own userland (debootstrap +
//! umoci): redis as the database, its data directory a named volume (its first use copies
//! the image's redis-owned /var/lib/redis in, or redis could not write its append-only
//! file), healthy once `redis-cli ping` answers; a one-shot `seed` that writes a value once
//! the database is healthy; and a web server (busybox httpd with a CGI that reads the value
//! with redis-cli) that starts once the seed has completed successfully. The page, fetched
//! through the published port, shows the value read from the database.

use std::fs;
use std::process::Command;

use keel_qemu::Vm;
use keel_tests::oci_tools::{debian_rootfs, run, tool, umoci_image};
use keel_tests::{BOOT_TIMEOUT, STEP_TIMEOUT, attach_data_disk, bin_dir, vm_config};

const COMPOSE: &str = r#"name: stack
services:
  db:
    image: keel-test/redis:7
    command: redis-server --dir /var/lib/redis --appendonly yes --protected-mode no
    user: redis
    volumes:
      - redisdata:/var/lib/redis
    healthcheck:
      test: ["CMD", "redis-cli", "ping"]
      interval: 1s
      timeout: 3s
      retries: 60
  seed:
    image: keel-test/web:1
    command: ["redis-cli", "-h", "db", "set", "greeting", "${GREETING:-hello}"]
    restart: "no"
    depends_on:
      db:
        condition: service_healthy
  web:
    image: keel-test/web:1
    command: busybox httpd -f -v -p 8080 -h /www
    ports:
      - "8080:8080"
    depends_on:
      seed:
        condition: service_completed_successfully
      db:
        condition: service_healthy
volumes:
  redisdata:
"#;

/// The local images, the host's name and a faster stop.
const OVERLAY: &str = r#"[host]
hostname = "stack"
stop_timeout = "2s"

[images.redis]
layout = "L"
ref = "stack"

[images.web]
layout = "L"
ref = "stack"
"#;

const CGI: &str = "#!/bin/sh\necho 'Content-Type: text/plain'\necho\necho \"db says: $(redis-cli -h db get greeting)\"\n";

#[test]
fn a_converted_compose_stack_serves_data_from_its_healthy_database() {
    tool("umoci", "umoci");
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    // Debian's redis and busybox, plus the page's CGI, in one image both services use.
    let base = debian_rootfs(
        "redis",
        &["redis-server", "busybox-static"],
        "usr/bin/redis-server",
    );
    let rootfs = w.join("rootfs");
    fs::create_dir_all(rootfs.join("www/cgi-bin")).unwrap();
    let cgi = rootfs.join("www/cgi-bin/index.cgi");
    fs::write(&cgi, CGI).unwrap();
    run(Command::new("chmod").arg("0755").arg(&cgi));
    let merged = w.join("merged");
    run(Command::new("cp").arg("-a").arg(&base).arg(&merged));
    run(Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", rootfs.display()))
        .arg(&merged));
    umoci_image(
        w,
        &merged,
        &w.join("L"),
        "stack",
        false,
        &["--config.env", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
    );
    fs::write(w.join("docker-compose.yml"), COMPOSE).unwrap();
    fs::write(w.join("overlay.toml"), OVERLAY).unwrap();
    fs::write(w.join(".env"), "GREETING=hello-from-redis\n").unwrap();

    // What the user sees of the conversion first.
    let converted = Command::new(bin_dir().join("keel"))
        .args(["compose", "convert", "--overlay"])
        .arg(w.join("overlay.toml"))
        .arg(w.join("docker-compose.yml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&converted.stdout);
    assert!(
        converted.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&converted.stderr)
    );
    assert!(
        text.contains("depends_on = { db = \"healthy\", seed = \"completed_successfully\" }"),
        "{text}"
    );

    let out = w.join("out");
    let built = Command::new(bin_dir().join("keel"))
        .arg("build")
        .arg(w.join("docker-compose.yml"))
        .arg("--overlay")
        .arg(w.join("overlay.toml"))
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "keel build of the compose file:\n{}{}",
        String::from_utf8_lossy(&built.stdout),
        String::from_utf8_lossy(&built.stderr)
    );
    // A data disk for /var, as a real host has: on a tmpfs /var the unpacked Debian image
    // would count against the unpack helper's memory limit.
    let mut config = vm_config(&out, &[8080]);
    config.memory_mb = 1024;
    attach_data_disk(&mut config, &w.join("var.img"), 2 << 30);
    let vm = Vm::boot(config).expect("QEMU starts");
    vm.wait_for_line("keel: web: started", BOOT_TIMEOUT)
        .unwrap();
    // The port is published once web's process runs and its network is attached: a
    // connection before that finds nobody (and its SYN is not answered), so each attempt
    // gets a few seconds.
    let deadline = std::time::Instant::now() + STEP_TIMEOUT;
    let page = loop {
        match vm.http_get(
            8080,
            "/cgi-bin/index.cgi",
            std::time::Duration::from_secs(5),
        ) {
            Ok(page) => break page,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
            Err(e) => panic!("{e}\n{}", vm.console()),
        }
    };
    assert_eq!(page.status, 200, "{page:?}\n{}", vm.console());
    assert_eq!(
        page.body.trim(),
        "db says: hello-from-redis",
        "{}",
        vm.console()
    );
    // Redis wrote its append-only file in the volume its image's content filled.
    assert!(
        !vm.console()
            .contains("Can't open or create append-only dir"),
        "{}",
        vm.console()
    );
}
