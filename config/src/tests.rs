use super::*;

const GOOD: &str = r#"
[host]
hostname = "edge-1"
modules = ["virtio_rng"]
stop_timeout = "3s"

[network.interfaces.eth0]
dhcp4 = true

[network.interfaces.eth1]
address = "192.168.7.2/24"
gateway = "192.168.7.1"
dns = ["192.168.7.1"]

[images.web]
layers = ["busybox:/bin/busybox", "www", "extra.tar.gz"]
entrypoint = ["/bin/httpd"]
cmd = ["-f"]
env = ["PATH=/bin"]
workdir = "/www"

[images.app]
layout = "images/app"

[containers.web]
image = "web"
command = ["-f", "-p", "80"]
env = { A = "1" }
memory = "64M"
pids = 32
restart = "no"
console = false
pid = "host"
"#;

fn parse(text: &str) -> Result<HostConfig, ConfigError> {
    HostConfig::parse(Path::new("/etc/keel/host.toml"), text)
}

fn error(text: &str) -> ConfigError {
    match parse(text) {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => e,
    }
}

fn with_host(rest: &str) -> String {
    format!("[host]\nhostname = \"h\"\n{rest}")
}

#[test]
fn a_complete_file_parses() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.hostname, "edge-1");
    assert_eq!(c.modules, ["virtio_rng"]);
    assert_eq!(c.stop_timeout_ms, 3000);
    assert_eq!(c.interfaces["eth0"], Interface::dhcp4("eth0"));
    assert_eq!(
        c.interfaces["eth1"],
        Interface {
            link: LinkMatch::Name("eth1".into()),
            dhcp4: false,
            optional: false,
            slaac: true,
            addresses: vec![Prefix::parse("192.168.7.2/24").unwrap()],
            routes: vec![Route {
                to: Prefix::parse("0.0.0.0/0").unwrap(),
                via: Some("192.168.7.1".parse().unwrap()),
            }],
            mtu: None,
            dns: vec!["192.168.7.1".parse().unwrap()],
        }
    );
    assert_eq!(
        c.images["web"].source,
        ImageSource::Layers(vec![
            LayerSpec::Busybox("/bin/busybox".into()),
            LayerSpec::Path("www".into()),
            LayerSpec::Path("extra.tar.gz".into()),
        ])
    );
    assert_eq!(c.images["web"].defaults.workdir.as_deref(), Some("/www"));
    assert_eq!(
        c.images["app"].source,
        ImageSource::Layout("images/app".into())
    );
    let web = &c.containers["web"];
    assert_eq!(web.resources.memory_max, Some(64 << 20));
    assert_eq!(web.resources.pids_max, Some(32));
    assert_eq!(web.restart, RestartPolicy::No);
    assert!(!web.console);
    assert!(web.isolation.host_pid);
    assert_eq!(web.env["A"], "1");
    assert_eq!(c.base_dir(), Path::new("/etc/keel"));
}

#[test]
fn the_bundled_example_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello/host.toml");
    let c = HostConfig::load(&path).unwrap();
    assert_eq!(c.containers["web"].resources.memory_max, Some(64 << 20));
}

#[test]
fn defaults_apply() {
    let c = parse(&with_host(
        "[images.i]\nlayout = \"x\"\n[containers.c]\nimage = \"i\"\n",
    ))
    .unwrap();
    let cont = &c.containers["c"];
    assert_eq!(cont.restart, RestartPolicy::Always);
    assert!(cont.console);
    assert!(!cont.isolation.host_pid);
    assert_eq!(cont.resources.memory_max, None);
    assert_eq!(c.stop_timeout_ms, 10_000);
}

#[test]
fn verity_is_off_unless_asked_for() {
    assert!(!parse(&with_host("")).unwrap().verity);
    assert!(parse(&with_host("verity = true\n")).unwrap().verity);
    assert!(!parse(&with_host("verity = false\n")).unwrap().verity);
    let e = error(&with_host("verity = \"yes\"\n"));
    assert_eq!(e.key, "host.verity", "{e}");
    assert_eq!(e.line, 3, "{e}");
}

#[test]
fn an_unknown_key_names_file_line_and_key() {
    let e = error(&with_host(
        "[containers.web]\nimage = \"x\"\nmemroy = \"1G\"\n",
    ));
    assert_eq!(e.file, Path::new("/etc/keel/host.toml"));
    assert_eq!(e.line, 5, "{e}");
    assert_eq!(e.key, "containers.web.memroy", "{e}");
    assert!(e.message.contains("unknown field `memroy`"), "{e}");
    assert!(e.message.contains("memory"), "lists what is expected: {e}");
    assert!(e.to_string().starts_with("/etc/keel/host.toml:5:"), "{e}");
}

#[test]
fn an_unknown_top_level_table_is_an_error() {
    let e = error(&with_host("[service.web]\nimage = \"x\"\n"));
    assert!(e.message.contains("unknown field `service`"), "{e}");
    assert_eq!(e.line, 3);
}

#[test]
fn a_missing_host_table_is_reported() {
    let e = error("[images.i]\nlayout = \"x\"\n");
    assert!(e.message.contains("missing field `host`"), "{e}");
}

#[test]
fn a_syntax_error_has_its_position() {
    let e = error("[host]\nhostname = \"h\nx = 1\n");
    assert_eq!(e.line, 2, "{e}");
}

#[test]
fn a_wrong_type_names_the_key() {
    let e = error(&with_host(
        "[images.i]\nlayout = \"x\"\n[containers.c]\nimage = \"i\"\npids = \"many\"\n",
    ));
    assert_eq!(e.key, "containers.c.pids", "{e}");
    assert_eq!(e.line, 7, "{e}");
    assert!(e.message.contains("integer"), "{e}");
}

#[test]
fn an_undefined_image_lists_the_defined_ones() {
    let e = error(&with_host(
        "[images.web]\nlayout = \"x\"\n[containers.c]\nimage = \"wbe\"\n",
    ));
    assert_eq!(e.key, "containers.c.image");
    assert_eq!(e.line, 6);
    assert!(
        e.message.contains("no image named `wbe`") && e.message.contains("web"),
        "{e}"
    );
}

#[test]
fn a_bad_memory_size_is_explained() {
    let e = error(&with_host(
        "[images.i]\nlayout = \"x\"\n[containers.c]\nimage = \"i\"\nmemory = \"64Q\"\n",
    ));
    assert_eq!(e.key, "containers.c.memory");
    assert!(e.message.contains("expected a size"), "{e}");
    let e = error(&with_host(
        "[images.i]\nlayout = \"x\"\n[containers.c]\nimage = \"i\"\nmemory = 1000\n",
    ));
    assert!(e.message.contains("below 1M"), "{e}");
}

#[test]
fn a_non_positive_pids_limit_is_rejected() {
    let e = error(&with_host(
        "[images.i]\nlayout = \"x\"\n[containers.c]\nimage = \"i\"\npids = 0\n",
    ));
    assert_eq!(e.key, "containers.c.pids");
}

#[test]
fn an_unknown_restart_policy_lists_the_known_ones() {
    let e = error(&with_host(
        "[images.i]\nlayout = \"x\"\n[containers.c]\nimage = \"i\"\nrestart = \"sometimes\"\n",
    ));
    assert_eq!(e.key, "containers.c.restart");
    assert!(e.message.contains("\"always\""), "{e}");
}

#[test]
fn without_a_hostname_the_network_names_the_host() {
    let c = HostConfig::parse(Path::new("/h.toml"), "[host]\n").unwrap();
    assert_eq!(c.hostname, crate::DEFAULT_HOSTNAME);
    assert!(c.hostname_from_network);
    let named = HostConfig::parse(Path::new("/h.toml"), "[host]\nhostname = \"a\"\n").unwrap();
    assert!(!named.hostname_from_network);
}

#[test]
fn a_bad_hostname_is_rejected() {
    let e = error("[host]\nhostname = \"-bad host\"\n");
    assert_eq!(e.key, "host.hostname");
    assert_eq!((e.line, e.column), (2, 12), "{e}");
}

#[test]
fn registry_ca_files_are_named_after_the_registry() {
    assert_eq!(
        crate::registry_ca_file_name("10.0.2.2:5000"),
        "10.0.2.2_5000.pem"
    );
    assert_eq!(
        crate::registry_ca_file_name("registry.example"),
        "registry.example.pem"
    );
}

#[test]
fn archives_pulls_and_registries() {
    let c = HostConfig::parse(
        Path::new("/h.toml"),
        "[host]\n[images.a]\narchive = \"a.tar\"\nref = \"v1\"\n\
         [images.p]\npull = \"127.0.0.1:5000/team/app:1.2\"\npull_at = \"boot\"\n\
         [registries.\"127.0.0.1:5000\"]\nusername = \"u\"\npassword = \"p\"\ninsecure = true\n",
    )
    .unwrap();
    assert_eq!(c.images["a"].source, ImageSource::Archive("a.tar".into()));
    assert_eq!(c.images["a"].reference.as_deref(), Some("v1"));
    assert_eq!(
        c.images["p"].source,
        ImageSource::Pull {
            reference: "127.0.0.1:5000/team/app:1.2".into(),
            at: crate::PullAt::Boot
        }
    );
    let r = &c.registries["127.0.0.1:5000"];
    assert!(r.insecure && r.username.as_deref() == Some("u") && r.password.as_deref() == Some("p"));

    let e = error(&with_host(
        "[images.p]\npull = \"app:1\"\npull_at = \"later\"\n",
    ));
    assert_eq!(e.key, "images.p.pull_at");
    let e = error(&with_host("[images.p]\npull = \"app@sha256:12\"\n"));
    assert_eq!(e.key, "images.p.pull");
    let e = error(&with_host("[images.p]\npull = \"app\"\nref = \"x\"\n"));
    assert_eq!(e.key, "images.p.ref");
    let e = error(&with_host(
        "[images.p]\narchive = \"a.tar\"\nenv = [\"A=1\"]\n",
    ));
    assert_eq!(e.key, "images.p.env");
    let e = error(&with_host("[registries.\"r:1\"]\nusername = \"u\"\n"));
    assert!(e.message.contains("go together"), "{e}");
    let e = error(&with_host("[registries.\"r:1\"]\ntoken = \"u\"\n"));
    assert!(e.message.contains("unknown field `token`"), "{e}");
}

#[test]
fn an_image_needs_exactly_one_source() {
    let e = error(&with_host("[images.i]\nlayout = \"x\"\nlayers = [\"y\"]\n"));
    assert_eq!(e.key, "images.i.layers");
    let e = error(&with_host("[images.i]\nworkdir = \"/\"\n"));
    assert_eq!(e.key, "images.i");
    assert!(e.message.contains("layers"), "{e}");
    let e = error(&with_host("[images.i]\nlayers = []\n"));
    assert!(e.message.contains("at least one layer"), "{e}");
    let e = error(&with_host("[images.i]\nlayers = [\"busybox:\"]\n"));
    assert_eq!(e.key, "images.i.layers[0]");
}

#[test]
fn relative_workdirs_and_bad_env_are_rejected() {
    let e = error(&with_host(
        "[images.i]\nlayout = \"x\"\n[containers.c]\nimage = \"i\"\nworkdir = \"www\"\n",
    ));
    assert_eq!(e.key, "containers.c.workdir");
    let e = error(&with_host(
        "[images.i]\nlayers = [\"busybox:/b\"]\nenv = [\"NOEQUALS\"]\n",
    ));
    assert_eq!(e.key, "images.i.env[0]");
}

#[test]
fn interfaces_need_dhcp_or_an_address() {
    let e = error(&with_host("[network.interfaces.eth0]\n"));
    assert_eq!(e.key, "network.interfaces.eth0");
    let e = error(&with_host(
        "[network.interfaces.eth0]\ndhcp4 = true\naddress = \"10.0.0.2/24\"\n",
    ));
    assert_eq!(e.key, "network.interfaces.eth0.address");
    let e = error(&with_host(
        "[network.interfaces.eth0]\naddress = \"10.0.0.2\"\n",
    ));
    assert!(e.message.contains("prefix length"), "{e}");
    let e = error(&with_host(
        "[network.interfaces.eth0]\naddress = \"10.0.0.2/24\"\ngateway = \"nope\"\n",
    ));
    assert_eq!(e.key, "network.interfaces.eth0.gateway");
}

#[test]
fn bad_names_are_rejected() {
    let e = error(&with_host("[images.\"a/b\"]\nlayout = \"x\"\n"));
    assert_eq!(e.key, "images.a/b");
    assert!(e.message.contains("not a valid name"), "{e}");
}

#[test]
fn sizes_and_durations() {
    assert_eq!(parse_size("64M"), Some(64 << 20));
    assert_eq!(parse_size("1G"), Some(1 << 30));
    assert_eq!(parse_size("512k"), Some(512 << 10));
    assert_eq!(parse_size("100"), Some(100));
    assert_eq!(parse_size("M"), None);
    assert_eq!(parse_size("99999999999999999999G"), None);
    assert_eq!(parse_duration_ms("10s"), Some(10_000));
    assert_eq!(parse_duration_ms("250ms"), Some(250));
    assert_eq!(parse_duration_ms("2m"), Some(120_000));
    assert_eq!(parse_duration_ms("10"), None);
    assert_eq!(parse_duration_ms("1h"), None);
    assert_eq!(parse_duration_ms("43200m"), Some(MAX_DURATION_MS));
    assert_eq!(parse_duration_ms("43201m"), None, "over 30 days");
    assert_eq!(parse_duration_ms("18446744073709551615ms"), None);
}

#[test]
fn a_missing_file_is_reported_with_its_path() {
    let e = HostConfig::load(Path::new("/nonexistent/host.toml")).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("/nonexistent/host.toml: cannot read"),
        "{e}"
    );
}

#[test]
fn an_unknown_pid_mode_is_rejected() {
    let e = error(&with_host(
        "[images.i]\nlayout = \"x\"\n[containers.c]\nimage = \"i\"\npid = \"shared\"\n",
    ));
    assert_eq!(e.key, "containers.c.pid");
    assert!(e.message.contains("\"host\""), "{e}");
}

const TWO_IMAGES: &str = "[host]\nhostname = \"h\"\n[images.i]\nlayout = \"x\"\n";

#[test]
fn supervision_keys_parse() {
    let text = format!(
        "{TWO_IMAGES}\
[containers.migrate]\nimage = \"i\"\nkind = \"onboot\"\non_failure = \"halt\"\nrestart = \"on-failure:3\"\n\
[containers.db]\nimage = \"i\"\nhealthcheck = {{ tcp = 5432, interval = \"2s\", retries = 5, start_period = \"10s\" }}\nrestart_on_unhealthy = true\n\
[containers.web]\nimage = \"i\"\ndepends_on = {{ db = \"healthy\", migrate = \"completed_successfully\" }}\nhealthcheck = {{ http = \"8080/healthz\" }}\nstop_signal = \"SIGQUIT\"\nstop_timeout = \"3s\"\nnotify = true\nlogs = {{ max_size = \"1M\", max_files = 5 }}\nrestart = \"unless-stopped\"\n\
[containers.backup]\nimage = \"i\"\nkind = \"onshutdown\"\n"
    );
    let c = parse(&text).unwrap();
    let migrate = &c.containers["migrate"];
    assert_eq!(migrate.lifecycle.kind, Kind::OnBoot);
    assert_eq!(migrate.lifecycle.on_failure, TaskFailure::Halt);
    assert_eq!(migrate.restart, RestartPolicy::OnFailure { max: Some(3) });
    let db = &c.containers["db"].lifecycle;
    let check = db.healthcheck.as_ref().unwrap();
    assert_eq!(check.probe, HealthProbe::Tcp { port: 5432 });
    assert_eq!(
        (
            check.interval_ms,
            check.timeout_ms,
            check.retries,
            check.start_period_ms
        ),
        (2000, 5000, 5, 10_000)
    );
    assert!(db.restart_on_unhealthy);
    let web = &c.containers["web"];
    assert_eq!(
        web.lifecycle.depends_on,
        [
            Dependency {
                name: "db".into(),
                condition: Condition::Healthy
            },
            Dependency {
                name: "migrate".into(),
                condition: Condition::CompletedSuccessfully
            },
        ]
    );
    assert_eq!(
        web.lifecycle.healthcheck.as_ref().unwrap().probe,
        HealthProbe::Http {
            port: 8080,
            path: "/healthz".into()
        }
    );
    assert_eq!(
        (web.lifecycle.stop_signal, web.lifecycle.stop_timeout_ms),
        (Some(3), 3000)
    );
    assert!(web.lifecycle.notify);
    assert_eq!(
        web.logs,
        LogConfig {
            max_size: 1 << 20,
            max_files: 5
        }
    );
    assert_eq!(web.restart, RestartPolicy::UnlessStopped);
    assert_eq!(
        c.containers["backup"].restart,
        RestartPolicy::No,
        "tasks default to no restart"
    );
    // File order survives, for running one-shot tasks in order.
    let mut order: Vec<(&String, usize)> = c.containers.iter().map(|(n, c)| (n, c.order)).collect();
    order.sort_by_key(|(_, o)| *o);
    assert_eq!(
        order.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["migrate", "db", "web", "backup"]
    );
}

#[test]
fn a_dependency_cycle_is_named() {
    let text = format!(
        "{TWO_IMAGES}[containers.a]\nimage = \"i\"\ndepends_on = [\"b\"]\n[containers.b]\nimage = \"i\"\ndepends_on = [\"c\"]\n[containers.c]\nimage = \"i\"\ndepends_on = [\"a\"]\n"
    );
    let e = error(&text);
    assert!(
        e.message.contains("dependency cycle: a -> b -> c -> a"),
        "{e}"
    );
    assert_eq!(e.key, "containers.a.depends_on");
    assert_eq!(e.line, 5, "{e}");
}

#[test]
fn dependencies_must_exist_and_be_able_to_meet_their_condition() {
    let e = error(&format!(
        "{TWO_IMAGES}[containers.a]\nimage = \"i\"\ndepends_on = [\"ghost\"]\n"
    ));
    assert!(
        e.message.contains("`ghost`, which is not a container"),
        "{e}"
    );
    let e = error(&format!(
        "{TWO_IMAGES}[containers.a]\nimage = \"i\"\ndepends_on = {{ b = \"healthy\" }}\n[containers.b]\nimage = \"i\"\n"
    ));
    assert!(e.message.contains("has no healthcheck"), "{e}");
    let e = error(&format!(
        "{TWO_IMAGES}[containers.a]\nimage = \"i\"\ndepends_on = {{ b = \"completed_successfully\" }}\n[containers.b]\nimage = \"i\"\n"
    ));
    assert!(e.message.contains("restarts forever"), "{e}");
    let e = error(&format!(
        "{TWO_IMAGES}[containers.a]\nimage = \"i\"\ndepends_on = {{ b = \"ready\" }}\n[containers.b]\nimage = \"i\"\n"
    ));
    assert!(e.message.contains("unknown condition `ready`"), "{e}");
}

#[test]
fn bad_supervision_keys_are_explained() {
    let e = error(&format!(
        "{TWO_IMAGES}[containers.a]\nimage = \"i\"\nkind = \"onboot\"\nrestart = \"always\"\n"
    ));
    assert_eq!(e.key, "containers.a.restart");
    let e = error(&format!(
        "{TWO_IMAGES}[containers.a]\nimage = \"i\"\non_failure = \"halt\"\n"
    ));
    assert!(e.message.contains("one-shot"), "{e}");
    let e = error(&format!(
        "{TWO_IMAGES}[containers.a]\nimage = \"i\"\nhealthcheck = {{ tcp = 80, http = \"80/\" }}\n"
    ));
    assert!(e.message.contains("exactly one"), "{e}");
    let e = error(&format!(
        "{TWO_IMAGES}[containers.a]\nimage = \"i\"\nstop_signal = \"SIGFOO\"\n"
    ));
    assert_eq!(e.key, "containers.a.stop_signal");
    let e = error(&format!(
        "{TWO_IMAGES}[containers.a]\nimage = \"i\"\nrestart_on_unhealthy = true\n"
    ));
    assert!(e.message.contains("needs a `healthcheck`"), "{e}");
    let e = error(&format!(
        "{TWO_IMAGES}[containers.a]\nimage = \"i\"\nrestart = \"on-failure:0\"\n"
    ));
    assert_eq!(e.key, "containers.a.restart");
}

#[test]
fn static_interfaces_take_v4_and_v6_addresses_routes_mtu_and_dns() {
    let c = parse(&with_host(
        r#"
[network.interfaces.lan]
match = { mac = "52:54:00:AB:cd:99" }
addresses = ["192.168.7.2/24", "fd00::2/64"]
routes = [{ to = "default", via = "10.0.2.2" }, { to = "10.9.0.0/16", via = "192.168.7.1" }, { to = "::/0", via = "fd00::1" }, { to = "10.8.0.0/16" }]
mtu = 1400
dns = ["192.168.7.1", "fd00::53"]

[network.interfaces.nic]
match = { driver = "virtio_net" }
dhcp4 = true
mtu = 9000
"#,
    ))
    .unwrap();
    let lan = &c.interfaces["lan"];
    assert_eq!(lan.link, LinkMatch::Mac([0x52, 0x54, 0, 0xab, 0xcd, 0x99]));
    assert_eq!(
        lan.addresses,
        [
            Prefix::parse("192.168.7.2/24").unwrap(),
            Prefix::parse("fd00::2/64").unwrap()
        ]
    );
    let routes: Vec<String> = lan
        .routes
        .iter()
        .map(|r| format!("{} {:?}", r.to, r.via))
        .collect();
    assert_eq!(
        routes,
        [
            "0.0.0.0/0 Some(10.0.2.2)",
            "10.9.0.0/16 Some(192.168.7.1)",
            "::/0 Some(fd00::1)",
            "10.8.0.0/16 None"
        ]
    );
    assert_eq!(lan.mtu, Some(1400));
    assert_eq!(lan.dns.len(), 2);
    assert!(lan.dns[1].is_ipv6());
    let nic = &c.interfaces["nic"];
    assert_eq!(nic.link, LinkMatch::Driver("virtio_net".into()));
    assert!(nic.dhcp4);
    assert_eq!(nic.mtu, Some(9000));
}

#[test]
fn an_ipv6_gateway_is_a_v6_default_route() {
    let c = parse(&with_host(
        "[network.interfaces.eth0]\naddress = \"fd00::2/64\"\ngateway = \"fd00::1\"\n",
    ))
    .unwrap();
    assert_eq!(
        c.interfaces["eth0"].routes[0].to,
        Prefix::parse("::/0").unwrap()
    );
}

#[test]
fn bad_network_keys_name_their_line_and_key() {
    let cases = [
        (
            "addresses = [\"10.0.0.2/24\", \"fd00::2/129\"]",
            "addresses[1]",
            "prefix length",
        ),
        (
            "address = \"10.0.0.2/24\"\naddresses = [\"10.0.0.3/24\"]",
            "addresses",
            "exclude",
        ),
        (
            "address = \"10.0.0.2/24\"\nroutes = [{ to = \"10.1.0.0/16\", via = \"fd00::1\" }]",
            "routes[0].via",
            "IP version",
        ),
        (
            "address = \"10.0.0.2/24\"\nroutes = [{ to = \"default\" }]",
            "routes[0].to",
            "needs `via`",
        ),
        (
            "address = \"10.0.0.2/24\"\nroutes = [{ to = \"10.1.0.0\", via = \"10.0.0.1\" }]",
            "routes[0].to",
            "network",
        ),
        (
            "address = \"10.0.0.2/24\"\nroutes = [{ to = \"default\", via = \"10.0.0.1\", metric = 5 }]",
            "routes[0].metric",
            "unknown field",
        ),
        ("address = \"10.0.0.2/24\"\nmtu = 20", "mtu", "68 to 65535"),
        (
            "address = \"10.0.0.2/24\"\ndns = [\"dns.example\"]",
            "dns[0]",
            "IPv4 or IPv6",
        ),
        (
            "address = \"10.0.0.2/24\"\nmatch = { mac = \"52:54:00:12:34\" }",
            "match.mac",
            "MAC address",
        ),
        (
            "address = \"10.0.0.2/24\"\nmatch = { mac = \"52:54:00:12:34:56\", driver = \"e1000\" }",
            "match",
            "exactly one",
        ),
        (
            "address = \"10.0.0.2/24\"\nmatch = { name = \"eth0\" }",
            "match.name",
            "unknown field",
        ),
        (
            "dhcp4 = true\nroutes = [{ to = \"default\", via = \"10.0.0.1\" }]",
            "routes",
            "exclude",
        ),
        ("dhcp4 = true\ndns = [\"10.0.0.1\"]", "dns", "exclude"),
        ("mtu = 1400", "", "dhcp4 = true"),
    ];
    for (body, key, message) in cases {
        let text = with_host(&format!("[network.interfaces.eth0]\n{body}\n"));
        let e = error(&text);
        let want = if key.is_empty() {
            "network.interfaces.eth0".to_string()
        } else {
            format!("network.interfaces.eth0.{key}")
        };
        assert_eq!(e.key, want, "{body}: {e}");
        assert!(e.message.contains(message), "{body}: {e}");
        assert!(e.line >= 3, "{body}: {e}");
    }
}

#[test]
fn macs_parse_strictly() {
    assert_eq!(
        parse_mac("52:54:00:12:34:56"),
        Some([0x52, 0x54, 0, 0x12, 0x34, 0x56])
    );
    assert_eq!(parse_mac("52:54:00:12:34:56:78"), None);
    assert_eq!(parse_mac("52:54:00:12:34:5"), None);
    assert_eq!(parse_mac("52-54-00-12-34-56"), None);
}

#[test]
fn interface_labels_and_duplicate_links_are_checked() {
    let e = error(&with_host(
        "[network.interfaces.a-very-long-interface]\ndhcp4 = true\n",
    ));
    assert_eq!(e.key, "network.interfaces.a-very-long-interface");
    assert!(e.message.contains("15 characters"), "{e}");
    // A label may be anything when `match` finds the link.
    parse(&with_host(
        "[network.interfaces.a-very-long-interface]\nmatch = { driver = \"virtio_net\" }\ndhcp4 = true\n\
[network.interfaces.another-long-label]\nmatch = { driver = \"virtio_net\" }\ndhcp4 = true\n",
    ))
    .unwrap();
    let e = error(&with_host(
        "[network.interfaces.a]\nmatch = { mac = \"52:54:00:12:34:56\" }\ndhcp4 = true\n\
[network.interfaces.b]\nmatch = { mac = \"52:54:00:12:34:56\" }\naddress = \"10.0.0.2/24\"\n",
    ));
    assert_eq!(e.key, "network.interfaces.b");
    assert_eq!(e.line, 6, "{e}");
    assert!(e.message.contains("[network.interfaces.a] already"), "{e}");
}

#[test]
fn dhcp4_may_be_optional_and_slaac_can_be_turned_off() {
    let c = parse(&with_host(
        "[network.interfaces.eth0]\ndhcp4 = \"optional\"\nslaac = false\n\
[network.interfaces.eth1]\ndhcp4 = true\n\
[network.interfaces.eth2]\ndhcp4 = false\naddress = \"10.0.0.2/24\"\n",
    ))
    .unwrap();
    let eth0 = &c.interfaces["eth0"];
    assert!(eth0.dhcp4 && eth0.optional && !eth0.slaac);
    assert_eq!(c.interfaces["eth1"], Interface::dhcp4("eth1"));
    let eth2 = &c.interfaces["eth2"];
    assert!(!eth2.dhcp4 && !eth2.optional && eth2.slaac);

    for (body, key, message) in [
        (
            "dhcp4 = \"yes\"",
            "dhcp4",
            "expected `true`, `false` or \"optional\"",
        ),
        (
            "dhcp4 = 1",
            "dhcp4",
            "expected `true`, `false` or \"optional\"",
        ),
        (
            "dhcp4 = \"optional\"\naddress = \"10.0.0.2/24\"",
            "address",
            "`address` and `dhcp4 = \"optional\"` exclude each other",
        ),
        ("slaac = \"no\"", "slaac", ""),
    ] {
        let text = with_host(&format!("[network.interfaces.eth0]\n{body}\n"));
        let e = error(&text);
        assert_eq!(
            e.key,
            format!("network.interfaces.eth0.{key}"),
            "{body}: {e}"
        );
        assert!(e.message.contains(message), "{body}: {e}");
        // On the offending key's line: the table starts on line 3.
        let line = 3 + body.lines().position(|l| l.starts_with(key)).unwrap();
        assert_eq!(e.line, line + 1, "{body}: {e}");
    }
}

#[test]
fn the_update_policy_defaults_to_every_service() {
    let text = with_host(
        "[images.b]\nlayers = [\"busybox:/bin/busybox\"]\n\
         [containers.web]\nimage = \"b\"\n\
         [containers.db]\nimage = \"b\"\n\
         [containers.seed]\nimage = \"b\"\nkind = \"onboot\"\n",
    );
    let c = parse(&text).unwrap();
    assert_eq!(c.update.version, "0");
    assert_eq!(c.update.health_timeout_ms, 300_000);
    assert_eq!(c.update.critical, ["db", "web"]);

    let c = parse(&format!(
        "{text}[update]\nversion = \"1.4.0\"\nhealth_timeout = \"90s\"\ncritical = [\"web\"]\n"
    ))
    .unwrap();
    assert_eq!(c.update.version, "1.4.0");
    assert_eq!(c.update.health_timeout_ms, 90_000);
    assert_eq!(c.update.critical, ["web"]);

    for (update, key, says) in [
        ("version = \"1.4-rc1\"", "update.version", "not a version"),
        (
            "critical = [\"nope\"]",
            "update.critical[0]",
            "no container named `nope`",
        ),
        ("critical = [\"seed\"]", "update.critical[0]", "is a task"),
        (
            "health_timeout = \"1ms\"",
            "update.health_timeout",
            "at least 1s",
        ),
        ("reboot = \"now\"", "update.reboot", "unknown field"),
    ] {
        let e = error(&format!("{text}[update]\n{update}\n"));
        assert_eq!(e.key, key, "{update}: {e}");
        assert!(e.to_string().contains(says), "{update}: {e}");
        assert!(e.line > 0, "{update}: {e}");
    }
}
