//! What the command line teaches: completions and man pages made from the clap
//! definitions, and help text that reads as written.

mod common;

use std::process::Command;

use common::piprov;
use tempfile::TempDir;

fn stdout(args: &[&str]) -> String {
    let out = piprov().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn completions_are_scripts_each_shell_accepts() {
    let bash = stdout(&["completions", "bash"]);
    assert!(
        bash.contains("complete -F") && bash.contains("devices"),
        "{bash}"
    );
    let dir = TempDir::new().unwrap();
    let script = dir.path().join("piprov.bash");
    std::fs::write(&script, &bash).unwrap();
    let checked = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    for shell in ["zsh", "fish"] {
        let script = stdout(&["completions", shell]);
        assert!(
            script.contains("flash") && script.contains("allow-non-removable"),
            "{shell}"
        );
    }
    piprov().args(["completions", "tcsh"]).assert().code(2);
}

#[test]
fn every_command_has_a_man_page() {
    let dir = TempDir::new().unwrap();
    piprov().arg("man").arg(dir.path()).assert().success();
    for page in [
        "piprov",
        "piprov-flash",
        "piprov-devices",
        "piprov-stamp",
        "piprov-inspect",
        "piprov-fleet-prune",
        "piprov-broker-token-add",
        "piprov-broker-device-import",
        "piprov-completions",
    ] {
        let text = std::fs::read_to_string(dir.path().join(format!("{page}.1")))
            .unwrap_or_else(|e| panic!("{page}.1: {e}"));
        assert!(text.contains(".TH") && text.contains(".SH NAME"), "{page}");
    }
    assert!(
        !dir.path().join("piprov-man.1").exists(),
        "hidden commands get none"
    );
    // It renders: man(1) formats it without a warning.
    if common::available(
        Command::new("man").arg("--version").output().is_ok(),
        "man (apt-get install man-db)",
    ) {
        let out = Command::new("man")
            .arg("-l")
            .arg(dir.path().join("piprov-flash.1"))
            .env("MANWIDTH", "100")
            .env("MAN_KEEP_FORMATTING", "0")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("--allow-non-removable"),
            "{text}"
        );
        assert!(
            out.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn help_reads_as_written() {
    let flash = stdout(&["flash", "--help"]);
    assert!(
        flash.contains(
            "Hostname pattern for every card ({number} = card number from 1, {serial}, {mac})"
        ),
        "{flash}"
    );
    assert!(
        !flash.lines().any(|l| l.trim_end().ends_with('(')),
        "{flash}"
    );
    // Every option and argument has a line of help, the AWS ones included.
    for command in [
        &["activation", "delete"][..],
        &["broker", "token", "revoke"],
        &["broker", "device", "revoke"],
        &["flash"],
        &["activation", "create"],
        &["fleet", "prune"],
        &["fleet", "doctor"],
        &["fleet", "ssh-config"],
        &["broker", "init"],
        &["broker", "token", "add"],
        &["broker", "device", "import"],
        &["stamp"],
        &["inspect"],
        &["devices"],
    ] {
        let mut args = command.to_vec();
        args.push("--help");
        let help = stdout(&args);
        let lines: Vec<&str> = help.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let option = line.trim();
            let spec =
                (option.starts_with('-') && !option.starts_with("- ")) || option.starts_with('<');
            if !line.starts_with("  ") || !spec {
                continue;
            }
            // Short form: `--opt <X>   help`; long form: the help on the next lines.
            let inline = option.split_once("  ").map_or("", |(_, help)| help.trim());
            let below = lines.get(i + 1).map_or("", |l| l.trim());
            assert!(
                !inline.is_empty() || (!below.is_empty() && !below.starts_with('-')),
                "{command:?}: {option} has no help:\n{help}"
            );
        }
    }
}
