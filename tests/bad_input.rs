//! Bad images get a specific error that names the file and what is wrong: exit 2,
//! never a panic.

mod common;

use std::path::Path;

use common::*;
use tempfile::TempDir;

/// Runs inspect, expects exit 2, and returns stderr.
fn inspect_error(image: &Path) -> String {
    let out = piprov().arg("inspect").arg(image).output().unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "expected an error, got:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains(&image.display().to_string()),
        "error must name the file: {stderr}"
    );
    stderr
}

#[test]
fn truncated_image() {
    let dir = TempDir::new().unwrap();
    let image = fixture("golden", &dir);
    std::fs::File::options()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(100 << 20)
        .unwrap();
    let err = inspect_error(&image);
    assert!(err.contains("partition 2 ends at byte"), "{err}");
    assert!(
        err.contains("past the end of the image (104857600 bytes)"),
        "{err}"
    );
}

#[test]
fn zero_length_file() {
    let dir = TempDir::new().unwrap();
    let image = dir.path().join("empty.img");
    std::fs::write(&image, b"").unwrap();
    assert!(inspect_error(&image).contains("the file is empty"));
}

#[test]
fn random_bytes() {
    let dir = TempDir::new().unwrap();
    let image = dir.path().join("random.img");
    let mut data = vec![0u8; 1 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in &mut data {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    data[510] = 0; // make sure the boot signature is absent
    std::fs::write(&image, &data).unwrap();
    assert!(inspect_error(&image).contains("0x55AA"));
}

#[test]
fn missing_file() {
    let dir = TempDir::new().unwrap();
    let err = inspect_error(&dir.path().join("nope.img"));
    assert!(
        err.contains("opening") && err.contains("No such file"),
        "{err}"
    );
}

#[test]
fn mbr_with_no_fat_partition() {
    let dir = TempDir::new().unwrap();
    let image = fixture("golden", &dir);
    // Retype partition 1 from 0x0c (FAT32 LBA) to 0x83 (Linux).
    let status = std::process::Command::new("sfdisk")
        .args(["--quiet", "--part-type"])
        .arg(&image)
        .args(["1", "83"])
        .status()
        .unwrap();
    assert!(status.success());
    let err = inspect_error(&image);
    assert!(
        err.contains("not a Raspberry Pi image: no FAT boot partition"),
        "{err}"
    );
}

#[test]
fn fat_partition_that_is_not_fat() {
    let dir = TempDir::new().unwrap();
    let image = fixture("golden", &dir);
    let (start, _) = partition_extent(&image, 1);
    patch(&image, start, &[0u8; 4096]);
    let err = inspect_error(&image);
    assert!(
        err.contains("partition 1 (type 0x0c) does not hold a readable FAT filesystem"),
        "{err}"
    );
}

#[test]
fn ext4_without_its_superblock() {
    let dir = TempDir::new().unwrap();
    let image = fixture("golden", &dir);
    let (start, _) = partition_extent(&image, 2);
    patch(&image, start + 1024, &[0xa5u8; 1024]);
    let err = inspect_error(&image);
    assert!(
        err.contains("partition 2 (type 0x83) should hold the ext4 root filesystem"),
        "{err}"
    );
}

#[test]
fn ext4_with_a_corrupt_superblock_field() {
    let dir = TempDir::new().unwrap();
    let image = fixture("golden", &dir);
    let (start, _) = partition_extent(&image, 2);
    // s_log_block_size (offset 24) = 40: a block size no ext4 can have; magic intact.
    patch(&image, start + 1024 + 24, &40u32.to_le_bytes());
    let err = inspect_error(&image);
    assert!(
        err.contains("partition 2 does not hold a readable ext4 filesystem"),
        "{err}"
    );
}

#[test]
fn partition_past_the_end_of_the_image() {
    let dir = TempDir::new().unwrap();
    let image = fixture("golden", &dir);
    // MBR entry 2's sector count (offset 446 + 16 + 12) made larger than the disk.
    patch(&image, 446 + 16 + 12, &0x0100_0000u32.to_le_bytes());
    let err = inspect_error(&image);
    assert!(err.contains("partition 2 ends at byte"), "{err}");
    assert!(
        err.contains("truncated or its partition table is corrupt"),
        "{err}"
    );
}

#[test]
fn symlink_loop_in_the_rootfs() {
    let dir = TempDir::new().unwrap();
    let image = dir.path().join("loop.img");
    build_image(
        &image,
        &[
            "--customize",
            r#"rm "$root/etc/os-release" "$root/usr/lib/os-release"
               ln -s os-release.d "$root/etc/os-release"; ln -s os-release "$root/etc/os-release.d""#,
        ],
    );
    let err = inspect_error(&image);
    assert!(err.contains("/etc/os-release"), "{err}");
    assert!(err.contains("too many levels of symbolic links"), "{err}");
}

#[test]
fn non_utf8_cmdline() {
    let dir = TempDir::new().unwrap();
    let image = dir.path().join("cmdline.img");
    build_image(
        &image,
        &[
            "--customize",
            r#"printf 'root=/dev/mmcblk0p2 \377\376 rootwait\n' >"$boot/cmdline.txt""#,
        ],
    );
    let err = inspect_error(&image);
    assert!(
        err.contains("cmdline.txt is not UTF-8 text (invalid byte 0xff at offset 20)"),
        "{err}"
    );
}

#[test]
fn a_disk_that_is_not_a_pi_image() {
    let dir = TempDir::new().unwrap();
    let image = dir.path().join("plain.img");
    build_image(
        &image,
        &["--customize", r#"rm "$boot"/*; echo hi >"$boot/hello.txt""#],
    );
    let err = inspect_error(&image);
    assert!(err.contains("not a Raspberry Pi image: the boot partition (partition 1) has neither cmdline.txt nor config.txt"), "{err}");
}

#[test]
fn a_fat_entry_pointing_at_a_reserved_cluster() {
    let dir = TempDir::new().unwrap();
    let image = fixture("golden", &dir);
    let (start, size) = partition_extent(&image, 1);
    let data = std::fs::read(&image).unwrap();
    let boot = &data[start as usize..(start + size) as usize];
    // cmdline.txt's short entry; its first cluster (bytes 20-21 high, 26-27 low) set to 1.
    let entry = boot
        .windows(11)
        .position(|w| w == b"CMDLINE TXT")
        .expect("cmdline.txt entry");
    patch(&image, start + entry as u64 + 20, &[0, 0]);
    patch(&image, start + entry as u64 + 26, &[1, 0]);
    let err = inspect_error(&image);
    assert!(err.contains("the FAT filesystem is corrupt"), "{err}");
}

/// A directory given as the image: every command that reads one names it
/// and says what it is, instead of "Is a directory (os error 21)".
#[test]
fn a_directory_is_not_an_image() {
    let dir = TempDir::new().unwrap();
    let folder = dir.path().join("images");
    std::fs::create_dir(&folder).unwrap();
    let card = dir.path().join("card.img");
    let wanted = format!("{} is a directory, not an image", folder.display());
    for args in [
        vec!["inspect".into(), folder.clone().into_os_string()],
        vec![
            "flash".into(),
            folder.clone().into_os_string(),
            card.clone().into_os_string(),
            "--as-is".into(),
            "--yes".into(),
        ],
        vec!["unstamp".into(), folder.clone().into_os_string()],
    ] {
        let out = piprov().args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(&wanted), "{args:?}: {stderr}");
    }
    assert!(!card.exists());
}

/// An error names what was being read once, not twice.
#[test]
fn an_error_names_the_file_once() {
    let dir = TempDir::new().unwrap();
    let random = dir.path().join("random.bin");
    common::disk::fill_random(&random, 1 << 20);
    let out = piprov()
        .arg("flash")
        .arg(&random)
        .arg(dir.path().join("card.img"))
        .args(["--as-is", "--yes"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let named = format!("reading {}", random.display());
    assert_eq!(stderr.matches(&named).count(), 1, "{stderr}");
    assert!(stderr.contains("no partition table"), "{stderr}");
}

/// A script that asked for `--json` reads stdout: an error reaches it there as
/// JSON, not only as words on stderr.
#[test]
fn with_json_an_error_is_json_on_stdout() {
    let dir = TempDir::new().unwrap();
    let missing = dir.path().join("missing.img");
    let image = fixture("golden", &dir);
    let commands: Vec<Vec<std::ffi::OsString>> = vec![
        vec!["inspect".into(), "--json".into(), missing.clone().into()],
        vec![
            "flash".into(),
            image.clone().into(),
            "/dev/sdz".into(),
            "--json".into(),
        ],
        vec!["unstamp".into(), missing.clone().into(), "--json".into()],
    ];
    for args in commands {
        let out = piprov().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let error: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: stdout is not JSON ({e}): {:?}", out.stdout));
        assert_eq!(error["event"], "error");
        assert_eq!(error["exit_code"], 2);
        let message = error["error"].as_str().unwrap();
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(message),
            "{args:?}: the same words as on stderr"
        );
    }
    let out = piprov().arg("inspect").arg(&missing).output().unwrap();
    assert!(out.stdout.is_empty(), "without --json, stdout stays empty");
}
