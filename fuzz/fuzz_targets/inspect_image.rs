//! Any bytes given as a disk image: the partition table and inspect path must
//! return an error, never panic or hang.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use piprov::image::Image;

fuzz_target!(init: { piprov::contain_fatfs_panics() }, |data: &[u8]| {
    if let Ok(image) = Image::from_disk(Cursor::new(data.to_vec())) {
        let _ = piprov::inspect::report(&image, "fuzz.img");
    }
});
