//! Content digests (`sha256:<hex>`) and a reader that hashes what passes through it.

use std::io::{self, Read};

use sha2::{Digest as _, Sha256};

use crate::Error;

/// Checks that `digest` is `sha256:` followed by 64 lowercase hex digits (the only algorithm
/// registries use for images) and returns the hex part.
pub fn sha256_hex(digest: &str) -> Result<&str, Error> {
    let hex = digest.strip_prefix("sha256:").ok_or_else(|| {
        Error::Unsupported(format!("digest {digest:?}: only sha256 is supported"))
    })?;
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(Error::Manifest(format!("malformed digest {digest:?}")));
    }
    Ok(hex)
}

/// `sha256:<hex>` of `bytes`.
pub fn of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Fails unless `bytes` hash to `expected`.
pub fn verify(what: &'static str, expected: &str, bytes: &[u8]) -> Result<(), Error> {
    let actual = of(bytes);
    if actual != expected {
        return Err(Error::Digest {
            what,
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(())
}

/// A reader that hashes everything read through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Option<Sha256>,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Some(Sha256::new()),
            count: 0,
        }
    }

    /// Wraps `inner`, counting bytes but not hashing them (a stream something else verifies).
    pub fn counting(inner: R) -> Self {
        Self {
            inner,
            hasher: None,
            count: 0,
        }
    }

    /// Reads what is left (so that the digest covers the whole stream), then returns
    /// `sha256:<hex>` (empty for a [`HashingReader::counting`] reader) and the byte count.
    pub fn finish(self) -> io::Result<(String, u64)> {
        self.finish_into_inner()
            .map(|(d, n, _)| (d.unwrap_or_default(), n))
    }

    /// [`HashingReader::finish`], also giving back the inner reader; the digest is `None` for a
    /// [`HashingReader::counting`] reader.
    pub fn finish_into_inner(mut self) -> io::Result<(Option<String>, u64, R)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((
            self.hasher
                .map(|h| format!("sha256:{}", hex::encode(h.finalize()))),
            self.count,
            self.inner,
        ))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        self.count += n as u64;
        Ok(n)
    }
}

/// A reader that fails once more than `limit` bytes came through (decompression bombs).
pub struct LimitedReader<R> {
    inner: R,
    left: u64,
    limit: u64,
}

impl<R: Read> LimitedReader<R> {
    /// Wraps `inner`, allowing at most `limit` bytes.
    pub fn new(inner: R, limit: u64) -> Self {
        Self {
            inner,
            left: limit,
            limit,
        }
    }
}

impl<R: Read> Read for LimitedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            return Err(io::Error::other(format!(
                "layer expands beyond {} bytes",
                self.limit
            )));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_checked_and_computed_while_reading() {
        let d = of(b"abc");
        assert_eq!(
            d,
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(sha256_hex(&d).is_ok());
        assert!(sha256_hex("sha512:00").is_err());
        assert!(sha256_hex("sha256:ABC").is_err());
        assert!(verify("blob", &d, b"abd").is_err());
        let mut r = HashingReader::new(&b"abc"[..]);
        let mut first = [0u8; 1];
        r.read_exact(&mut first).unwrap();
        assert_eq!(r.finish().unwrap(), (d, 3));
        let mut l = LimitedReader::new(&b"abcdef"[..], 4);
        assert!(io::copy(&mut l, &mut io::sink()).is_err());
    }
}
