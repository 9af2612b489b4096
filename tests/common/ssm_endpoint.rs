//! The local SSM-compatible endpoint (tests/support/ssm_stub.py) and piprov
//! pointed at it with the real AWS SDK, isolated from the host's AWS setup.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::stub::{Stub, logged_requests};

pub struct SsmEndpoint {
    stub: Stub,
    log: PathBuf,
    home: PathBuf,
}

impl SsmEndpoint {
    pub fn start(dir: &Path, throttle_first: u32) -> SsmEndpoint {
        Self::start_for(dir, throttle_first, 300)
    }

    /// With a lifetime (seconds) for long runs.
    pub fn start_for(dir: &Path, throttle_first: u32, lifetime: u32) -> SsmEndpoint {
        Self::start_with(dir, throttle_first, lifetime, 0.0)
    }

    /// CreateActivation answering `slow_create` seconds late.
    pub fn start_slow(dir: &Path, slow_create: f64) -> SsmEndpoint {
        Self::start_with(dir, 0, 300, slow_create)
    }

    fn start_with(dir: &Path, throttle_first: u32, lifetime: u32, slow_create: f64) -> SsmEndpoint {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/ssm_stub.py");
        let port_file = dir.join("ssm.port");
        let log = dir.join("ssm.log");
        let mut command = Command::new("python3");
        command
            .arg(script)
            .arg(&port_file)
            .arg(&log)
            .arg(throttle_first.to_string())
            .arg(lifetime.to_string())
            .env("SSM_STUB_SLOW_CREATE", slow_create.to_string());
        SsmEndpoint {
            stub: Stub::start(command, &port_file, "SSM stand-in"),
            log,
            home: dir.to_path_buf(),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.stub.port)
    }

    pub fn requests(&self) -> Vec<serde_json::Value> {
        logged_requests(&self.log)
    }

    /// The requests for one operation, e.g. "CreateActivation".
    pub fn requests_for(&self, op: &str) -> Vec<serde_json::Value> {
        let target = format!("AmazonSSM.{op}");
        self.requests()
            .into_iter()
            .filter(|r| r["target"] == target.as_str())
            .collect()
    }

    /// The forms of the IAM requests for one action, e.g. "CreateRole".
    pub fn requests_for_iam(&self, action: &str) -> Vec<serde_json::Value> {
        let target = format!("IAM.{action}");
        self.requests()
            .into_iter()
            .filter(|r| r["target"] == target.as_str())
            .map(|r| r["body"].clone())
            .collect()
    }

    /// Calls IAM's side of the endpoint directly (the Query protocol), as
    /// another tool that made a role before piprov would.
    pub fn iam(&self, form: &[(&str, &str)]) -> String {
        let body: String = form
            .iter()
            .chain(&[("Version", "2010-05-08")])
            .map(|(k, v)| {
                let enc = |s: &str| {
                    s.bytes()
                        .map(|b| match b {
                            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                                (b as char).to_string()
                            }
                            _ => format!("%{b:02X}"),
                        })
                        .collect::<String>()
                };
                format!("{}={}", enc(k), enc(v))
            })
            .collect::<Vec<_>>()
            .join("&");
        let mut stream = TcpStream::connect(("127.0.0.1", self.stub.port)).unwrap();
        write!(
            stream,
            "POST / HTTP/1.0\r\nHost: 127.0.0.1\r\n\
             Content-Type: application/x-www-form-urlencoded; charset=utf-8\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.0 200"), "{reply}");
        reply
    }

    /// The environment piprov runs in: test credentials, this endpoint, and
    /// nothing from the host's AWS setup.
    pub fn env(&self) -> Vec<(String, String)> {
        aws_env(&self.home, &self.url())
    }

    /// piprov in `env()`.
    pub fn piprov(&self) -> assert_cmd::Command {
        let mut cmd = super::piprov();
        cmd.env_clear().envs(self.env());
        cmd
    }

    /// Calls the endpoint directly, as the agent does when it registers and pings.
    pub fn call(&self, target: &str, body: &serde_json::Value) -> serde_json::Value {
        let (status, value) = self.try_call(target, body);
        assert_eq!(status, 200, "{target}: {value}");
        value
    }

    /// Like `call`, for an answer that may be an error: (HTTP status, body).
    pub fn try_call(&self, target: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        let body = body.to_string();
        let mut stream = TcpStream::connect(("127.0.0.1", self.stub.port)).unwrap();
        write!(
            stream,
            "POST / HTTP/1.0\r\nHost: 127.0.0.1\r\nX-Amz-Target: {target}\r\n\
             Content-Type: application/x-amz-json-1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        let (head, payload) = reply.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        (status, serde_json::from_str(payload).unwrap())
    }

    /// Registers a node with an activation, as `amazon-ssm-agent -register` does,
    /// and returns its `mi-` id.
    pub fn register(&self, activation_id: &str, code: &str) -> String {
        let reply = self.call(
            "AmazonSSM.RegisterManagedInstance",
            &serde_json::json!({
                "ActivationId": activation_id, "ActivationCode": code,
                "PublicKey": "key", "PublicKeyType": "Rsa", "Fingerprint": "fp",
            }),
        );
        reply["InstanceId"].as_str().unwrap().to_string()
    }

    /// A ping from the node's agent: it is Online from now on.
    pub fn ping(&self, node: &str, computer_name: &str, ip: &str) {
        self.call(
            "AmazonSSM.UpdateInstanceInformation",
            &serde_json::json!({
                "InstanceId": node, "AgentVersion": "3.3.987.0",
                "ComputerName": computer_name, "IPAddress": ip,
                "PlatformName": "Debian GNU/Linux", "PlatformType": "Linux",
            }),
        );
    }

    pub fn tag(&self, node: &str, key: &str, value: &str) {
        self.call(
            "AmazonSSM.AddTagsToResource",
            &serde_json::json!({
                "ResourceType": "ManagedInstance", "ResourceId": node,
                "Tags": [{"Key": key, "Value": value}],
            }),
        );
    }

    /// Every activation SSM holds.
    pub fn activations(&self) -> Vec<serde_json::Value> {
        let mut all = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let mut body = serde_json::json!({"MaxResults": 1000});
            if let Some(token) = &next {
                body["NextToken"] = token.clone().into();
            }
            let page = self.call("AmazonSSM.DescribeActivations", &body);
            all.extend(page["ActivationList"].as_array().unwrap().iter().cloned());
            match page["NextToken"].as_str() {
                Some(token) => next = Some(token.to_string()),
                None => return all,
            }
        }
    }

    /// Every managed node with its tags.
    pub fn nodes(&self) -> Vec<(String, serde_json::Value)> {
        let mut all = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let mut body = serde_json::json!({"MaxResults": 1000});
            if let Some(token) = &next {
                body["NextToken"] = token.clone().into();
            }
            let page = self.call("AmazonSSM.DescribeInstanceInformation", &body);
            for node in page["InstanceInformationList"].as_array().unwrap() {
                let id = node["InstanceId"].as_str().unwrap().to_string();
                let tags = self.call(
                    "AmazonSSM.ListTagsForResource",
                    &serde_json::json!({"ResourceType": "ManagedInstance", "ResourceId": id}),
                );
                let map: serde_json::Map<String, serde_json::Value> = tags["TagList"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| (t["Key"].as_str().unwrap().to_string(), t["Value"].clone()))
                    .collect();
                all.push((id, serde_json::Value::Object(map)));
            }
            match page["NextToken"].as_str() {
                Some(token) => next = Some(token.to_string()),
                None => return all,
            }
        }
    }

    /// Moves the node's last ping (and registration) `days` into the past.
    pub fn backdate(&self, node: &str, days: u64) {
        self.call(
            "PiprovTest.Backdate",
            &serde_json::json!({"InstanceId": node, "Seconds": days * 86_400}),
        );
    }
}

/// The environment piprov runs in against an SSM endpoint at `url`: test
/// credentials, HOME (and piprov's cache) under `home`, and nothing from the
/// host's AWS setup.
pub fn aws_env(home: &Path, url: &str) -> Vec<(String, String)> {
    let home = home.display();
    [
        ("PATH", std::env::var("PATH").unwrap()),
        ("HOME", home.to_string()),
        ("PIPROV_CACHE_DIR", format!("{home}/cache")),
        ("AWS_CONFIG_FILE", format!("{home}/no-config")),
        (
            "AWS_SHARED_CREDENTIALS_FILE",
            format!("{home}/no-credentials"),
        ),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ("AWS_ENDPOINT_URL", url.to_string()),
        ("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEEXAMPLE00".into()),
        (
            "AWS_SECRET_ACCESS_KEY",
            "secretsecretsecretsecretsecretsecret0000".into(),
        ),
        ("AWS_REGION", "eu-west-1".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}
