//! The NoCloud seed for images that first-boot through cloud-init (Trixie).

use anyhow::{Result, bail};

const BOUNDARY: &str = "==piprov-boundary==";

/// User-data that runs our install script as a boothook, keeping whatever
/// user-data the image had as the first part of a MIME multipart message (so
/// no YAML needs merging).
///
/// A boothook, not a shell-script part: cloud-init runs scripts in
/// `cloud-final.service`, which Debian orders after `multi-user.target`, and
/// so after `amazon-ssm-agent.service` has started as the golden. Boothooks run
/// in the init stage (`cloud-init.service`, before `network-online.target`,
/// which the agent waits for), so the guard wipes the cloned identity before the
/// agent can start. Boothooks run on every boot: the script runs only while the
/// card is not installed yet, so a file dropped on the FAT partition later under
/// that name is never run as root (the journal says so).
pub fn user_data(original: Option<&[u8]>, install_script: &str) -> Result<Vec<u8>> {
    let script = boothook(install_script, crate::layout::contract::CARD_INSTALLED);
    let Some(original) = original else {
        return Ok(script.into_bytes());
    };
    let text = String::from_utf8_lossy(original);
    let content_type = if text.starts_with("#cloud-config") {
        "text/cloud-config"
    } else if text.starts_with("#!") {
        "text/x-shellscript"
    } else if text.trim().is_empty() {
        return Ok(script.into_bytes());
    } else {
        bail!(
            "user-data on the boot partition is neither #cloud-config nor a script \
             (MIME multipart?): piprov cannot add its part; use hook = \"systemd-run\""
        );
    };
    let mut out = format!(
        "Content-Type: multipart/mixed; boundary=\"{BOUNDARY}\"\nMIME-Version: 1.0\n\n\
         --{BOUNDARY}\nContent-Type: {content_type}; charset=\"utf-8\"\n\n"
    )
    .into_bytes();
    out.extend_from_slice(original);
    if !original.ends_with(b"\n") {
        out.push(b'\n');
    }
    out.extend_from_slice(
        format!("--{BOUNDARY}\nContent-Type: text/cloud-boothook; charset=\"utf-8\"\n\n{script}--{BOUNDARY}--\n")
            .as_bytes(),
    );
    Ok(out)
}

/// The boothook part: runs the install script while the card is not installed.
fn boothook(install_script: &str, installed: &str) -> String {
    format!(
        "#cloud-boothook\n#!/bin/sh\n[ -f {install_script} ] || exit 0\n\
         if [ -e {installed} ]; then\n\
         \x20   echo \"piprov: this card is installed ({installed}): {install_script} is not run\" |\n\
         \x20       systemd-cat -t piprov -p warning 2>/dev/null || true\n\
         \x20   exit 0\n\
         fi\n\
         exec sh {install_script} --now\n"
    )
}

/// Meta-data with a fresh `instance-id`: a new id makes cloud-init run its
/// per-instance modules (SSH keys, our script) again on this card.
pub fn meta_data(original: Option<&[u8]>, instance_id: &str) -> Vec<u8> {
    let mut out = format!("instance-id: {instance_id}\n");
    if let Some(original) = original {
        for line in String::from_utf8_lossy(original).lines() {
            if !line.trim_start().starts_with("instance-id:") {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_cloud_config_becomes_the_first_part() {
        let data = user_data(
            Some(b"#cloud-config\nhostname: x\n"),
            "/boot/firmware/piprov-install.sh",
        )
        .unwrap();
        let text = String::from_utf8(data).unwrap();
        let first = text.find("#cloud-config\nhostname: x\n").unwrap();
        let second = text
            .find("exec sh /boot/firmware/piprov-install.sh --now")
            .unwrap();
        assert!(text.starts_with("Content-Type: multipart/mixed"));
        assert!(first < second);
        assert!(text.contains("Content-Type: text/cloud-boothook"), "{text}");
        assert!(text.ends_with(&format!("--{BOUNDARY}--\n")));
    }

    #[test]
    fn no_original_gives_a_plain_script() {
        let data = user_data(None, "/boot/piprov-install.sh").unwrap();
        let text = String::from_utf8(data).unwrap();
        assert!(text.starts_with("#cloud-boothook\n#!/bin/sh\n"), "{text}");
        assert!(
            text.ends_with("exec sh /boot/piprov-install.sh --now\n"),
            "{text}"
        );
        assert!(user_data(Some(b"Content-Type: multipart/mixed"), "/x").is_err());
    }

    /// The boothook runs on every boot: it runs the install script only while
    /// the card is not installed, so a script dropped on the FAT later is not
    /// run as root.
    #[test]
    fn the_boothook_runs_the_install_only_on_a_card_not_yet_installed() {
        let dir = tempfile::TempDir::new().unwrap();
        let ran = dir.path().join("ran");
        let install = dir.path().join("piprov-install.sh");
        std::fs::write(&install, format!("echo \"$1\" > {}\n", ran.display())).unwrap();
        let installed = dir.path().join("installed");
        let hook = dir.path().join("hook");
        std::fs::write(
            &hook,
            boothook(install.to_str().unwrap(), installed.to_str().unwrap()),
        )
        .unwrap();
        let run = || {
            let status = std::process::Command::new("sh")
                .arg(&hook)
                .status()
                .unwrap();
            assert!(status.success());
        };
        run();
        assert_eq!(std::fs::read_to_string(&ran).unwrap(), "--now\n");
        std::fs::remove_file(&ran).unwrap();
        std::fs::write(&installed, "").unwrap();
        run();
        assert!(
            !ran.exists(),
            "an installed card ran a script dropped on its FAT"
        );
    }

    #[test]
    fn meta_data_gets_a_new_instance_id_and_keeps_the_rest() {
        let data = meta_data(
            Some(b"instance-id: rpi-golden\nlocal-hostname: pi\n"),
            "piprov-1",
        );
        assert_eq!(data, b"instance-id: piprov-1\nlocal-hostname: pi\n");
    }
}
