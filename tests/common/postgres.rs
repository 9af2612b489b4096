//! The tests' PostgreSQL server (scripts/with-postgres.sh starts one and names
//! it in PIPROV_TEST_POSTGRES): a fresh database per test, and a restart.

use std::process::Command;

pub struct Postgres {
    /// A superuser's URL, to the maintenance database.
    admin: String,
    data: Option<String>,
}

/// The server, or None when none is configured; in CI its absence fails the test.
pub fn server() -> Option<Postgres> {
    match std::env::var("PIPROV_TEST_POSTGRES") {
        Ok(admin) => Some(Postgres {
            admin,
            data: std::env::var("PIPROV_TEST_POSTGRES_DATA").ok(),
        }),
        Err(_) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI: this test needs PostgreSQL (run it through scripts/with-postgres.sh, as make test does)"
            );
            eprintln!("skipped: no PIPROV_TEST_POSTGRES (make test starts a server)");
            None
        }
    }
}

/// The server, which this test cannot do without.
pub fn required() -> Postgres {
    server().expect(
        "this test needs PostgreSQL: run it as `sh scripts/with-postgres.sh cargo test …` (make test does)",
    )
}

impl Postgres {
    pub fn psql(&self, url: &str, sql: &str) -> String {
        let out = Command::new("psql")
            .args([url, "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .expect("running psql");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// A new empty database; its URL.
    pub fn new_database(&self) -> String {
        let mut bytes = [0u8; 6];
        getrandom::getrandom(&mut bytes).unwrap();
        let name = format!("piprov_test_{}", piprov::hex::hex(&bytes));
        self.psql(&self.admin, &format!("CREATE DATABASE {name}"));
        let (base, _) = self.admin.rsplit_once('/').unwrap();
        format!("{base}/{name}")
    }

    /// The CA the server's TLS certificate chains to.
    pub fn ca(&self) -> std::path::PathBuf {
        std::env::var("PIPROV_TEST_POSTGRES_CA")
            .expect("PIPROV_TEST_POSTGRES_CA names the server's CA (scripts/with-postgres.sh)")
            .into()
    }

    /// Stops and starts the server: every connection to it is cut.
    pub fn restart(&self) {
        let data = self
            .data
            .as_ref()
            .expect("PIPROV_TEST_POSTGRES_DATA names the server's data directory");
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/postgres.sh");
        let status = Command::new("sh")
            .arg(script)
            .args(["restart", data])
            .status()
            .unwrap();
        assert!(status.success(), "restarting PostgreSQL");
    }
}
