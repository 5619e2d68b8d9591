//! Gzip decompression with ISA-L's igzip inflater, as a [`Read`] over any [`BufRead`].
//!
//! ISA-L (Intel's Intelligent Storage Acceleration Library, Debian's `libisal2`) inflates about
//! 1.6 times as fast as zlib-rs on this project's machines (docs/images.md). It is C and
//! assembly: Coffer uses it where the host pulls images (`coffer image pull`), and keeps the
//! memory-safe zlib-rs inside the pod VM, whose inflater reads bytes the host controls.
//!
//! The decoder reads every gzip member of a stream in turn, as `gunzip` and flate2's
//! `MultiGzDecoder` do; each member's trailer (CRC-32 and size) is checked by ISA-L as the
//! member ends. A stream that ends inside a member is an [`io::ErrorKind::UnexpectedEof`]
//! error; corrupt data is [`io::ErrorKind::InvalidData`].

#![warn(missing_docs)]

use std::{
    ffi::c_int,
    io::{self, BufRead, Read},
    ptr::NonNull,
};

/// ISA-L's `struct inflate_state`, only ever behind a pointer from the shim.
#[repr(C)]
struct RawState {
    _opaque: [u8; 0],
}

extern "C" {
    fn coffer_isal_gzip_new() -> *mut RawState;
    fn coffer_isal_gzip_reset(s: *mut RawState);
    fn coffer_isal_gzip_free(s: *mut RawState);
    fn coffer_isal_gzip_step(
        s: *mut RawState,
        input: *const u8,
        in_len: *mut u32,
        out: *mut u8,
        out_len: *mut u32,
        finished: *mut c_int,
    ) -> c_int;
}

/// An inflater's state, owned: allocated by the shim, freed on drop.
struct State(NonNull<RawState>);

// SAFETY: the state is plain heap memory owned by this value alone; ISA-L keeps no reference to
// it (or to the buffers of a step, which the shim clears) between calls, and has no thread
// affinity.
unsafe impl Send for State {}

impl State {
    fn new() -> io::Result<Self> {
        // SAFETY: the shim allocates and initialises a state, or returns null.
        let raw = unsafe { coffer_isal_gzip_new() };
        NonNull::new(raw).map(State).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::OutOfMemory,
                "cannot allocate ISA-L's inflate state",
            )
        })
    }

    fn reset(&mut self) {
        // SAFETY: the pointer is a live state from `coffer_isal_gzip_new`, not shared.
        unsafe { coffer_isal_gzip_reset(self.0.as_ptr()) }
    }

    /// Inflates what it can of `input` into `out`: (consumed, produced, member finished).
    fn step(&mut self, input: &[u8], out: &mut [u8]) -> io::Result<(usize, usize, bool)> {
        // Steps are bounded by u32 lengths; the rest waits for the next step.
        let mut in_len = u32::try_from(input.len()).unwrap_or(u32::MAX);
        let mut out_len = u32::try_from(out.len()).unwrap_or(u32::MAX);
        let mut finished: c_int = 0;
        // SAFETY: the state is live and ours; `input` is readable for `in_len` bytes and `out`
        // writable for `out_len` bytes for the call's duration, and the shim drops both
        // pointers from the state before it returns.
        let rc = unsafe {
            coffer_isal_gzip_step(
                self.0.as_ptr(),
                input.as_ptr(),
                &mut in_len,
                out.as_mut_ptr(),
                &mut out_len,
                &mut finished,
            )
        };
        if rc != 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, describe(rc)));
        }
        Ok((in_len as usize, out_len as usize, finished != 0))
    }
}

impl Drop for State {
    fn drop(&mut self) {
        // SAFETY: the pointer came from `coffer_isal_gzip_new` and is freed once, here.
        unsafe { coffer_isal_gzip_free(self.0.as_ptr()) }
    }
}

/// What an ISA-L inflate status means (igzip_lib.h).
fn describe(rc: c_int) -> String {
    let what = match rc {
        -1 => "invalid deflate block",
        -2 => "invalid deflate symbol",
        -3 => "invalid lookback distance",
        -4 => "invalid gzip header",
        -5 => "the gzip header names a method other than deflate",
        -6 => "the gzip trailer's CRC-32 or size does not match the data",
        _ => "the inflater failed",
    };
    format!("corrupt gzip stream: {what} (ISA-L status {rc})")
}

/// A reader of what a gzip stream (one or more members) inflates to.
pub struct GzipDecoder<R> {
    inner: R,
    state: State,
    /// The current member ended; another may follow.
    member_done: bool,
}

impl<R: BufRead> GzipDecoder<R> {
    /// A decoder of the gzip stream `inner` yields.
    pub fn new(inner: R) -> io::Result<Self> {
        Ok(Self {
            inner,
            state: State::new()?,
            member_done: false,
        })
    }
}

impl<R: BufRead> Read for GzipDecoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let input = self.inner.fill_buf()?;
            if self.member_done {
                if input.is_empty() {
                    return Ok(0);
                }
                // Another member follows.
                self.state.reset();
                self.member_done = false;
            }
            let at_end = input.is_empty();
            let (consumed, produced, finished) = self.state.step(input, buf)?;
            self.inner.consume(consumed);
            self.member_done = finished;
            if produced > 0 {
                return Ok(produced);
            }
            if finished {
                continue;
            }
            if at_end {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the gzip stream ends inside a member (truncated)",
                ));
            }
            if consumed == 0 {
                // With input and room for output, the inflater must take one or the other.
                return Err(io::Error::other("ISA-L's inflater made no progress"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufReader, Write};

    use flate2::{write::GzEncoder, Compression};

    use super::*;

    /// Text with repeats and noise: both literals and matches, several deflate blocks.
    fn sample(len: usize) -> Vec<u8> {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let words: [&[u8]; 6] = [
            b"layer ", b"rootfs ", b"coffer ", b"\n", b"sha256:", b"etc/",
        ];
        let mut v = Vec::with_capacity(len + 16);
        while v.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x.is_multiple_of(3) {
                v.push((x >> 24) as u8);
            } else {
                v.extend_from_slice(words[(x >> 40) as usize % words.len()]);
            }
        }
        v.truncate(len);
        v
    }

    fn gzip(data: &[u8], level: u32) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::new(level));
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// Reads all of `gz` through a `BufReader` of `cap` bytes, `chunk` bytes per read.
    fn inflate(gz: &[u8], cap: usize, chunk: usize) -> io::Result<Vec<u8>> {
        let mut d = GzipDecoder::new(BufReader::with_capacity(cap, gz))?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; chunk];
        loop {
            let n = d.read(&mut buf)?;
            if n == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    #[test]
    fn inflates_what_flate2_compressed_at_any_level_and_buffer_size() {
        let data = sample(3 << 20);
        for level in [0, 1, 6, 9] {
            let gz = gzip(&data, level);
            for (cap, chunk) in [(256 << 10, 256 << 10), (8192, 100), (1, 65536), (4096, 1)] {
                if chunk == 1 && level != 6 {
                    continue; // byte-sized reads once is enough
                }
                let out = inflate(&gz, cap, chunk).unwrap();
                assert!(out == data, "level {level}, buffer {cap}, reads of {chunk}");
            }
        }
    }

    #[test]
    fn reads_every_member_of_a_multi_member_stream() {
        let (a, b) = (sample(100_000), b"second member\n".repeat(1000));
        let mut gz = gzip(&a, 6);
        gz.extend_from_slice(&gzip(&b, 1));
        gz.extend_from_slice(&gzip(b"", 6));
        let out = inflate(&gz, 4096, 7000).unwrap();
        assert_eq!(out.len(), a.len() + b.len());
        assert!(out[..a.len()] == a[..] && out[a.len()..] == b[..]);
    }

    #[test]
    fn a_wrong_crc_or_size_in_the_trailer_is_invalid_data() {
        let gz = gzip(&sample(50_000), 6);
        let n = gz.len();
        for at in [n - 8, n - 1] {
            let mut bad = gz.clone();
            bad[at] ^= 0x01;
            let e = inflate(&bad, 4096, 4096).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "byte {at}: {e}");
            assert!(e.to_string().contains("CRC-32 or size"), "{e}");
        }
    }

    #[test]
    fn a_truncated_stream_is_an_unexpected_end() {
        let gz = gzip(&sample(200_000), 6);
        for cut in [5, 10, gz.len() / 2, gz.len() - 4, gz.len() - 1] {
            let e = inflate(&gz[..cut], 4096, 4096).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "cut at {cut}: {e}");
        }
        let e = inflate(b"", 4096, 4096).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "empty input: {e}");
    }

    #[test]
    fn garbage_is_refused_where_a_header_or_block_should_be() {
        let e = inflate(b"not a gzip stream at all", 4096, 4096).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        assert!(e.to_string().contains("gzip header"), "{e}");

        // Trailing garbage after a whole member is a bad next member.
        let mut gz = gzip(b"hello", 6);
        gz.extend_from_slice(b"junk after the member");
        assert_eq!(
            inflate(&gz, 4096, 4096).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );

        // A flipped bit inside the compressed data fails somewhere, never silently.
        let data = sample(300_000);
        let gz = gzip(&data, 6);
        for at in (20..gz.len() - 8).step_by(gz.len() / 37) {
            let mut bad = gz.clone();
            bad[at] ^= 0x10;
            match inflate(&bad, 4096, 4096) {
                Err(_) => {}
                Ok(out) => panic!(
                    "flip at {at} inflated to {} bytes without an error",
                    out.len()
                ),
            }
        }
    }

    #[test]
    fn agrees_with_flate2s_multi_member_decoder() {
        let data = sample(1 << 20);
        let mut gz = gzip(&data[..400_000], 9);
        gz.extend_from_slice(&gzip(&data[400_000..], 1));
        let mut want = Vec::new();
        flate2::bufread::MultiGzDecoder::new(&gz[..])
            .read_to_end(&mut want)
            .unwrap();
        let mut got = Vec::new();
        GzipDecoder::new(&gz[..])
            .unwrap()
            .read_to_end(&mut got)
            .unwrap();
        assert!(got == want);
    }
}
