//! xz compression that starts while the card is read. The image is cut into
//! fixed spans (one xz block each, `xz_blocks`); while SRC is read and while
//! e2fsprogs shrink the root, idle cores compress each span as soon as it has
//! been read ("ahead"), and keep the block with the span's SHA-256. Once the
//! image is final, every span is hashed again: a span that did not change
//! (most of them: the shrink rewrites the filesystem's metadata and moves only
//! what lies past its new end) keeps its block; the rest are compressed then.
//!
//! Ahead-of-time work only ever runs on cores the read and the shrink leave
//! idle (the read waits on the card, e2fsprogs use one core), so it costs no
//! time when it turns out wasted. Blocks go to a spill file in the capture's
//! temporary folder, not memory: an archive may be gigabytes.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use super::xz_blocks::{self, StreamWriter};
use crate::cancel;
use crate::flash::map::Extents;

/// A compressed span, in the spill file.
#[derive(Clone, Copy)]
struct Stored {
    at: u64,
    len: u64,
    unpadded: u64,
    uncompressed: u64,
}

/// A span compressed ahead, with the hash of what it held then.
struct Kept {
    sha256: [u8; 32],
    block: Stored,
}

/// The spans of one capture and the blocks made of them so far.
pub struct Spans {
    span: u64,
    preset: u32,
    spill: Mutex<(File, u64)>,
    kept: Mutex<HashMap<u64, Kept>>,
    /// Compressed bytes made so far (ahead or final), for the progress line.
    compressed: AtomicU64,
}

/// How the archive's blocks were made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Blocks {
    pub total: u64,
    /// Compressed while the card was read or the root shrunk, and kept.
    pub made_ahead: u64,
}

impl Spans {
    pub fn new(preset: u32, spill: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(spill)
            .with_context(|| format!("creating {}", spill.display()))?;
        Ok(Self {
            span: xz_blocks::span(preset)?,
            preset,
            spill: Mutex::new((file, 0)),
            kept: Mutex::new(HashMap::new()),
            compressed: AtomicU64::new(0),
        })
    }

    fn compress(&self, data: &[u8]) -> Result<Stored> {
        let block = xz_blocks::compress(data, self.preset)?;
        let len = block.bytes.len() as u64;
        let (file, at) = {
            let mut spill = self.spill.lock().unwrap_or_else(|e| e.into_inner());
            let at = spill.1;
            spill.1 += len;
            (spill.0.try_clone().context("the spill file")?, at)
        };
        file.write_all_at(&block.bytes, at)
            .context("writing a compressed block to the temporary folder")?;
        self.compressed.fetch_add(len, Ordering::Relaxed);
        Ok(Stored {
            at,
            len,
            unpadded: block.unpadded,
            uncompressed: block.uncompressed,
        })
    }

    /// The archive of the final image (`len` bytes of `image`; zeroes where
    /// `data` names nothing), compressed on `threads` cores, to `out`.
    pub fn write<W: Write>(
        &self,
        image: &File,
        data: &Extents,
        len: u64,
        out: W,
        bar: &indicatif::ProgressBar,
        cancel: &AtomicBool,
    ) -> Result<(W, Blocks)> {
        let count = len.div_ceil(self.span);
        let made_ahead = AtomicU64::new(0);
        let next = AtomicU64::new(0);
        let placed = Mutex::new(vec![None; count as usize]);
        let threads = threads();
        std::thread::scope(|scope| -> Result<()> {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    scope.spawn(|| -> Result<()> {
                        let mut buf = vec![0u8; self.span as usize];
                        loop {
                            let k = next.fetch_add(1, Ordering::Relaxed);
                            if k >= count {
                                return Ok(());
                            }
                            if cancel::check(cancel).is_err() {
                                // The other workers stop at their next span too.
                                next.store(count, Ordering::Relaxed);
                                return cancel::check(cancel);
                            }
                            let start = k * self.span;
                            let bytes = &mut buf[..(len - start).min(self.span) as usize];
                            read_mapped(image, data, start, bytes)?;
                            let sha256: [u8; 32] = Sha256::digest(&*bytes).into();
                            let kept = self
                                .kept
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .get(&k)
                                .filter(|kept| {
                                    kept.sha256 == sha256
                                        && kept.block.uncompressed == bytes.len() as u64
                                })
                                .map(|kept| kept.block);
                            let block = match kept {
                                Some(block) => {
                                    made_ahead.fetch_add(1, Ordering::Relaxed);
                                    block
                                }
                                None => self.compress(bytes)?,
                            };
                            placed.lock().unwrap_or_else(|e| e.into_inner())[k as usize] =
                                Some(block);
                            bar.inc(bytes.len() as u64);
                            bar.set_message(format!(
                                "{} compressed",
                                crate::units::size(self.compressed.load(Ordering::Relaxed))
                            ));
                        }
                    })
                })
                .collect();
            for worker in workers {
                worker.join().expect("a compressing thread panicked")?;
            }
            Ok(())
        })?;
        let placed = placed.into_inner().unwrap_or_else(|e| e.into_inner());
        let (spill, _) = &*self.spill.lock().unwrap_or_else(|e| e.into_inner());
        let mut stream = StreamWriter::new(out).context("writing the archive")?;
        let mut bytes = Vec::new();
        for block in placed {
            let block = block.context("a span left uncompressed")?;
            bytes.resize(block.len as usize, 0);
            spill
                .read_exact_at(&mut bytes, block.at)
                .context("reading a compressed block back")?;
            stream
                .add(&bytes, block.unpadded, block.uncompressed)
                .context("writing the archive")?;
        }
        let out = stream.finish().context("writing the archive")?;
        let blocks = Blocks {
            total: count,
            made_ahead: made_ahead.into_inner(),
        };
        Ok((out, blocks))
    }
}

/// Reads `buf.len()` bytes of the image at `start`: `data`'s ranges from
/// `image`, zeroes elsewhere.
fn read_mapped(image: &File, data: &Extents, start: u64, buf: &mut [u8]) -> Result<()> {
    buf.fill(0);
    let end = start + buf.len() as u64;
    for &(from, to) in data.ranges() {
        let (from, to) = (from.max(start), to.min(end));
        if from < to {
            image
                .read_exact_at(
                    &mut buf[(from - start) as usize..(to - start) as usize],
                    from,
                )
                .context("reading the captured image")?;
        }
    }
    Ok(())
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Where the image's bytes are while it is made: the partition to shrink
/// lives in a file of its own until the shrink puts it back.
pub struct Layout<'a> {
    pub image: &'a File,
    /// The partition's start in the image, its length, its file.
    pub root: Option<(u64, u64, &'a File)>,
}

impl Layout<'_> {
    fn read(&self, at: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let end = at + buf.len() as u64;
        let (root_start, root_end, root) = match self.root {
            Some((start, len, file)) => (start, start + len, Some(file)),
            None => (0, 0, None),
        };
        let mut pos = at;
        while pos < end {
            let (file, until, offset) = match root {
                Some(root) if (root_start..root_end).contains(&pos) => {
                    (root, end.min(root_end), pos - root_start)
                }
                _ if pos < root_start => (self.image, end.min(root_start), pos),
                _ => (self.image, end, pos),
            };
            file.read_exact_at(&mut buf[(pos - at) as usize..(until - at) as usize], offset)?;
            pos = until;
        }
        Ok(())
    }
}

struct Progress {
    /// The image is complete up to here (it is read in order).
    ready_until: u64,
    next: u64,
    stop: bool,
}

/// Compression ahead of the final image, on `threads` workers: [`Ahead::run`]
/// on each, [`Ahead::ready`] as the read goes on, [`Ahead::stop`] when the
/// image is about to be final.
pub struct Ahead<'a> {
    spans: &'a Spans,
    layout: Layout<'a>,
    len: u64,
    progress: Mutex<Progress>,
    wake: Condvar,
}

impl<'a> Ahead<'a> {
    pub fn new(spans: &'a Spans, layout: Layout<'a>, len: u64) -> Self {
        Self {
            spans,
            layout,
            len,
            progress: Mutex::new(Progress {
                ready_until: 0,
                next: 0,
                stop: false,
            }),
            wake: Condvar::new(),
        }
    }

    pub fn threads(&self) -> usize {
        threads()
    }

    /// The image holds its final-for-now bytes up to `until`.
    pub fn ready(&self, until: u64) {
        let mut progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        if until > progress.ready_until {
            progress.ready_until = until;
            self.wake.notify_all();
        }
    }

    /// No span is started after this; those under way are finished.
    pub fn stop(&self) {
        self.progress.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
        self.wake.notify_all();
    }

    /// One worker: compresses the next ready span until stopped. A span it
    /// cannot read (the shrink cut the file under it) is left for the end.
    pub fn run(&self, cancel: &AtomicBool) {
        let mut buf = vec![0u8; self.spans.span as usize];
        while let Some(k) = self.next_span(cancel) {
            let start = k * self.spans.span;
            let bytes = &mut buf[..(self.len - start).min(self.spans.span) as usize];
            if self.layout.read(start, bytes).is_err() || bytes.iter().all(|&b| b == 0) {
                // Zeroes compress in no time at the end.
                continue;
            }
            let sha256: [u8; 32] = Sha256::digest(&*bytes).into();
            let Ok(block) = self.spans.compress(bytes) else {
                continue;
            };
            self.spans
                .kept
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(k, Kept { sha256, block });
        }
    }

    fn next_span(&self, cancel: &AtomicBool) -> Option<u64> {
        let mut progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let start = progress.next * self.spans.span;
            if progress.stop || start >= self.len || cancel.load(Ordering::Relaxed) {
                return None;
            }
            if (start + self.spans.span).min(self.len) <= progress.ready_until {
                progress.next += 1;
                return Some(progress.next - 1);
            }
            // Woken by ready() and stop(); the timeout notices a Ctrl-C.
            progress = self
                .wake
                .wait_timeout(progress, std::time::Duration::from_millis(200))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Stops the workers when dropped: on every way out of the read and the shrink.
pub struct StopOnDrop<'a, 'b>(pub &'b Ahead<'a>);

impl Drop for StopOnDrop<'_, '_> {
    fn drop(&mut self) {
        self.0.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn content(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i % 253) as u8 ^ (i >> 12) as u8)
            .collect()
    }

    /// Spans compressed ahead (read through the layout: the root's bytes from
    /// their own file) are kept where the final image still holds what they
    /// held, and compressed again where it changed.
    #[test]
    fn blocks_made_ahead_are_kept_only_where_the_span_did_not_change() {
        let dir = tempfile::TempDir::new().unwrap();
        let spans = Spans::new(0, &dir.path().join("blocks")).unwrap();
        let span = spans.span as usize;
        let len = 5 * span - 1000;
        let mut bytes = content(len);
        // The "root": spans 2 to the end, in a file of its own while made.
        let root_start = 2 * span;
        let image = tempfile::tempfile().unwrap();
        image.write_all_at(&bytes[..root_start], 0).unwrap();
        image.set_len(len as u64).unwrap();
        let root = tempfile::tempfile().unwrap();
        root.write_all_at(&bytes[root_start..], 0).unwrap();
        let layout = Layout {
            image: &image,
            root: Some((root_start as u64, (len - root_start) as u64, &root)),
        };
        let ahead = Ahead::new(&spans, layout, len as u64);
        ahead.ready(len as u64);
        let cancel = AtomicBool::new(false);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| ahead.run(&cancel));
            }
        });
        assert_eq!(spans.kept.lock().unwrap().len(), 5);

        // The final image: the root back in place, one byte of span 3 changed.
        bytes[3 * span + 17] ^= 0xff;
        image
            .write_all_at(&bytes[root_start..], root_start as u64)
            .unwrap();
        let data = Extents::from_ranges(vec![(0, len as u64)]);
        let bar = indicatif::ProgressBar::hidden();
        let (xz, blocks) = spans
            .write(&image, &data, len as u64, Vec::new(), &bar, &cancel)
            .unwrap();
        assert_eq!(
            blocks,
            Blocks {
                total: 5,
                made_ahead: 4
            }
        );
        let mut decoded = Vec::new();
        liblzma::read::XzDecoder::new(&xz[..])
            .read_to_end(&mut decoded)
            .unwrap();
        assert!(decoded == bytes, "the archive holds the final image");
    }

    /// Where the map names no data the archive holds zeroes, whatever the
    /// file holds there.
    #[test]
    fn the_archive_holds_zeroes_outside_the_map() {
        let dir = tempfile::TempDir::new().unwrap();
        let spans = Spans::new(0, &dir.path().join("blocks")).unwrap();
        let len = spans.span as usize + 5000;
        let image = tempfile::tempfile().unwrap();
        image.write_all_at(&vec![7u8; len], 0).unwrap();
        let data = Extents::from_ranges(vec![(4096, 8192)]);
        let cancel = AtomicBool::new(false);
        let bar = indicatif::ProgressBar::hidden();
        let (xz, blocks) = spans
            .write(&image, &data, len as u64, Vec::new(), &bar, &cancel)
            .unwrap();
        assert_eq!(blocks.made_ahead, 0);
        let mut decoded = Vec::new();
        liblzma::read::XzDecoder::new(&xz[..])
            .read_to_end(&mut decoded)
            .unwrap();
        let mut expected = vec![0u8; len];
        expected[4096..8192].fill(7);
        assert!(decoded == expected);
    }
}
