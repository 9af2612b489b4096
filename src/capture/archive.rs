//! The captured image written as OUT's extension asks: xz (in blocks, on every
//! core, begun while the card was read: `spans`), zstd, gzip, or a sparse
//! `.img`. The image's map says where its data is; the rest goes in as zeroes
//! (a hole in a `.img`). The archive's SHA-256 is taken as it is written.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::cancel;
use crate::flash::map::Extents;
use crate::hex::hex;
use crate::progress::Progress;

use super::spans::Spans;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Xz,
    Zst,
    Gz,
    Img,
}

impl Format {
    /// By OUT's name: `.img.xz`, `.img.zst`, `.img.gz` or `.img`.
    pub fn of(output: &Path) -> Result<Format> {
        let name = output.to_string_lossy();
        Ok(if name.ends_with(".xz") {
            Format::Xz
        } else if name.ends_with(".zst") {
            Format::Zst
        } else if name.ends_with(".gz") {
            Format::Gz
        } else if name.ends_with(".img") {
            Format::Img
        } else {
            bail!(
                "{}: name the archive .img.xz, .img.zst, .img.gz or .img (the format follows the name)",
                output.display()
            )
        })
    }

    /// A level the compressor takes, refused before anything is read.
    pub fn check_level(self, level: Option<u32>) -> Result<()> {
        let Some(level) = level else {
            return Ok(());
        };
        let range = match self {
            Format::Xz => 0..=9,
            Format::Zst => 1..=19,
            Format::Gz => 1..=9,
            Format::Img => bail!("--level is for a compressed archive, not a .img"),
        };
        if !range.contains(&level) {
            bail!(
                "--level {level}: {} takes {} to {}",
                self.name(),
                range.start(),
                range.end()
            );
        }
        Ok(())
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Xz => "xz",
            Format::Zst => "zstd",
            Format::Gz => "gzip",
            Format::Img => "raw",
        }
    }
}

pub struct Written {
    pub bytes: u64,
    pub sha256: String,
    /// xz: how its blocks were made.
    pub blocks: Option<super::spans::Blocks>,
}

/// xz's default level, as `xz` itself uses.
pub const XZ_PRESET: u32 = 6;
const PIECE: usize = 4 << 20;

/// The captured image: the file, where its data lies, its length.
pub struct Captured<'a> {
    pub path: &'a Path,
    pub data: &'a Extents,
    pub len: u64,
}

/// Writes the archive. `spans`: the xz blocks made so far (xz only).
pub fn write(
    captured: &Captured<'_>,
    format: Format,
    level: Option<u32>,
    spans: Option<&Spans>,
    out: &Path,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<Written> {
    let Captured {
        path: image,
        data,
        len,
    } = *captured;
    let source = File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("creating {}", out.display()))?;
    let bar = progress.bytes(&format!("{} ", format.name()), len);
    if format == Format::Img {
        let written = sparse(&source, data, len, &file, &bar, cancel)?;
        bar.finish_and_clear();
        return Ok(written);
    }
    let hashing = Hashing::new(file);
    if format == Format::Xz {
        let spans = spans.context("xz without its spans")?;
        let (hashing, blocks) = spans.write(&source, data, len, hashing, &bar, cancel)?;
        bar.finish_and_clear();
        let mut written = hashing.done()?;
        written.blocks = Some(blocks);
        return Ok(written);
    }
    let mut encoder: Box<dyn Finish> = match format {
        Format::Zst => Box::new(zstd::stream::write::Encoder::new(
            hashing,
            level.map_or(3, |l| l as i32),
        )?),
        Format::Gz => Box::new(flate2::write::GzEncoder::new(
            hashing,
            level.map_or(flate2::Compression::default(), flate2::Compression::new),
        )),
        Format::Img | Format::Xz => unreachable!("written above"),
    };
    walk(&source, data, len, &bar, cancel, |piece| {
        let bytes = match piece {
            Piece::Zeroes(bytes) | Piece::Data(_, bytes) => bytes,
        };
        encoder.write_all(bytes).context("compressing")
    })?;
    let hashing = encoder.finish_into()?;
    bar.finish_and_clear();
    hashing.done()
}

/// A `.img`: the data at its offsets, holes between; hashed as the image reads.
fn sparse(
    source: &File,
    data: &Extents,
    len: u64,
    out: &File,
    bar: &indicatif::ProgressBar,
    cancel: &AtomicBool,
) -> Result<Written> {
    let mut hasher = Sha256::new();
    walk(source, data, len, bar, cancel, |piece| {
        match piece {
            Piece::Zeroes(bytes) => hasher.update(bytes),
            Piece::Data(at, bytes) => {
                hasher.update(bytes);
                if bytes.iter().any(|&b| b != 0) {
                    out.write_all_at(bytes, at).context("writing the image")?;
                }
            }
        }
        Ok(())
    })?;
    out.set_len(len).context("writing the image")?;
    out.sync_all().context("flushing the image")?;
    Ok(Written {
        bytes: len,
        sha256: hex(&hasher.finalize()),
        blocks: None,
    })
}

/// A piece of the captured image, in order: zeroes where the map names no
/// data, else the data read at its offset.
enum Piece<'a> {
    Zeroes(&'a [u8]),
    Data(u64, &'a [u8]),
}

/// The image's first `len` bytes, piece by piece, to `each`.
fn walk(
    source: &File,
    data: &Extents,
    len: u64,
    bar: &indicatif::ProgressBar,
    cancel: &AtomicBool,
    mut each: impl FnMut(Piece<'_>) -> Result<()>,
) -> Result<()> {
    let zeroes = vec![0u8; PIECE];
    let mut buf = vec![0u8; PIECE];
    let mut at = 0;
    for &(start, end) in data.ranges().iter().chain([&(len, len)]) {
        let (start, end) = (start.min(len), end.min(len));
        while at < start {
            cancel::check(cancel)?;
            let n = (start - at).min(PIECE as u64) as usize;
            each(Piece::Zeroes(&zeroes[..n]))?;
            at += n as u64;
            bar.inc(n as u64);
        }
        while at < end {
            cancel::check(cancel)?;
            let n = (end - at).min(PIECE as u64) as usize;
            source
                .read_exact_at(&mut buf[..n], at)
                .context("reading the captured image")?;
            each(Piece::Data(at, &buf[..n]))?;
            at += n as u64;
            bar.inc(n as u64);
        }
    }
    Ok(())
}

/// The archive file, hashed and counted as the encoder writes it.
struct Hashing {
    file: File,
    hasher: Sha256,
    bytes: u64,
}

impl Hashing {
    fn new(file: File) -> Self {
        Self {
            file,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    fn done(self) -> Result<Written> {
        self.file.sync_all().context("flushing the archive")?;
        Ok(Written {
            bytes: self.bytes,
            sha256: hex(&self.hasher.finalize()),
            blocks: None,
        })
    }
}

impl Write for Hashing {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// An encoder that ends its stream and gives back the file it wrote to.
trait Finish: Write {
    fn finish_into(self: Box<Self>) -> Result<Hashing>;
}

impl Finish for zstd::stream::write::Encoder<'static, Hashing> {
    fn finish_into(self: Box<Self>) -> Result<Hashing> {
        (*self).finish().context("ending the zstd stream")
    }
}

impl Finish for flate2::write::GzEncoder<Hashing> {
    fn finish_into(self: Box<Self>) -> Result<Hashing> {
        (*self).finish().context("ending the gzip stream")
    }
}
