//! `piprov stamp` / `piprov unstamp`: put the first-boot payload and this card's
//! settings on the FAT boot partition and hook it into the boot, or take it all
//! away again. No root and no mount needed.

mod card;
mod cloud_init;
mod payload;
mod plan;
mod undo;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

pub use card::CardSettings;
pub use plan::{ChangeSummary, Plan};
pub use undo::UNDO_FILE;

pub use crate::cmdline::StampConfig;
use crate::image::{BootFs, Cmdline, Image, Journal};
use crate::inspect::gather_facts;
use crate::layout::boot;
use crate::recipe::{Hook, SudoPolicy};
use crate::ssm::CardActivations;

/// Bumped when the record's meaning changes.
pub const RECORD_FORMAT: u32 = 1;

/// `piprov-stamp.json`: what a stamp did, so that `unstamp` can undo exactly that
/// and `inspect` can show it. Holds no secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StampRecord {
    pub format: u32,
    pub piprov_version: String,
    pub stamped_at: String,
    pub recipe: Option<String>,
    /// `systemd-run` or `cloud-init`.
    pub hook: Hook,
    pub boot_mount: String,
    pub hostname: Option<String>,
    pub region: String,
    pub activation: RecordActivation,
    pub sudo: SudoPolicy,
    pub tags: BTreeMap<String, String>,
    pub default_instance_name: Option<String>,
    pub cloud_init_instance_id: Option<String>,
    /// Tokens appended to cmdline.txt.
    pub cmdline_tokens: Vec<String>,
    /// Files piprov created.
    pub files: Vec<String>,
    /// Files piprov replaced, with the name of the copy of the original
    /// (`null`: there was none).
    pub replaced: BTreeMap<String, Option<String>>,
    /// A secret file was written (it leaves the card on first boot).
    pub secret: bool,
    /// The `piprov station` run that wrote the card.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub station_run: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecordActivation {
    pub source: crate::recipe::Source,
    pub id: Option<String>,
    pub broker_url: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Outcome {
    pub image: String,
    pub dry_run: bool,
    /// The stamp now on the image; `None` after unstamp.
    pub record: Option<StampRecord>,
    pub changes: Vec<ChangeSummary>,
    /// After a stamp: whether an unstamp can give back every byte. After an
    /// unstamp: whether it did. `None` when nothing was written.
    pub byte_exact: Option<bool>,
    /// Why not byte for byte, when not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_exact_because: Option<String>,
}

/// Whether a stamp keeps what `unstamp` needs to give back every byte: an
/// image file does; a card's stamp in `flash` does not (nobody unstamps a card
/// to get the golden back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepUndo {
    Yes,
    No,
}

pub fn stamp(config: &StampConfig) -> Result<Outcome> {
    let recipe = crate::recipe::load(&config.recipe, &config.overrides)?;
    // Everything that can fail on the workstation's side (secret files, the CA)
    // fails here, before the image is opened for writing.
    let mut settings =
        CardSettings::from_recipe(&recipe, config.hostname.as_deref(), config.number)?;
    let image = open(&config.image, config.dry_run)?;
    let name = config.image.display().to_string();
    // A card's own activation is made last, just before the write, and deleted
    // again if the stamp does not land.
    let issued = if settings.needs_activation() && !config.dry_run {
        let issuer = std::sync::Arc::new(CardActivations::for_recipe(
            &config.aws.connection(),
            &recipe.recipe,
        )?);
        let progress = crate::progress::Progress::new(crate::progress::Mode::Bars);
        let image_sha256 = crate::digest::image_sha256(&config.image, &progress)?;
        let (issued, created) = issuer.issue(settings.hostname.as_deref(), &image_sha256, &name)?;
        settings.give_activation(created.id, created.code);
        Some(issued)
    } else {
        None
    };
    let result = stamp_image(&image, &settings, config.dry_run, &name, KeepUndo::Yes)
        .and_then(|outcome| sync(image, &outcome).map(|()| outcome));
    let Some(issued) = issued else {
        return result;
    };
    if let Err(e) = result {
        let id = issued.id().to_string();
        // The stamp's error stays the cause; what became of the activation is
        // said around it (a second failure in words: a chain has one cause).
        return Err(match issued.withdraw() {
            Ok(()) => e.context(format!(
                "the image is not stamped, and its activation {id} was deleted again"
            )),
            Err(d) => e.context(format!(
                "the image is not stamped, and deleting its activation {id} failed too: {d:#} \
                 (delete it with `piprov activation delete {id}`)"
            )),
        });
    }
    issued.keep();
    result
}

/// Stamps an open image: a file, a card, or a copy-on-write overlay in memory.
pub fn stamp_image<D: Read + Write + Seek + Debug + 'static>(
    image: &Image<D>,
    settings: &CardSettings,
    dry_run: bool,
    name: &str,
    keep_undo: KeepUndo,
) -> Result<Outcome> {
    let context = || format!("stamping {name}");
    if settings.needs_activation() && !dry_run {
        bail!("{name}: this card has no activation yet (source = \"embedded\")");
    }
    // A stamp already there goes back to the exact original first, so that the
    // new stamp's undo is against the original too (and restamps never drift).
    let restored = if dry_run {
        None
    } else {
        Some(undo::restore(image).with_context(context)?)
    };
    let facts = gather_facts(image).with_context(context)?;
    let hook = match settings.hook {
        Hook::Auto if facts.cloud_init_installed => Hook::CloudInit,
        Hook::Auto => Hook::SystemdRun,
        Hook::CloudInit if !facts.cloud_init_installed => {
            bail!(
                "{name}: the recipe asks for hook = \"cloud-init\" but the image has no cloud-init"
            )
        }
        chosen => chosen,
    };
    let journal = Journal::new();
    let boot_fs = image.boot_journaled(&journal).with_context(context)?;
    let mut plan = Plan::default();
    plan_unstamp(&boot_fs, &mut plan).with_context(context)?;
    let record = plan_stamp(&boot_fs, &mut plan, settings, hook, &facts.boot.mount_point)
        .with_context(context)?;
    let changes = settle(boot_fs, plan, !dry_run).with_context(context)?;
    let (byte_exact, not_exact_because) = match (dry_run, keep_undo) {
        (true, _) | (false, KeepUndo::No) => (None, None),
        (false, KeepUndo::Yes) => {
            if undo::write_undo(image, &journal).with_context(context)? {
                (Some(true), None)
            } else {
                (
                    Some(false),
                    Some("the boot partition's free space holds old data, not zeroes, and a record of it would overwrite more of it".into()),
                )
            }
        }
    };
    if let Some(undo::Restore::Unusable(why)) = restored {
        eprintln!(
            "warning: {name}: the previous stamp was removed file by file, not byte for byte: {why}"
        );
    }
    Ok(Outcome {
        image: name.to_string(),
        dry_run,
        record: Some(record),
        changes,
        byte_exact,
        not_exact_because,
    })
}

pub fn unstamp(path: &Path, dry_run: bool) -> Result<Outcome> {
    let image = open(path, dry_run)?;
    let name = path.display().to_string();
    let context = || format!("unstamping {name}");
    let boot_fs = image.boot().with_context(context)?;
    let mut plan = Plan::default();
    plan_unstamp(&boot_fs, &mut plan).with_context(context)?;
    // What changes, for the summary, before anything is written.
    plan.prune(&boot_fs).with_context(context)?;
    let mut outcome = Outcome {
        image: name.clone(),
        dry_run,
        record: None,
        changes: plan.summary(),
        byte_exact: None,
        not_exact_because: None,
    };
    boot_fs.close()?;
    if dry_run || plan.is_empty() {
        return Ok(outcome);
    }
    let why_not = match undo::restore(&image).with_context(context)? {
        undo::Restore::Exactly => None,
        undo::Restore::NoUndo => {
            Some("the stamp has no undo record (an older piprov made it)".into())
        }
        undo::Restore::Unusable(why) => Some(why),
    };
    if why_not.is_some() {
        let boot_fs = image.boot().with_context(context)?;
        settle(boot_fs, plan, true).with_context(context)?;
    }
    outcome.byte_exact = Some(why_not.is_none());
    outcome.not_exact_because = why_not;
    sync(image, &outcome)?;
    Ok(outcome)
}

fn open(path: &Path, dry_run: bool) -> Result<Image<File>> {
    let format = crate::flash::source::detect_file(path)?;
    if format != crate::flash::source::Format::Raw {
        bail!(
            "{} is an archive ({}): stamp writes into an image in place; decompress it first \
             (e.g. xz -dk), or flash it with --recipe, which stamps each card as it is written",
            path.display(),
            format.name()
        );
    }
    if dry_run {
        Image::open(path)
    } else {
        Image::open_writable(path)
    }
}

/// fatfs only writes through; the data must reach the disk before we say done.
fn sync(image: Image<File>, outcome: &Outcome) -> Result<()> {
    if !outcome.dry_run && !outcome.changes.is_empty() {
        image
            .into_disk()?
            .sync_all()
            .with_context(|| format!("flushing {}", outcome.image))?;
    }
    Ok(())
}

/// Prunes the plan to what changes, writes it when asked, and closes the
/// partition; returns what changes.
fn settle<D: Read + Write + Seek>(
    boot_fs: BootFs<D>,
    mut plan: Plan,
    write: bool,
) -> Result<Vec<ChangeSummary>> {
    plan.prune(&boot_fs)?;
    let changes = plan.summary();
    if write && !plan.is_empty() {
        plan.apply(&boot_fs)?;
    }
    boot_fs.close()?;
    Ok(changes)
}

fn read_record<D: Read + Write + Seek>(
    boot_fs: &BootFs<D>,
    plan: &Plan,
) -> Result<Option<StampRecord>> {
    let Some(data) = plan.read(boot_fs, boot::STAMP)? else {
        return Ok(None);
    };
    let record: StampRecord = serde_json::from_slice(&data).with_context(|| {
        format!(
            "{} on the boot partition is not a stamp record piprov can read",
            boot::STAMP
        )
    })?;
    if record.format > RECORD_FORMAT {
        bail!(
            "{} was written by a newer piprov ({}, record format {}): use that version",
            boot::STAMP,
            record.piprov_version,
            record.format
        );
    }
    Ok(Some(record))
}

/// The systemd.run token that runs our install script, wherever the partition is mounted.
fn is_our_run_token(token: &str) -> bool {
    token.starts_with("systemd.run=") && token.ends_with(&format!("/{}", payload::INSTALL_SCRIPT))
}

/// Plans the removal of a previous stamp: its tokens, its files, and the
/// originals of what it replaced put back.
fn plan_unstamp<D: Read + Write + Seek>(boot_fs: &BootFs<D>, plan: &mut Plan) -> Result<()> {
    let record = read_record(boot_fs, plan)?;
    if let Some(data) = plan.read(boot_fs, boot::CMDLINE)? {
        let mut cmdline = Cmdline::parse(&data, boot::CMDLINE)?;
        let ours = cmdline.tokens().any(is_our_run_token);
        let recorded: Vec<String> = record
            .as_ref()
            .map(|r| r.cmdline_tokens.clone())
            .unwrap_or_default();
        cmdline.remove(|t| {
            recorded.iter().any(|r| r == t)
                || is_our_run_token(t)
                || (ours && card::HOOK_COMPANIONS.contains(&t))
        });
        plan.write(boot::CMDLINE, cmdline.as_bytes().to_vec());
    }
    if let Some(record) = &record {
        for (name, backup) in &record.replaced {
            match backup {
                Some(backup) => {
                    let original = plan.read(boot_fs, backup)?.with_context(|| {
                        format!("the copy of the original {name} ({backup}) is missing")
                    })?;
                    plan.write(name, original);
                    plan.remove(backup);
                }
                None => plan.remove(name),
            }
        }
        for file in &record.files {
            plan.remove(file);
        }
    }
    // Also what an interrupted stamp may have left without a record.
    for file in payload::FILES.iter().map(|f| f.name).chain([
        boot::CONF,
        boot::SECRET,
        boot::BROKER_CA,
        undo::UNDO_FILE,
        boot::STAMP,
    ]) {
        plan.remove(file);
    }
    Ok(())
}

fn plan_stamp<D: Read + Write + Seek>(
    boot_fs: &BootFs<D>,
    plan: &mut Plan,
    settings: &CardSettings,
    hook: Hook,
    boot_mount: &str,
) -> Result<StampRecord> {
    let mut files: Vec<String> = Vec::new();
    for file in &payload::FILES {
        plan.write(file.name, file.content);
        files.push(file.name.into());
    }
    plan.write(boot::CONF, settings.conf());
    files.push(boot::CONF.into());
    if let Some(secret) = settings.secret() {
        plan.write_secret(boot::SECRET, secret);
        files.push(boot::SECRET.into());
    }
    if let Some(ca) = &settings.broker_ca {
        plan.write(boot::BROKER_CA, ca.as_bytes());
        files.push(boot::BROKER_CA.into());
    }
    let install = format!(
        "{}/{}",
        boot_mount.trim_end_matches('/'),
        payload::INSTALL_SCRIPT
    );
    let mut replaced = BTreeMap::new();
    let mut cmdline_tokens = Vec::new();
    let mut cloud_init_instance_id = None;
    match hook {
        Hook::CloudInit => {
            let instance_id = format!("piprov-{}", uuid::Uuid::new_v4());
            let user_data = plan.read(boot_fs, "user-data")?;
            let meta_data = plan.read(boot_fs, "meta-data")?;
            for (name, original) in [("user-data", &user_data), ("meta-data", &meta_data)] {
                let backup = original.as_ref().map(|data| {
                    let backup = format!("piprov-orig-{name}");
                    plan.write(&backup, data.clone());
                    backup
                });
                replaced.insert(name.to_string(), backup);
            }
            plan.write(
                "user-data",
                cloud_init::user_data(user_data.as_deref(), &install)?,
            );
            plan.write(
                "meta-data",
                cloud_init::meta_data(meta_data.as_deref(), &instance_id),
            );
            cloud_init_instance_id = Some(instance_id);
        }
        Hook::SystemdRun | Hook::Auto => {
            let data = plan
                .read(boot_fs, boot::CMDLINE)?
                .context("the boot partition has no cmdline.txt to hook the first boot into")?;
            let mut cmdline = Cmdline::parse(&data, boot::CMDLINE)?;
            if let Some(foreign) = cmdline.tokens().find(|t| t.starts_with("systemd.run=")) {
                bail!(
                    "cmdline.txt already runs {foreign} on first boot (Raspberry Pi Imager's firstrun.sh?): \
                     only one systemd.run= hook can run; boot the card once so it finishes, remove it, \
                     or use hook = \"cloud-init\""
                );
            }
            cmdline_tokens = card::hook_tokens(&install);
            cmdline.append(cmdline_tokens.iter().map(String::as_str));
            plan.write(boot::CMDLINE, cmdline.as_bytes().to_vec());
        }
    }
    let record = StampRecord {
        format: RECORD_FORMAT,
        piprov_version: env!("CARGO_PKG_VERSION").into(),
        stamped_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        recipe: settings.recipe_name.clone(),
        hook,
        boot_mount: boot_mount.into(),
        hostname: settings.hostname.clone(),
        region: settings.region.clone(),
        activation: RecordActivation {
            source: settings.source,
            id: settings.activation_id.clone(),
            broker_url: settings.broker_url.clone(),
        },
        sudo: settings.sudo.clone(),
        tags: settings.tags.clone(),
        default_instance_name: settings.default_instance_name.clone(),
        cloud_init_instance_id,
        cmdline_tokens,
        files,
        replaced,
        secret: settings.secret().is_some(),
        station_run: settings.station_run.clone(),
    };
    plan.write(boot::STAMP, serde_json::to_vec_pretty(&record)?);
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The device scripts find the boot partition files by these names.
    #[test]
    fn boot_file_names_match_the_device_scripts() {
        let lib = payload::FILES
            .iter()
            .find(|f| f.name == "piprov-lib.sh")
            .unwrap()
            .content;
        for (var, name) in [
            ("BOOT_CONF", boot::CONF),
            ("BOOT_SECRET", boot::SECRET),
            ("BOOT_CA", boot::BROKER_CA),
            ("BOOT_STATUS", boot::STATUS),
        ] {
            assert!(
                lib.contains(&format!("{var}={name}\n")),
                "{var} in firstboot/lib.sh"
            );
        }
    }

    #[test]
    fn only_our_run_token_is_ours() {
        assert!(is_our_run_token(
            "systemd.run=/boot/firmware/piprov-install.sh"
        ));
        assert!(is_our_run_token("systemd.run=/boot/piprov-install.sh"));
        assert!(!is_our_run_token("systemd.run=/boot/firstrun.sh"));
    }
}
