//! A targets file: one card per line, `device,hostname[,key=value…]`.

use std::fs::File;
use std::path::Path;

use anyhow::{Context, Result, bail};

use super::card::CardSpec;

/// Parses a targets file: `device,hostname[,key=value…]` per record (CSV: a
/// quoted field may hold commas); `#` comments and a header record starting
/// with `device` are skipped.
pub fn read_targets(path: &Path) -> Result<Vec<CardSpec>> {
    let file = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .comment(Some(b'#'))
        .from_reader(file);
    let mut cards = Vec::new();
    for record in reader.records() {
        let record = record.with_context(|| format!("reading {}", path.display()))?;
        let line = record.position().map_or(0, |p| p.line());
        // A quoted cell may hold a line break; on a card it would be a
        // setting of its own.
        if let Some(cell) = record.iter().find(|f| f.chars().any(char::is_control)) {
            bail!(
                "{} line {line}: {cell:?} holds a control character (a line break in a quoted cell?)",
                path.display()
            );
        }
        let mut fields = record.iter();
        let device = fields.next().unwrap_or_default();
        if device == "device" || record.iter().all(str::is_empty) {
            continue;
        }
        if device.is_empty() {
            bail!("{} line {line}: no device", path.display());
        }
        let hostname = fields.next().filter(|h| !h.is_empty()).map(str::to_string);
        let overrides: Vec<String> = fields
            .filter(|f| !f.is_empty())
            .map(str::to_string)
            .collect();
        if let Some(bad) = overrides.iter().find(|o| !o.contains('=')) {
            bail!("{} line {line}: {bad:?} is not key=value", path.display());
        }
        cards.push(CardSpec {
            device: device.into(),
            hostname,
            overrides,
        });
    }
    if cards.is_empty() {
        bail!("{} lists no targets", path.display());
    }
    Ok(cards)
}
