//! Not a fuzz target: writes the seed inputs of the other targets with the project's own
//! serializers and the fixed keys of fuzz/fixtures, into `$COFFER_FUZZ_SEEDS` (default
//! `fuzz/seeds`), then exits. Run it through cargo-fuzz (it is built like the targets):
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run seedgen` in fuzz/. fuzz/run-all never runs it.
#![no_main]
use std::{collections::BTreeMap, path::PathBuf};

use base64::{engine::general_purpose::STANDARD, Engine};
use coffer_agent::proto::*;
use coffer_fuzz::{AGENT_REQUESTS, EC_KEY_PEM, EC_KEY_PKCS8, EC_PUB_PEM, KBS_KEK, KBS_KID};
use coffer_image::crypt::{encrypt_layer, WrapWith};
use coffer_jose::{json::RecipientPublicKey, TeeKeyPair};
use coffer_wire::{
    binding, ear, sample::SampleEvidence, Attestation, CompositeEvidence, HashAlgorithm, InitData,
    Request, RuntimeData, Tee,
};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use serde_json::{json, Value};

fuzz_target!(
    init: generate_and_exit(),
    |_data: &[u8]| {}
);

fn out(target: &str, name: &str, bytes: impl AsRef<[u8]>) {
    let base = std::env::var_os("COFFER_FUZZ_SEEDS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("seeds"));
    let dir = base.join(target);
    std::fs::create_dir_all(&dir).expect("seed directory");
    std::fs::write(dir.join(name), bytes).expect("seed file");
}

fn generate_and_exit() {
    generate();
    std::process::exit(0)
}

fn generate() {
    let inits = initdata_docs();
    for (name, doc) in &inits {
        out("initdata", name, doc);
    }
    kbs_body(&inits[0].1);
    kbs_token();
    jwe();
    image_manifest();
    layer_tar();
    gzip_isal();
    agent();
    kbs_policy();
}

/// Initdata as the agent tests and docs/agent.md write it.
fn initdata_docs() -> Vec<(&'static str, String)> {
    let policy = coffer_agent::policy::DEFAULT_POLICY;
    let owner = String::from_utf8_lossy(coffer_fuzz::ADMIN_PUB_PEM).into_owned();
    vec![
        (
            "kbs-and-policy.toml",
            format!(
                "version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n\"aa.toml\" = \"[token_configs.kbs]\\nurl = \\\"http://127.0.0.1:8080\\\"\\n\"\n\"policy.rego\" = \"\"\"{policy}# registered\n\"\"\"\n"
            ),
        ),
        (
            "cdh-owner.toml",
            format!(
                "version = \"0.1.0\"\nalgorithm = \"sha256\"\n[data]\n\"cdh.toml\" = '''\n[kbc]\nname = \"cc_kbc\"\nurl = \"https://kbs.example:8080\"\n[image]\nimage_security_policy_uri = \"kbs:///default/security-policy/test\"\nauthenticated_registry_credentials_uri = \"kbs:///default/credential/test\"\n'''\n\"owner-key.pem\" = '''\n{owner}'''\n"
            ),
        ),
        (
            "minimal.toml",
            "version = \"0.1.0\"\nalgorithm = \"sha512\"\n".to_string(),
        ),
    ]
}

fn kbs_body(initdata: &str) {
    for tee in [Tee::Sample, Tee::Snp, Tee::Tdx, Tee::Se] {
        let req = Request {
            version: coffer_wire::PROTOCOL_VERSION.into(),
            tee,
            extra_params: json!(""),
        };
        out(
            "kbs_body",
            &format!("auth-{tee}.json"),
            serde_json::to_vec(&req).unwrap(),
        );
    }
    let tee = TeeKeyPair::from_pem(EC_KEY_PEM).unwrap();
    let nonce = STANDARD.encode([3u8; 32]);
    let digest =
        binding::runtime_data_digest(tee.public_jwk(), &nonce, "", HashAlgorithm::Sha384).unwrap();
    let init_digest = coffer_wire::initdata::digest(initdata).unwrap();
    let evidence = SampleEvidence {
        svn: "1".into(),
        report_data: STANDARD.encode(&digest),
        init_data: Some(STANDARD.encode(&init_digest)),
        measure_register: None,
    };
    let mut att = Attestation {
        init_data: Some(InitData {
            format: "toml".into(),
            body: initdata.into(),
        }),
        runtime_data: RuntimeData {
            nonce: nonce.clone(),
            tee_pubkey: tee.public_jwk().clone(),
        },
        tee_evidence: CompositeEvidence {
            primary_evidence: serde_json::to_value(&evidence).unwrap(),
            additional_evidence: String::new(),
        },
    };
    out(
        "kbs_body",
        "attest-sample.json",
        serde_json::to_vec(&att).unwrap(),
    );
    att.init_data = None;
    att.tee_evidence.primary_evidence = serde_json::from_slice(include_bytes!(
        "../../crates/verifier/testdata/snp/genoa-evidence.json"
    ))
    .unwrap();
    att.tee_evidence.additional_evidence =
        json!({"nvidia": ["gpu", {"evidence_list": []}]}).to_string();
    out(
        "kbs_body",
        "attest-snp-gpu.json",
        serde_json::to_vec(&att).unwrap(),
    );
    out(
        "kbs_body",
        "reference-values.json",
        include_bytes!("../fixtures/reference-values.json"),
    );
    out(
        "kbs_body",
        "reference-values-svn.json",
        br#"{"sample_svn": ["1", "2"]}"#,
    );
    out("kbs_body", "resource-path", "default/key/app");
}

fn kbs_token() {
    // EAR token as the KBS issues it (valid until 2100, so that it is accepted as stored).
    let keys = coffer_kbs::token::TokenKeys::from_pkcs8(EC_KEY_PKCS8).unwrap();
    let tee = TeeKeyPair::from_pem(EC_KEY_PEM).unwrap();
    let claims = ear_claims(&tee);
    out("kbs_token", "ear", keys.issue(&claims).unwrap());
    // Admin token as coffer-kbs-client's AdminClient signs it (EdDSA, iat/exp, 300 s).
    let key = jsonwebtoken::EncodingKey::from_ed_pem(coffer_fuzz::ADMIN_KEY_PEM).unwrap();
    let iat = 4_000_000_000u64;
    let admin = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA),
        &json!({"iat": iat, "exp": iat + 300}),
        &key,
    )
    .unwrap();
    out("kbs_token", "admin", admin);
}

fn ear_claims(tee: &TeeKeyPair) -> ear::EarClaims {
    let mut submods = BTreeMap::new();
    submods.insert(
        ear::PRIMARY_SUBMOD.to_string(),
        ear::Appraisal {
            status: ear::Status::Affirming,
            trust_vector: BTreeMap::new(),
            policy_id: "sha256:00".into(),
            evidence: json!({
                "sample": {"svn": "1"},
                "runtime_data_claims": {"nonce": STANDARD.encode([3u8; 32]), "tee-pubkey": tee.public_jwk()},
            }),
        },
    );
    ear::EarClaims {
        eat_profile: ear::EAR_PROFILE.into(),
        iat: 1_767_225_600,
        exp: 4_102_444_800,
        verifier_id: ear::VerifierId {
            developer: "https://github.com/coffer".into(),
            build: "coffer-kbs fuzz".into(),
        },
        tee: "sample".into(),
        submods,
    }
}

fn jwe() {
    let tee = TeeKeyPair::from_pem(EC_KEY_PEM).unwrap();
    let flat = coffer_jose::encrypt(tee.public_jwk(), b"resource: an image key").unwrap();
    out(
        "jwe",
        "kbs-resource.json",
        serde_json::to_vec(&flat).unwrap(),
    );
    let to = [RecipientPublicKey::from_pem(EC_PUB_PEM).unwrap()];
    out(
        "jwe",
        "ocicrypt-general.json",
        coffer_jose::json::encrypt_json(b"{\"symkey\":\"layer key\"}", &to).unwrap(),
    );
}

fn image_manifest() {
    use oci_client::manifest::{OciDescriptor, OciImageIndex, OciImageManifest};
    let layer = tar(&[file("etc/hostname", b"coffer\n")]);
    let plain_digest = coffer_image::digest::of(&layer);
    let mut encrypted = Vec::new();
    let to = [RecipientPublicKey::from_pem(EC_PUB_PEM).unwrap()];
    let enc = encrypt_layer(
        &layer[..],
        &mut encrypted,
        &plain_digest,
        &WrapWith {
            recipients: &to,
            kbs: Some((KBS_KID, &KBS_KEK)),
        },
    )
    .unwrap();
    let config = json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [plain_digest, plain_digest]},
    })
    .to_string();
    let manifest = OciImageManifest {
        config: OciDescriptor {
            media_type: "application/vnd.oci.image.config.v1+json".into(),
            digest: coffer_image::digest::of(config.as_bytes()),
            size: config.len() as i64,
            ..Default::default()
        },
        layers: vec![
            OciDescriptor {
                media_type: "application/vnd.oci.image.layer.v1.tar".into(),
                digest: plain_digest.clone(),
                size: layer.len() as i64,
                ..Default::default()
            },
            OciDescriptor {
                media_type: "application/vnd.oci.image.layer.v1.tar+encrypted".into(),
                digest: coffer_image::digest::of(&encrypted),
                size: encrypted.len() as i64,
                annotations: Some(enc.annotations),
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let manifest_json = serde_json::to_vec(&manifest).unwrap();
    let mut with_config = manifest_json.clone();
    with_config.push(0);
    with_config.extend_from_slice(config.as_bytes());
    out("image_manifest", "manifest-encrypted", with_config);
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": coffer_image::digest::of(&manifest_json),
            "size": manifest_json.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
        }],
    });
    // Through the registry client's own type, as the pipeline reads it.
    let index: OciImageIndex = serde_json::from_value(index).unwrap();
    out(
        "image_manifest",
        "index",
        serde_json::to_vec(&index).unwrap(),
    );
}

/// One archive entry with raw header bytes (as crates/image/src/unpack.rs's tests write them).
struct E<'a> {
    name: &'a str,
    kind: tar::EntryType,
    link: &'a str,
    data: &'a [u8],
    mode: u32,
}

fn file<'a>(name: &'a str, data: &'a [u8]) -> E<'a> {
    E {
        name,
        kind: tar::EntryType::Regular,
        link: "",
        data,
        mode: 0o644,
    }
}

fn dir(name: &str) -> E<'_> {
    E {
        name,
        kind: tar::EntryType::Directory,
        link: "",
        data: b"",
        mode: 0o755,
    }
}

fn link<'a>(name: &'a str, kind: tar::EntryType, target: &'a str) -> E<'a> {
    E {
        name,
        kind,
        link: target,
        data: b"",
        mode: 0o777,
    }
}

fn tar(entries: &[E<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        {
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name[..e.name.len()].copy_from_slice(e.name.as_bytes());
            gnu.linkname[..e.link.len()].copy_from_slice(e.link.as_bytes());
        }
        h.set_entry_type(e.kind);
        h.set_size(e.data.len() as u64);
        h.set_mode(e.mode);
        h.set_uid(1000);
        h.set_gid(1000);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append(&h, e.data).unwrap();
    }
    b.into_inner().unwrap()
}

/// Gzip streams for the inflaters' comparison: a text member, two members, a stored block, an
/// empty member, and one with its CRC-32 altered.
fn gzip_isal() {
    use std::io::Write;
    let gz = |data: &[u8], level: u32| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
        e.write_all(data).unwrap();
        e.finish().unwrap()
    };
    let text = b"coffer layer: etc/passwd usr/bin/sh sha256:".repeat(40);
    out("gzip_isal", "text", gz(&text, 6));
    let mut two = gz(b"first member\n", 9);
    two.extend(gz(&text, 1));
    out("gzip_isal", "two-members", two);
    out("gzip_isal", "stored", gz(&text[..300], 0));
    out("gzip_isal", "empty", gz(b"", 6));
    let mut bad = gz(&text, 6);
    let n = bad.len();
    bad[n - 8] ^= 1;
    out("gzip_isal", "bad-crc", bad);
}

/// The cases of the unpacker's tests, aimed at the fuzz target's sentinel (`../outside/file`).
fn layer_tar() {
    use tar::EntryType::{Link, Symlink};
    let cases: Vec<(&str, Vec<E<'_>>)> = vec![
        (
            "files-links-modes",
            vec![
                dir("etc/"),
                file("etc/passwd", b"root:x:0:0"),
                E {
                    mode: 0o4755,
                    ..file("bin/su", b"\x7fELF")
                },
                link("bin/sh", Symlink, "/bin/su"),
                link("bin/su2", Link, "bin/su"),
                file("old/a", b"a"),
                file("gone", b"x"),
            ],
        ),
        (
            "whiteouts",
            vec![
                file("old/c", b"c"),
                file("old/.wh..wh..opq", b""),
                file(".wh.gone", b""),
                file("etc/passwd", b"root:x:0:0:new"),
            ],
        ),
        ("dotdot-name", vec![file("../outside/file", b"owned")]),
        (
            "symlink-out-then-write",
            vec![
                link("up", Symlink, "/.."),
                file("up/outside/file", b"owned"),
                link("rel", Symlink, "../../../../.."),
                file("rel/outside/file", b"owned"),
                link("x", Symlink, "../outside/file"),
                file("x", b"owned"),
            ],
        ),
        (
            "hardlinks-out",
            vec![
                link("out", Symlink, ".."),
                link("h2", Link, "out/outside/file"),
                link("h4", Link, "../outside/file"),
            ],
        ),
        (
            "whiteout-through-link",
            vec![
                link("up", Symlink, "../outside"),
                file("up/.wh.file", b""),
                file("a/.wh...", b""),
            ],
        ),
        (
            "symlink-loop",
            vec![
                link("l1", Symlink, "l2"),
                link("l2", Symlink, "l1"),
                file("l1/f", b""),
            ],
        ),
    ];
    for (name, entries) in &cases {
        out("layer_tar", name, tar(entries));
    }
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([("SCHILY.xattr.user.coffer", &b"layer-value"[..])])
        .unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(1);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "f", &b"x"[..]).unwrap();
    out("layer_tar", "pax-xattr", b.into_inner().unwrap());
}

fn agent() {
    let create = CreateContainerRequest {
        container_id: "app".into(),
        image: "docker://registry.example/app:v1".into(),
        args: vec!["/bin/sh".into(), "-c".into(), "date".into()],
        env: vec!["PATH=/bin".into()],
        working_dir: "/".into(),
        memory_limit_bytes: 64 << 20,
        ..Default::default()
    };
    let exec = ExecProcessRequest {
        container_id: "app".into(),
        exec_id: "e1".into(),
        args: vec!["/bin/date".into()],
        nonce: vec![9; 32],
        owner_signature: vec![1; 64],
        ..Default::default()
    };
    let msgs: Vec<(&str, Vec<u8>, Value)> = vec![
        (
            "CreateSandboxRequest",
            CreateSandboxRequest {
                sandbox_id: "pod".into(),
                hostname: "pod".into(),
            }
            .encode_to_vec(),
            serde_json::to_value(CreateSandboxRequest {
                sandbox_id: "pod".into(),
                hostname: "pod".into(),
            })
            .unwrap(),
        ),
        (
            "CreateContainerRequest",
            create.encode_to_vec(),
            serde_json::to_value(&create).unwrap(),
        ),
        (
            "ExecProcessRequest",
            exec.encode_to_vec(),
            serde_json::to_value(&exec).unwrap(),
        ),
        (
            "SetPolicyRequest",
            SetPolicyRequest {
                policy: coffer_agent::policy::DEFAULT_POLICY.into(),
            }
            .encode_to_vec(),
            serde_json::to_value(SetPolicyRequest {
                policy: "package agent_policy\n".into(),
            })
            .unwrap(),
        ),
        (
            "WriteStreamRequest",
            WriteStreamRequest {
                container_id: "app".into(),
                data: b"input\n".to_vec(),
                ..Default::default()
            }
            .encode_to_vec(),
            serde_json::to_value(WriteStreamRequest {
                container_id: "app".into(),
                data: b"input\n".to_vec(),
                ..Default::default()
            })
            .unwrap(),
        ),
        (
            "TtyWinResizeRequest",
            TtyWinResizeRequest {
                container_id: "app".into(),
                rows: 24,
                columns: 80,
                ..Default::default()
            }
            .encode_to_vec(),
            serde_json::to_value(TtyWinResizeRequest {
                container_id: "app".into(),
                rows: 24,
                columns: 80,
                ..Default::default()
            })
            .unwrap(),
        ),
    ];
    for (name, proto, input) in msgs {
        let sel = AGENT_REQUESTS.iter().position(|n| *n == name).unwrap() as u8;
        let mut p = vec![sel];
        p.extend_from_slice(&proto);
        out("agent_api", name, p);
        let mut j = vec![sel];
        j.extend_from_slice(&serde_json::to_vec(&input).unwrap());
        out("agent_policy", name, j);
    }
}

/// The inputs of the KBS policy tests (crates/kbs/src/policy.rs) and token claims.
fn kbs_policy() {
    let inputs = [
        (
            "sample",
            json!({"tee": "sample", "sample": {"svn": "1"}, "init_data": "bb"}),
        ),
        (
            "snp",
            json!({"tee": "snp", "init_data": "bb", "snp": {
            "measurement": "aa", "policy_debug_allowed": false,
            "reported_tcb": {"bootloader": 3, "tee": 0, "snp": 9, "microcode": 115}}}),
        ),
        (
            "az-snp-vtpm",
            json!({"tee": "az-snp-vtpm", "init_data": "bb", "az-snp-vtpm": {"snp": {
            "measurement": "aa", "policy_debug_allowed": false,
            "reported_tcb": {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}}}}),
        ),
        (
            "az-tdx-vtpm",
            json!({"tee": "az-tdx-vtpm", "init_data": "bb", "az-tdx-vtpm": {"tdx": {
            "mr_td": "aa", "debug": false, "tcb_status": "UpToDate"}}}),
        ),
        (
            "nvidia",
            json!({"tee": "nvidia", "nvidia": {"fwid": "ff", "driver_version": "550.90.07"}}),
        ),
        (
            "sgx",
            json!({"tee": "sgx", "sgx": {"mr_enclave": "aa", "debug": false,
            "tcb_status": "ConfigurationAndSWHardeningNeeded"}}),
        ),
    ];
    for (name, v) in inputs {
        out("kbs_policy", &format!("{name}.json"), v.to_string());
    }
    let tee = TeeKeyPair::from_pem(EC_KEY_PEM).unwrap();
    out(
        "kbs_policy",
        "ear-claims.json",
        serde_json::to_vec(&ear_claims(&tee)).unwrap(),
    );
}
