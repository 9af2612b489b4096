//! Command-line interface: clap types and one function per command.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Exit codes, shaped like diff(1): 0 all well, 1 "found something", 2 trouble.
pub mod exit {
    pub const OK: u8 = 0;
    /// `inspect` found risky (warning or critical) findings.
    pub const RISKY: u8 = 1;
    /// Any error, including bad usage.
    pub const ERROR: u8 = 2;
}

#[derive(Debug, Parser)]
#[command(
    name = "piprov",
    version,
    about = "Provision Raspberry Pi SD cards for fleets managed by AWS Systems Manager",
    long_about = "Provision Raspberry Pi SD cards for fleets managed by AWS Systems Manager.\n\n\
        Cards cloned from one golden image share its SSM registration, private key, \
        machine-id and SSH host keys. piprov audits such images, stamps them with a \
        first-boot unit that gives every card its own identity, and writes them to cards."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Audit an image or card for state that makes clones collide
    #[command(
        long_about = "Audit an image or card for state that makes clones collide.\n\n\
        Reads the partition table, the FAT boot partition and the ext4 root filesystem \
        directly (no root, no mount) and reports the SSM registration, sudo rules, \
        machine-id, SSH host keys, cloud-init seed and piprov stamp it finds.\n\n\
        Exit status: 0 no risky findings, 1 risky (warning or critical) findings, 2 error.",
        after_help = "Examples:\n  piprov inspect golden.img\n  piprov inspect --json /dev/sdb | jq .findings"
    )]
    Inspect {
        /// Image file or block device
        image: PathBuf,
        /// Print the report as JSON (schema in docs/inspect-json.md)
        #[arg(long)]
        json: bool,
    },
    /// Put the first-boot unit and this card's settings on an image's boot partition
    #[command(
        long_about = "Put the first-boot unit and this card's settings on an image's boot partition.\n\n\
        Writes the device scripts and units, the card's settings and its activation secret \
        (if the recipe's source has one) to the FAT boot partition, and hooks them into the \
        first boot: `systemd.run=` tokens appended to cmdline.txt (Bookworm), or a NoCloud \
        seed with a fresh instance-id (images with cloud-init). On that boot the card gets \
        its own machine-id, SSH host keys, hostname and SSM registration, and sudo is \
        hardened. Stamping again replaces the previous stamp; `piprov unstamp` removes it. \
        Works on image files and cards alike; needs no root and mounts nothing.",
        after_help = "Examples:\n  piprov stamp golden.img --recipe image-recipes/site.toml --hostname pi-door-07\n  \
            piprov stamp golden.img --recipe image-recipes/bench.toml --number 3 --dry-run\n  \
            piprov stamp golden.img --recipe r.toml --set sudo.strip_nopasswd=false --json"
    )]
    Stamp {
        /// Image file or block device
        image: PathBuf,
        /// Recipe (TOML), see image-recipes/
        #[arg(long, short)]
        recipe: PathBuf,
        /// Hostname or pattern for this card ({serial}, {mac}, {n}); overrides the recipe
        #[arg(long)]
        hostname: Option<String>,
        /// This card's number, filled in for {n}
        #[arg(long)]
        number: Option<u32>,
        /// Override a recipe setting, e.g. --set sudo.strip_nopasswd=false (repeatable)
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Show what would change; write nothing
        #[arg(long)]
        dry_run: bool,
        /// Print the outcome as JSON
        #[arg(long)]
        json: bool,
    },
    /// Remove a stamp, restoring the boot partition as it was before
    Unstamp {
        /// Image file or block device
        image: PathBuf,
        /// Show what would change; write nothing
        #[arg(long)]
        dry_run: bool,
        /// Print the outcome as JSON
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Inspect { image, json } => inspect(&image, json),
        Command::Stamp {
            image,
            recipe,
            hostname,
            number,
            overrides,
            dry_run,
            json,
        } => {
            let recipe = crate::recipe::load(&recipe, &overrides)?;
            let config = crate::stamp::StampConfig {
                image,
                recipe,
                hostname,
                number,
                dry_run,
            };
            print_outcome(&crate::stamp::stamp(&config)?, json)
        }
        Command::Unstamp {
            image,
            dry_run,
            json,
        } => print_outcome(&crate::stamp::unstamp(&image, dry_run)?, json),
    }
}

fn print_outcome(outcome: &crate::stamp::Outcome, json: bool) -> Result<ExitCode> {
    let mut stdout = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut stdout, outcome).map_err(std::io::Error::from)?;
        writeln!(stdout)?;
        return Ok(ExitCode::SUCCESS);
    }
    let verb = match (&outcome.record, outcome.dry_run) {
        (Some(_), false) => "stamped",
        (Some(_), true) => "would stamp",
        (None, false) => "unstamped",
        (None, true) => "would unstamp",
    };
    write!(stdout, "{verb} {}", outcome.image)?;
    if let Some(r) = &outcome.record {
        write!(
            stdout,
            ": hook {}, activation {}{}, hostname {}",
            serde_json::to_value(r.hook)?.as_str().unwrap_or_default(),
            crate::recipe::source_name(r.activation.source),
            r.activation
                .id
                .as_ref()
                .map(|id| format!(" ({id})"))
                .unwrap_or_default(),
            r.hostname.as_deref().unwrap_or("unchanged")
        )?;
    }
    writeln!(stdout)?;
    if outcome.changes.is_empty() {
        writeln!(stdout, "  nothing to change")?;
    }
    for change in &outcome.changes {
        let detail = match (change.action, change.secret) {
            ("remove", _) => String::new(),
            (_, true) => format!("{} bytes, secret (not shown)", change.bytes),
            _ => format!("{} bytes", change.bytes),
        };
        writeln!(
            stdout,
            "  {:<7} {:<26} {detail}",
            change.action, change.file
        )?;
    }
    if let Some(r) = outcome
        .record
        .as_ref()
        .filter(|r| !r.cmdline_tokens.is_empty())
    {
        writeln!(
            stdout,
            "  cmdline.txt gains: {}",
            r.cmdline_tokens.join(" ")
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn inspect(image: &std::path::Path, json: bool) -> Result<ExitCode> {
    let report = crate::inspect::inspect(image)?;
    let mut stdout = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut stdout, &report).map_err(std::io::Error::from)?;
        writeln!(stdout)?;
    } else {
        write!(stdout, "{}", crate::inspect::render_text(&report))?;
    }
    Ok(ExitCode::from(if report.is_risky() {
        exit::RISKY
    } else {
        exit::OK
    }))
}
