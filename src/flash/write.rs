//! Writing a batch of cards: one reader reads each chunk of the image once and
//! hands it to every card's writer, while other threads hash it, so N cards cost
//! one read and one hash of the image; only a chunk that holds a card's own
//! stamp is patched and hashed again for that card. The slowest card sets the
//! pace; a card that fails drops out and the others go on. On every card the
//! first MiB is written last. Then the reader goes through the image once more,
//! the chunks are checked against the hashes taken while writing, and every
//! card compares what it reads back (past the page cache on a device) with that
//! chunk: one more hash for the batch, not one per card. Without a read-back
//! nothing is hashed.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, sync_channel};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest, Sha256};

use super::map::Extents;
use super::target::Target;
use crate::cancel::Interrupted;
use crate::image::Overlay;

/// O_DIRECT writes of 16 MiB keep a card's queue busy: with 4 MiB, --full was
/// slower than dd on the same disk (bench/README.md).
pub const CHUNK: u64 = 16 << 20;
/// Zeroes are written from a buffer of this size when tables are erased.
const ERASE_PIECE: usize = 1 << 20;
/// O_DIRECT wants buffers, offsets and lengths aligned to the logical sector.
const DIRECT_ALIGN: usize = 4096;
/// Chunks queued for each card: the reader runs this far ahead of the slowest.
pub(super) const IN_FLIGHT: usize = 2;
/// Zeroes are looked for in blocks of this size (the ext4 block size of Pi OS
/// images)...
const ZERO_BLOCK: usize = 4096;
/// ...and a run of them is left out only from this length on, so the writes
/// stay large: a card's speed comes from long writes.
const MIN_HOLE: usize = 256 << 10;

#[derive(Default)]
pub(super) struct AlignedBuf {
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

    pub(super) fn data(&self) -> &[u8] {
        &self.raw[self.offset..self.offset + self.len]
    }

    fn data_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.offset..self.offset + self.len]
    }
}

/// Chunk buffers come back here once every card is done with them: a fresh
/// 16 MiB buffer per chunk cost the kernel a page fault and a zeroed page for
/// every 4 KiB of the image (a tenth of a 4-card batch's time on tmpfs).
#[derive(Clone, Default)]
pub(super) struct BufPool(Arc<Mutex<Vec<AlignedBuf>>>);

impl BufPool {
    /// A buffer of `len` bytes, at most `CHUNK`; its contents are left over.
    fn take(&self, len: usize) -> AlignedBuf {
        let mut buf = self
            .0
            .lock()
            .expect("the pool is never poisoned")
            .pop()
            .unwrap_or_else(|| AlignedBuf::new(CHUNK as usize));
        buf.len = len;
        buf
    }

    fn give(&self, buf: AlignedBuf) {
        self.0.lock().expect("the pool is never poisoned").push(buf);
    }
}

/// `(start, len)` pieces of the card, in the order they are written.
type Pieces = Vec<(u64, u64)>;

/// Splits the extents into chunks: those under the partition `tables`
/// (written last), and the rest.
fn plan_chunks(extents: &Extents, tables: &Extents) -> (Pieces, Pieces) {
    let rest = extents.minus(tables);
    let last = extents.minus(&rest);
    (chunks(&last), chunks(&rest))
}

/// The extents cut into pieces of at most `CHUNK`.
fn chunks(extents: &Extents) -> Pieces {
    let mut out = Vec::new();
    for &(start, end) in extents.ranges() {
        let mut at = start;
        while at < end {
            let len = (end - at).min(CHUNK);
            out.push((at, len));
            at += len;
        }
    }
    out
}

/// A chunk of the image, read once for all cards. Its data is padded with
/// zeroes to whole sectors for O_DIRECT: a card is longer than the image, and a
/// file target is cut back to the image's length afterwards.
pub(super) struct Piece {
    pub(super) start: u64,
    pub(super) len: u64,
    pub(super) buf: AlignedBuf,
    pool: BufPool,
    /// Where the data is not zeroes, found once for all cards that need it.
    data_runs: std::sync::OnceLock<Vec<(usize, usize)>>,
}

impl Piece {
    fn read(image: &File, start: u64, len: u64, pool: &BufPool) -> Result<Self> {
        Self::read_with(start, len, pool, |data| {
            image
                .read_exact_at(data, start)
                .with_context(|| format!("reading the image at byte {start}"))
        })
    }

    /// A piece filled by `read`, which is given exactly `len` bytes to fill.
    pub(super) fn read_with(
        start: u64,
        len: u64,
        pool: &BufPool,
        read: impl FnOnce(&mut [u8]) -> Result<()>,
    ) -> Result<Self> {
        let mut buf = pool.take(len.next_multiple_of(512) as usize);
        let (data, padding) = buf.data_mut().split_at_mut(len as usize);
        padding.fill(0);
        read(data)?;
        Ok(Self {
            start,
            len,
            buf,
            pool: pool.clone(),
            data_runs: std::sync::OnceLock::new(),
        })
    }

    pub(super) fn data_runs(&self) -> &[(usize, usize)] {
        self.data_runs.get_or_init(|| data_runs(self.buf.data()))
    }
}

/// The `(start, end)` ranges of `data` to write when runs of zeroes need not be
/// written: every run of at least `MIN_HOLE` whole zero blocks is left out.
/// Starts are multiples of `ZERO_BLOCK`, so O_DIRECT alignment is kept.
fn data_runs(data: &[u8]) -> Vec<(usize, usize)> {
    use super::zeroes::is_zero;
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut zeroes_from = None;
    let keep = |runs: &mut Vec<(usize, usize)>, start: usize, end: usize| match runs.last_mut() {
        Some(last) if last.1 == start => last.1 = end,
        _ => runs.push((start, end)),
    };
    for (i, block) in data.chunks(ZERO_BLOCK).enumerate() {
        let at = i * ZERO_BLOCK;
        let end = at + block.len();
        if is_zero(block) {
            zeroes_from.get_or_insert(at);
            continue;
        }
        if let Some(from) = zeroes_from.take() {
            if at - from < MIN_HOLE {
                keep(&mut runs, from, at);
            }
        }
        keep(&mut runs, at, end);
    }
    if let Some(from) = zeroes_from {
        if data.len() - from < MIN_HOLE {
            keep(&mut runs, from, data.len());
        }
    }
    runs
}

impl Drop for Piece {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buf));
    }
}

enum Msg {
    Piece(Arc<Piece>),
    /// Everything but the first MiB has been sent: flush it to the card.
    Flush,
    /// The whole image has been sent.
    End,
    /// A piece read from the image again for the read-back: a card's bytes are
    /// compared with it, and the reader checks its SHA-256 against the one taken
    /// while writing, so a batch hashes the image once more, not once per card.
    Check(Arc<Piece>),
    /// Every piece has been sent for checking, and each hashed as when written.
    Checked,
}

/// One card of the batch.
pub struct Job<'a> {
    pub target: &'a Target,
    /// This card's stamp over the shared image.
    pub overlay: Overlay<File>,
    /// Called with the bytes written, then the bytes verified.
    pub tick: Box<dyn Fn(Step, u64) + Send + Sync + 'a>,
}

/// Which pass a card's bytes were counted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Written,
    Verified,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub bytes: u64,
    pub verified: bool,
}

/// A card that failed or was interrupted: what it is left as, over why.
#[derive(Debug, thiserror::Error)]
#[error("{left}")]
pub(super) struct Failed {
    /// `ERASED`, or why it could not be.
    left: String,
    #[source]
    cause: anyhow::Error,
}

/// What a failed card is left as.
const ERASED: &str = "the card holds no partition table and will not boot (flash it again)";
const NOT_ERASED: &str = "its partition table could not be erased";

/// The interrupt of a card whose whole image was written or not.
fn interrupted(written: bool) -> anyhow::Error {
    Interrupted::when(if written {
        "while verifying: the card is not verified"
    } else {
        "before the card was complete"
    })
    .into()
}

/// How the cards are written.
#[derive(Debug, Clone, Copy)]
pub struct Mode {
    /// Read every card back and compare it with the image.
    pub verify: bool,
    /// Runs of zeroes are not written where the target already reads zeroes (a
    /// new file); off for --full, which writes every byte.
    pub sparse: bool,
}

/// What a batch writes.
pub struct Batch<'a> {
    /// The ranges of the image every card must hold.
    pub extents: &'a Extents,
    /// Where the image's partition tables lie: written after everything else
    /// is flushed, and erased (with every table the card held before) before
    /// the first write and again when a card fails.
    pub tables: &'a Extents,
    /// Ranges a first pass left on the cards (`prefill::prefill`, old tables
    /// erased): only the rest of `extents` and each card's stamp are written,
    /// and all of `extents` is read back.
    pub prefilled: Option<&'a Extents>,
    /// Asked before the tables go down; an error fails every card (the image's
    /// hash, worked out meanwhile, is not the one asked for).
    pub before_tables: &'a (dyn Fn() -> Result<()> + Sync),
    pub mode: Mode,
}

/// Writes the batch to every card; one result per job, in order.
pub fn write_batch(
    image: &File,
    jobs: Vec<Job<'_>>,
    batch: &Batch<'_>,
    cancel: &AtomicBool,
) -> Vec<Result<Outcome>> {
    let Batch {
        extents,
        tables,
        prefilled,
        before_tables,
        mode,
    } = *batch;
    let to_write = match prefilled {
        Some(done) => jobs.iter().fold(extents.minus(done), |all, job| {
            all.union(&Extents::from_ranges(job.overlay.changed()))
        }),
        None => extents.clone(),
    };
    let (head, rest) = plan_chunks(&to_write, tables);
    let on_card_already = chunks(&extents.minus(&to_write));
    let plan = CardPlan {
        bytes: extents.bytes(),
        already: extents.minus(&to_write).bytes(),
        continued: prefilled.is_some(),
    };
    std::thread::scope(|scope| {
        let mut senders = Vec::new();
        let mut handles = Vec::new();
        for job in jobs {
            let (tx, rx) = sync_channel::<Msg>(IN_FLIGHT);
            senders.push(Some(tx));
            handles.push(scope.spawn(move || card(job, rx, plan, tables, mode, cancel)));
        }
        let read = feed(
            image,
            [&rest, &head],
            &on_card_already,
            &mut senders,
            before_tables,
            mode.verify,
            cancel,
        );
        drop(senders);
        join_cards(handles, &read, cancel)
    })
}

/// Every card writer's result, in order; `read` is the reader's.
pub(super) fn join_cards<T>(
    handles: Vec<std::thread::ScopedJoinHandle<'_, Result<T>>>,
    read: &Result<()>,
    cancel: &AtomicBool,
) -> Vec<Result<T>> {
    handles
        .into_iter()
        .map(|h| {
            let result = h
                .join()
                .unwrap_or_else(|_| Err(anyhow!("card writer panicked")));
            explain(read, result, cancel)
        })
        .collect()
}

/// A card that ended early because the image could not be read says why.
fn explain<T>(read: &Result<()>, card: Result<T>, cancel: &AtomicBool) -> Result<T> {
    match (read, card) {
        (Err(e), Err(card)) if !cancel.load(Ordering::Relaxed) => {
            // The reader's error is every card's cause: each gets its words.
            Err(match card.downcast::<Failed>() {
                Ok(failed) => anyhow!(Failed {
                    cause: anyhow!("{e:#}"),
                    ..failed
                }),
                Err(card) => card,
            })
        }
        (_, result) => result,
    }
}

/// What each card of a batch is to do.
#[derive(Debug, Clone, Copy)]
struct CardPlan {
    /// Bytes of the image the card must hold.
    bytes: u64,
    /// Of those, the bytes a first pass left on it.
    already: u64,
    /// A first pass started the card: its old tables are erased, and a file
    /// is not emptied again.
    continued: bool,
}

/// The reader: each chunk read once and sent to every card still going (and
/// hashed, to verify); then, to verify, read and hashed once more and sent
/// again, with the pieces a first pass wrote (`on_card_already`).
fn feed(
    image: &File,
    [rest, head]: [&[(u64, u64)]; 2],
    on_card_already: &[(u64, u64)],
    senders: &mut [Option<std::sync::mpsc::SyncSender<Msg>>],
    before_tables: &(dyn Fn() -> Result<()> + Sync),
    verify: bool,
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
    let pool = BufPool::default();
    let mut written = Hashes::new();
    for (i, list) in [rest, head].into_iter().enumerate() {
        let deliver = &mut |piece: &Arc<Piece>| send_all(&|| Msg::Piece(piece.clone()));
        let Some(hashes) = read_pass(image, list, &pool, verify, cancel, deliver)? else {
            return Ok(());
        };
        written.extend(hashes);
        if i == 0 {
            before_tables()?;
            send_all(&|| Msg::Flush);
        }
    }
    send_all(&|| Msg::End);
    if !verify {
        return Ok(());
    }
    // Read back in the card's order, from its start. A card passes only on
    // `Checked`, sent once every piece it compared has hashed as when written.
    let mut checks: Vec<(u64, u64, Option<[u8; 32]>)> = written
        .iter()
        .map(|&(start, len, sha256)| (start, len, Some(sha256)))
        .chain(
            on_card_already
                .iter()
                .map(|&(start, len)| (start, len, None)),
        )
        .collect();
    checks.sort_unstable_by_key(|&(start, _, _)| start);
    let pieces: Vec<(u64, u64)> = checks.iter().map(|&(start, len, _)| (start, len)).collect();
    let deliver = &mut |piece: &Arc<Piece>| send_all(&|| Msg::Check(piece.clone()));
    let Some(again) = read_pass(image, &pieces, &pool, true, cancel, deliver)? else {
        return Ok(());
    };
    if let Some(&(start, len, _)) = checks
        .iter()
        .zip(&again)
        .find(|(a, b)| a.2.is_some_and(|sha256| sha256 != b.2))
        .map(|(a, _)| a)
    {
        bail!(
            "the image changed while it was being written (bytes {start}..{}); \
             the cards hold a mix of old and new",
            start + len
        );
    }
    send_all(&|| Msg::Checked);
    Ok(())
}

/// `(start, len, SHA-256)` of each piece read.
type Hashes = Vec<(u64, u64, [u8; 32])>;

/// Reads `pieces` of the image in order and `deliver`s each to the cards. With
/// `hash`, one thread per core hashes them meanwhile: SHA-256 of a 700 MiB map
/// takes 0.6 s of one core here, and done by the reader it held the cards
/// back. The hashes come sorted by start. None if cancelled.
fn read_pass(
    image: &File,
    pieces: &[(u64, u64)],
    pool: &BufPool,
    hash: bool,
    cancel: &AtomicBool,
    deliver: &mut dyn FnMut(&Arc<Piece>),
) -> Result<Option<Hashes>> {
    let hashers = if hash {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
    } else {
        0
    };
    let (to_hashers, from_reader) = sync_channel::<Arc<Piece>>(IN_FLIGHT * hashers);
    let from_reader = &Mutex::new(from_reader);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..hashers)
            .map(|_| {
                scope.spawn(move || {
                    let mut hashes = Hashes::new();
                    loop {
                        // The lock is held only to take the next piece.
                        let next = from_reader.lock().expect("no hasher panics").recv();
                        let Ok(piece) = next else { break };
                        let sha256 = Sha256::digest(piece.buf.data()).into();
                        hashes.push((piece.start, piece.len, sha256));
                    }
                    hashes
                })
            })
            .collect();
        for &(start, len) in pieces {
            if cancel.load(Ordering::Relaxed) {
                return Ok(None);
            }
            let piece = Arc::new(Piece::read(image, start, len, pool)?);
            deliver(&piece);
            if hash {
                to_hashers
                    .send(piece)
                    .expect("the hashers take pieces until the reader is done");
            }
        }
        drop(to_hashers);
        let mut hashes: Hashes = handles
            .into_iter()
            .flat_map(|h| h.join().expect("hashing does not panic"))
            .collect();
        hashes.sort_unstable_by_key(|&(start, _, _)| start);
        Ok(Some(hashes))
    })
}

/// One card, start to end: its old tables erased and flushed before anything
/// else is written (a file target starts empty); then written and read back;
/// and if anything fails, its tables erased again, so it is never left with a
/// partition table over half-new data.
fn card(
    job: Job<'_>,
    rx: Receiver<Msg>,
    plan: CardPlan,
    tables: &Extents,
    mode: Mode,
    cancel: &AtomicBool,
) -> Result<Outcome> {
    let target = job.target;
    let erase_set = target.erase_set(tables);
    if !plan.continued {
        start_card(target, &erase_set)?;
    }
    let error = match write_and_verify(job, rx, plan, mode, cancel) {
        Ok(outcome) => return Ok(outcome),
        Err(e) => e,
    };
    Err(erase_after(target, &erase_set, error))
}

/// Before a card's first write: a file emptied, a device's old tables erased
/// and flushed.
pub(super) fn start_card(target: &Target, erase_set: &Extents) -> Result<()> {
    target.start_writing()?;
    if target.info.block_device {
        erase(target, erase_set).context("erasing the card's old partition tables")?;
    }
    Ok(())
}

/// A card that failed or was interrupted gets its tables erased again; the
/// error says what it is left as, over its cause.
pub(super) fn erase_after(
    target: &Target,
    erase_set: &Extents,
    error: anyhow::Error,
) -> anyhow::Error {
    let left = match erase(target, erase_set) {
        Ok(()) => ERASED.to_string(),
        // One chain holds one cause: the erase's own failure is told in words.
        Err(why) => format!("{NOT_ERASED} ({why:#}): do not use this card"),
    };
    anyhow!(Failed { left, cause: error })
}

/// Writes zeroes over `set` and flushes them to the card.
fn erase(target: &Target, set: &Extents) -> Result<()> {
    let path = target.info.path.display();
    let zeroes = AlignedBuf::new(ERASE_PIECE);
    for &(start, end) in set.ranges() {
        let mut at = start;
        while at < end {
            let n = (end - at).min(ERASE_PIECE as u64);
            target
                .file
                .write_all_at(&zeroes.data()[..n as usize], at)
                .with_context(|| format!("writing zeroes to {path} at byte {at}"))?;
            at += n;
        }
    }
    target
        .file
        .sync_all()
        .with_context(|| format!("flushing {path}"))?;
    target.reread_partitions()
}

/// One card's writer: shared pieces as they are, pieces under its stamp patched.
/// Then the read-back: shared pieces compared with the image, stamped pieces
/// with the hash taken as they were written.
fn write_and_verify(
    mut job: Job<'_>,
    rx: Receiver<Msg>,
    plan: CardPlan,
    mode: Mode,
    cancel: &AtomicBool,
) -> Result<Outcome> {
    let bytes = plan.bytes;
    (job.tick)(Step::Written, plan.already);
    let target = job.target;
    let path = target.info.path.display().to_string();
    let ended_early = |written| {
        if cancel.load(Ordering::Relaxed) {
            interrupted(written)
        } else {
            anyhow!("the image could not be read to the end")
        }
    };
    let stamped = Extents::from_ranges(job.overlay.changed());
    // A new file reads as zeroes wherever nothing was written.
    let skip_zeroes = mode.sparse && !target.info.block_device;
    // start → SHA-256 of this card's own version of a stamped piece.
    let mut own_hashes = std::collections::HashMap::new();
    loop {
        match rx.recv().map_err(|_| ended_early(false))? {
            Msg::Flush => target
                .file
                .sync_all()
                .with_context(|| format!("flushing {path}"))?,
            Msg::End => break,
            Msg::Piece(piece) => {
                let (start, len) = (piece.start, piece.len);
                let (own, own_runs);
                let whole = [(0, piece.buf.len)];
                let (data, runs): (&[u8], &[(usize, usize)]) = if stamped
                    .intersects(start, start + len)
                {
                    let mut buf = AlignedBuf::new(piece.buf.len);
                    job.overlay
                        .read_at(start, &mut buf.data_mut()[..len as usize])
                        .with_context(|| format!("reading this card's stamp at byte {start}"))?;
                    if mode.verify {
                        own_hashes.insert(start, Sha256::digest(buf.data()));
                    }
                    own = buf;
                    own_runs = if skip_zeroes {
                        data_runs(own.data())
                    } else {
                        whole.to_vec()
                    };
                    (own.data(), &own_runs)
                } else if skip_zeroes {
                    (piece.buf.data(), piece.data_runs())
                } else {
                    (piece.buf.data(), &whole)
                };
                for &(from, to) in runs {
                    let at = start + from as u64;
                    target
                        .file
                        .write_all_at(&data[from..to], at)
                        .with_context(|| format!("writing {path} at byte {at}"))?;
                }
                (job.tick)(Step::Written, len);
            }
            Msg::Check(_) | Msg::Checked => unreachable!("checks follow the end"),
        }
    }
    target.finish_writing()?;
    if !mode.verify {
        return Ok(Outcome {
            bytes,
            verified: false,
        });
    }
    let reader = open_for_verify(target)?;
    let mut buf = AlignedBuf::new(CHUNK as usize);
    loop {
        let piece = match rx.recv().map_err(|_| ended_early(true))? {
            Msg::Check(piece) => piece,
            Msg::Checked => break,
            _ => unreachable!("only checks follow the end"),
        };
        let expected = piece.buf.data();
        let data = &mut buf.data_mut()[..expected.len()];
        reader
            .read_exact_at(data, piece.start)
            .with_context(|| format!("reading back {path} at byte {}", piece.start))?;
        let same = match own_hashes.get(&piece.start) {
            Some(own) => Sha256::digest(&*data) == *own,
            None => *data == *expected,
        };
        if !same {
            bail!(
                "verification failed: {path} returned different data at bytes {}..{} than was written \
                 (a failing or counterfeit card?)",
                piece.start,
                piece.start + piece.len
            );
        }
        (job.tick)(Step::Verified, piece.len);
    }
    Ok(Outcome {
        bytes,
        verified: true,
    })
}

/// A second handle for reading back. On a device, O_DIRECT: the bytes must come
/// from the card (a counterfeit one returns what it never stored), not from the
/// page cache. A file reads through the cache, as every other reader of it
/// will; its filesystem answers for the disk once the flush has succeeded.
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
    fn the_tables_are_split_off_and_chunks_are_bounded() {
        const MIB: u64 = 1 << 20;
        let extents = Extents::from_ranges(vec![(0, 3 * MIB), (100 * MIB, 100 * MIB + 4096)]);
        // A GPT image: the first MiB and the backup at the end.
        let tables = Extents::from_ranges(vec![(0, MIB), (100 * MIB, 101 * MIB)]);
        let (last, rest) = plan_chunks(&extents, &tables);
        assert_eq!(last, vec![(0, MIB), (100 * MIB, 4096)]);
        assert_eq!(rest, vec![(MIB, 2 * MIB)]);
        let big = Extents::from_ranges(vec![(MIB, 41 * MIB)]);
        assert!(
            plan_chunks(&big, &tables)
                .1
                .iter()
                .all(|(_, len)| *len <= CHUNK)
        );
    }

    #[test]
    fn long_runs_of_zeroes_are_left_out_and_short_ones_written() {
        let mut data = vec![0u8; 4 << 20];
        data[0] = 1; // block 0
        data[MIN_HOLE] = 2; // a gap of MIN_HOLE - 4 KiB before it: written
        let far = 2 << 20; // a gap of about 1.75 MiB before it: left out
        data[far + 5] = 3;
        let runs = data_runs(&data);
        assert_eq!(
            runs,
            vec![(0, MIN_HOLE + ZERO_BLOCK), (far, far + ZERO_BLOCK)]
        );
        // A short tail of zeroes is written; a long one is not (above).
        let short_tail = &data[..far + ZERO_BLOCK + 8192];
        assert_eq!(data_runs(short_tail).last(), Some(&(far, short_tail.len())));
        assert!(data_runs(&vec![0u8; CHUNK as usize]).is_empty());
        let odd = [7u8; 1000];
        assert_eq!(data_runs(&odd), vec![(0, 1000)]);
    }

    /// An image of `len` random bytes (no two chunks alike).
    fn image(dir: &std::path::Path, len: usize) -> std::path::PathBuf {
        let path = dir.join("image.img");
        let mut bytes = vec![0u8; len];
        getrandom::getrandom(&mut bytes).unwrap();
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// Flashes `image` to `cards` files; `after_writing` runs once, when every
    /// card has been written. The reader is then at most a few chunks into the
    /// read-back, so a change after the sixth chunk comes before its check.
    fn flash(
        image: &std::path::Path,
        cards: &[std::path::PathBuf],
        after_writing: impl Fn() + Send + Sync,
        cancel: &AtomicBool,
    ) -> Vec<Result<Outcome>> {
        let len = std::fs::metadata(image).unwrap().len();
        let extents = Extents::from_ranges(vec![(0, len)]);
        let targets: Vec<Target> = cards
            .iter()
            .map(|path| Target::open(&super::super::target::probe(path).unwrap(), len).unwrap())
            .collect();
        let written = std::sync::atomic::AtomicU64::new(0);
        let goal = len * cards.len() as u64;
        let after_writing = &after_writing;
        let written = &written;
        let jobs = targets
            .iter()
            .map(|target| Job {
                target,
                overlay: Overlay::new(File::open(image).unwrap()).unwrap(),
                tick: Box::new(move |_, n: u64| {
                    if written.fetch_add(n, Ordering::SeqCst) + n == goal {
                        after_writing();
                    }
                }),
            })
            .collect();
        write_batch(
            &File::open(image).unwrap(),
            jobs,
            &Batch {
                extents: &extents,
                tables: &Extents::from_ranges(vec![(0, 1 << 20)]),
                prefilled: None,
                before_tables: &|| Ok(()),
                mode: Mode {
                    verify: true,
                    sparse: true,
                },
            },
            cancel,
        )
    }

    /// Flips every bit of two bytes, so they differ whatever they were.
    fn poke(path: &std::path::Path, at: u64) {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut bytes = [0u8; 2];
        file.read_exact_at(&mut bytes, at).unwrap();
        file.write_all_at(&[!bytes[0], !bytes[1]], at).unwrap();
        file.sync_all().unwrap();
    }

    #[test]
    fn a_card_that_reads_back_other_bytes_fails_and_the_others_pass() {
        let dir = tempfile::TempDir::new().unwrap();
        let image = image(dir.path(), 100 << 20);
        let cards: Vec<_> = (1..=3)
            .map(|n| dir.path().join(format!("card{n}.img")))
            .collect();
        // In the chunk at 81..97 MiB, the seventh to be checked.
        let results = flash(
            &image,
            &cards,
            || poke(&cards[1], (95 << 20) + 7),
            &AtomicBool::new(false),
        );
        assert_eq!(
            results[0].as_ref().unwrap(),
            &Outcome {
                bytes: 100 << 20,
                verified: true
            }
        );
        let error = format!("{:#}", results[1].as_ref().unwrap_err());
        assert!(
            error.contains("verification failed")
                && error.contains(&format!("bytes {}..{}", 81 << 20, 97 << 20)),
            "{error}"
        );
        assert_erased(&cards[1], &error);
        assert!(results[2].as_ref().unwrap().verified);
        assert_eq!(
            std::fs::read(&cards[2]).unwrap(),
            std::fs::read(&image).unwrap()
        );
    }

    /// A failed or interrupted card is left with its first MiB (the partition
    /// table) zeroes, and its error says so.
    fn assert_erased(card: &std::path::Path, error: &str) {
        let data = std::fs::read(card).unwrap();
        assert!(
            data[..1 << 20].iter().all(|&b| b == 0),
            "the table of {} is erased",
            card.display()
        );
        assert!(error.contains("holds no partition table"), "{error}");
    }

    #[test]
    fn an_image_that_changes_during_the_write_fails_every_card() {
        let dir = tempfile::TempDir::new().unwrap();
        let image = image(dir.path(), 100 << 20);
        let cards: Vec<_> = (1..=2)
            .map(|n| dir.path().join(format!("card{n}.img")))
            .collect();
        let results = flash(
            &image,
            &cards,
            || poke(&image, 95 << 20),
            &AtomicBool::new(false),
        );
        for (result, card) in results.into_iter().zip(&cards) {
            let error = format!("{:#}", result.unwrap_err());
            assert!(
                error.contains("the image changed while it was being written"),
                "{error}"
            );
            assert_erased(card, &error);
        }
    }

    #[test]
    fn an_interrupted_read_back_says_the_card_is_not_verified_and_erases_it() {
        let dir = tempfile::TempDir::new().unwrap();
        let image = image(dir.path(), 100 << 20);
        let cards = [dir.path().join("card.img")];
        let cancel = AtomicBool::new(false);
        let results = flash(
            &image,
            &cards,
            || cancel.store(true, Ordering::SeqCst),
            &cancel,
        );
        let error = results.into_iter().next().unwrap().unwrap_err();
        assert!(crate::cancel::is_interrupted(&error), "{error:#}");
        assert!(
            format!("{error:#}").contains("while verifying: the card is not verified"),
            "{error:#}"
        );
        assert_erased(&cards[0], &format!("{error:#}"));
        let (card, image) = (
            std::fs::read(&cards[0]).unwrap(),
            std::fs::read(&image).unwrap(),
        );
        assert_eq!(card[1 << 20..], image[1 << 20..], "the rest was written");
    }
}
