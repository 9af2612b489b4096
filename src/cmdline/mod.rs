//! The command line's types: what each command takes, as clap parses it. A
//! command's config is validated here (value parsers, `validated`) and then
//! handed whole to the function that does the work (`flash::flash`,
//! `stamp::stamp`, …); `cli` dispatches and prints.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub mod aws;
#[cfg(feature = "broker")]
pub mod broker;
pub mod cache;
pub mod images;
#[cfg(feature = "station")]
pub mod station;

pub use aws::*;
#[cfg(feature = "broker")]
pub use broker::*;
pub use images::*;
#[cfg(feature = "station")]
pub use station::*;

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
    Inspect(InspectConfig),
    /// Capture a set-up Pi's card as a small golden archive, reading only what is used
    #[command(
        long_about = "Capture a set-up Pi's card as a small golden archive, reading only what \
        is used.\n\n\
        Reads what the card's filesystems use (FAT clusters, ext4 blocks in use, everything \
        outside the partitions) and writes holes for the rest, so old deleted data on the card \
        never reaches the archive. The last partition's ext4 is checked (e2fsck -f) and shrunk \
        to its used size plus a margin (resize2fs, on a temporary copy: no root, no mount), its \
        end moved in the partition table (MBR or GPT) and the image cut there; a card flashed \
        from it grows back on its first boot. SRC is opened read-only and refused while \
        mounted. OUT's name picks the format: .img.xz (on every core, begun while the card is read), \
        .img.zst, .img.gz or \
        .img (sparse); NAME.img.bmap (bmaptool's format, with checksums) and OUT.sha256 are \
        written beside it. Everything goes to temporary names first: a capture that fails or \
        is interrupted leaves no OUT. At the end, the captured image's audit (as inspect).\n\n\
        Exit status: 0 captured, no risky findings; 1 captured, with risky findings (flash it \
        with --recipe); 2 error, nothing written.",
        after_help = "Examples:\n\
            \x20\x20piprov capture /dev/sdb golden.img.xz\n\
            \x20\x20piprov capture /dev/sdb golden.img.zst --no-shrink\n\
            \x20\x20piprov capture pi.img golden.img --json | jq .summary"
    )]
    Capture(CaptureConfig),
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
    Stamp(StampConfig),
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
    Flash(FlashConfig),
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
    #[cfg(feature = "broker")]
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
    /// A bench: write every card put into a reader, each with its own identity
    #[command(
        long_about = "A bench: write every card put into a reader, each with its own identity.\n\n\
        Decodes IMAGE once, then watches the kernel's device events: a disk that appears, or \
        whose card is pushed in, is a candidate. It passes flash's checks (system disk, mounted, \
        read-only, too small, not removable) and --match, or is left alone with the reason. Each \
        accepted card gets the next number, its hostname, its own activation, and is written, \
        stamped and verified on its own: a slow or failing card holds no one back. A card this \
        run wrote already is not written again. Ctrl-C: no new card starts, cards being written \
        finish; Ctrl-C again stops them, erased to no partition table. Every card is a row in \
        the record (`piprov station record`). Needs root (the kernel's uevents, the devices).",
        after_help = "Examples:\n\
            \x20\x20piprov station golden.img.xz --recipe bench.toml \\\n\
            \x20\x20\x20\x20\x20\x20--hostname 'door-{number}' --listen 127.0.0.1:8080\n\
            \x20\x20piprov station record --csv > cards.csv"
    )]
    #[cfg(feature = "station")]
    Station(station::StationConfig),
    /// Remove a stamp, restoring the boot partition as it was before
    Unstamp(UnstampConfig),
}
