//! AMD SEV-SNP certificates: the ARK → ASK (or ASVK) → VCEK (or VLEK) chain, verified with the
//! built-in AMD roots of each processor generation, and the VCEK's TCB extensions.
//!
//! Facts: ARK and ASK/ASVK are RSA-4096 and sign with RSASSA-PSS (SHA-384); the VCEK/VLEK key is
//! EC P-384. Extensions under 1.3.6.1.4.1.3704.1: `.3.1` bootloader, `.3.2` TEE, `.3.3` SNP,
//! `.3.8` microcode and `.3.9` FMC (Turin) security patch levels (DER INTEGERs), `.4` the hardware
//! id (64-byte chip id; OCTET STRING, or the raw bytes in older certificates). Real VCEKs carry
//! serial number 0.

use std::time::SystemTime;

use aws_lc_rs::signature::{UnparsedPublicKey, RSA_PSS_2048_8192_SHA384};
use x509_cert::der::{asn1::OctetString, Decode, DecodePem, Encode};
pub use x509_cert::Certificate;

/// OID of RSASSA-PSS.
const RSA_PSS: &str = "1.2.840.113549.1.1.10";
/// OID of an EC public key.
const EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
/// OID of the P-384 curve.
const SECP384R1: &str = "1.3.132.0.34";

const OID_BOOTLOADER: &str = "1.3.6.1.4.1.3704.1.3.1";
const OID_TEE: &str = "1.3.6.1.4.1.3704.1.3.2";
const OID_SNP: &str = "1.3.6.1.4.1.3704.1.3.3";
const OID_MICROCODE: &str = "1.3.6.1.4.1.3704.1.3.8";
const OID_FMC: &str = "1.3.6.1.4.1.3704.1.3.9";
const OID_HWID: &str = "1.3.6.1.4.1.3704.1.4";

/// A failed certificate check.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The certificate does not parse.
    #[error("{what} is not a valid X.509 certificate: {detail}")]
    Parse {
        /// Which certificate.
        what: &'static str,
        /// The parser's message.
        detail: String,
    },
    /// A signature in the chain does not verify.
    #[error("{0}")]
    Chain(String),
    /// A certificate is outside its validity period.
    #[error("{what} is not valid at the verification time (valid {not_before} .. {not_after})")]
    Expired {
        /// Which certificate.
        what: String,
        /// Start of validity.
        not_before: String,
        /// End of validity.
        not_after: String,
    },
    /// The key or an extension is not what AMD issues.
    #[error("{0}")]
    Content(String),
}

/// AMD processor generations with their own roots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Generation {
    /// EPYC 7003.
    Milan,
    /// EPYC 9004.
    Genoa,
    /// EPYC 9005.
    Turin,
    /// The emulated PSP (no hardware; trusted only when the operator allows emulation).
    Emulated,
}

impl Generation {
    /// Lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Milan => "milan",
            Self::Genoa => "genoa",
            Self::Turin => "turin",
            Self::Emulated => "emulated",
        }
    }
}

/// Which key signed a report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndorsementKey {
    /// Versioned Chip Endorsement Key (per chip), issued by the ASK.
    Vcek,
    /// Versioned Loaded Endorsement Key (per cloud provider), issued by the ASVK.
    Vlek,
}

/// The roots of one generation, with ARK → ASK and ARK → ASVK already verified.
pub struct GenerationRoots {
    /// Which generation.
    pub generation: Generation,
    ark: Certificate,
    ask: Certificate,
    asvk: Option<Certificate>,
}

/// The built-in AMD roots (public certificates from AMD's key distribution service).
const BUILTIN: [(Generation, &str); 3] = [
    (
        Generation::Milan,
        include_str!("../../roots/amd_milan_ask_ark_asvk.pem"),
    ),
    (
        Generation::Genoa,
        include_str!("../../roots/amd_genoa_ask_ark_asvk.pem"),
    ),
    (
        Generation::Turin,
        include_str!("../../roots/amd_turin_ask_ark_asvk.pem"),
    ),
];

fn common_name(cert: &Certificate) -> String {
    cert.tbs_certificate
        .subject
        .0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .filter(|atv| atv.oid.to_string() == "2.5.4.3")
        .filter_map(|atv| {
            atv.value
                .decode_as::<x509_cert::der::asn1::Utf8StringRef<'_>>()
                .map(|s| s.as_str().to_string())
                .or_else(|_| {
                    atv.value
                        .decode_as::<x509_cert::der::asn1::PrintableStringRef<'_>>()
                        .map(|s| s.as_str().to_string())
                })
                .ok()
        })
        .next()
        .unwrap_or_default()
}

/// Verifies that `issuer` signed `subject` with RSASSA-PSS SHA-384.
pub fn verify_rsa_pss(
    issuer: &Certificate,
    subject: &Certificate,
    what: &str,
) -> Result<(), CertError> {
    if subject.signature_algorithm.oid.to_string() != RSA_PSS {
        return Err(CertError::Chain(format!(
            "{what}: signature algorithm {} is not RSASSA-PSS",
            subject.signature_algorithm.oid
        )));
    }
    let tbs = subject
        .tbs_certificate
        .to_der()
        .map_err(|e| CertError::Chain(format!("{what}: cannot encode: {e}")))?;
    let key = issuer
        .tbs_certificate
        .subject_public_key_info
        .subject_public_key
        .raw_bytes();
    let sig = subject.signature.raw_bytes();
    UnparsedPublicKey::new(&RSA_PSS_2048_8192_SHA384, key)
        .verify(&tbs, sig)
        .map_err(|_| CertError::Chain(format!("{what}: signature does not verify")))
}

/// Checks the validity period at `now`.
pub fn check_validity(cert: &Certificate, what: &str, now: SystemTime) -> Result<(), CertError> {
    let v = &cert.tbs_certificate.validity;
    let nb = v.not_before.to_system_time();
    let na = v.not_after.to_system_time();
    if now < nb || now > na {
        return Err(CertError::Expired {
            what: what.to_string(),
            not_before: v.not_before.to_string(),
            not_after: v.not_after.to_string(),
        });
    }
    Ok(())
}

impl GenerationRoots {
    /// Loads a PEM bundle holding an ARK, an ASK and optionally an ASVK (identified by common
    /// name), and verifies ARK self-signature and ARK → ASK, ARK → ASVK.
    pub fn from_pem(generation: Generation, pem: &str) -> Result<Self, CertError> {
        let certs = Certificate::load_pem_chain(pem.as_bytes()).map_err(|e| CertError::Parse {
            what: "AMD root bundle",
            detail: e.to_string(),
        })?;
        let find = |prefix: &str| {
            certs
                .iter()
                .find(|c| common_name(c).starts_with(prefix))
                .cloned()
                .ok_or_else(|| {
                    CertError::Content(format!("root bundle has no {prefix} certificate"))
                })
        };
        let ark = find("ARK-")?;
        let ask = certs
            .iter()
            .find(|c| {
                let cn = common_name(c);
                cn.starts_with("SEV-") && !cn.starts_with("SEV-VLEK-")
            })
            .cloned()
            .ok_or_else(|| CertError::Content("root bundle has no ASK certificate".into()))?;
        let asvk = find("SEV-VLEK-").ok();
        verify_rsa_pss(&ark, &ark, "ARK self-signature")?;
        verify_rsa_pss(&ark, &ask, "ARK -> ASK")?;
        if let Some(asvk) = &asvk {
            verify_rsa_pss(&ark, asvk, "ARK -> ASVK")?;
        }
        Ok(Self {
            generation,
            ark,
            ask,
            asvk,
        })
    }

    /// The built-in roots of every generation.
    pub fn builtin() -> Vec<Self> {
        BUILTIN
            .iter()
            .map(|(g, pem)| Self::from_pem(*g, pem).expect("built-in AMD roots verify"))
            .collect()
    }

    fn issuer(&self, key: EndorsementKey) -> Option<(&Certificate, &'static str)> {
        match key {
            EndorsementKey::Vcek => Some((&self.ask, "ASK")),
            EndorsementKey::Vlek => self.asvk.as_ref().map(|c| (c, "ASVK")),
        }
    }
}

/// The TCB and hardware-id extensions of a VCEK/VLEK.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcbExtensions {
    /// Bootloader SPL.
    pub bootloader: u8,
    /// TEE SPL.
    pub tee: u8,
    /// SNP SPL.
    pub snp: u8,
    /// Microcode SPL.
    pub microcode: u8,
    /// FMC SPL (Turin).
    pub fmc: Option<u8>,
    /// Hardware id (chip id); VCEKs only.
    pub hwid: Option<Vec<u8>>,
}

/// Reads the SPL and hardware-id extensions (both encodings of the hardware id).
pub fn tcb_extensions(cert: &Certificate, name: &str) -> Result<TcbExtensions, CertError> {
    let missing = |what: &str| CertError::Content(format!("{name} has no {what} SPL extension"));
    let hwid = ext_value(cert, OID_HWID).map(|raw| match OctetString::from_der(raw) {
        Ok(o) => o.as_bytes().to_vec(),
        Err(_) => raw.to_vec(),
    });
    Ok(TcbExtensions {
        bootloader: spl(cert, OID_BOOTLOADER, "bootloader")?
            .ok_or_else(|| missing("bootloader"))?,
        tee: spl(cert, OID_TEE, "TEE")?.ok_or_else(|| missing("TEE"))?,
        snp: spl(cert, OID_SNP, "SNP")?.ok_or_else(|| missing("SNP"))?,
        microcode: spl(cert, OID_MICROCODE, "microcode")?.ok_or_else(|| missing("microcode"))?,
        fmc: spl(cert, OID_FMC, "FMC")?,
        hwid,
    })
}

/// What a verified VCEK/VLEK says.
#[derive(Clone, Debug)]
pub struct EndorsedKey {
    /// Processor generation whose roots issued it.
    pub generation: Generation,
    /// Which kind of key.
    pub kind: EndorsementKey,
    /// The P-384 public key as an uncompressed point.
    pub public_point: Vec<u8>,
    /// Its TCB extensions.
    pub tcb: TcbExtensions,
    /// End of validity.
    pub not_after: SystemTime,
    /// Start of validity (the latest of the chain's).
    pub not_before: SystemTime,
}

fn ext_value<'a>(cert: &'a Certificate, oid: &str) -> Option<&'a [u8]> {
    cert.tbs_certificate
        .extensions
        .as_ref()?
        .iter()
        .find(|e| e.extn_id.to_string() == oid)
        .map(|e| e.extn_value.as_bytes())
}

fn spl(cert: &Certificate, oid: &str, name: &str) -> Result<Option<u8>, CertError> {
    let Some(raw) = ext_value(cert, oid) else {
        return Ok(None);
    };
    let v = u8::from_der(raw)
        .or_else(|_| u64::from_der(raw).map(|v| v.min(255) as u8))
        .map_err(|e| CertError::Content(format!("VCEK {name} extension is not an INTEGER: {e}")))?;
    Ok(Some(v))
}

/// Parses a DER certificate.
pub fn parse_der(der: &[u8], what: &'static str) -> Result<Certificate, CertError> {
    Certificate::from_der(der).map_err(|e| CertError::Parse {
        what,
        detail: e.to_string(),
    })
}

/// DER encoding of a certificate.
pub fn to_der(cert: &Certificate) -> Result<Vec<u8>, CertError> {
    cert.to_der().map_err(|e| CertError::Parse {
        what: "certificate",
        detail: e.to_string(),
    })
}

/// Parses a PEM certificate.
pub fn parse_pem(pem: &[u8], what: &'static str) -> Result<Certificate, CertError> {
    Certificate::from_pem(pem).map_err(|e| CertError::Parse {
        what,
        detail: e.to_string(),
    })
}

/// Verifies `cert` (a VCEK or VLEK) against the roots of every generation at `now` and extracts
/// what it endorses.
pub fn verify_endorsement(
    cert: &Certificate,
    kind: EndorsementKey,
    roots: &[GenerationRoots],
    now: SystemTime,
) -> Result<EndorsedKey, CertError> {
    let name = match kind {
        EndorsementKey::Vcek => "VCEK",
        EndorsementKey::Vlek => "VLEK",
    };
    let mut last = None;
    let gen = roots.iter().find(|r| {
        let Some((issuer, iname)) = r.issuer(kind) else {
            return false;
        };
        match verify_rsa_pss(
            issuer,
            cert,
            &format!("{iname}-{} -> {name}", r.generation.name()),
        ) {
            Ok(()) => true,
            Err(e) => {
                last = Some(e);
                false
            }
        }
    });
    let Some(roots) = gen else {
        return Err(CertError::Chain(format!(
            "{name} is not signed by the {} of any trusted generation (Milan, Genoa, Turin{})",
            match kind {
                EndorsementKey::Vcek => "ASK",
                EndorsementKey::Vlek => "ASVK",
            },
            if roots.iter().any(|r| r.generation == Generation::Emulated) {
                ", emulated"
            } else {
                ""
            }
        )));
    };
    let (issuer, iname) = roots
        .issuer(kind)
        .ok_or_else(|| CertError::Chain(format!("no issuer for the {name}")))?;
    check_validity(&roots.ark, "ARK", now)?;
    check_validity(issuer, iname, now)?;
    check_validity(cert, name, now)?;

    let spki = &cert.tbs_certificate.subject_public_key_info;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as::<x509_cert::der::asn1::ObjectIdentifier>().ok())
        .map(|o| o.to_string());
    if spki.algorithm.oid.to_string() != EC_PUBLIC_KEY || curve.as_deref() != Some(SECP384R1) {
        return Err(CertError::Content(format!("{name} key is not EC P-384")));
    }
    let tcb = tcb_extensions(cert, name)?;
    if kind == EndorsementKey::Vcek && tcb.hwid.is_none() {
        return Err(CertError::Content(
            "VCEK has no hardware id extension".into(),
        ));
    }
    let v = &cert.tbs_certificate.validity;
    let starts = [
        roots
            .ark
            .tbs_certificate
            .validity
            .not_before
            .to_system_time(),
        issuer.tbs_certificate.validity.not_before.to_system_time(),
        v.not_before.to_system_time(),
    ];
    let ends = [
        roots
            .ark
            .tbs_certificate
            .validity
            .not_after
            .to_system_time(),
        issuer.tbs_certificate.validity.not_after.to_system_time(),
        v.not_after.to_system_time(),
    ];
    Ok(EndorsedKey {
        generation: roots.generation,
        kind,
        public_point: spki.subject_public_key.raw_bytes().to_vec(),
        tcb,
        not_before: starts.into_iter().max().unwrap_or(SystemTime::UNIX_EPOCH),
        not_after: ends.into_iter().min().unwrap_or(SystemTime::UNIX_EPOCH),
    })
}
