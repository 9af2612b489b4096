//! `piprov inspect`: an audit of a golden image (or a card) for the things that
//! make clones collide, read without root and without mounting.

mod facts;
mod findings;
mod render;

use std::fmt::Debug;
use std::io::{Read, Seek, Write};
use std::path::Path;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result};
use serde::Serialize;

pub use facts::{Facts, MachineIdState, SsmAgentUsers, gather as gather_facts, redact};
pub use findings::{Finding, Severity};
pub use render::render_text;

use crate::image::Image;

/// Bumped only when a field changes meaning or disappears; new fields may appear.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Serialize)]
pub struct Report {
    pub schema_version: u32,
    pub image: String,
    #[serde(flatten)]
    pub facts: Facts,
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn is_risky(&self) -> bool {
        self.findings.iter().any(|f| f.severity.is_risky())
    }
}

/// Inspects an image, or an archive of one (every format flash reads), which
/// is decoded once into flash's cache.
pub fn inspect(path: &Path, limit: crate::flash::source::DecodeLimit) -> Result<Report> {
    let name = path.display().to_string();
    let format = crate::flash::source::detect_file(path)?;
    if format == crate::flash::source::Format::Raw {
        return report(&Image::open(path)?, &name);
    }
    let quiet = crate::progress::Progress::new(crate::progress::Mode::Quiet);
    let decoded = crate::flash::source::open(path, None, limit, &quiet, &AtomicBool::new(false))
        .with_context(|| format!("decoding {name}"))?;
    let image = Image::open(&decoded.path)
        .with_context(|| format!("reading the image decoded from {name}"))?;
    report(&image, &name)
}

/// The report for an already opened image; `name` is what errors and the report call it.
pub fn report<D: Read + Write + Seek + Debug + 'static>(
    image: &Image<D>,
    name: &str,
) -> Result<Report> {
    let facts = facts::gather(image).map_err(|e| e.context(format!("inspecting {name}")))?;
    Ok(Report {
        schema_version: SCHEMA_VERSION,
        image: name.to_string(),
        findings: findings::assess(&facts),
        facts,
    })
}
