//! TDX reference values of a pod VM launch: the MRTD of its TDVF and the RTMRs the firmware and
//! the kernel's EFI stub extend for the kernel, its command line and its initrd.
//!
//! **MRTD.** The TDX module hashes (SHA-384, one running hash finalized at `TDH.MR.FINALIZE`) a
//! 128-byte record per `TDH.MEM.PAGE.ADD` (`"MEM.PAGE.ADD"` at byte 0, the page's GPA as a
//! little-endian u64 at byte 16, zeros) and, per `TDH.MR.EXTEND` of a 256-byte chunk, a
//! 128-byte record (`"MR.EXTEND"`, the chunk's GPA at byte 16) followed by the chunk. QEMU adds
//! the TDVF's memory as its TDX metadata lists it (the `TDVF` descriptor that the footer GUID
//! table's `e47a6535-984a-4798-865e-4685a7bf8ec2` entry points to): section by section, in the
//! metadata's order, every section that is not `PAGE.AUG`; KVM adds each page and, where the
//! section has the `MR.EXTEND` attribute (the BFV), extends its 16 chunks right after it
//! ([`PageOrder::Interleaved`]: QEMU 10.1's `KVM_TDX_INIT_MEM_REGION`, one call per section, on
//! Linux 6.16's KVM). Other TDX host stacks add all of a section's pages before extending them
//! ([`PageOrder::SectionAddsFirst`]), which gives another MRTD of the same memory; that order
//! is what the independent implementation in the `mosaik` crate computes, and the two agree
//! record for record (checked for this build's TDVF, see `docs/podvm.md`). `coffer measure`
//! prints both: the TD's content is the same, only the host's order differs.
//!
//! **RTMR1** (the firmware's PCR 4 and 5 events, mapped by TDVF): the kernel's PE Authenticode
//! SHA-384 (`EV_EFI_BOOT_SERVICES_APPLICATION`; QEMU's `x86_load_linux` skips its setup-header
//! patches when a confidential-guest object is set, in QEMU's current source, so the firmware
//! measures the kernel file unpatched; QEMU builds that still patch a TD's kernel — older
//! versions, TDX forks — give another RTMR1), then the actions "Calling EFI Application from Boot Option", "Exit
//! Boot Services Invocation" and "Exit Boot Services Returned with Success".
//!
//! **RTMR2** (PCR 9, from the kernel's EFI stub): the load options as OVMF's loader passes them
//! (the command line, then ` initrd=initrd` when there is an initrd, in UTF-16LE with its NUL),
//! then the initrd's content. `EV_EVENT_TAG` digests are of the data itself.
//!
//! RTMR0 holds the TD HOB, the configuration volume, ACPI tables and boot variables: it depends
//! on QEMU's machine model and memory size, so its reference value is taken from a known-good
//! TD's event log, not computed here. The event-log shapes are checked against a real TDVF log
//! (`crates/verifier/testdata/eventlog/CCEL_data_ovmf`) in this module's tests.

use sha2::{Digest, Sha384};

use crate::snp::{footer_entry, guid};

/// `e47a6535-984a-4798-865e-4685a7bf8ec2`: the TDX metadata's offset from the image's end.
const TDX_METADATA_OFFSET_GUID: [u8; 16] = guid(
    0xe47a_6535,
    0x984a,
    0x4798,
    [0x86, 0x5e, 0x46, 0x85, 0xa7, 0xbf, 0x8e, 0xc2],
);
/// `e9eaf9f3-168e-44d5-a8eb-7f4d8738f6ae`: the GUID just before the `TDVF` descriptor.
const TDX_METADATA_GUID: [u8; 16] = guid(
    0xe9ea_f9f3,
    0x168e,
    0x44d5,
    [0xa8, 0xeb, 0x7f, 0x4d, 0x87, 0x38, 0xf6, 0xae],
);
const PAGE: u64 = 4096;
/// `TDH.MR.EXTEND` measures this many bytes at a time.
const CHUNK: usize = 256;
/// A section attribute: its pages are measured (`TDH.MR.EXTEND`).
pub const ATTR_MR_EXTEND: u32 = 1;
/// A section attribute: its pages are accepted later, not added at launch.
pub const ATTR_PAGE_AUG: u32 = 2;

/// The boot-manager action measured before the kernel starts.
pub const CALLING_EFI_APPLICATION: &str = "Calling EFI Application from Boot Option";
/// The actions measured around `ExitBootServices`.
pub const EXIT_BOOT_SERVICES: [&str; 2] = [
    "Exit Boot Services Invocation",
    "Exit Boot Services Returned with Success",
];
/// What OVMF's kernel loader appends to the command line when there is an initrd.
const INITRD_OPTION: &str = " initrd=initrd";
/// The guest memory the launcher gives a pod VM (MiB); RTMRs 1 and 2 do not depend on it where
/// QEMU leaves the kernel's setup header unpatched (see the module's documentation).
pub const DEFAULT_MEMORY_MIB: u64 = 2048;

/// Why TDX values cannot be computed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TdxError {
    /// No TDX metadata: not a TDVF.
    #[error("firmware has no TDX metadata (not a TDVF; OVMF's IntelTdx build has it)")]
    NoMetadata,
    /// The metadata is malformed.
    #[error("firmware's TDX metadata is malformed: {0}")]
    BadMetadata(String),
    /// The kernel is not a PE image (no EFI stub).
    #[error("the kernel is not a PE/COFF image with an EFI stub: {0}")]
    BadKernel(String),
}

/// The order in which a TDX host adds and measures a section's pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageOrder {
    /// Each page added, then its chunks extended (Linux 6.16's KVM, QEMU 10.1).
    Interleaved,
    /// All of a section's pages added, then all of them extended.
    SectionAddsFirst,
}

/// One TDX metadata section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Section {
    /// Where its data starts in the image.
    pub data_offset: u32,
    /// How many bytes of the image it takes.
    pub raw_size: u32,
    /// Its guest-physical address.
    pub gpa: u64,
    /// Its size in guest memory.
    pub memory_size: u64,
    /// Its type (0 BFV, 1 CFV, 2 TD HOB, 3 temporary memory, …).
    pub kind: u32,
    /// [`ATTR_MR_EXTEND`], [`ATTR_PAGE_AUG`].
    pub attributes: u32,
}

/// A TDVF: the image and its TDX metadata.
#[derive(Debug)]
pub struct Tdvf<'a> {
    image: &'a [u8],
    /// The sections, in the metadata's order.
    pub sections: Vec<Section>,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or_default())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default())
}

impl<'a> Tdvf<'a> {
    /// Finds and checks the TDX metadata of `image`.
    pub fn parse(image: &'a [u8]) -> Result<Self, TdxError> {
        let bad = |s: String| TdxError::BadMetadata(s);
        let entry = footer_entry(image, &TDX_METADATA_OFFSET_GUID)
            .map_err(|e| bad(e.to_string()))?
            .ok_or(TdxError::NoMetadata)?;
        if entry.len() < 4 {
            return Err(bad("its offset entry is shorter than 4 bytes".into()));
        }
        let offset = u32_at(entry, 0) as usize;
        let at = image
            .len()
            .checked_sub(offset)
            .filter(|&a| a >= 16 && a + 16 <= image.len())
            .ok_or_else(|| bad(format!("offset {offset:#x} is outside the image")))?;
        if image[at - 16..at] != TDX_METADATA_GUID {
            return Err(bad("no TDX metadata GUID before the descriptor".into()));
        }
        if &image[at..at + 4] != b"TDVF" {
            return Err(bad("descriptor signature is not TDVF".into()));
        }
        let (length, version, count) = (
            u32_at(image, at + 4) as usize,
            u32_at(image, at + 8),
            u32_at(image, at + 12) as usize,
        );
        if version != 1 {
            return Err(bad(format!("descriptor version {version}, not 1")));
        }
        if length != 16 + 32 * count || at + length > image.len() {
            return Err(bad(format!(
                "descriptor length {length} does not hold {count} sections"
            )));
        }
        let mut sections = Vec::with_capacity(count);
        for i in 0..count {
            let s = at + 16 + 32 * i;
            let section = Section {
                data_offset: u32_at(image, s),
                raw_size: u32_at(image, s + 4),
                gpa: u64_at(image, s + 8),
                memory_size: u64_at(image, s + 16),
                kind: u32_at(image, s + 24),
                attributes: u32_at(image, s + 28),
            };
            if !section.gpa.is_multiple_of(PAGE) || !section.memory_size.is_multiple_of(PAGE) {
                return Err(bad(format!("section {i} is not page-aligned")));
            }
            if u64::from(section.raw_size) > section.memory_size
                || section.data_offset as usize + section.raw_size as usize > image.len()
            {
                return Err(bad(format!("section {i}'s data does not fit")));
            }
            sections.push(section);
        }
        if !sections.iter().any(|s| s.kind == 0) {
            return Err(bad("no boot firmware volume (BFV) section".into()));
        }
        Ok(Self { image, sections })
    }

    /// The MRTD of a launch of this TDVF whose host adds and extends pages in `order` (see
    /// the module's documentation).
    pub fn mrtd(&self, order: PageOrder) -> [u8; 48] {
        let mut h = Sha384::new();
        let record = |op: &[u8], gpa: u64| {
            let mut r = [0u8; 128];
            r[..op.len()].copy_from_slice(op);
            r[16..24].copy_from_slice(&gpa.to_le_bytes());
            r
        };
        let zero = [0u8; CHUNK];
        for s in self
            .sections
            .iter()
            .filter(|s| s.attributes & ATTR_PAGE_AUG == 0)
        {
            let data =
                &self.image[s.data_offset as usize..s.data_offset as usize + s.raw_size as usize];
            let pages = s.memory_size / PAGE;
            let measured = s.attributes & ATTR_MR_EXTEND != 0;
            let extend = |h: &mut Sha384, page: u64| {
                let gpa = s.gpa + page * PAGE;
                for c in 0..PAGE as usize / CHUNK {
                    let off = page as usize * PAGE as usize + c * CHUNK;
                    h.update(record(b"MR.EXTEND", gpa + (c * CHUNK) as u64));
                    let chunk = data.get(off..(off + CHUNK).min(data.len())).unwrap_or(&[]);
                    h.update(chunk);
                    h.update(&zero[..CHUNK - chunk.len()]);
                }
            };
            for page in 0..pages {
                h.update(record(b"MEM.PAGE.ADD", s.gpa + page * PAGE));
                if measured && order == PageOrder::Interleaved {
                    extend(&mut h, page);
                }
            }
            if measured && order == PageOrder::SectionAddsFirst {
                for page in 0..pages {
                    extend(&mut h, page);
                }
            }
        }
        h.finalize().into()
    }
}

/// An RTMR after extending `digests` in order from zero.
pub fn replay(digests: &[[u8; 48]]) -> [u8; 48] {
    digests.iter().fold([0u8; 48], |mr, d| {
        let mut h = Sha384::new();
        h.update(mr);
        h.update(d);
        h.finalize().into()
    })
}

fn sha384(data: &[u8]) -> [u8; 48] {
    Sha384::digest(data).into()
}

/// The PE Authenticode SHA-384 of `kernel` (a bzImage with its EFI stub).
pub fn authenticode_sha384(kernel: &[u8]) -> Result<[u8; 48], TdxError> {
    use object::read::pe::PeFile64;
    let pe = PeFile64::parse(kernel).map_err(|e| TdxError::BadKernel(e.to_string()))?;
    let mut h = Sha384::new();
    authenticode::authenticode_digest(&pe, &mut h)
        .map_err(|e| TdxError::BadKernel(format!("{e:?}")))?;
    Ok(h.finalize().into())
}

/// RTMR1's events: the kernel, then the boot manager's and ExitBootServices' actions.
pub fn rtmr1_events(kernel: &[u8]) -> Result<Vec<[u8; 48]>, TdxError> {
    let mut events = vec![authenticode_sha384(kernel)?];
    events.push(sha384(CALLING_EFI_APPLICATION.as_bytes()));
    events.extend(EXIT_BOOT_SERVICES.map(|a| sha384(a.as_bytes())));
    Ok(events)
}

/// The load options OVMF's kernel loader hands the kernel for `append` (UTF-16LE, NUL ended).
pub fn load_options(append: &str, has_initrd: bool) -> Vec<u8> {
    let text = if has_initrd {
        format!("{append}{INITRD_OPTION}")
    } else {
        append.to_string()
    };
    text.encode_utf16()
        .chain(std::iter::once(0))
        .flat_map(u16::to_le_bytes)
        .collect()
}

/// RTMR2's events: the load options (when there are any), then the initrd (when not empty).
pub fn rtmr2_events(append: &str, initrd: &[u8]) -> Vec<[u8; 48]> {
    let mut events = Vec::new();
    if !append.is_empty() || !initrd.is_empty() {
        events.push(sha384(&load_options(append, !initrd.is_empty())));
    }
    if !initrd.is_empty() {
        events.push(sha384(initrd));
    }
    events
}

/// What a TDX launch of a pod VM is given.
#[derive(Clone, Copy, Debug)]
pub struct LaunchInputs<'a> {
    /// The TDVF (QEMU `-bios`).
    pub firmware: &'a [u8],
    /// The kernel (QEMU `-kernel`), a bzImage with its EFI stub.
    pub kernel: &'a [u8],
    /// The initrd (QEMU `-initrd`).
    pub initrd: &'a [u8],
    /// The command line (QEMU `-append`).
    pub append: &'a str,
    /// Guest memory (MiB): recorded for RTMR0, which this does not compute.
    pub memory_mib: u64,
}

/// The computed reference values of a TDX launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Measurements {
    /// MRTD, for each [`PageOrder`]: interleaved, then section adds first.
    pub mrtd: [[u8; 48]; 2],
    /// RTMR1.
    pub rtmr1: [u8; 48],
    /// RTMR2.
    pub rtmr2: [u8; 48],
}

/// MRTD, RTMR1 and RTMR2 of a direct-boot TDX launch of `i`.
pub fn measure(i: &LaunchInputs) -> Result<Measurements, TdxError> {
    let tdvf = Tdvf::parse(i.firmware)?;
    Ok(Measurements {
        mrtd: [
            tdvf.mrtd(PageOrder::Interleaved),
            tdvf.mrtd(PageOrder::SectionAddsFirst),
        ],
        rtmr1: replay(&rtmr1_events(i.kernel)?),
        rtmr2: replay(&rtmr2_events(i.append, i.initrd)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal image: `sections` as TDX metadata, a footer GUID table pointing at it.
    fn image(sections: &[(u32, u32, u64, u64, u32, u32)]) -> Vec<u8> {
        let mut img = vec![0u8; 4 * PAGE as usize];
        for (i, b) in img.iter_mut().enumerate().take(2 * PAGE as usize) {
            *b = (i % 251) as u8;
        }
        let desc_at = 3 * PAGE as usize;
        img[desc_at - 16..desc_at].copy_from_slice(&TDX_METADATA_GUID);
        img[desc_at..desc_at + 4].copy_from_slice(b"TDVF");
        let len = 16 + 32 * sections.len() as u32;
        img[desc_at + 4..desc_at + 8].copy_from_slice(&len.to_le_bytes());
        img[desc_at + 8..desc_at + 12].copy_from_slice(&1u32.to_le_bytes());
        img[desc_at + 12..desc_at + 16].copy_from_slice(&(sections.len() as u32).to_le_bytes());
        for (i, s) in sections.iter().enumerate() {
            let at = desc_at + 16 + 32 * i;
            img[at..at + 4].copy_from_slice(&s.0.to_le_bytes());
            img[at + 4..at + 8].copy_from_slice(&s.1.to_le_bytes());
            img[at + 8..at + 16].copy_from_slice(&s.2.to_le_bytes());
            img[at + 16..at + 24].copy_from_slice(&s.3.to_le_bytes());
            img[at + 24..at + 28].copy_from_slice(&s.4.to_le_bytes());
            img[at + 28..at + 32].copy_from_slice(&s.5.to_le_bytes());
        }
        // Footer table: [offset entry][table footer], ending 32 bytes before the end.
        let n = img.len();
        let footer = n - 32 - 18;
        let entry = footer - (4 + 18);
        let offset = (n - desc_at) as u32;
        img[entry..entry + 4].copy_from_slice(&offset.to_le_bytes());
        img[entry + 4..entry + 6].copy_from_slice(&22u16.to_le_bytes());
        img[entry + 6..entry + 22].copy_from_slice(&TDX_METADATA_OFFSET_GUID);
        img[footer..footer + 2].copy_from_slice(&(18u16 + 22).to_le_bytes());
        img[footer + 2..footer + 18].copy_from_slice(&guid(
            0x96b5_82de,
            0x1fb2,
            0x45f7,
            [0xba, 0xea, 0xa3, 0x66, 0xc5, 0x5a, 0x08, 0x2d],
        ));
        img
    }

    #[test]
    fn metadata_is_found_and_mrtd_follows_the_module_records() {
        let img = image(&[
            (0, 2 * PAGE as u32, 0xffc0_0000, 2 * PAGE, 0, ATTR_MR_EXTEND),
            (0, 0, 0x80_0000, PAGE, 3, 0),
            (0, 0, 0x90_0000, PAGE, 3, ATTR_PAGE_AUG),
        ]);
        let tdvf = Tdvf::parse(&img).unwrap();
        assert_eq!(tdvf.sections.len(), 3);
        assert_eq!(tdvf.sections[0].gpa, 0xffc0_0000);
        // The records, written out independently of `mrtd`.
        let add = |h: &mut Sha384, gpa: u64| {
            let mut add = [0u8; 128];
            add[..12].copy_from_slice(b"MEM.PAGE.ADD");
            add[16..24].copy_from_slice(&gpa.to_le_bytes());
            h.update(add);
        };
        let extend = |h: &mut Sha384, gpa: u64| {
            for c in 0..16u64 {
                let mut ext = [0u8; 128];
                ext[..9].copy_from_slice(b"MR.EXTEND");
                ext[16..24].copy_from_slice(&(gpa + c * 256).to_le_bytes());
                h.update(ext);
                let off = (gpa - 0xffc0_0000 + c * 256) as usize;
                h.update(&img[off..off + 256]);
            }
        };
        let mut h = Sha384::new();
        add(&mut h, 0xffc0_0000);
        add(&mut h, 0xffc0_1000);
        extend(&mut h, 0xffc0_0000);
        extend(&mut h, 0xffc0_1000);
        add(&mut h, 0x80_0000);
        let adds_first: [u8; 48] = h.finalize().into();
        assert_eq!(tdvf.mrtd(PageOrder::SectionAddsFirst), adds_first);
        let mut h = Sha384::new();
        add(&mut h, 0xffc0_0000);
        extend(&mut h, 0xffc0_0000);
        add(&mut h, 0xffc0_1000);
        extend(&mut h, 0xffc0_1000);
        add(&mut h, 0x80_0000);
        let want: [u8; 48] = h.finalize().into();
        assert_eq!(tdvf.mrtd(PageOrder::Interleaved), want);
        assert_ne!(want, adds_first);
        // A changed byte of the measured volume changes it.
        let mut other = img.clone();
        other[5] ^= 1;
        assert_ne!(
            Tdvf::parse(&other).unwrap().mrtd(PageOrder::Interleaved),
            want
        );
    }

    #[test]
    fn what_is_not_a_tdvf_is_refused_naming_why() {
        assert_eq!(
            Tdvf::parse(&vec![0u8; 4 * PAGE as usize]).unwrap_err(),
            TdxError::NoMetadata
        );
        let mut img = image(&[(0, PAGE as u32, 0xffc0_0000, PAGE, 0, 1)]);
        let at = 3 * PAGE as usize;
        img[at] = b'X';
        assert!(matches!(
            Tdvf::parse(&img).unwrap_err(),
            TdxError::BadMetadata(m) if m.contains("TDVF")
        ));
        let img = image(&[(0, PAGE as u32, 0xffc0_0000, PAGE, 3, 0)]);
        assert!(matches!(
            Tdvf::parse(&img).unwrap_err(),
            TdxError::BadMetadata(m) if m.contains("BFV")
        ));
        let img = image(&[(0, 3 * PAGE as u32, 0xffc0_0000, PAGE, 0, 1)]);
        assert!(matches!(
            Tdvf::parse(&img).unwrap_err(),
            TdxError::BadMetadata(m) if m.contains("does not fit")
        ));
        assert!(matches!(
            authenticode_sha384(b"MZ not a kernel"),
            Err(TdxError::BadKernel(_))
        ));
    }

    #[test]
    fn load_options_are_the_command_line_and_initrd_option_in_utf16_with_nul() {
        let o = load_options("quiet", true);
        let text: Vec<u16> = o
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(String::from_utf16(&text).unwrap(), "quiet initrd=initrd\0");
        assert_eq!(load_options("", false), vec![0, 0]);
        // Each input moves its own register only.
        let a = rtmr2_events("quiet", b"initrd");
        assert_ne!(replay(&a), replay(&rtmr2_events("quiet ", b"initrd")));
        assert_ne!(replay(&a), replay(&rtmr2_events("quiet", b"initrd2")));
        assert_eq!(rtmr2_events("", b""), Vec::<[u8; 48]>::new());
    }

    /// A real TDVF event log (a direct boot): its RTMR1 and RTMR2 events are the ones this
    /// module extends, in that order, with the same digests for the same data.
    #[test]
    fn the_event_sequence_matches_a_real_tdvf_log() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../verifier/testdata/eventlog/CCEL_data_ovmf_out.json"
        );
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let log: serde_json::Value = serde_json::from_str(&text).unwrap();
        let events = log["uefi_event_logs"].as_array().unwrap();
        let of = |index: u64| -> Vec<(String, [u8; 48], String)> {
            events
                .iter()
                .filter(|e| e["index"] == index)
                .map(|e| {
                    let mut d = [0u8; 48];
                    hex::decode_to_slice(e["digests"][0]["digest"].as_str().unwrap(), &mut d)
                        .unwrap();
                    let detail = e["details"]["string"].as_str().unwrap_or("").to_string();
                    (e["type_name"].as_str().unwrap().to_string(), d, detail)
                })
                .collect()
        };
        // RTMR1 (index 2): the kernel's Authenticode digest first, then the three actions,
        // whose digests are SHA-384 of their text.
        let rtmr1 = of(2);
        let kinds: Vec<&str> = rtmr1.iter().map(|(k, _, _)| k.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "EV_EFI_BOOT_SERVICES_APPLICATION",
                "EV_EFI_ACTION",
                "EV_EFI_ACTION",
                "EV_EFI_ACTION"
            ]
        );
        let actions: Vec<&str> = rtmr1[1..].iter().map(|(_, _, s)| s.as_str()).collect();
        assert_eq!(
            actions,
            [
                CALLING_EFI_APPLICATION,
                EXIT_BOOT_SERVICES[0],
                EXIT_BOOT_SERVICES[1]
            ]
        );
        let mut ours = vec![rtmr1[0].1];
        ours.push(sha384(CALLING_EFI_APPLICATION.as_bytes()));
        ours.extend(EXIT_BOOT_SERVICES.map(|a| sha384(a.as_bytes())));
        let theirs: Vec<[u8; 48]> = rtmr1.iter().map(|(_, d, _)| *d).collect();
        assert_eq!(ours, theirs);
        // RTMR2 (index 3): the load options, then the initrd, as tagged events.
        let rtmr2 = of(3);
        let tags: Vec<(&str, &str)> = rtmr2
            .iter()
            .map(|(k, _, s)| (k.as_str(), s.as_str()))
            .collect();
        assert_eq!(
            tags,
            [
                ("EV_EVENT_TAG", "LOADED_IMAGE::LoadOptions"),
                ("EV_EVENT_TAG", "Linux initrd")
            ]
        );
    }
}
