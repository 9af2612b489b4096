//! Where the image's bytes come from: a raw image used as it is, or an archive
//! (xz, gzip, zstd, bzip2, zip; recognised by content, not by name) decoded once
//! into a sparse cache file keyed by the archive's SHA-256. Decoding to the end
//! before any card is touched means a truncated or corrupt archive is an error
//! while every card is still as it was.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::digest::{check, hash_reader, raw_hash_cached, raw_hash_remembered, read_up_to};
use crate::hex::hex;
use crate::progress::Progress;

/// Reads and writes of this size keep the decoders and the disk busy without
/// holding much memory.
const CHUNK: usize = 4 << 20;
/// Runs of zeroes this long are left as holes in the cache file.
const HOLE: usize = 64 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Xz,
    Gzip,
    Zstd,
    Bzip2,
    Zip,
}

impl Format {
    pub fn detect(head: &[u8]) -> Format {
        let starts = |magic: &[u8]| head.starts_with(magic);
        if starts(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
            Format::Xz
        } else if starts(&[0x1f, 0x8b]) {
            Format::Gzip
        } else if starts(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Format::Zstd
        } else if starts(b"BZh") {
            Format::Bzip2
        } else if starts(b"PK\x03\x04") {
            Format::Zip
        } else {
            Format::Raw
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw image",
            Format::Xz => "xz",
            Format::Gzip => "gzip",
            Format::Zstd => "zstd",
            Format::Bzip2 => "bzip2",
            Format::Zip => "zip",
        }
    }
}

/// How far an archive is decoded before it is stopped, and why there: a bomb
/// (a few KB that decode to many GB) ends at what the cards could take, not at
/// the end of the cache's disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimit {
    pub bytes: u64,
    pub why: &'static str,
}

impl DecodeLimit {
    /// For images that go to no card (inspect) or to card-image files: larger
    /// than any Raspberry Pi OS image decodes to.
    pub const DEFAULT: DecodeLimit = DecodeLimit {
        bytes: 32 << 30,
        why: "the default --max-size",
    };
}

/// An archive that decodes past its limit.
#[derive(Debug, thiserror::Error)]
#[error("it decodes to more than {} ({bytes} bytes), {why}: stopped there", crate::units::size(*.bytes))]
pub struct TooLarge {
    bytes: u64,
    why: &'static str,
}

/// Told, as decoding goes, how many bytes are final and which ranges of them
/// hold data (the rest are holes).
pub type Decoded<'a> = dyn Fn(u64, &[(u64, u64)]) + 'a;

/// A decoded image ready to be written: a file with random access, and the
/// SHA-256 of its bytes.
#[derive(Debug, Clone)]
pub struct Source {
    pub path: PathBuf,
    pub len: u64,
    pub sha256: String,
    pub format: Format,
}

/// Opens (and if needed decodes) an image; `expected` is the SHA-256 the
/// decoded image must have. `cancel` stops the work at the next piece, and
/// leaves no partial file in the cache.
pub fn open(
    path: &Path,
    expected: Option<&str>,
    limit: DecodeLimit,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<Source> {
    let format = detect_file(path)?;
    let source = if format == Format::Raw {
        let mut file = File::open(path)?;
        let len = file.seek(SeekFrom::End(0))?;
        file.seek(SeekFrom::Start(0))?;
        // A remembered hash is a hint, never proof: an expected one is
        // checked against the bytes.
        let sha256 = if expected.is_some() {
            hash_reader(&mut file, len, progress, "hashing", cancel)
                .with_context(|| format!("hashing {}", path.display()))?
        } else {
            raw_hash_cached(path, &mut file, len, progress, cancel)?
        };
        Source {
            path: path.to_path_buf(),
            len,
            sha256,
            format,
        }
    } else {
        decode_cached(path, format, expected.is_some(), limit, progress, cancel)?
    };
    check_expected(path, source, expected)
}

/// An image for `flash`: ready to be written, or an archive to decode while
/// the cards are written (xz not yet in the cache, whose index gives its
/// decoded length).
pub enum Opened {
    Ready(Source),
    Streamable {
        entry: Entry,
        len: u64,
    },
    /// A raw image never hashed before: hashed while it is written.
    Unhashed(Source),
}

/// `stream`: an xz archive not yet in the cache may be written while it
/// decodes; otherwise it is decoded first.
pub fn open_for_flash(
    path: &Path,
    expected: Option<&str>,
    stream: bool,
    limit: DecodeLimit,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<Opened> {
    // Refused before anything is read from it: hashes and images in a cache
    // someone else can write are not piprov's.
    crate::cache::private_dir()?;
    let format = detect_file(path)?;
    if format == Format::Raw {
        let mut file = File::open(path)?;
        let len = file.seek(SeekFrom::End(0))?;
        let source = Source {
            path: path.to_path_buf(),
            len,
            sha256: String::new(),
            format,
        };
        // A remembered hash is a hint, never proof (a byte changed with its
        // mtime put back keeps the file's key). Without an expected hash it is
        // what the summary reports; with one, the image is hashed as it is
        // written and checked before the tables go down, or, when the hint
        // already disagrees, hashed now so that no card is touched.
        return Ok(match (expected, raw_hash_remembered(&file, len)) {
            (None, Some(sha256)) => Opened::Ready(Source { sha256, ..source }),
            (Some(wanted), Some(hint)) if !wanted.eq_ignore_ascii_case(&hint) => {
                file.seek(SeekFrom::Start(0))?;
                let sha256 = hash_reader(&mut file, len, progress, "hashing", cancel)
                    .with_context(|| format!("hashing {}", path.display()))?;
                Opened::Ready(check_expected(path, Source { sha256, ..source }, expected)?)
            }
            _ => Opened::Unhashed(source),
        });
    }
    if format != Format::Xz {
        return open(path, expected, limit, progress, cancel).map(Opened::Ready);
    }
    let len = super::xz::decoded_len(&mut File::open(path)?)?;
    // Refused before any card is touched: the index says what decoding would
    // reach, and a lying index is caught as the decode passes it.
    if let Some(len) = len.filter(|&len| len > limit.bytes) {
        bail!(
            "{}: its xz index says it decodes to {len} bytes, more than {} ({} bytes), {}",
            path.display(),
            crate::units::size(limit.bytes),
            limit.bytes,
            limit.why
        );
    }
    let source = match (
        cache_entry(path, format, expected.is_some(), limit, progress, cancel)?,
        len,
    ) {
        (Cached::Ready(source), _) => source,
        (Cached::Missing(entry), Some(len)) if stream => {
            return Ok(Opened::Streamable { entry, len });
        }
        (Cached::Missing(entry), _) => entry.decode(progress, cancel, &|_, _| {})?,
    };
    check_expected(path, source, expected).map(Opened::Ready)
}

pub fn detect_file(path: &Path) -> Result<Format> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    crate::image::refuse_directory(&file, path)?;
    let mut head = [0u8; 8];
    let n =
        read_up_to(&mut file, &mut head).with_context(|| format!("reading {}", path.display()))?;
    Ok(Format::detect(&head[..n]))
}

/// The source, if its SHA-256 is the `expected` one.
pub fn check_expected(path: &Path, source: Source, expected: Option<&str>) -> Result<Source> {
    if let Some(expected) = expected {
        if !expected.eq_ignore_ascii_case(&source.sha256) {
            bail!(
                "{}: the image's SHA-256 is {}, not the expected {expected}",
                path.display(),
                source.sha256
            );
        }
    }
    Ok(source)
}

fn decode_cached(
    path: &Path,
    format: Format,
    verify: bool,
    limit: DecodeLimit,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<Source> {
    match cache_entry(path, format, verify, limit, progress, cancel)? {
        Cached::Ready(source) => Ok(source),
        Cached::Missing(entry) => entry.decode(progress, cancel, &|_, _| {}),
    }
}

/// An archive's place in the cache: decoded already, or to be decoded there.
pub enum Cached {
    Ready(Source),
    Missing(Entry),
}

/// Where an archive's decoded image goes: named by the image's own SHA-256
/// once it is known, and linked from the archive's (see `crate::cache`).
pub struct Entry {
    archive: PathBuf,
    format: Format,
    dir: PathBuf,
    link: PathBuf,
    limit: DecodeLimit,
    /// Per process: two runs decoding the same archive must not share a file.
    pub partial: PathBuf,
}

/// `verify`: hash a cached image's bytes again rather than trust its hash file.
pub fn cache_entry(
    path: &Path,
    format: Format,
    verify: bool,
    limit: DecodeLimit,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<Cached> {
    let mut archive = File::open(path)?;
    let archive_len = archive.metadata()?.len();
    let key = hash_reader(
        &mut archive,
        archive_len,
        progress,
        "hashing archive",
        cancel,
    )?;
    let dir = crate::cache::private_dir()?;
    let link = crate::cache::link_path(&dir, &key);
    if let Some((found, image, len)) = crate::cache::Link::follow(&link) {
        let remembered = Source {
            path: image.clone(),
            len,
            sha256: found.image_sha256,
            format,
        };
        crate::cache::Link::touch(&link);
        if !verify {
            return Ok(Cached::Ready(remembered));
        }
        // A remembered hash is a hint: with an expected hash the entry's
        // bytes are hashed again, and one that is not what its hash file
        // says is thrown away and decoded anew.
        let mut file = File::open(&image)
            .with_context(|| format!("opening the cached image {}", image.display()))?;
        let actual = hash_reader(
            &mut file,
            len,
            progress,
            "checking the cached image",
            cancel,
        )?;
        if actual == remembered.sha256 {
            return Ok(Cached::Ready(remembered));
        }
        progress.say(&format!(
            "the cached image {} is not what its hash file says: decoding the archive again",
            image.display()
        ));
        let _ = std::fs::remove_file(&link);
        let _ = std::fs::remove_file(&image);
    }
    Ok(Cached::Missing(Entry {
        archive: path.to_path_buf(),
        format,
        partial: crate::cache::partial_path(&dir, &key),
        dir,
        link,
        limit,
    }))
}

impl Entry {
    /// Creates the partial file the image is decoded into.
    pub fn create(&self) -> Result<File> {
        File::create(&self.partial).with_context(|| format!("creating {}", self.partial.display()))
    }

    /// Decodes the archive into the cache; `decoded` is told how many bytes of
    /// the partial file are final after each piece. The entry is kept only
    /// whole: on any error no partial file is left.
    pub fn decode(
        self,
        progress: &Progress,
        cancel: &AtomicBool,
        decoded: &Decoded<'_>,
    ) -> Result<Source> {
        let out = self.create()?;
        let source = self
            .decode_into(&out, &self.bar(progress)?, cancel, decoded, None)
            .with_context(|| {
                format!(
                    "decoding {} ({})",
                    self.archive.display(),
                    self.format.name()
                )
            })?;
        self.commit(&out, &source)?;
        Ok(source)
    }

    /// As `decode`, into `out` (the partial file), which then takes the
    /// image's place in the cache; the entry counts only once `commit` has
    /// made it durable. With `expected_len`, an image of another length is an
    /// error, and decoding stops as soon as it is passed.
    pub fn decode_into(
        &self,
        out: &File,
        bar: &indicatif::ProgressBar,
        cancel: &AtomicBool,
        decoded: &Decoded<'_>,
        expected_len: Option<u64>,
    ) -> Result<Source> {
        let limit = match expected_len {
            Some(len) if len < self.limit.bytes => DecodeLimit {
                bytes: len,
                why: "the length its index gives",
            },
            _ => self.limit,
        };
        let result = self.decode_to(out, bar, cancel, decoded, limit);
        let result = result.and_then(|(len, sha256)| match expected_len {
            Some(expected) if expected != len => {
                bail!("it decodes to {len} bytes, but its index says {expected}")
            }
            _ => Ok((len, sha256)),
        });
        let (len, sha256) = match result {
            Ok(done) => done,
            Err(e) => {
                let _ = std::fs::remove_file(&self.partial);
                if crate::cancel::is_interrupted(&e)
                    || e.downcast_ref::<NotADiskImage>().is_some()
                    || e.downcast_ref::<TooLarge>().is_some()
                {
                    return Err(e);
                }
                let full = e
                    .chain()
                    .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
                    .any(|io| io.kind() == std::io::ErrorKind::StorageFull);
                if full {
                    return Err(e).with_context(|| {
                        format!(
                            "the cache's filesystem is full ({}): free room there \
                             (`piprov cache clear`) or set PIPROV_CACHE_DIR",
                            self.dir.display()
                        )
                    });
                }
                return Err(e).context("the archive is truncated or corrupt");
            }
        };
        // Named by its content: the same image from another archive is the
        // same file, replaced by this whole one.
        let image = crate::cache::image_path(&self.dir, &sha256);
        if let Err(e) = std::fs::rename(&self.partial, &image) {
            let _ = std::fs::remove_file(&self.partial);
            return Err(e).with_context(|| format!("keeping {}", image.display()));
        }
        Ok(Source {
            path: image,
            len,
            sha256,
            format: self.format,
        })
    }

    /// Makes the decoded image durable, then links the archive to it: an
    /// archive without its link is decoded again, so a crash at any point
    /// leaves no entry that is believed and wrong. On an error the image goes.
    pub fn commit(&self, out: &File, source: &Source) -> Result<()> {
        let link = crate::cache::Link {
            image_sha256: source.sha256.clone(),
            archive: std::path::absolute(&self.archive)
                .unwrap_or_else(|_| self.archive.clone())
                .display()
                .to_string(),
            format: self.format.name().into(),
        };
        let kept = out
            .sync_all()
            .map_err(anyhow::Error::from)
            .and_then(|()| link.write(&self.link));
        if let Err(e) = kept {
            let _ = std::fs::remove_file(&source.path);
            return Err(e)
                .with_context(|| format!("keeping the decoded image in {}", self.dir.display()));
        }
        Ok(())
    }

    /// A bar for the decoding, counting the archive's bytes.
    pub fn bar(&self, progress: &Progress) -> Result<indicatif::ProgressBar> {
        Ok(progress.bytes("decoding", std::fs::metadata(&self.archive)?.len()))
    }

    fn decode_to(
        &self,
        out: &File,
        bar: &indicatif::ProgressBar,
        cancel: &AtomicBool,
        decoded: &Decoded<'_>,
        limit: DecodeLimit,
    ) -> Result<(u64, String)> {
        let archive = File::open(&self.archive)?;
        let counted = BufReader::with_capacity(
            CHUNK,
            Counted {
                inner: archive,
                bar: bar.clone(),
            },
        );
        let result = match self.format {
            Format::Xz => super::xz::Decoder::new(counted, super::xz::threads())
                .map_err(anyhow::Error::from)
                .and_then(|mut decoder| copy_sparse(&mut decoder, out, cancel, decoded, limit)),
            Format::Gzip => copy_sparse(
                &mut flate2::read::MultiGzDecoder::new(counted),
                out,
                cancel,
                decoded,
                limit,
            ),
            Format::Zstd => zstd::stream::read::Decoder::new(counted)
                .map_err(anyhow::Error::from)
                .and_then(|mut decoder| copy_sparse(&mut decoder, out, cancel, decoded, limit)),
            Format::Bzip2 => copy_sparse(
                &mut bzip2::read::MultiBzDecoder::new(counted),
                out,
                cancel,
                decoded,
                limit,
            ),
            Format::Zip => decode_zip(&self.archive, out, cancel, decoded, limit),
            Format::Raw => unreachable!("raw images are not decoded"),
        };
        bar.finish_and_clear();
        result
    }
}

/// The single disk image inside a zip (Raspberry Pi OS zips hold one `.img`).
fn decode_zip(
    path: &Path,
    out: &File,
    cancel: &AtomicBool,
    decoded: &Decoded<'_>,
    limit: DecodeLimit,
) -> Result<(u64, String)> {
    let mut zip = zip::ZipArchive::new(File::open(path)?).context("reading the zip directory")?;
    let names: Vec<String> = zip
        .file_names()
        .filter(|n| !n.ends_with('/') && !n.starts_with("__MACOSX"))
        .map(str::to_string)
        .collect();
    let name = match names.as_slice() {
        [one] => one.clone(),
        _ => match names
            .iter()
            .filter(|n| n.ends_with(".img"))
            .collect::<Vec<_>>()
            .as_slice()
        {
            [one] => (*one).clone(),
            _ => bail!(
                "the zip holds {} files ({}); expected one .img",
                names.len(),
                names.join(", ")
            ),
        },
    };
    let mut entry = zip.by_name(&name)?;
    copy_sparse(&mut entry, out, cancel, decoded, limit)
}

/// Copies a stream into a file, leaving holes for long runs of zeroes, and
/// returns its length and SHA-256. `copied` hears, after each piece, the length
/// so far (readers of the file may read that far) and the ranges of it that
/// were written rather than left as holes.
/// What an archive decoded to when its head is not a disk image's.
#[derive(Debug, thiserror::Error)]
#[error("it does not hold a disk image (no partition table in its first sector)")]
pub struct NotADiskImage;

/// A disk image starts with an MBR, or GPT's protective one: the 0x55AA
/// signature ends its first sector.
fn is_disk_head(head: &[u8]) -> bool {
    head.len() >= 512 && head[510] == 0x55 && head[511] == 0xAA
}

fn copy_sparse(
    r: &mut impl Read,
    out: &File,
    cancel: &AtomicBool,
    copied: &Decoded<'_>,
    limit: DecodeLimit,
) -> Result<(u64, String)> {
    let mut out = out;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut len = 0u64;
    loop {
        check(cancel)?;
        let n = read_up_to(r, &mut buf)?;
        if n == 0 {
            break;
        }
        if len == 0 && !is_disk_head(&buf[..n]) {
            // Checked on the first chunk, so a bomb of anything else ends
            // after 4 MiB instead of filling the cache.
            return Err(NotADiskImage.into());
        }
        if len + n as u64 > limit.bytes {
            return Err(TooLarge {
                bytes: limit.bytes,
                why: limit.why,
            }
            .into());
        }
        hasher.update(&buf[..n]);
        let mut ends_in_hole = false;
        let mut data: Vec<(u64, u64)> = Vec::new();
        let mut at = len;
        for piece in buf[..n].chunks(HOLE) {
            ends_in_hole = super::zeroes::is_zero(piece);
            if ends_in_hole {
                out.seek(SeekFrom::Current(piece.len() as i64))?;
            } else {
                out.write_all(piece)?;
                let end = at + piece.len() as u64;
                match data.last_mut() {
                    Some(last) if last.1 == at => last.1 = end,
                    _ => data.push((at, end)),
                }
            }
            at += piece.len() as u64;
        }
        len += n as u64;
        if ends_in_hole {
            // So that a reader finds the hole, not the end of the file.
            out.set_len(len)?;
        }
        copied(len, &data);
    }
    out.set_len(len)?;
    Ok((len, hex(&hasher.finalize())))
}

struct Counted<R> {
    inner: R,
    bar: indicatif::ProgressBar,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_told_apart_by_content() {
        assert_eq!(Format::detect(b"\xfd7zXZ\x00\x00"), Format::Xz);
        assert_eq!(Format::detect(b"\x1f\x8b\x08"), Format::Gzip);
        assert_eq!(Format::detect(b"\x28\xb5\x2f\xfd"), Format::Zstd);
        assert_eq!(Format::detect(b"BZh9"), Format::Bzip2);
        assert_eq!(Format::detect(b"PK\x03\x04"), Format::Zip);
        assert_eq!(Format::detect(b"\xeb\x3c\x90"), Format::Raw);
    }

    #[test]
    fn sparse_copy_keeps_length_and_hash() {
        let mut data = vec![0u8; 300_000];
        data[5] = 1;
        data[510..512].copy_from_slice(&[0x55, 0xAA]);
        data[299_999] = 2;
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("out");
        let out = File::create(&path).unwrap();
        let (len, sha) = copy_sparse(
            &mut &data[..],
            &out,
            &AtomicBool::new(false),
            &|_, _| {},
            DecodeLimit::DEFAULT,
        )
        .unwrap();
        assert_eq!(len, 300_000);
        assert_eq!(std::fs::read(&path).unwrap(), data);
        assert_eq!(sha, hex(&Sha256::digest(&data)));
    }

    #[test]
    fn a_decode_without_a_partition_table_stops_at_its_head() {
        let data = vec![0u8; 300_000];
        let dir = tempfile::TempDir::new().unwrap();
        let out = File::create(dir.path().join("out")).unwrap();
        let e = copy_sparse(
            &mut &data[..],
            &out,
            &AtomicBool::new(false),
            &|_, _| {},
            DecodeLimit::DEFAULT,
        )
        .unwrap_err();
        assert!(e.downcast_ref::<NotADiskImage>().is_some(), "{e:#}");
    }
}
