//! The broker as a card meets it: an HTTPS stand-in on loopback
//! (tests/support/broker_stub.py) with throwaway CAs made by openssl.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::stub::Stub;

/// Who certifies the stand-in's server certificate.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Certified {
    /// The CA the card pins (`ca`): the real broker.
    ByPinnedCa,
    /// Another CA (`rival_ca`), one a system store might trust: an impostor.
    ByRivalCa,
}

pub struct CardBroker {
    pub stub: Stub,
    /// Every request it received, one JSON line each.
    pub log: PathBuf,
    /// The CA the card pins.
    pub ca: PathBuf,
    /// A CA that is not the pinned one.
    pub rival_ca: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const EC: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

fn make_ca(dir: &Path, name: &str) {
    let key = format!("{name}.key");
    let pem = format!("{name}.pem");
    let subject = format!("/CN=piprov test {name}");
    openssl(
        dir,
        &[
            &["req", "-x509"][..],
            &EC,
            &[
                "-keyout", &key, "-out", &pem, "-days", "1", "-subj", &subject,
            ],
        ]
        .concat(),
    );
}

impl CardBroker {
    /// Answers /v1/activations with activation `0a0a0a0a-…-0000000000b1`
    /// (code BROKERCODE-777) after `fail_first` 503s.
    pub fn start(dir: &Path, token: &str, fail_first: u32, certified: Certified) -> Self {
        make_ca(dir, "ca");
        make_ca(dir, "rival-ca");
        openssl(
            dir,
            &[
                &["req"][..],
                &EC,
                &[
                    "-keyout",
                    "srv.key",
                    "-out",
                    "srv.csr",
                    "-subj",
                    "/CN=127.0.0.1",
                ],
            ]
            .concat(),
        );
        std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        let issuer = match certified {
            Certified::ByPinnedCa => "ca",
            Certified::ByRivalCa => "rival-ca",
        };
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "srv.csr",
                "-CA",
                &format!("{issuer}.pem"),
                "-CAkey",
                &format!("{issuer}.key"),
                "-CAcreateserial",
                "-out",
                "srv.pem",
                "-days",
                "1",
                "-extfile",
                "san.ext",
            ],
        );
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/broker_stub.py");
        let port_file = dir.join("port");
        let log = dir.join("broker.log");
        let mut command = Command::new("python3");
        command
            .arg(script)
            .args([
                "srv.pem",
                "srv.key",
                token,
                &fail_first.to_string(),
                "0a0a0a0a-0000-4000-8000-0000000000b1",
                "BROKERCODE-777",
                "eu-west-1",
            ])
            .arg(&log)
            .arg(&port_file)
            .current_dir(dir);
        Self {
            stub: Stub::start(command, &port_file, "broker stand-in"),
            log,
            ca: dir.join("ca.pem"),
            rival_ca: dir.join("rival-ca.pem"),
        }
    }
}
