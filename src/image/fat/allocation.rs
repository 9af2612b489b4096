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

/// The first FAT of a partition, read whole, with the geometry it belongs to.
struct Fat {
    layout: Layout,
    table: Vec<u8>,
    /// Where fatfs starts looking for a free cluster (FAT32's FSInfo hint).
    hint: Option<u64>,
}

impl Fat {
    fn read<D: Read + Seek>(slice: &PartitionSlice<D>) -> Result<Self> {
        let mut bpb = [0u8; 512];
        slice.read_exact_at(0, &mut bpb)?;
        let layout = Layout::read(&bpb, slice.len())?;
        let mut table = vec![0u8; usize::try_from(layout.fat_bytes)?];
        slice.read_exact_at(layout.fat_start, &mut table)?;
        let hint = if layout.clusters >= 65525 {
            Self::fs_info_hint(slice, &bpb, &layout)
        } else {
            None
        };
        Ok(Self {
            layout,
            table,
            hint,
        })
    }

    /// FSInfo's next-free cluster, when its signatures hold and it is in range
    /// (as fatfs takes it).
    fn fs_info_hint<D: Read + Seek>(
        slice: &PartitionSlice<D>,
        bpb: &[u8; 512],
        layout: &Layout,
    ) -> Option<u64> {
        let sector = le16(bpb, 48) * le16(bpb, 11);
        let mut info = [0u8; 512];
        slice.read_exact_at(sector, &mut info).ok()?;
        let signed = le32(&info, 0) == 0x4161_5252
            && le32(&info, 484) == 0x6141_7272
            && le32(&info, 508) == 0xaa55_0000;
        let next = le32(&info, 492);
        (signed && (2..layout.clusters + 2).contains(&next)).then_some(next)
    }

    /// The entry for cluster `c`; the FAT type follows from the cluster count
    /// alone (Microsoft's FAT spec).
    fn entry(&self, c: u64) -> u64 {
        let at = |from: u64, n: usize| {
            usize::try_from(from)
                .ok()
                .and_then(|from| self.table.get(from..from + n))
        };
        let clusters = self.layout.clusters;
        if clusters < 4085 {
            let pair = at(c + c / 2, 2).map_or(0, |b| le16(b, 0));
            if c % 2 == 0 { pair & 0xfff } else { pair >> 4 }
        } else if clusters < 65525 {
            at(c * 2, 2).map_or(0, |b| le16(b, 0))
        } else {
            at(c * 4, 4).map_or(0, |b| le32(b, 0) & 0x0fff_ffff)
        }
    }

    fn cluster_range(&self, c: u64) -> (u64, u64) {
        let start = self.layout.data_start + (c - 2) * self.layout.cluster_bytes;
        (start, start + self.layout.cluster_bytes)
    }
}

/// The byte ranges in use, relative to the partition.
pub fn used<D: Read + Seek>(slice: &PartitionSlice<D>) -> Result<Extents> {
    let fat = Fat::read(slice)?;
    let mut used = vec![(0, fat.layout.data_start)];
    for c in 2..fat.layout.clusters + 2 {
        if fat.entry(c) != 0 {
            let (start, end) = fat.cluster_range(c);
            match used.last_mut() {
                Some(last) if last.1 == start => last.1 = end,
                _ => used.push((start, end)),
            }
        }
    }
    Ok(Extents::from_ranges(used))
}

/// The byte ranges of the free clusters fatfs will hand out next for `bytes`
/// of new data: from the FSInfo hint upwards, then from the start, as its
/// allocator searches.
/// `sizes` are the files to be written: each takes whole clusters, and each
/// adds up to four entries (32 bytes each) to the directory.
pub fn next_free<D: Read + Seek>(
    slice: &PartitionSlice<D>,
    sizes: &[u64],
) -> Result<Vec<(u64, u64)>> {
    let fat = Fat::read(slice)?;
    let cluster = fat.layout.cluster_bytes;
    let wanted = sizes.iter().map(|s| s.div_ceil(cluster)).sum::<u64>()
        + (sizes.len() as u64 * 4 * 32).div_ceil(cluster)
        + 1;
    let end = fat.layout.clusters + 2;
    let start = fat.hint.unwrap_or(2);
    Ok((start..end)
        .chain(2..start)
        .filter(|&c| fat.entry(c) == 0)
        .take(usize::try_from(wanted)?)
        .map(|c| fat.cluster_range(c))
        .collect())
}
