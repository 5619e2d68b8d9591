//! The launch digest chain (SEV-SNP ABI specification, `SNP_LAUNCH_UPDATE`, the `PAGE_INFO`
//! structure) and the SEV hashes table QEMU gives the firmware for measured direct boot.

use sha2::{Digest, Sha256, Sha384};

use super::{ovmf::guid, ovmf::PAGE, SnpError};

/// The size of a SHA-384 digest: the launch digest and each page's contents digest.
const LD: usize = 48;
/// The size of `PAGE_INFO`.
const PAGE_INFO: usize = 0x70;
/// The GPA a VMSA page is measured at: `(u64)-1` reduced to a page-aligned 52-bit address.
const VMSA_GPA: u64 = 0xFFFF_FFFF_F000;

/// The `PAGE_TYPE` values of `PAGE_INFO`.
#[derive(Clone, Copy)]
#[repr(u8)]
enum PageType {
    Normal = 1,
    Vmsa = 2,
    Zero = 3,
    Secrets = 5,
    Cpuid = 6,
}

/// The running launch digest.
pub(super) struct LaunchDigest {
    ld: [u8; LD],
}

impl LaunchDigest {
    /// The digest before the first page: all zeros.
    pub fn new() -> Self {
        Self { ld: [0; LD] }
    }

    /// Folds one page in: `ld = SHA-384(PAGE_INFO)`, where `PAGE_INFO` is the current digest,
    /// the page's contents digest, its length (0x70), page type, IMI flag (0), the VMPL 3/2/1
    /// permissions (0), a reserved byte and the page's GPA.
    fn update(&mut self, kind: PageType, gpa: u64, contents: &[u8; LD]) {
        let mut info = [0u8; PAGE_INFO];
        info[..LD].copy_from_slice(&self.ld);
        info[LD..2 * LD].copy_from_slice(contents);
        info[0x60..0x62].copy_from_slice(&(PAGE_INFO as u16).to_le_bytes());
        info[0x62] = kind as u8;
        // 0x63: IMI_PAGE, 0x64..0x67: VMPL3/2/1 permissions, 0x67: reserved — all zero.
        info[0x68..0x70].copy_from_slice(&gpa.to_le_bytes());
        self.ld = Sha384::digest(info).into();
    }

    /// Measured pages with `data` (whole pages) at `gpa`.
    pub fn normal_pages(&mut self, gpa: u64, data: &[u8]) {
        debug_assert_eq!(data.len() % PAGE, 0);
        for (i, page) in data.chunks_exact(PAGE).enumerate() {
            let contents: [u8; LD] = Sha384::digest(page).into();
            self.update(PageType::Normal, gpa + (i * PAGE) as u64, &contents);
        }
    }

    /// `size` bytes of zeroed pages at `gpa` (their contents field is zero).
    pub fn zero_pages(&mut self, gpa: u64, size: usize) {
        for i in 0..size / PAGE {
            self.update(PageType::Zero, gpa + (i * PAGE) as u64, &[0; LD]);
        }
    }

    /// The secrets page at `gpa`.
    pub fn secrets_page(&mut self, gpa: u64) {
        self.update(PageType::Secrets, gpa, &[0; LD]);
    }

    /// The CPUID page at `gpa`.
    pub fn cpuid_page(&mut self, gpa: u64) {
        self.update(PageType::Cpuid, gpa, &[0; LD]);
    }

    /// One vCPU's VMSA page.
    pub fn vmsa_page(&mut self, page: &[u8; PAGE]) {
        let contents: [u8; LD] = Sha384::digest(page).into();
        self.update(PageType::Vmsa, VMSA_GPA, &contents);
    }

    /// The launch digest.
    pub fn finish(self) -> [u8; LD] {
        self.ld
    }
}

/// `9438d606-4f22-4cc9-b479-a793d411fd21`: the SEV hashes table's header.
const HASH_TABLE_HEADER_GUID: [u8; 16] = guid(
    0x9438_d606,
    0x4f22,
    0x4cc9,
    [0xb4, 0x79, 0xa7, 0x93, 0xd4, 0x11, 0xfd, 0x21],
);
/// `97d02dd8-bd20-4c94-aa78-e7714d36ab2a`: the command line's entry.
const CMDLINE_ENTRY_GUID: [u8; 16] = guid(
    0x97d0_2dd8,
    0xbd20,
    0x4c94,
    [0xaa, 0x78, 0xe7, 0x71, 0x4d, 0x36, 0xab, 0x2a],
);
/// `44baf731-3a2f-4bd7-9af1-41e29169781d`: the initrd's entry.
const INITRD_ENTRY_GUID: [u8; 16] = guid(
    0x44ba_f731,
    0x3a2f,
    0x4bd7,
    [0x9a, 0xf1, 0x41, 0xe2, 0x91, 0x69, 0x78, 0x1d],
);
/// `4de79437-abd2-427f-b835-d5b172d2045b`: the kernel's entry.
const KERNEL_ENTRY_GUID: [u8; 16] = guid(
    0x4de7_9437,
    0xabd2,
    0x427f,
    [0xb8, 0x35, 0xd5, 0xb1, 0x72, 0xd2, 0x04, 0x5b],
);

/// An entry of the hashes table: GUID, length (2 bytes), SHA-256.
const ENTRY: usize = 16 + 2 + 32;
/// The table: GUID, length, then the command line, initrd and kernel entries.
const TABLE: usize = 16 + 2 + 3 * ENTRY;
/// The table as QEMU writes it: padded to 16 bytes.
const PADDED_TABLE: usize = TABLE.next_multiple_of(16);

/// The SEV hashes table QEMU builds for `-kernel`/`-initrd`/`-append`: SHA-256 of the command
/// line with its terminating NUL, of the initrd (empty when none) and of the kernel, each
/// behind its GUID and length, after the table's GUID and length; zero-padded to 16 bytes.
pub(super) fn hashes_table(kernel: &[u8], initrd: &[u8], append: &str) -> [u8; PADDED_TABLE] {
    let mut cmdline = Sha256::new();
    cmdline.update(append.as_bytes());
    cmdline.update([0]);
    let entries = [
        (CMDLINE_ENTRY_GUID, cmdline.finalize()),
        (INITRD_ENTRY_GUID, Sha256::digest(initrd)),
        (KERNEL_ENTRY_GUID, Sha256::digest(kernel)),
    ];
    let mut t = [0u8; PADDED_TABLE];
    t[..16].copy_from_slice(&HASH_TABLE_HEADER_GUID);
    t[16..18].copy_from_slice(&(TABLE as u16).to_le_bytes());
    for (i, (g, hash)) in entries.iter().enumerate() {
        let at = 18 + i * ENTRY;
        t[at..at + 16].copy_from_slice(g);
        t[at + 16..at + 18].copy_from_slice(&(ENTRY as u16).to_le_bytes());
        t[at + 18..at + ENTRY].copy_from_slice(hash);
    }
    t
}

/// The measured page holding the hashes table at `offset` within it, zeros elsewhere.
pub(super) fn hashes_page(
    offset: usize,
    kernel: &[u8],
    initrd: &[u8],
    append: &str,
) -> Result<[u8; PAGE], SnpError> {
    if offset + PADDED_TABLE > PAGE {
        return Err(SnpError::BadFirmware(format!(
            "its SEV hashes table at page offset {offset:#x} does not fit in the page"
        )));
    }
    let mut page = [0u8; PAGE];
    page[offset..offset + PADDED_TABLE].copy_from_slice(&hashes_table(kernel, initrd, append));
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_table_layout() {
        let t = hashes_table(b"kernel", b"", "console=ttyS0");
        assert_eq!(t.len(), 0xb0);
        assert_eq!(
            hex::encode(&t[..18]),
            "06d63894224fc94cb479a793d411fd21a800"
        );
        // Command line: its GUID, length 50, SHA-256 of the line with its NUL.
        assert_eq!(&t[18..34], &CMDLINE_ENTRY_GUID);
        assert_eq!(&t[34..36], &[50, 0]);
        assert_eq!(&t[36..68], &Sha256::digest(b"console=ttyS0\0")[..]);
        // The initrd: the SHA-256 of nothing.
        assert_eq!(&t[68..84], &INITRD_ENTRY_GUID);
        assert_eq!(
            hex::encode(&t[86..118]),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(&t[118..134], &KERNEL_ENTRY_GUID);
        assert_eq!(&t[136..168], &Sha256::digest(b"kernel")[..]);
        assert_eq!(&t[168..], &[0; 8]);
        // No command line measures as the single NUL.
        let none = hashes_table(b"kernel", b"", "");
        assert_eq!(&none[36..68], &Sha256::digest(b"\0")[..]);
    }

    #[test]
    fn hashes_page_places_the_table() {
        let p = hashes_page(0x400, b"k", b"i", "a").unwrap();
        assert!(p[..0x400].iter().all(|&b| b == 0));
        assert_eq!(&p[0x400..0x4b0], &hashes_table(b"k", b"i", "a"));
        assert!(p[0x4b0..].iter().all(|&b| b == 0));
        assert!(hashes_page(0xf60, b"k", b"i", "a").is_err());
    }

    #[test]
    fn page_info_chain() {
        // One zero page at GPA 0x1000: SHA-384 of 48 zero bytes, 48 zero bytes, 0x70, type 3,
        // four zero bytes and the GPA.
        let mut ld = LaunchDigest::new();
        ld.zero_pages(0x1000, PAGE);
        let mut info = vec![0u8; 96];
        info.extend_from_slice(&[0x70, 0, 3, 0, 0, 0, 0, 0]);
        info.extend_from_slice(&0x1000u64.to_le_bytes());
        assert_eq!(ld.finish(), <[u8; 48]>::from(Sha384::digest(&info)));
    }
}
