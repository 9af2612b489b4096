//! `piprov inspect`: an audit of a golden image (or a card) for the things that
//! make clones collide, read without root and without mounting.

mod facts;
mod findings;
mod render;

use std::fmt::Debug;
use std::io::{Read, Seek, Write};
use std::path::Path;

use anyhow::Result;
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

pub fn inspect(path: &Path) -> Result<Report> {
    let image = Image::open(path)?;
    report(&image, &path.display().to_string())
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
