//! The image commands' configs: `inspect`, `stamp`, `unstamp`, `flash`.

use std::path::PathBuf;

use anyhow::Result;

use super::AwsArgs;

/// What `piprov inspect` reads.
#[derive(Debug, clap::Args)]
pub struct InspectConfig {
    /// Image file or block device, or an archive of an image (decoded once
    /// into flash's cache)
    pub image: PathBuf,
    /// Stop decoding an archive past this size (e.g. 40GiB; default 32 GiB)
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_size: Option<u64>,
    /// Print the report as JSON (schema in docs/inspect-json.md)
    #[arg(long)]
    pub json: bool,
}

/// What `piprov capture` reads, and what it makes.
#[derive(Debug, clap::Args)]
pub struct CaptureConfig {
    /// The set-up Pi's card (block device, opened read-only) or an image file
    pub source: PathBuf,
    /// The archive to make: NAME.img.xz, NAME.img.zst, NAME.img.gz or NAME.img
    /// (the format follows the name); NAME.img.bmap and OUT.sha256 beside it
    pub output: PathBuf,
    /// Keep the card's geometry: do not shrink the root filesystem
    #[arg(long)]
    pub no_shrink: bool,
    /// Compression level, as the compressor's own -N (xz 0-9, default 6; zstd
    /// 1-19, default 3; gzip 1-9, default 6)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=19))]
    pub level: Option<u32>,
    /// Stamp the captured image with this recipe (as `piprov stamp`), ready to flash
    #[arg(long, value_name = "RECIPE")]
    pub stamp: Option<PathBuf>,
    /// With --stamp: the hostname or pattern ({serial}, {mac}, {number})
    #[arg(long, requires = "stamp")]
    pub hostname: Option<String>,
    /// With --stamp: override a recipe setting (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE", requires = "stamp")]
    pub overrides: Vec<String>,
    /// Print the summary (and the audit) as JSON
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub aws: AwsArgs,
}

impl CaptureConfig {
    /// `--stamp` as `piprov stamp` takes it, for the image `image`.
    pub fn stamping(&self, image: &std::path::Path) -> Option<StampConfig> {
        Some(StampConfig {
            image: image.to_path_buf(),
            recipe: self.stamp.clone()?,
            hostname: self.hostname.clone(),
            number: None,
            overrides: self.overrides.clone(),
            dry_run: false,
            json: false,
            aws: self.aws.clone(),
        })
    }
}

/// What `piprov stamp` writes, and where from.
#[derive(Debug, Clone, clap::Args)]
pub struct StampConfig {
    /// Image file or block device
    pub image: PathBuf,
    /// Recipe (TOML), see image-recipes/
    #[arg(long, short)]
    pub recipe: PathBuf,
    /// Hostname or pattern for this card ({serial}, {mac}, {number}); overrides the recipe
    #[arg(long)]
    pub hostname: Option<String>,
    /// This card's number, filled in for {number}
    #[arg(long)]
    pub number: Option<u32>,
    /// Override a recipe setting, e.g. --set sudo.strip_nopasswd=false (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Show what would change; write nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Print the outcome as JSON
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub aws: AwsArgs,
}

/// What `piprov flash` writes, to which cards.
#[derive(Debug, clap::Args)]
pub struct FlashConfig {
    /// Every card: the targets named, then the targets file's lines (filled
    /// in by `validated`).
    #[arg(skip)]
    pub cards: Vec<crate::flash::CardSpec>,
    /// Set by `piprov station`: its run id goes into each card's stamp.
    #[arg(skip)]
    pub station_run: Option<String>,
    /// Image: .img, .img.xz, .gz, .zst, .bz2 or .zip
    pub image: PathBuf,
    /// Target block devices or files
    pub targets: Vec<PathBuf>,
    /// CSV of targets: device,hostname[,key=value…] per line
    #[arg(long, value_name = "CSV")]
    pub targets_file: Option<PathBuf>,
    /// Recipe to stamp each card with
    #[arg(long, short)]
    pub recipe: Option<PathBuf>,
    /// Hostname pattern for every card ({number} = card number from 1, {serial}, {mac})
    #[arg(long)]
    pub hostname: Option<String>,
    /// Override a recipe setting (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Write every byte of the image, not only the used ranges
    #[arg(long)]
    pub full: bool,
    /// Skip reading the cards back
    #[arg(long)]
    pub no_verify: bool,
    /// Expected SHA-256 of the decompressed image (64 hex digits)
    #[arg(long, value_parser = parse_sha256)]
    pub sha256: Option<String>,
    /// Stop decoding an archive past this size (e.g. 40GiB): by default
    /// the largest target card's size, or 32 GiB when a target is a file
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_size: Option<u64>,
    /// Without --recipe, write an image unchanged even when its audit has
    /// critical findings (a baked registration, its key, machine-id, SSH
    /// host keys): every card will be a clone. Recorded in the summary and
    /// the manifest
    #[arg(long, conflicts_with = "recipe")]
    pub as_is: bool,
    /// bmaptool block map of the image; it must match the image (its own
    /// checksum and every range's), or nothing is written. Without it, a
    /// .bmap beside the image is used when it matches, and ignored with a
    /// warning when it does not
    #[arg(long, value_name = "FILE", conflicts_with_all = ["no_bmap", "full"])]
    pub bmap: Option<PathBuf>,
    /// Ignore any .bmap beside the image: write what the filesystems use
    #[arg(long)]
    pub no_bmap: bool,
    /// Append one JSON line per card to this file
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// Do not ask before erasing the targets
    #[arg(long, short)]
    pub yes: bool,
    /// Allow disks that do not report themselves removable
    #[arg(long)]
    pub allow_non_removable: bool,
    /// Allow devices over 128 GB
    #[arg(long)]
    pub allow_large: bool,
    /// No progress bars
    #[arg(long, short)]
    pub quiet: bool,
    /// JSON lines on stdout: one per card, then the summary
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub aws: AwsArgs,
}

/// What `piprov unstamp` takes away.
#[derive(Debug, clap::Args)]
pub struct UnstampConfig {
    /// Image file or block device
    pub image: PathBuf,
    /// Show what would change; write nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Print the outcome as JSON
    #[arg(long)]
    pub json: bool,
}

impl FlashConfig {
    /// The cards from the targets and the targets file; at least one.
    pub fn validated(mut self) -> Result<Self> {
        self.cards = self
            .targets
            .iter()
            .map(|device| crate::flash::CardSpec {
                device: device.clone(),
                hostname: None,
                overrides: Vec::new(),
            })
            .collect();
        if let Some(file) = &self.targets_file {
            self.cards.extend(crate::flash::read_targets(file)?);
        }
        if self.cards.is_empty() {
            anyhow::bail!(
                "no targets: name devices or files after the image, or give --targets-file"
            );
        }
        Ok(self)
    }

    pub fn verify(&self) -> bool {
        !self.no_verify
    }

    pub fn bmap_choice(&self) -> crate::flash::BmapChoice {
        match (&self.bmap, self.no_bmap) {
            (Some(file), _) => crate::flash::BmapChoice::File(file.clone()),
            (None, true) => crate::flash::BmapChoice::Ignore,
            (None, false) => crate::flash::BmapChoice::Beside,
        }
    }

    pub fn progress_mode(&self) -> crate::progress::Mode {
        if self.json {
            crate::progress::Mode::JsonLines
        } else if self.quiet {
            crate::progress::Mode::Quiet
        } else {
            crate::progress::Mode::Bars
        }
    }
}

/// `--max-size`: bytes, or a size with a unit (`40GiB`, `32 GB`).
pub(crate) fn parse_size(text: &str) -> std::result::Result<u64, String> {
    match text.trim().parse::<bytesize::ByteSize>() {
        Ok(size) if size.as_u64() > 0 => Ok(size.as_u64()),
        _ => Err(format!(
            "{text:?} is not a size: give bytes or a number with a unit, e.g. 40GiB"
        )),
    }
}

/// `--sha256`: 64 hex digits, either case, taken in lower case.
pub(crate) fn parse_sha256(text: &str) -> std::result::Result<String, String> {
    if text.len() == 64 && text.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(text.to_ascii_lowercase())
    } else {
        Err(format!(
            "{text:?} is not a SHA-256: 64 hexadecimal digits, as sha256sum prints them"
        ))
    }
}
