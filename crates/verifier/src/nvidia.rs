//! NVIDIA Hopper GPUs: local verification of an SPDM measurement report with its device
//! certificate chain (usable as additional evidence, submodule `gpu0`).
//!
//! Format (DMTF SPDM 1.1): the GET_MEASUREMENTS request (version, code 0xE0, param1, param2,
//! 32-byte nonce, slot id) followed by the MEASUREMENTS response (version, code 0x60, params,
//! block count, 3-byte record length, measurement blocks, 32-byte responder nonce, 2-byte opaque
//! length, opaque data as type/length/value fields, ECDSA P-384 signature `R ‖ S`). Checks: the
//! chain (ECDSA, each certificate signed by the next, ending at the NVIDIA device root) valid at
//! "now"; the leaf's DICE TcbInfo extension (2.23.133.5.4.1) FWID equal to the report's FWID
//! (opaque field 20); the report signature over request and response with the leaf key; the
//! request nonce equal to the expected nonce.

use std::time::SystemTime;

use aws_lc_rs::signature::{
    UnparsedPublicKey, VerificationAlgorithm, ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA384_ASN1,
    ECDSA_P384_SHA256_ASN1, ECDSA_P384_SHA384_ASN1, ECDSA_P384_SHA384_FIXED,
};
use serde_json::{json, Map, Value};
use x509_cert::{
    der::{asn1::ObjectIdentifier, Decode, Encode, Reader, SliceReader, Tag, Tagged},
    Certificate,
};

use crate::{snp::certs::check_validity, Claims, Expected, VerifyError};

/// The built-in NVIDIA device identity root.
pub const NVIDIA_DEVICE_ROOT: &str = include_str!("../roots/nvidia_device_root.pem");

const REQUEST_LEN: usize = 37;
const SIGNATURE_LEN: usize = 96;
const OPAQUE_FWID: u16 = 20;
const DICE_TCB_INFO: &str = "2.23.133.5.4.1";

fn bad(msg: impl Into<String>) -> VerifyError {
    VerifyError::Malformed(format!("NVIDIA report: {}", msg.into()))
}

fn check(msg: impl Into<String>) -> VerifyError {
    VerifyError::Check(msg.into())
}

/// A parsed SPDM measurement report.
#[derive(Debug)]
pub struct SpdmReport<'a> {
    /// The requester's nonce.
    pub nonce: &'a [u8],
    /// Measurement values by block index.
    pub measurements: Vec<(u8, Vec<u8>)>,
    /// Opaque fields (type, value).
    pub opaque: Vec<(u16, &'a [u8])>,
    /// The signed part (request and response without the signature).
    pub signed: &'a [u8],
    /// The signature `R ‖ S`.
    pub signature: &'a [u8],
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], VerifyError> {
    if b.len() < n {
        return Err(bad("truncated"));
    }
    let (a, rest) = b.split_at(n);
    *b = rest;
    Ok(a)
}

/// Parses the request + response bytes.
pub fn parse_report(raw: &[u8]) -> Result<SpdmReport<'_>, VerifyError> {
    if raw.len() < REQUEST_LEN + 8 + SIGNATURE_LEN {
        return Err(bad("too short"));
    }
    let req = &raw[..REQUEST_LEN];
    if req[1] != 0xE0 {
        return Err(bad("does not start with a GET_MEASUREMENTS request"));
    }
    let nonce = &req[4..36];
    let mut r = &raw[REQUEST_LEN..];
    let head = take(&mut r, 4)?;
    if head[1] != 0x60 {
        return Err(bad("response is not MEASUREMENTS"));
    }
    let blocks = take(&mut r, 1)?[0];
    let len = take(&mut r, 3)?;
    let rec_len = u32::from_le_bytes([len[0], len[1], len[2], 0]) as usize;
    let mut rec = take(&mut r, rec_len)?;
    let mut measurements = Vec::new();
    for _ in 0..blocks {
        let h = take(&mut rec, 4)?;
        let size = u16::from_le_bytes([h[2], h[3]]) as usize;
        let m = take(&mut rec, size)?;
        // DMTF measurement: type (1), size (2), value.
        if m.len() < 3 {
            return Err(bad("measurement block too short"));
        }
        let vsize = u16::from_le_bytes([m[1], m[2]]) as usize;
        let value = m
            .get(3..3 + vsize)
            .ok_or_else(|| bad("measurement value truncated"))?;
        measurements.push((h[0], value.to_vec()));
    }
    if !rec.is_empty() {
        return Err(bad("measurement record has trailing bytes"));
    }
    take(&mut r, 32)?; // responder nonce
    let ol = take(&mut r, 2)?;
    let mut op = take(&mut r, u16::from_le_bytes([ol[0], ol[1]]) as usize)?;
    let mut opaque = Vec::new();
    while !op.is_empty() {
        let h = take(&mut op, 4)?;
        let t = u16::from_le_bytes([h[0], h[1]]);
        let size = u16::from_le_bytes([h[2], h[3]]) as usize;
        opaque.push((t, take(&mut op, size)?));
    }
    if r.len() != SIGNATURE_LEN {
        return Err(bad(format!("signature has {} bytes, expected 96", r.len())));
    }
    Ok(SpdmReport {
        nonce,
        measurements,
        opaque,
        signed: &raw[..raw.len() - SIGNATURE_LEN],
        signature: r,
    })
}

/// Parses a PEM chain (leaf first).
pub fn parse_chain(pem: &[u8]) -> Result<Vec<Certificate>, VerifyError> {
    Certificate::load_pem_chain(pem).map_err(|e| bad(format!("certificate chain: {e}")))
}

fn ec_point(cert: &Certificate) -> (&[u8], Option<String>) {
    let spki = &cert.tbs_certificate.subject_public_key_info;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as::<ObjectIdentifier>().ok())
        .map(|o| o.to_string());
    (spki.subject_public_key.raw_bytes(), curve)
}

fn verify_signed_by(
    subject: &Certificate,
    issuer: &Certificate,
    what: &str,
) -> Result<(), VerifyError> {
    let (key, curve) = ec_point(issuer);
    let alg: &'static dyn VerificationAlgorithm = match (
        curve.as_deref(),
        subject.signature_algorithm.oid.to_string().as_str(),
    ) {
        (Some("1.3.132.0.34"), "1.2.840.10045.4.3.3") => &ECDSA_P384_SHA384_ASN1,
        (Some("1.3.132.0.34"), "1.2.840.10045.4.3.2") => &ECDSA_P384_SHA256_ASN1,
        (Some("1.2.840.10045.3.1.7"), "1.2.840.10045.4.3.2") => &ECDSA_P256_SHA256_ASN1,
        (Some("1.2.840.10045.3.1.7"), "1.2.840.10045.4.3.3") => &ECDSA_P256_SHA384_ASN1,
        _ => {
            return Err(check(format!(
                "{what}: unsupported key or signature algorithm"
            )))
        }
    };
    let tbs = subject
        .tbs_certificate
        .to_der()
        .map_err(|e| bad(format!("{what}: {e}")))?;
    UnparsedPublicKey::new(alg, key)
        .verify(&tbs, subject.signature.raw_bytes())
        .map_err(|_| check(format!("GPU certificate chain does not verify ({what})")))
}

/// The FWID digests in a certificate's 2.23.133.5.4.1 extension: every `SEQUENCE { hashAlg OID,
/// digest OCTET STRING }` in it (TCG DICE's FWID shape), at any depth — in DICE TcbInfo they sit
/// in the `fwids` list, in NVIDIA's device certificates beside the key.
pub fn dice_fwids(cert: &Certificate) -> Result<Vec<Vec<u8>>, VerifyError> {
    let ext = cert
        .tbs_certificate
        .extensions
        .as_ref()
        .and_then(|exts| exts.iter().find(|e| e.extn_id.to_string() == DICE_TCB_INFO))
        .ok_or_else(|| {
            check("the GPU's signing certificate has no FWID (DICE TcbInfo) extension")
        })?;
    let mut fwids = Vec::new();
    collect_fwids(ext.extn_value.as_bytes(), 0, &mut fwids)
        .map_err(|e| bad(format!("FWID extension: {e}")))?;
    Ok(fwids)
}

fn collect_fwids(der: &[u8], depth: u8, out: &mut Vec<Vec<u8>>) -> x509_cert::der::Result<()> {
    if depth > 8 {
        return Ok(());
    }
    let mut r = SliceReader::new(der)?;
    while !r.is_finished() {
        let any = x509_cert::der::Any::decode(&mut r)?;
        if !any.tag().is_constructed() {
            continue;
        }
        let children = {
            let mut inner = SliceReader::new(any.value())?;
            let mut v = Vec::new();
            while !inner.is_finished() {
                v.push(x509_cert::der::Any::decode(&mut inner)?);
            }
            v
        };
        if let [alg, digest] = children.as_slice() {
            if alg.tag() == Tag::ObjectIdentifier && digest.tag() == Tag::OctetString {
                out.push(digest.value().to_vec());
                continue;
            }
        }
        collect_fwids(any.value(), depth + 1, out)?;
    }
    Ok(())
}

/// Verifies an NVIDIA GPU report with its chain (PEM, leaf first) at `expected.now`, against
/// `root` (PEM). `expected.report_data` is the 32-byte nonce.
pub fn verify_gpu(
    report: &[u8],
    chain_pem: &[u8],
    root_pem: &str,
    expected: &Expected<'_>,
) -> Result<Claims, VerifyError> {
    let root = Certificate::from_der(
        &x509_cert::der::pem::decode_vec(root_pem.as_bytes())
            .map_err(|e| bad(format!("root: {e}")))?
            .1,
    )
    .map_err(|e| bad(format!("root: {e}")))?;
    let chain = parse_chain(chain_pem)?;
    if chain.len() < 2 {
        return Err(check(format!(
            "GPU certificate chain has {} certificate(s); the device chain has at least 2",
            chain.len()
        )));
    }
    let now: SystemTime = expected.now;
    for (i, pair) in chain.windows(2).enumerate() {
        verify_signed_by(&pair[0], &pair[1], &format!("certificate {i} by {}", i + 1))?;
    }
    let last = chain.last().expect("non-empty");
    if last != &root {
        verify_signed_by(last, &root, "last certificate by the NVIDIA device root")?;
    }
    for (i, c) in chain.iter().enumerate() {
        check_validity(c, &format!("GPU certificate {i}"), now)
            .map_err(|e| check(e.to_string()))?;
    }
    let leaf = &chain[0];
    let parsed = parse_report(report)?;
    let fwid = parsed
        .opaque
        .iter()
        .find(|(t, _)| *t == OPAQUE_FWID)
        .map(|(_, v)| v.to_vec())
        .ok_or_else(|| check("the report carries no FWID"))?;
    let cert_fwids = dice_fwids(leaf)?;
    if !cert_fwids.contains(&fwid) {
        return Err(check(
            "the report's FWID differs from the signing certificate's",
        ));
    }
    let (key, curve) = ec_point(leaf);
    if curve.as_deref() != Some("1.3.132.0.34") {
        return Err(check("the GPU signing key is not P-384"));
    }
    UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, key)
        .verify(parsed.signed, parsed.signature)
        .map_err(|_| check("GPU report signature does not verify with the signing certificate"))?;
    if let Some(want) = expected.report_data {
        if parsed.nonce != want {
            return Err(VerifyError::ReportData);
        }
    }
    let mut measurements = Map::new();
    for (i, v) in &parsed.measurements {
        measurements.insert(i.to_string(), json!(hex::encode(v)));
    }
    let text = |t: u16| {
        parsed.opaque.iter().find(|(k, _)| *k == t).map(|(_, v)| {
            String::from_utf8_lossy(v)
                .trim_end_matches('\0')
                .to_string()
        })
    };
    let mut c = Claims::new();
    c.insert("measurements".into(), Value::Object(measurements));
    c.insert("fwid".into(), json!(hex::encode(&fwid)));
    c.insert("driver_version".into(), json!(text(3)));
    c.insert("nonce".into(), json!(hex::encode(parsed.nonce)));
    Ok(c)
}

/// Device evidence as upstream NVIDIA attesters send it (inside the KBS protocol's
/// `additional_evidence`): `{"device_evidence_list": [{"evidence": "<base64 SPDM report>",
/// "certificate": "<base64 of the PEM chain>", "arch"?, "uuid"?}]}`. Returns one claims set per
/// device, in order (submodules `gpu0`, `gpu1`, …).
pub fn verify_device_evidence(
    evidence: &Value,
    nonce: &[u8],
    now: SystemTime,
) -> Result<Vec<Claims>, VerifyError> {
    use base64::{engine::general_purpose::STANDARD, Engine};
    let list = evidence
        .get("device_evidence_list")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("device evidence has no device_evidence_list"))?;
    if list.is_empty() || list.len() > 16 {
        return Err(bad("device_evidence_list must hold 1 to 16 devices"));
    }
    let expected = Expected {
        report_data: Some(nonce),
        init_data_digest: None,
        now,
    };
    list.iter()
        .map(|d| {
            let field = |k: &str| {
                d.get(k)
                    .and_then(Value::as_str)
                    .and_then(|s| STANDARD.decode(s.trim()).ok())
                    .ok_or_else(|| bad(format!("device evidence {k} is missing or not base64")))
            };
            verify_gpu(
                &field("evidence")?,
                &field("certificate")?,
                NVIDIA_DEVICE_ROOT,
                &expected,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    const REPORT: &str = include_str!("../testdata/nvidia/hopperAttestationReport.txt");
    const CASE1: &[u8] = include_bytes!("../testdata/nvidia/hopper_cert_chain_case1.txt");
    const CASE2: &[u8] = include_bytes!("../testdata/nvidia/hopper_cert_chain_case2.txt");
    const CASE3: &[u8] = include_bytes!("../testdata/nvidia/hopper_cert_chain_case3.txt");
    const CASE4: &[u8] = include_bytes!("../testdata/nvidia/hopper_cert_chain_case4.txt");
    const CLAIMS: &str = include_str!("../testdata/nvidia/hopperAttestationReport-claims.txt");
    const NONCE: &str = "931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb";

    fn report() -> Vec<u8> {
        hex::decode(REPORT.trim()).unwrap()
    }

    fn at(nonce: &[u8]) -> Expected<'_> {
        Expected {
            report_data: Some(nonce),
            init_data_digest: None,
            now: UNIX_EPOCH + Duration::from_secs(1_767_225_600),
        }
    }

    #[test]
    fn hopper_report_verifies_with_upstreams_claims() {
        let nonce = hex::decode(NONCE).unwrap();
        let c = verify_gpu(&report(), CASE1, NVIDIA_DEVICE_ROOT, &at(&nonce)).unwrap();
        let upstream: Value = serde_json::from_str(CLAIMS.trim()).unwrap();
        assert_eq!(c["fwid"], upstream["config"]["fwid"]);
        assert_eq!(c["driver_version"], upstream["config"]["driver_version"]);
        for (k, v) in upstream["measurements"].as_object().unwrap() {
            assert_eq!(&c["measurements"][k], v, "measurement {k}");
        }
    }

    #[test]
    fn bad_chains_nonce_and_tampering_fail() {
        let nonce = hex::decode(NONCE).unwrap();
        let r = report();
        for (chain, why) in [
            (CASE2, "chain has"),
            (CASE3, "does not verify"),
            (CASE4, "FWID"),
        ] {
            let err = verify_gpu(&r, chain, NVIDIA_DEVICE_ROOT, &at(&nonce)).unwrap_err();
            assert!(err.to_string().contains(why), "{why}: {err}");
        }
        assert!(matches!(
            verify_gpu(&r, CASE1, NVIDIA_DEVICE_ROOT, &at(&[0u8; 32])),
            Err(VerifyError::ReportData)
        ));
        let mut t = r.clone();
        t[REQUEST_LEN + 20] ^= 1; // a measurement byte
        let err = verify_gpu(&t, CASE1, NVIDIA_DEVICE_ROOT, &at(&nonce)).unwrap_err();
        assert!(err.to_string().contains("signature"), "{err}");
        let mut t = r;
        let n = t.len();
        t[n - 5] ^= 1; // the signature
        assert!(verify_gpu(&t, CASE1, NVIDIA_DEVICE_ROOT, &at(&nonce)).is_err());
    }

    #[test]
    fn parser_rejects_truncation() {
        let r = report();
        for cut in [0usize, 36, 40, 200, r.len() - 1] {
            assert!(parse_report(&r[..cut]).is_err(), "cut {cut}");
        }
    }
}
