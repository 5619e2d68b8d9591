//! `coffer attest verify` as acceptance scripts run it, on real SNP evidence.

use std::{path::PathBuf, process::Command};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../verifier/testdata/snp")
        .join(name)
}

fn coffer(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_coffer"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn valid_report_prints_claims() {
    let report = data("test-report.bin");
    let cert = data("test-vcek.der");
    let (ok, stdout, stderr) = coffer(&[
        "attest",
        "verify",
        "--tee",
        "snp",
        "--report",
        report.to_str().unwrap(),
        "--cert",
        cert.to_str().unwrap(),
        "--report-data",
        "ec6c52d7533cc2c4f45be7849cf112ab82b2009fe7bd43e71ed08c14400ad7e2",
        "--now",
        "2026-01-01T00:00:00Z",
    ]);
    assert!(ok, "{stderr}");
    let claims: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(claims["reported_tcb"]["microcode"], 115);
    assert_eq!(claims["generation"], "milan");
}

#[test]
fn failures_exit_non_zero_with_one_line_naming_the_check() {
    let report = data("test-report.bin");
    let cert = data("test-vcek.der");
    let cases: [(&[&str], &str); 3] = [
        (&["--report-data", "00"], "report data"),
        (&["--init-data-digest", "01"], "initdata"),
        (&["--now", "2031-01-01T00:00:00Z"], "not valid"),
    ];
    for (extra, needle) in cases {
        let mut args = vec![
            "attest",
            "verify",
            "--tee",
            "snp",
            "--report",
            report.to_str().unwrap(),
            "--cert",
            cert.to_str().unwrap(),
        ];
        if !extra.contains(&"--now") {
            args.extend(["--now", "2026-01-01T00:00:00Z"]);
        }
        args.extend_from_slice(extra);
        let (ok, stdout, stderr) = coffer(&args);
        assert!(!ok);
        assert!(stdout.is_empty());
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(needle), "{stderr} should name {needle}");
    }
}

#[test]
fn upstream_evidence_json_verifies() {
    let ev = data("genoa-evidence.json");
    let (ok, stdout, stderr) = coffer(&[
        "attest",
        "verify",
        "--tee",
        "snp",
        "--evidence",
        ev.to_str().unwrap(),
        "--now",
        "2026-01-01T00:00:00Z",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("\"genoa\""));
}

#[test]
fn tdx_and_sgx_quotes_verify_with_collateral() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../verifier/testdata");
    let tdx = dir.join("tdx/dcapqvl_tdx_quote");
    let tdx_coll = dir.join("tdx/dcapqvl_tdx_quote_collateral.json");
    let (ok, stdout, stderr) = coffer(&[
        "attest",
        "verify",
        "--tee",
        "tdx",
        "--quote",
        tdx.to_str().unwrap(),
        "--collateral",
        tdx_coll.to_str().unwrap(),
        "--now",
        "2025-07-01T00:00:00Z",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("\"mr_td\""));
    // Outside the collateral's validity: one line naming the failure.
    let (ok, _, stderr) = coffer(&[
        "attest",
        "verify",
        "--tee",
        "tdx",
        "--quote",
        tdx.to_str().unwrap(),
        "--collateral",
        tdx_coll.to_str().unwrap(),
        "--now",
        "2026-11-01T00:00:00Z",
    ]);
    assert!(!ok);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    let sgx = dir.join("sgx/dcapqvl_sgx_quote");
    let sgx_coll = dir.join("sgx/dcapqvl_sgx_quote_collateral.json");
    let (ok, stdout, stderr) = coffer(&[
        "attest",
        "verify",
        "--tee",
        "sgx",
        "--quote",
        sgx.to_str().unwrap(),
        "--collateral",
        sgx_coll.to_str().unwrap(),
        "--now",
        "2025-07-01T00:00:00Z",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("ConfigurationAndSWHardeningNeeded"));

    // A PCCS that cannot be reached: one line naming it, no claims.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (ok, stdout, stderr) = coffer(&[
        "attest",
        "verify",
        "--tee",
        "tdx",
        "--quote",
        tdx.to_str().unwrap(),
        "--pccs-url",
        &format!("http://{dead}"),
    ]);
    assert!(!ok && stdout.is_empty());
    assert!(
        stderr.contains(&format!("cannot reach the PCCS at http://{dead}")),
        "{stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}

#[test]
fn azure_snp_vtpm_evidence_verifies_with_the_challenge() {
    let ev = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../verifier/testdata/az-snp-vtpm/evidence-v1.json");
    let (ok, stdout, stderr) = coffer(&[
        "attest",
        "verify",
        "--tee",
        "az-snp-vtpm",
        "--evidence",
        ev.to_str().unwrap(),
        "--report-data",
        "6368616c6c656e6765",
        "--now",
        "2026-01-01T00:00:00Z",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("e15c44796beabf46abcec7c57e590942041e47497e4ec27571c8b7664f48dced"));
    let (ok, _, stderr) = coffer(&[
        "attest",
        "verify",
        "--tee",
        "az-snp-vtpm",
        "--evidence",
        ev.to_str().unwrap(),
        "--report-data",
        "00",
        "--now",
        "2026-01-01T00:00:00Z",
    ]);
    assert!(!ok);
    assert!(stderr.contains("report data"), "{stderr}");
}

#[test]
fn nvidia_gpu_report_verifies_and_bad_chains_fail() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../verifier/testdata/nvidia");
    let report = dir.join("hopperAttestationReport.txt");
    let nonce = "931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb";
    let run = |chain: &str| {
        coffer(&[
            "attest",
            "verify",
            "--tee",
            "nvidia",
            "--report",
            report.to_str().unwrap(),
            "--cert-chain",
            dir.join(chain).to_str().unwrap(),
            "--report-data",
            nonce,
        ])
    };
    let (ok, stdout, stderr) = run("hopper_cert_chain_case1.txt");
    assert!(ok, "{stderr}");
    assert!(stdout.contains("550.90.07"));
    for chain in [
        "hopper_cert_chain_case2.txt",
        "hopper_cert_chain_case3.txt",
        "hopper_cert_chain_case4.txt",
    ] {
        let (ok, _, stderr) = run(chain);
        assert!(!ok, "{chain}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    }
}

#[test]
fn azure_tdx_evidence_without_collateral_is_inspected_loudly() {
    let ev = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../verifier/testdata/az-tdx-vtpm/evidence-v1.json");
    let (ok, stdout, stderr) = coffer(&[
        "attest",
        "verify",
        "--tee",
        "az-tdx-vtpm",
        "--evidence",
        ev.to_str().unwrap(),
        "--report-data",
        "6368616c6c656e6765",
    ]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("NOT verified"), "{stderr}");
    let claims: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(claims["tdx"]["dcap_verified"], false);
}

#[test]
fn fetch_vcek_fills_the_offline_cache_or_fails_clearly() {
    let ev_path = data("genoa-evidence.json");
    let ev: serde_json::Value = serde_json::from_slice(&std::fs::read(&ev_path).unwrap()).unwrap();
    let vcek: Vec<u8> = serde_json::from_value(ev["cert_chain"][0]["data"].clone()).unwrap();
    let chip: Vec<u8> =
        serde_json::from_value(ev["attestation_report"]["chip_id"].clone()).unwrap();
    let chip_hex: String = chip.iter().map(|b| format!("{b:02x}")).collect();
    // A KDS stand-in: a real HTTP server on loopback serving the VCEK at the KDS path.
    let site = tempfile::tempdir().unwrap();
    let dir = site.path().join("vcek/v1/Genoa");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(&chip_hex), &vcek).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(site.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let cache = tempfile::tempdir().unwrap();
    let mut result = None;
    for _ in 0..50 {
        let r = coffer(&[
            "attest",
            "fetch-vcek",
            "--evidence",
            ev_path.to_str().unwrap(),
            "--vcek-dir",
            cache.path().to_str().unwrap(),
            "--kds-url",
            &url,
        ]);
        if r.0 {
            result = Some(r);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = server.kill();
    let _ = server.wait();
    let (_, stdout, _) = result.expect("fetch-vcek succeeds against the local KDS");
    let file = PathBuf::from(stdout.trim());
    assert_eq!(std::fs::read(&file).unwrap(), vcek);
    assert!(file
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .contains(&chip_hex));

    // No KDS reachable: one line naming the URL.
    let (ok, _, stderr) = coffer(&[
        "attest",
        "fetch-vcek",
        "--evidence",
        ev_path.to_str().unwrap(),
        "--vcek-dir",
        cache.path().to_str().unwrap(),
        "--kds-url",
        "http://127.0.0.1:9",
    ]);
    assert!(!ok);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("cannot fetch the VCEK from AMD KDS"),
        "{stderr}"
    );
}
