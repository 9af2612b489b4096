//! The captured image's block map in bmaptool's format 2.0, with a SHA-256
//! for every range and for the file itself, as `bmaptool create` writes it:
//! `bmaptool copy` and `flash` both check it before they trust it.

use std::fmt::Write as _;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::cancel;
use crate::flash::map::Extents;
use crate::hex::hex;

const BLOCK: u64 = 4096;

/// `NAME.img.bmap` for `NAME.img.xz` (or `.zst`, `.gz`) and `NAME.img`: the
/// name bmaptool looks for beside an image.
pub fn name_beside(output: &Path) -> PathBuf {
    let name = output.to_string_lossy();
    let stem = [".xz", ".zst", ".gz"]
        .iter()
        .find_map(|ext| name.strip_suffix(ext))
        .unwrap_or(&name);
    PathBuf::from(format!("{stem}.bmap"))
}

pub fn write(
    image: &Path,
    data: &Extents,
    len: u64,
    out: &Path,
    cancel: &AtomicBool,
) -> Result<()> {
    let source = File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let blocks = len.div_ceil(BLOCK);
    let mut ranges = String::new();
    let mut mapped = 0;
    let mut buf = vec![0u8; 4 << 20];
    for &(start, end) in data.ranges() {
        let (first, last) = (
            start / BLOCK,
            (end.min(len).div_ceil(BLOCK)).saturating_sub(1),
        );
        if end.min(len) <= start {
            continue;
        }
        let (from, to) = (first * BLOCK, ((last + 1) * BLOCK).min(len));
        let mut hasher = Sha256::new();
        let mut at = from;
        while at < to {
            cancel::check(cancel)?;
            let n = (to - at).min(buf.len() as u64) as usize;
            source
                .read_exact_at(&mut buf[..n], at)
                .context("reading the captured image for its bmap")?;
            hasher.update(&buf[..n]);
            at += n as u64;
        }
        mapped += last - first + 1;
        let span = if first == last {
            first.to_string()
        } else {
            format!("{first}-{last}")
        };
        writeln!(
            ranges,
            "        <Range chksum=\"{}\"> {span} </Range>",
            hex(&hasher.finalize())
        )?;
    }
    let zero = "0".repeat(64);
    let text = format!(
        "<?xml version=\"1.0\" ?>\n\
         <!-- The block map of an image captured by piprov, in bmaptool's format:\n     \
         `bmaptool copy IMAGE DEVICE` writes only these ranges, and checks them. -->\n\
         <bmap version=\"2.0\">\n    \
         <ImageSize> {len} </ImageSize>\n    \
         <BlockSize> {BLOCK} </BlockSize>\n    \
         <BlocksCount> {blocks} </BlocksCount>\n    \
         <MappedBlocksCount> {mapped} </MappedBlocksCount>\n    \
         <ChecksumType> sha256 </ChecksumType>\n    \
         <BmapFileChecksum> {zero} </BmapFileChecksum>\n    \
         <BlockMap>\n{ranges}    </BlockMap>\n\
         </bmap>\n"
    );
    // The file's own checksum is taken with its field all zeroes, then put in.
    let own = hex(&Sha256::digest(text.as_bytes()));
    let text = text.replacen(&zero, &own, 1);
    std::fs::write(out, text).with_context(|| format!("writing {}", out.display()))
}
