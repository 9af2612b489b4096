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
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/ssm_stub.py");
        let port_file = dir.join("ssm.port");
        let log = dir.join("ssm.log");
        let mut command = Command::new("python3");
        command
            .arg(script)
            .arg(&port_file)
            .arg(&log)
            .arg(throttle_first.to_string());
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

    /// piprov with test credentials and the endpoint set, and nothing from the
    /// host's AWS setup.
    pub fn piprov(&self) -> assert_cmd::Command {
        let mut cmd = super::piprov();
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap())
            .env("HOME", &self.home)
            .env("PIPROV_CACHE_DIR", self.home.join("cache"))
            .env("AWS_CONFIG_FILE", self.home.join("no-config"))
            .env(
                "AWS_SHARED_CREDENTIALS_FILE",
                self.home.join("no-credentials"),
            )
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_ENDPOINT_URL", self.url())
            .env("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEEXAMPLE00")
            .env(
                "AWS_SECRET_ACCESS_KEY",
                "secretsecretsecretsecretsecretsecret0000",
            )
            .env("AWS_REGION", "eu-west-1");
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

    /// Moves the node's last ping (and registration) `days` into the past.
    pub fn backdate(&self, node: &str, days: u64) {
        self.call(
            "PiprovTest.Backdate",
            &serde_json::json!({"InstanceId": node, "Seconds": days * 86_400}),
        );
    }
}
