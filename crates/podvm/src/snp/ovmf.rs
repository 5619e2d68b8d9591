//! What the SNP launch needs from an OVMF image: its footer GUID table (at the end of the image,
//! just below the reset vector) and the SEV metadata that table points to.
//!
//! The footer table grows downwards from 32 bytes before the image's end. Each entry is its data
//! followed by a 2-byte little-endian size (data + 18) and a 16-byte GUID; the last entry (the
//! table's own footer, `OVMF_TABLE_FOOTER_GUID`) gives the size of the whole table. The SEV
//! metadata entry holds the offset, from the image's end, of an `ASEV` header (signature,
//! size, version 1, count) followed by that many 12-byte section descriptors (GPA, size, type),
//! as in edk2's `OvmfPkg/ResetVector/X64/OvmfSevMetadata.asm`.

use super::SnpError;

/// A GUID in its in-memory (mixed-endian) byte order, as OVMF stores it.
pub(crate) const fn guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> [u8; 16] {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5],
        d4[6], d4[7],
    ]
}

/// `96b582de-1fb2-45f7-baea-a366c55a082d`: the footer GUID table's own entry.
const TABLE_FOOTER_GUID: [u8; 16] = guid(
    0x96b5_82de,
    0x1fb2,
    0x45f7,
    [0xba, 0xea, 0xa3, 0x66, 0xc5, 0x5a, 0x08, 0x2d],
);
/// `7255371f-3a3b-4b04-927b-1da6efa8d454`: where QEMU puts the SEV hashes table (GPA, size).
const SEV_HASH_TABLE_RV_GUID: [u8; 16] = guid(
    0x7255_371f,
    0x3a3b,
    0x4b04,
    [0x92, 0x7b, 0x1d, 0xa6, 0xef, 0xa8, 0xd4, 0x54],
);
/// `00f771de-1a7e-4fcb-890e-68c77e2fb44e`: the application processors' reset address.
const SEV_ES_RESET_BLOCK_GUID: [u8; 16] = guid(
    0x00f7_71de,
    0x1a7e,
    0x4fcb,
    [0x89, 0x0e, 0x68, 0xc7, 0x7e, 0x2f, 0xb4, 0x4e],
);
/// `dc886566-984a-4798-a75e-5585a7bf67cc`: the SEV metadata's offset from the image's end.
const SEV_META_DATA_GUID: [u8; 16] = guid(
    0xdc88_6566,
    0x984a,
    0x4798,
    [0xa7, 0x5e, 0x55, 0x85, 0xa7, 0xbf, 0x67, 0xcc],
);

/// Size of a footer table entry's trailer (size + GUID).
const ENTRY_TRAILER: usize = 2 + 16;
/// The footer table ends this many bytes before the image's end.
const TABLE_END_GAP: usize = 32;
/// Size of the SEV metadata header.
const METADATA_HEADER: usize = 16;
/// Size of an SEV metadata section descriptor.
const SECTION_DESC: usize = 12;
/// The page size of the measurement.
pub(super) const PAGE: usize = 4096;
/// The firmware image ends at this guest-physical address.
const FOUR_GIB: u64 = 1 << 32;

/// A section type of the SEV metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SectionKind {
    /// `OVMF_SECTION_TYPE_SNP_SEC_MEM` (1): memory the firmware wants pre-validated (zeroed).
    SecMem,
    /// `OVMF_SECTION_TYPE_SNP_SECRETS` (2): the secrets page.
    Secrets,
    /// `OVMF_SECTION_TYPE_CPUID` (3): the CPUID page.
    Cpuid,
    /// `OVMF_SECTION_TYPE_SVSM_CAA` (4): the SVSM calling area (zeroed).
    SvsmCaa,
    /// `OVMF_SECTION_TYPE_SNP_KERNEL_HASHES` (0x10): the page holding the SEV hashes table.
    KernelHashes,
}

/// One SEV metadata section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Section {
    /// Its guest-physical address.
    pub gpa: u32,
    /// Its size in bytes.
    pub size: u32,
    /// What it holds.
    pub kind: SectionKind,
}

/// The footer table's entries: GUID and data.
type Table<'a> = Vec<([u8; 16], &'a [u8])>;

/// A parsed OVMF image.
pub(super) struct Firmware<'a> {
    data: &'a [u8],
    table: Table<'a>,
    sections: Vec<Section>,
}

fn bad(what: String) -> SnpError {
    SnpError::BadFirmware(what)
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl<'a> Firmware<'a> {
    /// Parses the footer table and the SEV metadata of `data`.
    pub fn parse(data: &'a [u8]) -> Result<Self, SnpError> {
        let table = footer_table(data)?;
        if !data.len().is_multiple_of(PAGE) || data.len() as u64 > FOUR_GIB {
            return Err(bad(format!(
                "its size {:#x} is not a whole number of 4 KiB pages below 4 GiB",
                data.len()
            )));
        }
        let mut fw = Firmware {
            data,
            table,
            sections: Vec::new(),
        };
        let meta = fw
            .entry(&SEV_META_DATA_GUID)
            .ok_or(SnpError::NoSevMetadata)?;
        if meta.len() < 4 {
            return Err(bad("its SEV metadata entry is shorter than 4 bytes".into()));
        }
        fw.sections = sev_metadata(data, le_u32(meta, 0) as usize)?;
        Ok(fw)
    }

    /// The data of the footer table's entry `guid`.
    fn entry(&self, guid: &[u8; 16]) -> Option<&'a [u8]> {
        self.table.iter().find(|(g, _)| g == guid).map(|(_, d)| *d)
    }

    /// The first 4 bytes of the entry `guid` as a little-endian address.
    fn address(&self, guid: &[u8; 16]) -> Option<u32> {
        self.entry(guid)
            .filter(|d| d.len() >= 4)
            .map(|d| le_u32(d, 0))
    }

    /// The guest-physical address the image is mapped at (it ends at 4 GiB).
    pub fn gpa(&self) -> u64 {
        FOUR_GIB - self.data.len() as u64
    }

    /// The SEV metadata's sections, in their order.
    pub fn sections(&self) -> &[Section] {
        &self.sections
    }

    /// The application processors' reset address (`SEV_ES_RESET_BLOCK_GUID`).
    pub fn reset_eip(&self) -> Option<u32> {
        self.address(&SEV_ES_RESET_BLOCK_GUID)
    }

    /// Where QEMU writes the SEV hashes table (`SEV_HASH_TABLE_RV_GUID`), when the firmware
    /// reserves a place (a zero address means none, as in non-AmdSev builds).
    pub fn hashes_table_gpa(&self) -> Option<u32> {
        self.address(&SEV_HASH_TABLE_RV_GUID).filter(|&a| a != 0)
    }
}

/// The data of the entry `guid` of `data`'s footer GUID table (TDX's metadata offset, for one).
pub(crate) fn footer_entry<'a>(
    data: &'a [u8],
    guid: &[u8; 16],
) -> Result<Option<&'a [u8]>, SnpError> {
    Ok(footer_table(data)?
        .into_iter()
        .find(|(g, _)| g == guid)
        .map(|(_, d)| d))
}

/// The entries (GUID, data) of the footer GUID table of `data`; none when it has no table.
fn footer_table(data: &[u8]) -> Result<Table<'_>, SnpError> {
    let Some(footer) = data.len().checked_sub(TABLE_END_GAP + ENTRY_TRAILER) else {
        return Ok(Vec::new());
    };
    if data[footer + 2..footer + ENTRY_TRAILER] != TABLE_FOOTER_GUID {
        return Ok(Vec::new());
    }
    let size = le_u16(data, footer) as usize;
    let Some(len) = size.checked_sub(ENTRY_TRAILER) else {
        return Ok(Vec::new());
    };
    let start = footer.checked_sub(len).ok_or_else(|| {
        bad(format!(
            "its footer GUID table ({size} bytes) is larger than the image"
        ))
    })?;
    let mut rest = &data[start..footer];
    let mut entries = Vec::new();
    while rest.len() >= ENTRY_TRAILER {
        let trailer = rest.len() - ENTRY_TRAILER;
        let size = le_u16(rest, trailer) as usize;
        if size < ENTRY_TRAILER || size > rest.len() {
            return Err(bad(format!(
                "its footer GUID table has an entry of size {size} (of {} bytes left)",
                rest.len()
            )));
        }
        let mut guid = [0; 16];
        guid.copy_from_slice(&rest[trailer + 2..]);
        let begin = rest.len() - size;
        entries.push((guid, &rest[begin..trailer]));
        rest = &rest[..begin];
    }
    Ok(entries)
}

/// The sections of the SEV metadata `offset` bytes before the end of `data`.
fn sev_metadata(data: &[u8], offset: usize) -> Result<Vec<Section>, SnpError> {
    let start = data
        .len()
        .checked_sub(offset)
        .filter(|s| s + METADATA_HEADER <= data.len())
        .ok_or_else(|| {
            bad(format!(
                "its SEV metadata offset {offset:#x} is outside the image"
            ))
        })?;
    let header = &data[start..start + METADATA_HEADER];
    if &header[..4] != b"ASEV" {
        return Err(bad(format!(
            "its SEV metadata at {start:#x} lacks the ASEV signature"
        )));
    }
    let size = le_u32(header, 4) as usize;
    let version = le_u32(header, 8);
    let count = le_u32(header, 12) as usize;
    if version != 1 {
        return Err(bad(format!(
            "its SEV metadata has version {version}; only version 1 is known"
        )));
    }
    let end = count
        .checked_mul(SECTION_DESC)
        .and_then(|n| n.checked_add(start + METADATA_HEADER))
        .filter(|&end| end <= start.saturating_add(size) && end <= data.len())
        .ok_or_else(|| {
            bad(format!(
                "its SEV metadata ({size} bytes) cannot hold {count} sections"
            ))
        })?;
    data[start + METADATA_HEADER..end]
        .chunks_exact(SECTION_DESC)
        .map(|d| {
            let (gpa, size, kind) = (le_u32(d, 0), le_u32(d, 4), le_u32(d, 8));
            let kind = match kind {
                1 => SectionKind::SecMem,
                2 => SectionKind::Secrets,
                3 => SectionKind::Cpuid,
                4 => SectionKind::SvsmCaa,
                0x10 => SectionKind::KernelHashes,
                other => {
                    return Err(bad(format!(
                        "its SEV metadata section at {gpa:#x} has unknown type {other:#x}"
                    )))
                }
            };
            if !size.is_multiple_of(PAGE as u32) || !gpa.is_multiple_of(PAGE as u32) {
                return Err(bad(format!(
                    "its SEV metadata section at {gpa:#x} ({size:#x} bytes) is not page-aligned"
                )));
            }
            Ok(Section { gpa, size, kind })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 3-page image with a footer table holding `entries` and metadata with `sections`.
    fn image(entries: &[([u8; 16], Vec<u8>)], sections: &[(u32, u32, u32)]) -> Vec<u8> {
        let mut img = vec![0u8; 3 * PAGE];
        // Metadata at the start of the second page.
        let meta = PAGE;
        img[meta..meta + 4].copy_from_slice(b"ASEV");
        let size = (METADATA_HEADER + SECTION_DESC * sections.len()) as u32;
        img[meta + 4..meta + 8].copy_from_slice(&size.to_le_bytes());
        img[meta + 8..meta + 12].copy_from_slice(&1u32.to_le_bytes());
        img[meta + 12..meta + 16].copy_from_slice(&(sections.len() as u32).to_le_bytes());
        for (i, (gpa, size, kind)) in sections.iter().enumerate() {
            let at = meta + METADATA_HEADER + SECTION_DESC * i;
            img[at..at + 4].copy_from_slice(&gpa.to_le_bytes());
            img[at + 4..at + 8].copy_from_slice(&size.to_le_bytes());
            img[at + 8..at + 12].copy_from_slice(&kind.to_le_bytes());
        }
        let mut table = Vec::new();
        let meta_offset = ((img.len() - meta) as u32).to_le_bytes().to_vec();
        for (g, d) in entries
            .iter()
            .cloned()
            .chain([(SEV_META_DATA_GUID, meta_offset)])
        {
            table.extend_from_slice(&d);
            table.extend_from_slice(&((d.len() + ENTRY_TRAILER) as u16).to_le_bytes());
            table.extend_from_slice(&g);
        }
        table.extend_from_slice(&((table.len() + ENTRY_TRAILER) as u16).to_le_bytes());
        table.extend_from_slice(&TABLE_FOOTER_GUID);
        let end = img.len() - TABLE_END_GAP;
        img[end - table.len()..end].copy_from_slice(&table);
        img
    }

    #[test]
    fn guid_byte_order() {
        // uuid.UUID("96b582de-...").bytes_le
        assert_eq!(
            hex::encode(TABLE_FOOTER_GUID),
            "de82b596b21ff745baeaa366c55a082d"
        );
    }

    #[test]
    fn parses_table_and_metadata() {
        let img = image(
            &[
                (SEV_ES_RESET_BLOCK_GUID, vec![4, 0xb0, 0x80, 0, 1, 2]),
                (SEV_HASH_TABLE_RV_GUID, vec![0, 0xa4, 0x80, 0, 0, 4, 0, 0]),
            ],
            &[(0x80_0000, 0x9000, 1), (0x80_a000, 0x1000, 0x10)],
        );
        let fw = Firmware::parse(&img).unwrap();
        assert_eq!(fw.gpa(), FOUR_GIB - 3 * PAGE as u64);
        assert_eq!(fw.reset_eip(), Some(0x80_b004));
        assert_eq!(fw.hashes_table_gpa(), Some(0x80_a400));
        assert_eq!(
            fw.sections(),
            [
                Section {
                    gpa: 0x80_0000,
                    size: 0x9000,
                    kind: SectionKind::SecMem
                },
                Section {
                    gpa: 0x80_a000,
                    size: 0x1000,
                    kind: SectionKind::KernelHashes
                }
            ]
        );
    }

    #[test]
    fn zero_hashes_table_address_means_none() {
        let img = image(&[(SEV_HASH_TABLE_RV_GUID, vec![0; 8])], &[]);
        let fw = Firmware::parse(&img).unwrap();
        assert_eq!(fw.hashes_table_gpa(), None);
        assert_eq!(fw.reset_eip(), None);
    }

    #[test]
    fn refuses_what_is_not_there_or_broken() {
        assert_eq!(
            Firmware::parse(&[0; 2 * PAGE]).err(),
            Some(SnpError::NoSevMetadata)
        );
        let mut img = image(&[], &[(0x80_0000, 0x1000, 7)]);
        assert!(matches!(
            Firmware::parse(&img).err(),
            Some(SnpError::BadFirmware(m)) if m.contains("unknown type 0x7")
        ));
        img[PAGE] = b'X';
        assert!(matches!(
            Firmware::parse(&img).err(),
            Some(SnpError::BadFirmware(m)) if m.contains("ASEV")
        ));
        let mut img = image(&[], &[]);
        img.insert(0, 0);
        assert!(matches!(
            Firmware::parse(&img).err(),
            Some(SnpError::BadFirmware(m)) if m.contains("whole number of 4 KiB pages")
        ));
    }
}
