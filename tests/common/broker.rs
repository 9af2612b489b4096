//! A real `piprov broker` on loopback, made with `piprov broker init`, talking to
//! the local SSM endpoint; requests to it go through curl with the broker's CA.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::card::{Card, Ssm, stamp};
use super::ssm_endpoint::SsmEndpoint;
use super::{fixture, free_port, succeed};

pub struct BrokerProcess {
    child: Option<Child>,
    /// The PostgreSQL URL it keeps its records at; None: broker.db in `dir`.
    pub database: Option<String>,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub ca: PathBuf,
    pub address: String,
    pub log: PathBuf,
    env: Vec<(String, String)>,
    /// `serve --listen` (a twin on the same host).
    listen: Option<String>,
    /// More `serve` arguments, e.g. `--log-format json`.
    pub serve_args: Vec<String>,
    /// The descriptor limit (soft and hard) the broker starts with.
    pub descriptor_limit: Option<u64>,
}

impl BrokerProcess {
    /// `piprov broker init` in `dir/broker` on a free loopback port (kept across
    /// restarts, as the cards know it), then `settings` (`key = value` lines)
    /// replace the config's defaults.
    /// The store is SQLite, or a fresh PostgreSQL database when
    /// PIPROV_TEST_BROKER_DATABASE=postgres (make test runs the broker tests both ways).
    pub fn init(dir: &Path, ssm: &SsmEndpoint, settings: &[(&str, &str)]) -> BrokerProcess {
        Self::init_named(dir, ssm, settings, &[])
    }

    /// As `init`, on this database (a postgres:// URL).
    pub fn init_on(
        dir: &Path,
        ssm: &SsmEndpoint,
        settings: &[(&str, &str)],
        database: &str,
    ) -> BrokerProcess {
        Self::init_with(dir, ssm, settings, &[], Some(database.to_string()))
    }

    /// As `init_on`, with more `broker init` arguments.
    pub fn init_on_with(
        dir: &Path,
        ssm: &SsmEndpoint,
        database: &str,
        init_args: &[&str],
    ) -> BrokerProcess {
        Self::init_in_with(
            dir,
            ssm.env(),
            &[],
            &[],
            Some(database.to_string()),
            init_args,
        )
    }

    /// A second broker on this one's config and database (another process, as
    /// on another host: its own log).
    pub fn twin(&self, name: &str) -> BrokerProcess {
        BrokerProcess {
            child: None,
            database: self.database.clone(),
            dir: self.dir.clone(),
            config: self.config.clone(),
            ca: self.ca.clone(),
            address: String::new(),
            log: self.log.with_file_name(format!("{name}.log")),
            env: self.env.clone(),
            listen: Some(format!("127.0.0.1:{}", free_port())),
            serve_args: self.serve_args.clone(),
            descriptor_limit: self.descriptor_limit,
        }
    }

    /// As `init`, with more names in the certificate (e.g. the address a VM
    /// reaches this machine by).
    pub fn init_named(
        dir: &Path,
        ssm: &SsmEndpoint,
        settings: &[(&str, &str)],
        names: &[&str],
    ) -> BrokerProcess {
        let database = match std::env::var("PIPROV_TEST_BROKER_DATABASE").as_deref() {
            Ok("postgres") => Some(super::postgres::required().new_database()),
            Ok("sqlite") | Err(_) => None,
            Ok(other) => panic!("PIPROV_TEST_BROKER_DATABASE={other}: sqlite or postgres"),
        };
        Self::init_with(dir, ssm, settings, names, database)
    }

    fn init_with(
        dir: &Path,
        ssm: &SsmEndpoint,
        settings: &[(&str, &str)],
        names: &[&str],
        database: Option<String>,
    ) -> BrokerProcess {
        Self::init_in(dir, ssm.env(), settings, names, database)
    }

    /// `piprov broker init` with this environment (where SSM is, the AWS
    /// settings) on `database` (None: SQLite).
    pub fn init_in(
        dir: &Path,
        env: Vec<(String, String)>,
        settings: &[(&str, &str)],
        names: &[&str],
        database: Option<String>,
    ) -> BrokerProcess {
        Self::init_in_with(dir, env, settings, names, database, &[])
    }

    fn init_in_with(
        dir: &Path,
        env: Vec<(String, String)>,
        settings: &[(&str, &str)],
        names: &[&str],
        database: Option<String>,
        init_args: &[&str],
    ) -> BrokerProcess {
        let home = dir.join("broker");
        let extra: Vec<String> = names
            .iter()
            .flat_map(|n| ["--name".to_string(), n.to_string()])
            .collect();
        let port = free_port();
        let mut init = super::piprov();
        init.env_clear()
            .envs(env.clone())
            .args(["broker", "init"])
            .arg(&home)
            .args(["--name", "127.0.0.1", "--name", "localhost"])
            .args(&extra)
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--region",
                "eu-west-1",
            ])
            .args(["--iam-role", "SSMServiceRole"])
            .args(database.iter().flat_map(|d| ["--database", d.as_str()]))
            .args(init_args)
            .assert()
            .success();
        let config = home.join("broker.toml");
        let mut text = std::fs::read_to_string(&config).unwrap();
        for (key, value) in settings {
            let line = text
                .lines()
                .find(|l| l.starts_with(&format!("{key} =")))
                .unwrap_or_else(|| panic!("broker.toml has no {key}"))
                .to_string();
            text = text.replace(&line, &format!("{key} = {value}"));
        }
        std::fs::write(&config, text).unwrap();
        BrokerProcess {
            child: None,
            database,
            listen: None,
            dir: home.clone(),
            config,
            ca: home.join("ca.pem"),
            address: String::new(),
            log: dir.join("broker.log"),
            env,
            serve_args: Vec::new(),
            descriptor_limit: None,
        }
    }

    /// `piprov broker token add --name NAME ARGS…`; returns the token.
    /// Limits not given are unlimited (`--unlimited`).
    pub fn add_token(&self, name: &str, args: &[&str]) -> String {
        let limited = args.contains(&"--max-uses") && args.contains(&"--expires");
        let out = succeed(
            self.piprov()
                .args(["broker", "token", "add", "--config"])
                .arg(&self.config)
                .args(["--name", name])
                .args(args)
                .args((!limited).then_some("--unlimited")),
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    pub fn piprov(&self) -> assert_cmd::Command {
        let mut cmd = super::piprov();
        cmd.env_clear().envs(self.env.clone());
        cmd
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let ready = self.log.with_extension("ready");
        let _ = std::fs::remove_file(&ready);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_piprov"));
        if let Some(limit) = self.descriptor_limit {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; nothing else runs here.
            unsafe {
                command.pre_exec(move || {
                    nix::sys::resource::setrlimit(
                        nix::sys::resource::Resource::RLIMIT_NOFILE,
                        limit,
                        limit,
                    )
                    .map_err(std::io::Error::from)
                });
            }
        }
        let child = command
            .env_clear()
            .envs(self.env.clone())
            .args(["broker", "serve", "--config"])
            .arg(&self.config)
            .arg("--ready-file")
            .arg(&ready)
            .args(self.listen.iter().flat_map(|l| ["--listen", l.as_str()]))
            .args(&self.serve_args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let started = Instant::now();
        self.address = loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                if text.ends_with('\n') {
                    break text.trim().to_string();
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the broker exited with {status}: {}", self.log_text());
            }
            assert!(started.elapsed().as_secs() < 30, "the broker did not start");
            std::thread::sleep(Duration::from_millis(50));
        };
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.address)
    }

    pub fn port(&self) -> u16 {
        self.address.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// SIGTERM, as systemd stops it; waits for the exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        child.wait().unwrap()
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill_hard(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// A count from the broker's database, whichever it is: `sql` with `$1`…
    /// standing for `args` (quoted as SQL strings).
    pub fn count(&self, sql: &str, args: &[&str]) -> i64 {
        let mut text = sql.to_string();
        for (i, arg) in args.iter().enumerate().rev() {
            text = text.replace(
                &format!("${}", i + 1),
                &format!("'{}'", arg.replace('\'', "''")),
            );
        }
        match &self.database {
            Some(url) => super::postgres::required()
                .psql(url, &text)
                .parse()
                .unwrap(),
            None => rusqlite::Connection::open(self.dir.join("broker.db"))
                .unwrap()
                .query_row(&text, [], |r| r.get(0))
                .unwrap(),
        }
    }

    /// Rows from the broker's database, each column as text ("" for NULL).
    pub fn rows(&self, sql: &str) -> Vec<Vec<String>> {
        match &self.database {
            Some(url) => {
                let out = super::postgres::required().psql(url, sql);
                out.lines()
                    .filter(|l| !l.is_empty())
                    .map(|l| l.split('|').map(str::to_string).collect())
                    .collect()
            }
            None => {
                let db = rusqlite::Connection::open(self.dir.join("broker.db")).unwrap();
                let mut stmt = db.prepare(sql).unwrap();
                let columns = stmt.column_count();
                stmt.query_map([], |r| {
                    (0..columns)
                        .map(|i| {
                            Ok(match r.get_ref(i)? {
                                rusqlite::types::ValueRef::Null => String::new(),
                                rusqlite::types::ValueRef::Integer(v) => v.to_string(),
                                rusqlite::types::ValueRef::Text(t) => {
                                    String::from_utf8_lossy(t).into_owned()
                                }
                                other => format!("{other:?}"),
                            })
                        })
                        .collect()
                })
                .unwrap()
                .map(Result::unwrap)
                .collect()
            }
        }
    }

    /// CPU seconds (user + system) the running broker process has used.
    pub fn cpu_seconds(&self) -> f64 {
        self.child.as_ref().map_or(0.0, |c| {
            super::cpu::stat_cpu(Path::new(&format!("/proc/{}/stat", c.id()))) / 100.0
        })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// POSTs `body` with `token` (if any): (HTTP status, JSON reply).
    pub fn post(&self, path: &str, token: Option<&str>, body: &str) -> (u16, serde_json::Value) {
        self.client().post(path, token, body)
    }

    /// A client that can be handed to another thread.
    pub fn client(&self) -> BrokerClient {
        BrokerClient {
            url: self.url(),
            ca: self.ca.clone(),
        }
    }
}

pub struct BrokerClient {
    url: String,
    ca: PathBuf,
}

impl BrokerClient {
    pub fn post(&self, path: &str, token: Option<&str>, body: &str) -> (u16, serde_json::Value) {
        self.post_with(path, token, &[], body)
    }

    /// POST with more headers (`Name: value`).
    pub fn post_with(
        &self,
        path: &str,
        token: Option<&str>,
        headers: &[String],
        body: &str,
    ) -> (u16, serde_json::Value) {
        let mut cmd = Command::new("curl");
        for header in headers {
            cmd.args(["-H", header]);
        }
        cmd.args(["-s", "--max-time", "30", "-w", "\n%{http_code}", "--cacert"])
            .arg(&self.ca)
            .args([
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                body,
            ]);
        if let Some(token) = token {
            cmd.args(["-H", &format!("Authorization: Bearer {token}")]);
        }
        let out = cmd.arg(format!("{}{path}", self.url)).output().unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let (reply, status) = text.rsplit_once('\n').unwrap();
        (
            status.parse().unwrap(),
            serde_json::from_str(reply).unwrap_or(serde_json::Value::String(reply.into())),
        )
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A card named `name` stamped from the registered fixture with a broker recipe
/// (`extra` lines go in its [activation] table), its agent pointed at the SSM endpoint.
pub fn broker_card(
    dir: &Path,
    ssm: &SsmEndpoint,
    broker: &BrokerProcess,
    token: &str,
    extra: &str,
    name: &str,
) -> Card {
    std::fs::write(dir.join("site.token"), format!("{token}\n")).unwrap();
    let recipe = dir.join("broker.toml");
    std::fs::write(
        &recipe,
        format!(
            "region = \"eu-west-1\"\nhostname = \"pi-{{serial}}\"\n[activation]\nsource = \"broker\"\n\
             url = \"{}\"\nca_file = \"{}\"\ntoken_file = \"site.token\"\n{extra}\n",
            broker.url(),
            broker.ca.display()
        ),
    )
    .unwrap();
    let tmp = tempfile::TempDir::new_in(dir).unwrap();
    let image = fixture("registered", &tmp);
    stamp(&image, &recipe, &[]);
    let files = Ssm::new(dir);
    let card = Card::from_image(&image, dir, name, &files);
    // The agent on the card talks to the local endpoint, as its config allows.
    let agent_conf = card.path("/etc/amazon/ssm/amazon-ssm-agent.json");
    std::fs::create_dir_all(agent_conf.parent().unwrap()).unwrap();
    std::fs::write(
        &agent_conf,
        format!(r#"{{"Ssm":{{"Endpoint":"{}"}}}}"#, ssm.url()),
    )
    .unwrap();
    card
}
