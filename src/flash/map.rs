//! Which byte ranges of an image must reach a card: everything outside the
//! partitions, and inside them what the filesystem uses, as the image model
//! reads it (`Image::used_by_filesystem`). Any other filesystem is written
//! whole. Computed from the image itself; no .bmap needed.
//!
//! Skipping the rest is safe on a card full of old data: a filesystem never reads
//! a block its own metadata says is free.

use std::fmt::Debug;
use std::io::{Read, Seek, Write};

use anyhow::Result;

pub use crate::image::{ALIGN, Extents};
use crate::image::{Image, Partition, PartitionRole};

/// The ranges to write for an image of `len` bytes.
pub fn compute<D: Read + Write + Seek + Debug + 'static>(image: &Image<D>) -> Result<Extents> {
    let len = image.len();
    let parts: Vec<&Partition> = image
        .table()
        .partitions
        .iter()
        .filter(|p| p.role != PartitionRole::Extended)
        .collect();
    let mut ranges = Vec::new();
    // Outside the partitions: tables, boot code, gaps, the backup GPT.
    let mut cursor = 0;
    let mut sorted = parts.clone();
    sorted.sort_by_key(|p| p.start);
    for p in &sorted {
        ranges.push((cursor, p.start));
        cursor = cursor.max(p.end());
    }
    ranges.push((cursor, len));
    for p in parts {
        ranges.extend_from_slice(image.used_by_filesystem(p)?.ranges());
    }
    Ok(Extents::from_ranges(ranges).aligned(len))
}
