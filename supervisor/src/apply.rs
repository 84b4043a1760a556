//! `keel apply`: what a new host file changes on a running host.
//!
//! Everything here is decided before anything is touched, so that a file that cannot take
//! effect live is refused whole. What can change live is the set of containers and their
//! definitions, and the host's stop and shutdown timeouts. Everything that was set up once
//! at boot is refused, with the key and the reason:
//!
//! - `host.hostname`: besides sethostname(2), PID 1's network task writes it into /etc/hosts
//!   and offers it in DHCP requests, from state that only boot sets;
//! - `host.modules`: modules load at boot from the list `keel build` put in the OS image;
//! - `network.interfaces.*`: addresses, routes and DHCP clients are set up at boot;
//! - `networks.*`: bridges, the kernel modules they need and the NAT table's networks are
//!   set up at boot, and running containers are attached to the bridges as they are. Moving
//!   containers between, onto or off existing networks is live;
//! - `registries.*`: they serve `keel build` and boot pulls, whose CA files are in the OS image;
//! - `images.*` whose definition changed: the host has the image `keel build` embedded under
//!   that name, not the new one. A new image name is accepted only if the host has it.
//!
//! Each container is then added, removed, restarted with its new definition, updated in
//! place (only settings the supervisor reads when it stops, restarts or starts it changed),
//! or left alone.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use keel_config::{Container, DEFAULT_NETWORK, HostConfig};

/// A part of a host file that cannot take effect on a running host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The dotted key or section, as config errors name them (`networks.front`).
    pub key: String,
    pub why: String,
}

impl Refusal {
    fn new(key: impl Into<String>, why: impl Into<String>) -> Refusal {
        Refusal {
            key: key.into(),
            why: why.into(),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.why)
    }
}

/// What becomes of a container that is in both files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Unchanged,
    /// Only settings read when the container stops, exits or starts changed (see
    /// [`classify`]): they are taken over and the process runs on.
    InPlace,
    /// Stopped, then started again with its new definition.
    Restart,
}

/// What an apply does, container by container (names sorted in each list).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyPlan {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Definition changed: stopped, then started with the new one.
    pub restarted: Vec<String>,
    /// New settings taken over without a restart.
    pub updated: Vec<String>,
    pub unchanged: Vec<String>,
    /// Host settings that change live (`host.stop_timeout`, `host.shutdown_timeout`).
    pub settings: Vec<String>,
}

impl ApplyPlan {
    /// Containers that get a new process: added and restarted, sorted.
    pub fn starting(&self) -> Vec<String> {
        let mut names: Vec<String> = self.added.iter().chain(&self.restarted).cloned().collect();
        names.sort();
        names
    }
}

/// Copies into `c` the settings of `from` that the supervisor only reads when the container
/// stops (stop timeout), exits (restart policy, task failure), turns unhealthy, or is about
/// to start (dependencies), and the file position. None of them is part of the running
/// process, so changing them needs no restart; Docker Compose does not recreate a service
/// for its `depends_on` either.
fn take_live_settings(c: &mut Container, from: &Container) {
    c.order = from.order;
    c.restart = from.restart;
    c.lifecycle
        .depends_on
        .clone_from(&from.lifecycle.depends_on);
    c.lifecycle.stop_timeout_ms = from.lifecycle.stop_timeout_ms;
    c.lifecycle.restart_on_unhealthy = from.lifecycle.restart_on_unhealthy;
    c.lifecycle.on_failure = from.lifecycle.on_failure;
}

/// Compares a container's whole definition, old and new. Its position in the file (the
/// order of tasks) is not a change.
pub fn classify(old: &Container, new: &Container) -> Change {
    let mut carried = old.clone();
    take_live_settings(&mut carried, new);
    if carried != *new {
        return Change::Restart;
    }
    let mut moved = old.clone();
    moved.order = new.order;
    if moved == *new {
        Change::Unchanged
    } else {
        Change::InPlace
    }
}

/// The plan from the running host's file to the new one.
pub fn plan(old: &HostConfig, new: &HostConfig) -> ApplyPlan {
    let mut plan = ApplyPlan::default();
    for (name, c) in &new.containers {
        match old.containers.get(name) {
            None => plan.added.push(name.clone()),
            Some(before) => match classify(before, c) {
                Change::Unchanged => plan.unchanged.push(name.clone()),
                Change::InPlace => plan.updated.push(name.clone()),
                Change::Restart => plan.restarted.push(name.clone()),
            },
        }
    }
    plan.removed = old
        .containers
        .keys()
        .filter(|name| !new.containers.contains_key(*name))
        .cloned()
        .collect();
    if old.stop_timeout_ms != new.stop_timeout_ms {
        plan.settings.push("host.stop_timeout".into());
    }
    if old.shutdown_timeout_ms != new.shutdown_timeout_ms {
        plan.settings.push("host.shutdown_timeout".into());
    }
    plan
}

/// How a table of the host file changed.
enum Delta {
    Added,
    Removed,
    Changed,
}

/// The keys of two maps whose entries differ, with how.
fn deltas<'a, V: PartialEq>(
    old: &'a BTreeMap<String, V>,
    new: &'a BTreeMap<String, V>,
) -> Vec<(&'a str, Delta)> {
    let names: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    names
        .into_iter()
        .filter_map(|name| match (old.get(name), new.get(name)) {
            (None, Some(_)) => Some((name.as_str(), Delta::Added)),
            (Some(_), None) => Some((name.as_str(), Delta::Removed)),
            (Some(a), Some(b)) if a != b => Some((name.as_str(), Delta::Changed)),
            _ => None,
        })
        .collect()
}

fn describe_hostname(c: &HostConfig) -> String {
    if c.hostname_from_network {
        "none (from the network)".into()
    } else {
        format!("`{}`", c.hostname)
    }
}

/// Everything in `new` that differs from `old` where a running host cannot follow, in file
/// order of sections. Empty when the whole file can be applied live (as far as the files
/// tell: whether the host has the images is [`missing_images`]' business).
pub fn refusals(old: &HostConfig, new: &HostConfig) -> Vec<Refusal> {
    let mut out = Vec::new();
    if old.hostname_from_network != new.hostname_from_network
        || (!new.hostname_from_network && old.hostname != new.hostname)
    {
        out.push(Refusal::new(
            "host.hostname",
            format!(
                "was {}, now {}: the hostname is set at boot, also in /etc/hosts and in DHCP requests; a new one takes a reboot",
                describe_hostname(old),
                describe_hostname(new)
            ),
        ));
    }
    if old.verity != new.verity {
        out.push(Refusal::new(
            "host.verity",
            "dm-verity protection of the root image is decided by `keel build`; a change takes a rebuild and a reboot",
        ));
    }
    if old.modules != new.modules {
        out.push(Refusal::new(
            "host.modules",
            "kernel modules are loaded at boot from the list `keel build` put in the OS image; changing them takes a rebuild and a reboot",
        ));
    }
    if old.update.version != new.update.version {
        out.push(Refusal::new(
            "update.version",
            format!(
                "was {}, now {}: the version is the OS image's; a new one is built with `keel build` and installed with `keel upgrade`",
                old.update.version, new.update.version
            ),
        ));
    }
    for (name, delta) in deltas(&old.interfaces, &new.interfaces) {
        let what = match delta {
            Delta::Added => "a new interface",
            Delta::Removed => "removing an interface",
            Delta::Changed => "a changed interface",
        };
        out.push(Refusal::new(
            format!("network.interfaces.{name}"),
            format!("{what} takes a reboot: addresses, routes and DHCP clients are set up at boot"),
        ));
    }
    for (name, delta) in deltas(&old.networks, &new.networks) {
        let implicit = if name == DEFAULT_NETWORK {
            format!(" (the network `{DEFAULT_NETWORK}` exists once a container uses it)")
        } else {
            String::new()
        };
        let why = match delta {
            Delta::Added => format!(
                "a new container network{implicit} takes a reboot: bridges, their kernel modules and the NAT table are set up at boot"
            ),
            Delta::Removed => format!(
                "removing a container network{implicit} takes a reboot: its bridge and NAT rules were set up at boot"
            ),
            Delta::Changed => "a changed container network (subnet, gateway, bridge, masquerade, mtu) takes a reboot: running containers are attached to its bridge as it is".to_string(),
        };
        out.push(Refusal::new(format!("networks.{name}"), why));
    }
    for (name, _) in deltas(&old.registries, &new.registries) {
        out.push(Refusal::new(
            format!("registries.\"{name}\""),
            "registry settings serve `keel build` and boot pulls (their CA files are in the OS image); a change takes a rebuild and a reboot",
        ));
    }
    for (name, delta) in deltas(&old.images, &new.images) {
        if let Delta::Changed = delta {
            out.push(Refusal::new(
                format!("images.{name}"),
                "changed: this host has the image `keel build` put in its OS image under this name, not the new one; a changed image takes a rebuild and a reboot",
            ));
        }
    }
    if out.is_empty() && !same_boot_settings(old, new) {
        // A setting added to the schema after this list was written: refused rather than
        // silently left as booted.
        out.push(Refusal::new(
            "host",
            "a setting that only takes effect when the host is built or booted changed; it takes a rebuild and a reboot",
        ));
    }
    out
}

/// Whether two files agree on everything but what `keel apply` changes live.
fn same_boot_settings(old: &HostConfig, new: &HostConfig) -> bool {
    let strip = |c: &HostConfig| {
        let mut c = c.clone();
        c.path = Default::default();
        c.stop_timeout_ms = 0;
        c.shutdown_timeout_ms = 0;
        c.images.clear();
        c.containers.clear();
        // Read when an update is judged, after it boots: nothing to change live.
        c.update.health_timeout_ms = 0;
        c.update.critical.clear();
        c.update.reboot_window = None;
        c
    };
    strip(old) == strip(new)
}

/// Images the new file needs and the host does not have: those of containers that will be
/// started (added or restarted) and newly declared ones. `has_image` says whether the host
/// has one (or will, for an image pulled at boot), and why not.
pub fn missing_images(
    old: &HostConfig,
    new: &HostConfig,
    plan: &ApplyPlan,
    has_image: impl Fn(&str) -> Result<(), String>,
) -> Vec<Refusal> {
    let mut needed: BTreeMap<&str, String> = BTreeMap::new();
    for name in new.images.keys() {
        if !old.images.contains_key(name) {
            needed.insert(name, format!("images.{name}"));
        }
    }
    for name in plan.starting() {
        if let Some(c) = new.containers.get(&name) {
            needed
                .entry(c.image.as_str())
                .or_insert_with(|| format!("containers.{name}.image"));
        }
    }
    needed
        .into_iter()
        .filter_map(|(image, key)| {
            has_image(image).err().map(|e| {
                Refusal::new(
                    key,
                    format!(
                        "image `{image}` is not on this host ({e}); a host has the images `keel build` put in its OS image and those it pulls at boot"
                    ),
                )
            })
        })
        .collect()
}

/// Of the containers being stopped (each with the names it depends on), those that no other
/// one being stopped depends on: dependents stop first, as at shutdown.
pub fn stoppable(stopping: &BTreeMap<String, Vec<String>>) -> Vec<String> {
    stopping
        .keys()
        .filter(|name| {
            !stopping
                .iter()
                .any(|(other, deps)| other != *name && deps.contains(name))
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const BASE: &str = r#"
[host]
hostname = "h"
stop_timeout = "2s"

[images.box]
layers = ["busybox:/bin/busybox"]

[containers.a]
image = "box"
command = ["sleep", "1000"]

[containers.b]
image = "box"
command = ["sleep", "2000"]
env = { MODE = "one" }

[containers.c]
image = "box"
command = ["sleep", "3000"]
"#;

    fn parse(text: &str) -> HostConfig {
        HostConfig::parse(Path::new("apply:HOST.toml"), text).unwrap()
    }

    /// BASE with `from` replaced by `to` (which must be there).
    fn edit(from: &str, to: &str) -> HostConfig {
        assert!(BASE.contains(from), "{from}");
        parse(&BASE.replace(from, to))
    }

    #[test]
    fn the_same_file_changes_nothing() {
        let old = parse(BASE);
        let p = plan(&old, &parse(BASE));
        assert_eq!(p.unchanged, ["a", "b", "c"]);
        assert!(p.added.is_empty() && p.removed.is_empty() && p.restarted.is_empty());
        assert!(p.updated.is_empty() && p.settings.is_empty());
        assert!(refusals(&old, &parse(BASE)).is_empty());
    }

    #[test]
    fn one_changed_one_removed_one_added() {
        let old = parse(BASE);
        let text = BASE.replace("MODE = \"one\"", "MODE = \"two\"").replace(
            "[containers.c]\nimage = \"box\"\ncommand = [\"sleep\", \"3000\"]\n",
            "[containers.d]\nimage = \"box\"\ncommand = [\"sleep\", \"4000\"]\n",
        );
        let p = plan(&old, &parse(&text));
        assert_eq!(p.unchanged, ["a"]);
        assert_eq!(p.restarted, ["b"]);
        assert_eq!(p.removed, ["c"]);
        assert_eq!(p.added, ["d"]);
        assert_eq!(p.starting(), ["b", "d"]);
    }

    #[test]
    fn moving_a_container_in_the_file_is_no_change() {
        let old = parse(BASE);
        let moved = BASE.replace(
            "[containers.a]\nimage = \"box\"\ncommand = [\"sleep\", \"1000\"]\n",
            "",
        ) + "\n[containers.a]\nimage = \"box\"\ncommand = [\"sleep\", \"1000\"]\n";
        let new = parse(&moved);
        assert_ne!(old.containers["a"].order, new.containers["a"].order);
        assert_eq!(
            classify(&old.containers["a"], &new.containers["a"]),
            Change::Unchanged
        );
    }

    #[test]
    fn supervision_settings_change_in_place_and_the_rest_restarts() {
        let old = parse(BASE);
        let a =
            |text: &str| edit("command = [\"sleep\", \"1000\"]\n", text).containers["a"].clone();
        for in_place in [
            "command = [\"sleep\", \"1000\"]\nrestart = \"on-failure:3\"\n",
            "command = [\"sleep\", \"1000\"]\nstop_timeout = \"30s\"\n",
            "command = [\"sleep\", \"1000\"]\ndepends_on = [\"b\"]\n",
        ] {
            assert_eq!(
                classify(&old.containers["a"], &a(in_place)),
                Change::InPlace,
                "{in_place}"
            );
        }
        for restart in [
            "command = [\"sleep\", \"1001\"]\n",
            "command = [\"sleep\", \"1000\"]\nenv = { X = \"1\" }\n",
            "command = [\"sleep\", \"1000\"]\nmemory = \"64M\"\n",
            "command = [\"sleep\", \"1000\"]\nstop_signal = \"SIGINT\"\n",
            "command = [\"sleep\", \"1000\"]\nconsole = false\n",
            "command = [\"sleep\", \"1000\"]\nnetwork = \"none\"\n",
            "command = [\"sleep\", \"1000\"]\nkind = \"onboot\"\nrestart = \"no\"\n",
            "command = [\"sleep\", \"1000\"]\nhealthcheck = { tcp = 80 }\n",
        ] {
            assert_eq!(
                classify(&old.containers["a"], &a(restart)),
                Change::Restart,
                "{restart}"
            );
        }
    }

    #[test]
    fn the_host_stop_timeout_changes_containers_in_place() {
        let old = parse(BASE);
        // 20 s also moves the default shutdown_timeout (3 x stop_timeout, at least 30 s).
        let new = edit("stop_timeout = \"2s\"", "stop_timeout = \"20s\"");
        let p = plan(&old, &new);
        assert_eq!(p.updated, ["a", "b", "c"]);
        assert_eq!(p.settings, ["host.stop_timeout", "host.shutdown_timeout"]);
        assert!(refusals(&old, &new).is_empty());
    }

    #[test]
    fn boot_time_settings_are_refused_by_key() {
        let old = parse(BASE);
        let keys = |new: &HostConfig| -> Vec<String> {
            refusals(&old, new).into_iter().map(|r| r.key).collect()
        };
        assert_eq!(
            keys(&edit("hostname = \"h\"", "hostname = \"other\"")),
            ["host.hostname"]
        );
        assert_eq!(
            keys(&edit("hostname = \"h\"\n", "")),
            ["host.hostname"],
            "a name from the network instead"
        );
        assert_eq!(
            keys(&edit(
                "hostname = \"h\"",
                "hostname = \"h\"\nmodules = [\"dummy\"]"
            )),
            ["host.modules"]
        );
        assert_eq!(
            keys(&edit("hostname = \"h\"", "hostname = \"h\"\nverity = true")),
            ["host.verity"]
        );
        assert_eq!(
            keys(&edit(
                "[images.box]",
                "[network.interfaces.eth0]\ndhcp4 = true\n\n[images.box]"
            )),
            ["network.interfaces.eth0"]
        );
        assert_eq!(
            keys(&edit(
                "[images.box]",
                "[registries.\"r.example\"]\ninsecure = true\n\n[images.box]"
            )),
            ["registries.\"r.example\""]
        );
        assert_eq!(
            keys(&edit(
                "layers = [\"busybox:/bin/busybox\"]",
                "layers = [\"busybox:/usr/bin/busybox\"]"
            )),
            ["images.box"]
        );
        // Using the default bridge for the first time adds a network.
        let bridged = edit(
            "command = [\"sleep\", \"3000\"]\n",
            "command = [\"sleep\", \"3000\"]\nnetwork = \"bridge\"\n",
        );
        let r = refusals(&old, &bridged);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].key, "networks.bridge");
        assert!(
            r[0].why.contains("exists once a container uses it"),
            "{}",
            r[0]
        );
        // Several at once are all reported.
        let many = parse(
            &BASE
                .replace(
                    "hostname = \"h\"",
                    "hostname = \"x\"\nmodules = [\"dummy\"]",
                )
                .replace(
                    "[images.box]",
                    "[networks.back]\nsubnet = \"10.90.0.0/24\"\n\n[images.box]",
                ),
        );
        assert_eq!(
            keys(&many),
            ["host.hostname", "host.modules", "networks.back"]
        );
    }

    #[test]
    fn moving_containers_between_existing_networks_is_live() {
        let nets = "[networks.front]\nsubnet = \"10.90.0.0/24\"\n\n[networks.back]\nsubnet = \"10.91.0.0/24\"\n\n[images.box]";
        let with = |network: &str| {
            parse(&BASE.replace("[images.box]", nets).replace(
                "command = [\"sleep\", \"3000\"]\n",
                &format!("command = [\"sleep\", \"3000\"]\nnetwork = \"{network}\"\n"),
            ))
        };
        let old = with("front");
        let new = with("back");
        assert!(refusals(&old, &new).is_empty());
        assert_eq!(plan(&old, &new).restarted, ["c"]);
    }

    #[test]
    fn images_are_checked_for_what_will_start() {
        let old = parse(BASE);
        let new = parse(
            &BASE
                .replace("MODE = \"one\"", "MODE = \"two\"")
                .replace(
                    "[containers.a]",
                    "[images.extra]\nlayout = \"x\"\n\n[images.new]\nlayout = \"y\"\n\n[containers.a]",
                )
                .replace(
                    "[containers.c]\nimage = \"box\"",
                    "[containers.c]\nimage = \"new\"",
                ),
        );
        let p = plan(&old, &new);
        assert_eq!(p.restarted, ["b", "c"]);
        let asked = std::cell::RefCell::new(Vec::new());
        let missing = missing_images(&old, &new, &p, |image| {
            asked.borrow_mut().push(image.to_string());
            match image {
                "box" => Ok(()),
                _ => Err("not in the layout".into()),
            }
        });
        assert_eq!(asked.into_inner(), ["box", "extra", "new"]);
        let keys: Vec<&str> = missing.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["images.extra", "images.new"]);
        assert!(
            missing[1]
                .why
                .contains("`new` is not on this host (not in the layout)")
        );

        // An image only unchanged containers use is not looked at.
        let p = plan(&old, &parse(BASE));
        assert!(missing_images(&old, &parse(BASE), &p, |_| Err("no".into())).is_empty());
    }

    #[test]
    fn dependents_stop_first() {
        let stopping: BTreeMap<String, Vec<String>> = [
            ("db".to_string(), vec![]),
            ("app".to_string(), vec!["db".to_string()]),
            ("web".to_string(), vec!["app".to_string(), "db".to_string()]),
            ("lone".to_string(), vec!["elsewhere".to_string()]),
        ]
        .into_iter()
        .collect();
        assert_eq!(stoppable(&stopping), ["lone", "web"]);
        let mut rest = stopping.clone();
        rest.remove("web");
        rest.remove("lone");
        assert_eq!(stoppable(&rest), ["app"]);
        rest.remove("app");
        assert_eq!(stoppable(&rest), ["db"]);
    }
}
