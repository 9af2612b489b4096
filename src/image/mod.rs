//! The image model: a disk (image file, block device or memory buffer), its
//! partition table, and the filesystems on it. No root and no mount needed.

mod cmdline;
mod ext4;
mod extents;
mod fat;
mod le;
mod overlay;
mod probe;
mod slice;
mod table;

use std::cell::RefCell;
use std::fmt::Debug;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::rc::Rc;

use anyhow::{Context, Result, anyhow, bail};

pub use cmdline::Cmdline;
pub use ext4::{Owner, RootFs};
pub use extents::{ALIGN, Extents};
pub use fat::{BootFs, Journal, SECTOR};
pub use overlay::Overlay;
pub use probe::FsKind;
pub use slice::{PartitionSlice, SharedDisk};
pub use table::{
    Partition, PartitionRole, PartitionTable, TABLE_HEAD, TableKind, read_table, tables_on_disk,
};

pub struct Image<D> {
    disk: SharedDisk<D>,
    len: u64,
    table: PartitionTable,
}

/// A directory opens like a file and fails only at its first read, with an
/// error that names no path.
pub fn refuse_directory(file: &File, path: &Path) -> Result<()> {
    let meta = file
        .metadata()
        .with_context(|| format!("reading the metadata of {}", path.display()))?;
    if meta.is_dir() {
        bail!("{} is a directory, not an image", path.display());
    }
    Ok(())
}

/// ext4-view sizes its block-group table from the superblock before reading
/// it: a crafted superblock claiming billions of groups made it allocate 30 GB.
/// The filesystem must fit its partition, and so must its group descriptors.
fn check_ext4_geometry<D: Read + Seek>(slice: &mut PartitionSlice<D>, len: u64) -> Result<()> {
    let mut sb = [0u8; 1024];
    slice
        .read_exact_at(1024, &mut sb)
        .context("reading the ext4 superblock")?;
    let u32_at = |o: usize| u64::from(u32::from_le_bytes(sb[o..o + 4].try_into().unwrap()));
    let incompat_64bit = u32_at(96) & 0x80 != 0;
    // ext4-view takes the high half whatever the 64bit feature says.
    let blocks = u32_at(4) | u32_at(0x150) << 32;
    let log_block = u32_at(24);
    let per_group = u32_at(32);
    let desc_size = if incompat_64bit {
        u64::from(u16::from_le_bytes([sb[0xfe], sb[0xff]])).max(32)
    } else {
        32
    };
    if log_block > 6 || per_group == 0 {
        bail!(
            "its superblock is not sound (s_log_block_size {log_block}, {per_group} blocks a group)"
        );
    }
    let block_size = 1024u64 << log_block;
    let groups = blocks.div_ceil(per_group);
    let fits = blocks
        .checked_mul(block_size)
        .is_some_and(|bytes| bytes <= len)
        && groups.saturating_mul(desc_size) <= len;
    if !fits {
        bail!(
            "its superblock claims {blocks} blocks of {block_size} bytes in {groups} groups, \
             more than the partition's {len} bytes hold: the image is not what it seems"
        );
    }
    Ok(())
}

impl Image<File> {
    /// Opens an image file or a block device read-only.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        refuse_directory(&file, path)?;
        Self::from_disk(file).with_context(|| format!("reading {}", path.display()))
    }

    /// Opens an image file or a block device for reading and writing.
    pub fn open_writable(path: &Path) -> Result<Self> {
        let file = File::options()
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {} for writing", path.display()))?;
        refuse_directory(&file, path)?;
        Self::from_disk(file).with_context(|| format!("reading {}", path.display()))
    }
}

impl<D: Read + Write + Seek + Debug + 'static> Image<D> {
    pub fn from_disk(mut disk: D) -> Result<Self> {
        let len = disk
            .seek(SeekFrom::End(0))
            .context("finding the disk's size")?;
        let table = read_table(&mut disk, len)?;
        Ok(Self {
            disk: Rc::new(RefCell::new(disk)),
            len,
            table,
        })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn table(&self) -> &PartitionTable {
        &self.table
    }

    pub fn slice(&self, partition: &Partition) -> PartitionSlice<D> {
        PartitionSlice::new(self.disk.clone(), partition.start, partition.size)
    }

    pub fn probe(&self, partition: &Partition) -> FsKind {
        probe::probe(&self.slice(partition))
    }

    /// The bytes of `partition` its filesystem uses, as offsets in the image: a
    /// filesystem never reads a block its own metadata says is free. A partition
    /// whose filesystem piprov does not know is used whole.
    pub fn used_by_filesystem(&self, partition: &Partition) -> Result<Extents> {
        let slice = self.slice(partition);
        let (used, what) = match self.probe(partition) {
            FsKind::Fat => (fat::allocation::used(&slice), "FAT"),
            FsKind::Ext => (ext4::allocation::used(&slice), "ext4"),
            FsKind::Swap | FsKind::Unknown => {
                return Ok(Extents::from_ranges(vec![(
                    partition.start,
                    partition.end(),
                )]));
            }
        };
        let used = used.with_context(|| {
            format!(
                "mapping the {what} filesystem in partition {}",
                partition.number
            )
        })?;
        Ok(Extents::from_ranges(
            used.ranges()
                .iter()
                .map(|&(s, e)| (partition.start + s, partition.start + e.min(partition.size)))
                .collect(),
        ))
    }

    /// The Pi firmware loads from the first FAT partition.
    pub fn boot_partition(&self) -> Result<&Partition> {
        self.table
            .partitions
            .iter()
            .find(|p| p.role == PartitionRole::Fat)
            .ok_or_else(|| {
                anyhow!(
                    "not a Raspberry Pi image: no FAT boot partition (partitions: {})",
                    self.describe_partitions()
                )
            })
    }

    pub fn root_partition(&self) -> Result<&Partition> {
        self.table
            .partitions
            .iter()
            .find(|p| p.role == PartitionRole::Linux)
            .ok_or_else(|| {
                anyhow!(
                    "not a Raspberry Pi image: no Linux root partition (partitions: {})",
                    self.describe_partitions()
                )
            })
    }

    pub fn boot(&self) -> Result<BootFs<D>> {
        self.open_boot(None)
    }

    /// The boot partition, keeping in `journal` the original of every sector
    /// written through it.
    pub fn boot_journaled(&self, journal: &Journal) -> Result<BootFs<D>> {
        self.open_boot(Some(journal.clone()))
    }

    fn open_boot(&self, journal: Option<Journal>) -> Result<BootFs<D>> {
        let partition = self.boot_partition()?;
        BootFs::open(self.slice(partition), journal).with_context(|| {
            format!(
                "partition {} (type {}) does not hold a readable FAT filesystem",
                partition.number, partition.type_id
            )
        })
    }

    pub fn rootfs(&self) -> Result<RootFs> {
        let partition = self.root_partition()?;
        let found = self.probe(partition);
        if found != FsKind::Ext {
            bail!(
                "partition {} (type {}) should hold the ext4 root filesystem but its superblock \
                 has no ext4 signature (found: {found:?})",
                partition.number,
                partition.type_id
            );
        }
        let mut slice = self.slice(partition);
        check_ext4_geometry(&mut slice, partition.size).with_context(|| {
            format!(
                "partition {} does not hold a readable ext4 filesystem",
                partition.number
            )
        })?;
        let fs = ext4_view::Ext4::load(Box::new(slice)).map_err(|e| {
            anyhow!(
                "partition {} does not hold a readable ext4 filesystem: {e}",
                partition.number
            )
        })?;
        Ok(RootFs::new(fs))
    }

    /// Gives the disk back; fails while a filesystem opened on it is still alive.
    pub fn into_disk(self) -> Result<D> {
        Rc::try_unwrap(self.disk)
            .map(RefCell::into_inner)
            .map_err(|_| anyhow!("the disk is still in use by an open filesystem"))
    }

    fn describe_partitions(&self) -> String {
        self.table
            .partitions
            .iter()
            .map(|p| format!("{} type {}", p.number, p.type_id))
            .collect::<Vec<_>>()
            .join(", ")
    }
}
