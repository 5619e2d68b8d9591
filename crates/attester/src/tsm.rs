//! The kernel's configfs-tsm report interface (Linux 6.7 and later,
//! `Documentation/ABI/testing/configfs-tsm`): a directory made under
//! `/sys/kernel/config/tsm/report/` gets the attributes `inblob` (up to 64 bytes of report data
//! to write), `outblob` (the TEE's report, produced when read), `auxblob` (what the host adds: for
//! SEV-SNP the certificate table), `provider` (`sev_guest`, `tdx_guest`, …) and `generation`
//! (incremented by every write, so that a reader can tell whether another writer interleaved).
//!
//! [`TsmReport::request`] makes an entry of its own, reads `generation`, writes `inblob`, reads
//! the blobs and `generation` again: anything but exactly one write in between (its own) is a
//! [`AttesterError::Race`]. [`TsmSnpAttester`] turns an `sev_guest` report into the evidence the
//! SNP verifier takes.

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use kbs_types::Tee;
use serde_json::{json, Value};
use sev::parser::ByteParser;

use crate::AttesterError;

/// Where the kernel offers report entries.
pub const TSM_REPORT_ROOT: &str = "/sys/kernel/config/tsm/report";

/// How long an attribute of a just-made entry may take to appear. The kernel makes them with
/// the directory; an emulation of the interface may lag a moment.
const ATTRIBUTE_WAIT: Duration = Duration::from_secs(1);

/// The size of an SEV-SNP attestation report (ABI version 2 and later).
/// The size of an SEV-SNP attestation report.
pub(crate) const SNP_REPORT_LEN: usize = 1184;

/// One report from configfs-tsm.
#[derive(Clone, Debug)]
pub struct Report {
    /// Who produced it (`provider`: `sev_guest`, `tdx_guest`, …).
    pub provider: String,
    /// The TEE's report (`outblob`).
    pub outblob: Vec<u8>,
    /// What the host added (`auxblob`; empty when it added nothing).
    pub auxblob: Vec<u8>,
}

/// The report interface under one root (normally [`TSM_REPORT_ROOT`]).
#[derive(Clone, Debug)]
pub struct TsmReport {
    root: PathBuf,
}

/// Entry names made by this process are unique among its requests.
static NEXT_ENTRY: AtomicU64 = AtomicU64::new(0);

fn io(what: String) -> impl FnOnce(std::io::Error) -> AttesterError {
    move |source| AttesterError::Io { what, source }
}

/// Opens an attribute of a just-made entry, waiting up to [`ATTRIBUTE_WAIT`] for it to appear.
fn attribute(path: &Path, write: bool) -> Result<std::fs::File, AttesterError> {
    let until = Instant::now() + ATTRIBUTE_WAIT;
    loop {
        let r = if write {
            std::fs::OpenOptions::new().write(true).open(path)
        } else {
            std::fs::File::open(path)
        };
        match r {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(1));
            }
            r => return r.map_err(io(format!("cannot open {}", path.display()))),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, AttesterError> {
    let mut f = attribute(path, false)?;
    let mut buf = Vec::new();
    std::io::Read::read_to_end(&mut f, &mut buf)
        .map_err(io(format!("cannot read {}", path.display())))?;
    Ok(buf)
}

fn read_text(path: &Path) -> Result<String, AttesterError> {
    String::from_utf8(read(path)?)
        .map(|s| s.trim().to_string())
        .map_err(|_| AttesterError::Invalid(format!("{} is not text", path.display())))
}

fn generation(entry: &Path) -> Result<u64, AttesterError> {
    let path = entry.join("generation");
    let text = read_text(&path)?;
    text.parse().map_err(|_| {
        AttesterError::Invalid(format!("{} reads {text:?}, not a number", path.display()))
    })
}

/// An entry of ours, removed when dropped (configfs removes its attributes with it).
struct Entry(PathBuf);

impl Drop for Entry {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

impl TsmReport {
    /// The interface under `root`.
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    fn entry(&self) -> Result<Entry, AttesterError> {
        let name = format!(
            "coffer-{}-{}",
            std::process::id(),
            NEXT_ENTRY.fetch_add(1, Ordering::Relaxed)
        );
        let path = self.root.join(name);
        std::fs::create_dir(&path).map_err(io(format!(
            "cannot make a report entry under {} (configfs-tsm)",
            self.root.display()
        )))?;
        Ok(Entry(path))
    }

    /// Who provides reports here (`sev_guest`, `tdx_guest`, …).
    pub fn provider(&self) -> Result<String, AttesterError> {
        let entry = self.entry()?;
        read_text(&entry.0.join("provider"))
    }

    /// A report over `report_data`, checked against concurrent writers.
    pub fn request(&self, report_data: &[u8; 64]) -> Result<Report, AttesterError> {
        let entry = self.entry()?;
        let dir = &entry.0;
        let provider = read_text(&dir.join("provider"))?;
        let before = generation(dir)?;
        let inblob = dir.join("inblob");
        attribute(&inblob, true)?
            .write_all(report_data)
            .map_err(io(format!("cannot write {}", inblob.display())))?;
        let outblob = read(&dir.join("outblob"))?;
        let auxblob = match read(&dir.join("auxblob")) {
            Ok(b) => b,
            // Providers without host data have no auxblob.
            Err(AttesterError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        let after = generation(dir)?;
        if after != before + 1 {
            return Err(AttesterError::Race(format!(
                "{} (generation {before} before the request, {after} after)",
                dir.display()
            )));
        }
        Ok(Report {
            provider,
            outblob,
            auxblob,
        })
    }
}

impl TsmReport {
    /// [`Self::request`] over `report_data` zero-padded to 64 bytes (`tee` names the TEE in the
    /// error when it is longer), refused unless `provider` produced it; returns the padded data
    /// with the report.
    fn request_from(
        &self,
        provider: &str,
        tee: &str,
        report_data: &[u8],
    ) -> Result<([u8; 64], Report), AttesterError> {
        let rd = crate::padded_report_data(report_data, tee)?;
        let r = self.request(&rd)?;
        if r.provider != provider {
            return Err(AttesterError::Invalid(format!(
                "configfs-tsm's provider is {:?}, not {provider}",
                r.provider
            )));
        }
        Ok((rd, r))
    }
}

/// Whether configfs-tsm is offered under `root`, and by whom.
pub fn provider(root: &Path) -> Result<Option<String>, AttesterError> {
    if !root.is_dir() {
        return Ok(None);
    }
    TsmReport::new(root).provider().map(Some)
}

/// SEV-SNP evidence from configfs-tsm (`provider` `sev_guest`): the report over the runtime-data
/// digest, with the VCEK or VLEK (and whatever else) from the host's certificate table when the
/// host supplies one; without it the KBS takes the VCEK from its cache or AMD's KDS.
#[derive(Clone, Debug)]
pub struct TsmSnpAttester {
    tsm: TsmReport,
}

impl TsmSnpAttester {
    /// The attester over the interface under `root`.
    pub fn new(root: &Path) -> Self {
        Self {
            tsm: TsmReport::new(root),
        }
    }

    /// The evidence JSON the SNP verifier takes, over `report_data` (at most 64 bytes, zero
    /// padded). The report's own HOST_DATA carries the initdata digest the launcher set.
    pub fn gather(&self, report_data: &[u8]) -> Result<Value, AttesterError> {
        let (rd, r) = self.tsm.request_from("sev_guest", "SEV-SNP", report_data)?;
        snp_evidence(&r.outblob, &rd, &r.auxblob)
    }
}

/// The evidence JSON the SNP verifier takes, from a raw report that must carry `report_data`
/// (64 bytes, as padded) and the host's certificate table (empty: none; the KBS then takes the
/// VCEK from its cache or AMD's KDS). Shared by the configfs-tsm and `/dev/sev-guest` paths.
pub(crate) fn snp_evidence(
    raw: &[u8],
    report_data: &[u8; 64],
    table: &[u8],
) -> Result<Value, AttesterError> {
    if raw.len() != SNP_REPORT_LEN {
        return Err(AttesterError::Invalid(format!(
            "the SEV-SNP report is {} bytes, not {SNP_REPORT_LEN}",
            raw.len()
        )));
    }
    let report = sev::firmware::guest::AttestationReport::from_bytes(raw)
        .map_err(|e| AttesterError::Invalid(format!("the SEV-SNP report: {e}")))?;
    if report.report_data[..] != report_data[..] {
        return Err(AttesterError::Invalid(
            "the SEV-SNP report carries other report data than was asked for".into(),
        ));
    }
    let mut evidence = json!({ "attestation_report": report });
    if !table.is_empty() {
        let chain: Vec<Value> = crate::certs::parse(table)?
            .into_iter()
            .map(|c| json!({"cert_type": c.kind, "data": c.data}))
            .collect();
        evidence["cert_chain"] = Value::Array(chain);
    }
    Ok(evidence)
}

impl coffer_kbs_client::Attester for TsmSnpAttester {
    fn tee(&self) -> Tee {
        Tee::Snp
    }

    fn evidence(
        &self,
        report_data: &[u8],
        _init_data_digest: Option<&[u8]>,
    ) -> Result<Value, coffer_kbs_client::AttesterError> {
        Ok(self.gather(report_data)?)
    }
}

/// Where the firmware's CC event log (CCEL, the measurements into the RTMRs) is exposed.
pub const CCEL_TABLE: &str = "/sys/firmware/acpi/tables/data/CCEL";

/// TDX evidence from configfs-tsm (`provider` `tdx_guest`): the TD quote the host's quote
/// generation service signs over the runtime-data digest (as REPORTDATA), and the CCEL event
/// log when the firmware exposes one, in the form the TDX verifier takes (`{"quote": base64,
/// "cc_eventlog": base64}`). The KBS checks REPORTDATA and MRCONFIGID (the initdata digest).
#[derive(Clone, Debug)]
pub struct TsmTdxAttester {
    tsm: TsmReport,
    ccel: PathBuf,
}

impl TsmTdxAttester {
    /// The attester over the interface under `root`, with the event log at `ccel` (normally
    /// [`CCEL_TABLE`]; absent: no log).
    pub fn new(root: &Path, ccel: &Path) -> Self {
        Self {
            tsm: TsmReport::new(root),
            ccel: ccel.to_path_buf(),
        }
    }

    /// The evidence JSON over `report_data` (at most 64 bytes, zero padded).
    pub fn gather(&self, report_data: &[u8]) -> Result<Value, AttesterError> {
        use base64::Engine;
        let (_, r) = self.tsm.request_from("tdx_guest", "TDX", report_data)?;
        // A quote is a 48-byte header, a TD report body and a signature section; anything
        // shorter than header and body is not one.
        if r.outblob.len() < 48 + 584 {
            return Err(AttesterError::Invalid(format!(
                "the TD quote is {} bytes, too short to be one",
                r.outblob.len()
            )));
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut evidence = json!({ "quote": b64.encode(&r.outblob) });
        match std::fs::read(&self.ccel) {
            Ok(log) => evidence["cc_eventlog"] = Value::String(b64.encode(log)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(AttesterError::Io {
                    what: format!("cannot read {}", self.ccel.display()),
                    source: e,
                })
            }
        }
        Ok(evidence)
    }
}

impl coffer_kbs_client::Attester for TsmTdxAttester {
    fn tee(&self) -> Tee {
        Tee::Tdx
    }

    fn evidence(
        &self,
        report_data: &[u8],
        _init_data_digest: Option<&[u8]>,
    ) -> Result<Value, coffer_kbs_client::AttesterError> {
        Ok(self.gather(report_data)?)
    }
}
