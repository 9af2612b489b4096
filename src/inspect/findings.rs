//! Turns facts into findings: each risk for a fleet of clones, with a severity
//! and a one-line remedy.

use serde::Serialize;

use super::facts::{Facts, MachineIdState, SsmAgentUsers};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    /// Warnings and criticals make `inspect` exit with the "risky" code.
    pub fn is_risky(self) -> bool {
        self >= Severity::Warning
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// Stable identifier, for scripts.
    pub id: &'static str,
    pub severity: Severity,
    pub summary: String,
    pub remedy: String,
}

const STAMP_REMEDY: &str =
    "run `piprov stamp` so every card wipes it on first boot and registers anew";

pub fn assess(facts: &Facts) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut add = |id, severity, summary: String, remedy: &str| {
        findings.push(Finding {
            id,
            severity,
            summary,
            remedy: remedy.to_string(),
        });
    };
    let reg = &facts.registration;
    let stamped = facts.stamp.is_some();

    if !facts.ssm_agent.installed {
        add(
            "agent-missing",
            Severity::Warning,
            "amazon-ssm-agent is not installed: cards cannot register with SSM".into(),
            "install the amazon-ssm-agent package on the golden image",
        );
    }
    if let Some(id) = &reg.instance_id {
        add(
            "ssm-registration-baked",
            Severity::Critical,
            format!(
                "SSM registration baked in: {id} ({}); every clone would claim this managed instance",
                reg.region.as_deref().unwrap_or("region unknown")
            ),
            STAMP_REMEDY,
        );
    } else if !reg.identity_files.is_empty() {
        add(
            "ssm-identity-files",
            Severity::Warning,
            format!(
                "SSM identity files present: {}",
                reg.identity_files.join(", ")
            ),
            STAMP_REMEDY,
        );
    }
    if reg
        .identity_files
        .iter()
        .any(|f| f.ends_with("/RegistrationKey"))
    {
        add(
            "ssm-private-key-baked",
            Severity::Critical,
            "the agent's registration private key is in the image: clones share one key".into(),
            STAMP_REMEDY,
        );
    }
    if reg.shared_credentials {
        add(
            "aws-credentials-baked",
            Severity::Critical,
            "/root/.aws/credentials holds the agent's [default] role credentials".into(),
            "delete /root/.aws/credentials from the golden image, or stamp it (the guard wipes them)",
        );
    }
    if !reg.working_dirs.is_empty() {
        add(
            "ssm-working-state",
            Severity::Warning,
            format!(
                "agent working state of {} is in the image",
                reg.working_dirs.join(", ")
            ),
            STAMP_REMEDY,
        );
    }

    let sudo = &facts.sudo;
    match sudo.ssm_agent_users {
        SsmAgentUsers::Nopasswd => add(
            "ssm-user-nopasswd",
            Severity::Critical,
            "/etc/sudoers.d/ssm-agent-users gives ssm-user passwordless root".into(),
            "replace it with a file holding only `#User rules for ssm-user` (piprov stamp does)",
        ),
        SsmAgentUsers::Absent if !stamped => add(
            "ssm-user-sudo-pending",
            Severity::Info,
            "no /etc/sudoers.d/ssm-agent-users: the agent will grant ssm-user NOPASSWD on the first Session Manager session".into(),
            "stamp with sudo hardening on (the default) to pre-empt it",
        ),
        SsmAgentUsers::Custom => add(
            "ssm-user-sudo-custom",
            Severity::Info,
            "/etc/sudoers.d/ssm-agent-users holds custom rules".into(),
            "review the rules by hand",
        ),
        _ => {}
    }
    for file in &sudo.nopasswd_files {
        add(
            "nopasswd-sudoers",
            Severity::Warning,
            format!("{file} grants passwordless sudo"),
            "remove it, or stamp with pi NOPASSWD stripping on (the default)",
        );
    }
    if !sudo.ssm_user_admin_groups.is_empty() {
        add(
            "ssm-user-admin-group",
            Severity::Critical,
            format!(
                "ssm-user is a member of {}",
                sudo.ssm_user_admin_groups.join(", ")
            ),
            "remove ssm-user from the admin groups (the guard does on first boot)",
        );
    } else if sudo.ssm_user_exists {
        add(
            "ssm-user-present",
            Severity::Warning,
            "ssm-user exists in /etc/passwd: the golden Pi ran Session Manager sessions".into(),
            "harmless alone; make sure its sudo rules are stripped",
        );
    }

    if facts.machine_id == MachineIdState::Baked {
        add(
            "machine-id-baked",
            Severity::Critical,
            "/etc/machine-id is set: clones share it and pass the agent's fingerprint check as one node".into(),
            "write `uninitialized` to /etc/machine-id on the golden image, or stamp it (the guard makes a new one)",
        );
    }
    if facts.dbus_machine_id_baked {
        add(
            "dbus-machine-id-baked",
            Severity::Warning,
            "/var/lib/dbus/machine-id is a file of its own with a fixed id".into(),
            "make it a link to /etc/machine-id",
        );
    }
    if !facts.ssh_host_keys.is_empty() {
        add(
            "ssh-host-keys-baked",
            Severity::Critical,
            format!(
                "SSH host keys baked in ({}): clones can impersonate each other",
                facts.ssh_host_keys.join(", ")
            ),
            "delete /etc/ssh/ssh_host_* from the golden image, or stamp it (the guard regenerates them)",
        );
    }
    for path in &facts.clone_state {
        add(
            "clone-state",
            Severity::Warning,
            format!("{path} is specific to the machine the image was taken from"),
            "delete it from the golden image",
        );
    }

    if let Some(seed) = &facts.boot.cloud_init_seed {
        add(
            "cloud-init-seed",
            Severity::Info,
            format!(
                "cloud-init NoCloud seed on the boot partition (instance-id {})",
                seed.instance_id.as_deref().unwrap_or("unset")
            ),
            "each card needs its own instance-id; piprov stamp writes one",
        );
    }
    if !stamped {
        add(
            "not-stamped",
            Severity::Info,
            "no piprov stamp: cards will keep whatever identity the image carries".into(),
            "run `piprov stamp IMAGE --recipe …`",
        );
    }
    if let Some(stamp) = &facts.stamp {
        for finding in &mut findings {
            if let Some(how) = handled_by_stamp(finding.id, stamp) {
                finding.severity = Severity::Info;
                finding.summary = format!("{} (handled: {how})", finding.summary);
            }
        }
    }
    findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
    findings
}

/// What the stamp's first-boot guard does about a finding, if anything.
fn handled_by_stamp(id: &str, stamp: &serde_json::Value) -> Option<&'static str> {
    let sudo = |key: &str| stamp["sudo"][key].as_bool().unwrap_or(true);
    match id {
        "ssm-registration-baked"
        | "ssm-identity-files"
        | "ssm-private-key-baked"
        | "aws-credentials-baked"
        | "ssm-working-state" => {
            Some("the stamp wipes it on first boot and registers the card anew")
        }
        "machine-id-baked" | "dbus-machine-id-baked" => {
            Some("the stamp gives each card a new machine-id")
        }
        "ssh-host-keys-baked" => Some("the stamp gives each card new SSH host keys"),
        "clone-state" => Some("the stamp deletes it on first boot"),
        "ssm-user-nopasswd" | "ssm-user-admin-group" if sudo("strip_ssm_user") => {
            Some("the stamp strips ssm-user's sudo on first boot")
        }
        "nopasswd-sudoers" if sudo("strip_nopasswd") => Some("the stamp removes it on first boot"),
        _ => None,
    }
}
