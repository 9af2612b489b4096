//! One card of a batch, from its checks to its record: where it goes, what it
//! is to get (its stamp over the shared image, its activation) and how it ended.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use super::map::Extents;
use super::target::{Target, TargetInfo};
use super::write;
use crate::cancel::is_interrupted;
use crate::image::{Image, Overlay};
use crate::progress::Progress;
use crate::ssm::{CardActivations, Issued};
use crate::stamp::{self, CardSettings};

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

/// What a card's bar counts: its bytes written, then the same bytes read back.
const CARD_BAR_COUNTS: &str = "written, then verified";
/// A card's bar once its bytes are being read back.
pub const VERIFYING: &str = "verifying";

pub(super) struct Card {
    pub spec: CardSpec,
    pub info: TargetInfo,
    /// Opened before anything is written. An error fails this card alone, and
    /// nothing more is done to it.
    pub target: Result<Target>,
    /// From its first byte (written while the image decodes, when it does) to
    /// its last one verified.
    pub bar: indicatif::ProgressBar,
    /// This card's settings over the shared image, once stamped; the writer
    /// takes it.
    pub overlay: Option<Overlay<File>>,
    /// The bytes its stamp changed.
    pub stamped: Extents,
    pub hostname: Option<String>,
    /// The activation the card holds: its own, or the recipe's shared one.
    pub activation_id: Option<String>,
    /// This card's own activation: withdrawn unless the card is written.
    activation: Option<Issued>,
}

impl Card {
    /// The card opened for an image of `len` bytes: a device exclusively (a
    /// busy one stops the batch before anything is written), a card-image file
    /// that cannot be made fails only its own card.
    pub fn open(spec: CardSpec, info: TargetInfo, len: u64, progress: &Progress) -> Result<Card> {
        let target = Target::open(&info, len);
        let target = if info.block_device {
            Ok(target?)
        } else {
            target
        };
        // Until the map is known, the bar runs against the image's length.
        let bar = progress.bytes(&short_name(&info.path.display().to_string()), len);
        bar.set_message(CARD_BAR_COUNTS);
        Ok(Card {
            spec,
            info,
            target,
            bar,
            overlay: None,
            stamped: Extents::default(),
            hostname: None,
            activation_id: None,
            activation: None,
        })
    }

    pub fn is_going(&self) -> bool {
        self.target.is_ok()
    }

    /// This card is failed by `e`; nothing more is written to it.
    pub fn fail(&mut self, e: anyhow::Error) {
        self.target = Err(e);
    }

    /// The image as this card gets it: `settings` (with a fresh activation
    /// from `issuer` when they need one, tagged `image_sha256`) stamped on a
    /// copy-on-write overlay of `image`.
    pub fn stamp(
        &mut self,
        image: &Path,
        settings: Option<CardSettings>,
        issuer: Option<&Arc<CardActivations>>,
        image_sha256: &dyn Fn() -> Result<String>,
    ) -> Result<()> {
        let file = File::open(image).with_context(|| format!("opening {}", image.display()))?;
        let mut overlay = Overlay::new(file)?;
        if let Some(mut settings) = settings {
            let name = self.spec.device.display().to_string();
            if settings.needs_activation() {
                let issuer = issuer.context("no activation issuer for a card that needs one")?;
                let (issued, created) =
                    issuer.issue(settings.hostname.as_deref(), &image_sha256()?, &name)?;
                self.activation = Some(issued);
                settings.give_activation(created.id, created.code);
            }
            let image = Image::from_disk(overlay)?;
            stamp::stamp_image(&image, &settings, false, &name, stamp::KeepUndo::No)?;
            overlay = image.into_disk()?;
            self.stamped = Extents::from_ranges(overlay.changed());
            self.hostname = settings.hostname.clone();
            self.activation_id = settings.activation_id.clone();
        }
        self.overlay = Some(overlay);
        Ok(())
    }

    /// How the card ended, with `result` its write's (none: it failed before
    /// it was written); its own activation is kept if it was written, else
    /// withdrawn, and the record says so.
    pub fn record(
        self,
        result: Option<Result<write::Outcome>>,
        image_sha256: &str,
        started: Instant,
    ) -> CardRecord {
        let Card {
            spec,
            info,
            target,
            bar,
            hostname,
            activation_id,
            activation,
            ..
        } = self;
        bar.finish_and_clear();
        let result = match (result, target) {
            (Some(result), _) => result,
            (None, Err(e)) => Err(e),
            (None, Ok(_)) => Err(anyhow::anyhow!("the card was not written")),
        };
        let (ended, error, written) = match result {
            Ok(w) => (CardResult::Ok, None, Some(w)),
            // The record is the boundary where a chain becomes words.
            Err(e) if is_interrupted(&e) => (CardResult::Interrupted, Some(format!("{e:#}")), None),
            Err(e) => (CardResult::Failed, Some(format!("{e:#}")), None),
        };
        let mut record = CardRecord {
            device: spec.device.display().to_string(),
            model: info.model.clone(),
            serial: info.serial.clone(),
            hostname,
            activation_id,
            activation_deleted: false,
            as_is: false,
            image_sha256: image_sha256.to_string(),
            bytes_written: written.map_or(0, |w| w.bytes),
            verified: written.is_some_and(|w| w.verified),
            result: ended,
            error,
            seconds: started.elapsed().as_secs_f64(),
            finished_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                .to_string(),
        };
        settle(&mut record, activation);
        record
    }
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

fn short_name(device: &str) -> String {
    Path::new(device)
        .file_name()
        .map_or(device.to_string(), |n| n.to_string_lossy().into_owned())
}
