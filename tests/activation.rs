//! `piprov activation` with the real AWS SDK client against a local SSM-compatible
//! endpoint on loopback (tests/support/ssm_stub.py): create → list → delete, the
//! checks made before calling AWS, and each error explained in one line.

mod common;

use common::ssm_endpoint::SsmEndpoint;
use common::succeed;
use predicates::prelude::*;
use predicates::str::contains;
use tempfile::TempDir;

#[test]
fn create_list_delete() {
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start(dir.path(), 0);
    let code_file = dir.path().join("site.code");
    let out = succeed(
        ssm.piprov()
            .arg("activation")
            .args([
                "create",
                "--role",
                "SSMServiceRole",
                "--limit",
                "10",
                "--expires",
                "7d",
                "--name",
                "door",
            ])
            .args(["--tag", "site=a", "--tag", "batch=2026-11", "--code-file"])
            .arg(&code_file),
    );
    let code = std::fs::read_to_string(&code_file)
        .unwrap()
        .trim()
        .to_string();
    assert!(!code.is_empty());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&code_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        !stdout.contains(&code) && !String::from_utf8_lossy(&out.stderr).contains(&code),
        "the code is never printed unless asked"
    );
    let id = stdout
        .lines()
        .next()
        .unwrap()
        .strip_prefix("activation ")
        .unwrap()
        .to_string();

    // The request SSM received: role, limit, expiry about 7 days out, tags.
    let create = &ssm.requests()[0];
    assert_eq!(create["target"], "AmazonSSM.CreateActivation");
    assert_eq!(create["body"]["RegistrationLimit"], 10);
    assert_eq!(create["body"]["DefaultInstanceName"], "door");
    let expiry = create["body"]["ExpirationDate"].as_f64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (expiry - now - 7.0 * 86400.0).abs() < 120.0,
        "{expiry} vs {now}"
    );

    // Three more, so that listing crosses the stand-in's two-item pages.
    for _ in 0..3 {
        ssm.piprov()
            .arg("activation")
            .args(["create", "--role", "R", "--show-code"])
            .assert()
            .success()
            .stdout(contains("code "));
    }
    let out = succeed(ssm.piprov().arg("activation").args(["list", "--json"]));
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.len(), 4, "every page is read");
    let ours = list.iter().find(|a| a["id"] == id.as_str()).unwrap();
    assert_eq!(ours["registration_limit"], 10);
    assert_eq!(ours["registrations"], 0);
    assert_eq!(ours["expired"], false);
    assert!(
        ours["tags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t[0] == "site" && t[1] == "a")
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&code));

    ssm.piprov()
        .arg("activation")
        .args(["delete", &id])
        .assert()
        .success()
        .stdout(contains(format!("deleted {id}")));
    let out = ssm
        .piprov()
        .arg("activation")
        .args(["list", "--json"])
        .output()
        .unwrap();
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(list.iter().all(|a| a["id"] != id.as_str()));
    ssm.piprov()
        .arg("activation")
        .args(["delete", &id])
        .assert()
        .code(2)
        .stderr(contains("no such activation"));
}

#[test]
fn bad_values_are_refused_before_calling_aws() {
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start(dir.path(), 0);
    for (args, message) in [
        (&["--limit", "0"][..], "is not between 1 and 1000"),
        (&["--limit", "1001"][..], "is not between 1 and 1000"),
        (&["--expires", "31d"][..], "up to 30 days"),
        (&["--tag", "novalue"][..], "expected key=value"),
    ] {
        ssm.piprov()
            .arg("activation")
            .args(["create", "--role", "R", "--show-code"])
            .args(args)
            .assert()
            .code(2)
            .stderr(contains(message));
    }
    ssm.piprov()
        .arg("activation")
        .args(["create", "--role", "R"])
        .assert()
        .code(2)
        .stderr(contains("shows an activation code only once"));
    assert!(ssm.requests().is_empty(), "no call reached SSM");
}

#[test]
fn errors_are_explained_in_one_line() {
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start(dir.path(), 0);
    ssm.piprov()
        .arg("activation")
        .args(["create", "--role", "NoPassRole", "--show-code"])
        .assert()
        .code(2)
        .stderr(contains("grant iam:PassRole"));

    // No credentials anywhere.
    ssm.piprov()
        .arg("activation")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .args(["list"])
        .assert()
        .code(2)
        .stderr(contains("no AWS credentials: tried the environment"));

    // Session credentials past their expiry.
    ssm.piprov()
        .arg("activation")
        .env("AWS_ACCESS_KEY_ID", "ASIAEXPIREDEXPIRED00")
        .env("AWS_SESSION_TOKEN", "token")
        .args(["list"])
        .assert()
        .code(2)
        .stderr(contains("the AWS credentials have expired"));

    // A region that is not one.
    ssm.piprov()
        .arg("activation")
        .args(["list", "--region", "Ireland"])
        .assert()
        .code(2)
        .stderr(contains("\"Ireland\" is not an AWS region name"));

    // No region anywhere.
    ssm.piprov()
        .arg("activation")
        .env_remove("AWS_REGION")
        .args(["list"])
        .assert()
        .code(2)
        .stderr(contains("no AWS region"))
        .stderr(contains("recipe").not());

    // Nothing listening.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    ssm.piprov()
        .arg("activation")
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"))
        .args(["list"])
        .assert()
        .code(2)
        .stderr(contains(format!(
            "could not be reached at http://127.0.0.1:{port} (from AWS_ENDPOINT_URL)"
        )));
}

#[test]
fn throttling_is_retried_by_the_sdk() {
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start(dir.path(), 2);
    ssm.piprov()
        .arg("activation")
        .args(["list"])
        .assert()
        .success()
        .stderr(predicate::str::is_empty());
    assert_eq!(
        ssm.requests().len(),
        3,
        "two throttled attempts, then the answer"
    );
}

#[test]
fn a_value_ssm_rejects_is_named() {
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start(dir.path(), 0);
    // Braces are not allowed in tag values; SSM's ValidationException says so.
    ssm.piprov()
        .arg("activation")
        .args([
            "create",
            "--role",
            "R",
            "--show-code",
            "--tag",
            "host=door-{n}",
        ])
        .assert()
        .code(2)
        .stderr(contains("SSM rejected a value"))
        .stderr(contains("ValidationException"))
        .stderr(contains("host=door-{n}"));
    assert_eq!(ssm.requests_for("CreateActivation").len(), 1, "not retried");
}

/// A region the SDK does not know may be new, or a typo: a warning names the
/// nearest known one, and the call still goes out.
#[test]
fn an_unknown_region_is_warned_about_with_the_nearest_known_one() {
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start(dir.path(), 0);
    let out = succeed(
        ssm.piprov()
            .args(["activation", "list", "--region", "eu-wset-1"]),
    );
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("warning: region \"eu-wset-1\" is not one the AWS SDK knows; the nearest known region is eu-west-1"),
        "{stderr}"
    );
    let out = succeed(
        ssm.piprov()
            .args(["activation", "list", "--region", "eu-west-1"]),
    );
    assert!(!String::from_utf8(out.stderr).unwrap().contains("warning"));
}
