//! bmaptool's block map (`.bmap`, formats 1.x and 2.x), parsed as XML and
//! checked as bmaptool checks it: the file's own checksum (`BmapFileChecksum`,
//! or `BmapFileSHA1` in 1.3) and each range's checksum against the image.
//!
//! A bmap only counts once both hold. A bmap records the image file as it was
//! when `bmaptool create` ran; an image changed since (a file added to its
//! ext4) has blocks the bmap never names, so a copy by the bmap alone is a
//! corrupt card. The range checksums catch exactly that, before anything is
//! written.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, anyhow, bail};
use sha2::Digest;

use super::map::Extents;
use crate::hex::hex;

/// `golden.img.bmap`, or for `golden.img.xz` also `golden.img.bmap` and `golden.bmap`.
pub fn find_beside(image: &Path) -> Option<PathBuf> {
    let mut candidates = vec![append(image, ".bmap")];
    let mut stem = image.to_path_buf();
    while let Some(ext) = stem.extension().map(|e| e.to_string_lossy().into_owned()) {
        stem.set_extension("");
        candidates.push(append(&stem, ".bmap"));
        if ext == "img" {
            break;
        }
    }
    candidates.into_iter().find(|c| c.is_file())
}

fn append(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Checksum {
    Sha1,
    Sha256,
}

impl Checksum {
    fn hex_len(self) -> usize {
        match self {
            Checksum::Sha1 => 40,
            Checksum::Sha256 => 64,
        }
    }

    fn digest(self, data: &[u8]) -> String {
        match self {
            Checksum::Sha1 => hex(&sha1::Sha1::digest(data)),
            Checksum::Sha256 => hex(&sha2::Sha256::digest(data)),
        }
    }
}

/// One `<Range>`: blocks `first..=last` and, from format 1.3 on, their checksum.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Range {
    first: u64,
    last: u64,
    checksum: Option<String>,
}

/// A parsed bmap whose own checksum (where the format has one) holds.
#[derive(Debug)]
pub struct Bmap {
    path: PathBuf,
    image_size: u64,
    block_size: u64,
    checksum: Option<Checksum>,
    ranges: Vec<Range>,
}

/// Why a bmap cannot be trusted for this image.
pub type Refusal = anyhow::Error;

impl Bmap {
    pub fn load(path: &Path) -> Result<Bmap> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&bytes, path)
    }

    /// Parses the bytes of a bmap file named `path` (for messages).
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Bmap> {
        let name = path.display();
        let text = std::str::from_utf8(bytes)
            .map_err(|_| anyhow!("{name} is not a bmap file: it is not UTF-8 text"))?;
        let doc = roxmltree::Document::parse(text)
            .map_err(|e| anyhow!("{name} is not a bmap file: the XML is malformed ({e})"))?;
        let root = doc.root_element();
        if root.tag_name().name() != "bmap" {
            bail!(
                "{name} is not a bmap file: its root element is <{}>, not <bmap>",
                root.tag_name().name()
            );
        }
        let version = root
            .attribute("version")
            .with_context(|| format!("{name}: <bmap> has no version"))?;
        let (major, minor) = version
            .split_once('.')
            .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
            .with_context(|| format!("{name}: bmap version {version:?} is not MAJOR.MINOR"))?;
        if major > 2 {
            bail!("{name}: bmap format {version} is newer than piprov reads (up to 2.x)");
        }
        let child = |tag: &str| root.children().find(|n| n.has_tag_name(tag));
        let number = |tag: &str| -> Result<u64> {
            let text = child(tag)
                .and_then(|n| n.text())
                .with_context(|| format!("{name}: no <{tag}>"))?;
            text.trim()
                .parse()
                .with_context(|| format!("{name}: <{tag}> {:?} is not a number", text.trim()))
        };
        let image_size = number("ImageSize")?;
        let block_size = number("BlockSize")?;
        let blocks = number("BlocksCount")?;
        if block_size == 0 || !block_size.is_power_of_two() {
            bail!("{name}: block size {block_size} is not a power of two");
        }
        if blocks != image_size.div_ceil(block_size) {
            bail!(
                "{name} is inconsistent: {image_size} bytes are not {blocks} blocks of {block_size}"
            );
        }
        // 1.4 is 2.0 released under the wrong number (bmaptool's own note).
        let (checksum, range_attr, file_tag) = if major == 2 || (major == 1 && minor == 4) {
            let kind = child("ChecksumType")
                .and_then(|n| n.text())
                .map(str::trim)
                .with_context(|| format!("{name}: no <ChecksumType>"))?;
            let kind = match kind {
                "sha256" => Checksum::Sha256,
                "sha1" => Checksum::Sha1,
                other => bail!("{name}: checksum type {other:?} is not supported (sha256, sha1)"),
            };
            (Some(kind), "chksum", "BmapFileChecksum")
        } else if major == 1 && minor == 3 {
            (Some(Checksum::Sha1), "sha1", "BmapFileSHA1")
        } else {
            (None, "", "")
        };
        if let Some(kind) = checksum {
            let stated = child(file_tag)
                .and_then(|n| n.text())
                .map(str::trim)
                .with_context(|| format!("{name}: no <{file_tag}>"))?;
            verify_file_checksum(bytes, stated, kind)
                .with_context(|| format!("{name}: the bmap file is damaged or was edited"))?;
        }
        let map = child("BlockMap").with_context(|| format!("{name}: no <BlockMap>"))?;
        let mut ranges = Vec::new();
        for node in map.children().filter(|n| n.has_tag_name("Range")) {
            let body = node.text().unwrap_or_default().trim();
            let parse = |s: &str| s.trim().parse::<u64>();
            let (first, last) = match body.split_once('-') {
                Some((a, b)) => (parse(a), parse(b)),
                None => (parse(body), parse(body)),
            };
            let (Ok(first), Ok(last)) = (first, last) else {
                bail!("{name}: bad range {body:?}");
            };
            if last < first || last >= blocks {
                bail!("{name}: range {body:?} lies outside the image's {blocks} blocks");
            }
            ranges.push(Range {
                first,
                last,
                checksum: checksum
                    .and_then(|_| node.attribute(range_attr))
                    .map(|c| c.trim().to_ascii_lowercase()),
            });
        }
        Ok(Bmap {
            path: path.to_path_buf(),
            image_size,
            block_size,
            checksum,
            ranges,
        })
    }

    /// The byte ranges the bmap names.
    pub fn extents(&self) -> Extents {
        Extents::from_ranges(self.ranges.iter().map(|r| self.bytes_of(r)).collect())
    }

    fn bytes_of(&self, r: &Range) -> (u64, u64) {
        (
            r.first * self.block_size,
            ((r.last + 1) * self.block_size).min(self.image_size),
        )
    }

    /// Checks that the bmap describes `image` (`len` bytes): the size, and every
    /// range's checksum, hashed on one thread per core. Returns why not.
    pub fn check_image(
        &self,
        image: &File,
        len: u64,
        cancel: &AtomicBool,
    ) -> std::result::Result<(), Refusal> {
        let name = self.path.display();
        if self.image_size != len {
            bail!(
                "{name} describes an image of {} bytes, not this one ({len} bytes)",
                self.image_size
            );
        }
        let Some(kind) = self.checksum else {
            return Ok(());
        };
        if let Some(r) = self.ranges.iter().find(|r| r.checksum.is_none()) {
            bail!("{name}: range {}-{} has no checksum", r.first, r.last);
        }
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
        let next = std::sync::atomic::AtomicUsize::new(0);
        let found = std::sync::Mutex::new(None);
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    let mut buf = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(range) = self.ranges.get(i) else {
                            break;
                        };
                        if cancel.load(Ordering::Relaxed) {
                            break;
                        }
                        if let Err(e) = self.check_range(image, range, kind, &mut buf) {
                            found.lock().expect("no checker panics").get_or_insert(e);
                            break;
                        }
                    }
                });
            }
        });
        match found.into_inner().expect("no checker panics") {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn check_range(
        &self,
        image: &File,
        range: &Range,
        kind: Checksum,
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        let (start, end) = self.bytes_of(range);
        // Ranges can span gigabytes: hashed in pieces of 16 MiB.
        let mut state = Hasher::new(kind);
        let mut at = start;
        while at < end {
            let n = (end - at).min(16 << 20) as usize;
            buf.resize(n, 0);
            image
                .read_exact_at(buf, at)
                .with_context(|| format!("reading the image at byte {at}"))?;
            state.update(buf);
            at += n as u64;
        }
        let actual = state.finish();
        if Some(&actual) != range.checksum.as_ref() {
            bail!(
                "{}: blocks {}-{} of the image do not match the bmap's checksum: the image \
                 changed after the bmap was made (or the bmap is for another image)",
                self.path.display(),
                range.first,
                range.last
            );
        }
        Ok(())
    }
}

enum Hasher {
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
}

impl Hasher {
    fn new(kind: Checksum) -> Self {
        match kind {
            Checksum::Sha1 => Hasher::Sha1(sha1::Sha1::new()),
            Checksum::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha1(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
        }
    }

    fn finish(self) -> String {
        match self {
            Hasher::Sha1(h) => hex(&h.finalize()),
            Hasher::Sha256(h) => hex(&h.finalize()),
        }
    }
}

/// bmaptool's rule: the checksum of the file with its own checksum's digits
/// replaced by zeroes.
fn verify_file_checksum(bytes: &[u8], stated: &str, kind: Checksum) -> Result<()> {
    if stated.len() != kind.hex_len() {
        bail!(
            "its checksum {stated:?} is not {} hex digits",
            kind.hex_len()
        );
    }
    let at = bytes
        .windows(stated.len())
        .position(|w| w == stated.as_bytes())
        .context("its checksum is not where bmaptool puts it")?;
    let mut zeroed = bytes.to_vec();
    zeroed[at..at + stated.len()].fill(b'0');
    let actual = kind.digest(&zeroed);
    if !actual.eq_ignore_ascii_case(stated) {
        bail!("the file's checksum is {actual}, it says {stated}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2.0 bmap with its file checksum filled in as bmaptool does.
    fn bmap(ranges: &str) -> Vec<u8> {
        let text = format!(
            r#"<?xml version="1.0" ?>
<!-- mentions <BlockSize> 512 </BlockSize> and <ImageSize> 1 </ImageSize> -->
<bmap version="2.0">
    <ImageSize> 40960 </ImageSize>
    <BlockSize> 4096 </BlockSize>
    <BlocksCount> 10 </BlocksCount>
    <MappedBlocksCount> 3 </MappedBlocksCount>
    <ChecksumType> sha256 </ChecksumType>
    <BmapFileChecksum> {} </BmapFileChecksum>
    <BlockMap>
{ranges}
    </BlockMap>
</bmap>"#,
            "0".repeat(64)
        );
        let sum = Checksum::Sha256.digest(text.as_bytes());
        text.replacen(&"0".repeat(64), &sum, 1).into_bytes()
    }

    #[test]
    fn ranges_are_inclusive_block_numbers() {
        let b = Bmap::parse(
            &bmap(r#"<Range chksum="aa"> 0-1 </Range><Range chksum="bb"> 5 </Range>"#),
            Path::new("x.bmap"),
        )
        .unwrap();
        assert_eq!(b.extents().ranges(), &[(0, 8192), (20480, 24576)]);
    }

    #[test]
    fn an_edited_bmap_fails_its_own_checksum() {
        let mut bytes = bmap(r#"<Range chksum="aa"> 0-1 </Range>"#);
        let at = bytes.windows(3).position(|w| w == b"0-1").unwrap();
        bytes[at + 2] = b'2';
        let err = format!(
            "{:#}",
            Bmap::parse(&bytes, Path::new("x.bmap")).unwrap_err()
        );
        assert!(err.contains("damaged or was edited"), "{err}");
    }

    #[test]
    fn malformed_and_foreign_files_are_refused_by_name() {
        for (bytes, says) in [
            (&b"<html></html>"[..], "root element is <html>"),
            (b"<bmap version=\"2.0\"><ImageSize>1", "XML is malformed"),
            (b"\xff\xfe", "not UTF-8"),
            (b"<bmap version=\"3.0\"/>", "newer than piprov reads"),
        ] {
            let err = format!("{:#}", Bmap::parse(bytes, Path::new("x.bmap")).unwrap_err());
            assert!(err.contains(says), "{err}");
        }
        let outside = bmap(r#"<Range chksum="aa"> 9-10 </Range>"#);
        let err = format!(
            "{:#}",
            Bmap::parse(&outside, Path::new("x.bmap")).unwrap_err()
        );
        assert!(err.contains("outside the image"), "{err}");
    }

    #[test]
    fn a_range_that_does_not_hash_as_stated_is_found() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("image");
        let mut data = vec![7u8; 40960];
        std::fs::write(&path, &data).unwrap();
        let good = Checksum::Sha256.digest(&data[..8192]);
        let b = Bmap::parse(
            &bmap(&format!(r#"<Range chksum="{good}"> 0-1 </Range>"#)),
            Path::new("x.bmap"),
        )
        .unwrap();
        let image = File::open(&path).unwrap();
        let cancel = AtomicBool::new(false);
        b.check_image(&image, 40960, &cancel).unwrap();
        let err = b.check_image(&image, 4096, &cancel).unwrap_err();
        assert!(err.to_string().contains("not this one"), "{err}");
        data[5000] = 8;
        std::fs::write(&path, &data).unwrap();
        let err = b.check_image(&image, 40960, &cancel).unwrap_err();
        assert!(err.to_string().contains("blocks 0-1"), "{err}");
    }
}
