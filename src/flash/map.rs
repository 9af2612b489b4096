//! Which byte ranges of an image must reach a card: everything outside the
//! partitions, and inside them what the filesystem uses — the FAT metadata and
//! allocated clusters, the ext4 blocks its bitmaps mark in use (and, for groups
//! whose bitmap was never initialised, the metadata the group holds). Any other
//! filesystem is written whole. Computed from the image itself; no .bmap needed.
//!
//! Skipping the rest is safe on a card full of old data: a filesystem never reads
//! a block its own metadata says is free.

use std::fmt::Debug;
use std::io::{Read, Seek, Write};

use anyhow::{Context, Result, bail};

use crate::image::{FsKind, Image, Partition, PartitionRole, PartitionSlice};

/// Ranges are widened to this, so that O_DIRECT writes stay aligned.
pub const ALIGN: u64 = 4096;

/// Sorted, non-overlapping byte ranges `(start, end)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extents(Vec<(u64, u64)>);

impl Extents {
    pub fn from_ranges(mut ranges: Vec<(u64, u64)>) -> Self {
        ranges.retain(|(s, e)| e > s);
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (start, end) in ranges {
            match merged.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        Extents(merged)
    }

    pub fn union(&self, other: &Extents) -> Extents {
        Extents::from_ranges(self.0.iter().chain(other.0.iter()).copied().collect())
    }

    /// Each range widened to `ALIGN` and cut at `limit`.
    pub fn aligned(&self, limit: u64) -> Extents {
        Extents::from_ranges(
            self.0
                .iter()
                .map(|(s, e)| {
                    (
                        s / ALIGN * ALIGN,
                        e.div_ceil(ALIGN).saturating_mul(ALIGN).min(limit),
                    )
                })
                .collect(),
        )
    }

    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.0
    }

    /// These ranges without any byte of `other`.
    pub fn minus(&self, other: &Extents) -> Extents {
        let mut out = Vec::new();
        for &(start, end) in &self.0 {
            let mut at = start;
            for &(s, e) in &other.0 {
                if e <= at || s >= end {
                    continue;
                }
                if s > at {
                    out.push((at, s));
                }
                at = at.max(e);
            }
            if at < end {
                out.push((at, end));
            }
        }
        Extents(out)
    }

    /// Whether any range overlaps `[start, end)`.
    pub fn intersects(&self, start: u64, end: u64) -> bool {
        let i = self.0.partition_point(|&(_, e)| e <= start);
        self.0.get(i).is_some_and(|&(s, _)| s < end)
    }

    pub fn bytes(&self) -> u64 {
        self.0.iter().map(|(s, e)| e - s).sum()
    }
}

/// The ranges to write for an image of `len` bytes.
pub fn compute<D: Read + Write + Seek + Debug + 'static>(image: &Image<D>) -> Result<Extents> {
    let len = image.len();
    let parts: Vec<&Partition> = image
        .table()
        .partitions
        .iter()
        .filter(|p| p.role != PartitionRole::Extended)
        .collect();
    let mut ranges = Vec::new();
    // Outside the partitions: tables, boot code, gaps, the backup GPT.
    let mut cursor = 0;
    let mut sorted = parts.clone();
    sorted.sort_by_key(|p| p.start);
    for p in &sorted {
        ranges.push((cursor, p.start));
        cursor = cursor.max(p.end());
    }
    ranges.push((cursor, len));
    for p in parts {
        let slice = image.slice(p);
        let used = match image.probe(p) {
            FsKind::Fat => fat_used(&slice)
                .with_context(|| format!("mapping the FAT filesystem in partition {}", p.number))?,
            FsKind::Ext => ext_used(&slice).with_context(|| {
                format!("mapping the ext4 filesystem in partition {}", p.number)
            })?,
            FsKind::Swap | FsKind::Unknown => vec![(0, p.size)],
        };
        ranges.extend(
            used.into_iter()
                .map(|(s, e)| (p.start + s, p.start + e.min(p.size))),
        );
    }
    Ok(Extents::from_ranges(ranges).aligned(len))
}

fn le16(b: &[u8], at: usize) -> u64 {
    u64::from(u16::from_le_bytes([b[at], b[at + 1]]))
}

fn le32(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]))
}

/// FAT: reserved sectors, the FATs and the FAT12/16 root directory, then every
/// cluster the first FAT marks as not free.
fn fat_used<D: Read + Seek>(slice: &PartitionSlice<D>) -> Result<Vec<(u64, u64)>> {
    let mut bpb = [0u8; 512];
    slice.read_exact_at(0, &mut bpb)?;
    let sector = le16(&bpb, 11);
    let per_cluster = u64::from(bpb[13]);
    let reserved = le16(&bpb, 14);
    let fats = u64::from(bpb[16]);
    let root_entries = le16(&bpb, 17);
    let total = match le16(&bpb, 19) {
        0 => le32(&bpb, 32),
        n => n,
    };
    let fat_sectors = match le16(&bpb, 22) {
        0 => le32(&bpb, 36),
        n => n,
    };
    if ![512, 1024, 2048, 4096].contains(&sector)
        || per_cluster == 0
        || fats == 0
        || fat_sectors == 0
    {
        bail!("the FAT boot sector is not valid");
    }
    let root_sectors = (root_entries * 32).div_ceil(sector);
    let data_start = reserved + fats * fat_sectors + root_sectors;
    let clusters = total.saturating_sub(data_start) / per_cluster;
    let mut table = vec![0u8; usize::try_from(fat_sectors * sector)?];
    slice.read_exact_at(reserved * sector, &mut table)?;
    // The FAT type follows from the cluster count alone (Microsoft's FAT spec).
    let entry = |c: u64| -> u64 {
        if clusters < 4085 {
            let at = usize::try_from(c + c / 2).unwrap_or(usize::MAX);
            let pair = table.get(at..at + 2).map_or(0, |b| le16(b, 0));
            if c % 2 == 0 { pair & 0xfff } else { pair >> 4 }
        } else if clusters < 65525 {
            table
                .get(c as usize * 2..c as usize * 2 + 2)
                .map_or(0, |b| le16(b, 0))
        } else {
            table
                .get(c as usize * 4..c as usize * 4 + 4)
                .map_or(0, |b| le32(b, 0) & 0x0fff_ffff)
        }
    };
    let mut used = vec![(0, data_start * sector)];
    let cluster_bytes = per_cluster * sector;
    let data = data_start * sector;
    for c in 2..clusters + 2 {
        if entry(c) != 0 {
            let start = data + (c - 2) * cluster_bytes;
            used.push((start, start + cluster_bytes));
        }
    }
    Ok(used)
}

const EXT4_INCOMPAT_META_BG: u64 = 0x10;
const EXT4_INCOMPAT_64BIT: u64 = 0x80;
const EXT4_RO_COMPAT_SPARSE_SUPER: u64 = 0x1;
const EXT4_COMPAT_SPARSE_SUPER2: u64 = 0x200;
const EXT4_RO_COMPAT_GDT_CSUM: u64 = 0x10;
const EXT4_RO_COMPAT_METADATA_CSUM: u64 = 0x400;
const EXT4_BG_INODE_UNINIT: u64 = 0x1;
const EXT4_BG_BLOCK_UNINIT: u64 = 0x2;

/// ext4: every block the group bitmaps mark in use; for groups whose bitmap is
/// uninitialised, the superblock and descriptor copies and the bitmaps and inode
/// tables stored there. Of each inode table, the part holding inodes in use:
/// with descriptor checksums the kernel and e2fsck trust `bg_itable_unused`, and
/// the kernel zeroes an inode table block rather than read it when it holds no
/// other inode in use; without them, the whole table.
fn ext_used<D: Read + Seek>(slice: &PartitionSlice<D>) -> Result<Vec<(u64, u64)>> {
    let mut sb = [0u8; 1024];
    slice.read_exact_at(1024, &mut sb)?;
    let blocks = le32(&sb, 4);
    let first_data_block = le32(&sb, 20);
    let log_block = le32(&sb, 24);
    let per_group = le32(&sb, 32);
    let inodes_per_group = le32(&sb, 40);
    let inode_size = match le16(&sb, 88) {
        0 => 128,
        n => n,
    };
    let compat = le32(&sb, 92);
    let incompat = le32(&sb, 96);
    let ro_compat = le32(&sb, 100);
    let reserved_gdt = le16(&sb, 206);
    let is_64bit = incompat & EXT4_INCOMPAT_64BIT != 0;
    let blocks = if is_64bit {
        blocks | (le32(&sb, 336) << 32)
    } else {
        blocks
    };
    let desc_size = if is_64bit { le16(&sb, 254).max(32) } else { 32 };
    if log_block > 6 || per_group == 0 || inodes_per_group == 0 {
        bail!("the ext4 superblock is not valid");
    }
    if incompat & EXT4_INCOMPAT_META_BG != 0 || compat & EXT4_COMPAT_SPARSE_SUPER2 != 0 {
        // Layouts piprov does not map: write the partition whole.
        return Ok(vec![(0, slice.len())]);
    }
    let block = 1024u64 << log_block;
    let groups = (blocks - first_data_block).div_ceil(per_group);
    let gdt_blocks = (groups * desc_size).div_ceil(block);
    let mut gdt = vec![0u8; usize::try_from(gdt_blocks * block)?];
    slice.read_exact_at((first_data_block + 1) * block, &mut gdt)?;
    let itable_blocks = (inodes_per_group * inode_size).div_ceil(block);
    let sparse = ro_compat & EXT4_RO_COMPAT_SPARSE_SUPER != 0;
    let trusted_unused = ro_compat & (EXT4_RO_COMPAT_GDT_CSUM | EXT4_RO_COMPAT_METADATA_CSUM) != 0;
    let has_super = |g: u64| {
        let power_of = |mut n: u64, base: u64| {
            while n > 1 && n % base == 0 {
                n /= base;
            }
            n == 1
        };
        !sparse || g <= 1 || power_of(g, 3) || power_of(g, 5) || power_of(g, 7)
    };
    let to_bytes = |first: u64, count: u64| (first * block, (first + count) * block);

    let mut used = vec![(0, (first_data_block + 1) * block)];
    let mut unused_tables = Vec::new();
    let mut bitmap = vec![0u8; usize::try_from(block)?];
    for g in 0..groups {
        let d = &gdt[(g * desc_size) as usize..((g + 1) * desc_size) as usize];
        let hi = |at: usize| {
            if is_64bit && desc_size >= 64 {
                le32(d, at) << 32
            } else {
                0
            }
        };
        let block_bitmap = le32(d, 0) | hi(32);
        let inode_bitmap = le32(d, 4) | hi(36);
        let inode_table = le32(d, 8) | hi(40);
        let flags = le16(d, 18);
        let group_start = first_data_block + g * per_group;
        if has_super(g) {
            used.push(to_bytes(group_start, 1 + gdt_blocks + reserved_gdt));
        }
        used.push(to_bytes(block_bitmap, 1));
        used.push(to_bytes(inode_bitmap, 1));
        used.push(to_bytes(inode_table, itable_blocks));
        if trusted_unused {
            let unused = le16(d, 28)
                | if is_64bit && desc_size >= 64 {
                    le16(d, 50) << 16
                } else {
                    0
                };
            let in_use = if flags & EXT4_BG_INODE_UNINIT != 0 {
                0
            } else {
                inodes_per_group.saturating_sub(unused)
            };
            let in_use_blocks = (in_use * inode_size).div_ceil(block).min(itable_blocks);
            // The bitmap marks the whole table in use; its unused tail need not be written.
            unused_tables.push(to_bytes(
                inode_table + in_use_blocks,
                itable_blocks - in_use_blocks,
            ));
        }
        if flags & EXT4_BG_BLOCK_UNINIT != 0 {
            continue;
        }
        slice.read_exact_at(block_bitmap * block, &mut bitmap)?;
        let in_group = per_group.min(blocks - group_start);
        let mut run: Option<u64> = None;
        for bit in 0..=in_group {
            let set = bit < in_group && bitmap[(bit / 8) as usize] & (1 << (bit % 8)) != 0;
            match (set, run) {
                (true, None) => run = Some(bit),
                (false, Some(start)) => {
                    used.push(to_bytes(group_start + start, bit - start));
                    run = None;
                }
                _ => {}
            }
        }
    }
    Ok(Extents::from_ranges(used)
        .minus(&Extents::from_ranges(unused_tables))
        .0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_merge_and_align() {
        let e = Extents::from_ranges(vec![(10, 20), (0, 5), (15, 30), (40, 40)]);
        assert_eq!(e.ranges(), &[(0, 5), (10, 30)]);
        assert_eq!(e.bytes(), 25);
        let a = Extents::from_ranges(vec![(5000, 5001), (9000, 9100)]).aligned(10_000);
        assert_eq!(a.ranges(), &[(4096, 10_000)]);
        assert!(
            e.intersects(4, 11)
                && e.intersects(29, 100)
                && !e.intersects(5, 10)
                && !e.intersects(30, 40)
        );
    }
}
