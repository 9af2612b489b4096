//! The card under attack and after faults: a failed install, edited settings
//! and secret files, a forged serial, names too long for a hostname. Each runs
//! the device scripts against a card unpacked from a real stamped image, and
//! checks that the agent never starts as someone else and the card says why.

mod common;

use std::net::TcpListener;
use std::process::Output;

use common::card::{Card, GOLDEN_ID, PI_A, SHARED_CODE, Ssm, stamped_card};
use common::card_broker::{CardBroker, Certified};
use tempfile::TempDir;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn status_message(card: &Card) -> String {
    card.status()["message"].as_str().unwrap().to_string()
}

/// The card's status message says `text`.
fn assert_status_says(card: &Card, text: &str) {
    assert!(status_message(card).contains(text), "{}", card.status());
}

/// A failed install must not let the golden speak: whatever is missing from
/// the boot partition, the agent is held, the boot partition says which step
/// failed, the secret is gone from the FAT (and from its clusters: the card's
/// files hold no trace of the code), and the hook is removed so the card boots.
#[test]
fn a_failed_install_holds_the_agent_and_says_which_step_failed() {
    for (missing, step) in [
        ("piprov-guard.sh", "installing the scripts and units"),
        ("piprov-lib.sh", "loading piprov-lib.sh"),
        ("piprov-agent.conf", "installing the scripts and units"),
        ("piprov.conf", "installing the settings"),
    ] {
        let dir = TempDir::new().unwrap();
        let ssm = Ssm::new(dir.path());
        let card = stamped_card(&dir, &ssm, "");
        std::fs::remove_file(card.path(&format!("/boot/firmware/{missing}"))).unwrap();
        let out = card.install();
        assert!(
            out.status.success(),
            "systemd.run powers the Pi off on failure: install must exit 0"
        );
        let held = card.agent_held_by_condition();
        assert!(
            held.is_some(),
            "{missing} missing: the agent would start as the golden {GOLDEN_ID}"
        );
        let status = card.status();
        assert_eq!(status["state"], "failed", "{missing} missing: {status}");
        assert!(
            status_message(&card).contains(step),
            "{missing} missing: the status must name the step '{step}': {status}"
        );
        assert!(
            !card.exists("/boot/firmware/piprov-secret.conf"),
            "{missing}"
        );
        assert_eq!(
            card.files_containing(SHARED_CODE),
            Vec::<String>::new(),
            "{missing} missing: the code stays nowhere on the card"
        );
        assert!(
            !card
                .read("/boot/firmware/cmdline.txt")
                .contains("systemd.run"),
            "{missing} missing: the hook is removed, the card boots on"
        );
    }
}

/// A root filesystem where the hold cannot be written (here its directory is
/// a file; on a card, a root gone read-only or full): the agent is masked for
/// this boot in /run, the hook stays without its reboot so every boot holds it
/// again, and the boot partition says so.
#[test]
fn a_hold_that_cannot_be_written_masks_the_agent_for_the_boot() {
    let dir = TempDir::new().unwrap();
    let ssm = Ssm::new(dir.path());
    let card = stamped_card(&dir, &ssm, "");
    let drop_ins = card.path("/etc/systemd/system/amazon-ssm-agent.service.d");
    let _ = std::fs::remove_dir_all(&drop_ins);
    std::fs::create_dir_all(drop_ins.parent().unwrap()).unwrap();
    std::fs::write(&drop_ins, "in the way\n").unwrap();
    let out = card.install();
    assert!(out.status.success());
    assert_eq!(card.status()["state"], "failed");
    assert!(status_message(&card).contains("holding amazon-ssm-agent"));
    let mask = card.path("/run/systemd/system/amazon-ssm-agent.service");
    assert_eq!(
        std::fs::read_link(&mask).ok().as_deref(),
        Some(std::path::Path::new("/dev/null")),
        "the agent must be masked for this boot: {}",
        stderr(&out)
    );
    let cmdline = card.read("/boot/firmware/cmdline.txt");
    assert!(
        cmdline.contains("piprov-install.sh"),
        "the hook stays: {cmdline}"
    );
    assert!(
        !cmdline.contains("systemd.run_success_action=reboot"),
        "no reboot loop: {cmdline}"
    );
    assert!(!card.exists("/boot/firmware/piprov-secret.conf"));
    assert!(
        card.standin_log()
            .contains("systemctl stop amazon-ssm-agent.service")
    );
}

/// The hold lets the agent start on a card whose install completed.
#[test]
fn a_complete_install_releases_the_hold() {
    let dir = TempDir::new().unwrap();
    let ssm = Ssm::new(dir.path());
    let card = stamped_card(&dir, &ssm, "");
    card.first_boot();
    assert_eq!(card.agent_held_by_condition(), None);
    assert!(card.gate().status.success(), "{}", stderr(&card.gate()));
}

/// The settings on the FAT are read by a strict reader: a line it does not
/// expect (a secret's key among the settings, a key given twice, an unknown
/// key, a control character) refuses the whole file before anything is
/// installed, and the agent stays held.
#[test]
fn settings_with_an_unexpected_line_are_refused_at_install() {
    for (extra, why) in [
        (
            "ACTIVATION_CODE=STOLEN\n",
            "ACTIVATION_CODE is not a setting",
        ),
        (
            "SUDO_RULE=ALL ALL=(ALL) NOPASSWD: ALL\nSUDO_RULE=x\n",
            "SUDO_RULE is given twice",
        ),
        ("EVIL=1\n", "EVIL is not a setting"),
        ("SSM_USER=ssm-user\r\n", "control character"),
        // dash drops NUL bytes where the shell reads: counted, not read.
        ("# a note\0\n", "control character"),
        // Two listed keys with a space between: one key to a loose match,
        // a command to eval.
        ("SOURCE REGION=x\n", "SOURCE REGION is not a setting"),
        ("not a setting\n", "is not KEY=value"),
    ] {
        let dir = TempDir::new().unwrap();
        let ssm = Ssm::new(dir.path());
        let card = stamped_card(&dir, &ssm, "");
        let conf = card.path("/boot/firmware/piprov.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str(extra);
        std::fs::write(&conf, text).unwrap();
        let install = card.install();
        assert!(install.status.success());
        let said = stderr(&install);
        assert!(said.contains(why), "{extra:?}: {said}");
        assert!(
            !said.contains("not found"),
            "{extra:?} ran something: {said}"
        );
        let status = card.status();
        assert_eq!(status["state"], "failed", "{extra:?}: {status}");
        assert!(
            status_message(&card).contains("checking the card's settings"),
            "{extra:?}: {status}"
        );
        assert!(card.agent_held_by_condition().is_some(), "{extra:?}");
        assert!(!card.exists("/etc/sudoers.d/piprov-users"), "{extra:?}");
        let log = card.standin_log();
        assert!(!log.contains("-register -y"), "{extra:?}: {log}");
    }
}

/// The same reader on every boot: an installed card whose settings are edited
/// keeps the agent stopped and says why.
#[test]
fn edited_settings_on_an_installed_card_keep_the_agent_stopped() {
    let dir = TempDir::new().unwrap();
    let ssm = Ssm::new(dir.path());
    let card = stamped_card(&dir, &ssm, "");
    card.first_boot();
    assert!(card.gate().status.success());
    let conf = card.path("/etc/piprov/piprov.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("STRIP_NOPASSWD=0\n");
    std::fs::write(&conf, text).unwrap();
    assert_eq!(card.gate().status.code(), Some(1));
    let status = card.status();
    assert_eq!(status["state"], "blocked");
    assert_status_says(&card, "STRIP_NOPASSWD is given twice");
}

/// A card waiting for its activation, a listener standing in for an
/// attacker's plain-HTTP server: nothing may reach it.
fn assert_no_request_reached(listener: &TcpListener) {
    listener.set_nonblocking(true).unwrap();
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Ok((_, from)) => panic!("the card connected to the attacker's server (from {from})"),
        Err(e) => panic!("{e}"),
    }
}

/// The secret file may hold the secret's keys only: one dropped on the FAT
/// that also names a broker over plain HTTP changes nothing, and no token is
/// sent anywhere.
#[test]
fn a_secret_file_cannot_change_where_the_token_goes() {
    let dir = TempDir::new().unwrap();
    let ssm = Ssm::new(dir.path());
    let card = stamped_card(&dir, &ssm, "");
    assert!(card.install().status.success());
    assert!(card.guard(&[]).status.success());
    let attacker = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = attacker.local_addr().unwrap().port();
    // The stamp's secret is replaced by one an attacker wrote.
    std::fs::remove_file(card.path("/var/lib/piprov/secret.conf")).unwrap();
    std::fs::write(
        card.path("/boot/firmware/piprov-secret.conf"),
        format!("BROKER_TOKEN=T0KEN\nSOURCE=broker\nBROKER_URL=http://127.0.0.1:{port}\n"),
    )
    .unwrap();
    let out = card.register(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_no_request_reached(&attacker);
    let status = card.status();
    assert_eq!(status["state"], "failed", "{status}");
    assert_status_says(&card, "SOURCE is not a setting this file may hold");
    assert!(
        card.gate().status.code() == Some(1),
        "the agent stays stopped"
    );
}

/// A broker URL that is not https is refused on the card too, wherever it
/// comes from: the token is never sent in clear.
#[test]
fn the_card_sends_its_token_over_https_only() {
    let dir = TempDir::new().unwrap();
    let ssm = Ssm::new(dir.path());
    let card = stamped_card(&dir, &ssm, "");
    assert!(card.install().status.success());
    assert!(card.guard(&[]).status.success());
    let attacker = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = attacker.local_addr().unwrap().port();
    let conf = card.path("/etc/piprov/piprov.conf");
    let text = std::fs::read_to_string(&conf)
        .unwrap()
        .replace("SOURCE=shared", "SOURCE=broker")
        + &format!("BROKER_URL=http://127.0.0.1:{port}\n");
    std::fs::write(&conf, text).unwrap();
    std::fs::write(
        card.path("/var/lib/piprov/secret.conf"),
        "BROKER_TOKEN=T0KEN\n",
    )
    .unwrap();
    let out = card.register(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_no_request_reached(&attacker);
    assert_eq!(card.status()["state"], "failed");
    assert_status_says(&card, "is not https://");
}

/// A device-tree serial is data from the hardware, and ends up in a sed
/// program (the hostname) and in file names: one that is not 8 to 16 hex
/// digits is refused, nothing runs, and the agent stays stopped.
#[test]
fn a_forged_serial_runs_nothing() {
    let dir = TempDir::new().unwrap();
    let ssm = Ssm::new(dir.path());
    let card = stamped_card(&dir, &ssm, "");
    assert!(card.install().status.success());
    let pwned = dir.path().join("pwned");
    card.plug_into(&format!("x/;e touch {};s/y", pwned.display()), PI_A.1);
    let out = card.guard(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!pwned.exists(), "the serial ran a command as root");
    assert!(
        stderr(&out).contains("not 8 to 16 hex digits"),
        "{}",
        stderr(&out)
    );
    assert_eq!(card.gate().status.code(), Some(1));
    assert_status_says(&card, "cannot tell which hardware");
}

/// A hostname pattern whose expansion is longer than a hostname may be (or
/// ends in '-') is logged on the card and the current name kept: the guard
/// finishes and the card registers.
#[test]
fn a_hostname_too_long_is_logged_and_the_boot_goes_on() {
    let dir = TempDir::new().unwrap();
    let ssm = Ssm::new(dir.path());
    let card = stamped_card(&dir, &ssm, "");
    let before = card.read("/etc/hostname");
    let conf = card.path("/boot/firmware/piprov.conf");
    let long = format!("{}-{{serial}}", "a".repeat(50));
    let text = std::fs::read_to_string(&conf).unwrap();
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with("HOSTNAME_PATTERN=") {
                format!("HOSTNAME_PATTERN={long}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&conf, text).unwrap();
    let out = card.install();
    assert!(out.status.success());
    let out = card.guard(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("more than a hostname may have (63)"),
        "{}",
        stderr(&out)
    );
    assert_eq!(card.read("/etc/hostname"), before);
    assert!(card.register(&[]).status.success());
    assert_eq!(card.status()["state"], "registered");
}

/// The activation code reaches the agent on its command line (the agent
/// reads it nowhere else), and nowhere more: no process the scripts start
/// inherits it in its environment.
#[test]
fn no_secret_is_exported_to_child_processes() {
    let dir = TempDir::new().unwrap();
    let ssm = Ssm::new(dir.path());
    let card = stamped_card(&dir, &ssm, "");
    let env_log = dir.path().join("agent.env");
    let env_log_text = env_log.display().to_string();
    assert!(card.install().status.success());
    assert!(
        card.guard(&[("STANDIN_ENV_LOG", &env_log_text)])
            .status
            .success()
    );
    let out = card.register(&[("STANDIN_ENV_LOG", &env_log_text)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(card.status()["state"], "registered");
    let inherited = std::fs::read_to_string(&env_log).unwrap();
    assert!(
        inherited.contains("PIPROV_ROOT="),
        "the record is the agent's environment"
    );
    assert!(
        !inherited.contains(SHARED_CODE) && !inherited.contains("PIPROV_ACTIVATION"),
        "the agent inherited a secret: {inherited}"
    );
}

/// Without curl the card falls back to wget, which adds `--ca-certificate` to
/// the system's store. A server certified by a CA in that store (an impostor
/// with a certificate for the broker's name) must not receive the token: the
/// card trusts the pinned CA alone. Run in a private mount namespace with the
/// rival CA as the system store and curl out of reach, so this host is untouched.
#[test]
fn wget_trusts_the_pinned_ca_alone() {
    // `unshare -m true`: a private mount namespace can be made (root).
    let usable = runs("command -v wget") && runs("command -v curl") && runs("unshare -m true");
    if !common::available(
        usable,
        "root, unshare, wget and curl (a private mount namespace)",
    ) {
        return;
    }
    let dir = TempDir::new().unwrap();
    let ssm = Ssm::new(dir.path());
    let token = "TOKEN-rival-0123456789";
    let impostor = CardBroker::start(dir.path(), token, 0, Certified::ByRivalCa);
    std::fs::write(dir.path().join("site.token"), format!("{token}\n")).unwrap();
    let recipe = dir.path().join("broker.toml");
    std::fs::write(
        &recipe,
        format!(
            "region = \"eu-west-1\"\n[activation]\nsource = \"broker\"\n\
             url = \"https://127.0.0.1:{}\"\nca_file = \"{}\"\ntoken_file = \"site.token\"\n",
            impostor.stub.port,
            impostor.ca.display()
        ),
    )
    .unwrap();
    let image = common::fixture("registered", &dir);
    common::card::stamp(&image, &recipe, &[]);
    let card = Card::from_image(&image, dir.path(), "card", &ssm);
    card.plug_into(PI_A.0, PI_A.1);
    assert!(card.install().status.success());
    assert!(card.guard(&[]).status.success());
    let no_exec = dir.path().join("not-a-program");
    std::fs::write(&no_exec, "").unwrap();
    let out = card.run_shell(&format!(
        "unshare -m sh -c 'mount --bind {rival} /etc/ssl/certs/ca-certificates.crt && \
         mount --bind {no_exec} \"$(command -v curl)\" && \
         ! command -v curl >/dev/null && exec sh {register}'",
        rival = impostor.rival_ca.display(),
        no_exec = no_exec.display(),
        register = card.path("/usr/local/lib/piprov/register.sh").display(),
    ));
    let err = stderr(&out);
    assert!(
        err.contains("retrying in"),
        "the card tried, with wget: {err}"
    );
    assert_eq!(
        common::stub::logged_requests(&impostor.log),
        Vec::<serde_json::Value>::new(),
        "the impostor received the token: {err}"
    );
    assert!(!err.contains(token), "{err}");
}

/// Whether a shell command succeeds here.
fn runs(command: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("{command} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}
