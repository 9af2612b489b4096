# shellcheck shell=sh
# shellcheck disable=SC2034 # the variables are for lib.sh and the scripts
# piprov's card contract: where piprov's files and the agent's live on a card,
# the names on the boot partition, and what no two cards may share. One source
# for both sides: the stamp puts this file in front of lib.sh on the card, and
# build.rs compiles it into src/layout.rs for stamp and inspect. Plain NAME=value
# lines (absolute paths in the card's root, or names on the boot partition) and
# one quoted list; nothing is expanded.
CARD_CONTRACT=1

# piprov on the card.
CARD_LIB_DIR=/usr/local/lib/piprov
CARD_CONF_DIR=/etc/piprov
CARD_STATE_DIR=/var/lib/piprov
# Written last by a complete install. amazon-ssm-agent starts only once it
# exists, and the Trixie boothook runs the install only while it does not.
CARD_INSTALLED=/var/lib/piprov/installed

# amazon-ssm-agent's files (docs/architecture.md).
AGENT_BINARY=/usr/bin/amazon-ssm-agent
AGENT_DATA_DIR=/var/lib/amazon/ssm
AGENT_REGISTRATION=/var/lib/amazon/ssm/registration
AGENT_MANIFEST=/var/lib/amazon/ssm/Vault/Manifest
AGENT_KEY=/var/lib/amazon/ssm/Vault/Store/RegistrationKey
AGENT_FINGERPRINT=/var/lib/amazon/ssm/Vault/Store/InstanceFingerprint
AGENT_RUNTIME_CONFIG=/var/lib/amazon/ssm/runtimeconfig
AGENT_IDENTITY_CONFIG=/var/lib/amazon/ssm/runtimeconfig/identity_config.json
AGENT_SHARED_CREDENTIALS=/root/.aws/credentials
AGENT_SUDOERS=/etc/sudoers.d/ssm-agent-users
AGENT_CONFIG=/etc/amazon/ssm/amazon-ssm-agent.json

# Files on the FAT boot partition.
BOOT_CONF=piprov.conf
BOOT_SECRET=piprov-secret.conf
BOOT_CA=piprov-broker-ca.pem
BOOT_STATUS=piprov-status.json
BOOT_STAMP=piprov-stamp.json

# What no two cards may share besides the SSM identity, the machine-id and the
# SSH host keys (those are renewed, not deleted): the guard deletes these on a
# card's first boot on new hardware, and `piprov inspect` reports the ones an
# image holds. Shell globs (`*` within one path component).
CLONE_STATE='
/var/lib/systemd/random-seed
/etc/udev/rules.d/70-persistent-net.rules
/var/lib/dhcp/*.leases
/var/lib/dhcpcd/*.lease
/var/lib/NetworkManager/*.lease
/var/lib/NetworkManager/secret_key
/var/log/amazon/ssm/amazon-ssm-agent.log
/var/log/amazon/ssm/errors.log
/root/.bash_history
/home/*/.bash_history
'
