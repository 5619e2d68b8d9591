//! The host's gzip inflater (ISA-L through `coffer-isal`) against flate2's `MultiGzDecoder` on
//! the same bytes: neither may crash, and when both accept a stream they must inflate it to the
//! same bytes. Output is read up to 4 MiB (a small input may be a bomb). ISA-L is Debian's
//! prebuilt C and assembly, which the AddressSanitizer build does not instrument: this target
//! catches its crashes and wrong output, not a silent out-of-bounds read.
#![no_main]
use std::io::Read;

use libfuzzer_sys::fuzz_target;

const CAP: u64 = 4 << 20;

fn inflate(r: impl Read) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    r.take(CAP).read_to_end(&mut out).ok().map(|_| out)
}

fuzz_target!(|data: &[u8]| {
    // Small BufRead steps exercise the decoder's state across input boundaries.
    let isal = coffer_isal::GzipDecoder::new(std::io::BufReader::with_capacity(97, data))
        .ok()
        .and_then(inflate);
    let flate = inflate(flate2::bufread::MultiGzDecoder::new(data));
    if let (Some(a), Some(b)) = (isal, flate) {
        // Both read up to the cap; a bomb's first 4 MiB must agree too.
        assert!(
            a == b,
            "ISA-L and flate2 inflate the same stream differently"
        );
    }
});
