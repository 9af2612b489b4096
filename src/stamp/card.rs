//! One card's settings: the recipe, the card's hostname and its secret, in the
//! `KEY=value` form firstboot/lib.sh reads.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::recipe::{self, Hook, LoadedRecipe, Source, SudoPolicy};

/// Tokens that accompany `systemd.run=` (as Raspberry Pi Imager writes them): boot
/// only far enough to run the script, then reboot.
pub const HOOK_COMPANIONS: [&str; 2] = [
    "systemd.run_success_action=reboot",
    "systemd.unit=kernel-command-line.target",
];

pub fn hook_tokens(install_script: &str) -> Vec<String> {
    let mut tokens = vec![format!("systemd.run={install_script}")];
    tokens.extend(HOOK_COMPANIONS.iter().map(|t| t.to_string()));
    tokens
}

#[derive(Debug, Clone)]
pub struct CardSettings {
    pub recipe_name: Option<String>,
    pub source: Source,
    pub region: String,
    pub hostname: Option<String>,
    pub hook: Hook,
    pub sudo: SudoPolicy,
    pub tags: BTreeMap<String, String>,
    pub default_instance_name: Option<String>,
    /// The station run that wrote this card, so that the station knows it
    /// again when it is pushed back in.
    pub station_run: Option<String>,
    pub activation_id: Option<String>,
    activation_code: Option<String>,
    broker_token: Option<String>,
    pub broker_url: Option<String>,
    pub broker_ca: Option<String>,
    pub keep_token: bool,
    pub device_key: bool,
    pub device_key_generate: bool,
    pub key_auto_rotate_days: Option<u32>,
}

/// A secret read from a file: one line, no spaces, never empty.
fn read_secret(path: &Path, what: &str) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the {what} from {}", path.display()))?;
    let secret = text.trim();
    if secret.is_empty() || secret.contains(char::is_whitespace) {
        bail!("{} must hold the {what} alone, on one line", path.display());
    }
    Ok(secret.to_string())
}

impl CardSettings {
    pub fn from_recipe(
        loaded: &LoadedRecipe,
        hostname: Option<&str>,
        number: Option<u32>,
    ) -> Result<Self> {
        let r = &loaded.recipe;
        let hostname = match hostname.or(r.hostname.as_deref()) {
            Some(pattern) => {
                recipe::check_hostname_pattern(pattern)?;
                Some(recipe::hostname_for_card(pattern, number)?)
            }
            None => None,
        };
        let a = &r.activation;
        let (mut activation_id, mut activation_code, mut broker_token, mut broker_ca) =
            (None, None, None, None);
        match a.source {
            Source::Shared | Source::Embedded => {
                // Without an id, `embedded` gets its activation from
                // `give_activation` once the card is about to be written.
                if let (Some(id), Some(code_file)) = (&a.id, &a.code_file) {
                    activation_id = Some(id.clone());
                    activation_code =
                        Some(read_secret(&loaded.resolve(code_file), "activation code")?);
                }
            }
            Source::Broker => {
                let token_file = a.token_file.as_ref().expect("validated");
                broker_token = Some(read_secret(
                    &loaded.resolve(token_file),
                    "enrollment token",
                )?);
                let ca_file = loaded.resolve(a.ca_file.as_ref().expect("validated"));
                let ca = std::fs::read_to_string(&ca_file).with_context(|| {
                    format!("reading the broker CA certificate {}", ca_file.display())
                })?;
                if !ca.contains("-----BEGIN CERTIFICATE-----") {
                    bail!("{} is not a PEM certificate", ca_file.display());
                }
                broker_ca = Some(ca);
            }
        }
        Ok(Self {
            recipe_name: r.name.clone(),
            source: a.source,
            region: r.region.clone(),
            hostname,
            hook: r.hook,
            sudo: r.sudo.clone(),
            tags: r.tags.clone(),
            default_instance_name: r.default_instance_name.clone(),
            activation_id,
            activation_code,
            broker_token,
            broker_url: a.url.clone(),
            broker_ca,
            keep_token: a.keep_token,
            device_key: a.device_key,
            device_key_generate: a.device_key_generate,
            key_auto_rotate_days: r.agent.key_auto_rotate_days,
            station_run: None,
        })
    }

    /// `embedded` with no activation given: piprov must create one for this card.
    pub fn needs_activation(&self) -> bool {
        self.source == Source::Embedded && self.activation_id.is_none()
    }

    pub fn give_activation(&mut self, id: String, code: String) {
        self.activation_id = Some(id);
        self.activation_code = Some(code);
    }

    /// `piprov.conf`: what the device scripts need, no secrets.
    pub fn conf(&self) -> String {
        let flag = |on: bool| if on { "1" } else { "0" };
        let mut lines = vec![
            "FORMAT=1".to_string(),
            format!("SOURCE={}", recipe::source_name(self.source)),
            format!("REGION={}", self.region),
            format!("STRIP_SSM_USER={}", flag(self.sudo.strip_ssm_user)),
            format!("STRIP_NOPASSWD={}", flag(self.sudo.strip_nopasswd)),
            format!("NOPASSWD_FILE={}", self.sudo.nopasswd_file),
            format!("SSM_USER={}", self.sudo.ssm_user),
        ];
        if let Some(hostname) = &self.hostname {
            lines.push(format!("HOSTNAME_PATTERN={hostname}"));
        }
        if let Some(rule) = &self.sudo.replacement_rule {
            lines.push(format!("SUDO_RULE={rule}"));
        }
        if let Some(url) = &self.broker_url {
            lines.push(format!("BROKER_URL={}", url.trim_end_matches('/')));
        }
        if self.keep_token {
            lines.push("KEEP_TOKEN=1".into());
        }
        if self.device_key {
            lines.push("DEVICE_KEY=1".into());
        }
        if self.device_key_generate {
            lines.push("DEVICE_KEY_GENERATE=1".into());
        }
        if let Some(days) = self.key_auto_rotate_days {
            lines.push(format!("KEY_AUTO_ROTATE_DAYS={days}"));
        }
        lines.join("\n") + "\n"
    }

    /// `piprov-secret.conf`, when the card carries a secret.
    pub fn secret(&self) -> Option<String> {
        if let (Some(id), Some(code)) = (&self.activation_id, &self.activation_code) {
            Some(format!(
                "ACTIVATION_ID={id}\nACTIVATION_CODE={code}\nACTIVATION_REGION={}\n",
                self.region
            ))
        } else {
            self.broker_token
                .as_ref()
                .map(|token| format!("BROKER_TOKEN={token}\n"))
        }
    }
}
