//! Allocation of user namespace ranges (`userns = "auto"`) that never overlap.

use super::*;

/// Where automatically allocated user namespace ranges start (like /etc/subuid's usual
/// first range), and how many ids each gets.
pub const AUTO_USERNS_START: u32 = 100_000;
pub const AUTO_USERNS_SIZE: u32 = 65_536;

/// Gives every container with a user namespace its id range: explicit maps as written,
/// `auto` ones the next free block of 65536 ids after AUTO_USERNS_START that overlaps no
/// other range. Containers are taken in name order, so a name keeps its range as long as
/// the set of user-namespaced containers before it does not change.
pub fn allocate_userns(containers: &BTreeMap<String, Container>) -> BTreeMap<String, IdMap> {
    allocate_userns_around(containers, &BTreeMap::new(), &[])
}

/// [`allocate_userns`] on a running host: the containers in `fixed` keep the ranges they
/// run with, and no new range overlaps those nor `taken` (ranges of containers still
/// stopping).
pub fn allocate_userns_around(
    containers: &BTreeMap<String, Container>,
    fixed: &BTreeMap<String, IdMap>,
    taken: &[IdMap],
) -> BTreeMap<String, IdMap> {
    use keel_config::UserNamespace;
    let mut out = BTreeMap::new();
    let span = |m: &IdMap| {
        [
            (u64::from(m.uid), u64::from(m.uid) + u64::from(m.size)),
            (u64::from(m.gid), u64::from(m.gid) + u64::from(m.size)),
        ]
    };
    let mut taken: Vec<(u64, u64)> = taken.iter().flat_map(span).collect();
    for (name, map) in fixed {
        if containers.contains_key(name) {
            out.insert(name.clone(), *map);
            taken.extend(span(map));
        }
    }
    for (name, c) in containers {
        if out.contains_key(name) {
            continue;
        }
        if let Some(UserNamespace::Map { uid, gid, size }) = c.isolation.userns {
            out.insert(name.clone(), IdMap { uid, gid, size });
            taken.push((u64::from(uid), u64::from(uid) + u64::from(size)));
            taken.push((u64::from(gid), u64::from(gid) + u64::from(size)));
        }
    }
    let mut next = u64::from(AUTO_USERNS_START);
    for (name, c) in containers {
        if c.isolation.userns != Some(UserNamespace::Auto) || out.contains_key(name) {
            continue;
        }
        let size = u64::from(AUTO_USERNS_SIZE);
        while let Some(&(_, end)) = taken
            .iter()
            .find(|(start, end)| next < *end && *start < next + size)
        {
            next = end.div_ceil(size) * size;
        }
        let Ok(base) = u32::try_from(next) else { break };
        if base.checked_add(AUTO_USERNS_SIZE).is_none() {
            log::error!("{name}: no free user namespace range left");
            break;
        }
        out.insert(
            name.clone(),
            IdMap {
                uid: base,
                gid: base,
                size: AUTO_USERNS_SIZE,
            },
        );
        taken.push((next, next + size));
        next += size;
    }
    out
}
