//! bmaptool's block map (`.bmap`, format 1.x/2.x): when one lies beside the image,
//! its ranges say what to write instead of the map piprov computes.
//!
//! The parts read: `<ImageSize>`, `<BlockSize>` and each `<Range>` of
//! `<BlockMap>`, whose text is `first-last` or a single block number
//! (inclusive, in blocks).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::map::Extents;

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

fn tag<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let start = text.find(&open)? + open.len();
    let end = text[start..].find(&format!("</{name}>"))? + start;
    Some(text[start..end].trim())
}

/// The text without `<!-- … -->` comments (bmaptool's own mention tag names).
fn without_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find("<!--") {
        out.push_str(&rest[..open]);
        rest = rest[open..]
            .find("-->")
            .map_or("", |close| &rest[open + close + 3..]);
    }
    out.push_str(rest);
    out
}

pub fn parse(text: &str, image_len: u64, file: &Path) -> Result<Extents> {
    let text = &without_comments(text);
    let what = || format!("{} is not a bmap file piprov can read", file.display());
    if !text.contains("<bmap") {
        bail!(what());
    }
    let size: u64 = tag(text, "ImageSize")
        .and_then(|s| s.parse().ok())
        .with_context(what)?;
    let block: u64 = tag(text, "BlockSize")
        .and_then(|s| s.parse().ok())
        .with_context(what)?;
    if size != image_len {
        bail!(
            "{} describes an image of {size} bytes, not this one ({image_len} bytes)",
            file.display()
        );
    }
    let map = tag(text, "BlockMap").with_context(what)?;
    let mut ranges = Vec::new();
    for piece in map.split("<Range").skip(1) {
        let body = piece
            .split_once('>')
            .map(|(_, b)| b)
            .and_then(|b| b.split_once("</Range>"))
            .map(|(r, _)| r.trim());
        let body = body.with_context(what)?;
        let (first, last) = match body.split_once('-') {
            Some((a, b)) => (a.trim().parse::<u64>(), b.trim().parse::<u64>()),
            None => (body.parse::<u64>(), body.parse::<u64>()),
        };
        let (Ok(first), Ok(last)) = (first, last) else {
            bail!("{}: bad range {body:?}", file.display())
        };
        if last < first || (last + 1) * block > size.next_multiple_of(block) {
            bail!("{}: range {body:?} lies outside the image", file.display());
        }
        ranges.push((first * block, ((last + 1) * block).min(size)));
    }
    Ok(Extents::from_ranges(ranges))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BMAP: &str = r#"<?xml version="1.0" ?>
<!-- mentions <BlockSize> 512 </BlockSize> and <ImageSize> 1 </ImageSize> -->
<bmap version="2.0">
    <ImageSize> 40960 </ImageSize>
    <BlockSize> 4096 </BlockSize>
    <BlocksCount> 10 </BlocksCount>
    <BlockMap>
        <Range chksum="aa"> 0-1 </Range>
        <Range chksum="bb"> 5 </Range>
    </BlockMap>
</bmap>"#;

    #[test]
    fn ranges_are_inclusive_block_numbers() {
        let e = parse(BMAP, 40960, Path::new("x.bmap")).unwrap();
        assert_eq!(e.ranges(), &[(0, 8192), (20480, 24576)]);
    }

    #[test]
    fn a_bmap_for_another_image_is_refused() {
        let err = parse(BMAP, 4096, Path::new("x.bmap"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not this one"), "{err}");
        assert!(parse("<html>", 40960, Path::new("x.bmap")).is_err());
    }
}
