//! Files piprov creates for the user and must never overwrite: keys, activation
//! codes, enrollment tokens. Created exclusively with their final mode (no window
//! in which a secret is readable by others) and flushed before success is said.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Creates `path` (it must not exist) with `mode` and writes `data` to it.
pub fn write_new(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(data)?;
    file.sync_all()
}
