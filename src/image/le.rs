//! Little-endian fields of on-disk structures (FAT boot sector, ext4 superblock
//! and descriptors), widened to u64 so sizes computed from them do not overflow.

pub(crate) fn le16(b: &[u8], at: usize) -> u64 {
    u64::from(u16::from_le_bytes([b[at], b[at + 1]]))
}

pub(crate) fn le32(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]))
}
