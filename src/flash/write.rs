//! Writing one card: the mapped ranges in chunks, hashed as they are written,
//! the first MiB last, then a read-back that bypasses the page cache.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, sync_channel};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use super::map::Extents;
use super::target::Target;
use crate::image::Overlay;

/// O_DIRECT writes of 16 MiB keep a card's queue busy: with 4 MiB, --full was
/// slower than dd on the same disk (bench/README.md). A card holds
/// IN_FLIGHT + 1 of these buffers.
pub const CHUNK: u64 = 16 << 20;
/// The partition table and boot code live here. Written last, after everything
/// else is on the card, so an interrupted write never leaves a card that looks
/// bootable.
pub const FIRST_MIB: u64 = 1 << 20;
/// O_DIRECT wants buffers, offsets and lengths aligned to the logical sector.
const DIRECT_ALIGN: usize = 4096;

struct AlignedBuf {
    raw: Vec<u8>,
    offset: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let raw = vec![0u8; len + DIRECT_ALIGN];
        let offset = raw.as_ptr().align_offset(DIRECT_ALIGN);
        Self { raw, offset }
    }

    fn get(&mut self, len: usize) -> &mut [u8] {
        &mut self.raw[self.offset..self.offset + len]
    }
}

/// One piece of the card, with the hash of what was written there.
struct Chunk {
    start: u64,
    len: u64,
    sha256: [u8; 32],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub bytes: u64,
    pub verified: bool,
}

/// `(start, len)` pieces of the card, in the order they are written.
type Pieces = Vec<(u64, u64)>;

/// Splits the extents into chunks: those in the first MiB, and the rest.
fn plan_chunks(extents: &Extents) -> (Pieces, Pieces) {
    let (mut head, mut rest) = (Vec::new(), Vec::new());
    for &(start, end) in extents.ranges() {
        let mut at = start;
        while at < end {
            let limit = if at < FIRST_MIB {
                FIRST_MIB.min(end)
            } else {
                end
            };
            let len = (limit - at).min(CHUNK);
            if at < FIRST_MIB {
                head.push((at, len))
            } else {
                rest.push((at, len))
            }
            at += len;
        }
    }
    (head, rest)
}

/// A chunk read from the image and hashed, on its way to the card.
struct Filled {
    start: u64,
    len: u64,
    padded: u64,
    buf: AlignedBuf,
    sha256: [u8; 32],
}

/// Buffers in flight between the reader and the writer: enough to keep both busy.
const IN_FLIGHT: usize = 3;

pub fn write_card<R: Read + Seek + Send>(
    target: &Target,
    source: &mut Overlay<R>,
    extents: &Extents,
    verify: bool,
    cancel: &AtomicBool,
    tick: &(dyn Fn(u64) + Sync),
) -> Result<Written> {
    let (head, rest) = plan_chunks(extents);
    let mut chunks = Vec::with_capacity(head.len() + rest.len());
    let path = target.info.path.display().to_string();
    copy(target, source, &rest, cancel, tick, &mut chunks)?;
    target.file.sync_all().with_context(|| format!("flushing {path}"))?;
    copy(target, source, &head, cancel, tick, &mut chunks)?;
    target.finish_writing()?;
    let bytes = extents.bytes();
    if !verify {
        return Ok(Written { bytes, verified: false });
    }
    let reader = open_for_verify(target)?;
    let mut buf = AlignedBuf::new(CHUNK as usize);
    for chunk in &chunks {
        if cancel.load(Ordering::Relaxed) {
            bail!(InterruptedError);
        }
        let data = buf.get(chunk.len as usize);
        reader
            .read_exact_at(data, chunk.start)
            .with_context(|| format!("reading back {path} at byte {}", chunk.start))?;
        if Sha256::digest(&*data)[..] != chunk.sha256[..] {
            bail!(
                "verification failed: {path} returned different data at bytes {}..{} than was written \
                 (a failing or counterfeit card?)",
                chunk.start,
                chunk.start + chunk.len
            );
        }
        tick(chunk.len.min(bytes));
    }
    Ok(Written { bytes, verified: true })
}

/// Copies the pieces to the card: a reader thread reads and hashes the next
/// chunks while this one writes, so the disk never waits for the hash.
fn copy<R: Read + Seek + Send>(
    target: &Target,
    source: &mut Overlay<R>,
    pieces: &[(u64, u64)],
    cancel: &AtomicBool,
    tick: &(dyn Fn(u64) + Sync),
    chunks: &mut Vec<Chunk>,
) -> Result<()> {
    let path = target.info.path.display().to_string();
    let (full_tx, full_rx) = sync_channel::<Filled>(IN_FLIGHT);
    let (empty_tx, empty_rx) = channel::<AlignedBuf>();
    for _ in 0..IN_FLIGHT {
        empty_tx.send(AlignedBuf::new(CHUNK as usize)).expect("receiver alive");
    }
    let direct = target.direct;
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || -> Result<()> {
            for &(start, len) in pieces {
                if cancel.load(Ordering::Relaxed) {
                    bail!(InterruptedError);
                }
                let Ok(mut buf) = empty_rx.recv() else { return Ok(()) };
                let padded = if direct { len.next_multiple_of(512) } else { len };
                let data = buf.get(padded as usize);
                // A card is longer than the image: padding the image's last odd
                // sector with zeroes for O_DIRECT writes only past its end.
                data[len as usize..].fill(0);
                source
                    .read_at(start, &mut data[..len as usize])
                    .with_context(|| format!("reading the image at byte {start}"))?;
                let sha256 = Sha256::digest(&*data).into();
                if full_tx.send(Filled { start, len, padded, buf, sha256 }).is_err() {
                    return Ok(());
                }
            }
            Ok(())
        });
        let mut written = Ok(());
        for mut filled in full_rx.iter() {
            let data = filled.buf.get(filled.padded as usize);
            if let Err(e) = target.file.write_all_at(data, filled.start) {
                written = Err(e).with_context(|| format!("writing {path} at byte {}", filled.start));
                break;
            }
            chunks.push(Chunk { start: filled.start, len: filled.padded, sha256: filled.sha256 });
            tick(filled.len);
            let _ = empty_tx.send(filled.buf);
        }
        drop(full_rx);
        let read = reader.join().expect("image reader panicked");
        written.and(read)
    })
}

/// A second handle for reading back; O_DIRECT on devices, so the bytes come
/// from the card and not from the page cache.
fn open_for_verify(target: &Target) -> Result<File> {
    let mut options = OpenOptions::new();
    options.read(true);
    if target.direct {
        options.custom_flags(nix::libc::O_DIRECT);
    }
    options
        .open(&target.info.path)
        .with_context(|| format!("opening {} to verify", target.info.path.display()))
}

#[derive(Debug)]
pub struct InterruptedError;

impl std::fmt::Display for InterruptedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted before the card was complete; its partition table was not written")
    }
}

impl std::error::Error for InterruptedError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_mib_is_split_off_and_chunks_are_bounded() {
        let extents = Extents::from_ranges(vec![(0, 3 << 20), (10 << 20, (10 << 20) + 4096)]);
        let (head, rest) = plan_chunks(&extents);
        assert_eq!(head, vec![(0, FIRST_MIB)]);
        assert_eq!(rest, vec![(FIRST_MIB, 2 << 20), (10 << 20, 4096)]);
        assert!(rest.iter().all(|(_, len)| *len <= CHUNK));
    }
}
