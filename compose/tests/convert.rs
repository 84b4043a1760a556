//! Real-world compose files converted and validated as Keel host files, and a file full of
//! what Keel cannot do, each refusal located.

use std::path::{Path, PathBuf};

use keel_compose::{Diagnostic, Input, Overlay, Severity, Variables};
use keel_config::{HostConfig, NetworkMode, VolumeSource};

fn file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/files")
        .join(rel)
}

fn convert(
    rel: &str,
    env: &[(&str, &str)],
    overlay: Option<&Overlay>,
) -> Result<keel_compose::Converted, Vec<Diagnostic>> {
    let path = file(rel);
    let text = std::fs::read_to_string(&path).unwrap();
    let dotenv = std::fs::read_to_string(path.parent().unwrap().join(".env")).ok();
    let vars = Variables::new(
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        dotenv.as_deref(),
    );
    keel_compose::convert(&Input {
        path: &path,
        text: &text,
        variables: &vars,
        overlay,
    })
}

/// Converts and parses as Keel does; the host file's text too.
fn host(rel: &str, env: &[(&str, &str)]) -> (HostConfig, String, Vec<Diagnostic>) {
    let converted = convert(rel, env, None).unwrap_or_else(|errors| {
        panic!(
            "{rel}: {}",
            errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        )
    });
    let config = HostConfig::parse(&file(rel).with_extension("keel.toml"), &converted.host_file)
        .unwrap_or_else(|e| panic!("{rel}: {e}\n{}", converted.host_file));
    (config, converted.host_file, converted.warnings)
}

#[test]
fn wordpress_with_mariadb() {
    let (config, text, warnings) = host("wordpress/compose.yaml", &[]);
    assert_eq!(config.hostname, "wordpress");
    let db = &config.containers["db"];
    assert_eq!(
        db.command.as_deref(),
        Some(&["--default-authentication-plugin=mysql_native_password".to_string()][..])
    );
    assert_eq!(db.env["MYSQL_DATABASE"], "wordpress");
    assert!(matches!(&db.isolation.volumes[0].source, VolumeSource::Named(n) if n == "db_data"));
    let wp = &config.containers["wordpress"];
    assert!(matches!(&wp.isolation.network, NetworkMode::Bridged(a) if a.network == "bridge"));
    assert!(text.contains("ports = [\"80:80\"]"), "{text}");
    assert!(text.contains("pull = \"wordpress:latest\""), "{text}");
    // `expose` is no error, but said.
    assert!(
        warnings
            .iter()
            .any(|w| w.key == "services.db.expose" && w.line == 16),
        "{warnings:?}"
    );
}

#[test]
fn a_web_app_with_healthchecked_dependencies() {
    let (config, text, warnings) = host("shop/docker-compose.yml", &[("WORKERS", "5")]);
    assert_eq!(config.containers.len(), 4);
    let web = &config.containers["web"];
    // Interpolated from the environment, .env and defaults.
    assert_eq!(
        web.command.as_ref().unwrap().last().map(String::as_str),
        Some("5")
    );
    assert!(
        text.contains("pull = \"ghcr.io/example/shop:2.0\""),
        "{text}"
    );
    assert_eq!(config.containers["db"].env["POSTGRES_PASSWORD"], "s3cret");
    // env_file, then the merged extension field.
    assert_eq!(web.env["REDIS_URL"], "redis://cache:6379/0");
    assert_eq!(web.env["DATABASE_URL"], "postgres://postgres@db/shop");
    assert!(web.isolation.init && web.isolation.readonly_rootfs);
    assert!(
        text.contains("depends_on = { cache = \"healthy\", migrate = \"completed_successfully\" }"),
        "{text}"
    );
    assert!(text.contains("ports = [\"8080:8000\"]"), "{text}");
    assert!(text.contains("ipv4_address = \"172.28.0.10\""), "{text}");
    assert!(text.contains("subnet = \"172.28.0.0/24\""), "{text}");
    assert!(text.contains("tmpfs = { \"/tmp\" = \"64M\" }"), "{text}");
    assert!(
        text.contains("rlimits = { nofile = { hard = 65536, soft = 65536 } }"),
        "{text}"
    );
    assert!(
        text.contains("logs = { max_files = 5, max_size = \"20M\" }"),
        "{text}"
    );
    assert!(text.contains("restart = \"unless-stopped\""), "{text}");
    let db = &config.containers["db"];
    assert!(
        text.contains("exec = [\"/bin/sh\", \"-c\", \"pg_isready -U postgres -d shop\"]"),
        "{text}"
    );
    assert!(text.contains("stop_timeout = \"90s\""), "{text}");
    assert_eq!(db.isolation.shm_size, 256 << 20);
    assert!(
        text.contains("memory = \"300M\"") && text.contains("cpus = 0.5"),
        "{text}"
    );
    assert!(warnings.is_empty(), "{warnings:?}");
}

#[test]
fn a_required_variable_that_is_missing_is_an_error_on_its_line() {
    let path = file("shop/docker-compose.yml");
    let text = std::fs::read_to_string(&path).unwrap();
    let errors = keel_compose::convert(&Input {
        path: &path,
        text: &text,
        variables: &Variables::new([], None),
        overlay: None,
    })
    .unwrap_err();
    let e = errors
        .iter()
        .find(|e| e.key == "services.db.environment.POSTGRES_PASSWORD")
        .unwrap();
    assert_eq!(e.line, 18);
    assert!(e.message.contains("set DB_PASSWORD in .env"), "{e}");
}

#[test]
fn gitea_with_postgres() {
    let (config, text, warnings) = host("gitea/compose.yml", &[]);
    assert_eq!(config.hostname, "git-server");
    assert!(
        text.contains("ports = [\"3000:3000\", \"127.0.0.1:2222:22\"]"),
        "{text}"
    );
    assert!(text.contains("depends_on = [\"db\"]"), "{text}");
    assert!(text.contains("cpu_weight = 20"), "{text}");
    assert!(text.contains("exec = [\"/bin/sh\", \"-c\", \"curl -fsS http://localhost:3000/api/healthz || exit 1\"]"), "{text}");
    assert_eq!(
        config.containers["server"]
            .isolation
            .sysctls
            .get("net.core.somaxconn")
            .map(String::as_str),
        Some("1024")
    );
    // A host path of the Keel host: kept, and said.
    assert!(
        warnings
            .iter()
            .any(|w| w.key == "services.server.volumes[1]" && w.line == 14),
        "{warnings:?}"
    );
    assert_eq!(
        config.containers["server"].isolation.hostname.as_deref(),
        Some("git")
    );
    assert!(
        text.contains("\"/etc/timezone:/etc/timezone:ro\""),
        "{text}"
    );
}

#[test]
fn what_keel_cannot_do_is_refused_with_file_line_service_and_key() {
    let errors = convert("errors/docker-compose.yml", &[], None).unwrap_err();
    let find = |key: &str, line: usize| {
        errors
            .iter()
            .find(|e| e.key == key && e.line == line)
            .unwrap_or_else(|| panic!("no finding for {key} at line {line}: {errors:#?}"))
    };
    assert_eq!(find("version", 1).severity, Severity::Warning);
    let build = find("services.app.build", 4);
    assert_eq!(build.severity, Severity::Error);
    assert_eq!(build.service.as_deref(), Some("app"));
    assert!(build.message.contains("docker build"), "{build}");
    assert!(
        find("services.app.volumes[0]", 6)
            .message
            .contains("named volume")
    );
    assert!(
        find("services.app.secrets", 7)
            .message
            .contains("host-path volume")
    );
    assert!(
        find("services.app.networks", 8)
            .message
            .contains("one network")
    );
    assert!(
        find("services.app.bogus", 9)
            .message
            .contains("unknown service key")
    );
    assert!(
        find("services.proxy.ports[0]", 12)
            .message
            .contains("HOST:80")
    );
    assert!(
        find("services.proxy.depends_on", 13)
            .message
            .contains("missing")
    );
    assert!(
        find("services.sidecar.network_mode", 16)
            .message
            .contains("service:app")
    );
    assert!(find("secrets", 17).message.contains("not supported"));
    let shown = build.to_string();
    assert!(
        shown.ends_with("errors/docker-compose.yml:4: error: services.app.build: Keel does not build images: build it (`docker build -t REF .`), push it to a registry or save it (`docker save` / an OCI layout), then give `image: REF` (and [images.NAME] in an overlay for a local file)"),
        "{shown}"
    );
}

#[test]
fn an_overlay_names_the_host_and_local_images_and_adds_keys() {
    let overlay = Overlay::parse(
        Path::new("overlay.toml"),
        "[host]\nhostname = \"blog\"\nstop_timeout = \"5s\"\n\n[images.mariadb]\nlayout = \"images/db\"\nref = \"db\"\n\n[containers.db]\nuserns = \"auto\"\n",
    )
    .unwrap();
    let converted = convert("wordpress/compose.yaml", &[], Some(&overlay)).unwrap();
    let text = &converted.host_file;
    assert!(text.contains("hostname = \"blog\""), "{text}");
    assert!(
        text.contains("[images.mariadb]\nlayout = \"images/db\""),
        "{text}"
    );
    assert!(!text.contains("pull = \"mariadb"), "{text}");
    assert!(text.contains("userns = \"auto\""), "{text}");
}
