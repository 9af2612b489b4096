//! Test fixtures: real disk images built by tests/fixtures/make-image.sh with the
//! real tools (sfdisk, mkfs.vfat, mtools, mkfs.ext4 -d).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use tempfile::TempDir;

pub mod broker;
pub mod card;
pub mod card_broker;
pub mod cpu;
pub mod disk;
pub mod load_client;
pub mod postgres;
pub mod ssm_double;
pub mod ssm_endpoint;
pub mod stub;

/// Images small enough to copy per test, large enough for FAT32 (64 MiB boot).
pub const TEST_IMAGE_MIB: u32 = 160;

fn cache_dir() -> &'static Path {
    static DIR: OnceLock<TempDir> = OnceLock::new();
    DIR.get_or_init(|| TempDir::new().expect("temp dir")).path()
}

/// Builds an image with make-image.sh; panics with the script's output on failure.
pub fn build_image(out: &Path, args: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/make-image.sh");
    let output = Command::new("sh")
        .arg(script)
        .args(["--size", &TEST_IMAGE_MIB.to_string()])
        .args(args)
        .arg(out)
        .output()
        .expect("running make-image.sh");
    assert!(
        output.status.success(),
        "make-image.sh {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A private copy of a fixture variant (built once per test binary), for the test to
/// read or damage as it likes.
pub fn fixture(variant: &str, dir: &TempDir) -> PathBuf {
    static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let cached = cache_dir().join(format!("{variant}.img"));
    {
        let mut built = BUILT.lock().unwrap();
        if !built.iter().any(|v| v == variant) {
            build_image(&cached, &["--variant", variant]);
            built.push(variant.to_string());
        }
    }
    let copy = dir.path().join(format!("{variant}.img"));
    let status = Command::new("cp")
        .args(["--sparse=always"])
        .arg(&cached)
        .arg(&copy)
        .status()
        .expect("cp");
    assert!(status.success());
    copy
}

/// A loopback port free now (kept across a broker's restarts, as cards know it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The piprov binary under test.
pub fn piprov() -> assert_cmd::Command {
    assert_cmd::Command::cargo_bin("piprov").expect("piprov binary")
}

/// Runs `cmd`, which must succeed (its stderr says why not): its output.
pub fn succeed(cmd: &mut assert_cmd::Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Start and length in bytes of partition `n` (1-based), read with sfdisk.
pub fn partition_extent(image: &Path, n: usize) -> (u64, u64) {
    let out = Command::new("sfdisk")
        .arg("--json")
        .arg(image)
        .output()
        .expect("sfdisk");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("sfdisk json");
    let p = &json["partitiontable"]["partitions"][n - 1];
    (
        p["start"].as_u64().unwrap() * 512,
        p["size"].as_u64().unwrap() * 512,
    )
}

/// Overwrites bytes of a file in place.
pub fn patch(image: &Path, offset: u64, bytes: &[u8]) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(bytes).unwrap();
}

/// Copies partition `n` out to its own file, for fsck tools that take no offset.
pub fn extract_partition(image: &Path, n: usize, out: &Path) {
    let (start, size) = partition_extent(image, n);
    let status = Command::new("dd")
        .arg(format!("if={}", image.display()))
        .arg(format!("of={}", out.display()))
        .args(["bs=1M", "iflag=skip_bytes,count_bytes", "status=none"])
        .arg(format!("skip={start}"))
        .arg(format!("count={size}"))
        .status()
        .expect("dd");
    assert!(status.success());
}

pub fn inspect_json(image: &Path) -> serde_json::Value {
    let out = piprov()
        .args(["inspect", "--json"])
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.code() == Some(0) || out.status.code() == Some(1),
        "inspect failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("inspect --json prints JSON")
}

pub fn finding_ids(report: &serde_json::Value) -> Vec<String> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap().to_string())
        .collect()
}

/// Fails the test unless `fsck.vfat -n` finds the boot partition clean.
pub fn assert_fat_clean(image: &Path, dir: &Path) {
    let part = dir.join("boot.part");
    extract_partition(image, 1, &part);
    let out = Command::new("fsck.vfat")
        .arg("-n")
        .arg(&part)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fsck.vfat -n: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// SHA-256 of bytes, in hex.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// SHA-256 of a file, as sha256sum prints it.
pub fn sha256_of(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

/// Every file at the top of an image's boot partition, with its content.
pub fn boot_files(image: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let image = piprov::image::Image::open(image).unwrap();
    let boot = image.boot().unwrap();
    boot.list_root()
        .unwrap()
        .into_iter()
        .map(|name| {
            let data = boot.read(&name).unwrap().unwrap();
            (name, data)
        })
        .collect()
}

/// Whether a test can run here. In CI (`CI` set) a missing requirement fails
/// the test: CI installs every tool and runs as root, so a skip there would be
/// a test that silently never ran.
pub fn available(usable: bool, what: &str) -> bool {
    if !usable {
        assert!(
            std::env::var_os("CI").is_none(),
            "{what} is required in CI, and missing"
        );
        eprintln!("SKIPPED: {what} is missing; CI runs this test");
    }
    usable
}
