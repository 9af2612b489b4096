//! A bounded load test of `piprov broker` on loopback: 2,000 Pis enrolling from
//! 100 concurrent clients (tests/common/load_client.rs, new HTTPS connection per
//! request as cards make) against a fast SSM double (tests/common/ssm_double.rs),
//! both in this process on threads of their own so their CPU time is known.
//! Faults part-way: one broker killed with SIGKILL and restarted; on PostgreSQL,
//! the database server restarted too. Checks: every enrollment completes, one
//! live activation and one node per serial, every activation used (once the
//! brokers' clean-up has withdrawn what the killed one left), no duplicate
//! registration, every used code wiped, the database consistent.
//! Cases: SQLite with one broker, PostgreSQL with one and with two brokers, each
//! unsigned; SQLite and PostgreSQL two brokers also with device-key signatures.
//! Run by `make load` (ignored by `cargo test`). PIPROV_LOAD_ENROLLMENTS and
//! PIPROV_LOAD_CLIENTS change the size; figures go to stderr and to
//! target/tmp/broker-load-CASE.json.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::broker::BrokerProcess;
use common::cpu::{machine_busy_seconds, thread_cpu_seconds};
use common::load_client::{self, Load, quantile_ms};
use common::postgres;
use common::ssm_double::SsmDouble;
use tempfile::TempDir;

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Case {
    name: &'static str,
    postgres: bool,
    brokers: usize,
    device_keys: bool,
}

#[test]
#[ignore = "load test: run with `make load`"]
fn sqlite_one_broker() {
    load(Case {
        name: "sqlite-1",
        postgres: false,
        brokers: 1,
        device_keys: false,
    });
}

#[test]
#[ignore = "load test: run with `make load`"]
fn sqlite_one_broker_signed() {
    load(Case {
        name: "sqlite-1-signed",
        postgres: false,
        brokers: 1,
        device_keys: true,
    });
}

#[test]
#[ignore = "load test: run with `make load`"]
fn postgres_one_broker() {
    load(Case {
        name: "postgres-1",
        postgres: true,
        brokers: 1,
        device_keys: false,
    });
}

#[test]
#[ignore = "load test: run with `make load`"]
fn postgres_two_brokers() {
    load(Case {
        name: "postgres-2",
        postgres: true,
        brokers: 2,
        device_keys: false,
    });
}

#[test]
#[ignore = "load test: run with `make load`"]
fn postgres_two_brokers_signed() {
    load(Case {
        name: "postgres-2-signed",
        postgres: true,
        brokers: 2,
        device_keys: true,
    });
}

/// Waits until `done` reaches `at`, or the load thread ends.
fn wait_for(
    done: &AtomicUsize,
    at: usize,
    load: &std::thread::JoinHandle<load_client::Outcome>,
) -> usize {
    let started = Instant::now();
    while done.load(Ordering::Relaxed) < at && !load.is_finished() {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the load stalled"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    done.load(Ordering::Relaxed)
}

/// The broker-side time of each successful activation request, from the
/// brokers' JSON logs (one line per request): the broker's own work.
fn broker_latencies(brokers: &[BrokerProcess]) -> Vec<f64> {
    let mut out = Vec::new();
    for broker in brokers {
        for line in broker.log_text().lines() {
            let Ok(entry) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if entry["message"] == "request"
                && entry["path"] == "/v1/activations"
                && entry["status"] == 200
            {
                if let Some(ms) = entry["ms"].as_str().and_then(|m| m.parse::<f64>().ok()) {
                    out.push(ms / 1000.0);
                }
            }
        }
    }
    out
}

fn load(case: Case) {
    let count = setting("PIPROV_LOAD_ENROLLMENTS", 2000);
    let clients = setting("PIPROV_LOAD_CLIENTS", 100);
    let dir = TempDir::new().unwrap();
    let ssm = SsmDouble::start(1);
    let pg = case.postgres.then(postgres::required);
    let database = pg.as_ref().map(|p| p.new_database());
    let mut first = BrokerProcess::init_in(
        dir.path(),
        ssm.env(dir.path()),
        &[
            ("rate_limit_per_minute", "100000000"),
            ("token_rate_limit_per_minute", "100000000"),
            // A short deadline, so what a killed broker left is withdrawn soon.
            ("request_timeout", "\"5s\""),
        ],
        &[],
        database,
    );
    first.serve_args = vec!["--log-format".into(), "json".into()];
    let policy: &[&str] = if case.device_keys {
        &["--device-policy", "tofu"]
    } else {
        &[]
    };
    let token = first.add_token("load", policy);
    let mut brokers = vec![first];
    for i in 1..case.brokers {
        brokers.push(brokers[0].twin(&format!("broker-{i}")));
    }
    for broker in &mut brokers {
        broker.start();
    }

    let done = Arc::new(AtomicUsize::new(0));
    let load = Load {
        brokers: brokers.iter().map(|b| b.address.clone()).collect(),
        ca: brokers[0].ca.clone(),
        token,
        count,
        clients,
        device_keys: case.device_keys,
        done: done.clone(),
    };
    let registrar = ssm.registrar();
    let busy_before = machine_busy_seconds();
    let running = std::thread::spawn(move || load_client::run(&load, &registrar, 2));

    // Faults: the first broker killed at 40 % and started again at once (its
    // address kept, as the cards know it); PostgreSQL restarted at 65 %.
    let killed_at = wait_for(&done, count * 2 / 5, &running);
    let mut broker_cpu = brokers[0].cpu_seconds();
    brokers[0].kill_hard();
    brokers[0].start();
    let restarted_at = pg.as_ref().map(|pg| {
        let at = wait_for(&done, count * 13 / 20, &running);
        pg.restart();
        at
    });
    let outcome = running.join().unwrap();
    broker_cpu += brokers.iter().map(BrokerProcess::cpu_seconds).sum::<f64>();
    let ssm_cpu = thread_cpu_seconds("ssm-double");
    let machine_cpu = machine_busy_seconds() - busy_before;

    assert_eq!(
        outcome.failed,
        Vec::<(String, String)>::new(),
        "no enrollment is lost"
    );
    assert_eq!(outcome.enrolled.len(), count);

    // What the killed broker was making when it died is withdrawn by a clean-up
    // once its deadline passes (request timeout + 10 s): then every activation
    // left is one a card used.
    let started = Instant::now();
    let unused = || ssm.activations().iter().filter(|a| a.2 == 0).count();
    while unused() > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "{} activations made but never used are still live",
            unused()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let orphans_gone_after = started.elapsed().as_secs_f64();

    // SSM: one node per serial, made with the activation the card got; one
    // live activation per serial, used once.
    let nodes = ssm.nodes();
    assert_eq!(nodes.len(), count, "no duplicate registration");
    let node_serials: BTreeSet<&str> = nodes.iter().map(|n| n.1.as_str()).collect();
    assert_eq!(node_serials.len(), count, "one node per serial");
    for (id, serial, activation) in &nodes {
        let (card_activation, card_node) = &outcome.enrolled[serial];
        assert_eq!((card_activation, card_node), (activation, id), "{serial}");
    }
    let mut live: BTreeMap<&str, usize> = BTreeMap::new();
    let activations = ssm.activations();
    for (_, serial, registrations) in &activations {
        assert_eq!(*registrations, 1, "every activation used, once");
        *live.entry(serial.as_str()).or_default() += 1;
    }
    assert!(live.values().all(|n| *n == 1), "one activation per serial");
    assert_eq!(live.len(), count);

    // The database: one issue and one registration per serial, each agreeing
    // with what the card got; every used code wiped.
    for broker in &mut brokers {
        broker.stop();
    }
    let db = &brokers[0];
    if db.database.is_none() {
        let sqlite = rusqlite::Connection::open(db.dir.join("broker.db")).unwrap();
        let check: String = sqlite
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
    }
    assert_eq!(
        db.count("SELECT count(*) FROM activations WHERE used = TRUE", &[]) as usize,
        count
    );
    assert_eq!(
        db.count(
            "SELECT count(*) FROM activations WHERE code_sealed IS NOT NULL",
            &[]
        ),
        0
    );
    assert_eq!(
        db.count("SELECT count(DISTINCT serial) FROM registrations", &[]) as usize,
        count
    );
    assert_eq!(
        db.count("SELECT count(*) FROM registrations", &[]) as usize,
        count
    );
    assert_eq!(
        db.count("SELECT count(*) FROM devices", &[]) as usize,
        if case.device_keys { count } else { 0 },
        "each signing Pi's key recorded on first use"
    );
    let rows = db.rows(
        "SELECT r.serial, r.instance_id, r.activation_id, a.activation_id
         FROM registrations r JOIN activations a ON a.serial = r.serial",
    );
    assert_eq!(rows.len(), count);
    for row in rows {
        let (serial, instance, registered_with, current) = (&row[0], &row[1], &row[2], &row[3]);
        assert_eq!(registered_with, current, "{serial}");
        assert_eq!(
            &outcome.enrolled[serial],
            &(current.clone(), instance.clone()),
            "{serial}"
        );
    }

    // --log-format json: one line per request, the activations among them.
    let broker_side = broker_latencies(&brokers);
    assert!(
        broker_side.len() >= count,
        "{} activation requests logged",
        broker_side.len()
    );
    let report = serde_json::json!({
        "case": case.name, "enrollments": count, "clients": clients,
        "brokers": case.brokers, "postgres": case.postgres, "device_keys": case.device_keys,
        "elapsed_s": outcome.elapsed,
        "enrollments_per_s": count as f64 / outcome.elapsed,
        "activation_p50_ms": quantile_ms(&outcome.activation_latencies, 0.50),
        "activation_p99_ms": quantile_ms(&outcome.activation_latencies, 0.99),
        "broker_activation_p50_ms": quantile_ms(&broker_side, 0.50),
        "broker_activation_p99_ms": quantile_ms(&broker_side, 0.99),
        "challenge_p50_ms": quantile_ms(&outcome.challenge_latencies, 0.50),
        "challenge_p99_ms": quantile_ms(&outcome.challenge_latencies, 0.99),
        "retries": outcome.retries,
        "killed_after_enrollments": killed_at,
        "postgres_restarted_after_enrollments": restarted_at,
        "orphans_withdrawn_after_s": orphans_gone_after,
        "cpu_s": {
            "ssm_double": ssm_cpu, "load_clients": outcome.cpu_seconds,
            "brokers_after_the_kill": broker_cpu,
            "machine": machine_cpu,
        },
        "broker_cpu_ms_per_enrollment": broker_cpu * 1000.0 / count as f64,
    });
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!(
        "broker load {}: {count} enrollments from {clients} clients in {:.1} s = {:.0}/s; \
         activation requests p50 {:.1} ms, p99 {:.1} ms at the client, p50 {:.1} ms, p99 {:.1} ms \
         in the broker; {} retries; killed at {killed_at}{}; CPU: SSM double {ssm_cpu:.1} s, \
         clients {:.1} s, brokers {broker_cpu:.1} s, machine {machine_cpu:.1} s \
         of {:.1} s on {} cores",
        case.name,
        outcome.elapsed,
        count as f64 / outcome.elapsed,
        report["activation_p50_ms"].as_f64().unwrap(),
        report["activation_p99_ms"].as_f64().unwrap(),
        report["broker_activation_p50_ms"]
            .as_f64()
            .unwrap_or(f64::NAN),
        report["broker_activation_p99_ms"]
            .as_f64()
            .unwrap_or(f64::NAN),
        outcome.retries,
        restarted_at.map_or(String::new(), |at| format!(
            ", PostgreSQL restarted at {at}"
        )),
        outcome.cpu_seconds,
        outcome.elapsed * cores as f64,
        cores,
    );
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("broker-load-{}.json", case.name));
    std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap()).unwrap();
}
