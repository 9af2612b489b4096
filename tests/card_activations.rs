//! `source = "embedded"`: piprov creates one single-use activation per card with
//! the real AWS SDK against the local SSM endpoint, puts it on the card, and
//! deletes it again when that card fails.

mod common;

use std::path::{Path, PathBuf};

use common::card::embedded_recipe;
use common::disk::SmallFs;
use common::ssm_endpoint::SsmEndpoint;
use common::{boot_files, build_image, fixture, sha256_of, succeed};
use predicates::str::contains;
use tempfile::TempDir;

/// The activation id and code on a card's boot partition.
fn card_secret(image: &Path) -> (String, String) {
    let text = String::from_utf8(boot_files(image)["piprov-secret.conf"].clone()).unwrap();
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap()
            .to_string()
    };
    (field("ACTIVATION_ID"), field("ACTIVATION_CODE"))
}

fn tag<'a>(create: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    create["body"]["Tags"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["Key"] == key)
        .map(|t| t["Value"].as_str().unwrap())
}

#[test]
fn stamp_creates_a_single_use_activation_for_the_card() {
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start(dir.path(), 0);
    let image = fixture("golden", &dir);
    let golden_sha = sha256_of(&image);
    let out = succeed(
        ssm.piprov()
            .arg("stamp")
            .arg(&image)
            .arg("--recipe")
            .arg(embedded_recipe(dir.path()))
            .args(["--hostname", "door-7", "--json"]),
    );

    let creates = ssm.requests_for("CreateActivation");
    assert_eq!(creates.len(), 1);
    let create = &creates[0];
    assert_eq!(create["body"]["RegistrationLimit"], 1);
    assert_eq!(create["body"]["IamRole"], "SSMServiceRole");
    assert_eq!(create["body"]["DefaultInstanceName"], "door-7");
    assert_eq!(tag(create, "piprov:hostname"), Some("door-7"));
    assert_eq!(tag(create, "Name"), Some("door-7"), "Fleet Manager's name");
    assert_eq!(
        tag(create, "piprov:image-sha256"),
        Some(golden_sha.as_str())
    );
    assert_eq!(
        tag(create, "piprov:version"),
        Some(env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(tag(create, "batch"), Some("2026-11"));
    let expiry = create["body"]["ExpirationDate"].as_f64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((expiry - now - 7200.0).abs() < 120.0, "the recipe's 2h");

    let (id, code) = card_secret(&image);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["record"]["activation"]["id"], id.as_str());
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&code));
    assert!(!String::from_utf8_lossy(&out.stderr).contains(&code));
    // The code on the card is the real one, good for exactly one registration.
    ssm.register(&id, &code);
    let (status, reply) = ssm.try_call(
        "AmazonSSM.RegisterManagedInstance",
        &serde_json::json!({"ActivationId": id, "ActivationCode": code}),
    );
    assert_eq!(status, 400);
    assert!(
        reply["message"]
            .as_str()
            .unwrap()
            .contains("registration limit")
    );
}

/// Fleet Manager names a node after its activation's DefaultInstanceName: the
/// card's hostname, unless the recipe names every node itself.
#[test]
fn a_recipes_instance_name_wins_over_the_hostname() {
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start(dir.path(), 0);
    let image = fixture("golden", &dir);
    let recipe = embedded_recipe(dir.path());
    let text = std::fs::read_to_string(&recipe).unwrap();
    std::fs::write(&recipe, format!("default_instance_name = \"lab\"\n{text}")).unwrap();
    succeed(
        ssm.piprov()
            .arg("stamp")
            .arg(&image)
            .arg("--recipe")
            .arg(&recipe)
            .args(["--hostname", "door-8"]),
    );
    let create = &ssm.requests_for("CreateActivation")[0];
    assert_eq!(create["body"]["DefaultInstanceName"], "lab");
    assert_eq!(tag(create, "piprov:hostname"), Some("door-8"));
}

/// An image Raspberry Pi Imager's first-run hook is already on: stamping it
/// is refused.
fn imager_image(dir: &Path) -> PathBuf {
    let image = dir.join("imager.img");
    build_image(
        &image,
        &[
            "--customize",
            r#"sed -i 's|$| systemd.run=/boot/firstrun.sh|' "$boot/cmdline.txt""#,
        ],
    );
    image
}

#[test]
fn a_card_that_cannot_be_stamped_has_its_activation_deleted() {
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start(dir.path(), 0);
    let image = imager_image(dir.path());
    ssm.piprov()
        .arg("stamp")
        .arg(&image)
        .arg("--recipe")
        .arg(embedded_recipe(dir.path()))
        .assert()
        .code(2)
        .stderr(contains("already runs systemd.run=/boot/firstrun.sh"))
        .stderr(contains("was deleted again"));
    let created = ssm.requests_for("CreateActivation");
    let deleted = ssm.requests_for("DeleteActivation");
    assert_eq!((created.len(), deleted.len()), (1, 1));
    let listed = ssm.call("AmazonSSM.DescribeActivations", &serde_json::json!({}));
    assert_eq!(listed["ActivationList"], serde_json::json!([]));
}

#[test]
fn a_batch_gets_one_activation_per_card_and_a_failed_card_gives_its_back() {
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start(dir.path(), 0);
    let image = fixture("golden", &dir);
    let cards: Vec<PathBuf> = (1..=2)
        .map(|i| dir.path().join(format!("card{i}.img")))
        .collect();
    // A file on a full filesystem: it opens, then its writes fail, after its
    // activation exists.
    let small = SmallFs::mount(&dir.path().join("small"));
    if small.is_none() {
        return;
    }
    let unwritable = dir.path().join("small/card3.img");
    let manifest = dir.path().join("cards.jsonl");
    let out = ssm
        .piprov()
        .arg("flash")
        .arg(&image)
        .args(&cards)
        .arg(&unwritable)
        .arg("--recipe")
        .arg(embedded_recipe(dir.path()))
        .args(["--hostname", "bench-{n}", "--yes", "--quiet", "--manifest"])
        .arg(&manifest)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&manifest)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let creates = ssm.requests_for("CreateActivation");
    assert_eq!(creates.len(), 3, "one per card");
    for (i, card) in cards.iter().enumerate() {
        let (id, code) = card_secret(card);
        assert_eq!(lines[i]["result"], "ok");
        assert_eq!(lines[i]["activation_id"], id.as_str());
        assert_eq!(
            tag(&creates[i], "piprov:hostname"),
            Some(format!("bench-{}", i + 1).as_str())
        );
        assert!(!std::fs::read_to_string(&manifest).unwrap().contains(&code));
        assert!(!stderr.contains(&code) && !String::from_utf8_lossy(&out.stdout).contains(&code));
    }
    assert_ne!(lines[0]["activation_id"], lines[1]["activation_id"]);
    assert_eq!(lines[2]["result"], "failed");
    assert_eq!(lines[2]["activation_deleted"], true);
    let deleted = ssm.requests_for("DeleteActivation");
    assert_eq!(deleted.len(), 1);
    assert_eq!(
        deleted[0]["body"]["ActivationId"],
        lines[2]["activation_id"]
    );
    let listed = ssm.call(
        "AmazonSSM.DescribeActivations",
        &serde_json::json!({"MaxResults": 50}),
    );
    let ids: Vec<&str> = listed["ActivationList"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["ActivationId"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&lines[0]["activation_id"].as_str().unwrap()));
}

#[test]
fn no_credentials_means_no_card_is_touched() {
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start(dir.path(), 0);
    let image = fixture("golden", &dir);
    let before = sha256_of(&image);
    ssm.piprov()
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .arg("stamp")
        .arg(&image)
        .arg("--recipe")
        .arg(embedded_recipe(dir.path()))
        .assert()
        .code(2)
        .stderr(contains("no AWS credentials: tried the environment"));
    assert_eq!(sha256_of(&image), before);
}

/// A card's own line sets a key the recipe does not have: refused before any
/// activation is made or any card touched.
#[test]
fn a_bad_setting_on_one_card_is_refused_before_anything_happens() {
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start(dir.path(), 0);
    let image = fixture("golden", &dir);
    let targets = dir.path().join("targets.csv");
    let cards: Vec<PathBuf> = (1..=2)
        .map(|i| dir.path().join(format!("card{i}.img")))
        .collect();
    std::fs::write(
        &targets,
        format!(
            "{},bench-1\n{},bench-2,no.such.setting=1\n",
            cards[0].display(),
            cards[1].display()
        ),
    )
    .unwrap();
    let out = ssm
        .piprov()
        .arg("flash")
        .arg(&image)
        .arg("--targets-file")
        .arg(&targets)
        .arg("--recipe")
        .arg(embedded_recipe(dir.path()))
        .args(["--yes", "--quiet"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("card2.img"), "{stderr}");
    assert!(stderr.contains("unknown field `no`"), "{stderr}");
    assert!(ssm.requests_for("CreateActivation").is_empty());
    assert!(cards.iter().all(|c| !c.exists()), "no card touched");
}

/// The image cannot be stamped (Raspberry Pi Imager's first-run hook is on
/// it), found after the first card's activation was made: the flash ends,
/// and that activation does not outlive it.
#[test]
fn a_batch_stopped_while_cards_are_prepared_leaves_no_activation() {
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start(dir.path(), 0);
    let image = imager_image(dir.path());
    let out = ssm
        .piprov()
        .arg("flash")
        .arg(&image)
        .arg(dir.path().join("card1.img"))
        .arg(dir.path().join("card2.img"))
        .arg("--recipe")
        .arg(embedded_recipe(dir.path()))
        .args(["--hostname", "bench-{n}", "--yes", "--quiet"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_eq!(
        ssm.requests_for("CreateActivation").len(),
        1,
        "card 1's activation was made before its stamp failed: {stderr}"
    );
    assert_eq!(
        ssm.activations(),
        Vec::<serde_json::Value>::new(),
        "{stderr}"
    );
}

/// Given the image's expected SHA-256 (as the station gives it), the cards'
/// activations are made without waiting for the image's own hash; an image
/// that is not the one expected then fails every card, and their
/// activations, tagged with the expected hash, are deleted again.
#[test]
fn an_image_that_is_not_the_expected_one_leaves_no_activation() {
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start(dir.path(), 0);
    let image = fixture("golden", &dir);
    let cards: Vec<PathBuf> = (1..=2)
        .map(|i| dir.path().join(format!("card{i}.img")))
        .collect();
    let expected = "ab".repeat(32);
    let out = ssm
        .piprov()
        .arg("flash")
        .arg(&image)
        .args(&cards)
        .arg("--recipe")
        .arg(embedded_recipe(dir.path()))
        .args([
            "--hostname",
            "bench-{n}",
            "--yes",
            "--quiet",
            "--sha256",
            &expected,
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("hold no partition table"), "{stderr}");
    let creates = ssm.requests_for("CreateActivation");
    assert_eq!(creates.len(), 2, "{stderr}");
    for create in &creates {
        assert_eq!(tag(create, "piprov:image-sha256"), Some(expected.as_str()));
    }
    assert_eq!(
        ssm.activations(),
        Vec::<serde_json::Value>::new(),
        "{stderr}"
    );
    for card in &cards {
        let head = std::fs::read(card).unwrap();
        assert!(
            head[..1 << 20].iter().all(|&b| b == 0),
            "no partition table"
        );
    }
}
