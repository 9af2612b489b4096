//! `piprov flash` of an xz archive that is not in the cache yet: the cards are
//! written while it decodes. A card comes out as from the decoded image, on a
//! used card too; an archive that turns out corrupt, or an image with another
//! SHA-256 than asked for, leaves every card without a partition table and
//! the cache without the half-decoded image.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::card::shared_recipe;
use common::disk::*;
use common::*;
use predicates::str::contains;
use tempfile::TempDir;

/// In the summary (the last JSON line): the cards were written while the
/// archive decoded.
const STREAMED: &str = "\"decoded_while_writing\":true";
/// In the error when the archive was not right: the cards had been written to.
const NO_TABLE: &str = "hold no partition table";

/// `flash` of an image as it is: the tests of the write path, on images whose
/// audit (the fixtures carry a baked registration) would otherwise refuse.
fn flash_as_is(dir: &TempDir) -> assert_cmd::Command {
    let mut cmd = flash(dir);
    cmd.arg("--as-is");
    cmd
}

fn flash(dir: &TempDir) -> assert_cmd::Command {
    let mut cmd = piprov();
    cmd.env("PIPROV_CACHE_DIR", dir.path().join("cache"))
        .arg("flash");
    cmd
}

/// The image compressed as Raspberry Pi OS ships it: xz, in many blocks.
fn xz(image: &Path, dir: &TempDir) -> PathBuf {
    let out = dir.path().join("image.img.xz");
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "xz -T2 -1 --block-size=2MiB -c '{}' > '{}'",
            image.display(),
            out.display()
        ))
        .status()
        .unwrap()
        .success();
    assert!(ok, "xz");
    out
}

/// The cache's files, by name.
fn cached(dir: &TempDir) -> Vec<String> {
    match std::fs::read_dir(dir.path().join("cache")) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn decoded_images(dir: &TempDir) -> usize {
    cached(dir)
        .iter()
        .filter(|n| n.contains(".img") && !n.ends_with(".sha256"))
        .count()
}

#[test]
fn an_archive_is_written_to_file_targets_while_it_decodes() {
    let dir = TempDir::new().unwrap();
    let image = fixture("registered", &dir);
    let archive = xz(&image, &dir);
    let full = dir.path().join("full.img");
    flash_as_is(&dir)
        .arg(&archive)
        .arg(&full)
        .args(["--full", "--json", "--sha256", &sha256_of(&image)])
        .assert()
        .success()
        .stdout(contains(STREAMED));
    assert_eq!(sha256_of(&full), sha256_of(&image), "--full: every byte");
    assert_eq!(decoded_images(&dir), 1, "the image is kept in the cache");

    // Again, from the cache: nothing to decode.
    std::fs::remove_dir_all(dir.path().join("cache")).unwrap();
    let (one, two) = (dir.path().join("one.img"), dir.path().join("two.img"));
    let recipe = shared_recipe(dir.path(), "");
    flash(&dir)
        .arg(&archive)
        .args([&one, &two])
        .arg("--recipe")
        .arg(&recipe)
        .args(["--hostname", "gate-{n}", "--json"])
        .assert()
        .success()
        .stdout(contains(STREAMED))
        .stdout(contains("\"hostname\":\"gate-2\""));
    for (card, name) in [(&one, "gate-1"), (&two, "gate-2")] {
        assert_card_holds(card, &image, name, dir.path());
    }
    let again = dir.path().join("again.img");
    let out = succeed(flash_as_is(&dir).arg(&archive).arg(&again).arg("--json"));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\"decoded_while_writing\":false"),
        "the second flash reads the cache"
    );
}

/// On a used card the zeroes the filesystems need (inode tables, directory
/// blocks) are written in the second pass: the card fscks clean and holds the
/// image's files, not the old card's.
#[test]
fn an_archive_is_written_to_a_used_card_while_it_decodes() {
    let dir = TempDir::new().unwrap();
    if !loop_devices_usable(&dir) {
        return;
    }
    let image = fixture("registered", &dir);
    let old = fixture("golden", &dir);
    let archive = xz(&image, &dir);
    let len = std::fs::metadata(&image).unwrap().len();
    let (backing, dev) = used_card(&dir, "used", len + (8 << 20), Some(&old));
    let recipe = shared_recipe(dir.path(), "");
    flash(&dir)
        .arg(&archive)
        .arg(&dev.dev)
        .arg("--recipe")
        .arg(&recipe)
        .args([
            "--hostname",
            "door-{n}",
            "--yes",
            "--allow-non-removable",
            "--json",
        ])
        .assert()
        .success()
        .stdout(contains(STREAMED))
        .stdout(contains("\"verified\":true"));
    let card = card_as_image(&dir, dev, &backing, len);
    assert_card_holds(&card, &image, "door-1", dir.path());
}

/// An archive whose index is whole but whose data is not, from its first block
/// that decodes past 64 MiB: the cards have had the data before the damage,
/// never a partition table.
fn damaged(archive: &Path, how: &str) -> PathBuf {
    let list = Command::new("xz")
        .args(["--robot", "--list", "--verbose"])
        .arg(archive)
        .output()
        .unwrap();
    // block, stream, its number in the stream, in the file, compressed offset, decoded offset…
    let (at, next) = {
        let blocks: Vec<(usize, u64)> = String::from_utf8(list.stdout)
            .unwrap()
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                (f[0] == "block").then(|| (f[4].parse().unwrap(), f[5].parse().unwrap()))
            })
            .collect();
        let i = blocks
            .iter()
            .position(|&(_, decoded)| decoded >= 64 << 20)
            .unwrap();
        (blocks[i].0, blocks[i + 2].0)
    };
    let mut data = std::fs::read(archive).unwrap();
    match how {
        "corrupt" => data[at + 16..at + 48].iter_mut().for_each(|b| *b = !*b),
        // A download that was given its full size up front and is missing
        // a range (its end, with the index, came first).
        "unfinished" => data[at..next].fill(0),
        // Bytes lost: the index no longer fits the file.
        "cut short" => {
            data.drain(at..next);
        }
        _ => unreachable!(),
    }
    let out = archive.with_extension(how.replace(' ', "-"));
    std::fs::write(&out, data).unwrap();
    out
}

fn assert_left_without_a_table(card: &Path, image: &Path) {
    let head = std::fs::read(card).unwrap();
    assert!(
        head[..1 << 20].iter().all(|&b| b == 0),
        "{}: no partition table",
        card.display()
    );
    // The first pass had begun: the boot partition's first sector is there.
    let (boot, _) = partition_extent(image, 1);
    let expected = std::fs::read(image).unwrap();
    assert_eq!(
        head[boot as usize..boot as usize + 512],
        expected[boot as usize..boot as usize + 512],
        "{}: the data decoded before the damage was written",
        card.display()
    );
}

#[test]
fn a_damaged_archive_leaves_every_card_without_a_table_and_nothing_in_the_cache() {
    let dir = TempDir::new().unwrap();
    let image = fixture("golden", &dir);
    let archive = xz(&image, &dir);
    for how in ["corrupt", "unfinished"] {
        let bad = damaged(&archive, how);
        let cards: Vec<PathBuf> = (1..=2)
            .map(|n| dir.path().join(format!("{how}-{n}.img")))
            .collect();
        std::fs::write(&cards[0], std::fs::read(&image).unwrap()).unwrap();
        flash_as_is(&dir)
            .arg(&bad)
            .args(&cards)
            .args(["--yes"])
            .assert()
            .code(1)
            .stderr(contains("the archive is truncated or corrupt"))
            .stderr(contains(NO_TABLE));
        for card in &cards {
            assert_left_without_a_table(card, &image);
        }
        assert_eq!(decoded_images(&dir), 0, "{how}: {:?}", cached(&dir));
    }
    // An archive shorter than its index says is refused before any card is
    // touched, like one cut off at the end (flash.rs).
    let card = dir.path().join("kept.img");
    std::fs::write(&card, b"old data").unwrap();
    flash_as_is(&dir)
        .arg(damaged(&archive, "cut short"))
        .arg(&card)
        .arg("--yes")
        .assert()
        .code(2)
        .stderr(contains("the archive is truncated or corrupt"));
    assert_eq!(std::fs::read(&card).unwrap(), b"old data");
    assert_eq!(decoded_images(&dir), 0, "{:?}", cached(&dir));
}

/// The same on a used card that held a GPT image: neither its old tables nor
/// the new ones are left for a tool to find.
#[test]
fn a_damaged_archive_leaves_a_used_card_without_a_table() {
    let dir = TempDir::new().unwrap();
    if !loop_devices_usable(&dir) {
        return;
    }
    let old = fixture("gpt", &dir);
    let old_len = std::fs::metadata(&old).unwrap().len();
    let image = fixture("golden", &dir);
    let bad = damaged(&xz(&image, &dir), "corrupt");
    let len = std::fs::metadata(&image).unwrap().len().max(old_len) + (8 << 20);
    let (backing, dev) = used_card(&dir, "used", len, Some(&old));
    flash_as_is(&dir)
        .arg(&bad)
        .arg(&dev.dev)
        .args(["--yes", "--allow-non-removable"])
        .assert()
        .code(1)
        .stderr(contains("the archive is truncated or corrupt"))
        .stderr(contains(NO_TABLE));
    let card = card_as_image(&dir, dev, &backing, len);
    assert_no_partition_table(&card, old_len);
    assert_eq!(decoded_images(&dir), 0, "{:?}", cached(&dir));
}

/// `--sha256` is checked once the archive has decoded, before any table goes
/// down. The decoded image is the archive's own, so the cache keeps it.
#[test]
fn an_archive_of_another_image_than_asked_for_leaves_the_card_without_a_table() {
    let dir = TempDir::new().unwrap();
    let image = fixture("golden", &dir);
    let archive = xz(&image, &dir);
    let card = dir.path().join("card.img");
    flash_as_is(&dir)
        .arg(&archive)
        .arg(&card)
        .args(["--sha256", &"0".repeat(64)])
        .assert()
        .code(1)
        .stderr(contains("not the expected 0000"))
        .stderr(contains(NO_TABLE));
    assert_left_without_a_table(&card, &image);
    assert_eq!(decoded_images(&dir), 1);
}

/// A power cut while the archive decodes: the card's old tables were erased
/// and flushed before the first piece, and no new table goes down before the
/// end, so the card holds none.
#[test]
fn a_flash_killed_while_the_archive_decodes_leaves_no_partition_table() {
    let dir = TempDir::new().unwrap();
    if !loop_devices_usable(&dir) {
        return;
    }
    let old = fixture("gpt", &dir);
    let old_len = std::fs::metadata(&old).unwrap().len();
    let image = dir.path().join("big.img");
    build_image_sized(&image, 1024);
    let archive = xz(&image, &dir);
    let len = std::fs::metadata(&image).unwrap().len() + (8 << 20);
    let (backing, dev) = used_card(&dir, "used", len, Some(&old));
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("piprov"))
        .env("PIPROV_CACHE_DIR", dir.path().join("cache"))
        .args([
            "flash",
            "--as-is",
            "--yes",
            "--quiet",
            "--allow-non-removable",
        ])
        .arg(&archive)
        .arg(&dev.dev)
        .spawn()
        .unwrap();
    // The boot partition's first sector: among the first data decoded.
    let (boot, _) = partition_extent(&image, 1);
    let expected = read_at(&image, boot, 512);
    let started = std::time::Instant::now();
    while read_at(&backing, boot, 512) != expected {
        assert!(started.elapsed().as_secs() < 60, "flash never wrote");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the flash ended before it could be cut off: make the image bigger"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    child.wait().unwrap();
    let card = card_as_image(&dir, dev, &backing, len);
    assert_no_partition_table(&card, old_len);
}
