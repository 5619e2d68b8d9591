//! TPM 2.0 quotes: a `TPMS_ATTEST` of type `TPM_ST_ATTEST_QUOTE` signed (RSASSA-PKCS1-v1_5,
//! SHA-256) by an attestation key, with the SHA-256 PCR values it covers.
//!
//! Layout (TPM 2.0 Part 2, big-endian): magic `0xFF544347`, type `0x8018`, qualifiedSigner
//! (TPM2B_NAME), extraData (TPM2B_DATA: the nonce), clockInfo (17 bytes), firmwareVersion (8),
//! then TPMS_QUOTE_INFO: TPML_PCR_SELECTION (count, then hash alg, select size, bitmap per bank)
//! and pcrDigest (TPM2B_DIGEST) = hash of the selected PCR values in ascending order.

use aws_lc_rs::{
    digest,
    signature::{RsaPublicKeyComponents, RSA_PKCS1_2048_8192_SHA256},
};

use crate::VerifyError;

const TPM_GENERATED: u32 = 0xFF54_4347;
const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;
const TPM_ALG_SHA256: u16 = 0x000B;

fn bad(msg: &str) -> VerifyError {
    VerifyError::Malformed(format!("TPM quote: {msg}"))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], VerifyError> {
        if self.0.len() < n {
            return Err(bad("truncated"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, VerifyError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, VerifyError> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, VerifyError> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn tpm2b(&mut self) -> Result<&'a [u8], VerifyError> {
        let n = self.u16()? as usize;
        self.take(n)
    }
}

/// The parts of a quote's `TPMS_ATTEST` that verification needs.
#[derive(Debug, PartialEq, Eq)]
pub struct QuoteInfo {
    /// The nonce (extraData).
    pub extra_data: Vec<u8>,
    /// Indices of the SHA-256 PCRs covered, ascending.
    pub sha256_pcrs: Vec<u8>,
    /// The PCR digest.
    pub pcr_digest: Vec<u8>,
}

/// Parses a `TPMS_ATTEST` quote message.
pub fn parse_quote(msg: &[u8]) -> Result<QuoteInfo, VerifyError> {
    let mut r = Reader(msg);
    if r.u32()? != TPM_GENERATED {
        return Err(bad("not TPM-generated (magic)"));
    }
    if r.u16()? != TPM_ST_ATTEST_QUOTE {
        return Err(bad("not a quote (type)"));
    }
    r.tpm2b()?; // qualifiedSigner
    let extra_data = r.tpm2b()?.to_vec();
    r.take(17 + 8)?; // clockInfo, firmwareVersion
    let banks = r.u32()?;
    if banks > 16 {
        return Err(bad("too many PCR banks"));
    }
    let mut sha256_pcrs = Vec::new();
    let mut other_banks = 0;
    for _ in 0..banks {
        let alg = r.u16()?;
        let size = r.u8()? as usize;
        let bitmap = r.take(size)?;
        if alg == TPM_ALG_SHA256 {
            for (byte, bits) in bitmap.iter().enumerate() {
                for bit in 0..8 {
                    if bits & (1 << bit) != 0 {
                        sha256_pcrs.push((byte * 8 + bit) as u8);
                    }
                }
            }
        } else if bitmap.iter().any(|b| *b != 0) {
            other_banks += 1;
        }
    }
    if other_banks > 0 {
        return Err(bad("quote covers PCR banks other than SHA-256"));
    }
    let pcr_digest = r.tpm2b()?.to_vec();
    if !r.0.is_empty() {
        return Err(bad("trailing bytes"));
    }
    Ok(QuoteInfo {
        extra_data,
        sha256_pcrs,
        pcr_digest,
    })
}

/// Verifies a quote: the signature with the AK `(n, e)`, the nonce when given, and the PCR
/// values against the signed digest. Returns `(index, value)` for each PCR.
pub fn verify_quote(
    message: &[u8],
    signature: &[u8],
    pcrs: &[Vec<u8>],
    ak_n: &[u8],
    ak_e: &[u8],
    nonce: Option<&[u8]>,
) -> Result<Vec<(u8, Vec<u8>)>, VerifyError> {
    RsaPublicKeyComponents { n: ak_n, e: ak_e }
        .verify(&RSA_PKCS1_2048_8192_SHA256, message, signature)
        .map_err(|_| {
            VerifyError::Check(
                "TPM quote signature does not verify with the vTPM attestation key".into(),
            )
        })?;
    let info = parse_quote(message)?;
    if let Some(n) = nonce {
        if info.extra_data != n {
            return Err(VerifyError::ReportData);
        }
    }
    if pcrs.len() != info.sha256_pcrs.len() || pcrs.iter().any(|p| p.len() != 32) {
        return Err(bad("PCR values do not match the quote's selection"));
    }
    let mut ctx = digest::Context::new(&digest::SHA256);
    for p in pcrs {
        ctx.update(p);
    }
    if ctx.finish().as_ref() != info.pcr_digest.as_slice() {
        return Err(VerifyError::Check(
            "PCR values do not match the quote's signed PCR digest".into(),
        ));
    }
    Ok(info
        .sha256_pcrs
        .into_iter()
        .zip(pcrs.iter().cloned())
        .collect())
}
