//! The image model over files and memory: reading, writing the FAT boot partition
//! (checked by fsck.vfat), and reading the ext4 root through symlinks.

mod common;

use std::io::Cursor;

use common::*;
use piprov::image::{Image, TableKind};
use tempfile::TempDir;

#[test]
fn an_image_in_memory_reads_like_a_file() {
    let dir = TempDir::new().unwrap();
    let path = fixture("registered", &dir);
    let image = Image::from_disk(Cursor::new(std::fs::read(&path).unwrap())).unwrap();
    assert_eq!(image.table().kind, TableKind::Mbr);
    let rootfs = image.rootfs().unwrap();
    // /etc/os-release is a relative symlink into /usr/lib; /var/lib/dbus/machine-id an
    // absolute one: both must resolve inside the image.
    let os = rootfs.read_text("/etc/os-release").unwrap().unwrap();
    assert!(os.contains("VERSION_CODENAME=bookworm"));
    let machine_id = rootfs
        .read_text("/var/lib/dbus/machine-id")
        .unwrap()
        .unwrap();
    assert_eq!(machine_id.trim().len(), 32);
    let key = rootfs
        .owner("/var/lib/amazon/ssm/Vault/Store/RegistrationKey")
        .unwrap()
        .unwrap();
    assert_eq!((key.uid, key.mode), (0, 0o600));
    assert_eq!(rootfs.read("/no/such/file").unwrap(), None);
}

#[test]
fn boot_partition_writes_pass_fsck_and_read_back() {
    let dir = TempDir::new().unwrap();
    let path = fixture("golden", &dir);
    {
        let image = Image::open_writable(&path).unwrap();
        let boot = image.boot().unwrap();
        boot.write("piprov-long-file-name.json", &vec![b'x'; 70_000])
            .unwrap();
        // Overwriting with shorter content must truncate, not leave a tail.
        boot.write("config.txt", b"arm_64bit=1\n").unwrap();
        boot.remove("issue.txt").unwrap();
        boot.close().unwrap();
    }
    let image = Image::open(&path).unwrap();
    let boot = image.boot().unwrap();
    assert_eq!(boot.read("config.txt").unwrap().unwrap(), b"arm_64bit=1\n");
    assert_eq!(
        boot.read("piprov-long-file-name.json")
            .unwrap()
            .unwrap()
            .len(),
        70_000
    );
    assert_eq!(boot.read("issue.txt").unwrap(), None);

    assert_fat_clean(&path, dir.path());
}

#[test]
fn inspect_shows_a_stamp_with_its_secrets_redacted() {
    let dir = TempDir::new().unwrap();
    let path = fixture("golden", &dir);
    {
        let image = Image::open_writable(&path).unwrap();
        let boot = image.boot().unwrap();
        let stamp = r#"{"hostname":"pi-door-07","activation":{"source":"embedded","id":"a-1","code":"SECRETCODE"},"broker":{"enrollment_token":"SECRETTOKEN"}}"#;
        boot.write("piprov-stamp.json", stamp.as_bytes()).unwrap();
        boot.close().unwrap();
    }
    let out = piprov()
        .arg("inspect")
        .arg("--json")
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains("SECRET"), "{text}");
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(report["stamp"]["hostname"], "pi-door-07");
    assert_eq!(report["stamp"]["activation"]["code"], "<redacted>");
    assert!(!finding_ids(&report).contains(&"not-stamped".to_string()));
}
