//! The cache (`~/.cache/piprov`, or `PIPROV_CACHE_DIR`): decoded images, one
//! per content, and what points at them.
//!
//! - `image-<SHA-256 of the image>.img`: a decoded image, named by what it
//!   holds, so the same image as `.xz`, `.gz`, `.zst` and `.zip` is one file.
//! - `archive-<SHA-256 of the archive>.json`: which image an archive decodes
//!   to. Written only once the image is durable, so it is the entry's commit.
//! - `raw-….sha256`: the hash of a raw image file, keyed by the file's
//!   identity (`digest`).
//! - `partial-….img`: an image being decoded by a running piprov.
//!
//! `piprov cache list` and `piprov cache clear` read and tidy it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// The cache's directory, whether or not it exists yet.
pub fn dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PIPROV_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("piprov")
}

/// The cache, made if missing, and refused unless it is private: piprov keeps
/// decoded images and remembered hashes there, so a cache others can write to
/// (a shared `PIPROV_CACHE_DIR`) could hand flash another image.
pub fn private_dir() -> Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let dir = dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating the cache {}", dir.display()))?;
    let meta = std::fs::metadata(&dir)
        .with_context(|| format!("looking at the cache {}", dir.display()))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { nix::libc::geteuid() };
    if meta.uid() != me {
        bail!(
            "the cache {} belongs to user {}, not to you: piprov trusts only a cache of its own \
             (set PIPROV_CACHE_DIR to a directory of yours)",
            dir.display(),
            meta.uid()
        );
    }
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making the cache {} private", dir.display()))?;
    }
    Ok(dir)
}

pub fn image_path(dir: &Path, image_sha256: &str) -> PathBuf {
    dir.join(format!("image-{image_sha256}.img"))
}

pub fn link_path(dir: &Path, archive_sha256: &str) -> PathBuf {
    dir.join(format!("archive-{archive_sha256}.json"))
}

pub fn partial_path(dir: &Path, archive_sha256: &str) -> PathBuf {
    dir.join(format!(
        "partial-{archive_sha256}.{}.img",
        std::process::id()
    ))
}

/// `archive-….json`: an archive and the image it decodes to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Link {
    pub image_sha256: String,
    /// Where the archive was when it was decoded (for people; the key is its hash).
    pub archive: String,
    pub format: String,
}

impl Link {
    /// Writes the link under a temporary name and renames it into place.
    pub fn write(&self, path: &Path) -> Result<()> {
        let temp = path.with_extension(format!("json.{}", std::process::id()));
        std::fs::write(&temp, serde_json::to_vec_pretty(self)?)
            .and_then(|()| std::fs::rename(&temp, path))
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&temp);
            })
            .with_context(|| format!("writing {}", path.display()))
    }

    /// The link at `path` and the image it names, if both are there and the
    /// link is well formed; a link is a hint checked like a remembered hash.
    pub fn follow(path: &Path) -> Option<(Link, PathBuf, u64)> {
        let text = std::fs::read(path).ok()?;
        let link: Link = serde_json::from_slice(&text).ok()?;
        if link.image_sha256.len() != 64
            || !link.image_sha256.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return None;
        }
        let image = image_path(path.parent()?, &link.image_sha256);
        let len = std::fs::metadata(&image).ok()?.len();
        Some((link, image, len))
    }

    /// Marks the link used now, for `cache clear --older-than`.
    pub fn touch(path: &Path) {
        if let Ok(file) = std::fs::File::options().write(true).open(path) {
            let _ = file.set_modified(SystemTime::now());
        }
    }
}

/// One decoded image in the cache and the archives that decode to it.
#[derive(Debug, Serialize)]
pub struct CachedImage {
    pub sha256: String,
    pub path: PathBuf,
    /// Bytes the image takes on disk (it is sparse).
    pub disk_bytes: u64,
    pub len: u64,
    /// When an archive was last decoded to it or flashed from it.
    pub last_used: String,
    #[serde(skip)]
    last_used_at: SystemTime,
    pub archives: Vec<CachedArchive>,
}

#[derive(Debug, Serialize)]
pub struct CachedArchive {
    pub sha256: String,
    pub archive: String,
    pub format: String,
}

/// What the cache holds.
#[derive(Debug, Serialize)]
pub struct Listing {
    pub dir: PathBuf,
    pub images: Vec<CachedImage>,
    /// Remembered hashes of raw image files.
    pub remembered_hashes: usize,
    /// Anything else: partial decodes of piprov runs that ended, files of
    /// older piprov versions, links to images that are gone.
    pub other_files: Vec<PathBuf>,
    pub disk_bytes: u64,
}

fn disk_bytes(meta: &std::fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    meta.blocks() * 512
}

fn name_between<'a>(name: &'a str, prefix: &str, suffix: &str) -> Option<&'a str> {
    name.strip_prefix(prefix)?.strip_suffix(suffix)
}

/// Whether a partial decode belongs to a piprov that is still running.
fn partial_in_use(name: &str) -> bool {
    name_between(name, "partial-", ".img")
        .and_then(|rest| rest.rsplit_once('.'))
        .and_then(|(_, pid)| pid.parse::<u32>().ok())
        .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
}

pub fn list() -> Result<Listing> {
    let dir = dir();
    let mut listing = Listing {
        dir: dir.clone(),
        images: Vec::new(),
        remembered_hashes: 0,
        other_files: Vec::new(),
        disk_bytes: 0,
    };
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(listing),
        Err(e) => return Err(e).with_context(|| format!("reading the cache {}", dir.display())),
    };
    let mut images: BTreeMap<String, CachedImage> = BTreeMap::new();
    let mut links = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("reading the cache {}", dir.display()))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(meta) = entry.metadata() else { continue };
        listing.disk_bytes += disk_bytes(&meta);
        let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        if let Some(sha256) = name_between(&name, "image-", ".img") {
            images.insert(
                sha256.to_string(),
                CachedImage {
                    sha256: sha256.to_string(),
                    path,
                    disk_bytes: disk_bytes(&meta),
                    len: meta.len(),
                    last_used: String::new(),
                    last_used_at: used,
                    archives: Vec::new(),
                },
            );
        } else if let Some(archive) = name_between(&name, "archive-", ".json") {
            links.push((archive.to_string(), path, used));
        } else if name.starts_with("raw-") && name.ends_with(".sha256") {
            listing.remembered_hashes += 1;
        } else if !partial_in_use(&name) {
            listing.other_files.push(path);
        }
    }
    for (archive_sha256, path, used) in links {
        match Link::follow(&path)
            .and_then(|(link, _, _)| images.get_mut(&link.image_sha256).map(|i| (link, i)))
        {
            Some((link, image)) => {
                image.last_used_at = image.last_used_at.max(used);
                image.archives.push(CachedArchive {
                    sha256: archive_sha256,
                    archive: link.archive,
                    format: link.format,
                });
            }
            None => listing.other_files.push(path),
        }
    }
    for image in images.values_mut() {
        image.last_used = humantime::format_rfc3339_seconds(image.last_used_at).to_string();
    }
    listing.images = images.into_values().collect();
    listing
        .images
        .sort_by_key(|i| std::cmp::Reverse(i.last_used_at));
    listing.other_files.sort();
    Ok(listing)
}

/// What `clear` removed.
#[derive(Debug, Serialize)]
pub struct Cleared {
    pub images: usize,
    pub files: usize,
    pub bytes: u64,
}

/// Removes the images not used for `older_than` (with their links), or, without
/// it, everything but the partial decodes of running piprovs.
pub fn clear(older_than: Option<Duration>) -> Result<Cleared> {
    let listing = list()?;
    let mut cleared = Cleared {
        images: 0,
        files: 0,
        bytes: 0,
    };
    let now = SystemTime::now();
    let remove = |path: &Path, cleared: &mut Cleared| -> Result<()> {
        let bytes = std::fs::metadata(path).map(|m| disk_bytes(&m)).unwrap_or(0);
        match std::fs::remove_file(path) {
            Ok(()) => {
                cleared.files += 1;
                cleared.bytes += bytes;
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
        }
    };
    for image in &listing.images {
        let idle = now
            .duration_since(image.last_used_at)
            .unwrap_or(Duration::ZERO);
        if older_than.is_some_and(|age| idle < age) {
            continue;
        }
        // Links first: an image without a link is never used.
        for archive in &image.archives {
            remove(&link_path(&listing.dir, &archive.sha256), &mut cleared)?;
        }
        remove(&image.path, &mut cleared)?;
        cleared.images += 1;
    }
    for path in &listing.other_files {
        remove(path, &mut cleared)?;
    }
    if older_than.is_none() && listing.remembered_hashes > 0 {
        for entry in std::fs::read_dir(&listing.dir)? {
            let path = entry?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if name.starts_with("raw-") && name.ends_with(".sha256") {
                remove(&path, &mut cleared)?;
            }
        }
    }
    Ok(cleared)
}
