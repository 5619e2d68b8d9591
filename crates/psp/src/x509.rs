//! Issuing the emulated chain: ARK (self-signed) → ASK → VCEK, shaped like AMD's: RSASSA-PSS
//! SHA-384 signatures (MGF1-SHA-384, salt 48, trailer 1), an RSA ARK/ASK, a P-384 VCEK with the
//! SPL extensions under 1.3.6.1.4.1.3704.1.3 and the hardware id under 1.3.6.1.4.1.3704.1.4.

use std::{
    str::FromStr,
    time::{Duration, SystemTime},
};

use aws_lc_rs::{
    rand::SystemRandom,
    rsa::KeySize,
    signature::{
        EcdsaKeyPair, KeyPair, RsaKeyPair, ECDSA_P384_SHA384_FIXED_SIGNING, RSA_PSS_SHA384,
    },
};
use x509_cert::{
    certificate::{Certificate, TbsCertificate, Version},
    der::{
        asn1::{BitString, Ia5String, ObjectIdentifier, OctetString, UtcTime},
        Any, Decode, Encode, EncodePem,
    },
    ext::Extension,
    name::RdnSequence,
    serial_number::SerialNumber,
    spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned},
    time::{Time, Validity},
};

use crate::{PspError, Tcb, EMULATED_NAME};

/// RSASSA-PSS parameters exactly as AMD encodes them: SHA-384, MGF1 with SHA-384, salt 48,
/// trailer field 1.
const PSS_SHA384_PARAMS: [u8; 59] = [
    0x30, 0x39, 0xa0, 0x0f, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
    0x02, 0x05, 0x00, 0xa1, 0x1c, 0x30, 0x1a, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01,
    0x01, 0x08, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0x05,
    0x00, 0xa2, 0x03, 0x02, 0x01, 0x30, 0xa3, 0x03, 0x02, 0x01, 0x01,
];

const RSA_PSS: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.10");
const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const SECP384R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
const AMD: &str = "1.3.6.1.4.1.3704.1";

pub(crate) struct Chain {
    pub ark_pem: String,
    pub ask_pem: String,
    pub vcek_der: Vec<u8>,
    pub vcek_pkcs8: Vec<u8>,
}

fn cert_err(e: impl std::fmt::Display) -> PspError {
    PspError::Cert(e.to_string())
}

fn pss() -> Result<AlgorithmIdentifierOwned, PspError> {
    Ok(AlgorithmIdentifierOwned {
        oid: RSA_PSS,
        parameters: Some(Any::from_der(&PSS_SHA384_PARAMS).map_err(cert_err)?),
    })
}

fn name(cn: &str) -> Result<RdnSequence, PspError> {
    RdnSequence::from_str(&format!(
        "CN={cn},O=Coffer (emulated; no confidentiality),OU=Engineering"
    ))
    .map_err(cert_err)
}

fn validity(from: SystemTime, years: u64) -> Result<Validity, PspError> {
    let to = from + Duration::from_secs(years * 365 * 24 * 3600);
    let t = |s| -> Result<Time, PspError> {
        Ok(Time::UtcTime(
            UtcTime::from_system_time(s).map_err(cert_err)?,
        ))
    };
    Ok(Validity {
        not_before: t(from)?,
        not_after: t(to)?,
    })
}

fn rsa_spki(key: &RsaKeyPair) -> Result<SubjectPublicKeyInfoOwned, PspError> {
    Ok(SubjectPublicKeyInfoOwned {
        algorithm: AlgorithmIdentifierOwned {
            oid: RSA_ENCRYPTION,
            parameters: Some(Any::from_der(&[0x05, 0x00]).map_err(cert_err)?),
        },
        subject_public_key: BitString::from_bytes(key.public_key().as_ref()).map_err(cert_err)?,
    })
}

fn ext(oid: &str, value: Vec<u8>) -> Result<Extension, PspError> {
    Ok(Extension {
        extn_id: ObjectIdentifier::new(oid).map_err(cert_err)?,
        critical: false,
        extn_value: OctetString::new(value).map_err(cert_err)?,
    })
}

fn sign(
    issuer: &RsaKeyPair,
    issuer_name: &RdnSequence,
    subject: RdnSequence,
    serial: &[u8],
    validity: Validity,
    spki: SubjectPublicKeyInfoOwned,
    extensions: Option<Vec<Extension>>,
) -> Result<Certificate, PspError> {
    let tbs = TbsCertificate {
        version: Version::V3,
        serial_number: SerialNumber::new(serial).map_err(cert_err)?,
        signature: pss()?,
        issuer: issuer_name.clone(),
        validity,
        subject,
        subject_public_key_info: spki,
        issuer_unique_id: None,
        subject_unique_id: None,
        extensions,
    };
    let msg = tbs.to_der().map_err(cert_err)?;
    let mut sig = vec![0u8; issuer.public_modulus_len()];
    issuer
        .sign(&RSA_PSS_SHA384, &SystemRandom::new(), &msg, &mut sig)
        .map_err(|_| PspError::Crypto("RSA-PSS signature"))?;
    Ok(Certificate {
        tbs_certificate: tbs,
        signature_algorithm: pss()?,
        signature: BitString::from_bytes(&sig).map_err(cert_err)?,
    })
}

/// Issues a fresh chain valid from `now`.
pub(crate) fn issue_chain(
    now: SystemTime,
    chip_id: &[u8; 64],
    tcb: Tcb,
) -> Result<Chain, PspError> {
    let ark_key =
        RsaKeyPair::generate(KeySize::Rsa2048).map_err(|_| PspError::Crypto("ARK key"))?;
    let ask_key =
        RsaKeyPair::generate(KeySize::Rsa2048).map_err(|_| PspError::Crypto("ASK key"))?;
    let ark_name = name(&format!("ARK-{EMULATED_NAME}"))?;
    let ask_name = name(&format!("SEV-{EMULATED_NAME}"))?;
    let ark = sign(
        &ark_key,
        &ark_name,
        ark_name.clone(),
        &[0x01],
        validity(now, 20)?,
        rsa_spki(&ark_key)?,
        None,
    )?;
    let ask = sign(
        &ark_key,
        &ark_name,
        ask_name.clone(),
        &[0x02],
        validity(now, 20)?,
        rsa_spki(&ask_key)?,
        None,
    )?;

    let vcek_pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &SystemRandom::new())
            .map_err(|_| PspError::Crypto("VCEK key"))?;
    let vcek_key = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, vcek_pkcs8.as_ref())
        .map_err(|_| PspError::Crypto("VCEK key"))?;
    let vcek_spki = SubjectPublicKeyInfoOwned {
        algorithm: AlgorithmIdentifierOwned {
            oid: EC_PUBLIC_KEY,
            parameters: Some(
                Any::from_der(&SECP384R1.to_der().map_err(cert_err)?).map_err(cert_err)?,
            ),
        },
        subject_public_key: BitString::from_bytes(vcek_key.public_key().as_ref())
            .map_err(cert_err)?,
    };
    let int = |v: u8| (v as u32).to_der().map_err(cert_err);
    let extensions = vec![
        ext(&format!("{AMD}.1"), 1u32.to_der().map_err(cert_err)?)?,
        ext(
            &format!("{AMD}.2"),
            Ia5String::new(&format!("Genoa-{EMULATED_NAME}"))
                .map_err(cert_err)?
                .to_der()
                .map_err(cert_err)?,
        )?,
        ext(&format!("{AMD}.3.1"), int(tcb.bootloader)?)?,
        ext(&format!("{AMD}.3.2"), int(tcb.tee)?)?,
        ext(&format!("{AMD}.3.3"), int(tcb.snp)?)?,
        ext(&format!("{AMD}.3.4"), int(0)?)?,
        ext(&format!("{AMD}.3.5"), int(0)?)?,
        ext(&format!("{AMD}.3.6"), int(0)?)?,
        ext(&format!("{AMD}.3.7"), int(0)?)?,
        ext(&format!("{AMD}.3.8"), int(tcb.microcode)?)?,
        ext(
            &format!("{AMD}.4"),
            OctetString::new(chip_id.to_vec())
                .map_err(cert_err)?
                .to_der()
                .map_err(cert_err)?,
        )?,
    ];
    let vcek = sign(
        &ask_key,
        &ask_name,
        name(&format!("SEV-VCEK-{EMULATED_NAME}"))?,
        &[0x00],
        validity(now, 7)?,
        vcek_spki,
        Some(extensions),
    )?;
    let pem = |c: &Certificate| {
        c.to_pem(x509_cert::der::pem::LineEnding::LF)
            .map_err(cert_err)
    };
    Ok(Chain {
        ark_pem: pem(&ark)?,
        ask_pem: pem(&ask)?,
        vcek_der: vcek.to_der().map_err(cert_err)?,
        vcek_pkcs8: vcek_pkcs8.as_ref().to_vec(),
    })
}
