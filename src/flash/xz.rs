//! xz archives: a decoder that runs on every core, and the decoded length read
//! from the archive's index before anything is decoded.
//!
//! liblzma decodes blocks in parallel only when its threading memory limit lets
//! it: the `liblzma` crate's `new_parallel` leaves that limit at 0, which
//! liblzma reads as "single-threaded", so every archive was decoded on one core.
//! The limit here is xz's own default for `-T0`: a quarter of the machine's RAM.

use std::fs::File;
use std::io::{self, BufRead, Read, Seek, SeekFrom};

use liblzma::stream::MtStreamBuilder;

/// Stream header and footer: 12 bytes each.
const FRAME: u64 = 12;

/// Decodes every concatenated xz stream of `input` (as `xz -d` does), each on
/// `threads` threads. A stream that ends early is an error, not an end.
pub struct Decoder<R: BufRead> {
    current: Option<liblzma::bufread::XzDecoder<R>>,
    threads: u32,
}

impl<R: BufRead> Decoder<R> {
    pub fn new(input: R, threads: u32) -> io::Result<Self> {
        Ok(Self {
            current: Some(stream_decoder(input, threads)?),
            threads,
        })
    }
}

fn stream_decoder<R: BufRead>(
    input: R,
    threads: u32,
) -> io::Result<liblzma::bufread::XzDecoder<R>> {
    // SAFETY: lzma_physmem only reads the system's memory size.
    let ram = unsafe { liblzma_sys::lzma_physmem() };
    let stream = MtStreamBuilder::new()
        .threads(threads.max(1))
        .memlimit_threading((ram / 4).max(1 << 30))
        .memlimit_stop(u64::MAX)
        .decoder()
        .map_err(io::Error::other)?;
    Ok(liblzma::bufread::XzDecoder::new_stream(input, stream))
}

/// The machine's cores, as threads for the decoder.
pub fn threads() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

impl<R: BufRead> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let Some(decoder) = self.current.as_mut() else {
                return Ok(0);
            };
            let n = decoder.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            // One stream ended. Stream padding (zeroes) may follow, then another.
            let mut input = self.current.take().expect("checked above").into_inner();
            loop {
                let data = input.fill_buf()?;
                if data.is_empty() {
                    return Ok(0);
                }
                let zeroes = data.iter().take_while(|&&b| b == 0).count();
                let more = zeroes < data.len();
                input.consume(zeroes);
                if more {
                    break;
                }
            }
            self.current = Some(stream_decoder(input, self.threads)?);
        }
    }
}

/// The decoded length of an xz file, from the indexes at the end of its
/// streams; None if the file does not end in a well-formed index (it is
/// truncated, or not xz). The decoder checks the same indexes as it goes, and
/// the length decoded is compared with this one.
pub fn decoded_len(file: &mut File) -> io::Result<Option<u64>> {
    let mut end = file.seek(SeekFrom::End(0))?;
    let mut total = 0u64;
    while end > 0 {
        // Stream padding: zeroes in multiples of four.
        let mut word = [0u8; 4];
        loop {
            if end < 4 {
                return Ok(None);
            }
            read_at(file, end - 4, &mut word)?;
            if word != [0; 4] {
                break;
            }
            end -= 4;
        }
        if end < 2 * FRAME {
            return Ok(None);
        }
        let mut footer = [0u8; FRAME as usize];
        read_at(file, end - FRAME, &mut footer)?;
        let Some(index_len) = footer_index_len(&footer) else {
            return Ok(None);
        };
        if index_len + 2 * FRAME > end {
            return Ok(None);
        }
        let mut index = vec![0u8; index_len as usize];
        read_at(file, end - FRAME - index_len, &mut index)?;
        let Some((blocks_len, decoded)) = parse_index(&index) else {
            return Ok(None);
        };
        let stream_len = FRAME + blocks_len + index_len + FRAME;
        if stream_len > end {
            return Ok(None);
        }
        end -= stream_len;
        total = match total.checked_add(decoded) {
            Some(total) => total,
            None => return Ok(None),
        };
    }
    Ok(Some(total))
}

fn read_at(file: &File, at: u64, buf: &mut [u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, at)
}

/// The index size a stream footer gives, if the footer is sound: CRC32 of the
/// backward size and flags, then "YZ".
fn footer_index_len(footer: &[u8; FRAME as usize]) -> Option<u64> {
    if &footer[10..12] != b"YZ" {
        return None;
    }
    let crc = u32::from_le_bytes(footer[0..4].try_into().ok()?);
    if crc32fast::hash(&footer[4..10]) != crc {
        return None;
    }
    let backward = u32::from_le_bytes(footer[4..8].try_into().ok()?);
    Some((u64::from(backward) + 1) * 4)
}

/// An index: 0x00, the record count, (unpadded size, uncompressed size) per
/// block, zero padding to four bytes, CRC32. Gives the blocks' length in the
/// file (each padded to four bytes) and their decoded length.
fn parse_index(index: &[u8]) -> Option<(u64, u64)> {
    let (body, crc) = index.split_at_checked(index.len().checked_sub(4)?)?;
    if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().ok()?) || body.first() != Some(&0)
    {
        return None;
    }
    let mut at = 1;
    let mut next = || {
        let (value, used) = varint(body.get(at..)?)?;
        at += used;
        Some(value)
    };
    let count = next()?;
    let (mut blocks, mut decoded) = (0u64, 0u64);
    for _ in 0..count {
        let unpadded = next()?;
        blocks = blocks.checked_add(unpadded.checked_next_multiple_of(4)?)?;
        decoded = decoded.checked_add(next()?)?;
    }
    let padding = body.get(at..)?;
    (padding.len() < 4 && padding.iter().all(|&b| b == 0)).then_some((blocks, decoded))
}

/// xz's variable-length integer: seven bits a byte, low first, at most nine.
fn varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(9) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xz(args: &[&str], data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let mut child = Command::new("xz")
            .args(args)
            .args(["-c", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("xz runs");
        let mut stdin = child.stdin.take().unwrap();
        let input = data.to_vec();
        let writer = std::thread::spawn(move || stdin.write_all(&input).unwrap());
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        assert!(out.status.success());
        out.stdout
    }

    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| ((i / 4096) * 7 + i % 13) as u8).collect()
    }

    #[test]
    fn the_index_gives_the_decoded_length_of_every_stream() {
        let dir = tempfile::TempDir::new().unwrap();
        let (a, b) = (sample(3 << 20), sample(1 << 20));
        let mut two = xz(&["-1", "--block-size=1MiB", "-T2"], &a);
        two.extend_from_slice(&[0; 8]); // stream padding between streams
        two.extend_from_slice(&xz(&["-1"], &b));
        let path = dir.path().join("two.xz");
        std::fs::write(&path, &two).unwrap();
        assert_eq!(
            decoded_len(&mut File::open(&path).unwrap()).unwrap(),
            Some((4 << 20) as u64)
        );
        let mut decoded = Vec::new();
        Decoder::new(io::BufReader::new(&two[..]), 2)
            .unwrap()
            .read_to_end(&mut decoded)
            .unwrap();
        assert!(decoded[..a.len()] == a[..] && decoded[a.len()..] == b[..]);
        // Truncated: no index at the end, so no length.
        std::fs::write(&path, &two[..two.len() / 2]).unwrap();
        assert_eq!(decoded_len(&mut File::open(&path).unwrap()).unwrap(), None);
        let mut half = Vec::new();
        let error = Decoder::new(io::BufReader::new(&two[..two.len() / 2]), 2)
            .unwrap()
            .read_to_end(&mut half)
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof, "{error}");
    }

    /// CPU time of the calling thread while `decode` runs.
    fn own_cpu(decode: impl FnOnce()) -> std::time::Duration {
        use nix::sys::resource::{UsageWho, getrusage};
        let cpu = || {
            let usage = getrusage(UsageWho::RUSAGE_THREAD).unwrap();
            let t = |tv: nix::sys::time::TimeVal| {
                std::time::Duration::new(tv.tv_sec() as u64, tv.tv_usec() as u32 * 1000)
            };
            t(usage.user_time()) + t(usage.system_time())
        };
        let before = cpu();
        decode();
        cpu() - before
    }

    /// The blocks are decoded by liblzma's worker threads, not by the caller: the
    /// caller's CPU time is a fraction of what a single-threaded decode costs it.
    #[test]
    fn blocks_are_decoded_on_worker_threads() {
        let mut data = Vec::with_capacity(48 << 20);
        let mut x = 1u64;
        while data.len() < 48 << 20 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Words from a small alphabet: compressible, but work to decode.
            data.extend_from_slice(&x.to_le_bytes()[..(x >> 61) as usize + 1]);
            data.push(b' ');
        }
        let archive = xz(&["-1", "--block-size=4MiB", "-T2"], &data);
        let sink = |mut r: Box<dyn Read>| {
            let n = io::copy(&mut r, &mut io::sink()).unwrap();
            assert_eq!(n, data.len() as u64);
        };
        let single = own_cpu(|| sink(Box::new(liblzma::read::XzDecoder::new(&archive[..]))));
        let parallel = own_cpu(|| {
            sink(Box::new(
                Decoder::new(io::BufReader::new(&archive[..]), 2).unwrap(),
            ))
        });
        assert!(
            parallel * 3 < single,
            "the caller spent {parallel:?} decoding with 2 threads, {single:?} alone"
        );
    }

    #[test]
    fn varints_read_as_xz_writes_them() {
        assert_eq!(varint(&[0x05]), Some((5, 1)));
        assert_eq!(varint(&[0x80 | 0x10, 0x01]), Some((0x90, 2)));
        assert_eq!(varint(&[0x80; 10]), None);
    }
}
