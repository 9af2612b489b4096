//! The managed nodes the cards became: list them with their tags, find what needs
//! attention (clones, stale nodes, dead activations), and deregister stale ones.
//! The judgements are plain functions over what SSM returned, so they are tested
//! without a network.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use anyhow::Result;
use aws_sdk_ssm::Client;
use aws_sdk_ssm::types::{InstanceInformationStringFilter, ResourceTypeForTagging};
use serde::Serialize;

use super::{ActivationInfo, explain};

/// Tags piprov puts on activations (and so on the nodes registered with them,
/// which inherit an activation's tags) and on nodes the broker registers.
pub const TAG_HOSTNAME: &str = "piprov:hostname";
pub const TAG_SERIAL: &str = "piprov:serial";
pub const TAG_IMAGE: &str = "piprov:image-sha256";
pub const TAG_VERSION: &str = "piprov:version";
pub const TAG_BROKER: &str = "piprov:broker";
/// The broker's issue an activation was made for (see broker/cleanup.rs).
pub const TAG_ISSUE: &str = "piprov:issue";
/// What Fleet Manager and the console show as a node's name.
pub const TAG_NAME: &str = "Name";

#[derive(Debug, Clone, Serialize)]
pub struct Node {
    pub id: String,
    pub name: Option<String>,
    /// `Online`, `ConnectionLost` or `Inactive`.
    pub ping_status: String,
    #[serde(skip)]
    pub last_ping: Option<SystemTime>,
    pub last_ping_at: Option<String>,
    pub agent_version: Option<String>,
    pub computer_name: Option<String>,
    pub ip_address: Option<String>,
    pub registered_at: Option<String>,
    #[serde(skip)]
    pub registered: Option<SystemTime>,
    pub activation_id: Option<String>,
    pub tags: BTreeMap<String, String>,
}

impl Node {
    pub fn online(&self) -> bool {
        self.ping_status == "Online"
    }

    pub fn serial(&self) -> Option<&str> {
        self.tags.get(TAG_SERIAL).map(String::as_str)
    }

    /// The name the node goes by: the computer name it reports, or the one
    /// piprov gave its card.
    pub fn hostname(&self) -> Option<&str> {
        self.computer_name
            .as_deref()
            .or(self.tags.get(TAG_HOSTNAME).map(String::as_str))
    }

    /// Since when the node has been silent (its registration if it never pinged).
    pub fn silent_since(&self) -> Option<SystemTime> {
        self.last_ping.or(self.registered)
    }
}

fn rfc3339(t: Option<SystemTime>) -> Option<String> {
    t.map(|t| humantime::format_rfc3339_seconds(t).to_string())
}

/// Hybrid (managed instance) nodes, optionally only those carrying every tag given.
pub async fn list_nodes(client: &Client, tags: &[(String, String)]) -> Result<Vec<Node>> {
    let filters = tags
        .iter()
        .map(|(key, value)| (format!("tag:{key}"), value.clone()))
        .collect::<Vec<_>>();
    nodes_matching(client, &filters).await
}

/// One node by id, with its tags; `None` if SSM does not know it.
pub async fn describe_node(client: &Client, id: &str) -> Result<Option<Node>> {
    let filters = [("InstanceIds".to_string(), id.to_string())];
    Ok(nodes_matching(client, &filters).await?.into_iter().next())
}

pub async fn add_node_tags(client: &Client, id: &str, tags: &[(String, String)]) -> Result<()> {
    let mut request = client
        .add_tags_to_resource()
        .resource_type(ResourceTypeForTagging::ManagedInstance)
        .resource_id(id);
    for (key, value) in tags {
        request = request.tags(
            aws_sdk_ssm::types::Tag::builder()
                .key(key)
                .value(value)
                .build()?,
        );
    }
    request
        .send()
        .await
        .map_err(|e| explain(e, &format!("tagging {id}")))?;
    Ok(())
}

/// The activation a node was made with, by its id (no tags read); `None` if SSM
/// does not know the node.
pub async fn node_activation(client: &Client, id: &str) -> Result<Option<String>> {
    let filters = [("InstanceIds".to_string(), id.to_string())];
    Ok(describe_matching(client, &filters)
        .await?
        .into_iter()
        .next()
        .and_then(|n| n.activation_id))
}

async fn nodes_matching(client: &Client, filters: &[(String, String)]) -> Result<Vec<Node>> {
    let mut nodes = describe_matching(client, filters).await?;
    // DescribeInstanceInformation carries no tags: one call per node.
    for node in &mut nodes {
        let out = client
            .list_tags_for_resource()
            .resource_type(ResourceTypeForTagging::ManagedInstance)
            .resource_id(&node.id)
            .send()
            .await
            .map_err(|e| explain(e, &format!("reading the tags of {}", node.id)))?;
        node.tags = out
            .tag_list()
            .iter()
            .map(|t| (t.key().to_string(), t.value().to_string()))
            .collect();
    }
    Ok(nodes)
}

/// The managed nodes matching `filters`, without their tags.
async fn describe_matching(client: &Client, filters: &[(String, String)]) -> Result<Vec<Node>> {
    let mut request = client.describe_instance_information().filters(
        InstanceInformationStringFilter::builder()
            .key("ResourceType")
            .values("ManagedInstance")
            .build()?,
    );
    for (key, value) in filters {
        request = request.filters(
            InstanceInformationStringFilter::builder()
                .key(key)
                .values(value)
                .build()?,
        );
    }
    let mut nodes = Vec::new();
    let mut pages = request.into_paginator().send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| explain(e, "listing managed nodes"))?;
        for info in page.instance_information_list() {
            let last_ping = info
                .last_ping_date_time()
                .and_then(|d| SystemTime::try_from(*d).ok());
            let registered = info
                .registration_date()
                .and_then(|d| SystemTime::try_from(*d).ok());
            let text = |s: Option<&str>| s.filter(|s| !s.is_empty()).map(str::to_string);
            nodes.push(Node {
                id: info.instance_id().unwrap_or_default().to_string(),
                name: text(info.name()),
                ping_status: info
                    .ping_status()
                    .map_or("Unknown".into(), |s| s.as_str().to_string()),
                last_ping,
                last_ping_at: rfc3339(last_ping),
                agent_version: text(info.agent_version()),
                computer_name: text(info.computer_name()),
                ip_address: text(info.ip_address()),
                registered_at: rfc3339(registered),
                registered,
                activation_id: text(info.activation_id()),
                tags: BTreeMap::new(),
            });
        }
    }
    Ok(nodes)
}

/// How many hybrid nodes the account has in this region (no tags read).
pub async fn count_hybrid_nodes(client: &Client) -> Result<usize> {
    let request = client.describe_instance_information().filters(
        InstanceInformationStringFilter::builder()
            .key("ResourceType")
            .values("ManagedInstance")
            .build()?,
    );
    let mut count = 0;
    let mut pages = request.into_paginator().send();
    while let Some(page) = pages.next().await {
        count += page
            .map_err(|e| explain(e, "counting managed nodes"))?
            .instance_information_list()
            .len();
    }
    Ok(count)
}

/// The service setting that holds the account's instance tier in a region.
pub const TIER_SETTING: &str = "/ssm/managed-instance/activation-tier";
/// Hybrid nodes the standard tier allows per account and region.
pub const STANDARD_NODE_LIMIT: usize = 1000;

/// The account's instance tier: `standard` (free, up to 1,000 hybrid nodes, no
/// Session Manager on them) or `advanced` (charged per node-hour).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Tier {
    pub setting: String,
    pub hybrid_nodes: usize,
    /// The standard tier's limit; none on the advanced tier.
    pub node_limit: Option<usize>,
}

pub async fn instance_tier(client: &Client) -> Result<Tier> {
    let out = client
        .get_service_setting()
        .setting_id(TIER_SETTING)
        .send()
        .await
        .map_err(|e| explain(e, "reading the instance tier (GetServiceSetting)"))?;
    let setting = out
        .service_setting()
        .and_then(|s| s.setting_value())
        .unwrap_or("standard")
        .to_ascii_lowercase();
    let hybrid_nodes = count_hybrid_nodes(client).await?;
    let node_limit = (setting != "advanced").then_some(STANDARD_NODE_LIMIT);
    Ok(Tier {
        setting,
        hybrid_nodes,
        node_limit,
    })
}

pub async fn deregister(client: &Client, id: &str) -> Result<()> {
    client
        .deregister_managed_instance()
        .instance_id(id)
        .send()
        .await
        .map_err(|e| explain(e, &format!("deregistering {id}")))?;
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Problem {
    /// Several nodes claim one Pi serial: a card was cloned, or a Pi re-registered
    /// and its old node was left behind.
    SharedSerial {
        serial: String,
        nodes: Vec<String>,
    },
    /// Several nodes go by one hostname.
    SharedHostname {
        hostname: String,
        nodes: Vec<String>,
    },
    Offline {
        node: String,
        days: u64,
    },
    ActivationExpired {
        activation: String,
    },
    ActivationUsedUp {
        activation: String,
    },
    /// The standard tier: Session Manager (and so `fleet ssh-config`) cannot
    /// reach hybrid nodes.
    StandardTier,
    /// Most of the standard tier's hybrid nodes are used.
    NearNodeLimit {
        nodes: usize,
        limit: usize,
    },
}

impl Problem {
    pub fn describe(&self) -> String {
        match self {
            Problem::SharedSerial { serial, nodes } => {
                format!("Pi serial {serial} is claimed by {}", nodes.join(", "))
            }
            Problem::SharedHostname { hostname, nodes } => {
                format!("hostname {hostname} is used by {}", nodes.join(", "))
            }
            Problem::Offline { node, days } => format!("{node} has been offline for {days} days"),
            Problem::ActivationExpired { activation } => {
                format!("activation {activation} has expired: delete it")
            }
            Problem::ActivationUsedUp { activation } => {
                format!("activation {activation} has no registrations left: delete it")
            }
            Problem::StandardTier => "the account is on the standard-instances tier in this \
                region: Session Manager cannot reach hybrid nodes (no shells, no `fleet \
                ssh-config`); switch to the advanced-instances tier (charged per node-hour) in \
                Fleet Manager's settings, or with `aws ssm update-service-setting --setting-id \
                /ssm/managed-instance/activation-tier --setting-value advanced`"
                .to_string(),
            Problem::NearNodeLimit { nodes, limit } => format!(
                "{nodes} of the standard tier's {limit} hybrid nodes are registered: \
                 more need the advanced-instances tier"
            ),
        }
    }
}

pub fn diagnose(
    nodes: &[Node],
    activations: &[ActivationInfo],
    offline_after: Duration,
    now: SystemTime,
) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut by_serial: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut by_hostname: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for node in nodes {
        if let Some(serial) = node.serial() {
            by_serial.entry(serial).or_default().push(node.id.clone());
        }
        if let Some(hostname) = node.hostname() {
            by_hostname
                .entry(hostname)
                .or_default()
                .push(node.id.clone());
        }
    }
    for (serial, ids) in by_serial.into_iter().filter(|(_, ids)| ids.len() > 1) {
        problems.push(Problem::SharedSerial {
            serial: serial.to_string(),
            nodes: ids,
        });
    }
    for (hostname, ids) in by_hostname.into_iter().filter(|(_, ids)| ids.len() > 1) {
        problems.push(Problem::SharedHostname {
            hostname: hostname.to_string(),
            nodes: ids,
        });
    }
    for node in nodes.iter().filter(|n| !n.online()) {
        let silent = node
            .silent_since()
            .and_then(|t| now.duration_since(t).ok())
            .unwrap_or_default();
        if silent >= offline_after {
            problems.push(Problem::Offline {
                node: node.id.clone(),
                days: silent.as_secs() / 86_400,
            });
        }
    }
    for a in activations {
        if a.expired {
            problems.push(Problem::ActivationExpired {
                activation: a.id.clone(),
            });
        } else if a.registration_limit > 0 && a.registrations >= a.registration_limit {
            problems.push(Problem::ActivationUsedUp {
                activation: a.id.clone(),
            });
        }
    }
    problems
}

/// What the instance tier means for the fleet: the standard tier cannot give
/// Session Manager on hybrid nodes, and allows only so many of them (said
/// from 90 % on).
pub fn diagnose_tier(tier: &Tier) -> Vec<Problem> {
    let Some(limit) = tier.node_limit else {
        return Vec::new();
    };
    let mut problems = vec![Problem::StandardTier];
    if tier.hybrid_nodes * 10 >= limit * 9 {
        problems.push(Problem::NearNodeLimit {
            nodes: tier.hybrid_nodes,
            limit,
        });
    }
    problems
}

/// Nodes silent for at least `offline_for`; an online node never qualifies,
/// however old its last recorded ping.
pub fn prune_candidates(nodes: &[Node], offline_for: Duration, now: SystemTime) -> Vec<&Node> {
    nodes
        .iter()
        .filter(|n| !n.online())
        .filter(|n| {
            n.silent_since()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|silent| silent >= offline_for)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn node(id: &str, status: &str, silent_days: u64, serial: Option<&str>, host: &str) -> Node {
        let now = SystemTime::UNIX_EPOCH + 1000 * DAY;
        let last = now - silent_days as u32 * DAY;
        let mut tags = BTreeMap::new();
        if let Some(s) = serial {
            tags.insert(TAG_SERIAL.to_string(), s.to_string());
        }
        Node {
            id: id.into(),
            name: None,
            ping_status: status.into(),
            last_ping: Some(last),
            last_ping_at: None,
            agent_version: None,
            computer_name: Some(host.into()),
            ip_address: None,
            registered_at: None,
            registered: Some(last),
            activation_id: None,
            tags,
        }
    }

    #[test]
    fn clones_stale_nodes_and_dead_activations_are_found() {
        let now = SystemTime::UNIX_EPOCH + 1000 * DAY;
        let nodes = [
            node("mi-1", "Online", 0, Some("10000000aaaa"), "door-1"),
            node("mi-2", "ConnectionLost", 40, Some("10000000aaaa"), "door-1"),
            node("mi-3", "ConnectionLost", 3, Some("10000000bbbb"), "door-3"),
        ];
        let activation = |id: &str, limit, used, expired| ActivationInfo {
            id: id.into(),
            description: None,
            default_instance_name: None,
            iam_role: None,
            registration_limit: limit,
            registrations: used,
            expires: None,
            expired,
            tags: vec![],
        };
        let activations = [
            activation("a-live", 5, 2, false),
            activation("a-full", 1, 1, false),
            activation("a-old", 5, 0, true),
        ];
        let problems = diagnose(&nodes, &activations, 14 * DAY, now);
        assert_eq!(
            problems,
            vec![
                Problem::SharedSerial {
                    serial: "10000000aaaa".into(),
                    nodes: vec!["mi-1".into(), "mi-2".into()]
                },
                Problem::SharedHostname {
                    hostname: "door-1".into(),
                    nodes: vec!["mi-1".into(), "mi-2".into()]
                },
                Problem::Offline {
                    node: "mi-2".into(),
                    days: 40
                },
                Problem::ActivationUsedUp {
                    activation: "a-full".into()
                },
                Problem::ActivationExpired {
                    activation: "a-old".into()
                },
            ]
        );
    }

    #[test]
    fn the_standard_tier_is_flagged_and_its_limit_from_nine_tenths() {
        let tier = |setting: &str, nodes| Tier {
            setting: setting.into(),
            hybrid_nodes: nodes,
            node_limit: (setting == "standard").then_some(STANDARD_NODE_LIMIT),
        };
        assert_eq!(
            diagnose_tier(&tier("standard", 899)),
            [Problem::StandardTier]
        );
        assert_eq!(
            diagnose_tier(&tier("standard", 900)),
            [
                Problem::StandardTier,
                Problem::NearNodeLimit {
                    nodes: 900,
                    limit: 1000
                }
            ]
        );
        assert!(diagnose_tier(&tier("advanced", 5000)).is_empty());
    }

    #[test]
    fn an_online_node_is_never_pruned() {
        let now = SystemTime::UNIX_EPOCH + 1000 * DAY;
        // An Online status with an old recorded ping (SSM's ping time lags).
        let nodes = [
            node("mi-on", "Online", 90, None, "a"),
            node("mi-off", "ConnectionLost", 31, None, "b"),
            node("mi-recent", "ConnectionLost", 29, None, "c"),
        ];
        let ids: Vec<&str> = prune_candidates(&nodes, 30 * DAY, now)
            .iter()
            .map(|n| n.id.as_str())
            .collect();
        assert_eq!(ids, ["mi-off"]);
    }
}
