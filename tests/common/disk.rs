//! Disks for the flash tests: loop devices over files of stale data (used
//! cards), what such a card holds afterwards, and the checks on it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use piprov::image::{Image, RootFs};
use tempfile::TempDir;

use super::*;

/// Every regular file in an image's root filesystem, with its content.
pub fn root_files(image: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(fs: &RootFs, dir: &str, out: &mut BTreeMap<String, Vec<u8>>) {
        for name in fs.list(dir).unwrap() {
            let path = format!("{}/{name}", dir.trim_end_matches('/'));
            if fs.is_symlink(&path).unwrap() {
                continue;
            }
            if fs.is_dir(&path).unwrap() {
                walk(fs, &path, out);
            } else if let Some(data) = fs.read(&path).unwrap() {
                out.insert(path, data);
            }
        }
    }
    let image = Image::open(image).unwrap();
    let fs = image.rootfs().unwrap();
    let mut out = BTreeMap::new();
    walk(&fs, "/", &mut out);
    out
}

pub fn fill_random(path: &Path, bytes: u64) {
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c {bytes} /dev/urandom > '{}'",
            path.display()
        ))
        .status()
        .unwrap();
    assert!(status.success());
}

pub fn fsck_clean(image: &Path, dir: &Path) {
    assert_fat_clean(image, dir);
    let part = dir.join("root.part");
    extract_partition(image, 2, &part);
    let out = Command::new("e2fsck")
        .args(["-fn"])
        .arg(&part)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "e2fsck -fn: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A loop device over a file, detached on drop.
pub struct Loop {
    pub dev: String,
}

impl Loop {
    pub fn new(file: &Path, extra: &[&str]) -> Option<Loop> {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .args(extra)
            .arg(file)
            .output()
            .ok()?;
        out.status.success().then(|| Loop {
            dev: String::from_utf8(out.stdout).unwrap().trim().to_string(),
        })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let part = format!("{}p2", self.dev);
        if Path::new(&part).exists() {
            let _ = Command::new("umount").arg(&part).output();
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).output();
    }
}

/// Without udev (containers) the kernel's partition has no /dev node: make it
/// from the numbers sysfs gives.
pub fn make_partition_node(part: &str) {
    if Path::new(part).exists() {
        return;
    }
    let name = part.trim_start_matches("/dev/");
    let disk = name
        .trim_end_matches(|c: char| c.is_ascii_digit())
        .trim_end_matches('p');
    if !Path::new(&format!("/sys/block/{disk}/{name}")).exists() {
        // Some kernels leave a fresh loop device's partitions unscanned.
        let _ = Command::new("partx")
            .args(["-a", &format!("/dev/{disk}")])
            .output();
        if Path::new(part).exists() {
            return;
        }
    }
    let dev = std::fs::read_to_string(format!("/sys/block/{disk}/{name}/dev")).unwrap();
    let (major, minor) = dev.trim().split_once(':').unwrap();
    let ok = Command::new("mknod")
        .args([part, "b", major, minor])
        .status()
        .unwrap()
        .success();
    assert!(ok, "mknod {part}");
}

/// Loop devices need root; without it these tests say why they skip.
pub fn loop_devices_usable(dir: &TempDir) -> bool {
    let probe = dir.path().join("probe.img");
    std::fs::File::create(&probe)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    available(
        Loop::new(&probe, &[]).is_some(),
        "a loop device (needs root)",
    )
}

pub fn build_image_sized(out: &Path, mib: u32) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/make-image.sh");
    let status = Command::new("sh")
        .arg(script)
        .args(["--size", &mib.to_string()])
        .arg(out)
        .status()
        .unwrap();
    assert!(status.success());
}

/// A used card: a loop device over `len` bytes of random data with `old` (an
/// earlier image, if any) written at its start, as a card that held one.
pub fn used_card(dir: &TempDir, name: &str, len: u64, old: Option<&Path>) -> (PathBuf, Loop) {
    let backing = dir.path().join(format!("{name}.dev"));
    fill_random(&backing, len);
    if let Some(old) = old {
        let ok = Command::new("dd")
            .arg(format!("if={}", old.display()))
            .arg(format!("of={}", backing.display()))
            .args(["bs=4M", "conv=notrunc,sparse", "status=none"])
            .status()
            .unwrap()
            .success();
        assert!(ok, "dd {}", old.display());
    }
    let dev = Loop::new(&backing, &[]).unwrap();
    (backing, dev)
}

/// What a loop device's first `len` bytes now hold, as an image file to check.
pub fn card_as_image(dir: &TempDir, dev: Loop, backing: &Path, len: u64) -> PathBuf {
    drop(dev);
    let card = dir.path().join(format!(
        "{}.card.img",
        backing.file_stem().unwrap().to_string_lossy()
    ));
    std::fs::copy(backing, &card).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&card)
        .unwrap()
        .set_len(len)
        .unwrap();
    card
}

pub fn read_at(path: &Path, at: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, at)
        .unwrap();
    buf
}

/// No partition table a tool could find or recover: not the old image's, not
/// the new one's.
pub fn assert_no_partition_table(card: &Path, old_len: u64) {
    assert!(
        read_at(card, 0, 1 << 20).iter().all(|&b| b == 0),
        "the first MiB (MBR, primary GPT) is erased"
    );
    assert!(
        read_at(card, old_len - (33 << 9), 33 << 9)
            .iter()
            .all(|&b| b == 0),
        "the old image's backup GPT is erased"
    );
    let sfdisk = Command::new("sfdisk").arg("-d").arg(card).output().unwrap();
    assert!(
        !sfdisk.status.success(),
        "sfdisk finds no table: {}",
        String::from_utf8_lossy(&sfdisk.stdout)
    );
}

/// A card written from `image` and stamped with `hostname`: its filesystems
/// check clean and hold the image's files (the boot partition's as they were,
/// but `cmdline.txt`, which the stamp changes), and its stamp names the hostname.
pub fn assert_card_holds(card: &Path, image: &Path, hostname: &str, dir: &Path) {
    fsck_clean(card, dir);
    assert_eq!(
        root_files(card),
        root_files(image),
        "every file in the root filesystem"
    );
    let (source, written) = (boot_files(image), boot_files(card));
    for (name, data) in &source {
        if name != "cmdline.txt" {
            assert_eq!(&written[name], data, "{name}");
        }
    }
    let conf = String::from_utf8(written["piprov.conf"].clone()).unwrap();
    assert!(
        conf.contains(&format!("HOSTNAME_PATTERN={hostname}\n")),
        "{conf}"
    );
}

/// A 128 KiB tmpfs (the golden image holds some 490 KB of data), unmounted on
/// drop (needs root).
pub struct SmallFs(PathBuf);

impl SmallFs {
    pub fn mount(at: &Path) -> Option<SmallFs> {
        std::fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=128k", "tmpfs"])
            .arg(at)
            .output()
            .is_ok_and(|o| o.status.success());
        super::available(ok, "mounting a small tmpfs (needs root)").then(|| SmallFs(at.into()))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).output();
    }
}

/// Runs a debugfs request (`write`, `rm`) on an image's ext4 partition, in place.
pub fn edit_root(image: &Path, dir: &TempDir, request: &str) {
    let part = dir.path().join("root.edit");
    extract_partition(image, 2, &part);
    let out = Command::new("debugfs")
        .args(["-w", "-R", request])
        .arg(&part)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let (start, _) = partition_extent(image, 2);
    let ok = Command::new("dd")
        .arg(format!("if={}", part.display()))
        .arg(format!("of={}", image.display()))
        .args(["bs=1M", "conv=notrunc", "oflag=seek_bytes", "status=none"])
        .arg(format!("seek={start}"))
        .status()
        .unwrap()
        .success();
    assert!(ok);
}
