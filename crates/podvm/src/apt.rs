//! apt with a configuration of its own: its sources list and state under a cache directory, the
//! system's apt untouched. Debian's archive and its keys, the suite the pod VM's kernel comes
//! from, and the s390x package index.

use std::path::Path;
use std::process::Command;

/// Debian's archive.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// The archive's signing keys, as Debian installs them.
pub(crate) const ARCHIVE_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// The suite the kernel comes from: bookworm-backports' kernel (6.12) has the SEV-SNP and TDX
/// guest drivers and configfs-tsm (`CONFIG_SEV_GUEST`, `CONFIG_TDX_GUEST_DRIVER`,
/// `CONFIG_TSM_REPORTS`), which bookworm's 6.1 lacks; one image serves every launch.
pub const KERNEL_SUITE: &str = "bookworm-backports";

/// apt with a sources list of its own (`sources`, one-line format) and its state under `dir`;
/// the system's apt configuration and state are untouched.
pub(crate) fn private_apt(dir: &Path, sources: &str) -> std::io::Result<Command> {
    for d in ["lists/partial", "cache/archives/partial", "parts"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    let list = dir.join("sources.list");
    std::fs::write(&list, sources)?;
    let mut cmd = Command::new("apt-get");
    cmd.arg("-q")
        .arg("-o")
        .arg(format!("Dir::Etc::SourceList={}", list.display()))
        .arg("-o")
        .arg(format!(
            "Dir::Etc::SourceParts={}",
            dir.join("parts").display()
        ))
        .arg("-o")
        .arg(format!("Dir::State::Lists={}", dir.join("lists").display()))
        .arg("-o")
        .arg(format!("Dir::Cache={}", dir.join("cache").display()))
        .arg("-o")
        .arg("Debug::NoLocking=true")
        // The downloads land in directories of the caller's; apt's unprivileged download user
        // could not write them.
        .arg("-o")
        .arg("APT::Sandbox::User=")
        .env("LC_ALL", "C");
    Ok(cmd)
}

/// apt for s390x packages: a sources list and state of its own under `cache/s390x/apt`
/// (bookworm with its updates and security updates, and bookworm-backports for the kernel), for
/// the s390x architecture only; the system's apt is untouched.
pub fn s390x_apt(cache: &Path) -> std::io::Result<Command> {
    let dir = cache.join("s390x/apt");
    let k = ARCHIVE_KEYRING;
    let m = DEFAULT_MIRROR;
    let sources = format!(
        "deb [signed-by={k} arch=s390x] {m} bookworm main\n\
         deb [signed-by={k} arch=s390x] {m} bookworm-updates main\n\
         deb [signed-by={k} arch=s390x] {m}-security bookworm-security main\n\
         deb [signed-by={k} arch=s390x] {m} {KERNEL_SUITE} main\n"
    );
    let mut cmd = private_apt(&dir, &sources)?;
    cmd.args([
        "-o",
        "APT::Architecture=s390x",
        "-o",
        "APT::Architectures::=s390x",
    ]);
    Ok(cmd)
}

/// Holds the s390x package cache (`cache/s390x`) for one user at a time: its apt state and its
/// package files are shared, and apt runs there without its own locking. Released when the
/// returned file is dropped.
pub fn s390x_lock(cache: &Path) -> std::io::Result<std::fs::File> {
    let dir = cache.join("s390x");
    std::fs::create_dir_all(&dir)?;
    let f = std::fs::File::create(dir.join("lock"))?;
    f.lock()?;
    Ok(f)
}
