//! Byte-exact unstamp. A stamp made through fatfs changes more than its files:
//! directory sectors, FAT chains, the FSInfo sector, timestamps. So `stamp`
//! keeps the original of every sector it changed in `piprov-undo.bin` on the
//! boot partition, and `unstamp` (or the next stamp) writes them back: the
//! image's SHA-256 is the original's again, after any number of restamps.
//!
//! The undo file holds the originals of its own sectors too (the free space it
//! took), so it is sized in a loop until it holds itself. It also holds a hash
//! of the stamped sectors: when anything changed them since (the card booted,
//! someone edited `config.txt`), writing old sectors back would corrupt the
//! filesystem, so unstamp removes the stamp file by file instead, as before.
//! The file only ever holds bytes the partition held before the stamp: no secret.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek, Write};

use anyhow::{Context, Result, bail, ensure};
use sha2::{Digest, Sha256};

use crate::image::{Image, Journal, PartitionSlice, SECTOR};

/// On the boot partition, beside the stamp record.
pub const UNDO_FILE: &str = "piprov-undo.bin";

const MAGIC: &[u8] = b"piprov undo 1\n";
/// Placeholder sectors start with a random tag and their index, so that the
/// file's sectors can be found among those written without reading the FAT.
const TAG_LEN: usize = 16;
/// A real stamp changes a few hundred KiB; anything far larger is not ours.
const MAX_UNDO: u64 = 64 << 20;
/// Each try sizes the file for what the last one needed.
const TRIES: usize = 4;

/// What unstamp found.
#[derive(Debug, PartialEq, Eq)]
pub enum Restore {
    /// The partition is back as it was before the stamp, byte for byte.
    Exactly,
    /// There is no undo file (an image stamped by an older piprov).
    NoUndo,
    /// The undo file cannot be used; the reason.
    Unusable(String),
}

#[derive(Debug, PartialEq)]
struct Undo {
    /// SHA-256 of (sector, content) of every changed sector but the undo
    /// file's own, as the stamp left them.
    after: [u8; 32],
    /// The undo file's sectors, in file order.
    own: Vec<u64>,
    /// Every changed sector with its original; `None` is all zeroes.
    originals: Vec<(u64, Option<Vec<u8>>)>,
}

impl Undo {
    fn encode(&self) -> Result<Vec<u8>> {
        let mut body = Vec::new();
        body.extend_from_slice(&self.after);
        body.extend_from_slice(&(self.own.len() as u64).to_le_bytes());
        for sector in &self.own {
            body.extend_from_slice(&sector.to_le_bytes());
        }
        body.extend_from_slice(&(self.originals.len() as u64).to_le_bytes());
        for (sector, original) in &self.originals {
            body.extend_from_slice(&sector.to_le_bytes());
            match original {
                None => body.push(0),
                Some(data) => {
                    body.push(1);
                    body.extend_from_slice(data);
                }
            }
        }
        let packed = zstd::bulk::compress(&body, 3).context("compressing the undo record")?;
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&(packed.len() as u64).to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&packed);
        Ok(out)
    }

    /// Reads an undo file found on a partition of `sectors` sectors; every
    /// number in it is checked against the partition (it may be crafted).
    fn decode(data: &[u8], sectors: u64) -> Result<Self> {
        let rest = data
            .strip_prefix(MAGIC)
            .context("it is not an undo record piprov wrote")?;
        let mut head = Reader(rest);
        let packed_len = head.u64()?;
        let body_len = head.u64()?;
        ensure!(body_len <= MAX_UNDO * 2, "it claims {body_len} bytes");
        let packed = head.take(usize::try_from(packed_len)?)?;
        let body = zstd::bulk::decompress(packed, usize::try_from(body_len)?)
            .context("its contents do not decompress")?;
        ensure!(body.len() as u64 == body_len, "its length is wrong");
        let mut r = Reader(&body);
        let after: [u8; 32] = r.take(32)?.try_into()?;
        let in_range = |sector: u64| -> Result<u64> {
            ensure!(sector < sectors, "sector {sector} is past the partition");
            Ok(sector)
        };
        let own_count = r.count(8)?;
        let own = (0..own_count)
            .map(|_| in_range(r.u64()?))
            .collect::<Result<Vec<_>>>()?;
        let count = r.count(9)?;
        let mut originals = Vec::with_capacity(count);
        let mut last = None;
        for _ in 0..count {
            let sector = in_range(r.u64()?)?;
            ensure!(last < Some(sector), "its sectors are not in order");
            last = Some(sector);
            let original = match r.take(1)?[0] {
                0 => None,
                1 => Some(r.take(SECTOR as usize)?.to_vec()),
                kind => bail!("sector {sector} has an unknown kind {kind}"),
            };
            originals.push((sector, original));
        }
        ensure!(r.0.is_empty(), "it has bytes after its last sector");
        let listed: BTreeSet<u64> = originals.iter().map(|(s, _)| *s).collect();
        ensure!(
            own.iter().collect::<BTreeSet<_>>().len() == own.len()
                && own.iter().all(|s| listed.contains(s)),
            "its own sectors are not among those it restores"
        );
        Ok(Self {
            after,
            own,
            originals,
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        ensure!(self.0.len() >= n, "it ends early");
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into()?))
    }

    /// A count of items of at least `min_size` bytes each, checked against
    /// what is left, so that no count makes a large allocation.
    fn count(&mut self, min_size: usize) -> Result<usize> {
        let n = usize::try_from(self.u64()?)?;
        ensure!(
            n.checked_mul(min_size).is_some_and(|b| b <= self.0.len()),
            "it counts more entries than it holds"
        );
        Ok(n)
    }
}

fn read_sector<D: Read + Seek>(slice: &PartitionSlice<D>, sector: u64) -> Result<Vec<u8>> {
    let mut data = vec![0u8; SECTOR as usize];
    slice
        .read_exact_at(sector * SECTOR, &mut data)
        .with_context(|| format!("reading sector {sector} of the boot partition"))?;
    Ok(data)
}

/// The changed sectors (`own` always counts as changed) and the hash of how
/// the others look now.
#[allow(clippy::type_complexity)]
fn changes<D: Read + Seek>(
    slice: &PartitionSlice<D>,
    originals: &BTreeMap<u64, Vec<u8>>,
    own: &BTreeSet<u64>,
) -> Result<(Vec<(u64, Option<Vec<u8>>)>, [u8; 32])> {
    let mut changed = Vec::new();
    let mut after = Sha256::new();
    for (&sector, original) in originals {
        let current = read_sector(slice, sector)?;
        let is_own = own.contains(&sector);
        if !is_own && current == *original {
            continue;
        }
        if !is_own {
            after.update(sector.to_le_bytes());
            after.update(&current);
        }
        let kept = original.iter().any(|&b| b != 0).then(|| original.clone());
        changed.push((sector, kept));
    }
    Ok((changed, after.finalize().into()))
}

/// Writes the undo file for everything `journal` saw written. Returns false
/// when the originals cannot fit in a file on the partition: when its free
/// space holds old data rather than zeroes, the file would have to hold the
/// old data under itself as well, which no file can. The stamp stands, the
/// file is removed, and unstamp will restore the stamp's files but not every
/// byte.
pub fn write_undo<D: Read + Write + Seek + std::fmt::Debug + 'static>(
    image: &Image<D>,
    journal: &Journal,
) -> Result<bool> {
    let slice = image.slice(image.boot_partition()?);
    let (first, _) = changes(&slice, &journal.originals(), &BTreeSet::new())?;
    let mut size = round_up(
        Undo {
            after: [0; 32],
            own: Vec::new(),
            originals: first,
        }
        .encode()?
        .len() as u64
            + 8192,
    );
    for _ in 0..TRIES {
        if size > MAX_UNDO {
            break;
        }
        let tag = *uuid::Uuid::new_v4().as_bytes();
        let boot = image.boot_journaled(journal)?;
        boot.zero_ahead(&[size])?;
        boot.write(UNDO_FILE, &placeholder(&tag, size))?;
        boot.close()?;
        let originals = journal.originals();
        let own = find_own(&slice, &originals, &tag, size / SECTOR)?;
        let own_set: BTreeSet<u64> = own.iter().copied().collect();
        let (changed, after) = changes(&slice, &originals, &own_set)?;
        let mut encoded = Undo {
            after,
            own: own.clone(),
            originals: changed,
        }
        .encode()?;
        if encoded.len() as u64 <= size {
            encoded.resize(usize::try_from(size)?, 0);
            for (sector, chunk) in own.iter().zip(encoded.chunks(SECTOR as usize)) {
                slice
                    .write_all_at(sector * SECTOR, chunk)
                    .context("writing the undo record")?;
            }
            return Ok(true);
        }
        size = round_up(encoded.len() as u64 * 5 / 4 + 8192);
    }
    let boot = image.boot()?;
    boot.remove(UNDO_FILE)?;
    boot.close()?;
    Ok(false)
}

fn round_up(bytes: u64) -> u64 {
    bytes.div_ceil(SECTOR) * SECTOR
}

fn placeholder(tag: &[u8; TAG_LEN], size: u64) -> Vec<u8> {
    let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    for index in 0..size / SECTOR {
        let mut sector = [0u8; SECTOR as usize];
        sector[..TAG_LEN].copy_from_slice(tag);
        sector[TAG_LEN..TAG_LEN + 8].copy_from_slice(&index.to_le_bytes());
        data.extend_from_slice(&sector);
    }
    data
}

/// The sectors of the placeholder, in file order, found by their tags among
/// the sectors written.
fn find_own<D: Read + Seek>(
    slice: &PartitionSlice<D>,
    originals: &BTreeMap<u64, Vec<u8>>,
    tag: &[u8; TAG_LEN],
    count: u64,
) -> Result<Vec<u64>> {
    let mut own = vec![None; usize::try_from(count)?];
    for &sector in originals.keys() {
        let current = read_sector(slice, sector)?;
        if current[..TAG_LEN] == tag[..] {
            let index = u64::from_le_bytes(current[TAG_LEN..TAG_LEN + 8].try_into()?);
            if let Some(slot) = own.get_mut(usize::try_from(index)?) {
                *slot = Some(sector);
            }
        }
    }
    own.into_iter()
        .collect::<Option<Vec<_>>>()
        .context("the undo file's sectors were not all found where they were written")
}

/// Puts the boot partition back as it was before the stamp, when the undo file
/// is there and nothing but the stamp changed the sectors it restores.
pub fn restore<D: Read + Write + Seek + std::fmt::Debug + 'static>(
    image: &Image<D>,
) -> Result<Restore> {
    let boot = image.boot()?;
    let data = boot.read_at_most(UNDO_FILE, MAX_UNDO);
    // Only read: closing writes nothing.
    boot.close()?;
    let data = match data {
        Ok(Some(data)) => data,
        Ok(None) => return Ok(Restore::NoUndo),
        Err(e) => return Ok(Restore::Unusable(format!("{e:#}"))),
    };
    let slice = image.slice(image.boot_partition()?);
    let undo = match Undo::decode(&data, slice.len() / SECTOR) {
        Ok(undo) => undo,
        Err(e) => return Ok(Restore::Unusable(format!("{UNDO_FILE}: {e:#}"))),
    };
    let own: BTreeSet<u64> = undo.own.iter().copied().collect();
    let mut after = Sha256::new();
    for (sector, _) in undo.originals.iter().filter(|(s, _)| !own.contains(s)) {
        after.update(sector.to_le_bytes());
        after.update(read_sector(&slice, *sector)?);
    }
    if <[u8; 32]>::from(after.finalize()) != undo.after {
        return Ok(Restore::Unusable(
            "the boot partition changed since it was stamped".into(),
        ));
    }
    let zeroes = vec![0u8; SECTOR as usize];
    // The undo file's own sectors last: until then a cut leaves it readable.
    let (others, last): (Vec<_>, Vec<_>) =
        undo.originals.iter().partition(|(s, _)| !own.contains(s));
    for (sector, original) in others.into_iter().chain(last) {
        slice
            .write_all_at(sector * SECTOR, original.as_deref().unwrap_or(&zeroes))
            .with_context(|| format!("restoring sector {sector} of the boot partition"))?;
    }
    Ok(Restore::Exactly)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Undo {
        Undo {
            after: [7; 32],
            own: vec![9],
            originals: vec![(2, None), (9, Some(vec![1; SECTOR as usize]))],
        }
    }

    #[test]
    fn a_record_reads_back_as_written() {
        let data = sample().encode().unwrap();
        assert_eq!(Undo::decode(&data, 10).unwrap(), sample());
    }

    #[test]
    fn a_crafted_record_is_refused() {
        let data = sample().encode().unwrap();
        let err = |data: &[u8], sectors| format!("{:#}", Undo::decode(data, sectors).unwrap_err());
        assert!(err(&data, 9).contains("past the partition"));
        assert!(err(&data[..data.len() - 3], 10).contains("ends early"));
        assert!(err(b"something else", 10).contains("not an undo record"));
        let mut out_of_order = sample();
        out_of_order.originals.reverse();
        assert!(err(&out_of_order.encode().unwrap(), 10).contains("not in order"));
        let mut not_listed = sample();
        not_listed.own = vec![3];
        assert!(err(&not_listed.encode().unwrap(), 10).contains("own sectors"));
    }
}
