//! `piprov stamp` and `unstamp` on real images: the FAT stays clean, stamping is
//! idempotent, unstamping restores the boot partition byte for byte, and secrets
//! never reach the output.

mod common;

use common::card::{SHARED_CODE, shared_recipe, stamp, stamp_cmd};
use common::*;
use predicates::prelude::*;
use predicates::str::contains;
use tempfile::TempDir;

#[test]
fn stamping_hooks_cmdline_and_keeps_the_fat_clean() {
    let dir = TempDir::new().unwrap();
    let image = fixture("registered", &dir);
    let before = boot_files(&image);
    let recipe = shared_recipe(dir.path(), "");
    stamp_cmd(&image, &recipe)
        .args(["--hostname", "pi-door-07"])
        .assert()
        .success()
        .stdout(contains("stamped"))
        .stdout(contains("piprov-secret.conf"))
        .stdout(contains("secret (not shown)"))
        .stdout(contains(SHARED_CODE).not());
    assert_fat_clean(&image, dir.path());
    let after = boot_files(&image);
    let old = String::from_utf8(before["cmdline.txt"].clone()).unwrap();
    let new = String::from_utf8(after["cmdline.txt"].clone()).unwrap();
    assert_eq!(
        new,
        format!(
            "{} systemd.run=/boot/firmware/piprov-install.sh systemd.run_success_action=reboot systemd.unit=kernel-command-line.target\n",
            old.trim_end()
        )
    );
    // The install script carries the card contract in front of it.
    let install = &after["piprov-install.sh"];
    assert!(install.starts_with(b"#!/bin/sh\n"));
    assert!(install.ends_with(include_bytes!("../firstboot/install.sh")));
    assert!(
        install
            .windows(b"CARD_INSTALLED=".len())
            .any(|w| w == b"CARD_INSTALLED="),
        "the contract is in the install script"
    );
    let conf = String::from_utf8(after["piprov.conf"].clone()).unwrap();
    assert!(
        conf.contains("HOSTNAME_PATTERN=pi-door-07\n") && conf.contains("SOURCE=shared\n"),
        "{conf}"
    );
    assert!(!conf.contains(SHARED_CODE));
    let secret = String::from_utf8(after["piprov-secret.conf"].clone()).unwrap();
    assert!(secret.contains(&format!("ACTIVATION_CODE={SHARED_CODE}\n")));
    // Files other than ours and cmdline.txt are untouched.
    for (name, data) in &before {
        if name != "cmdline.txt" {
            assert_eq!(&after[name], data, "{name} changed");
        }
    }
}

#[test]
fn stamp_then_inspect_shows_the_stamp_and_its_settings() {
    let dir = TempDir::new().unwrap();
    let image = fixture("registered", &dir);
    let recipe = shared_recipe(dir.path(), "");
    stamp(&image, &recipe, &["--hostname", "pi-{serial}"]);
    let out = piprov()
        .args(["inspect", "--json"])
        .arg(&image)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "a stamped image's clone risks are handled"
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains(SHARED_CODE));
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    let stamp = &report["stamp"];
    assert_eq!(stamp["recipe"], "test-site");
    assert_eq!(stamp["hook"], "systemd-run");
    assert_eq!(stamp["hostname"], "pi-{serial}");
    assert_eq!(stamp["activation"]["source"], "shared");
    assert_eq!(
        stamp["activation"]["id"],
        "0a0a0a0a-0000-4000-8000-000000000001"
    );
    assert_eq!(stamp["secret"], true);
    assert_eq!(stamp["sudo"]["strip_nopasswd"], true);
    let registration = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["id"] == "ssm-registration-baked")
        .unwrap();
    assert_eq!(registration["severity"], "info");
    assert!(
        registration["summary"]
            .as_str()
            .unwrap()
            .contains("handled")
    );
    piprov()
        .arg("inspect")
        .arg(&image)
        .assert()
        .stdout(contains(
            "recipe test-site, hook systemd-run, shared activation 0a0a0a0a-0000-4000-8000-000000000001",
        ));
}

#[test]
fn restamping_replaces_the_stamp_without_duplicate_tokens() {
    let dir = TempDir::new().unwrap();
    let image = fixture("golden", &dir);
    let recipe = shared_recipe(dir.path(), "");
    stamp(&image, &recipe, &["--hostname", "first"]);
    let once = boot_files(&image);
    stamp(&image, &recipe, &["--hostname", "second"]);
    stamp(&image, &recipe, &["--hostname", "first"]);
    let thrice = boot_files(&image);
    assert_eq!(
        once.keys().collect::<Vec<_>>(),
        thrice.keys().collect::<Vec<_>>()
    );
    for (name, data) in &once {
        if name != "piprov-stamp.json" && name != piprov::stamp::UNDO_FILE {
            assert!(&thrice[name] == data, "{name} differs after re-stamping");
        }
    }
    let cmdline = String::from_utf8(thrice["cmdline.txt"].clone()).unwrap();
    assert_eq!(cmdline.matches("systemd.run=").count(), 1, "{cmdline}");
    assert_fat_clean(&image, dir.path());
}

#[test]
fn unstamp_restores_the_boot_partition_exactly() {
    for variant in ["golden", "trixie"] {
        let dir = TempDir::new().unwrap();
        let image = fixture(variant, &dir);
        let before = boot_files(&image);
        let recipe = shared_recipe(dir.path(), "");
        stamp(&image, &recipe, &[]);
        assert_ne!(boot_files(&image), before);
        piprov()
            .arg("unstamp")
            .arg(&image)
            .assert()
            .success()
            .stdout(contains("unstamped"));
        assert_eq!(
            boot_files(&image),
            before,
            "{variant}: unstamp must give back the original files"
        );
        assert_fat_clean(&image, dir.path());
        // Not in the free clusters either: a removed file is overwritten first.
        let boot = dir.path().join("boot.part");
        extract_partition(&image, 1, &boot);
        let raw = std::fs::read(&boot).unwrap();
        assert!(
            !raw.windows(SHARED_CODE.len())
                .any(|w| w == SHARED_CODE.as_bytes()),
            "{variant}: the activation code is still on the FAT partition"
        );
        piprov()
            .arg("unstamp")
            .arg(&image)
            .assert()
            .success()
            .stdout(contains("nothing to change"));
    }
}

#[test]
fn cloud_init_images_get_a_seed_with_a_fresh_instance_id() {
    let dir = TempDir::new().unwrap();
    let image = fixture("trixie", &dir);
    let recipe = shared_recipe(dir.path(), "");
    stamp(&image, &recipe, &[]);
    let files = boot_files(&image);
    let meta = String::from_utf8(files["meta-data"].clone()).unwrap();
    assert!(meta.starts_with("instance-id: piprov-"), "{meta}");
    assert!(!meta.contains("rpi-golden"));
    let user_data = String::from_utf8(files["user-data"].clone()).unwrap();
    assert!(
        user_data.contains("#cloud-config\nhostname: raspberrypi"),
        "the image's own user-data is kept"
    );
    assert!(user_data.contains("exec sh /boot/firmware/piprov-install.sh --now"));
    assert!(
        user_data.contains("Content-Type: text/cloud-boothook"),
        "a boothook runs before the agent can start: {user_data}"
    );
    assert!(
        !String::from_utf8(files["cmdline.txt"].clone())
            .unwrap()
            .contains("systemd.run")
    );
    assert_eq!(files["piprov-orig-meta-data"], b"instance-id: rpi-golden\n");
    // Each stamp is a new instance for cloud-init.
    stamp(&image, &recipe, &[]);
    let again = String::from_utf8(boot_files(&image)["meta-data"].clone()).unwrap();
    assert_ne!(again, meta);
    let report = inspect_json(&image);
    assert_eq!(report["stamp"]["hook"], "cloud-init");
    assert_eq!(
        report["boot"]["cloud_init_seed"]["instance_id"],
        again.trim().trim_start_matches("instance-id: ")
    );
}

#[test]
fn dry_run_writes_nothing() {
    let dir = TempDir::new().unwrap();
    let image = fixture("registered", &dir);
    let hash = sha256_of(&image);
    let recipe = shared_recipe(dir.path(), "");
    let out = stamp_cmd(&image, &recipe)
        .args(["--dry-run", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let outcome: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(outcome["dry_run"], true);
    let changes = outcome["changes"].as_array().unwrap();
    assert!(
        changes
            .iter()
            .any(|c| c["file"] == "cmdline.txt" && c["action"] == "write")
    );
    assert!(
        changes
            .iter()
            .any(|c| c["file"] == "piprov-secret.conf" && c["secret"] == true)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains(SHARED_CODE));
    assert_eq!(sha256_of(&image), hash, "--dry-run must not change a byte");
}

#[test]
fn a_recipe_typo_is_named_with_its_line_and_nothing_is_written() {
    let dir = TempDir::new().unwrap();
    let image = fixture("golden", &dir);
    let hash = sha256_of(&image);
    let recipe = shared_recipe(dir.path(), "[sudo]\nstrip_nopaswd = false\n");
    stamp_cmd(&image, &recipe)
        .assert()
        .code(2)
        .stderr(contains("unknown field `strip_nopaswd`"))
        .stderr(contains("line 5"));
    let recipe = shared_recipe(dir.path(), "");
    stamp_cmd(&image, &recipe)
        .args(["--set", "hostname=door-{serail}"])
        .assert()
        .code(2)
        .stderr(contains("unknown placeholder {serail}"));
    assert_eq!(sha256_of(&image), hash);
}

#[test]
fn a_missing_code_file_fails_before_the_image_is_touched() {
    let dir = TempDir::new().unwrap();
    let image = fixture("golden", &dir);
    let hash = sha256_of(&image);
    let recipe = shared_recipe(dir.path(), "");
    std::fs::remove_file(dir.path().join("site.code")).unwrap();
    stamp_cmd(&image, &recipe)
        .assert()
        .code(2)
        .stderr(contains("reading the activation code from"));
    assert_eq!(sha256_of(&image), hash);
}

#[test]
fn another_first_boot_hook_is_not_overridden() {
    let dir = TempDir::new().unwrap();
    let image = dir.path().join("imager.img");
    build_image(
        &image,
        &[
            "--customize",
            r#"sed -i 's|$| systemd.run=/boot/firstrun.sh systemd.run_success_action=reboot|' "$boot/cmdline.txt""#,
        ],
    );
    let recipe = shared_recipe(dir.path(), "");
    stamp_cmd(&image, &recipe)
        .assert()
        .code(2)
        .stderr(contains("already runs systemd.run=/boot/firstrun.sh"));
}

#[test]
fn images_with_the_boot_partition_at_slash_boot_are_hooked_there() {
    let dir = TempDir::new().unwrap();
    let image = dir.path().join("bullseye.img");
    build_image(
        &image,
        &[
            "--customize",
            r#"sed -i 's|/boot/firmware|/boot|' "$root/etc/fstab""#,
        ],
    );
    let recipe = shared_recipe(dir.path(), "");
    stamp(&image, &recipe, &[]);
    let cmdline = String::from_utf8(boot_files(&image)["cmdline.txt"].clone()).unwrap();
    assert!(
        cmdline.contains(" systemd.run=/boot/piprov-install.sh "),
        "{cmdline}"
    );
}

/// Every value a recipe gives ends up in a `KEY=value` line on the card: a
/// line break in any of them (from the recipe, --set or a targets cell) is
/// refused, naming the key, and the image is not touched. The broker's URL is
/// https with a plain host, an activation id is a UUID, and a hostname fits in
/// one DNS label after its longest expansion.
#[test]
fn values_a_card_could_misread_are_refused_and_nothing_is_written() {
    let dir = TempDir::new().unwrap();
    let image = fixture("golden", &dir);
    let hash = sha256_of(&image);
    let recipe = shared_recipe(dir.path(), "");
    for (set, error) in [
        (
            "sudo.nopasswd_file=x\nSUDO_RULE=ALL ALL=(ALL) NOPASSWD: ALL",
            "sudo.nopasswd_file holds the control character",
        ),
        ("sudo.ssm_user=ssm-user\rX", "sudo.ssm_user"),
        ("tags.site=a\nb", "tags.site holds the control character"),
        ("activation.id=not-a-uuid", "is not an SSM activation id"),
        (
            "activation.id=0a0a0a0a-0000-4000-8000-000000000001\nBROKER_URL=http://x",
            "activation.id",
        ),
        (
            "hostname=door-",
            "must end with a letter, digit or placeholder",
        ),
        (
            "hostname=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-{serial}",
            "can expand to 66 characters; a hostname has at most 63",
        ),
    ] {
        stamp_cmd(&image, &recipe)
            .args(["--set", set])
            .assert()
            .code(2)
            .stderr(contains(error));
    }
    std::fs::write(dir.path().join("t"), "TOKEN\n").unwrap();
    std::fs::write(
        dir.path().join("ca.pem"),
        "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    for url in [
        "http://127.0.0.1",
        "https://user@127.0.0.1",
        "https://127.0.0.1/a b",
    ] {
        let broker = dir.path().join("broker.toml");
        std::fs::write(
            &broker,
            format!(
                "region = \"eu-west-1\"\n[activation]\nsource = \"broker\"\nurl = \"{url}\"\n\
                 ca_file = \"ca.pem\"\ntoken_file = \"t\"\n"
            ),
        )
        .unwrap();
        stamp_cmd(&image, &broker)
            .assert()
            .code(2)
            .stderr(contains("activation.url"));
    }
    assert_eq!(sha256_of(&image), hash);
}

#[test]
fn a_recipe_region_the_sdk_does_not_know_is_warned_about() {
    let dir = TempDir::new().unwrap();
    let image = fixture("golden", &dir);
    let recipe = shared_recipe(dir.path(), "");
    let text = std::fs::read_to_string(&recipe).unwrap();
    std::fs::write(&recipe, text.replace("eu-west-1", "mars-north-1")).unwrap();
    let out = stamp_cmd(&image, &recipe).output().unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("region \"mars-north-1\" is not one the AWS SDK knows; the nearest known region is eu-north-1"),
        "{stderr}"
    );
}

/// `piprov unstamp IMAGE`, which must succeed: what it printed.
fn unstamp_stdout(image: &std::path::Path) -> String {
    let out = succeed(piprov().arg("unstamp").arg(image));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// mtools on the boot partition of an image, for edits piprov did not make.
fn mtools(tool: &str, image: &std::path::Path, args: &[&str]) {
    let (start, _) = partition_extent(image, 1);
    let target = format!("{}@@{start}", image.display());
    let out = std::process::Command::new(tool)
        .arg("-i")
        .arg(&target)
        .args(args)
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{tool}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The whole image, byte for byte, after stamp → restamps → unstamp, on both
/// hooks.
#[test]
fn unstamp_after_restamps_gives_back_the_image_byte_for_byte() {
    for variant in ["golden", "trixie"] {
        let dir = TempDir::new().unwrap();
        let image = fixture(variant, &dir);
        let original = sha256_of(&image);
        let recipe = shared_recipe(dir.path(), "");
        for hostname in ["first", "second", "third"] {
            let out = stamp_cmd(&image, &recipe)
                .args(["--hostname", hostname])
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).to_string();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(!stdout.contains("not every byte"), "{variant}: {stdout}");
            assert_ne!(sha256_of(&image), original);
            assert_fat_clean(&image, dir.path());
        }
        let stdout = unstamp_stdout(&image);
        assert!(
            stdout.contains("byte for byte as before the stamp"),
            "{stdout}"
        );
        assert!(
            sha256_of(&image) == original,
            "{variant}: unstamp after restamps must give back the image's SHA-256"
        );
    }
}

/// A boot partition whose free space is all old data (a kernel update's
/// leftovers, not zeroes): no record on the partition can hold the old data
/// under itself too. The stamp says so up front, leaves no half record, and
/// unstamp still gives back every file.
#[test]
fn a_boot_partition_full_of_old_data_is_told_it_gets_its_files_back_not_its_bytes() {
    let dir = TempDir::new().unwrap();
    let image = fixture("golden", &dir);
    // Every free byte, with data that does not compress.
    let (start, _) = partition_extent(&image, 1);
    let listing = std::process::Command::new("mdir")
        .arg("-i")
        .arg(format!("{}@@{start}", image.display()))
        .arg("::")
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .unwrap();
    let listing = String::from_utf8(listing.stdout).unwrap();
    let free: u64 = listing
        .lines()
        .find_map(|l| l.trim().strip_suffix("bytes free"))
        .unwrap()
        .replace(' ', "")
        .parse()
        .unwrap();
    let old = dir.path().join("OLDKERN.IMG");
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let data: Vec<u8> = (0..free)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&old, data).unwrap();
    mtools("mcopy", &image, &[old.to_str().unwrap(), "::OLDKERN.IMG"]);
    mtools("mdel", &image, &["::OLDKERN.IMG"]);
    let before = boot_files(&image);
    let recipe = shared_recipe(dir.path(), "");
    let out = stamp_cmd(&image, &recipe).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Old data in a cluster fatfs adds to the root directory reads as entries.
    assert_fat_clean(&image, dir.path());
    assert!(
        stdout.contains("unstamp will restore the files, not every byte: the boot partition's free space holds old data"),
        "{stdout}"
    );
    assert!(!boot_files(&image).contains_key(piprov::stamp::UNDO_FILE));
    let stdout = unstamp_stdout(&image);
    assert!(
        stdout.contains("files restored, not every byte"),
        "{stdout}"
    );
    assert!(boot_files(&image) == before);
    assert_fat_clean(&image, dir.path());
}

/// When something else changed the boot partition after the stamp (here
/// config.txt edited by hand), writing old sectors back would undo that edit
/// or corrupt the FAT: unstamp removes the stamp file by file and says so.
#[test]
fn unstamp_after_an_edit_restores_files_and_keeps_the_edit() {
    let dir = TempDir::new().unwrap();
    let image = fixture("golden", &dir);
    let before = boot_files(&image);
    let recipe = shared_recipe(dir.path(), "");
    stamp(&image, &recipe, &[]);
    let edited = dir.path().join("config.txt");
    std::fs::write(&edited, b"dtparam=audio=on\nenable_uart=1\n").unwrap();
    mtools(
        "mcopy",
        &image,
        &["-o", edited.to_str().unwrap(), "::config.txt"],
    );
    let stdout = unstamp_stdout(&image);
    assert!(
        stdout.contains(
            "files restored, not every byte: the boot partition changed since it was stamped"
        ),
        "{stdout}"
    );
    let after = boot_files(&image);
    assert!(
        after["config.txt"] == b"dtparam=audio=on\nenable_uart=1\n",
        "the edit is kept"
    );
    let mut expected = before.clone();
    expected.remove("config.txt");
    let mut got = after.clone();
    got.remove("config.txt");
    assert!(
        got == expected,
        "every other file as before: {:?}",
        got.keys().collect::<Vec<_>>()
    );
    assert_fat_clean(&image, dir.path());
}
