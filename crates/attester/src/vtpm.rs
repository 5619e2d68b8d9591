//! Azure confidential VMs: evidence from the paravisor's vTPM (`az-snp-vtpm`, `az-tdx-vtpm`).
//!
//! On an Azure CVM the guest cannot ask the TEE directly; the paravisor (HCL) below it did so at
//! boot and left the answer in the vTPM: the HCL report at NV index [`hcl::NV_INDEX`], whose
//! hardware report binds (by REPORT_DATA = SHA-256 of its variable data) the vTPM attestation key
//! at persistent handle [`hcl::AK_HANDLE`]. The guest's evidence is therefore that report plus a
//! TPM quote by that key over the SHA-256 PCRs 0–23, with the runtime-data digest as the quote's
//! qualifying data (the nonce). Initdata is bound by extending PCR 8 once with its SHA-256
//! digest before the first quote (the verifier checks PCR 8 = SHA-256(32 zero bytes ‖ digest)).
//!
//! The hardware report's certificates come from Azure's instance metadata service (IMDS), as
//! Azure's own guests get them: the VCEK from `/metadata/THIM/amd/certification` for SEV-SNP;
//! for TDX the TD quote, which IMDS's `/acc/tdquote` makes from the TDREPORT in the HCL report.
//!
//! TPM access is through the TSS 2.0 ESAPI (`tss-esapi` over Debian's libtss2): the device
//! `/dev/tpmrm0` in a guest, or a simulator in tests (`swtpm:host=…,port=…`).

use std::str::FromStr;
use std::time::Duration;

use base64::Engine;
use coffer_wire::hcl;
use kbs_types::Tee;
use serde_json::{json, Value};
use tss_esapi::{
    abstraction::{nv, pcr},
    handles::{NvIndexTpmHandle, PcrHandle, PersistentTpmHandle, TpmHandle},
    interface_types::{algorithm::HashingAlgorithm, resource_handles::NvAuth},
    structures::{
        AttestInfo, Data, Digest, DigestValues, PcrSelectionListBuilder, PcrSlot, Signature,
        SignatureScheme,
    },
    traits::Marshall,
    Context, TctiNameConf,
};

use crate::AttesterError;
#[cfg(doc)]
use crate::{AZURE_IMDS, TPM_DEVICE_TCTI};
/// The PCR initdata is extended into.
pub const INITDATA_PCR: u8 = 8;
/// How long an IMDS request may take.
const IMDS_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a quote is retaken when a PCR moved between the quote and the read of the values.
const QUOTE_TRIES: usize = 3;

const ALL_PCRS: [PcrSlot; 24] = [
    PcrSlot::Slot0,
    PcrSlot::Slot1,
    PcrSlot::Slot2,
    PcrSlot::Slot3,
    PcrSlot::Slot4,
    PcrSlot::Slot5,
    PcrSlot::Slot6,
    PcrSlot::Slot7,
    PcrSlot::Slot8,
    PcrSlot::Slot9,
    PcrSlot::Slot10,
    PcrSlot::Slot11,
    PcrSlot::Slot12,
    PcrSlot::Slot13,
    PcrSlot::Slot14,
    PcrSlot::Slot15,
    PcrSlot::Slot16,
    PcrSlot::Slot17,
    PcrSlot::Slot18,
    PcrSlot::Slot19,
    PcrSlot::Slot20,
    PcrSlot::Slot21,
    PcrSlot::Slot22,
    PcrSlot::Slot23,
];

fn tpm_err(what: &str) -> impl FnOnce(tss_esapi::Error) -> AttesterError + '_ {
    move |e| AttesterError::Invalid(format!("vTPM: {what}: {e}"))
}

/// A TPM quote as the Azure verifiers take it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmQuote {
    /// The marshalled `TPMS_ATTEST`.
    pub message: Vec<u8>,
    /// The RSASSA signature by the attestation key.
    pub signature: Vec<u8>,
    /// The SHA-256 PCR values 0–23 the quote covers, in order.
    pub pcrs: Vec<Vec<u8>>,
}

impl TpmQuote {
    /// The `tpm_quote` member of the evidence (hex, as Azure's guests send it).
    pub fn to_json(&self) -> Value {
        json!({
            "signature": hex(&self.signature),
            "message": hex(&self.message),
            "pcrs": self.pcrs.iter().map(|p| hex(p)).collect::<Vec<_>>(),
        })
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The vTPM, reached through one TCTI configuration. A context is opened per operation, so
/// that the attester can be shared between threads (an ESAPI context cannot).
#[derive(Debug, Clone)]
pub struct Vtpm {
    tcti: String,
}

impl Vtpm {
    /// The TPM behind `tcti` (e.g. [`TPM_DEVICE_TCTI`] or `swtpm:host=127.0.0.1,port=2321`).
    pub fn new(tcti: &str) -> Self {
        Self { tcti: tcti.into() }
    }

    fn context(&self) -> Result<Context, AttesterError> {
        let conf = TctiNameConf::from_str(&self.tcti).map_err(|e| {
            AttesterError::Invalid(format!("vTPM: TCTI {:?} is not valid: {e}", self.tcti))
        })?;
        Context::new(conf).map_err(|e| {
            AttesterError::NoTee(format!("cannot open the TPM at {:?}: {e}", self.tcti))
        })
    }

    /// The HCL report the paravisor left in [`hcl::NV_INDEX`]. Absent: this is not an Azure CVM.
    pub fn hcl_report(&self) -> Result<Vec<u8>, AttesterError> {
        let mut ctx = self.context()?;
        let index = NvIndexTpmHandle::new(hcl::NV_INDEX).map_err(tpm_err("NV index"))?;
        let bytes = ctx
            .execute_with_nullauth_session(|ctx| nv::read_full(ctx, NvAuth::Owner, index))
            .map_err(|e| {
                AttesterError::NoTee(format!(
                    "the TPM at {:?} holds no HCL report at NV index {:#x} (not an Azure confidential VM): {e}",
                    self.tcti,
                    hcl::NV_INDEX
                ))
            })?;
        hcl::parse(&bytes).map_err(|e| AttesterError::Invalid(format!("vTPM: {e}")))?;
        Ok(bytes)
    }

    /// Binds initdata: extends PCR 8 with `digest` (SHA-256, 32 bytes) if it is still zero,
    /// accepts it as it is if that extension was already made, and refuses anything else (PCR 8
    /// was used for something else, or another initdata was bound).
    pub fn bind_init_data(&self, digest: &[u8]) -> Result<(), AttesterError> {
        if digest.len() != 32 {
            return Err(AttesterError::Invalid(format!(
                "a vTPM binds initdata into the SHA-256 PCR {INITDATA_PCR}: the initdata must use algorithm sha256, not a {}-byte digest",
                digest.len()
            )));
        }
        let mut ctx = self.context()?;
        let now = self.read_pcrs(&mut ctx, &[PcrSlot::Slot8])?;
        let want = extend_value(&[0u8; 32], digest);
        if now[0] == want {
            return Ok(());
        }
        if now[0] != [0u8; 32] {
            return Err(AttesterError::Invalid(format!(
                "PCR {INITDATA_PCR} already holds another value: initdata cannot be bound (was another initdata bound first?)"
            )));
        }
        let mut vals = DigestValues::new();
        vals.set(
            HashingAlgorithm::Sha256,
            Digest::try_from(digest.to_vec()).map_err(tpm_err("digest"))?,
        );
        ctx.execute_with_nullauth_session(|ctx| ctx.pcr_extend(PcrHandle::Pcr8, vals))
            .map_err(tpm_err("extending PCR 8"))
    }

    fn read_pcrs(
        &self,
        ctx: &mut Context,
        slots: &[PcrSlot],
    ) -> Result<Vec<Vec<u8>>, AttesterError> {
        let sel = PcrSelectionListBuilder::new()
            .with_selection(HashingAlgorithm::Sha256, slots)
            .build()
            .map_err(tpm_err("PCR selection"))?;
        let data = ctx
            .execute_without_session(|ctx| pcr::read_all(ctx, sel))
            .map_err(tpm_err("reading PCRs"))?;
        let bank = data.pcr_bank(HashingAlgorithm::Sha256).ok_or_else(|| {
            AttesterError::Invalid("vTPM: the TPM has no SHA-256 PCR bank".into())
        })?;
        slots
            .iter()
            .map(|s| {
                bank.get_digest(*s)
                    .map(|d| d.value().to_vec())
                    .ok_or_else(|| {
                        AttesterError::Invalid(format!("vTPM: no SHA-256 value for {s:?}"))
                    })
            })
            .collect()
    }

    /// A quote by the attestation key at [`hcl::AK_HANDLE`] over the SHA-256 PCRs 0–23 with
    /// `nonce` (at most 64 bytes) as qualifying data, and the PCR values it covers.
    pub fn quote(&self, nonce: &[u8]) -> Result<TpmQuote, AttesterError> {
        let mut ctx = self.context()?;
        let ak = PersistentTpmHandle::new(hcl::AK_HANDLE).map_err(tpm_err("AK handle"))?;
        let ak = ctx
            .execute_without_session(|ctx| ctx.tr_from_tpm_public(TpmHandle::Persistent(ak)))
            .map_err(|e| {
                AttesterError::Invalid(format!(
                    "vTPM: no attestation key at persistent handle {:#x}: {e}",
                    hcl::AK_HANDLE
                ))
            })?;
        let data = Data::try_from(nonce.to_vec()).map_err(|_| {
            AttesterError::Invalid(format!(
                "vTPM: the nonce is {} bytes; a quote takes at most 64",
                nonce.len()
            ))
        })?;
        let sel = PcrSelectionListBuilder::new()
            .with_selection(HashingAlgorithm::Sha256, &ALL_PCRS)
            .build()
            .map_err(tpm_err("PCR selection"))?;
        for _ in 0..QUOTE_TRIES {
            let (attest, sig) = ctx
                .execute_with_nullauth_session(|ctx| {
                    ctx.quote(ak.into(), data.clone(), SignatureScheme::Null, sel.clone())
                })
                .map_err(tpm_err("quote"))?;
            let signature = match sig {
                Signature::RsaSsa(s) => s.signature().value().to_vec(),
                other => {
                    return Err(AttesterError::Invalid(format!(
                        "vTPM: the attestation key signs with {:?}, not RSASSA",
                        other.algorithm()
                    )))
                }
            };
            let signed_digest = match attest.attested() {
                AttestInfo::Quote { info } => info.pcr_digest().value().to_vec(),
                _ => {
                    return Err(AttesterError::Invalid(
                        "vTPM: the TPM did not return a quote".into(),
                    ))
                }
            };
            let message = attest
                .marshall()
                .map_err(tpm_err("marshalling the quote"))?;
            let pcrs = self.read_pcrs(&mut ctx, &ALL_PCRS)?;
            let mut h = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
            for p in &pcrs {
                h.update(p);
            }
            // A PCR extended between the quote and the read: take both again.
            if h.finish().as_ref() == signed_digest.as_slice() {
                return Ok(TpmQuote {
                    message,
                    signature,
                    pcrs,
                });
            }
        }
        Err(AttesterError::Race(format!(
            "the vTPM's PCRs (quoted {QUOTE_TRIES} times)"
        )))
    }
}

/// A PCR's value after extending `old` with `digest` (SHA-256 bank).
pub fn extend_value(old: &[u8], digest: &[u8]) -> Vec<u8> {
    let mut h = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    h.update(old);
    h.update(digest);
    h.finish().as_ref().to_vec()
}

/// An HTTP client for IMDS, bounded by [`IMDS_TIMEOUT`].
fn imds_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(IMDS_TIMEOUT))
        .build()
        .into()
}

fn imds_get(base: &str, path: &str) -> Result<Value, AttesterError> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let body = imds_agent()
        .get(&url)
        .header("Metadata", "true")
        .call()
        .and_then(|mut r| r.body_mut().read_to_string())
        .map_err(|e| AttesterError::Invalid(format!("Azure IMDS {url}: {e}")))?;
    serde_json::from_str(&body)
        .map_err(|e| AttesterError::Invalid(format!("Azure IMDS {url}: not JSON: {e}")))
}

fn imds_post(base: &str, path: &str, body: &Value) -> Result<Value, AttesterError> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let text = imds_agent()
        .post(&url)
        .header("Metadata", "true")
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .and_then(|mut r| r.body_mut().read_to_string())
        .map_err(|e| AttesterError::Invalid(format!("Azure IMDS {url}: {e}")))?;
    serde_json::from_str(&text)
        .map_err(|e| AttesterError::Invalid(format!("Azure IMDS {url}: not JSON: {e}")))
}

impl Vtpm {
    /// What both Azure attesters send: initdata bound first (when given), the HCL report of
    /// type `want` (`name` in errors), and the quote over `report_data`.
    fn hcl_and_quote(
        &self,
        report_data: &[u8],
        init_data_digest: Option<&[u8]>,
        want: u32,
        name: &str,
    ) -> Result<(Vec<u8>, TpmQuote), AttesterError> {
        if let Some(d) = init_data_digest {
            self.bind_init_data(d)?;
        }
        let report = self.hcl_report()?;
        let r = hcl::parse(&report).map_err(|e| AttesterError::Invalid(format!("vTPM: {e}")))?;
        if r.report_type != want {
            return Err(AttesterError::Invalid(format!(
                "vTPM: the HCL report holds report type {}, not {name}",
                r.report_type
            )));
        }
        let quote = self.quote(report_data)?;
        Ok((report, quote))
    }
}

/// Evidence of an Azure SEV-SNP CVM (`az-snp-vtpm`, format version 1): `{"version": "1",
/// "tpm_quote": {…}, "hcl_report": base64url (padded), "vcek": PEM}`.
#[derive(Debug, Clone)]
pub struct AzSnpVtpmAttester {
    vtpm: Vtpm,
    imds: String,
}

impl AzSnpVtpmAttester {
    /// The attester over the TPM at `tcti`, with IMDS at `imds` (normally [`AZURE_IMDS`]).
    pub fn new(tcti: &str, imds: &str) -> Self {
        Self {
            vtpm: Vtpm::new(tcti),
            imds: imds.into(),
        }
    }

    /// The evidence over `report_data`, initdata bound first when given.
    pub fn gather(
        &self,
        report_data: &[u8],
        init_data_digest: Option<&[u8]>,
    ) -> Result<Value, AttesterError> {
        let (report, quote) = self.vtpm.hcl_and_quote(
            report_data,
            init_data_digest,
            hcl::REPORT_TYPE_SNP,
            "SEV-SNP",
        )?;
        let certs = imds_get(&self.imds, "/metadata/THIM/amd/certification")?;
        let vcek = certs
            .get("vcekCert")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                AttesterError::Invalid("Azure IMDS certification has no vcekCert".into())
            })?;
        Ok(json!({
            "version": "1",
            "tpm_quote": quote.to_json(),
            "hcl_report": base64::engine::general_purpose::URL_SAFE.encode(&report),
            "vcek": vcek,
        }))
    }
}

impl coffer_kbs_client::Attester for AzSnpVtpmAttester {
    fn tee(&self) -> Tee {
        Tee::AzSnpVtpm
    }

    fn evidence(
        &self,
        report_data: &[u8],
        init_data_digest: Option<&[u8]>,
    ) -> Result<Value, coffer_kbs_client::AttesterError> {
        Ok(self.gather(report_data, init_data_digest)?)
    }
}

/// Evidence of an Azure TDX CVM (`az-tdx-vtpm`, format version 1): `{"version": "1",
/// "tpm_quote": {…}, "hcl_report": base64url, "td_quote": base64url}`, the TD quote made by IMDS
/// from the HCL report's TDREPORT.
#[derive(Debug, Clone)]
pub struct AzTdxVtpmAttester {
    vtpm: Vtpm,
    imds: String,
}

impl AzTdxVtpmAttester {
    /// The attester over the TPM at `tcti`, with IMDS at `imds` (normally [`AZURE_IMDS`]).
    pub fn new(tcti: &str, imds: &str) -> Self {
        Self {
            vtpm: Vtpm::new(tcti),
            imds: imds.into(),
        }
    }

    /// The evidence over `report_data`, initdata bound first when given.
    pub fn gather(
        &self,
        report_data: &[u8],
        init_data_digest: Option<&[u8]>,
    ) -> Result<Value, AttesterError> {
        use base64::engine::general_purpose::URL_SAFE as B64;
        let (report, quote) =
            self.vtpm
                .hcl_and_quote(report_data, init_data_digest, hcl::REPORT_TYPE_TDX, "TDX")?;
        let td_report = hcl::parse(&report)
            .map_err(|e| AttesterError::Invalid(format!("vTPM: {e}")))?
            .hw_report;
        let resp = imds_post(
            &self.imds,
            "/acc/tdquote",
            // IMDS takes the report as unpadded base64url.
            &json!({ "report": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(td_report) }),
        )?;
        let td_quote = resp
            .get("quote")
            .and_then(Value::as_str)
            .ok_or_else(|| AttesterError::Invalid("Azure IMDS tdquote has no quote".into()))?;
        // IMDS answers base64url, padded or not; check it decodes before it is sent on.
        let lenient = base64::engine::GeneralPurpose::new(
            &base64::alphabet::URL_SAFE,
            base64::engine::GeneralPurposeConfig::new()
                .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
        );
        let td_quote = lenient.decode(td_quote).map_err(|_| {
            AttesterError::Invalid("Azure IMDS tdquote: the quote is not base64url".into())
        })?;
        Ok(json!({
            "version": "1",
            "tpm_quote": quote.to_json(),
            "hcl_report": B64.encode(&report),
            "td_quote": B64.encode(&td_quote),
        }))
    }
}

impl coffer_kbs_client::Attester for AzTdxVtpmAttester {
    fn tee(&self) -> Tee {
        Tee::AzTdxVtpm
    }

    fn evidence(
        &self,
        report_data: &[u8],
        init_data_digest: Option<&[u8]>,
    ) -> Result<Value, coffer_kbs_client::AttesterError> {
        Ok(self.gather(report_data, init_data_digest)?)
    }
}

/// Which Azure attester the HCL report in the TPM at `tcti` calls for, if any.
pub fn probe(
    tcti: &str,
    imds: &str,
) -> Result<Box<dyn coffer_kbs_client::Attester>, AttesterError> {
    let report = Vtpm::new(tcti).hcl_report()?;
    let r = hcl::parse(&report).map_err(|e| AttesterError::Invalid(format!("vTPM: {e}")))?;
    Ok(match r.report_type {
        hcl::REPORT_TYPE_TDX => Box::new(AzTdxVtpmAttester::new(tcti, imds)),
        _ => Box::new(AzSnpVtpmAttester::new(tcti, imds)),
    })
}
