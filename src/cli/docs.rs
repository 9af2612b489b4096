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
    let mut text = Vec::new();
    clap_mangen::Man::new(page).render(&mut text)?;
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
