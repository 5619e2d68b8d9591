//! The AMD SEV-SNP launch digest of a QEMU launch, computed from its inputs.
//!
//! When QEMU starts an SEV-SNP guest, the AMD secure processor folds every page it is given
//! before the guest runs into a SHA-384 chain of `PAGE_INFO` structures (SEV-SNP ABI
//! specification, `SNP_LAUNCH_UPDATE`); the final value is the `MEASUREMENT` field of every
//! attestation report the guest asks for. [`launch_digest`] recomputes that value from what the
//! host hands QEMU, so that a verifier can hold it as a reference value:
//!
//! 1. the firmware (OVMF) image, page by page, mapped so that it ends at 4 GiB;
//! 2. the sections OVMF's SEV metadata (`OVMF_SEV_META_DATA_GUID`) declares, in its order:
//!    zeroed pre-validated memory, the secrets page, the CPUID page and, for measured direct
//!    boot, the page holding the SEV hashes table (SHA-256 of kernel, initrd and command line);
//! 3. one VMSA (initial register state) page per vCPU: the boot processor starts at the reset
//!    vector, the others at the firmware's SEV-ES reset block.
//!
//! The result equals what AMD's reference tool `sev-snp-measure` (0.0.13, `--mode snp`, QEMU as
//! the VMM) prints for the same inputs; `crates/podvm/tests/snp_measure.rs` compares the two.
//! Only QEMU's initial register state is modelled (not EC2's or GCE's), and no SVSM.

mod digest;
mod ovmf;
mod vmsa;

use std::{fmt, str::FromStr};

pub(crate) use ovmf::{footer_entry, guid};
use ovmf::{Firmware, SectionKind};

/// A QEMU vCPU model, as given to `-cpu`, which fixes the CPUID signature the VMSA carries.
///
/// Covers the EPYC models that `sev-snp-measure` knows. Versioned aliases (`EPYC-Milan-v2` and
/// so on) report the same family, model and stepping as their base model, so they measure the
/// same; they are kept apart only so that [`CpuType::name`] round-trips.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CpuType {
    /// `EPYC` (Naples: family 23, model 1, stepping 2).
    Epyc,
    /// `EPYC-v1`.
    EpycV1,
    /// `EPYC-v2`.
    EpycV2,
    /// `EPYC-IBPB`.
    EpycIbpb,
    /// `EPYC-v3`.
    EpycV3,
    /// `EPYC-v4`.
    EpycV4,
    /// `EPYC-Rome` (family 23, model 49, stepping 0).
    EpycRome,
    /// `EPYC-Rome-v1`.
    EpycRomeV1,
    /// `EPYC-Rome-v2`.
    EpycRomeV2,
    /// `EPYC-Rome-v3`.
    EpycRomeV3,
    /// `EPYC-Milan` (family 25, model 1, stepping 1).
    EpycMilan,
    /// `EPYC-Milan-v1`.
    EpycMilanV1,
    /// `EPYC-Milan-v2`.
    EpycMilanV2,
    /// `EPYC-Genoa` (family 25, model 17, stepping 0).
    EpycGenoa,
    /// `EPYC-Genoa-v1`.
    EpycGenoaV1,
    /// `EPYC-Turin` (family 26, model 0, stepping 0).
    EpycTurin,
}

impl CpuType {
    /// Every model, in the order QEMU lists them.
    pub const ALL: [CpuType; 16] = [
        CpuType::Epyc,
        CpuType::EpycV1,
        CpuType::EpycV2,
        CpuType::EpycIbpb,
        CpuType::EpycV3,
        CpuType::EpycV4,
        CpuType::EpycRome,
        CpuType::EpycRomeV1,
        CpuType::EpycRomeV2,
        CpuType::EpycRomeV3,
        CpuType::EpycMilan,
        CpuType::EpycMilanV1,
        CpuType::EpycMilanV2,
        CpuType::EpycGenoa,
        CpuType::EpycGenoaV1,
        CpuType::EpycTurin,
    ];

    /// The model's name as QEMU's `-cpu` spells it (`EPYC-Milan`).
    pub fn name(self) -> &'static str {
        match self {
            CpuType::Epyc => "EPYC",
            CpuType::EpycV1 => "EPYC-v1",
            CpuType::EpycV2 => "EPYC-v2",
            CpuType::EpycIbpb => "EPYC-IBPB",
            CpuType::EpycV3 => "EPYC-v3",
            CpuType::EpycV4 => "EPYC-v4",
            CpuType::EpycRome => "EPYC-Rome",
            CpuType::EpycRomeV1 => "EPYC-Rome-v1",
            CpuType::EpycRomeV2 => "EPYC-Rome-v2",
            CpuType::EpycRomeV3 => "EPYC-Rome-v3",
            CpuType::EpycMilan => "EPYC-Milan",
            CpuType::EpycMilanV1 => "EPYC-Milan-v1",
            CpuType::EpycMilanV2 => "EPYC-Milan-v2",
            CpuType::EpycGenoa => "EPYC-Genoa",
            CpuType::EpycGenoaV1 => "EPYC-Genoa-v1",
            CpuType::EpycTurin => "EPYC-Turin",
        }
    }

    /// The model's (family, model, stepping).
    pub fn family_model_stepping(self) -> (u32, u32, u32) {
        match self {
            CpuType::Epyc
            | CpuType::EpycV1
            | CpuType::EpycV2
            | CpuType::EpycIbpb
            | CpuType::EpycV3
            | CpuType::EpycV4 => (23, 1, 2),
            CpuType::EpycRome | CpuType::EpycRomeV1 | CpuType::EpycRomeV2 | CpuType::EpycRomeV3 => {
                (23, 49, 0)
            }
            CpuType::EpycMilan | CpuType::EpycMilanV1 | CpuType::EpycMilanV2 => (25, 1, 1),
            CpuType::EpycGenoa | CpuType::EpycGenoaV1 => (25, 17, 0),
            CpuType::EpycTurin => (26, 0, 0),
        }
    }

    /// The CPUID `Fn0000_0001_EAX` signature (AMD CPUID specification #25481), which QEMU puts
    /// in every vCPU's initial `RDX`.
    pub fn signature(self) -> u32 {
        let (family, model, stepping) = self.family_model_stepping();
        let (family_low, family_ext) = if family > 0xf {
            (0xf, (family - 0xf) & 0xff)
        } else {
            (family, 0)
        };
        (family_ext << 20)
            | (((model >> 4) & 0xf) << 16)
            | (family_low << 8)
            | ((model & 0xf) << 4)
            | (stepping & 0xf)
    }
}

impl fmt::Display for CpuType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CpuType {
    type Err = SnpError;

    /// Parses a QEMU model name (`EPYC-Milan`; ASCII case is ignored).
    fn from_str(s: &str) -> Result<Self, SnpError> {
        CpuType::ALL
            .into_iter()
            .find(|c| c.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| SnpError::UnknownCpu(s.to_string()))
    }
}

/// What a QEMU SEV-SNP launch is given: the inputs of [`launch_digest`].
#[derive(Clone, Copy, Debug)]
pub struct LaunchInputs<'a> {
    /// The firmware image (QEMU `-bios`; OVMF with SEV metadata, e.g. edk2's `OvmfX64` or
    /// `AmdSev` build).
    pub firmware: &'a [u8],
    /// The kernel for measured direct boot (QEMU `-kernel` with `kernel-hashes=on`); `None`
    /// boots from disk and leaves the hashes page (if the firmware has one) zeroed.
    pub kernel: Option<&'a [u8]>,
    /// The initrd (QEMU `-initrd`); only with a kernel. `None` measures as an empty initrd.
    pub initrd: Option<&'a [u8]>,
    /// The kernel command line (QEMU `-append`); only with a kernel. `None` measures as the
    /// empty command line. The measured bytes are these plus a terminating NUL.
    pub append: Option<&'a str>,
    /// The number of vCPUs (QEMU `-smp`); at least 1.
    pub vcpus: u32,
    /// The vCPU model (QEMU `-cpu`).
    pub cpu: CpuType,
    /// The guest's SEV features (the VMSA's `SEV_FEATURES`; bit 0 is SNPActive).
    /// `sev-snp-measure` and QEMU default to [`DEFAULT_GUEST_FEATURES`].
    pub guest_features: u64,
}

/// The guest features `sev-snp-measure` assumes when none are given: SNPActive only.
pub const DEFAULT_GUEST_FEATURES: u64 = 0x1;

/// Why a launch digest cannot be computed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnpError {
    /// The firmware's footer GUID table, or its SEV metadata, lacks what SNP needs.
    #[error(
        "firmware has no SEV metadata section (OVMF's AmdSev or OvmfX64 build from edk2 2022+ has one)"
    )]
    NoSevMetadata,
    /// The firmware has no SEV-ES reset block, so QEMU cannot start its vCPUs under SEV-SNP.
    #[error("firmware has no SEV-ES reset block (SEV_ES_RESET_BLOCK_GUID), which SEV-SNP needs")]
    NoResetBlock,
    /// The firmware image is malformed.
    #[error("firmware is malformed: {0}")]
    BadFirmware(String),
    /// A kernel was given but the firmware cannot measure it.
    #[error(
        "kernel hashes need firmware with the SNP kernel-hashes table (SEV_HASH_TABLE_RV_GUID and an SNP_KERNEL_HASHES metadata section, as in OVMF's AmdSev build); this firmware has none"
    )]
    NoKernelHashesTable,
    /// An initrd or command line was given without a kernel.
    #[error("an initrd or kernel command line needs a kernel (measured direct boot)")]
    NoKernel,
    /// Zero vCPUs.
    #[error("a guest needs at least one vCPU")]
    NoVcpus,
    /// An unknown vCPU model name.
    #[error("unknown vCPU type {0:?}; known: {names}", names = cpu_names())]
    UnknownCpu(String),
}

fn cpu_names() -> String {
    CpuType::ALL.map(CpuType::name).join(", ")
}

/// Computes the SEV-SNP launch digest (the attestation report's `MEASUREMENT`) of a QEMU launch
/// of `i`.
///
/// Fails when the firmware has no SEV metadata or SEV-ES reset block, when it is malformed,
/// or when a kernel is given to firmware that has no kernel-hashes table.
pub fn launch_digest(i: &LaunchInputs) -> Result<[u8; 48], SnpError> {
    if i.vcpus == 0 {
        return Err(SnpError::NoVcpus);
    }
    if i.kernel.is_none() && (i.initrd.is_some() || i.append.is_some()) {
        return Err(SnpError::NoKernel);
    }
    let fw = Firmware::parse(i.firmware)?;
    let reset_eip = fw.reset_eip().ok_or(SnpError::NoResetBlock)?;
    let hashes_page = match i.kernel {
        Some(kernel) => {
            let gpa = fw.hashes_table_gpa();
            let has_section = fw
                .sections()
                .iter()
                .any(|s| s.kind == SectionKind::KernelHashes);
            match gpa {
                Some(gpa) if has_section => Some(digest::hashes_page(
                    (gpa & 0xfff) as usize,
                    kernel,
                    i.initrd.unwrap_or_default(),
                    i.append.unwrap_or_default(),
                )?),
                _ => return Err(SnpError::NoKernelHashesTable),
            }
        }
        None => None,
    };

    let mut ld = digest::LaunchDigest::new();
    ld.normal_pages(fw.gpa(), i.firmware);
    for s in fw.sections() {
        let (gpa, size) = (u64::from(s.gpa), s.size as usize);
        match s.kind {
            SectionKind::SecMem | SectionKind::SvsmCaa => ld.zero_pages(gpa, size),
            SectionKind::Secrets => ld.secrets_page(gpa),
            SectionKind::Cpuid => ld.cpuid_page(gpa),
            SectionKind::KernelHashes => match &hashes_page {
                Some(page) if size == page.len() => ld.normal_pages(gpa, page),
                Some(_) => {
                    return Err(SnpError::BadFirmware(format!(
                        "its SNP_KERNEL_HASHES section at {gpa:#x} is {size:#x} bytes, not one page"
                    )))
                }
                None => ld.zero_pages(gpa, size),
            },
        }
    }
    let signature = i.cpu.signature();
    let bsp = vmsa::page(vmsa::BSP_RESET_EIP, i.guest_features, signature);
    let ap = vmsa::page(reset_eip, i.guest_features, signature);
    ld.vmsa_page(&bsp);
    for _ in 1..i.vcpus {
        ld.vmsa_page(&ap);
    }
    Ok(ld.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_signatures() {
        assert_eq!(CpuType::Epyc.signature(), 0x0080_0f12);
        assert_eq!(CpuType::EpycRome.signature(), 0x0083_0f10);
        assert_eq!(CpuType::EpycMilan.signature(), 0x00a0_0f11);
        assert_eq!(CpuType::EpycGenoa.signature(), 0x00a1_0f10);
        assert_eq!(CpuType::EpycTurin.signature(), 0x00b0_0f00);
    }

    #[test]
    fn cpu_names_round_trip() {
        for c in CpuType::ALL {
            assert_eq!(c.name().parse::<CpuType>().unwrap(), c);
        }
        assert_eq!("epyc-milan".parse::<CpuType>().unwrap(), CpuType::EpycMilan);
        let e = "Skylake".parse::<CpuType>().unwrap_err().to_string();
        assert!(e.contains("Skylake") && e.contains("EPYC-Genoa"), "{e}");
    }

    #[test]
    fn input_checks() {
        let base = LaunchInputs {
            firmware: &[],
            kernel: None,
            initrd: None,
            append: None,
            vcpus: 1,
            cpu: CpuType::EpycMilan,
            guest_features: DEFAULT_GUEST_FEATURES,
        };
        let zero = LaunchInputs { vcpus: 0, ..base };
        assert_eq!(launch_digest(&zero), Err(SnpError::NoVcpus));
        let initrd = LaunchInputs {
            initrd: Some(b"x"),
            ..base
        };
        assert_eq!(launch_digest(&initrd), Err(SnpError::NoKernel));
        assert_eq!(launch_digest(&base), Err(SnpError::NoSevMetadata));
    }
}
