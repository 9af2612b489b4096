//! The device side (`firstboot/`), embedded in the binary at build time, with the
//! names its files take on the boot partition.

pub struct PayloadFile {
    pub name: &'static str,
    pub content: &'static str,
}

/// Run by the first-boot hook from the boot partition.
pub const INSTALL_SCRIPT: &str = "piprov-install.sh";

/// The card's lib.sh: the card contract, then the helpers that use it.
const LIB: &str = concat!(
    include_str!("../../firstboot/contract.sh"),
    "\n",
    include_str!("../../firstboot/lib.sh")
);

/// The install script carries the contract too: it holds the agent before it
/// reads any other file from the boot partition.
const INSTALL: &str = concat!(
    "#!/bin/sh\n",
    include_str!("../../firstboot/contract.sh"),
    "\n",
    include_str!("../../firstboot/install.sh")
);

pub const FILES: [PayloadFile; 8] = [
    PayloadFile {
        name: INSTALL_SCRIPT,
        content: INSTALL,
    },
    PayloadFile {
        name: "piprov-lib.sh",
        content: LIB,
    },
    PayloadFile {
        name: "piprov-guard.sh",
        content: include_str!("../../firstboot/guard.sh"),
    },
    PayloadFile {
        name: "piprov-register.sh",
        content: include_str!("../../firstboot/register.sh"),
    },
    PayloadFile {
        name: "piprov-guard.service",
        content: include_str!("../../firstboot/piprov-guard.service"),
    },
    PayloadFile {
        name: "piprov-register.service",
        content: include_str!("../../firstboot/piprov-register.service"),
    },
    PayloadFile {
        name: "piprov-agent.conf",
        content: include_str!("../../firstboot/piprov-agent.conf"),
    },
    // The units' Documentation=: what piprov did to this card, on the card.
    PayloadFile {
        name: "piprov-card.7",
        content: include_str!("../../firstboot/piprov-card.7"),
    },
];
