//! Which blocks of an ext2/3/4 filesystem are in use, read from the superblock,
//! the group descriptors and the block bitmaps (the layout in the kernel's
//! `Documentation/filesystems/ext4`). ext4-view reads files; it has no call
//! for the allocation bitmaps.
//!
//! Every block the group bitmaps mark in use; for groups whose bitmap is
//! uninitialised, the superblock and descriptor copies and the bitmaps and
//! inode tables stored there. Of each inode table, the part holding inodes in
//! use: with descriptor checksums the kernel and e2fsck trust
//! `bg_itable_unused`, and the kernel zeroes an inode table block rather than
//! read it when it holds no other inode in use; without them, the whole table.

use std::io::{Read, Seek};

use anyhow::{Context, Result, bail};

use crate::image::extents::Extents;
use crate::image::le::{le16, le32};
use crate::image::slice::PartitionSlice;

const INCOMPAT_META_BG: u64 = 0x10;
const INCOMPAT_64BIT: u64 = 0x80;
const RO_COMPAT_SPARSE_SUPER: u64 = 0x1;
const COMPAT_SPARSE_SUPER2: u64 = 0x200;
const RO_COMPAT_GDT_CSUM: u64 = 0x10;
const RO_COMPAT_METADATA_CSUM: u64 = 0x400;
const BG_INODE_UNINIT: u64 = 0x1;
const BG_BLOCK_UNINIT: u64 = 0x2;

/// The superblock's geometry, checked so that every later product stays within
/// the partition (a corrupt image gives an error, never an overflow or a huge
/// allocation).
struct Super {
    block: u64,
    blocks: u64,
    first_data_block: u64,
    per_group: u64,
    groups: u64,
    desc_size: u64,
    gdt_blocks: u64,
    reserved_gdt: u64,
    itable_blocks: u64,
    inodes_per_group: u64,
    inode_size: u64,
    is_64bit: bool,
    sparse: bool,
    trusted_unused: bool,
    /// META_BG or SPARSE_SUPER2: layouts not mapped; the partition is written whole.
    unmapped_layout: bool,
}

impl Super {
    fn read(sb: &[u8; 1024], len: u64) -> Result<Self> {
        let first_data_block = le32(sb, 20);
        let log_block = le32(sb, 24);
        let per_group = le32(sb, 32);
        let inodes_per_group = le32(sb, 40);
        let inode_size = match le16(sb, 88) {
            0 => 128,
            n => n,
        };
        let compat = le32(sb, 92);
        let incompat = le32(sb, 96);
        let ro_compat = le32(sb, 100);
        let is_64bit = incompat & INCOMPAT_64BIT != 0;
        let blocks = le32(sb, 4) | if is_64bit { le32(sb, 336) << 32 } else { 0 };
        let desc_size = if is_64bit { le16(sb, 254).max(32) } else { 32 };
        let invalid = |why: &str| anyhow::anyhow!("the ext4 superblock is not valid: {why}");
        if log_block > 6 {
            return Err(invalid("block size over 64 KiB"));
        }
        let block = 1024u64 << log_block;
        if first_data_block > 1 || blocks <= first_data_block {
            return Err(invalid("no data blocks"));
        }
        if per_group == 0 || per_group > 8 * block {
            return Err(invalid("blocks per group out of range"));
        }
        if inodes_per_group == 0 || inodes_per_group > 8 * block {
            return Err(invalid("inodes per group out of range"));
        }
        if !inode_size.is_power_of_two() || inode_size < 128 || inode_size > block {
            return Err(invalid("inode size out of range"));
        }
        if !desc_size.is_power_of_two() || desc_size > 1024 {
            return Err(invalid("group descriptor size out of range"));
        }
        let fs_bytes = blocks
            .checked_mul(block)
            .filter(|&bytes| bytes <= len)
            .with_context(|| {
                format!(
                    "the ext4 filesystem claims {blocks} blocks of {block} bytes, more than its \
                     partition holds ({len} bytes): the image is truncated or the superblock corrupt"
                )
            })?;
        let groups = (blocks - first_data_block).div_ceil(per_group);
        let gdt_blocks = (groups * desc_size).div_ceil(block);
        let reserved_gdt = le16(sb, 206);
        if (first_data_block + 1 + gdt_blocks + reserved_gdt) * block > fs_bytes {
            return Err(invalid("the group descriptors do not fit"));
        }
        Ok(Self {
            block,
            blocks,
            first_data_block,
            per_group,
            groups,
            desc_size,
            gdt_blocks,
            reserved_gdt,
            itable_blocks: (inodes_per_group * inode_size).div_ceil(block),
            inodes_per_group,
            inode_size,
            is_64bit,
            sparse: ro_compat & RO_COMPAT_SPARSE_SUPER != 0,
            trusted_unused: ro_compat & (RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM) != 0,
            unmapped_layout: incompat & INCOMPAT_META_BG != 0 || compat & COMPAT_SPARSE_SUPER2 != 0,
        })
    }

    /// Whether group `g` holds a copy of the superblock and descriptors.
    fn has_super(&self, g: u64) -> bool {
        let power_of = |mut n: u64, base: u64| {
            while n > 1 && n % base == 0 {
                n /= base;
            }
            n == 1
        };
        !self.sparse || g <= 1 || power_of(g, 3) || power_of(g, 5) || power_of(g, 7)
    }
}

/// One group descriptor's fields that say where its metadata lives.
struct Group {
    block_bitmap: u64,
    inode_bitmap: u64,
    inode_table: u64,
    flags: u64,
    itable_unused: u64,
}

impl Group {
    fn read(d: &[u8], sb: &Super) -> Self {
        let wide = sb.is_64bit && sb.desc_size >= 64;
        let hi32 = |at: usize| if wide { le32(d, at) << 32 } else { 0 };
        let hi16 = |at: usize| if wide { le16(d, at) << 16 } else { 0 };
        Self {
            block_bitmap: le32(d, 0) | hi32(32),
            inode_bitmap: le32(d, 4) | hi32(36),
            inode_table: le32(d, 8) | hi32(40),
            flags: le16(d, 18),
            itable_unused: le16(d, 28) | hi16(50),
        }
    }
}

/// The byte ranges in use, relative to the partition.
pub fn used<D: Read + Seek>(slice: &PartitionSlice<D>) -> Result<Extents> {
    let mut raw = [0u8; 1024];
    slice.read_exact_at(1024, &mut raw)?;
    let sb = Super::read(&raw, slice.len())?;
    if sb.unmapped_layout {
        return Ok(Extents::from_ranges(vec![(0, slice.len())]));
    }
    let block = sb.block;
    let mut gdt = vec![0u8; usize::try_from(sb.gdt_blocks * block)?];
    slice.read_exact_at((sb.first_data_block + 1) * block, &mut gdt)?;
    // Block numbers from descriptors are checked against the filesystem's size
    // before they are multiplied.
    let to_bytes = |g: u64, first: u64, count: u64| match first.checked_add(count) {
        Some(end) if end <= sb.blocks => Ok((first * block, end * block)),
        _ => bail!("the descriptor of ext4 block group {g} points past the filesystem's end"),
    };

    let mut used = vec![(0, (sb.first_data_block + 1) * block)];
    let mut unused_tables = Vec::new();
    let mut bitmap = vec![0u8; usize::try_from(block)?];
    for g in 0..sb.groups {
        let at = (g * sb.desc_size) as usize;
        let group = Group::read(&gdt[at..at + sb.desc_size as usize], &sb);
        let group_start = sb.first_data_block + g * sb.per_group;
        if sb.has_super(g) {
            used.push(to_bytes(
                g,
                group_start,
                1 + sb.gdt_blocks + sb.reserved_gdt,
            )?);
        }
        used.push(to_bytes(g, group.block_bitmap, 1)?);
        used.push(to_bytes(g, group.inode_bitmap, 1)?);
        used.push(to_bytes(g, group.inode_table, sb.itable_blocks)?);
        if sb.trusted_unused {
            let in_use = if group.flags & BG_INODE_UNINIT != 0 {
                0
            } else {
                sb.inodes_per_group.saturating_sub(group.itable_unused)
            };
            let in_use_blocks = (in_use * sb.inode_size)
                .div_ceil(block)
                .min(sb.itable_blocks);
            // The bitmap marks the whole table in use; its unused tail need not be written.
            unused_tables.push(to_bytes(
                g,
                group.inode_table + in_use_blocks,
                sb.itable_blocks - in_use_blocks,
            )?);
        }
        if group.flags & BG_BLOCK_UNINIT != 0 {
            continue;
        }
        slice.read_exact_at(group.block_bitmap * block, &mut bitmap)?;
        let in_group = sb.per_group.min(sb.blocks - group_start);
        let mut run: Option<u64> = None;
        for bit in 0..=in_group {
            let set = bit < in_group && bitmap[(bit / 8) as usize] & (1 << (bit % 8)) != 0;
            match (set, run) {
                (true, None) => run = Some(bit),
                (false, Some(start)) => {
                    used.push(to_bytes(g, group_start + start, bit - start)?);
                    run = None;
                }
                _ => {}
            }
        }
    }
    Ok(Extents::from_ranges(used).minus(&Extents::from_ranges(unused_tables)))
}
