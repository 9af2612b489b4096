//! The device side (firstboot/) run against cards unpacked from real stamped
//! images, with stand-ins for amazon-ssm-agent and systemctl that follow the
//! real command-line contracts, and the real visudo and ssh-keygen.

mod common;

use std::path::Path;
use std::process::Command;

use common::card::{
    Card, GOLDEN_ID, PI_A, PI_B, SHARED_CODE, SHARED_ID, Ssm, shared_recipe, stamp, stamp_cmd,
    stamped_card,
};
use common::card_broker::{CardBroker, Certified};
use common::disk::{Loop, loop_devices_usable, make_partition_node};
use common::stub::logged_requests;
use common::*;
use tempfile::TempDir;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn golden_from_a_registered_pi_gets_a_new_identity() {
    let dir = TempDir::new().unwrap();
    let ssm = Ssm::new(dir.path());
    let card = stamped_card(&dir, &ssm, "");
    let golden_machine_id = card.read("/etc/machine-id");
    let golden_rsa_key = card.read("/etc/ssh/ssh_host_rsa_key.pub");

    let out = card.install();
    assert!(out.status.success(), "{}", stderr(&out));
    // The hook is gone, the rest of cmdline.txt is as it was.
    let cmdline = card.read("/boot/firmware/cmdline.txt");
    assert!(!cmdline.contains("systemd.run"), "{cmdline}");
    assert!(cmdline.ends_with("plymouth.ignore-serial-consoles\n"));
    // The secret left the FAT partition for a root-only file.
    assert!(!card.exists("/boot/firmware/piprov-secret.conf"));
    assert_eq!(card.mode("/var/lib/piprov/secret.conf"), 0o600);
    assert_eq!(card.mode("/var/lib/piprov"), 0o700);
    assert!(card.exists("/etc/systemd/system/multi-user.target.wants/piprov-guard.service"));
    assert!(card.exists("/etc/systemd/system/amazon-ssm-agent.service.d/piprov.conf"));

    let out = card.guard(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!card.exists("/var/lib/amazon/ssm/registration"));
    assert!(!card.exists("/var/lib/amazon/ssm/Vault/Store/RegistrationKey"));
    assert!(!card.exists("/var/lib/amazon/ssm/mi-0a1b2c3d4e5f60718"));
    assert!(!card.exists("/root/.aws/credentials"));
    assert!(!card.exists("/var/lib/systemd/random-seed"));
    let machine_id = card.read("/etc/machine-id");
    assert_ne!(machine_id, golden_machine_id);
    assert_eq!(machine_id.trim().len(), 32);
    assert_eq!(
        std::fs::read_link(card.path("/var/lib/dbus/machine-id")).unwrap(),
        Path::new("/etc/machine-id")
    );
    assert_ne!(card.read("/etc/ssh/ssh_host_rsa_key.pub"), golden_rsa_key);
    assert_eq!(card.read("/etc/hostname"), "door-10000000aaaa0001\n");
    assert_eq!(
        card.read("/etc/sudoers.d/ssm-agent-users"),
        "#User rules for ssm-user\n"
    );
    assert!(!card.exists("/etc/sudoers.d/010_pi-nopasswd"));
    assert!(card.read("/etc/group").lines().any(|l| l == "sudo:x:27:pi"));
    assert!(card.exists("/var/lib/piprov/needs-registration"));
    assert!(
        card.standin_log()
            .contains("systemctl stop amazon-ssm-agent.service")
    );

    let out = card.register(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = card.instance_id();
    assert!(id.starts_with("mi-") && id != GOLDEN_ID, "{id}");
    assert!(
        card.standin_log()
            .contains("amazon-ssm-agent -register -y -id 0a0a0a0a-0000-4000-8000-000000000001")
    );
    assert!(
        card.standin_log()
            .contains("systemctl start amazon-ssm-agent.service")
    );
    let binding = card.read("/var/lib/piprov/binding");
    assert!(
        binding.contains("identity=serial:10000000aaaa0001"),
        "{binding}"
    );
    assert!(binding.contains(&format!("instance_id={id}")), "{binding}");
    assert!(binding.contains(&format!("machine_id={}", machine_id.trim())));
    let status = card.status();
    assert_eq!(status["state"], "registered");
    assert_eq!(status["instance_id"], id.as_str());
    assert_eq!(status["previous_instance_id"], GOLDEN_ID);
    assert!(!card.exists("/var/lib/piprov/needs-registration"));
    assert_eq!(
        card.files_containing(SHARED_CODE),
        Vec::<String>::new(),
        "no secret left"
    );
    assert!(
        !stderr(&out).contains(SHARED_CODE),
        "secrets are never logged"
    );
    // The fingerprint the agent recorded is this card's machine-id.
    assert!(
        card.read("/var/lib/amazon/ssm/Vault/Store/InstanceFingerprint")
            .contains(machine_id.trim())
    );
    // `piprov inspect` reads the outcome from the boot partition's status file.
    assert_eq!(ssm.instances().len(), 1);
}

#[test]
fn second_boot_on_the_same_pi_changes_nothing() {
    let dir = TempDir::new().unwrap();
    let ssm = Ssm::new(dir.path());
    let card = stamped_card(&dir, &ssm, "");
    card.first_boot();
    let before = card.snapshot();
    let log_before = card.standin_log();
    for out in [card.guard(&[]), card.register(&[])] {
        assert!(out.status.success(), "{}", stderr(&out));
    }
    assert_eq!(card.snapshot(), before);
    assert_eq!(card.standin_log(), log_before, "no agent or systemctl call");
}

#[test]
fn a_card_cloned_into_another_pi_re_registers_and_leaves_the_original_alone() {
    let dir = TempDir::new().unwrap();
    let ssm = Ssm::new(dir.path());
    let original = stamped_card(&dir, &ssm, "");
    original.first_boot();
    let original_id = original.instance_id();
    let original_files = original.snapshot();

    let clone = original.clone_to(dir.path(), "clone");
    clone.plug_into(PI_B.0, PI_B.1);
    // The original's secret was used up: the clone is safe but cannot register.
    let out = clone.guard(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        !clone.exists("/var/lib/amazon/ssm/registration"),
        "the clone dropped the original's identity"
    );
    clone.register(&[]);
    assert_eq!(clone.status()["state"], "needs-activation");
    // An operator drops a fresh activation on the boot partition; on the next boot it registers.
    ssm.add_activation(
        "0a0a0a0a-0000-4000-8000-000000000002",
        "FRESHCODE-99",
        1,
        false,
    );
    std::fs::write(
        clone.path("/boot/firmware/piprov-secret.conf"),
        "ACTIVATION_ID=0a0a0a0a-0000-4000-8000-000000000002\nACTIVATION_CODE=FRESHCODE-99\n",
    )
    .unwrap();
    let out = clone.register(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let clone_id = clone.instance_id();
    assert!(clone_id != original_id && clone_id != GOLDEN_ID);
    assert_ne!(
        clone.read("/etc/machine-id"),
        original.read("/etc/machine-id")
    );
    assert_ne!(
        clone.read("/etc/ssh/ssh_host_ed25519_key.pub"),
        original.read("/etc/ssh/ssh_host_ed25519_key.pub")
    );
    assert_eq!(clone.read("/etc/hostname"), "door-10000000bbbb0002\n");
    assert_eq!(clone.status()["previous_instance_id"], original_id.as_str());
    assert_eq!(clone.files_containing("FRESHCODE-99"), Vec::<String>::new());
    assert_eq!(
        original.snapshot(),
        original_files,
        "the original card is untouched"
    );
    assert_eq!(ssm.instances().len(), 2);
}

/// The agent's ExecCondition: the agent starts only when the card is bound to
/// the hardware it runs on, with this machine-id and the id the agent holds.
#[test]
fn the_agent_starts_only_on_a_card_bound_to_this_hardware() {
    let dir = TempDir::new().unwrap();
    let ssm = Ssm::new(dir.path());
    let card = stamped_card(&dir, &ssm, "");
    assert!(card.install().status.success());
    // Golden state, guard not run (failed, killed or missing): blocked, and said.
    assert_eq!(card.gate().status.code(), Some(1));
    let status = card.status();
    assert_eq!(status["state"], "blocked");
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("the guard did not finish"),
        "{status}"
    );
    assert!(card.guard(&[]).status.success());
    assert_eq!(
        card.gate().status.code(),
        Some(1),
        "waiting for registration"
    );
    assert_eq!(
        card.status()["state"],
        "pending",
        "the wait is not an alarm"
    );
    assert!(card.register(&[]).status.success());
    assert!(card.gate().status.success(), "{}", stderr(&card.gate()));

    // The same card cloned into another Pi, before its guard runs.
    let clone = card.clone_to(dir.path(), "clone");
    clone.plug_into(PI_B.0, PI_B.1);
    assert_eq!(clone.gate().status.code(), Some(1));
    assert!(
        clone.status()["message"]
            .as_str()
            .unwrap()
            .contains("not to this hardware"),
        "{}",
        clone.status()
    );
    // Its own Pi, but the agent's key replaced by another node's.
    std::fs::write(
        card.path("/var/lib/amazon/ssm/Vault/Store/RegistrationKey"),
        r#"{"instanceID":"mi-00000000000000001","region":"eu-west-1","privateKey":"x","privateKeyType":"Rsa"}"#,
    )
    .unwrap();
    assert_eq!(card.gate().status.code(), Some(1));
    assert!(
        card.status()["message"]
            .as_str()
            .unwrap()
            .contains("the agent holds mi-00000000000000001"),
        "{}",
        card.status()
    );
}

/// What no two cards may share is one list (firstboot/contract.sh): every
/// entry planted in a golden image is reported by `piprov inspect` and gone
/// after the guard.
#[test]
fn the_clone_state_list_is_one_for_inspect_and_the_guard() {
    let dir = TempDir::new().unwrap();
    // One concrete file for each glob of the list.
    let planted: Vec<String> = piprov::layout::CLONE_STATE
        .iter()
        .map(|p| p.replace("/home/*/", "/home/pi/").replace('*', "eth0"))
        .collect();
    let code: String = planted
        .iter()
        .map(|p| {
            format!(
                "mkdir -p \"$root{}\" && echo golden-state >\"$root{p}\"; ",
                Path::new(p).parent().unwrap().display()
            )
        })
        .collect();
    let image = dir.path().join("golden.img");
    build_image(&image, &["--variant", "registered", "--customize", &code]);
    let report = inspect_json(&image);
    let reported: Vec<String> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["id"] == "clone-state")
        .map(|f| f["summary"].as_str().unwrap().to_string())
        .collect();
    for path in &planted {
        assert!(
            reported.iter().any(|s| s.starts_with(&format!("{path} "))),
            "inspect reports {path}: {reported:?}"
        );
    }
    let ssm = Ssm::new(dir.path());
    stamp(&image, &shared_recipe(dir.path(), ""), &[]);
    let card = Card::from_image(&image, dir.path(), "card", &ssm);
    card.plug_into(PI_A.0, PI_A.1);
    for path in &planted {
        assert!(card.exists(path), "{path} is on the card");
    }
    assert!(card.install().status.success());
    let out = card.guard(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    for path in &planted {
        assert!(!card.exists(path), "the guard removed {path}");
    }
}

#[test]
fn a_power_cut_after_any_step_resumes() {
    let guard_steps = [
        "stop_agent",
        "remember_previous",
        "wipe_identity",
        "grow_root",
        "new_machine_id",
        "new_ssh_keys",
        "forget_clone_state",
        "set_hostname",
        "harden_sudo",
        "agent_settings",
        "mark_registration",
    ];
    let register_points = ["registered", "bound"];
    let dir = TempDir::new().unwrap();
    let image = fixture("registered", &dir);
    let recipe = shared_recipe(dir.path(), "");
    stamp(&image, &recipe, &[]);
    for (i, point) in guard_steps.iter().chain(register_points.iter()).enumerate() {
        let ssm = Ssm::new(&dir.path().join(format!("ssm-{i}")));
        // Limit 1: a second registration after the cut would be refused.
        ssm.add_activation(SHARED_ID, SHARED_CODE, 1, false);
        let card = Card::from_image(&image, dir.path(), &format!("cut-{i}"), &ssm);
        card.plug_into(PI_A.0, PI_A.1);
        assert!(card.install().status.success());
        let cut = [("PIPROV_FAILPOINT", *point)];
        let out = if guard_steps.contains(point) {
            card.guard(&cut)
        } else {
            assert!(card.guard(&[]).status.success());
            card.register(&cut)
        };
        assert!(
            !out.status.success(),
            "the cut at {point} must stop the script"
        );
        // Until the card is bound again, the agent is kept stopped, and the card
        // says why where a cut left no registration pending.
        let gate = card.gate();
        assert_eq!(gate.status.code(), Some(1), "after a cut at {point}");
        if !card.exists("/var/lib/piprov/needs-registration") {
            assert_eq!(card.status()["state"], "blocked", "after a cut at {point}");
        }
        if guard_steps.contains(point) {
            // What systemd runs after the killed guard (its ExecStopPost).
            let after = card.run_shell(&format!(
                "SERVICE_RESULT=signal EXIT_STATUS=KILL sh {} --after-failure",
                card.path("/usr/local/lib/piprov/guard.sh").display()
            ));
            assert_eq!(after.status.code(), Some(1));
            let status = card.status();
            assert_eq!(status["state"], "blocked", "after a cut at {point}");
            assert!(
                status["message"]
                    .as_str()
                    .unwrap()
                    .contains("the guard did not finish (signal: KILL)"),
                "{status}"
            );
        }
        let machine_id_after_cut = card.read("/etc/machine-id");
        let machine_id_step = guard_steps
            .iter()
            .position(|s| *s == "new_machine_id")
            .unwrap();
        let made_before_cut = guard_steps
            .iter()
            .position(|s| s == point)
            .is_none_or(|i| i >= machine_id_step);
        // The next boot: the guard, then registration.
        card.first_boot_after_install();
        assert_eq!(
            card.status()["state"],
            "registered",
            "after a cut at {point}"
        );
        assert!(card.gate().status.success(), "bound: the agent may start");
        assert_ne!(card.instance_id(), GOLDEN_ID);
        assert_eq!(
            ssm.used(SHARED_ID),
            1,
            "exactly one registration after a cut at {point}"
        );
        assert_eq!(ssm.instances().len(), 1);
        if made_before_cut {
            assert_eq!(
                card.read("/etc/machine-id"),
                machine_id_after_cut,
                "machine-id not made twice after a cut at {point}"
            );
        }
        assert!(
            card.read("/var/lib/piprov/binding")
                .contains("identity=serial:10000000aaaa0001")
        );
        assert_eq!(card.files_containing(SHARED_CODE), Vec::<String>::new());
        assert!(!card.exists("/etc/sudoers.d/010_pi-nopasswd"));
    }
}

/// A captured (shrunk) golden on a larger card: the guard grows the root
/// partition to the card's end and its ext4 with it, online (mounted); a power
/// cut between the two resumes on the next boot with only the filesystem to
/// grow.
#[test]
fn a_card_larger_than_its_image_grows_to_fill_it() {
    let dir = TempDir::new().unwrap();
    if !loop_devices_usable(&dir) {
        return;
    }
    let image = dir.path().join("pi.img");
    build_image(&image, &["--variant", "registered", "--size", "512"]);
    let recipe = shared_recipe(dir.path(), "");
    stamp(&image, &recipe, &[]);
    let golden = dir.path().join("golden.img");
    let captured = piprov()
        .arg("capture")
        .arg(&image)
        .arg(&golden)
        .output()
        .unwrap();
    assert!(
        matches!(captured.status.code(), Some(0 | 1)),
        "{}",
        stderr(&captured)
    );
    let small = std::fs::metadata(&golden).unwrap().len();
    let card_len: u64 = 768 << 20;
    assert!(small < card_len / 2, "the golden is shrunk: {small}");
    let backing = dir.path().join("card.dev");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(card_len)
        .unwrap();
    let copied = Command::new("dd")
        .arg(format!("if={}", golden.display()))
        .arg(format!("of={}", backing.display()))
        .args(["bs=4M", "conv=notrunc,sparse", "status=none"])
        .status()
        .unwrap();
    assert!(copied.success());
    let disk = Loop::new(&backing, &["-P"]).unwrap();
    let part = format!("{}p2", disk.dev);
    make_partition_node(&part);
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    assert!(
        Command::new("mount")
            .arg(&part)
            .arg(&mnt)
            .status()
            .unwrap()
            .success()
    );
    let fs_bytes = || {
        let out = Command::new("dumpe2fs")
            .args(["-h", &part])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let field = |name: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        field("Block count:") * field("Block size:")
    };
    let part_end = || {
        let (start, size) = partition_extent(Path::new(&disk.dev), 2);
        start + size
    };
    let before = fs_bytes();

    let ssm = Ssm::new(&dir.path().join("ssm"));
    ssm.add_activation(SHARED_ID, SHARED_CODE, 5, false);
    let card = Card::from_image(&golden, dir.path(), "grown", &ssm);
    card.plug_into(PI_A.0, PI_A.1);
    assert!(card.install().status.success());
    let device = [("PIPROV_ROOT_PARTITION", part.as_str())];
    let cut = card.guard(&[device[0], ("PIPROV_FAILPOINT", "grow_partition")]);
    assert!(!cut.status.success(), "the cut stops the guard");
    assert!(
        part_end() > card_len - (1 << 20),
        "the partition grew first"
    );
    assert_eq!(
        fs_bytes(),
        before,
        "the cut came before the filesystem grew"
    );
    let booted = card.guard(&device);
    let _ = Command::new("umount").arg(&mnt).status();
    assert!(booted.status.success(), "{}", stderr(&booted));
    let grown = fs_bytes();
    let (start, _) = partition_extent(Path::new(&disk.dev), 2);
    assert!(part_end() > card_len - (1 << 20));
    // Growing a mounted ext4 takes CAP_SYS_RESOURCE, which a container (CI)
    // may lack: then the card must go on at its size, saying so (the VM boots
    // have it).
    if !has_capability(24) {
        assert_eq!(grown, before);
        assert!(
            stderr(&booted).contains("the filesystem keeps its size"),
            "{}",
            stderr(&booted)
        );
        eprintln!("no CAP_SYS_RESOURCE here: the online resize is left to the VM boots");
        return;
    }
    assert!(
        grown > before && grown + (4 << 20) >= card_len - start,
        "the root fills the card: {before} → {grown} of {}: {}",
        card_len - start,
        stderr(&booted)
    );
    assert!(stderr(&booted).contains("fills"), "{}", stderr(&booted));
}

/// Whether this process holds capability `bit` (its effective set).
fn has_capability(bit: u32) -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    u64::from_str_radix(effective, 16).unwrap() & (1 << bit) != 0
}

trait Resume {
    fn first_boot_after_install(&self);
}

impl Resume for Card {
    fn first_boot_after_install(&self) {
        for (what, out) in [("guard", self.guard(&[])), ("register", self.register(&[]))] {
            assert!(
                out.status.success(),
                "{what} failed on resume:\n{}",
                stderr(&out)
            );
        }
    }
}

#[test]
fn an_invalid_sudo_rule_is_not_installed_and_sudo_stays_valid() {
    let dir = TempDir::new().unwrap();
    let ssm = Ssm::new(dir.path());
    let card = stamped_card(
        &dir,
        &ssm,
        "[sudo]\nreplacement_rule = \"pi ALL=(ALL ALL\"\n",
    );
    assert!(card.install().status.success());
    let out = card.guard(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("does not parse (visudo -c): not installed"),
        "{}",
        stderr(&out)
    );
    assert!(!card.exists("/etc/sudoers.d/piprov-users"));
    assert!(!card.exists("/etc/sudoers.d/010_pi-nopasswd"));
    assert_policy_parses(&card);
}

#[test]
fn a_valid_sudo_rule_replaces_nopasswd() {
    let dir = TempDir::new().unwrap();
    let ssm = Ssm::new(dir.path());
    let card = stamped_card(
        &dir,
        &ssm,
        "[sudo]\nreplacement_rule = \"pi ALL=(ALL:ALL) ALL\"\n",
    );
    assert!(card.install().status.success());
    assert!(card.guard(&[]).status.success());
    assert_eq!(
        card.read("/etc/sudoers.d/piprov-users"),
        "pi ALL=(ALL:ALL) ALL\n"
    );
    assert_eq!(card.mode("/etc/sudoers.d/piprov-users"), 0o440);
    assert_policy_parses(&card);
}

#[test]
fn a_sudo_rule_that_conflicts_with_the_image_is_taken_back() {
    let dir = TempDir::new().unwrap();
    let ssm = Ssm::new(dir.path());
    // Parses alone, but the image already defines ADMINS: sudo rejects the pair.
    let card = stamped_card(
        &dir,
        &ssm,
        "[sudo]\nreplacement_rule = \"User_Alias ADMINS = pi\"\n",
    );
    std::fs::write(
        card.path("/etc/sudoers.d/020_ops"),
        "User_Alias ADMINS = ops\nADMINS ALL=(ALL) ALL\n",
    )
    .unwrap();
    assert!(card.install().status.success());
    let out = card.guard(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("conflicts with the image's sudoers (visudo -c): taken back"),
        "{}",
        stderr(&out)
    );
    assert!(!card.exists("/etc/sudoers.d/piprov-users"));
    // The hardening itself stays.
    assert!(!card.exists("/etc/sudoers.d/010_pi-nopasswd"));
    assert_eq!(
        card.read("/etc/sudoers.d/ssm-agent-users"),
        "#User rules for ssm-user\n"
    );
    assert_policy_parses(&card);
}

fn assert_policy_parses(card: &Card) {
    let mut policy = String::new();
    for line in card
        .read("/etc/sudoers")
        .lines()
        .filter(|l| !l.starts_with("@include"))
    {
        policy.push_str(line);
        policy.push('\n');
    }
    let mut names: Vec<_> = std::fs::read_dir(card.path("/etc/sudoers.d"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    for path in names {
        if !path.file_name().unwrap().to_str().unwrap().contains('.') {
            policy.push_str(&std::fs::read_to_string(path).unwrap());
        }
    }
    let file = card.root.with_extension("policy");
    std::fs::write(&file, policy).unwrap();
    let out = Command::new("visudo")
        .args(["-c", "-f"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "visudo -c: {}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
}

#[test]
fn an_expired_activation_leaves_a_clear_status_and_no_secret() {
    let dir = TempDir::new().unwrap();
    let ssm = Ssm::new(dir.path());
    let card = stamped_card(&dir, &ssm, "");
    ssm.add_activation(SHARED_ID, SHARED_CODE, 5, true);
    assert!(card.install().status.success());
    assert!(card.guard(&[]).status.success());
    let out = card.register(&[]);
    assert!(
        out.status.success(),
        "a refusal is final, not a crash: {}",
        stderr(&out)
    );
    let status = card.status();
    assert_eq!(status["state"], "failed");
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("0a0a0a0a-0000-4000-8000-000000000001 was refused"),
        "{status}"
    );
    assert!(
        status["message"].as_str().unwrap().contains("has expired"),
        "{status}"
    );
    assert_eq!(card.files_containing(SHARED_CODE), Vec::<String>::new());
    assert!(!card.exists("/var/lib/amazon/ssm/registration"));
    assert_eq!(
        card.standin_log().matches("-register -y").count(),
        1,
        "no retry of a refused activation"
    );
}

/// RegisterManagedInstance's errors by their real names: the three about the
/// activation are final, the two about SSM are retried, a refused public key
/// is a bug to report.
#[test]
fn registration_errors_are_told_apart_by_their_real_names() {
    for (answers, state, says, attempts, secret_kept) in [
        (
            &["ActivationExpired: Activation has expired."][..],
            "failed",
            "was refused",
            1,
            false,
        ),
        (
            &["RegistrationLimitExceeded: Activation has reached its registration limit."],
            "failed",
            "was refused",
            1,
            false,
        ),
        (
            &["InvalidActivation: Activation ID or Code is not valid."],
            "failed",
            "was refused",
            1,
            false,
        ),
        (
            &[
                "InternalServerError: Internal error",
                "TooManyUpdates: Too many updates",
            ],
            "registered",
            "registered as",
            3,
            false,
        ),
        (
            &["InvalidPublicKey: The public key is not valid."],
            "failed",
            "please report it",
            1,
            true,
        ),
    ] {
        let dir = TempDir::new().unwrap();
        let ssm = Ssm::new(dir.path());
        let card = stamped_card(&dir, &ssm, "");
        assert!(card.install().status.success());
        assert!(card.guard(&[]).status.success());
        ssm.answer_next(answers);
        let out = card.register(&[]);
        assert!(out.status.success(), "{answers:?}: {}", stderr(&out));
        let status = card.status();
        assert_eq!(status["state"], state, "{answers:?}: {status}");
        assert!(
            status["message"].as_str().unwrap().contains(says),
            "{answers:?}: {status}"
        );
        assert_eq!(
            card.standin_log().matches("-register -y").count(),
            attempts,
            "{answers:?}"
        );
        assert_eq!(
            card.exists("/var/lib/piprov/secret.conf"),
            secret_kept,
            "{answers:?}"
        );
    }
}

/// A shared activation another card used up: SSM says RegistrationLimitExceeded,
/// and the card stops asking (it used to retry for ever).
#[test]
fn a_used_up_shared_activation_is_final() {
    let dir = TempDir::new().unwrap();
    let ssm = Ssm::new(dir.path());
    let card = stamped_card(&dir, &ssm, "");
    ssm.add_activation(SHARED_ID, SHARED_CODE, 0, false);
    assert!(card.install().status.success());
    assert!(card.guard(&[]).status.success());
    let out = card.register(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(card.status()["state"], "failed");
    assert!(
        card.status()["message"]
            .as_str()
            .unwrap()
            .contains("RegistrationLimitExceeded"),
        "{}",
        card.status()
    );
    assert_eq!(card.standin_log().matches("-register -y").count(), 1);
}

/// A Pi without a real-time clock that has not set its time yet: SSM refuses
/// the signature; the card says so, keeps its secret and registers once the
/// clock is right.
#[test]
fn a_clock_far_off_says_so_keeps_the_secret_and_retries() {
    let dir = TempDir::new().unwrap();
    let ssm = Ssm::new(dir.path());
    let card = stamped_card(&dir, &ssm, "");
    assert!(card.install().status.success());
    assert!(card.guard(&[]).status.success());
    let skew = "InvalidSignatureException: Signature expired: 19700101T000012Z is now earlier than 20261201T095000Z (20261201T100000Z - 10 min.)";
    ssm.answer_next(&[skew, skew, skew]);
    let out = card.register(&[]);
    assert!(!out.status.success(), "gives up for now: {}", stderr(&out));
    let status = card.status();
    assert_eq!(status["state"], "pending");
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("the clock is wrong"),
        "{status}"
    );
    assert!(
        card.exists("/var/lib/piprov/secret.conf"),
        "the secret is kept"
    );
    let out = card.register(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(card.status()["state"], "registered");
}

/// The agent stand-in keeps the real agent's files: after `-register -clear`
/// and after a refused registration its key holds no instance id (but is not
/// empty), and `registration` still names the old one. The scripts read the id
/// the agent would speak as from the key.
#[test]
fn a_cleared_or_refused_agent_holds_no_identity_the_scripts_see() {
    let dir = TempDir::new().unwrap();
    let ssm = Ssm::new(dir.path());
    let card = stamped_card(&dir, &ssm, "");
    let lib = card.path("/boot/firmware/piprov-lib.sh");
    let current = || {
        let out = card.run_shell(&format!(". {}; current_instance_id", lib.display()));
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{}",
            stderr(&out)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    assert_eq!(current(), GOLDEN_ID, "the golden's key names its id");
    let out = card.run_shell("amazon-ssm-agent -register -clear");
    assert!(out.status.success());
    let key = card.read("/var/lib/amazon/ssm/Vault/Store/RegistrationKey");
    assert!(
        key.contains("\"instanceID\":\"\"") && key.len() > 100,
        "{key}"
    );
    assert!(
        card.read("/var/lib/amazon/ssm/Vault/Store/InstanceFingerprint")
            .contains("\"hardwareHash\":null")
    );
    assert!(
        card.read("/var/lib/amazon/ssm/registration")
            .contains(GOLDEN_ID)
    );
    assert!(card.exists("/var/lib/amazon/ssm/mi-0a1b2c3d4e5f60718"));
    assert_eq!(current(), "", "after a clear");

    ssm.add_activation("0a0a0a0a-0000-4000-8000-000000000002", "code-2", 5, true);
    let out =
        card.run_shell("amazon-ssm-agent -register -y -id 0a0a0a0a-0000-4000-8000-000000000002 -code code-2 -region eu-west-1");
    assert!(!out.status.success());
    let key = card.read("/var/lib/amazon/ssm/Vault/Store/RegistrationKey");
    assert!(key.contains("\"privateKey\":\"") && !key.contains("\"privateKey\":\"\""));
    assert_eq!(current(), "", "after a refused registration");

    ssm.add_activation("0a0a0a0a-0000-4000-8000-000000000003", "code-3", 5, false);
    let out =
        card.run_shell("amazon-ssm-agent -register -y -id 0a0a0a0a-0000-4000-8000-000000000003 -code code-3 -region eu-west-1");
    assert!(out.status.success(), "{}", stderr(&out));
    let fingerprint: serde_json::Value =
        serde_json::from_str(&card.read("/var/lib/amazon/ssm/Vault/Store/InstanceFingerprint"))
            .unwrap();
    assert_eq!(fingerprint["hardwareHash"].as_object().unwrap().len(), 9);
    assert!(current().starts_with("mi-") && current() != GOLDEN_ID);
    // No "cannot open" noise from a missing file.
    std::fs::remove_file(card.path("/var/lib/amazon/ssm/registration")).unwrap();
    let out = card.run_shell(&format!(". {}; last_registered_id", lib.display()));
    assert!(out.stderr.is_empty(), "{}", stderr(&out));
}

/// A secret is overwritten in place before it is removed (on FAT, rm only
/// frees the clusters): a second link to the same file reads zeroes after.
/// The e2e boots scan the raw FAT partition of a booted card.
#[test]
fn secrets_are_overwritten_where_they_lay_before_they_are_removed() {
    let dir = TempDir::new().unwrap();
    let ssm = Ssm::new(dir.path());
    let card = stamped_card(&dir, &ssm, "");
    let keep = |path: &str, name: &str| {
        let link = dir.path().join(name);
        std::fs::hard_link(card.path(path), &link).unwrap();
        link
    };
    let on_boot = keep("/boot/firmware/piprov-secret.conf", "boot-secret");
    let length = std::fs::metadata(&on_boot).unwrap().len();
    assert!(card.install().status.success());
    let zeroed = |link: &Path| {
        let data = std::fs::read(link).unwrap();
        data.len() as u64 >= 16 && data.iter().all(|&b| b == 0)
    };
    assert!(!card.exists("/boot/firmware/piprov-secret.conf"));
    assert!(zeroed(&on_boot), "the boot partition's copy");
    assert_eq!(std::fs::metadata(&on_boot).unwrap().len(), length);
    assert!(card.guard(&[]).status.success());
    let in_root = keep("/var/lib/piprov/secret.conf", "root-secret");
    // A temporary file a killed run left behind, holding the code.
    let tmp = card.path("/var/lib/piprov/tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join("left"), format!("ACTIVATION_CODE={SHARED_CODE}\n")).unwrap();
    let left = keep("/var/lib/piprov/tmp/left", "left");
    assert!(card.register(&[]).status.success());
    assert!(zeroed(&in_root), "the root-only copy");
    assert!(zeroed(&left), "the leftover temporary file");
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
    assert_eq!(card.files_containing(SHARED_CODE), Vec::<String>::new());
}

#[test]
fn offline_keeps_the_secret_and_registers_once_back_online() {
    let dir = TempDir::new().unwrap();
    let ssm = Ssm::new(dir.path());
    let card = stamped_card(&dir, &ssm, "");
    assert!(card.install().status.success());
    assert!(card.guard(&[]).status.success());
    ssm.set_offline(true);
    let out = card.register(&[]);
    assert!(
        !out.status.success(),
        "gives up after PIPROV_MAX_ATTEMPTS so systemd retries later"
    );
    assert_eq!(
        stderr(&out).matches("retrying in").count(),
        2,
        "{}",
        stderr(&out)
    );
    assert_eq!(card.status()["state"], "pending");
    assert!(
        card.exists("/var/lib/piprov/secret.conf"),
        "an offline card keeps its secret"
    );
    ssm.set_offline(false);
    let out = card.register(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(card.status()["state"], "registered");
    assert_eq!(card.files_containing(SHARED_CODE), Vec::<String>::new());
}

#[test]
fn backoff_doubles_with_jitter_and_is_capped() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("firstboot");
    let run = |jitter: &str| -> Vec<u64> {
        let script = format!(
            ". {0}/contract.sh; . {0}/lib.sh; for a in 0 1 2 3 4 5 6 7; do backoff_delay $a; done",
            dir.display()
        );
        let out = Command::new("sh")
            .arg("-c")
            .arg(script)
            .env("PIPROV_BACKOFF_BASE", "5")
            .env("PIPROV_BACKOFF_CAP", "300")
            .env("PIPROV_BACKOFF_JITTER", jitter)
            .output()
            .unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| l.parse().unwrap())
            .collect()
    };
    assert_eq!(run("0"), [5, 10, 20, 40, 80, 160, 300, 300]);
    for (delay, base) in run("1")
        .into_iter()
        .zip([5u64, 10, 20, 40, 80, 160, 300, 300])
    {
        assert!(
            delay >= base && delay <= base + base / 2,
            "{delay} for {base}"
        );
    }
}

#[test]
fn broker_down_then_up_retries_until_registered() {
    let dir = TempDir::new().unwrap();
    let ssm = Ssm::new(dir.path());
    ssm.add_activation(
        "0a0a0a0a-0000-4000-8000-0000000000b1",
        "BROKERCODE-777",
        1,
        false,
    );
    let token = "TOKEN-abcdef0123456789";
    let broker = CardBroker::start(dir.path(), token, 2, Certified::ByPinnedCa);
    std::fs::write(dir.path().join("site.token"), format!("{token}\n")).unwrap();
    let recipe = dir.path().join("broker.toml");
    std::fs::write(
        &recipe,
        format!(
            "region = \"eu-west-1\"\nhostname = \"pi-{{serial}}\"\n[activation]\nsource = \"broker\"\n\
             url = \"https://127.0.0.1:{}\"\nca_file = \"{}\"\ntoken_file = \"site.token\"\n",
            broker.stub.port,
            broker.ca.display()
        ),
    )
    .unwrap();
    let image = fixture("registered", &dir);
    stamp(&image, &recipe, &[]);
    let card = Card::from_image(&image, dir.path(), "card", &ssm);
    card.plug_into(PI_A.0, PI_A.1);
    assert!(card.install().status.success());
    assert!(card.exists("/etc/piprov/broker-ca.pem"));
    assert!(card.guard(&[]).status.success());
    let out = card.register(&[("PIPROV_MAX_ATTEMPTS", "5")]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert_eq!(
        err.matches("retrying in").count(),
        2,
        "two 503s, then an activation: {err}"
    );
    assert!(
        err.contains("broker issued activation 0a0a0a0a-0000-4000-8000-0000000000b1"),
        "{err}"
    );
    assert_eq!(card.status()["state"], "registered");
    assert!(
        !err.contains(token) && !err.contains("BROKERCODE"),
        "secrets are never logged"
    );
    assert_eq!(
        card.files_containing(token),
        Vec::<String>::new(),
        "the token is removed once used"
    );

    let requests = logged_requests(&broker.log);
    assert_eq!(
        requests.len(),
        4,
        "three activation requests and one registration report"
    );
    assert!(
        requests
            .iter()
            .all(|r| r["auth"] == format!("Bearer {token}"))
    );
    let first: serde_json::Value =
        serde_json::from_str(requests[0]["body"].as_str().unwrap()).unwrap();
    assert_eq!(first["serial"], PI_A.0);
    assert_eq!(first["previous_instance_id"], GOLDEN_ID);
    assert_eq!(requests[3]["path"], "/v1/registrations");
    let report: serde_json::Value =
        serde_json::from_str(requests[3]["body"].as_str().unwrap()).unwrap();
    assert_eq!(report["instance_id"], card.instance_id().as_str());
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let dir = TempDir::new().unwrap();
    let ssm = Ssm::new(dir.path());
    let card = stamped_card(&dir, &ssm, "");
    assert!(card.install().status.success());
    // verify resolves dependencies against the root's unit directories: give the
    // card the systemd units a real Pi OS root has.
    let units = card.path("/usr/lib/systemd");
    std::fs::create_dir_all(&units).unwrap();
    let status = Command::new("cp")
        .arg("-a")
        .arg("/usr/lib/systemd/system")
        .arg(&units)
        .status()
        .unwrap();
    assert!(status.success());
    // The units' Documentation= is the man page the stamp put on the card.
    assert!(card.exists("/usr/local/share/man/man7/piprov-card.7"));
    let out = Command::new("systemd-analyze")
        .env("MANPATH", card.path("/usr/local/share/man"))
        .arg("verify")
        .arg(format!("--root={}", card.root.display()))
        .args([
            "/etc/systemd/system/piprov-guard.service",
            "/etc/systemd/system/piprov-register.service",
            "/lib/systemd/system/amazon-ssm-agent.service",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify:\n{}",
        stderr(&out)
    );
    // The unit that handles secrets keeps its files private, and waits for a
    // clock that is set (a Pi has no real-time clock).
    let register = card.read("/etc/systemd/system/piprov-register.service");
    for line in ["UMask=0077", "PrivateTmp=yes"] {
        assert!(register.lines().any(|l| l == line), "{line}: {register}");
    }
    assert!(
        register
            .lines()
            .any(|l| l.starts_with("After=") && l.contains("time-sync.target")),
        "{register}"
    );
    let drop_in = card.read("/etc/systemd/system/amazon-ssm-agent.service.d/piprov.conf");
    assert!(
        drop_in.contains("ExecCondition=/usr/local/lib/piprov/guard.sh --gate"),
        "{drop_in}"
    );
}

#[test]
fn the_agent_rotates_its_key_when_the_recipe_says_so() {
    let dir = TempDir::new().unwrap();
    let image = fixture("registered", &dir);
    let recipe = shared_recipe(dir.path(), "[agent]\nkey_auto_rotate_days = 30\n");
    stamp(&image, &recipe, &[]);
    // The shapes the agent's config takes: its own template (the key present),
    // a Profile without it, an empty Profile, no Profile, no file at all.
    let template = r#"{
    "Agent": {"Region": "", "OrchestrationRootDir": ""},
    "Profile": {
        "ShareCreds": true,
        "ShareProfile": "",
        "ForceUpdateCreds": false,
        "KeyAutoRotateDays": 0
    },
    "Ssm": {"Endpoint": "http://127.0.0.1:9"}
}"#;
    let shapes = [
        ("template", Some(template)),
        (
            "profile",
            Some(r#"{"Profile": {"ShareCreds": false}, "Ssm": {"Endpoint": "x"}}"#),
        ),
        ("empty-profile", Some(r#"{"Profile": {}}"#)),
        ("no-profile", Some(r#"{"Ssm": {"Endpoint": "x"}}"#)),
        ("empty", Some("{}")),
        ("absent", None),
    ];
    for (i, (name, config)) in shapes.iter().enumerate() {
        let ssm = Ssm::new(&dir.path().join(format!("ssm-{i}")));
        let card = Card::from_image(&image, dir.path(), name, &ssm);
        card.plug_into(PI_A.0, PI_A.1);
        let path = card.path("/etc/amazon/ssm/amazon-ssm-agent.json");
        let before: Option<serde_json::Value> = config.map(|c| serde_json::from_str(c).unwrap());
        match config {
            Some(text) => std::fs::write(&path, text).unwrap(),
            None => {
                let _ = std::fs::remove_file(&path);
            }
        }
        assert!(card.install().status.success());
        let out = card.guard(&[]);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        let after: serde_json::Value =
            serde_json::from_str(&card.read("/etc/amazon/ssm/amazon-ssm-agent.json"))
                .unwrap_or_else(|e| panic!("{name}: not JSON any more: {e}"));
        assert_eq!(after["Profile"]["KeyAutoRotateDays"], 30, "{name}: {after}");
        // Everything else is as it was.
        if let Some(mut before) = before {
            before["Profile"]["KeyAutoRotateDays"] = 30.into();
            assert_eq!(after, before, "{name}");
        }
    }
    // Outside what the agent takes: refused when stamping, naming the key.
    for days in ["0", "366"] {
        let bad = shared_recipe(
            dir.path(),
            &format!("[agent]\nkey_auto_rotate_days = {days}\n"),
        );
        stamp_cmd(&image, &bad)
            .assert()
            .code(2)
            .stderr(predicates::str::contains("agent.key_auto_rotate_days"));
    }
}
