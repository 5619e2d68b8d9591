//! TDX/SGX DCAP quotes against real collateral.
#![no_main]
use std::time::{Duration, UNIX_EPOCH};

use coffer_verifier::{dcap, Expected};
use coffer_wire::Tee;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    thread_local!(static C: dcap_qvl_collateral::Collateral = dcap_qvl_collateral::load());
    let e = Expected {
        report_data: None,
        init_data_digest: None,
        now: UNIX_EPOCH + Duration::from_secs(1_751_328_000),
    };
    C.with(|c| {
        let _ = dcap::DcapVerifier::new(Tee::Tdx, Vec::new()).verify_quote(data, c, &e);
    });
});

mod dcap_qvl_collateral {
    pub type Collateral = dcap_qvl::QuoteCollateralV3;
    pub fn load() -> Collateral {
        coffer_verifier::dcap::parse_collateral(include_bytes!(
            "../../crates/verifier/testdata/tdx/dcapqvl_tdx_quote_collateral.json"
        ))
        .expect("collateral")
    }
}
