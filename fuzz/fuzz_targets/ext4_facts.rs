//! Any bytes as the ext4 root partition: every fact the audit reads from it
//! (os-release, the agent's registration, sudoers.d, machine-id, SSH keys, the
//! clone-state globs) must end in an error or a report, never a panic, a hang
//! or an allocation the size the image claims.
#![no_main]

mod disk;

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use piprov::image::Image;

fuzz_target!(init: { piprov::contain_fatfs_panics() }, |data: &[u8]| {
    // The boot partition is one empty sector: the audit reads the root
    // filesystem's facts first, and stops at the FAT.
    let disk = disk::with_partitions(&[(0x0c, &[0u8; 512]), (0x83, data)]);
    if let Ok(image) = Image::from_disk(Cursor::new(disk)) {
        let _ = piprov::inspect::report(&image, "fuzz.img");
    }
});
