//! Where an image goes: a block device (a card) or a regular file. For devices,
//! what sysfs and /proc say about them, and the checks that keep piprov from
//! writing to the wrong disk.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::image::{Extents, TABLE_HEAD, tables_on_disk};

/// Raspberry Pi Imager and balenaEtcher ask twice above this: a card this big
/// is more likely somebody's external disk.
pub const LARGE_DEVICE: u64 = 128_000_000_000;

mod ioctl {
    nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
    nix::ioctl_none!(blkrrpart, 0x12, 95);
    nix::ioctl_none!(blkflsbuf, 0x12, 97);
}

/// Drops a device's cached blocks, so the next read sees the medium in it
/// now (a card swapped in a reader, a loop device's file rewritten).
pub fn drop_cached(path: &Path) -> Result<()> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: BLKFLSBUF takes no argument.
    unsafe { ioctl::blkflsbuf(file.as_raw_fd()) }
        .with_context(|| format!("flushing {}'s buffers (BLKFLSBUF)", path.display()))?;
    Ok(())
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetInfo {
    pub path: PathBuf,
    pub block_device: bool,
    pub size: u64,
    /// Kernel name (`sdb`, `mmcblk0`, `loop3`).
    pub name: Option<String>,
    pub model: Option<String>,
    pub vendor: Option<String>,
    pub serial: Option<String>,
    pub removable: bool,
    pub read_only: bool,
    /// The file exists and holds data (regular-file targets).
    pub existing_data: bool,
}

impl TargetInfo {
    pub fn describe(&self) -> String {
        let model = [self.vendor.as_deref(), self.model.as_deref()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" ");
        if self.block_device {
            format!(
                "{} ({}, {}{})",
                self.path.display(),
                if model.is_empty() {
                    "unknown model"
                } else {
                    &model
                },
                crate::units::size(self.size),
                if self.removable {
                    ", removable"
                } else {
                    ", NOT removable"
                }
            )
        } else {
            format!(
                "{} (file{})",
                self.path.display(),
                if self.existing_data {
                    ", will be overwritten"
                } else {
                    ""
                }
            )
        }
    }
}

fn sysfs(dir: &Path, name: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(name))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// `major:minor` of a device number.
fn dev_id(rdev: u64) -> String {
    format!(
        "{}:{}",
        nix::sys::stat::major(rdev),
        nix::sys::stat::minor(rdev)
    )
}

/// Whether `path` names something in /dev, where only a device is a target:
/// a mistyped `/dev/sdz` (or a card not inserted yet) must not become a file.
fn under_dev(path: &Path) -> bool {
    std::path::absolute(path).is_ok_and(|p| p.starts_with("/dev"))
}

fn no_such_device(path: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "no such device {}: is the card inserted? `piprov devices` lists the candidates",
        path.display()
    )
}

pub fn probe(path: &Path) -> Result<TargetInfo> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if under_dev(path) {
                return Err(no_such_device(path));
            }
            let parent = std::path::absolute(path)
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf));
            if let Some(parent) = parent.filter(|p| !p.is_dir()) {
                bail!(
                    "cannot create the card image {}: the directory {} does not exist",
                    path.display(),
                    parent.display()
                );
            }
            return Ok(TargetInfo {
                path: path.to_path_buf(),
                block_device: false,
                size: 0,
                name: None,
                model: None,
                vendor: None,
                serial: None,
                removable: false,
                read_only: false,
                existing_data: false,
            });
        }
        Err(e) => return Err(e).with_context(|| format!("looking at {}", path.display())),
    };
    if meta.file_type().is_file() {
        if under_dev(path) {
            // A regular file in devtmpfs is what an earlier mistyped target left.
            bail!(
                "{} is a regular file in /dev, not a device: is the card inserted? \
                 `piprov devices` lists the candidates",
                path.display()
            );
        }
        return Ok(TargetInfo {
            path: path.to_path_buf(),
            block_device: false,
            size: meta.len(),
            name: None,
            model: None,
            vendor: None,
            serial: None,
            removable: false,
            read_only: meta.permissions().readonly(),
            existing_data: meta.len() > 0,
        });
    }
    if !meta.file_type().is_block_device() {
        bail!(
            "{} is neither a block device nor a regular file",
            path.display()
        );
    }
    let dev = dev_id(meta.rdev());
    let sys = std::fs::canonicalize(format!("/sys/dev/block/{dev}"))
        .with_context(|| format!("finding {} ({dev}) in /sys", path.display()))?;
    if sys.join("partition").exists() {
        let disk = sys
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned());
        bail!(
            "{} is a partition, not a whole card: give the disk (/dev/{})",
            path.display(),
            disk.unwrap_or_default()
        );
    }
    let name = sys.file_name().map(|n| n.to_string_lossy().into_owned());
    let size = sysfs(&sys, "size")
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0)
        * 512;
    Ok(TargetInfo {
        path: path.to_path_buf(),
        block_device: true,
        size,
        model: sysfs(&sys, "device/model"),
        vendor: sysfs(&sys, "device/vendor"),
        serial: sysfs(&sys, "device/serial").or_else(|| sysfs(&sys, "device/wwid")),
        removable: sysfs(&sys, "removable").as_deref() == Some("1")
            // USB card readers often say 0; the bus says more.
            || sys.to_string_lossy().contains("/usb"),
        read_only: sysfs(&sys, "ro").as_deref() == Some("1"),
        existing_data: true,
        name,
    })
}

/// The kernel names of a disk and all its partitions (`sdb`, `sdb1`, …), with
/// their device numbers.
fn disk_and_partitions(name: &str) -> Vec<(String, String)> {
    let dir = Path::new("/sys/block").join(name);
    let mut out = Vec::new();
    if let Some(dev) = sysfs(&dir, "dev") {
        out.push((name.to_string(), dev));
    }
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let part = entry.path();
            if part.join("partition").exists() {
                if let Some(dev) = sysfs(&part, "dev") {
                    out.push((entry.file_name().to_string_lossy().into_owned(), dev));
                }
            }
        }
    }
    out
}

/// The disk that holds `/`, by kernel name.
fn system_disk() -> Option<String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let dev = mountinfo.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.get(4) == Some(&"/")).then(|| f[2].to_string())
    })?;
    let sys = std::fs::canonicalize(format!("/sys/dev/block/{dev}")).ok()?;
    let disk = if sys.join("partition").exists() {
        sys.parent()?.to_path_buf()
    } else {
        sys
    };
    disk.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// What flashing requires of every target; `required` is the image's length.
pub struct Policy {
    pub required: u64,
    pub allow_non_removable: bool,
    pub allow_large: bool,
}

/// Refuses a target with a message naming it and the reason.
pub fn check(info: &TargetInfo, policy: &Policy) -> Result<()> {
    match refusal(info, policy) {
        Some(reason) => bail!("{reason}"),
        None => Ok(()),
    }
}

/// Partitions of a disk that are mounted or in use as swap: (partition, where).
pub fn in_use(info: &TargetInfo) -> Vec<(String, String)> {
    let Some(name) = info.name.as_deref() else {
        return Vec::new();
    };
    let ours = disk_and_partitions(name);
    let mut used = Vec::new();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for line in mountinfo.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if let (Some(dev), Some(mount)) = (f.get(2), f.get(4)) {
            if let Some((part, _)) = ours.iter().find(|(_, d)| d == dev) {
                used.push((part.clone(), (*mount).to_string()));
            }
        }
    }
    let swaps = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
    for line in swaps.lines().skip(1) {
        let device = line.split_whitespace().next().unwrap_or_default();
        if let Some((part, _)) = ours.iter().find(|(n, _)| device == format!("/dev/{n}")) {
            used.push((part.clone(), "swap".to_string()));
        }
    }
    used
}

/// Why flashing would refuse this target, if it would: the message names it.
pub fn refusal(info: &TargetInfo, policy: &Policy) -> Option<String> {
    let what = info.describe();
    if !info.block_device {
        return info
            .read_only
            .then(|| format!("{what}: the file is read-only"));
    }
    let name = info.name.clone().unwrap_or_default();
    if system_disk().as_deref() == Some(name.as_str()) {
        return Some(format!(
            "refusing {what}: it holds the running system's root filesystem"
        ));
    }
    if let Some((part, place)) = in_use(info).into_iter().next() {
        return Some(if place == "swap" {
            format!("refusing {what}: /dev/{part} is in use as swap")
        } else {
            format!("refusing {what}: /dev/{part} is mounted at {place}; unmount it first")
        });
    }
    if info.read_only {
        return Some(format!(
            "refusing {what}: the device is read-only (is the card's lock switch on?)"
        ));
    }
    if info.size < policy.required {
        return Some(format!(
            "refusing {what}: the card holds {} ({} bytes), the image needs {} ({} bytes)",
            crate::units::size(info.size),
            info.size,
            crate::units::size(policy.required),
            policy.required
        ));
    }
    if !info.removable && !policy.allow_non_removable {
        return Some(format!(
            "refusing {what}: not a removable device; pass --allow-non-removable if you are sure"
        ));
    }
    if info.size > LARGE_DEVICE && !policy.allow_large {
        return Some(format!(
            "refusing {what}: larger than 128 GB, more likely a disk than an SD card; pass --allow-large if you are sure"
        ));
    }
    None
}

fn read_stale_tables(path: &Path, len: u64) -> Result<Extents> {
    use std::os::unix::fs::FileExt;
    let mut head = vec![0u8; 8192.min(len as usize)];
    File::open(path)
        .and_then(|f| f.read_exact_at(&mut head, 0))
        .with_context(|| format!("reading the partition table of {}", path.display()))?;
    Ok(tables_on_disk(&head, len))
}

/// An open target. Block devices are opened with O_EXCL (the kernel refuses a
/// device that is mounted or held by another program) and O_DIRECT.
pub struct Target {
    pub info: TargetInfo,
    pub file: File,
    /// Written and read back with O_DIRECT: devices (unless they refuse it).
    pub direct: bool,
    image_len: u64,
    /// Where the card holds partition tables from before (devices only: a file
    /// starts empty).
    stale_tables: Extents,
    /// The card's length in bytes.
    len: u64,
    /// A file this run created: removed again if nothing was written to it.
    remove_unless_started: AtomicBool,
}

impl Drop for Target {
    fn drop(&mut self) {
        if self.remove_unless_started.load(Ordering::Relaxed) {
            let _ = std::fs::remove_file(&self.info.path);
        }
    }
}

impl Target {
    pub fn open(info: &TargetInfo, image_len: u64) -> Result<Self> {
        let path = &info.path;
        if !info.block_device {
            // A file goes through the page cache, as with bmaptool and cp: the
            // filesystem allocates and writes back in long runs at the flush.
            // O_DIRECT here was slower than bmaptool, and so was starting the
            // writeback early with sync_file_range (bench/README.md).
            let existed = path.exists();
            // A new card image holds the card's secret on its FAT: 0600.
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            return Ok(Self {
                info: info.clone(),
                file,
                direct: false,
                image_len,
                stale_tables: Extents::default(),
                len: image_len,
                remove_unless_started: AtomicBool::new(!existed),
            });
        }
        let open = |flags: i32| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(nix::libc::O_EXCL | flags)
                .open(path)
        };
        let (file, direct) = match open(nix::libc::O_DIRECT) {
            Ok(file) => (file, true),
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => (open(0)?, false),
            Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => {
                bail!(
                    "refusing {}: the device is in use (mounted, or held by another program)",
                    info.describe()
                )
            }
            Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
        };
        let mut size = 0u64;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer we pass.
        unsafe { ioctl::blkgetsize64(file.as_raw_fd(), &mut size) }
            .with_context(|| format!("reading the size of {}", path.display()))?;
        if size < image_len {
            bail!(
                "refusing {}: the card holds {size} bytes, the image needs {image_len}",
                info.describe()
            );
        }
        let stale_tables = read_stale_tables(path, size)?;
        Ok(Self {
            info: info.clone(),
            file,
            direct,
            image_len,
            stale_tables,
            len: size,
            remove_unless_started: AtomicBool::new(false),
        })
    }

    /// Called before the first write. A file is emptied here, not when it is
    /// opened, so that a flash stopped before writing leaves it as it was.
    pub fn start_writing(&self) -> Result<()> {
        self.remove_unless_started.store(false, Ordering::Relaxed);
        if !self.info.block_device {
            // Unwritten ranges of a file read as zeroes; stale bytes past the image go.
            let path = self.info.path.display();
            self.file
                .set_len(0)
                .and_then(|()| self.file.set_len(self.image_len))
                .with_context(|| format!("emptying {path}"))?;
        }
        Ok(())
    }

    /// What to erase before the first write and again when the card fails:
    /// the new image's `tables`, every table the card held before, and on a
    /// device its first and last MiB (where tools look for a GPT's backup).
    pub fn erase_set(&self, tables: &Extents) -> Extents {
        let mut set = tables.union(&self.stale_tables);
        if self.info.block_device {
            set = set.union(&Extents::from_ranges(vec![
                (0, TABLE_HEAD.min(self.len)),
                (self.len.saturating_sub(TABLE_HEAD), self.len),
            ]));
        }
        set.aligned(self.len)
    }

    /// Flushes what was written and makes the system see the new card: for a
    /// file, its exact length (O_DIRECT padding cut off); for a device, the new
    /// partition table.
    pub fn finish_writing(&self) -> Result<()> {
        let path = self.info.path.display();
        if !self.info.block_device {
            self.file.set_len(self.image_len)?;
        }
        self.file
            .sync_all()
            .with_context(|| format!("flushing {path}"))?;
        self.reread_partitions()
    }

    /// Makes the kernel read the new partition table, and drops cached blocks so
    /// verification reads what is on the card.
    pub fn reread_partitions(&self) -> Result<()> {
        if !self.info.block_device {
            return Ok(());
        }
        let fd = self.file.as_raw_fd();
        // SAFETY: both ioctls take no argument.
        unsafe {
            ioctl::blkflsbuf(fd).context("flushing the device's buffers (BLKFLSBUF)")?;
            // Loop devices without partition scanning answer EINVAL; nothing to re-read.
            match ioctl::blkrrpart(fd) {
                Ok(_) | Err(nix::errno::Errno::EINVAL) => {}
                Err(e) => return Err(e).context("re-reading the partition table (BLKRRPART)"),
            }
        }
        Ok(())
    }
}
