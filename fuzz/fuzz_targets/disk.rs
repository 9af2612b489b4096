//! Fuzz bytes placed as partitions behind an MBR, so that each target reaches
//! the filesystem reader it is about rather than the partition-table parser.

const SECTOR: usize = 512;

/// A disk image: an MBR listing `partitions` (type byte, contents) one after
/// another from sector 1, each padded to whole sectors.
pub fn with_partitions(partitions: &[(u8, &[u8])]) -> Vec<u8> {
    let mut disk = vec![0u8; SECTOR];
    for (i, (kind, data)) in partitions.iter().enumerate() {
        let start = disk.len() / SECTOR;
        let sectors = data.len().div_ceil(SECTOR).max(1);
        disk.extend_from_slice(data);
        disk.resize((start + sectors) * SECTOR, 0);
        let entry = 446 + 16 * i;
        disk[entry + 4] = *kind;
        disk[entry + 8..entry + 12].copy_from_slice(&(start as u32).to_le_bytes());
        disk[entry + 12..entry + 16].copy_from_slice(&(sectors as u32).to_le_bytes());
    }
    disk[510] = 0x55;
    disk[511] = 0xAA;
    disk
}
