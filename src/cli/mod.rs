//! Command-line interface: clap types and one function per command.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::broker::device::DevicePolicy;

mod aws;
mod broker;
mod cache;
pub mod docs;

/// Exit codes, shaped like diff(1): 0 all well, 1 "found something", 2 trouble.
pub mod exit {
    pub const OK: u8 = 0;
    /// `inspect` found risky (warning or critical) findings.
    pub const RISKY: u8 = 1;
    /// Any error, including bad usage.
    pub const ERROR: u8 = 2;
}

#[derive(Debug, Parser)]
#[command(
    name = "piprov",
    version,
    about = "Provision Raspberry Pi SD cards for fleets managed by AWS Systems Manager",
    long_about = "Provision Raspberry Pi SD cards for fleets managed by AWS Systems Manager.\n\n\
        Cards cloned from one golden image share its SSM registration, private key, \
        machine-id and SSH host keys. piprov audits such images, stamps them with a \
        first-boot unit that gives every card its own identity, and writes them to cards."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the block devices a card could be, and whether flash would write each
    #[command(
        long_about = "List the block devices a card could be: device, size, bus (usb, mmc, \
        nvme, …), model, serial, removable, read-only, partitions in use, and whether \
        `piprov flash` would write it or refuse it and why (the system disk, a mounted \
        partition, swap, read-only, not removable, larger than 128 GB). The checks are \
        flash's own. Reading sysfs needs no root.",
        after_help = "Examples:\n  piprov devices\n  piprov devices --json | jq '.[] | select(.refused == null) | .path'"
    )]
    Devices {
        /// Print JSON, for scripts
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    #[command(
        after_help = "Examples:\n  piprov completions bash > ~/.local/share/bash-completion/completions/piprov\n  \
        piprov completions zsh > \"${fpath[1]}/_piprov\"\n  piprov completions fish > ~/.config/fish/completions/piprov.fish"
    )]
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (piprov.1, piprov-flash.1, …) into a folder
    #[command(
        long_about = "Write the man pages (piprov.1, piprov-flash.1, …) into a folder, made from \
        the same definitions as --help. The Debian package (`make deb`) installs them, with \
        piprov-card(7), what a stamped card does on its first boot; use this to read them \
        without the package.",
        after_help = "Examples:\n  piprov man ~/.local/share/man/man1 && man piprov-flash"
    )]
    Man {
        /// Folder to write them to (made if missing)
        dir: PathBuf,
    },
    /// Audit an image or card for state that makes clones collide
    #[command(
        long_about = "Audit an image or card for state that makes clones collide.\n\n\
        Reads the partition table, the FAT boot partition and the ext4 root filesystem \
        directly (no root, no mount) and reports the SSM registration, sudo rules, \
        machine-id, SSH host keys, cloud-init seed and piprov stamp it finds.\n\n\
        Exit status: 0 no risky findings, 1 risky (warning or critical) findings, 2 error.",
        after_help = "Examples:\n  piprov inspect golden.img\n  piprov inspect --json /dev/sdb | jq .findings"
    )]
    Inspect {
        /// Image file or block device, or an archive of an image (decoded once
        /// into flash's cache)
        image: PathBuf,
        /// Stop decoding an archive past this size (e.g. 40GiB; default 32 GiB)
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        max_size: Option<u64>,
        /// Print the report as JSON (schema in docs/inspect-json.md)
        #[arg(long)]
        json: bool,
    },
    /// Put the first-boot unit and this card's settings on an image's boot partition
    #[command(
        long_about = "Put the first-boot unit and this card's settings on an image's boot partition.\n\n\
        Writes the device scripts and units, the card's settings and its activation secret \
        (if the recipe's source has one) to the FAT boot partition, and hooks them into the \
        first boot: `systemd.run=` tokens appended to cmdline.txt (Bookworm), or a NoCloud \
        seed with a fresh instance-id (images with cloud-init). On that boot the card gets \
        its own machine-id, SSH host keys, hostname and SSM registration, and sudo is \
        hardened. Stamping again replaces the previous stamp; `piprov unstamp` removes it. \
        Works on image files and cards alike; needs no root and mounts nothing.",
        after_help = "Examples:\n\
            \x20\x20piprov stamp golden.img --recipe image-recipes/site.toml \\\n\
            \x20\x20\x20\x20\x20\x20--hostname pi-door-07\n\
            \x20\x20piprov stamp golden.img --recipe image-recipes/bench.toml \\\n\
            \x20\x20\x20\x20\x20\x20--number 3 --dry-run\n\
            \x20\x20piprov stamp golden.img --recipe r.toml \\\n\
            \x20\x20\x20\x20\x20\x20--set sudo.strip_nopasswd=false --json"
    )]
    Stamp {
        /// Image file or block device
        image: PathBuf,
        /// Recipe (TOML), see image-recipes/
        #[arg(long, short)]
        recipe: PathBuf,
        /// Hostname or pattern for this card ({serial}, {mac}, {number}); overrides the recipe
        #[arg(long)]
        hostname: Option<String>,
        /// This card's number, filled in for {number}
        #[arg(long)]
        number: Option<u32>,
        /// Override a recipe setting, e.g. --set sudo.strip_nopasswd=false (repeatable)
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Show what would change; write nothing
        #[arg(long)]
        dry_run: bool,
        /// Print the outcome as JSON
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        aws: AwsArgs,
    },
    /// Write an image to one card or a bench of cards, each stamped and verified
    #[command(
        long_about = "Write an image to one card or a bench of cards, each stamped and verified.\n\n\
        The image (.img, or .xz .gz .zst .bz2 .zip, recognised by content) is decoded once into \
        a cache. By default only what the filesystems use is written — the FAT metadata and \
        allocated clusters, the ext4 blocks in use, everything outside the partitions — which \
        is safe on a card full of old data; --full writes every byte. With --recipe, each card \
        is stamped as it is written (its own hostname and settings). A .bmap beside the image \
        (or --bmap FILE) is checked as bmaptool checks it and its ranges written too.\n\n\
        Each card's old partition tables are erased and flushed before anything else is \
        written (the first and last MiB, and a GPT's backup wherever its header points); the \
        new table goes on last, after everything else is flushed. A card that fails, or is \
        interrupted, gets its table erased again: it is either right or plainly blank, never \
        a bootable card with half-new data. The written ranges are read back, bypassing the \
        page cache, and compared with the SHA-256 taken while writing.\n\n\
        Refused, with the reason: the system disk, a mounted or busy device, a partition, a \
        read-only or too small card; a non-removable disk without --allow-non-removable; one \
        over 128 GB without --allow-large. Nothing is written until you confirm (or --yes).\n\n\
        Exit status: 0 every card written and verified; 1 at least one card was touched and \
        is not right (it holds no partition table; the others are complete); 2 no card was \
        touched (bad input, a refused target, an image refused before writing).",
        after_help = "Examples:\n\
            \x20\x20piprov flash golden.img.xz /dev/sdb --recipe image-recipes/site.toml \\\n\
            \x20\x20\x20\x20\x20\x20--hostname pi-door-07\n\
            \x20\x20piprov flash golden.img.xz /dev/sdb /dev/sdc /dev/sdd \\\n\
            \x20\x20\x20\x20\x20\x20--recipe bench.toml --hostname 'door-{number}' --yes\n\
            \x20\x20piprov flash golden.img --targets-file bench.csv --recipe bench.toml \\\n\
            \x20\x20\x20\x20\x20\x20--manifest cards.jsonl\n\
            \x20\x20piprov flash golden.img stamped.img --recipe site.toml  # a stamped copy"
    )]
    Flash {
        /// Image: .img, .img.xz, .gz, .zst, .bz2 or .zip
        image: PathBuf,
        /// Target block devices or files
        targets: Vec<PathBuf>,
        /// CSV of targets: device,hostname[,key=value…] per line
        #[arg(long, value_name = "CSV")]
        targets_file: Option<PathBuf>,
        /// Recipe to stamp each card with
        #[arg(long, short)]
        recipe: Option<PathBuf>,
        /// Hostname pattern for every card ({number} = card number from 1, {serial}, {mac})
        #[arg(long)]
        hostname: Option<String>,
        /// Override a recipe setting (repeatable)
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Write every byte of the image, not only the used ranges
        #[arg(long)]
        full: bool,
        /// Skip reading the cards back
        #[arg(long)]
        no_verify: bool,
        /// Expected SHA-256 of the decompressed image (64 hex digits)
        #[arg(long, value_parser = parse_sha256)]
        sha256: Option<String>,
        /// Stop decoding an archive past this size (e.g. 40GiB): by default
        /// the largest target card's size, or 32 GiB when a target is a file
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        max_size: Option<u64>,
        /// Without --recipe, write an image unchanged even when its audit has
        /// critical findings (a baked registration, its key, machine-id, SSH
        /// host keys): every card will be a clone. Recorded in the summary and
        /// the manifest
        #[arg(long, conflicts_with = "recipe")]
        as_is: bool,
        /// bmaptool block map of the image; it must match the image (its own
        /// checksum and every range's), or nothing is written. Without it, a
        /// .bmap beside the image is used when it matches, and ignored with a
        /// warning when it does not
        #[arg(long, value_name = "FILE", conflicts_with_all = ["no_bmap", "full"])]
        bmap: Option<PathBuf>,
        /// Ignore any .bmap beside the image: write what the filesystems use
        #[arg(long)]
        no_bmap: bool,
        /// Append one JSON line per card to this file
        #[arg(long, value_name = "FILE")]
        manifest: Option<PathBuf>,
        /// Do not ask before erasing the targets
        #[arg(long, short)]
        yes: bool,
        /// Allow disks that do not report themselves removable
        #[arg(long)]
        allow_non_removable: bool,
        /// Allow devices over 128 GB
        #[arg(long)]
        allow_large: bool,
        /// No progress bars
        #[arg(long, short)]
        quiet: bool,
        /// JSON lines on stdout: one per card, then the summary
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        aws: AwsArgs,
    },
    /// Prepare the AWS account: the IAM service role hybrid nodes assume
    Setup {
        #[command(subcommand)]
        action: SetupCommand,
        #[command(flatten)]
        aws: AwsArgs,
    },
    /// Create, list and delete SSM hybrid activations
    Activation {
        #[command(subcommand)]
        action: ActivationCommand,
        #[command(flatten)]
        aws: AwsArgs,
    },
    /// Managed nodes: list them, find clones and stale nodes, deregister stale ones
    Fleet {
        #[command(subcommand)]
        action: FleetCommand,
        #[command(flatten)]
        aws: AwsArgs,
    },
    /// Activation broker: cards in the field get a fresh single-use activation over HTTPS
    #[command(
        long_about = "Activation broker: holds the AWS credentials and hands each card that presents \
        an enrollment token a single-use, short-lived activation, so no secret that matters \
        lives on a card. Cards use it when their recipe says source = \"broker\".",
        after_help = "Examples:\n\
            \x20\x20piprov broker init /etc/piprov-broker --name broker.example.net \\\n\
            \x20\x20\x20\x20\x20\x20--region eu-west-1 --iam-role SSMServiceRole\n\
            \x20\x20piprov broker token add --config /etc/piprov-broker/broker.toml \\\n\
            \x20\x20\x20\x20\x20\x20--name site-a --max-uses 50 --expires 30d --token-file site-a.token\n\
            \x20\x20piprov broker serve --config /etc/piprov-broker/broker.toml"
    )]
    Broker {
        #[command(subcommand)]
        action: BrokerCommand,
    },
    /// List or clear the decoded images flash and inspect keep
    #[command(
        long_about = "List or clear the cache of decoded images (~/.cache/piprov, or \
        PIPROV_CACHE_DIR). An archive (.xz, .gz, .zst, .bz2, .zip) is decoded once and kept \
        there, named by the decoded image's SHA-256: the same image from several archives \
        is kept once.",
        after_help = "Examples:\n  piprov cache list\n  piprov cache clear --older-than 30d"
    )]
    Cache(cache::CacheArgs),
    /// Remove a stamp, restoring the boot partition as it was before
    Unstamp {
        /// Image file or block device
        image: PathBuf,
        /// Show what would change; write nothing
        #[arg(long)]
        dry_run: bool,
        /// Print the outcome as JSON
        #[arg(long)]
        json: bool,
    },
}

/// Where AWS calls go: the standard credential chain, with these overrides.
#[derive(Debug, clap::Args)]
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
    pub fn connection(self) -> crate::ssm::Connection {
        crate::ssm::set_verbose(self.verbose);
        crate::ssm::Connection {
            profile: self.profile,
            region: self.region,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum BrokerCommand {
    /// Create a broker: CA, server certificate, config and database in DIR
    Init {
        /// A new or empty directory
        dir: PathBuf,
        /// DNS name or IP address the cards reach the broker by (repeatable)
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        /// Address to listen on
        #[arg(long, default_value = "0.0.0.0:8443")]
        listen: std::net::SocketAddr,
        /// AWS region the broker creates activations in, e.g. eu-west-1
        #[arg(long)]
        region: String,
        /// IAM service role the registered nodes assume
        #[arg(long)]
        iam_role: String,
        /// Where the broker keeps its records: `sqlite` (a file in DIR, for one
        /// broker) or a PostgreSQL URL, postgres://USER@HOST/DATABASE, for any
        /// number of brokers (the password from PGPASSWORD or, later,
        /// database_password_file in broker.toml; never printed)
        #[arg(long, value_name = "sqlite|URL", value_parser = parse_database)]
        database: Option<String>,
        /// With `?sslmode=require` in the URL: the CA (PEM) the server's
        /// certificate must chain to, e.g. RDS's global-bundle.pem (default: the
        /// system's roots). Without sslmode=require the connection is plain TCP.
        #[arg(long, value_name = "FILE", requires = "database")]
        database_ca_file: Option<PathBuf>,
    },
    /// Enrollment tokens: add (shown once), list, revoke
    Token {
        #[command(subcommand)]
        action: TokenCommand,
    },
    /// Device keys of known Pis (for tokens with --device-policy known or tofu)
    Device {
        #[command(subcommand)]
        action: DeviceCommand,
    },
    /// Serve the card API over HTTPS until SIGTERM or Ctrl-C
    Serve {
        /// The broker's config file (broker.toml, made by `piprov broker init`)
        #[arg(long)]
        config: PathBuf,
        /// Write the address actually listened on to this file once ready
        #[arg(long, value_name = "FILE")]
        ready_file: Option<PathBuf>,
        /// Listen here instead of the config's address (several brokers from one
        /// config on one host, each on its own port)
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
        /// The log on stderr: one line per request with its id, as text or JSON lines
        #[arg(long, value_enum, default_value = "text")]
        log_format: crate::broker::request_log::LogFormat,
    },
}

/// `sqlite` is the default file; anything else must be a PostgreSQL URL.
fn parse_database(text: &str) -> Result<String, String> {
    if text == "sqlite" || crate::broker::store::is_postgres_url(text) {
        return Ok(text.to_string());
    }
    Err("`sqlite`, or a URL postgres://USER@HOST[:PORT]/DATABASE".into())
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a token; it is printed (or written to --token-file) this once
    Add {
        /// The broker's config file (broker.toml, made by `piprov broker init`)
        #[arg(long)]
        config: PathBuf,
        /// The token's name (letters, digits, - and _), as `token list` shows it
        #[arg(long)]
        name: String,
        /// How many activations it may obtain (required, or --unlimited)
        #[arg(long, required_unless_present = "unlimited")]
        max_uses: Option<u32>,
        /// Lifetime, e.g. 30d (required, or --unlimited)
        #[arg(long, value_parser = humantime::parse_duration, required_unless_present = "unlimited")]
        expires: Option<std::time::Duration>,
        /// Let the limit left out (--max-uses or --expires, or both) be
        /// unlimited: a token anyone who copies it can use for ever, if both
        #[arg(long)]
        unlimited: bool,
        /// Only these Pi serials (one per line) may enrol with it
        #[arg(long, value_name = "FILE")]
        serials: Option<PathBuf>,
        /// Write the token to this new file (mode 0600) instead of printing it
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// What a card must prove with its Pi's device key (rpi-fw-crypto) to enrol
        #[arg(long, value_enum, default_value_t = DevicePolicy::Off)]
        device_policy: DevicePolicy,
    },
    /// List the tokens: name, uses, expiry, revoked, devices (never a token itself)
    List {
        /// The broker's config file (broker.toml, made by `piprov broker init`)
        #[arg(long)]
        config: PathBuf,
        /// Print JSON, for scripts
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token: cards that present it get no activation from then on
    Revoke {
        /// The broker's config file (broker.toml, made by `piprov broker init`)
        #[arg(long)]
        config: PathBuf,
        /// The token's name
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Import Pis' public keys from a CSV of `serial,public_key`
    #[command(
        long_about = "Import the public keys of Pis that may enrol under a token with \
        --device-policy known. FILE is CSV, one Pi per line: its serial and the public key \
        of its OTP device key (key 1) as hex or base64 of the DER SubjectPublicKeyInfo, as \
        `rpi-fw-crypto pubkey --key-id 1 --outform hex` prints it on that Pi. A header line \
        `serial,public_key` and `#` comments are allowed. All lines are imported or none: a \
        serial already recorded with another key stops the import unless --replace. \
        Importing a revoked serial admits it again.",
        after_help = "Examples:\n  piprov broker device import --config broker.toml pis.csv"
    )]
    Import {
        /// The broker's config file (broker.toml, made by `piprov broker init`)
        #[arg(long)]
        config: PathBuf,
        /// CSV of serial,public_key
        file: PathBuf,
        /// Replace the recorded key of a serial that has another one (a board swapped)
        #[arg(long)]
        replace: bool,
    },
    /// Recorded devices: serial, key fingerprint, imported or first use, last seen
    /// List the tokens: name, uses, expiry, revoked, devices (never a token itself)
    List {
        /// The broker's config file (broker.toml, made by `piprov broker init`)
        #[arg(long)]
        config: PathBuf,
        /// Print JSON, for scripts
        #[arg(long)]
        json: bool,
    },
    /// Refuse a Pi from now on, under every device policy but off
    /// Revoke a token: cards that present it get no activation from then on
    Revoke {
        /// The broker's config file (broker.toml, made by `piprov broker init`)
        #[arg(long)]
        config: PathBuf,
        /// The Pi's serial
        serial: String,
    },
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

/// Whether the command given asked for `--json` (an error then goes to
/// stdout as JSON too).
pub fn json_requested(matches: &clap::ArgMatches) -> bool {
    let mut deepest = matches;
    while let Some((_, sub)) = deepest.subcommand() {
        deepest = sub;
    }
    matches!(deepest.try_get_one::<bool>("json"), Ok(Some(true)))
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Inspect {
            image,
            json,
            max_size,
        } => inspect(&image, max_size, json),
        Command::Completions { shell } => {
            docs::completions(shell);
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir } => {
            let written = docs::man_pages(&dir)?;
            eprintln!("{written} man pages in {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Devices { json } => {
            let devices = crate::flash::devices::list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&devices)?);
            } else {
                print!("{}", crate::flash::devices::render(&devices));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Activation { action, aws } => aws::activation(action, aws),
        Command::Fleet { action, aws } => aws::fleet(action, aws),
        Command::Setup { action, aws } => aws::setup(action, aws),
        Command::Broker { action } => broker::run(action),
        Command::Cache(args) => cache::run(args),
        Command::Flash {
            image,
            targets,
            targets_file,
            recipe,
            hostname,
            overrides,
            full,
            no_verify,
            sha256,
            max_size,
            as_is,
            bmap,
            no_bmap,
            manifest,
            yes,
            allow_non_removable,
            allow_large,
            quiet,
            json,
            aws,
        } => {
            let mut cards: Vec<crate::flash::CardSpec> = targets
                .into_iter()
                .map(|device| crate::flash::CardSpec {
                    device,
                    hostname: None,
                    overrides: Vec::new(),
                })
                .collect();
            if let Some(file) = targets_file {
                cards.extend(crate::flash::read_targets(&file)?);
            }
            if cards.is_empty() {
                anyhow::bail!(
                    "no targets: name devices or files after the image, or give --targets-file"
                );
            }
            let config = crate::flash::FlashConfig {
                image,
                cards,
                recipe,
                overrides,
                hostname,
                full,
                verify: !no_verify,
                yes,
                allow_non_removable,
                allow_large,
                sha256,
                max_size,
                as_is,
                manifest,
                bmap: match (bmap, no_bmap) {
                    (Some(file), _) => crate::flash::BmapChoice::File(file),
                    (None, true) => crate::flash::BmapChoice::Ignore,
                    (None, false) => crate::flash::BmapChoice::Beside,
                },
                aws: aws.connection(),
            };
            let mode = if json {
                crate::progress::Mode::JsonLines
            } else if quiet {
                crate::progress::Mode::Quiet
            } else {
                crate::progress::Mode::Bars
            };
            let progress = crate::progress::Progress::new(mode);
            let summary = crate::flash::flash(&config, &progress)?;
            print_flash_summary(&summary, json)
        }
        Command::Stamp {
            image,
            recipe,
            hostname,
            number,
            overrides,
            dry_run,
            json,
            aws,
        } => {
            let recipe = crate::recipe::load(&recipe, &overrides)?;
            let config = crate::stamp::StampConfig {
                image,
                recipe,
                hostname,
                number,
                dry_run,
                aws: aws.connection(),
            };
            print_outcome(&crate::stamp::stamp(&config)?, json)
        }
        Command::Unstamp {
            image,
            dry_run,
            json,
        } => print_outcome(&crate::stamp::unstamp(&image, dry_run)?, json),
    }
}

/// `--max-size`: bytes, or a size with a unit (`40GiB`, `32 GB`).
fn parse_size(text: &str) -> std::result::Result<u64, String> {
    match text.trim().parse::<bytesize::ByteSize>() {
        Ok(size) if size.as_u64() > 0 => Ok(size.as_u64()),
        _ => Err(format!(
            "{text:?} is not a size: give bytes or a number with a unit, e.g. 40GiB"
        )),
    }
}

/// `--sha256`: 64 hex digits, either case, taken in lower case.
fn parse_sha256(text: &str) -> std::result::Result<String, String> {
    if text.len() == 64 && text.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(text.to_ascii_lowercase())
    } else {
        Err(format!(
            "{text:?} is not a SHA-256: 64 hexadecimal digits, as sha256sum prints them"
        ))
    }
}

fn print_flash_summary(summary: &crate::flash::Summary, json: bool) -> Result<ExitCode> {
    let mut stdout = std::io::stdout().lock();
    if json {
        let line = serde_json::json!({
            "event": "summary",
            "image_sha256": summary.image_sha256,
            "image_bytes": summary.image_bytes,
            "mapped_bytes": summary.mapped_bytes,
            "decoded_while_writing": summary.decoded_while_writing,
            "as_is": summary.as_is,
            "ok": summary.cards.iter().filter(|c| c.result == "ok").count(),
            "failed": summary.cards.iter().filter(|c| c.result != "ok").count(),
        });
        writeln!(stdout, "{line}")?;
    } else {
        for card in &summary.cards {
            match &card.error {
                None => writeln!(
                    stdout,
                    "{}: ok, {} in {:.1} s{}{}",
                    card.device,
                    crate::units::size(card.bytes_written),
                    card.seconds,
                    if card.verified {
                        ", verified"
                    } else {
                        ", not verified"
                    },
                    card.hostname
                        .as_ref()
                        .map(|h| format!(", hostname {h}"))
                        .unwrap_or_default()
                )?,
                Some(error) => writeln!(
                    stdout,
                    "{}: {}: {error}",
                    card.device,
                    card.result.to_uppercase()
                )?,
            }
        }
    }
    if summary.as_is && !json {
        writeln!(
            stdout,
            "written as is (--as-is): the image's critical findings are on every card"
        )?;
    }
    let failed = summary.cards.iter().any(|c| c.result != "ok");
    Ok(ExitCode::from(if failed { exit::RISKY } else { exit::OK }))
}

fn print_outcome(outcome: &crate::stamp::Outcome, json: bool) -> Result<ExitCode> {
    let mut stdout = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut stdout, outcome).map_err(std::io::Error::from)?;
        writeln!(stdout)?;
        return Ok(ExitCode::SUCCESS);
    }
    let verb = match (&outcome.record, outcome.dry_run) {
        (Some(_), false) => "stamped",
        (Some(_), true) => "would stamp",
        (None, false) => "unstamped",
        (None, true) => "would unstamp",
    };
    write!(stdout, "{verb} {}", outcome.image)?;
    if let Some(r) = &outcome.record {
        write!(
            stdout,
            ": hook {}, activation {}{}, hostname {}",
            serde_json::to_value(r.hook)?.as_str().unwrap_or_default(),
            crate::recipe::source_name(r.activation.source),
            r.activation
                .id
                .as_ref()
                .map(|id| format!(" ({id})"))
                .unwrap_or_default(),
            r.hostname.as_deref().unwrap_or("unchanged")
        )?;
    }
    writeln!(stdout)?;
    if outcome.changes.is_empty() {
        writeln!(stdout, "  nothing to change")?;
    }
    for change in &outcome.changes {
        let detail = match (change.action, change.secret) {
            ("remove", _) => String::new(),
            (_, true) => format!("{} bytes, secret (not shown)", change.bytes),
            _ => format!("{} bytes", change.bytes),
        };
        writeln!(
            stdout,
            "  {:<7} {:<26} {detail}",
            change.action, change.file
        )?;
    }
    if let Some(r) = outcome
        .record
        .as_ref()
        .filter(|r| !r.cmdline_tokens.is_empty())
    {
        writeln!(
            stdout,
            "  cmdline.txt gains: {}",
            r.cmdline_tokens.join(" ")
        )?;
    }
    match (&outcome.record, outcome.byte_exact) {
        (None, Some(true)) => writeln!(
            stdout,
            "  the boot partition is byte for byte as before the stamp"
        )?,
        (Some(_), Some(false)) => writeln!(
            stdout,
            "  unstamp will restore the files, not every byte: {}",
            outcome.not_exact_because.as_deref().unwrap_or_default()
        )?,
        (None, Some(false)) => writeln!(
            stdout,
            "  files restored, not every byte: {}",
            outcome.not_exact_because.as_deref().unwrap_or_default()
        )?,
        _ => {}
    }
    Ok(ExitCode::SUCCESS)
}

fn inspect(image: &std::path::Path, max_size: Option<u64>, json: bool) -> Result<ExitCode> {
    use crate::flash::source::DecodeLimit;
    let limit = max_size.map_or(DecodeLimit::DEFAULT, |bytes| DecodeLimit {
        bytes,
        why: "the --max-size",
    });
    let report = crate::inspect::inspect(image, limit)?;
    let mut stdout = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut stdout, &report).map_err(std::io::Error::from)?;
        writeln!(stdout)?;
    } else {
        write!(stdout, "{}", crate::inspect::render_text(&report))?;
    }
    Ok(ExitCode::from(if report.is_risky() {
        exit::RISKY
    } else {
        exit::OK
    }))
}
