//! The FAT boot partition (`bootfs`): its files read and written through fatfs,
//! and which of its bytes are in use (`allocation`).

pub(super) mod allocation;
mod journal;

pub use journal::{Journal, SECTOR};

use std::io::{self, Read, Seek, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, anyhow, bail};

use super::slice::PartitionSlice;

pub struct BootFs<D: Read + Write + Seek> {
    fs: fatfs::FileSystem<Bounded<D>>,
    budget: Budget,
    /// The partition beside fatfs, for what fatfs leaves undone.
    raw: PartitionSlice<D>,
    journal: Option<Journal>,
}

/// fatfs follows cluster chains as the FAT gives them: a chain that loops
/// (a crafted card) would be read for ever, a directory's entries without end
/// and memory growing. So one call (open, read, list, write, remove) may read
/// at most twice the partition and a margin; past that it fails, naming the
/// cause. A real call reads a small part of the partition.
#[derive(Clone)]
struct Budget {
    left: Arc<AtomicU64>,
    per_call: u64,
}

const BUDGET_MARGIN: u64 = 16 << 20;
const READ_COST_MIN: u64 = 512;

impl Budget {
    fn new(partition_len: u64) -> Self {
        let per_call = partition_len
            .saturating_mul(2)
            .saturating_add(BUDGET_MARGIN);
        Self {
            left: Arc::new(AtomicU64::new(per_call)),
            per_call,
        }
    }

    fn renew(&self) {
        self.left.store(self.per_call, Ordering::Relaxed);
    }

    /// Spends `cost` bytes of the budget; false (and nothing spent) when less is left.
    fn spend(&self, cost: u64) -> bool {
        self.left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(cost)
            })
            .is_ok()
    }
}

/// The partition as fatfs reads it: every byte read is taken from the budget,
/// and with a journal, every sector's original is kept before it is written.
struct Bounded<D> {
    slice: PartitionSlice<D>,
    budget: Budget,
    journal: Option<Journal>,
}

const LOOPING: &str = "the FAT filesystem is corrupt: reading it does not end \
                       (a cluster chain that loops or is cross-linked)";

impl<D: Read + Seek> Read for Bounded<D> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        // fatfs reads a directory entry a field at a time: every read costs
        // at least a sector, so many small reads spend the budget too.
        let cost = (buf.len() as u64).max(READ_COST_MIN);
        if !self.budget.spend(cost) {
            return Err(io::Error::other(LOOPING));
        }
        self.slice.read(buf)
    }
}

impl<D: Read + Write + Seek> Write for Bounded<D> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(journal) = &self.journal {
            let pos = self.slice.stream_position()?;
            let len = (buf.len() as u64).min(self.slice.len().saturating_sub(pos));
            journal.before_write(&self.slice, pos, len)?;
        }
        self.slice.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.slice.flush()
    }
}

impl<D: Seek> Seek for Bounded<D> {
    fn seek(&mut self, pos: io::SeekFrom) -> io::Result<u64> {
        self.slice.seek(pos)
    }
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
    pub(super) fn open(slice: PartitionSlice<D>, journal: Option<Journal>) -> Result<Self> {
        let budget = Budget::new(slice.len());
        let raw = slice.clone();
        guarded("opening the boot partition", || {
            let bounded = Bounded {
                slice,
                budget: budget.clone(),
                journal: journal.clone(),
            };
            let fs = fatfs::FileSystem::new(bounded, fatfs::FsOptions::new())?;
            Ok(Self {
                fs,
                budget,
                raw,
                journal,
            })
        })
    }

    /// A fatfs call with a fresh read budget and its panics contained.
    fn call<T>(&self, what: &str, call: impl FnOnce() -> Result<T>) -> Result<T> {
        self.budget.renew();
        guarded(what, call)
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
        self.call(&format!("reading {name} on the boot partition"), || {
            self.read_unguarded(name)
        })
    }

    /// Reads a whole file of at most `max` bytes; a larger one is an error.
    pub fn read_at_most(&self, name: &str, max: u64) -> Result<Option<Vec<u8>>> {
        self.call(&format!("reading {name} on the boot partition"), || {
            let found = self
                .fs
                .root_dir()
                .iter()
                .filter_map(|entry| entry.ok())
                .find(|entry| entry.is_file() && entry.file_name().eq_ignore_ascii_case(name));
            match found {
                Some(entry) if entry.len() > max => {
                    bail!(
                        "{name} on the boot partition is {} bytes, more than {max}",
                        entry.len()
                    )
                }
                Some(_) => self.read_unguarded(name),
                None => Ok(None),
            }
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
        self.call("listing the boot partition", || self.list_root_unguarded())
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
        self.call(&format!("writing {name} on the boot partition"), || {
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

    /// Zeroes the free clusters that writing files of `sizes` bytes will take.
    /// fatfs does not zero a cluster it adds to a FAT32 root directory, so old
    /// data in free space (a kernel update leaves plenty) would read as
    /// directory entries: garbage files, and a FAT that `fsck` rejects.
    pub fn zero_ahead(&self, sizes: &[u64]) -> Result<()> {
        let ranges = allocation::next_free(&self.raw, sizes)
            .context("finding the free clusters of the boot partition")?;
        for (start, end) in ranges {
            let zeroes = vec![0u8; usize::try_from(end - start)?];
            if let Some(journal) = &self.journal {
                journal.before_write(&self.raw, start, end - start)?;
            }
            self.raw
                .write_all_at(start, &zeroes)
                .context("zeroing free clusters of the boot partition")?;
        }
        Ok(())
    }

    /// Removes a file; succeeds when it is already absent. Its bytes are
    /// overwritten with zeroes first: FAT only marks a removed file's clusters
    /// free, and a secret left there is read back with `strings`.
    pub fn remove(&self, name: &str) -> Result<()> {
        self.call(&format!("removing {name} from the boot partition"), || {
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
        self.budget.renew();
        self.fs
            .unmount()
            .context("closing the boot partition's FAT filesystem")
    }
}
