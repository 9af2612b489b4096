//! Which bytes of a FAT filesystem are in use: the reserved sectors, the FATs,
//! the FAT12/16 root directory, and every cluster the first FAT marks as not
//! free. Read from the boot sector (BPB) and the first FAT, as Microsoft's FAT
//! specification lays them out; fatfs has no call for the allocation table.

use std::io::{Read, Seek};

use anyhow::{Result, bail};

use crate::image::extents::Extents;
use crate::image::le::{le16, le32};
use crate::image::slice::PartitionSlice;

/// The geometry the boot sector gives, checked against the partition's length.
struct Layout {
    cluster_bytes: u64,
    /// Byte offset of the first FAT.
    fat_start: u64,
    fat_bytes: u64,
    /// Byte offset of cluster 2.
    data_start: u64,
    clusters: u64,
}

impl Layout {
    fn read(bpb: &[u8; 512], len: u64) -> Result<Self> {
        let sector = le16(bpb, 11);
        let per_cluster = u64::from(bpb[13]);
        let reserved = le16(bpb, 14);
        let fats = u64::from(bpb[16]);
        let root_entries = le16(bpb, 17);
        let total = match le16(bpb, 19) {
            0 => le32(bpb, 32),
            n => n,
        };
        let fat_sectors = match le16(bpb, 22) {
            0 => le32(bpb, 36),
            n => n,
        };
        if ![512, 1024, 2048, 4096].contains(&sector)
            || !per_cluster.is_power_of_two()
            || reserved == 0
            || fats == 0
            || fat_sectors == 0
        {
            bail!("the FAT boot sector is not valid");
        }
        let root_sectors = (root_entries * 32).div_ceil(sector);
        let data_sectors = reserved + fats * fat_sectors + root_sectors;
        // Every product below is of numbers of at most 32 bits: no overflow in u64.
        if data_sectors * sector > len {
            bail!(
                "the FAT boot sector puts the data area at byte {}, past the partition's end ({len} bytes)",
                data_sectors * sector
            );
        }
        // A filesystem claiming more sectors than its partition has is cut to it.
        let total = total.min(len / sector);
        Ok(Self {
            cluster_bytes: per_cluster * sector,
            fat_start: reserved * sector,
            fat_bytes: fat_sectors * sector,
            data_start: data_sectors * sector,
            clusters: total.saturating_sub(data_sectors) / per_cluster,
        })
    }
}

/// The byte ranges in use, relative to the partition.
pub fn used<D: Read + Seek>(slice: &PartitionSlice<D>) -> Result<Extents> {
    let mut bpb = [0u8; 512];
    slice.read_exact_at(0, &mut bpb)?;
    let layout = Layout::read(&bpb, slice.len())?;
    let mut table = vec![0u8; usize::try_from(layout.fat_bytes)?];
    slice.read_exact_at(layout.fat_start, &mut table)?;
    let clusters = layout.clusters;
    // The FAT type follows from the cluster count alone (Microsoft's FAT spec).
    let entry = |c: u64| -> u64 {
        let at = |from: u64, n: usize| {
            usize::try_from(from)
                .ok()
                .and_then(|from| table.get(from..from + n))
        };
        if clusters < 4085 {
            let pair = at(c + c / 2, 2).map_or(0, |b| le16(b, 0));
            if c % 2 == 0 { pair & 0xfff } else { pair >> 4 }
        } else if clusters < 65525 {
            at(c * 2, 2).map_or(0, |b| le16(b, 0))
        } else {
            at(c * 4, 4).map_or(0, |b| le32(b, 0) & 0x0fff_ffff)
        }
    };
    let mut used = vec![(0, layout.data_start)];
    for c in 2..clusters + 2 {
        if entry(c) != 0 {
            let start = layout.data_start + (c - 2) * layout.cluster_bytes;
            match used.last_mut() {
                Some(last) if last.1 == start => last.1 += layout.cluster_bytes,
                _ => used.push((start, start + layout.cluster_bytes)),
            }
        }
    }
    Ok(Extents::from_ranges(used))
}
