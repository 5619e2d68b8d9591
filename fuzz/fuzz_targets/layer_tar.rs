//! Layer tar streams through the confined unpacker, each into a fresh root inside a temporary
//! directory that also holds a sentinel: after every input nothing may exist beside the root and
//! the sentinel must be untouched (asserted), then the root is removed. Small limits bound what
//! one input can cost.
#![no_main]
use coffer_image::unpack::{LayerUnpacker, Limits, Totals};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    thread_local!(static DIR: coffer_fuzz::Confined = coffer_fuzz::Confined::new());
    DIR.with(|d| {
        let root = d.fresh_root();
        let limits = Limits {
            max_entries: 4096,
            max_bytes: 16 << 20,
        };
        let mut totals = Totals::default();
        let _ = LayerUnpacker::new(&root, limits, &mut totals).apply(data);
        d.check_and_clean();
    });
});
