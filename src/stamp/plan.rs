//! A stamp, re-stamp or unstamp as a set of file changes on the boot partition,
//! computed before anything is written: `--dry-run` prints it, `apply` writes it
//! in an order that keeps the card bootable if the write is cut short.

use std::collections::BTreeMap;
use std::io::{Read, Seek, Write};

use anyhow::Result;
use serde::Serialize;

use crate::image::BootFs;
use crate::layout::boot;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Write { data: Vec<u8>, secret: bool },
    Remove,
}

/// Files that switch the first-boot hook on or off.
const HOOK_FILES: [&str; 3] = [boot::CMDLINE, "user-data", "meta-data"];

#[derive(Debug, Default)]
pub struct Plan {
    changes: BTreeMap<String, Change>,
}

/// One line of a plan, as printed and as JSON.
#[derive(Debug, Serialize)]
pub struct ChangeSummary {
    pub file: String,
    pub action: &'static str,
    pub bytes: usize,
    pub secret: bool,
}

impl Plan {
    pub fn write(&mut self, name: &str, data: impl Into<Vec<u8>>) {
        self.changes.insert(
            name.into(),
            Change::Write {
                data: data.into(),
                secret: false,
            },
        );
    }

    pub fn write_secret(&mut self, name: &str, data: impl Into<Vec<u8>>) {
        self.changes.insert(
            name.into(),
            Change::Write {
                data: data.into(),
                secret: true,
            },
        );
    }

    pub fn remove(&mut self, name: &str) {
        self.changes.insert(name.into(), Change::Remove);
    }

    /// A file as it will be once the plan is applied.
    pub fn read<D: Read + Write + Seek>(
        &self,
        boot: &BootFs<D>,
        name: &str,
    ) -> Result<Option<Vec<u8>>> {
        match self.changes.get(name) {
            Some(Change::Write { data, .. }) => Ok(Some(data.clone())),
            Some(Change::Remove) => Ok(None),
            None => boot.read(name),
        }
    }

    /// Drops removals of files that do not exist and writes that change nothing.
    pub fn prune<D: Read + Write + Seek>(&mut self, boot: &BootFs<D>) -> Result<()> {
        let mut unchanged = Vec::new();
        for (name, change) in &self.changes {
            let current = boot.read(name)?;
            let same = match change {
                Change::Remove => current.is_none(),
                Change::Write { data, .. } => current.as_deref() == Some(data.as_slice()),
            };
            if same {
                unchanged.push(name.clone());
            }
        }
        for name in unchanged {
            self.changes.remove(&name);
        }
        Ok(())
    }

    pub fn summary(&self) -> Vec<ChangeSummary> {
        self.changes
            .iter()
            .map(|(file, change)| match change {
                Change::Write { data, secret } => ChangeSummary {
                    file: file.clone(),
                    action: "write",
                    bytes: data.len(),
                    secret: *secret,
                },
                Change::Remove => ChangeSummary {
                    file: file.clone(),
                    action: "remove",
                    bytes: 0,
                    secret: false,
                },
            })
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// Writes the plan. Stamping: payload first, then the stamp record, the hook
    /// last, so a cut leaves an unhooked card. Unstamping: the hook goes first and
    /// the stamp record last, so a cut leaves a record to finish from.
    pub fn apply<D: Read + Write + Seek>(&self, boot: &BootFs<D>) -> Result<()> {
        let stamping = matches!(self.changes.get(boot::STAMP), Some(Change::Write { .. }));
        let is_hook = |name: &str| HOOK_FILES.contains(&name);
        let others = self
            .changes
            .keys()
            .filter(|n| !is_hook(n) && *n != boot::STAMP);
        let hooks = self.changes.keys().filter(|n| is_hook(n));
        let record = self.changes.keys().filter(|n| *n == boot::STAMP);
        let sizes: Vec<u64> = self
            .changes
            .values()
            .filter_map(|change| match change {
                Change::Write { data, .. } => Some(data.len() as u64),
                Change::Remove => None,
            })
            .collect();
        boot.zero_ahead(&sizes)?;
        let order: Vec<&String> = if stamping {
            others.chain(record).chain(hooks).collect()
        } else {
            hooks.chain(others).chain(record).collect()
        };
        for name in order {
            match &self.changes[name] {
                Change::Write { data, .. } => boot.write(name, data)?,
                Change::Remove => boot.remove(name)?,
            }
        }
        Ok(())
    }
}
