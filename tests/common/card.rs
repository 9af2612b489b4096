//! A card's root filesystem unpacked into a directory, with the device scripts
//! run against it as they run on a Pi: every path under PIPROV_ROOT, the
//! stand-in amazon-ssm-agent and systemctl first on PATH, and the SSM side
//! (activations, registered instances) kept in a shared directory.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::{partition_extent, piprov};

pub struct Ssm {
    pub dir: PathBuf,
}

impl Ssm {
    pub fn new(dir: &Path) -> Self {
        let dir = dir.join("ssm");
        std::fs::create_dir_all(dir.join("activations")).unwrap();
        Self { dir }
    }

    /// An activation as SSM keeps it: the code, how many may register, how many did.
    pub fn add_activation(&self, id: &str, code: &str, limit: u32, expired: bool) {
        std::fs::write(
            self.dir.join("activations").join(id),
            format!(
                "code={code}\nlimit={limit}\nused=0\nexpired={}\n",
                u8::from(expired)
            ),
        )
        .unwrap();
    }

    pub fn used(&self, id: &str) -> u32 {
        let text = std::fs::read_to_string(self.dir.join("activations").join(id)).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("used="))
            .unwrap()
            .parse()
            .unwrap()
    }

    /// Managed instances registered so far: (mi- id, activation id, machine-id).
    pub fn instances(&self) -> Vec<(String, String, String)> {
        std::fs::read_to_string(self.dir.join("instances"))
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                (f[0].into(), f[1].into(), f[2].into())
            })
            .collect()
    }

    /// SSM answers the next registrations with these errors (`Kind: message`).
    pub fn answer_next(&self, errors: &[&str]) {
        let mut text = errors.join("\n");
        text.push('\n');
        std::fs::write(self.dir.join("answer"), text).unwrap();
    }

    pub fn set_offline(&self, offline: bool) {
        let marker = self.dir.join("offline");
        if offline {
            std::fs::write(marker, "").unwrap();
        } else {
            let _ = std::fs::remove_file(marker);
        }
    }
}

pub struct Card {
    pub root: PathBuf,
    pub log: PathBuf,
    pub env: Vec<(String, String)>,
}

/// A recipe plus its secret file in `dir`, sharing one activation.
/// A recipe whose cards each get their own activation, made by piprov.
pub fn embedded_recipe(dir: &Path) -> PathBuf {
    let recipe = dir.join("bench.toml");
    std::fs::write(
        &recipe,
        "name = \"bench\"\nregion = \"eu-west-1\"\niam_role = \"SSMServiceRole\"\n\
         [activation]\nsource = \"embedded\"\nexpires = \"2h\"\n[tags]\nbatch = \"2026-11\"\n",
    )
    .unwrap();
    recipe
}

pub fn shared_recipe(dir: &Path, extra: &str) -> PathBuf {
    std::fs::write(dir.join("site.code"), "SECRETCODE-0123456789\n").unwrap();
    let recipe = dir.join("site.toml");
    std::fs::write(
        &recipe,
        format!(
            "name = \"test-site\"\nregion = \"eu-west-1\"\nhostname = \"door-{{serial}}\"\n{extra}\n\
             [activation]\nsource = \"shared\"\nid = \"{SHARED_ID}\"\ncode_file = \"site.code\"\n"
        ),
    )
    .unwrap();
    recipe
}

pub const SHARED_CODE: &str = "SECRETCODE-0123456789";
/// The shared activation of `shared_recipe`.
pub const SHARED_ID: &str = "0a0a0a0a-0000-4000-8000-000000000001";
/// The registration the `registered` fixture carries: the golden's.
pub const GOLDEN_ID: &str = "mi-0a1b2c3d4e5f60718";
/// Two Pis: SoC serial and Ethernet MAC.
pub const PI_A: (&str, &str) = ("10000000aaaa0001", "dc:a6:32:00:00:01");
pub const PI_B: (&str, &str) = ("10000000bbbb0002", "dc:a6:32:00:00:02");

/// A registered golden image, stamped with a shared activation (limit 5),
/// unpacked, in PI_A.
pub fn stamped_card(dir: &tempfile::TempDir, ssm: &Ssm, recipe_extra: &str) -> Card {
    let image = super::fixture("registered", dir);
    let recipe = shared_recipe(dir.path(), recipe_extra);
    stamp(&image, &recipe, &[]);
    ssm.add_activation(SHARED_ID, SHARED_CODE, 5, false);
    let card = Card::from_image(&image, dir.path(), "card", ssm);
    card.plug_into(PI_A.0, PI_A.1);
    card
}

/// `piprov stamp IMAGE --recipe RECIPE`, for more arguments.
pub fn stamp_cmd(image: &Path, recipe: &Path) -> assert_cmd::Command {
    let mut cmd = piprov();
    cmd.arg("stamp").arg(image).arg("--recipe").arg(recipe);
    cmd
}

pub fn stamp(image: &Path, recipe: &Path, args: &[&str]) {
    let out = stamp_cmd(image, recipe).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "stamp failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Card {
    /// Unpacks an image: the ext4 root with debugfs rdump (owners, modes and
    /// links kept), the FAT boot partition with mcopy into /boot/firmware.
    pub fn from_image(image: &Path, dir: &Path, name: &str, ssm: &Ssm) -> Self {
        let root = dir.join(name);
        std::fs::create_dir_all(&root).unwrap();
        let part = dir.join(format!("{name}.root.part"));
        super::extract_partition(image, 2, &part);
        let out = Command::new("debugfs")
            .arg("-R")
            .arg(format!("rdump / {}", root.display()))
            .arg(&part)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "debugfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::remove_file(&part).unwrap();
        let boot = root.join("boot/firmware");
        std::fs::create_dir_all(&boot).unwrap();
        let (start, _) = partition_extent(image, 1);
        let out = Command::new("mcopy")
            .args(["-s", "-n", "-i"])
            .arg(format!("{}@@{start}", image.display()))
            .arg("::/")
            .arg(&boot)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mcopy: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let standins = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/standins");
        let log = dir.join(format!("{name}.log"));
        let env = vec![
            ("PIPROV_ROOT".into(), root.display().to_string()),
            (
                "PATH".into(),
                format!("{}:{}", standins.display(), std::env::var("PATH").unwrap()),
            ),
            ("STANDIN_SSM".into(), ssm.dir.display().to_string()),
            ("STANDIN_LOG".into(), log.display().to_string()),
            ("PIPROV_BACKOFF_BASE".into(), "0".into()),
            ("PIPROV_MAX_ATTEMPTS".into(), "3".into()),
        ];
        Self { root, log, env }
    }

    /// A byte-for-byte copy of this card, as `dd` would make it.
    pub fn clone_to(&self, dir: &Path, name: &str) -> Self {
        let root = dir.join(name);
        let status = Command::new("cp")
            .arg("-a")
            .arg(&self.root)
            .arg(&root)
            .status()
            .unwrap();
        assert!(status.success());
        let mut env = self.env.clone();
        env[0].1 = root.display().to_string();
        let log = dir.join(format!("{name}.log"));
        env[3].1 = log.display().to_string();
        Self { root, log, env }
    }

    /// The Pi this card is plugged into: its SoC serial and its Ethernet MAC.
    pub fn plug_into(&self, serial: &str, mac: &str) {
        let dt = self.root.join("sys/firmware/devicetree/base");
        std::fs::create_dir_all(&dt).unwrap();
        std::fs::write(dt.join("serial-number"), format!("{serial}\0")).unwrap();
        let net = self.root.join("sys/class/net/eth0");
        std::fs::create_dir_all(&net).unwrap();
        std::fs::write(net.join("address"), format!("{mac}\n")).unwrap();
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel.trim_start_matches('/'))
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
    }

    pub fn exists(&self, rel: &str) -> bool {
        self.path(rel).symlink_metadata().is_ok()
    }

    pub fn mode(&self, rel: &str) -> u32 {
        std::fs::metadata(self.path(rel))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    }

    pub fn run(&self, script: &str, extra_env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new("sh");
        cmd.arg(self.path(script));
        cmd.env_clear().env("HOME", "/root");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    }

    /// A shell command in this card's environment (its root, the stand-ins).
    pub fn run_shell(&self, command: &str) -> Output {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(command);
        cmd.env_clear().env("HOME", "/root");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    }

    pub fn install(&self) -> Output {
        self.run("/boot/firmware/piprov-install.sh", &[])
    }

    pub fn guard(&self, extra_env: &[(&str, &str)]) -> Output {
        self.run("/usr/local/lib/piprov/guard.sh", extra_env)
    }

    /// The agent's ExecCondition (`guard.sh --gate`): exit 0 lets the agent start.
    pub fn gate(&self) -> Output {
        self.run_shell(&format!(
            "sh {} --gate",
            self.path("/usr/local/lib/piprov/guard.sh").display()
        ))
    }

    pub fn register(&self, extra_env: &[(&str, &str)]) -> Output {
        self.run("/usr/local/lib/piprov/register.sh", extra_env)
    }

    /// install → guard → register, as the first two boots do; asserts each step exits 0.
    pub fn first_boot(&self) {
        for (what, out) in [
            ("install", self.install()),
            ("guard", self.guard(&[])),
            ("register", self.register(&[])),
        ] {
            assert!(
                out.status.success(),
                "{what} failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Why systemd would skip amazon-ssm-agent on this card before its
    /// ExecCondition runs: a `ConditionPathExists=` in one of the agent's
    /// drop-ins whose path is missing. None when every such condition holds.
    pub fn agent_held_by_condition(&self) -> Option<String> {
        let dir = self.path("/etc/systemd/system/amazon-ssm-agent.service.d");
        let entries = std::fs::read_dir(&dir).ok()?;
        for entry in entries {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            for line in text.lines() {
                if let Some(required) = line.strip_prefix("ConditionPathExists=") {
                    if !self.exists(required) {
                        return Some(format!("{}: {line}", path.display()));
                    }
                }
            }
        }
        None
    }

    pub fn instance_id(&self) -> String {
        let reg = self.read("/var/lib/amazon/ssm/registration");
        let v: serde_json::Value = serde_json::from_str(&reg).unwrap();
        v["ManagedInstanceID"].as_str().unwrap().to_string()
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.read("/boot/firmware/piprov-status.json")).unwrap()
    }

    pub fn standin_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every file under the root with its mode and content (links as their target).
    pub fn snapshot(&self) -> BTreeMap<String, (u32, Vec<u8>)> {
        let mut out = BTreeMap::new();
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let meta = path.symlink_metadata().unwrap();
                let rel = path.strip_prefix(&self.root).unwrap().display().to_string();
                if meta.file_type().is_symlink() {
                    let target = std::fs::read_link(&path).unwrap();
                    out.insert(rel, (0, target.display().to_string().into_bytes()));
                } else if meta.is_dir() {
                    stack.push(path);
                } else {
                    out.insert(
                        rel,
                        (meta.permissions().mode(), std::fs::read(&path).unwrap()),
                    );
                }
            }
        }
        out
    }

    /// Paths of files whose content contains `needle`.
    pub fn files_containing(&self, needle: &str) -> Vec<String> {
        self.snapshot()
            .into_iter()
            .filter(|(_, (_, data))| data.windows(needle.len()).any(|w| w == needle.as_bytes()))
            .map(|(path, _)| path)
            .collect()
    }
}
