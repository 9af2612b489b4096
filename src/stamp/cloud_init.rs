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
/// agent can start. Boothooks run on every boot; the script removes itself from
/// the boot partition once it has run, so later boots find nothing to do.
pub fn user_data(original: Option<&[u8]>, install_script: &str) -> Result<Vec<u8>> {
    let script = format!(
        "#cloud-boothook\n#!/bin/sh\n[ -f {install_script} ] || exit 0\nexec sh {install_script} --now\n"
    );
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
        assert_eq!(
            data,
            b"#cloud-boothook\n#!/bin/sh\n[ -f /boot/piprov-install.sh ] || exit 0\nexec sh /boot/piprov-install.sh --now\n"
        );
        assert!(user_data(Some(b"Content-Type: multipart/mixed"), "/x").is_err());
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
