//! Several `piprov broker serve` processes on one PostgreSQL database, as on
//! several hosts: a serial gets one activation whichever broker each of its
//! requests reaches, a retry on another broker gets the same code, the token's
//! quota holds across them, and one broker's clean-up never deletes an
//! activation another live broker is making. Needs the tests' PostgreSQL
//! (scripts/with-postgres.sh, as `make test` runs it); in CI its absence fails.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::broker::BrokerProcess;
use common::postgres;
use common::ssm_endpoint::SsmEndpoint;
use tempfile::TempDir;

fn ask(serial: &str) -> String {
    format!(r#"{{"serial":"{serial}","hostname":"pi-{serial}"}}"#)
}

fn creates_for(ssm: &SsmEndpoint, serial: &str) -> usize {
    ssm.requests_for("CreateActivation")
        .iter()
        .filter(|r| {
            r["body"]["Description"]
                .as_str()
                .unwrap_or("")
                .ends_with(serial)
        })
        .count()
}

#[test]
fn two_brokers_give_a_serial_one_activation_and_share_the_quota() {
    let Some(pg) = postgres::server() else { return };
    let dir = TempDir::new().unwrap();
    // Each activation takes a second to make: requests for one serial overlap.
    let ssm = SsmEndpoint::start_slow(dir.path(), 1.0);
    let mut a = BrokerProcess::init_on(dir.path(), &ssm, &[], &pg.new_database());
    let token = a.add_token("site-a", &["--max-uses", "3"]);
    let mut b = a.twin("broker-b");
    a.start();
    b.start();
    assert_ne!(a.url(), b.url());

    // The same serial asked of both brokers at once, four times each.
    let serial = "10000000abcd0001";
    let askers: Vec<_> = (0..8)
        .map(|n| {
            let client = if n % 2 == 0 { a.client() } else { b.client() };
            let token = token.clone();
            std::thread::spawn(move || client.post("/v1/activations", Some(&token), &ask(serial)))
        })
        .collect();
    let replies: Vec<_> = askers.into_iter().map(|t| t.join().unwrap()).collect();
    let ids: BTreeSet<String> = replies
        .iter()
        .map(|(status, reply)| {
            assert_eq!(*status, 200, "{reply}");
            reply["activation_id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(ids.len(), 1, "one activation for the serial: {replies:?}");
    assert_eq!(creates_for(&ssm, serial), 1);
    let codes: BTreeSet<&str> = replies
        .iter()
        .map(|(_, r)| r["activation_code"].as_str().unwrap())
        .collect();
    assert_eq!(codes.len(), 1, "every reply carries the same code");

    // Six more serials at once across both brokers, with two uses left: two get
    // an activation, four are refused, whichever broker they reached.
    let askers: Vec<_> = (0..6)
        .map(|n| {
            let client = if n % 2 == 0 { a.client() } else { b.client() };
            let token = token.clone();
            std::thread::spawn(move || {
                client.post(
                    "/v1/activations",
                    Some(&token),
                    &ask(&format!("10000000abcd01{n:02}")),
                )
            })
        })
        .collect();
    let statuses: Vec<u16> = askers.into_iter().map(|t| t.join().unwrap().0).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        2,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 403).count(),
        4,
        "{statuses:?}"
    );
    assert_eq!(
        a.count("SELECT uses FROM tokens WHERE name = $1", &["site-a"]),
        3
    );

    // A's broker stops; the card's retry reaches B and gets the same code back.
    a.stop();
    let (status, again) = b.post("/v1/activations", Some(&token), &ask(serial));
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["reused"], true);
    assert_eq!(again["activation_code"], replies[0].1["activation_code"]);
    assert_eq!(creates_for(&ssm, serial), 1);
}

#[test]
fn a_clean_up_leaves_what_a_live_broker_is_making_and_deletes_what_a_dead_one_left() {
    let Some(pg) = postgres::server() else { return };
    let dir = TempDir::new().unwrap();
    // CreateActivation answers 3 s after making the activation: a broker is
    // caught between SSM making one and recording it.
    let ssm = SsmEndpoint::start_slow(dir.path(), 3.0);
    let mut a = BrokerProcess::init_on(
        dir.path(),
        &ssm,
        &[("request_timeout", "\"8s\"")],
        &pg.new_database(),
    );
    let token = a.add_token("site-a", &[]);
    let mut b = a.twin("broker-b");
    a.start();
    let live = |ssm: &SsmEndpoint| -> BTreeSet<String> {
        ssm.activations()
            .iter()
            .map(|x| x["ActivationId"].as_str().unwrap().to_string())
            .collect()
    };
    let client = a.client();
    let asked = token.clone();
    let asking = std::thread::spawn(move || {
        client.post("/v1/activations", Some(&asked), &ask("10000000abcd0002"))
    });
    let started = Instant::now();
    while ssm.requests_for("CreateActivation").is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the request never reached SSM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A's activation exists in SSM, A has not heard of it yet; B starts and
    // cleans up meanwhile. It must leave it: A records it and hands it out next.
    std::thread::sleep(Duration::from_millis(200));
    b.start();
    assert_eq!(live(&ssm).len(), 1);
    let (status, reply) = asking.join().unwrap();
    assert_eq!(status, 200, "{reply}");
    assert!(
        live(&ssm).contains(reply["activation_id"].as_str().unwrap()),
        "B's start deleted the activation A was handing out: {}",
        b.log_text()
    );

    // A is killed while making another: no card ever gets that one. B's
    // periodic clean-up deletes it once its deadline (timeout + 10 s) passes.
    let client = a.client();
    let asked = token.clone();
    let orphaned = std::thread::spawn(move || {
        client.post("/v1/activations", Some(&asked), &ask("10000000abcd0003"))
    });
    while ssm.requests_for("CreateActivation").len() < 2 {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    a.kill_hard();
    let _ = orphaned.join();
    assert_eq!(live(&ssm).len(), 2, "the orphan exists in SSM");
    let started = Instant::now();
    while live(&ssm).len() > 1 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the orphan was never deleted: {} pending, {:?}; {}",
            b.count("SELECT count(*) FROM pending_issues", &[]),
            ssm.activations(),
            b.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        live(&ssm),
        BTreeSet::from([reply["activation_id"].as_str().unwrap().to_string()])
    );
}

#[test]
fn the_database_password_comes_from_the_environment_or_a_file_and_is_never_shown() {
    let Some(pg) = postgres::server() else { return };
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start(dir.path(), 0);
    let admin = pg.new_database();
    let secret = "pw-5ecret-value-91";
    // A role of its own, in the group the server asks a password of.
    let role = format!("piprov_pw_{}", admin.rsplit('_').next().unwrap());
    pg.psql(
        &admin,
        &format!(
            "DO $$ BEGIN CREATE ROLE piprov_pw NOLOGIN; EXCEPTION WHEN duplicate_object THEN END $$;
             CREATE ROLE {role} LOGIN PASSWORD '{secret}' IN ROLE piprov_pw"
        ),
    );
    let db_name = admin.rsplit('/').next().unwrap();
    pg.psql(&admin, &format!("ALTER DATABASE {db_name} OWNER TO {role}"));
    pg.psql(&admin, &format!("GRANT ALL ON SCHEMA public TO {role}"));
    let url = admin.replacen("postgres://piprov@", &format!("postgres://{role}@"), 1);
    let init = |home: &std::path::Path, password: &str| {
        ssm.piprov()
            .env("PGPASSWORD", password)
            .args(["broker", "init"])
            .arg(home)
            .args(["--name", "127.0.0.1", "--region", "eu-west-1"])
            .args(["--iam-role", "SSMServiceRole", "--database", &url])
            .output()
            .unwrap()
    };

    // A wrong password: refused, named by user and host, never shown, nothing made.
    let wrong = init(&dir.path().join("wrong"), "not-the-password");
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert_eq!(wrong.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("password authentication failed"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("postgres://{role}@127.0.0.1")),
        "{stderr}"
    );
    assert!(!stderr.contains("not-the-password"), "{stderr}");
    assert!(!dir.path().join("wrong/broker.toml").exists());

    // PGPASSWORD: made, and nothing it printed or wrote holds the password.
    let home = dir.path().join("broker");
    let made = init(&home, secret);
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let config = home.join("broker.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(!text.contains(secret) && !String::from_utf8_lossy(&made.stdout).contains(secret));
    let tokens = |env: Option<&str>| {
        let mut cmd = ssm.piprov();
        if let Some(password) = env {
            cmd.env("PGPASSWORD", password);
        }
        cmd.args(["broker", "token", "list", "--config"])
            .arg(&config)
            .output()
            .unwrap()
    };
    assert!(tokens(Some(secret)).status.success());
    let without = tokens(None);
    assert!(!without.status.success(), "no password, no database");

    // database_password_file: the same without the environment.
    std::fs::write(home.join("db.password"), format!("{secret}\n")).unwrap();
    std::fs::write(
        &config,
        text.replacen(
            "database = ",
            "database_password_file = \"db.password\"\ndatabase = ",
            1,
        ),
    )
    .unwrap();
    let listed = tokens(None);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
}

#[test]
fn sslmode_require_speaks_tls_verified_against_the_configured_ca() {
    let Some(pg) = postgres::server() else { return };
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start(dir.path(), 0);
    let url = format!("{}?sslmode=require", pg.new_database());
    let init = |home: &str, ca: Option<&std::path::Path>| {
        let mut cmd = ssm.piprov();
        cmd.args(["broker", "init"])
            .arg(dir.path().join(home))
            .args(["--name", "127.0.0.1", "--region", "eu-west-1"])
            .args(["--iam-role", "SSMServiceRole", "--database", &url]);
        if let Some(ca) = ca {
            cmd.arg("--database-ca-file").arg(ca);
        }
        cmd.output().unwrap()
    };
    // The system's roots do not know the tests' CA: refused, and said why.
    let unverified = init("system-roots", None);
    let stderr = String::from_utf8_lossy(&unverified.stderr);
    assert_eq!(unverified.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("certificate"), "{stderr}");

    // With the CA: TLS, and the server sees the broker's connections encrypted.
    let ca = pg.ca();
    let mut broker = BrokerProcess::init_on_with(
        dir.path(),
        &ssm,
        &url,
        &["--database-ca-file", ca.to_str().unwrap()],
    );
    let token = broker.add_token("site-a", &[]);
    broker.start();
    let (status, reply) = broker.post("/v1/activations", Some(&token), &ask("10000000abcd0009"));
    assert_eq!(status, 200, "{reply}");
    let admin = url.split('?').next().unwrap();
    let db_name = admin.rsplit('/').next().unwrap();
    let connections = |ssl: bool| {
        pg.psql(
            admin,
            &format!(
                "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
                 WHERE a.application_name = 'piprov-broker' AND a.datname = '{db_name}'
                 AND s.ssl = {ssl}"
            ),
        )
        .parse::<i64>()
        .unwrap()
    };
    assert!(connections(true) > 0, "the broker's connections are TLS");
    assert_eq!(connections(false), 0, "and none is plain");
}
