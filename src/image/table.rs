//! Partition tables: MBR (what Raspberry Pi OS ships) and GPT (Pi 4/5 can boot it).

use std::fmt::{self, Debug};
use std::io::{Read, Seek, SeekFrom, Write};

use anyhow::{Context, Result, bail};
use gpt::disk::LogicalBlockSize;
use serde::Serialize;

use super::Extents;

/// MBR entries count in 512-byte sectors on every card and image we handle;
/// 4Kn media with an MBR do not exist in the Pi world.
const MBR_SECTOR_SIZE: u64 = 512;
const MBR_PROTECTIVE: u8 = 0xee;
const MBR_EXTENDED: [u8; 3] = [0x05, 0x0f, 0x85];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    Mbr,
    Gpt,
}

impl fmt::Display for TableKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TableKind::Mbr => "MBR",
            TableKind::Gpt => "GPT",
        })
    }
}

/// What a partition's type field says it holds. Only the roles piprov cares about
/// are named; everything else is `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PartitionRole {
    /// FAT types (MBR 0x01/04/06/0b/0c/0e/ef, GPT ESP or basic data).
    Fat,
    /// Linux filesystem (MBR 0x83, GPT Linux filesystem or root).
    Linux,
    Swap,
    Extended,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Partition {
    /// 1-based, as Linux numbers them (`/dev/sdb1`, `PARTUUID=<id>-01`).
    pub number: u32,
    /// Byte offset of the first byte.
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
    /// `0x0c` for MBR, the type GUID for GPT.
    pub type_id: String,
    pub role: PartitionRole,
    /// GPT partition name; MBR has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// GPT partition GUID; MBR uses `<disk id>-<number>` instead.
    pub partuuid: String,
}

impl Partition {
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionTable {
    pub kind: TableKind,
    /// MBR disk signature as 8 hex digits, or the GPT disk GUID.
    pub disk_id: String,
    pub sector_size: u64,
    pub partitions: Vec<Partition>,
}

/// Where the boot code and the primary tables live (MBR, protective MBR and
/// primary GPT); partitions start at 1 MiB or later on every Pi image.
pub const TABLE_HEAD: u64 = 1 << 20;

impl PartitionTable {
    /// Where this table lives on a disk of `disk_len` bytes: the first MiB and,
    /// for GPT, the backup header and entries at the end (33 sectors).
    pub fn locations(&self, disk_len: u64) -> Extents {
        let mut ranges = vec![(0, TABLE_HEAD.min(disk_len))];
        if self.kind == TableKind::Gpt {
            ranges.push((disk_len.saturating_sub(33 * self.sector_size), disk_len));
        }
        Extents::from_ranges(ranges).aligned(disk_len)
    }
}

/// Where the partition tables that a disk holds now live, whatever they are,
/// from its first 8 KiB (`head`): the first MiB, and for a GPT the backup
/// header and entries its primary header points to (at the end of the image
/// that was written, not necessarily of the disk). A disk erased here has no
/// table a tool could find or recover.
pub fn tables_on_disk(head: &[u8], disk_len: u64) -> Extents {
    let mut ranges = vec![(0, TABLE_HEAD.min(disk_len))];
    for sector in [512u64, 4096] {
        let Some(header) = head.get(sector as usize..sector as usize + 92) else {
            continue;
        };
        if &header[..8] != b"EFI PART" {
            continue;
        }
        let le32 =
            |at: usize| u64::from(u32::from_le_bytes(header[at..at + 4].try_into().unwrap()));
        let le64 = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().unwrap());
        let alternate = le64(32);
        let entries_bytes = (le32(80) * le32(84)).min(TABLE_HEAD);
        let entries_sectors = entries_bytes.div_ceil(sector);
        let end = alternate
            .saturating_add(1)
            .saturating_mul(sector)
            .min(disk_len);
        let start = alternate
            .saturating_sub(entries_sectors)
            .saturating_mul(sector)
            .min(end);
        ranges.push((start, end));
    }
    Extents::from_ranges(ranges).aligned(disk_len)
}

fn mbr_role(sys: u8) -> PartitionRole {
    match sys {
        0x01 | 0x04 | 0x06 | 0x0b | 0x0c | 0x0e | 0xef => PartitionRole::Fat,
        0x83 => PartitionRole::Linux,
        0x82 => PartitionRole::Swap,
        s if MBR_EXTENDED.contains(&s) => PartitionRole::Extended,
        _ => PartitionRole::Other,
    }
}

fn gpt_role(type_guid: &str) -> PartitionRole {
    use gpt::partition_types as t;
    let is = |ty: &t::Type| ty.guid.to_string().eq_ignore_ascii_case(type_guid);
    if is(&t::EFI) || is(&t::BASIC) {
        PartitionRole::Fat
    } else if is(&t::LINUX_FS) || is(&t::LINUX_ROOT_ARM_64) || is(&t::LINUX_ROOT_X64) {
        PartitionRole::Linux
    } else if is(&t::LINUX_SWAP) {
        PartitionRole::Swap
    } else {
        PartitionRole::Other
    }
}

/// Reads the partition table of a disk of `disk_len` bytes and checks that every
/// partition lies inside the disk and that none overlap.
pub fn read_table<D: Read + Write + Seek + Debug>(
    disk: &mut D,
    disk_len: u64,
) -> Result<PartitionTable> {
    if disk_len == 0 {
        bail!("the file is empty (0 bytes): not a disk image");
    }
    if disk_len < MBR_SECTOR_SIZE {
        bail!("only {disk_len} bytes: too short to hold a partition table (512 bytes)");
    }
    let mut sector = [0u8; 512];
    disk.seek(SeekFrom::Start(0))?;
    disk.read_exact(&mut sector)
        .context("reading the first sector")?;
    if sector[510..512] != [0x55, 0xaa] {
        bail!(
            "no partition table: the first sector does not end with the 0x55AA signature \
             (not a disk image, or its start is corrupt)"
        );
    }

    let mbr = mbrman::MBRHeader::read_from(disk)
        .map_err(|e| anyhow::anyhow!("the MBR partition table is invalid: {e}"))?;
    let used: Vec<_> = mbr.iter().filter(|(_, p)| p.is_used()).collect();
    // A partition at sector 0 would sit on the table itself. Refuse it here: mbrman's
    // alignment search panics when every start is 0 (found by fuzzing).
    if let Some((index, _)) = used
        .iter()
        .find(|(_, p)| p.starting_lba == 0 && p.sys != MBR_PROTECTIVE)
    {
        bail!(
            "partition {index} starts at sector 0, on top of the partition table: the table is corrupt"
        );
    }
    let table = if used.iter().any(|(_, p)| p.sys == MBR_PROTECTIVE) {
        read_gpt(disk)?
    } else {
        read_mbr(disk, &sector)?
    };
    if table.partitions.is_empty() {
        bail!("the {} partition table lists no partitions", table.kind);
    }
    check_bounds(&table, disk_len)?;
    Ok(table)
}

fn read_mbr<D: Read + Seek>(disk: &mut D, sector: &[u8; 512]) -> Result<PartitionTable> {
    let mbr = mbrman::MBR::read_from(disk, MBR_SECTOR_SIZE as u32)
        .map_err(|e| anyhow::anyhow!("the MBR partition table is invalid: {e}"))?;
    let disk_id = u32::from_le_bytes([sector[440], sector[441], sector[442], sector[443]]);
    let disk_id = format!("{disk_id:08x}");
    let partitions = mbr
        .iter()
        .filter(|(_, p)| p.is_used())
        .map(|(index, p)| Partition {
            number: index as u32,
            start: u64::from(p.starting_lba) * MBR_SECTOR_SIZE,
            size: u64::from(p.sectors) * MBR_SECTOR_SIZE,
            type_id: format!("0x{:02x}", p.sys),
            role: mbr_role(p.sys),
            name: None,
            partuuid: format!("{disk_id}-{index:02}"),
        })
        .collect();
    Ok(PartitionTable {
        kind: TableKind::Mbr,
        disk_id,
        sector_size: MBR_SECTOR_SIZE,
        partitions,
    })
}

fn read_gpt<D: Read + Write + Seek + Debug>(disk: &mut D) -> Result<PartitionTable> {
    // The gpt crate needs the logical block size; an image carries no hint, so try
    // the two sizes that exist and keep the one whose header is valid.
    let mut last_error = None;
    for block_size in [LogicalBlockSize::Lb512, LogicalBlockSize::Lb4096] {
        let opened = gpt::GptConfig::new()
            .writable(false)
            .logical_block_size(block_size)
            .open_from_device(&mut *disk);
        match opened {
            Ok(gpt) => {
                let lb = block_size.as_u64();
                let partitions = gpt
                    .partitions()
                    .iter()
                    .filter(|(_, p)| p.is_used())
                    .map(|(number, p)| {
                        let type_id = p.part_type_guid.guid.to_string().to_uppercase();
                        Partition {
                            number: *number,
                            start: p.first_lba * lb,
                            size: (p.last_lba + 1).saturating_sub(p.first_lba) * lb,
                            role: gpt_role(&type_id),
                            type_id,
                            name: Some(p.name.clone()).filter(|n| !n.is_empty()),
                            partuuid: p.part_guid.to_string(),
                        }
                    })
                    .collect();
                return Ok(PartitionTable {
                    kind: TableKind::Gpt,
                    disk_id: gpt.guid().to_string(),
                    sector_size: lb,
                    partitions,
                });
            }
            Err(e) => last_error = Some(e),
        }
    }
    bail!(
        "the disk has a protective MBR but no valid GPT header ({})",
        last_error.map(|e| e.to_string()).unwrap_or_default()
    )
}

fn check_bounds(table: &PartitionTable, disk_len: u64) -> Result<()> {
    for p in &table.partitions {
        if p.size == 0 {
            bail!("partition {} has a length of zero", p.number);
        }
        if p.role != PartitionRole::Extended && p.end() > disk_len {
            bail!(
                "partition {} ends at byte {}, past the end of the image ({disk_len} bytes): \
                 the image is truncated or its partition table is corrupt",
                p.number,
                p.end()
            );
        }
    }
    let mut by_start: Vec<_> = table
        .partitions
        .iter()
        .filter(|p| p.role != PartitionRole::Extended)
        .collect();
    by_start.sort_by_key(|p| p.start);
    for pair in by_start.windows(2) {
        if pair[0].end() > pair[1].start {
            bail!(
                "partitions {} and {} overlap: the partition table is corrupt",
                pair[0].number,
                pair[1].number
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// An MBR with the given (type, start sector, sectors) entries.
    fn mbr_disk(entries: &[(u8, u32, u32)], disk_sectors: usize) -> Cursor<Vec<u8>> {
        let mut data = vec![0u8; disk_sectors * 512];
        data[440..444].copy_from_slice(&0xdeadbeefu32.to_le_bytes());
        for (i, (sys, start, len)) in entries.iter().enumerate() {
            let e = 446 + i * 16;
            data[e + 4] = *sys;
            data[e + 8..e + 12].copy_from_slice(&start.to_le_bytes());
            data[e + 12..e + 16].copy_from_slice(&len.to_le_bytes());
        }
        data[510] = 0x55;
        data[511] = 0xaa;
        Cursor::new(data)
    }

    fn read(disk: &mut Cursor<Vec<u8>>) -> Result<PartitionTable> {
        let len = disk.get_ref().len() as u64;
        read_table(disk, len)
    }

    #[test]
    fn mbr_partitions_are_read_in_bytes_with_partuuids() {
        let mut disk = mbr_disk(&[(0x0c, 8, 16), (0x83, 24, 40)], 64);
        let table = read(&mut disk).unwrap();
        assert_eq!(table.kind, TableKind::Mbr);
        assert_eq!(table.disk_id, "deadbeef");
        let p = &table.partitions;
        assert_eq!(
            (p[0].start, p[0].size, p[0].role),
            (4096, 8192, PartitionRole::Fat)
        );
        assert_eq!(
            (p[1].start, p[1].size, p[1].role),
            (12288, 20480, PartitionRole::Linux)
        );
        assert_eq!(p[1].partuuid, "deadbeef-02");
        assert_eq!(p[0].type_id, "0x0c");
    }

    #[test]
    fn a_partition_past_the_end_names_the_truncation() {
        let mut disk = mbr_disk(&[(0x0c, 8, 16), (0x83, 24, 400)], 64);
        let err = read(&mut disk).unwrap_err().to_string();
        assert!(err.contains("partition 2 ends at byte 217088"), "{err}");
        assert!(err.contains("truncated"), "{err}");
    }

    #[test]
    fn overlapping_partitions_are_refused() {
        let mut disk = mbr_disk(&[(0x0c, 8, 20), (0x83, 24, 20)], 64);
        let err = read(&mut disk).unwrap_err().to_string();
        assert!(err.contains("partitions 1 and 2 overlap"), "{err}");
    }

    #[test]
    fn a_sector_without_signature_is_not_a_disk() {
        let mut disk = Cursor::new(vec![0x41u8; 4096]);
        let err = read(&mut disk).unwrap_err().to_string();
        assert!(err.contains("0x55AA"), "{err}");
    }

    #[test]
    fn a_partition_on_top_of_the_table_is_refused() {
        let mut disk = mbr_disk(&[(0x0c, 0, 16)], 64);
        let err = read(&mut disk).unwrap_err().to_string();
        assert!(err.contains("partition 1 starts at sector 0"), "{err}");
    }

    #[test]
    fn an_empty_table_is_refused() {
        let mut disk = mbr_disk(&[], 64);
        let err = read(&mut disk).unwrap_err().to_string();
        assert!(err.contains("lists no partitions"), "{err}");
    }

    #[test]
    fn a_protective_mbr_without_gpt_header_is_reported() {
        let mut disk = mbr_disk(&[(0xee, 1, 63)], 64);
        let err = read(&mut disk).unwrap_err().to_string();
        assert!(
            err.contains("protective MBR but no valid GPT header"),
            "{err}"
        );
    }
}
