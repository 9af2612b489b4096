//! `piprov flash` before the first write: Ctrl-C while the archive is decoded
//! or while the cards' activations are created leaves nothing behind; the
//! targets file is CSV, and `--set` reaches every card.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::card::{embedded_recipe, shared_recipe};
use common::ssm_endpoint::SsmEndpoint;
use common::*;
use tempfile::TempDir;

fn interrupt(child: &Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < Duration::from_secs(120), "{what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn cache_files(cache: &Path) -> Vec<String> {
    std::fs::read_dir(cache)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// An image of incompressible bytes, as xz: it takes a while to decode. Made
/// once for the tests that interrupt its decode.
fn slow_archive() -> PathBuf {
    static ARCHIVE: OnceLock<TempDir> = OnceLock::new();
    let dir = ARCHIVE.get_or_init(|| {
        let dir = TempDir::new().unwrap();
        let image = dir.path().join("big.img");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/make-image.sh");
        let ok = Command::new("sh")
            .arg(script)
            .args(["--size", "1024", "--customize"])
            .arg("head -c 600M /dev/urandom > \"$root/blob\"")
            .arg(&image)
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let ok = Command::new("sh")
            .arg("-c")
            .arg(format!("xz -T2 -0 '{}'", image.display()))
            .status()
            .unwrap()
            .success();
        assert!(ok);
        dir
    });
    dir.path().join("big.img.xz")
}

/// `piprov flash` of the slow archive to `card` (a file holding old data).
fn flash_slow_archive(dir: &Path, card: &Path) -> Child {
    std::fs::write(card, b"old data").unwrap();
    Command::new(assert_cmd::cargo::cargo_bin("piprov"))
        .env("PIPROV_CACHE_DIR", dir.join("cache"))
        .args(["flash", "--as-is", "--yes", "--quiet"])
        .arg(slow_archive())
        .arg(card)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn card_started(card: &Path) -> bool {
    std::fs::metadata(card).is_ok_and(|m| m.len() > b"old data".len() as u64)
}

/// The card is written while the archive decodes: an interrupt leaves it
/// without a partition table, and the cache without the half-decoded image.
#[test]
fn ctrl_c_while_decoding_leaves_the_cache_clean_and_the_card_without_a_table() {
    let dir = TempDir::new().unwrap();
    let card = dir.path().join("card.img");
    let child = flash_slow_archive(dir.path(), &card);
    wait_until("the card was never written", || card_started(&card));
    interrupt(&child);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("interrupted while the archive was decoded")
            && stderr.contains("hold no partition table"),
        "{stderr}"
    );
    let left: Vec<String> = cache_files(&dir.path().join("cache"))
        .into_iter()
        .filter(|n| n.contains(".img"))
        .collect();
    assert!(left.is_empty(), "no partial or cached image: {left:?}");
    let head = std::fs::read(&card).unwrap();
    assert!(head.len() >= 1 << 20 && head[..1 << 20].iter().all(|&b| b == 0));
}

/// Ctrl-C as the decode starts, before the image's first bytes are out: the
/// card is left as it was, and the interrupt is named as one. The moment is a
/// race, so it is tried until an interrupt lands in it; every try must end
/// right, wherever its interrupt landed.
#[test]
fn ctrl_c_as_the_decode_starts_leaves_the_card_as_it_was() {
    const TRIES: usize = 20;
    let before_first_bytes = "interrupted while the archive was decoded; no card was written";
    for _ in 0..TRIES {
        let dir = TempDir::new().unwrap();
        let cache = dir.path().join("cache");
        let card = dir.path().join("card.img");
        let child = flash_slow_archive(dir.path(), &card);
        let started = Instant::now();
        while !cache_files(&cache)
            .iter()
            .any(|n| n.starts_with("partial-"))
        {
            assert!(started.elapsed() < Duration::from_secs(120), "no decode");
            std::thread::yield_now();
        }
        interrupt(&child);
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        // 1: the card was written to (and left blank); 2: it was not touched.
        let touched = card_started(&card);
        assert_eq!(
            out.status.code(),
            Some(if touched { 1 } else { 2 }),
            "{stderr}"
        );
        let left: Vec<String> = cache_files(&cache)
            .into_iter()
            .filter(|n| n.contains(".img"))
            .collect();
        assert!(left.is_empty(), "no partial or cached image: {left:?}");
        if touched {
            assert!(stderr.contains("hold no partition table"), "{stderr}");
            continue;
        }
        assert!(stderr.contains(before_first_bytes), "{stderr}");
        assert_eq!(std::fs::read(&card).unwrap(), b"old data");
        return;
    }
    panic!("in {TRIES} tries, no interrupt came before the image's first bytes");
}

#[test]
fn ctrl_c_while_activations_are_created_withdraws_them_and_writes_nothing() {
    let dir = TempDir::new().unwrap();
    // Each CreateActivation takes a second: time to interrupt between them.
    let ssm = SsmEndpoint::start_slow(dir.path(), 1.0);
    let image = fixture("golden", &dir);
    let kept = dir.path().join("kept.img");
    std::fs::write(&kept, b"old data").unwrap();
    let new = dir.path().join("new.img");
    let third = dir.path().join("third.img");
    let mut command = Command::new(assert_cmd::cargo::cargo_bin("piprov"));
    for (key, value) in ssm.env() {
        command.env(key, value);
    }
    let child = command
        .env("PIPROV_CACHE_DIR", dir.path().join("cache"))
        .arg("flash")
        .arg(&image)
        .args([&kept, &new, &third])
        .arg("--recipe")
        .arg(embedded_recipe(dir.path()))
        .args(["--hostname", "bench-{n}", "--yes", "--quiet"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("no activation was asked for", || {
        !ssm.requests_for("CreateActivation").is_empty()
    });
    interrupt(&child);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no card was written"), "{stderr}");
    let created = ssm.requests_for("CreateActivation").len();
    assert!((1..3).contains(&created), "stopped part-way: {created}");
    let listed = ssm.call(
        "AmazonSSM.DescribeActivations",
        &serde_json::json!({"MaxResults": 50}),
    );
    assert_eq!(
        listed["ActivationList"],
        serde_json::json!([]),
        "every activation created was deleted again"
    );
    assert_eq!(std::fs::read(&kept).unwrap(), b"old data");
    assert!(!new.exists() && !third.exists(), "no file left behind");
}

#[test]
fn a_targets_file_is_csv_and_set_reaches_every_card() {
    let dir = TempDir::new().unwrap();
    let image = fixture("golden", &dir);
    let recipe = shared_recipe(dir.path(), "");
    let cards: Vec<PathBuf> = ["plain", "own, overrides"]
        .iter()
        .map(|name| dir.path().join(format!("{name}.img")))
        .collect();
    let targets = dir.path().join("targets.csv");
    // A quoted device name holding a comma; the second card has its own override.
    std::fs::write(
        &targets,
        format!(
            "device,hostname,overrides\n# a comment\n{},lab-a\n\"{}\",lab-b,sudo.strip_nopasswd=false\n",
            cards[0].display(),
            cards[1].display(),
        ),
    )
    .unwrap();
    succeed(
        piprov()
            .env("PIPROV_CACHE_DIR", dir.path().join("cache"))
            .arg("flash")
            .arg(&image)
            .arg("--targets-file")
            .arg(&targets)
            .arg("--recipe")
            .arg(&recipe)
            .args(["--set", "sudo.strip_ssm_user=false", "--yes", "--quiet"]),
    );
    let conf = |card: &Path| String::from_utf8(boot_files(card)["piprov.conf"].clone()).unwrap();
    let (a, b) = (conf(&cards[0]), conf(&cards[1]));
    assert!(a.contains("HOSTNAME_PATTERN=lab-a\n"), "{a}");
    assert!(b.contains("HOSTNAME_PATTERN=lab-b\n"), "{b}");
    assert!(
        a.contains("STRIP_NOPASSWD=1\n") && b.contains("STRIP_NOPASSWD=0\n"),
        "the card's own override: {b}"
    );
    for conf in [&a, &b] {
        assert!(
            conf.contains("STRIP_SSM_USER=0\n"),
            "--set on every card: {conf}"
        );
    }
}

/// A quoted CSV cell may hold a line break: on a card it would be a setting of
/// its own (here, everyone's passwordless root). Refused with the file and its
/// line before any card is touched.
#[test]
fn a_line_break_in_a_targets_cell_is_refused_before_any_card() {
    let dir = TempDir::new().unwrap();
    let image = fixture("golden", &dir);
    let recipe = shared_recipe(dir.path(), "");
    let card = dir.path().join("card.img");
    let targets = dir.path().join("targets.csv");
    std::fs::write(
        &targets,
        format!(
            "{},lab-a,\"sudo.nopasswd_file=x\nSUDO_RULE=ALL ALL=(ALL) NOPASSWD: ALL\"\n",
            card.display()
        ),
    )
    .unwrap();
    let out = piprov()
        .env("PIPROV_CACHE_DIR", dir.path().join("cache"))
        .arg("flash")
        .arg(&image)
        .arg("--targets-file")
        .arg(&targets)
        .arg("--recipe")
        .arg(&recipe)
        .args(["--yes", "--quiet"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("{} line 1", targets.display())),
        "{err}"
    );
    assert!(err.contains("control character"), "{err}");
    assert!(!card.exists(), "no card is written");
}

/// On a terminal, each card's bar shows while the archive decodes (its bytes
/// are written as they decode), beside the decoded bar; and a card's time in
/// the manifest counts from the start, the decode it waited for included.
#[test]
fn card_bars_and_card_time_cover_the_decode() {
    let dir = TempDir::new().unwrap();
    let card = dir.path().join("card.img");
    std::fs::write(&card, b"old data").unwrap();
    let manifest = dir.path().join("cards.jsonl");
    let typescript = dir.path().join("typescript");
    let command = format!(
        "PIPROV_CACHE_DIR='{}' '{}' flash --as-is --yes --manifest '{}' '{}' '{}'",
        dir.path().join("cache").display(),
        assert_cmd::cargo::cargo_bin("piprov").display(),
        manifest.display(),
        slow_archive().display(),
        card.display()
    );
    let started = Instant::now();
    // script(1) gives piprov a terminal, where it draws its bars.
    let mut child = Command::new("script")
        .args(["-qec", &command])
        .arg(&typescript)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // The decoded image takes its name in the cache when the decode is done.
    wait_until("the archive never finished decoding", || {
        cache_files(&dir.path().join("cache"))
            .iter()
            .any(|n| n.starts_with("image-"))
    });
    let decoded_after = started.elapsed().as_secs_f64();
    assert!(child.wait().unwrap().success());
    let record: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&manifest).unwrap().trim()).unwrap();
    let seconds = record["seconds"].as_f64().unwrap();
    assert!(
        seconds >= decoded_after - 0.5,
        "the card took {seconds} s by the manifest, but the decode alone took {decoded_after} s"
    );
    let screen = String::from_utf8_lossy(&std::fs::read(&typescript).unwrap()).into_owned();
    let frames: Vec<&str> = screen.split('\r').collect();
    let both = frames.iter().any(|frame| {
        frame.contains("decoded [")
            && frame.split("card.img [").nth(1).is_some_and(|bar| {
                bar.split("] ")
                    .nth(1)
                    .is_some_and(|n| !n.starts_with("0 B"))
            })
    });
    assert!(
        both,
        "no frame shows the card's bar moving while the archive decodes:\n{}",
        frames
            .iter()
            .rev()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        screen.contains("written, then verified"),
        "the bar says what it counts"
    );
}
