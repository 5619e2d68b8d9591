//! An Azure-like vTPM for tests: Debian's `swtpm` TPM 2.0 simulator on loopback, provisioned as
//! Azure's paravisor leaves a confidential VM's vTPM: a restricted RSA-2048 signing key
//! (RSASSA-SHA256) at persistent handle `0x81000003`, and the HCL report at NV index
//! `0x01400001` whose hardware report binds that key (REPORT_DATA = SHA-256 of the variable
//! data holding the key as the JWK `HCLAkPub`). The SEV-SNP hardware report is signed by the
//! emulated PSP; [`Imds`] answers Azure's instance metadata requests on loopback in the
//! published response shapes (`vcekCert`/`certificateChain`; `quote`).

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use base64::Engine;
use sha2::Digest as _;
use tss_esapi::{
    attributes::{NvIndexAttributesBuilder, ObjectAttributesBuilder},
    handles::{NvIndexTpmHandle, PersistentTpmHandle},
    interface_types::{
        algorithm::{HashingAlgorithm, PublicAlgorithm},
        dynamic_handles::Persistent,
        key_bits::RsaKeyBits,
        resource_handles::{Hierarchy, NvAuth, Provision},
    },
    structures::{
        HashScheme, MaxNvBuffer, NvPublicBuilder, Public, PublicBuilder, PublicKeyRsa,
        PublicRsaParametersBuilder, RsaExponent, RsaScheme,
    },
    Context, TctiNameConf,
};

/// The HCL report's NV index and the AK's persistent handle (`coffer_wire::hcl`).
const NV_INDEX: u32 = coffer_wire::hcl::NV_INDEX;
const AK_HANDLE: u32 = coffer_wire::hcl::AK_HANDLE;

/// A running `swtpm`, killed when dropped.
pub struct Swtpm {
    child: Child,
    /// The TCTI that reaches it (`swtpm:host=127.0.0.1,port=…`).
    pub tcti: String,
    _state: PathBuf,
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two free consecutive loopback ports (the TPM's and its control channel's).
fn port_pair() -> u16 {
    for _ in 0..64 {
        let a = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let p = a.local_addr().unwrap().port();
        if p < u16::MAX && TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
    panic!("no two consecutive free loopback ports");
}

impl Swtpm {
    /// Starts a fresh TPM 2.0 (state under `dir`), already started up, on loopback.
    pub fn start(dir: &Path) -> Swtpm {
        let state = dir.join("swtpm");
        std::fs::create_dir_all(&state).unwrap();
        for _ in 0..5 {
            let port = port_pair();
            let mut child = Command::new("swtpm")
                .arg("socket")
                .arg("--tpm2")
                .arg("--tpmstate")
                .arg(format!("dir={}", state.display()))
                .arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
                .arg("--flags")
                .arg("not-need-init,startup-clear")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("swtpm (Debian package swtpm) must be installed");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // lost the port: try another pair
                }
                if std::net::TcpStream::connect(("127.0.0.1", port + 1)).is_ok()
                    && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                {
                    return Swtpm {
                        child,
                        tcti: format!("swtpm:host=127.0.0.1,port={port}"),
                        _state: state,
                    };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("swtpm did not start");
    }

    /// An ESAPI context on this TPM.
    pub fn context(&self) -> Context {
        Context::new(TctiNameConf::from_str(&self.tcti).unwrap()).expect("connect to swtpm")
    }
}

/// The attestation key Azure's paravisor makes: a restricted RSA-2048 RSASSA-SHA256 signing key.
fn ak_template() -> Public {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_sign_encrypt(true)
        .with_restricted(true)
        .build()
        .unwrap();
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Rsa)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_rsa_parameters(
            PublicRsaParametersBuilder::new()
                .with_scheme(RsaScheme::RsaSsa(HashScheme::new(HashingAlgorithm::Sha256)))
                .with_key_bits(RsaKeyBits::Rsa2048)
                .with_exponent(RsaExponent::default())
                .with_is_signing_key(true)
                .with_restricted(true)
                .build()
                .unwrap(),
        )
        .with_rsa_unique_identifier(PublicKeyRsa::default())
        .build()
        .unwrap()
}

/// Makes the attestation key and persists it at `0x81000003`; returns its modulus.
pub fn provision_ak(ctx: &mut Context) -> Vec<u8> {
    let key = ctx
        .execute_with_nullauth_session(|ctx| {
            ctx.create_primary(Hierarchy::Owner, ak_template(), None, None, None, None)
        })
        .expect("create the AK");
    let n = match &key.out_public {
        Public::Rsa { unique, .. } => unique.value().to_vec(),
        _ => unreachable!("an RSA template gives an RSA key"),
    };
    let persistent = Persistent::Persistent(PersistentTpmHandle::new(AK_HANDLE).unwrap());
    ctx.execute_with_nullauth_session(|ctx| {
        ctx.evict_control(Provision::Owner, key.key_handle.into(), persistent)
    })
    .expect("persist the AK");
    ctx.flush_context(key.key_handle.into()).unwrap();
    n
}

/// The HCL variable data naming the AK with modulus `n`, as Azure writes it (the fields the
/// verifiers read; Azure adds VM configuration beside them).
pub fn var_data(n: &[u8]) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    serde_json::json!({
        "keys": [{"kid": "HCLAkPub", "key_ops": ["sign"], "kty": "RSA", "e": "AQAB", "n": b64.encode(n)}],
        "vm-configuration": {"secure-boot": true, "tpm-enabled": true},
        "user-data": "",
    })
    .to_string()
    .into_bytes()
}

/// Writes `report` into NV index `0x01400001` (owner read and write), as the paravisor does.
pub fn write_hcl_report(ctx: &mut Context, report: &[u8]) {
    let index = NvIndexTpmHandle::new(NV_INDEX).unwrap();
    let attrs = NvIndexAttributesBuilder::new()
        .with_owner_write(true)
        .with_owner_read(true)
        .build()
        .unwrap();
    let public = NvPublicBuilder::new()
        .with_nv_index(index)
        .with_index_name_algorithm(HashingAlgorithm::Sha256)
        .with_index_attributes(attrs)
        .with_data_area_size(report.len())
        .build()
        .unwrap();
    let handle = ctx
        .execute_with_nullauth_session(|ctx| ctx.nv_define_space(Provision::Owner, None, public))
        .expect("define the HCL report's NV index (libtpms allows 2048 bytes)");
    for (i, chunk) in report.chunks(512).enumerate() {
        let data = MaxNvBuffer::try_from(chunk.to_vec()).unwrap();
        ctx.execute_with_nullauth_session(|ctx| {
            ctx.nv_write(NvAuth::Owner, handle, data, (i * 512) as u16)
        })
        .expect("write the HCL report");
    }
}

/// Provisions `tpm` as an Azure SEV-SNP CVM's vTPM with a hardware report from `psp`: the AK,
/// then the HCL report whose SNP report carries SHA-256(variable data) as REPORT_DATA. Returns
/// the HCL report.
pub fn provision_az_snp(tpm: &Swtpm, psp: &coffer_psp::EmulatedPsp) -> Vec<u8> {
    let mut ctx = tpm.context();
    let n = provision_ak(&mut ctx);
    let var = var_data(&n);
    let mut rd = [0u8; 64];
    rd[..32].copy_from_slice(&sha2::Sha256::digest(&var));
    let snp = psp.report(&rd).expect("an emulated SNP report");
    let report = coffer_wire::hcl::build(coffer_wire::hcl::REPORT_TYPE_SNP, &snp, &var).unwrap();
    write_hcl_report(&mut ctx, &report);
    report
}

/// The offset of REPORTDATA in a TDREPORT (after REPORTMACSTRUCT's type, reserved, CPUSVN,
/// TEE_TCB_INFO_HASH and TEE_INFO_HASH).
pub const TD_REPORT_DATA_OFFSET: usize = 128;

/// Provisions `tpm` as an Azure TDX CVM's vTPM: the AK and an HCL report holding a TDREPORT
/// whose REPORTDATA is SHA-256(variable data), zero padded (its other fields zero: nothing here
/// can MAC a TDREPORT). Returns the HCL report and the TDREPORT.
pub fn provision_az_tdx(tpm: &Swtpm) -> (Vec<u8>, Vec<u8>) {
    let mut ctx = tpm.context();
    let n = provision_ak(&mut ctx);
    let var = var_data(&n);
    let mut td_report = vec![0u8; coffer_wire::hcl::TD_REPORT_LEN];
    td_report[TD_REPORT_DATA_OFFSET..TD_REPORT_DATA_OFFSET + 32]
        .copy_from_slice(&sha2::Sha256::digest(&var));
    let report =
        coffer_wire::hcl::build(coffer_wire::hcl::REPORT_TYPE_TDX, &td_report, &var).unwrap();
    write_hcl_report(&mut ctx, &report);
    (report, td_report)
}

/// Azure's instance metadata service, as far as attestation uses it, on loopback: `GET
/// /metadata/THIM/amd/certification` answers the VCEK and its chain (PEM), `POST /acc/tdquote`
/// answers `td_quote` for the TDREPORT it is sent (and records that report). Both insist on the
/// `Metadata: true` header, as IMDS does.
pub struct Imds {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The TDREPORTs `/acc/tdquote` was asked to quote.
    pub td_reports: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Imds {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Imds {
    /// Starts the service; `vcek_pem` and `chain_pem` are what the certification endpoint
    /// returns, `td_quote` what the quote endpoint returns.
    pub async fn start(vcek_pem: String, chain_pem: String, td_quote: Vec<u8>) -> Imds {
        use hyper::{body::Incoming, Request, Response};
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let td_reports = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = td_reports.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (vcek, chain, quote, seen) = (
                    vcek_pem.clone(),
                    chain_pem.clone(),
                    td_quote.clone(),
                    seen.clone(),
                );
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (vcek, chain, quote, seen) =
                            (vcek.clone(), chain.clone(), quote.clone(), seen.clone());
                        async move {
                            use http_body_util::BodyExt;
                            let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
                            let meta = req
                                .headers()
                                .get("Metadata")
                                .is_some_and(|v| v.as_bytes() == b"true");
                            let path = req.uri().path().to_string();
                            let method = req.method().clone();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let (status, text) = match (meta, method.as_str(), path.as_str()) {
                                (false, _, _) => (400, r#"{"error":"Bad request. Required metadata header not specified"}"#.to_string()),
                                (true, "GET", "/metadata/THIM/amd/certification") => (
                                    200,
                                    serde_json::json!({"vcekCert": vcek, "certificateChain": chain})
                                        .to_string(),
                                ),
                                (true, "POST", "/acc/tdquote") => {
                                    let v: serde_json::Value =
                                        serde_json::from_slice(&body).unwrap_or_default();
                                    match v["report"].as_str().and_then(|r| b64.decode(r).ok()) {
                                        Some(r) => {
                                            seen.lock().unwrap().push(r);
                                            (200, serde_json::json!({"quote": b64.encode(&quote)}).to_string())
                                        }
                                        None => (400, r#"{"error":"report"}"#.to_string()),
                                    }
                                }
                                _ => (404, "{}".to_string()),
                            };
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .status(status)
                                    .header("Content-Type", "application/json")
                                    .body(http_body_util::Full::new(hyper::body::Bytes::from(text)))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Imds {
            url,
            td_reports,
            task,
        }
    }
}
