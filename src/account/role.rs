//! The IAM service role hybrid nodes assume (`piprov setup role`): trusted by
//! `ssm.amazonaws.com` for `sts:AssumeRole`, with `AmazonSSMManagedInstanceCore`
//! and any further policies attached. Read first, then a plan of what would
//! change; applied only when asked, and idempotent: a role that is right is
//! left as it is. A role whose trust policy says something else is reported,
//! and changed only with `--update-trust`.

use anyhow::{Context, Result};
use aws_sdk_iam::Client;
use aws_sdk_iam::error::{ProvideErrorMetadata, SdkError};
use serde::Serialize;
use serde_json::{Value, json};

/// The managed policy every hybrid node needs.
pub const CORE_POLICY: &str = "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore";
pub const DEFAULT_ROLE: &str = "SSMServiceRole";
const SERVICE: &str = "ssm.amazonaws.com";

/// The trust policy piprov creates.
pub fn trust_policy() -> Value {
    json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Principal": { "Service": SERVICE },
            "Action": "sts:AssumeRole",
        }],
    })
}

/// One step of the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Step {
    CreateRole {
        role: String,
    },
    AttachPolicy {
        role: String,
        policy: String,
    },
    /// Replace a trust policy that does not let SSM assume the role.
    UpdateTrust {
        role: String,
    },
}

impl Step {
    pub fn describe(&self) -> String {
        match self {
            Step::CreateRole { role } => {
                format!("create role {role}, trusted by {SERVICE} for sts:AssumeRole")
            }
            Step::AttachPolicy { role, policy } => format!("attach {policy} to {role}"),
            Step::UpdateTrust { role } => format!(
                "replace {role}'s trust policy with one that trusts {SERVICE} for sts:AssumeRole"
            ),
        }
    }
}

/// What was found, and what to do about it.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub role: String,
    pub arn: Option<String>,
    pub exists: bool,
    /// Why the existing trust policy is not enough, if it is not.
    pub trust_problem: Option<String>,
    pub found_trust_policy: Option<Value>,
    pub attached: Vec<String>,
    pub steps: Vec<Step>,
    /// Steps held back: the trust policy differs and `--update-trust` was not given.
    pub held_back: Vec<Step>,
}

pub struct Request<'a> {
    pub role: &'a str,
    /// Policies to attach besides `CORE_POLICY`.
    pub policies: &'a [String],
    pub update_trust: bool,
}

/// Reads the role and works out the steps.
pub async fn plan(client: &Client, request: &Request<'_>) -> Result<Plan> {
    let role = request.role.to_string();
    let mut wanted = vec![CORE_POLICY.to_string()];
    for p in request.policies {
        if !wanted.contains(p) {
            wanted.push(p.clone());
        }
    }
    let found = match client.get_role().role_name(&role).send().await {
        Ok(out) => out.role,
        Err(e) if e.code() == Some("NoSuchEntity") => None,
        Err(e) => return Err(explain(e, &format!("reading role {role}"))),
    };
    let Some(found) = found else {
        let mut steps = vec![Step::CreateRole { role: role.clone() }];
        steps.extend(wanted.iter().map(|policy| Step::AttachPolicy {
            role: role.clone(),
            policy: policy.clone(),
        }));
        return Ok(Plan {
            role,
            arn: None,
            exists: false,
            trust_problem: None,
            found_trust_policy: None,
            attached: Vec::new(),
            steps,
            held_back: Vec::new(),
        });
    };
    let found_trust = found
        .assume_role_policy_document()
        .map(decode_policy)
        .transpose()
        .with_context(|| format!("reading {role}'s trust policy"))?;
    let trust_problem = match &found_trust {
        Some(doc) => trust_gap(doc),
        None => Some("it has no trust policy".into()),
    };
    let attached = attached_policies(client, &role).await?;
    let mut steps = Vec::new();
    let mut held_back = Vec::new();
    if trust_problem.is_some() {
        let step = Step::UpdateTrust { role: role.clone() };
        if request.update_trust {
            steps.push(step);
        } else {
            held_back.push(step);
        }
    }
    steps.extend(
        wanted
            .iter()
            .filter(|p| !attached.contains(p))
            .map(|policy| Step::AttachPolicy {
                role: role.clone(),
                policy: policy.clone(),
            }),
    );
    Ok(Plan {
        role,
        arn: Some(found.arn().to_string()),
        exists: true,
        trust_problem,
        found_trust_policy: found_trust,
        attached,
        steps,
        held_back,
    })
}

/// Carries out the plan's steps, in order; the role's ARN.
pub async fn apply(client: &Client, plan: &Plan) -> Result<String> {
    let trust = trust_policy().to_string();
    let mut arn = plan.arn.clone();
    for step in &plan.steps {
        match step {
            Step::CreateRole { role } => {
                let out = client
                    .create_role()
                    .role_name(role)
                    .assume_role_policy_document(&trust)
                    .description(
                        "Assumed by Raspberry Pis registered with SSM hybrid activations (piprov)",
                    )
                    .tags(
                        aws_sdk_iam::types::Tag::builder()
                            .key("piprov:version")
                            .value(env!("CARGO_PKG_VERSION"))
                            .build()?,
                    )
                    .send()
                    .await
                    .map_err(|e| explain(e, &format!("creating role {role}")))?;
                arn = out.role.map(|r| r.arn().to_string());
            }
            Step::AttachPolicy { role, policy } => {
                client
                    .attach_role_policy()
                    .role_name(role)
                    .policy_arn(policy)
                    .send()
                    .await
                    .map_err(|e| explain(e, &format!("attaching {policy} to {role}")))?;
            }
            Step::UpdateTrust { role } => {
                client
                    .update_assume_role_policy()
                    .role_name(role)
                    .policy_document(&trust)
                    .send()
                    .await
                    .map_err(|e| explain(e, &format!("updating {role}'s trust policy")))?;
            }
        }
    }
    Ok(arn.unwrap_or_default())
}

async fn attached_policies(client: &Client, role: &str) -> Result<Vec<String>> {
    let mut arns = Vec::new();
    let mut pages = client
        .list_attached_role_policies()
        .role_name(role)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| explain(e, &format!("listing {role}'s policies")))?;
        arns.extend(
            page.attached_policies()
                .iter()
                .filter_map(|p| p.policy_arn().map(str::to_string)),
        );
    }
    Ok(arns)
}

/// IAM returns policy documents URL-encoded.
fn decode_policy(text: &str) -> Result<Value> {
    let decoded = percent_encoding::percent_decode_str(text).decode_utf8()?;
    Ok(serde_json::from_str(&decoded)?)
}

/// Why a trust policy does not let SSM assume the role, if it does not: it
/// needs an Allow statement whose principal services include
/// `ssm.amazonaws.com` and whose actions include `sts:AssumeRole` (conditions,
/// such as AWS's confused-deputy ones, are fine).
pub fn trust_gap(doc: &Value) -> Option<String> {
    let statements = match &doc["Statement"] {
        Value::Array(list) => list.clone(),
        one @ Value::Object(_) => vec![one.clone()],
        _ => return Some("its trust policy has no statements".into()),
    };
    let as_list = |v: &Value| -> Vec<String> {
        match v {
            Value::String(s) => vec![s.clone()],
            Value::Array(list) => list
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        }
    };
    let allowed: Vec<&Value> = statements
        .iter()
        .filter(|s| s["Effect"] == "Allow")
        .collect();
    let mut services: Vec<String> = allowed
        .iter()
        .flat_map(|s| as_list(&s["Principal"]["Service"]))
        .collect();
    services.sort();
    services.dedup();
    let trusts_ssm = allowed.iter().any(|s| {
        as_list(&s["Principal"]["Service"])
            .iter()
            .any(|p| p == SERVICE)
            && as_list(&s["Action"])
                .iter()
                .any(|a| a == "sts:AssumeRole" || a == "sts:*" || a == "*")
    });
    if trusts_ssm {
        return None;
    }
    Some(if services.iter().any(|s| s == SERVICE) {
        format!("its trust policy names {SERVICE} but does not allow it sts:AssumeRole")
    } else if services.is_empty() {
        format!("its trust policy lets no AWS service assume it, so not {SERVICE}")
    } else {
        format!(
            "its trust policy lets {} assume it, not {SERVICE}",
            services.join(", ")
        )
    })
}

/// One line that says what went wrong and what to do.
fn explain<E, R>(err: SdkError<E, R>, doing: &str) -> anyhow::Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let code = err.code().unwrap_or_default().to_string();
    let message = err.message().unwrap_or_default().to_string();
    let hint = match code.as_str() {
        "AccessDenied" | "AccessDeniedException" => {
            "your identity may not manage IAM roles: it needs iam:GetRole, iam:CreateRole, \
             iam:ListAttachedRolePolicies, iam:AttachRolePolicy (and iam:UpdateAssumeRolePolicy \
             for --update-trust), or ask an account admin to run this"
        }
        "InvalidClientTokenId" | "SignatureDoesNotMatch" => {
            "the AWS credentials are not valid: check AWS_PROFILE or your access keys"
        }
        "ExpiredToken" => "the AWS credentials have expired: renew them (e.g. `aws sso login`)",
        "NoSuchEntity" => "IAM has no such policy: check the ARN",
        "MalformedPolicyDocument" => "IAM rejected the policy document",
        _ if matches!(
            err,
            SdkError::DispatchFailure(_) | SdkError::TimeoutError(_)
        ) =>
        {
            "IAM could not be reached: check the network"
        }
        _ => "",
    };
    let detail = if message.is_empty() {
        format!("{}", aws_sdk_iam::error::DisplayErrorContext(&err))
    } else {
        format!("{code}: {message}")
    };
    if hint.is_empty() {
        anyhow::anyhow!("{doing}: {detail}")
    } else {
        anyhow::anyhow!("{doing}: {hint} ({detail})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trust_policy_must_let_ssm_assume_the_role() {
        assert_eq!(trust_gap(&trust_policy()), None);
        // AWS's own example, with confused-deputy conditions and lists.
        let aws = json!({"Version": "2012-10-17", "Statement": [{"Sid": "", "Effect": "Allow",
            "Principal": {"Service": ["ssm.amazonaws.com"]}, "Action": ["sts:AssumeRole"],
            "Condition": {"StringEquals": {"aws:SourceAccount": "123456789012"}}}]});
        assert_eq!(trust_gap(&aws), None);
        let ec2 = json!({"Statement": {"Effect": "Allow",
            "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}});
        assert_eq!(
            trust_gap(&ec2).unwrap(),
            "its trust policy lets ec2.amazonaws.com assume it, not ssm.amazonaws.com"
        );
        let denied = json!({"Statement": [{"Effect": "Deny",
            "Principal": {"Service": "ssm.amazonaws.com"}, "Action": "sts:AssumeRole"}]});
        assert!(trust_gap(&denied).unwrap().contains("lets no AWS service"));
        let tag_only = json!({"Statement": [{"Effect": "Allow",
            "Principal": {"Service": "ssm.amazonaws.com"}, "Action": "sts:TagSession"}]});
        assert!(
            trust_gap(&tag_only)
                .unwrap()
                .contains("does not allow it sts:AssumeRole")
        );
    }
}
