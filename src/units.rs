//! Durations as people write them ("30 days", "1 day 2 hours"), for messages;
//! humantime's own form ("30days") reads as a typo.

use std::time::Duration;

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
    fn whole_units_read_as_words() {
        assert_eq!(duration(Duration::from_secs(30 * 86_400)), "30 days");
        assert_eq!(duration(Duration::from_secs(86_400)), "1 day");
        assert_eq!(duration(Duration::from_secs(7_200)), "2 hours");
        assert_eq!(duration(Duration::from_secs(90)), "1 minute 30 seconds");
        assert_eq!(duration(Duration::from_secs(86_400 + 60)), "1 day 1 minute");
    }
}
