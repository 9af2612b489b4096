//! SHA-256 of images, and a raw image's hash remembered in the cache per file
//! (device, inode, size and mtime). Below both flash and stamp, which each
//! need an image's hash.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Mutex, OnceLock};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::hex::hex;
use crate::progress::Progress;

/// Reads of this size keep the disk busy without holding much memory.
const CHUNK: usize = 4 << 20;

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
    let remembered = remembered_path(file, len)?;
    if let Some(sha256) = remembered_hash(&remembered) {
        return Ok(sha256);
    }
    let sha256 = hash_reader(file, len, progress, "hashing", cancel)
        .with_context(|| format!("hashing {}", path.display()))?;
    remember(&remembered, &sha256);
    Ok(sha256)
}

/// Where a raw image's hash is remembered: keyed by the file's identity.
fn remembered_path(file: &File, len: u64) -> Result<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata()?;
    Ok(crate::cache::dir().join(format!(
        "raw-{}-{}-{}-{}.{}.sha256",
        meta.dev(),
        meta.ino(),
        len,
        meta.mtime(),
        meta.mtime_nsec()
    )))
}

fn remembered_hash(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|text| text.trim().to_string())
}

fn remember(path: &Path, sha256: &str) {
    if crate::cache::private_dir().is_ok() {
        let _ = std::fs::write(path, format!("{sha256}\n"));
    }
}

/// The remembered SHA-256 of a raw image, if it was hashed before.
pub(crate) fn raw_hash_remembered(file: &File, len: u64) -> Option<String> {
    remembered_hash(&remembered_path(file, len).ok()?)
}

/// An image's SHA-256: known, or being worked out on its own thread while the
/// image is written (a raw image hashed for the first time), then remembered.
pub enum ImageHash {
    Known(String),
    Pending {
        worker: Mutex<Option<std::thread::JoinHandle<Result<String>>>>,
        done: OnceLock<std::result::Result<String, String>>,
    },
}

impl ImageHash {
    /// Starts hashing the raw image at `path` (`len` bytes).
    pub fn start(path: &Path, len: u64, cancel: &'static AtomicBool) -> Result<ImageHash> {
        let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let remembered = remembered_path(&file, len)?;
        let shown = path.display().to_string();
        let worker = std::thread::spawn(move || {
            let quiet = Progress::new(crate::progress::Mode::Quiet);
            let sha256 = hash_reader(&mut file, len, &quiet, "hashing", cancel)
                .with_context(|| format!("hashing {shown}"))?;
            remember(&remembered, &sha256);
            Ok(sha256)
        });
        Ok(ImageHash::Pending {
            worker: Mutex::new(Some(worker)),
            done: OnceLock::new(),
        })
    }

    /// The hash, once it is known.
    pub fn wait(&self) -> Result<String> {
        match self {
            ImageHash::Known(sha256) => Ok(sha256.clone()),
            ImageHash::Pending { worker, done } => {
                let done = done.get_or_init(|| {
                    let worker = worker.lock().unwrap_or_else(|e| e.into_inner()).take();
                    match worker.map(|w| w.join()) {
                        Some(Ok(Ok(sha256))) => Ok(sha256),
                        Some(Ok(Err(e))) => Err(format!("{e:#}")),
                        Some(Err(_)) => Err("hashing the image panicked".into()),
                        None => Err("the image's hash was waited for twice at once".into()),
                    }
                });
                done.clone().map_err(|e| anyhow::anyhow!(e))
            }
        }
    }
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

pub(crate) use crate::cancel::check;

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
