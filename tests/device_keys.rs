//! Hardware-bound enrollment, with a real broker process on loopback and the
//! real card scripts: each simulated Pi has its own OTP device key, held by the
//! rpi-fw-crypto stand-in (an OpenSSL P-256 key per board, outside the card, so
//! copying a card never copies it). Device policies tofu and known, challenges
//! that cannot be replayed or outlived, signatures over exactly one request,
//! re-imaging the same Pi, and a broker restart.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::broker::{BrokerProcess, broker_card};
use common::card::Card;
use common::ssm_endpoint::SsmEndpoint;
use tempfile::TempDir;

const SERIAL_A: &str = "10000000d00d0001";
const SERIAL_B: &str = "10000000d00d0002";
const SERIAL_C: &str = "10000000d00d0003";

fn standin() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/standins/rpi-fw-crypto")
}

/// A simulated Pi's firmware: its OTP (key slot 1) and a log of the calls made to it.
struct Board {
    otp: PathBuf,
    calls: PathBuf,
}

impl Board {
    /// A board whose OTP holds a device key (`blank`: key slot 1 never written).
    fn new(dir: &Path, name: &str, blank: bool) -> Board {
        let otp = dir.join(format!("{name}.otp"));
        std::fs::create_dir_all(&otp).unwrap();
        if !blank {
            let made = Command::new("openssl")
                .args([
                    "genpkey",
                    "-algorithm",
                    "EC",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-out",
                ])
                .arg(otp.join("key1.pem"))
                .output()
                .unwrap();
            assert!(made.status.success());
        }
        Board {
            otp,
            calls: dir.join(format!("{name}.calls")),
        }
    }

    fn tool(&self, args: &[&str]) -> std::process::Output {
        Command::new("sh")
            .arg(standin())
            .args(args)
            .env("RPI_FW_CRYPTO_OTP", &self.otp)
            .env("RPI_FW_CRYPTO_LOG", &self.calls)
            .output()
            .unwrap()
    }

    fn public_key_hex(&self) -> String {
        let out = self.tool(&["pubkey", "--key-id", "1", "--outform", "hex"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The signature rpi-fw-crypto makes over the enrollment message of `body`.
    fn sign(&self, body: &str) -> String {
        let message = self.otp.with_extension("message");
        std::fs::write(&message, format!("piprov-enrollment-v1\n{body}")).unwrap();
        let out = self.tool(&[
            "sign",
            "--in",
            message.to_str().unwrap(),
            "--key-id",
            "1",
            "--alg",
            "ec",
            "--outform",
            "hex",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The commands the card ran against this board's firmware.
    fn calls(&self) -> String {
        std::fs::read_to_string(&self.calls).unwrap_or_default()
    }

    /// Puts `card` into this Pi: its serial in the device tree, its OTP behind rpi-fw-crypto.
    fn hold(&self, card: &mut Card, serial: &str, mac: &str) {
        card.plug_into(serial, mac);
        card.env
            .retain(|(k, _)| k != "RPI_FW_CRYPTO_OTP" && k != "RPI_FW_CRYPTO_LOG");
        card.env
            .push(("RPI_FW_CRYPTO_OTP".into(), self.otp.display().to_string()));
        card.env
            .push(("RPI_FW_CRYPTO_LOG".into(), self.calls.display().to_string()));
    }
}

fn activation_body(challenge: &str, serial: &str) -> String {
    format!(
        r#"{{"challenge":"{challenge}","serial":"{serial}","hostname":"pi-1","machine_id":"0123456789abcdef0123456789abcdef","image_sha256":"","previous_instance_id":""}}"#
    )
}

fn challenge(broker: &BrokerProcess, token: &str) -> String {
    let (status, reply) = broker.post("/v1/challenges", Some(token), "{}");
    assert_eq!(status, 200, "{reply}");
    let challenge = reply["challenge"].as_str().unwrap().to_string();
    assert_eq!(challenge.len(), 64);
    challenge
}

/// POSTs `body` signed by `board` (its key and signature in the headers).
fn signed(
    broker: &BrokerProcess,
    token: &str,
    key_hex: &str,
    signature_hex: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    broker.client().post_with(
        "/v1/activations",
        Some(token),
        &[
            format!("X-Piprov-Device-Key: {key_hex}"),
            format!("X-Piprov-Device-Signature: {signature_hex}"),
        ],
        body,
    )
}

/// A fresh challenge, the body around it, signed by `board`, sent.
fn enrol(
    broker: &BrokerProcess,
    token: &str,
    board: &Board,
    serial: &str,
) -> (u16, serde_json::Value) {
    let body = activation_body(&challenge(broker, token), serial);
    signed(
        broker,
        token,
        &board.public_key_hex(),
        &board.sign(&body),
        &body,
    )
}

fn creates(ssm: &SsmEndpoint) -> usize {
    ssm.requests_for("CreateActivation").len()
}

fn start(
    dir: &Path,
    settings: &[(&str, &str)],
    token_args: &[&str],
) -> (SsmEndpoint, BrokerProcess, String) {
    let ssm = SsmEndpoint::start(dir, 0);
    let mut settings = settings.to_vec();
    settings.push(("rate_limit_per_minute", "600"));
    let mut broker = BrokerProcess::init(dir, &ssm, &settings);
    let token = broker.add_token("site-a", token_args);
    broker.start();
    (ssm, broker, token)
}

/// `piprov ARGS… --config CONFIG [FILE]`.
fn broker_cli(
    broker: &BrokerProcess,
    args: &[&str],
    file: Option<&std::ffi::OsStr>,
) -> std::process::Output {
    let mut cmd = broker.piprov();
    cmd.args(args).arg("--config").arg(&broker.config);
    if let Some(file) = file {
        cmd.arg(file);
    }
    cmd.output().unwrap()
}

/// Writes `text` to `csv` and runs `piprov broker device import` on it.
fn import(broker: &BrokerProcess, csv: &Path, text: String) -> std::process::Output {
    std::fs::write(csv, text).unwrap();
    broker_cli(
        broker,
        &["broker", "device", "import"],
        Some(csv.as_os_str()),
    )
}

fn device_list(broker: &BrokerProcess) -> serde_json::Value {
    let out = broker_cli(broker, &["broker", "device", "list", "--json"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_standin_signs_in_the_format_openssl_verifies() {
    let dir = TempDir::new().unwrap();
    let board = Board::new(dir.path(), "pi", false);
    let message = dir.path().join("message.bin");
    std::fs::write(&message, b"piprov-enrollment-v1\n{}").unwrap();
    let public = dir.path().join("device-pub.der");
    let signature = dir.path().join("sig.bin");
    for args in [
        vec!["pubkey", "--key-id", "1", "--out", public.to_str().unwrap()],
        vec![
            "sign",
            "--in",
            message.to_str().unwrap(),
            "--key-id",
            "1",
            "--alg",
            "ec",
            "--out",
            signature.to_str().unwrap(),
        ],
    ] {
        let out = board.tool(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // rpi-fw-crypto's OpenSSL equivalent (docs/architecture.md) (OpenSSL 3.0 names the digest of -rawin).
    let verify = |message: &Path| {
        Command::new("openssl")
            .args(["pkeyutl", "-verify", "-pubin", "-keyform", "DER", "-inkey"])
            .arg(&public)
            .arg("-sigfile")
            .arg(&signature)
            .args(["-rawin", "-digest", "sha256", "-in"])
            .arg(message)
            .output()
            .unwrap()
    };
    let out = verify(&message);
    assert!(
        out.status.success()
            && String::from_utf8_lossy(&out.stdout).contains("Verified Successfully"),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let other = dir.path().join("other.bin");
    std::fs::write(&other, b"piprov-enrollment-v1\n{ }").unwrap();
    assert!(!verify(&other).status.success());

    // Failures as the real tool reports them: a blank slot, a locked key, no firmware.
    let blank = Board::new(dir.path(), "blank", true);
    let out = blank.tool(&["pubkey", "--key-id", "1"]);
    assert_eq!(out.status.code(), Some(250));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("Last crypto error: 6 (Key not set (all zeros))")
    );
    std::fs::write(board.otp.join("locked1"), "").unwrap();
    let out = board.tool(&["privkey", "--key-id", "1"]);
    assert_eq!(out.status.code(), Some(252));
    let status = board.tool(&["get-key-status", "1"]);
    assert_eq!(
        String::from_utf8_lossy(&status.stdout),
        "Key 1 status: 0x00000101 (DEVICE LOCKED)\n"
    );
    let out = Command::new("sh")
        .arg(standin())
        .args(["get-key-status", "1"])
        .env("RPI_FW_CRYPTO_OTP", dir.path().join("not-a-pi"))
        .env("RPI_FW_CRYPTO_LOG", dir.path().join("calls"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(255));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Failed to open /dev/vcio"));
}

#[test]
fn tofu_admits_the_first_key_and_refuses_another_for_the_same_serial() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let (ssm, broker, token) = start(d, &[], &["--device-policy", "tofu"]);
    let pi_a = Board::new(d, "pi-a", false);
    let pi_b = Board::new(d, "pi-b", false);

    let mut card = broker_card(d, &ssm, &broker, &token, "device_key = true", "card");
    pi_a.hold(&mut card, SERIAL_A, "dc:a6:32:00:00:01");
    card.first_boot();
    assert_eq!(card.status()["state"], "registered", "{}", card.status());
    let calls = pi_a.calls();
    assert!(calls.contains("sign --in"), "{calls}");
    assert!(
        !calls.contains("privkey") && !calls.contains("genkey"),
        "{calls}"
    );
    let devices = device_list(&broker);
    assert_eq!(devices[0]["serial"], SERIAL_A);
    assert_eq!(devices[0]["source"], "first-use");
    assert_eq!(devices[0]["public_key"], pi_a.public_key_hex());

    // Another card from the same stamped image, in hardware that claims A's
    // serial but holds another key (a script sending a public serial).
    let before = creates(&ssm);
    let mut impostor = broker_card(d, &ssm, &broker, &token, "device_key = true", "impostor");
    pi_b.hold(&mut impostor, SERIAL_A, "dc:a6:32:00:00:02");
    for out in [impostor.install(), impostor.guard(&[])] {
        assert!(out.status.success());
    }
    impostor.register(&[]);
    let status = impostor.status();
    assert_eq!(status["state"], "pending", "{status}");
    let message = status["message"].as_str().unwrap();
    assert!(
        message.contains("the broker refused (403)")
            && message.contains("claimed by other hardware"),
        "{message}"
    );
    let (code, reply) = enrol(&broker, &token, &pi_b, SERIAL_A);
    assert_eq!(code, 403, "{reply}");
    assert_eq!(creates(&ssm), before, "refused before any SSM call");
    // A clone of card A booted in Pi B, under B's own serial: a new device, admitted.
    let mut clone = card.clone_to(d, "clone");
    pi_b.hold(&mut clone, SERIAL_B, "dc:a6:32:00:00:02");
    clone.guard(&[]);
    clone.register(&[]);
    // The token left the original card once used: the clone has nothing to enrol with.
    assert_eq!(
        clone.status()["state"],
        "needs-activation",
        "{}",
        clone.status()
    );
    let (code, reply) = enrol(&broker, &token, &pi_b, SERIAL_B);
    assert_eq!(code, 200, "{reply}");
    // The refusal is audited as what it is.
    let claimed = broker.count(
        "SELECT count(*) FROM audit WHERE action = 'refused' AND serial = $1
         AND detail LIKE 'serial claimed by other hardware%'",
        &[SERIAL_A],
    );
    assert!(claimed >= 2, "{claimed} audited claims");
    let log = broker.log_text();
    assert!(!log.contains(&token));
}

#[test]
fn known_admits_only_imported_pis_with_their_own_keys() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let (ssm, broker, token) = start(d, &[], &["--device-policy", "known"]);
    let pi_a = Board::new(d, "pi-a", false);
    let pi_b = Board::new(d, "pi-b", false);
    let csv = d.join("pis.csv");
    let out = import(
        &broker,
        &csv,
        format!(
            "serial,public_key\n# the bench\n{},{}\n",
            SERIAL_A.to_uppercase(),
            pi_a.public_key_hex()
        ),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 added"));

    let (code, reply) = enrol(&broker, &token, &pi_b, SERIAL_B);
    assert_eq!(code, 403, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("not a known device"),
        "{reply}"
    );
    let (code, reply) = enrol(&broker, &token, &pi_b, SERIAL_A);
    assert_eq!(code, 403, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("claimed by other hardware"),
        "{reply}"
    );
    let (code, reply) = broker.post(
        "/v1/activations",
        Some(&token),
        &activation_body("", SERIAL_A),
    );
    assert_eq!(code, 401, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("device policy known"),
        "{reply}"
    );
    assert_eq!(creates(&ssm), 0, "every refusal came before any SSM call");

    // The imported Pi, through the card scripts.
    let mut card = broker_card(d, &ssm, &broker, &token, "device_key = true", "card");
    pi_a.hold(&mut card, SERIAL_A, "dc:a6:32:00:00:01");
    card.first_boot();
    assert_eq!(card.status()["state"], "registered", "{}", card.status());
    assert_eq!(creates(&ssm), 1);

    // Revoked: refused, until imported again.
    let revoke = broker_cli(
        &broker,
        &["broker", "device", "revoke"],
        Some(SERIAL_A.as_ref()),
    );
    assert!(
        revoke.status.success(),
        "{}",
        String::from_utf8_lossy(&revoke.stderr)
    );
    let (code, reply) = enrol(&broker, &token, &pi_a, SERIAL_A);
    assert_eq!(code, 403, "{reply}");
    assert!(
        reply["error"].as_str().unwrap().contains("revoked"),
        "{reply}"
    );

    // An import that names a known serial with another key changes nothing.
    let out = import(
        &broker,
        &csv,
        format!(
            "{SERIAL_A},{}\n{SERIAL_B},{}\n",
            pi_b.public_key_hex(),
            pi_b.public_key_hex()
        ),
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("recorded with another key"));
    assert_eq!(device_list(&broker).as_array().unwrap().len(), 1);
    // A typo in the key: the line is named.
    let out = import(
        &broker,
        &csv,
        format!("{SERIAL_B},{}zz\n", pi_b.public_key_hex()),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("line 1"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn replays_stale_challenges_and_bad_signatures_are_refused_without_ssm() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let (ssm, mut broker, token) = start(
        d,
        &[("challenge_lifetime", "\"3s\"")],
        &["--device-policy", "tofu"],
    );
    let other_token = broker.add_token("site-b", &["--device-policy", "tofu"]);
    let pi = Board::new(d, "pi", false);
    let key = pi.public_key_hex();

    let body = activation_body(&challenge(&broker, &token), SERIAL_A);
    let signature = pi.sign(&body);
    let (code, reply) = signed(&broker, &token, &key, &signature, &body);
    assert_eq!(code, 200, "{reply}");
    assert_eq!(creates(&ssm), 1);

    let refused = |code: u16, reply: &serde_json::Value, want: u16, says: &str| {
        assert_eq!(code, want, "{reply}");
        let error = reply["error"].as_str().unwrap_or_default();
        assert!(error.contains(says), "{error:?} should say {says:?}");
    };
    // The same request again: its challenge is spent.
    let (code, reply) = signed(&broker, &token, &key, &signature, &body);
    refused(code, &reply, 401, "used already");
    // A challenge answered too late.
    let late = activation_body(&challenge(&broker, &token), SERIAL_A);
    std::thread::sleep(std::time::Duration::from_millis(4100));
    let (code, reply) = signed(&broker, &token, &key, &pi.sign(&late), &late);
    refused(code, &reply, 401, "expired");
    // A signature made over another body (another serial).
    let fresh = challenge(&broker, &token);
    let asked = activation_body(&fresh, SERIAL_B);
    let (code, reply) = signed(
        &broker,
        &token,
        &key,
        &pi.sign(&activation_body(&fresh, SERIAL_A)),
        &asked,
    );
    refused(code, &reply, 401, "does not verify");
    // A truncated DER signature.
    let body = activation_body(&challenge(&broker, &token), SERIAL_A);
    let signature = pi.sign(&body);
    let (code, reply) = signed(
        &broker,
        &token,
        &key,
        &signature[..signature.len() - 10],
        &body,
    );
    refused(code, &reply, 401, "does not verify");
    // A challenge given to another token.
    let body = activation_body(&challenge(&broker, &other_token), SERIAL_A);
    let (code, reply) = signed(&broker, &token, &key, &pi.sign(&body), &body);
    refused(code, &reply, 401, "not one this broker gave this token");
    // A key that is not a key, a signature without a key, no challenge at all.
    let (code, reply) = signed(&broker, &token, "3059zz", &signature, &body);
    refused(code, &reply, 400, "not the hex of a DER P-256 public key");
    let (code, reply) = broker.client().post_with(
        "/v1/activations",
        Some(&token),
        &[format!("X-Piprov-Device-Signature: {signature}")],
        &body,
    );
    refused(code, &reply, 400, "go together");
    let bare = activation_body("", SERIAL_A);
    let (code, reply) = signed(&broker, &token, &key, &pi.sign(&bare), &bare);
    refused(code, &reply, 400, "names its challenge");
    assert_eq!(creates(&ssm), 1, "no refused request reached SSM");

    // A restart keeps the recorded key and the spent challenges.
    let spent = activation_body(&challenge(&broker, &token), SERIAL_A);
    let spent_signature = pi.sign(&spent);
    let (code, reply) = signed(&broker, &token, &key, &spent_signature, &spent);
    assert_eq!(code, 200, "{reply}");
    broker.stop();
    broker.start();
    let (code, reply) = signed(&broker, &token, &key, &spent_signature, &spent);
    refused(code, &reply, 401, "used already");
    let other = Board::new(d, "other", false);
    let (code, reply) = enrol(&broker, &token, &other, SERIAL_A);
    refused(code, &reply, 403, "claimed by other hardware");
    let log = broker.log_text();
    assert!(!log.contains(&token) && !log.contains(&signature), "{log}");
}

#[test]
fn reimaging_the_same_pi_enrols_again_without_spending_the_quota_twice() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let (ssm, broker, token) = start(
        d,
        &[("deregister_previous", "true")],
        &["--device-policy", "tofu", "--max-uses", "1"],
    );
    let pi_a = Board::new(d, "pi-a", false);
    let mut card = broker_card(d, &ssm, &broker, &token, "device_key = true", "card");
    pi_a.hold(&mut card, SERIAL_A, "dc:a6:32:00:00:01");
    card.first_boot();
    assert_eq!(card.status()["state"], "registered", "{}", card.status());
    let first = card.instance_id();

    // The same Pi, its card flashed again from the same stamped image.
    let mut again = broker_card(d, &ssm, &broker, &token, "device_key = true", "reimaged");
    pi_a.hold(&mut again, SERIAL_A, "dc:a6:32:00:00:01");
    again.first_boot();
    assert_eq!(again.status()["state"], "registered", "{}", again.status());
    let second = again.instance_id();
    assert_ne!(first, second);
    let nodes = ssm.nodes();
    assert!(nodes.iter().any(|(id, _)| *id == second));
    assert!(
        !nodes.iter().any(|(id, _)| *id == first),
        "the Pi's previous node is deregistered"
    );
    let tokens = broker_cli(&broker, &["broker", "token", "list", "--json"], None);
    let tokens: serde_json::Value = serde_json::from_slice(&tokens.stdout).unwrap();
    assert_eq!(tokens[0]["uses"], 1, "{tokens}");
    assert_eq!(tokens[0]["device_policy"], "tofu");

    // Another Pi is another device: it needs quota, and there is none left.
    let pi_c = Board::new(d, "pi-c", false);
    let (code, reply) = enrol(&broker, &token, &pi_c, SERIAL_C);
    assert_eq!(code, 403, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("no enrollments left"),
        "{reply}"
    );
}

#[test]
fn a_pi_without_a_usable_key_says_so_and_a_key_is_written_only_when_asked() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let (ssm, broker, token) = start(d, &[], &[]);
    // No firmware crypto at all (not a Pi 4/5, or old firmware): policy off still admits it.
    let mut card = broker_card(d, &ssm, &broker, &token, "device_key = true", "card");
    let nowhere = Board {
        otp: d.join("no-otp"),
        calls: d.join("no-otp.calls"),
    };
    nowhere.hold(&mut card, SERIAL_A, "dc:a6:32:00:00:01");
    card.first_boot();
    let status = card.status();
    assert_eq!(status["state"], "registered", "{status}");
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("no usable device key"),
        "{status}"
    );

    // A blank key slot: left blank unless the recipe asks for a key.
    let blank = Board::new(d, "blank", true);
    let mut card = broker_card(d, &ssm, &broker, &token, "device_key = true", "blank-card");
    blank.hold(&mut card, SERIAL_B, "dc:a6:32:00:00:02");
    card.first_boot();
    assert!(
        card.status()["message"]
            .as_str()
            .unwrap()
            .contains("Key not set"),
        "{}",
        card.status()
    );
    assert!(!blank.calls().contains("genkey"));
    assert!(!blank.otp.join("key1.pem").exists());

    let mut card = broker_card(
        d,
        &ssm,
        &broker,
        &token,
        "device_key = true\ndevice_key_generate = true",
        "generating-card",
    );
    blank.hold(&mut card, SERIAL_C, "dc:a6:32:00:00:03");
    card.first_boot();
    let status = card.status();
    assert_eq!(status["state"], "registered", "{status}");
    assert!(
        !status["message"].as_str().unwrap().contains("no usable"),
        "{status}"
    );
    let calls = blank.calls();
    assert!(
        calls.contains("genkey --key-id 1 --alg ec") && calls.contains("sign --in"),
        "{calls}"
    );
    assert!(!calls.contains("privkey"), "{calls}");
    assert!(blank.otp.join("key1.pem").exists());
}
