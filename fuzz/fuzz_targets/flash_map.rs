//! Any bytes as a disk image: the map of what `piprov flash` writes must be an
//! error or a set of ranges inside the image, never a panic, a hang or an
//! absurd allocation. The same bytes as a `.bmap` file: an error or a map.
#![no_main]

use std::io::Cursor;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use piprov::flash::{bmap::Bmap, map};
use piprov::image::Image;

fuzz_target!(|data: &[u8]| {
    if let Ok(image) = Image::from_disk(Cursor::new(data.to_vec())) {
        if let Ok(extents) = map::compute(&image) {
            assert!(extents.ranges().iter().all(|&(_, end)| end <= data.len() as u64));
        }
    }
    if let Ok(bmap) = Bmap::parse(data, Path::new("fuzz.bmap")) {
        let _ = bmap.extents();
    }
});
