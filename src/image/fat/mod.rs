//! The FAT boot partition (`bootfs`): its files read and written through fatfs,
//! and which of its bytes are in use (`allocation`).

pub(super) mod allocation;

use std::io::{self, Read, Seek, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};

use anyhow::{Context, Result, anyhow};

use super::slice::PartitionSlice;

pub struct BootFs<D: Read + Write + Seek> {
    fs: fatfs::FileSystem<PartitionSlice<D>>,
}

/// Runs a fatfs call, turning a panic inside fatfs into an error. fatfs trusts
/// cluster numbers on disk: a corrupt entry pointing at cluster 0 or 1 makes it
/// subtract past zero (found by fuzzing). The panic hook from
/// `crate::contain_fatfs_panics` keeps such panics quiet.
fn guarded<T>(what: &str, call: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(call)) {
        Ok(result) => result,
        Err(_) => Err(anyhow!(
            "{what}: the FAT filesystem is corrupt (a cluster number out of range)"
        )),
    }
}

impl<D: Read + Write + Seek> BootFs<D> {
    pub(super) fn open(slice: PartitionSlice<D>) -> Result<Self> {
        guarded("opening the boot partition", || {
            let fs = fatfs::FileSystem::new(slice, fatfs::FsOptions::new())?;
            Ok(Self { fs })
        })
    }

    pub fn fat_type(&self) -> &'static str {
        match self.fs.fat_type() {
            fatfs::FatType::Fat12 => "FAT12",
            fatfs::FatType::Fat16 => "FAT16",
            fatfs::FatType::Fat32 => "FAT32",
        }
    }

    pub fn volume_label(&self) -> String {
        self.fs.volume_label().trim_end().to_string()
    }

    /// Reads a whole file; `None` when it does not exist.
    pub fn read(&self, name: &str) -> Result<Option<Vec<u8>>> {
        guarded(&format!("reading {name} on the boot partition"), || {
            self.read_unguarded(name)
        })
    }

    fn read_unguarded(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let mut file = match self.fs.root_dir().open_file(name) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(e).with_context(|| format!("opening {name} on the boot partition"));
            }
        };
        let mut data = Vec::new();
        file.read_to_end(&mut data)
            .with_context(|| format!("reading {name} on the boot partition"))?;
        Ok(Some(data))
    }

    /// Names of the files and directories at the top of the partition.
    pub fn list_root(&self) -> Result<Vec<String>> {
        guarded("listing the boot partition", || self.list_root_unguarded())
    }

    fn list_root_unguarded(&self) -> Result<Vec<String>> {
        self.fs
            .root_dir()
            .iter()
            .map(|entry| {
                entry
                    .map(|e| e.file_name())
                    .context("listing the boot partition's root directory")
            })
            .filter(|name| !matches!(name.as_deref(), Ok(".") | Ok("..")))
            .collect()
    }

    /// Creates or replaces a file at the top level of the partition. An existing
    /// file is overwritten in place and then cut to length, so a write cut short
    /// leaves old bytes after the new ones, never an empty file.
    pub fn write(&self, name: &str, data: &[u8]) -> Result<()> {
        guarded(&format!("writing {name} on the boot partition"), || {
            self.write_unguarded(name, data)
        })
    }

    fn write_unguarded(&self, name: &str, data: &[u8]) -> Result<()> {
        // fatfs's create_file opens an existing file without truncating it.
        let mut file = self
            .fs
            .root_dir()
            .create_file(name)
            .with_context(|| format!("creating {name} on the boot partition"))?;
        file.write_all(data)
            .and_then(|()| file.truncate())
            .and_then(|()| file.flush())
            .with_context(|| format!("writing {name} on the boot partition"))
    }

    /// Removes a file; succeeds when it is already absent. Its bytes are
    /// overwritten with zeroes first: FAT only marks a removed file's clusters
    /// free, and a secret left there is read back with `strings`.
    pub fn remove(&self, name: &str) -> Result<()> {
        guarded(&format!("removing {name} from the boot partition"), || {
            self.remove_unguarded(name)
        })
    }

    fn remove_unguarded(&self, name: &str) -> Result<()> {
        let root = self.fs.root_dir();
        match root.open_file(name) {
            Ok(mut file) => {
                let len = file.seek(io::SeekFrom::End(0))?;
                file.seek(io::SeekFrom::Start(0))?;
                io::copy(&mut io::repeat(0).take(len), &mut file)
                    .and_then(|_| file.flush())
                    .with_context(|| format!("overwriting {name} on the boot partition"))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(e).with_context(|| format!("opening {name} on the boot partition"));
            }
        }
        root.remove(name)
            .with_context(|| format!("removing {name} from the boot partition"))
    }

    /// Writes back the FS info and clears the dirty flag. Dropping without this
    /// would only log a failure, so every writer must call it.
    pub fn close(self) -> Result<()> {
        self.fs
            .unmount()
            .context("closing the boot partition's FAT filesystem")
    }
}
