//! Finding links: by name, MAC or driver (through sysfs), and bringing them up.

use super::*;

pub(super) async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>, String> {
    Ok(find_link(handle, name).await?.map(|(i, _)| i))
}

pub(super) async fn find_link(
    handle: &Handle,
    name: &str,
) -> Result<Option<(u32, Vec<u8>)>, String> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(msg)) => {
            let mac = msg
                .attributes
                .iter()
                .find_map(|a| match a {
                    LinkAttribute::Address(mac) => Some(mac.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            Ok(Some((msg.header.index, mac)))
        }
        Ok(None) => Ok(None),
        // ENODEV: not there (yet).
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(format!("looking up {name}: {e}")),
    }
}

/// Finds the link a table is for, waiting for it as for a named one: drivers register
/// their interfaces asynchronously after the module loads. Returns its kernel name,
/// index and MAC.
pub(super) async fn resolve(
    handle: &Handle,
    link: &LinkMatch,
    taken: &[String],
) -> Result<(String, u32, Vec<u8>), String> {
    let start = Instant::now();
    loop {
        let name = match link {
            LinkMatch::Name(name) => Some(name.clone()),
            other => find_in_sysfs(Path::new(SYS_CLASS_NET), other, taken),
        };
        if let Some(name) = name
            && let Some((index, mac)) = find_link(handle, &name).await?
        {
            return Ok((name, index, mac));
        }
        if start.elapsed() > LINK_TIMEOUT {
            return Err(format!(
                "no interface {} appeared within {} s",
                describe_match(link),
                LINK_TIMEOUT.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub(super) fn describe_match(link: &LinkMatch) -> String {
    match link {
        LinkMatch::Name(name) => format!("named {name}"),
        LinkMatch::Mac(mac) => format!("with MAC {}", format_mac(mac)),
        LinkMatch::Driver(driver) => format!("with driver {driver}"),
    }
}

pub(super) fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The first link under `root` (/sys/class/net) that a MAC or driver match selects and
/// that nothing configured yet, by name order. Only links with a `device` (hardware, not
/// bridges, VLANs or bonds that borrow a MAC) are candidates.
pub fn find_in_sysfs(root: &Path, link: &LinkMatch, taken: &[String]) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(root)
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    names.into_iter().find(|name| {
        let dir = root.join(name);
        if !dir.join("device").exists() {
            return false;
        }
        match link {
            LinkMatch::Name(n) => n == name,
            LinkMatch::Mac(mac) => std::fs::read_to_string(dir.join("address"))
                .ok()
                .and_then(|text| keel_config::parse_mac(text.trim()))
                .is_some_and(|found| found == *mac),
            LinkMatch::Driver(driver) => {
                !taken.contains(name)
                    && std::fs::read_link(dir.join("device/driver"))
                        .ok()
                        .is_some_and(|target| {
                            target
                                .file_name()
                                .is_some_and(|f| f.to_string_lossy() == *driver)
                        })
            }
        }
    })
}

pub(super) async fn set_up(handle: &Handle, index: u32) -> Result<(), String> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|e| format!("bringing up link {index}: {e}"))
}
