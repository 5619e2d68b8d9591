//! A stand-in for OVMF's AmdSev build, which Debian does not ship: Debian's OVMF with its SEV
//! metadata and footer table patched to declare an SNP kernel-hashes page. It checks launch
//! digest arithmetic and the firmware checks (AMD's `sev-snp-measure` reads the same bytes); it
//! boots nothing.

/// Offset of `needle`'s last occurrence in `hay`.
fn rfind(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .rposition(|w| w == needle)
        .expect("pattern in OVMF")
}

/// `debian_ovmf` (Debian's `/usr/share/ovmf/OVMF.fd`) with a kernel-hashes page: its second SEV metadata section (pre-validated
/// memory at 0x80a000) becomes one SNP_KERNEL_HASHES page there, and the footer table's
/// SEV_HASH_TABLE_RV_GUID entry (zeros in Debian's build) points at 0x80a400 in it.
pub fn with_hashes_page(debian_ovmf: &[u8]) -> Vec<u8> {
    let mut fw = debian_ovmf.to_vec();
    let tail = fw.len() - 0x1000;
    // The metadata header ("ASEV", size, version, count) and its 12-byte section descriptors.
    let meta = tail + rfind(&fw[tail..], b"ASEV");
    let second = meta + 16 + 12;
    assert_eq!(&fw[second..second + 12], {
        let mut d = 0x80_a000u32.to_le_bytes().to_vec();
        d.extend_from_slice(&0x3000u32.to_le_bytes());
        d.extend_from_slice(&1u32.to_le_bytes());
        d
    });
    fw[second + 4..second + 8].copy_from_slice(&0x1000u32.to_le_bytes());
    fw[second + 8..second + 12].copy_from_slice(&0x10u32.to_le_bytes());
    // 7255371f-3a3b-4b04-927b-1da6efa8d454 in OVMF's byte order; its 8 data bytes (GPA, size)
    // precede its 2-byte size.
    let guid = hex::decode("1f3755723b3a044b927b1da6efa8d454").unwrap();
    let entry = tail + rfind(&fw[tail..], &guid);
    assert_eq!(&fw[entry - 2..entry], &[26, 0]);
    let data = entry - 10;
    assert_eq!(&fw[data..data + 8], &[0; 8]);
    fw[data..data + 4].copy_from_slice(&0x80_a400u32.to_le_bytes());
    fw[data + 4..data + 8].copy_from_slice(&0x400u32.to_le_bytes());
    fw
}
