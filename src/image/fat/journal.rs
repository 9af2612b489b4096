//! What a session of writes through fatfs changed on the partition: the
//! original bytes of every sector it wrote, taken just before the first write
//! to that sector. A stamp keeps them so that an unstamp can put the partition
//! back byte for byte (fatfs also rewrites directory sectors, FAT chains, the
//! FSInfo sector and timestamps, which no file-level undo restores).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::{self, Read, Seek};
use std::rc::Rc;

use crate::image::slice::PartitionSlice;

/// The unit of the journal; every FAT sector size is a multiple of it.
pub const SECTOR: u64 = 512;

/// Originals by sector number, shared by the sessions of one stamp.
#[derive(Clone, Default, Debug)]
pub struct Journal {
    originals: Rc<RefCell<BTreeMap<u64, Vec<u8>>>>,
}

impl Journal {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the original of every sector in `[pos, pos + len)` not yet taken.
    pub(super) fn before_write<D: Read + Seek>(
        &self,
        slice: &PartitionSlice<D>,
        pos: u64,
        len: u64,
    ) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let first = pos / SECTOR;
        let last = (pos + len - 1) / SECTOR;
        let mut originals = self.originals.borrow_mut();
        for sector in first..=last {
            if originals.contains_key(&sector) {
                continue;
            }
            let mut data = vec![0u8; SECTOR as usize];
            slice.read_exact_at(sector * SECTOR, &mut data)?;
            originals.insert(sector, data);
        }
        Ok(())
    }

    /// The sectors written so far, with their originals, in order.
    pub fn originals(&self) -> BTreeMap<u64, Vec<u8>> {
        self.originals.borrow().clone()
    }
}
