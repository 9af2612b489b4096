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
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Inspect { image, json } => inspect(&image, json),
    }
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
