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
