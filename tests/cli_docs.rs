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
        dir.path().join("piprov-man.1").exists(),
        "piprov man is documented like any command"
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
        // The options, not the examples below them.
        let options = help.split("\nExamples:\n").next().unwrap();
        let lines: Vec<&str> = options.lines().collect();
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

/// A command as the shell would split it, up to its first pipe, redirection,
/// `&&` or comment (what follows is another program's).
fn piprov_words(command: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quote = None;
    let mut in_word = false;
    for c in command.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, '|' | '>' | '#' | ';') => break,
            (None, '&') => break,
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// Every example in `--help` and the man pages can be pasted: each piprov
/// command parses with the real definitions, `--help` at 80 columns shows
/// each line whole (a long command goes on with ` \`, never wrapped in its
/// middle), and the man page has them under EXAMPLES, unfilled.
#[test]
fn every_example_parses_and_is_shown_whole() {
    let man = TempDir::new().unwrap();
    piprov().arg("man").arg(man.path()).assert().success();
    let mut parsed = 0;
    for (path, lines) in piprov::cli::docs::all_examples() {
        let mut args = path.clone();
        args.push("--help".into());
        let out = piprov().env("COLUMNS", "80").args(&args).output().unwrap();
        let help = String::from_utf8(out.stdout).unwrap();
        for line in &lines {
            assert!(
                help.lines().any(|l| l.trim_end() == format!("  {line}")),
                "piprov {} --help wraps or lacks {line:?}:\n{help}",
                path.join(" ")
            );
        }
        let page_name = std::iter::once("piprov".to_string())
            .chain(path.iter().cloned())
            .collect::<Vec<_>>()
            .join("-");
        let page = std::fs::read_to_string(man.path().join(format!("{page_name}.1"))).unwrap();
        assert!(page.contains(".SH EXAMPLES\n.EX\n"), "{page_name}.1");
        assert!(!page.contains(".SH EXTRA"), "{page_name}.1");
        let mut command = String::new();
        for line in &lines {
            match line.strip_suffix(" \\") {
                Some(part) => {
                    command.push_str(part);
                    command.push(' ');
                    continue;
                }
                None => command.push_str(line),
            }
            let words = piprov_words(&std::mem::take(&mut command));
            if words.first().map(String::as_str) != Some("piprov") {
                continue;
            }
            if let Err(e) = piprov::cli::docs::parses(&words) {
                panic!("the example {words:?} does not parse: {e}");
            }
            parsed += 1;
        }
        assert!(command.is_empty(), "an example ends in ` \\`: {lines:?}");
    }
    assert!(parsed >= 30, "only {parsed} examples parsed");
}

/// `-v` says more about AWS calls: offered where a command makes them, and
/// nowhere else.
#[test]
fn verbose_is_offered_where_aws_is_called() {
    for command in [&["devices"][..], &["inspect"], &["completions"], &["man"]] {
        let mut args = command.to_vec();
        args.push("--help");
        let help = stdout(&args);
        assert!(!help.contains("--verbose"), "{command:?}:\n{help}");
    }
    for command in [
        &["flash"][..],
        &["stamp"],
        &["activation", "list"],
        &["fleet", "doctor"],
        &["setup", "role"],
    ] {
        let mut args = command.to_vec();
        args.push("--help");
        let help = stdout(&args);
        assert!(help.contains("-v, --verbose"), "{command:?}:\n{help}");
    }
}

/// The README's commands are what a newcomer pastes first: every `piprov …`
/// line in its code blocks parses with the real clap definitions.
#[test]
fn every_readme_command_parses() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let mut in_block = false;
    let mut command = String::new();
    let mut parsed = 0;
    let mut failures = Vec::new();
    for line in readme.lines() {
        if line.starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if !in_block {
            continue;
        }
        let line = line.trim_start().trim_start_matches("$ ");
        if let Some(part) = line.strip_suffix('\\') {
            command.push_str(part);
            command.push(' ');
            continue;
        }
        command.push_str(line);
        let words = piprov_words(&std::mem::take(&mut command));
        if words.first().map(String::as_str) != Some("piprov") {
            continue;
        }
        match piprov::cli::docs::parses(&words) {
            Ok(()) => parsed += 1,
            Err(e) => failures.push(format!(
                "{}: {}",
                words.join(" "),
                e.lines().next().unwrap_or_default()
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "README commands that do not parse:\n{}",
        failures.join("\n")
    );
    assert!(parsed >= 20, "only {parsed} README commands parsed");
}
