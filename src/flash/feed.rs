//! Where a batch's image comes from: whole on disk already (the cache, a raw
//! image), or an xz archive seen for the first time, whose stream is written
//! to the cards while it decodes. Either way the batch goes on from a [`Fed`]:
//! the image on disk, its hash, and what a first pass left on the cards.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use anyhow::Result;

use super::card::Card;
use super::map::Extents;
use super::source::{self, Source};
use super::{CardsLeftBlank, prefill, stream, target};
use crate::cancel::{Interrupted, is_interrupted};
use crate::cmdline::FlashConfig;
use crate::digest::ImageHash;
use crate::progress::Progress;

pub(super) enum Feed {
    /// On disk whole, hashed already or hashed while it is written.
    Ready { source: Source, hash: ImageHash },
    /// An xz archive not yet in the cache, of `len` bytes by its index.
    Decoding { entry: source::Entry, len: u64 },
}

/// The image every card is finished from.
pub(super) struct Fed {
    pub source: Source,
    pub hash: ImageHash,
    /// What a first pass, while the archive decoded, left on every card.
    pub prefilled: Option<Extents>,
    /// The decoded image being made durable in the cache.
    keeping: Option<stream::Keeping>,
}

impl Feed {
    /// The image `config` names. `may_stream`: the cards may be written while
    /// an archive decodes (an image audited first must be whole before).
    pub fn open(
        config: &FlashConfig,
        may_stream: bool,
        limit: source::DecodeLimit,
        progress: &Progress,
        cancel: &'static AtomicBool,
    ) -> Result<Feed> {
        let opened = source::open_for_flash(
            &config.image,
            config.sha256.as_deref(),
            may_stream,
            limit,
            progress,
            cancel,
        )
        .map_err(|e| no_card_written(e, "while the image was read"))?;
        Ok(match opened {
            source::Opened::Streamable { entry, len } => Feed::Decoding { entry, len },
            source::Opened::Ready(source) => {
                let hash = ImageHash::Known(source.sha256.clone());
                Feed::Ready { source, hash }
            }
            source::Opened::Unhashed(source) => {
                let hash = ImageHash::start(&source.path, source.len, cancel)?;
                Feed::Ready { source, hash }
            }
        })
    }

    /// The file the image is (or is being decoded) in: never a target.
    pub fn path(&self) -> &Path {
        match self {
            Feed::Ready { source, .. } => &source.path,
            Feed::Decoding { entry, .. } => &entry.partial,
        }
    }

    pub fn len(&self) -> u64 {
        match self {
            Feed::Ready { source, .. } => source.len,
            Feed::Decoding { len, .. } => *len,
        }
    }

    /// The image whole on disk; an archive's data written to `cards` on the
    /// way, its partition tables kept off them. A card that fails on the way
    /// is failed; an error of the decode fails them all (left blank).
    pub fn into_fed(
        self,
        cards: &mut [Card],
        config: &FlashConfig,
        progress: &Progress,
        cancel: &'static AtomicBool,
    ) -> Result<Fed> {
        match self {
            Feed::Ready { source, hash } => Ok(Fed {
                source,
                hash,
                prefilled: None,
                keeping: None,
            }),
            Feed::Decoding { entry, len } => {
                decode_onto(entry, len, cards, config, progress, cancel)
            }
        }
    }
}

impl Fed {
    /// Waits for the decoded image to be durable in the cache; a failure only
    /// costs the next flash its decode, so it is a warning.
    pub fn keep(&mut self, progress: &Progress) {
        if let Some(keeping) = self.keeping.take()
            && let Err(e) = keeping.wait()
        {
            progress.warn(&format!(
                "warning: the decoded image is not kept in the cache: {e:#}"
            ));
        }
    }
}

impl Drop for Fed {
    fn drop(&mut self) {
        if let Some(keeping) = self.keeping.take() {
            let _ = keeping.wait();
        }
    }
}

fn decode_onto(
    entry: source::Entry,
    len: u64,
    cards: &mut [Card],
    config: &FlashConfig,
    progress: &Progress,
    cancel: &'static AtomicBool,
) -> Result<Fed> {
    let growing = stream::Growing::start(entry, source::Format::Xz, len, cancel)?;
    let mut head = vec![0u8; 8192.min(len as usize)];
    if let Err(e) = growing.read_exact_at(&mut head, 0) {
        // Nothing is written to a card before its head has decoded.
        let e = growing.finish().err().unwrap_or(e);
        let e = e.context(format!("decoding {}", config.image.display()));
        return Err(no_card_written(e, "while the archive was decoded"));
    }
    progress.say(&format!(
        "{}: {len} bytes (xz), written while it is decoded",
        config.image.display()
    ));
    let prefill = {
        let bar = progress.bytes("decoded", len);
        let going: Vec<&Card> = cards.iter().filter(|c| c.is_going()).collect();
        let ticks: Vec<Box<dyn Fn(u64) + Sync>> = going
            .iter()
            .map(|card| {
                let bar = card.bar.clone();
                Box::new(move |n| bar.inc(n)) as Box<dyn Fn(u64) + Sync>
            })
            .collect();
        let open: Vec<(&target::Target, &(dyn Fn(u64) + Sync))> = going
            .iter()
            .zip(&ticks)
            .filter_map(|(card, tick)| card.target.as_ref().ok().map(|t| (t, tick.as_ref())))
            .collect();
        let tables = maybe_tables(&head, len);
        let done = prefill::prefill(&growing, &open, &tables, config.full, cancel, &|n| {
            bar.inc(n)
        });
        bar.finish_and_clear();
        done
    };
    let (source, keeping) = growing.finish().map_err(|e| {
        if is_interrupted(&e) {
            anyhow::Error::new(Interrupted::when("while the archive was decoded"))
                .context(CardsLeftBlank(super::AFTER_INTERRUPT))
        } else {
            e.context(CardsLeftBlank(super::AFTER_BAD_IMAGE))
        }
    })?;
    let mut fed = Fed {
        hash: ImageHash::Known(source.sha256.clone()),
        source,
        prefilled: Some(prefill.written),
        keeping: Some(keeping),
    };
    fed.source =
        match source::check_expected(&config.image, fed.source.clone(), config.sha256.as_deref()) {
            Ok(source) => source,
            Err(e) => {
                fed.keep(progress);
                return Err(e.context(CardsLeftBlank(super::AFTER_BAD_IMAGE)));
            }
        };
    let mut results = prefill.results.into_iter();
    for card in cards.iter_mut().filter(|c| c.is_going()) {
        if let Some(Err(e)) = results.next() {
            card.fail(e);
        }
    }
    Ok(fed)
}

/// `e`, unless it is a step stopped by the cancel before any card was
/// written: then that interrupt, named by when it came.
pub(super) fn no_card_written(e: anyhow::Error, during: &str) -> anyhow::Error {
    if is_interrupted(&e) {
        Interrupted::when(format!("{during}; no card was written")).into()
    } else {
        e
    }
}

/// Wherever the image's partition tables might lie, from its first 8 KiB and
/// its length, before the table itself is parsed: kept off the cards until the
/// end.
fn maybe_tables(head: &[u8], len: u64) -> Extents {
    const MIB: u64 = 1 << 20;
    crate::image::tables_on_disk(head, len)
        .union(&Extents::from_ranges(vec![
            (0, MIB.min(len)),
            (len.saturating_sub(MIB), len),
        ]))
        .aligned(len)
}
