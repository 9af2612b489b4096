//! The account side with the real AWS SDK against the local endpoint: `setup
//! role` through IAM's Query protocol, the instance tier in `fleet doctor`, and
//! the operators' policy from `fleet access-policy`.

mod common;

use common::ssm_endpoint::SsmEndpoint;
use predicates::str::contains;
use tempfile::TempDir;

const CORE: &str = "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore";
const CLOUDWATCH: &str = "arn:aws:iam::aws:policy/CloudWatchAgentServerPolicy";

fn json_of(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn setup_role(ssm: &SsmEndpoint, args: &[&str]) -> (i32, serde_json::Value) {
    let out = ssm
        .piprov()
        .args(["setup", "role", "--json"])
        .args(args)
        .output()
        .unwrap();
    (out.status.code().unwrap(), json_of(&out))
}

fn actions(report: &serde_json::Value, key: &str) -> Vec<String> {
    report["plan"][key]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let what = s["policy"].as_str().unwrap_or("");
            format!("{} {what}", s["action"].as_str().unwrap())
                .trim()
                .to_string()
        })
        .collect()
}

#[test]
fn setup_role_shows_creates_and_then_finds_nothing_to_do() {
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start(dir.path(), 0);
    // Without --apply: the plan, and no change.
    let (code, report) = setup_role(&ssm, &["--policy", CLOUDWATCH]);
    assert_eq!(code, 1, "{report}");
    assert_eq!(
        actions(&report, "steps"),
        [
            "create-role".to_string(),
            format!("attach-policy {CORE}"),
            format!("attach-policy {CLOUDWATCH}")
        ]
    );
    assert!(ssm.requests_for_iam("CreateRole").is_empty());

    let (code, report) = setup_role(&ssm, &["--policy", CLOUDWATCH, "--apply"]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(
        report["arn"],
        "arn:aws:iam::123456789012:role/SSMServiceRole"
    );
    let create = &ssm.requests_for_iam("CreateRole")[0];
    let trust: serde_json::Value =
        serde_json::from_str(create["AssumeRolePolicyDocument"].as_str().unwrap()).unwrap();
    assert_eq!(
        trust["Statement"][0]["Principal"]["Service"],
        "ssm.amazonaws.com"
    );
    assert_eq!(trust["Statement"][0]["Action"], "sts:AssumeRole");
    assert_eq!(ssm.requests_for_iam("AttachRolePolicy").len(), 2);

    // Again: the role is right, nothing is sent but reads.
    let before = ssm.requests().len();
    ssm.piprov()
        .args(["setup", "role", "--policy", CLOUDWATCH, "--apply"])
        .assert()
        .success()
        .stdout(contains("role SSMServiceRole is ready: nothing to do"));
    let writes: Vec<_> = ssm.requests()[before..]
        .iter()
        .filter(|r| {
            !["IAM.GetRole", "IAM.ListAttachedRolePolicies"]
                .contains(&r["target"].as_str().unwrap())
        })
        .cloned()
        .collect();
    assert!(writes.is_empty(), "{writes:?}");

    // A policy added later is attached; nothing else changes.
    let (code, report) = setup_role(
        &ssm,
        &[
            "--policy",
            "arn:aws:iam::aws:policy/AmazonS3ReadOnlyAccess",
            "--apply",
        ],
    );
    assert_eq!(code, 0);
    assert_eq!(
        actions(&report, "steps"),
        ["attach-policy arn:aws:iam::aws:policy/AmazonS3ReadOnlyAccess"]
    );
}

#[test]
fn a_role_that_trusts_another_service_is_reported_and_left_alone() {
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start(dir.path(), 0);
    ssm.iam(&[
        ("Action", "CreateRole"),
        ("RoleName", "SSMServiceRole"),
        (
            "AssumeRolePolicyDocument",
            r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}"#,
        ),
    ]);
    ssm.piprov()
        .args(["setup", "role", "--apply"])
        .assert()
        .code(1)
        .stdout(contains(
            "role SSMServiceRole: its trust policy lets ec2.amazonaws.com assume it, not ssm.amazonaws.com",
        ))
        .stdout(contains("\"Service\": \"ec2.amazonaws.com\""))
        .stdout(contains("held back (add --update-trust)"));
    assert!(ssm.requests_for_iam("UpdateAssumeRolePolicy").is_empty());
    // The core policy was still attached: that part was right to do.
    assert_eq!(ssm.requests_for_iam("AttachRolePolicy").len(), 1);

    let (code, report) = setup_role(&ssm, &["--update-trust", "--apply"]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(actions(&report, "steps"), ["update-trust"]);
    let (code, report) = setup_role(&ssm, &[]);
    assert_eq!(code, 0, "{report}");
    assert!(report["plan"]["trust_problem"].is_null());
}

#[test]
fn access_denied_is_explained_in_one_line() {
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start(dir.path(), 0);
    let out = ssm
        .piprov()
        .env("AWS_ACCESS_KEY_ID", "AKIADENIEDDENIED0000")
        .args(["setup", "role"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("reading role SSMServiceRole: your identity may not manage IAM roles")
            && stderr.contains("AccessDenied: User: arn:aws:iam::123456789012:user/dev"),
        "{stderr}"
    );
}

#[test]
fn doctor_reads_the_instance_tier() {
    let dir = TempDir::new().unwrap();
    let ssm = SsmEndpoint::start(dir.path(), 0);
    // A new account: the standard tier.
    let out = ssm
        .piprov()
        .args(["fleet", "doctor", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let report = json_of(&out);
    assert_eq!(report["tier"]["setting"], "standard");
    assert_eq!(report["tier"]["node_limit"], 1000);
    assert_eq!(report["problems"][0]["kind"], "standard-tier");
    ssm.piprov()
        .args(["fleet", "doctor"])
        .assert()
        .code(1)
        .stdout(contains("Session Manager cannot reach hybrid nodes"))
        .stdout(contains("instance tier: standard (0 hybrid nodes"));

    ssm.call(
        "AmazonSSM.UpdateServiceSetting",
        &serde_json::json!({
            "SettingId": "/ssm/managed-instance/activation-tier",
            "SettingValue": "advanced"
        }),
    );
    let out = ssm
        .piprov()
        .args(["fleet", "doctor", "--json"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let report = json_of(&out);
    assert_eq!(report["tier"]["setting"], "advanced");
    assert!(report["tier"]["node_limit"].is_null());
    assert_eq!(report["problems"], serde_json::json!([]));
}

#[test]
fn the_access_policy_names_only_the_tags_and_documents_asked_for() {
    let out = common::piprov()
        .args([
            "fleet",
            "access-policy",
            "--tag",
            "site=a",
            "--tag",
            "fleet=doors",
            "--documents",
            "ssh,port-forwarding",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let policy = json_of(&out);
    assert_eq!(policy["Version"], "2012-10-17");
    let statements = policy["Statement"].as_array().unwrap();
    assert!(statements.iter().all(|s| s["Effect"] == "Allow"));
    let by_sid = |sid: &str| statements.iter().find(|s| s["Sid"] == sid).unwrap();
    let nodes = by_sid("StartSessionsOnTheFleet");
    assert_eq!(nodes["Action"], "ssm:StartSession");
    assert_eq!(nodes["Resource"], "arn:aws:ssm:*:*:managed-instance/*");
    assert_eq!(
        nodes["Condition"]["StringEquals"],
        serde_json::json!({"ssm:resourceTag/site": ["a"], "ssm:resourceTag/fleet": ["doors"]})
    );
    assert_eq!(
        nodes["Condition"]["BoolIfExists"]["ssm:SessionDocumentAccessCheck"],
        "true"
    );
    assert_eq!(
        by_sid("ThroughTheseDocuments")["Resource"],
        serde_json::json!([
            "arn:aws:ssm:*::document/AWS-StartSSHSession",
            "arn:aws:ssm:*::document/AWS-StartPortForwardingSession"
        ])
    );
    let own = by_sid("OwnSessionsOnly");
    assert_eq!(own["Resource"], "arn:aws:ssm:*:*:session/${aws:username}-*");
    assert_eq!(
        own["Action"],
        serde_json::json!(["ssm:TerminateSession", "ssm:ResumeSession"])
    );
    // Nothing grants more than sessions and reads: every action, named.
    let mut granted: Vec<String> = statements
        .iter()
        .flat_map(|s| match &s["Action"] {
            serde_json::Value::String(a) => vec![a.clone()],
            list => list
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_string())
                .collect(),
        })
        .collect();
    granted.sort();
    granted.dedup();
    assert_eq!(
        granted,
        [
            "ec2:DescribeInstances",
            "ssm:DescribeInstanceInformation",
            "ssm:DescribeInstanceProperties",
            "ssm:DescribeSessions",
            "ssm:GetConnectionStatus",
            "ssm:ResumeSession",
            "ssm:StartSession",
            "ssm:TerminateSession"
        ]
    );
    // Sessions are started only on the fleet's nodes or through the documents.
    for s in statements
        .iter()
        .filter(|s| s["Action"] == "ssm:StartSession")
    {
        assert!(s["Resource"] != "*", "{s}");
    }
    common::piprov()
        .args(["fleet", "access-policy", "--documents", "telnet"])
        .assert()
        .code(2)
        .stderr(contains("invalid value 'telnet'"));
}
