use super::*;

const MSG: &[u8] = b"the demo secret \x00\xff with binary bytes";

#[test]
fn round_trip_every_key_type() {
    for alg in [
        TeeKeyAlgorithm::EcP256,
        TeeKeyAlgorithm::EcP521,
        TeeKeyAlgorithm::Rsa2048,
    ] {
        let kp = TeeKeyPair::generate(alg).unwrap();
        validate_public_key(kp.public_jwk()).unwrap();
        let jwe = encrypt(kp.public_jwk(), MSG).unwrap();
        assert_eq!(kp.decrypt(&jwe).unwrap().as_slice(), MSG, "{alg:?}");
        // Survives the wire: serialize and parse back.
        let text = serde_json::to_string(&jwe).unwrap();
        let back: JweResponse = serde_json::from_str(&text).unwrap();
        assert_eq!(kp.decrypt(&back).unwrap().as_slice(), MSG);
    }
}

#[test]
fn wire_shape_is_flattened_jwe_without_padding() {
    let kp = TeeKeyPair::generate(TeeKeyAlgorithm::EcP256).unwrap();
    let v = serde_json::to_value(encrypt(kp.public_jwk(), MSG).unwrap()).unwrap();
    let obj = v.as_object().unwrap();
    let mut keys: Vec<_> = obj.keys().cloned().collect();
    keys.sort();
    assert_eq!(
        keys,
        ["ciphertext", "encrypted_key", "iv", "protected", "tag"]
    );
    for k in keys {
        let s = obj[&k].as_str().unwrap();
        assert!(!s.contains('=') && !s.contains('+') && !s.contains('/'));
    }
    let header: Value =
        serde_json::from_slice(&B64.decode(obj["protected"].as_str().unwrap()).unwrap()).unwrap();
    assert_eq!(header["alg"], "ECDH-ES+A256KW");
    assert_eq!(header["enc"], "A256GCM");
    assert_eq!(header["epk"]["crv"], "P-256");
    assert_eq!(header["epk"]["kty"], "EC");
    // CEK wrapped by AES-KW: 32 + 8 bytes.
    assert_eq!(
        B64.decode(obj["encrypted_key"].as_str().unwrap())
            .unwrap()
            .len(),
        40
    );
}

#[test]
fn tampering_or_wrong_key_fails() {
    let kp = TeeKeyPair::generate(TeeKeyAlgorithm::EcP256).unwrap();
    let other = TeeKeyPair::generate(TeeKeyAlgorithm::EcP256).unwrap();
    let jwe = encrypt(kp.public_jwk(), MSG).unwrap();
    assert!(matches!(other.decrypt(&jwe), Err(JoseError::Decrypt)));

    let mut bad = jwe.clone();
    bad.ciphertext[0] ^= 1;
    assert!(matches!(kp.decrypt(&bad), Err(JoseError::Decrypt)));

    let mut bad = jwe.clone();
    bad.tag[3] ^= 1;
    assert!(matches!(kp.decrypt(&bad), Err(JoseError::Decrypt)));

    let mut bad = jwe.clone();
    bad.encrypted_key[5] ^= 1;
    assert!(matches!(kp.decrypt(&bad), Err(JoseError::Decrypt)));

    // The protected header is authenticated.
    let mut bad = jwe;
    bad.protected
        .other_fields
        .insert("kid".into(), Value::String("x".into()));
    assert!(matches!(kp.decrypt(&bad), Err(JoseError::Decrypt)));

    let rsa = TeeKeyPair::generate(TeeKeyAlgorithm::Rsa2048).unwrap();
    let jwe = encrypt(rsa.public_jwk(), MSG).unwrap();
    assert!(matches!(kp.decrypt(&jwe), Err(JoseError::InvalidJwe(_))));
    let mut bad = jwe;
    bad.encrypted_key[0] ^= 1;
    assert!(matches!(rsa.decrypt(&bad), Err(JoseError::Decrypt)));
}

#[test]
fn rejects_malformed_public_keys() {
    let TeePubKey::EC { crv, alg, x, y } = TeeKeyPair::generate(TeeKeyAlgorithm::EcP256)
        .unwrap()
        .public_jwk()
        .clone()
    else {
        unreachable!()
    };
    // Coordinate of the wrong length.
    let short = TeePubKey::EC {
        crv: crv.clone(),
        alg: alg.clone(),
        x: B64.encode([1u8; 31]),
        y: y.clone(),
    };
    assert!(matches!(
        encrypt(&short, MSG),
        Err(JoseError::InvalidKey(_))
    ));
    // A point that is not on the curve.
    let mut ybytes = B64.decode(&y).unwrap();
    ybytes[31] ^= 1;
    let off = TeePubKey::EC {
        crv: crv.clone(),
        alg: alg.clone(),
        x: x.clone(),
        y: B64.encode(ybytes),
    };
    assert!(validate_public_key(&off).is_err());
    assert!(encrypt(&off, MSG).is_err());
    // Unknown curve and algorithm.
    let secp = TeePubKey::EC {
        crv: "secp256k1".into(),
        alg,
        x: x.clone(),
        y: y.clone(),
    };
    assert!(matches!(
        validate_public_key(&secp),
        Err(JoseError::Unsupported(_))
    ));
    let wrong_alg = TeePubKey::EC {
        crv,
        alg: "ECDH-ES".into(),
        x,
        y,
    };
    assert!(matches!(
        encrypt(&wrong_alg, MSG),
        Err(JoseError::Unsupported(_))
    ));
    let small_rsa = TeePubKey::RSA {
        alg: ALG_RSA_OAEP_256.into(),
        k_mod: B64.encode([0xc5u8; 64]),
        k_exp: B64.encode([1, 0, 1]),
    };
    assert!(matches!(
        encrypt(&small_rsa, MSG),
        Err(JoseError::InvalidKey(_))
    ));
}

/// RFC 7518 Appendix C: ECDH-ES key agreement between Alice's ephemeral key and Bob's static key,
/// Concat KDF for "A128GCM" with PartyUInfo "Alice" and PartyVInfo "Bob".
#[test]
fn concat_kdf_matches_rfc7518_appendix_c() {
    let alice_d = B64
        .decode("0_NxaRPUMQoAJt50Gz8YiTr8gRTwyEaCumd-MToTmIo")
        .unwrap();
    let bob = TeePubKey::EC {
        crv: "P-256".into(),
        alg: ALG_ECDH_ES_A256KW.into(),
        x: "weNJy2HscCSM6AEDTDg04biOvhFhyyWvOHQfeF_PxMQ".into(),
        y: "e8lnCO-AlStT-NJVX-crhB7QRYhiix03illJOVAOyck".into(),
    };
    let (_, point) = ec_point(&bob).unwrap();
    let alice = PrivateKey::from_private_key(&agreement::ECDH_P256, &alice_d).unwrap();
    let key = agreement::agree(
        &alice,
        UnparsedPublicKey::new(&agreement::ECDH_P256, &point),
        (),
        |z| Ok(concat_kdf(z, "A128GCM", b"Alice", b"Bob", 128)),
    )
    .unwrap();
    assert_eq!(B64.encode(key.as_slice()), "VqqN6vgjbSBcIijNcacQGg");
}
