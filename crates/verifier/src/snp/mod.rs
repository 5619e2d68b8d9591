//! AMD SEV-SNP attestation reports (versions 2 and later).
//!
//! Checks, in order: the report parses; the VCEK/VLEK chains to the built-in AMD roots of its
//! processor generation and every certificate is valid at "now"; the report's ECDSA P-384
//! signature over bytes `0x000..0x2A0` verifies with that key; the reported TCB equals the
//! certificate's SPL extensions and (for a VCEK) the chip id equals its hardware id; REPORT_DATA
//! binds the runtime data; HOST_DATA equals the initdata digest when one is expected.
//!
//! Evidence JSON is what upstream attestation agents send:
//! `{"attestation_report": <report as the sev crate serializes it>, "cert_chain": [{"cert_type":
//! "VCEK"|"VLEK"|…, "data": [bytes]}] | null}`. Verified endorsement keys are cached by the
//! SHA-384 of their DER, so repeated reports cost one ECDSA verification.

pub mod certs;

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::SystemTime,
};

use aws_lc_rs::{
    digest,
    signature::{UnparsedPublicKey, ECDSA_P384_SHA384_FIXED},
};
use coffer_wire::{binding::fit_report_data, Tee};
use serde::Deserialize;
use serde_json::{json, Value};
use sev::{firmware::guest::AttestationReport, parser::ByteParser};

pub use certs::{EndorsedKey, EndorsementKey, Generation, GenerationRoots};

use crate::{Claims, Expected, Verifier, VerifyError};

/// Size of an attestation report.
pub const REPORT_LEN: usize = 0x4A0;
/// End of the signed region.
pub const SIGNED_LEN: usize = 0x2A0;

const KEY_INFO: usize = 0x48;

fn check(msg: impl Into<String>) -> VerifyError {
    VerifyError::Check(msg.into())
}

/// The signing key a report names (KEY_INFO bits 4:2).
fn signing_key(raw: &[u8]) -> Result<EndorsementKey, VerifyError> {
    let info = u32::from_le_bytes(raw[KEY_INFO..KEY_INFO + 4].try_into().expect("4 bytes"));
    match (info >> 2) & 0b111 {
        0 => Ok(EndorsementKey::Vcek),
        1 => Ok(EndorsementKey::Vlek),
        7 => Err(check("report is unsigned (SIGNING_KEY = none)")),
        other => Err(check(format!("report names unknown signing key {other}"))),
    }
}

/// `R ‖ S` big-endian (48 + 48 bytes) from the report's little-endian 72-byte fields.
fn signature_be(raw: &[u8]) -> Result<[u8; 96], VerifyError> {
    let r = &raw[SIGNED_LEN..SIGNED_LEN + 72];
    let s = &raw[SIGNED_LEN + 72..SIGNED_LEN + 144];
    if r[48..].iter().chain(&s[48..]).any(|b| *b != 0) {
        return Err(check("report signature components exceed 384 bits"));
    }
    let mut out = [0u8; 96];
    for i in 0..48 {
        out[i] = r[47 - i];
        out[48 + i] = s[47 - i];
    }
    Ok(out)
}

/// Upstream SNP evidence JSON.
#[derive(Deserialize)]
struct SnpEvidence {
    attestation_report: AttestationReport,
    #[serde(default)]
    cert_chain: Option<Vec<CertTableEntry>>,
}

#[derive(Deserialize)]
struct CertTableEntry {
    cert_type: String,
    data: Vec<u8>,
}

/// Verifier of SEV-SNP evidence.
pub struct SnpVerifier {
    roots: Vec<GenerationRoots>,
    cache: RwLock<HashMap<Vec<u8>, Arc<EndorsedKey>>>,
    vcek_dir: Option<std::path::PathBuf>,
}

impl Default for SnpVerifier {
    fn default() -> Self {
        Self::new(GenerationRoots::builtin())
    }
}

impl SnpVerifier {
    /// The built-in AMD roots plus the emulated PSP's roots (a PEM bundle with its ARK and
    /// ASK). Only for operators who explicitly allow emulation: its claims say `emulated`.
    pub fn with_emulated_roots(pem: &str) -> Result<Self, VerifyError> {
        let mut roots = GenerationRoots::builtin();
        roots.push(
            GenerationRoots::from_pem(Generation::Emulated, pem)
                .map_err(|e| check(format!("emulated PSP roots: {e}")))?,
        );
        Ok(Self::new(roots))
    }

    /// A verifier trusting `roots`.
    pub fn new(roots: Vec<GenerationRoots>) -> Self {
        Self {
            roots,
            cache: RwLock::new(HashMap::new()),
            vcek_dir: None,
        }
    }

    /// Looks up VCEKs that the evidence does not carry in `dir`, an offline cache holding
    /// `vcek-<chip id hex>-<bootloader>-<tee>-<snp>-<microcode>.der` files (what AMD's key
    /// distribution service returns for that chip and reported TCB).
    pub fn with_vcek_dir(mut self, dir: std::path::PathBuf) -> Self {
        self.vcek_dir = Some(dir);
        self
    }

    /// The AMD key distribution service path of the VCEK for a report:
    /// `/vcek/v1/<Milan|Genoa|Turin>/<hwid hex>?blSPL=…&teeSPL=…&snpSPL=…&ucodeSPL=…` (Turin: an
    /// 8-byte hardware id and `fmcSPL`). The product comes from the report's CPUID fields
    /// (version 3 and later) or `product`.
    pub fn kds_vcek_path(
        report: &AttestationReport,
        product: Option<Generation>,
    ) -> Result<String, VerifyError> {
        let product = match (product, report.cpuid_fam_id, report.cpuid_mod_id) {
            (Some(p), _, _) => p,
            (None, Some(0x19), Some(0x00..=0x0F)) => Generation::Milan,
            (None, Some(0x19), Some(_)) => Generation::Genoa,
            (None, Some(0x1A), _) => Generation::Turin,
            _ => {
                return Err(check(
                    "cannot tell the processor generation from the report; name it (milan, genoa, turin)",
                ))
            }
        };
        let t = &report.reported_tcb;
        Ok(match product {
            Generation::Turin => format!(
                "/vcek/v1/Turin/{}?fmcSPL={}&blSPL={}&teeSPL={}&snpSPL={}&ucodeSPL={}",
                hex::encode(&report.chip_id[..8]),
                t.fmc.unwrap_or(0),
                t.bootloader,
                t.tee,
                t.snp,
                t.microcode
            ),
            Generation::Emulated => {
                return Err(check("the emulated PSP's VCEK is not at AMD's KDS"))
            }
            g => format!(
                "/vcek/v1/{}/{}?blSPL={}&teeSPL={}&snpSPL={}&ucodeSPL={}",
                match g {
                    Generation::Milan => "Milan",
                    _ => "Genoa",
                },
                hex::encode(report.chip_id),
                t.bootloader,
                t.tee,
                t.snp,
                t.microcode
            ),
        })
    }

    /// The cache file name of the VCEK for a report.
    pub fn vcek_file_name(report: &AttestationReport) -> String {
        let t = &report.reported_tcb;
        format!(
            "vcek-{}-{}-{}-{}-{}.der",
            hex::encode(report.chip_id),
            t.bootloader,
            t.tee,
            t.snp,
            t.microcode
        )
    }

    /// Verifies the endorsement certificate (cached by digest, re-checking validity at `now`).
    fn endorsement(
        &self,
        cert_der: &[u8],
        kind: EndorsementKey,
        now: SystemTime,
    ) -> Result<Arc<EndorsedKey>, VerifyError> {
        let id = digest::digest(&digest::SHA384, cert_der).as_ref().to_vec();
        let cached = self
            .cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned();
        let key = match cached {
            Some(k) if k.kind == kind => k,
            _ => {
                let cert = certs::parse_der(cert_der, "endorsement key certificate")
                    .map_err(|e| check(e.to_string()))?;
                let k = Arc::new(
                    certs::verify_endorsement(&cert, kind, &self.roots, now)
                        .map_err(|e| check(e.to_string()))?,
                );
                let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
                if cache.len() > 4096 {
                    cache.clear();
                }
                cache.insert(id, k.clone());
                k
            }
        };
        if now < key.not_before || now > key.not_after {
            return Err(check(
                "a certificate of the endorsement chain is not valid at the verification time",
            ));
        }
        Ok(key)
    }

    /// Verifies a raw report with its endorsement certificate (DER).
    pub fn verify_report(
        &self,
        raw: &[u8],
        cert_der: &[u8],
        expected: &Expected<'_>,
    ) -> Result<Claims, VerifyError> {
        if raw.len() != REPORT_LEN {
            return Err(VerifyError::Malformed(format!(
                "SNP report has {} bytes, expected {REPORT_LEN}",
                raw.len()
            )));
        }
        let report = AttestationReport::from_bytes(raw)
            .map_err(|e| VerifyError::Malformed(format!("SNP report: {e}")))?;
        if report.version < 2 {
            return Err(VerifyError::Malformed(format!(
                "SNP report version {} is not supported (2 or later)",
                report.version
            )));
        }
        if report.sig_algo != 1 {
            return Err(check(format!(
                "report signature algorithm {} is not ECDSA P-384 with SHA-384",
                report.sig_algo
            )));
        }
        let kind = signing_key(raw)?;
        let key = self.endorsement(cert_der, kind, expected.now)?;
        let sig = signature_be(raw)?;
        UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, &key.public_point)
            .verify(&raw[..SIGNED_LEN], &sig)
            .map_err(|_| check("report signature does not verify with the endorsement key"))?;

        let tcb = &report.reported_tcb;
        let cert_tcb = &key.tcb;
        let tcb_ok = tcb.bootloader == cert_tcb.bootloader
            && tcb.tee == cert_tcb.tee
            && tcb.snp == cert_tcb.snp
            && tcb.microcode == cert_tcb.microcode
            && (cert_tcb.fmc.is_none() || tcb.fmc == cert_tcb.fmc);
        if !tcb_ok {
            return Err(check(format!(
                "reported TCB (bootloader {}, tee {}, snp {}, microcode {}) differs from the certificate's (bootloader {}, tee {}, snp {}, microcode {})",
                tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode, cert_tcb.bootloader, cert_tcb.tee, cert_tcb.snp, cert_tcb.microcode
            )));
        }
        if let (EndorsementKey::Vcek, Some(hwid)) = (kind, &cert_tcb.hwid) {
            let chip = &report.chip_id[..];
            let masked = chip.iter().all(|b| *b == 0);
            if !masked && !chip.starts_with(hwid) {
                return Err(check("report chip id differs from the VCEK's hardware id"));
            }
        }
        if let Some(want) = expected.report_data {
            if report.report_data[..] != fit_report_data(want, 64)[..] {
                return Err(VerifyError::ReportData);
            }
        }
        if let Some(want) = expected.init_data_digest {
            if report.host_data[..] != fit_report_data(want, 32)[..] {
                return Err(VerifyError::InitData);
            }
        }
        Ok(claims(&report, &key))
    }
}

fn claims(r: &AttestationReport, key: &EndorsedKey) -> Claims {
    let policy: u64 = r.policy.into();
    let plat: u64 = r.plat_info.into();
    let bit = |v: u64, n: u32| (v >> n) & 1 == 1;
    let tcb = |t: &sev::firmware::host::TcbVersion| json!({"bootloader": t.bootloader, "tee": t.tee, "snp": t.snp, "microcode": t.microcode, "fmc": t.fmc});
    let v = json!({
        "version": r.version,
        "guest_svn": r.guest_svn,
        "policy": policy,
        "policy_abi_minor": policy & 0xff,
        "policy_abi_major": (policy >> 8) & 0xff,
        "policy_smt_allowed": bit(policy, 16),
        "policy_migrate_ma": bit(policy, 18),
        "policy_debug_allowed": bit(policy, 19),
        "policy_single_socket": bit(policy, 20),
        "platform_smt_enabled": bit(plat, 0),
        "platform_tsme_enabled": bit(plat, 1),
        "vmpl": r.vmpl,
        "family_id": hex::encode(r.family_id),
        "image_id": hex::encode(r.image_id),
        "measurement": hex::encode(r.measurement),
        "host_data": hex::encode(r.host_data),
        "report_data": hex::encode(r.report_data),
        "id_key_digest": hex::encode(r.id_key_digest),
        "author_key_digest": hex::encode(r.author_key_digest),
        "chip_id": hex::encode(r.chip_id),
        "reported_tcb": tcb(&r.reported_tcb),
        "current_tcb": tcb(&r.current_tcb),
        "committed_tcb": tcb(&r.committed_tcb),
        "launch_tcb": tcb(&r.launch_tcb),
        "signing_key": match key.kind { EndorsementKey::Vcek => "vcek", EndorsementKey::Vlek => "vlek" },
        "generation": key.generation.name(),
        "emulated": key.generation == Generation::Emulated,
    });
    match v {
        Value::Object(m) => m,
        _ => Claims::new(),
    }
}

impl Verifier for SnpVerifier {
    fn tee(&self) -> Tee {
        Tee::Snp
    }

    fn verify(&self, evidence: &Value, expected: &Expected<'_>) -> Result<Claims, VerifyError> {
        let ev: SnpEvidence = serde_json::from_value(evidence.clone())
            .map_err(|e| VerifyError::Malformed(format!("SNP evidence: {e}")))?;
        let raw = ev
            .attestation_report
            .to_bytes()
            .map_err(|e| VerifyError::Malformed(format!("SNP report does not encode: {e}")))?;
        let raw: &[u8] = raw.as_ref();
        let kind = signing_key(raw)?;
        let wanted = match kind {
            EndorsementKey::Vcek => "VCEK",
            EndorsementKey::Vlek => "VLEK",
        };
        let carried = ev
            .cert_chain
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find(|c| c.cert_type.eq_ignore_ascii_case(wanted))
            .map(|c| c.data.clone());
        let cert = match (carried, &self.vcek_dir, kind) {
            (Some(c), _, _) => c,
            (None, Some(dir), EndorsementKey::Vcek) => {
                let path = dir.join(Self::vcek_file_name(&ev.attestation_report));
                std::fs::read(&path).map_err(|e| {
                    check(format!(
                        "evidence carries no VCEK and the offline cache has none ({}: {e})",
                        path.display()
                    ))
                })?
            }
            _ => {
                return Err(check(format!(
                    "evidence carries no {wanted} certificate (cert_chain) and no offline VCEK cache is configured"
                )))
            }
        };
        self.verify_report(raw, &cert, expected)
    }
}

#[cfg(test)]
mod tests;
