//! Shell completions and man pages, both made from the clap definitions, so
//! they never drift from `--help`.

use std::path::Path;

use anyhow::{Context, Result};
use clap::CommandFactory;

use super::Cli;

pub fn completions(shell: clap_complete::Shell) {
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "piprov", &mut std::io::stdout());
}

/// One page per command and subcommand (`piprov-broker-token-add.1`), as git
/// names its own; hidden commands get none. Returns how many were written.
pub fn man_pages(dir: &Path) -> Result<usize> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cmd = Cli::command();
    cmd.build();
    write_page(dir, &cmd, "piprov")
}

fn write_page(dir: &Path, cmd: &clap::Command, name: &str) -> Result<usize> {
    let page = cmd.clone().name(name.to_string());
    let mut rendered = Vec::new();
    clap_mangen::Man::new(page).render(&mut rendered)?;
    let text = with_examples(&String::from_utf8_lossy(&rendered), &examples(cmd));
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    let mut written = 1;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        written += write_page(dir, sub, &format!("{name}-{}", sub.get_name()))?;
    }
    Ok(written)
}

/// Every command's examples: (its words after `piprov`, the example lines).
pub fn all_examples() -> Vec<(Vec<String>, Vec<String>)> {
    fn walk(cmd: &clap::Command, path: Vec<String>, out: &mut Vec<(Vec<String>, Vec<String>)>) {
        let lines = examples(cmd);
        if !lines.is_empty() {
            out.push((path.clone(), lines));
        }
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            let mut deeper = path.clone();
            deeper.push(sub.get_name().to_string());
            walk(sub, deeper, out);
        }
    }
    let mut out = Vec::new();
    walk(&Cli::command(), Vec::new(), &mut out);
    out
}

/// Whether `words` (`piprov` first) parse as a command line, and if not why.
pub fn parses(words: &[String]) -> std::result::Result<(), String> {
    use clap::Parser;
    Cli::try_parse_from(words)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The lines of a command's examples (its after-help below "Examples:"), as
/// `--help` shows them less their indent; a line ending in ` \` goes on below.
pub fn examples(cmd: &clap::Command) -> Vec<String> {
    let Some(after) = cmd.get_after_help() else {
        return Vec::new();
    };
    let text = after.to_string();
    let Some((_, list)) = text.split_once("Examples:\n") else {
        return Vec::new();
    };
    list.lines()
        .map(|l| l.strip_prefix("  ").unwrap_or(l).to_string())
        .collect()
}

/// clap_mangen sets the after-help as filled text under EXTRA; examples are
/// commands to paste, so they go under EXAMPLES, unfilled (`.EX`).
fn with_examples(page: &str, examples: &[String]) -> String {
    let mut out = match page.find(".SH EXTRA\n") {
        Some(start) => {
            let rest = &page[start + 1..];
            let end = rest
                .find("\n.SH ")
                .map_or(page.len(), |i| start + 1 + i + 1);
            format!("{}{}", &page[..start], &page[end..])
        }
        None => page.to_string(),
    };
    if examples.is_empty() {
        return out;
    }
    let mut section = String::from(".SH EXAMPLES\n.EX\n");
    for line in examples {
        let escaped = line
            .replace('\\', "\\e")
            .replace('-', "\\-")
            .replace('\'', "\\(aq");
        if escaped.starts_with(['.', '\'']) {
            section.push_str("\\&");
        }
        section.push_str(&escaped);
        section.push('\n');
    }
    section.push_str(".EE\n");
    match out.find(".SH VERSION") {
        Some(at) => out.insert_str(at, &section),
        None => out.push_str(&section),
    }
    out
}
