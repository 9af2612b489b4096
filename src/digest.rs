//! SHA-256 of images, and the cache that remembers them (`~/.cache/piprov`, or
//! `PIPROV_CACHE_DIR`): a raw image's hash per file (device, inode, size and
//! mtime), an archive's decoded image by the archive's hash. Below both flash
//! and stamp, which each need an image's hash.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::hex::hex;
use crate::progress::Progress;

/// Reads of this size keep the disk busy without holding much memory.
const CHUNK: usize = 4 << 20;

pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PIPROV_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("piprov")
}

/// The SHA-256 of a raw image file (cached like a flash source's).
pub fn image_sha256(path: &Path, progress: &Progress) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = file.seek(SeekFrom::End(0))?;
    file.seek(SeekFrom::Start(0))?;
    raw_hash_cached(path, &mut file, len, progress, &AtomicBool::new(false))
}

/// The SHA-256 of a raw image, remembered per file (device, inode, size and
/// mtime), so a bench flashing the same image again does not read it twice.
pub(crate) fn raw_hash_cached(
    path: &Path,
    file: &mut File,
    len: u64,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata()?;
    let key = format!(
        "raw-{}-{}-{}-{}.{}.sha256",
        meta.dev(),
        meta.ino(),
        len,
        meta.mtime(),
        meta.mtime_nsec()
    );
    let cached = cache_dir().join(key);
    if let Ok(text) = std::fs::read_to_string(&cached) {
        return Ok(text.trim().to_string());
    }
    let sha256 = hash_reader(file, len, progress, "hashing", cancel)
        .with_context(|| format!("hashing {}", path.display()))?;
    if std::fs::create_dir_all(cache_dir()).is_ok() {
        let _ = std::fs::write(&cached, format!("{sha256}\n"));
    }
    Ok(sha256)
}

pub(crate) fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The error of a step stopped by Ctrl-C.
#[derive(Debug)]
pub struct Cancelled;

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Cancelled {}

pub(crate) fn check(cancel: &AtomicBool) -> Result<()> {
    if cancel.load(Ordering::Relaxed) {
        bail!(Cancelled);
    }
    Ok(())
}

pub(crate) fn hash_reader(
    r: &mut impl Read,
    len: u64,
    progress: &Progress,
    what: &str,
    cancel: &AtomicBool,
) -> Result<String> {
    let bar = progress.bytes(what, len);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        check(cancel)?;
        let n = read_up_to(r, &mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    Ok(hex(&hasher.finalize()))
}
