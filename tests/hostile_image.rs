//! Crafted images against every command that reads one (inspect, stamp,
//! flash): each must end within a bound of time and memory with an error that
//! names the cause, never hang or grow without end.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::card::shared_recipe;
use common::*;
use tempfile::TempDir;

/// The bound every command must keep on a crafted image (the issue's: 2 s and
/// 200 MB; time here is wall time on a loaded CI machine, so a little more).
const TIME_BOUND: Duration = Duration::from_secs(5);
const MEMORY_BOUND_KB: i64 = 200 * 1024;

/// Runs `piprov ARGS` and returns (exit code, stderr, wall time, peak RSS in KB).
// Reaped with wait4 below, which clippy does not see.
#[allow(clippy::zombie_processes)]
fn bounded(cache: &Path, args: &[&std::ffi::OsStr]) -> (Option<i32>, String, Duration, i64) {
    let started = Instant::now();
    let mut child = Command::new(assert_cmd::cargo::cargo_bin("piprov"))
        .env("PIPROV_CACHE_DIR", cache)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Reaped with wait4, for this process's own peak memory; killed at 60 s,
    // so an unfixed hang fails the test instead of holding it.
    use nix::libc;
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain data; wait4 fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: pid is our child's, not yet reaped; the pointers are live.
        let reaped = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if reaped == pid {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let elapsed = started.elapsed();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    (code, stderr, elapsed, usage.ru_maxrss)
}

fn assert_bounded(what: &str, result: (Option<i32>, String, Duration, i64), cause: &str) {
    let (code, stderr, elapsed, rss) = result;
    assert!(elapsed < TIME_BOUND, "{what} took {elapsed:?}: {stderr}");
    assert!(rss < MEMORY_BOUND_KB, "{what} peaked at {rss} KB");
    assert_eq!(code, Some(2), "{what}: {stderr}");
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    assert!(stderr.contains(cause), "{what}: {stderr}");
}

/// The FAT32 root directory's cluster chain made to point at itself: fatfs
/// would read its entries for ever.
fn loop_the_root_directory(image: &Path) {
    let (start, _) = partition_extent(image, 1);
    let bpb = read_at(image, start, 512);
    let u16_at = |o: usize| u64::from(u16::from_le_bytes([bpb[o], bpb[o + 1]]));
    let u32_at = |o: usize| u64::from(u32::from_le_bytes(bpb[o..o + 4].try_into().unwrap()));
    let sector = u16_at(11);
    let reserved = u16_at(14);
    let fats = u64::from(bpb[16]);
    let fat_sectors = u32_at(36);
    let root_cluster = u32_at(44);
    assert!(
        fat_sectors > 0 && root_cluster >= 2,
        "a FAT32 boot partition"
    );
    for copy in 0..fats {
        let entry = start + (reserved + copy * fat_sectors) * sector + root_cluster * 4;
        patch(image, entry, &(root_cluster as u32).to_le_bytes());
    }
    // No end-of-directory entry in the cluster (each free entry marked
    // deleted), so a reader follows the chain, back to the same cluster.
    let cluster_bytes = sector * u64::from(bpb[13]);
    let data =
        start + (reserved + fats * fat_sectors) * sector + (root_cluster - 2) * cluster_bytes;
    let mut entries = read_at(image, data, cluster_bytes as usize);
    for entry in entries.chunks_mut(32) {
        if entry[0] == 0 {
            entry[0] = 0xe5;
        }
    }
    patch(image, data, &entries);
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

#[test]
fn a_fat_cluster_loop_ends_every_command_with_its_cause() {
    let dir = TempDir::new().unwrap();
    let image = fixture("golden", &dir);
    loop_the_root_directory(&image);
    let recipe = shared_recipe(dir.path(), "");
    let card = dir.path().join("card.img");
    let cache = dir.path().join("cache");
    let os = |s: &str| std::ffi::OsString::from(s);
    let cause = "a cluster chain that loops";
    assert_bounded(
        "inspect",
        bounded(&cache, &[&os("inspect"), image.as_os_str()]),
        cause,
    );
    assert_bounded(
        "stamp",
        bounded(
            &cache,
            &[
                &os("stamp"),
                image.as_os_str(),
                &os("--recipe"),
                recipe.as_os_str(),
            ],
        ),
        cause,
    );
    assert_bounded(
        "flash",
        bounded(
            &cache,
            &[
                &os("flash"),
                image.as_os_str(),
                card.as_os_str(),
                &os("--recipe"),
                recipe.as_os_str(),
                &os("--yes"),
            ],
        ),
        cause,
    );
    assert!(!card.exists(), "no card was made");
}

/// A root filesystem file (fstab) that claims 6 GiB (sparse: it uses no blocks) where
/// inspect reads a configuration file: refused by its size, not read into
/// memory.
#[test]
fn a_giant_sparse_file_is_refused_not_read() {
    let dir = TempDir::new().unwrap();
    let image = fixture("golden", &dir);
    common::disk::edit_root(&image, &dir, "sif /etc/fstab size 6442450944");
    let cache = dir.path().join("cache");
    let os = |s: &str| std::ffi::OsString::from(s);
    assert_bounded(
        "inspect",
        bounded(&cache, &[&os("inspect"), image.as_os_str()]),
        "/etc/fstab in the root filesystem is 6442450944 bytes",
    );
}

/// Archives that decode to something that is not a disk image (here 64 MiB of
/// zeroes, as a bomb would): every format stops as soon as its first chunk has
/// decoded, says so, and keeps nothing in the cache.
#[test]
fn an_archive_that_is_not_a_disk_image_is_stopped_at_its_head() {
    let dir = TempDir::new().unwrap();
    let zeroes = dir.path().join("zeroes.img");
    std::fs::File::create(&zeroes)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let cache = dir.path().join("cache");
    let os = |s: &str| std::ffi::OsString::from(s);
    for (tool, ext) in [
        ("xz", "xz"),
        ("gzip", "gz"),
        ("zstd", "zst"),
        ("bzip2", "bz2"),
    ] {
        let ok = Command::new(tool)
            .args(["-k", "-f", "-q"])
            .arg(&zeroes)
            .status()
            .unwrap()
            .success();
        assert!(ok, "{tool}");
        let archive = dir.path().join(format!("zeroes.img.{ext}"));
        let card = dir.path().join(format!("card-{ext}.img"));
        assert_bounded(
            &format!("flash of a .{ext}"),
            bounded(
                &cache,
                &[
                    &os("flash"),
                    archive.as_os_str(),
                    card.as_os_str(),
                    &os("--as-is"),
                    &os("--yes"),
                ],
            ),
            "does not hold a disk image",
        );
        let kept: Vec<_> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().contains(".img"))
            .collect();
        assert!(kept.is_empty(), ".{ext}: the cache kept {kept:?}");
        assert!(!card.exists(), ".{ext}: a card was made");
    }
}

/// A directory the audit reads file by file (`/etc/sudoers.d`) holding
/// thousands of entries: each lookup reads the directory from its start, so
/// reading them all is quadratic; refused by its count, within the bound.
#[test]
fn a_huge_directory_is_refused_by_its_count() {
    let dir = TempDir::new().unwrap();
    let image = dir.path().join("huge-dir.img");
    common::build_image(
        &image,
        &[
            "--customize",
            r#"(cd "$root/etc/sudoers.d" && seq -f "rule-%g" 5000 | xargs touch)"#,
        ],
    );
    let cache = dir.path().join("cache");
    let os = |s: &str| std::ffi::OsString::from(s);
    assert_bounded(
        "inspect",
        bounded(&cache, &[&os("inspect"), image.as_os_str()]),
        "/etc/sudoers.d in the root filesystem holds more than 1024 entries",
    );
}

/// A disk image's head (a first sector ending 0x55AA) and then `mib` MiB of
/// one repeated byte: it passes the head check and compresses to almost
/// nothing, as a bomb does.
fn bomb(dir: &Path, mib: u64) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("bomb.img");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let mut head = [0u8; 512];
    head[510] = 0x55;
    head[511] = 0xAA;
    out.write_all(&head).unwrap();
    let fill = vec![b'A'; 1 << 20];
    for _ in 0..mib {
        out.write_all(&fill).unwrap();
    }
    out.flush().unwrap();
    path
}

/// `bomb.img` compressed by each tool flash reads, fastest settings.
fn compressed(image: &Path) -> Vec<(&'static str, std::path::PathBuf)> {
    let dir = image.parent().unwrap();
    let mut made = Vec::new();
    for (ext, tool, args) in [
        ("xz", "xz", &["-0", "-T1", "-k", "-f"][..]),
        ("gz", "gzip", &["-1", "-k", "-f"]),
        ("zst", "zstd", &["-1", "-q", "-k", "-f"]),
        ("bz2", "bzip2", &["-1", "-k", "-f"]),
    ] {
        let ok = Command::new(tool)
            .args(args)
            .arg(image)
            .status()
            .unwrap()
            .success();
        assert!(ok, "{tool}");
        made.push((ext, dir.join(format!("bomb.img.{ext}"))));
    }
    let zip = dir.join("bomb.zip");
    let ok = Command::new("zip")
        .args(["-q", "-1", "-j"])
        .arg(&zip)
        .arg(image)
        .status()
        .unwrap()
        .success();
    assert!(ok, "zip");
    made.push(("zip", zip));
    made
}

/// The 256 MiB bomb in one format.
fn bomb_as(dir: &Path, ext: &str) -> std::path::PathBuf {
    compressed(&bomb(dir, 256))
        .into_iter()
        .find(|(made, _)| *made == ext)
        .map(|(_, path)| path)
        .unwrap()
}

fn cached_images(cache: &Path) -> Vec<std::ffi::OsString> {
    std::fs::read_dir(cache)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name())
                .filter(|n| n.to_string_lossy().contains(".img"))
                .collect()
        })
        .unwrap_or_default()
}

/// Bombs of every format (256 MiB of one byte behind a disk head, a few KB
/// packed) stop at `--max-size`, in flash and inspect alike, and leave
/// nothing in the cache and no card.
#[test]
fn a_bomb_of_every_format_stops_at_the_max_size() {
    let dir = TempDir::new().unwrap();
    let image = bomb(dir.path(), 256);
    let cache = dir.path().join("cache");
    let os = |s: &str| std::ffi::OsString::from(s);
    let cause = "more than 64.0 MiB (67108864 bytes), the --max-size";
    for (ext, archive) in compressed(&image) {
        let card = dir.path().join(format!("card-{ext}.img"));
        assert_bounded(
            &format!("flash of a .{ext} bomb"),
            bounded(
                &cache,
                &[
                    &os("flash"),
                    archive.as_os_str(),
                    card.as_os_str(),
                    &os("--as-is"),
                    &os("--max-size"),
                    &os("64MiB"),
                    &os("--yes"),
                ],
            ),
            cause,
        );
        assert!(!card.exists(), ".{ext}: a card was made");
        assert_bounded(
            &format!("inspect of a .{ext} bomb"),
            bounded(
                &cache,
                &[
                    &os("inspect"),
                    archive.as_os_str(),
                    &os("--max-size"),
                    &os("64MiB"),
                ],
            ),
            cause,
        );
        let kept = cached_images(&cache);
        assert!(kept.is_empty(), ".{ext}: the cache kept {kept:?}");
    }
}

/// Without `--max-size`, a bomb flashed to cards stops at the largest card's
/// size: nothing larger could be written anywhere.
#[test]
fn a_bomb_stops_at_the_largest_card() {
    let dir = TempDir::new().unwrap();
    let archive = bomb_as(dir.path(), "bz2");
    let backing = dir.path().join("card.bin");
    common::disk::fill_random(&backing, 32 << 20);
    let card = common::disk::Loop::new(&backing, &[]).expect("a loop device (needs root)");
    let cache = dir.path().join("cache");
    let os = |s: &str| std::ffi::OsString::from(s);
    assert_bounded(
        "flash of a bomb to a 32 MiB card",
        bounded(
            &cache,
            &[
                &os("flash"),
                archive.as_os_str(),
                &os(&card.dev),
                &os("--as-is"),
                &os("--yes"),
            ],
        ),
        "it decodes to more than 32.0 MiB (33554432 bytes), more than the largest target card holds",
    );
    assert!(cached_images(&cache).is_empty());
}

/// An xz whose index claims 64 MiB for a stream of 256 MiB: the cards are
/// sized by the index and written while it decodes, so decoding stops where
/// the index said it would end, not at the stream's end.
#[test]
fn an_xz_whose_index_lies_stops_at_its_claimed_length() {
    let dir = TempDir::new().unwrap();
    let archive = bomb_as(dir.path(), "xz");
    // The index's one record: unpadded size, then the uncompressed size,
    // rewritten as 64 MiB in the same five bytes (a varint may carry
    // high zero groups), and the index's CRC32 made good again.
    let lie = r#"
import struct, sys, zlib
path = sys.argv[1]
data = bytearray(open(path, "rb").read())
backward = struct.unpack("<I", data[-8:-4])[0]
index_len = (backward + 1) * 4
start = len(data) - 12 - index_len
index = data[start:start + index_len]
def varint(at):
    value, shift = 0, 0
    while True:
        b = index[at]; at += 1
        value |= (b & 0x7f) << shift; shift += 7
        if not b & 0x80:
            return value, at
assert index[0] == 0
count, at = varint(1)
assert count == 1
_, at = varint(at)
size, end = varint(at)
assert end - at == 5, end - at
lie = 64 << 20
encoded = bytearray()
for i in range(5):
    group = (lie >> (7 * i)) & 0x7f
    encoded.append(group | (0x80 if i < 4 else 0))
index[at:end] = encoded
index[-4:] = struct.pack("<I", zlib.crc32(bytes(index[:-4])))
data[start:start + index_len] = index
open(path, "wb").write(data)
"#;
    let ok = Command::new("python3")
        .args(["-c", lie])
        .arg(&archive)
        .status()
        .unwrap()
        .success();
    assert!(ok, "rewriting the xz index");
    let card = dir.path().join("card.img");
    let cache = dir.path().join("cache");
    let os = |s: &str| std::ffi::OsString::from(s);
    let (code, stderr, elapsed, rss) = bounded(
        &cache,
        &[
            &os("flash"),
            archive.as_os_str(),
            card.as_os_str(),
            &os("--as-is"),
            &os("--yes"),
        ],
    );
    assert!(elapsed < TIME_BOUND, "took {elapsed:?}: {stderr}");
    assert!(rss < MEMORY_BOUND_KB, "peaked at {rss} KB");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains(
            "it decodes to more than 64.0 MiB (67108864 bytes), the length its index gives"
        ),
        "{stderr}"
    );
    // Written to while decoding, so touched: left blank, and said so.
    assert_eq!(code, Some(1), "{stderr}");
    assert!(cached_images(&cache).is_empty());
}

/// An ext4 superblock claiming billions of block groups (found by the
/// ext4_facts fuzz target): ext4-view sized its group table from it, 30 GB,
/// and the process aborted. Refused by the partition's size first.
#[test]
fn an_ext4_superblock_larger_than_its_partition_is_refused() {
    let dir = TempDir::new().unwrap();
    let image = fixture("golden", &dir);
    let (start, _) = partition_extent(&image, 2);
    let superblock = start + 1024;
    // Eight blocks a group, and a block count's high half, which ext4-view
    // reads whether or not the 64bit feature is on.
    patch(&image, superblock + 32, &8u32.to_le_bytes());
    patch(&image, superblock + 0x150, &1u32.to_le_bytes());
    let cache = dir.path().join("cache");
    let os = |s: &str| std::ffi::OsString::from(s);
    assert_bounded(
        "inspect",
        bounded(&cache, &[&os("inspect"), image.as_os_str()]),
        "more than the partition's",
    );
}
