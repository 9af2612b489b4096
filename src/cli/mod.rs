//! The commands: each takes its config from `crate::cmdline`, calls the
//! module that does the work, and prints what came of it.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Result;

pub use crate::cmdline::Cli;
use crate::cmdline::{Command, FlashConfig, InspectConfig, StampConfig, UnstampConfig};
use crate::flash::CardResult;

mod aws;
#[cfg(feature = "broker")]
mod broker;
mod cache;
pub mod docs;
mod reconcile;

/// Exit codes, shaped like diff(1): 0 all well, 1 "found something", 2 trouble.
pub mod exit {
    pub const OK: u8 = 0;
    /// `inspect` found risky (warning or critical) findings.
    pub const RISKY: u8 = 1;
    /// Any error, including bad usage.
    pub const ERROR: u8 = 2;
}

/// Whether the command given asked for `--json` (an error then goes to
/// stdout as JSON too).
pub fn json_requested(matches: &clap::ArgMatches) -> bool {
    let mut deepest = matches;
    while let Some((_, sub)) = deepest.subcommand() {
        deepest = sub;
    }
    matches!(deepest.try_get_one::<bool>("json"), Ok(Some(true)))
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Inspect(config) => inspect(&config),
        Command::Completions { shell } => {
            docs::completions(shell);
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir } => {
            let written = docs::man_pages(&dir)?;
            eprintln!("{written} man pages in {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Devices { json } => {
            let devices = crate::flash::devices::list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&devices)?);
            } else {
                print!("{}", crate::flash::devices::render(&devices));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Activation { action, aws } => aws::activation(action, aws),
        Command::Fleet { action, aws } => aws::fleet(action, aws),
        Command::Setup { action, aws } => aws::setup(action, aws),
        #[cfg(feature = "broker")]
        Command::Broker { action } => broker::run(action),
        Command::Cache(args) => cache::run(args),
        #[cfg(feature = "station")]
        Command::Station(args) => station(args),
        Command::Flash(config) => flash(config.validated()?),
        Command::Capture(config) => capture(&config),
        Command::Stamp(config) => stamp(&config),
        Command::Unstamp(config) => unstamp(&config),
    }
}

fn flash(config: FlashConfig) -> Result<ExitCode> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let progress = crate::progress::Progress::new(config.progress_mode());
    // Installed before anything with a side effect (decoding into the cache,
    // creating activations): every long step checks it.
    static INTERRUPTED: AtomicBool = AtomicBool::new(false);
    let _ = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::Relaxed));
    let summary = crate::flash::flash(&config, &progress, &INTERRUPTED)?;
    print_flash_summary(&summary, config.json)
}

#[cfg(feature = "station")]
fn station(config: crate::cmdline::StationConfig) -> Result<ExitCode> {
    use crate::cmdline::StationAction;
    use crate::station::RecordFormat;
    match &config.action {
        Some(StationAction::Record { record, json, csv }) => {
            let format = match (*json, *csv) {
                (true, _) => RecordFormat::Json,
                (_, true) => RecordFormat::Csv,
                _ => RecordFormat::Table,
            };
            crate::station::print_record(record, format)?;
        }
        None => crate::station::run(&config)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn stamp(config: &StampConfig) -> Result<ExitCode> {
    print_outcome(&crate::stamp::stamp(config)?, config.json)
}

fn unstamp(config: &UnstampConfig) -> Result<ExitCode> {
    print_outcome(
        &crate::stamp::unstamp(&config.image, config.dry_run)?,
        config.json,
    )
}

fn print_flash_summary(summary: &crate::flash::Summary, json: bool) -> Result<ExitCode> {
    let mut stdout = std::io::stdout().lock();
    if json {
        let line = serde_json::json!({
            "event": "summary",
            "image_sha256": summary.image_sha256,
            "image_bytes": summary.image_bytes,
            "mapped_bytes": summary.mapped_bytes,
            "decoded_while_writing": summary.decoded_while_writing,
            "as_is": summary.as_is,
            "ok": summary.cards.iter().filter(|c| c.result == CardResult::Ok).count(),
            "failed": summary.cards.iter().filter(|c| c.result != CardResult::Ok).count(),
        });
        writeln!(stdout, "{line}")?;
    } else {
        for card in &summary.cards {
            match &card.error {
                None => writeln!(
                    stdout,
                    "{}: ok, {} in {:.1} s{}{}",
                    card.device,
                    crate::units::size(card.bytes_written),
                    card.seconds,
                    if card.verified {
                        ", verified"
                    } else {
                        ", not verified"
                    },
                    card.hostname
                        .as_ref()
                        .map(|h| format!(", hostname {h}"))
                        .unwrap_or_default()
                )?,
                Some(error) => writeln!(
                    stdout,
                    "{}: {}: {error}",
                    card.device,
                    card.result.name().to_uppercase()
                )?,
            }
        }
    }
    if summary.as_is && !json {
        writeln!(
            stdout,
            "written as is (--as-is): the image's critical findings are on every card"
        )?;
    }
    let failed = summary.cards.iter().any(|c| c.result != CardResult::Ok);
    Ok(ExitCode::from(if failed { exit::RISKY } else { exit::OK }))
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
    match (&outcome.record, outcome.byte_exact) {
        (None, Some(true)) => writeln!(
            stdout,
            "  the boot partition is byte for byte as before the stamp"
        )?,
        (Some(_), Some(false)) => writeln!(
            stdout,
            "  unstamp will restore the files, not every byte: {}",
            outcome.not_exact_because.as_deref().unwrap_or_default()
        )?,
        (None, Some(false)) => writeln!(
            stdout,
            "  files restored, not every byte: {}",
            outcome.not_exact_because.as_deref().unwrap_or_default()
        )?,
        _ => {}
    }
    Ok(ExitCode::SUCCESS)
}

fn capture(config: &crate::cmdline::CaptureConfig) -> Result<ExitCode> {
    use std::sync::atomic::{AtomicBool, Ordering};
    static INTERRUPTED: AtomicBool = AtomicBool::new(false);
    let _ = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::Relaxed));
    let progress = crate::progress::Progress::new(if config.json {
        crate::progress::Mode::Quiet
    } else {
        crate::progress::Mode::Bars
    });
    let (summary, report) = crate::capture::capture(
        &crate::capture::CaptureConfig {
            source: &config.source,
            output: &config.output,
            shrink: !config.no_shrink,
            level: config.level,
            stamp: config.stamping(std::path::Path::new("")),
        },
        &progress,
        &INTERRUPTED,
    )?;
    let mut stdout = std::io::stdout().lock();
    if config.json {
        let out = serde_json::json!({"summary": summary, "audit": report});
        serde_json::to_writer_pretty(&mut stdout, &out).map_err(std::io::Error::from)?;
        writeln!(stdout)?;
    } else {
        writeln!(
            stdout,
            "{}: {} read of {}, image {} → {}{}, archive {} ({}), {:.1} s\nsha256 {}\nbmap {}\n",
            summary.output,
            crate::units::size(summary.bytes_read),
            crate::units::size(summary.image_bytes_before),
            crate::units::size(summary.image_bytes_before),
            crate::units::size(summary.image_bytes_after),
            summary
                .shrunk_partition
                .map(|n| format!(" (partition {n} shrunk)"))
                .unwrap_or_default(),
            crate::units::size(summary.archive_bytes),
            summary.format,
            summary.seconds,
            summary.sha256,
            summary.bmap,
        )?;
        write!(stdout, "{}", crate::inspect::render_text(&report))?;
    }
    Ok(ExitCode::from(if report.is_risky() {
        exit::RISKY
    } else {
        exit::OK
    }))
}

fn inspect(config: &InspectConfig) -> Result<ExitCode> {
    use crate::flash::source::DecodeLimit;
    let limit = config
        .max_size
        .map_or(DecodeLimit::DEFAULT, |bytes| DecodeLimit {
            bytes,
            why: "the --max-size",
        });
    let report = crate::inspect::inspect(&config.image, limit)?;
    let mut stdout = std::io::stdout().lock();
    if config.json {
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
