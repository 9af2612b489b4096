//! `piprov inspect` on real images built with sfdisk, mkfs.vfat and mkfs.ext4.

mod common;

use common::*;
use predicates::str::contains;
use tempfile::TempDir;

const CLONE_RISKS: [&str; 5] = [
    "ssm-registration-baked",
    "ssm-user-nopasswd",
    "nopasswd-sudoers",
    "machine-id-baked",
    "ssh-host-keys-baked",
];

#[test]
fn a_golden_taken_from_a_registered_pi_shows_every_clone_risk() {
    let dir = TempDir::new().unwrap();
    let image = fixture("registered", &dir);
    let out = piprov()
        .args(["inspect", "--json"])
        .arg(&image)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "risky findings exit 1");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    assert_eq!(report["schema_version"], 1);
    assert_eq!(
        report["registration"]["instance_id"],
        "mi-0a1b2c3d4e5f60718"
    );
    assert_eq!(report["registration"]["region"], "eu-west-1");
    assert_eq!(report["sudo"]["ssm_agent_users"], "nopasswd");
    assert_eq!(
        report["sudo"]["nopasswd_files"][0],
        "/etc/sudoers.d/010_pi-nopasswd"
    );
    assert_eq!(report["machine_id"], "baked");
    assert_eq!(report["ssh_host_keys"].as_array().unwrap().len(), 3);
    let ids = finding_ids(&report);
    for risk in CLONE_RISKS {
        assert!(ids.contains(&risk.to_string()), "missing {risk} in {ids:?}");
    }
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        !text.contains("privateKey"),
        "the private key must never be printed"
    );
}

#[test]
fn a_clean_golden_has_none_of_the_clone_risks() {
    let dir = TempDir::new().unwrap();
    let image = fixture("golden", &dir);
    piprov()
        .arg("inspect")
        .arg(&image)
        .assert()
        .code(0)
        .stdout(contains("0 risky finding(s)"));
    let report = inspect_json(&image);
    let ids = finding_ids(&report);
    for risk in CLONE_RISKS {
        assert!(
            !ids.contains(&risk.to_string()),
            "unexpected {risk} in {ids:?}"
        );
    }
    assert_eq!(
        report["registration"]["instance_id"],
        serde_json::Value::Null
    );
    assert_eq!(report["machine_id"], "uninitialized");
    assert_eq!(report["ssm_agent"]["version"], "3.3.987.0-1");
    assert_eq!(report["boot"]["mount_point"], "/boot/firmware");
    assert_eq!(report["os"]["codename"], "bookworm");
}

#[test]
fn the_text_report_names_each_risk_with_a_remedy() {
    let dir = TempDir::new().unwrap();
    let image = fixture("registered", &dir);
    piprov()
        .arg("inspect")
        .arg(&image)
        .assert()
        .code(1)
        .stdout(contains(
            "CRITICAL ssm-registration-baked: SSM registration baked in: mi-0a1b2c3d4e5f60718",
        ))
        .stdout(contains("fix: "))
        .stdout(contains("010_pi-nopasswd grants passwordless sudo"));
}

#[test]
fn partition_starts_are_read_from_the_table_not_assumed() {
    let dir = TempDir::new().unwrap();
    for start in [8192u64, 24576] {
        let image = dir.path().join(format!("start-{start}.img"));
        build_image(&image, &["--boot-start", &start.to_string()]);
        let report = inspect_json(&image);
        assert_eq!(
            report["partition_table"]["partitions"][0]["start"],
            start * 512
        );
        assert_eq!(report["boot"]["fat_type"], "FAT32");
        let root = report["boot"]["root"].as_str().unwrap();
        let disk_id = report["partition_table"]["disk_id"].as_str().unwrap();
        assert_eq!(root, format!("PARTUUID={disk_id}-02"));
    }
}

#[test]
fn trixie_with_cloud_init_shows_its_seed() {
    let dir = TempDir::new().unwrap();
    let report = inspect_json(&fixture("trixie", &dir));
    assert_eq!(report["os"]["codename"], "trixie");
    assert_eq!(report["cloud_init_installed"], true);
    assert_eq!(
        report["boot"]["cloud_init_seed"]["instance_id"],
        "rpi-golden"
    );
    assert!(finding_ids(&report).contains(&"cloud-init-seed".to_string()));
}

#[test]
fn gpt_images_are_read() {
    let dir = TempDir::new().unwrap();
    let image = fixture("gpt", &dir);
    let report = inspect_json(&image);
    assert_eq!(report["partition_table"]["kind"], "gpt");
    let parts = report["partition_table"]["partitions"].as_array().unwrap();
    assert_eq!(parts[0]["name"], "bootfs");
    assert_eq!(parts[0]["filesystem"], "fat");
    assert_eq!(parts[1]["filesystem"], "ext");
    let sfdisk = std::process::Command::new("sfdisk")
        .args(["--part-uuid"])
        .arg(&image)
        .arg("2")
        .output()
        .unwrap();
    let partuuid = String::from_utf8(sfdisk.stdout)
        .unwrap()
        .trim()
        .to_lowercase();
    assert_eq!(parts[1]["partuuid"], partuuid);
}

#[test]
fn help_explains_exit_codes() {
    piprov()
        .args(["inspect", "--help"])
        .assert()
        .success()
        .stdout(contains("0 no risky findings, 1 risky"))
        .stdout(contains("2 error"));
}

#[test]
fn identity_shows_the_machine_id_and_host_key_fingerprints() {
    let dir = TempDir::new().unwrap();
    let image = fixture("registered", &dir);
    let report = inspect_json(&image);
    let identity = &report["identity"];
    let rootfs = piprov::image::Image::open(&image).unwrap();
    let root = rootfs.rootfs().unwrap();
    let machine_id = root.read_text("/etc/machine-id").unwrap().unwrap();
    assert_eq!(identity["machine_id"], machine_id.trim());
    let mut expected = Vec::new();
    for kind in ["ecdsa", "ed25519", "rsa"] {
        let public = root
            .read_text(&format!("/etc/ssh/ssh_host_{kind}_key.pub"))
            .unwrap()
            .unwrap();
        let file = dir.path().join(format!("{kind}.pub"));
        std::fs::write(&file, public).unwrap();
        let out = std::process::Command::new("ssh-keygen")
            .arg("-lf")
            .arg(&file)
            .output()
            .unwrap();
        expected.push(
            String::from_utf8(out.stdout)
                .unwrap()
                .split(' ')
                .nth(1)
                .unwrap()
                .to_string(),
        );
    }
    expected.sort();
    assert_eq!(
        identity["ssh_host_key_fingerprints"],
        serde_json::json!(expected)
    );

    let clean = fixture("golden", &dir);
    let report = inspect_json(&clean);
    assert_eq!(report["identity"]["machine_id"], serde_json::Value::Null);
}

/// Text from the image is shown escaped: an escape sequence in cmdline.txt
/// (here one that would clear the screen and set the window title) never
/// reaches the terminal raw.
#[test]
fn terminal_escapes_from_the_image_are_shown_escaped() {
    let dir = TempDir::new().unwrap();
    let image = fixture("golden", &dir);
    let cmdline = dir.path().join("cmdline.txt");
    std::fs::write(
        &cmdline,
        "console=tty1 root=PARTUUID=x \u{1b}[2J\u{1b}]0;owned\u{7} rootwait\n",
    )
    .unwrap();
    let (start, _) = partition_extent(&image, 1);
    let ok = std::process::Command::new("mcopy")
        .args(["-o", "-i"])
        .arg(format!("{}@@{start}", image.display()))
        .arg(&cmdline)
        .arg("::/cmdline.txt")
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let out = piprov().arg("inspect").arg(&image).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        !text.contains('\u{1b}') && !text.contains('\u{7}'),
        "{text:?}"
    );
    assert!(text.contains("\\u{1b}[2J"), "{text}");
}

/// Raspberry Pi OS ships `.img.xz`: inspect reads every format flash reads
/// (decoded once, into the same cache), and stamp on an archive says what to
/// do instead.
#[test]
fn an_archive_is_inspected_and_stamp_says_what_to_do_with_one() {
    let dir = TempDir::new().unwrap();
    let image = fixture("registered", &dir);
    let ok = std::process::Command::new("xz")
        .args(["-k", "-T2"])
        .arg(&image)
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let xz = dir.path().join("registered.img.xz");
    piprov()
        .env("PIPROV_CACHE_DIR", dir.path().join("cache"))
        .arg("inspect")
        .arg(&xz)
        .assert()
        .code(1)
        .stdout(contains(
            "CRITICAL ssm-registration-baked: SSM registration baked in: mi-0a1b2c3d4e5f60718",
        ));
    let recipe = common::card::shared_recipe(dir.path(), "");
    piprov()
        .arg("stamp")
        .arg(&xz)
        .arg("--recipe")
        .arg(&recipe)
        .assert()
        .code(2)
        .stderr(contains("is an archive (xz)"))
        .stderr(contains("flash it with --recipe"));
}
