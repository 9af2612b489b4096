//! An archive decoded into the cache on one thread while the cards are written
//! from the part already decoded. Only xz is streamed: its index gives the
//! decoded length before the first byte is decoded, and the cards are checked
//! against it. Readers wait for the decoder; a decoding error reaches every
//! reader, and leaves no entry in the cache.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use anyhow::{Result, anyhow};

use super::source::{Entry, Format, Source};

#[derive(Default)]
struct State {
    /// Bytes of the partial file that are final.
    decoded: u64,
    /// Where in them data was written (sorted, merged); the rest are holes.
    data: Vec<(u64, u64)>,
    /// Set once: the decoding failed, and why.
    failed: Option<String>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Only the decoder writes the state, and only plain values: a panic
        // cannot leave it half-changed.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The image while it is being decoded.
pub struct Growing {
    pub len: u64,
    pub format: Format,
    /// The partial file, read while the decoder writes it.
    file: Arc<File>,
    shared: Arc<Shared>,
    decoded: std::sync::mpsc::Receiver<Result<Source>>,
    decoder: JoinHandle<Result<()>>,
}

/// The decoded image being made durable in the cache (`Entry::commit`), while
/// the cards are finished from it.
pub struct Keeping(JoinHandle<Result<()>>);

impl Keeping {
    /// Waits for it; an error says the cache could not keep the image (the
    /// cards are not affected).
    pub fn wait(self) -> Result<()> {
        self.0
            .join()
            .unwrap_or_else(|_| Err(anyhow!("keeping the decoded image panicked")))
    }
}

impl Growing {
    /// Starts decoding `entry` (an archive of `format` that decodes to `len`
    /// bytes) on its own thread.
    pub fn start(
        entry: Entry,
        format: Format,
        len: u64,
        cancel: &'static AtomicBool,
    ) -> Result<Growing> {
        let out = entry.create()?;
        let file = Arc::new(File::open(&entry.partial)?);
        let shared = Arc::new(Shared::default());
        // The decoder reads its input well ahead of what it has decoded: the
        // bar that tells the truth counts decoded bytes (the caller's).
        let bar = indicatif::ProgressBar::hidden();
        let (tx, decoded) = std::sync::mpsc::channel();
        let decoder = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                let decoded = |n: u64, data: &[(u64, u64)]| {
                    let mut state = shared.lock();
                    state.decoded = n;
                    for &(start, end) in data {
                        match state.data.last_mut() {
                            Some(last) if last.1 == start => last.1 = end,
                            _ => state.data.push((start, end)),
                        }
                    }
                    drop(state);
                    shared.changed.notify_all();
                };
                let result = entry.decode_into(&out, &bar, cancel, &decoded, Some(len));
                if let Err(e) = &result {
                    shared.lock().failed = Some(format!("{e:#}"));
                    shared.changed.notify_all();
                }
                let source = result?;
                let _ = tx.send(Ok(source.clone()));
                entry.commit(&out, &source)
            })
        };
        Ok(Growing {
            len,
            format,
            file,
            shared,
            decoded,
            decoder,
        })
    }

    /// Waits until bytes `start..end` are decoded, then reads them; an error if
    /// the decoding fails first.
    pub fn read_exact_at(&self, buf: &mut [u8], start: u64) -> Result<()> {
        wait_and_read(&self.shared, &self.file, self.len, buf, start)
    }

    /// The image as a disk to read filesystems from while it decodes: each
    /// read waits for its bytes.
    pub fn disk(&self) -> GrowingDisk {
        GrowingDisk {
            file: self.file.clone(),
            shared: self.shared.clone(),
            len: self.len,
            pos: 0,
        }
    }

    /// The next decoded range of data (not a hole) from `at` on, at most `max`
    /// bytes long, once it is known; None once the whole image is decoded and
    /// none is left.
    pub fn next_data(&self, at: u64, max: u64) -> Result<Option<(u64, u64)>> {
        let mut state = self.shared.lock();
        loop {
            if let Some(why) = &state.failed {
                return Err(anyhow!("the archive could not be decoded: {why}"));
            }
            let i = state.data.partition_point(|&(_, end)| end <= at);
            if let Some(&(start, end)) = state.data.get(i) {
                let start = start.max(at);
                return Ok(Some((start, end.min(start + max))));
            }
            if state.decoded >= self.len {
                return Ok(None);
            }
            state = self
                .shared
                .changed
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Waits for the decoder: the image, in its place in the cache, and the
    /// work of making it durable there, still going.
    pub fn finish(self) -> Result<(Source, Keeping)> {
        match self.decoded.recv() {
            Ok(Ok(source)) => Ok((source, Keeping(self.decoder))),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(self
                .decoder
                .join()
                .unwrap_or_else(|_| Err(anyhow!("the decoder panicked")))
                .err()
                .unwrap_or_else(|| anyhow!("the decoder stopped without an image"))),
        }
    }
}

fn wait_and_read(shared: &Shared, file: &File, len: u64, buf: &mut [u8], start: u64) -> Result<()> {
    let end = start + buf.len() as u64;
    let mut state = shared.lock();
    while state.decoded < end.min(len) {
        if let Some(why) = &state.failed {
            return Err(anyhow!("the archive could not be decoded: {why}"));
        }
        state = shared
            .changed
            .wait(state)
            .unwrap_or_else(|e| e.into_inner());
    }
    drop(state);
    file.read_exact_at(buf, start)?;
    Ok(())
}

/// A read-only view of the image being decoded (`Growing::disk`).
pub struct GrowingDisk {
    file: Arc<File>,
    shared: Arc<Shared>,
    len: u64,
    pos: u64,
}

impl std::fmt::Debug for GrowingDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the image being decoded ({} bytes)", self.len)
    }
}

impl std::io::Read for GrowingDisk {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.len.saturating_sub(self.pos)) as usize;
        wait_and_read(&self.shared, &self.file, self.len, &mut buf[..n], self.pos)
            .map_err(std::io::Error::other)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl std::io::Seek for GrowingDisk {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        let pos = match to {
            std::io::SeekFrom::Start(at) => Some(at),
            std::io::SeekFrom::End(delta) => self.len.checked_add_signed(delta),
            std::io::SeekFrom::Current(delta) => self.pos.checked_add_signed(delta),
        };
        self.pos = pos.ok_or_else(|| std::io::Error::other("seek before the start"))?;
        Ok(self.pos)
    }
}

impl std::io::Write for GrowingDisk {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::other(
            "the image being decoded is read-only",
        ))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
