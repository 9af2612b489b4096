//! Recognises a filesystem from its first bytes, whatever the partition type says.

use std::io::{Read, Seek};

use serde::Serialize;

use super::slice::PartitionSlice;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsKind {
    Fat,
    /// ext2/3/4 share the superblock magic.
    Ext,
    Swap,
    Unknown,
}

const EXT_MAGIC_OFFSET: usize = 1024 + 56;
const SWAP_MAGIC_OFFSET: usize = 4096 - 10;

pub fn probe<D: Read + Seek>(slice: &PartitionSlice<D>) -> FsKind {
    let mut head = [0u8; 4096];
    let len = head
        .len()
        .min(usize::try_from(slice.len()).unwrap_or(usize::MAX));
    if slice.read_exact_at(0, &mut head[..len]).is_err() {
        return FsKind::Unknown;
    }
    classify(&head[..len])
}

fn classify(head: &[u8]) -> FsKind {
    let at = |offset: usize, magic: &[u8]| head.get(offset..offset + magic.len()) == Some(magic);
    if at(EXT_MAGIC_OFFSET, &[0x53, 0xef]) {
        FsKind::Ext
    } else if at(510, &[0x55, 0xaa]) && (at(82, b"FAT32") || at(54, b"FAT1")) {
        FsKind::Fat
    } else if at(SWAP_MAGIC_OFFSET, b"SWAPSPACE2") {
        FsKind::Swap
    } else {
        FsKind::Unknown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_each_magic() {
        let mut ext = vec![0u8; 4096];
        ext[EXT_MAGIC_OFFSET..EXT_MAGIC_OFFSET + 2].copy_from_slice(&[0x53, 0xef]);
        assert_eq!(classify(&ext), FsKind::Ext);

        let mut fat = vec![0u8; 4096];
        fat[82..90].copy_from_slice(b"FAT32   ");
        fat[510..512].copy_from_slice(&[0x55, 0xaa]);
        assert_eq!(classify(&fat), FsKind::Fat);

        let mut swap = vec![0u8; 4096];
        swap[SWAP_MAGIC_OFFSET..].copy_from_slice(b"SWAPSPACE2");
        assert_eq!(classify(&swap), FsKind::Swap);

        assert_eq!(classify(&[0u8; 100]), FsKind::Unknown);
    }
}
