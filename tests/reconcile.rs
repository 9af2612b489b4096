//! `piprov fleet reconcile`: the cards a flash made, joined with the nodes the
//! SSM endpoint (on loopback) holds after the cards' first boots, run as a Pi
//! runs them (the device scripts on each card's root, the agent stand-in
//! registering with the endpoint).

mod common;

use std::path::Path;

use common::card::{Card, Ssm, embedded_recipe};
use common::ssm_endpoint::SsmEndpoint;
use common::*;
use tempfile::TempDir;

/// The first boot of a card image in a Pi of this serial, its agent talking
/// to `ssm`; then the agent's first ping, as `hostname`. Returns its `mi-` id.
fn boot(ssm: &SsmEndpoint, image: &Path, dir: &TempDir, n: u32) -> String {
    let card = Card::from_image(
        image,
        dir.path(),
        &format!("root{n}"),
        &Ssm::new(dir.path()),
    );
    card.plug_into(
        &format!("10000000d3a0000{n}"),
        &format!("dc:a6:32:00:00:0{n}"),
    );
    let conf = card.path("/etc/amazon/ssm/amazon-ssm-agent.json");
    std::fs::create_dir_all(conf.parent().unwrap()).unwrap();
    std::fs::write(
        conf,
        format!("{{\"Ssm\":{{\"Endpoint\":\"{}\"}}}}\n", ssm.url()),
    )
    .unwrap();
    card.first_boot();
    let node = card.instance_id();
    ssm.ping(&node, &format!("bench-{n}"), "127.0.0.1");
    node
}

fn reconcile(ssm: &SsmEndpoint, manifest: &Path) -> (i32, serde_json::Value) {
    let out = ssm
        .piprov()
        .args(["fleet", "reconcile", "--json", "--manifest"])
        .arg(manifest)
        .output()
        .unwrap();
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "reconcile printed no JSON: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap(), report)
}

/// Three cards flashed, two booted: each booted card shows its own node; the
/// one that never booted is flagged, and so is a node that registered with an
/// activation made for the image but held by no card, under card 1's name.
#[test]
fn every_card_is_joined_with_its_node_and_what_does_not_add_up_is_flagged() {
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start(dir.path(), 0);
    let image = fixture("golden", &dir);
    let recipe = embedded_recipe(dir.path());
    let manifest = dir.path().join("cards.jsonl");
    let cards: Vec<_> = (1..=3)
        .map(|n| dir.path().join(format!("card{n}.img")))
        .collect();
    succeed(
        ssm.piprov()
            .arg("flash")
            .arg(&image)
            .args(&cards)
            .arg("--recipe")
            .arg(&recipe)
            .args([
                "--hostname",
                "bench-{number}",
                "--yes",
                "--quiet",
                "--manifest",
            ])
            .arg(&manifest),
    );
    let nodes = [
        boot(&ssm, &cards[0], &dir, 1),
        boot(&ssm, &cards[1], &dir, 2),
    ];

    let (status, report) = reconcile(&ssm, &manifest);
    assert_eq!(status, 1, "card 3 never booted: {report:#}");
    for (i, node) in nodes.iter().enumerate() {
        let line = &report["cards"][i];
        assert_eq!(line["card"]["hostname"], format!("bench-{}", i + 1));
        assert_eq!(line["node"]["id"], node.as_str(), "{line:#}");
        assert_eq!(line["node"]["ping_status"], "Online", "{line:#}");
        assert!(line["node"]["registered_at"].is_string(), "{line:#}");
    }
    assert!(report["cards"][2]["node"].is_null());
    let flags = report["flags"].as_array().unwrap();
    assert_eq!(flags.len(), 1, "{flags:#?}");
    assert_eq!(flags[0]["flag"], "never_registered");
    assert_eq!(flags[0]["number"], 3);
    assert!(
        flags[0]["why"].as_str().unwrap().contains("still unused"),
        "{flags:#?}"
    );

    // The table people read says the same.
    let table = ssm
        .piprov()
        .args(["fleet", "reconcile", "--manifest"])
        .arg(&manifest)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains(&nodes[0]) && text.contains(&nodes[1]),
        "{text}"
    );
    assert!(text.contains("card 3 (bench-3) never registered"), "{text}");

    // A node not in the record: an activation made for this image, used by a
    // Pi that calls itself bench-1.
    let sha = sha256_of(&image);
    let made = ssm.call(
        "AmazonSSM.CreateActivation",
        &serde_json::json!({
            "IamRole": "SSMServiceRole",
            "Tags": [{"Key": "piprov:image-sha256", "Value": sha}],
        }),
    );
    let stranger = ssm.register(
        made["ActivationId"].as_str().unwrap(),
        made["ActivationCode"].as_str().unwrap(),
    );
    ssm.ping(&stranger, "bench-1", "127.0.0.2");
    let (status, report) = reconcile(&ssm, &manifest);
    assert_eq!(status, 1);
    let flags = report["flags"].as_array().unwrap();
    assert!(
        flags.iter().any(|f| f["flag"] == "shared_hostname"
            && f["hostname"] == "bench-1"
            && f["nodes"] == serde_json::json!([nodes[0], stranger])),
        "{flags:#?}"
    );
    assert!(
        flags
            .iter()
            .any(|f| f["flag"] == "not_in_record" && f["node"] == stranger.as_str()),
        "{flags:#?}"
    );

    // A manifest that is not one is named as such.
    std::fs::write(dir.path().join("bad.jsonl"), "{\"device\": 1}\n").unwrap();
    let out = ssm
        .piprov()
        .args(["fleet", "reconcile", "--manifest"])
        .arg(dir.path().join("bad.jsonl"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("line 1: not a flash manifest line"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
