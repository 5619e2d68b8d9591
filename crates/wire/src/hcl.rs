//! Azure's HCL report: what the paravisor of an Azure confidential VM stores in the vTPM's NV
//! index [`NV_INDEX`] so that the guest can prove its vTPM attestation key runs in a TEE.
//!
//! Layout (all integers little-endian): a 32-byte header starting with the magic `HCLA`; the
//! hardware report at `0x20` (SEV-SNP: the 1184-byte attestation report; TDX: the 1024-byte
//! TDREPORT); then, at `0x4C0`, the request data: `data_size`, `version`, `report_type`
//! ([`REPORT_TYPE_SNP`] or [`REPORT_TYPE_TDX`]), `hash_type` ([`HASH_TYPE_SHA256`]),
//! `variable_data_size`, and the variable data — JSON whose `keys` hold the vTPM attestation key
//! as the RSA JWK `HCLAkPub`. The hardware report's REPORT_DATA begins with the SHA-256 of that
//! variable data, which binds the key to the hardware.
//!
//! The guest reads it ([`parse`]); a verifier checks it; the test kit writes one into a TPM
//! simulator's NV index the way the paravisor does ([`build`]).

/// The vTPM NV index holding the HCL report.
pub const NV_INDEX: u32 = 0x0140_0001;
/// The vTPM persistent handle of the attestation key the HCL report names.
pub const AK_HANDLE: u32 = 0x8100_0003;
/// `report_type` of an SEV-SNP HCL report.
pub const REPORT_TYPE_SNP: u32 = 2;
/// `report_type` of a TDX HCL report.
pub const REPORT_TYPE_TDX: u32 = 4;
/// `hash_type` SHA-256: how the variable data is hashed into REPORT_DATA.
pub const HASH_TYPE_SHA256: u32 = 1;
/// The header's magic.
pub const MAGIC: &[u8; 4] = b"HCLA";
/// Where the hardware report starts.
pub const HW_REPORT_OFFSET: usize = 0x20;
/// Where the request data starts.
pub const REQUEST_DATA_OFFSET: usize = 0x4C0;
/// The size of an SEV-SNP attestation report.
pub const SNP_REPORT_LEN: usize = 0x4A0;
/// The size of a TDX TDREPORT.
pub const TD_REPORT_LEN: usize = 0x400;
const REQUEST_HEADER_LEN: usize = 20;

/// Why bytes are not an HCL report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HclError {
    /// The magic is missing.
    #[error("not an HCL report (no HCLA magic)")]
    Magic,
    /// The report ends before a part it declares.
    #[error("HCL report truncated: {0}")]
    Truncated(&'static str),
    /// The variable data is not hashed with SHA-256.
    #[error("HCL report hash type {0} is not SHA-256 (1)")]
    HashType(u32),
    /// The hardware report is of a kind this crate does not know.
    #[error("HCL report type {0} is neither SEV-SNP (2) nor TDX (4)")]
    ReportType(u32),
}

/// A parsed HCL report, borrowing from its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HclReport<'a> {
    /// [`REPORT_TYPE_SNP`] or [`REPORT_TYPE_TDX`].
    pub report_type: u32,
    /// The hardware report: the SNP attestation report or the TDREPORT.
    pub hw_report: &'a [u8],
    /// The variable data (JSON holding `HCLAkPub`).
    pub var_data: &'a [u8],
}

fn le32(b: &[u8], at: usize) -> Result<u32, HclError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
        .ok_or(HclError::Truncated("request data header"))
}

/// Parses an HCL report.
pub fn parse(b: &[u8]) -> Result<HclReport<'_>, HclError> {
    if !b.starts_with(MAGIC) {
        return Err(HclError::Magic);
    }
    let report_type = le32(b, REQUEST_DATA_OFFSET + 8)?;
    let hash_type = le32(b, REQUEST_DATA_OFFSET + 12)?;
    let var_len = le32(b, REQUEST_DATA_OFFSET + 16)? as usize;
    if hash_type != HASH_TYPE_SHA256 {
        return Err(HclError::HashType(hash_type));
    }
    let len = match report_type {
        REPORT_TYPE_SNP => SNP_REPORT_LEN,
        REPORT_TYPE_TDX => TD_REPORT_LEN,
        other => return Err(HclError::ReportType(other)),
    };
    let hw_report = &b[HW_REPORT_OFFSET..HW_REPORT_OFFSET + len];
    let start = REQUEST_DATA_OFFSET + REQUEST_HEADER_LEN;
    let var_data = b
        .get(start..start.saturating_add(var_len))
        .ok_or(HclError::Truncated("variable data"))?;
    Ok(HclReport {
        report_type,
        hw_report,
        var_data,
    })
}

/// Writes an HCL report in the layout [`parse`] reads. The hardware report must be the size its
/// type has; `var_data` is stored as given.
pub fn build(report_type: u32, hw_report: &[u8], var_data: &[u8]) -> Result<Vec<u8>, HclError> {
    let len = match report_type {
        REPORT_TYPE_SNP => SNP_REPORT_LEN,
        REPORT_TYPE_TDX => TD_REPORT_LEN,
        other => return Err(HclError::ReportType(other)),
    };
    if hw_report.len() != len {
        return Err(HclError::Truncated("hardware report"));
    }
    let total = REQUEST_DATA_OFFSET + REQUEST_HEADER_LEN + var_data.len();
    let mut b = vec![0u8; total];
    b[..4].copy_from_slice(MAGIC);
    b[4..8].copy_from_slice(&1u32.to_le_bytes()); // header version
    b[8..12].copy_from_slice(&(total as u32).to_le_bytes());
    b[HW_REPORT_OFFSET..HW_REPORT_OFFSET + len].copy_from_slice(hw_report);
    let r = REQUEST_DATA_OFFSET;
    let fields = [
        (REQUEST_HEADER_LEN + var_data.len()) as u32,
        1, // request data version
        report_type,
        HASH_TYPE_SHA256,
        var_data.len() as u32,
    ];
    for (i, v) in fields.iter().enumerate() {
        b[r + 4 * i..r + 4 * i + 4].copy_from_slice(&v.to_le_bytes());
    }
    b[r + REQUEST_HEADER_LEN..].copy_from_slice(var_data);
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_built_report_parses_back_and_damage_is_named() {
        let snp = vec![7u8; SNP_REPORT_LEN];
        let var = br#"{"keys":[]}"#;
        let b = build(REPORT_TYPE_SNP, &snp, var).unwrap();
        let r = parse(&b).unwrap();
        assert_eq!(r.report_type, REPORT_TYPE_SNP);
        assert_eq!(r.hw_report, &snp[..]);
        assert_eq!(r.var_data, var);

        let mut bad = b.clone();
        bad[0] = b'X';
        assert_eq!(parse(&bad), Err(HclError::Magic));
        let mut bad = b.clone();
        bad[REQUEST_DATA_OFFSET + 12] = 2;
        assert_eq!(parse(&bad), Err(HclError::HashType(2)));
        let mut bad = b.clone();
        bad[REQUEST_DATA_OFFSET + 8] = 9;
        assert_eq!(parse(&bad), Err(HclError::ReportType(9)));
        assert_eq!(
            parse(&b[..b.len() - 1]),
            Err(HclError::Truncated("variable data"))
        );
        assert!(build(REPORT_TYPE_TDX, &snp, var).is_err());
    }
}
