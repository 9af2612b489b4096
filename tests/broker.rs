//! `piprov broker` as a real process on loopback (rustls HTTPS, SQLite) against
//! the local SSM endpoint: setup, a stamped card enrolling through it with the
//! device script, every refusal, idempotent retries, restarts, and tagging.

mod common;

use common::broker::{BrokerProcess, broker_card};
use common::ssm_endpoint::SsmEndpoint;
use predicates::prelude::PredicateBooleanExt;
use predicates::str::contains;
use tempfile::TempDir;

const SERIAL_A: &str = "10000000c0ffee01";
const SERIAL_B: &str = "10000000c0ffee02";

fn ask(serial: &str) -> String {
    format!(
        r#"{{"serial":"{serial}","hostname":"door-1","machine_id":"","image_sha256":"","previous_instance_id":""}}"#
    )
}

fn report(serial: &str, instance: &str, previous: &str) -> String {
    format!(
        r#"{{"serial":"{serial}","instance_id":"{instance}","previous_instance_id":"{previous}"}}"#
    )
}

fn creates(ssm: &SsmEndpoint) -> usize {
    ssm.requests_for("CreateActivation").len()
}

#[test]
fn init_makes_a_ca_a_certificate_a_config_and_a_database() {
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start(dir.path(), 0);
    let broker = BrokerProcess::init(dir.path(), &ssm, &[]);
    use std::os::unix::fs::PermissionsExt;
    for (file, mode) in [
        ("server.key", 0o600),
        ("ca.key", 0o600),
        ("broker.toml", 0o600),
        ("vend.key", 0o600),
        ("ca.pem", 0o644),
    ] {
        let meta = std::fs::metadata(broker.dir.join(file)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{file}");
    }
    let verify = std::process::Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(&broker.ca)
        .arg(broker.dir.join("server.pem"))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );

    // A second init into the same place would replace the keys the cards pin.
    broker
        .piprov()
        .args(["broker", "init"])
        .arg(&broker.dir)
        .args([
            "--name",
            "127.0.0.1",
            "--region",
            "eu-west-1",
            "--iam-role",
            "R",
        ])
        .assert()
        .code(2)
        .stderr(contains("is not empty"));

    let token = broker.add_token("site-a", &["--max-uses", "5"]);
    assert!(token.starts_with("pvt_") && token.len() > 60, "{token}");
    let hash = common::sha256_hex(token.as_bytes());
    if broker.database.is_none() {
        let db = std::fs::read(broker.dir.join("broker.db")).unwrap();
        let wal = std::fs::read(broker.dir.join("broker.db-wal")).unwrap_or_default();
        let stored = [db, wal].concat();
        assert!(
            !stored.windows(token.len()).any(|w| w == token.as_bytes()),
            "the token itself is never stored"
        );
        assert!(
            stored.windows(hash.len()).any(|w| w == hash.as_bytes()),
            "its SHA-256 is"
        );
    }
    assert_eq!(
        broker.count(
            "SELECT count(*) FROM tokens WHERE sha256 = $1 AND name = 'site-a'",
            &[&hash]
        ),
        1
    );
    assert_eq!(
        broker.count("SELECT count(*) FROM tokens WHERE sha256 = $1", &[&token]),
        0
    );
    broker
        .piprov()
        .args(["broker", "token", "list", "--config"])
        .arg(&broker.config)
        .assert()
        .success()
        .stdout(contains("site-a"))
        .stdout(contains(&token).not());
    broker
        .piprov()
        .args(["broker", "token", "add", "--config"])
        .arg(&broker.config)
        .args(["--name", "site-a", "--unlimited"])
        .assert()
        .code(2)
        .stderr(contains("exists already"));
    // No limits given, and none waived: a token for ever is asked for by name.
    broker
        .piprov()
        .args(["broker", "token", "add", "--config"])
        .arg(&broker.config)
        .args(["--name", "site-b"])
        .assert()
        .code(2)
        .stderr(contains("--max-uses"))
        .stderr(contains("--expires"));
}

#[test]
fn a_stamped_card_enrols_through_the_broker() {
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start(dir.path(), 0);
    let mut broker = BrokerProcess::init(dir.path(), &ssm, &[]);
    let token = broker.add_token("site-a", &["--max-uses", "10"]);
    broker.start();
    let card = broker_card(dir.path(), &ssm, &broker, &token, "", "card");
    card.plug_into(SERIAL_A, "dc:a6:32:00:00:01");
    card.first_boot();

    assert_eq!(card.status()["state"], "registered");
    let instance = card.instance_id();
    let nodes = ssm.nodes();
    let (_, tags) = nodes
        .iter()
        .find(|(id, _)| *id == instance)
        .expect("the node exists in SSM");
    assert_eq!(tags["piprov:serial"], SERIAL_A);
    assert_eq!(tags["piprov:hostname"], format!("pi-{SERIAL_A}"));
    assert_eq!(
        tags["Name"],
        format!("pi-{SERIAL_A}"),
        "Fleet Manager's name"
    );
    let activation = &ssm.requests_for("CreateActivation")[0]["body"];
    assert_eq!(activation["RegistrationLimit"], 1);
    assert_eq!(
        card.files_containing(&token),
        Vec::<String>::new(),
        "the token is removed once used"
    );
    let log = broker.log_text();
    assert!(
        log.contains(&format!("Pi {SERIAL_A} registered as {instance}")),
        "{log}"
    );
    // One line per request, and the lines of a request's work carry its id.
    let registered = log.lines().find(|l| l.contains("registered as")).unwrap();
    let id = registered
        .split("request{id=")
        .nth(1)
        .and_then(|rest| rest.split('}').next())
        .unwrap_or_else(|| panic!("no request id: {registered}"));
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&format!("request{{id={id}}}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("path=/v1/registrations status=200")),
        "{lines:?}"
    );
    assert!(!log.contains(&token));
    let err = card.standin_log();
    assert!(!err.contains(&token));
}

#[test]
fn refusals_are_answered_without_calling_aws() {
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start(dir.path(), 0);
    let mut broker = BrokerProcess::init(
        dir.path(),
        &ssm,
        &[("max_body_bytes", "512"), ("rate_limit_per_minute", "20")],
    );
    let good = broker.add_token("good", &["--max-uses", "1"]);
    let revoked = broker.add_token("revoked", &[]);
    let short = broker.add_token("short", &["--expires", "1s"]);
    std::fs::write(
        dir.path().join("allow.txt"),
        format!("# bench\n{SERIAL_B}\n"),
    )
    .unwrap();
    let allow = dir.path().join("allow.txt").display().to_string();
    let listed = broker.add_token("listed", &["--serials", &allow]);
    broker
        .piprov()
        .args(["broker", "token", "revoke", "--config"])
        .arg(&broker.config)
        .arg("revoked")
        .assert()
        .success();
    broker.start();
    std::thread::sleep(std::time::Duration::from_millis(1100));

    let cases: Vec<(Option<&str>, String, u16, &str)> = vec![
        (None, ask(SERIAL_A), 401, "missing bearer token"),
        (Some("pvt_0000"), ask(SERIAL_A), 401, "unknown token"),
        (Some(&revoked), ask(SERIAL_A), 401, "token revoked"),
        (Some(&short), ask(SERIAL_A), 401, "token expired"),
        (Some(&listed), ask(SERIAL_A), 403, "not allowed"),
        (
            Some(&good),
            "{not json".into(),
            400,
            "malformed request body",
        ),
        (
            Some(&good),
            r#"{"hostname":"x"}"#.into(),
            400,
            "missing field `serial`",
        ),
        (Some(&good), ask("10000000../etc"), 400, "serial"),
        (
            Some(&good),
            format!(r#"{{"serial":"{SERIAL_A}","pad":"{}"}}"#, "x".repeat(600)),
            413,
            "",
        ),
    ];
    for (token, body, status, message) in &cases {
        let (got, reply) = broker.post("/v1/activations", *token, body);
        assert_eq!(got, *status, "{body}: {reply}");
        assert!(reply.to_string().contains(message), "{reply}");
    }
    assert_eq!(creates(&ssm), 0, "no refusal reached AWS");

    // The quota: one enrollment, then 403 without a call.
    let (status, first) = broker.post("/v1/activations", Some(&good), &ask(SERIAL_A));
    assert_eq!(status, 200, "{first}");
    let (status, reply) = broker.post("/v1/activations", Some(&good), &ask(SERIAL_B));
    assert_eq!(status, 403);
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("no enrollments left")
    );
    let (status, _) = broker.post("/v1/activations", Some(&listed), &ask(SERIAL_B));
    assert_eq!(status, 200, "an allowed serial");
    assert_eq!(creates(&ssm), 2);

    // The per-client rate limit (20 a minute) counts requests refused at the
    // token (4 above).
    let statuses: Vec<u16> = (0..20)
        .map(|_| broker.post("/v1/activations", None, &ask(SERIAL_A)).0)
        .collect();
    assert!(statuses.contains(&429), "{statuses:?}");
    assert_eq!(broker.post("/healthz", None, "").0, 405, "GET only");

    let log = broker.log_text();
    for secret in [&good, &revoked, &short, &listed] {
        assert!(!log.contains(secret.as_str()), "no token in the log");
    }
    assert!(
        !log.contains(first["activation_code"].as_str().unwrap()),
        "no code in the log"
    );
}

#[test]
fn retries_get_the_same_activation_and_restarts_lose_nothing() {
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start(dir.path(), 0);
    let mut broker = BrokerProcess::init(dir.path(), &ssm, &[]);
    let token = broker.add_token("site-a", &["--max-uses", "10"]);
    broker.start();
    let (_, first) = broker.post("/v1/activations", Some(&token), &ask(SERIAL_A));
    let (_, again) = broker.post("/v1/activations", Some(&token), &ask(SERIAL_A));
    assert_eq!(first["activation_id"], again["activation_id"]);
    assert_eq!(first["activation_code"], again["activation_code"]);
    assert_eq!(again["reused"], true);
    assert_eq!(
        creates(&ssm),
        1,
        "a retry does not make a second activation"
    );
    assert_eq!(first["region"], "eu-west-1");

    // A clean stop, then a start: the token's count and the issue are kept.
    assert!(broker.stop().success(), "{}", broker.log_text());
    assert!(broker.log_text().contains("stopped"));
    broker.start();
    let out = broker
        .piprov()
        .args(["broker", "token", "list", "--json", "--config"])
        .arg(&broker.config)
        .output()
        .unwrap();
    let tokens: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(tokens[0]["uses"], 1);
    // The code was kept sealed with the vend key: the card's retry after the
    // restart gets the same activation, and nothing new is made.
    let (status, after) = broker.post("/v1/activations", Some(&token), &ask(SERIAL_A));
    assert_eq!(status, 200, "{after}");
    assert_eq!(after["activation_id"], first["activation_id"]);
    assert_eq!(after["activation_code"], first["activation_code"]);
    assert_eq!(after["reused"], true);
    assert_eq!(creates(&ssm), 1);

    // SQLite serves one broker: a second one on the same file is refused, as its
    // serial locks and clean-up would be wrong beside another process.
    if broker.database.is_none() {
        broker
            .piprov()
            .args(["broker", "serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&broker.config)
            .timeout(std::time::Duration::from_secs(30))
            .assert()
            .code(2)
            .stderr(contains("an SQLite database serves one broker"));
    }

    // Without the vend key, a sealed code does not open: the retry gets a fresh
    // activation and the one never used is withdrawn, so one serial never holds two.
    broker.stop();
    std::fs::write(
        broker.dir.join("vend.key"),
        format!("{}\n", "ab".repeat(32)),
    )
    .unwrap();
    broker.start();
    let (status, fresh) = broker.post("/v1/activations", Some(&token), &ask(SERIAL_A));
    assert_eq!(status, 200, "{fresh}");
    assert_ne!(fresh["activation_id"], first["activation_id"]);
    assert_eq!(fresh["reused"], false);
    let live: Vec<String> = ssm
        .activations()
        .iter()
        .map(|a| a["ActivationId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(live, [fresh["activation_id"].as_str().unwrap()]);
}

#[test]
fn registrations_tag_the_node_and_replace_only_the_same_pis_node() {
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start(dir.path(), 0);
    let mut broker = BrokerProcess::init(dir.path(), &ssm, &[("deregister_previous", "true")]);
    let token = broker.add_token("site-a", &[]);
    broker.start();
    let enrol = |serial: &str, previous: &str| -> String {
        let (status, a) = broker.post("/v1/activations", Some(&token), &ask(serial));
        assert_eq!(status, 200, "{a}");
        let node = ssm.register(
            a["activation_id"].as_str().unwrap(),
            a["activation_code"].as_str().unwrap(),
        );
        let (status, r) = broker.post(
            "/v1/registrations",
            Some(&token),
            &report(serial, &node, previous),
        );
        assert_eq!(status, 200, "{r}");
        node
    };
    let first = enrol(SERIAL_A, "");
    // The same Pi, re-imaged: a new activation, a new node, the old node dropped.
    let second = enrol(SERIAL_A, &first);
    // Another Pi naming A's node as its previous one: A's node is left alone.
    let other = enrol(SERIAL_B, &second);
    let nodes = ssm.nodes();
    let ids: Vec<&str> = nodes.iter().map(|(id, _)| id.as_str()).collect();
    assert!(
        !ids.contains(&first.as_str()),
        "A's old node was deregistered"
    );
    assert!(ids.contains(&second.as_str()) && ids.contains(&other.as_str()));
    let tags = |id: &str| nodes.iter().find(|(n, _)| n == id).unwrap().1.clone();
    assert_eq!(tags(&second)["piprov:serial"], SERIAL_A);
    assert_eq!(tags(&other)["piprov:serial"], SERIAL_B);
    assert_eq!(tags(&other)["piprov:hostname"], "door-1");
    assert_eq!(ssm.requests_for("DeregisterManagedInstance").len(), 1);

    // B may not claim A's node.
    let (status, reply) = broker.post(
        "/v1/registrations",
        Some(&token),
        &report(SERIAL_B, &second, ""),
    );
    assert_eq!(status, 403, "{reply}");
    // A serial the broker never issued to.
    let (status, _) = broker.post(
        "/v1/registrations",
        Some(&token),
        &report("10000000dead0001", &second, ""),
    );
    assert_eq!(status, 404);
}

#[test]
fn a_stop_finishes_requests_in_flight_and_slow_calls_time_out() {
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start_slow(dir.path(), 2.0);
    let mut broker = BrokerProcess::init(dir.path(), &ssm, &[("request_timeout", "\"1s\"")]);
    let token = broker.add_token("site-a", &[]);
    broker.start();
    // SSM slower than the request timeout: 503; the work goes on, so the card's
    // retry gets the activation it caused, not a second one.
    let (status, reply) = broker.post("/v1/activations", Some(&token), &ask(SERIAL_B));
    assert_eq!(status, 503, "{reply}");
    assert!(reply["error"].as_str().unwrap().contains("timed out"));
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let (status, reply) = broker.post("/v1/activations", Some(&token), &ask(SERIAL_B));
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["reused"], true);
    assert_eq!(ssm.requests_for("CreateActivation").len(), 1);
    broker.stop();

    let mut broker = BrokerProcess::init(&dir.path().join("second"), &ssm, &[]);
    let token = broker.add_token("site-a", &[]);
    broker.start();
    let client = broker.client();
    let asking =
        std::thread::spawn(move || client.post("/v1/activations", Some(&token), &ask(SERIAL_A)));
    // SIGTERM while the request waits for SSM.
    let started = std::time::Instant::now();
    while ssm.requests_for("CreateActivation").len() < 2 {
        assert!(
            started.elapsed().as_secs() < 60,
            "the request never reached SSM"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(broker.stop().success());
    let (status, reply) = asking.join().unwrap();
    assert_eq!(status, 200, "the request in flight was answered: {reply}");
    let recorded = broker.count(
        "SELECT count(*) FROM activations WHERE serial = $1",
        &[SERIAL_A],
    );
    assert_eq!(recorded, 1, "and recorded before the broker stopped");
}

#[test]
fn with_keep_token_a_card_cloned_in_the_field_enrols_by_itself() {
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start(dir.path(), 0);
    let mut broker = BrokerProcess::init(dir.path(), &ssm, &[]);
    let token = broker.add_token("site-a", &[]);
    broker.start();
    let card = broker_card(
        dir.path(),
        &ssm,
        &broker,
        &token,
        "keep_token = true",
        "card",
    );
    card.plug_into(SERIAL_A, "dc:a6:32:00:00:01");
    card.first_boot();
    let original = card.instance_id();
    // The token stays, root-only, off the FAT partition; no activation code stays.
    assert_eq!(
        card.files_containing(&token),
        ["var/lib/piprov/secret.conf"]
    );
    assert_eq!(card.mode("/var/lib/piprov/secret.conf"), 0o600);
    assert!(
        !card
            .read("/var/lib/piprov/secret.conf")
            .contains("ACTIVATION")
    );
    let before = card.snapshot();

    // dd'd in the field and booted in another Pi.
    let copy = card.clone_to(dir.path(), "copy");
    copy.plug_into(SERIAL_B, "dc:a6:32:00:00:02");
    for (what, out) in [("guard", copy.guard(&[])), ("register", copy.register(&[]))] {
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(copy.status()["state"], "registered");
    let cloned = copy.instance_id();
    assert_ne!(cloned, original);
    let nodes = ssm.nodes();
    let serial = |id: &str| nodes.iter().find(|(n, _)| n == id).unwrap().1["piprov:serial"].clone();
    assert_eq!(serial(&original), SERIAL_A);
    assert_eq!(serial(&cloned), SERIAL_B);
    assert_eq!(card.snapshot(), before, "the original card is untouched");
}

#[test]
fn without_keep_token_the_token_leaves_the_card() {
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start(dir.path(), 0);
    let mut broker = BrokerProcess::init(dir.path(), &ssm, &[]);
    let token = broker.add_token("site-a", &[]);
    broker.start();
    let card = broker_card(dir.path(), &ssm, &broker, &token, "", "card");
    // No Pi serial here: the card is known to the broker by its MAC.
    card.plug_into("", "dc:a6:32:00:00:09");
    card.first_boot();
    assert_eq!(card.files_containing(&token), Vec::<String>::new());
    let nodes = ssm.nodes();
    assert_eq!(nodes[0].1["piprov:serial"], "dca632000009");
}

/// Idle sockets from one address, more than the broker has descriptors: the
/// broker neither spins nor floods its log, and a real card from another
/// address is still served. (The broker's hard limit is 60 descriptors; 80
/// sockets come from 127.0.0.2, the card from 127.0.0.1.)
#[test]
fn idle_sockets_do_not_stop_the_broker() {
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start(dir.path(), 0);
    let mut broker = BrokerProcess::init(dir.path(), &ssm, &[]);
    let token = broker.add_token("site-a", &["--max-uses", "5"]);
    broker.descriptor_limit = Some(60);
    broker.start();
    // A process holding 80 connected, silent sockets from 127.0.0.2.
    let mut idle = std::process::Command::new("python3")
        .args([
            "-c",
            "import socket, sys, time\n\
             held = []\n\
             for _ in range(80):\n\
             \x20   s = socket.socket()\n\
             \x20   s.bind(('127.0.0.2', 0))\n\
             \x20   s.connect(('127.0.0.1', int(sys.argv[1])))\n\
             \x20   held.append(s)\n\
             print('held', flush=True)\n\
             time.sleep(120)\n",
        ])
        .arg(broker.port().to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut held = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(idle.stdout.as_mut().unwrap()),
        &mut held,
    )
    .unwrap();
    assert_eq!(held, "held\n", "the idle sockets did not connect");
    std::thread::sleep(std::time::Duration::from_secs(1));
    let cpu_before = broker.cpu_seconds();
    std::thread::sleep(std::time::Duration::from_secs(3));
    let cpu = broker.cpu_seconds() - cpu_before;
    assert!(
        cpu < 0.5,
        "the broker used {cpu:.2} s of CPU in 3 s while idle sockets waited"
    );
    let started = std::time::Instant::now();
    let (status, reply) = broker.post("/v1/activations", Some(&token), &ask(SERIAL_A));
    assert_eq!(status, 200, "{reply}\n{}", broker.log_text());
    assert!(
        started.elapsed().as_secs() < 5,
        "a real card waited {:?}",
        started.elapsed()
    );
    let lines = broker.log_text().lines().count();
    assert!(lines < 50, "{lines} log lines:\n{}", broker.log_text());
    idle.kill().unwrap();
    idle.wait().unwrap();
}

/// The records (token hashes, sealed codes, serials, client addresses) and
/// SQLite's WAL files are the owner's alone, in a directory that is too.
#[test]
fn the_broker_keeps_its_records_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start(dir.path(), 0);
    let mut broker = BrokerProcess::init(dir.path(), &ssm, &[]);
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&broker.dir), 0o700, "the broker's directory");
    if broker.database.is_some() {
        return; // PostgreSQL keeps the records: no file here.
    }
    let token = broker.add_token("site-a", &["--max-uses", "1"]);
    broker.start();
    let (status, _) = broker.post("/v1/activations", Some(&token), &ask(SERIAL_A));
    assert_eq!(status, 200);
    for file in ["broker.db", "broker.db-wal", "broker.db-shm"] {
        assert_eq!(mode(&broker.dir.join(file)), 0o600, "{file}");
    }
}

/// A token's requests count against the token, not the address: cards behind
/// one NAT share the token's allowance (here 12 a minute), not the address's
/// (here 3, for requests refused at the token).
#[test]
fn a_token_has_its_own_rate_limit_apart_from_the_address() {
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start(dir.path(), 0);
    let mut broker = BrokerProcess::init(
        dir.path(),
        &ssm,
        &[
            ("rate_limit_per_minute", "3"),
            ("token_rate_limit_per_minute", "12"),
        ],
    );
    let token = broker.add_token("site-a", &[]);
    broker.start();
    // Malformed bodies pass the gate (token and rate) and are refused after it.
    let statuses: Vec<u16> = (0..14)
        .map(|_| broker.post("/v1/activations", Some(&token), "{not json").0)
        .collect();
    assert_eq!(&statuses[..12], &[400; 12], "{statuses:?}");
    assert_eq!(&statuses[12..], &[429, 429], "{statuses:?}");
    let (status, reply) = broker.post("/v1/activations", Some(&token), "{not json");
    assert_eq!(status, 429);
    assert!(reply.to_string().contains("with token site-a"), "{reply}");
    // Requests without a valid token spend the address's allowance.
    let statuses: Vec<u16> = (0..4)
        .map(|_| {
            broker
                .post("/v1/activations", Some("pvt_0000"), &ask(SERIAL_A))
                .0
        })
        .collect();
    assert_eq!(statuses, [401, 401, 401, 429]);
    assert_eq!(creates(&ssm), 0);
}

/// The audit log cannot grow without end: a flood of refused requests is
/// trimmed to `audit_max_rows` (the newest kept) and lines past
/// `audit_keep` go, at start and every lease.
#[test]
fn the_audit_log_is_pruned() {
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start(dir.path(), 0);
    let mut broker = BrokerProcess::init(dir.path(), &ssm, &[("audit_max_rows", "5")]);
    broker.start();
    for _ in 0..12 {
        let (status, _) = broker.post("/v1/activations", Some("not-a-token"), &ask(SERIAL_A));
        assert_eq!(status, 401);
    }
    assert_eq!(broker.count("SELECT count(*) FROM audit", &[]), 12);
    let newest = broker.count("SELECT max(id) FROM audit", &[]);
    broker.stop();
    broker.start();
    assert_eq!(broker.count("SELECT count(*) FROM audit", &[]), 5);
    assert_eq!(broker.count("SELECT min(id) FROM audit", &[]), newest - 4);
    broker.stop();
    let text = std::fs::read_to_string(&broker.config).unwrap();
    std::fs::write(
        &broker.config,
        text.replace("audit_keep = \"90d\"", "audit_keep = \"1s\""),
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2100));
    broker.start();
    assert_eq!(broker.count("SELECT count(*) FROM audit", &[]), 0);
}
