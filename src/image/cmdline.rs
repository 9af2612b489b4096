//! `cmdline.txt`: one line of kernel arguments that the firmware, the OS and tools
//! such as Raspberry Pi Imager all edit. We change it token by token and keep every
//! other byte as it was.

use anyhow::{Result, bail};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmdline {
    text: String,
}

impl Cmdline {
    /// Parses the file's bytes; `file` names it in errors.
    pub fn parse(data: &[u8], file: &str) -> Result<Self> {
        match std::str::from_utf8(data) {
            Ok(text) => Ok(Self {
                text: text.to_string(),
            }),
            Err(e) => bail!(
                "{file} is not UTF-8 text (invalid byte 0x{:02x} at offset {}); \
                 the kernel command line must be plain text",
                data[e.valid_up_to()],
                e.valid_up_to()
            ),
        }
    }

    pub fn tokens(&self) -> impl Iterator<Item = &str> {
        self.text.split_ascii_whitespace()
    }

    /// The value of the first `key=value` token with this key.
    pub fn value(&self, key: &str) -> Option<&str> {
        self.tokens()
            .find_map(|t| t.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
    }

    /// Appends tokens after the last one, before the trailing newline.
    pub fn append<'a>(&mut self, tokens: impl IntoIterator<Item = &'a str>) {
        let body_end = self.text.trim_end().len();
        let (body, tail) = self.text.split_at(body_end);
        let mut out = body.to_string();
        for token in tokens {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(token);
        }
        out.push_str(tail);
        self.text = out;
    }

    /// Removes every token for which `drop` is true, together with the space before it.
    pub fn remove(&mut self, drop: impl Fn(&str) -> bool) {
        let mut out = String::with_capacity(self.text.len());
        let mut rest = self.text.as_str();
        while !rest.is_empty() {
            let space_len = rest.len() - rest.trim_start_matches([' ', '\t']).len();
            let (space, after) = rest.split_at(space_len);
            let token_len = after
                .find(|c: char| c.is_ascii_whitespace())
                .unwrap_or(after.len());
            let (token, after) = after.split_at(token_len);
            if token.is_empty() || !drop(token) {
                out.push_str(space);
                out.push_str(token);
            }
            // A newline ends the token; copy it and go on.
            let newline_len = after.len() - after.trim_start_matches(['\n', '\r']).len();
            out.push_str(&after[..newline_len]);
            rest = &after[newline_len..];
        }
        // Dropping the first token leaves the separator that followed it leading.
        if !self.text.starts_with([' ', '\t']) {
            out = out.trim_start_matches([' ', '\t']).to_string();
        }
        self.text = out;
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.text.as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PI: &str = "console=serial0,115200 console=tty1 root=PARTUUID=6c586e13-02 rootfstype=ext4 fsck.repair=yes rootwait quiet\n";

    #[test]
    fn tokens_and_values() {
        let c = Cmdline::parse(PI.as_bytes(), "cmdline.txt").unwrap();
        assert_eq!(c.tokens().count(), 7);
        assert_eq!(c.value("root"), Some("PARTUUID=6c586e13-02"));
        assert_eq!(c.value("console"), Some("serial0,115200"));
        assert_eq!(c.value("quiet"), None);
    }

    #[test]
    fn append_then_remove_gives_back_the_same_bytes() {
        let mut c = Cmdline::parse(PI.as_bytes(), "cmdline.txt").unwrap();
        c.append([
            "systemd.run=/boot/firmware/x.sh",
            "systemd.run_success_action=reboot",
        ]);
        assert_eq!(
            std::str::from_utf8(c.as_bytes()).unwrap(),
            PI.trim_end().to_string()
                + " systemd.run=/boot/firmware/x.sh systemd.run_success_action=reboot\n"
        );
        c.remove(|t| t.starts_with("systemd.run"));
        assert_eq!(c.as_bytes(), PI.as_bytes());
    }

    #[test]
    fn removing_keeps_odd_spacing_elsewhere() {
        let text = "a  b\tc d \n";
        let mut c = Cmdline::parse(text.as_bytes(), "cmdline.txt").unwrap();
        c.remove(|t| t == "c");
        assert_eq!(std::str::from_utf8(c.as_bytes()).unwrap(), "a  b d \n");
        c.remove(|t| t == "a");
        assert_eq!(std::str::from_utf8(c.as_bytes()).unwrap(), "b d \n");
    }

    #[test]
    fn non_utf8_names_the_file_and_offset() {
        let err = Cmdline::parse(b"root=x \xff\xfe", "cmdline.txt")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cmdline.txt is not UTF-8"), "{err}");
        assert!(err.contains("0xff at offset 7"), "{err}");
    }
}
