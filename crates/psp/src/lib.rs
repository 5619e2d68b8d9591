//! The emulated PSP.
//!
//! On machines without TEE hardware a software PSP stands in for AMD's Platform Security
//! Processor. It owns an emulated root chain with the same X.509 structure as AMD's — an ARK
//! and an ASK (RSA, RSASSA-PSS with SHA-384, self-signed and ARK-signed) and a VCEK (EC P-384)
//! carrying AMD's TCB and hardware-id extensions — and issues attestation reports in the real
//! SEV-SNP format (version 3, signed with the VCEK over bytes `0x000..0x2A0`).
//!
//! As with the real PSP, the guest supplies only REPORT_DATA; the PSP's owner (the launcher)
//! sets MEASUREMENT (of what it booted) and HOST_DATA (the initdata digest). Emulation gives no
//! confidentiality: verifiers accept its root only when explicitly told to, and mark the claims
//! `emulated`.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod channel;

mod x509;

use std::{
    path::Path,
    time::{Duration, SystemTime},
};

use aws_lc_rs::{
    encoding::AsDer,
    rand::{SecureRandom, SystemRandom},
    signature::{EcdsaKeyPair, KeyPair, ECDSA_P384_SHA384_FIXED_SIGNING},
};
use serde_json::{json, Value};
use sev::{
    firmware::{
        guest::{AttestationReport, GuestPolicy, PlatformInfo},
        host::TcbVersion,
    },
    parser::ByteParser,
};
use zeroize::Zeroizing;

/// Common-name prefix of the emulated certificates (`ARK-Emulated`, `SEV-Emulated`).
pub const EMULATED_NAME: &str = "Emulated";

/// Size of a report.
pub const REPORT_LEN: usize = 0x4A0;
const SIGNED_LEN: usize = 0x2A0;

/// Emulated PSP failures.
#[derive(Debug, thiserror::Error)]
pub enum PspError {
    /// Key generation or signing failed.
    #[error("emulated PSP crypto failed: {0}")]
    Crypto(&'static str),
    /// Certificate encoding failed.
    #[error("emulated PSP certificate encoding failed: {0}")]
    Cert(String),
    /// Reading or writing the PSP's state failed.
    #[error("emulated PSP state in {path}: {detail}")]
    State {
        /// The file.
        path: String,
        /// What failed.
        detail: String,
    },
    /// The report did not encode.
    #[error("report encoding failed: {0}")]
    Report(String),
}

type Result<T> = std::result::Result<T, PspError>;

/// The TCB the emulated platform reports (and its VCEK certifies).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tcb {
    /// Bootloader SPL.
    pub bootloader: u8,
    /// TEE SPL.
    pub tee: u8,
    /// SNP SPL.
    pub snp: u8,
    /// Microcode SPL.
    pub microcode: u8,
}

impl Default for Tcb {
    fn default() -> Self {
        Self {
            bootloader: 10,
            tee: 0,
            snp: 23,
            microcode: 84,
        }
    }
}

/// What the PSP's owner sets at launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    /// The launch measurement (of what was booted).
    pub measurement: [u8; 48],
    /// HOST_DATA (the initdata digest, fitted to 32 bytes).
    pub host_data: [u8; 32],
    /// The guest policy (debug bit 19 off by default; SMT allowed, ABI 0.0).
    pub policy: u64,
}

impl Default for Launch {
    fn default() -> Self {
        Self {
            measurement: [0; 48],
            host_data: [0; 32],
            policy: DEFAULT_POLICY,
        }
    }
}

/// An emulated PSP with its chain and VCEK key.
pub struct EmulatedPsp {
    ark_pem: String,
    ask_pem: String,
    vcek_der: Vec<u8>,
    vcek_key: EcdsaKeyPair,
    /// The same key for report signatures: deterministic ECDSA (RFC 6979), so that signing
    /// needs no seeded random generator (seeding aws-lc's costs tens of milliseconds per
    /// process, on every sandbox launch).
    report_key: p384::ecdsa::SigningKey,
    chip_id: [u8; 64],
    tcb: Tcb,
    launch: Launch,
}

/// Default guest policy: ABI 0.0, bit 17 (reserved, must be one), SMT allowed; debug off.
pub const DEFAULT_POLICY: u64 = (1 << 17) | (1 << 16);

impl EmulatedPsp {
    /// A new PSP with fresh keys: ARK and ASK are RSA-3072, the VCEK is P-384; certificates valid
    /// for 25 years (ARK, ASK) and 7 years (VCEK) from now.
    pub fn generate(tcb: Tcb) -> Result<Self> {
        let rng = SystemRandom::new();
        let mut chip_id = [0u8; 64];
        rng.fill(&mut chip_id)
            .map_err(|_| PspError::Crypto("random"))?;
        let now = SystemTime::now() - Duration::from_secs(3600);
        let chain = x509::issue_chain(now, &chip_id, tcb)?;
        let vcek_key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &chain.vcek_pkcs8)
                .map_err(|_| PspError::Crypto("VCEK key"))?;
        Ok(Self {
            ark_pem: chain.ark_pem,
            ask_pem: chain.ask_pem,
            vcek_der: chain.vcek_der,
            report_key: report_key(&vcek_key)?,
            vcek_key,
            chip_id,
            tcb,
            launch: Launch::default(),
        })
    }

    /// Saves the PSP's state to `dir`: `roots.pem` (what a KBS trusts with `--emulated-root`),
    /// `ark.pem`, `ask.pem`, `vcek.der`, `platform.json` (chip id and TCB) and `vcek-key.p8`
    /// (mode 0600). Each file is written atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let st = |p: &Path, e: std::io::Error| PspError::State {
            path: p.display().to_string(),
            detail: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| st(dir, e))?;
        let key = self
            .vcek_key
            .private_key()
            .as_der()
            .map_err(|_| PspError::Crypto("VCEK key export"))?;
        let platform =
            json!({"chip_id": hex::encode(self.chip_id), "bootloader": self.tcb.bootloader,
            "tee": self.tcb.tee, "snp": self.tcb.snp, "microcode": self.tcb.microcode})
            .to_string();
        let roots = self.roots_pem();
        let files: [(&str, &[u8], bool); 6] = [
            ("roots.pem", roots.as_bytes(), false),
            ("ark.pem", self.ark_pem.as_bytes(), false),
            ("ask.pem", self.ask_pem.as_bytes(), false),
            ("vcek.der", &self.vcek_der, false),
            ("vcek-key.p8", key.as_ref(), true),
            ("platform.json", platform.as_bytes(), false),
        ];
        for (name, bytes, private) in files {
            let path = dir.join(name);
            write_atomic(&path, bytes, private).map_err(|e| st(&path, e))?;
        }
        Ok(())
    }

    /// Loads a PSP saved with [`EmulatedPsp::save`].
    pub fn load(dir: &Path) -> Result<Self> {
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read(&p).map_err(|e| PspError::State {
                path: p.display().to_string(),
                detail: e.to_string(),
            })
        };
        let bad = |name: &str, d: &str| PspError::State {
            path: dir.join(name).display().to_string(),
            detail: d.to_string(),
        };
        let key = Zeroizing::new(read("vcek-key.p8")?);
        let vcek_key = EcdsaKeyPair::from_private_key_der(&ECDSA_P384_SHA384_FIXED_SIGNING, &key)
            .or_else(|_| EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &key))
            .map_err(|_| bad("vcek-key.p8", "not a P-384 private key"))?;
        let platform: Value = serde_json::from_slice(&read("platform.json")?)
            .map_err(|e| bad("platform.json", &e.to_string()))?;
        let byte = |k: &str| {
            platform[k]
                .as_u64()
                .and_then(|v| u8::try_from(v).ok())
                .ok_or_else(|| bad("platform.json", &format!("{k} missing")))
        };
        let chip = platform["chip_id"]
            .as_str()
            .and_then(|h| hex::decode(h).ok())
            .filter(|v| v.len() == 64)
            .ok_or_else(|| bad("platform.json", "chip_id must be 64 bytes of hex"))?;
        let mut chip_id = [0u8; 64];
        chip_id.copy_from_slice(&chip);
        Ok(Self {
            ark_pem: String::from_utf8(read("ark.pem")?).map_err(|_| bad("ark.pem", "not PEM"))?,
            ask_pem: String::from_utf8(read("ask.pem")?).map_err(|_| bad("ask.pem", "not PEM"))?,
            vcek_der: read("vcek.der")?,
            report_key: report_key(&vcek_key)?,
            vcek_key,
            chip_id,
            tcb: Tcb {
                bootloader: byte("bootloader")?,
                tee: byte("tee")?,
                snp: byte("snp")?,
                microcode: byte("microcode")?,
            },
            launch: Launch::default(),
        })
    }

    /// Loads the PSP in `dir`, or generates and saves one there.
    pub fn load_or_generate(dir: &Path) -> Result<Self> {
        if dir.join("vcek-key.p8").exists() {
            Self::load(dir)
        } else {
            let psp = Self::generate(Tcb::default())?;
            psp.save(dir)?;
            Ok(psp)
        }
    }

    /// Sets what the launcher measured and the HOST_DATA it passes.
    pub fn set_launch(&mut self, launch: Launch) {
        self.launch = launch;
    }

    /// The emulated roots as a PEM bundle (ASK then ARK, as AMD's bundles order them) for a
    /// verifier's trust store; `save` writes it as `roots.pem`.
    pub fn roots_pem(&self) -> String {
        format!("{}{}", self.ask_pem, self.ark_pem)
    }

    /// The TCB this PSP reports.
    pub fn tcb(&self) -> Tcb {
        self.tcb
    }

    /// The VCEK (DER).
    pub fn vcek_der(&self) -> &[u8] {
        &self.vcek_der
    }

    /// A signed report carrying `report_data`, with the launch's measurement and host data.
    pub fn report(&self, report_data: &[u8; 64]) -> Result<Vec<u8>> {
        let tcb = TcbVersion {
            fmc: None,
            bootloader: self.tcb.bootloader,
            tee: self.tcb.tee,
            snp: self.tcb.snp,
            microcode: self.tcb.microcode,
        };
        let report = AttestationReport {
            version: 3,
            guest_svn: 0,
            policy: GuestPolicy::from(self.launch.policy),
            vmpl: 0,
            sig_algo: 1,
            current_tcb: tcb,
            plat_info: PlatformInfo::from(1u64),
            report_data: *report_data,
            measurement: self.launch.measurement,
            host_data: self.launch.host_data,
            reported_tcb: tcb,
            committed_tcb: tcb,
            launch_tcb: tcb,
            chip_id: self.chip_id,
            // Genoa's CPUID family/model/stepping: the report layout of Milan/Genoa.
            cpuid_fam_id: Some(0x19),
            cpuid_mod_id: Some(0x11),
            cpuid_step: Some(0x01),
            ..AttestationReport::default()
        };
        let mut raw = report
            .to_bytes()
            .map_err(|e| PspError::Report(e.to_string()))?
            .as_ref()
            .to_vec();
        let sig: p384::ecdsa::Signature =
            p384::ecdsa::signature::Signer::sign(&self.report_key, &raw[..SIGNED_LEN]);
        let sig = sig.to_bytes();
        let sig = sig.as_ref();
        // R and S: big-endian 48 bytes each -> little-endian 72-byte fields.
        raw[SIGNED_LEN..SIGNED_LEN + 144].fill(0);
        for i in 0..48 {
            raw[SIGNED_LEN + i] = sig[47 - i];
            raw[SIGNED_LEN + 72 + i] = sig[95 - i];
        }
        Ok(raw)
    }

    /// The report as upstream attestation agents send SNP evidence:
    /// `{"attestation_report": …, "cert_chain": [{"cert_type": "VCEK", "data": […]}]}`.
    pub fn evidence(&self, report_data: &[u8; 64]) -> Result<Value> {
        let raw = self.report(report_data)?;
        let parsed =
            AttestationReport::from_bytes(&raw).map_err(|e| PspError::Report(e.to_string()))?;
        Ok(json!({
            "attestation_report": parsed,
            "cert_chain": [{"cert_type": "VCEK", "data": self.vcek_der}],
        }))
    }

    /// The VCEK's public key (uncompressed P-384 point).
    pub fn vcek_public(&self) -> &[u8] {
        self.vcek_key.public_key().as_ref()
    }
}

/// The VCEK's private scalar as a RustCrypto signing key.
fn report_key(vcek: &EcdsaKeyPair) -> Result<p384::ecdsa::SigningKey> {
    use aws_lc_rs::encoding::AsBigEndian;
    let scalar = vcek
        .private_key()
        .as_be_bytes()
        .map_err(|_| PspError::Crypto("VCEK key export"))?;
    p384::ecdsa::SigningKey::from_slice(scalar.as_ref()).map_err(|_| PspError::Crypto("VCEK key"))
}

fn write_atomic(path: &Path, bytes: &[u8], private: bool) -> std::io::Result<()> {
    coffer_fsutil::write_atomic(path, bytes, if private { 0o600 } else { 0o644 })
}

#[cfg(test)]
mod tests;
