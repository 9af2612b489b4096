//! The human-readable form of a report.

use std::fmt::Write;

use super::facts::MachineIdState;
use super::{Report, Severity};
use crate::units::size;

pub fn render_text(report: &Report) -> String {
    let f = &report.facts;
    let mut out = String::new();
    // Names and text come from the image (cmdline.txt, os-release, labels):
    // a control character in them could drive the terminal, so each is shown
    // escaped (`\u{1b}`), never raw.
    let mut line = |s: String| {
        for c in s.chars() {
            if c.is_control() {
                out.extend(c.escape_default());
            } else {
                out.push(c);
            }
        }
        out.push('\n');
    };
    line(format!("{} ({})", report.image, size(f.image_size)));
    let t = &f.partition_table;
    line(format!(
        "  partition table  {} disk id {}",
        t.kind, t.disk_id
    ));
    for p in &t.partitions {
        line(format!(
            "    {}  start {:>12}  {:>10}  type {:<10} {:?}{}",
            p.number,
            p.start,
            size(p.size),
            p.type_id.chars().take(10).collect::<String>(),
            p.filesystem,
            p.name
                .as_ref()
                .map(|n| format!("  \"{n}\""))
                .unwrap_or_default()
        ));
    }
    let os = &f.os;
    line(format!(
        "  os               {}{}",
        os.pretty_name
            .as_deref()
            .unwrap_or("unknown (no /etc/os-release)"),
        if os.raspberry_pi_os {
            ", Raspberry Pi OS"
        } else {
            ""
        }
    ));
    let b = &f.boot;
    line(format!(
        "  boot             partition {} {} \"{}\" mounted at {} ({})",
        b.partition, b.fat_type, b.label, b.mount_point, b.mount_point_source
    ));
    line(format!("  cmdline.txt      {}", b.cmdline.join(" ")));
    let a = &f.ssm_agent;
    line(format!(
        "  amazon-ssm-agent {}",
        if a.installed {
            format!(
                "{} {}",
                a.package.as_deref().unwrap_or(""),
                a.version.as_deref().unwrap_or("version unknown")
            )
        } else {
            "not installed".into()
        }
    ));
    let r = &f.registration;
    line(format!(
        "  registration     {}",
        match &r.instance_id {
            Some(id) => format!(
                "{id} in {}",
                r.region.as_deref().unwrap_or("unknown region")
            ),
            None => "none".into(),
        }
    ));
    line(format!(
        "  machine-id       {}",
        match f.machine_id {
            MachineIdState::Absent => "absent",
            MachineIdState::Empty => "empty",
            MachineIdState::Uninitialized => "uninitialized (set on first boot)",
            MachineIdState::Baked => "baked in",
        }
    ));
    line(format!(
        "  ssh host keys    {}",
        if f.ssh_host_keys.is_empty() {
            "none".into()
        } else {
            f.ssh_host_keys.join(" ")
        }
    ));
    line(format!(
        "  cloud-init       {}",
        if f.cloud_init_installed {
            "installed"
        } else {
            "not installed"
        }
    ));
    line(format!(
        "  piprov stamp     {}",
        match &f.stamp {
            Some(stamp) => {
                let text = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
                format!(
                    "recipe {}, hook {}, {} activation {}, hostname {}, stamped {}",
                    text(&stamp["recipe"]),
                    text(&stamp["hook"]),
                    text(&stamp["activation"]["source"]),
                    text(&stamp["activation"]["id"]),
                    text(&stamp["hostname"]),
                    text(&stamp["stamped_at"])
                )
            }
            None => "none".into(),
        }
    ));
    if let Some(status) = &f.device_status {
        line(format!("  device status    {status}"));
    }
    line(String::new());
    if report.findings.is_empty() {
        line("no findings".into());
    }
    for finding in &report.findings {
        let label = match finding.severity {
            Severity::Critical => "CRITICAL",
            Severity::Warning => "WARNING ",
            Severity::Info => "info    ",
        };
        line(format!("{label} {}: {}", finding.id, finding.summary));
        line(format!("         fix: {}", finding.remedy));
    }
    let mut tail = String::new();
    let risky = report
        .findings
        .iter()
        .filter(|f| f.severity.is_risky())
        .count();
    let _ = write!(tail, "{risky} risky finding(s)");
    line(tail);
    out
}
