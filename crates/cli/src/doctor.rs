//! `coffer doctor`: checks this host for what each sandbox kind and TEE needs (see
//! `coffer_doctor`) and prints one line per check. It never fails on what it finds.

use std::path::PathBuf;

use clap::Args;
use coffer_doctor::{Host, Options, Status};

/// `coffer doctor` arguments.
#[derive(Args)]
pub struct DoctorArgs {
    /// Also check that this KBS answers (its base URL, e.g. http://127.0.0.1:8080).
    #[arg(long)]
    kbs: Option<String>,
    /// Where sandboxes keep their state.
    #[arg(long, default_value = coffer_keeper::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Where pod VM images and downloaded packages are kept [default: ~/.cache/coffer].
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Check the host mounted at this directory instead of this one (its programs in its
    /// /usr/bin and the like); for tests and rescue systems.
    #[arg(long, hide = true)]
    root: Option<PathBuf>,
    /// With --root: the user id the checks assume.
    #[arg(long, hide = true, default_value_t = 0)]
    uid: u32,
}

/// Runs `coffer doctor`.
pub async fn run(a: DoctorArgs) -> anyhow::Result<()> {
    let host = match &a.root {
        Some(r) => Host::at(r, a.uid),
        None => Host::this(),
    };
    let cache_dir = a.cache_dir.unwrap_or_else(|| {
        std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/root"))
            .join(".cache/coffer")
    });
    let scratch = tempfile_dir()?;
    let checks = coffer_doctor::run(
        &host,
        &Options {
            kbs: a.kbs,
            state_dir: a.state_dir,
            cache_dir,
            scratch: scratch.clone(),
        },
    )
    .await;
    let _ = std::fs::remove_dir_all(&scratch);
    for c in &checks {
        println!("{c}");
    }
    let missing = checks
        .iter()
        .filter(|c| c.status == Status::Missing)
        .count();
    let limited = checks
        .iter()
        .filter(|c| c.status == Status::Limited)
        .count();
    println!(
        "{} checks: {missing} missing, {limited} limited{}",
        checks.len(),
        if missing + limited > 0 {
            " (each says what to do after ->)"
        } else {
            ""
        }
    );
    Ok(())
}

/// A fresh private directory for the KVM probe's firmware.
fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("coffer-doctor-{}", crate::ctl::random_hex(6)));
    std::fs::create_dir(&dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}
