//! The IAM policy an operator needs to open Session Manager sessions on the
//! fleet's nodes and nothing more: `ssm:StartSession` on managed (hybrid)
//! instances that carry the fleet's tags, through the session documents named,
//! and only on the caller's own sessions afterwards. Built as JSON, never sent:
//! the operator's admin attaches it (AWS's "sample policies for Session
//! Manager" are the model).

use serde_json::{Value, json};

use super::fleet::TAG_VERSION;

/// A Session Manager document an operator may start sessions with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SessionDocument {
    /// `ssh` through the SSM proxy (`fleet ssh-config`).
    Ssh,
    /// Forwarding a port of the node.
    PortForwarding,
    /// An interactive shell (`aws ssm start-session`).
    Shell,
}

impl SessionDocument {
    /// The document's name, and whether AWS owns it (its ARN then names no
    /// account) or the account does (Session Manager's preferences document).
    fn document(self) -> (&'static str, bool) {
        match self {
            SessionDocument::Ssh => ("AWS-StartSSHSession", true),
            SessionDocument::PortForwarding => ("AWS-StartPortForwardingSession", true),
            SessionDocument::Shell => ("SSM-SessionManagerRunShell", false),
        }
    }
}

/// The policy for operators of the nodes carrying every tag in `tags`; with
/// no tags, of every node piprov created an activation for (they carry
/// `piprov:version`).
pub fn operator_policy(tags: &[(String, String)], documents: &[SessionDocument]) -> Value {
    let node_condition = if tags.is_empty() {
        json!({ "Null": { format!("ssm:resourceTag/{TAG_VERSION}"): "false" } })
    } else {
        let equals: serde_json::Map<String, Value> = tags
            .iter()
            .map(|(key, value)| (format!("ssm:resourceTag/{key}"), json!([value])))
            .collect();
        json!({ "StringEquals": equals })
    };
    let mut nodes_condition = node_condition;
    // The caller must also be allowed the document the session names.
    nodes_condition["BoolIfExists"] = json!({ "ssm:SessionDocumentAccessCheck": "true" });
    let mut chosen: Vec<SessionDocument> = Vec::new();
    for &d in documents {
        if !chosen.contains(&d) {
            chosen.push(d);
        }
    }
    let document_arns: Vec<String> = chosen
        .iter()
        .map(|d| match d.document() {
            (name, true) => format!("arn:aws:ssm:*::document/{name}"),
            (name, false) => format!("arn:aws:ssm:*:*:document/{name}"),
        })
        .collect();
    json!({
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "StartSessionsOnTheFleet",
                "Effect": "Allow",
                "Action": "ssm:StartSession",
                "Resource": "arn:aws:ssm:*:*:managed-instance/*",
                "Condition": nodes_condition,
            },
            {
                "Sid": "ThroughTheseDocuments",
                "Effect": "Allow",
                "Action": "ssm:StartSession",
                "Resource": document_arns,
            },
            {
                "Sid": "OwnSessionsOnly",
                "Effect": "Allow",
                "Action": ["ssm:TerminateSession", "ssm:ResumeSession"],
                "Resource": "arn:aws:ssm:*:*:session/${aws:username}-*",
            },
            {
                "Sid": "WhatSessionManagerReads",
                "Effect": "Allow",
                "Action": [
                    "ssm:DescribeSessions",
                    "ssm:GetConnectionStatus",
                    "ssm:DescribeInstanceInformation",
                    "ssm:DescribeInstanceProperties",
                    "ec2:DescribeInstances",
                ],
                "Resource": "*",
            },
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statement<'a>(policy: &'a Value, sid: &str) -> &'a Value {
        policy["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["Sid"] == sid)
            .unwrap()
    }

    #[test]
    fn only_the_tagged_nodes_and_the_chosen_documents() {
        let tags = [("fleet".to_string(), "doors".to_string())];
        let policy = operator_policy(&tags, &[SessionDocument::Ssh, SessionDocument::Ssh]);
        let nodes = statement(&policy, "StartSessionsOnTheFleet");
        assert_eq!(
            nodes["Condition"]["StringEquals"],
            json!({"ssm:resourceTag/fleet": ["doors"]})
        );
        assert_eq!(
            nodes["Condition"]["BoolIfExists"]["ssm:SessionDocumentAccessCheck"],
            "true"
        );
        assert_eq!(
            statement(&policy, "ThroughTheseDocuments")["Resource"],
            json!(["arn:aws:ssm:*::document/AWS-StartSSHSession"])
        );
        let untagged = operator_policy(&[], &[SessionDocument::Shell]);
        assert_eq!(
            statement(&untagged, "StartSessionsOnTheFleet")["Condition"]["Null"],
            json!({"ssm:resourceTag/piprov:version": "false"})
        );
    }
}
