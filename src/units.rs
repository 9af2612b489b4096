//! Sizes and durations as people read them. Sizes: binary units everywhere
//! (`devices`, `inspect`, `flash`, the progress bars, the cache), so one card
//! shows one number. Durations: "30 days", "1 day 2 hours"; humantime's own
//! form ("30days") reads as a typo.

use std::time::Duration;

/// `1.2 GiB`, `64.0 MiB`, `512 B`.
pub fn size(bytes: u64) -> String {
    bytesize::ByteSize(bytes).display().iec().to_string()
}

pub fn duration(d: Duration) -> String {
    let mut left = d.as_secs();
    let mut parts = Vec::new();
    for (unit, secs) in [
        ("day", 86_400),
        ("hour", 3_600),
        ("minute", 60),
        ("second", 1),
    ] {
        let n = left / secs;
        left %= secs;
        if n > 0 {
            parts.push(format!("{n} {unit}{}", if n == 1 { "" } else { "s" }));
        }
    }
    if parts.is_empty() {
        return humantime::format_duration(d).to_string();
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_binary() {
        assert_eq!(size(64 << 20), "64.0 MiB");
        assert_eq!(size(1_300_000_000), "1.2 GiB");
        assert_eq!(size(512), "512 B");
    }

    #[test]
    fn whole_units_read_as_words() {
        assert_eq!(duration(Duration::from_secs(30 * 86_400)), "30 days");
        assert_eq!(duration(Duration::from_secs(86_400)), "1 day");
        assert_eq!(duration(Duration::from_secs(7_200)), "2 hours");
        assert_eq!(duration(Duration::from_secs(90)), "1 minute 30 seconds");
        assert_eq!(duration(Duration::from_secs(86_400 + 60)), "1 day 1 minute");
    }
}
