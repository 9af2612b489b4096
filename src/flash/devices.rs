//! `piprov devices`: the block devices a card could be, each with what
//! `piprov flash` would say of it (the same probe and the same checks), so the
//! safe choice is the obvious one.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Serialize;

use super::target::{self, Policy, TargetInfo};

#[derive(Debug, Serialize)]
pub struct Device {
    #[serde(flatten)]
    pub info: TargetInfo,
    /// `usb`, `mmc`, `nvme`, `virtio`, `ata`, `loop`, `scsi` or `other`.
    pub bus: String,
    /// Partitions in use: `sdb1 at /media/pi/bootfs`, `sdb2 as swap`.
    pub in_use: Vec<String>,
    /// Why `piprov flash` would refuse it (without --allow-* flags); None: it would write it.
    pub refused: Option<String>,
}

/// Kernel names that are never a card: RAM disks, compressed swap, optical drives.
fn never_a_card(name: &str) -> bool {
    ["ram", "zram", "sr", "fd", "md", "dm-"]
        .iter()
        .any(|p| name.starts_with(p))
}

fn bus(sys: &Path, name: &str) -> String {
    let path = std::fs::canonicalize(sys)
        .unwrap_or_else(|_| sys.to_path_buf())
        .to_string_lossy()
        .into_owned();
    let bus = if name.starts_with("loop") {
        "loop"
    } else if path.contains("/usb") {
        "usb"
    } else if name.starts_with("mmcblk") || path.contains("/mmc") {
        "mmc"
    } else if name.starts_with("nvme") {
        "nvme"
    } else if path.contains("/virtio") {
        "virtio"
    } else if path.contains("/ata") {
        "ata"
    } else if name.starts_with("sd") {
        "scsi"
    } else {
        "other"
    };
    bus.to_string()
}

/// Every whole block device with a size, as /sys/block lists them, by name.
pub fn list() -> Result<Vec<Device>> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/block")?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !never_a_card(n))
        .collect();
    names.sort();
    let policy = Policy {
        required: 0,
        allow_non_removable: false,
        allow_large: false,
    };
    let mut devices = Vec::new();
    for name in names {
        let sys = Path::new("/sys/block").join(&name);
        let size: u64 = std::fs::read_to_string(sys.join("size"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        // An unattached loop device or an empty card reader slot.
        if size == 0 {
            continue;
        }
        let path = PathBuf::from("/dev").join(&name);
        let Ok(info) = target::probe(&path) else {
            continue;
        };
        if !info.block_device {
            continue;
        }
        let in_use = target::in_use(&info)
            .into_iter()
            .map(|(part, place)| {
                if place == "swap" {
                    format!("{part} as swap")
                } else {
                    format!("{part} at {place}")
                }
            })
            .collect();
        devices.push(Device {
            bus: bus(&sys, &name),
            refused: target::refusal(&info, &policy),
            in_use,
            info,
        });
    }
    Ok(devices)
}

/// The table `piprov devices` prints.
pub fn render(devices: &[Device]) -> String {
    let mut out = format!(
        "{:<14} {:>9}  {:<6} {:<28} {:<18} {:<3} {:<3} {:<24} flash\n",
        "device", "size", "bus", "model", "serial", "rm", "ro", "in use"
    );
    for d in devices {
        let i = &d.info;
        let model = [i.vendor.as_deref(), i.model.as_deref()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" ");
        let verdict = match &d.refused {
            None => "would write it".to_string(),
            // The reason without the "refusing DEVICE (…): " the table already shows.
            Some(reason) => format!(
                "refuses: {}",
                reason
                    .rsplit_once("): ")
                    .map_or(reason.as_str(), |(_, why)| why)
            ),
        };
        out.push_str(&format!(
            "{:<14} {:>9}  {:<6} {:<28} {:<18} {:<3} {:<3} {:<24} {verdict}\n",
            i.path.display(),
            crate::units::size(i.size),
            d.bus,
            if model.is_empty() { "-" } else { &model },
            i.serial.as_deref().unwrap_or("-"),
            if i.removable { "yes" } else { "no" },
            if i.read_only { "yes" } else { "no" },
            if d.in_use.is_empty() {
                "-".to_string()
            } else {
                d.in_use.join(", ")
            },
        ));
    }
    out
}
