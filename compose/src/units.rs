//! Compose's durations, sizes and CPU shares in Keel's terms.

/// A Compose duration (`1m30s`, `10s`, `500ms`, `1h`, `2.5s`) in milliseconds.
pub fn duration_ms(text: &str) -> Option<u64> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_len] {
            "ns" => 1e-6,
            "us" | "µs" => 1e-3,
            "ms" => 1.0,
            "s" => 1e3,
            "m" => 60e3,
            "h" => 3600e3,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * factor;
    }
    Some(total.round() as u64)
}

/// Milliseconds as a Keel duration: the largest unit it divides into.
pub fn keel_duration(ms: u64) -> String {
    if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// A Compose size (`64m`, `1g`, `512mb`, `1024`, `1.5g`) in bytes.
pub fn size_bytes(text: &str) -> Option<u64> {
    let text = text.trim().to_ascii_lowercase();
    let number_len = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let number: f64 = text[..number_len].parse().ok()?;
    let factor: f64 = match text[number_len..].trim() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" | "tib" => 1024f64.powi(4),
        _ => return None,
    };
    Some((number * factor).round() as u64)
}

/// Bytes as a Keel size: the largest binary unit it divides into.
pub fn keel_size(bytes: u64) -> String {
    for (shift, unit) in [(30, "G"), (20, "M"), (10, "K")] {
        if bytes > 0 && bytes.is_multiple_of(1u64 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// Docker's `cpu_shares` (2–262144, 1024 by default) as a cgroup v2 `cpu.weight`, the way
/// runc and crun convert it.
pub fn cpu_weight(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_sizes_and_shares() {
        assert_eq!(duration_ms("1m30s"), Some(90_000));
        assert_eq!(duration_ms("500ms"), Some(500));
        assert_eq!(duration_ms("1.5s"), Some(1500));
        assert_eq!(duration_ms("1h"), Some(3_600_000));
        assert_eq!(duration_ms("10"), None);
        assert_eq!(keel_duration(90_000), "90s");
        assert_eq!(keel_duration(120_000), "2m");
        assert_eq!(keel_duration(1500), "1500ms");
        assert_eq!(size_bytes("64m"), Some(64 << 20));
        assert_eq!(size_bytes("1.5g"), Some(3 << 29));
        assert_eq!(size_bytes("512MB"), Some(512 << 20));
        assert_eq!(size_bytes("lots"), None);
        assert_eq!(keel_size(64 << 20), "64M");
        assert_eq!(keel_size(1000), "1000");
        assert_eq!(cpu_weight(1024), 39);
        assert_eq!(cpu_weight(2), 1);
        assert_eq!(cpu_weight(262_144), 10_000);
    }
}
