//! IBM Secure Execution evidence from the Ultravisor, through the guest kernel's `uvdevice`
//! (`/dev/uv`): the `UVIO_IOCTL_ATT` ioctl of `<asm/uvdevice.h>` takes the KBS's attestation
//! request (ARCB) and the user data, and returns the measurement, the additional data and the
//! configuration unique id. `UVIO_IOCTL_UVDEV_INFO` says which calls the device and the
//! Ultravisor support.
//!
//! The structures are the kernel UAPI's, field for field (`#[repr(C)]`, sizes and offsets tested
//! against the header's comments). The ioctls are `_IOWR('u', nr, struct uvio_ioctl_cb)`. The
//! measurement and additional-data buffers are sized from the request's own authenticated
//! header (its measurement algorithm and flags, big-endian, flags in MSB-0 bit order), as the
//! Ultravisor requires them exact.
//!
//! Not run on IBM Z here: the evidence format is the one `coffer_verifier::se` checks, and the
//! layouts and sizing are tested; the ioctl itself needs an SE guest.

use std::{
    fs::OpenOptions,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use serde_json::{json, Value};

use crate::AttesterError;

/// The Ultravisor device.
pub const UV_DEVICE: &str = "/dev/uv";
/// `UVIO_ATT_USER_DATA_LEN`.
pub const USER_DATA_LEN: usize = 0x100;
/// `UVIO_ATT_UID_LEN`.
pub const UID_LEN: usize = 0x10;
/// `UVIO_ATT_ARCB_MAX_LEN`.
pub const ARCB_MAX_LEN: usize = 0x10_0000;
/// `UVIO_ATT_ADDITIONAL_MAX_LEN`.
pub const ADDITIONAL_MAX_LEN: usize = 0x8000;
/// The Ultravisor's success return code.
pub const UVC_RC_EXECUTED: u16 = 0x0001;

/// `struct uvio_ioctl_cb`: the control block of every uvdevice ioctl.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct UvioIoctlCb {
    /// Must be zero.
    pub flags: u32,
    /// The Ultravisor's return code.
    pub uv_rc: u16,
    /// The Ultravisor's return reason code.
    pub uv_rrc: u16,
    /// Address of the call's argument.
    pub argument_addr: u64,
    /// Its length.
    pub argument_len: u32,
    /// Must be zero.
    pub reserved14: [u8; 0x40 - 0x14],
}

/// `struct uvio_attest`: the argument of `UVIO_IOCTL_ATT`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct UvioAttest {
    /// Address of the attestation request.
    pub arcb_addr: u64,
    /// Address of the measurement buffer.
    pub meas_addr: u64,
    /// Address of the additional-data buffer.
    pub add_data_addr: u64,
    /// The user data the measurement covers.
    pub user_data: [u8; USER_DATA_LEN],
    /// Out: the configuration unique id.
    pub config_uid: [u8; UID_LEN],
    /// The request's length.
    pub arcb_len: u32,
    /// The measurement buffer's length.
    pub meas_len: u32,
    /// The additional-data buffer's length.
    pub add_data_len: u32,
    /// How much of `user_data` is used.
    pub user_data_len: u16,
    /// Must be zero.
    pub reserved136: u16,
}

/// `struct uvio_uvdev_info`: which ioctls the device (and the Ultravisor) support, LSB-0.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct UvioUvdevInfo {
    /// Bit `n`: the device supports ioctl number `n`.
    pub supp_uvio_cmds: u64,
    /// Bit `n`: the Ultravisor supports the call behind ioctl number `n`.
    pub supp_uv_cmds: u64,
}

/// `UVIO_IOCTL_UVDEV_INFO_NR`.
pub const UVDEV_INFO_NR: u8 = 0x00;
/// `UVIO_IOCTL_ATT_NR`.
pub const ATT_NR: u8 = 0x01;

const fn uvio_ioctl(nr: u8) -> u64 {
    // _IOWR('u', nr, struct uvio_ioctl_cb): read|write, size, type, number.
    (3 << 30)
        | ((std::mem::size_of::<UvioIoctlCb>() as u64) << 16)
        | ((b'u' as u64) << 8)
        | nr as u64
}

/// `UVIO_IOCTL_UVDEV_INFO`.
pub const UVIO_IOCTL_UVDEV_INFO: u64 = uvio_ioctl(UVDEV_INFO_NR);
/// `UVIO_IOCTL_ATT`.
pub const UVIO_IOCTL_ATT: u64 = uvio_ioctl(ATT_NR);

/// The request header's size, then the authenticated attestation header: flags (u64, MSB-0
/// bits) and the measurement algorithm (u32), big-endian.
const ARCB_HEADER: usize = 48;
/// Additional-data sizes by flag bit (MSB-0): nonce, image host-key hash, attesting host-key
/// hash, secret-store hash, firmware state.
const ADDITIONAL_BY_FLAG: [usize; 6] = [0, 0, 0x20, 0x20, 0x40, 0x140];

/// The measurement and additional-data sizes a request asks for.
pub fn request_sizes(arcb: &[u8]) -> Result<(usize, usize), AttesterError> {
    let bad = |why: String| AttesterError::Invalid(format!("SE attestation request: {why}"));
    if arcb.len() < ARCB_HEADER + 16 || arcb.len() > ARCB_MAX_LEN {
        return Err(bad(format!("{} bytes is not a request", arcb.len())));
    }
    let flags = u64::from_be_bytes(
        arcb[ARCB_HEADER..ARCB_HEADER + 8]
            .try_into()
            .unwrap_or_default(),
    );
    let mai = u32::from_be_bytes(
        arcb[ARCB_HEADER + 8..ARCB_HEADER + 12]
            .try_into()
            .unwrap_or_default(),
    );
    let meas = match mai {
        1 => 64, // HMAC-SHA512
        other => return Err(bad(format!("unknown measurement algorithm {other}"))),
    };
    let add = ADDITIONAL_BY_FLAG
        .iter()
        .enumerate()
        .filter(|(bit, _)| flags & (1u64 << (63 - bit)) != 0)
        .map(|(_, size)| size)
        .sum();
    Ok((meas, add))
}

/// Gathers SE evidence through the uvdevice.
#[derive(Debug, Clone)]
pub struct SeAttester {
    device: PathBuf,
}

impl SeAttester {
    /// The attester for `device` (normally [`UV_DEVICE`]).
    pub fn new(device: &Path) -> Self {
        Self {
            device: device.to_path_buf(),
        }
    }

    fn ioctl(&self, nr: u64, arg: *mut u8, len: usize) -> Result<UvioIoctlCb, AttesterError> {
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.device)
            .map_err(|source| AttesterError::Io {
                what: format!("cannot open {}", self.device.display()),
                source,
            })?;
        let mut cb = UvioIoctlCb {
            flags: 0,
            uv_rc: 0,
            uv_rrc: 0,
            argument_addr: arg as u64,
            argument_len: len as u32,
            reserved14: [0; 0x40 - 0x14],
        };
        // SAFETY: `cb` and the argument it points to live across the call; the kernel reads
        // and writes them within the lengths given.
        let rc = unsafe { libc::ioctl(dev.as_raw_fd(), nr as _, &mut cb as *mut UvioIoctlCb) };
        if rc != 0 {
            return Err(AttesterError::Io {
                what: format!(
                    "{}: ioctl {nr:#x} (Ultravisor rc {:#06x} rrc {:#06x})",
                    self.device.display(),
                    cb.uv_rc,
                    cb.uv_rrc
                ),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(cb)
    }

    /// Whether the device and the Ultravisor support attestation. Kernels older than the
    /// information ioctl (it answers `ENOTTY` from a real uvdevice) are taken to support it:
    /// a guest that is not an SE guest then fails at attestation, saying so.
    pub fn supports_attestation(&self) -> Result<bool, AttesterError> {
        let mut info = UvioUvdevInfo::default();
        let asked = self.ioctl(
            UVIO_IOCTL_UVDEV_INFO,
            &mut info as *mut UvioUvdevInfo as *mut u8,
            std::mem::size_of::<UvioUvdevInfo>(),
        );
        if let Err(AttesterError::Io { source, .. }) = &asked {
            let char_device = std::fs::metadata(&self.device)
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_char_device(&m.file_type()));
            if source.raw_os_error() == Some(libc::ENOTTY) && char_device {
                return Ok(true);
            }
        }
        asked?;
        let bit = 1u64 << ATT_NR;
        Ok(info.supp_uvio_cmds & bit != 0 && info.supp_uv_cmds & bit != 0)
    }

    /// Asks the Ultravisor to answer `arcb` with `user_data` (at most 256 bytes): the evidence
    /// `coffer_verifier::se` checks.
    pub fn attest(&self, arcb: &[u8], user_data: &[u8]) -> Result<Value, AttesterError> {
        if user_data.len() > USER_DATA_LEN {
            return Err(AttesterError::Invalid(format!(
                "SE user data is at most {USER_DATA_LEN} bytes, not {}",
                user_data.len()
            )));
        }
        let (meas_len, add_len) = request_sizes(arcb)?;
        let mut arcb = arcb.to_vec();
        let mut meas = vec![0u8; meas_len];
        let mut add = vec![0u8; add_len.min(ADDITIONAL_MAX_LEN)];
        let mut att = UvioAttest {
            arcb_addr: arcb.as_mut_ptr() as u64,
            meas_addr: meas.as_mut_ptr() as u64,
            add_data_addr: if add.is_empty() {
                0
            } else {
                add.as_mut_ptr() as u64
            },
            user_data: [0; USER_DATA_LEN],
            config_uid: [0; UID_LEN],
            arcb_len: arcb.len() as u32,
            meas_len: meas_len as u32,
            add_data_len: add.len() as u32,
            user_data_len: user_data.len() as u16,
            reserved136: 0,
        };
        att.user_data[..user_data.len()].copy_from_slice(user_data);
        let cb = self.ioctl(
            UVIO_IOCTL_ATT,
            &mut att as *mut UvioAttest as *mut u8,
            std::mem::size_of::<UvioAttest>(),
        )?;
        if cb.uv_rc != UVC_RC_EXECUTED {
            return Err(AttesterError::Invalid(format!(
                "the Ultravisor refused the attestation request (rc {:#06x} rrc {:#06x})",
                cb.uv_rc, cb.uv_rrc
            )));
        }
        // The kernel writes back how much additional data the Ultravisor returned.
        let add_len = (att.add_data_len as usize).min(add.len());
        Ok(json!({
            "cuid": hex::encode(att.config_uid),
            "user_data": hex::encode(user_data),
            "measurement": hex::encode(&meas),
            "additional_data": hex::encode(&add[..add_len]),
        }))
    }
}

/// The user data an SE guest hands the Ultravisor, which the measurement covers: the
/// runtime-data digest (binding the KBS's nonce and the guest's key), then the initdata digest
/// when the guest was launched with initdata (the measured guest reports what it was given).
pub fn user_data(report_data: &[u8], init_data_digest: Option<&[u8]>) -> Vec<u8> {
    let mut u = report_data.to_vec();
    if let Some(d) = init_data_digest {
        u.extend_from_slice(d);
    }
    u
}

impl coffer_kbs_client::Attester for SeAttester {
    fn tee(&self) -> kbs_types::Tee {
        kbs_types::Tee::Se
    }

    fn evidence(
        &self,
        _report_data: &[u8],
        _init_data_digest: Option<&[u8]>,
    ) -> Result<Value, coffer_kbs_client::AttesterError> {
        Err(coffer_kbs_client::AttesterError(
            "IBM SE evidence answers the KBS's attestation request, which this challenge does not carry".into(),
        ))
    }

    fn evidence_for_challenge(
        &self,
        extra_params: &Value,
        report_data: &[u8],
        init_data_digest: Option<&[u8]>,
    ) -> Result<Value, coffer_kbs_client::AttesterError> {
        use base64::Engine;
        let arcb = extra_params
            .get("arcb")
            .and_then(Value::as_str)
            .and_then(|a| base64::engine::general_purpose::STANDARD.decode(a).ok())
            .ok_or_else(|| {
                coffer_kbs_client::AttesterError(
                    "the KBS's challenge carries no SE attestation request (extra-params.arcb)"
                        .into(),
                )
            })?;
        Ok(self.attest(&arcb, &user_data(report_data, init_data_digest))?)
    }
}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    use super::*;

    #[test]
    fn the_structures_are_the_kernel_uapi() {
        assert_eq!(size_of::<UvioIoctlCb>(), 0x40);
        assert_eq!(offset_of!(UvioIoctlCb, uv_rc), 0x04);
        assert_eq!(offset_of!(UvioIoctlCb, uv_rrc), 0x06);
        assert_eq!(offset_of!(UvioIoctlCb, argument_addr), 0x08);
        assert_eq!(offset_of!(UvioIoctlCb, argument_len), 0x10);
        assert_eq!(offset_of!(UvioIoctlCb, reserved14), 0x14);
        assert_eq!(offset_of!(UvioAttest, arcb_addr), 0x0000);
        assert_eq!(offset_of!(UvioAttest, meas_addr), 0x0008);
        assert_eq!(offset_of!(UvioAttest, add_data_addr), 0x0010);
        assert_eq!(offset_of!(UvioAttest, user_data), 0x0018);
        assert_eq!(offset_of!(UvioAttest, config_uid), 0x0118);
        assert_eq!(offset_of!(UvioAttest, arcb_len), 0x0128);
        assert_eq!(offset_of!(UvioAttest, meas_len), 0x012c);
        assert_eq!(offset_of!(UvioAttest, add_data_len), 0x0130);
        assert_eq!(offset_of!(UvioAttest, user_data_len), 0x0134);
        assert_eq!(offset_of!(UvioAttest, reserved136), 0x0136);
        assert_eq!(size_of::<UvioAttest>(), 0x0138);
        assert_eq!(size_of::<UvioUvdevInfo>(), 16);
        // _IOWR('u', 1, struct uvio_ioctl_cb) and _IOWR('u', 0, …).
        assert_eq!(UVIO_IOCTL_ATT, 0xc040_7501);
        assert_eq!(UVIO_IOCTL_UVDEV_INFO, 0xc040_7500);
    }

    /// A request header as `s390_pv` writes it: 48 bytes, then flags and algorithm.
    fn arcb(flags: u64, mai: u32) -> Vec<u8> {
        let mut a = vec![0u8; 48 + 16 + 160 + 80 + 80 + 16];
        a[48..56].copy_from_slice(&flags.to_be_bytes());
        a[56..60].copy_from_slice(&mai.to_be_bytes());
        a
    }

    #[test]
    fn buffers_are_sized_from_the_request() {
        // Nonce (bit 1), image and attesting host-key hashes (bits 2 and 3), MSB-0.
        let flags = (1u64 << 62) | (1 << 61) | (1 << 60);
        assert_eq!(request_sizes(&arcb(flags, 1)).unwrap(), (64, 64));
        assert_eq!(request_sizes(&arcb(1 << 62, 1)).unwrap(), (64, 0));
        let all = (0..6).fold(0u64, |f, b| f | (1 << (63 - b)));
        assert_eq!(
            request_sizes(&arcb(all, 1)).unwrap(),
            (64, 0x20 + 0x20 + 0x40 + 0x140)
        );
        let e = request_sizes(&arcb(flags, 2)).unwrap_err();
        assert!(e.to_string().contains("measurement algorithm 2"), "{e}");
        assert!(request_sizes(&[0u8; 10]).is_err());
    }

    /// A real request, made by IBM's `s390_pv` as the KBS makes it, is sized the same.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn a_request_made_by_ibms_crate_is_sized_from_its_header() {
        use s390_pv::{
            attest::{
                AttestationFlags, AttestationMeasAlg, AttestationRequest, AttestationVersion,
            },
            request::{ReqEncrCtx, Request, SymKeyType},
        };
        let group = openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::SECP521R1).unwrap();
        let host = openssl::ec::EcKey::generate(&group).unwrap();
        let host = openssl::pkey::PKey::public_key_from_pem(
            &openssl::pkey::PKey::from_ec_key(host)
                .unwrap()
                .public_key_to_pem()
                .unwrap(),
        )
        .unwrap();
        for (image, attest, additional) in [(true, true, 64), (true, false, 32), (false, false, 0)]
        {
            let mut flags = AttestationFlags::default();
            if image {
                flags.set_image_phkh();
            }
            if attest {
                flags.set_attest_phkh();
            }
            let mut req = AttestationRequest::new(
                AttestationVersion::One,
                AttestationMeasAlg::HmacSha512,
                flags,
            )
            .unwrap();
            req.add_hostkey(host.clone());
            let ctx = ReqEncrCtx::random(SymKeyType::Aes256Gcm).unwrap();
            let arcb = req.encrypt(&ctx).unwrap();
            assert_eq!(request_sizes(&arcb).unwrap(), (64, additional));
        }
    }

    #[test]
    fn a_device_that_is_not_there_is_named() {
        let a = SeAttester::new(Path::new("/nonexistent/uv"));
        let e = a.attest(&arcb(1 << 62, 1), &[0; 64]).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/uv"), "{e}");
        let e = a.attest(&arcb(1 << 62, 1), &[0; 257]).unwrap_err();
        assert!(e.to_string().contains("at most 256"), "{e}");
    }
}
