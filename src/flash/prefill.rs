//! The first pass over the cards while an archive is still being decoded:
//! every piece that holds data is written as soon as it is decoded, to every
//! card. Nothing here needs the image's filesystems, which are only read once
//! the whole archive has decoded and checked out, so it is conservative: it
//! writes what data the image holds and leaves out runs of zeroes, whichever
//! the map will want. The second pass (`write::write_batch`) then writes what
//! the map wants that is not on the cards yet (the zeroes a filesystem needs,
//! each card's stamp) and, last, the partition tables.
//!
//! The tables are never written here: every card's old tables are erased and
//! flushed before the first piece, so a card that stops here, for any reason,
//! holds no partition table.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result, anyhow};

use super::map::{self, Extents};
use super::stream::Growing;
use super::target::Target;
use super::write::{BufPool, CHUNK, IN_FLIGHT, Piece, erase_after, join_cards, start_card};
use crate::image::Image;

/// What the first pass left on the cards.
pub struct Prefill {
    /// One per target, in order.
    pub results: Vec<Result<()>>,
    /// The byte ranges now on every card that did not fail.
    pub written: Extents,
}

enum Msg {
    /// A piece, and whether all of it is to be written (the map wants it), not
    /// only its data.
    Piece(Arc<Piece>, bool),
    /// Every piece was sent.
    Done,
}

/// Writes the data of `image` to every target as it is decoded, leaving out
/// `tables` (the image's partition tables, and conservatively wherever they
/// might be). `tick` hears the image bytes gone through.
/// Each target comes with what to tell of the bytes written to it.
pub fn prefill(
    image: &Growing,
    targets: &[(&Target, &(dyn Fn(u64) + Sync))],
    tables: &Extents,
    full: bool,
    cancel: &AtomicBool,
    tick: &(dyn Fn(u64) + Sync),
) -> Prefill {
    let written = std::sync::Mutex::new(Vec::new());
    let map = OnceLock::new();
    if full {
        let _ = map.set(Extents::from_ranges(vec![(0, image.len)]));
    }
    let results = std::thread::scope(|scope| {
        if !full {
            // The filesystems' metadata lies near their starts: once it has
            // decoded, the map is known, and what follows is written by it.
            let disk = image.disk();
            scope.spawn(|| {
                let mapped = Image::from_disk(disk).and_then(|disk| map::compute(&disk));
                if let Ok(mapped) = mapped {
                    let _ = map.set(mapped);
                }
            });
        }
        let mut senders = Vec::new();
        let mut handles = Vec::new();
        for &(target, written) in targets {
            let (tx, rx) = sync_channel::<Msg>(IN_FLIGHT);
            senders.push(Some(tx));
            handles.push(scope.spawn(move || card(target, rx, tables, cancel, written)));
        }
        let read = feed(image, tables, &map, &mut senders, &written, cancel, tick);
        drop(senders);
        join_cards(handles, &read, cancel)
    });
    let written = written.into_inner().unwrap_or_else(|e| e.into_inner());
    Prefill {
        results,
        written: Extents::from_ranges(written),
    }
}

/// The reader: each piece waited for, read once, and sent to every card still
/// going. Until the map is known, only what the decoder wrote (its holes are
/// zeroes, which the second pass writes where the map wants them), less runs
/// of zeroes; from then on, what the map names, zeroes and all.
fn feed(
    image: &Growing,
    tables: &Extents,
    map: &OnceLock<Extents>,
    senders: &mut [Option<SyncSender<Msg>>],
    written: &std::sync::Mutex<Vec<(u64, u64)>>,
    cancel: &AtomicBool,
    tick: &(dyn Fn(u64) + Sync),
) -> Result<()> {
    let pool = BufPool::default();
    let mut send_all = |msg: &dyn Fn() -> Msg| {
        for slot in senders.iter_mut() {
            if let Some(tx) = slot {
                if tx.send(msg()).is_err() {
                    *slot = None;
                }
            }
        }
    };
    let mut at = 0;
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Ok(());
        }
        let known = map.get();
        let next = match known {
            Some(map) => next_range(map, at, CHUNK),
            None => image.next_data(at, CHUNK)?,
        };
        let Some((start, end)) = next else { break };
        tick(end - at);
        at = end;
        for &(from, to) in Extents::from_ranges(vec![(start, end)])
            .minus(tables)
            .ranges()
        {
            let len = to - from;
            let piece = Arc::new(Piece::read_with(from, len, &pool, |data| {
                image.read_exact_at(data, from)
            })?);
            let mut written = written.lock().unwrap_or_else(|e| e.into_inner());
            if known.is_some() {
                written.push((from, to));
            } else {
                written.extend(
                    piece
                        .data_runs()
                        .iter()
                        .map(|&(a, b)| (from + a as u64, (from + b as u64).min(to))),
                );
            }
            drop(written);
            send_all(&|| Msg::Piece(piece.clone(), known.is_some()));
        }
    }
    tick(image.len.saturating_sub(at));
    send_all(&|| Msg::Done);
    Ok(())
}

/// The part of `extents` from `at` on, at most `max` bytes of one range.
fn next_range(extents: &Extents, at: u64, max: u64) -> Option<(u64, u64)> {
    let ranges = extents.ranges();
    let i = ranges.partition_point(|&(_, end)| end <= at);
    ranges.get(i).map(|&(start, end)| {
        let start = start.max(at);
        (start, end.min(start + max))
    })
}

/// One card: its old tables erased and flushed first, then the pieces' data;
/// on any failure its tables erased again.
fn card(
    target: &Target,
    rx: Receiver<Msg>,
    tables: &Extents,
    cancel: &AtomicBool,
    written: &(dyn Fn(u64) + Sync),
) -> Result<()> {
    let erase_set = target.erase_set(tables);
    start_card(target, &erase_set)?;
    let error = match write_pieces(target, rx, written) {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    let error = if cancel.load(Ordering::Relaxed) {
        // The decode stopped because it was told to.
        crate::cancel::Interrupted::when("before the card was complete").into()
    } else {
        error
    };
    Err(erase_after(target, &erase_set, error))
}

fn write_pieces(target: &Target, rx: Receiver<Msg>, written: &(dyn Fn(u64) + Sync)) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let path = target.info.path.display();
    loop {
        match rx.recv() {
            Ok(Msg::Piece(piece, whole)) => {
                let data = piece.buf.data();
                // A new file reads as zeroes already; a card does not.
                let all = [(0, data.len())];
                let runs = if whole && target.info.block_device {
                    &all[..]
                } else {
                    piece.data_runs()
                };
                for &(from, to) in runs {
                    let at = piece.start + from as u64;
                    target
                        .file
                        .write_all_at(&data[from..to], at)
                        .with_context(|| format!("writing {path} at byte {at}"))?;
                    written((to - from) as u64);
                }
            }
            Ok(Msg::Done) => return Ok(()),
            Err(_) => return Err(anyhow!("the archive could not be decoded to the end")),
        }
    }
}
