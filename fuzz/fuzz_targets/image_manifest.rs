//! What the image pipeline parses from a registry before it fetches a layer: the top-level
//! manifest or index (platform selection), the image manifest, the image config checked against
//! it, and the keys of encrypted layers (ocicrypt annotations: pubopts, JWE recipients with a
//! fixed private key, KBS-wrapped keys with a fixed key-encryption key), then a short decryption.
//!
//! Input: the manifest document, optionally followed by a NUL byte and the image config (JSON
//! holds no raw NUL, so the split is unambiguous).
#![no_main]
use std::{collections::BTreeMap, io::Read};

use coffer_fuzz::{EC_KEY_PEM, KBS_KEK, KBS_KID};
use coffer_image::{
    crypt::{self, DecryptReader},
    pull::{self, Platform, RootManifest},
};
use coffer_jose::json::RecipientKey;
use libfuzzer_sys::fuzz_target;

type Keks = BTreeMap<String, zeroize::Zeroizing<Vec<u8>>>;

struct Keys {
    private: Vec<RecipientKey>,
    keks: Keks,
}

fn keys() -> Keys {
    let mut keks = BTreeMap::new();
    keks.insert(
        KBS_KID.to_string(),
        zeroize::Zeroizing::new(KBS_KEK.to_vec()),
    );
    Keys {
        private: vec![RecipientKey::from_pem(EC_KEY_PEM).expect("fixed recipient key")],
        keks,
    }
}

fuzz_target!(|data: &[u8]| {
    thread_local!(static K: Keys = keys());
    let (doc, config) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let manifest = match pull::parse_root_manifest(doc, "sha256:fuzz", &Platform::default()) {
        Ok(RootManifest::Manifest(m)) => m,
        Ok(RootManifest::Index(digest)) => {
            let _ = coffer_image::digest::sha256_hex(&digest);
            return;
        }
        Err(_) => return,
    };
    if let Some(config) = config {
        let _ = pull::check_config(config, &manifest);
    }
    K.with(|k| {
        for layer in &manifest.layers {
            let _ = pull::layer_compression(&layer.media_type);
            let _ = crypt::kbs_kid(layer.annotations.as_ref());
            if !layer.media_type.ends_with("+encrypted") {
                continue;
            }
            let Ok(key) = crypt::layer_key_with(
                &layer.digest,
                layer.annotations.as_ref(),
                &k.private,
                &k.keks,
            ) else {
                continue;
            };
            // A key that unwrapped: decrypt a few bytes (the HMAC will not match).
            if let Ok(mut r) = DecryptReader::new(&[0u8; 48][..], &key) {
                let _ = r.read_to_end(&mut Vec::new());
            }
        }
    });
});
