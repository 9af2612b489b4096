//! Any bytes as the FAT boot partition (the part of a card anyone can edit):
//! listing, reading, and the writes and removals a stamp makes must end in an
//! error or a result within the read budget, never a panic or a hang.
#![no_main]

mod disk;

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use piprov::image::Image;

fuzz_target!(init: { piprov::contain_fatfs_panics() }, |data: &[u8]| {
    let Ok(image) = Image::from_disk(Cursor::new(disk::with_partitions(&[(0x0c, data)]))) else {
        return;
    };
    let Ok(boot) = image.boot() else {
        return;
    };
    let _ = boot.volume_label();
    if let Ok(names) = boot.list_root() {
        for name in names.iter().take(32) {
            let _ = boot.read(name);
        }
    }
    let _ = boot.read("cmdline.txt");
    if boot.write("piprov-fuzz.conf", b"FORMAT=1\n").is_ok() {
        let _ = boot.read("piprov-fuzz.conf");
        let _ = boot.remove("piprov-fuzz.conf");
    }
    let _ = boot.close();
});
