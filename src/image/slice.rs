//! A window onto one partition of a shared disk, usable as `Read + Write + Seek`
//! (for fatfs) and as `Ext4Read` (for ext4-view).

use std::cell::RefCell;
use std::fmt;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::rc::Rc;

/// The disk under an image, shared by the partition slices opened on it.
/// `Rc` rather than `Arc`: ext4-view is not `Send`, so neither is anything built on it.
pub type SharedDisk<D> = Rc<RefCell<D>>;

pub struct PartitionSlice<D> {
    disk: SharedDisk<D>,
    start: u64,
    len: u64,
    pos: u64,
}

impl<D> Clone for PartitionSlice<D> {
    fn clone(&self) -> Self {
        Self {
            disk: self.disk.clone(),
            start: self.start,
            len: self.len,
            pos: self.pos,
        }
    }
}

impl<D> PartitionSlice<D> {
    pub fn new(disk: SharedDisk<D>, start: u64, len: u64) -> Self {
        Self {
            disk,
            start,
            len,
            pos: 0,
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many bytes from `pos` can be transferred without leaving the slice.
    fn clamp(&self, pos: u64, wanted: usize) -> usize {
        let left = self.len.saturating_sub(pos);
        usize::try_from(left).map_or(wanted, |left| left.min(wanted))
    }
}

impl<D: Read + Seek> PartitionSlice<D> {
    /// Reads exactly `buf.len()` bytes at `offset` within the slice.
    pub fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|end| end > self.len) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "read of {} bytes at offset {offset} goes past the end of the partition ({} bytes)",
                    buf.len(),
                    self.len
                ),
            ));
        }
        let mut disk = self.disk.borrow_mut();
        disk.seek(SeekFrom::Start(self.start + offset))?;
        disk.read_exact(buf)
    }
}

impl<D: Write + Seek> PartitionSlice<D> {
    /// Writes all of `buf` at `offset` within the slice.
    pub fn write_all_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|end| end > self.len) {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!(
                    "write of {} bytes at offset {offset} goes past the end of the partition ({} bytes)",
                    buf.len(),
                    self.len
                ),
            ));
        }
        let mut disk = self.disk.borrow_mut();
        disk.seek(SeekFrom::Start(self.start + offset))?;
        disk.write_all(buf)
    }
}

impl<D> fmt::Debug for PartitionSlice<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PartitionSlice")
            .field("start", &self.start)
            .field("len", &self.len)
            .field("pos", &self.pos)
            .finish()
    }
}

impl<D: Read + Seek> Read for PartitionSlice<D> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.clamp(self.pos, buf.len());
        if n == 0 {
            return Ok(0);
        }
        let mut disk = self.disk.borrow_mut();
        disk.seek(SeekFrom::Start(self.start + self.pos))?;
        let read = disk.read(&mut buf[..n])?;
        self.pos += read as u64;
        Ok(read)
    }
}

impl<D: Write + Seek> Write for PartitionSlice<D> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.clamp(self.pos, buf.len());
        if n == 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "write past the end of the partition",
            ));
        }
        let mut disk = self.disk.borrow_mut();
        disk.seek(SeekFrom::Start(self.start + self.pos))?;
        let written = disk.write(&buf[..n])?;
        self.pos += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.disk.borrow_mut().flush()
    }
}

impl<D> Seek for PartitionSlice<D> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match target {
            Some(pos) if pos <= self.len => {
                self.pos = pos;
                Ok(pos)
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek outside the partition",
            )),
        }
    }
}

impl<D: Read + Seek> ext4_view::Ext4Read for PartitionSlice<D> {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.read_exact_at(start_byte, dst).map_err(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn disk() -> SharedDisk<Cursor<Vec<u8>>> {
        Rc::new(RefCell::new(Cursor::new(
            (0..=255u8).cycle().take(4096).collect(),
        )))
    }

    #[test]
    fn reads_stop_at_the_partition_end() {
        let mut slice = PartitionSlice::new(disk(), 1000, 10);
        let mut buf = Vec::new();
        slice.read_to_end(&mut buf).unwrap();
        let expected: Vec<u8> = (1000..1010).map(|i| (i % 256) as u8).collect();
        assert_eq!(buf, expected);
    }

    #[test]
    fn writes_land_at_the_offset_and_cannot_overflow() {
        let shared = disk();
        let mut slice = PartitionSlice::new(shared.clone(), 100, 4);
        slice.write_all(b"abcd").unwrap();
        assert!(slice.write_all(b"e").is_err());
        assert_eq!(&shared.borrow().get_ref()[100..104], b"abcd");
        assert_eq!(shared.borrow().get_ref()[104], 104);
    }

    #[test]
    fn seeks_outside_the_slice_are_refused() {
        let mut slice = PartitionSlice::new(disk(), 0, 16);
        assert_eq!(slice.seek(SeekFrom::End(-1)).unwrap(), 15);
        assert!(slice.seek(SeekFrom::Start(17)).is_err());
        assert!(slice.seek(SeekFrom::Current(-100)).is_err());
    }

    #[test]
    fn exact_reads_past_the_end_name_the_sizes() {
        let slice = PartitionSlice::new(disk(), 0, 16);
        let err = slice.read_exact_at(10, &mut [0; 8]).unwrap_err();
        assert!(
            err.to_string()
                .contains("past the end of the partition (16 bytes)")
        );
    }
}
