//! Simulated Raspberry Pis for the end-to-end boots: QEMU's arm64 `virt` machine
//! with a Cortex-A72 (a Pi 4's core), booted the way the Pi firmware boots a
//! card: config.txt names the kernel and initramfs on the FAT partition,
//! cmdline.txt is the kernel's command line, and the device tree carries the
//! board's serial at its root (`serial-number`), where the guard reads it on a Pi.
//! A board may also hold an OTP device key: the rpi-fw-crypto stand-in on the
//! card reads it from the board's device tree, so it stays with the board when
//! a card moves, as the key in a Pi's OTP does.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One simulated Pi: its SoC serial (in its device tree) and its network card.
pub struct Board {
    pub serial: String,
    pub mac: String,
    /// Hex of its device key's DER public key, if it has one.
    pub device_key: Option<String>,
    dtb: PathBuf,
}

pub struct Qemu {
    pub accel: &'static str,
    cpu: &'static str,
    /// The virt machine's own device tree, as text, for each board to extend.
    dts: String,
}

const MEMORY: &str = "1024";

/// Reads one file from a card's boot partition (empty if absent).
pub fn boot_file(card: &Path, name: &str) -> Vec<u8> {
    let image = piprov::image::Image::open(card).unwrap();
    image
        .boot()
        .unwrap()
        .read(name)
        .unwrap()
        .unwrap_or_default()
}

/// The kernel and initramfs config.txt names, as the firmware picks them.
fn firmware_files(card: &Path) -> (String, String) {
    let config = String::from_utf8(boot_file(card, "config.txt")).unwrap();
    let mut kernel = "kernel8.img".to_string();
    let mut initramfs = String::new();
    for line in config.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("kernel=") {
            kernel = name.to_string();
        } else if let Some(rest) = line.strip_prefix("initramfs ") {
            initramfs = rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
        }
    }
    assert!(
        !initramfs.is_empty(),
        "config.txt names no initramfs:\n{config}"
    );
    (kernel, initramfs)
}

/// A P-256 key for a board's OTP: the PEM, and the public key as the stand-in
/// (`rpi-fw-crypto pubkey --outform hex`) prints it.
fn device_key_pair(dir: &Path, serial: &str) -> (String, String) {
    let otp = dir.join(format!("pi-{serial}.otp"));
    std::fs::create_dir_all(&otp).unwrap();
    let pem = otp.join("key1.pem");
    run(
        Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
            ])
            .arg(&pem),
        "openssl genpkey",
    );
    let standin = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/standins/rpi-fw-crypto");
    let public = run(
        Command::new("sh")
            .arg(standin)
            .args(["pubkey", "--key-id", "1", "--outform", "hex"])
            .env("RPI_FW_CRYPTO_OTP", &otp)
            .env("RPI_FW_CRYPTO_LOG", dir.join("rpi-fw-crypto.calls")),
        "rpi-fw-crypto pubkey",
    );
    (
        std::fs::read_to_string(&pem).unwrap(),
        String::from_utf8(public).unwrap(),
    )
}

fn run(command: &mut Command, what: &str) -> Vec<u8> {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e} (see scripts/install-deps.sh)"));
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

impl Qemu {
    /// TCG on any machine that is not arm64 (this one), KVM on an arm64 host that has it.
    pub fn new(dir: &Path) -> Qemu {
        let kvm = cfg!(target_arch = "aarch64")
            && std::fs::File::options()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok();
        let (accel, cpu) = if kvm {
            ("kvm", "host")
        } else {
            eprintln!(
                "e2e: arm64 guests on a {} host: QEMU's TCG emulator",
                std::env::consts::ARCH
            );
            ("tcg", "cortex-a72")
        };
        let dtb = dir.join("virt.dtb");
        run(
            Command::new("qemu-system-aarch64")
                .arg("-M")
                .arg(format!("virt,dumpdtb={}", dtb.display()))
                .args(["-accel", accel, "-cpu", cpu, "-m", MEMORY, "-smp", "1"])
                .args(["-nographic", "-monitor", "none"])
                // The default NIC would load its boot ROM (ipxe-qemu, not
                // installed); the tree does not list PCI devices anyway.
                .args(["-nic", "none"]),
            "qemu-system-aarch64 -machine dumpdtb",
        );
        let dts = run(
            Command::new("dtc")
                .args(["-q", "-I", "dtb", "-O", "dts"])
                .arg(&dtb),
            "dtc (decompiling the virt machine's device tree)",
        );
        Qemu {
            accel,
            cpu,
            dts: String::from_utf8(dts).unwrap(),
        }
    }

    /// A board with this serial: the virt device tree with `serial-number` added
    /// at its root, as the Pi firmware adds it (a NUL-terminated string), and
    /// with `device_key` an OTP key 1 (node `piprov-e2e-otp`, read by the stand-in).
    pub fn board(&self, dir: &Path, serial: &str, mac: &str, device_key: bool) -> Board {
        let root = self
            .dts
            .find("/ {\n")
            .expect("the device tree has a root node");
        let at = root + "/ {\n".len();
        // Properties precede subnodes: the OTP node goes last in the root.
        let end = self.dts.rfind("};").expect("the root node ends");
        let (otp, public) = if device_key {
            let (pem, public) = device_key_pair(dir, serial);
            (
                format!(
                    "\tpiprov-e2e-otp {{\n\t\tkey1.pem = \"{}\";\n\t}};\n",
                    pem.trim_end().replace('\n', "\\n")
                ),
                Some(public),
            )
        } else {
            (String::new(), None)
        };
        let dts = format!(
            "{}\tserial-number = \"{serial}\";\n{}{otp}{}",
            &self.dts[..at],
            &self.dts[at..end],
            &self.dts[end..]
        );
        let source = dir.join(format!("pi-{serial}.dts"));
        let dtb = dir.join(format!("pi-{serial}.dtb"));
        std::fs::write(&source, dts).unwrap();
        run(
            Command::new("dtc")
                .args(["-q", "-I", "dts", "-O", "dtb", "-o"])
                .arg(&dtb)
                .arg(&source),
            "dtc (compiling a board's device tree)",
        );
        Board {
            serial: serial.to_string(),
            mac: mac.to_string(),
            device_key: public,
            dtb,
        }
    }

    /// The same board with another network card.
    pub fn with_mac(&self, board: &Board, mac: &str) -> Board {
        Board {
            serial: board.serial.clone(),
            mac: mac.to_string(),
            device_key: board.device_key.clone(),
            dtb: board.dtb.clone(),
        }
    }

    /// One power-on to power-off (or reboot) of `card` in `board`. Returns the serial log.
    fn power_on(
        &self,
        card: &Path,
        board: &Board,
        limit: Duration,
        dir: &Path,
        name: &str,
    ) -> String {
        let (kernel_name, initramfs_name) = firmware_files(card);
        let kernel = dir.join(format!("{name}.kernel"));
        let initramfs = dir.join(format!("{name}.initramfs"));
        std::fs::write(&kernel, boot_file(card, &kernel_name)).unwrap();
        std::fs::write(&initramfs, boot_file(card, &initramfs_name)).unwrap();
        let cmdline = String::from_utf8(boot_file(card, "cmdline.txt")).unwrap();
        let log = dir.join(format!("{name}.serial.log"));
        let _ = std::fs::remove_file(&log);
        let mut child = Command::new("qemu-system-aarch64")
            .args(["-M", "virt", "-accel", self.accel, "-cpu", self.cpu])
            .args(["-m", MEMORY, "-smp", "1"])
            .args(["-nographic", "-no-reboot", "-monitor", "none"])
            .arg("-dtb")
            .arg(&board.dtb)
            .arg("-kernel")
            .arg(&kernel)
            .arg("-initrd")
            .arg(&initramfs)
            .args(["-append", cmdline.trim()])
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=none,id=card",
                card.display()
            ))
            .args(["-device", "virtio-blk-pci,drive=card"])
            .args(["-netdev", "user,id=n0", "-device"])
            .arg(format!(
                "virtio-net-pci,netdev=n0,romfile=,mac={}",
                board.mac
            ))
            // A Pi has a hardware RNG: without one, an emulated guest waits for entropy.
            .args(["-device", "virtio-rng-pci"])
            .arg("-serial")
            .arg(format!("file:{}", log.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-system-aarch64 (apt-get install qemu-system-arm)");
        let started = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if started.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned()
    }

    /// Boots a card until it has settled: a stamped card's first power-on runs
    /// the hook and reboots, the next one registers and powers off. Returns the
    /// time from the first power-on to the last power-off.
    pub fn boot(&self, card: &Path, board: &Board, dir: &Path, name: &str) -> Duration {
        let started = Instant::now();
        for round in 0..3 {
            let hooked = String::from_utf8(boot_file(card, "cmdline.txt"))
                .unwrap()
                .contains("systemd.run=");
            let log = self.power_on(
                card,
                board,
                Duration::from_secs(1200),
                dir,
                &format!("{name}-{round}"),
            );
            assert!(
                log.contains("Power down") || log.contains("reboot: Restarting"),
                "{name} did not finish booting:\n{}",
                tail(&log)
            );
            if round == 0 {
                assert!(
                    log.contains("Machine model: linux,dummy-virt")
                        && log.contains("Booting Linux on physical CPU"),
                    "{name}: not an arm64 device-tree boot:\n{}",
                    tail(&log)
                );
            }
            if !hooked {
                break;
            }
        }
        started.elapsed()
    }
}

pub fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
