//! Where things live on a Raspberry Pi card: the facts the host side and the
//! device side agree on. Sources: DESIGN.md sections 2 and 3.

/// amazon-ssm-agent's files (agent/appconfig/constants_unix.go, fsvault.go).
pub mod agent {
    pub const PACKAGE: &str = "amazon-ssm-agent";
    pub const BINARY: &str = "/usr/bin/amazon-ssm-agent";
    pub const DATA_ROOT: &str = "/var/lib/amazon/ssm";
    /// `{"ManagedInstanceID":"mi-…","Region":"…"}`; `-register -clear` leaves it behind.
    pub const REGISTRATION: &str = "/var/lib/amazon/ssm/registration";
    pub const MANIFEST: &str = "/var/lib/amazon/ssm/Vault/Manifest";
    /// JSON with the instance id and its RSA private key.
    pub const REGISTRATION_KEY: &str = "/var/lib/amazon/ssm/Vault/Store/RegistrationKey";
    pub const FINGERPRINT: &str = "/var/lib/amazon/ssm/Vault/Store/InstanceFingerprint";
    pub const IDENTITY_CONFIG: &str = "/var/lib/amazon/ssm/runtimeconfig/identity_config.json";
    /// Every file that makes a card one particular managed instance.
    pub const IDENTITY_FILES: [&str; 5] = [
        REGISTRATION,
        MANIFEST,
        REGISTRATION_KEY,
        FINGERPRINT,
        IDENTITY_CONFIG,
    ];
    /// The agent shares its temporary role credentials here (Profile.ShareCreds).
    pub const SHARED_CREDENTIALS: &str = "/root/.aws/credentials";
    /// Written with `ssm-user ALL=(ALL) NOPASSWD:ALL` only when absent.
    pub const SUDOERS_SSM_USER: &str = "/etc/sudoers.d/ssm-agent-users";
}

/// Files on the FAT boot partition.
pub mod boot {
    pub const CMDLINE: &str = "cmdline.txt";
    pub const CONFIG: &str = "config.txt";
    /// The stamp record: settings for this card, no secrets.
    pub const STAMP: &str = "piprov-stamp.json";
    /// Written by the card after its first boot so `piprov inspect` can read the outcome.
    pub const STATUS: &str = "piprov-status.json";
    /// Device settings, `KEY=value` lines (no secrets); firstboot/lib.sh reads them.
    pub const CONF: &str = "piprov.conf";
    /// The activation code or enrollment token; moved off the FAT partition on first boot.
    pub const SECRET: &str = "piprov-secret.conf";
    /// The broker's CA certificate, pinned by the card.
    pub const BROKER_CA: &str = "piprov-broker-ca.pem";
}
