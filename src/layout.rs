//! Where things live on a Raspberry Pi card: the facts the host side and the
//! device side agree on. One source, `firstboot/contract.sh`, which the card's
//! scripts read too; build.rs compiles it into `contract` below. Sources of the
//! facts: docs/architecture.md.

/// The card contract as written in firstboot/contract.sh.
pub mod contract {
    include!(concat!(env!("OUT_DIR"), "/contract.rs"));
}

/// amazon-ssm-agent's files (agent/appconfig/constants_unix.go, fsvault.go).
pub mod agent {
    use super::contract as c;

    pub const PACKAGE: &str = "amazon-ssm-agent";
    pub const BINARY: &str = c::AGENT_BINARY;
    pub const DATA_ROOT: &str = c::AGENT_DATA_DIR;
    /// `{"ManagedInstanceID":"mi-…","Region":"…"}`; `-register -clear` leaves it behind.
    pub const REGISTRATION: &str = c::AGENT_REGISTRATION;
    pub const MANIFEST: &str = c::AGENT_MANIFEST;
    /// JSON with the instance id and its RSA private key.
    pub const REGISTRATION_KEY: &str = c::AGENT_KEY;
    pub const FINGERPRINT: &str = c::AGENT_FINGERPRINT;
    pub const IDENTITY_CONFIG: &str = c::AGENT_IDENTITY_CONFIG;
    /// Every file that makes a card one particular managed instance.
    pub const IDENTITY_FILES: [&str; 5] = [
        REGISTRATION,
        MANIFEST,
        REGISTRATION_KEY,
        FINGERPRINT,
        IDENTITY_CONFIG,
    ];
    /// The agent shares its temporary role credentials here (Profile.ShareCreds).
    pub const SHARED_CREDENTIALS: &str = c::AGENT_SHARED_CREDENTIALS;
    /// Written with `ssm-user ALL=(ALL) NOPASSWD:ALL` only when absent.
    pub const SUDOERS_SSM_USER: &str = c::AGENT_SUDOERS;
}

/// Files on the FAT boot partition.
pub mod boot {
    use super::contract as c;

    pub const CMDLINE: &str = "cmdline.txt";
    pub const CONFIG: &str = "config.txt";
    /// The stamp record: settings for this card, no secrets.
    pub const STAMP: &str = c::BOOT_STAMP;
    /// Written by the card after its first boot so `piprov inspect` can read the outcome.
    pub const STATUS: &str = c::BOOT_STATUS;
    /// Device settings, `KEY=value` lines (no secrets); firstboot/lib.sh reads them.
    pub const CONF: &str = c::BOOT_CONF;
    /// The activation code or enrollment token; moved off the FAT partition on first boot.
    pub const SECRET: &str = c::BOOT_SECRET;
    /// The broker's CA certificate, pinned by the card.
    pub const BROKER_CA: &str = c::BOOT_CA;
}

/// What no two cards may share besides the SSM identity, the machine-id and
/// the SSH host keys: the guard deletes these, inspect reports them. Globs with
/// `*` inside one path component.
pub const CLONE_STATE: &[&str] = contract::CLONE_STATE;
