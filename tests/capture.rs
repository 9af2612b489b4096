//! `piprov capture`: a used card (a loop device over stale data) captured to a
//! small archive that decodes to a clean, whole image with none of the card's
//! deleted data; bmaptool and flash take it; GPT and MBR both shrink; SRC is
//! never changed; bad sources, mounted cards and Ctrl-C leave nothing behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::disk::*;
use common::*;
use tempfile::TempDir;

/// Written into a file that is then deleted: still in the card's free blocks.
const MARKER: &str = "PIPROV-DELETED-SECRET-7f3a91";

fn image_of(dir: &TempDir, name: &str, args: &[&str]) -> PathBuf {
    let out = dir.path().join(name);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/make-image.sh");
    let made = Command::new("sh")
        .arg(script)
        .args(["--size", "512"])
        .args(args)
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    out
}

/// A set-up Pi's root: a file deleted after use (its blocks free, its bytes
/// still there), a symlink, and a file with its own owner and mode.
fn set_up(image: &Path, dir: &TempDir) {
    let old = dir.path().join("old-secret");
    std::fs::write(&old, MARKER.repeat(4096)).unwrap();
    edit_root(
        image,
        dir,
        &format!("write {} /home/pi/old-secret", old.display()),
    );
    edit_root(image, dir, "rm /home/pi/old-secret");
    edit_root(image, dir, "symlink /home/pi/hostname-link /etc/hostname");
    let own = dir.path().join("own");
    std::fs::write(&own, b"kept with its owner and mode\n").unwrap();
    edit_root(image, dir, &format!("write {} /home/pi/own", own.display()));
    edit_root(image, dir, "sif /home/pi/own mode 0100640");
    edit_root(image, dir, "sif /home/pi/own uid 1000");
    edit_root(image, dir, "sif /home/pi/own gid 1000");
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// Every entry of partition 2's ext4 (debugfs rdump, as root: owners and
/// modes kept): type, mode, owner, and content or link target.
fn tree(image: &Path, dir: &TempDir, name: &str) -> Vec<(String, String)> {
    let part = dir.path().join(format!("{name}.root"));
    extract_partition(image, 2, &part);
    let out = dir.path().join(format!("{name}.tree"));
    std::fs::create_dir(&out).unwrap();
    let dumped = Command::new("debugfs")
        .args(["-R", &format!("rdump / {}", out.display())])
        .arg(&part)
        .output()
        .unwrap();
    assert!(
        dumped.status.success(),
        "{}",
        String::from_utf8_lossy(&dumped.stderr)
    );
    let mut entries = Vec::new();
    walk(&out, &out, &mut entries);
    entries.sort();
    entries
}

fn walk(root: &Path, at: &Path, out: &mut Vec<(String, String)>) {
    use std::os::unix::fs::MetadataExt;
    for entry in std::fs::read_dir(at).unwrap() {
        let path = entry.unwrap().path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let what = if meta.file_type().is_symlink() {
            format!("link {}", std::fs::read_link(&path).unwrap().display())
        } else if meta.is_dir() {
            walk(root, &path, out);
            "dir".to_string()
        } else {
            format!("file {}", sha256_of(&path))
        };
        let mode = if meta.file_type().is_symlink() {
            0
        } else {
            meta.mode()
        };
        out.push((
            path.strip_prefix(root).unwrap().display().to_string(),
            format!("{what} mode {mode:o} owner {}:{}", meta.uid(), meta.gid()),
        ));
    }
}

fn capture(args: &[&str]) -> (Option<i32>, serde_json::Value, String) {
    let out = piprov().arg("capture").args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.code(), json, stderr)
}

fn xz_decode(archive: &Path, out: &Path) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "xz -dc '{}' > '{}'",
            archive.display(),
            out.display()
        ))
        .status()
        .unwrap()
        .success();
    assert!(ok, "xz -d {}", archive.display());
}

/// A used card, captured: the archive decodes to an image smaller than the
/// card whose filesystems pass fsck and hold every file as the card does
/// (content, owner, mode, symlink), without the card's deleted data; its
/// sha256 file checks; `bmaptool copy` with its bmap gives the same image;
/// `flash` writes it to a larger card; the card is unchanged.
#[test]
fn a_used_card_is_captured_small_clean_and_whole() {
    let dir = TempDir::new().unwrap();
    if !loop_devices_usable(&dir) {
        return;
    }
    let image = image_of(&dir, "pi.img", &[]);
    set_up(&image, &dir);
    let card_len = 640u64 << 20;
    let (backing, src) = used_card(&dir, "pi-card", card_len, Some(&image));
    assert!(
        contains(&std::fs::read(&backing).unwrap(), MARKER),
        "the card holds the deleted file"
    );
    let before = sha256_of(Path::new(&src.dev));

    let out = dir.path().join("golden.img.xz");
    let (code, json, stderr) = capture(&["--json", &src.dev, out.to_str().unwrap()]);
    assert!(matches!(code, Some(0 | 1)), "{stderr}");
    assert_eq!(sha256_of(Path::new(&src.dev)), before, "SRC is only read");
    let summary = &json["summary"];
    assert_eq!(summary["shrunk_partition"], 2, "{json}");
    let after = summary["image_bytes_after"].as_u64().unwrap();
    assert!(after < 512 << 20, "shrunk: {summary}");
    // What the filesystems use, and the card's first MiBs before them (the
    // card's stale tail after the last partition is no part of the image).
    assert!(
        summary["bytes_read"].as_u64().unwrap() < 64 << 20,
        "read only what is used: {summary}"
    );
    assert!(json["audit"]["findings"].is_array(), "{json}");
    // One xz block per span of the shrunk image (12 MiB at -3, 24 MiB at -6).
    let blocks = &summary["xz_blocks"];
    assert_eq!(
        blocks["total"].as_u64().unwrap(),
        after.div_ceil(24 << 20),
        "{summary}"
    );
    assert!(blocks["made_ahead"].as_u64().unwrap() <= blocks["total"].as_u64().unwrap());

    // The archive's hash, as sha256sum checks it.
    let checked = Command::new("sha256sum")
        .args(["-c", "golden.img.xz.sha256"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stdout)
    );
    assert_eq!(summary["sha256"].as_str().unwrap(), sha256_of(&out));

    let decoded = dir.path().join("decoded.img");
    xz_decode(&out, &decoded);
    assert_eq!(std::fs::metadata(&decoded).unwrap().len(), after);
    fsck_clean(&decoded, dir.path());
    let verify = Command::new("sfdisk")
        .arg("--verify")
        .arg(&decoded)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let card_image = dir.path().join("card-as-read.img");
    std::fs::copy(&backing, &card_image).unwrap();
    assert_eq!(
        tree(&card_image, &dir, "card"),
        tree(&decoded, &dir, "captured")
    );
    assert_eq!(boot_files(&card_image), boot_files(&decoded));
    assert!(
        !contains(&std::fs::read(&decoded).unwrap(), MARKER),
        "the deleted file's bytes are gone"
    );

    // bmaptool finds golden.img.bmap beside golden.img.xz and checks it.
    let copy = dir.path().join("bmaptool-copy.img");
    let copied = Command::new("bmaptool")
        .arg("copy")
        .arg(&out)
        .arg(&copy)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&copied.stderr);
    assert!(copied.status.success(), "{said}");
    assert!(
        said.contains("golden.img.bmap"),
        "bmaptool used the bmap: {said}"
    );
    assert_eq!(sha256_of(&copy), sha256_of(&decoded));

    // Flashed onto a larger used card.
    let (larger, target) = used_card(&dir, "larger", 1 << 30, None);
    succeed(
        piprov()
            .args(["flash", "--yes", "--allow-non-removable"])
            .arg(&out)
            .arg(&target.dev),
    );
    let flashed = card_as_image(&dir, target, &larger, after);
    fsck_clean(&flashed, dir.path());
    assert_eq!(root_files(&flashed), root_files(&decoded));
}

/// A GPT card shrinks too: its partition's end moves, and the backup header
/// sits at the new end (`sfdisk --verify`), every file kept.
#[test]
fn a_gpt_image_shrinks_with_its_backup_header_at_the_new_end() {
    let dir = TempDir::new().unwrap();
    let image = image_of(&dir, "gpt.img", &["--variant", "gpt"]);
    let before = sha256_of(&image);
    let out = dir.path().join("gpt-golden.img");
    let (code, json, stderr) = capture(&["--json", image.to_str().unwrap(), out.to_str().unwrap()]);
    assert!(matches!(code, Some(0 | 1)), "{stderr}");
    assert_eq!(sha256_of(&image), before);
    let len = std::fs::metadata(&out).unwrap().len();
    assert_eq!(json["summary"]["image_bytes_after"].as_u64().unwrap(), len);
    assert!(len < 512 << 20);
    let dump = Command::new("sfdisk").arg("-d").arg(&out).output().unwrap();
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(dump.contains("label: gpt"), "{dump}");
    assert!(
        dump.contains(&format!("last-lba: {}", len / 512 - 34)),
        "{dump}"
    );
    let verify = Command::new("sfdisk")
        .arg("--verify")
        .arg(&out)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&verify.stdout);
    assert!(
        verify.status.success() && said.contains("No errors detected"),
        "{said}"
    );
    fsck_clean(&out, dir.path());
    assert_eq!(root_files(&out), root_files(&image));
    assert!(Path::new(&format!("{}.bmap", out.display())).exists());
}

/// A card whose partition is mounted is refused before anything is made.
#[test]
fn a_mounted_card_is_refused() {
    let dir = TempDir::new().unwrap();
    if !loop_devices_usable(&dir) {
        return;
    }
    let image = fixture("golden", &dir);
    let card = Loop::new(&image, &["-P"]).unwrap();
    let part = format!("{}p2", card.dev);
    make_partition_node(&part);
    let at = dir.path().join("mnt");
    std::fs::create_dir(&at).unwrap();
    let mounted = Command::new("mount").arg(&part).arg(&at).status().unwrap();
    assert!(mounted.success());
    let out = dir.path().join("captured.img.xz");
    let (code, _, stderr) = capture(&[&card.dev, out.to_str().unwrap()]);
    let _ = Command::new("umount").arg(&at).status();
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("is mounted at"), "{stderr}");
    assert_nothing_left(dir.path(), "captured");
}

fn assert_nothing_left(dir: &Path, stem: &str) {
    let left: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(stem) || n.starts_with(".piprov-capture-"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Ctrl-C mid-capture: no archive, no bmap, no sha256 file, no temporary one.
#[test]
fn ctrl_c_mid_capture_leaves_nothing() {
    let dir = TempDir::new().unwrap();
    let image = image_of(&dir, "pi.img", &[]);
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("golden.img.xz");
    let child = std::process::Command::new(assert_cmd::cargo::cargo_bin("piprov"))
        .arg("capture")
        .arg(&image)
        .arg(&out)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !std::fs::read_dir(&out_dir).unwrap().any(|e| {
        e.unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".piprov-capture-")
    }) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no temporary folder"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let done = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert_eq!(done.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert_nothing_left(&out_dir, "golden");
}

/// A source cut short, or whose root filesystem is damaged, gets an error
/// naming what is wrong, and nothing is made.
#[test]
fn a_damaged_source_is_named_and_nothing_is_made() {
    let dir = TempDir::new().unwrap();
    let image = image_of(&dir, "pi.img", &[]);
    let (root_start, _) = partition_extent(&image, 2);

    let cut = dir.path().join("cut.img");
    std::fs::copy(&image, &cut).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&cut)
        .unwrap()
        .set_len(root_start + (8 << 20))
        .unwrap();
    let out = dir.path().join("golden.img.xz");
    let (code, _, stderr) = capture(&[cut.to_str().unwrap(), out.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("cut.img"), "{stderr}");
    assert!(
        stderr.contains("truncated")
            || stderr.contains("past the end")
            || stderr.contains("beyond"),
        "{stderr}"
    );
    assert_nothing_left(dir.path(), "golden");

    // The root directory's inode cleared: e2fsck will not mend that unasked.
    edit_root(&image, &dir, "clri <2>");
    let (code, _, stderr) = capture(&[image.to_str().unwrap(), out.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("partition 2"), "{stderr}");
    assert_nothing_left(dir.path(), "golden");
}

/// `--stamp`: the captured image is stamped in the same run (the audit shows
/// the stamp) and ready to flash; a recipe that will not do is refused before
/// the card is read, and nothing is made.
#[test]
fn a_capture_stamped_in_the_same_run_is_ready_to_flash() {
    let dir = TempDir::new().unwrap();
    let image = fixture("registered", &dir);
    let recipe = common::card::shared_recipe(dir.path(), "");
    let out = dir.path().join("stamped.img");
    let (code, json, stderr) = capture(&[
        "--json",
        "--stamp",
        recipe.to_str().unwrap(),
        "--hostname",
        "door-{serial}",
        image.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert!(matches!(code, Some(0 | 1)), "{stderr}");
    assert!(
        json["summary"]["stamped_changes"].as_u64().unwrap() > 0,
        "{json}"
    );
    let stamp = &json["audit"]["stamp"];
    assert_eq!(stamp["activation"]["id"], common::card::SHARED_ID, "{json}");
    assert_eq!(inspect_json(&out)["stamp"], *stamp);

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"x\"\nregion = \"nowhere-1\"\n[activation]\nsource = \"nope\"\n",
    )
    .unwrap();
    let again = dir.path().join("again.img.xz");
    let (code, _, stderr) = capture(&[
        "--stamp",
        bad.to_str().unwrap(),
        image.to_str().unwrap(),
        again.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("bad.toml"), "{stderr}");
    assert_nothing_left(dir.path(), "again");
}
