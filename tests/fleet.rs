//! `piprov fleet list/doctor/prune` with the real AWS SDK against the local SSM
//! endpoint, with nodes registered and pinging the way the agent does.

mod common;

use common::ssm_endpoint::SsmEndpoint;
use common::succeed;
use predicates::str::contains;
use tempfile::TempDir;

/// An activation made through piprov (limit `limit`, tag site=`site`): (id, code).
fn activation(ssm: &SsmEndpoint, limit: u32, site: &str) -> (String, String) {
    let out = succeed(
        ssm.piprov()
            .args([
                "activation",
                "create",
                "--role",
                "R",
                "--show-code",
                "--json",
            ])
            .args([
                "--limit",
                &limit.to_string(),
                "--tag",
                &format!("site={site}"),
            ]),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        v["activation_id"].as_str().unwrap().to_string(),
        v["activation_code"].as_str().unwrap().to_string(),
    )
}

fn json(cmd: &mut assert_cmd::Command, expected_code: i32) -> serde_json::Value {
    let out = cmd.output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(expected_code),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn list_shows_nodes_with_status_and_tags() {
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start(dir.path(), 0);
    let (a, code_a) = activation(&ssm, 5, "a");
    let (b, code_b) = activation(&ssm, 1, "b");
    let door = ssm.register(&a, &code_a);
    ssm.ping(&door, "door-1", "192.0.2.10");
    ssm.tag(&door, "piprov:serial", "10000000c0ffee01");
    let gate = ssm.register(&a, &code_a);
    let lab = ssm.register(&b, &code_b);
    ssm.ping(&lab, "lab-1", "192.0.2.11");

    let nodes = json(ssm.piprov().args(["fleet", "list", "--json"]), 0);
    let nodes = nodes.as_array().unwrap();
    assert_eq!(nodes.len(), 3, "every page is read");
    let door_node = nodes.iter().find(|n| n["id"] == door.as_str()).unwrap();
    assert_eq!(door_node["ping_status"], "Online");
    assert_eq!(door_node["computer_name"], "door-1");
    assert_eq!(door_node["ip_address"], "192.0.2.10");
    assert_eq!(door_node["agent_version"], "3.3.987.0");
    assert_eq!(door_node["activation_id"], a.as_str());
    assert_eq!(
        door_node["tags"]["site"], "a",
        "the activation's tags carry over"
    );
    assert_eq!(door_node["tags"]["piprov:serial"], "10000000c0ffee01");
    assert!(door_node["registered_at"].as_str().unwrap().ends_with('Z'));
    let gate_node = nodes.iter().find(|n| n["id"] == gate.as_str()).unwrap();
    assert_eq!(
        gate_node["ping_status"], "ConnectionLost",
        "it never pinged"
    );

    let site_a = json(
        ssm.piprov()
            .args(["fleet", "list", "--json", "--tag", "site=a"]),
        0,
    );
    let mut ids: Vec<&str> = site_a
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    ids.sort();
    let mut expected = vec![door.as_str(), gate.as_str()];
    expected.sort();
    assert_eq!(ids, expected);

    ssm.piprov()
        .args(["fleet", "list"])
        .assert()
        .success()
        .stdout(contains(&door))
        .stdout(contains("serial=10000000c0ffee01"))
        .stdout(contains("door-1"));
}

#[test]
fn doctor_finds_clones_stale_nodes_and_dead_activations() {
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start(dir.path(), 0);
    // The tier's own findings are tests/account.rs's.
    ssm.call(
        "AmazonSSM.UpdateServiceSetting",
        &serde_json::json!({
            "SettingId": "/ssm/managed-instance/activation-tier",
            "SettingValue": "advanced"
        }),
    );
    let (a, code_a) = activation(&ssm, 3, "a");
    let (single, code_single) = activation(&ssm, 1, "a");
    // One Pi's card cloned: two nodes with its serial; the old one long silent.
    let original = ssm.register(&a, &code_a);
    ssm.ping(&original, "door-1", "192.0.2.10");
    ssm.backdate(&original, 40);
    let clone = ssm.register(&a, &code_a);
    ssm.ping(&clone, "door-2", "192.0.2.11");
    for node in [&original, &clone] {
        ssm.tag(node, "piprov:serial", "10000000c0ffee01");
    }
    let other = ssm.register(&single, &code_single);
    ssm.ping(&other, "gate-1", "192.0.2.12");

    let report = json(ssm.piprov().args(["fleet", "doctor", "--json"]), 1);
    let problems = report["problems"].as_array().unwrap();
    let kinds: Vec<&str> = problems
        .iter()
        .map(|p| p["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["shared-serial", "offline", "activation-used-up"],
        "{report}"
    );
    assert_eq!(problems[0]["serial"], "10000000c0ffee01");
    assert_eq!(problems[1]["node"], original.as_str());
    assert_eq!(problems[1]["days"], 40);
    assert_eq!(problems[2]["activation"], single.as_str());

    // A wider window leaves the 40-day-old node alone.
    let report = json(
        ssm.piprov()
            .args(["fleet", "doctor", "--json", "--offline-days", "60"]),
        1,
    );
    assert!(!report.to_string().contains("\"offline\""));

    ssm.piprov()
        .args(["fleet", "doctor"])
        .assert()
        .code(1)
        .stdout(contains("Pi serial 10000000c0ffee01 is claimed by"))
        .stdout(contains(format!("{original} has been offline for 40 days")));
}

#[test]
fn prune_is_a_dry_run_until_applied_and_spares_online_nodes() {
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start(dir.path(), 0);
    let (a, code) = activation(&ssm, 3, "a");
    let online = ssm.register(&a, &code);
    ssm.ping(&online, "door-1", "192.0.2.10");
    let stale = ssm.register(&a, &code);
    ssm.ping(&stale, "door-2", "192.0.2.11");
    ssm.backdate(&stale, 45);
    let recent = ssm.register(&a, &code);
    ssm.ping(&recent, "door-3", "192.0.2.12");
    ssm.backdate(&recent, 10);

    ssm.piprov()
        .args(["fleet", "prune", "--offline-for", "30d"])
        .assert()
        .success()
        .stdout(contains(format!("{stale}  door-2")))
        .stdout(contains("would deregister"))
        .stdout(contains("dry run"));
    assert!(ssm.requests_for("DeregisterManagedInstance").is_empty());

    let report = json(
        ssm.piprov().args([
            "fleet",
            "prune",
            "--offline-for",
            "30d",
            "--apply",
            "--json",
        ]),
        0,
    );
    assert_eq!(report["nodes"][0]["node"], stale.as_str());
    assert_eq!(report["nodes"][0]["outcome"], "deregistered");
    let deregistered = ssm.requests_for("DeregisterManagedInstance");
    assert_eq!(deregistered.len(), 1);
    assert_eq!(deregistered[0]["body"]["InstanceId"], stale.as_str());
    let left = json(ssm.piprov().args(["fleet", "list", "--json"]), 0);
    let mut ids: Vec<&str> = left
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    ids.sort();
    let mut expected = [online.as_str(), recent.as_str()];
    expected.sort();
    assert_eq!(ids, expected);
    // Nothing left that old: said in words, not "30days".
    ssm.piprov()
        .args(["fleet", "prune", "--offline-for", "30d"])
        .assert()
        .success()
        .stdout(contains("no node has been offline for 30 days"));
}

#[test]
fn ssh_config_reaches_every_node_through_session_manager() {
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start(dir.path(), 0);
    let (a, code) = activation(&ssm, 4, "a");
    let door = ssm.register(&a, &code);
    ssm.ping(&door, "door-07", "192.0.2.7");
    // Two nodes claiming one hostname: a card and its clone.
    let twin_a = ssm.register(&a, &code);
    ssm.ping(&twin_a, "gate", "192.0.2.8");
    let twin_b = ssm.register(&a, &code);
    ssm.ping(&twin_b, "gate", "192.0.2.9");
    let (b, code_b) = activation(&ssm, 1, "b");
    let elsewhere = ssm.register(&b, &code_b);
    ssm.ping(&elsewhere, "yard-1", "192.0.2.10");

    let out = succeed(ssm.piprov().args([
        "fleet",
        "ssh-config",
        "--tag",
        "site=a",
        "--user",
        "pi",
        "--region",
        "eu-west-1",
    ]));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains("yard-1"), "only the tagged nodes:\n{text}");
    assert!(text.contains("gate is the name of 2 nodes"), "{text}");
    let config = dir.path().join("ssh_config");
    std::fs::write(&config, &text).unwrap();
    // ssh itself reads the entries: what it would connect to, as whom, through what.
    let resolve = |host: &str| {
        let out = std::process::Command::new("ssh")
            .arg("-G")
            .arg("-F")
            .arg(&config)
            .arg(host)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let door_config = resolve("door-07");
    assert!(
        door_config.contains(&format!("hostname {door}\n")),
        "{door_config}"
    );
    assert!(door_config.contains("user pi\n"));
    assert!(
        door_config.contains(
            "proxycommand aws ssm start-session --target %h --document-name AWS-StartSSHSession \
             --parameters portNumber=%p --region eu-west-1\n"
        ),
        "{door_config}"
    );
    for twin in [&twin_a, &twin_b] {
        let resolved = resolve(&format!("gate-{twin}"));
        assert!(
            resolved.contains(&format!("hostname {twin}\n")),
            "{resolved}"
        );
    }
}

/// A network where something answers the instance-metadata address with a web
/// page, as many corporate proxies do.
fn proxy_on_loopback() -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            let page = "<html>corporate proxy</html>";
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
                page.len()
            );
        }
    });
    format!("http://{address}")
}

#[test]
fn no_credentials_are_named_as_such_even_behind_a_proxy() {
    let home = TempDir::new().unwrap();
    let imds = proxy_on_loopback();
    let run = |verbose: bool| {
        let mut cmd = common::piprov();
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap())
            .env("HOME", home.path())
            .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", &imds);
        cmd.args(["fleet", "list", "--region", "eu-west-1"]);
        if verbose {
            cmd.arg("-v");
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(2));
        String::from_utf8(out.stderr).unwrap()
    };
    let said = run(false);
    assert!(
        said.starts_with("piprov: error: no AWS credentials: tried the environment"),
        "{said}"
    );
    assert!(
        said.contains("run `aws configure`") && said.contains("--profile"),
        "{said}"
    );
    assert_eq!(said.lines().count(), 1, "one line: {said}");
    assert!(
        !said.contains("could not be reached") && !said.contains("DispatchFailure"),
        "{said}"
    );
    let detailed = run(true);
    assert!(
        detailed.contains("IMDS"),
        "-v shows the SDK's chain: {detailed}"
    );
}
