//! What the attester tests share: the initdata they attest with, and a KBS that trusts the
//! emulated PSP, holds one secret and accepts one launch measurement with that initdata.

#![allow(dead_code)]

use std::path::Path;

use coffer_psp::Tcb;

/// The initdata the tests' guests present.
pub const INITDATA: &str =
    "version = \"0.1.0\"\nalgorithm = \"sha256\"\n[data]\n\"policy.rego\" = \"package agent_policy\"\n";

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A KBS (state under `dir`) that trusts the emulated PSP in `psp_dir`, holds `secret` at
/// `default/app/secret`, and whose reference values accept `measurement` with [`INITDATA`] at
/// the emulated PSP's TCB.
pub async fn emulated_snp_kbs(
    dir: &Path,
    psp_dir: &Path,
    measurement: &[u8; 48],
    secret: &[u8],
) -> coffer_testkit::TestKbs {
    let kbs = coffer_testkit::start_kbs(dir, |c| {
        c.allow_emulated = true;
        c.emulated_root = Some(psp_dir.join("roots.pem"));
    })
    .await;
    kbs.admin
        .set_resource("default/app/secret", secret.to_vec())
        .await
        .unwrap();
    let tcb = Tcb::default();
    let refs = serde_json::json!({
        "measurement": [hex(measurement)],
        "init_data": [hex(&coffer_wire::initdata::digest(INITDATA).unwrap())],
        "snp_tcb_min": [{"bootloader": tcb.bootloader, "tee": tcb.tee, "snp": tcb.snp, "microcode": tcb.microcode}],
    });
    kbs.admin
        .set_reference_values(refs.to_string().as_bytes())
        .await
        .unwrap();
    kbs
}
