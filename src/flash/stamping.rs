//! What each card is stamped with: the recipe, the command line's settings and
//! the card's own line, read and checked once before anything happens.

use anyhow::{Context, Result, bail};

use super::card::CardSpec;
use crate::cmdline::FlashConfig;
use crate::recipe::{self, LoadedRecipe};
use crate::stamp::CardSettings;

/// A hostname, `--set` or a targets file's per-card settings need a recipe to
/// be applied with; silently ignoring them would write cards the operator
/// did not ask for.
pub(super) fn refuse_settings_without_recipe(config: &FlashConfig) -> Result<()> {
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
pub(super) struct Stamping {
    pub recipe: LoadedRecipe,
    /// One per card, in the order of `config.cards`.
    pub cards: Vec<CardSettings>,
}

impl Stamping {
    pub fn read(config: &FlashConfig, recipe: LoadedRecipe) -> Result<Self> {
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
