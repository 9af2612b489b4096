//! The AWS commands' arguments: where calls go, and `setup`, `fleet`,
//! `activation`.

use std::path::PathBuf;

use clap::Subcommand;

/// Where AWS calls go: the standard credential chain, with these overrides.
#[derive(Debug, Clone, clap::Args)]
pub struct AwsArgs {
    /// AWS profile (default: AWS_PROFILE or the default profile)
    #[arg(long, global = true)]
    pub profile: Option<String>,
    /// AWS region, e.g. eu-west-1 (default: the recipe's, then AWS_REGION or the profile's)
    #[arg(long, global = true)]
    pub region: Option<String>,
    /// Say more when an AWS call fails (the AWS SDK's own error chain)
    #[arg(short, long, global = true)]
    pub verbose: bool,
}

impl AwsArgs {
    pub fn connection(&self) -> crate::ssm::Connection {
        crate::ssm::set_verbose(self.verbose);
        crate::ssm::Connection {
            profile: self.profile.clone(),
            region: self.region.clone(),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum SetupCommand {
    /// Create the IAM service role the Pis assume (shows the plan unless --apply)
    #[command(
        long_about = "The IAM service role every hybrid activation names: trusted by \
        ssm.amazonaws.com for sts:AssumeRole, with AmazonSSMManagedInstanceCore attached (and \
        each --policy, e.g. CloudWatchAgentServerPolicy or your own S3 policy). Without --apply \
        it shows what it would create or attach and changes nothing. A role that is already \
        right is left as it is. A role whose trust policy does not let SSM assume it is \
        reported, with what it trusts instead, and changed only with --update-trust.\n\n\
        Exit status: 0 done (or nothing to do), 1 something is held back or would change \
        (without --apply), 2 error.",
        after_help = "Examples:\n\
            \x20\x20piprov setup role\n\
            \x20\x20piprov setup role --apply\n\
            \x20\x20piprov setup role --name PiFleetRole --apply \\\n\
            \x20\x20\x20\x20\x20\x20--policy arn:aws:iam::aws:policy/CloudWatchAgentServerPolicy\n\
            \x20\x20piprov setup role --update-trust --apply"
    )]
    Role {
        /// The role's name (the recipe's iam_role)
        #[arg(long, default_value = crate::account::role::DEFAULT_ROLE)]
        name: String,
        /// A further policy ARN to attach (repeatable)
        #[arg(long = "policy", value_name = "ARN")]
        policies: Vec<String>,
        /// Replace a trust policy that does not let ssm.amazonaws.com assume the role
        #[arg(long)]
        update_trust: bool,
        /// Make the changes (without it: only show them)
        #[arg(long)]
        apply: bool,
        /// Print JSON, for scripts
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Managed nodes: ping status, agent version, computer name, IP, registration, piprov tags
    #[command(
        after_help = "Examples:\n  piprov fleet list\n  piprov fleet list --tag site=a --json"
    )]
    List {
        /// Only nodes with this tag (repeatable; all must match)
        #[arg(long = "tag", value_name = "KEY=VALUE")]
        tags: Vec<String>,
        /// Print JSON, for scripts
        #[arg(long)]
        json: bool,
    },
    /// Find nodes sharing a Pi serial or hostname, stale nodes, dead activations
    #[command(
        long_about = "Find what needs attention in the fleet: several nodes claiming one Pi serial \
        (piprov:serial tag) or one hostname (a cloned card, or a Pi that re-registered and left \
        its old node behind), nodes offline longer than --offline-days, and activations that \
        have expired or have no registrations left; and the account's instance tier: on the \
        standard tier Session Manager cannot reach hybrid nodes, and at most 1,000 of them may \
        register (GetServiceSetting /ssm/managed-instance/activation-tier).\n\n\
        Exit status: 0 nothing found, 1 problems found, 2 error.",
        after_help = "Examples:\n  piprov fleet doctor\n  piprov fleet doctor --offline-days 7 --json"
    )]
    Doctor {
        /// Flag nodes silent for at least this many days
        #[arg(long, default_value_t = 14)]
        offline_days: u64,
        /// Only nodes with this tag (repeatable)
        #[arg(long = "tag", value_name = "KEY=VALUE")]
        tags: Vec<String>,
        /// Print JSON, for scripts
        #[arg(long)]
        json: bool,
    },
    /// Did every card made come up, as itself? Each card joined with its node
    #[command(
        long_about = "Join each card a bench made (a `piprov station` record, or a manifest \
        from `piprov flash --manifest`) with the managed node registered with its activation: \
        the node's mi- id, when it registered, its ping status and agent version. Flags cards \
        that never registered (their activation expired, or is still unused), hostnames or Pi \
        serials of the record's cards claimed by more than one node, several nodes on one \
        card's activation, and nodes registered with an activation made for the same image \
        that no card in the record holds.\n\n\
        Exit status: 0 every card came up as itself, 1 something is flagged, 2 error.",
        after_help = "Examples:\n  piprov fleet reconcile --record station.db\n  \
        piprov fleet reconcile --manifest cards.jsonl --json"
    )]
    Reconcile {
        /// A station record (SQLite), as `piprov station --record` writes it
        #[arg(long, value_name = "DB", required_unless_present = "manifest")]
        record: Option<PathBuf>,
        /// A flash manifest (JSON lines), as `piprov flash --manifest` writes it
        #[arg(long, value_name = "FILE", conflicts_with = "record")]
        manifest: Option<PathBuf>,
        /// Print JSON, for scripts
        #[arg(long)]
        json: bool,
    },
    /// Print ssh_config Host entries that reach each node over Session Manager
    #[command(
        long_about = "Print ssh_config Host entries, one per managed node, named after its \
        hostname, with HostName set to its mi- id and a ProxyCommand that opens an \
        AWS-StartSSHSession through Session Manager (with --profile and --region when \
        given). Append them to ~/.ssh/config and `ssh pi@door-07` works without an open \
        port. Nodes that share a hostname (a cloned card) get the mi- id in their name. \
        Needs the AWS CLI and its Session Manager plugin where ssh runs.",
        after_help = "Examples:\n  piprov fleet ssh-config --user pi >> ~/.ssh/config\n  \
        piprov fleet ssh-config --tag site=a --profile fleet --region eu-west-1"
    )]
    SshConfig {
        /// Only nodes with this tag (repeatable)
        #[arg(long = "tag", value_name = "KEY=VALUE")]
        tags: Vec<String>,
        /// The login user for every entry (default: ssh's own)
        #[arg(long)]
        user: Option<String>,
    },
    /// Print a least-privilege IAM policy for operators: sessions on the fleet's nodes, nothing more
    #[command(
        long_about = "Print an IAM policy (JSON) for the people who operate the fleet: \
        ssm:StartSession on managed (hybrid) nodes that carry every --tag given (a resource-tag \
        condition, not a list of node ids, so new cards are covered), only through the session \
        documents chosen (with ssm:SessionDocumentAccessCheck), TerminateSession and \
        ResumeSession on the caller's own sessions (${aws:username}-*), and the read-only calls \
        Session Manager makes. Without --tag: every node piprov created an activation for (they \
        carry piprov:version). Nothing is sent to AWS: attach the policy to the operators' group \
        or role.",
        after_help = "Examples:\n\
            \x20\x20piprov fleet access-policy --tag site=a > operators.json\n\
            \x20\x20piprov fleet access-policy --documents ssh,port-forwarding\n\
            \x20\x20aws iam create-policy --policy-name PiFleetOperators \\\n\
            \x20\x20\x20\x20\x20\x20--policy-document file://operators.json"
    )]
    AccessPolicy {
        /// Only nodes with this tag (repeatable; all must match)
        #[arg(long = "tag", value_name = "KEY=VALUE")]
        tags: Vec<String>,
        /// The session documents operators may use
        #[arg(long, value_delimiter = ',', default_value = "ssh,shell")]
        documents: Vec<crate::ssm::SessionDocument>,
    },
    /// Deregister nodes offline for a long time (dry run unless --apply)
    #[command(
        long_about = "Deregister managed nodes that have been offline for at least --offline-for. \
        Lists them and changes nothing unless --apply is given. A node that is online is never \
        touched.",
        after_help = "Examples:\n  piprov fleet prune --offline-for 30d\n  piprov fleet prune --offline-for 30d --tag site=a --apply"
    )]
    Prune {
        /// How long a node must have been silent, e.g. 30d
        #[arg(long, value_parser = humantime::parse_duration)]
        offline_for: std::time::Duration,
        /// Only nodes with this tag (repeatable)
        #[arg(long = "tag", value_name = "KEY=VALUE")]
        tags: Vec<String>,
        /// Deregister them (without it: only list them)
        #[arg(long)]
        apply: bool,
        /// Print JSON, for scripts
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ActivationCommand {
    /// Create an activation; its code is shown by SSM only once
    #[command(after_help = "Examples:\n\
            \x20\x20piprov activation create --role SSMServiceRole --limit 10 --expires 7d \\\n\
            \x20\x20\x20\x20\x20\x20--code-file site.code\n\
            \x20\x20piprov activation create --role SSMServiceRole --tag site=a \\\n\
            \x20\x20\x20\x20\x20\x20--show-code --json")]
    Create {
        /// IAM service role the registered nodes assume
        #[arg(long)]
        role: String,
        /// How many machines may register with it (1-1000)
        #[arg(long, default_value_t = 1)]
        limit: u32,
        /// Lifetime, e.g. 24h, 7d (at most 30 days)
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        expires: std::time::Duration,
        /// Default instance name shown in Fleet Manager
        #[arg(long)]
        name: Option<String>,
        /// Free text kept with the activation (what it is for)
        #[arg(long)]
        description: Option<String>,
        /// Tag as key=value (repeatable)
        #[arg(long = "tag", value_name = "KEY=VALUE")]
        tags: Vec<String>,
        /// Write the activation code to this new file (mode 0600)
        #[arg(long, value_name = "FILE", conflicts_with = "show_code")]
        code_file: Option<PathBuf>,
        /// Print the activation code
        #[arg(long)]
        show_code: bool,
        /// Print JSON, for scripts
        #[arg(long)]
        json: bool,
    },
    /// List activations: id, limit, registrations, expiry, tags
    List {
        /// Print JSON, for scripts
        #[arg(long)]
        json: bool,
    },
    /// Delete activations (nodes already registered stay registered)
    Delete {
        /// Activation ids, as `activation list` shows them
        #[arg(required = true)]
        ids: Vec<String>,
    },
}
