//! `piprov station` with the kernel's real uevents: loop devices attached
//! while it runs are cards pushed into readers. Needs root (loop devices, the
//! uevent socket) and Debian's chromium for the page; in CI a missing one
//! fails the test.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::card::embedded_recipe;
use common::disk::*;
use common::ssm_endpoint::SsmEndpoint;
use common::*;
use tempfile::TempDir;

/// Two benches on one PostgreSQL record, each writing its cards' rows and
/// then their outcomes at the same time: the record holds every row of both,
/// each as last written, under ids of its own; `station record` prints them.
#[test]
fn two_benches_keep_one_record_in_postgres() {
    use piprov::station::record::{Place, Record, Row};
    let Some(postgres) = common::postgres::server() else {
        return;
    };
    let url = postgres.new_database();
    let at: Place = url.parse().unwrap();
    let benches: Vec<_> = ["bench-a", "bench-b"]
        .into_iter()
        .map(|run| {
            let at = at.clone();
            std::thread::spawn(move || {
                // Each bench opens (and so prepares) the record itself.
                let record = Record::open(&at).unwrap();
                for number in 1..=20u32 {
                    let mut row = Row {
                        run: run.into(),
                        number: Some(number),
                        hostname: Some(format!("{run}-{number}")),
                        device: format!("/dev/sd{number}"),
                        size: 8 << 30,
                        image_sha256: "ab".repeat(32),
                        started: "2026-12-06T00:00:00Z".into(),
                        result: "writing".into(),
                        ..Row::default()
                    };
                    record.put(&mut row).unwrap();
                    row.result = "done".into();
                    row.verified = true;
                    row.bytes = u64::from(number) << 30;
                    row.finished = Some("2026-12-06T00:05:00Z".into());
                    record.put(&mut row).unwrap();
                }
            })
        })
        .collect();
    for bench in benches {
        bench.join().unwrap();
    }
    let rows = record_rows(Path::new(&url));
    assert_eq!(rows.len(), 40, "{rows:#?}");
    for run in ["bench-a", "bench-b"] {
        let mut numbers: Vec<u64> = rows
            .iter()
            .filter(|r| r["run"] == run)
            .map(|r| r["number"].as_u64().unwrap())
            .collect();
        numbers.sort();
        assert_eq!(numbers, (1..=20).collect::<Vec<_>>(), "{run}");
    }
    for row in &rows {
        assert_eq!(row["result"], "done", "{row}");
        assert_eq!(row["verified"], true, "{row}");
        let number = row["number"].as_u64().unwrap();
        assert_eq!(row["bytes"].as_u64().unwrap(), number << 30, "{row}");
        assert_eq!(row["size"].as_u64().unwrap(), 8 << 30, "{row}");
    }
    // A password in the URL is never shown, in the output or an error.
    let secret = "s3cret-pw";
    let with_password = url.replacen("piprov@", &format!("piprov:{secret}@"), 1);
    assert_ne!(with_password, url);
    let printed = succeed(
        piprov()
            .args(["station", "record", "--record"])
            .arg(&with_password),
    );
    let gone = with_password.replace("piprov_test_", "piprov_gone_");
    let failed = piprov()
        .args(["station", "record", "--record"])
        .arg(&gone)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success());
    assert!(
        stderr.contains("piprov_gone_"),
        "the record is named: {stderr}"
    );
    for out in [
        &printed.stdout,
        &printed.stderr,
        &failed.stdout,
        &failed.stderr,
    ] {
        assert!(!String::from_utf8_lossy(out).contains(secret));
    }
}

struct Station {
    child: Child,
    lines: mpsc::Receiver<serde_json::Value>,
    seen: Vec<serde_json::Value>,
}

impl Station {
    fn start(
        ssm: &SsmEndpoint,
        image: &Path,
        recipe: &Path,
        record: &Path,
        port: u16,
        matching: &[&str],
    ) -> Self {
        let mut command = Command::new(assert_cmd::cargo::cargo_bin("piprov"));
        command.args(["station", "--json", "--allow-non-removable"]);
        for dev in matching {
            command.args(["--match", dev]);
        }
        let mut child = command
            .env_clear()
            .envs(ssm.env())
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .args(["--hostname", "bench-{number}", "--recipe"])
            .arg(recipe)
            .arg("--record")
            .arg(record)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg(image)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if let Ok(value) = serde_json::from_str(&line) {
                    let _ = tx.send(value);
                }
            }
        });
        // Ready once it listens (it decodes and opens the uevent socket first).
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(_)) = child.try_wait() {
                let out = child.wait_with_output().unwrap();
                panic!(
                    "the station ended: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the station never listened"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a card's state on `device`.
    fn wait(&mut self, device: &str, state: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(found) = self
                .seen
                .iter()
                .find(|c| c["device"] == device && c["state"] == state)
            {
                return found.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!("{device} never reached {state}: {:#?}", self.seen),
            }
        }
    }

    fn stop(self) -> std::process::Output {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        self.child.wait_with_output().unwrap()
    }
}

fn chromium_usable() -> bool {
    available(
        Command::new("chromium")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "chromium (Debian's chromium package)",
    )
}

/// The page as a browser sees it after its scripts ran, and a screenshot kept
/// in target/tmp for people to look at. The page keeps its event feed open, so
/// it never "finishes loading": Chromium stops after `--timeout`, which a
/// loaded machine may need longer for; tried with more time until the cards
/// are on it.
fn page_in_chromium(port: u16) -> String {
    let url = format!("http://127.0.0.1:{port}/");
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tmp");
    std::fs::create_dir_all(&shots).unwrap();
    let mut dom = String::new();
    for timeout in [4_000, 10_000, 30_000] {
        let common = [
            "--headless".to_string(),
            "--no-sandbox".to_string(),
            "--disable-gpu".to_string(),
            "--disable-dev-shm-usage".to_string(),
            format!("--timeout={timeout}"),
        ];
        let out = Command::new("chromium")
            .args(&common)
            .arg("--dump-dom")
            .arg(&url)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        dom = String::from_utf8(out.stdout).unwrap();
        if dom.contains("data-state=") {
            let shot = Command::new("chromium")
                .args(&common)
                .arg(format!(
                    "--screenshot={}",
                    shots.join("station.png").display()
                ))
                .arg("--window-size=1280,800")
                .arg(&url)
                .output()
                .unwrap();
            assert!(
                shot.status.success(),
                "{}",
                String::from_utf8_lossy(&shot.stderr)
            );
            break;
        }
    }
    dom
}

/// A card reader as the kernel shows one: a disk that stays, whose size is
/// 0 while no card is in it. Here a loop device over a file that is empty
/// until a card is "pushed in" (the file filled, the loop's capacity read
/// again: the kernel raises `change`, as for a reader).
struct Reader {
    dev: Loop,
    backing: PathBuf,
}

impl Reader {
    fn new(dir: &TempDir, name: &str) -> Reader {
        let backing = dir.path().join(format!("{name}.slot"));
        std::fs::write(&backing, b"").unwrap();
        let dev = Loop::new(&backing, &[]).unwrap();
        Reader { dev, backing }
    }

    fn capacity_changed(&self) {
        let ok = Command::new("losetup")
            .arg("-c")
            .arg(&self.dev.dev)
            .status()
            .unwrap();
        assert!(ok.success(), "losetup -c {}", self.dev.dev);
    }

    /// Pushes in a card holding `card`'s bytes.
    fn insert(&self, card: &Path) {
        std::fs::copy(card, &self.backing).unwrap();
        self.capacity_changed();
    }

    /// Pulls the card out: its bytes are kept in `to`. A write still going
    /// on extends the emptied file before the capacity is read again, so it
    /// is emptied until the kernel says no medium, as for a reader.
    fn pull(&self, to: &Path) {
        std::fs::copy(&self.backing, to).unwrap();
        let size = format!(
            "/sys/block/{}/size",
            self.dev.dev.trim_start_matches("/dev/")
        );
        for _ in 0..50 {
            std::fs::write(&self.backing, b"").unwrap();
            self.capacity_changed();
            if std::fs::read_to_string(&size).unwrap().trim() == "0" {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("{} still has a medium", self.dev.dev);
    }
}

/// The station's record, as `piprov station record --json` prints it.
fn record_rows(record: &Path) -> Vec<serde_json::Value> {
    let rows = succeed(
        piprov()
            .args(["station", "record", "--json", "--record"])
            .arg(record),
    );
    serde_json::from_slice(&rows.stdout).unwrap()
}

/// A card's bytes, cut to the image's length (a card is longer), hold the
/// image stamped as `hostname`.
fn assert_card_in_reader_holds(card: &Path, image: &Path, hostname: &str, dir: &TempDir) {
    let copy = dir.path().join(format!("{hostname}.check.img"));
    std::fs::copy(card, &copy).unwrap();
    let len = std::fs::metadata(image).unwrap().len();
    std::fs::File::options()
        .write(true)
        .open(&copy)
        .unwrap()
        .set_len(len)
        .unwrap();
    assert_card_holds(&copy, image, hostname, dir.path());
}

/// A used card of `len` bytes: old random data.
fn used(dir: &TempDir, name: &str, len: u64) -> PathBuf {
    let path = dir.path().join(format!("{name}.card"));
    fill_random(&path, len);
    path
}

/// Three cards put in one after another are written without a word typed,
/// each with its own number, hostname and activation; a card too small is
/// refused and left as it was; a card put back after it was done is known
/// and not written again; a disk --match does not name is left alone; the
/// record holds a row for each; the page shows them in a real browser;
/// SIGTERM ends the run with the record complete.
#[test]
fn a_bench_writes_every_card_put_in_and_remembers_each() {
    let dir = TempDir::new().unwrap();
    if !loop_devices_usable(&dir) || !chromium_usable() {
        return;
    }
    let ssm = SsmEndpoint::start(dir.path(), 0);
    let image = fixture("golden", &dir);
    let len = std::fs::metadata(&image).unwrap().len();
    let recipe = embedded_recipe(dir.path());
    let record = dir.path().join("station.db");
    let port = free_port();
    let readers: Vec<Reader> = (1..=3)
        .map(|i| Reader::new(&dir, &format!("r{i}")))
        .collect();
    let other = Reader::new(&dir, "other");
    let matching: Vec<&str> = readers.iter().map(|r| r.dev.dev.as_str()).collect();
    let mut station = Station::start(&ssm, &image, &recipe, &record, port, &matching);

    for (i, reader) in readers.iter().enumerate() {
        reader.insert(&used(&dir, &format!("card{}", i + 1), len + (8 << 20)));
        let done = station.wait(&reader.dev.dev, "done");
        assert_eq!(done["number"], i + 1, "{done}");
        assert_eq!(done["hostname"], format!("bench-{}", i + 1));
        assert!(
            done["activation_id"]
                .as_str()
                .is_some_and(|id| !id.is_empty())
        );
    }
    // Not named by --match: left alone.
    let stranger = used(&dir, "stranger", len + (8 << 20));
    let before = sha256_of(&stranger);
    other.insert(&stranger);
    let left = station.wait(&other.dev.dev, "refused");
    assert!(
        left["reason"].as_str().unwrap().contains("--match"),
        "{left}"
    );
    assert_eq!(
        sha256_of(&other.backing),
        before,
        "a disk not matched is left as it was"
    );

    // Card 1 out; a card too small in its place: refused, its bytes untouched.
    let card1 = dir.path().join("card1.out");
    readers[0].pull(&card1);
    let small = used(&dir, "small", len / 2);
    let before = sha256_of(&small);
    readers[0].insert(&small);
    let refused = station.wait(&readers[0].dev.dev, "refused");
    assert!(
        refused["reason"]
            .as_str()
            .unwrap()
            .contains("the card holds"),
        "{refused}"
    );
    assert_eq!(
        sha256_of(&readers[0].backing),
        before,
        "a refused card is left as it was"
    );

    // Card 1 back in: known, not written twice.
    readers[0].pull(&dir.path().join("small.out"));
    readers[0].insert(&card1);
    let known = station.wait(&readers[0].dev.dev, "already done");
    assert!(
        known["reason"].as_str().unwrap().contains("bench-1"),
        "{known}"
    );
    assert_eq!(
        sha256_of(&readers[0].backing),
        sha256_of(&card1),
        "not written again"
    );

    let dom = page_in_chromium(port);
    for i in 1..=3 {
        assert!(
            dom.contains(&format!("#{i} bench-{i}")),
            "the page shows card {i}:\n{dom}"
        );
    }
    assert_eq!(dom.matches("data-state=\"done\"").count(), 3, "{dom}");
    assert!(dom.contains("data-state=\"refused\""), "{dom}");
    // The small card and card 1 put back came to one reader, maybe in one
    // second: each has its own tile.
    assert!(dom.contains("the card holds"), "{dom}");
    assert!(dom.contains("data-state=\"already done\""), "{dom}");
    assert!(dom.contains("3 done, 0 failed"), "{dom}");

    let out = station.stop();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The record: a row per card, with the activation SSM issued for it.
    let unread = sha256_of(&record);
    let rows = record_rows(&record);
    let done: Vec<&serde_json::Value> = rows.iter().filter(|r| r["result"] == "done").collect();
    assert_eq!(done.len(), 3, "{rows:#?}");
    let issued: Vec<String> = ssm
        .activations()
        .iter()
        .map(|a| a["ActivationId"].as_str().unwrap().to_string())
        .collect();
    for row in &done {
        assert!(row["verified"].as_bool().unwrap());
        let id = row["activation_id"].as_str().unwrap();
        assert!(issued.iter().any(|i| i == id), "{id} among {issued:?}");
    }
    let mut hostnames: Vec<&str> = done
        .iter()
        .map(|r| r["hostname"].as_str().unwrap())
        .collect();
    hostnames.sort();
    assert_eq!(hostnames, ["bench-1", "bench-2", "bench-3"]);
    assert!(rows.iter().any(|r| r["result"] == "refused"));
    assert!(rows.iter().any(|r| r["result"] == "already done"));
    // The next morning: no card has booted yet, so each is flagged.
    let out = ssm
        .piprov()
        .args(["fleet", "reconcile", "--json", "--record"])
        .arg(&record)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["cards"].as_array().unwrap().len(), 3, "{report:#}");
    let never: Vec<&serde_json::Value> = report["flags"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["flag"] == "never_registered")
        .collect();
    assert_eq!(never.len(), 3, "{report:#}");
    assert_eq!(
        sha256_of(&record),
        unread,
        "printing and reconciling the record change nothing in it"
    );
    // Each card holds the image, stamped as itself.
    for (i, card) in [
        card1,
        readers[1].backing.clone(),
        readers[2].backing.clone(),
    ]
    .iter()
    .enumerate()
    {
        let hostname = format!("bench-{}", i + 1);
        assert_card_in_reader_holds(card, &image, &hostname, &dir);
    }
}

/// A cgroup (v1 blkio) that holds the readers to card speed, so a card is
/// still being written when the test pulls it or stops the station.
struct CardSpeed {
    dir: PathBuf,
}

impl CardSpeed {
    fn new(readers: &[&Reader], write_bps: u64) -> Option<CardSpeed> {
        let root = Path::new("/sys/fs/cgroup/blkio");
        let usable = root.join("blkio.throttle.write_bps_device").exists();
        if !available(usable, "cgroup v1 blkio (holds loop devices to card speed)") {
            return None;
        }
        let dir = root.join(format!("piprov-station-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for reader in readers {
            let name = reader.dev.dev.trim_start_matches("/dev/");
            let numbers = std::fs::read_to_string(format!("/sys/block/{name}/dev")).unwrap();
            // Reading back at twice the speed, as cards do.
            for (file, bps) in [("write", write_bps), ("read", 2 * write_bps)] {
                std::fs::write(
                    dir.join(format!("blkio.throttle.{file}_bps_device")),
                    format!("{} {bps}", numbers.trim()),
                )
                .unwrap();
            }
        }
        Some(CardSpeed { dir })
    }

    /// Moves a process, every thread it has and will have, into the cgroup.
    fn hold(&self, pid: u32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string()).unwrap();
    }
}

impl Drop for CardSpeed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

impl Station {
    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    fn signal(&self) {
        nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGTERM).unwrap();
    }

    /// The station's output after it ended by itself.
    fn ended(self) -> std::process::Output {
        self.child.wait_with_output().unwrap()
    }
}

/// The card on `device` as `GET /api/cards` shows it, once it is past its
/// first byte (the views hear of it twice a second).
fn progress_of(port: u16, device: &str) -> serde_json::Value {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            stream,
            "GET /api/cards HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        let (_, body) = reply.split_once("\r\n\r\n").unwrap();
        let cards: Vec<serde_json::Value> = serde_json::from_str(body).unwrap();
        if let Some(card) = cards
            .iter()
            .find(|c| c["device"] == device && c["percent"].as_u64().is_some_and(|p| p > 0))
        {
            return card.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no progress for {device}: {cards:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether the card in `reader` has been written to for a while: more than
/// `bytes` differ from what was put in.
fn wait_until_written(reader: &Reader, before: &Path, bytes: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = std::fs::read(&reader.backing).unwrap();
        let old = std::fs::read(before).unwrap();
        let changed = now.iter().zip(&old).filter(|(a, b)| a != b).count();
        if changed > bytes {
            return;
        }
        assert!(Instant::now() < deadline, "the card was never written");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A card pulled out mid-write is recorded as failed, "removed while
/// writing", its activation deleted again, and what it holds is no card; a
/// stop (SIGTERM) mid-write lets the card being written finish, done and
/// whole, and starts no new one; a second signal stops the card being
/// written, which is left with no partition table. The readers run at card
/// speed (a blkio throttle), so each card is caught mid-write.
#[test]
fn a_card_pulled_or_stopped_mid_write_is_either_done_or_plainly_no_card() {
    let dir = TempDir::new().unwrap();
    if !loop_devices_usable(&dir) {
        return;
    }
    let ssm = SsmEndpoint::start(dir.path(), 0);
    let image = fixture("golden", &dir);
    let len = std::fs::metadata(&image).unwrap().len();
    let recipe = embedded_recipe(dir.path());
    // Two runs keep one record in PostgreSQL, as benches sharing one do (the
    // URL passed where a path goes: --record takes either).
    let record = match common::postgres::server() {
        Some(postgres) => PathBuf::from(postgres.new_database()),
        None => dir.path().join("station.db"),
    };
    let readers: Vec<Reader> = (1..=3)
        .map(|i| Reader::new(&dir, &format!("slow{i}")))
        .collect();
    let Some(speed) = CardSpeed::new(&readers.iter().collect::<Vec<_>>(), 2 << 20) else {
        return;
    };
    let matching: Vec<&str> = readers.iter().map(|r| r.dev.dev.as_str()).collect();
    let port = free_port();
    let mut station = Station::start(&ssm, &image, &recipe, &record, port, &matching);
    speed.hold(station.child.id());

    // Pulled mid-write; before that, the page's feed says how far it is.
    let card = used(&dir, "pulled", len + (8 << 20));
    readers[0].insert(&card);
    wait_until_written(&readers[0], &card, 1 << 20);
    let live = progress_of(port, &readers[0].dev.dev);
    // A loaded machine may read the feed once the card is being read back.
    assert!(
        live["state"] == "writing" || live["state"] == "verifying",
        "{live}"
    );
    let percent = live["percent"].as_u64().unwrap();
    assert!((1..100).contains(&percent), "{live}");
    assert!(live["speed"].as_u64().unwrap() > 0, "{live}");
    let pulled = dir.path().join("pulled.out");
    readers[0].pull(&pulled);
    let failed = station.wait(&readers[0].dev.dev, "failed");
    assert!(
        failed["reason"]
            .as_str()
            .unwrap()
            .starts_with("removed while writing"),
        "{failed}"
    );
    let id = failed["activation_id"].as_str().unwrap().to_string();
    assert_eq!(failed["activation_withdrawn"], true, "{failed}");
    assert!(
        !ssm.activations().iter().any(|a| a["ActivationId"] == id),
        "the pulled card's activation {id} is deleted"
    );
    assert_no_partition_table(&pulled, len + (8 << 20));

    // A stop mid-write: the card being written finishes; no new card starts.
    let card = used(&dir, "finishing", len + (8 << 20));
    readers[1].insert(&card);
    wait_until_written(&readers[1], &card, 1 << 20);
    station.signal();
    let late = used(&dir, "late", len + (8 << 20));
    let late_before = sha256_of(&late);
    readers[2].insert(&late);
    // Read back after it is written: a state of its own.
    station.wait(&readers[1].dev.dev, "verifying");
    let done = station.wait(&readers[1].dev.dev, "done");
    assert_eq!(done["hostname"], "bench-2", "{done}");
    let out = station.ended();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        sha256_of(&readers[2].backing),
        late_before,
        "no card starts after the stop"
    );
    assert_card_in_reader_holds(&readers[1].backing, &image, "bench-2", &dir);

    // A second run; two signals mid-write: the card is stopped and erased.
    // (Readers named by --match that hold a card at the start are written.)
    readers[1].pull(&dir.path().join("finishing.out"));
    readers[2].pull(&dir.path().join("late.out"));
    let mut station = Station::start(&ssm, &image, &recipe, &record, free_port(), &matching);
    speed.hold(station.child.id());
    let card = used(&dir, "stopped", len + (8 << 20));
    readers[2].insert(&card);
    wait_until_written(&readers[2], &card, 1 << 20);
    station.signal();
    std::thread::sleep(Duration::from_millis(300));
    station.signal();
    let stopped = station.wait(&readers[2].dev.dev, "failed");
    assert_eq!(stopped["activation_withdrawn"], true, "{stopped}");
    let out = station.ended();
    assert!(
        !out.status.success(),
        "a run whose card was stopped ends with an error: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_no_partition_table(&readers[2].backing, len + (8 << 20));

    let rows = record_rows(&record);
    let results: Vec<&str> = rows.iter().map(|r| r["result"].as_str().unwrap()).collect();
    assert_eq!(results, ["failed", "done", "failed"], "{rows:#?}");
    assert!(rows.iter().all(|r| r["finished"].is_string()), "{rows:#?}");
}

/// Without --json or --listen, on a terminal (script(1) gives it one), the
/// station draws a bar per card being written, and prints each change of
/// state above the bars.
#[test]
fn on_a_terminal_each_card_being_written_has_its_bar() {
    let dir = TempDir::new().unwrap();
    if !loop_devices_usable(&dir) {
        return;
    }
    let ssm = SsmEndpoint::start(dir.path(), 0);
    let image = fixture("golden", &dir);
    let len = std::fs::metadata(&image).unwrap().len();
    let recipe = embedded_recipe(dir.path());
    let reader = Reader::new(&dir, "tty");
    let Some(speed) = CardSpeed::new(&[&reader], 2 << 20) else {
        return;
    };
    let typescript = dir.path().join("typescript");
    let env: Vec<String> = ssm
        .env()
        .iter()
        .map(|(k, v)| format!("{k}='{v}'"))
        .collect();
    // In the throttled cgroup from its start, as the bench runs it.
    let command = format!(
        "echo $$ > '{}/cgroup.procs' && exec env {} '{}' station --allow-non-removable \
         --match '{}' --hostname 'bench-{{number}}' --recipe '{}' --record '{}' '{}'",
        speed.dir.display(),
        env.join(" "),
        assert_cmd::cargo::cargo_bin("piprov").display(),
        reader.dev.dev,
        recipe.display(),
        dir.path().join("station.db").display(),
        image.display()
    );
    let mut terminal = Terminal(
        Command::new("script")
            .args(["-qfec", &command])
            .arg(&typescript)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let screen =
        || String::from_utf8_lossy(&std::fs::read(&typescript).unwrap_or_default()).into_owned();
    let until = |what: &str, done: &dyn Fn(&str) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done(&screen()) {
            assert!(Instant::now() < deadline, "{what}:\n{}", screen());
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    until("the station never started", &|s| {
        s.contains("to every card put in")
    });
    reader.insert(&used(&dir, "card", len + (8 << 20)));
    let name = reader.dev.dev.trim_start_matches("/dev/").to_string();
    until("no bar for the card while it was written", &|s| {
        s.split('\r').any(|frame| {
            frame.contains(&format!("#1 {name} ["))
                && frame.contains(" % writing bench-1")
                && !frame.contains("  0 % ")
        })
    });
    until("no line when the card was done", &|s| {
        s.lines()
            .any(|l| l.contains(&reader.dev.dev) && l.contains("bench-1") && l.contains("done"))
    });
    terminal.stop();
    assert!(terminal.0.wait().unwrap().success(), "{}", screen());
}

/// script(1) running a station: stopped with the test, however it ends.
struct Terminal(Child);

impl Terminal {
    /// The station is script's child (its shell exec'd it): stopped as itself.
    fn stop(&self) {
        let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.0.id()))
            .unwrap_or_default();
        for pid in children.split_whitespace() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid.parse().unwrap()),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        self.stop();
        let _ = self.0.wait();
    }
}
