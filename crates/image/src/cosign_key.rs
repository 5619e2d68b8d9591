//! Cosign key files: `ENCRYPTED SIGSTORE PRIVATE KEY` (and the older `ENCRYPTED COSIGN PRIVATE
//! KEY`) PEM blocks, as cosign and skopeo (`--sign-by-sigstore-private-key`) read and write them.
//!
//! The block holds JSON: `{"kdf": {"name": "scrypt", "params": {"N", "r", "p"}, "salt": "<b64>"},
//! "cipher": {"name": "nacl/secretbox", "nonce": "<b64 24 bytes>"}, "ciphertext": "<b64>"}`; the
//! key is scrypt(passphrase, salt) (32 bytes), the plaintext the PKCS#8 DER of the private key.

use aws_lc_rs::{
    encoding::AsDer,
    rand::{SecureRandom, SystemRandom},
    signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING},
};
use base64::{engine::general_purpose::STANDARD, Engine};
use crypto_secretbox::{aead::Aead, KeyInit, XSalsa20Poly1305};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::Error;

/// The PEM label cosign writes today.
pub const LABEL: &str = "ENCRYPTED SIGSTORE PRIVATE KEY";
/// The PEM label older cosign versions wrote.
pub const OLD_LABEL: &str = "ENCRYPTED COSIGN PRIVATE KEY";

#[derive(Serialize, Deserialize)]
struct Envelope {
    kdf: Kdf,
    cipher: Cipher,
    ciphertext: String,
}

#[derive(Serialize, Deserialize)]
struct Kdf {
    name: String,
    params: Params,
    salt: String,
}

#[derive(Serialize, Deserialize)]
#[allow(non_snake_case)]
struct Params {
    N: u64,
    r: u32,
    p: u32,
}

#[derive(Serialize, Deserialize)]
struct Cipher {
    name: String,
    nonce: String,
}

fn bad(why: &str) -> Error {
    Error::Policy(format!("cosign key: {why}"))
}

fn derive(passphrase: &[u8], salt: &[u8], p: &Params) -> Result<Zeroizing<[u8; 32]>, Error> {
    if !p.N.is_power_of_two()
        || p.N < 2
        || p.N > (1 << 20)
        || p.r == 0
        || p.r > 32
        || p.p == 0
        || p.p > 16
    {
        return Err(bad("scrypt parameters out of range"));
    }
    let params = scrypt::Params::new(p.N.trailing_zeros() as u8, p.r, p.p, 32)
        .map_err(|_| bad("scrypt parameters rejected"))?;
    let mut key = Zeroizing::new([0u8; 32]);
    scrypt::scrypt(passphrase, salt, &params, key.as_mut()).map_err(|_| bad("scrypt failed"))?;
    Ok(key)
}

/// The PKCS#8 DER of the private key in a cosign key file, decrypted with `passphrase`.
pub fn decrypt(pem_text: &[u8], passphrase: &[u8]) -> Result<Zeroizing<Vec<u8>>, Error> {
    let block = pem::parse(pem_text).map_err(|_| bad("not PEM"))?;
    if block.tag() != LABEL && block.tag() != OLD_LABEL {
        return Err(bad(&format!(
            "PEM block {:?} is not an encrypted cosign key",
            block.tag()
        )));
    }
    let env: Envelope = serde_json::from_slice(block.contents())
        .map_err(|_| bad("the block is not the expected JSON"))?;
    if env.kdf.name != "scrypt" || env.cipher.name != "nacl/secretbox" {
        return Err(bad(&format!(
            "{} with {} is not supported",
            env.kdf.name, env.cipher.name
        )));
    }
    let b = |s: &str| STANDARD.decode(s).map_err(|_| bad("a field is not base64"));
    let key = derive(passphrase, &b(&env.kdf.salt)?, &env.kdf.params)?;
    let nonce = b(&env.cipher.nonce)?;
    if nonce.len() != 24 {
        return Err(bad("the nonce is not 24 bytes"));
    }
    let plain = XSalsa20Poly1305::new(key.as_ref().into())
        .decrypt(nonce.as_slice().into(), b(&env.ciphertext)?.as_slice())
        .map_err(|_| bad("wrong passphrase, or the key file was altered"))?;
    Ok(Zeroizing::new(plain))
}

/// A new P-256 key pair: (encrypted private key PEM, public key PEM).
pub fn generate(passphrase: &[u8]) -> Result<(String, String), Error> {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .map_err(|_| bad("key generation failed"))?;
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref())
        .map_err(|_| bad("key generation failed"))?;
    let public = pair
        .public_key()
        .as_der()
        .map_err(|_| bad("public key encoding failed"))?;
    let mut salt = [0u8; 32];
    let mut nonce = [0u8; 24];
    rng.fill(&mut salt).map_err(|_| bad("random"))?;
    rng.fill(&mut nonce).map_err(|_| bad("random"))?;
    let params = Params {
        N: 32768,
        r: 8,
        p: 1,
    };
    let key = derive(passphrase, &salt, &params)?;
    let ciphertext = XSalsa20Poly1305::new(key.as_ref().into())
        .encrypt(nonce.as_slice().into(), pkcs8.as_ref())
        .map_err(|_| bad("encryption failed"))?;
    let env = Envelope {
        kdf: Kdf {
            name: "scrypt".into(),
            params,
            salt: STANDARD.encode(salt),
        },
        cipher: Cipher {
            name: "nacl/secretbox".into(),
            nonce: STANDARD.encode(nonce),
        },
        ciphertext: STANDARD.encode(ciphertext),
    };
    let json = serde_json::to_vec(&env).map_err(|e| bad(&e.to_string()))?;
    Ok((
        pem::encode(&pem::Pem::new(LABEL, json)),
        pem::encode(&pem::Pem::new("PUBLIC KEY", public.as_ref().to_vec())),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_decrypt_with_the_passphrase_only() {
        let (private, public) = generate(b"pass").unwrap();
        assert!(private.contains(LABEL) && public.contains("PUBLIC KEY"));
        let der = decrypt(private.as_bytes(), b"pass").unwrap();
        assert!(EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &der).is_ok());
        assert!(decrypt(private.as_bytes(), b"wrong").is_err());
    }
}
