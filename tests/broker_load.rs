//! A bounded load test of `piprov broker` on loopback: 2,000 Pis enrolling from
//! 100 concurrent clients (tests/support/broker_load.py), the broker killed with
//! SIGKILL part-way and restarted. Checks that every enrollment completes, no
//! serial holds two activations or two nodes, and the database is consistent.
//! The same again with every Pi signing its request with its own device key
//! under a `tofu` token, so the figures with and without signatures compare.
//! Run by `make load` (ignored by `cargo test`: it takes a minute or more).
//! `PIPROV_LOAD_ENROLLMENTS` and `PIPROV_LOAD_CLIENTS` change the size.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use common::broker::BrokerProcess;
use common::ssm_endpoint::SsmEndpoint;
use tempfile::TempDir;

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
#[ignore = "load test: run with `make load`"]
fn thousands_of_enrollments_survive_a_kill_and_restart() {
    load(false);
}

#[test]
#[ignore = "load test: run with `make load`"]
fn thousands_of_signed_enrollments_survive_a_kill_and_restart() {
    load(true);
}

fn load(device_keys: bool) {
    let count = setting("PIPROV_LOAD_ENROLLMENTS", 2000);
    let clients = setting("PIPROV_LOAD_CLIENTS", 100);
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start_for(dir.path(), 0, 1800);
    let mut broker =
        BrokerProcess::init(dir.path(), &ssm, &[("rate_limit_per_minute", "100000000")]);
    let policy: &[&str] = if device_keys {
        &["--device-policy", "tofu"]
    } else {
        &[]
    };
    let token = broker.add_token("load", policy);
    broker.start();

    let progress = dir.path().join("progress");
    let result = dir.path().join("result.json");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/broker_load.py");
    let mut load = Command::new("python3")
        .arg(script)
        .args([
            &broker.url(),
            &broker.ca.display().to_string(),
            &token,
            &ssm.url(),
        ])
        .args([count.to_string(), clients.to_string()])
        .arg(&progress)
        .arg(&result)
        .args(device_keys.then_some("--device-keys"))
        .spawn()
        .unwrap();
    let done = || {
        std::fs::read_to_string(&progress)
            .ok()
            .and_then(|t| t.trim().parse::<usize>().ok())
            .unwrap_or(0)
    };
    let started = Instant::now();
    while done() < count * 2 / 5 {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the load stalled at {}",
            done()
        );
        assert!(load.try_wait().unwrap().is_none(), "the load ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    let killed_at = done();
    broker.kill_hard();
    broker.start();
    let status = load.wait().unwrap();
    assert!(status.success());
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&result).unwrap()).unwrap();
    let kind = if device_keys {
        format!(
            "signed with device keys (challenges p50 {:.1} ms, p99 {:.1} ms)",
            summary["challenge_p50_ms"].as_f64().unwrap(),
            summary["challenge_p99_ms"].as_f64().unwrap()
        )
    } else {
        "unsigned".to_string()
    };
    eprintln!(
        "broker load, {kind}: {count} enrollments from {clients} clients in {:.1} s = {:.0}/s; \
         activation requests p50 {:.1} ms, p99 {:.1} ms; {} retries; killed at {killed_at}",
        summary["elapsed_s"].as_f64().unwrap(),
        summary["enrollments_per_s"].as_f64().unwrap(),
        summary["activation_p50_ms"].as_f64().unwrap(),
        summary["activation_p99_ms"].as_f64().unwrap(),
        summary["retries"],
    );
    let mut report = summary.clone();
    report.as_object_mut().unwrap().remove("serials");
    report["killed_after_enrollments"] = killed_at.into();
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(if device_keys {
        "broker-load-signed.json"
    } else {
        "broker-load.json"
    });
    std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap()).unwrap();

    assert_eq!(
        summary["failed"],
        serde_json::json!([]),
        "no request is lost"
    );
    assert_eq!(summary["enrolled"], count);

    // SSM: exactly one node per serial, made with the activation the broker
    // recorded; no serial with a second live activation.
    let nodes = ssm.nodes();
    let serial_of = |tags: &serde_json::Value| tags["piprov:serial"].as_str().unwrap().to_string();
    let node_serials: Vec<String> = nodes.iter().map(|(_, t)| serial_of(t)).collect();
    assert_eq!(node_serials.len(), count);
    assert_eq!(
        node_serials.iter().collect::<BTreeSet<_>>().len(),
        count,
        "one node per serial"
    );
    let mut live: BTreeMap<String, usize> = BTreeMap::new();
    for a in ssm.activations() {
        let serial = a["Tags"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["Key"] == "piprov:serial")
            .map(|t| t["Value"].as_str().unwrap().to_string())
            .unwrap();
        *live.entry(serial).or_default() += 1;
        assert_eq!(a["RegistrationsCount"], 1, "no activation left unused: {a}");
    }
    assert!(live.values().all(|n| *n == 1), "one activation per serial");
    assert_eq!(live.len(), count);

    // The database after a SIGKILL: intact, one issue and one registration per
    // serial, each agreeing with what the card got.
    broker.stop();
    let db = rusqlite::Connection::open(broker.dir.join("broker.db")).unwrap();
    let check: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let issued: i64 = db
        .query_row("SELECT count(*) FROM activations WHERE used = 1", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(issued as usize, count);
    let devices: i64 = db
        .query_row("SELECT count(*) FROM devices", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        devices as usize,
        if device_keys { count } else { 0 },
        "each signing Pi's key recorded on first use"
    );
    let mut stmt = db
        .prepare(
            "SELECT r.serial, r.instance_id, r.activation_id, a.activation_id
             FROM registrations r JOIN activations a ON a.serial = r.serial",
        )
        .unwrap();
    let rows: Vec<(String, String, String, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(rows.len(), count);
    for (serial, instance, registered_with, current) in rows {
        assert_eq!(registered_with, current, "{serial}");
        let card = &summary["serials"][&serial];
        assert_eq!(card["instance_id"], instance.as_str(), "{serial}");
        assert_eq!(card["activation_id"], current.as_str(), "{serial}");
    }
}
