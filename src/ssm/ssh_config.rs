//! `piprov fleet ssh-config`: ssh_config Host entries that reach each managed
//! node over Session Manager (AWS-StartSSHSession), so `ssh pi@door-07` works
//! without an open port or a known address.

use std::collections::BTreeMap;

use super::Node;

pub struct SshOptions<'a> {
    pub user: Option<&'a str>,
    pub profile: Option<&'a str>,
    pub region: Option<&'a str>,
}

/// A name ssh takes as a Host pattern: no spaces, wildcards or quotes.
fn usable(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

pub fn render(nodes: &[Node], options: &SshOptions) -> String {
    let mut proxy = String::from(
        "aws ssm start-session --target %h --document-name AWS-StartSSHSession --parameters portNumber=%p",
    );
    if let Some(profile) = options.profile {
        proxy.push_str(&format!(" --profile {profile}"));
    }
    if let Some(region) = options.region {
        proxy.push_str(&format!(" --region {region}"));
    }
    let mut by_name: BTreeMap<&str, Vec<&Node>> = BTreeMap::new();
    for node in nodes {
        let name = node.hostname().filter(|h| usable(h)).unwrap_or(&node.id);
        by_name.entry(name).or_default().push(node);
    }
    let mut out = format!(
        "# piprov fleet ssh-config: {} managed node(s), reached through Session Manager.\n\
         # Needs the AWS CLI and its Session Manager plugin on this machine.\n",
        nodes.len()
    );
    for (name, nodes) in by_name {
        let shared = nodes.len() > 1;
        if shared {
            out.push_str(&format!(
                "\n# {name} is the name of {} nodes (a cloned card?): see `piprov fleet doctor`\n",
                nodes.len()
            ));
        }
        for node in nodes {
            let host = if shared {
                format!("{name}-{}", node.id)
            } else {
                name.to_string()
            };
            out.push_str(&format!("\nHost {host}\n    HostName {}\n", node.id));
            if let Some(user) = options.user {
                out.push_str(&format!("    User {user}\n"));
            }
            out.push_str(&format!("    ProxyCommand {proxy}\n"));
        }
    }
    out
}
