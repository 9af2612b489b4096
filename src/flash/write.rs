//! Writing a batch of cards: one reader reads and hashes each chunk of the image
//! once and hands it to every card's writer, so N cards cost one read and one
//! hash of the image; only a chunk that holds a card's own stamp is patched and
//! hashed again for that card. The slowest card sets the pace; a card that fails
//! drops out and the others go on. On every card the first MiB is written last,
//! then the written ranges are read back, bypassing the page cache, and checked
//! against the hashes taken while writing.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, sync_channel};

use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest, Sha256};

use super::map::Extents;
use super::target::Target;
use crate::image::Overlay;

/// O_DIRECT writes of 16 MiB keep a card's queue busy: with 4 MiB, --full was
/// slower than dd on the same disk (bench/README.md).
pub const CHUNK: u64 = 16 << 20;
/// The partition table and boot code live here. Written last, after everything
/// else is on the card, so an interrupted write never leaves a card that looks
/// bootable.
pub const FIRST_MIB: u64 = 1 << 20;
/// O_DIRECT wants buffers, offsets and lengths aligned to the logical sector.
const DIRECT_ALIGN: usize = 4096;
/// Chunks queued for each card: the reader runs this far ahead of the slowest.
const IN_FLIGHT: usize = 2;

struct AlignedBuf {
    raw: Vec<u8>,
    offset: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let raw = vec![0u8; len + DIRECT_ALIGN];
        let offset = raw.as_ptr().align_offset(DIRECT_ALIGN);
        Self { raw, offset, len }
    }

    fn data(&self) -> &[u8] {
        &self.raw[self.offset..self.offset + self.len]
    }

    fn data_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.offset..self.offset + self.len]
    }
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

/// A chunk of the image, read and hashed once for all cards. Its data is padded
/// with zeroes to whole sectors for O_DIRECT: a card is longer than the image,
/// and a file target is cut back to the image's length afterwards.
struct Piece {
    start: u64,
    len: u64,
    buf: AlignedBuf,
    sha256: [u8; 32],
}

enum Msg {
    Piece(Arc<Piece>),
    /// Everything but the first MiB has been sent: flush it to the card.
    Flush,
    /// The whole image has been sent.
    End,
}

/// What a card has on it, piece by piece, for the read-back.
struct Written {
    start: u64,
    len: u64,
    sha256: [u8; 32],
}

/// One card of the batch.
pub struct Job<'a> {
    pub target: &'a Target,
    /// This card's stamp over the shared image.
    pub overlay: Overlay<File>,
    /// Called with the bytes written, then the bytes verified.
    pub tick: Box<dyn Fn(u64) + Send + Sync + 'a>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub bytes: u64,
    pub verified: bool,
}

#[derive(Debug)]
pub struct InterruptedError;

impl std::fmt::Display for InterruptedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted before the card was complete; its partition table was not written")
    }
}

impl std::error::Error for InterruptedError {}

/// Writes `extents` of the image to every card; one result per job, in order.
pub fn write_batch<R: Read + Seek>(
    image: &mut R,
    jobs: Vec<Job<'_>>,
    extents: &Extents,
    verify: bool,
    cancel: &AtomicBool,
) -> Vec<Result<Outcome>> {
    let (head, rest) = plan_chunks(extents);
    let bytes = extents.bytes();
    std::thread::scope(|scope| {
        let mut senders = Vec::new();
        let mut handles = Vec::new();
        for job in jobs {
            let (tx, rx) = sync_channel::<Msg>(IN_FLIGHT);
            senders.push(Some(tx));
            handles.push(scope.spawn(move || card(job, rx, bytes, verify, cancel)));
        }
        let read = feed(image, &rest, &head, &mut senders, cancel);
        drop(senders);
        handles
            .into_iter()
            .map(|h| {
                let result = h
                    .join()
                    .unwrap_or_else(|_| Err(anyhow!("card writer panicked")));
                match (&read, result) {
                    // A card that ended early because the image could not be read says why.
                    (Err(e), Err(_)) if !cancel.load(Ordering::Relaxed) => Err(anyhow!("{e:#}")),
                    (_, result) => result,
                }
            })
            .collect()
    })
}

/// The reader: each chunk read and hashed once, sent to every card still going.
fn feed<R: Read + Seek>(
    image: &mut R,
    rest: &[(u64, u64)],
    head: &[(u64, u64)],
    senders: &mut [Option<std::sync::mpsc::SyncSender<Msg>>],
    cancel: &AtomicBool,
) -> Result<()> {
    let mut send_all = |make: &dyn Fn() -> Msg| {
        for slot in senders.iter_mut() {
            if let Some(tx) = slot {
                // A card that failed has dropped its receiver: leave it out.
                if tx.send(make()).is_err() {
                    *slot = None;
                }
            }
        }
    };
    for (i, list) in [rest, head].into_iter().enumerate() {
        for &(start, len) in list {
            if cancel.load(Ordering::Relaxed) {
                return Ok(());
            }
            let mut buf = AlignedBuf::new(len.next_multiple_of(512) as usize);
            image.seek(std::io::SeekFrom::Start(start))?;
            image
                .read_exact(&mut buf.data_mut()[..len as usize])
                .with_context(|| format!("reading the image at byte {start}"))?;
            let sha256 = Sha256::digest(buf.data()).into();
            let piece = Arc::new(Piece {
                start,
                len,
                buf,
                sha256,
            });
            send_all(&|| Msg::Piece(piece.clone()));
        }
        if i == 0 {
            send_all(&|| Msg::Flush);
        }
    }
    send_all(&|| Msg::End);
    Ok(())
}

/// One card's writer: shared pieces as they are, pieces under its stamp patched.
fn card(
    mut job: Job<'_>,
    rx: Receiver<Msg>,
    bytes: u64,
    verify: bool,
    cancel: &AtomicBool,
) -> Result<Outcome> {
    let target = job.target;
    let path = target.info.path.display().to_string();
    let stamped = Extents::from_ranges(job.overlay.changed());
    let mut written = Vec::new();
    let mut complete = false;
    for msg in rx {
        match msg {
            Msg::Flush => target
                .file
                .sync_all()
                .with_context(|| format!("flushing {path}"))?,
            Msg::End => complete = true,
            Msg::Piece(piece) => {
                let (start, len) = (piece.start, piece.len);
                let own;
                let (data, sha256) = if stamped.intersects(start, start + len) {
                    let mut buf = AlignedBuf::new(piece.buf.len);
                    job.overlay
                        .read_at(start, &mut buf.data_mut()[..len as usize])
                        .with_context(|| format!("reading this card's stamp at byte {start}"))?;
                    let sha256 = Sha256::digest(buf.data()).into();
                    own = buf;
                    (own.data(), sha256)
                } else {
                    (piece.buf.data(), piece.sha256)
                };
                target
                    .file
                    .write_all_at(data, start)
                    .with_context(|| format!("writing {path} at byte {start}"))?;
                written.push(Written {
                    start,
                    len: data.len() as u64,
                    sha256,
                });
                (job.tick)(len);
            }
        }
    }
    if !complete {
        if cancel.load(Ordering::Relaxed) {
            bail!(InterruptedError);
        }
        bail!("the image could not be read to the end");
    }
    target.finish_writing()?;
    if !verify {
        return Ok(Outcome {
            bytes,
            verified: false,
        });
    }
    let reader = open_for_verify(target)?;
    let mut buf = AlignedBuf::new(CHUNK as usize);
    for piece in &written {
        if cancel.load(Ordering::Relaxed) {
            bail!(InterruptedError);
        }
        let data = &mut buf.data_mut()[..piece.len as usize];
        reader
            .read_exact_at(data, piece.start)
            .with_context(|| format!("reading back {path} at byte {}", piece.start))?;
        if Sha256::digest(&*data)[..] != piece.sha256[..] {
            bail!(
                "verification failed: {path} returned different data at bytes {}..{} than was written \
                 (a failing or counterfeit card?)",
                piece.start,
                piece.start + piece.len
            );
        }
        (job.tick)(piece.len.min(bytes));
    }
    Ok(Outcome {
        bytes,
        verified: true,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_mib_is_split_off_and_chunks_are_bounded() {
        let extents = Extents::from_ranges(vec![(0, 3 << 20), (100 << 20, (100 << 20) + 4096)]);
        let (head, rest) = plan_chunks(&extents);
        assert_eq!(head, vec![(0, FIRST_MIB)]);
        assert_eq!(rest, vec![(FIRST_MIB, 2 << 20), (100 << 20, 4096)]);
        let big = Extents::from_ranges(vec![(FIRST_MIB, FIRST_MIB + 40 * (1 << 20))]);
        assert!(plan_chunks(&big).1.iter().all(|(_, len)| *len <= CHUNK));
    }
}
