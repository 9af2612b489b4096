//! What an image contains, read without mounting: the raw material for findings.

use std::fmt::Debug;
use std::io::{Read, Seek, Write};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::Value;
use sha2::Digest as _;

use crate::image::{BootFs, Cmdline, FsKind, Image, RootFs, TableKind};
use crate::layout::{agent, boot as boot_files};

#[derive(Debug, Serialize)]
pub struct Facts {
    pub image_size: u64,
    pub partition_table: TableFacts,
    pub boot: BootFacts,
    pub os: OsFacts,
    pub ssm_agent: AgentFacts,
    pub registration: RegistrationFacts,
    pub sudo: SudoFacts,
    pub machine_id: MachineIdState,
    /// True when `/var/lib/dbus/machine-id` is a file of its own, not a link to `/etc/machine-id`.
    pub dbus_machine_id_baked: bool,
    pub ssh_host_keys: Vec<String>,
    /// Clone-specific state files found (random seed, DHCP leases, udev net rules, shell histories).
    pub clone_state: Vec<String>,
    pub cloud_init_installed: bool,
    pub stamp: Option<Value>,
    pub device_status: Option<Value>,
    /// What tells this card from its siblings (none of it secret).
    pub identity: IdentityFacts,
}

#[derive(Debug, Clone, Serialize)]
pub struct IdentityFacts {
    /// `/etc/machine-id`, when it holds a real id.
    pub machine_id: Option<String>,
    /// `ssh-keygen -l` style fingerprints of the host public keys (`SHA256:…`).
    pub ssh_host_key_fingerprints: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct TableFacts {
    pub kind: TableKind,
    pub disk_id: String,
    pub partitions: Vec<PartitionFacts>,
}

#[derive(Debug, Serialize)]
pub struct PartitionFacts {
    pub number: u32,
    pub start: u64,
    pub size: u64,
    pub type_id: String,
    pub filesystem: FsKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub partuuid: String,
}

#[derive(Debug, Serialize)]
pub struct BootFacts {
    pub partition: u32,
    pub fat_type: String,
    pub label: String,
    pub mount_point: String,
    /// `fstab` when read from `/etc/fstab`, `convention` when inferred from the release.
    pub mount_point_source: String,
    pub cmdline: Vec<String>,
    pub root: Option<String>,
    pub files: Vec<String>,
    pub cloud_init_seed: Option<SeedFacts>,
}

#[derive(Debug, Serialize)]
pub struct SeedFacts {
    pub files: Vec<String>,
    pub instance_id: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct OsFacts {
    pub pretty_name: Option<String>,
    pub id: Option<String>,
    pub version_id: Option<String>,
    pub codename: Option<String>,
    /// `/etc/rpi-issue` exists: built by pi-gen.
    pub raspberry_pi_os: bool,
}

#[derive(Debug, Serialize)]
pub struct AgentFacts {
    pub installed: bool,
    /// `deb`, `snap` or `binary` (found on disk without a package record).
    pub package: Option<String>,
    pub version: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct RegistrationFacts {
    pub instance_id: Option<String>,
    pub region: Option<String>,
    /// The file the id was read from.
    pub source: Option<String>,
    /// Identity files present (registration, Vault manifest, key, fingerprint, runtimeconfig).
    pub identity_files: Vec<String>,
    /// `mi-*` working folders under the data root.
    pub working_dirs: Vec<String>,
    /// The agent's shared role credentials in `/root/.aws/credentials`.
    pub shared_credentials: bool,
}

#[derive(Debug, Serialize)]
pub struct SudoFacts {
    pub ssm_agent_users: SsmAgentUsers,
    /// Other sudoers.d files that grant NOPASSWD (e.g. `010_pi-nopasswd`).
    pub nopasswd_files: Vec<String>,
    pub ssm_user_exists: bool,
    /// Groups granting sudo that list ssm-user.
    pub ssm_user_admin_groups: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SsmAgentUsers {
    /// Absent: the agent writes `ssm-user ALL=(ALL) NOPASSWD:ALL` on first session.
    Absent,
    /// Present and grants ssm-user NOPASSWD.
    Nopasswd,
    /// Present with no active rule: the AWS-documented way to turn it off.
    Disabled,
    /// Present with other rules.
    Custom,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MachineIdState {
    Absent,
    Empty,
    /// systemd's first-boot marker (machine-id(5)).
    Uninitialized,
    Baked,
}

pub fn gather<D: Read + Write + Seek + Debug + 'static>(image: &Image<D>) -> Result<Facts> {
    let table = image.table();
    let partition_table = TableFacts {
        kind: table.kind,
        disk_id: table.disk_id.clone(),
        partitions: table
            .partitions
            .iter()
            .map(|p| PartitionFacts {
                number: p.number,
                start: p.start,
                size: p.size,
                type_id: p.type_id.clone(),
                filesystem: image.probe(p),
                name: p.name.clone(),
                partuuid: p.partuuid.clone(),
            })
            .collect(),
    };
    // A Pi image is recognised by its boot partition first: say so before
    // complaining about whatever the root partition holds.
    image.boot_partition()?;
    let rootfs = image.rootfs()?;
    let os = os_facts(&rootfs)?;
    let ssm_agent = agent_facts(&rootfs)?;
    let registration = registration_facts(&rootfs)?;
    let sudo = sudo_facts(&rootfs)?;
    let machine_id = machine_id_state(&rootfs)?;
    let dbus_machine_id_baked = !rootfs.is_symlink("/var/lib/dbus/machine-id")?
        && rootfs
            .read_text("/var/lib/dbus/machine-id")?
            .is_some_and(|t| is_real_machine_id(&t));
    let ssh_host_keys = rootfs
        .list("/etc/ssh")?
        .into_iter()
        .filter(|n| n.starts_with("ssh_host_") && n.ends_with("_key"))
        .collect();
    let clone_state = clone_state(&rootfs)?;
    let cloud_init_installed =
        rootfs.exists("/usr/bin/cloud-init")? || rootfs.exists("/etc/cloud/cloud.cfg")?;
    let identity = identity_facts(&rootfs)?;
    // The FAT is mounted once for everything read from it.
    let boot_fs = image.boot()?;
    let boot = boot_facts(image, &boot_fs, &rootfs, &os)?;
    Ok(Facts {
        image_size: image.len(),
        partition_table,
        ssm_agent,
        registration,
        sudo,
        machine_id,
        dbus_machine_id_baked,
        ssh_host_keys,
        clone_state,
        cloud_init_installed,
        stamp: boot_json(&boot_fs, boot_files::STAMP)?,
        device_status: boot_json(&boot_fs, boot_files::STATUS)?,
        identity,
        os,
        boot,
    })
}

fn os_facts(rootfs: &RootFs) -> Result<OsFacts> {
    let text = match rootfs.read_text("/etc/os-release")? {
        Some(text) => text,
        None => rootfs.read_text("/usr/lib/os-release")?.unwrap_or_default(),
    };
    let field = |key: &str| {
        text.lines().find_map(|line| {
            let value = line.strip_prefix(key)?.strip_prefix('=')?;
            Some(value.trim().trim_matches('"').to_string())
        })
    };
    Ok(OsFacts {
        pretty_name: field("PRETTY_NAME"),
        id: field("ID"),
        version_id: field("VERSION_ID"),
        codename: field("VERSION_CODENAME"),
        raspberry_pi_os: rootfs.exists("/etc/rpi-issue")?,
    })
}

fn boot_facts<D: Read + Write + Seek + Debug + 'static>(
    image: &Image<D>,
    boot: &BootFs<D>,
    rootfs: &RootFs,
    os: &OsFacts,
) -> Result<BootFacts> {
    let partition = image.boot_partition()?.number;
    let mut files = boot.list_root()?;
    files.sort();
    if !files
        .iter()
        .any(|f| f == boot_files::CMDLINE || f == boot_files::CONFIG)
    {
        bail!(
            "not a Raspberry Pi image: the boot partition (partition {partition}) has neither \
             {} nor {}",
            boot_files::CMDLINE,
            boot_files::CONFIG
        );
    }
    let cmdline = match boot.read(boot_files::CMDLINE)? {
        Some(data) => Some(Cmdline::parse(&data, boot_files::CMDLINE)?),
        None => None,
    };
    let (mount_point, mount_point_source) = match boot_mount_from_fstab(rootfs)? {
        Some(mount) => (mount, "fstab"),
        None => (boot_mount_by_convention(os).to_string(), "convention"),
    };
    let seed_files: Vec<String> = files
        .iter()
        .filter(|f| ["user-data", "meta-data", "network-config"].contains(&f.as_str()))
        .cloned()
        .collect();
    let cloud_init_seed = if seed_files.is_empty() {
        None
    } else {
        let meta = boot.read("meta-data")?.unwrap_or_default();
        let instance_id = String::from_utf8_lossy(&meta).lines().find_map(|l| {
            l.strip_prefix("instance-id:")
                .map(|v| v.trim().trim_matches(['"', '\'']).to_string())
        });
        Some(SeedFacts {
            files: seed_files,
            instance_id,
        })
    };
    Ok(BootFacts {
        partition,
        fat_type: boot.fat_type().to_string(),
        label: boot.volume_label(),
        mount_point,
        mount_point_source: mount_point_source.to_string(),
        root: cmdline
            .as_ref()
            .and_then(|c| c.value("root").map(str::to_string)),
        cmdline: cmdline
            .map(|c| c.tokens().map(str::to_string).collect())
            .unwrap_or_default(),
        files,
        cloud_init_seed,
    })
}

/// The mount point of the vfat line in fstab (`/boot/firmware` on Bookworm and later).
fn boot_mount_from_fstab(rootfs: &RootFs) -> Result<Option<String>> {
    let fstab = rootfs.read_text("/etc/fstab")?.unwrap_or_default();
    Ok(fstab
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|fields| fields.len() >= 3 && fields[2] == "vfat" && fields[1].starts_with("/boot"))
        .map(|fields| fields[1].to_string()))
}

fn boot_mount_by_convention(os: &OsFacts) -> &'static str {
    let version: u32 = os
        .version_id
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(u32::MAX);
    // Raspberry Pi OS moved the boot partition to /boot/firmware with Bookworm (Debian 12).
    if version >= 12 {
        "/boot/firmware"
    } else {
        "/boot"
    }
}

fn agent_facts(rootfs: &RootFs) -> Result<AgentFacts> {
    let status = rootfs
        .read_text("/var/lib/dpkg/status")?
        .unwrap_or_default();
    let deb_version = status.split("\n\n").find_map(|stanza| {
        let field = |key: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
        };
        let is_agent = field("Package:").as_deref() == Some(agent::PACKAGE);
        let installed = field("Status:").is_some_and(|s| s.ends_with(" installed"));
        (is_agent && installed).then(|| field("Version:")).flatten()
    });
    if let Some(version) = deb_version {
        return Ok(AgentFacts {
            installed: true,
            package: Some("deb".into()),
            version: Some(version),
        });
    }
    let snap_revision = rootfs
        .list("/var/lib/snapd/snaps")?
        .into_iter()
        .find_map(|n| {
            n.strip_prefix("amazon-ssm-agent_")?
                .strip_suffix(".snap")
                .map(|rev| format!("snap revision {rev}"))
        });
    if snap_revision.is_some() || rootfs.exists("/snap/amazon-ssm-agent")? {
        return Ok(AgentFacts {
            installed: true,
            package: Some("snap".into()),
            version: snap_revision,
        });
    }
    let binary = rootfs.exists(agent::BINARY)?;
    Ok(AgentFacts {
        installed: binary,
        package: binary.then(|| "binary".into()),
        version: None,
    })
}

fn registration_facts(rootfs: &RootFs) -> Result<RegistrationFacts> {
    let mut identity_files = Vec::new();
    for path in agent::IDENTITY_FILES {
        if rootfs.exists(path)? {
            identity_files.push(path.to_string());
        }
    }
    // `registration` is what the agent reads first; the Vault key holds the same id.
    let mut found = None;
    for (path, id_key, region_key) in [
        (agent::REGISTRATION, "ManagedInstanceID", "Region"),
        (agent::REGISTRATION_KEY, "instanceID", "region"),
    ] {
        let Some(data) = rootfs.read(path)? else {
            continue;
        };
        let json: Value = serde_json::from_slice(&data).unwrap_or(Value::Null);
        let text = |key: &str| json.get(key).and_then(Value::as_str).map(str::to_string);
        if let Some(id) = text(id_key).filter(|id| !id.is_empty()) {
            found = Some((id, text(region_key), path.to_string()));
            break;
        }
    }
    let (instance_id, region, source) = match found {
        Some((id, region, path)) => (Some(id), region, Some(path)),
        None => (None, None, None),
    };
    let working_dirs = rootfs
        .list(agent::DATA_ROOT)?
        .into_iter()
        .filter(|n| n.starts_with("mi-"))
        .collect();
    let shared_credentials = rootfs
        .read_text(agent::SHARED_CREDENTIALS)?
        .is_some_and(|t| t.lines().any(|l| l.trim() == "[default]"));
    Ok(RegistrationFacts {
        instance_id,
        region,
        source,
        identity_files,
        working_dirs,
        shared_credentials,
    })
}

/// Active sudoers lines (comments and blank lines dropped).
fn sudo_rules(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

fn sudo_facts(rootfs: &RootFs) -> Result<SudoFacts> {
    let ssm_agent_users = match rootfs.read_text(agent::SUDOERS_SSM_USER)? {
        None => SsmAgentUsers::Absent,
        Some(text) => {
            let rules = sudo_rules(&text);
            if rules.is_empty() {
                SsmAgentUsers::Disabled
            } else if rules
                .iter()
                .any(|r| r.starts_with("ssm-user") && r.contains("NOPASSWD"))
            {
                SsmAgentUsers::Nopasswd
            } else {
                SsmAgentUsers::Custom
            }
        }
    };
    let mut nopasswd_files = Vec::new();
    for name in rootfs.list("/etc/sudoers.d")? {
        let path = format!("/etc/sudoers.d/{name}");
        if path == agent::SUDOERS_SSM_USER {
            continue;
        }
        let text = rootfs.read_text(&path)?.unwrap_or_default();
        if sudo_rules(&text).iter().any(|r| r.contains("NOPASSWD")) {
            nopasswd_files.push(path);
        }
    }
    let passwd = rootfs.read_text("/etc/passwd")?.unwrap_or_default();
    let ssm_user_exists = passwd.lines().any(|l| l.starts_with("ssm-user:"));
    let group = rootfs.read_text("/etc/group")?.unwrap_or_default();
    let ssm_user_admin_groups = group
        .lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split(':').collect();
            let admin = matches!(
                fields.first(),
                Some(&"sudo") | Some(&"admin") | Some(&"wheel")
            );
            let member = fields
                .get(3)
                .is_some_and(|m| m.split(',').any(|u| u == "ssm-user"));
            (admin && member).then(|| fields[0].to_string())
        })
        .collect();
    Ok(SudoFacts {
        ssm_agent_users,
        nopasswd_files,
        ssm_user_exists,
        ssm_user_admin_groups,
    })
}

fn identity_facts(rootfs: &RootFs) -> Result<IdentityFacts> {
    use base64::Engine as _;
    let machine_id = rootfs
        .read_text("/etc/machine-id")?
        .filter(|t| is_real_machine_id(t))
        .map(|t| t.trim().to_string());
    let mut fingerprints = Vec::new();
    for name in rootfs.list("/etc/ssh")? {
        if !(name.starts_with("ssh_host_") && name.ends_with("_key.pub")) {
            continue;
        }
        let Some(text) = rootfs.read_text(&format!("/etc/ssh/{name}"))? else {
            continue;
        };
        // `type base64-blob comment`: the fingerprint is over the decoded blob.
        if let Some(blob) = text
            .split_whitespace()
            .nth(1)
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        {
            let digest = sha2::Sha256::digest(&blob);
            fingerprints.push(format!(
                "SHA256:{}",
                base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
            ));
        }
    }
    fingerprints.sort();
    Ok(IdentityFacts {
        machine_id,
        ssh_host_key_fingerprints: fingerprints,
    })
}

fn is_real_machine_id(text: &str) -> bool {
    let id = text.trim();
    !id.is_empty() && id != "uninitialized"
}

fn machine_id_state(rootfs: &RootFs) -> Result<MachineIdState> {
    Ok(match rootfs.read_text("/etc/machine-id")? {
        None => MachineIdState::Absent,
        Some(t) if t.trim().is_empty() => MachineIdState::Empty,
        Some(t) if t.trim() == "uninitialized" => MachineIdState::Uninitialized,
        Some(_) => MachineIdState::Baked,
    })
}

/// Paths in the image that match the card contract's clone-state list, the
/// list the guard deletes from.
fn clone_state(rootfs: &RootFs) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for pattern in crate::layout::CLONE_STATE {
        let parts: Vec<&str> = pattern.trim_start_matches('/').split('/').collect();
        glob(rootfs, "", &parts, &mut found)?;
    }
    Ok(found)
}

/// Expands `parts` (path components, each with at most one `*`) under `dir`.
fn glob(rootfs: &RootFs, dir: &str, parts: &[&str], found: &mut Vec<String>) -> Result<()> {
    let Some((first, rest)) = parts.split_first() else {
        return Ok(());
    };
    let names = if first.contains('*') {
        let listed = rootfs.list(if dir.is_empty() { "/" } else { dir })?;
        listed
            .into_iter()
            .filter(|n| matches_glob(first, n))
            .collect()
    } else {
        vec![first.to_string()]
    };
    for name in names {
        let path = format!("{dir}/{name}");
        if rest.is_empty() {
            if rootfs.exists(&path)? || rootfs.is_symlink(&path)? {
                found.push(path);
            }
        } else if rootfs.is_dir(&path)? {
            glob(rootfs, &path, rest, found)?;
        }
    }
    Ok(())
}

/// A shell glob with at most one `*`, which (as in sh) matches no leading dot.
fn matches_glob(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((before, after)) => {
            name.len() >= before.len() + after.len()
                && name.starts_with(before)
                && name.ends_with(after)
                && (before.starts_with('.') || !name.starts_with('.'))
        }
    }
}

/// A JSON file on the boot partition, with secrets redacted.
fn boot_json<D: Read + Write + Seek>(boot: &BootFs<D>, name: &str) -> Result<Option<Value>> {
    let Some(data) = boot.read(name)? else {
        return Ok(None);
    };
    let mut value: Value = serde_json::from_slice(&data)
        .with_context(|| format!("{name} on the boot partition is not valid JSON"))?;
    redact(&mut value);
    Ok(Some(value))
}

/// Replaces the string value of every key that names a secret, at any depth.
pub fn redact(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                let key = key.to_ascii_lowercase();
                let secret = ["code", "token", "secret", "password", "private"]
                    .iter()
                    .any(|s| key.contains(s));
                if secret && v.is_string() {
                    *v = Value::String("<redacted>".into());
                } else {
                    redact(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_reaches_nested_secret_keys_only() {
        let mut v = serde_json::json!({
            "region": "eu-west-1",
            "activation": {"id": "a1", "code": "SECRET1"},
            "broker": [{"enrollment_token": "SECRET2", "url": "https://127.0.0.1"}]
        });
        redact(&mut v);
        let text = v.to_string();
        assert!(!text.contains("SECRET"), "{text}");
        assert!(text.contains("eu-west-1") && text.contains("a1") && text.contains("127.0.0.1"));
        let mut flags = serde_json::json!({"secret": true, "cmdline_tokens": ["systemd.run=/x"]});
        redact(&mut flags);
        assert_eq!(flags["secret"], true);
        assert_eq!(flags["cmdline_tokens"][0], "systemd.run=/x");
    }

    #[test]
    fn sudo_rules_ignore_comments() {
        assert!(sudo_rules("#User rules for ssm-user\n\n").is_empty());
        assert_eq!(
            sudo_rules("# x\nssm-user ALL=(ALL) NOPASSWD:ALL\n").len(),
            1
        );
    }
}
