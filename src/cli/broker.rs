//! `piprov broker init | token | device | serve`.

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::{Context, Result};

use crate::broker::{config, device, init, server, store::Store, tokens};
use crate::cmdline::{BrokerCommand, DeviceCommand, TokenCommand};

pub fn run(action: BrokerCommand) -> Result<ExitCode> {
    match action {
        BrokerCommand::Init {
            dir,
            names,
            listen,
            region,
            iam_role,
            database,
            database_ca_file,
        } => {
            let done = init::init(&init::InitOptions {
                dir,
                listen,
                names,
                region,
                iam_role,
                database: database.filter(|d| d != "sqlite"),
                database_ca_file,
            })?;
            println!("broker config {}", done.config.display());
            println!(
                "cards pin {} (recipe: activation.ca_file)",
                done.ca.display()
            );
        }
        BrokerCommand::Serve {
            config,
            ready_file,
            listen,
            log_format,
        } => {
            server::serve(
                config::load(&config)?,
                &server::ServeOptions {
                    ready_file: ready_file.as_deref(),
                    listen,
                    log_format,
                },
            )?;
        }
        BrokerCommand::Token { action } => token(action)?,
        BrokerCommand::Device { action } => devices(action)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `work` on the config's database (one connection).
fn with_store<T>(
    config_path: &std::path::Path,
    work: impl AsyncFnOnce(&Store) -> Result<T>,
) -> Result<T> {
    let loaded = config::load(config_path)?;
    crate::runtime::block_on(async {
        let store = Store::open(&loaded.location, 1).await?;
        work(&store).await
    })
}

fn time(t: Option<i64>) -> String {
    t.map_or("-".to_string(), |t| {
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(t as u64),
        )
        .to_string()
    })
}

fn devices(action: DeviceCommand) -> Result<()> {
    match action {
        DeviceCommand::Import {
            config,
            file,
            replace,
        } => {
            let devices = device::read_import(&file)?;
            let (added, replaced, unchanged) = with_store(&config, async |store| {
                store.import_devices(&devices, replace).await
            })?;
            println!(
                "{} device(s): {added} added, {replaced} replaced, {unchanged} unchanged",
                devices.len()
            );
        }
        DeviceCommand::List { config, json } => {
            let list = with_store(&config, async |store| store.devices().await)?;
            let mut stdout = std::io::stdout().lock();
            if json {
                writeln!(stdout, "{}", serde_json::to_string_pretty(&list)?)?;
            } else {
                writeln!(
                    stdout,
                    "{:<18}  {:<16}  {:<9}  {:<20}  {:<20}  revoked",
                    "serial", "key", "source", "added", "last seen"
                )?;
                for d in &list {
                    writeln!(
                        stdout,
                        "{:<18}  {:<16}  {:<9}  {:<20}  {:<20}  {}",
                        d.serial,
                        d.fingerprint,
                        d.source,
                        time(Some(d.added_at)),
                        time(d.last_seen_at),
                        time(d.revoked_at)
                    )?;
                }
            }
        }
        DeviceCommand::Revoke { config, serial } => {
            let serial = serial.to_ascii_lowercase();
            with_store(&config, async |store| store.revoke_device(&serial).await)?;
            println!("revoked device {serial}: it is refused under device policies tofu and known");
        }
    }
    Ok(())
}

fn token(action: TokenCommand) -> Result<()> {
    match action {
        TokenCommand::Add {
            config,
            name,
            max_uses,
            expires,
            unlimited: _,
            serials,
            token_file,
            device_policy,
        } => {
            if let Some(file) = &token_file {
                if file.exists() {
                    anyhow::bail!("{} exists: piprov will not overwrite it", file.display());
                }
            }
            let new = tokens::NewToken {
                name: &name,
                max_uses,
                expires,
                serials_file: serials.as_deref(),
                device_policy,
            };
            let token = with_store(&config, async |store| tokens::add(store, &new).await)?;
            match &token_file {
                Some(file) => {
                    crate::new_file::write_new(file, format!("{token}\n").as_bytes(), 0o600)
                        .with_context(|| {
                            format!(
                                "token {name} was made but {} could not be created: revoke it",
                                file.display()
                            )
                        })?;
                    println!("token {name} written to {} (mode 0600)", file.display());
                }
                None => {
                    println!("{token}");
                    eprintln!("token {name}: shown this once; only its SHA-256 is kept");
                }
            }
        }
        TokenCommand::List { config, json } => {
            let list = with_store(&config, async |store| store.tokens().await)?;
            let mut stdout = std::io::stdout().lock();
            if json {
                writeln!(stdout, "{}", serde_json::to_string_pretty(&list)?)?;
            } else {
                writeln!(
                    stdout,
                    "{:<20}  {:>9}  {:<20}  {:<8}  {:<7}  serials",
                    "name", "used", "expires", "revoked", "devices"
                )?;
                for t in &list {
                    writeln!(
                        stdout,
                        "{:<20}  {:>4}/{:<4}  {:<20}  {:<8}  {:<7}  {}",
                        t.name,
                        t.uses,
                        t.max_uses.map_or("-".into(), |m| m.to_string()),
                        time(t.expires_at),
                        if t.revoked_at.is_some() { "yes" } else { "no" },
                        t.device_policy.as_str(),
                        t.serials
                            .as_ref()
                            .map_or("any".into(), |s| s.len().to_string())
                    )?;
                }
            }
        }
        TokenCommand::Revoke { config, name } => {
            with_store(&config, async |store| store.revoke_token(&name).await)?;
            println!("revoked {name}");
        }
    }
    Ok(())
}
