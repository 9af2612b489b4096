//! A copy-on-write view of a disk: reads come from the base, writes go to memory
//! in whole blocks. Each card of a batch is stamped on its own overlay of one
//! shared decoded image, and the changed blocks are written with the rest.

use std::collections::BTreeMap;
use std::io::{self, Read, Seek, SeekFrom, Write};

pub const BLOCK: u64 = 4096;

#[derive(Debug)]
pub struct Overlay<R> {
    base: R,
    len: u64,
    pos: u64,
    blocks: BTreeMap<u64, Box<[u8]>>,
}

impl<R: Read + Seek> Overlay<R> {
    pub fn new(mut base: R) -> io::Result<Self> {
        let len = base.seek(SeekFrom::End(0))?;
        Ok(Self {
            base,
            len,
            pos: 0,
            blocks: BTreeMap::new(),
        })
    }

    /// Byte ranges `(start, end)` of the blocks that were written.
    pub fn changed(&self) -> Vec<(u64, u64)> {
        self.blocks
            .keys()
            .map(|b| (b * BLOCK, ((b + 1) * BLOCK).min(self.len)))
            .collect()
    }

    /// Fills `buf` from `offset`: changed blocks from memory, the rest from the base.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let block = at / BLOCK;
            let within = (at % BLOCK) as usize;
            let n = (BLOCK as usize - within).min(buf.len() - done);
            match self.blocks.get(&block) {
                Some(data) => buf[done..done + n].copy_from_slice(&data[within..within + n]),
                None => {
                    // Read straight through to the next changed block.
                    let next_changed = self
                        .blocks
                        .range(block..)
                        .next()
                        .map_or(u64::MAX, |(b, _)| b * BLOCK);
                    let n = ((next_changed - at) as usize).min(buf.len() - done);
                    self.base.seek(SeekFrom::Start(at))?;
                    self.base.read_exact(&mut buf[done..done + n])?;
                    done += n;
                    continue;
                }
            }
            done += n;
        }
        Ok(())
    }

    fn block_mut(&mut self, block: u64) -> io::Result<&mut [u8]> {
        if !self.blocks.contains_key(&block) {
            let mut data = vec![0u8; BLOCK as usize].into_boxed_slice();
            let start = block * BLOCK;
            let n = (self.len.saturating_sub(start)).min(BLOCK) as usize;
            self.base.seek(SeekFrom::Start(start))?;
            self.base.read_exact(&mut data[..n])?;
            self.blocks.insert(block, data);
        }
        Ok(self.blocks.get_mut(&block).expect("inserted above"))
    }
}

impl<R: Read + Seek> Read for Overlay<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (self.len.saturating_sub(self.pos)).min(buf.len() as u64) as usize;
        self.read_at(self.pos, &mut buf[..n])?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: Read + Seek> Write for Overlay<R> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.pos >= self.len && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "write past the end of the image",
            ));
        }
        let n = (self.len - self.pos).min(buf.len() as u64) as usize;
        let mut done = 0;
        while done < n {
            let at = self.pos + done as u64;
            let within = (at % BLOCK) as usize;
            let k = (BLOCK as usize - within).min(n - done);
            self.block_mut(at / BLOCK)?[within..within + k].copy_from_slice(&buf[done..done + k]);
            done += k;
        }
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<R> Seek for Overlay<R> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = target
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))?;
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn writes_stay_in_memory_and_read_back_merged() {
        let base: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let mut o = Overlay::new(Cursor::new(base.clone())).unwrap();
        o.seek(SeekFrom::Start(4090)).unwrap();
        o.write_all(b"0123456789AB").unwrap();
        assert_eq!(o.changed(), vec![(0, 4096), (4096, 8192)]);
        let mut all = Vec::new();
        o.seek(SeekFrom::Start(0)).unwrap();
        o.read_to_end(&mut all).unwrap();
        let mut expected = base.clone();
        expected[4090..4102].copy_from_slice(b"0123456789AB");
        assert_eq!(all, expected);
        assert_eq!(o.base.get_ref(), &base, "the base is never written");
    }
}
