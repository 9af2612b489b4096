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

use crate::digest::{Cancelled, cache_dir, check, hash_reader, raw_hash_cached, read_up_to};
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
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<Source> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut head = [0u8; 8];
    let n = read_up_to(&mut file, &mut head)?;
    let format = Format::detect(&head[..n]);
    let source = if format == Format::Raw {
        let len = file.seek(SeekFrom::End(0))?;
        file.seek(SeekFrom::Start(0))?;
        let sha256 = raw_hash_cached(path, &mut file, len, progress, cancel)?;
        Source {
            path: path.to_path_buf(),
            len,
            sha256,
            format,
        }
    } else {
        decode_cached(path, format, progress, cancel)
            .with_context(|| format!("decoding {} ({})", path.display(), format.name()))?
    };
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
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<Source> {
    let mut archive = File::open(path)?;
    let archive_len = archive.metadata()?.len();
    let key = hash_reader(
        &mut archive,
        archive_len,
        progress,
        "hashing archive",
        cancel,
    )?;
    let dir = cache_dir();
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating the cache {}", dir.display()))?;
    let image = dir.join(format!("{key}.img"));
    let hash_file = dir.join(format!("{key}.img.sha256"));
    if let (Ok(meta), Ok(sha256)) = (
        std::fs::metadata(&image),
        std::fs::read_to_string(&hash_file),
    ) {
        return Ok(Source {
            path: image,
            len: meta.len(),
            sha256: sha256.trim().into(),
            format,
        });
    }
    archive.seek(SeekFrom::Start(0))?;
    let bar = progress.bytes("decoding", archive_len);
    let counted = BufReader::with_capacity(
        CHUNK,
        Counted {
            inner: archive,
            bar: bar.clone(),
        },
    );
    // Per process: two runs decoding the same archive must not share a file.
    let partial = dir.join(format!("{key}.img.partial.{}", std::process::id()));
    let mut out =
        File::create(&partial).with_context(|| format!("creating {}", partial.display()))?;
    let result = match format {
        Format::Xz => super::xz::Decoder::new(counted, super::xz::threads())
            .map_err(anyhow::Error::from)
            .and_then(|mut decoder| copy_sparse(&mut decoder, &mut out, cancel)),
        Format::Gzip => copy_sparse(
            &mut flate2::read::MultiGzDecoder::new(counted),
            &mut out,
            cancel,
        ),
        Format::Zstd => zstd::stream::read::Decoder::new(counted)
            .map_err(anyhow::Error::from)
            .and_then(|mut decoder| copy_sparse(&mut decoder, &mut out, cancel)),
        Format::Bzip2 => copy_sparse(
            &mut bzip2::read::MultiBzDecoder::new(counted),
            &mut out,
            cancel,
        ),
        Format::Zip => decode_zip(path, &mut out, cancel),
        Format::Raw => unreachable!("raw images are not decoded"),
    };
    bar.finish_and_clear();
    let (len, sha256) = match result {
        Ok(done) => done,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            if e.downcast_ref::<Cancelled>().is_some() {
                return Err(e);
            }
            return Err(e).context("the archive is truncated or corrupt");
        }
    };
    let kept = out
        .sync_all()
        .and_then(|()| std::fs::write(&hash_file, format!("{sha256}\n")))
        .and_then(|()| std::fs::rename(&partial, &image));
    if let Err(e) = kept {
        let _ = std::fs::remove_file(&partial);
        return Err(e).with_context(|| format!("keeping the decoded image in {}", dir.display()));
    }
    Ok(Source {
        path: image,
        len,
        sha256,
        format,
    })
}

/// The single disk image inside a zip (Raspberry Pi OS zips hold one `.img`).
fn decode_zip(path: &Path, out: &mut File, cancel: &AtomicBool) -> Result<(u64, String)> {
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
    copy_sparse(&mut entry, out, cancel)
}

/// Copies a stream into a file, leaving holes for long runs of zeroes, and
/// returns its length and SHA-256.
fn copy_sparse(r: &mut impl Read, out: &mut File, cancel: &AtomicBool) -> Result<(u64, String)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut len = 0u64;
    loop {
        check(cancel)?;
        let n = read_up_to(r, &mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        for piece in buf[..n].chunks(HOLE) {
            if piece.iter().all(|&b| b == 0) {
                out.seek(SeekFrom::Current(piece.len() as i64))?;
            } else {
                out.write_all(piece)?;
            }
        }
        len += n as u64;
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
        data[299_999] = 2;
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("out");
        let mut out = File::create(&path).unwrap();
        let (len, sha) = copy_sparse(&mut &data[..], &mut out, &AtomicBool::new(false)).unwrap();
        assert_eq!(len, 300_000);
        assert_eq!(std::fs::read(&path).unwrap(), data);
        assert_eq!(sha, hex(&Sha256::digest(&data)));
    }
}
