//! `piprov fleet reconcile`: the cards a bench made, read from its record or a
//! flash manifest, joined with the nodes SSM knows.

use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Result, bail};

use crate::cmdline::AwsArgs;
use crate::ssm::{self, reconcile::MadeCard};

pub fn run(
    record: Option<&Path>,
    manifest: Option<&Path>,
    json: bool,
    aws: &AwsArgs,
) -> Result<ExitCode> {
    let made = match (record, manifest) {
        (Some(path), _) => cards_in_record(path)?,
        (None, Some(path)) => ssm::reconcile::cards_in_manifest(path)?,
        (None, None) => bail!("give --record or --manifest"),
    };
    let report = crate::runtime::block_on(async {
        let client = ssm::client(&aws.connection()).await?;
        let nodes = ssm::list_nodes(&client, &[]).await?;
        let activations = ssm::list_activations(&client).await?;
        anyhow::Ok(ssm::reconcile::reconcile(&made, &nodes, &activations))
    })?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        writeln!(
            out,
            "{:>4}  {:<20}  {:<20}  {:<20}  {:<14}  {:<10}  registered",
            "card", "hostname", "activation", "node", "ping", "agent"
        )?;
        for line in &report.cards {
            let node = line.node.as_ref();
            let activation = line.card.activation_id.as_deref().unwrap_or("-");
            writeln!(
                out,
                "{:>4}  {:<20}  {:<20}  {:<20}  {:<14}  {:<10}  {}",
                line.card.number,
                line.card.hostname.as_deref().unwrap_or("-"),
                activation.get(..18).unwrap_or(activation),
                node.map_or("never registered", |n| n.id.as_str()),
                node.map_or("-", |n| n.ping_status.as_str()),
                node.and_then(|n| n.agent_version.as_deref()).unwrap_or("-"),
                node.and_then(|n| n.registered_at.as_deref()).unwrap_or("-"),
            )?;
        }
        for flag in &report.flags {
            writeln!(out, "- {}", flag.describe())?;
        }
        if report.flags.is_empty() {
            writeln!(
                out,
                "every one of {} cards came up as itself",
                report.cards.len()
            )?;
        }
    }
    Ok(if report.flags.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The cards a station record says were written (`done`).
#[cfg(feature = "station")]
fn cards_in_record(path: &Path) -> Result<Vec<MadeCard>> {
    use crate::station::record::{Place, Record};
    let at: Place = path.to_string_lossy().parse().map_err(anyhow::Error::msg)?;
    let rows = Record::read(&at)?;
    Ok(rows
        .into_iter()
        .filter(|row| row.result == "done")
        .map(|row| MadeCard {
            number: row.number.unwrap_or_default(),
            hostname: row.hostname,
            device: row.device,
            activation_id: row.activation_id,
            image_sha256: row.image_sha256,
        })
        .collect())
}

#[cfg(not(feature = "station"))]
fn cards_in_record(_: &Path) -> Result<Vec<MadeCard>> {
    bail!(
        "--record names a station record, and this piprov was built without the station \
         (cargo feature `station`): give --manifest, or use a piprov built with it"
    )
}
