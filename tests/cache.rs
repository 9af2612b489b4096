//! `piprov cache`: one decoded image per content, whatever archive it came
//! from; `list` shows it, `clear` tidies it by age.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use tempfile::TempDir;

/// The image packed by each archiver users meet: xz, gzip, zstd and zip.
fn archives(image: &Path) -> Vec<std::path::PathBuf> {
    let mut made = Vec::new();
    for (ext, tool, args) in [
        ("xz", "xz", &["-0", "-T1", "-k", "-f"][..]),
        ("gz", "gzip", &["-1", "-k", "-f"]),
        ("zst", "zstd", &["-1", "-q", "-k", "-f"]),
    ] {
        assert!(
            Command::new(tool)
                .args(args)
                .arg(image)
                .status()
                .unwrap()
                .success(),
            "{tool}"
        );
        made.push(image.with_extension(format!("img.{ext}")));
    }
    let zip = image.with_extension("zip");
    assert!(
        Command::new("zip")
            .args(["-q", "-1", "-j"])
            .arg(&zip)
            .arg(image)
            .status()
            .unwrap()
            .success(),
        "zip"
    );
    made.push(zip);
    made
}

fn cache_json(cache: &Path, args: &[&str]) -> serde_json::Value {
    let out = succeed(
        piprov()
            .env("PIPROV_CACHE_DIR", cache)
            .arg("cache")
            .args(args)
            .arg("--json"),
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn names(cache: &Path, prefix: &str) -> Vec<String> {
    std::fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

#[test]
fn one_image_is_cached_once_whatever_archive_it_came_in() {
    let dir = TempDir::new().unwrap();
    let image = fixture("golden", &dir);
    let sha = sha256_of(&image);
    let cache = dir.path().join("cache");
    let packed = archives(&image);
    for archive in &packed {
        succeed(
            piprov()
                .env("PIPROV_CACHE_DIR", &cache)
                .arg("inspect")
                .arg(archive)
                .arg("--json"),
        );
    }
    assert_eq!(names(&cache, "image-"), vec![format!("image-{sha}.img")]);
    assert_eq!(names(&cache, "archive-").len(), 4);
    let listing = cache_json(&cache, &["list"]);
    let images = listing["images"].as_array().unwrap();
    assert_eq!(images.len(), 1, "{listing:#}");
    assert_eq!(images[0]["sha256"], sha.as_str());
    let mut formats: Vec<&str> = images[0]["archives"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["format"].as_str().unwrap())
        .collect();
    formats.sort();
    assert_eq!(formats, ["gzip", "xz", "zip", "zstd"]);

    // A card flashed from one of them comes from the cached image, unchanged.
    let card = dir.path().join("card.img");
    succeed(
        piprov()
            .env("PIPROV_CACHE_DIR", &cache)
            .args(["flash", "--as-is", "--yes", "--quiet", "--full"])
            .arg(&packed[1])
            .arg(&card),
    );
    assert_eq!(sha256_of(&card), sha);

    // Used today: kept by --older-than; unused for two days: removed, links first.
    let cleared = cache_json(&cache, &["clear", "--older-than", "1d"]);
    assert_eq!(cleared["images"], 0, "{cleared:#}");
    for name in names(&cache, "") {
        let touched = Command::new("touch")
            .args(["-d", "2 days ago"])
            .arg(cache.join(&name))
            .status()
            .unwrap();
        assert!(touched.success());
    }
    let cleared = cache_json(&cache, &["clear", "--older-than", "1d"]);
    assert_eq!(cleared["images"], 1, "{cleared:#}");
    assert!(names(&cache, "image-").is_empty() && names(&cache, "archive-").is_empty());

    // Everything: the remembered hash of the raw image too.
    succeed(
        piprov()
            .env("PIPROV_CACHE_DIR", &cache)
            .arg("inspect")
            .arg(&packed[0]),
    );
    succeed(
        piprov()
            .env("PIPROV_CACHE_DIR", &cache)
            .args(["flash", "--as-is", "--yes", "--quiet"])
            .arg(&image)
            .arg(dir.path().join("card2.img")),
    );
    assert!(!names(&cache, "raw-").is_empty());
    cache_json(&cache, &["clear"]);
    assert_eq!(names(&cache, ""), Vec::<String>::new());
    let text = succeed(
        piprov()
            .env("PIPROV_CACHE_DIR", &cache)
            .args(["cache", "list"]),
    );
    assert!(String::from_utf8_lossy(&text.stdout).contains("0 decoded images"));
}
