//! `piprov fleet reconcile`: the question a bench lead asks the next morning —
//! did every card we made come up, as itself? Each card made (a station record's
//! row, a flash manifest's line) is joined with the node registered with its
//! activation; what does not add up is flagged. A plain function over what was
//! made and what SSM returned, so it is tested without a network.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::{ActivationInfo, Node, TAG_IMAGE};

/// One card as its maker recorded it.
#[derive(Debug, Clone, Serialize)]
pub struct MadeCard {
    /// Its number in the station run, or its line in the manifest.
    pub number: u32,
    pub hostname: Option<String>,
    pub device: String,
    pub activation_id: Option<String>,
    pub image_sha256: String,
}

/// What became of one card.
#[derive(Debug, Clone, Serialize)]
pub struct Reconciled {
    pub card: MadeCard,
    /// The node that registered with the card's activation.
    pub node: Option<Node>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "flag", rename_all = "snake_case")]
pub enum Flag {
    /// The card's activation was never used: the card never booted, never
    /// reached SSM, or waited past its activation's expiry.
    NeverRegistered {
        number: u32,
        hostname: Option<String>,
        activation_id: String,
        why: String,
    },
    /// A card made without an activation of its own on record (a broker or a
    /// shared activation registers it at boot): it cannot be joined by id.
    NoActivationOnRecord { number: u32 },
    /// Several nodes registered with one card's activation.
    ActivationUsedTwice {
        activation_id: String,
        nodes: Vec<String>,
    },
    /// Several nodes claim one card's hostname.
    SharedHostname {
        hostname: String,
        nodes: Vec<String>,
    },
    /// Several nodes claim the Pi serial one card's node reported.
    SharedSerial { serial: String, nodes: Vec<String> },
    /// A node registered with an activation made for the same image, which no
    /// card in the record holds: a card made elsewhere, or a leaked secret.
    NotInRecord { node: String, activation_id: String },
}

impl Flag {
    pub fn describe(&self) -> String {
        match self {
            Flag::NeverRegistered {
                number,
                hostname,
                activation_id,
                why,
            } => format!(
                "card {number} ({}) never registered: {why} (activation {activation_id})",
                hostname.as_deref().unwrap_or("no hostname")
            ),
            Flag::NoActivationOnRecord { number } => {
                format!("card {number} has no activation on record: it cannot be matched to a node")
            }
            Flag::ActivationUsedTwice {
                activation_id,
                nodes,
            } => format!(
                "activation {activation_id} registered {}: one card, several nodes",
                nodes.join(", ")
            ),
            Flag::SharedHostname { hostname, nodes } => {
                format!("hostname {hostname} is claimed by {}", nodes.join(", "))
            }
            Flag::SharedSerial { serial, nodes } => {
                format!("Pi serial {serial} is claimed by {}", nodes.join(", "))
            }
            Flag::NotInRecord {
                node,
                activation_id,
            } => format!(
                "{node} registered with activation {activation_id}, made for this image, which \
                 no card in the record holds"
            ),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub cards: Vec<Reconciled>,
    pub flags: Vec<Flag>,
}

pub fn reconcile(made: &[MadeCard], nodes: &[Node], activations: &[ActivationInfo]) -> Report {
    let mut flags = Vec::new();
    let mut by_activation: BTreeMap<&str, Vec<&Node>> = BTreeMap::new();
    for node in nodes {
        if let Some(id) = &node.activation_id {
            by_activation.entry(id).or_default().push(node);
        }
    }
    let mut cards = Vec::new();
    for card in made {
        let Some(id) = card.activation_id.as_deref() else {
            flags.push(Flag::NoActivationOnRecord {
                number: card.number,
            });
            cards.push(Reconciled {
                card: card.clone(),
                node: None,
            });
            continue;
        };
        let registered = by_activation.get(id).map(Vec::as_slice).unwrap_or(&[]);
        match registered {
            [] => flags.push(Flag::NeverRegistered {
                number: card.number,
                hostname: card.hostname.clone(),
                activation_id: id.to_string(),
                why: unused_because(activations.iter().find(|a| a.id == id)),
            }),
            [_] => {}
            several => flags.push(Flag::ActivationUsedTwice {
                activation_id: id.to_string(),
                nodes: several.iter().map(|n| n.id.clone()).collect(),
            }),
        }
        cards.push(Reconciled {
            card: card.clone(),
            node: registered.first().map(|n| (*n).clone()),
        });
    }
    flags.extend(shared_names(&cards, nodes));
    flags.extend(strangers(made, nodes, activations));
    Report { cards, flags }
}

fn unused_because(activation: Option<&ActivationInfo>) -> String {
    match activation {
        None => "its activation no longer exists (deleted, or expired and removed)".into(),
        Some(a) if a.expired => "its activation expired unused".into(),
        Some(a) => format!(
            "its activation is still unused{}: the card has not booted or cannot reach SSM",
            a.expires
                .as_deref()
                .map(|t| format!(" (it expires {t})"))
                .unwrap_or_default()
        ),
    }
}

/// Hostnames and serials of the record's cards that more than one node claims.
fn shared_names(cards: &[Reconciled], nodes: &[Node]) -> Vec<Flag> {
    let mut flags = Vec::new();
    let mut hostnames = BTreeSet::new();
    let mut serials = BTreeSet::new();
    for card in cards {
        hostnames.extend(card.card.hostname.clone());
        hostnames.extend(
            card.node
                .as_ref()
                .and_then(|n| n.hostname().map(str::to_string)),
        );
        serials.extend(
            card.node
                .as_ref()
                .and_then(|n| n.serial().map(str::to_string)),
        );
    }
    for hostname in hostnames {
        let nodes = claiming(nodes, |n| n.hostname() == Some(hostname.as_str()));
        if nodes.len() > 1 {
            flags.push(Flag::SharedHostname { hostname, nodes });
        }
    }
    for serial in serials {
        let nodes = claiming(nodes, |n| n.serial() == Some(serial.as_str()));
        if nodes.len() > 1 {
            flags.push(Flag::SharedSerial { serial, nodes });
        }
    }
    flags
}

/// The ids of the nodes that claim something.
fn claiming(nodes: &[Node], claims: impl Fn(&Node) -> bool) -> Vec<String> {
    nodes
        .iter()
        .filter(|n| claims(n))
        .map(|n| n.id.clone())
        .collect()
}

/// Nodes registered with an activation piprov made for one of the record's
/// images that no card of the record holds.
fn strangers(made: &[MadeCard], nodes: &[Node], activations: &[ActivationInfo]) -> Vec<Flag> {
    let images: BTreeSet<&str> = made.iter().map(|c| c.image_sha256.as_str()).collect();
    let held: BTreeSet<&str> = made
        .iter()
        .filter_map(|c| c.activation_id.as_deref())
        .collect();
    let for_these_images: BTreeSet<&str> = activations
        .iter()
        .filter(|a| {
            a.tags
                .iter()
                .any(|(k, v)| k == TAG_IMAGE && images.contains(v.as_str()))
        })
        .map(|a| a.id.as_str())
        .collect();
    nodes
        .iter()
        .filter_map(|n| {
            let id = n.activation_id.as_deref()?;
            (for_these_images.contains(id) && !held.contains(id)).then(|| Flag::NotInRecord {
                node: n.id.clone(),
                activation_id: id.to_string(),
            })
        })
        .collect()
}

/// A manifest written by `flash --manifest` is at most this large: it is read
/// whole, and a card's line is some 500 bytes.
const MAX_MANIFEST: u64 = 64 << 20;

/// One manifest line, as much of it as reconcile reads.
#[derive(Deserialize)]
struct ManifestLine {
    device: String,
    hostname: Option<String>,
    activation_id: Option<String>,
    image_sha256: String,
    result: String,
}

/// The cards a flash manifest says were written (`result` ok), numbered by
/// their line.
pub fn cards_in_manifest(path: &Path) -> Result<Vec<MadeCard>> {
    use std::io::Read;
    let file = std::fs::File::open(path)
        .with_context(|| format!("opening the manifest {}", path.display()))?;
    let mut text = String::new();
    file.take(MAX_MANIFEST + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("reading the manifest {}", path.display()))?;
    if text.len() as u64 > MAX_MANIFEST {
        bail!(
            "{} is larger than a manifest can be ({MAX_MANIFEST} bytes)",
            path.display()
        );
    }
    let mut cards = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let line: ManifestLine = serde_json::from_str(line).with_context(|| {
            format!(
                "{} line {}: not a flash manifest line",
                path.display(),
                i + 1
            )
        })?;
        if line.result == "ok" {
            cards.push(MadeCard {
                number: i as u32 + 1,
                hostname: line.hostname,
                device: line.device,
                activation_id: line.activation_id,
                image_sha256: line.image_sha256,
            });
        }
    }
    Ok(cards)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, activation: &str, hostname: &str) -> Node {
        Node {
            id: id.into(),
            name: None,
            ping_status: "Online".into(),
            last_ping: None,
            last_ping_at: None,
            agent_version: None,
            computer_name: Some(hostname.into()),
            ip_address: None,
            registered_at: None,
            registered: None,
            activation_id: Some(activation.into()),
            tags: BTreeMap::new(),
        }
    }

    fn card(number: u32, activation: &str) -> MadeCard {
        MadeCard {
            number,
            hostname: Some(format!("bench-{number}")),
            device: format!("/dev/sd{number}"),
            activation_id: Some(activation.into()),
            image_sha256: "abc".into(),
        }
    }

    fn activation(id: &str, image: &str) -> ActivationInfo {
        ActivationInfo {
            id: id.into(),
            description: None,
            default_instance_name: None,
            iam_role: None,
            registration_limit: 1,
            registrations: 0,
            expires: None,
            expired: false,
            tags: vec![(TAG_IMAGE.into(), image.into())],
        }
    }

    #[test]
    fn every_card_with_its_node_and_what_does_not_add_up() {
        let made = [card(1, "a1"), card(2, "a2"), card(3, "a3")];
        let nodes = [
            node("mi-1", "a1", "bench-1"),
            node("mi-2", "a2", "bench-2"),
            node("mi-9", "a9", "bench-1"),
        ];
        let activations = [
            activation("a2", "abc"),
            activation("a3", "abc"),
            activation("a9", "abc"),
        ];
        let report = reconcile(&made, &nodes, &activations);
        assert_eq!(report.cards[0].node.as_ref().unwrap().id, "mi-1");
        assert_eq!(report.cards[1].node.as_ref().unwrap().id, "mi-2");
        assert!(report.cards[2].node.is_none());
        assert_eq!(report.flags.len(), 3, "{:#?}", report.flags);
        assert!(
            matches!(&report.flags[0], Flag::NeverRegistered { number: 3, why, .. } if why.contains("still unused"))
        );
        assert_eq!(
            report.flags[1],
            Flag::SharedHostname {
                hostname: "bench-1".into(),
                nodes: vec!["mi-1".into(), "mi-9".into()]
            }
        );
        assert_eq!(
            report.flags[2],
            Flag::NotInRecord {
                node: "mi-9".into(),
                activation_id: "a9".into()
            }
        );
    }

    #[test]
    fn a_clean_bench_has_nothing_to_flag() {
        let made = [card(1, "a1")];
        let nodes = [node("mi-1", "a1", "bench-1"), node("mi-7", "other", "x")];
        let report = reconcile(&made, &nodes, &[activation("other", "def")]);
        assert!(report.flags.is_empty(), "{:#?}", report.flags);
    }
}
