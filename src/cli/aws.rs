//! The commands that talk to AWS: `activation` and `fleet`.

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::Result;

use crate::account::role;
use crate::cmdline::{ActivationCommand, AwsArgs, FleetCommand, SetupCommand};
use crate::ssm;

pub fn activation(action: ActivationCommand, aws: AwsArgs) -> Result<ExitCode> {
    // Checks that need no AWS call come first.
    let new = match &action {
        ActivationCommand::Create {
            role,
            limit,
            expires,
            name,
            description,
            tags,
            code_file,
            show_code,
            ..
        } => {
            if code_file.is_none() && !show_code {
                anyhow::bail!(
                    "SSM shows an activation code only once: give --code-file FILE to keep it, or --show-code"
                );
            }
            let tags = parse_tags(tags)?;
            let new = ssm::NewActivation {
                iam_role: role.clone(),
                registration_limit: *limit,
                lifetime: *expires,
                default_instance_name: name.clone(),
                description: description.clone(),
                tags,
            };
            new.validate()?;
            if let Some(file) = code_file {
                if file.exists() {
                    anyhow::bail!(
                        "{} exists: piprov will not overwrite a file that may hold another code",
                        file.display()
                    );
                }
            }
            Some(new)
        }
        _ => None,
    };
    crate::runtime::block_on(async {
        let client = ssm::client(&aws.connection()).await?;
        let mut stdout = std::io::stdout().lock();
        match action {
            ActivationCommand::Create {
                code_file,
                show_code,
                json,
                ..
            } => {
                let created = ssm::create_activation(&client, &new.expect("made above")).await?;
                if let Some(file) = &code_file {
                    crate::new_file::write_new(file, format!("{}\n", created.code).as_bytes(), 0o600)
                        .map_err(|e| anyhow::anyhow!("activation {} created, but its code could not be written to {}: {e}; delete it with `piprov activation delete {}`", created.id, file.display(), created.id))?;
                }
                let code = show_code.then_some(created.code.as_str());
                if json {
                    let line = serde_json::json!({"activation_id": created.id, "activation_code": code, "code_file": code_file});
                    writeln!(stdout, "{line}")?;
                } else {
                    writeln!(stdout, "activation {}", created.id)?;
                    match (code, &code_file) {
                        (Some(code), _) => writeln!(stdout, "code {code}")?,
                        (None, Some(file)) => {
                            writeln!(stdout, "code written to {} (mode 0600)", file.display())?
                        }
                        (None, None) => {}
                    }
                }
            }
            ActivationCommand::List { json } => {
                let list = ssm::list_activations(&client).await?;
                if json {
                    serde_json::to_writer_pretty(&mut stdout, &list)
                        .map_err(std::io::Error::from)?;
                    writeln!(stdout)?;
                } else {
                    writeln!(
                        stdout,
                        "{:<36}  {:>9}  {:<20}  {:<7}  tags",
                        "id", "used", "expires", "expired"
                    )?;
                    for a in &list {
                        let tags: Vec<String> =
                            a.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
                        writeln!(
                            stdout,
                            "{:<36}  {:>4}/{:<4}  {:<20}  {:<7}  {}",
                            a.id,
                            a.registrations,
                            a.registration_limit,
                            a.expires.as_deref().unwrap_or("-"),
                            if a.expired { "yes" } else { "no" },
                            tags.join(",")
                        )?;
                    }
                }
            }
            ActivationCommand::Delete { ids } => {
                for id in &ids {
                    ssm::delete_activation(&client, id).await?;
                    writeln!(stdout, "deleted {id}")?;
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn parse_tags(tags: &[String]) -> Result<Vec<(String, String)>> {
    tags.iter()
        .map(|t| match t.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => anyhow::bail!("--tag {t:?}: expected key=value"),
        })
        .collect()
}

pub fn fleet(action: FleetCommand, aws: AwsArgs) -> Result<ExitCode> {
    if let FleetCommand::Reconcile {
        record,
        manifest,
        json,
    } = action
    {
        return super::reconcile::run(record.as_deref(), manifest.as_deref(), json, &aws);
    }
    let tags = match &action {
        FleetCommand::List { tags, .. }
        | FleetCommand::Doctor { tags, .. }
        | FleetCommand::Prune { tags, .. }
        | FleetCommand::AccessPolicy { tags, .. }
        | FleetCommand::SshConfig { tags, .. } => parse_tags(tags)?,
        FleetCommand::Reconcile { .. } => unreachable!("answered above"),
    };
    if let FleetCommand::AccessPolicy { documents, .. } = &action {
        // Made here, not asked of AWS: no credentials needed.
        let policy = ssm::access_policy::operator_policy(&tags, documents);
        println!("{}", serde_json::to_string_pretty(&policy)?);
        return Ok(ExitCode::SUCCESS);
    }
    let (profile, region) = (aws.profile.clone(), aws.region.clone());
    crate::runtime::block_on(async {
        let client = ssm::client(&aws.connection()).await?;
        let nodes = ssm::list_nodes(&client, &tags).await?;
        let now = std::time::SystemTime::now();
        let mut stdout = std::io::stdout().lock();
        match action {
            FleetCommand::AccessPolicy { .. } | FleetCommand::Reconcile { .. } => {
                unreachable!("answered above")
            }
            FleetCommand::SshConfig { user, .. } => {
                let options = ssm::ssh_config::SshOptions {
                    user: user.as_deref(),
                    profile: profile.as_deref(),
                    region: region.as_deref(),
                };
                write!(stdout, "{}", ssm::ssh_config::render(&nodes, &options))?;
                Ok(ExitCode::SUCCESS)
            }
            FleetCommand::List { json, .. } => {
                if json {
                    serde_json::to_writer_pretty(&mut stdout, &nodes)
                        .map_err(std::io::Error::from)?;
                    writeln!(stdout)?;
                    return Ok(ExitCode::SUCCESS);
                }
                writeln!(
                    stdout,
                    "{:<20}  {:<14}  {:<10}  {:<16}  {:<15}  {:<20}  piprov tags",
                    "node", "ping", "agent", "computer name", "ip", "registered"
                )?;
                for n in &nodes {
                    let tags: Vec<String> = n
                        .tags
                        .iter()
                        .filter(|(k, _)| k.starts_with("piprov:"))
                        .map(|(k, v)| format!("{}={v}", k.trim_start_matches("piprov:")))
                        .collect();
                    writeln!(
                        stdout,
                        "{:<20}  {:<14}  {:<10}  {:<16}  {:<15}  {:<20}  {}",
                        n.id,
                        n.ping_status,
                        n.agent_version.as_deref().unwrap_or("-"),
                        n.computer_name.as_deref().unwrap_or("-"),
                        n.ip_address.as_deref().unwrap_or("-"),
                        n.registered_at.as_deref().unwrap_or("-"),
                        tags.join(",")
                    )?;
                }
                Ok(ExitCode::SUCCESS)
            }
            FleetCommand::Doctor {
                offline_days, json, ..
            } => {
                let activations = ssm::list_activations(&client).await?;
                let tier = ssm::instance_tier(&client).await?;
                let offline_after = std::time::Duration::from_secs(offline_days * 86_400);
                let mut problems = ssm::diagnose(&nodes, &activations, offline_after, now);
                problems.extend(ssm::diagnose_tier(&tier));
                if json {
                    let report = serde_json::json!({
                        "nodes": nodes.len(),
                        "activations": activations.len(),
                        "tier": tier,
                        "problems": problems,
                    });
                    writeln!(stdout, "{}", serde_json::to_string_pretty(&report)?)?;
                } else {
                    writeln!(
                        stdout,
                        "{} nodes, {} activations",
                        nodes.len(),
                        activations.len()
                    )?;
                    let limit = tier
                        .node_limit
                        .map_or("no limit".to_string(), |l| format!("{l} allowed"));
                    writeln!(
                        stdout,
                        "instance tier: {} ({} hybrid nodes in the account and region, {limit})",
                        tier.setting, tier.hybrid_nodes
                    )?;
                    for p in &problems {
                        writeln!(stdout, "- {}", p.describe())?;
                    }
                    if problems.is_empty() {
                        writeln!(stdout, "nothing to fix")?;
                    }
                }
                Ok(if problems.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                })
            }
            FleetCommand::Prune {
                offline_for,
                apply,
                json,
                ..
            } => {
                let candidates = ssm::prune_candidates(&nodes, offline_for, now);
                let mut results = Vec::new();
                for n in &candidates {
                    let outcome = if apply {
                        match ssm::deregister(&client, &n.id).await {
                            Ok(()) => "deregistered".to_string(),
                            Err(e) => format!("failed: {e:#}"),
                        }
                    } else {
                        "would deregister".to_string()
                    };
                    if !json {
                        writeln!(
                            stdout,
                            "{}  {:<16}  last seen {}  {outcome}",
                            n.id,
                            n.hostname().unwrap_or("-"),
                            n.last_ping_at
                                .as_deref()
                                .or(n.registered_at.as_deref())
                                .unwrap_or("never"),
                        )?;
                    }
                    results.push(serde_json::json!({"node": n.id, "hostname": n.hostname(), "outcome": outcome}));
                }
                let failed = results.iter().any(|r| {
                    r["outcome"]
                        .as_str()
                        .is_some_and(|o| o.starts_with("failed"))
                });
                if json {
                    let report = serde_json::json!({"applied": apply, "nodes": results});
                    writeln!(stdout, "{}", serde_json::to_string_pretty(&report)?)?;
                } else if candidates.is_empty() {
                    writeln!(
                        stdout,
                        "no node has been offline for {}",
                        crate::units::duration(offline_for)
                    )?;
                } else if !apply {
                    writeln!(
                        stdout,
                        "dry run: nothing deregistered; add --apply to deregister these {}",
                        candidates.len()
                    )?;
                }
                Ok(if failed {
                    ExitCode::from(1)
                } else {
                    ExitCode::SUCCESS
                })
            }
        }
    })
}

pub fn setup(action: SetupCommand, aws: AwsArgs) -> Result<ExitCode> {
    let SetupCommand::Role {
        name,
        policies,
        update_trust,
        apply,
        json,
    } = action;
    crate::runtime::block_on(async {
        let client = crate::account::iam_client(&aws.connection()).await?;
        let request = role::Request {
            role: &name,
            policies: &policies,
            update_trust,
        };
        let plan = role::plan(&client, &request).await?;
        let arn = if apply && !plan.steps.is_empty() {
            Some(role::apply(&client, &plan).await?)
        } else {
            plan.arn.clone()
        };
        let mut stdout = std::io::stdout().lock();
        if json {
            let report = serde_json::json!({
                "applied": apply,
                "arn": arn,
                "plan": plan,
            });
            writeln!(stdout, "{}", serde_json::to_string_pretty(&report)?)?;
        } else {
            print_role_plan(&mut stdout, &plan, apply, arn.as_deref())?;
        }
        let pending = !plan.held_back.is_empty() || (!apply && !plan.steps.is_empty());
        Ok(if pending {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        })
    })
}

fn print_role_plan(
    out: &mut impl std::io::Write,
    plan: &role::Plan,
    applied: bool,
    arn: Option<&str>,
) -> Result<()> {
    let name = &plan.role;
    if let Some(problem) = &plan.trust_problem {
        writeln!(out, "role {name}: {problem}")?;
        if let Some(found) = &plan.found_trust_policy {
            writeln!(
                out,
                "  its trust policy:\n{}",
                indent(&serde_json::to_string_pretty(found)?)
            )?;
        }
        writeln!(
            out,
            "  piprov's:\n{}",
            indent(&serde_json::to_string_pretty(&role::trust_policy())?)
        )?;
    }
    for step in &plan.held_back {
        writeln!(out, "held back (add --update-trust): {}", step.describe())?;
    }
    if plan.steps.is_empty() {
        if plan.held_back.is_empty() {
            writeln!(out, "role {name} is ready: nothing to do")?;
        }
    } else {
        let verb = if applied { "done" } else { "would" };
        for step in &plan.steps {
            writeln!(out, "{verb}: {}", step.describe())?;
        }
        if !applied {
            writeln!(
                out,
                "dry run: nothing changed; add --apply to make these changes"
            )?;
        }
    }
    if let Some(arn) = arn.filter(|a| !a.is_empty()) {
        writeln!(out, "role ARN: {arn} (the recipe's iam_role: {name})")?;
    }
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
