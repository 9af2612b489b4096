//! `piprov flash`: one image to one card or a bench of cards. The image is
//! decoded once; each card gets its own stamp (hostname, activation) on a
//! copy-on-write overlay of it; the cards are written side by side, each
//! verified, and a failed card is reported while the others finish.
//!
//! The data path, top to bottom: source (decode, cache, hash) → map (what must
//! be written) → overlay + stamp (this card's settings) → write (chunks, first
//! MiB last) → verify (read back, compare hashes).

pub mod bmap;
pub mod devices;
pub mod map;
pub mod prefill;
pub mod source;
pub mod stream;
pub mod target;
pub mod write;
pub mod xz;
pub mod zeroes;

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::Serialize;

pub use crate::cmdline::FlashConfig;
use crate::digest::ImageHash;
use crate::image::{Image, Overlay};
use crate::progress::Progress;
use crate::recipe::{self, LoadedRecipe};
use crate::ssm::{CardActivations, Issued};
use crate::stamp::{self, CardSettings};
use map::Extents;
use target::{Policy, TargetInfo};

/// One card of a batch and what is particular to it.
#[derive(Debug, Clone)]
pub struct CardSpec {
    pub device: PathBuf,
    pub hostname: Option<String>,
    /// Extra `key=value` recipe overrides for this card.
    pub overrides: Vec<String>,
}

/// One manifest line: what became of one card. Never holds a secret.
#[derive(Debug, Clone, Serialize)]
pub struct CardRecord {
    pub device: String,
    pub model: Option<String>,
    pub serial: Option<String>,
    pub hostname: Option<String>,
    pub activation_id: Option<String>,
    /// The card's own activation was deleted again because the card failed.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub activation_deleted: bool,
    /// Written unchanged with `--as-is`, its audit's critical findings overruled.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub as_is: bool,
    pub image_sha256: String,
    pub bytes_written: u64,
    pub verified: bool,
    pub result: CardResult,
    pub error: Option<String>,
    pub seconds: f64,
    pub finished_at: String,
}

/// How a card ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CardResult {
    /// Written (and verified, unless asked not to).
    Ok,
    Failed,
    /// Stopped by the caller's cancel: erased to no partition table.
    Interrupted,
}

impl CardResult {
    pub fn name(self) -> &'static str {
        match self {
            CardResult::Ok => "ok",
            CardResult::Failed => "failed",
            CardResult::Interrupted => "interrupted",
        }
    }
}

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

/// The error for an interrupt before any card was written.
#[derive(Debug)]
pub struct Interrupted(pub String);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "interrupted {}; no card was written", self.0)
    }
}

impl std::error::Error for Interrupted {}

fn cancelled(cancel: &AtomicBool, during: &str) -> Result<()> {
    if cancel.load(Ordering::Relaxed) {
        bail!(Interrupted(during.to_string()));
    }
    Ok(())
}

/// `e`, unless it is a step stopped by Ctrl-C before any card was written:
/// then that interrupt, named by when it came.
fn unless_interrupted(e: anyhow::Error, during: &str) -> anyhow::Error {
    match e.downcast_ref::<crate::digest::Cancelled>() {
        Some(_) => anyhow::anyhow!(Interrupted(during.to_string())),
        None => e,
    }
}

/// Parses a targets file: `device,hostname[,key=value…]` per record (CSV: a
/// quoted field may hold commas); `#` comments and a header record starting
/// with `device` are skipped.
pub fn read_targets(path: &Path) -> Result<Vec<CardSpec>> {
    let file = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .comment(Some(b'#'))
        .from_reader(file);
    let mut cards = Vec::new();
    for record in reader.records() {
        let record = record.with_context(|| format!("reading {}", path.display()))?;
        let line = record.position().map_or(0, |p| p.line());
        // A quoted cell may hold a line break; on a card it would be a
        // setting of its own.
        if let Some(cell) = record.iter().find(|f| f.chars().any(char::is_control)) {
            bail!(
                "{} line {line}: {cell:?} holds a control character (a line break in a quoted cell?)",
                path.display()
            );
        }
        let mut fields = record.iter();
        let device = fields.next().unwrap_or_default();
        if device == "device" || record.iter().all(str::is_empty) {
            continue;
        }
        if device.is_empty() {
            bail!("{} line {line}: no device", path.display());
        }
        let hostname = fields.next().filter(|h| !h.is_empty()).map(str::to_string);
        let overrides: Vec<String> = fields
            .filter(|f| !f.is_empty())
            .map(str::to_string)
            .collect();
        if let Some(bad) = overrides.iter().find(|o| !o.contains('=')) {
            bail!("{} line {line}: {bad:?} is not key=value", path.display());
        }
        cards.push(CardSpec {
            device: device.into(),
            hostname,
            overrides,
        });
    }
    if cards.is_empty() {
        bail!("{} lists no targets", path.display());
    }
    Ok(cards)
}

struct PreparedCard {
    spec: CardSpec,
    info: TargetInfo,
    /// Opened before anything is written; a file that cannot be created fails
    /// only its own card.
    target: Result<target::Target>,
    /// This card's stamp over the shared image; taken by the writer.
    overlay: Option<Overlay<File>>,
    extents: Extents,
    hostname: Option<String>,
    /// The activation the card holds: its own, or the recipe's shared one.
    activation_id: Option<String>,
    /// This card's own activation, withdrawn unless the card is written.
    activation: Option<Issued>,
    bar: indicatif::ProgressBar,
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
    refuse_settings_without_recipe(config)?;
    let recipe = match &config.recipe {
        Some(path) => Some(Stamping::read(
            config,
            recipe::load(path, &config.overrides)?,
        )?),
        None => None,
    };
    // Without a recipe the image goes on every card as it is, so it is audited
    // first; that needs it whole, so an archive is decoded before any card.
    let audit = recipe.is_none() && !config.as_is;
    let opened = source::open_for_flash(
        &config.image,
        config.sha256.as_deref(),
        !audit,
        decode_limit(config)?,
        progress,
        cancel,
    )
    .map_err(|e| unless_interrupted(e, "while the image was read"))?;
    let (source, hash) = match opened {
        source::Opened::Streamable { entry, len } => {
            return flash_while_decoding(
                config,
                recipe.as_ref(),
                entry,
                len,
                started,
                progress,
                cancel,
            );
        }
        source::Opened::Ready(source) => {
            let hash = ImageHash::Known(source.sha256.clone());
            (source, hash)
        }
        source::Opened::Unhashed(source) => {
            let hash = ImageHash::start(&source.path, source.len, cancel)?;
            (source, hash)
        }
    };
    if audit {
        refuse_hazards(config, &source.path)?;
    }
    let (base_map, tables) = map_image(config, &source, progress, cancel)?;
    let infos = check_targets(config, &[&source.path], source.len)?;
    confirm(&infos, config.yes)?;
    cancelled(cancel, "after the checks")?;
    let targets = open_targets(&infos, source.len)?;
    let bars = card_bars(&infos, source.len, progress);
    let cards = Cards {
        infos,
        targets,
        prefilled: None,
        bars,
    };
    let basis = Basis {
        source: &source,
        hash: &hash,
        base_map: &base_map,
        tables: &tables,
        started,
        cancel,
    };
    let summary = finish(config, recipe.as_ref(), cards, basis, progress)?;
    if cancel.load(Ordering::Relaxed) {
        return Ok(summary);
    }
    // Hashed while written, and not the image asked for: the check before the
    // tables failed every card.
    hash.wait()
        .and_then(|sha256| {
            let hashed = source::Source { sha256, ..source };
            source::check_expected(&config.image, hashed, config.sha256.as_deref())
        })
        .map_err(|e| left_blank(format!("{e:#}")))?;
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

/// A flash that failed after the cards were written to: each was left with no
/// partition table (plainly not a card). Exit status 1, where 2 says no card
/// was touched.
#[derive(Debug, thiserror::Error)]
#[error(
    "{0}; the cards were written in part and hold no partition table: they will not boot ({1})"
)]
pub struct CardsLeftBlank(String, &'static str);

const AFTER_BAD_IMAGE: &str = "flash them again once the image is right";
const AFTER_INTERRUPT: &str = "flash them again";

fn left_blank(e: impl std::fmt::Display) -> anyhow::Error {
    CardsLeftBlank(e.to_string(), AFTER_BAD_IMAGE).into()
}

/// What every card of a batch is written from: the image, its hash (known, or
/// worked out while writing), its map and where its tables lie.
#[derive(Clone, Copy)]
struct Basis<'a> {
    source: &'a source::Source,
    hash: &'a ImageHash,
    base_map: &'a Extents,
    tables: &'a Extents,
    /// When the flash began: each card's time includes the decode it waited for.
    started: Instant,
    /// The caller's: set, every step stops and each card is erased.
    cancel: &'a AtomicBool,
}

/// The cards of a batch, checked and opened, and what a first pass left on them.
struct Cards {
    infos: Vec<TargetInfo>,
    targets: Vec<Result<target::Target>>,
    prefilled: Option<Extents>,
    /// One bar per card, from its first byte (written while the image
    /// decodes, when it does) to its last one verified.
    bars: Vec<indicatif::ProgressBar>,
}

/// What a card's bar counts: its bytes written, then the same bytes read back.
const CARD_BAR_COUNTS: &str = "written, then verified";
/// A card's bar once its bytes are being read back.
pub const VERIFYING: &str = "verifying";

/// Until the map is known, a bar runs against the image's length.
fn card_bars(infos: &[TargetInfo], len: u64, progress: &Progress) -> Vec<indicatif::ProgressBar> {
    infos
        .iter()
        .map(|info| {
            let bar = progress.bytes(&short_name(&info.path.display().to_string()), len);
            bar.set_message(CARD_BAR_COUNTS);
            bar
        })
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

/// An xz archive not yet in the cache: the cards are checked against the length
/// its index gives, and written from the decoded stream as it arrives
/// (`prefill`). Only when the whole archive has decoded, and its image has the
/// expected SHA-256, are the filesystems read for the map, each card stamped,
/// and the rest written, the partition tables last.
fn flash_while_decoding(
    config: &FlashConfig,
    recipe: Option<&Stamping>,
    entry: source::Entry,
    len: u64,
    started: Instant,
    progress: &Progress,
    cancel: &'static AtomicBool,
) -> Result<Summary> {
    let infos = check_targets(config, &[&entry.partial], len)?;
    confirm(&infos, config.yes)?;
    cancelled(cancel, "after the checks")?;
    let mut targets = open_targets(&infos, len)?;
    let growing = stream::Growing::start(entry, source::Format::Xz, len, cancel)?;
    let mut head = vec![0u8; 8192.min(len as usize)];
    if let Err(e) = growing.read_exact_at(&mut head, 0) {
        // Nothing is written to a card before its head has decoded.
        let e = growing.finish().err().unwrap_or(e);
        let e = e.context(format!("decoding {}", config.image.display()));
        return Err(unless_interrupted(e, "while the archive was decoded"));
    }
    progress.say(&format!(
        "{}: {len} bytes (xz), written while it is decoded",
        config.image.display()
    ));
    let bars = card_bars(&infos, len, progress);
    let prefill = {
        let bar = progress.bytes("decoded", len);
        let ticks: Vec<Box<dyn Fn(u64) + Sync>> = bars
            .iter()
            .map(|bar| {
                let bar = bar.clone();
                Box::new(move |n| bar.inc(n)) as Box<dyn Fn(u64) + Sync>
            })
            .collect();
        let open: Vec<(&target::Target, &(dyn Fn(u64) + Sync))> = targets
            .iter()
            .zip(&ticks)
            .filter_map(|(target, tick)| target.as_ref().ok().map(|t| (t, tick.as_ref())))
            .collect();
        let tables = maybe_tables(&head, len);
        let done = prefill::prefill(&growing, &open, &tables, config.full, cancel, &|n| {
            bar.inc(n)
        });
        bar.finish_and_clear();
        done
    };
    let (source, keeping) =
        growing
            .finish()
            .map_err(|e| match e.downcast_ref::<crate::digest::Cancelled>() {
                Some(_) => anyhow::Error::from(CardsLeftBlank(
                    "interrupted while the archive was decoded".into(),
                    AFTER_INTERRUPT,
                )),
                None => left_blank(format!("{e:#}")),
            })?;
    // The cache is made durable while the cards are finished.
    let kept = |keeping: stream::Keeping| {
        if let Err(e) = keeping.wait() {
            progress.warn(&format!(
                "warning: the decoded image is not kept in the cache: {e:#}"
            ));
        }
    };
    let source = match source::check_expected(&config.image, source, config.sha256.as_deref()) {
        Ok(source) => source,
        Err(e) => {
            kept(keeping);
            return Err(left_blank(format!("{e:#}")));
        }
    };
    let mut results = prefill.results.into_iter();
    for target in targets.iter_mut().filter(|t| t.is_ok()) {
        if let Some(Err(e)) = results.next() {
            *target = Err(e);
        }
    }
    let (base_map, tables) = match map_image(config, &source, progress, cancel) {
        Ok(mapped) => mapped,
        Err(e) => {
            kept(keeping);
            return Err(left_blank(format!("{e:#}")));
        }
    };
    let cards = Cards {
        infos,
        targets,
        prefilled: Some(prefill.written),
        bars,
    };
    let hash = ImageHash::Known(source.sha256.clone());
    let basis = Basis {
        source: &source,
        hash: &hash,
        base_map: &base_map,
        tables: &tables,
        started,
        cancel,
    };
    let summary = finish(config, recipe, cards, basis, progress);
    kept(keeping);
    summary
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

/// Every card opened (devices exclusively: a busy one is refused here) before
/// anything is written; a file that cannot be created fails only its own card.
fn open_targets(infos: &[TargetInfo], len: u64) -> Result<Vec<Result<target::Target>>> {
    let mut targets = Vec::new();
    for info in infos {
        let target = target::Target::open(info, len);
        if info.block_device {
            targets.push(Ok(target?));
        } else {
            targets.push(target);
        }
    }
    Ok(targets)
}

/// The cards stamped (activations created on the way), written and verified;
/// one record per card.
fn finish(
    config: &FlashConfig,
    recipe: Option<&Stamping>,
    cards: Cards,
    basis: Basis<'_>,
    progress: &Progress,
) -> Result<Summary> {
    let Basis {
        source,
        hash,
        base_map,
        cancel,
        ..
    } = basis;
    let prefilled = cards.prefilled.clone();
    // Each card stamped in memory before anything more is written; on an
    // error the activations made so far are dropped, and so deleted.
    let prepared = prepare_cards(config, recipe, cards, basis)?;
    cancelled(cancel, "while the cards were prepared")?;
    let records = write_cards(config, prepared, basis, prefilled.as_ref(), progress)
        .into_iter()
        .map(|(mut record, activation)| {
            record.as_is = config.as_is;
            settle(&mut record, activation);
            progress.event(&serde_json::json!({"event": "card", "card": &record}));
            record
        })
        .collect::<Vec<_>>();

    if let Some(path) = &config.manifest {
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening the manifest {}", path.display()))?;
        for record in &records {
            writeln!(out, "{}", serde_json::to_string(record)?)?;
        }
    }
    Ok(Summary {
        image_sha256: hash.wait().unwrap_or_default(),
        image_bytes: source.len,
        mapped_bytes: base_map.bytes(),
        decoded_while_writing: prefilled.is_some(),
        as_is: config.as_is,
        cards: records,
    })
}

/// A hostname, `--set` or a targets file's per-card settings need a recipe to
/// be applied with; silently ignoring them would write cards the operator
/// did not ask for.
fn refuse_settings_without_recipe(config: &FlashConfig) -> Result<()> {
    if config.recipe.is_some() {
        return Ok(());
    }
    let per_card = config
        .cards
        .iter()
        .find(|c| c.hostname.is_some() || !c.overrides.is_empty());
    if config.hostname.is_some() || !config.overrides.is_empty() || per_card.is_some() {
        bail!(
            "a hostname or settings were given without --recipe: they have nothing to apply to \
             (give --recipe, or leave them out to write the image unchanged)"
        );
    }
    Ok(())
}

/// The recipe and every card's settings from it (its line's overrides, its
/// hostname), read once before anything happens: a bad one found while the
/// cards are prepared would come after activations were made for the cards
/// before it, and each card is stamped with the settings checked here.
struct Stamping {
    recipe: LoadedRecipe,
    /// One per card, in the order of `config.cards`.
    cards: Vec<CardSettings>,
}

impl Stamping {
    fn read(config: &FlashConfig, recipe: LoadedRecipe) -> Result<Self> {
        refuse_shared_identity(config, &recipe)?;
        let cards = config
            .cards
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                card_settings(&recipe, config, spec, i as u32 + 1)
                    .with_context(|| format!("the settings of {}", spec.device.display()))
            })
            .collect::<Result<_>>()?;
        Ok(Self { recipe, cards })
    }
}

/// Settings that would give several cards one identity: a fixed hostname, or
/// one single-use activation.
fn refuse_shared_identity(config: &FlashConfig, loaded: &LoadedRecipe) -> Result<()> {
    if config.cards.len() < 2 {
        return Ok(());
    }
    let hostname = config
        .hostname
        .as_deref()
        .or(loaded.recipe.hostname.as_deref());
    let varies = |h: &str| {
        ["{n}", "{number}", "{serial}", "{mac}"]
            .iter()
            .any(|p| h.contains(p))
    };
    if let Some(fixed) = hostname.filter(|h| !varies(h)) {
        let own = config.cards.iter().all(|c| c.hostname.is_some());
        if !own {
            bail!(
                "hostname {fixed:?} on {} cards: every card would carry the same name (fleet \
                 doctor flags such clones); use a pattern such as '{fixed}-{{number}}' or \
                 '{fixed}-{{serial}}', or give each card its own in --targets-file",
                config.cards.len()
            );
        }
    }
    let a = &loaded.recipe.activation;
    if a.source == recipe::Source::Embedded && a.id.is_some() {
        bail!(
            "the recipe gives one activation ({}) for {} cards, and an embedded activation \
             registers one card: all but one would end `failed`; leave activation.id out \
             (piprov makes each card its own) or use source = \"shared\" with a limit",
            a.id.as_deref().unwrap_or_default(),
            config.cards.len()
        );
    }
    Ok(())
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
    let image = File::open(&source.path)?;
    let checked = bmap::Bmap::load(&path).and_then(|bmap| {
        bmap.check_image(&image, source.len, cancel)?;
        cancelled(cancel, "while the bmap was checked")?;
        Ok(bmap)
    });
    match checked {
        Ok(bmap) => Ok(computed.union(&bmap.extents()).aligned(source.len)),
        Err(e) if explicit || e.downcast_ref::<Interrupted>().is_some() => Err(e),
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

/// Writes the prepared cards side by side: one record per card, in order.
fn write_cards(
    config: &FlashConfig,
    mut prepared: Vec<PreparedCard>,
    basis: Basis<'_>,
    prefilled: Option<&Extents>,
    progress: &Progress,
) -> Vec<(CardRecord, Option<Issued>)> {
    let Basis {
        source,
        hash,
        base_map,
        tables,
        cancel,
        ..
    } = basis;
    // One set of ranges for the batch: the image's, plus every card's stamp.
    let extents = prepared
        .iter()
        .fold(base_map.clone(), |all, card| all.union(&card.extents))
        .aligned(source.len);
    let started = basis.started;
    // What is still to write (a first pass while decoding wrote the rest),
    // then everything read back.
    let to_write = match prefilled {
        Some(done) => extents.minus(done).bytes(),
        None => extents.bytes(),
    };
    let per_card = to_write + if config.verify() { extents.bytes() } else { 0 };
    let total = progress.bytes("total", per_card * prepared.len() as u64);
    let mut jobs = Vec::new();
    let mut slots = Vec::new();
    for card in &mut prepared {
        let bar = card.bar.clone();
        bar.set_length(bar.position() + per_card);
        match &card.target {
            Ok(target) => {
                let overlay = card.overlay.take().expect("each card is written once");
                let total = total.clone();
                // The card's bar and the batch total advance together.
                let tick = Box::new(move |step: write::Step, n: u64| {
                    if step == write::Step::Verified && bar.message() != VERIFYING {
                        bar.set_message(VERIFYING);
                    }
                    bar.inc(n);
                    total.inc(n);
                });
                slots.push(Some(jobs.len()));
                jobs.push(write::Job {
                    target,
                    overlay,
                    tick,
                });
            }
            Err(_) => {
                bar.finish_and_clear();
                slots.push(None);
            }
        }
    }
    let mode = write::Mode {
        verify: config.verify(),
        sparse: !config.full,
    };
    let mut results: Vec<Option<Result<write::Outcome>>> = match File::open(&source.path) {
        Ok(image) => write::write_batch(
            &image,
            jobs,
            &write::Batch {
                extents: &extents,
                tables,
                prefilled,
                before_tables: &|| {
                    let sha256 = hash.wait()?;
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
        )
        .into_iter()
        .map(Some)
        .collect(),
        Err(e) => {
            let why = format!("opening {}: {e}", source.path.display());
            let count = jobs.len();
            drop(jobs);
            (0..count)
                .map(|_| Some(Err(anyhow::anyhow!("{why}"))))
                .collect()
        }
    };
    total.finish_and_clear();
    let sha256 = hash.wait().unwrap_or_default();
    prepared
        .into_iter()
        .zip(slots)
        .map(|(card, slot)| {
            let result = match (slot, &card.target) {
                (Some(i), _) => results[i].take().expect("one result per job"),
                (None, Err(e)) => Err(anyhow::anyhow!("{e:#}")),
                (None, Ok(_)) => unreachable!("every opened card has a job"),
            };
            card_record(card, result, &sha256, started)
        })
        .collect()
}

/// A written card keeps its activation; a failed one's is deleted, and the
/// record says so.
fn settle(record: &mut CardRecord, activation: Option<Issued>) {
    let Some(activation) = activation else {
        return;
    };
    if record.result == CardResult::Ok {
        activation.keep();
        return;
    }
    let id = activation.id().to_string();
    match activation.withdraw() {
        Ok(()) => record.activation_deleted = true,
        Err(e) => {
            let error = record.error.take().unwrap_or_default();
            record.error = Some(format!(
                "{error}; its activation {id} could not be deleted: {e:#}"
            ));
        }
    }
}

/// Stamps every card still going, each with its own activation when the
/// recipe makes one per card.
fn prepare_cards(
    config: &FlashConfig,
    recipe: Option<&Stamping>,
    cards: Cards,
    basis: Basis<'_>,
) -> Result<Vec<PreparedCard>> {
    let mut issuer: Option<std::sync::Arc<CardActivations>> = None;
    let Basis {
        source,
        hash,
        base_map,
        cancel,
        ..
    } = basis;
    let mut prepared = Vec::new();
    let each = config
        .cards
        .iter()
        .zip(cards.infos)
        .zip(cards.targets)
        .zip(cards.bars);
    for (i, (((spec, info), target), bar)) in each.enumerate() {
        cancelled(cancel, "while the cards were prepared")?;
        let mut overlay = Overlay::new(File::open(&source.path)?)?;
        let (mut extents, mut hostname) = (base_map.clone(), None);
        let (mut activation_id, mut activation) = (None, None);
        // A card that failed already gets no stamp, and no activation.
        if let (Some(recipe), true) = (recipe, target.is_ok()) {
            let mut settings = recipe.cards[i].clone();
            let name = spec.device.display().to_string();
            if settings.needs_activation() {
                if issuer.is_none() {
                    issuer = Some(std::sync::Arc::new(CardActivations::for_recipe(
                        &config.aws.connection(),
                        &recipe.recipe.recipe,
                    )?));
                }
                // Tagged with the image's hash. The expected one when it is
                // given (the station's): an image it does not match fails
                // every card, and their activations go. Else an image hashed
                // for the first time is waited for here.
                let image_sha256 = match config.sha256.as_deref() {
                    Some(expected) => expected.to_ascii_lowercase(),
                    None => hash.wait()?,
                };
                let (issued, created) = issuer.as_ref().expect("made above").issue(
                    settings.hostname.as_deref(),
                    &image_sha256,
                    &name,
                )?;
                activation = Some(issued);
                settings.give_activation(created.id, created.code);
            }
            let image = Image::from_disk(overlay)?;
            stamp::stamp_image(&image, &settings, false, &name, stamp::KeepUndo::No)?;
            overlay = image.into_disk()?;
            extents = extents
                .union(&Extents::from_ranges(overlay.changed()))
                .aligned(source.len);
            hostname = settings.hostname.clone();
            activation_id = settings.activation_id.clone();
        }
        prepared.push(PreparedCard {
            spec: spec.clone(),
            info,
            target,
            overlay: Some(overlay),
            extents,
            hostname,
            activation_id,
            activation,
            bar,
        });
    }
    Ok(prepared)
}

/// The recipe with the command line's `--set` and then the card's own
/// overrides (the card's line wins where both set a key).
fn card_settings(
    recipe: &LoadedRecipe,
    config: &FlashConfig,
    spec: &CardSpec,
    number: u32,
) -> Result<CardSettings> {
    let recipe = if spec.overrides.is_empty() {
        recipe.clone()
    } else {
        let all: Vec<String> = config
            .overrides
            .iter()
            .chain(&spec.overrides)
            .cloned()
            .collect();
        recipe::load(&recipe.path, &all)?
    };
    let hostname = spec.hostname.as_deref().or(config.hostname.as_deref());
    let mut settings = CardSettings::from_recipe(&recipe, hostname, Some(number))
        .with_context(|| format!("settings for {}", spec.device.display()))?;
    settings.station_run = config.station_run.clone();
    Ok(settings)
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

/// A card's record, and its activation still to settle.
fn card_record(
    card: PreparedCard,
    result: Result<write::Outcome>,
    image_sha256: &str,
    started: Instant,
) -> (CardRecord, Option<Issued>) {
    let (ended, error, written) = match result {
        Ok(w) => (CardResult::Ok, None, Some(w)),
        Err(e) if e.downcast_ref::<write::InterruptedError>().is_some() => {
            (CardResult::Interrupted, Some(format!("{e:#}")), None)
        }
        Err(e) => (CardResult::Failed, Some(format!("{e:#}")), None),
    };
    let record = CardRecord {
        device: card.spec.device.display().to_string(),
        model: card.info.model.clone(),
        serial: card.info.serial.clone(),
        hostname: card.hostname,
        activation_id: card.activation_id,
        activation_deleted: false,
        as_is: false,
        image_sha256: image_sha256.to_string(),
        bytes_written: written.map_or(0, |w| w.bytes),
        verified: written.is_some_and(|w| w.verified),
        result: ended,
        error,
        seconds: started.elapsed().as_secs_f64(),
        finished_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    };
    (record, card.activation)
}

fn short_name(device: &str) -> String {
    Path::new(device)
        .file_name()
        .map_or(device.to_string(), |n| n.to_string_lossy().into_owned())
}
