//! JWE from an untrusted peer, decrypted with a fixed private key: the flattened JSON JWE of a
//! KBS resource (`TeeKeyPair::decrypt`, what a guest receives) and JWE in either JSON
//! serialization (`json::decrypt_json`, what ocicrypt layer annotations carry). The input is the
//! JWE's JSON text.
#![no_main]
use coffer_jose::{json, TeeKeyPair};
use coffer_wire::JweResponse;
use libfuzzer_sys::fuzz_target;

const KEY: &[u8] = coffer_fuzz::EC_KEY_PEM;

fuzz_target!(|data: &[u8]| {
    thread_local! {
        static TEE: TeeKeyPair = TeeKeyPair::from_pem(KEY).expect("fixed TEE key");
        static RECIPIENT: json::RecipientKey =
            json::RecipientKey::from_pem(KEY).expect("fixed recipient key");
    }
    if let Ok(jwe) = serde_json::from_slice::<JweResponse>(data) {
        TEE.with(|k| {
            let _ = k.decrypt(&jwe);
        });
    }
    RECIPIENT.with(|k| {
        let _ = json::decrypt_json(data, k);
    });
});
