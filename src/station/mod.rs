//! `piprov station`: a bench that flashes every card it is given. It decodes
//! the image once, then watches the kernel's uevents: a disk that appears, or
//! whose media appears (a card pushed into a reader), is a candidate. A
//! candidate passes flash's own checks or is left alone with the reason; an
//! accepted card gets the next number, its hostname, its own activation, and
//! is written by flash's engine, each card on its own thread, so a slow or
//! failing card holds no one back. Every card is a row in the record; the
//! state is shown on the terminal, as JSON lines, and on a web page.

pub mod record;
pub mod uevent;
mod web;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use sha2::Digest;

pub use crate::cmdline::StationConfig;
use crate::flash::target::{self, Policy};
use crate::progress::{Mode, Progress};
use record::{Record, Row};

/// A card as the terminal, the JSON lines and the page show it.
#[derive(Debug, Clone, Serialize)]
pub struct CardView {
    /// Tells this card from any other seen in the run (the same reader, the
    /// same second).
    pub id: u64,
    /// The card's number in this run; none for a card that was not written.
    pub number: Option<u32>,
    pub device: String,
    pub hostname: Option<String>,
    /// `writing`, `verifying`, `done`, `failed`, `refused` or `already done`.
    pub state: String,
    /// How far along writing and verifying together are, while they run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub percent: Option<u8>,
    /// Bytes a second, while it is written or verified.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speed: Option<u64>,
    pub reason: Option<String>,
    pub activation_id: Option<String>,
    /// The card failed and its unused activation was deleted again.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub activation_withdrawn: bool,
    pub bytes: u64,
    pub started: String,
    pub finished: Option<String>,
}

/// What every view reads: the cards so far, and a feed of their changes.
pub struct Board {
    cards: Mutex<Vec<CardView>>,
    feed: tokio::sync::broadcast::Sender<String>,
    json: bool,
    /// The terminal's live table: a bar per card being written, the changes
    /// of state printed above them.
    terminal: Option<Arc<Progress>>,
    bars: Mutex<BTreeMap<u64, indicatif::ProgressBar>>,
}

impl Board {
    fn new(json: bool, terminal: Option<Arc<Progress>>) -> Self {
        Self {
            cards: Mutex::new(Vec::new()),
            feed: tokio::sync::broadcast::channel(1024).0,
            json,
            terminal,
            bars: Mutex::new(BTreeMap::new()),
        }
    }

    /// The card's bar on the terminal, while it is written.
    fn draw(&self, terminal: &Progress, card: &CardView) {
        let mut bars = self.bars.lock().unwrap_or_else(|e| e.into_inner());
        if !matches!(card.state.as_str(), "writing" | "verifying") {
            if let Some(bar) = bars.remove(&card.id) {
                bar.finish_and_clear();
            }
            return;
        }
        let bar = bars.entry(card.id).or_insert_with(|| {
            terminal.percent(&format!(
                "#{} {}",
                card.number.unwrap_or_default(),
                card.device.trim_start_matches("/dev/")
            ))
        });
        bar.set_position(card.percent.unwrap_or_default().into());
        bar.set_message(format!(
            "{} {}{}",
            card.state,
            card.hostname.as_deref().unwrap_or(""),
            card.speed
                .map(|s| format!(" {}/s", crate::units::size(s)))
                .unwrap_or_default()
        ));
    }

    pub fn cards(&self) -> Vec<CardView> {
        self.cards.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.feed.subscribe()
    }

    /// A card's new state, told to every view; the terminal and the JSON
    /// lines hear of a change of state, the page of its progress too.
    fn show(&self, card: &CardView) {
        let mut cards = self.cards.lock().unwrap_or_else(|e| e.into_inner());
        let known = cards.iter_mut().find(|c| c.id == card.id);
        let changed = known.as_ref().is_none_or(|k| k.state != card.state);
        match known {
            Some(known) => *known = card.clone(),
            None => cards.push(card.clone()),
        }
        drop(cards);
        let line = serde_json::to_string(card).unwrap_or_default();
        let _ = self.feed.send(line.clone());
        if let Some(terminal) = &self.terminal {
            self.draw(terminal, card);
        }
        if !changed {
            return;
        }
        if self.json {
            println!("{line}");
        } else {
            let text = format!(
                "card {:>3}  {:<14} {:<20} {}{}",
                card.number.map(|n| n.to_string()).unwrap_or("-".into()),
                card.device,
                card.hostname.as_deref().unwrap_or("-"),
                card.state,
                card.reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            );
            match &self.terminal {
                Some(terminal) => terminal.say(&text),
                None => println!("{text}"),
            }
        }
    }
}

fn next_view_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Set by the first Ctrl-C or SIGTERM: no new card starts.
static STOPPING: AtomicBool = AtomicBool::new(false);
static SIGNALS: AtomicUsize = AtomicUsize::new(0);
/// Set by the second: the cards being written stop, erased to no partition table.
static CANCEL_WRITES: AtomicBool = AtomicBool::new(false);

fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// A whole disk's size in bytes as the kernel reports it (0: no media).
fn disk_size(name: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/block/{name}/size"))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map_or(0, |sectors| sectors * 512)
}

/// The disks with media now.
fn disks_with_media() -> BTreeSet<String> {
    std::fs::read_dir("/sys/block")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| disk_size(name) > 0)
                .collect()
        })
        .unwrap_or_default()
}

/// A card's own identity: the CID of an SD card on an SD host, else the
/// reader's serial (which identifies the slot, not the card).
fn identity(name: &str, info: &target::TargetInfo) -> Option<String> {
    std::fs::read_to_string(format!("/sys/block/{name}/device/cid"))
        .ok()
        .map(|cid| format!("cid:{}", cid.trim()))
        .or_else(|| info.serial.as_ref().map(|s| format!("reader:{s}")))
}

/// The reader's stable path, when udev made one (`/dev/disk/by-path/…`).
fn reader_path(name: &str) -> Option<String> {
    let dev = PathBuf::from(format!("/dev/{name}"));
    std::fs::read_dir("/dev/disk/by-path")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|link| std::fs::canonicalize(link).is_ok_and(|target| target == dev))
        .map(|link| link.display().to_string())
}

/// `*` and `?` wildcards over a whole name.
fn wildcard(pattern: &str, text: &str) -> bool {
    fn go(p: &[u8], t: &[u8]) -> bool {
        match (p.first(), t.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], t) || (!t.is_empty() && go(p, &t[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &t[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &t[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), text.as_bytes())
}

/// Whether `--match` lets this disk in: a kernel name or device path glob, or
/// a stable path (`/dev/disk/by-path/…`) that leads to it. Without `--match`
/// every disk may be a card but loop, RAM, device-mapper and other virtual
/// disks, which other programs attach for their own files.
fn matches(patterns: &[String], name: &str) -> bool {
    if patterns.is_empty() {
        let virtual_disk = std::fs::canonicalize(format!("/sys/block/{name}"))
            .is_ok_and(|p| p.starts_with("/sys/devices/virtual"));
        return !virtual_disk;
    }
    let dev = format!("/dev/{name}");
    patterns.iter().any(|p| {
        wildcard(p, name)
            || wildcard(p, &dev)
            || std::fs::canonicalize(p).is_ok_and(|t| t == Path::new(&dev))
    })
}

/// A hostname pattern with the card's number filled in; `{serial}` and
/// `{mac}` are the card's to fill on its first boot.
fn hostname_for(pattern: Option<&str>, number: u32) -> Option<String> {
    pattern.map(|p| {
        p.replace("{number}", &number.to_string())
            .replace("{n}", &number.to_string())
    })
}

/// What tells one medium in a reader from the next: its size and its first
/// MiB (partition tables, boot sector), read past the cache.
fn fingerprint(name: &str) -> Option<(u64, String)> {
    use std::io::Read;
    let dev = PathBuf::from(format!("/dev/{name}"));
    target::drop_cached(&dev).ok()?;
    let mut head = Vec::new();
    std::fs::File::open(&dev)
        .ok()?
        .take(1 << 20)
        .read_to_end(&mut head)
        .ok()?;
    Some((
        disk_size(name),
        crate::hex::hex(&sha2::Sha256::digest(&head)),
    ))
}

/// A card this run wrote already, read from its stamp: its hostname.
fn written_by(run: &str, dev: &Path) -> Option<String> {
    target::drop_cached(dev).ok()?;
    let image = crate::image::Image::open(dev).ok()?;
    let boot = image.boot().ok()?;
    let data = boot.read(crate::layout::boot::STAMP).ok()??;
    let _ = boot.close();
    let stamp: crate::stamp::StampRecord = serde_json::from_slice(&data).ok()?;
    (stamp.station_run.as_deref() == Some(run)).then(|| stamp.hostname.unwrap_or_default())
}

/// Whether a card holding a done card's stamp is that card: when both
/// identities are known they must match; without one, the stamp decides.
fn same_card(recorded: Option<&str>, now: Option<&str>) -> bool {
    match (recorded, now) {
        (Some(recorded), Some(now)) => recorded == now,
        _ => true,
    }
}

/// What a card's worker says when it is done.
struct Finished {
    row: Row,
    view: CardView,
}

pub fn run(config: &StationConfig) -> Result<()> {
    let _ = ctrlc::set_handler(|| {
        if SIGNALS.fetch_add(1, Ordering::Relaxed) == 0 {
            STOPPING.store(true, Ordering::Relaxed);
            eprintln!(
                "piprov station: stopping: no new card starts; cards being written finish \
                 (press Ctrl-C again to stop them, erased to no partition table)"
            );
        } else {
            CANCEL_WRITES.store(true, Ordering::Relaxed);
        }
    });
    let uevents = uevent::Uevents::open()?;
    let recipe = crate::recipe::load(config.recipe(), &config.overrides)?;
    let pattern = config.hostname.clone().or(recipe.recipe.hostname.clone());
    if let Some(p) = &pattern {
        if !p.contains("{number}") && !p.contains("{n}") && !p.contains('{') {
            bail!("--hostname {p:?} would name every card the same: use {{number}} or {{serial}}");
        }
    }
    // Bars only where someone watches them; else a line per change of state.
    let terminal = !config.json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let progress = Arc::new(Progress::new(if terminal {
        Mode::Bars
    } else {
        Mode::Quiet
    }));
    let decoding_cancel = AtomicBool::new(false);
    let source = crate::flash::source::open(
        config.image(),
        None,
        crate::flash::source::DecodeLimit::DEFAULT,
        &progress,
        &decoding_cancel,
    )
    .with_context(|| format!("reading {}", config.image().display()))?;
    let run = uuid::Uuid::new_v4().to_string();
    let record = Record::open(&config.record)?;
    let board = Arc::new(Board::new(config.json, terminal.then(|| progress.clone())));
    if let Some(addr) = config.listen {
        let board = board.clone();
        let listener =
            std::net::TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
        eprintln!(
            "piprov station: the bench's page is at http://{}/",
            listener.local_addr()?
        );
        std::thread::spawn(move || crate::runtime::block_on(web::serve(listener, board)));
    }
    let present = disks_with_media();
    eprintln!(
        "piprov station: run {run}: writing {} ({}) to every card put in; Ctrl-C to stop",
        config.image().display(),
        crate::units::size(source.len)
    );
    let policy = Policy {
        required: source.len,
        allow_non_removable: config.allow_non_removable,
        allow_large: false,
    };
    let (done_tx, done_rx) = mpsc::channel::<Finished>();
    let bench = Bench {
        config,
        recipe: &recipe,
        source: &source,
        run: &run,
        policy: &policy,
        pattern: &pattern,
        record: &record,
        board: &board,
        done: done_tx,
    };
    // The medium last seen in each disk (written, refused or known): a
    // `change` that finds the same one (the kernel's own, after a write) is
    // not a new card. Events are read late, so a card pulled and another
    // pushed in may show as one `change`: the medium tells them apart.
    let mut seen: BTreeMap<String, Option<(u64, String)>> = BTreeMap::new();
    // The cards being written: what the views last heard, and their progress.
    let mut writing: BTreeMap<String, (CardView, Arc<Progress>)> = BTreeMap::new();
    let mut refreshed = std::time::Instant::now();
    let mut pulled: BTreeSet<String> = BTreeSet::new();
    let mut number = 0u32;
    // Cards stopped by a second signal: the run ends in error.
    let mut stopped = 0;
    let mut candidates: Vec<String> = present
        .iter()
        .filter(|name| !config.matches.is_empty() && matches(&config.matches, name))
        .cloned()
        .collect();
    seen.extend(
        present
            .iter()
            .filter(|n| !candidates.contains(n))
            .map(|n| (n.clone(), fingerprint(n))),
    );
    loop {
        for finished in done_rx.try_iter() {
            let mut view = finished.view;
            let mut row = finished.row;
            let name = view.device.trim_start_matches("/dev/").to_string();
            writing.remove(&name);
            seen.insert(name.clone(), fingerprint(&name));
            // The event may come after the failure it caused: a disk with no
            // medium left says the same.
            let gone = pulled.remove(&name) || disk_size(&name) == 0;
            if gone && view.state != "done" {
                let why = format!(
                    "removed while writing{}",
                    view.reason
                        .as_deref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                );
                view.reason = Some(why.clone());
                row.reason = Some(why);
            }
            if view.state != "done" && SIGNALS.load(Ordering::Relaxed) > 1 {
                stopped += 1;
            }
            record.put(&mut row)?;
            board.show(&view);
        }
        if refreshed.elapsed() >= PROGRESS_EVERY {
            refreshed = std::time::Instant::now();
            for (view, progress) in writing.values_mut() {
                if refresh(view, progress) {
                    board.show(view);
                }
            }
        }
        if STOPPING.load(Ordering::Relaxed) {
            if writing.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        for name in std::mem::take(&mut candidates) {
            let started = bench.start_card(number + 1, &name)?;
            if let Some(started) = started {
                number += 1;
                writing.insert(name.clone(), started);
            } else {
                seen.insert(name.clone(), fingerprint(&name));
            }
        }
        let Some(event) = uevents.next_disk_event(Duration::from_millis(200))? else {
            continue;
        };
        let media = disk_size(&event.name) > 0;
        if event.action == "remove" || !media {
            seen.remove(&event.name);
            if writing.contains_key(&event.name) {
                pulled.insert(event.name.clone());
            }
            continue;
        }
        if writing.contains_key(&event.name) {
            continue;
        }
        let now_in = fingerprint(&event.name);
        if matches!(event.action.as_str(), "add" | "change")
            && seen.get(&event.name) != Some(&now_in)
        {
            if matches(&config.matches, &event.name) {
                candidates.push(event.name);
            } else {
                seen.insert(event.name.clone(), now_in);
                let view = CardView {
                    id: next_view_id(),
                    number: None,
                    device: format!("/dev/{}", event.name),
                    hostname: None,
                    state: "refused".into(),
                    reason: Some("not named by --match: left alone".into()),
                    activation_id: None,
                    activation_withdrawn: false,
                    bytes: 0,
                    percent: None,
                    speed: None,
                    started: now(),
                    finished: None,
                };
                board.show(&view);
            }
        }
    }
    eprintln!(
        "piprov station: stopped; the record is in {}",
        config.record
    );
    if stopped > 0 {
        bail!(
            "{stopped} card(s) being written were stopped and hold no partition table: they \
             will not boot (put them in again to write them)"
        );
    }
    Ok(())
}

/// How often the views hear how far each card is.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// A card's view brought up to where its flash stands: its bar (named after
/// the device, as flash names it). Returns whether anything changed.
fn refresh(view: &mut CardView, progress: &Progress) -> bool {
    let label = view.device.trim_start_matches("/dev/");
    let Some(bar) = progress.bar(label) else {
        return false;
    };
    let state = if bar.message == crate::flash::VERIFYING {
        "verifying"
    } else {
        "writing"
    };
    let percent = bar
        .length
        .filter(|&l| l > 0)
        .map(|l| (bar.position.min(l) * 100 / l) as u8);
    let speed = Some(bar.per_sec as u64);
    let before = (view.state.clone(), view.percent, view.speed);
    view.state = state.into();
    view.percent = percent;
    view.speed = speed;
    if state == "writing" {
        view.bytes = bar.position;
    }
    before != (view.state.clone(), view.percent, view.speed)
}

/// What every card of a run is written with and reported to.
struct Bench<'a> {
    config: &'a StationConfig,
    recipe: &'a crate::recipe::LoadedRecipe,
    /// The decoded image, hashed.
    source: &'a crate::flash::source::Source,
    run: &'a str,
    policy: &'a Policy,
    /// The hostname pattern, `{number}` the card's number in the run.
    pattern: &'a Option<String>,
    record: &'a Record,
    board: &'a Board,
    /// Told when a card's writer ends.
    done: mpsc::Sender<Finished>,
}

impl Bench<'_> {
    /// Checks a candidate and, when it passes, starts writing it on its own
    /// thread. Returns its view and its progress while it is being written.
    fn start_card(&self, number: u32, name: &str) -> Result<Option<(CardView, Arc<Progress>)>> {
        let Bench {
            config,
            recipe,
            source,
            run,
            policy,
            pattern,
            record,
            board,
            done,
        } = self;
        let dev = PathBuf::from(format!("/dev/{name}"));
        let info = target::probe(&dev);
        let hostname = hostname_for(pattern.as_deref(), number);
        let mut row = Row {
            run: run.to_string(),
            number: Some(number),
            hostname: hostname.clone(),
            device: dev.display().to_string(),
            reader: reader_path(name),
            identity: info.as_ref().ok().and_then(|i| identity(name, i)),
            size: info.as_ref().map_or(0, |i| i.size),
            image_sha256: source.sha256.clone(),
            recipe: recipe.recipe.name.clone(),
            started: now(),
            result: "writing".into(),
            ..Row::default()
        };
        let mut view = CardView {
            id: next_view_id(),
            number: Some(number),
            device: row.device.clone(),
            hostname: hostname.clone(),
            state: "writing".into(),
            reason: None,
            activation_id: None,
            activation_withdrawn: false,
            bytes: 0,
            percent: None,
            speed: None,
            started: row.started.clone(),
            finished: None,
        };
        let refused = match &info {
            Err(e) => Some(format!("{e:#}")),
            Ok(info) => target::refusal(info, policy),
        };
        let already = if refused.is_none() && !config.again {
            // The stamp says which card of this run it holds; a card of its
            // own identity (CID, reader serial) is that card, one of another
            // is a copy of it (dd), which must get an identity of its own.
            written_by(run, &dev).filter(|hostname| {
                let recorded = record.identity_of(run, hostname).ok().flatten();
                same_card(recorded.as_deref(), row.identity.as_deref())
            })
        } else {
            None
        };
        if let Some(why) = refused.or(already.map(|h| {
            format!("written by this station run already ({h}); remove it, or run with --again")
        })) {
            let state = if why.starts_with("written by") {
                "already done"
            } else {
                "refused"
            };
            row.number = None;
            row.hostname = None;
            view.number = None;
            view.hostname = None;
            row.result = state.into();
            row.reason = Some(why.clone());
            row.finished = Some(now());
            view.state = state.into();
            view.reason = Some(why);
            view.finished = row.finished.clone();
            record.put(&mut row)?;
            board.show(&view);
            return Ok(None);
        }
        record.put(&mut row)?;
        board.show(&view);
        let flash_config = crate::cmdline::FlashConfig {
            cards: vec![crate::flash::CardSpec {
                device: dev.clone(),
                hostname: hostname.clone(),
                overrides: Vec::new(),
            }],
            station_run: Some(run.to_string()),
            image: source.path.clone(),
            targets: vec![dev],
            targets_file: None,
            recipe: Some(config.recipe().to_path_buf()),
            hostname: None,
            overrides: config.overrides.clone(),
            full: false,
            no_verify: false,
            sha256: Some(source.sha256.clone()),
            max_size: None,
            as_is: false,
            bmap: None,
            no_bmap: false,
            manifest: None,
            yes: true,
            allow_non_removable: config.allow_non_removable,
            allow_large: false,
            quiet: true,
            json: false,
            aws: config.aws.clone(),
        };
        let done = done.clone();
        let progress = Arc::new(Progress::new(Mode::Quiet));
        let watched = (view.clone(), progress.clone());
        std::thread::spawn(move || {
            let outcome = crate::flash::flash(&flash_config, &progress, &CANCEL_WRITES);
            match outcome {
                Ok(summary) => {
                    let card = &summary.cards[0];
                    let ok = card.result == crate::flash::CardResult::Ok;
                    row.activation_id = card.activation_id.clone();
                    row.activation_withdrawn = card.activation_deleted;
                    row.bytes = card.bytes_written;
                    row.verified = card.verified;
                    row.result = if ok { "done" } else { "failed" }.into();
                    row.reason = card.error.clone();
                }
                Err(e) => {
                    row.result = "failed".into();
                    row.reason = Some(format!("{e:#}"));
                }
            }
            row.finished = Some(now());
            view.state = if row.result == "done" {
                "done".into()
            } else {
                "failed".into()
            };
            view.reason = row.reason.clone();
            view.percent = None;
            view.speed = None;
            view.activation_id = row.activation_id.clone();
            view.activation_withdrawn = row.activation_withdrawn;
            view.bytes = row.bytes;
            view.finished = row.finished.clone();
            let _ = done.send(Finished { row, view });
        });
        Ok(Some(watched))
    }
}

/// `piprov station record`: the rows, as a table, JSON or CSV.
pub fn print_record(at: &record::Place, format: RecordFormat) -> Result<()> {
    let rows = Record::read(at)?;
    let mut out = std::io::stdout().lock();
    use std::io::Write;
    match format {
        RecordFormat::Json => {
            serde_json::to_writer_pretty(&mut out, &rows)?;
            writeln!(out)?;
        }
        RecordFormat::Csv => {
            writeln!(
                out,
                "run,number,hostname,device,reader,identity,size,image_sha256,recipe,activation_id,started,finished,bytes,verified,result,reason,activation_withdrawn"
            )?;
            for r in &rows {
                let cells = [
                    r.run.clone(),
                    r.number.map(|n| n.to_string()).unwrap_or_default(),
                    r.hostname.clone().unwrap_or_default(),
                    r.device.clone(),
                    r.reader.clone().unwrap_or_default(),
                    r.identity.clone().unwrap_or_default(),
                    r.size.to_string(),
                    r.image_sha256.clone(),
                    r.recipe.clone().unwrap_or_default(),
                    r.activation_id.clone().unwrap_or_default(),
                    r.started.clone(),
                    r.finished.clone().unwrap_or_default(),
                    r.bytes.to_string(),
                    r.verified.to_string(),
                    r.result.clone(),
                    r.reason.clone().unwrap_or_default(),
                    r.activation_withdrawn.to_string(),
                ];
                let line: Vec<String> = cells.iter().map(|c| csv_cell(c)).collect();
                writeln!(out, "{}", line.join(","))?;
            }
        }
        RecordFormat::Table => {
            for r in &rows {
                writeln!(
                    out,
                    "{} #{:<3} {:<14} {:<20} {:<12} {}{}",
                    r.started,
                    r.number.map(|n| n.to_string()).unwrap_or("-".into()),
                    r.device,
                    r.hostname.as_deref().unwrap_or("-"),
                    r.result,
                    r.activation_id.as_deref().unwrap_or("-"),
                    r.reason
                        .as_deref()
                        .map(|x| format!("  ({x})"))
                        .unwrap_or_default()
                )?;
            }
        }
    }
    Ok(())
}

/// A CSV cell, quoted when it holds a comma, a quote or a line break; a cell
/// that a spreadsheet would run as a formula gets a leading quote.
fn csv_cell(text: &str) -> String {
    let text = if text.starts_with(['=', '+', '-', '@']) {
        format!("'{text}")
    } else {
        text.to_string()
    };
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text
    }
}

#[derive(Debug, Clone, Copy)]
pub enum RecordFormat {
    Table,
    Json,
    Csv,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_whole_names() {
        assert!(wildcard("sd*", "sdb"));
        assert!(wildcard("/dev/sd?", "/dev/sdc"));
        assert!(!wildcard("sd?", "sdab"));
        assert!(!wildcard("loop*", "sdb"));
    }

    /// A card put back is known by its stamp; a dd copy of a done card holds
    /// the same stamp, and its own CID tells it apart: it is written anew.
    #[test]
    fn a_copy_of_a_done_card_is_not_taken_for_it() {
        let dir = tempfile::TempDir::new().unwrap();
        let record = Record::open(&record::Place::File(dir.path().join("r.db"))).unwrap();
        let mut row = Row {
            run: "run-1".into(),
            hostname: Some("bench-1".into()),
            identity: Some("cid:0353445344313647".into()),
            result: "done".into(),
            ..Row::default()
        };
        record.put(&mut row).unwrap();
        let recorded = record.identity_of("run-1", "bench-1").unwrap();
        assert_eq!(recorded.as_deref(), Some("cid:0353445344313647"));
        assert!(same_card(recorded.as_deref(), Some("cid:0353445344313647")));
        assert!(!same_card(
            recorded.as_deref(),
            Some("cid:03534453443136ff")
        ));
        // A reader that tells no identity: the stamp decides.
        assert!(same_card(recorded.as_deref(), None));
        assert_eq!(record.identity_of("run-2", "bench-1").unwrap(), None);
    }

    #[test]
    fn a_cell_a_spreadsheet_would_run_is_quoted() {
        assert_eq!(csv_cell("=cmd|' /C calc'!A0"), "'=cmd|' /C calc'!A0");
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
    }
}
