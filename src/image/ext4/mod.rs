//! The ext4 root partition: its files read through ext4-view (paths absolute
//! inside the image; symbolic links resolve inside the image, never on the host),
//! and which of its blocks are in use (`allocation`).

pub(super) mod allocation;

use anyhow::{Context, Result, bail};
use ext4_view::{Ext4, Ext4Error};

pub struct RootFs {
    fs: Ext4,
}

/// The largest file piprov reads from a root filesystem.
pub const MAX_FILE: u64 = 32 << 20;

/// The most entries piprov lists of one directory. ext4-view finds a name by
/// reading its directory from the start (unless the directory is hash-indexed,
/// which a crafted image need not be), so reading every file of a directory
/// costs its length squared: 20,000 entries took 25 s. The directories the
/// audit lists hold tens of entries on a real image.
pub const MAX_DIR_ENTRIES: usize = 1024;

/// Owner and permissions of a path in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
    /// Permission bits only (`0o600`), without the file type.
    pub mode: u16,
}

impl RootFs {
    pub(super) fn new(fs: Ext4) -> Self {
        Self { fs }
    }

    /// Reads a whole file; `None` when it (or a directory on its path) does not
    /// exist. The files piprov reads are configuration and state (the largest,
    /// dpkg's status, a few MB): one larger than `MAX_FILE` is refused before a
    /// byte of it is read, so a crafted image (a sparse file of many GB) cannot
    /// take the memory.
    pub fn read(&self, path: &str) -> Result<Option<Vec<u8>>> {
        let mut file = match self.fs.open(path) {
            Ok(file) => file,
            Err(Ext4Error::NotFound | Ext4Error::NotADirectory) => return Ok(None),
            Err(e) => {
                return Err(e).with_context(|| format!("reading {path} in the root filesystem"));
            }
        };
        let len = file.metadata().len();
        if len > MAX_FILE {
            bail!(
                "{path} in the root filesystem is {len} bytes, more than piprov reads of a \
                 configuration file ({MAX_FILE} bytes): the image is not what it seems"
            );
        }
        let mut data = vec![0u8; len as usize];
        let mut filled = 0;
        while filled < data.len() {
            let n = file
                .read_bytes(&mut data[filled..])
                .with_context(|| format!("reading {path} in the root filesystem"))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        data.truncate(filled);
        Ok(Some(data))
    }

    /// Reads a text file; invalid UTF-8 is replaced, as these are config files
    /// we only search.
    pub fn read_text(&self, path: &str) -> Result<Option<String>> {
        Ok(self
            .read(path)?
            .map(|data| String::from_utf8_lossy(&data).into_owned()))
    }

    pub fn exists(&self, path: &str) -> Result<bool> {
        match self.fs.exists(path) {
            Ok(found) => Ok(found),
            Err(Ext4Error::NotADirectory) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("looking up {path} in the root filesystem")),
        }
    }

    pub fn owner(&self, path: &str) -> Result<Option<Owner>> {
        match self.fs.metadata(path) {
            Ok(m) => Ok(Some(Owner {
                uid: m.uid(),
                gid: m.gid(),
                mode: m.mode() & 0o7777,
            })),
            Err(Ext4Error::NotFound | Ext4Error::NotADirectory) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading the metadata of {path}")),
        }
    }

    /// Whether `path` is a directory (a symbolic link is not followed).
    pub fn is_dir(&self, path: &str) -> Result<bool> {
        match self.fs.symlink_metadata(path) {
            Ok(m) => Ok(m.is_dir()),
            Err(Ext4Error::NotFound | Ext4Error::NotADirectory) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("reading the metadata of {path}")),
        }
    }

    /// Whether `path` itself is a symbolic link (not followed).
    pub fn is_symlink(&self, path: &str) -> Result<bool> {
        match self.fs.symlink_metadata(path) {
            Ok(m) => Ok(m.is_symlink()),
            Err(Ext4Error::NotFound | Ext4Error::NotADirectory) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("reading the metadata of {path}")),
        }
    }

    /// Names in a directory, sorted, without `.` and `..`; empty when the
    /// directory does not exist. More than `MAX_DIR_ENTRIES` is refused.
    pub fn list(&self, dir: &str) -> Result<Vec<String>> {
        let entries = match self.fs.read_dir(dir) {
            Ok(entries) => entries,
            Err(Ext4Error::NotFound | Ext4Error::NotADirectory) => return Ok(Vec::new()),
            Err(e) => {
                return Err(e).with_context(|| format!("listing {dir} in the root filesystem"));
            }
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.with_context(|| format!("listing {dir} in the root filesystem"))?;
            let name = entry.file_name();
            let name = String::from_utf8_lossy(name.as_ref()).into_owned();
            if name != "." && name != ".." {
                if names.len() == MAX_DIR_ENTRIES {
                    bail!(
                        "{dir} in the root filesystem holds more than {MAX_DIR_ENTRIES} entries, \
                         more than piprov lists of a configuration directory: the image is not \
                         what it seems"
                    );
                }
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }
}
