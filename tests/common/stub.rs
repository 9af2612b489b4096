//! A stand-in server (tests/support/*.py) run as a child process on loopback: it
//! writes its port to a file once listening, and is killed when dropped.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub struct Stub {
    child: Child,
    pub port: u16,
}

impl Stub {
    pub fn start(mut command: Command, port_file: &Path, name: &str) -> Stub {
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting the {name}: {e}"));
        let mut stub = Stub { child, port: 0 };
        let started = Instant::now();
        stub.port = loop {
            if let Some(port) = std::fs::read_to_string(port_file)
                .ok()
                .and_then(|t| t.trim().parse().ok())
            {
                break port;
            }
            assert!(started.elapsed().as_secs() < 60, "the {name} did not start");
            std::thread::sleep(Duration::from_millis(50));
        };
        stub
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The requests a stand-in logged, one JSON object per line.
pub fn logged_requests(log: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
