//! Recipes: `image-recipes/*.toml`, validated into the settings a card is stamped
//! with. Unknown keys are errors that name the key and its line, so a typo never
//! silently falls back to a default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// The longest an SSM activation may live (CreateActivation's limit).
const MAX_ACTIVATION_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Shown in the stamp record and in `piprov inspect`.
    #[serde(default)]
    pub name: Option<String>,
    pub region: String,
    /// Hostname pattern: `{serial}` and `{mac}` are filled in on the card, `{n}`
    /// (the card's number in a batch) when the card is stamped.
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub default_instance_name: Option<String>,
    /// IAM role for the activations piprov creates (`embedded`, `broker`).
    #[serde(default)]
    pub iam_role: Option<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    #[serde(default)]
    pub hook: Hook,
    pub activation: Activation,
    #[serde(default)]
    pub sudo: SudoPolicy,
    #[serde(default)]
    pub agent: AgentSettings,
}

/// amazon-ssm-agent settings the card writes into its config on first boot.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSettings {
    /// `Profile.KeyAutoRotateDays` (1 to 365): the agent replaces its private
    /// key this often. Absent: the agent's default, never.
    #[serde(default)]
    pub key_auto_rotate_days: Option<u32>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Hook {
    /// cloud-init when the root filesystem has it, systemd-run otherwise.
    #[default]
    Auto,
    /// `systemd.run=` on the kernel command line (Raspberry Pi Imager's way, Bookworm).
    SystemdRun,
    /// A NoCloud seed on the boot partition (Trixie).
    CloudInit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// A single-use activation made for this card when it is stamped.
    Embedded,
    /// The card asks `piprov broker` with an enrollment token.
    Broker,
    /// One activation with a registration limit, shared by many cards.
    Shared,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Activation {
    pub source: Source,
    /// `embedded`: lifetime of each card's activation, e.g. "24h" (at most 30 days).
    #[serde(default)]
    pub expires: Option<String>,
    /// `shared`, or `embedded` made by hand: the activation id.
    #[serde(default)]
    pub id: Option<String>,
    /// `shared`/`embedded`: file holding the activation code (relative to the recipe).
    #[serde(default)]
    pub code_file: Option<PathBuf>,
    /// `broker`: its HTTPS URL.
    #[serde(default)]
    pub url: Option<String>,
    /// `broker`: the CA certificate (PEM) the card pins.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// `broker`: file holding the enrollment token.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// `broker`: keep the token on the card (root-only) after registering, so a
    /// copy of the card booted in another Pi can enrol by itself. Off: the token
    /// is deleted once used, and such a copy waits for a fresh secret.
    #[serde(default)]
    pub keep_token: bool,
    /// `broker`: sign the activation request with the Pi's OTP device key
    /// (`rpi-fw-crypto`, Pi 5 and Pi 4 with current firmware), so the broker
    /// can tell this board from a copy of its card in another one.
    #[serde(default)]
    pub device_key: bool,
    /// `broker`, with `device_key`: on a Pi whose key slot 1 is blank, write a
    /// new key into OTP (`rpi-fw-crypto genkey`). Permanent: off unless asked.
    #[serde(default)]
    pub device_key_generate: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SudoPolicy {
    /// Leave `/etc/sudoers.d/ssm-agent-users` holding only a comment, and take
    /// ssm-user out of the admin groups.
    pub strip_ssm_user: bool,
    /// Remove the default user's NOPASSWD file.
    pub strip_nopasswd: bool,
    pub nopasswd_file: String,
    pub ssm_user: String,
    /// Optional rule installed in its place, e.g. `pi ALL=(ALL:ALL) ALL`.
    pub replacement_rule: Option<String>,
}

impl Default for SudoPolicy {
    fn default() -> Self {
        Self {
            strip_ssm_user: true,
            strip_nopasswd: true,
            nopasswd_file: "010_pi-nopasswd".into(),
            ssm_user: "ssm-user".into(),
            replacement_rule: None,
        }
    }
}

/// A recipe with its relative paths resolved against the recipe's folder.
#[derive(Debug, Clone)]
pub struct LoadedRecipe {
    pub recipe: Recipe,
    pub dir: PathBuf,
    pub path: PathBuf,
}

impl LoadedRecipe {
    pub fn resolve(&self, file: &Path) -> PathBuf {
        self.dir.join(file)
    }
}

/// Loads a recipe and applies `--set key=value` overrides (dotted keys, TOML values;
/// a value that is not valid TOML is taken as a string).
pub fn load(path: &Path, overrides: &[String]) -> Result<LoadedRecipe> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading recipe {}", path.display()))?;
    // Parse the file on its own first, so errors carry its line numbers.
    toml::from_str::<Recipe>(&text)
        .map_err(|e| anyhow::anyhow!("recipe {}: {}", path.display(), e.to_string().trim_end()))?;
    let mut table: toml::Table = toml::from_str(&text)?;
    for item in overrides {
        apply_override(&mut table, item)?;
    }
    let recipe = Recipe::deserialize(table).map_err(|e| {
        anyhow::anyhow!(
            "recipe {} with --set overrides: {}",
            path.display(),
            e.to_string().trim_end()
        )
    })?;
    validate(&recipe).with_context(|| format!("recipe {}", path.display()))?;
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok(LoadedRecipe {
        recipe,
        dir,
        path: path.to_path_buf(),
    })
}

fn apply_override(table: &mut toml::Table, item: &str) -> Result<()> {
    let Some((key, raw)) = item.split_once('=') else {
        bail!("--set {item}: expected key=value, e.g. --set sudo.strip_nopasswd=false");
    };
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.trim().split('.').collect();
    let (last, parents) = parts.split_last().expect("split yields one part");
    let mut here = table;
    for part in parents {
        let entry = here
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        here = entry
            .as_table_mut()
            .with_context(|| format!("--set {key}: {part} is not a table"))?;
    }
    here.insert(last.to_string(), value);
    Ok(())
}

fn validate(recipe: &Recipe) -> Result<()> {
    if let Some(days) = recipe.agent.key_auto_rotate_days {
        if !(1..=365).contains(&days) {
            bail!("agent.key_auto_rotate_days = {days}: the agent takes 1 to 365 days");
        }
    }
    if !crate::region::is_region_name(&recipe.region) {
        bail!(
            "region {:?} is not an AWS region name (like eu-west-1)",
            recipe.region
        );
    }
    crate::region::warn_if_unknown(&recipe.region);
    if let Some(pattern) = &recipe.hostname {
        check_hostname_pattern(pattern)?;
    }
    let a = &recipe.activation;
    let need = |present: bool, key: &str| -> Result<()> {
        if !present {
            bail!(
                "activation.{key} is required when source = \"{}\"",
                source_name(a.source)
            );
        }
        Ok(())
    };
    let forbid = |present: bool, key: &str| -> Result<()> {
        if present {
            bail!(
                "activation.{key} does not apply when source = \"{}\"",
                source_name(a.source)
            );
        }
        Ok(())
    };
    match a.source {
        Source::Shared | Source::Embedded if a.keep_token => {
            bail!("activation.keep_token applies only when source = \"broker\"");
        }
        Source::Shared | Source::Embedded if a.device_key || a.device_key_generate => {
            bail!("activation.device_key applies only when source = \"broker\"");
        }
        Source::Broker if a.device_key_generate && !a.device_key => {
            bail!("activation.device_key_generate needs activation.device_key = true");
        }
        Source::Shared => {
            need(a.id.is_some(), "id")?;
            need(a.code_file.is_some(), "code_file")?;
            forbid(a.url.is_some(), "url")?;
            forbid(a.expires.is_some(), "expires")?;
        }
        Source::Broker => {
            need(a.url.is_some(), "url")?;
            need(a.ca_file.is_some(), "ca_file")?;
            need(a.token_file.is_some(), "token_file")?;
            forbid(a.id.is_some(), "id")?;
            forbid(a.code_file.is_some(), "code_file")?;
        }
        Source::Embedded => {
            forbid(a.url.is_some(), "url")?;
            if a.id.is_some() != a.code_file.is_some() {
                bail!("activation.id and activation.code_file go together");
            }
            if a.id.is_none() && recipe.iam_role.is_none() {
                bail!(
                    "iam_role is required when source = \"embedded\" without an activation.id: \
                     piprov creates each card's activation for that role"
                );
            }
        }
    }
    if let Some(expires) = &a.expires {
        let lifetime = humantime::parse_duration(expires).with_context(|| {
            format!("activation.expires {expires:?} is not a duration like 24h")
        })?;
        if lifetime > MAX_ACTIVATION_LIFETIME || lifetime.is_zero() {
            bail!("activation.expires {expires:?}: SSM activations last up to 30 days");
        }
    }
    let s = &recipe.sudo;
    if s.nopasswd_file.is_empty()
        || s.nopasswd_file.contains('/')
        || s.nopasswd_file.starts_with('.')
    {
        bail!(
            "sudo.nopasswd_file {:?} must be a plain file name in /etc/sudoers.d",
            s.nopasswd_file
        );
    }
    if s.ssm_user.is_empty()
        || !s
            .ssm_user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        bail!("sudo.ssm_user {:?} is not a user name", s.ssm_user);
    }
    if let Some(id) = &a.id {
        check_activation_id(id).context("activation.id")?;
    }
    if let Some(url) = &a.url {
        check_broker_url(url)?;
    }
    reject_control_characters(&serde_json::to_value(recipe)?, "")
}

/// Every value of a recipe ends up in a `KEY=value` line of a card file, in SSM
/// or in a terminal: a line break in one would start a setting of its own on
/// the card (a `sudo` rule, a broker URL), so no value may hold any control
/// character.
fn reject_control_characters(value: &serde_json::Value, key: &str) -> Result<()> {
    match value {
        serde_json::Value::String(text) => {
            if let Some(c) = text.chars().find(|c| c.is_control()) {
                bail!("{key} holds the control character {c:?}: values must be one line of text");
            }
        }
        serde_json::Value::Object(fields) => {
            for (name, inner) in fields {
                let inner_key = if key.is_empty() {
                    name.clone()
                } else {
                    format!("{key}.{name}")
                };
                if name.chars().any(char::is_control) {
                    bail!("{inner_key:?}: a key holds a control character");
                }
                reject_control_characters(inner, &inner_key)?;
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                reject_control_characters(item, key)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// An SSM activation id: a UUID in its hyphenated form, as CreateActivation returns it.
pub fn check_activation_id(id: &str) -> Result<()> {
    let hyphenated = id.len() == 36
        && id.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        });
    if !hyphenated {
        bail!(
            "{id:?} is not an SSM activation id (a UUID such as 2f2f7b8e-1c3d-4e5f-9a0b-1c2d3e4f5a6b)"
        );
    }
    Ok(())
}

/// The broker's URL: https, a host, nothing a card's shell could take apart.
fn check_broker_url(url: &str) -> Result<()> {
    let Some(rest) = url.strip_prefix("https://") else {
        bail!("activation.url {url:?} must be an https:// URL: the token travels in it");
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-._~:/[]%".contains(c);
    if host.is_empty() || host.contains('@') || !rest.chars().all(allowed) {
        bail!(
            "activation.url {url:?} is not a plain https://HOST[:PORT][/PATH] URL (no user, query or spaces)"
        );
    }
    Ok(())
}

pub fn source_name(source: Source) -> &'static str {
    match source {
        Source::Embedded => "embedded",
        Source::Broker => "broker",
        Source::Shared => "shared",
    }
}

/// Literal parts may use what a hostname may (a-z, 0-9, -); placeholders are
/// `{serial}`, `{mac}` and `{n}`.
pub fn check_hostname_pattern(pattern: &str) -> Result<()> {
    let mut rest = pattern;
    while let Some(open) = rest.find('{') {
        check_literal(&rest[..open], pattern)?;
        let close = rest[open..]
            .find('}')
            .with_context(|| format!("hostname {pattern:?}: unclosed {{"))?;
        let name = &rest[open + 1..open + close];
        if !["serial", "mac", "n", "number"].contains(&name) {
            bail!(
                "hostname {pattern:?}: unknown placeholder {{{name}}} (use {{serial}}, {{mac}}, or {{number}} for the card's number)"
            );
        }
        rest = &rest[open + close + 1..];
    }
    check_literal(rest, pattern)?;
    if pattern.is_empty() || pattern.starts_with('-') {
        bail!("hostname {pattern:?} must start with a letter, digit or placeholder");
    }
    if pattern.ends_with('-') {
        bail!("hostname {pattern:?} must end with a letter, digit or placeholder");
    }
    let longest = longest_expansion(pattern);
    if longest > MAX_HOSTNAME {
        bail!(
            "hostname {pattern:?} can expand to {longest} characters; a hostname has at most {MAX_HOSTNAME}"
        );
    }
    Ok(())
}

/// A hostname is one DNS label (RFC 1123): the kernel and the agent refuse more.
pub const MAX_HOSTNAME: usize = 63;

/// How long a pattern can become: `{serial}` is up to 16 hex digits, `{mac}`
/// 12, a card's number up to 10 digits.
fn longest_expansion(pattern: &str) -> usize {
    [
        ("{serial}", 16),
        ("{mac}", 12),
        ("{number}", 10),
        ("{n}", 10),
    ]
    .iter()
    .fold(pattern.to_string(), |text, (placeholder, width)| {
        text.replace(placeholder, &"x".repeat(*width))
    })
    .len()
}

fn check_literal(literal: &str, pattern: &str) -> Result<()> {
    if let Some(c) = literal
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        bail!("hostname {pattern:?}: {c:?} is not allowed in a hostname (a-z, 0-9 and -)");
    }
    Ok(())
}

/// Fills in `{n}` (or `{number}`, the spelling `--help` can show: clap turns
/// a literal `{n}` into a line break); `{serial}` and `{mac}` stay for the card.
pub fn hostname_for_card(pattern: &str, number: Option<u32>) -> Result<String> {
    match number {
        Some(n) => Ok(pattern
            .replace("{n}", &n.to_string())
            .replace("{number}", &n.to_string())),
        None if pattern.contains("{n}") || pattern.contains("{number}") => {
            bail!("hostname {pattern:?} uses the card's number: give it with --number")
        }
        None => Ok(pattern.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_recipe(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("r.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    const SHARED: &str = "region = \"eu-west-1\"\n[activation]\nsource = \"shared\"\nid = \"0a0a0a0a-0000-4000-8000-000000000001\"\ncode_file = \"code.txt\"\n";

    #[test]
    fn a_typo_names_the_key_and_its_line() {
        let (_dir, path) = write_recipe(&format!("{SHARED}[sudo]\nstrip_nopaswd = false\n"));
        let err = format!("{:#}", load(&path, &[]).unwrap_err());
        assert!(err.contains("unknown field `strip_nopaswd`"), "{err}");
        assert!(err.contains("line 7"), "{err}");
    }

    #[test]
    fn defaults_harden_sudo() {
        let (_dir, path) = write_recipe(SHARED);
        let loaded = load(&path, &[]).unwrap();
        assert!(loaded.recipe.sudo.strip_ssm_user && loaded.recipe.sudo.strip_nopasswd);
        assert_eq!(loaded.recipe.hook, Hook::Auto);
        assert_eq!(
            loaded.resolve(Path::new("code.txt")),
            path.parent().unwrap().join("code.txt")
        );
    }

    #[test]
    fn overrides_are_typed_and_checked() {
        let (_dir, path) = write_recipe(SHARED);
        let loaded = load(
            &path,
            &[
                "sudo.strip_nopasswd=false".into(),
                "hostname=door-{n}".into(),
                "tags.site=a".into(),
            ],
        )
        .unwrap();
        assert!(!loaded.recipe.sudo.strip_nopasswd);
        assert_eq!(loaded.recipe.hostname.as_deref(), Some("door-{n}"));
        assert_eq!(loaded.recipe.tags["site"], "a");
        let err = load(&path, &["sudo.strip_nopaswd=false".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `strip_nopaswd`"), "{err}");
    }

    #[test]
    fn source_specific_keys_are_required_and_checked() {
        let (_dir, path) = write_recipe(
            "region = \"eu-west-1\"\n[activation]\nsource = \"broker\"\nurl = \"http://127.0.0.1\"\nca_file = \"a\"\ntoken_file = \"b\"\n",
        );
        assert!(format!("{:#}", load(&path, &[]).unwrap_err()).contains("must be an https:// URL"));
        let (_dir, path) =
            write_recipe("region = \"eu-west-1\"\n[activation]\nsource = \"shared\"\n");
        assert!(
            format!("{:#}", load(&path, &[]).unwrap_err()).contains("activation.id is required")
        );
        let (_dir, path) = write_recipe(
            "region = \"eu-west-1\"\niam_role = \"R\"\n[activation]\nsource = \"embedded\"\nexpires = \"40d\"\n",
        );
        assert!(format!("{:#}", load(&path, &[]).unwrap_err()).contains("up to 30 days"));
        let (_dir, path) =
            write_recipe("region = \"eu-west-1\"\n[activation]\nsource = \"embedded\"\n");
        assert!(
            format!("{:#}", load(&path, &[]).unwrap_err()).contains("iam_role is required"),
            "piprov cannot create a card's activation without a role"
        );
        let (_dir, path) =
            write_recipe("region = \"Ireland\"\n[activation]\nsource = \"embedded\"\n");
        assert!(format!("{:#}", load(&path, &[]).unwrap_err()).contains("not an AWS region"));
    }

    #[test]
    fn hostname_patterns() {
        assert!(check_hostname_pattern("pi-{serial}").is_ok());
        assert!(check_hostname_pattern("door-{n}-{mac}").is_ok());
        assert!(
            check_hostname_pattern("pi-{serail}")
                .unwrap_err()
                .to_string()
                .contains("unknown placeholder {serail}")
        );
        assert!(check_hostname_pattern("Pi_1").is_err());
        assert_eq!(hostname_for_card("door-{n}", Some(7)).unwrap(), "door-7");
        assert!(hostname_for_card("door-{n}", None).is_err());
        assert_eq!(
            hostname_for_card("door-{number}", Some(7)).unwrap(),
            "door-7"
        );
        assert!(check_hostname_pattern("door-{number}").is_ok());
    }
}
