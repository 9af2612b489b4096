//! `piprov cache`: what the decode cache holds, and tidying it.

use std::io::Write;
use std::process::ExitCode;

use crate::cmdline::cache::{CacheAction, CacheArgs};
use anyhow::Result;

use crate::units::size;

pub fn run(args: CacheArgs) -> Result<ExitCode> {
    let mut stdout = std::io::stdout().lock();
    match args.action {
        CacheAction::List { json } => {
            let listing = crate::cache::list()?;
            if json {
                serde_json::to_writer_pretty(&mut stdout, &listing)?;
                writeln!(stdout)?;
                return Ok(ExitCode::SUCCESS);
            }
            writeln!(
                stdout,
                "{}: {} on disk, {} decoded image{}, {} remembered hash{}",
                listing.dir.display(),
                size(listing.disk_bytes),
                listing.images.len(),
                if listing.images.len() == 1 { "" } else { "s" },
                listing.remembered_hashes,
                if listing.remembered_hashes == 1 {
                    ""
                } else {
                    "es"
                },
            )?;
            for image in &listing.images {
                writeln!(
                    stdout,
                    "  image {}  {} ({} on disk), last used {}",
                    &image.sha256[..16],
                    size(image.len),
                    size(image.disk_bytes),
                    image.last_used
                )?;
                for archive in &image.archives {
                    writeln!(stdout, "    from {} ({})", archive.archive, archive.format)?;
                }
            }
            if !listing.other_files.is_empty() {
                writeln!(
                    stdout,
                    "  {} other file{} (ended decodes, older piprov versions): `piprov cache clear` removes them",
                    listing.other_files.len(),
                    if listing.other_files.len() == 1 {
                        ""
                    } else {
                        "s"
                    }
                )?;
            }
        }
        CacheAction::Clear { older_than, json } => {
            let cleared = crate::cache::clear(older_than)?;
            if json {
                serde_json::to_writer_pretty(&mut stdout, &cleared)?;
                writeln!(stdout)?;
            } else {
                writeln!(
                    stdout,
                    "removed {} image{} ({} files, {})",
                    cleared.images,
                    if cleared.images == 1 { "" } else { "s" },
                    cleared.files,
                    size(cleared.bytes)
                )?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
