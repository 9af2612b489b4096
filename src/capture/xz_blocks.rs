//! One xz stream made of blocks compressed one by one: each block holds a fixed
//! span of the image (the size `xz -T0` gives its blocks at that level), so a
//! block compressed before the image was final can be kept when its span did
//! not change. Every block header carries its sizes, as those of `xz -T0` do,
//! so `flash` decodes the blocks on every core.
//!
//! liblzma compresses each span as a one-block stream; the block is lifted out
//! of it and the blocks are joined under one stream header, index and footer
//! (the xz file format, version 1.2.0, sections 2 and 4).

use std::io::Write;

use anyhow::{Context, Result, bail, ensure};
use liblzma::stream::{Action, Check, Filters, LzmaOptions, MtStreamBuilder, Status};

const HEADER_MAGIC: [u8; 6] = [0xfd, b'7', b'z', b'X', b'Z', 0x00];
const FOOTER_MAGIC: [u8; 2] = *b"YZ";
/// Stream flags: the check is CRC64.
const FLAGS: [u8; 2] = [0x00, 0x04];
/// Stream header and footer: 12 bytes each.
const FRAME: usize = 12;

/// The span of image each block holds at `preset`: liblzma's own choice for
/// its multi-threaded encoder (three times the dictionary).
pub fn span(preset: u32) -> Result<u64> {
    let options = LzmaOptions::new_preset(preset).context("xz preset")?;
    Ok(Filters::new().lzma2(&options).mt_block_size().max(1 << 20))
}

/// A compressed block as it goes into the stream (header, data, padding, check).
pub struct Block {
    pub bytes: Vec<u8>,
    /// The block's size without its padding, as the index records it.
    pub unpadded: u64,
    pub uncompressed: u64,
}

/// Compresses `data` (at most one span) into one block.
pub fn compress(data: &[u8], preset: u32) -> Result<Block> {
    ensure!(!data.is_empty(), "an empty block");
    let mut stream = MtStreamBuilder::new()
        // One thread: the blocks themselves are compressed side by side. The
        // multi-threaded encoder writes each block's sizes into its header.
        .threads(1)
        .block_size(data.len() as u64)
        .preset(preset)
        .check(Check::Crc64)
        .encoder()
        .context("starting the xz encoder")?;
    let mut out = Vec::with_capacity(data.len() / 2 + (64 << 10));
    loop {
        let consumed = stream.total_in() as usize;
        let status = stream
            .process_vec(&data[consumed..], &mut out, Action::Finish)
            .context("compressing")?;
        if status == Status::StreamEnd {
            break;
        }
        if out.len() == out.capacity() {
            out.reserve(out.capacity().max(1 << 20));
        }
    }
    lift_block(out, data.len() as u64)
}

/// The block inside a one-block stream.
fn lift_block(stream: Vec<u8>, uncompressed: u64) -> Result<Block> {
    let len = stream.len();
    ensure!(
        len >= 2 * FRAME + 8
            && stream[..6] == HEADER_MAGIC
            && stream[6..8] == FLAGS
            && stream[len - 2..] == FOOTER_MAGIC
            && stream[len - 4..len - 2] == FLAGS,
        "liblzma made an xz stream this writer does not know"
    );
    let backward = u32::from_le_bytes(stream[len - 8..len - 4].try_into().unwrap()) as usize;
    let index_len = (backward + 1) * 4;
    let index_at = len
        .checked_sub(FRAME + index_len)
        .filter(|&at| at >= FRAME)
        .context("an xz index larger than its stream")?;
    let index = &stream[index_at..len - FRAME];
    let mut fields = &index[1..];
    let records = varint(&mut fields)?;
    let unpadded = varint(&mut fields)?;
    let recorded = varint(&mut fields)?;
    if index[0] != 0 || records != 1 || recorded != uncompressed {
        bail!("liblzma made {records} blocks of {recorded} bytes for {uncompressed}");
    }
    let mut bytes = stream;
    bytes.truncate(index_at);
    bytes.drain(..FRAME);
    ensure!(
        bytes.len() as u64 == unpadded.next_multiple_of(4),
        "an xz block of {} bytes recorded as {unpadded}",
        bytes.len()
    );
    Ok(Block {
        bytes,
        unpadded,
        uncompressed,
    })
}

/// An xz multibyte integer: seven bits a byte, low first.
fn varint(input: &mut &[u8]) -> Result<u64> {
    let mut value = 0u64;
    for i in 0..9 {
        let (&byte, rest) = input.split_first().context("a cut xz index")?;
        *input = rest;
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    bail!("an xz integer longer than nine bytes")
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Writes the stream: its header, then each block as `add` is given them, then
/// the index and the footer at `finish`.
pub struct StreamWriter<W: Write> {
    out: W,
    /// (unpadded, uncompressed) of each block, for the index.
    records: Vec<(u64, u64)>,
}

impl<W: Write> StreamWriter<W> {
    pub fn new(mut out: W) -> Result<Self> {
        out.write_all(&HEADER_MAGIC)?;
        out.write_all(&FLAGS)?;
        out.write_all(&crc32fast::hash(&FLAGS).to_le_bytes())?;
        Ok(Self {
            out,
            records: Vec::new(),
        })
    }

    /// The block's bytes, as [`compress`] gave them.
    pub fn add(&mut self, bytes: &[u8], unpadded: u64, uncompressed: u64) -> Result<()> {
        ensure!(
            bytes.len() as u64 == unpadded.next_multiple_of(4),
            "an xz block of {} bytes recorded as {unpadded}",
            bytes.len()
        );
        self.out.write_all(bytes)?;
        self.records.push((unpadded, uncompressed));
        Ok(())
    }

    pub fn finish(mut self) -> Result<W> {
        let mut index = vec![0u8];
        put_varint(&mut index, self.records.len() as u64);
        for &(unpadded, uncompressed) in &self.records {
            put_varint(&mut index, unpadded);
            put_varint(&mut index, uncompressed);
        }
        index.resize(index.len().next_multiple_of(4), 0);
        let crc = crc32fast::hash(&index);
        index.extend_from_slice(&crc.to_le_bytes());
        let backward = u32::try_from(index.len() / 4 - 1).context("an xz index past 16 GiB")?;
        let mut footer = backward.to_le_bytes().to_vec();
        footer.extend_from_slice(&FLAGS);
        self.out.write_all(&index)?;
        self.out
            .write_all(&crc32fast::hash(&footer).to_le_bytes())?;
        self.out.write_all(&footer)?;
        self.out.write_all(&FOOTER_MAGIC)?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn sample(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| ((i / 7) as u8).wrapping_mul(seed) ^ (i % 251) as u8)
            .collect()
    }

    fn joined(spans: &[Vec<u8>]) -> Vec<u8> {
        let mut writer = StreamWriter::new(Vec::new()).unwrap();
        for span in spans {
            let block = compress(span, 1).unwrap();
            writer
                .add(&block.bytes, block.unpadded, block.uncompressed)
                .unwrap();
        }
        writer.finish().unwrap()
    }

    #[test]
    fn joined_blocks_decode_as_one_stream() {
        let spans = vec![sample(1 << 20, 3), vec![0; 300_000], sample(12_345, 7)];
        let xz = joined(&spans);
        let mut decoded = Vec::new();
        // Single-stream decoding: anything after the footer, or a wrong index,
        // is an error here.
        liblzma::read::XzDecoder::new(&xz[..])
            .read_to_end(&mut decoded)
            .unwrap();
        assert_eq!(decoded, spans.concat());
        let mut parallel = Vec::new();
        crate::flash::xz::Decoder::new(std::io::BufReader::new(&xz[..]), 2)
            .unwrap()
            .read_to_end(&mut parallel)
            .unwrap();
        assert_eq!(parallel, decoded);
    }

    /// `xz --list`: three blocks, each header with both its sizes (what lets
    /// liblzma decode them in parallel).
    #[test]
    fn every_block_header_carries_its_sizes() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("joined.xz");
        std::fs::write(
            &path,
            joined(&[sample(70_000, 5), sample(70_000, 9), vec![1; 10]]),
        )
        .unwrap();
        let out = std::process::Command::new("xz")
            .args(["--robot", "--list", "-vv"])
            .arg(&path)
            .output()
            .expect("xz (apt-get install xz-utils)");
        assert!(out.status.success(), "{out:?}");
        let listing = String::from_utf8(out.stdout).unwrap();
        let blocks: Vec<&str> = listing
            .lines()
            .filter(|l| l.starts_with("block\t"))
            .collect();
        assert_eq!(blocks.len(), 3, "{listing}");
        for block in blocks {
            // --robot -vv: the 13th column holds the header flags.
            let flags = block.split('\t').nth(12).unwrap();
            assert_eq!(flags, "cu", "{block}");
        }
    }

    #[test]
    fn a_stream_of_several_blocks_is_refused_as_one_block() {
        let mut writer = StreamWriter::new(Vec::new()).unwrap();
        assert!(writer.add(&[0; 5], 4, 4).is_err());
        let mut two = Vec::new();
        let mut stream = MtStreamBuilder::new()
            .threads(1)
            .block_size(1 << 20)
            .preset(0)
            .check(Check::Crc64)
            .encoder()
            .unwrap();
        let data = sample(3 << 20, 11);
        two.reserve(8 << 20);
        while stream
            .process_vec(
                &data[stream.total_in() as usize..],
                &mut two,
                Action::Finish,
            )
            .unwrap()
            != Status::StreamEnd
        {
            two.reserve(1 << 20);
        }
        let refused = lift_block(two, data.len() as u64).err().unwrap();
        assert!(refused.to_string().contains("3 blocks"), "{refused}");
    }
}
