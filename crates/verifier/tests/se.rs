//! IBM Secure Execution: the KBS's challenge answered by an Ultravisor stand-in that does what
//! the Ultravisor does with an attestation request, using only the host key's private half:
//! find its key slot (SHA-256 of the host key's coordinates), unwrap the request key (ECDH
//! with the request's customer key, AES-256-GCM), open the request (IBM's `s390_pv`), and
//! compute the HMAC-SHA512 measurement over the image's tags, the configuration id, the user
//! data, the nonce and the additional data.

use coffer_verifier::se::{
    challenge, host_key_hash, verify, ChallengeSecret, Evidence, HostKeys, ImageTags, SeError,
    IMAGE_TAGS_LEN,
};
use openssl::{
    asn1::Asn1Time,
    bn::BigNum,
    ec::{EcGroup, EcKey},
    hash::MessageDigest,
    nid::Nid,
    pkey::{PKey, Private, Public},
    x509::{X509NameBuilder, X509},
};
use s390_pv::{
    attest::{AttestationItems, AttestationMeasAlg, AttestationMeasurement, AttestationRequest},
    request::{decrypt_aead, derive_aes256_gcm_key, BootHdrTags, SymKey},
};

/// A host: its P-521 key and a host-key document (a certificate of its public key).
struct Host {
    key: PKey<Private>,
    document: Vec<u8>,
}

fn host(name: &str) -> Host {
    let group = EcGroup::from_curve_name(Nid::SECP521R1).unwrap();
    let key = PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap();
    let mut subject = X509NameBuilder::new().unwrap();
    subject.append_entry_by_text("CN", name).unwrap();
    let subject = subject.build();
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    b.set_subject_name(&subject).unwrap();
    b.set_issuer_name(&subject).unwrap();
    b.set_pubkey(&key).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::days_from_now(30).unwrap())
        .unwrap();
    b.sign(&key, MessageDigest::sha512()).unwrap();
    Host {
        key,
        document: b.build().to_pem().unwrap(),
    }
}

fn public(k: &PKey<Private>) -> PKey<Public> {
    PKey::public_key_from_pem(&k.public_key_to_pem().unwrap()).unwrap()
}

/// The request header's fields this stand-in reads (big-endian, as the Ultravisor reads them).
const HDR: usize = 48;
const AUTH: usize = 16;
const COORDS: usize = 160;
const SLOT: usize = 80;

/// The Ultravisor's side of an attestation for `host`'s configuration with `cuid`, running
/// the image with `tags`: returns the evidence the guest hands back.
fn ultravisor(host: &Host, arcb: &[u8], tags: &[u8], cuid: [u8; 16], user: &[u8]) -> Evidence {
    let nks = arcb[0x27] as usize;
    let coords = &arcb[HDR + AUTH..HDR + AUTH + COORDS];
    // The customer's ephemeral P-521 key from its coordinates.
    let group = EcGroup::from_curve_name(Nid::SECP521R1).unwrap();
    let x = BigNum::from_slice(&coords[..80]).unwrap();
    let y = BigNum::from_slice(&coords[80..]).unwrap();
    let customer =
        PKey::from_ec_key(EcKey::from_public_key_affine_coordinates(&group, &x, &y).unwrap())
            .unwrap();
    // This host's key slot.
    let mine = host_key_hash(&public(&host.key)).unwrap();
    let slots = &arcb[HDR + AUTH + COORDS..HDR + AUTH + COORDS + nks * SLOT];
    let slot = slots
        .chunks(SLOT)
        .find(|s| s[..32] == mine)
        .expect("a key slot for this host");
    let kek = derive_aes256_gcm_key(&host.key, &customer).unwrap();
    let arpk = decrypt_aead(
        &SymKey::Aes256(kek),
        &[0; 12],
        &[],
        &slot[32..64],
        &slot[64..80],
    )
    .unwrap();
    // The result is additional data (none), plaintext, tag.
    let arpk: [u8; 32] = arpk.into_buf().value()[..32].try_into().unwrap();
    let (auth, conf) = AttestationRequest::decrypt_bin(arcb, &SymKey::Aes256(arpk.into())).unwrap();
    // Additional data as the flags ask: the image's and this host's key hashes.
    assert!(auth.flags().image_phkh() && auth.flags().attest_phkh());
    let mut additional = mine.to_vec();
    additional.extend_from_slice(&mine);
    let tags = BootHdrTags::try_from(tags.to_vec()).unwrap();
    let nonce = conf.nonce().as_ref().map(|n| *n.value());
    let items = AttestationItems::new(&tags, &cuid, Some(user), nonce.as_ref(), Some(&additional));
    let key = PKey::hmac(conf.measurement_key()).unwrap();
    let m = AttestationMeasurement::calculate(items, AttestationMeasAlg::HmacSha512, &key).unwrap();
    Evidence {
        cuid: hex::encode(cuid),
        user_data: hex::encode(user),
        measurement: hex::encode(m.as_ref()),
        additional_data: hex::encode(&additional),
    }
}

fn image(seed: u8) -> ImageTags {
    let b: Vec<u8> = (0..IMAGE_TAGS_LEN).map(|i| (i as u8) ^ seed).collect();
    ImageTags::from_bytes(&b).unwrap()
}

#[test]
fn a_challenge_answered_by_the_configured_host_verifies_and_names_the_image() {
    let (a, b) = (host("host-a"), host("host-b"));
    let hosts = HostKeys::load(
        &[
            ("a.crt".into(), a.document.clone()),
            ("b.crt".into(), b.document.clone()),
        ],
        None,
    )
    .unwrap();
    let (arcb, secret) = challenge(&hosts).unwrap();
    let runtime = [7u8; 64];
    let (good, other) = (image(1), image(2));
    // Either host can answer; the measurement names the image the guest runs.
    let evidence = ultravisor(
        &b,
        &arcb,
        &hex::decode(good.to_hex()).unwrap(),
        [9; 16],
        &runtime,
    );
    let claims = verify(&evidence, &secret, &[other, good], &runtime, &hosts).unwrap();
    assert_eq!(claims.image, good);
    assert_eq!(claims.cuid, hex::encode([9u8; 16]));
    assert_eq!(
        claims.attestation_phkh,
        hex::encode(host_key_hash(&public(&b.key)).unwrap())
    );

    // Another image's tags, another session's secret, other user data, or any altered field:
    // refused.
    assert!(matches!(
        verify(&evidence, &secret, &[other], &runtime, &hosts),
        Err(SeError::Measurement(1))
    ));
    let (_, another) = challenge(&hosts).unwrap();
    assert!(matches!(
        verify(&evidence, &another, &[good], &runtime, &hosts),
        Err(SeError::Measurement(_))
    ));
    assert!(matches!(
        verify(&evidence, &secret, &[good], &[8u8; 64], &hosts),
        Err(SeError::UserData)
    ));
    for field in 0..4 {
        let mut e = evidence.clone();
        let f = match field {
            0 => &mut e.cuid,
            1 => &mut e.user_data,
            2 => &mut e.measurement,
            _ => &mut e.additional_data,
        };
        let mut bytes = hex::decode(&*f).unwrap();
        bytes[0] ^= 1;
        *f = hex::encode(bytes);
        assert!(
            verify(&e, &secret, &[good], &runtime, &hosts).is_err(),
            "altered field {field} passed"
        );
    }
    // A KBS that knows only host a refuses b's answer.
    let only_a = HostKeys::load(&[("a.crt".into(), a.document.clone())], None).unwrap();
    assert!(matches!(
        verify(&evidence, &secret, &[good], &runtime, &only_a),
        Err(SeError::UnknownHost(_))
    ));
    // The secret survives the KBS's sealing round trip.
    let again = ChallengeSecret::from_bytes(secret.as_bytes()).unwrap();
    assert!(verify(&evidence, &again, &[good], &runtime, &hosts).is_ok());
}

#[test]
fn a_host_whose_key_is_not_in_the_request_cannot_open_it() {
    let (a, stranger) = (host("host-a"), host("stranger"));
    let hosts = HostKeys::load(&[("a.crt".into(), a.document.clone())], None).unwrap();
    let (arcb, _) = challenge(&hosts).unwrap();
    let mine = host_key_hash(&public(&stranger.key)).unwrap();
    let nks = arcb[0x27] as usize;
    assert_eq!(nks, 1);
    let slots = &arcb[HDR + AUTH + COORDS..HDR + AUTH + COORDS + nks * SLOT];
    assert!(slots.chunks(SLOT).all(|s| s[..32] != mine));
}

#[test]
fn bad_host_key_documents_and_tags_are_refused_naming_them() {
    assert!(matches!(
        HostKeys::load(&[], None),
        Err(SeError::NoHostKeys)
    ));
    let e = HostKeys::load(&[("junk.crt".into(), b"junk".to_vec())], None).unwrap_err();
    assert!(e.to_string().contains("junk.crt"), "{e}");
    let e = ImageTags::from_hex("abcd").unwrap_err();
    assert!(e.to_string().contains("208 bytes"), "{e}");
    let e = ImageTags::from_se_image(&[0u8; 4096]).unwrap_err();
    assert!(e.to_string().contains("not an SE image"), "{e}");
}
