//! End to end: cards booted in virtual machines (`make e2e`; ignored by `cargo
//! test`). An arm64 Debian image laid out like Raspberry Pi OS is built with
//! debootstrap (tests/e2e/), registered once as a golden taken from a working
//! Pi, captured (shrunk to what it uses and stamped in the same run, as
//! `piprov capture --stamp` does), flashed to three cards larger than the
//! captured image; each card boots in its own simulated Pi
//! (tests/e2e/board.rs: the kernel, initramfs and stamped cmdline.txt from the
//! FAT partition, the board's serial in its device tree). Card 1 is then copied
//! byte for byte and booted in a fourth Pi, booted again in its own, and in its
//! own with another network card. The guests reach the SSM endpoint and the
//! broker only through QEMU user networking (10.0.2.2 is this machine's loopback).

#[path = "e2e/board.rs"]
mod board;
mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use board::{Board, Qemu, boot_file};
use common::broker::BrokerProcess;
use common::ssm_endpoint::SsmEndpoint;
use common::{inspect_json, partition_extent, succeed};
use tempfile::TempDir;

const GUEST_HOST: &str = "10.0.2.2";

fn e2e_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e")
}

fn cache_dir() -> PathBuf {
    std::env::var_os("PIPROV_E2E_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/piprov-e2e"))
}

/// Where a test's cards and logs go; kept after the run with PIPROV_E2E_KEEP=1,
/// to look at a failed boot's serial log and cards.
struct WorkDir {
    /// Removes the folder when dropped; None when it is kept.
    _removed: Option<TempDir>,
    path: PathBuf,
}

impl WorkDir {
    fn path(&self) -> &Path {
        &self.path
    }
}

fn work_dir() -> WorkDir {
    let dir = TempDir::new_in("/var/tmp").unwrap();
    let path = dir.path().to_path_buf();
    if std::env::var_os("PIPROV_E2E_KEEP").is_some() {
        eprintln!("e2e: keeping {}", path.display());
        let _ = dir.keep();
        WorkDir {
            _removed: None,
            path,
        }
    } else {
        WorkDir {
            _removed: Some(dir),
            path,
        }
    }
}

/// The golden of a suite (bookworm, trixie): built, then registered once
/// through the endpoint. Its path, its mi- id and its inspect report.
fn golden_image(d: &Path, ssm: &SsmEndpoint, suite: &str) -> (PathBuf, String, serde_json::Value) {
    let rootfs = Command::new("sh")
        .arg(e2e_dir().join("make-rootfs.sh"))
        .arg(cache_dir())
        .arg(suite)
        .output()
        .unwrap();
    assert!(
        rootfs.status.success(),
        "{}",
        String::from_utf8_lossy(&rootfs.stderr)
    );
    let rootfs = String::from_utf8(rootfs.stdout).unwrap().trim().to_string();
    let code_file = d.join(format!("golden-{suite}.code"));
    let created = ssm
        .piprov()
        .args([
            "activation",
            "create",
            "--role",
            "SSMServiceRole",
            "--json",
            "--code-file",
        ])
        .arg(&code_file)
        .output()
        .unwrap();
    let created: serde_json::Value = serde_json::from_slice(&created.stdout).unwrap();
    let golden = d.join(format!("golden-{suite}.img"));
    let made = Command::new("sh")
        .arg(e2e_dir().join("make-vm-image.sh"))
        .arg(&rootfs)
        .arg(&golden)
        .arg(ssm.url())
        .arg(format!(
            "http://{GUEST_HOST}:{}",
            ssm.url().rsplit(':').next().unwrap()
        ))
        .arg(created["activation_id"].as_str().unwrap())
        .arg(&code_file)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let golden_id = String::from_utf8(made.stdout).unwrap().trim().to_string();
    assert!(golden_id.starts_with("mi-"), "{golden_id}");
    let report = inspect_json(&golden);
    assert_eq!(report["registration"]["instance_id"], golden_id.as_str());
    (golden, golden_id, report)
}

/// A Pi 4's serial, as its firmware writes it into the device tree: 16 hex digits.
fn pi_serial(board: u32) -> String {
    format!("10000000e2e0{board:04x}")
}

/// The SSM endpoint and a broker in front of it, reachable from the guests;
/// the broker's enrollment token.
fn endpoint_and_broker(d: &Path, token_args: &[&str]) -> (SsmEndpoint, BrokerProcess, String) {
    let ssm = SsmEndpoint::start_for(d, 0, 3600);
    let mut broker = BrokerProcess::init_named(d, &ssm, &[], &[GUEST_HOST]);
    let token = broker.add_token("e2e", token_args);
    broker.start();
    (ssm, broker, token)
}

/// The virtual cards: larger than the golden's card, as the next cards bought
/// usually are, and far larger than its captured image.
const CARD_BYTES: u64 = 3 << 30;

/// The golden captured as a fleet's golden is (`piprov capture --stamp`): its
/// root shrunk to what it uses, stamped with `recipe`, in a zstd archive (xz's
/// CPU time would be wasted here). Returns the archive.
fn capture_stamped(ssm: &SsmEndpoint, golden: &Path, recipe: &Path, d: &Path) -> PathBuf {
    let name = golden.file_stem().unwrap().to_str().unwrap();
    let archive = d.join(format!("{name}-captured.img.zst"));
    let out = ssm
        .piprov()
        .args(["capture", "--json", "--stamp"])
        .arg(recipe)
        .arg(golden)
        .arg(&archive)
        .output()
        .unwrap();
    // Exit 1: the audit names the hazards the golden carries (the guard's work).
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = &serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["summary"];
    let after = summary["image_bytes_after"].as_u64().unwrap();
    assert_eq!(summary["shrunk_partition"], 2, "{summary}");
    assert!(
        after < summary["image_bytes_before"].as_u64().unwrap() && after < CARD_BYTES / 2,
        "{summary}"
    );
    eprintln!(
        "e2e: {} captured: {} MiB shrunk to {} MiB, archive {} MiB",
        golden.display(),
        summary["image_bytes_before"].as_u64().unwrap() >> 20,
        after >> 20,
        summary["archive_bytes"].as_u64().unwrap() >> 20
    );
    archive
}

/// Flashes `archive` to each card, then gives each its card's size: a file
/// target ends where the image does, a card goes on.
fn flash_to_larger_cards(ssm: &SsmEndpoint, archive: &Path, cards: &[&PathBuf]) {
    succeed(
        ssm.piprov()
            .arg("flash")
            .arg(archive)
            .args(cards)
            .args(["--yes", "--quiet"]),
    );
    for card in cards {
        let file = std::fs::OpenOptions::new().write(true).open(card).unwrap();
        assert!(file.metadata().unwrap().len() < CARD_BYTES);
        file.set_len(CARD_BYTES).unwrap();
    }
}

/// After its first boot the card's root fills it: the guest's lsblk and df
/// (the `e2e-grow:` line its last boot printed) and the ext4 superblock on the card.
fn assert_root_fills_card(card: &Path, d: &Path, name: &str) {
    let line = (0..3)
        .rev()
        .filter_map(|round| std::fs::read(d.join(format!("{name}-{round}.serial.log"))).ok())
        .find_map(|log| {
            String::from_utf8_lossy(&log)
                .lines()
                .rev()
                .find_map(|l| l.split_once("e2e-grow: ").map(|(_, rest)| rest.to_string()))
        })
        .unwrap_or_else(|| panic!("{name}: no e2e-grow line in its serial logs"));
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let [disk, partition, filesystem] = numbers[..] else {
        panic!("{name}: {line}")
    };
    let (start, len) = partition_extent(card, 2);
    eprintln!(
        "e2e: {name}: disk {disk} B, root partition {partition} B at {start}, root filesystem (df) {filesystem} B"
    );
    assert_eq!(disk, CARD_BYTES, "{name}: {line}");
    assert_eq!(
        partition, len,
        "{name}: the guest and the card's table agree"
    );
    assert!(
        start + partition + (1 << 20) >= CARD_BYTES,
        "{name}: the root partition ends before the card does: {line}"
    );
    // df leaves out the filesystem's own metadata (inode tables, journal).
    assert!(filesystem > partition / 10 * 9, "{name}: {line}");
    let block_bytes = ext4_bytes(card, start);
    // resize2fs may leave off a last sliver too small for a block group's metadata.
    assert!(
        block_bytes <= partition && partition - block_bytes < 1 << 20,
        "{name}: the ext4 holds {block_bytes} B of its {partition} B partition"
    );
}

/// An ext4's size from its superblock (1024 bytes into the partition).
fn ext4_bytes(card: &Path, start: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let mut sb = [0u8; 1024];
    std::fs::File::open(card)
        .unwrap()
        .read_exact_at(&mut sb, start + 1024)
        .unwrap();
    let le32 = |at: usize| u64::from(u32::from_le_bytes(sb[at..at + 4].try_into().unwrap()));
    assert_eq!(&sb[0x38..0x3a], &[0x53, 0xef], "an ext4 superblock");
    let high = if le32(0x60) & 0x80 != 0 {
        le32(0x150)
    } else {
        0
    };
    ((high << 32) | le32(0x4)) << (10 + le32(0x18))
}

/// The broker recipe every e2e card is stamped with (`extra`: more top-level
/// keys; `activation`: more keys of its [activation] table).
fn broker_recipe(
    d: &Path,
    broker: &BrokerProcess,
    token: &str,
    extra: &str,
    activation: &str,
) -> PathBuf {
    std::fs::write(d.join("e2e.token"), format!("{token}\n")).unwrap();
    let recipe = d.join("e2e.toml");
    std::fs::write(
        &recipe,
        format!(
            "name = \"e2e\"\nregion = \"eu-west-1\"\nhostname = \"pi-{{serial}}\"\n{extra}[activation]\n\
             source = \"broker\"\nurl = \"https://{GUEST_HOST}:{}\"\nca_file = \"{}\"\n\
             token_file = \"e2e.token\"\nkeep_token = true\n{activation}",
            broker.port(),
            broker.ca.display()
        ),
    )
    .unwrap();
    recipe
}

/// The agent never spoke as the golden: no ping under its id reached the endpoint.
fn assert_no_request_as(ssm: &SsmEndpoint, golden_id: &str) {
    let pings = ssm.requests_for("UpdateInstanceInformation");
    let as_golden = pings
        .iter()
        .filter(|r| r["body"]["InstanceId"] == golden_id)
        .count();
    assert_eq!(
        as_golden,
        0,
        "{as_golden} of {} pings came under the golden's id {golden_id}",
        pings.len()
    );
}

/// The raw FAT partition of a card holds none of these bytes (a secret the
/// card used and removed, overwritten where it lay).
fn assert_not_on_fat(card: &Path, secret: &str) {
    let image = piprov::image::Image::open(card).unwrap();
    let boot = image.boot_partition().unwrap().clone();
    let mut raw = vec![0u8; boot.size as usize];
    use std::os::unix::fs::FileExt;
    std::fs::File::open(card)
        .unwrap()
        .read_exact_at(&mut raw, boot.start)
        .unwrap();
    assert!(
        !raw.windows(secret.len()).any(|w| w == secret.as_bytes()),
        "{}: the secret is still on the FAT partition",
        card.display()
    );
}

#[test]
#[ignore = "boots virtual machines: run with `make e2e`"]
fn cloned_cards_boot_with_distinct_identities() {
    let dir = work_dir();
    let d = dir.path();
    // Every Pi here signs with its OTP device key; the broker trusts each
    // serial's first key (tofu).
    let (ssm, broker, token) = endpoint_and_broker(d, &["--device-policy", "tofu"]);

    let (golden, golden_id, golden_report) = golden_image(d, &ssm, "bookworm");

    // Capture the golden stamped, flash it to three cards.
    let recipe = broker_recipe(d, &broker, &token, "", "device_key = true\n");
    let archive = capture_stamped(&ssm, &golden, &recipe, d);
    let cards: Vec<PathBuf> = (1..=4).map(|i| d.join(format!("card{i}.img"))).collect();
    flash_to_larger_cards(&ssm, &archive, &cards[..3].iter().collect::<Vec<_>>());

    let qemu = Qemu::new(d);
    let boards: Vec<Board> = (1..=4)
        .map(|i| qemu.board(d, &pi_serial(i), &format!("52:54:00:00:00:0{i}"), true))
        .collect();
    let mut times = Vec::new();
    for i in 0..3 {
        times.push(qemu.boot(&cards[i], &boards[i], d, &format!("card{}", i + 1)));
    }
    // Card 1, copied byte for byte, in another Pi: a field clone.
    std::fs::copy(&cards[0], &cards[3]).unwrap();
    times.push(qemu.boot(&cards[3], &boards[3], d, "card4"));
    for (i, t) in times.iter().enumerate() {
        eprintln!(
            "e2e (arm64, {}): card {} in the Pi with serial {} ({}) registered after {:.0} s",
            qemu.accel,
            i + 1,
            boards[i].serial,
            boards[i].mac,
            t.as_secs_f64()
        );
    }
    // Card 1 again in its own Pi, then in its own Pi with another network card:
    // the serial, not the MAC, is the identity, so neither boot changes anything.
    let card1_before = inspect_json(&cards[0]);
    let registrations_before = ssm.requests_for("RegisterManagedInstance").len();
    let new_nic = qemu.with_mac(&boards[0], "52:54:00:00:00:15");
    for (board, name) in [(&boards[0], "card1-again"), (&new_nic, "card1-new-nic")] {
        let t = qemu.boot(&cards[0], board, d, name);
        eprintln!(
            "e2e (arm64, {}): card 1 booted again in the Pi with serial {} ({}) in {:.0} s",
            qemu.accel,
            board.serial,
            board.mac,
            t.as_secs_f64()
        );
        let after = inspect_json(&cards[0]);
        for path in ["registration", "identity"] {
            assert_eq!(after[path], card1_before[path], "{name}: {path}");
        }
        assert_eq!(
            after["device_status"]["instance_id"], card1_before["device_status"]["instance_id"],
            "{name}"
        );
    }

    for (i, card) in cards.iter().enumerate() {
        assert_root_fills_card(card, d, &format!("card{}", i + 1));
    }
    let reports: Vec<serde_json::Value> = cards.iter().map(|c| inspect_json(c)).collect();
    let field =
        |r: &serde_json::Value, path: &[&str]| path.iter().fold(r.clone(), |v, k| v[*k].clone());
    let mut ids = BTreeSet::new();
    let mut machine_ids = BTreeSet::new();
    let mut keys = BTreeSet::new();
    for (i, r) in reports.iter().enumerate() {
        let n = i + 1;
        assert_eq!(
            field(r, &["device_status", "state"]),
            "registered",
            "card {n}: {}",
            r["device_status"]
        );
        ids.insert(
            field(r, &["registration", "instance_id"])
                .as_str()
                .unwrap()
                .to_string(),
        );
        machine_ids.insert(
            field(r, &["identity", "machine_id"])
                .as_str()
                .unwrap()
                .to_string(),
        );
        keys.insert(field(r, &["identity", "ssh_host_key_fingerprints"]).to_string());
        assert_ne!(
            field(r, &["sudo", "ssm_agent_users"]),
            "nopasswd",
            "card {n}"
        );
        assert_eq!(
            field(r, &["sudo", "nopasswd_files"]),
            serde_json::json!([]),
            "card {n}"
        );
        assert!(
            boot_file(&cards[i], "piprov-secret.conf").is_empty(),
            "card {n}: secret on FAT"
        );
        let image = piprov::image::Image::open(&cards[i]).unwrap();
        let kept = image
            .rootfs()
            .unwrap()
            .read_text("/var/lib/piprov/secret.conf")
            .unwrap()
            .unwrap_or_default();
        assert!(
            !kept.contains("ACTIVATION"),
            "card {n}: no activation code stays"
        );
    }
    assert_eq!(ids.len(), 4, "four distinct mi- ids: {ids:?}");
    assert!(!ids.contains(&golden_id));
    assert_eq!(machine_ids.len(), 4);
    assert!(!machine_ids.contains(golden_report["identity"]["machine_id"].as_str().unwrap()));
    assert_eq!(keys.len(), 4);
    assert!(!keys.contains(&golden_report["identity"]["ssh_host_key_fingerprints"].to_string()));

    // Neither later boot of card 1 registered anything.
    assert_eq!(
        ssm.requests_for("RegisterManagedInstance").len(),
        registrations_before
    );

    // The endpoint's records: each card's node tagged with the serial of the Pi
    // it registered in, as the guard read it from the device tree.
    let nodes = ssm.nodes();
    for (r, board) in reports.iter().zip(&boards) {
        let id = r["registration"]["instance_id"].as_str().unwrap();
        let (_, tags) = nodes
            .iter()
            .find(|(n, _)| n == id)
            .expect("the node exists");
        assert_eq!(tags["piprov:serial"], board.serial.as_str(), "{id}: {tags}");
        let status = &r["device_status"];
        assert_eq!(
            status["identity"],
            format!("serial:{}", board.serial),
            "{status}"
        );
        assert_eq!(
            status["hostname"],
            format!("pi-{}", board.serial),
            "{status}"
        );
    }
    // Each Pi signed its enrollment with its own OTP key: the broker recorded
    // four serials, each with the key of the board it was first seen in.
    let listed = broker
        .piprov()
        .args(["broker", "device", "list", "--json", "--config"])
        .arg(&broker.config)
        .output()
        .unwrap();
    let devices: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(devices.as_array().unwrap().len(), 4, "{devices}");
    for board in &boards {
        let device = devices
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["serial"] == board.serial.as_str())
            .unwrap_or_else(|| panic!("{} is recorded: {devices}", board.serial));
        assert_eq!(device["public_key"], board.device_key.as_deref().unwrap());
        assert_eq!(device["source"], "first-use");
    }
    // Whenever an agent started, it spoke as its own card, never as the golden;
    // the enrollment token the cards used is gone from their FAT partitions.
    assert_no_request_as(&ssm, &golden_id);
    assert!(!ssm.requests_for("UpdateInstanceInformation").is_empty());
    for card in &cards {
        assert_not_on_fat(card, &token);
    }
}

/// Pi OS Trixie first-boots through cloud-init: piprov's part of the NoCloud
/// seed is a boothook, which runs before the agent can start. A card booted
/// once, a byte-for-byte copy of it in another machine, and a card whose guard
/// is made to crash: the agent never speaks as the golden, and the crashed card
/// keeps it stopped and says so.
#[test]
#[ignore = "boots virtual machines: run with `make e2e`"]
fn trixie_cards_first_boot_through_cloud_init_and_fail_closed() {
    let dir = work_dir();
    let d = dir.path();
    let (ssm, broker, token) = endpoint_and_broker(d, &[]);
    let (golden, golden_id, _) = golden_image(d, &ssm, "trixie");
    let recipe = broker_recipe(d, &broker, &token, "hook = \"cloud-init\"\n", "");
    let archive = capture_stamped(&ssm, &golden, &recipe, d);
    let cards: Vec<PathBuf> = ["a", "copy", "crash"]
        .iter()
        .map(|n| d.join(format!("trixie-{n}.img")))
        .collect();
    flash_to_larger_cards(&ssm, &archive, &[&cards[0], &cards[2]]);
    let user_data = String::from_utf8(boot_file(&cards[0], "user-data")).unwrap();
    assert!(user_data.contains("#cloud-boothook"), "{user_data}");
    // The third card's guard dies after wiping the identity, as in a crash.
    let failpoint = d.join("e2e-failpoint");
    std::fs::write(&failpoint, "PIPROV_FAILPOINT=wipe_identity\n").unwrap();
    let image = piprov::image::Image::open(&cards[2]).unwrap();
    let boot_start = image.boot_partition().unwrap().start;
    drop(image);
    let copied = Command::new("mcopy")
        .arg("-i")
        .arg(format!("{}@@{boot_start}", cards[2].display()))
        .arg(&failpoint)
        .arg("::e2e-failpoint")
        .status()
        .unwrap();
    assert!(copied.success());

    let qemu = Qemu::new(d);
    let boards: Vec<Board> = (1..=3)
        .map(|i| {
            qemu.board(
                d,
                &pi_serial(0x100 + i),
                &format!("52:54:00:00:01:0{i}"),
                false,
            )
        })
        .collect();
    let first = qemu.boot(&cards[0], &boards[0], d, "trixie-a");
    std::fs::copy(&cards[0], &cards[1]).unwrap();
    let copy = qemu.boot(&cards[1], &boards[1], d, "trixie-copy");
    let crash = qemu.boot(&cards[2], &boards[2], d, "trixie-crash");
    eprintln!(
        "e2e (arm64, {}): trixie card registered in the Pi with serial {} after {:.0} s, \
         its copy in the Pi with serial {} after {:.0} s, the crashed guard's card \
         settled in the Pi with serial {} after {:.0} s",
        qemu.accel,
        boards[0].serial,
        first.as_secs_f64(),
        boards[1].serial,
        copy.as_secs_f64(),
        boards[2].serial,
        crash.as_secs_f64()
    );

    for (card, name) in cards[..2].iter().zip(["trixie-a", "trixie-copy"]) {
        assert_root_fills_card(card, d, name);
    }
    let reports: Vec<serde_json::Value> = cards.iter().map(|c| inspect_json(c)).collect();
    let mut ids = BTreeSet::new();
    for (i, r) in reports[..2].iter().enumerate() {
        assert_eq!(r["device_status"]["state"], "registered", "card {i}: {r}");
        ids.insert(
            r["registration"]["instance_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
        assert_not_on_fat(&cards[i], &token);
    }
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(!ids.contains(&golden_id));
    let crashed = &reports[2]["device_status"];
    assert_eq!(crashed["state"], "blocked", "{crashed}");
    assert!(
        crashed["message"]
            .as_str()
            .unwrap()
            .contains("amazon-ssm-agent kept stopped"),
        "{crashed}"
    );
    assert_no_request_as(&ssm, &golden_id);
    let pings = ssm.requests_for("UpdateInstanceInformation");
    for id in &ids {
        assert!(
            pings.iter().any(|p| p["body"]["InstanceId"] == id.as_str()),
            "the agent of {id} spoke under its own id"
        );
    }
}
