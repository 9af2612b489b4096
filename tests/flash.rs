//! `piprov flash` to files and, as root, to loop devices: every format, the map
//! on a card full of old data, stamps per card, a failing card in a batch, and
//! every refusal.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::card::shared_recipe;
use common::disk::*;
use common::*;
use predicates::str::contains;
use tempfile::TempDir;

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

/// `piprov flash IMAGE CARD --yes --json`, which must succeed: its JSON lines.
fn flash_json(dir: &TempDir, image: &Path, card: &Path) -> Vec<serde_json::Value> {
    let out = succeed(
        flash_as_is(dir)
            .arg(image)
            .arg(card)
            .args(["--yes", "--json"]),
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// A used card: it held an older image (another disk id, other files) and
/// random bytes everywhere else. A file target starts empty, so only a device
/// can hold stale data.
#[test]
fn the_map_is_safe_on_a_card_full_of_old_data() {
    let dir = TempDir::new().unwrap();
    if !loop_devices_usable(&dir) {
        return;
    }
    let image = fixture("registered", &dir);
    let old = fixture("golden", &dir);
    let len = std::fs::metadata(&image).unwrap().len();
    let (backing, dev) = used_card(&dir, "used", len + (8 << 20), Some(&old));
    let recipe = shared_recipe(dir.path(), "");
    flash(&dir)
        .arg(&image)
        .arg(&dev.dev)
        .arg("--recipe")
        .arg(&recipe)
        .args([
            "--hostname",
            "door-{n}",
            "--yes",
            "--quiet",
            "--allow-non-removable",
        ])
        .assert()
        .success()
        .stdout(contains("ok,"))
        .stdout(contains("verified"))
        .stdout(contains("hostname door-1"));
    let card = card_as_image(&dir, dev, &backing, len);
    assert_card_holds(&card, &image, "door-1", dir.path());
    assert!(
        String::from_utf8_lossy(&boot_files(&card)["cmdline.txt"])
            .contains("systemd.run=/boot/firmware/piprov-install.sh")
    );
}

#[test]
fn every_archive_format_gives_the_same_card() {
    let dir = TempDir::new().unwrap();
    let image = fixture("golden", &dir);
    let reference = dir.path().join("reference.img");
    flash_as_is(&dir)
        .arg(&image)
        .arg(&reference)
        .args(["--full", "--quiet"])
        .assert()
        .success();
    assert_eq!(
        std::fs::read(&reference).unwrap(),
        std::fs::read(&image).unwrap(),
        "--full copies every byte"
    );
    let shell = |cmd: String| {
        assert!(
            Command::new("sh")
                .arg("-c")
                .arg(&cmd)
                .status()
                .unwrap()
                .success(),
            "{cmd}"
        )
    };
    let i = image.display();
    let d = dir.path().display();
    // Several xz blocks, so that the decoder can use more than one thread.
    shell(format!(
        "xz -T2 --block-size=16MiB -1 -c '{i}' > '{d}/a.xz'"
    ));
    shell(format!("gzip -1 -c '{i}' > '{d}/a.gz'"));
    shell(format!("zstd -q -1 -c '{i}' > '{d}/a.zst'"));
    shell(format!("bzip2 -1 -c '{i}' > '{d}/a.bz2'"));
    shell(format!(
        "cd '{d}' && cp '{i}' disk.img && zip -q -1 a.zip disk.img && rm disk.img"
    ));
    let expected = sha256_of(&image);
    for name in ["a.xz", "a.gz", "a.zst", "a.bz2", "a.zip"] {
        // Named without a telling suffix: formats are recognised by content.
        let renamed = dir.path().join(format!("{name}.download"));
        std::fs::rename(dir.path().join(name), &renamed).unwrap();
        let card = dir.path().join(format!("{name}.card"));
        flash_as_is(&dir)
            .arg(&renamed)
            .arg(&card)
            .args(["--full", "--quiet", "--sha256", &expected])
            .assert()
            .success();
        assert_eq!(sha256_of(&card), expected, "{name}");
    }
}

#[test]
fn a_truncated_archive_fails_before_any_card_is_touched() {
    let dir = TempDir::new().unwrap();
    let image = fixture("golden", &dir);
    let whole = dir.path().join("whole.img.xz");
    let xz = dir.path().join("a.img.xz");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "xz -1 -c '{}' > '{}'",
            image.display(),
            whole.display()
        ))
        .status()
        .unwrap();
    assert!(status.success());
    let data = std::fs::read(&whole).unwrap();
    std::fs::write(&xz, &data[..data.len() / 2]).unwrap();
    let card = dir.path().join("card.img");
    std::fs::write(&card, b"old data").unwrap();
    flash_as_is(&dir)
        .arg(&xz)
        .arg(&card)
        .args(["--yes", "--quiet"])
        .assert()
        .code(2)
        .stderr(contains("the archive is truncated or corrupt"));
    assert_eq!(std::fs::read(&card).unwrap(), b"old data");
    assert!(
        std::fs::read_dir(dir.path().join("cache"))
            .unwrap()
            .all(|e| !e.unwrap().file_name().to_string_lossy().ends_with(".img")),
        "no half-decoded image is cached"
    );
}

#[test]
fn a_wrong_sha256_is_refused() {
    let dir = TempDir::new().unwrap();
    let image = fixture("golden", &dir);
    let card = dir.path().join("card.img");
    flash_as_is(&dir)
        .arg(&image)
        .arg(&card)
        .args(["--quiet", "--sha256", &"0".repeat(64)])
        .assert()
        .code(1)
        .stderr(contains("not the expected 0000"))
        .stderr(contains("hold no partition table"));
    // A raw image is hashed while it is written, and checked before the
    // tables go down.
    let head = std::fs::read(&card).unwrap();
    assert!(
        head[..1 << 20].iter().all(|&b| b == 0),
        "no partition table"
    );
    // Once its hash is known, a wrong one is refused before anything is written.
    let other = dir.path().join("other.img");
    flash_as_is(&dir)
        .arg(&image)
        .arg(&other)
        .args(["--quiet", "--sha256", &"0".repeat(64)])
        .assert()
        .code(2)
        .stderr(contains("not the expected 0000"));
    assert!(!other.exists());
}

#[test]
fn a_batch_stamps_each_card_and_reports_a_failed_one() {
    let dir = TempDir::new().unwrap();
    let image = fixture("golden", &dir);
    let recipe = shared_recipe(dir.path(), "");
    let cards: Vec<PathBuf> = (1..=3)
        .map(|i| dir.path().join(format!("card{i}.img")))
        .collect();
    // A file on a full filesystem: it passes the checks and opens, then its
    // writes fail; the other cards are written all the same.
    let Some(_small) = SmallFs::mount(&dir.path().join("small")) else {
        return;
    };
    let targets = dir.path().join("targets.csv");
    std::fs::write(
        &targets,
        format!(
            "device,hostname,overrides\n{},lab-a\n{},lab-b,sudo.strip_nopasswd=false\n{}/small/card.img,lab-c\n",
            cards[0].display(),
            cards[1].display(),
            dir.path().display()
        ),
    )
    .unwrap();
    let manifest = dir.path().join("cards.jsonl");
    let out = flash(&dir)
        .arg(&image)
        .arg("--targets-file")
        .arg(&targets)
        .arg("--recipe")
        .arg(&recipe)
        .arg("--manifest")
        .arg(&manifest)
        .args(["--json"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "one card failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&manifest)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["result"], "ok");
    assert_eq!(lines[0]["hostname"], "lab-a");
    assert_eq!(
        lines[0]["activation_id"],
        "0a0a0a0a-0000-4000-8000-000000000001"
    );
    assert_eq!(lines[0]["verified"], true);
    assert_eq!(lines[0]["image_sha256"], sha256_of(&image).as_str());
    assert_eq!(lines[2]["result"], "failed");
    assert!(
        lines[2]["error"]
            .as_str()
            .unwrap()
            .contains("No space left"),
        "{}",
        lines[2]["error"]
    );
    let manifest_text = std::fs::read_to_string(&manifest).unwrap();
    assert!(
        !manifest_text.contains(common::card::SHARED_CODE),
        "no secret in the manifest"
    );
    let a = String::from_utf8(boot_files(&cards[0])["piprov.conf"].clone()).unwrap();
    let b = String::from_utf8(boot_files(&cards[1])["piprov.conf"].clone()).unwrap();
    assert!(
        a.contains("HOSTNAME_PATTERN=lab-a\n") && a.contains("STRIP_NOPASSWD=1\n"),
        "{a}"
    );
    assert!(
        b.contains("HOSTNAME_PATTERN=lab-b\n") && b.contains("STRIP_NOPASSWD=0\n"),
        "{b}"
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout
            .lines()
            .last()
            .unwrap()
            .contains("\"event\":\"summary\""),
        "{stdout}"
    );
}

#[test]
fn existing_data_is_not_overwritten_without_confirmation() {
    let dir = TempDir::new().unwrap();
    let image = fixture("golden", &dir);
    let card = dir.path().join("card.img");
    std::fs::write(&card, b"precious").unwrap();
    flash_as_is(&dir)
        .arg(&image)
        .arg(&card)
        .arg("--quiet")
        .write_stdin("")
        .assert()
        .code(2)
        .stderr(contains("without confirmation: pass --yes"));
    assert_eq!(std::fs::read(&card).unwrap(), b"precious");
}

/// bmaptool, for the tests of its block maps.
fn bmaptool_usable() -> bool {
    let found = Command::new("bmaptool").arg("--version").output();
    available(
        found.is_ok_and(|o| o.status.success()),
        "bmaptool (apt-get install bmap-tools)",
    )
}

#[test]
fn loop_devices_as_a_bench_of_cards() {
    let dir = TempDir::new().unwrap();
    if !loop_devices_usable(&dir) {
        return;
    }
    let image = fixture("registered", &dir);
    let len = std::fs::metadata(&image).unwrap().len();
    let recipe = shared_recipe(dir.path(), "");
    let mut loops = Vec::new();
    for i in 0..2 {
        let backing = dir.path().join(format!("dev{i}.img"));
        fill_random(&backing, len + (8 << 20));
        loops.push((backing.clone(), Loop::new(&backing, &[]).unwrap()));
    }
    // Not removable: refused without the flag, naming the device and the reason.
    flash_as_is(&dir)
        .arg(&image)
        .arg(&loops[0].1.dev)
        .args(["--yes", "--quiet"])
        .assert()
        .code(2)
        .stderr(contains(loops[0].1.dev.as_str()))
        .stderr(contains("not a removable device"));
    flash(&dir)
        .arg(&image)
        .args(loops.iter().map(|(_, l)| l.dev.clone()))
        .arg("--recipe")
        .arg(&recipe)
        .args([
            "--hostname",
            "bench-{n}",
            "--yes",
            "--quiet",
            "--allow-non-removable",
        ])
        .assert()
        .success();
    for (i, (backing, l)) in loops.into_iter().enumerate() {
        let card = card_as_image(&dir, l, &backing, len);
        assert_card_holds(&card, &image, &format!("bench-{}", i + 1), dir.path());
    }
}

#[test]
fn loop_devices_that_must_be_refused() {
    let dir = TempDir::new().unwrap();
    if !loop_devices_usable(&dir) {
        return;
    }
    let image = fixture("golden", &dir);
    let len = std::fs::metadata(&image).unwrap().len();
    let refuse = |dev: &str, reason: &str| {
        flash_as_is(&dir)
            .arg(&image)
            .arg(dev)
            .args(["--yes", "--quiet", "--allow-non-removable"])
            .assert()
            .code(2)
            .stderr(contains(dev))
            .stderr(contains(reason));
    };
    // `piprov devices` lists each with flash's own verdict.
    let listed = |dev: &str, reason: &str| {
        let out = piprov().args(["devices", "--json"]).output().unwrap();
        assert!(out.status.success());
        let devices: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let device = devices
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["path"] == dev)
            .unwrap_or_else(|| panic!("{dev} is listed: {devices}"));
        assert_eq!(device["bus"], "loop");
        let refused = device["refused"].as_str().unwrap_or_default();
        assert!(
            refused.contains(reason),
            "{dev}: {refused:?} should say {reason:?}"
        );
        device.clone()
    };
    let small = dir.path().join("small.img");
    std::fs::File::create(&small)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let small = Loop::new(&small, &[]).unwrap();
    refuse(&small.dev, "the image needs");
    listed(&small.dev, "not a removable device");
    // One unit everywhere: the same device shows the same size in `devices`
    // and in flash's words, as `inspect` shows an image's.
    let mib = |bytes: u64| format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20));
    let size = &mib(len / 2);
    let table = String::from_utf8(piprov().arg("devices").output().unwrap().stdout).unwrap();
    let row = table.lines().find(|l| l.starts_with(&small.dev)).unwrap();
    assert!(row.contains(size), "{size} in {row}");
    flash_as_is(&dir)
        .arg(&image)
        .arg(&small.dev)
        .args(["--yes", "--quiet", "--allow-non-removable"])
        .assert()
        .stderr(contains(format!("{size}, NOT removable")))
        .stderr(contains(format!("the card holds {size}")));
    piprov()
        .arg("inspect")
        .arg(&image)
        .assert()
        .stdout(contains(format!("({})", mib(len))));

    let ro = dir.path().join("ro.img");
    std::fs::File::create(&ro).unwrap().set_len(len).unwrap();
    let ro = Loop::new(&ro, &["-r"]).unwrap();
    refuse(&ro.dev, "read-only");
    assert_eq!(listed(&ro.dev, "read-only")["read_only"], true);

    // Over 128 GB: more likely somebody's disk than an SD card (a sparse file).
    let large = dir.path().join("large.img");
    std::fs::File::create(&large)
        .unwrap()
        .set_len(130_000_000_000)
        .unwrap();
    let large = Loop::new(&large, &[]).unwrap();
    refuse(&large.dev, "larger than 128 GB");
    // Not removable comes first without --allow-non-removable, as in flash.
    listed(&large.dev, "not a removable device");

    // Held open exclusively by another program: the kernel answers EBUSY.
    let busy = dir.path().join("busy.img");
    std::fs::File::create(&busy).unwrap().set_len(len).unwrap();
    let busy = Loop::new(&busy, &[]).unwrap();
    let holder = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_EXCL)
            .open(&busy.dev)
            .unwrap()
    };
    refuse(&busy.dev, "the device is in use");
    drop(holder);

    // A card with a mounted partition (the ext4 root: not every kernel has vfat),
    // and the partition itself.
    let mounted = dir.path().join("mounted.img");
    std::fs::copy(&image, &mounted).unwrap();
    let mounted = Loop::new(&mounted, &["-P"]).unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let part = format!("{}p2", mounted.dev);
    make_partition_node(&part);
    let ok = Command::new("mount")
        .arg(&part)
        .arg(&mnt)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mounting {part}");
    refuse(&mounted.dev, "is mounted at");
    let device = listed(&mounted.dev, "is mounted at");
    let name = part.trim_start_matches("/dev/");
    assert_eq!(
        device["in_use"],
        serde_json::json!([format!("{name} at {}", mnt.display())])
    );
    let table = piprov().arg("devices").output().unwrap();
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(
        table.lines().any(|l| l.starts_with(&mounted.dev)
            && l.contains("refuses: /dev/")
            && l.contains("is mounted at")),
        "{table}"
    );
    refuse(&part, "is a partition, not a whole card");

    // A card whose partition is active swap.
    let swap = dir.path().join("swap.img");
    std::fs::File::create(&swap).unwrap().set_len(len).unwrap();
    let swap = Loop::new(&swap, &[]).unwrap();
    assert!(
        Command::new("mkswap")
            .arg(&swap.dev)
            .output()
            .unwrap()
            .status
            .success()
    );
    /// Turns the swap off again even when an assertion fails: a leaked swap
    /// device would take pages from the rest of the machine's work.
    struct SwapOn<'a>(&'a str);
    impl Drop for SwapOn<'_> {
        fn drop(&mut self) {
            let off = Command::new("swapoff").arg(self.0).status();
            assert!(
                off.is_ok_and(|s| s.success()) || std::thread::panicking(),
                "swapoff {}",
                self.0
            );
        }
    }
    let on = Command::new("swapon").arg(&swap.dev).output().unwrap();
    if on.status.success() {
        let _on = SwapOn(&swap.dev);
        refuse(&swap.dev, "is in use as swap");
        listed(&swap.dev, "is in use as swap");
    } else {
        eprintln!(
            "skipping the swap refusal: swapon {} failed here: {}",
            swap.dev,
            String::from_utf8_lossy(&on.stderr).trim()
        );
    }
}

/// The disk holding `/` is refused for that reason, ahead of every other check.
/// Safe to run: no `--yes` and no terminal, so even a wrong answer would stop at
/// the confirmation before writing.
#[test]
fn the_system_disk_is_refused() {
    let dir = TempDir::new().unwrap();
    let root = Command::new("findmnt")
        .args(["-no", "SOURCE", "/"])
        .output()
        .unwrap();
    let source = String::from_utf8_lossy(&root.stdout).trim().to_string();
    if !source.starts_with("/dev/") {
        eprintln!("skipping: / is on {source:?}, not a block device");
        return;
    }
    let parent = Command::new("lsblk")
        .args(["-no", "PKNAME", &source])
        .output()
        .unwrap();
    let parent = String::from_utf8_lossy(&parent.stdout).trim().to_string();
    let disk = if parent.is_empty() {
        source
    } else {
        format!("/dev/{parent}")
    };
    let image = fixture("golden", &dir);
    flash_as_is(&dir)
        .arg(&image)
        .arg(&disk)
        .args(["--quiet", "--allow-non-removable", "--allow-large"])
        .assert()
        .code(2)
        .stderr(contains(disk.as_str()))
        .stderr(contains("holds the running system's root filesystem"));
}

#[test]
fn ctrl_c_stops_cleanly_and_leaves_no_bootable_half_card() {
    use std::os::unix::fs::MetadataExt;
    let dir = TempDir::new().unwrap();
    let image = dir.path().join("big.img");
    build_image_sized(&image, 1024);
    let card = dir.path().join("card.img");
    let bin = assert_cmd::cargo::cargo_bin("piprov");
    let child = Command::new(bin)
        .env("PIPROV_CACHE_DIR", dir.path().join("cache"))
        .args(["flash", "--as-is", "--full", "--quiet"])
        .arg(&image)
        .arg(&card)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt once data is landing on the card.
    let started = std::time::Instant::now();
    while std::fs::metadata(&card).map(|m| m.blocks()).unwrap_or(0) < 2048 {
        assert!(
            started.elapsed().as_secs() < 60,
            "flash never started writing"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("INTERRUPTED"), "{stdout}");
    assert!(stdout.contains("holds no partition table"), "{stdout}");
    let head = std::fs::read(&card).unwrap();
    assert!(
        head[..1 << 20].iter().all(|&b| b == 0),
        "the first MiB is written last: never, here"
    );
}

/// Flashes a 1 GiB image over a used card that held a GPT image, and sends
/// `signal` once the new image is landing but before it reaches the old
/// image's backup table (at 160 MiB). Returns what piprov printed and the
/// card's bytes as a file, with the old image's length.
fn interrupted_flash(dir: &TempDir, signal: nix::sys::signal::Signal) -> (String, PathBuf, u64) {
    let old = fixture("gpt", dir);
    let old_len = std::fs::metadata(&old).unwrap().len();
    let image = dir.path().join("big.img");
    if !image.exists() {
        build_image_sized(&image, 1024);
    }
    let len = std::fs::metadata(&image).unwrap().len() + (64 << 20);
    let (backing, dev) = used_card(dir, &format!("used-{signal}"), len, Some(&old));
    assert_eq!(&read_at(&backing, old_len - 512, 8), b"EFI PART");
    let child = Command::new(assert_cmd::cargo::cargo_bin("piprov"))
        .env("PIPROV_CACHE_DIR", dir.path().join("cache"))
        .args([
            "flash",
            "--full",
            "--yes",
            "--quiet",
            "--allow-non-removable",
        ])
        .arg(&image)
        .arg(&dev.dev)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let probe = 32 << 20;
    let expected = read_at(&image, probe, 4096);
    let started = std::time::Instant::now();
    while read_at(&backing, probe, 4096) != expected {
        assert!(started.elapsed().as_secs() < 60, "flash never wrote");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    if signal == nix::sys::signal::Signal::SIGINT {
        assert_eq!(out.status.code(), Some(1), "{stdout}");
    }
    (stdout, card_as_image(dir, dev, &backing, len), old_len)
}

#[test]
fn an_interrupted_flash_of_a_used_card_leaves_it_with_no_partition_table() {
    let dir = TempDir::new().unwrap();
    if !loop_devices_usable(&dir) {
        return;
    }
    let (stdout, card, old_len) = interrupted_flash(&dir, nix::sys::signal::Signal::SIGINT);
    assert!(stdout.contains("INTERRUPTED"), "{stdout}");
    assert!(stdout.contains("holds no partition table"), "{stdout}");
    assert_no_partition_table(&card, old_len);
}

/// A power cut gives piprov no chance to clean up: the old tables were erased
/// and flushed before the first byte of the new image went down.
#[test]
fn a_killed_flash_of_a_used_card_leaves_it_with_no_partition_table() {
    let dir = TempDir::new().unwrap();
    if !loop_devices_usable(&dir) {
        return;
    }
    let (_, card, old_len) = interrupted_flash(&dir, nix::sys::signal::Signal::SIGKILL);
    assert_no_partition_table(&card, old_len);
}

/// Adds a file of random bytes at the top of an image's root filesystem.
fn add_root_file(image: &Path, dir: &TempDir, name: &str, bytes: u64) {
    let data = dir.path().join(format!("{name}.src"));
    fill_random(&data, bytes);
    edit_root(image, dir, &format!("write {} {name}", data.display()));
}

fn bmaptool_create(image: &Path, bmap: &Path) {
    let ok = Command::new("bmaptool")
        .args(["-q", "create", "-o"])
        .arg(bmap)
        .arg(image)
        .status()
        .unwrap()
        .success();
    assert!(ok, "bmaptool create");
}

#[test]
fn a_stale_bmap_is_caught_before_anything_is_written() {
    let dir = TempDir::new().unwrap();
    if !loop_devices_usable(&dir) || !bmaptool_usable() {
        return;
    }
    let image = fixture("golden", &dir);
    let bmap = dir.path().join("golden.img.bmap");
    bmaptool_create(&image, &bmap);
    // Changed after the bmap was made: a file added to its ext4.
    add_root_file(&image, &dir, "added.bin", 3 << 20);
    let len = std::fs::metadata(&image).unwrap().len();
    let (backing, dev) = used_card(&dir, "used", len + (8 << 20), None);

    // Named with --bmap: refused, and the card is as it was.
    let before = sha256_of(&backing);
    flash_as_is(&dir)
        .arg(&image)
        .arg(&dev.dev)
        .arg("--bmap")
        .arg(&bmap)
        .args(["--yes", "--quiet", "--allow-non-removable"])
        .assert()
        .code(2)
        .stderr(contains("do not match the bmap's checksum"));
    assert_eq!(sha256_of(&backing), before, "nothing was written");

    // Found beside the image: a warning, and the map of the filesystems.
    let out = succeed(flash_as_is(&dir).arg(&image).arg(&dev.dev).args([
        "--yes",
        "--json",
        "--allow-non-removable",
    ]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: ignoring") && stderr.contains("golden.img.bmap"),
        "{stderr}"
    );
    let card = card_as_image(&dir, dev, &backing, len);
    fsck_clean(&card, dir.path());
    let files = root_files(&card);
    assert!(files.contains_key("/added.bin"));
    assert_eq!(files, root_files(&image), "every file, the new one too");
}

#[test]
fn a_bmap_that_matches_is_used_on_a_used_card() {
    let dir = TempDir::new().unwrap();
    if !loop_devices_usable(&dir) || !bmaptool_usable() {
        return;
    }
    let image = fixture("registered", &dir);
    // A file written and deleted: its blocks are free in the filesystem but
    // allocated in the image file, so the bmap names them and the map does not.
    add_root_file(&image, &dir, "deleted.bin", 2 << 20);
    edit_root(&image, &dir, "rm deleted.bin");
    let bmap = dir.path().join("registered.img.bmap");
    bmaptool_create(&image, &bmap);
    let len = std::fs::metadata(&image).unwrap().len();
    let (backing, dev) = used_card(&dir, "used", len + (8 << 20), Some(&image));
    let mapped = |extra: &[&str]| {
        let out = succeed(
            flash_as_is(&dir)
                .arg(&image)
                .arg(&dev.dev)
                .args(["--yes", "--json", "--allow-non-removable"])
                .args(extra),
        );
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!stderr.contains("warning"), "{stderr}");
        let last = String::from_utf8(out.stdout).unwrap();
        let summary: serde_json::Value =
            serde_json::from_str(last.lines().last().unwrap()).unwrap();
        assert_eq!(summary["ok"], 1, "{summary}");
        summary["mapped_bytes"].as_u64().unwrap()
    };
    let without = mapped(&["--no-bmap"]);
    fill_random(&backing, len + (8 << 20));
    let with = mapped(&[]);
    let text = std::fs::read_to_string(&bmap).unwrap();
    let bmap_bytes: u64 = text
        .rsplit("<MappedBlocksCount>")
        .next()
        .and_then(|s| s.split("</MappedBlocksCount>").next())
        .map(|s| s.trim().parse::<u64>().unwrap() * 4096)
        .unwrap();
    assert!(
        with > without && with >= bmap_bytes,
        "the bmap's ranges join the map: {with} with, {without} without, {bmap_bytes} in the bmap"
    );
    let card = card_as_image(&dir, dev, &backing, len);
    fsck_clean(&card, dir.path());
    assert_eq!(root_files(&card), root_files(&image));
}

/// Bytes the filesystem has allocated to a file.
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn a_file_target_holds_no_blocks_of_zeroes_and_full_writes_every_byte() {
    let dir = TempDir::new().unwrap();
    let image = fixture("golden", &dir);
    let card = dir.path().join("card.img");
    let lines = flash_json(&dir, &image, &card);
    let summary = lines.last().unwrap();
    let mapped = summary["mapped_bytes"].as_u64().unwrap();
    // The map holds the ext4 journal and the FATs' unused ends: runs of zeroes.
    assert!(
        allocated(&card) + (1 << 20) < mapped,
        "{} bytes allocated for {mapped} mapped",
        allocated(&card)
    );
    assert_eq!(lines[0]["card"]["verified"], true, "{lines:?}");
    assert_eq!(sha256_of(&card), sha256_of(&image), "the same bytes");

    let full = dir.path().join("full.img");
    flash_as_is(&dir)
        .arg(&image)
        .arg(&full)
        .args(["--full", "--yes", "--quiet"])
        .assert()
        .success();
    let len = std::fs::metadata(&image).unwrap().len();
    assert!(allocated(&full) >= len, "--full writes every byte");
    assert_eq!(sha256_of(&full), sha256_of(&image));
}

#[test]
fn the_image_itself_is_never_a_target() {
    let dir = TempDir::new().unwrap();
    let image = fixture("golden", &dir);
    let hash = sha256_of(&image);
    flash_as_is(&dir)
        .arg(&image)
        .arg(&image)
        .args(["--yes", "--quiet"])
        .assert()
        .code(2)
        .stderr(contains("it is the image being written"));
    assert_eq!(sha256_of(&image), hash);
}

/// A mistyped device (or a card not inserted yet) is refused before anything
/// is written, never made a file in /dev; so is a card image whose directory
/// does not exist. A new card image is the owner's alone: it holds the
/// card's secret.
#[test]
fn a_target_that_is_not_there_is_refused_and_a_new_image_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new().unwrap();
    let image = fixture("golden", &dir);
    let missing =
        std::path::PathBuf::from(format!("/dev/piprov-test-no-card-{}", std::process::id()));
    let out = flash(&dir)
        .arg(&image)
        .arg(&missing)
        .args(["--yes", "--quiet"])
        .output()
        .unwrap();
    let made = missing.exists();
    let _ = std::fs::remove_file(&missing);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(!made, "a file was made in /dev: {err}");
    assert!(
        err.contains(&format!(
            "no such device {}: is the card inserted?",
            missing.display()
        )) && err.contains("piprov devices"),
        "{err}"
    );
    let nowhere = dir.path().join("no-such-dir/card.img");
    flash(&dir)
        .arg(&image)
        .arg(&nowhere)
        .args(["--yes", "--quiet"])
        .assert()
        .code(2)
        .stderr(contains("does not exist"));
    let recipe = shared_recipe(dir.path(), "");
    let card = dir.path().join("card.img");
    succeed(
        flash(&dir)
            .arg(&image)
            .arg(&card)
            .arg("--recipe")
            .arg(&recipe)
            .args(["--yes", "--quiet"]),
    );
    let mode = std::fs::metadata(&card).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the card image holds the activation code");
}

/// The slips an operator makes, refused before any card is touched (exit 2,
/// the card file never made): a golden with a baked registration written
/// without a recipe (every card a clone; --as-is overrules and says so), a
/// hostname or --set with no recipe to apply them, one fixed hostname or one
/// single-use activation for several cards, a --sha256 that is not one.
#[test]
fn an_operator_slip_never_makes_a_clone() {
    let dir = TempDir::new().unwrap();
    let image = fixture("registered", &dir);
    let xz_image = dir.path().join("registered.img.xz");
    let status = Command::new("xz")
        .args(["-k", "-T2", "--block-size=4MiB"])
        .arg(&image)
        .status()
        .unwrap();
    assert!(status.success());
    let cards: Vec<PathBuf> = (1..=2)
        .map(|i| dir.path().join(format!("card{i}.img")))
        .collect();
    let refused = |args: &[&std::ffi::OsStr], why: &str| {
        let out = flash(&dir)
            .args(args)
            .args(["--yes", "--quiet"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(why), "{args:?}: {err}");
        for card in &cards {
            assert!(!card.exists(), "{args:?}: {} was made", card.display());
        }
    };
    let os = |s: &str| std::ffi::OsString::from(s);
    let (img, one, two) = (
        image.as_os_str(),
        cards[0].as_os_str(),
        cards[1].as_os_str(),
    );
    for source in [img, xz_image.as_os_str()] {
        refused(
            &[source, one],
            "SSM registration baked in: mi-0a1b2c3d4e5f60718",
        );
    }
    refused(&[img, one], "--as-is writes it unchanged anyway");
    refused(
        &[img, one, &os("--hostname"), &os("door-1")],
        "without --recipe: they have nothing to apply to",
    );
    refused(
        &[img, one, &os("--set"), &os("sudo.strip_nopasswd=false")],
        "without --recipe",
    );
    let recipe = common::card::shared_recipe(dir.path(), "");
    refused(
        &[
            img,
            one,
            two,
            &os("--recipe"),
            recipe.as_os_str(),
            &os("--hostname"),
            &os("door-1"),
        ],
        "hostname \"door-1\" on 2 cards",
    );
    std::fs::write(dir.path().join("one.code"), "CODE-1\n").unwrap();
    let single = dir.path().join("single.toml");
    std::fs::write(
        &single,
        "region = \"eu-west-1\"\nhostname = \"door-{n}\"\n[activation]\nsource = \"embedded\"\n\
         id = \"0a0a0a0a-0000-4000-8000-000000000009\"\ncode_file = \"one.code\"\n",
    )
    .unwrap();
    refused(
        &[img, one, two, &os("--recipe"), single.as_os_str()],
        "one activation",
    );
    for bad in ["abc", " 0123", &"g".repeat(64)] {
        refused(
            &[img, one, &os("--as-is"), &os("--sha256"), &os(bad)],
            "is not a SHA-256",
        );
    }

    // --as-is writes it unchanged, and the record says so.
    let out = succeed(
        flash(&dir)
            .arg(&image)
            .arg(&cards[0])
            .args(["--as-is", "--yes", "--json", "--sha256"])
            .arg(sha256_of(&image).to_uppercase()),
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("\"as_is\":true"), "{text}");
    assert_eq!(sha256_of(&cards[0]), sha256_of(&image));
}

/// --sha256 is checked against the bytes written, never a remembered hash: a
/// byte changed in the image with its mtime put back (the file's key in the
/// cache unchanged) fails the cards, which hold no partition table; a cached
/// decoded image whose bytes are not what its hash file says is thrown away
/// and decoded anew, so the card gets the real image.
#[test]
fn sha256_is_checked_against_the_bytes_not_a_remembered_hash() {
    let dir = TempDir::new().unwrap();
    let image = fixture("golden", &dir);
    let original = sha256_of(&image);
    let first = dir.path().join("first.img");
    succeed(
        flash_as_is(&dir)
            .arg(&image)
            .arg(&first)
            .args(["--yes", "--quiet"]),
    );
    // One byte in the ext4 partition changed, the mtime put back.
    let mtime = std::fs::metadata(&image).unwrap().modified().unwrap();
    let (root, _) = partition_extent(&image, 2);
    patch(&image, root + (1 << 20) + 4242, b"X");
    std::fs::File::options()
        .write(true)
        .open(&image)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let card = dir.path().join("card.img");
    let out = flash_as_is(&dir)
        .arg(&image)
        .arg(&card)
        .args(["--yes", "--quiet", "--sha256", &original])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(
        out.status.code(),
        Some(0),
        "the changed image passed as the original"
    );
    assert!(
        err.contains(&format!("not the expected {original}")),
        "{err}"
    );
    if card.exists() {
        let head = std::fs::read(&card).unwrap();
        assert!(
            head[..1 << 20].iter().all(|&b| b == 0),
            "no partition table"
        );
    }

    // A poisoned cache entry: the decoded image changed, its hash file kept.
    let clean = fixture("golden", &dir);
    let clean_sha = sha256_of(&clean);
    let status = Command::new("xz")
        .args(["-k", "-T2"])
        .arg(&clean)
        .status()
        .unwrap();
    assert!(status.success());
    let xz = dir.path().join("golden.img.xz");
    let warm = dir.path().join("warm.img");
    succeed(
        flash_as_is(&dir)
            .arg(&xz)
            .arg(&warm)
            .args(["--yes", "--quiet"]),
    );
    let cached: Vec<PathBuf> = std::fs::read_dir(dir.path().join("cache"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "img"))
        .collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    patch(&cached[0], root + (1 << 20) + 4242, b"X");
    let healed = dir.path().join("healed.img");
    succeed(
        flash_as_is(&dir)
            .arg(&xz)
            .arg(&healed)
            .args(["--yes", "--quiet", "--full", "--sha256", &clean_sha]),
    );
    assert_eq!(
        sha256_of(&healed),
        clean_sha,
        "the card holds the real image"
    );
}

/// The cache holds decoded images and remembered hashes: one that belongs to
/// someone else is refused, one others could write to is made private.
#[test]
fn the_cache_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new().unwrap();
    let image = fixture("golden", &dir);
    let cache = dir.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
    succeed(
        flash_as_is(&dir)
            .arg(&image)
            .arg(dir.path().join("card.img"))
            .args(["--yes", "--quiet"]),
    );
    let mode = std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    // Another user's cache (nobody's, 65534): refused, naming the way out.
    let chown = Command::new("chown")
        .arg("65534")
        .arg(&cache)
        .status()
        .unwrap();
    if !common::available(chown.success(), "chown (needs root)") {
        return;
    }
    flash_as_is(&dir)
        .arg(&image)
        .arg(dir.path().join("card2.img"))
        .args(["--yes", "--quiet", "--sha256", &sha256_of(&image)])
        .assert()
        .code(2)
        .stderr(contains("belongs to user 65534"))
        .stderr(contains("PIPROV_CACHE_DIR"));
}
