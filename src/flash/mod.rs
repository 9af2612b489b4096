//! `piprov flash`: one image to one card or a bench of cards. The image is
//! decoded once; each card gets its own stamp (hostname, activation) on a
//! copy-on-write overlay of it; the cards are written side by side, each
//! verified, and a failed card is reported while the others finish.
//!
//! One pipeline, whatever the source: checks → the image ([`feed`]: an archive
//! seen for the first time is written to the cards while it decodes) → map
//! (what must be written) → each [`Card`] stamped with its settings → write
//! (chunks, partition tables last) → verify (read back, compare hashes) → each
//! card's record, its activation kept or withdrawn.

pub mod bmap;
mod card;
pub mod devices;
mod feed;
pub mod map;
pub mod prefill;
pub mod source;
mod stamping;
pub mod stream;
pub mod target;
mod targets_file;
pub mod write;
pub mod xz;
pub mod zeroes;

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::cancel;
pub use crate::cmdline::FlashConfig;
use crate::image::Image;
use crate::progress::Progress;
use crate::recipe;
use crate::ssm::CardActivations;
use card::Card;
pub use card::{CardRecord, CardResult, CardSpec, VERIFYING};
use feed::{Fed, Feed};
use map::Extents;
use stamping::Stamping;
use target::{Policy, TargetInfo};
pub use targets_file::read_targets;

#[derive(Debug, Serialize)]
pub struct Summary {
    pub image_sha256: String,
    pub image_bytes: u64,
    pub mapped_bytes: u64,
    /// The cards were written while the archive was decoded (its first flash).
    pub decoded_while_writing: bool,
    /// `--as-is`: the image was written unchanged although it has critical findings.
    pub as_is: bool,
    pub cards: Vec<CardRecord>,
}

/// Where the map of what to write comes from.
#[derive(Debug, Clone, Default)]
pub enum BmapChoice {
    /// A `.bmap` beside the image, if there is one.
    #[default]
    Beside,
    /// This bmap file: it must describe the image, or nothing is written.
    File(PathBuf),
    /// Never a bmap: the map piprov computes.
    Ignore,
}

/// Around the error of a flash that failed after the cards were written to:
/// each was left with no partition table (plainly not a card). Exit status 1,
/// where 2 says no card was touched.
#[derive(Debug, thiserror::Error)]
#[error("the cards were written in part and hold no partition table: they will not boot ({0})")]
pub struct CardsLeftBlank(&'static str);

const AFTER_BAD_IMAGE: &str = "flash them again once the image is right";
const AFTER_INTERRUPT: &str = "flash them again";

/// Stops with an interrupt, before any card was written, once `cancel` is set.
fn stop_if_cancelled(cancel: &AtomicBool, during: &str) -> Result<()> {
    cancel::check(cancel).map_err(|e| feed::no_card_written(e, during))
}

/// Flashes the cards `config` names. `cancel` is the caller's (Ctrl-C for the
/// command line, a second signal for the station): every long step checks it,
/// and cards already written to are erased to no partition table.
pub fn flash(
    config: &FlashConfig,
    progress: &Progress,
    cancel: &'static AtomicBool,
) -> Result<Summary> {
    // A card's time counts from here: the decode it waited for is its time too.
    let started = Instant::now();
    refuse_duplicates(&config.cards)?;
    stamping::refuse_settings_without_recipe(config)?;
    let stamping = match &config.recipe {
        Some(path) => Some(Stamping::read(
            config,
            recipe::load(path, &config.overrides)?,
        )?),
        None => None,
    };
    // Without a recipe the image goes on every card as it is, so it is audited
    // first; that needs it whole, so an archive is decoded before any card.
    let audit = stamping.is_none() && !config.as_is;
    let feed = Feed::open(config, !audit, decode_limit(config)?, progress, cancel)?;
    if audit {
        refuse_hazards(config, feed.path())?;
    }
    let infos = check_targets(config, &[feed.path()], feed.len())?;
    confirm(&infos, config.yes)?;
    stop_if_cancelled(cancel, "after the checks")?;
    let mut cards = open_cards(config, infos, feed.len(), progress)?;
    let mut fed = feed.into_fed(&mut cards, config, progress, cancel)?;
    let summary = finish(
        config,
        stamping.as_ref(),
        cards,
        &fed,
        started,
        progress,
        cancel,
    );
    fed.keep(progress);
    let summary = summary?;
    if cancel.load(Ordering::Relaxed) {
        return Ok(summary);
    }
    // Hashed while written, and not the image asked for: the check before the
    // tables failed every card.
    fed.hash
        .wait()
        .and_then(|sha256| {
            let hashed = source::Source {
                sha256,
                ..fed.source.clone()
            };
            source::check_expected(&config.image, hashed, config.sha256.as_deref())
        })
        .map_err(|e| e.context(CardsLeftBlank(AFTER_BAD_IMAGE)))?;
    Ok(summary)
}

/// How far an archive may decode: `--max-size`; else, when every target is a
/// device, the largest one's size (an image larger than every card could go
/// nowhere); else (card-image files) the default.
fn decode_limit(config: &FlashConfig) -> Result<source::DecodeLimit> {
    if let Some(bytes) = config.max_size {
        return Ok(source::DecodeLimit {
            bytes,
            why: "the --max-size",
        });
    }
    let mut largest = 0;
    for card in &config.cards {
        let info = target::probe(&card.device)?;
        if !info.block_device {
            return Ok(source::DecodeLimit::DEFAULT);
        }
        largest = largest.max(info.size);
    }
    Ok(source::DecodeLimit {
        bytes: largest,
        why: "more than the largest target card holds",
    })
}

/// Every card opened before anything is written.
fn open_cards(
    config: &FlashConfig,
    infos: Vec<TargetInfo>,
    len: u64,
    progress: &Progress,
) -> Result<Vec<Card>> {
    config
        .cards
        .iter()
        .zip(infos)
        .map(|(spec, info)| Card::open(spec.clone(), info, len, progress))
        .collect()
}

/// The image's map, and where its partition tables lie.
fn map_image(
    config: &FlashConfig,
    source: &source::Source,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<(Extents, Extents)> {
    // Image::open names the file it reads; a decoded image is named by its archive.
    let base = if source.path == config.image {
        Image::open(&source.path)?
    } else {
        Image::open(&source.path)
            .with_context(|| format!("reading the image decoded from {}", config.image.display()))?
    };
    let base_map = choose_map(config, source, &base, progress, cancel)?;
    // Written last and erased again if the card fails: the partition tables.
    let tables = base.table().locations(source.len);
    progress.say(&format!(
        "{}: {} bytes ({}), {} to write{}",
        config.image.display(),
        source.len,
        source.format.name(),
        base_map.bytes(),
        if config.full {
            " (--full)"
        } else {
            " (allocated data only)"
        }
    ));
    Ok((base_map, tables))
}

/// The image mapped, every card stamped (activations created on the way),
/// written and verified; one record per card, in order.
fn finish(
    config: &FlashConfig,
    stamping: Option<&Stamping>,
    mut cards: Vec<Card>,
    fed: &Fed,
    started: Instant,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<Summary> {
    let source = &fed.source;
    let (base_map, tables) = map_image(config, source, progress, cancel).map_err(|e| {
        // After a first pass the cards hold data but no tables.
        if fed.prefilled.is_some() {
            e.context(CardsLeftBlank(AFTER_BAD_IMAGE))
        } else {
            e
        }
    })?;
    // Each card stamped in memory before anything more is written; on an
    // error the activations made so far are dropped, and so withdrawn.
    stamp_cards(config, stamping, &mut cards, fed, cancel)?;
    stop_if_cancelled(cancel, "while the cards were prepared")?;
    let results = write_cards(
        config, &mut cards, fed, &base_map, &tables, progress, cancel,
    );
    let sha256 = fed.hash.wait().unwrap_or_default();
    let records: Vec<CardRecord> = cards
        .into_iter()
        .zip(results)
        .map(|(card, result)| {
            let mut record = card.record(result, &sha256, started);
            record.as_is = config.as_is;
            progress.event(&serde_json::json!({"event": "card", "card": &record}));
            record
        })
        .collect();
    if let Some(path) = &config.manifest {
        write_manifest(path, &records)?;
    }
    Ok(Summary {
        image_sha256: sha256,
        image_bytes: source.len,
        mapped_bytes: base_map.bytes(),
        decoded_while_writing: fed.prefilled.is_some(),
        as_is: config.as_is,
        cards: records,
    })
}

/// One line per card, appended: a bench's manifest grows batch by batch.
fn write_manifest(path: &Path, records: &[CardRecord]) -> Result<()> {
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening the manifest {}", path.display()))?;
    for record in records {
        writeln!(out, "{}", serde_json::to_string(record)?)
            .with_context(|| format!("writing the manifest {}", path.display()))?;
    }
    Ok(())
}

/// Stamps every card still going with its settings, each with its own
/// activation when the recipe makes one per card.
fn stamp_cards(
    config: &FlashConfig,
    stamping: Option<&Stamping>,
    cards: &mut [Card],
    fed: &Fed,
    cancel: &AtomicBool,
) -> Result<()> {
    let mut issuer: Option<Arc<CardActivations>> = None;
    // Activations are tagged with the image's hash. The expected one when it
    // is given (the station's): an image it does not match fails every card,
    // and their activations go. Else an image hashed for the first time is
    // waited for here.
    let image_sha256 = || match config.sha256.as_deref() {
        Some(expected) => Ok(expected.to_ascii_lowercase()),
        None => fed.hash.wait(),
    };
    for (i, card) in cards.iter_mut().enumerate() {
        stop_if_cancelled(cancel, "while the cards were prepared")?;
        // A card that failed already gets no stamp, and no activation.
        if !card.is_going() {
            continue;
        }
        let settings = match stamping {
            Some(stamping) => {
                let settings = stamping.cards[i].clone();
                if settings.needs_activation() && issuer.is_none() {
                    issuer = Some(Arc::new(CardActivations::for_recipe(
                        &config.aws.connection(),
                        &stamping.recipe.recipe,
                    )?));
                }
                Some(settings)
            }
            None => None,
        };
        card.stamp(&fed.source.path, settings, issuer.as_ref(), &image_sha256)
            .with_context(|| format!("stamping {}", card.spec.device.display()))?;
    }
    Ok(())
}

/// Writes the stamped cards side by side: one result per card, in order
/// (none for a card that had failed before).
fn write_cards(
    config: &FlashConfig,
    cards: &mut [Card],
    fed: &Fed,
    base_map: &Extents,
    tables: &Extents,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Vec<Option<Result<write::Outcome>>> {
    let source = &fed.source;
    let prefilled = fed.prefilled.as_ref();
    // One set of ranges for the batch: the image's, plus every card's stamp.
    let extents = cards
        .iter()
        .fold(base_map.clone(), |all, card| all.union(&card.stamped))
        .aligned(source.len);
    // What is still to write (a first pass while decoding wrote the rest),
    // then everything read back.
    let to_write = match prefilled {
        Some(done) => extents.minus(done).bytes(),
        None => extents.bytes(),
    };
    let per_card = to_write + if config.verify() { extents.bytes() } else { 0 };
    let going = cards.iter().filter(|c| c.is_going()).count() as u64;
    let total = progress.bytes("total", per_card * going);
    let overlays: Vec<_> = cards.iter_mut().map(|card| card.overlay.take()).collect();
    let mut jobs = Vec::new();
    for (card, overlay) in cards.iter().zip(overlays) {
        let Ok(target) = &card.target else {
            continue;
        };
        let bar = card.bar.clone();
        bar.set_length(bar.position() + per_card);
        let total = total.clone();
        // The card's bar and the batch total advance together.
        let tick = Box::new(move |step: write::Step, n: u64| {
            if step == write::Step::Verified && bar.message() != VERIFYING {
                bar.set_message(VERIFYING);
            }
            bar.inc(n);
            total.inc(n);
        });
        jobs.push(write::Job {
            target,
            overlay: overlay.expect("every card going was stamped"),
            tick,
        });
    }
    let mode = write::Mode {
        verify: config.verify(),
        sparse: !config.full,
    };
    let results = match File::open(&source.path) {
        Ok(image) => write::write_batch(
            &image,
            jobs,
            &write::Batch {
                extents: &extents,
                tables,
                prefilled,
                before_tables: &|| {
                    let sha256 = fed.hash.wait()?;
                    let hashed = source::Source {
                        sha256,
                        ..source.clone()
                    };
                    source::check_expected(&config.image, hashed, config.sha256.as_deref())
                        .map(drop)
                },
                mode,
            },
            cancel,
        ),
        Err(e) => {
            // The image cannot be read: each card's own error says so.
            jobs.iter()
                .map(|_| {
                    Err(
                        anyhow::Error::new(std::io::Error::new(e.kind(), e.to_string()))
                            .context(format!("opening {}", source.path.display())),
                    )
                })
                .collect()
        }
    };
    total.finish_and_clear();
    let mut results = results.into_iter();
    cards
        .iter()
        .map(|card| {
            card.is_going()
                .then(|| results.next().expect("one result per job"))
        })
        .collect()
}

/// An image written without a recipe goes on every card as it is: one with
/// critical findings (a baked registration, its key, a machine-id, host keys)
/// would make every card a clone of it. `--as-is` overrules.
fn refuse_hazards(config: &FlashConfig, image: &Path) -> Result<()> {
    let report = crate::inspect::inspect(image, source::DecodeLimit::DEFAULT)
        .with_context(|| format!("auditing {}", config.image.display()))?;
    let critical: Vec<String> = report
        .findings
        .iter()
        .filter(|f| f.severity == crate::inspect::Severity::Critical)
        .map(|f| format!("  - {}", f.summary))
        .collect();
    if !critical.is_empty() {
        bail!(
            "{} has critical findings; written as it is, every card would be a clone of it:\n{}\n\
             Give --recipe (each card is stamped and gets its own identity), or `piprov stamp` \
             the image first; --as-is writes it unchanged anyway",
            config.image.display(),
            critical.join("\n")
        );
    }
    if let Some(stamp) = &report.facts.stamp {
        let single =
            stamp["activation"]["source"] == "embedded" && stamp["activation"]["id"].is_string();
        if single && config.cards.len() > 1 {
            bail!(
                "{} is stamped with one card's activation ({}): an embedded activation registers \
                 one card, so all but one of {} would end `failed`; flash with --recipe (each \
                 card its own activation)",
                config.image.display(),
                stamp["activation"]["id"].as_str().unwrap_or_default(),
                config.cards.len()
            );
        }
    }
    Ok(())
}

fn refuse_duplicates(cards: &[CardSpec]) -> Result<()> {
    let mut seen = std::collections::BTreeSet::new();
    for card in cards {
        let key = std::fs::canonicalize(&card.device).unwrap_or_else(|_| card.device.clone());
        if !seen.insert(key) {
            bail!("{} is listed twice", card.device.display());
        }
    }
    Ok(())
}

/// What to write: every byte with --full; otherwise the map piprov computes
/// from the filesystems, joined with a bmap that checks out against the image.
/// Both, because a bmap names the blocks the image file had allocated, and a
/// block of zeroes the filesystem needs (an inode table block) may be a hole
/// that bmaptool never writes, which on a used card leaves old bytes there.
fn choose_map(
    config: &FlashConfig,
    source: &source::Source,
    base: &Image<File>,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<Extents> {
    if config.full {
        return Ok(Extents::from_ranges(vec![(0, source.len)]));
    }
    let computed =
        map::compute(base).with_context(|| format!("mapping {}", config.image.display()))?;
    let (path, explicit) = match &config.bmap_choice() {
        BmapChoice::Ignore => return Ok(computed),
        BmapChoice::File(path) => (path.clone(), true),
        BmapChoice::Beside => match bmap::find_beside(&config.image) {
            Some(path) => (path, false),
            None => return Ok(computed),
        },
    };
    let image =
        File::open(&source.path).with_context(|| format!("opening {}", source.path.display()))?;
    let checked = bmap::Bmap::load(&path).and_then(|bmap| {
        bmap.check_image(&image, source.len, cancel)?;
        cancel::check(cancel)?;
        Ok(bmap)
    });
    match checked {
        Ok(bmap) => Ok(computed.union(&bmap.extents()).aligned(source.len)),
        Err(e) if explicit || cancel::is_interrupted(&e) => Err(e),
        Err(e) => {
            // Found, not asked for: the computed map is right for any image, so a
            // stale bmap need not stop the bench; it is said loudly.
            progress.warn(&format!(
                "warning: ignoring {}: {e:#}; writing the map piprov computes from the \
                 filesystems instead (--no-bmap to skip the check)",
                path.display()
            ));
            Ok(computed)
        }
    }
}

/// Probes and checks every target (each must hold `len` bytes); refuses the
/// image itself, or the file it is decoded into, as a target.
fn check_targets(config: &FlashConfig, decoded: &[&Path], len: u64) -> Result<Vec<TargetInfo>> {
    // Writing over the image being read would destroy it.
    let sources: Vec<_> = std::iter::once(config.image.as_path())
        .chain(decoded.iter().copied())
        .map(|p| std::fs::canonicalize(p).ok())
        .collect();
    for card in &config.cards {
        let target = std::fs::canonicalize(&card.device).ok();
        if target.is_some() && sources.contains(&target) {
            bail!(
                "refusing {}: it is the image being written",
                card.device.display()
            );
        }
    }
    let policy = Policy {
        required: len,
        allow_non_removable: config.allow_non_removable,
        allow_large: config.allow_large,
    };
    let mut infos = Vec::new();
    for card in &config.cards {
        let info = target::probe(&card.device)?;
        target::check(&info, &policy)?;
        infos.push(info);
    }
    Ok(infos)
}

fn confirm(targets: &[TargetInfo], yes: bool) -> Result<()> {
    let needs = targets
        .iter()
        .filter(|t| t.existing_data)
        .collect::<Vec<_>>();
    if needs.is_empty() || yes {
        return Ok(());
    }
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        bail!(
            "refusing to overwrite {} without confirmation: pass --yes",
            needs
                .iter()
                .map(|t| t.path.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    eprintln!("piprov will ERASE everything on:");
    for t in &needs {
        eprintln!("  {}", t.describe());
    }
    eprint!("Type yes to go on: ");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if answer.trim() != "yes" {
        bail!("not confirmed; nothing was written");
    }
    Ok(())
}
