//! AWS region names: their shape (an error when wrong) and whether the SDK
//! knows them (a warning when not, naming the nearest known one: a new region
//! may be real, a typo like `eu-wset-1` is not).

use std::collections::BTreeSet;
use std::sync::Mutex;

/// The regions of the partitions aws-sdk-ssm 1.83 resolves endpoints for (its
/// built-in partition data: aws, aws-cn, aws-us-gov, the ISO partitions and
/// aws-eusc).
const KNOWN: &[&str] = &[
    "af-south-1",
    "ap-east-1",
    "ap-east-2",
    "ap-northeast-1",
    "ap-northeast-2",
    "ap-northeast-3",
    "ap-south-1",
    "ap-south-2",
    "ap-southeast-1",
    "ap-southeast-2",
    "ap-southeast-3",
    "ap-southeast-4",
    "ap-southeast-5",
    "ap-southeast-7",
    "ca-central-1",
    "ca-west-1",
    "eu-central-1",
    "eu-central-2",
    "eu-north-1",
    "eu-south-1",
    "eu-south-2",
    "eu-west-1",
    "eu-west-2",
    "eu-west-3",
    "il-central-1",
    "me-central-1",
    "me-south-1",
    "mx-central-1",
    "sa-east-1",
    "us-east-1",
    "us-east-2",
    "us-west-1",
    "us-west-2",
    "cn-north-1",
    "cn-northwest-1",
    "us-gov-east-1",
    "us-gov-west-1",
    "us-iso-east-1",
    "us-iso-west-1",
    "us-isob-east-1",
    "eu-isoe-west-1",
    "us-isof-east-1",
    "us-isof-south-1",
    "eusc-de-east-1",
];

/// The shape of an AWS region name: `eu-west-1`, `us-gov-east-1`.
pub fn is_region_name(region: &str) -> bool {
    let parts: Vec<&str> = region.split('-').collect();
    parts.len() >= 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        })
        && parts
            .last()
            .is_some_and(|p| p.chars().all(|c| c.is_ascii_digit()))
}

/// The warning for a well-formed region the SDK does not know, if it is one.
pub fn unknown_region_warning(region: &str) -> Option<String> {
    if KNOWN.contains(&region) {
        return None;
    }
    let nearest = KNOWN
        .iter()
        .min_by_key(|known| strsim::levenshtein(region, known))?;
    Some(format!(
        "region {region:?} is not one the AWS SDK knows; the nearest known region is {nearest} \
         (a region newer than this piprov is fine)"
    ))
}

/// Says `unknown_region_warning` on stderr, once per region and process (a
/// bench reads its recipe once per card).
pub fn warn_if_unknown(region: &str) {
    static WARNED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let Some(warning) = unknown_region_warning(region) else {
        return;
    };
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if warned.insert(region.to_string()) {
        eprintln!("warning: {warning}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_typo_names_the_region_meant() {
        assert_eq!(unknown_region_warning("eu-west-1"), None);
        let warning = unknown_region_warning("eu-wset-1").unwrap();
        assert!(
            warning.contains("nearest known region is eu-west-1"),
            "{warning}"
        );
        let warning = unknown_region_warning("mars-north-1").unwrap();
        assert!(warning.contains("eu-north-1"), "{warning}");
    }

    #[test]
    fn every_known_region_has_the_shape() {
        assert!(KNOWN.iter().all(|r| is_region_name(r)));
    }
}
