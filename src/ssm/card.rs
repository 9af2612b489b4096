//! One single-use activation per card (recipes with `source = "embedded"`):
//! created when the card is stamped, tagged so that the node it becomes can be
//! traced to its card and image, and deleted again when that card fails.
//! Blocking, for the stamp and flash paths, which are synchronous.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use aws_sdk_ssm::Client;

use crate::recipe::Recipe;

use super::fleet::{TAG_HOSTNAME, TAG_IMAGE, TAG_NAME, TAG_VERSION};
use super::{Connection, Created, NewActivation, client, create_activation, delete_activation};

/// A card's activation lives this long unless the recipe says otherwise: long
/// enough to reach a site, short enough that a lost card's code goes stale.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

pub struct CardActivations {
    client: Client,
    iam_role: String,
    lifetime: Duration,
    default_instance_name: Option<String>,
    tags: BTreeMap<String, String>,
}

impl CardActivations {
    /// Region, role, lifetime and tags from the recipe; `conn` may override the region.
    pub fn for_recipe(conn: &Connection, recipe: &Recipe) -> Result<Self> {
        let iam_role = recipe.iam_role.as_deref().context(
            "source = \"embedded\" creates an activation per card: the recipe needs iam_role",
        )?;
        let conn = Connection {
            profile: conn.profile.clone(),
            region: conn.region.clone().or(Some(recipe.region.clone())),
        };
        let lifetime = match recipe.activation.expires.as_deref() {
            Some(text) => humantime::parse_duration(text)
                .with_context(|| format!("activation.expires {text:?}"))?,
            None => DEFAULT_LIFETIME,
        };
        let client = crate::runtime::block_on(client(&conn))?;
        Ok(Self {
            client,
            iam_role: iam_role.to_string(),
            lifetime,
            default_instance_name: recipe.default_instance_name.clone(),
            tags: recipe.tags.clone(),
        })
    }

    /// Creates the activation for one card. `hostname` may still hold the
    /// placeholders the card fills in itself; those are left out of the tags.
    pub fn create(
        &self,
        hostname: Option<&str>,
        image_sha256: &str,
        card: &str,
    ) -> Result<Created> {
        let resolved = hostname.filter(|h| !h.contains('{'));
        let mut tags = self.tags.clone();
        tags.insert(TAG_IMAGE.into(), image_sha256.into());
        tags.insert(TAG_VERSION.into(), env!("CARGO_PKG_VERSION").into());
        if let Some(h) = resolved {
            tags.insert(TAG_HOSTNAME.into(), h.into());
            // A Name the recipe gives wins; else the node is named after its card.
            tags.entry(TAG_NAME.into()).or_insert_with(|| h.into());
        }
        let new = NewActivation {
            iam_role: self.iam_role.clone(),
            registration_limit: 1,
            lifetime: self.lifetime,
            // Fleet Manager's node name: the recipe's, else the card's hostname.
            default_instance_name: self
                .default_instance_name
                .clone()
                .or_else(|| resolved.map(str::to_string)),
            description: Some(format!(
                "piprov card {}",
                resolved.or(hostname).unwrap_or(card)
            )),
            tags: tags.into_iter().collect(),
        };
        crate::runtime::block_on(create_activation(&self.client, &new))
            .with_context(|| format!("creating the activation for {card}"))
    }

    pub fn delete(&self, id: &str) -> Result<()> {
        crate::runtime::block_on(delete_activation(&self.client, id))
    }

    /// Creates one card's activation, held by a guard until the card holds
    /// it; the code goes to the card's settings.
    pub fn issue(
        self: &Arc<Self>,
        hostname: Option<&str>,
        image_sha256: &str,
        card: &str,
    ) -> Result<(Issued, Created)> {
        let created = self.create(hostname, image_sha256, card)?;
        let issued = Issued {
            issuer: self.clone(),
            id: created.id.clone(),
            settled: false,
        };
        Ok((issued, created))
    }
}

/// One card's activation while its card is made. Kept once the card holds
/// it; withdrawn when the card failed; dropped unsettled (an error on the way,
/// the flash stopped) it is deleted, so no activation outlives a card that
/// does not hold it.
pub struct Issued {
    issuer: Arc<CardActivations>,
    id: String,
    settled: bool,
}

impl Issued {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The card holds it: it stays, for the card's first boot.
    pub fn keep(mut self) {
        self.settled = true;
    }

    /// Deleted now; the error says it could not be.
    pub fn withdraw(mut self) -> Result<()> {
        self.settled = true;
        self.issuer.delete(&self.id)
    }
}

impl Drop for Issued {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        if let Err(e) = self.issuer.delete(&self.id) {
            eprintln!(
                "warning: activation {} was made for a card that does not hold it and could not \
                 be deleted: {e:#} (delete it with `piprov activation delete {}`)",
                self.id, self.id
            );
        }
    }
}
