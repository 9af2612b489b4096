//! Any bytes as a settings file on the card's FAT partition, read by the
//! card's own reader (`read_conf` in firstboot/lib.sh, run by sh). It must
//! agree with a strict model: only KEY=value lines with listed keys, each key
//! once, printable ASCII; on refusal nothing is set; on acceptance exactly the
//! values set; and nothing runs (no word on stderr).
#![no_main]

use std::process::Command;

use libfuzzer_sys::fuzz_target;

const KEYS: [&str; 3] = ["SOURCE", "BROKER_URL", "SUDO_RULE"];

/// What the strict reader must make of the file: its settings, or a refusal.
fn model(data: &[u8]) -> Option<Vec<(&'static str, String)>> {
    if data.iter().any(|&b| b != b'\n' && !(b' '..=b'~').contains(&b)) {
        return None;
    }
    let text = std::str::from_utf8(data).ok()?;
    let body = text.strip_suffix('\n').unwrap_or(text);
    let mut settings: Vec<(&'static str, String)> = Vec::new();
    for line in body.split('\n') {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line.split_once('=')?;
        let key = *KEYS.iter().find(|k| **k == key)?;
        if settings.iter().any(|(k, _)| *k == key) {
            return None;
        }
        settings.push((key, value.to_string()));
    }
    Some(settings)
}

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir();
    let file = dir.join(format!("piprov-fuzz-settings-{}.conf", std::process::id()));
    std::fs::write(&file, data).unwrap();
    let firstboot = concat!(env!("CARGO_MANIFEST_DIR"), "/../firstboot");
    let script = format!(
        ". {firstboot}/contract.sh; CARD_CONTRACT=1; . {firstboot}/lib.sh\n\
         if read_conf \"$1\" '{keys}'; then echo accepted; else echo refused; fi\n\
         for key in {keys}; do eval \"printf '%s=%s|%s\\0' $key \\\"\\${{PIPROV_$key+set}}\\\" \\\"\\$PIPROV_$key\\\"\"; done\n",
        keys = KEYS.join(" ")
    );
    let out = Command::new("sh")
        .args(["-c", &script, "sh"])
        .arg(&file)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.is_empty(), "the reader printed {stderr:?}");
    let (verdict, values) = stdout.split_once('\n').unwrap();
    let expected = model(data);
    assert_eq!(verdict == "accepted", expected.is_some(), "verdict {verdict}");
    for field in values.split('\0').filter(|f| !f.is_empty()) {
        let (key, rest) = field.split_once('=').unwrap();
        let (set, value) = rest.split_once('|').unwrap();
        let wanted = expected
            .as_ref()
            .and_then(|s| s.iter().find(|(k, _)| *k == key))
            .map(|(_, v)| v.as_str());
        match wanted {
            Some(wanted) => assert_eq!((set, value), ("set", wanted), "{key}"),
            None => assert_eq!(set, "", "{key} set to {value:?}"),
        }
    }
});
