//! SEV-SNP evidence from `/dev/sev-guest`, for guests whose kernel has no configfs-tsm (before
//! Linux 6.7, or built without `CONFIG_TSM_REPORTS`): the `SNP_GET_EXT_REPORT` ioctl of
//! `<linux/sev-guest.h>`, which returns the attestation report and the host's certificate table.
//!
//! The structures are the kernel UAPI's, field for field (`#[repr(C)]`, sizes and offsets tested
//! against the header's). The ioctl is `_IOWR('S', 0x2, struct snp_guest_request_ioctl)`. When
//! the certificate buffer is too small the kernel answers with the VMM error
//! [`SNP_GUEST_VMM_ERR_INVALID_LEN`] and the needed size in `certs_len`; the request is then
//! made once more with a buffer of that size.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use kbs_types::Tee;
use serde_json::Value;

use crate::{tsm::SNP_REPORT_LEN, AttesterError};

/// The SEV guest device.
pub const SEV_GUEST_DEVICE: &str = "/dev/sev-guest";

/// `struct snp_report_req`: what the guest asks the PSP for.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SnpReportReq {
    /// Data the report carries as REPORT_DATA.
    pub user_data: [u8; 64],
    /// The VMPL the report is made for (at least the guest's own).
    pub vmpl: u32,
    /// Must be zero.
    pub rsvd: [u8; 28],
}

/// `struct snp_ext_report_req`: the report request and where the host's certificates go.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SnpExtReportReq {
    /// The report request.
    pub data: SnpReportReq,
    /// Address of the certificate buffer (page aligned, a whole number of pages).
    pub certs_address: u64,
    /// Its length; on [`SNP_GUEST_VMM_ERR_INVALID_LEN`], the length needed.
    pub certs_len: u32,
}

/// `struct snp_report_resp`: the PSP's response message (status, report size, the report).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SnpReportResp {
    /// The `MSG_REPORT_RSP` message.
    pub data: [u8; 4000],
}

/// `struct snp_guest_request_ioctl`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SnpGuestRequestIoctl {
    /// The message version (1).
    pub msg_version: u8,
    /// Address of the request.
    pub req_data: u64,
    /// Address of the response.
    pub resp_data: u64,
    /// The firmware error (low 32 bits) and the VMM error (high 32 bits).
    pub exitinfo2: u64,
}

/// `SNP_GET_EXT_REPORT`: `_IOWR('S', 0x2, struct snp_guest_request_ioctl)`.
pub const SNP_GET_EXT_REPORT: u64 =
    ioc_iowr(b'S', 0x2, std::mem::size_of::<SnpGuestRequestIoctl>());

/// The VMM error meaning the certificate buffer was too small.
pub const SNP_GUEST_VMM_ERR_INVALID_LEN: u32 = 1;
const PAGE: usize = 4096;
/// The certificate buffer the first request offers (the host's table is a few KiB).
const FIRST_CERTS_PAGES: usize = 4;
/// The most the kernel accepts (`SEV_FW_BLOB_MAX_SIZE`, 16 KiB; a VCEK, an ASK and an ARK are
/// well below it).
const MAX_CERTS_LEN: usize = 4 * PAGE;

/// Linux's `_IOWR(type, nr, size)` on x86, arm64 and s390x.
const fn ioc_iowr(ty: u8, nr: u8, size: usize) -> u64 {
    const WRITE: u64 = 1;
    const READ: u64 = 2;
    ((WRITE | READ) << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64
}

/// A page-aligned buffer for the host's certificate table.
struct PageBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl PageBuf {
    fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len, PAGE).expect("page layout");
        // SAFETY: `len` is a non-zero multiple of the page size (callers round up).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Self { ptr, layout }
    }
    fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` owns `layout.size()` initialized (zeroed) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// Reads the report and certificates out of a `MSG_REPORT_RSP` (status, report size, 24
/// reserved bytes, the report).
pub fn parse_report_resp(resp: &[u8]) -> Result<&[u8], AttesterError> {
    let le = |at: usize| u32::from_le_bytes(resp[at..at + 4].try_into().expect("4 bytes"));
    if resp.len() < 32 + SNP_REPORT_LEN {
        return Err(AttesterError::Invalid(
            "the PSP's response is truncated".into(),
        ));
    }
    let status = le(0);
    if status != 0 {
        return Err(AttesterError::Invalid(format!(
            "the PSP refused the report request (status {status:#x})"
        )));
    }
    let size = le(4) as usize;
    if size != SNP_REPORT_LEN {
        return Err(AttesterError::Invalid(format!(
            "the PSP returned a {size}-byte report, not {SNP_REPORT_LEN}"
        )));
    }
    Ok(&resp[32..32 + SNP_REPORT_LEN])
}

/// SEV-SNP evidence through `/dev/sev-guest`.
#[derive(Debug, Clone)]
pub struct SevGuestAttester {
    device: PathBuf,
}

impl SevGuestAttester {
    /// The attester over `device` (normally [`SEV_GUEST_DEVICE`]).
    pub fn new(device: &Path) -> Self {
        Self {
            device: device.to_path_buf(),
        }
    }

    /// The raw report over `report_data` and the host's certificate table (empty when the host
    /// supplies none).
    pub fn request(&self, report_data: &[u8; 64]) -> Result<(Vec<u8>, Vec<u8>), AttesterError> {
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.device)
            .map_err(|source| AttesterError::Io {
                what: format!("opening {}", self.device.display()),
                source,
            })?;
        let user_data = *report_data;
        let mut certs_len = FIRST_CERTS_PAGES * PAGE;
        for _ in 0..2 {
            let certs = PageBuf::new(certs_len);
            let mut req = SnpExtReportReq {
                data: SnpReportReq {
                    user_data,
                    vmpl: 0,
                    rsvd: [0; 28],
                },
                certs_address: certs.ptr as u64,
                certs_len: certs_len as u32,
            };
            let mut resp = SnpReportResp { data: [0; 4000] };
            let mut ioctl = SnpGuestRequestIoctl {
                msg_version: 1,
                req_data: &mut req as *mut SnpExtReportReq as u64,
                resp_data: &mut resp as *mut SnpReportResp as u64,
                exitinfo2: 0,
            };
            // SAFETY: the request, response and certificate buffers live until the call returns
            // and have the sizes the UAPI declares; the kernel writes only within them.
            let rc = unsafe {
                libc::ioctl(
                    dev.as_raw_fd(),
                    SNP_GET_EXT_REPORT as _,
                    &mut ioctl as *mut SnpGuestRequestIoctl,
                )
            };
            let vmm_err = (ioctl.exitinfo2 >> 32) as u32;
            if vmm_err == SNP_GUEST_VMM_ERR_INVALID_LEN {
                let need = (req.certs_len as usize).div_ceil(PAGE) * PAGE;
                if need == 0 || need > MAX_CERTS_LEN || need <= certs_len {
                    return Err(AttesterError::Invalid(format!(
                        "the host asks for a {need}-byte certificate buffer, which is not sensible"
                    )));
                }
                certs_len = need;
                continue;
            }
            if rc != 0 {
                let source = std::io::Error::last_os_error();
                return Err(AttesterError::Io {
                    what: format!(
                        "SNP_GET_EXT_REPORT on {} (firmware error {:#x}, VMM error {vmm_err:#x})",
                        self.device.display(),
                        ioctl.exitinfo2 as u32
                    ),
                    source,
                });
            }
            let report = parse_report_resp(&resp.data)?.to_vec();
            let table = certs.as_slice();
            // An all-zero first entry terminates an empty table.
            let table = if table[..24].iter().all(|b| *b == 0) {
                Vec::new()
            } else {
                table.to_vec()
            };
            return Ok((report, table));
        }
        Err(AttesterError::Invalid(
            "the host changed the certificate table's size between two requests".into(),
        ))
    }

    /// The evidence JSON the SNP verifier takes (as [`crate::TsmSnpAttester`] gives it).
    pub fn gather(&self, report_data: &[u8]) -> Result<Value, AttesterError> {
        let rd = crate::padded_report_data(report_data, "SEV-SNP")?;
        let (raw, table) = self.request(&rd)?;
        crate::tsm::snp_evidence(&raw, &rd, &table)
    }
}

impl coffer_kbs_client::Attester for SevGuestAttester {
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

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    use super::*;

    // Sizes and offsets as `<linux/sev-guest.h>` declares them (x86_64).
    #[test]
    fn the_structures_are_the_kernel_uapi() {
        assert_eq!(size_of::<SnpReportReq>(), 96);
        assert_eq!(offset_of!(SnpReportReq, vmpl), 64);
        assert_eq!(offset_of!(SnpReportReq, rsvd), 68);
        assert_eq!(size_of::<SnpExtReportReq>(), 112);
        assert_eq!(offset_of!(SnpExtReportReq, certs_address), 96);
        assert_eq!(offset_of!(SnpExtReportReq, certs_len), 104);
        assert_eq!(size_of::<SnpReportResp>(), 4000);
        assert_eq!(size_of::<SnpGuestRequestIoctl>(), 32);
        assert_eq!(offset_of!(SnpGuestRequestIoctl, req_data), 8);
        assert_eq!(offset_of!(SnpGuestRequestIoctl, resp_data), 16);
        assert_eq!(offset_of!(SnpGuestRequestIoctl, exitinfo2), 24);
        // _IOWR('S', 0x2, struct snp_guest_request_ioctl)
        assert_eq!(SNP_GET_EXT_REPORT, 0xC020_5302);
    }

    #[test]
    fn a_response_is_read_by_status_and_size() {
        let mut resp = vec![0u8; 4000];
        resp[4..8].copy_from_slice(&(SNP_REPORT_LEN as u32).to_le_bytes());
        resp[32] = 0xab;
        assert_eq!(parse_report_resp(&resp).unwrap()[0], 0xab);
        resp[0] = 0x16; // INVALID_PARAM
        let e = parse_report_resp(&resp).unwrap_err().to_string();
        assert!(e.contains("status 0x16"), "{e}");
        resp[0] = 0;
        resp[4] = 0;
        assert!(parse_report_resp(&resp).is_err());
    }

    #[test]
    fn a_device_that_is_not_sev_guest_is_named_in_the_error() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("sev-guest");
        std::fs::write(&f, b"").unwrap();
        let e = SevGuestAttester::new(&f)
            .gather(&[1; 48])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("SNP_GET_EXT_REPORT") && e.contains("sev-guest"),
            "{e}"
        );
        let e = SevGuestAttester::new(&d.path().join("absent"))
            .gather(&[1; 48])
            .unwrap_err()
            .to_string();
        assert!(e.contains("opening"), "{e}");
    }
}
