//! TEE firmware built from Debian's edk2 source package: OVMF's AmdSev build for SEV-SNP (the
//! firmware that carries the kernel-hashes table, so that measured direct boot measures the
//! kernel, initrd and command line) and TDVF (edk2's IntelTdx build) for TDX.
//!
//! Debian ships neither. The recipe:
//!
//! 1. **Source**: `edk2`'s source package from Debian's archive, found by apt through a private
//!    apt configuration (a `deb-src` list of its own, its own index and cache directories under
//!    the cache; the system's apt setup is not touched). apt checks every file against the
//!    archive's signed `InRelease` (the `debian-archive-keyring`), so the source is Debian's,
//!    byte for byte (each tarball's SHA-256 as the signed `Sources` index lists it); it is
//!    unpacked as `dpkg-source -x` would, Debian's patches applied in their series' order.
//! 2. **Build**: edk2's `BaseTools`, then `build -a X64 -t GCC5 -b RELEASE` of
//!    `OvmfPkg/AmdSev/AmdSevX64.dsc` (its GRUB module an empty file: Coffer boots the kernel
//!    directly, never GRUB) or `OvmfPkg/IntelTdx/IntelTdxX64.dsc`, each with edk2's defaults.
//!    It needs `nasm`, `iasl` (`acpica-tools`), `uuid-dev`, `gcc`, `make`, `patch` and
//!    `python3`.
//! 3. **Check**: the AmdSev image must have SEV metadata and the kernel-hashes table
//!    ([`crate::snp::launch_digest`] accepts a kernel with it); the TDVF must carry TDX metadata
//!    ([`crate::tdx::Tdvf::parse`]).
//!
//! The result is kept in the cache under the source package's version and the recipe's
//! revision ([`RECIPE`]), with a `build.json` that records the source files' SHA-256 and the
//! firmware's: a second build is a copy. The first costs about two minutes per firmware on two
//! cores (and one download of the 30 MB source). edk2 records paths in the images, so the build
//! runs in a mount namespace of its own (`unshare`; a user namespace too when not root) with its
//! tree at a fixed path, [`BUILD_AT`]: the same source gives the same firmware bytes wherever
//! the cache is (`docs/podvm.md` records the hashes).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use sha2::{Digest, Sha256};

/// The revision of the build recipe above: a change to it gives a new cache entry.
pub const RECIPE: u32 = 1;
pub use crate::apt::DEFAULT_MIRROR;
/// The Debian release whose edk2 is built: trixie's (2025.02). Bookworm's 2022.11 predates
/// the SNP kernel-hashes section of OVMF's SEV metadata (edk2 2023), without which an SEV-SNP
/// launch measures nothing of the kernel.
pub const DEFAULT_SUITE: &str = "trixie";
/// Where the build sees its source tree's parent (in a mount namespace of its own).
pub const BUILD_AT: &str = "/mnt";
/// The archive's signing keys, as Debian installs them.
use crate::apt::{private_apt, ARCHIVE_KEYRING};

/// Which firmware.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// OVMF's AmdSev build: SEV-SNP with measured direct boot.
    AmdSev,
    /// TDVF (OVMF's IntelTdx build).
    IntelTdx,
}

impl Kind {
    /// Its name in the cache and in messages.
    pub fn name(self) -> &'static str {
        match self {
            Kind::AmdSev => "amdsev",
            Kind::IntelTdx => "inteltdx",
        }
    }

    fn platform(self) -> (&'static str, &'static str, &'static [&'static str]) {
        match self {
            Kind::AmdSev => ("OvmfPkg/AmdSev/AmdSevX64.dsc", "AmdSev", &[]),
            Kind::IntelTdx => ("OvmfPkg/IntelTdx/IntelTdxX64.dsc", "IntelTdx", &[]),
        }
    }
}

/// Why firmware could not be built.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    /// A tool the build needs is not installed.
    #[error("building {kind} firmware needs {tool} (apt-get install {package})")]
    MissingTool {
        /// The firmware.
        kind: &'static str,
        /// The program.
        tool: &'static str,
        /// The Debian package that has it.
        package: &'static str,
    },
    /// A step failed.
    #[error("building {kind} firmware: {step} failed: {detail}")]
    Step {
        /// The firmware.
        kind: &'static str,
        /// The step.
        step: String,
        /// The end of its output.
        detail: String,
    },
    /// The built image is not what the TEE needs.
    #[error("the {kind} firmware built from edk2 {version} is unusable: {why}")]
    Unusable {
        /// The firmware.
        kind: &'static str,
        /// The source package's version.
        version: String,
        /// Why.
        why: String,
    },
    /// I/O.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> FirmwareError {
    let what = what.into();
    move |source| FirmwareError::Io { what, source }
}

/// Where and from what to build.
#[derive(Clone, Debug)]
pub struct Source {
    /// The cache directory (firmware under `firmware/`, the source under `edk2-source/`).
    pub cache: PathBuf,
    /// Debian's archive.
    pub mirror: String,
    /// The Debian release.
    pub suite: String,
}

impl Source {
    /// Debian trixie's edk2 from `deb.debian.org`, cached in `cache`.
    pub fn debian(cache: &Path) -> Self {
        Self {
            cache: cache.to_path_buf(),
            mirror: DEFAULT_MIRROR.into(),
            suite: DEFAULT_SUITE.into(),
        }
    }
}

/// A built firmware in the cache.
#[derive(Clone, Debug)]
pub struct Built {
    /// The image.
    pub path: PathBuf,
    /// The edk2 source package's version.
    pub version: String,
    /// The image's SHA-256 (hex).
    pub sha256: String,
}

fn tail(out: &[u8]) -> String {
    let text = String::from_utf8_lossy(out);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

fn run(kind: Kind, step: &str, cmd: &mut Command) -> Result<Vec<u8>, FirmwareError> {
    let out = cmd.output().map_err(|e| FirmwareError::Step {
        kind: kind.name(),
        step: step.into(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        let mut all = out.stdout;
        all.extend_from_slice(&out.stderr);
        return Err(FirmwareError::Step {
            kind: kind.name(),
            step: step.into(),
            detail: tail(&all),
        });
    }
    Ok(out.stdout)
}

fn check_tools(kind: Kind) -> Result<(), FirmwareError> {
    for (tool, package) in [
        ("apt-get", "apt"),
        ("tar", "tar"),
        ("unshare", "util-linux"),
        ("patch", "patch"),
        ("nasm", "nasm"),
        ("iasl", "acpica-tools"),
        ("gcc", "gcc"),
        ("make", "make"),
        ("python3", "python3"),
    ] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
        if !found {
            return Err(FirmwareError::MissingTool {
                kind: kind.name(),
                tool,
                package,
            });
        }
    }
    if !Path::new("/usr/include/uuid/uuid.h").exists() {
        return Err(FirmwareError::MissingTool {
            kind: kind.name(),
            tool: "uuid/uuid.h",
            package: "uuid-dev",
        });
    }
    Ok(())
}

/// apt, configured to read only `deb-src` lines of its own, with its state under `dir`.
fn apt(dir: &Path, src: &Source) -> Result<Command, FirmwareError> {
    private_apt(
        dir,
        &format!(
            "deb-src [signed-by={ARCHIVE_KEYRING}] {} {} main\n",
            src.mirror, src.suite
        ),
    )
    .map_err(io(format!("cannot set up apt in {}", dir.display())))
}

fn sha256_hex(path: &Path) -> Result<String, FirmwareError> {
    crate::launch::sha256_file(path)
        .map(hex::encode)
        .map_err(io(format!("cannot read {}", path.display())))
}

/// The firmware of `kind`, built from Debian's edk2 source (see the module's documentation),
/// or the one built before with the same source version and recipe.
pub fn build(kind: Kind, src: &Source) -> Result<Built, FirmwareError> {
    let root = src.cache.join("edk2-source");
    std::fs::create_dir_all(&root).map_err(io(format!("cannot create {}", root.display())))?;
    // One firmware fetch and build at a time per cache (the source files and apt's state are
    // shared); a build that waited finds the image made.
    let lock_path = root.join("lock");
    let lock = std::fs::File::create(&lock_path)
        .map_err(io(format!("cannot create {}", lock_path.display())))?;
    lock.lock()
        .map_err(io(format!("cannot lock {}", lock_path.display())))?;
    // The source: the archive's current version, else (offline) the one fetched before.
    let downloads = root.join("files");
    let version = match fetch_source(kind, src, &root, &downloads) {
        Ok(v) => v,
        Err(e) => match fetched_version(&downloads) {
            Some(v) => {
                tracing::warn!(error = %e, version = %v, "cannot reach Debian's archive; building the edk2 source fetched before");
                v
            }
            None => return Err(e),
        },
    };
    let entry = src
        .cache
        .join("firmware")
        .join(format!("{}-{version}-r{RECIPE}", kind.name()));
    let image = entry.join("OVMF.fd");
    if image.is_file() {
        match cached(kind, &entry) {
            Ok(sha256) => {
                return Ok(Built {
                    path: image,
                    version,
                    sha256,
                })
            }
            Err(why) => {
                tracing::warn!(entry = %entry.display(), %why, "the cached firmware is damaged; building it again");
                std::fs::remove_dir_all(&entry)
                    .map_err(io(format!("cannot remove {}", entry.display())))?;
            }
        }
    }
    check_tools(kind)?;
    let started = Instant::now();
    let work = root.join(format!("build-{}", kind.name()));
    if work.exists() {
        std::fs::remove_dir_all(&work).map_err(io(format!("cannot clear {}", work.display())))?;
    }
    let tree = work.join("edk2");
    tracing::info!(firmware = kind.name(), %version, "building TEE firmware from Debian's edk2 source (about a minute)");
    unpack(kind, &downloads, &version, &tree)?;
    let (dsc_file, platform, defines) = kind.platform();
    // The build runs in a mount namespace of its own with the work directory at BUILD_AT: the
    // paths edk2 records in the images are the same whatever the cache's path.
    let script = format!(
        "set -e; work=\"$1\"; shift; mount --bind \"$work\" {BUILD_AT}; cd {BUILD_AT}/edk2; \
         make -C BaseTools >../basetools.log 2>&1 || {{ tail -20 ../basetools.log >&2; exit 1; }}; \
         set +u; . ./edksetup.sh >/dev/null; \
         : > OvmfPkg/AmdSev/Grub/grub.efi; \
         build -q -n 2 -a X64 -t GCC5 -b RELEASE -p {dsc_file} {defines}",
        defines = defines.join(" ")
    );
    let root_user = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
    };
    let mut unshare = Command::new("unshare");
    if !root_user {
        unshare.args(["--user", "--map-root-user"]);
    }
    run(
        kind,
        &format!("edk2 build of {dsc_file}"),
        unshare
            .args(["--mount", "--propagation", "private", "bash", "-c"])
            .arg(&script)
            .arg("bash")
            .arg(&work)
            .env("PYTHON3_ENABLE", "TRUE")
            .env("SOURCE_DATE_EPOCH", "0")
            .env("LC_ALL", "C"),
    )?;
    let out = tree.join(format!("Build/{platform}/RELEASE_GCC5/FV/OVMF.fd"));
    let bytes = std::fs::read(&out).map_err(io(format!("cannot read {}", out.display())))?;
    check(kind, &bytes).map_err(|why| FirmwareError::Unusable {
        kind: kind.name(),
        version: version.clone(),
        why,
    })?;
    // Kept whole or not at all.
    let parent = entry.parent().unwrap_or(&src.cache).to_path_buf();
    std::fs::create_dir_all(&parent).map_err(io(format!("cannot create {}", parent.display())))?;
    let staged = tempfile::Builder::new()
        .prefix(".firmware-")
        .tempdir_in(&parent)
        .map_err(io(format!("cannot stage in {}", parent.display())))?;
    write_synced(&staged.path().join("OVMF.fd"), &bytes)
        .map_err(io("cannot stage the firmware"))?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let mut sources = serde_json::Map::new();
    for e in std::fs::read_dir(&downloads)
        .map_err(io("cannot list the source files"))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with("edk2_") {
            sources.insert(name, sha256_hex(&e.path())?.into());
        }
    }
    let record = serde_json::json!({
        "firmware": kind.name(),
        "edk2_version": version,
        "recipe": RECIPE,
        "platform": dsc_file,
        "defines": defines,
        "sources": sources,
        "sha256": sha256,
        "build_seconds": started.elapsed().as_secs(),
    });
    write_synced(
        &staged.path().join("build.json"),
        &serde_json::to_vec_pretty(&record).unwrap_or_default(),
    )
    .map_err(io("cannot stage the build record"))?;
    std::fs::File::open(staged.path())
        .and_then(|d| d.sync_all())
        .map_err(io("cannot flush the staged firmware"))?;
    let staged = staged.keep();
    if let Err(e) = std::fs::rename(&staged, &entry) {
        // Another build finished first: its firmware stays.
        let _ = std::fs::remove_dir_all(&staged);
        if !image.is_file() {
            return Err(io(format!("cannot keep {}", entry.display()))(e));
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    tracing::info!(firmware = kind.name(), %version, %sha256, seconds = started.elapsed().as_secs(), "TEE firmware built");
    Ok(Built {
        path: image,
        version,
        sha256,
    })
}

/// One file of the source package, as the signed index lists it.
struct SourceFile {
    uri: String,
    name: String,
    sha256: String,
}

/// Downloads the archive's current edk2 source package (its upstream and Debian tarballs)
/// into `downloads`, each checked against the SHA-256 the signed `Sources` index gives (files
/// already there are checked, not fetched again; another version's go); returns the version.
fn fetch_source(
    kind: Kind,
    src: &Source,
    root: &Path,
    downloads: &Path,
) -> Result<String, FirmwareError> {
    let state = root.join("apt");
    run(
        kind,
        "apt-get update (edk2 source index)",
        apt(&state, src)?.arg("update"),
    )?;
    std::fs::create_dir_all(downloads)
        .map_err(io(format!("cannot create {}", downloads.display())))?;
    // `'URI' NAME SIZE SHA256:HASH` per file; apt lists only what the directory lacks, so it
    // asks from an empty one.
    let empty = root.join("uris");
    std::fs::create_dir_all(&empty).map_err(io(format!("cannot create {}", empty.display())))?;
    let uris = run(
        kind,
        "apt-get source --print-uris edk2",
        apt(&state, src)?
            .args(["source", "--print-uris", "edk2"])
            .current_dir(&empty),
    )?;
    let files: Vec<SourceFile> = String::from_utf8_lossy(&uris)
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let uri = w
                .next()?
                .strip_prefix('\'')?
                .strip_suffix('\'')?
                .to_string();
            let name = w.next()?.to_string();
            let sha256 = w.nth(1)?.strip_prefix("SHA256:")?.to_string();
            Some(SourceFile { uri, name, sha256 })
        })
        // The tarballs are what is built; the .dsc only lists them (and the index already
        // gives their hashes).
        .filter(|f| f.name.contains(".tar."))
        .collect();
    let version = files
        .iter()
        .find_map(|f| f.name.strip_prefix("edk2_")?.strip_suffix(".debian.tar.xz"))
        .ok_or_else(|| FirmwareError::Step {
            kind: kind.name(),
            step: "apt-get source --print-uris edk2".into(),
            detail: format!("no edk2 Debian tarball listed: {}", tail(&uris)),
        })?
        .to_string();
    for f in &files {
        let path = downloads.join(&f.name);
        if path.is_file() && sha256_hex(&path)? == f.sha256 {
            continue;
        }
        let partial = downloads.join(format!("{}.partial", f.name));
        run(
            kind,
            &format!("downloading {}", f.name),
            Command::new("/usr/lib/apt/apt-helper")
                .arg("download-file")
                .arg(&f.uri)
                .arg(&partial)
                .arg(format!("SHA256:{}", f.sha256)),
        )?;
        std::fs::rename(&partial, &path).map_err(io(format!("cannot keep {}", path.display())))?;
    }
    for e in std::fs::read_dir(downloads)
        .map_err(io("cannot list the source files"))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().to_string();
        if name != VERSION_FILE && !files.iter().any(|f| f.name == name) {
            let _ = std::fs::remove_file(e.path());
        }
    }
    // What an offline build falls back to: the last version fetched whole.
    write_synced(&downloads.join(VERSION_FILE), version.as_bytes())
        .map_err(io("cannot record the fetched source version"))?;
    Ok(version)
}

/// The file naming the last edk2 source version fetched whole.
const VERSION_FILE: &str = "VERSION";

/// The last version fetched whole into `dir`, from an earlier fetch.
fn fetched_version(dir: &Path) -> Option<String> {
    let v = std::fs::read_to_string(dir.join(VERSION_FILE)).ok()?;
    let v = v.trim().to_string();
    dir.join(format!("edk2_{v}.debian.tar.xz"))
        .is_file()
        .then_some(v)
}

/// Unpacks the source into `tree` as `dpkg-source -x` does for a `3.0 (quilt)` package: the
/// upstream tarball, `debian/` over it, then `debian/patches/series` applied in order.
fn unpack(kind: Kind, downloads: &Path, version: &str, tree: &Path) -> Result<(), FirmwareError> {
    let upstream = version.split('-').next().unwrap_or(version);
    let orig = downloads.join(format!("edk2_{upstream}.orig.tar.xz"));
    let debian = downloads.join(format!("edk2_{version}.debian.tar.xz"));
    std::fs::create_dir_all(tree).map_err(io(format!("cannot create {}", tree.display())))?;
    run(
        kind,
        "unpacking the upstream source",
        Command::new("tar")
            .arg("-xJf")
            .arg(&orig)
            .arg("--strip-components=1")
            .arg("-C")
            .arg(tree),
    )?;
    run(
        kind,
        "unpacking debian/",
        Command::new("tar")
            .arg("-xJf")
            .arg(&debian)
            .arg("-C")
            .arg(tree),
    )?;
    let series = std::fs::read_to_string(tree.join("debian/patches/series"))
        .map_err(io("the source's debian/patches/series"))?;
    for line in series.lines().map(str::trim) {
        let mut w = line.split_whitespace();
        let Some(patch) = w.next().filter(|p| !p.starts_with('#')) else {
            continue;
        };
        let strip = w.next().unwrap_or("-p1");
        run(
            kind,
            &format!("applying Debian's {patch}"),
            Command::new("patch")
                .args([
                    strip,
                    "--forward",
                    "--batch",
                    "--no-backup-if-mismatch",
                    "-s",
                    "-i",
                ])
                .arg(tree.join("debian/patches").join(patch))
                .current_dir(tree),
        )?;
    }
    Ok(())
}

/// A cached firmware's SHA-256, once it is checked: the image's hash must be the one its
/// `build.json` recorded, and the image must still pass [`check`].
fn cached(kind: Kind, entry: &Path) -> Result<String, String> {
    let bytes = std::fs::read(entry.join("OVMF.fd")).map_err(|e| e.to_string())?;
    let record: serde_json::Value = std::fs::read(entry.join("build.json"))
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    if record["sha256"].as_str() != Some(sha256.as_str()) {
        return Err(format!("its SHA-256 {sha256} is not the recorded one"));
    }
    check(kind, &bytes)?;
    Ok(sha256)
}

/// Writes `data` to `path` and flushes it to disk.
fn write_synced(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// Whether `image` is firmware the TEE of `kind` can launch a measured pod VM with.
pub fn check(kind: Kind, image: &[u8]) -> Result<(), String> {
    match kind {
        Kind::AmdSev => crate::snp::launch_digest(&crate::snp::LaunchInputs {
            firmware: image,
            kernel: Some(&[]),
            initrd: None,
            append: None,
            vcpus: 1,
            cpu: crate::snp::CpuType::EpycMilan,
            guest_features: crate::snp::DEFAULT_GUEST_FEATURES,
        })
        .map(|_| ())
        .map_err(|e| e.to_string()),
        Kind::IntelTdx => crate::tdx::Tdvf::parse(image)
            .map(|_| ())
            .map_err(|e| e.to_string()),
    }
}
