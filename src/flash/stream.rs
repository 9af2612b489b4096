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
use crate::progress::Progress;

#[derive(Default)]
struct State {
    /// Bytes of the partial file that are final.
    decoded: u64,
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
    file: File,
    shared: Arc<Shared>,
    decoder: JoinHandle<Result<Source>>,
}

impl Growing {
    /// Starts decoding `entry` (an archive of `format` that decodes to `len`
    /// bytes) on its own thread.
    pub fn start(
        entry: Entry,
        format: Format,
        len: u64,
        progress: &Progress,
        cancel: &'static AtomicBool,
    ) -> Result<Growing> {
        let out = entry.create()?;
        let file = File::open(&entry.partial)?;
        let shared = Arc::new(Shared::default());
        let bar = entry.bar(progress)?;
        let decoder = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                let decoded = |n: u64| {
                    shared.lock().decoded = n;
                    shared.changed.notify_all();
                };
                let result = entry.decode_into(out, &bar, cancel, &decoded, Some(len));
                if let Err(e) = &result {
                    shared.lock().failed = Some(format!("{e:#}"));
                    shared.changed.notify_all();
                }
                result
            })
        };
        Ok(Growing {
            len,
            format,
            file,
            shared,
            decoder,
        })
    }

    /// Waits until bytes `start..end` are decoded, then reads them; an error if
    /// the decoding fails first.
    pub fn read_exact_at(&self, buf: &mut [u8], start: u64) -> Result<()> {
        let end = start + buf.len() as u64;
        let mut state = self.shared.lock();
        while state.decoded < end.min(self.len) {
            if let Some(why) = &state.failed {
                return Err(anyhow!("the archive could not be decoded: {why}"));
            }
            state = self
                .shared
                .changed
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
        drop(state);
        self.file.read_exact_at(buf, start)?;
        Ok(())
    }

    /// Waits for the decoder: the image as kept in the cache.
    pub fn finish(self) -> Result<Source> {
        self.decoder
            .join()
            .unwrap_or_else(|_| Err(anyhow!("the decoder panicked")))
    }
}
