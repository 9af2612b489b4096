//! `piprov capture`: a set-up Pi's card (or an image of it) to a small golden
//! archive. Only what the filesystems use is read (flash's map, in the other
//! direction); everything else becomes holes, so old deleted data on the card
//! never reaches the archive. The root filesystem is shrunk to its used size
//! plus a margin (e2fsprogs on a sparse copy of it, `sfdisk` for the table) and
//! the image cut there; the card grows back on its first boot.
//!
//! SRC is only ever opened read-only. Everything is made in a temporary folder
//! beside OUT and renamed into place at the end: a capture that fails or is
//! interrupted leaves no OUT.

mod archive;
mod bmap_out;
mod shrink;
mod spans;
mod xz_blocks;

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::cancel;
use crate::flash::map;
use crate::flash::target;
use crate::image::Image;
use crate::progress::Progress;
pub use archive::{Captured, Format};

/// What a capture made.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub source: String,
    pub output: String,
    pub format: &'static str,
    /// Bytes read from SRC: what its filesystems use, and the rest of the disk
    /// outside them.
    pub bytes_read: u64,
    /// Bytes the captured image's map names (its data).
    pub used_bytes: u64,
    pub image_bytes_before: u64,
    pub image_bytes_after: u64,
    /// The partition shrunk, if one was.
    pub shrunk_partition: Option<u32>,
    /// With --stamp: how many files the stamp changed.
    pub stamped_changes: Option<usize>,
    pub archive_bytes: u64,
    /// xz: its blocks, and how many were compressed while the card was read
    /// or the root shrunk.
    pub xz_blocks: Option<spans::Blocks>,
    pub sha256: String,
    pub bmap: String,
    pub seconds: f64,
}

pub struct CaptureConfig<'a> {
    pub source: &'a Path,
    pub output: &'a Path,
    pub shrink: bool,
    /// The compressor's level; its own default when none.
    pub level: Option<u32>,
    /// Stamp the captured image so (its `image` is the one being captured).
    pub stamp: Option<crate::cmdline::StampConfig>,
}

/// Captures `config.source` into `config.output`. `cancel` is the caller's
/// (Ctrl-C): every long step checks it.
pub fn capture(
    config: &CaptureConfig<'_>,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<(Summary, crate::inspect::Report)> {
    let started = Instant::now();
    let format = Format::of(config.output)?;
    format.check_level(config.level)?;
    if let Some(stamp) = &config.stamp {
        // A recipe that will not do is refused before the card is read.
        let recipe = crate::recipe::load(&stamp.recipe, &stamp.overrides)?;
        crate::stamp::CardSettings::from_recipe(&recipe, stamp.hostname.as_deref(), None)?;
    }
    let source = open_source(config.source)?;
    let image = Image::from_disk(source.try_clone()?)
        .with_context(|| format!("reading {}", config.source.display()))?;
    let before = image.len();
    let used = map::compute(&image)
        .with_context(|| format!("reading the filesystems of {}", config.source.display()))?;
    let used = without_tail(&image, used);
    let work = Work::beside(config.output)?;
    let root = if config.shrink {
        shrink::candidate(&image)
    } else {
        None
    };
    // The image, sparse: what SRC uses, holes for the rest. The partition to
    // shrink goes to a file of its own, which e2fsprogs works on.
    let image_path = work.path("image.img");
    let root_path = work.path("root.ext4");
    let out = new_sparse(&image_path, before)?;
    let root_out = match &root {
        Some(part) => Some((part, new_sparse(&root_path, part.len)?)),
        None => None,
    };
    // xz starts on what has been read while the card is read and the root shrunk.
    let spans = match format {
        Format::Xz => Some(spans::Spans::new(
            config.level.unwrap_or(archive::XZ_PRESET),
            &work.path("blocks"),
        )?),
        _ => None,
    };
    let ahead = spans.as_ref().map(|spans| {
        let layout = spans::Layout {
            image: &out,
            root: root_out
                .as_ref()
                .map(|(part, file)| (part.start, part.len, file)),
        };
        spans::Ahead::new(spans, layout, before)
    });
    let (bytes_read, shrunk) = std::thread::scope(|scope| -> Result<_> {
        let _stop = ahead.as_ref().map(spans::StopOnDrop);
        if let Some(ahead) = &ahead {
            for _ in 0..ahead.threads() {
                scope.spawn(|| ahead.run(cancel));
            }
        }
        let bar = progress.bytes("read", used.bytes());
        let mut read = 0;
        let mut buf = vec![0u8; 4 << 20];
        for &(start, end) in used.ranges() {
            let mut at = start;
            while at < end {
                cancel::check(cancel)?;
                let n = (end - at).min(buf.len() as u64) as usize;
                source
                    .read_exact_at(&mut buf[..n], at)
                    .with_context(|| format!("reading {} at byte {at}", config.source.display()))?;
                // Nothing but zeroes stays a hole.
                if buf[..n].iter().any(|&b| b != 0) {
                    write_piece(&out, root_out.as_ref(), &buf[..n], at)?;
                }
                at += n as u64;
                read += n as u64;
                bar.inc(n as u64);
                if let Some(ahead) = &ahead {
                    ahead.ready(at);
                }
            }
        }
        bar.finish_and_clear();
        if let Some(ahead) = &ahead {
            ahead.ready(before);
        }
        let shrunk = match &root {
            Some(part) => {
                progress.say("checking and shrinking the root filesystem (e2fsck, resize2fs)");
                let new_len = shrink::shrink(&image_path, &root_path, part, config.source, cancel)?;
                Some((part.number, new_len))
            }
            None => None,
        };
        Ok((read, shrunk))
    })?;
    drop((image, root_out, out));
    let after = shrunk.map_or(before, |(_, len)| len);
    let stamped = match &config.stamp {
        Some(stamp) => {
            let stamp = crate::cmdline::StampConfig {
                image: image_path.clone(),
                ..stamp.clone()
            };
            let outcome = crate::stamp::stamp(&stamp).context("stamping the captured image")?;
            Some(outcome.changes.len())
        }
        None => None,
    };
    // The captured image's own map: the archive holds its data, holes elsewhere.
    let captured = Image::open(&image_path).context("reading the captured image")?;
    let data = map::compute(&captured).context("mapping the captured image")?;
    // What the golden carries, as `inspect` tells it.
    let report = crate::inspect::report(&captured, &config.output.display().to_string())
        .context("auditing the captured image")?;
    drop(captured);
    let archive_path = work.path("archive");
    let captured = archive::Captured {
        path: &image_path,
        data: &data,
        len: after,
    };
    let written = archive::write(
        &captured,
        format,
        config.level,
        spans.as_ref(),
        &archive_path,
        progress,
        cancel,
    )?;
    let bmap_path = work.path("bmap");
    bmap_out::write(&image_path, &data, after, &bmap_path, cancel)?;
    let name = config
        .output
        .file_name()
        .context("OUT has no file name")?
        .to_string_lossy()
        .into_owned();
    let sha_path = work.path("sha256");
    std::fs::write(&sha_path, format!("{}  {name}\n", written.sha256))
        .with_context(|| format!("writing {}", sha_path.display()))?;
    cancel::check(cancel)?;
    // The archive last: OUT there means everything is.
    let bmap_final = bmap_out::name_beside(config.output);
    let sha_final = append(config.output, ".sha256");
    work.place(&bmap_path, &bmap_final)?;
    work.place(&sha_path, &sha_final)?;
    work.place(&archive_path, config.output)?;
    let summary = Summary {
        source: config.source.display().to_string(),
        output: config.output.display().to_string(),
        format: format.name(),
        bytes_read,
        used_bytes: data.bytes(),
        image_bytes_before: before,
        image_bytes_after: after,
        shrunk_partition: shrunk.map(|(n, _)| n),
        stamped_changes: stamped,
        archive_bytes: written.bytes,
        xz_blocks: written.blocks,
        sha256: written.sha256,
        bmap: bmap_final.display().to_string(),
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok((summary, report))
}

/// SRC, read-only: a card that is mounted (or held by another program) is
/// refused, since what it holds may change while it is read.
fn open_source(path: &Path) -> Result<File> {
    let info = target::probe(path)?;
    if info.block_device {
        if let Some((part, place)) = target::in_use(&info).into_iter().next() {
            bail!(
                "refusing {}: /dev/{part} is {}; unmount it first",
                info.describe(),
                if place == "swap" {
                    "in use as swap".to_string()
                } else {
                    format!("mounted at {place}")
                }
            );
        }
    }
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    if info.block_device {
        // The kernel refuses an exclusive open of a disk whose partition is mounted.
        options.custom_flags(nix::libc::O_EXCL);
    }
    options.open(path).map_err(|e| {
        if e.raw_os_error() == Some(nix::libc::EBUSY) {
            anyhow::anyhow!(
                "refusing {}: the device is in use (mounted, or held by another program)",
                path.display()
            )
        } else {
            anyhow::Error::new(e).context(format!("opening {}", path.display()))
        }
    })
}

/// The map without what lies after the last partition (a card's stale tail,
/// no part of the image), but with the table's own places (a GPT's backup).
fn without_tail(image: &Image<File>, used: map::Extents) -> map::Extents {
    let len = image.len();
    let end = image
        .table()
        .partitions
        .iter()
        .map(|p| p.end())
        .max()
        .unwrap_or(len)
        .min(len);
    used.minus(&map::Extents::from_ranges(vec![(end, len)]))
        .union(&image.table().locations(len))
        .aligned(len)
}

fn write_piece(
    image: &File,
    root: Option<&(&shrink::Part, File)>,
    data: &[u8],
    at: u64,
) -> Result<()> {
    let end = at + data.len() as u64;
    // A piece may straddle the partition to shrink: each part to its file.
    let (in_root, start) = match root {
        Some((part, _)) => (part.start..part.start + part.len, part.start),
        None => (0..0, 0),
    };
    let mut pos = at;
    while pos < end {
        let inside = in_root.contains(&pos);
        let until = if inside {
            end.min(in_root.end)
        } else if pos < in_root.start {
            end.min(in_root.start)
        } else {
            end
        };
        let bytes = &data[(pos - at) as usize..(until - at) as usize];
        match (inside, root) {
            (true, Some((_, file))) => file.write_all_at(bytes, pos - start),
            _ => image.write_all_at(bytes, pos),
        }
        .context("writing the temporary copy")?;
        pos = until;
    }
    Ok(())
}

fn new_sparse(path: &Path, len: u64) -> Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.set_len(len)
        .with_context(|| format!("sizing {}", path.display()))?;
    Ok(file)
}

fn append(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// A private folder beside OUT (one filesystem, so a rename places a file),
/// removed with whatever is left in it.
struct Work {
    dir: tempfile::TempDir,
}

impl Work {
    fn beside(output: &Path) -> Result<Self> {
        let parent = match output.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if output.is_dir() {
            bail!(
                "{} is a folder: give the archive's file name",
                output.display()
            );
        }
        let dir = tempfile::Builder::new()
            .prefix(".piprov-capture-")
            .tempdir_in(parent)
            .with_context(|| format!("making a temporary folder in {}", parent.display()))?;
        Ok(Self { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn place(&self, from: &Path, to: &Path) -> Result<()> {
        std::fs::rename(from, to).with_context(|| format!("writing {}", to.display()))?;
        // Others may read what is published (it holds no secret: a golden
        // stamped later gets its secrets per card).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("setting the mode of {}", to.display()))
    }
}
