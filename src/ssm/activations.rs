//! Hybrid activations: create (the code is shown once), list, delete.

use std::time::{Duration, SystemTime};

use anyhow::{Result, bail};
use aws_sdk_ssm::Client;
use aws_sdk_ssm::primitives::DateTime;
use aws_sdk_ssm::types::Tag;
use serde::Serialize;

use super::explain;

/// CreateActivation's limits.
pub const MAX_REGISTRATIONS: u32 = 1000;
pub const MAX_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, Clone)]
pub struct NewActivation {
    pub iam_role: String,
    pub registration_limit: u32,
    pub lifetime: Duration,
    pub default_instance_name: Option<String>,
    pub description: Option<String>,
    pub tags: Vec<(String, String)>,
}

impl NewActivation {
    /// The checks SSM would make, made before calling it.
    pub fn validate(&self) -> Result<()> {
        if self.iam_role.trim().is_empty() {
            bail!("an IAM role is required (--role): the service role the registered nodes assume");
        }
        if !(1..=MAX_REGISTRATIONS).contains(&self.registration_limit) {
            bail!(
                "--limit {} is not between 1 and {MAX_REGISTRATIONS}, the registrations SSM allows one activation",
                self.registration_limit
            );
        }
        if self.lifetime.is_zero() || self.lifetime > MAX_LIFETIME {
            bail!(
                "--expires {}: SSM activations last from a minute up to 30 days",
                crate::units::duration(self.lifetime)
            );
        }
        Ok(())
    }
}

/// An activation as created: the code is shown by SSM this once.
pub struct Created {
    pub id: String,
    pub code: String,
}

pub async fn create_activation(client: &Client, new: &NewActivation) -> Result<Created> {
    new.validate()?;
    let expires = SystemTime::now() + new.lifetime;
    let mut request = client
        .create_activation()
        .iam_role(&new.iam_role)
        .registration_limit(new.registration_limit as i32)
        .expiration_date(DateTime::from(expires))
        .set_default_instance_name(new.default_instance_name.clone())
        .set_description(new.description.clone());
    for (key, value) in &new.tags {
        request = request.tags(Tag::builder().key(key).value(value).build()?);
    }
    let out = request
        .send()
        .await
        .map_err(|e| explain(e, "creating the activation"))?;
    let (Some(id), Some(code)) = (out.activation_id, out.activation_code) else {
        bail!("SSM answered CreateActivation without an id and code");
    };
    // Both go into a card's secret file, one `KEY=value` line each.
    let id_ok = crate::recipe::check_activation_id(&id).is_ok();
    if !id_ok || code.is_empty() || code.chars().any(|c| c.is_whitespace() || c.is_control()) {
        let _ = delete_activation(client, &id).await;
        bail!(
            "SSM answered CreateActivation with an id or code a card cannot hold (the id must be a UUID, \
             the code one word); the activation was deleted again"
        );
    }
    Ok(Created { id, code })
}

#[derive(Debug, Clone, Serialize)]
pub struct ActivationInfo {
    pub id: String,
    pub description: Option<String>,
    pub default_instance_name: Option<String>,
    pub iam_role: Option<String>,
    pub registration_limit: i32,
    pub registrations: i32,
    pub expires: Option<String>,
    pub expired: bool,
    pub tags: Vec<(String, String)>,
}

pub async fn list_activations(client: &Client) -> Result<Vec<ActivationInfo>> {
    let mut out = Vec::new();
    let mut pages = client.describe_activations().into_paginator().send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| explain(e, "listing activations"))?;
        for a in page.activation_list() {
            out.push(ActivationInfo {
                id: a.activation_id().unwrap_or_default().to_string(),
                description: a
                    .description()
                    .map(str::to_string)
                    .filter(|s| !s.is_empty()),
                default_instance_name: a
                    .default_instance_name()
                    .map(str::to_string)
                    .filter(|s| !s.is_empty()),
                iam_role: a.iam_role().map(str::to_string),
                registration_limit: a.registration_limit().unwrap_or(0),
                registrations: a.registrations_count().unwrap_or(0),
                expires: a
                    .expiration_date()
                    .and_then(|d| SystemTime::try_from(*d).ok())
                    .map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                expired: a.expired(),
                tags: a
                    .tags()
                    .iter()
                    .map(|t| (t.key().to_string(), t.value().to_string()))
                    .collect(),
            });
        }
    }
    Ok(out)
}

pub async fn delete_activation(client: &Client, id: &str) -> Result<()> {
    client
        .delete_activation()
        .activation_id(id)
        .send()
        .await
        .map_err(|e| explain(e, &format!("deleting activation {id}")))?;
    Ok(())
}
