//! Verifications per second on one core (this thread), endorsement certificates cached.
//! Run: `cargo bench -p coffer-verifier`; with `--features se-testing`, IBM Secure Execution too
//! (its evidence comes from the Ultravisor stand-in).

use std::time::{Duration, Instant, UNIX_EPOCH};

use coffer_verifier::{snp::SnpVerifier, Expected, Verifier};

fn rate(name: &str, mut f: impl FnMut()) {
    f(); // warm: fills the certificate cache
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(3) {
        f();
        n += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{name}: {:.0} verifications/s ({n} in {secs:.2} s)",
        n as f64 / secs
    );
}

fn main() {
    let now = UNIX_EPOCH + Duration::from_secs(1_767_225_600);
    let expected = Expected {
        report_data: None,
        init_data_digest: None,
        now,
    };
    let report = include_bytes!("../testdata/snp/test-report.bin");
    let vcek = include_bytes!("../testdata/snp/test-vcek.der");
    let v = SnpVerifier::default();
    rate("snp raw report (Milan, VCEK cached)", || {
        v.verify_report(report, vcek, &expected).expect("verifies");
    });
    let ev: serde_json::Value =
        serde_json::from_str(include_str!("../testdata/snp/genoa-evidence.json")).unwrap();
    rate("snp evidence JSON (Genoa, VCEK cached)", || {
        v.verify(&ev, &expected).expect("verifies");
    });
    let tdx_quote = include_bytes!("../testdata/tdx/dcapqvl_tdx_quote");
    let tdx_coll = coffer_verifier::dcap::parse_collateral(include_bytes!(
        "../testdata/tdx/dcapqvl_tdx_quote_collateral.json"
    ))
    .unwrap();
    let july_2025 = Expected {
        report_data: None,
        init_data_digest: None,
        now: UNIX_EPOCH + Duration::from_secs(1_751_328_000),
    };
    let tdx = coffer_verifier::dcap::DcapVerifier::new(coffer_wire::Tee::Tdx, Vec::new());
    rate(
        "tdx quote v4 (full DCAP: chains, CRLs, TCB info, QE identity)",
        || {
            tdx.verify_quote(tdx_quote, &tdx_coll, &july_2025)
                .expect("verifies");
        },
    );
    let az: serde_json::Value =
        serde_json::from_str(include_str!("../testdata/az-snp-vtpm/evidence-v1.json")).unwrap();
    let az_v = coffer_verifier::az_snp::AzSnpVtpmVerifier::default();
    let challenge = Expected {
        report_data: Some(b"challenge"),
        ..expected
    };
    rate("az-snp-vtpm evidence (VCEK cached)", || {
        az_v.verify(&az, &challenge).expect("verifies");
    });
    let gpu =
        hex::decode(include_str!("../testdata/nvidia/hopperAttestationReport.txt").trim()).unwrap();
    let chain = include_bytes!("../testdata/nvidia/hopper_cert_chain_case1.txt");
    rate("nvidia hopper report (chain verified each time)", || {
        coffer_verifier::nvidia::verify_gpu(
            &gpu,
            chain,
            coffer_verifier::nvidia::NVIDIA_DEVICE_ROOT,
            &expected,
        )
        .expect("verifies");
    });
    #[cfg(feature = "se-testing")]
    se();
    rate(
        "snp cold (roots loaded, chain and report verified each time)",
        || {
            let fresh = SnpVerifier::default();
            fresh
                .verify_report(report, vcek, &expected)
                .expect("verifies");
        },
    );
}

/// IBM SE: the KBS's two steps. The challenge (`/auth`): a request whose key is wrapped for each
/// configured host (a P-521 key pair and one ECDH per host). The verification (`/attest`): the
/// HMAC-SHA512 measurement recomputed for each registered image until one matches, the user
/// data and the attesting host checked; host-key documents were verified once, at load.
#[cfg(feature = "se-testing")]
fn se() {
    use coffer_verifier::se::{challenge, testing, verify, HostKeys};
    let hosts: Vec<testing::Host> = (0..2)
        .map(|i| testing::Host::new(&format!("h{i}")))
        .collect();
    let docs: Vec<(String, Vec<u8>)> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| (format!("h{i}"), h.document.clone()))
        .collect();
    let keys = HostKeys::load(&docs, None).unwrap();
    rate("se challenge (attestation request for 2 hosts)", || {
        challenge(&keys).expect("a request");
    });
    let (arcb, secret) = challenge(&keys).unwrap();
    let runtime = [7u8; 64];
    let images: Vec<_> = (0..10).map(testing::image).collect();
    for (n, which) in [(1, 0), (10, 9)] {
        let evidence = hosts[1].answer(&arcb, &images[which], [3; 16], &runtime);
        rate(
            &format!("se evidence ({n} registered image(s), the last one matching)"),
            || {
                verify(&evidence, &secret, &images[..n], &runtime, &keys).expect("verifies");
            },
        );
    }
}
