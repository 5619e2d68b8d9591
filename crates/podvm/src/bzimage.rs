//! The uncompressed kernel for direct PVH boot, taken out of a bzImage.
//!
//! A bzImage (the Linux/x86 boot protocol, `Documentation/arch/x86/boot.rst`) carries the kernel
//! ELF compressed, behind real-mode setup code and a decompressor. Under TCG the decompressor
//! alone takes about a second of a pod VM's boot. QEMU boots an ELF kernel that carries the PVH
//! entry note (`XEN_ELFNOTE_PHYS32_ENTRY`, which Debian's kernels have: `CONFIG_PVH=y`)
//! directly in 32-bit protected mode, with no decompression. [`pvh_kernel`] takes that ELF out of
//! the bzImage: the setup header's `payload_offset` and `payload_length` (boot protocol 2.08 and
//! later) locate the compressed payload (zstd or gzip, ending with the uncompressed size as a
//! 32-bit little-endian number); the ELF is cut at its end, dropping the relocation table the
//! build appends for the decompressor.

use std::io::Read;

use object::{
    elf,
    read::elf::{ElfFile64, FileHeader, ProgramHeader},
    Endianness, Object,
};

/// What is wrong with a kernel image.
#[derive(Debug, thiserror::Error)]
#[error("the kernel is not a bzImage this build can boot directly: {0}")]
pub struct BzImageError(String);

fn bad(what: impl Into<String>) -> BzImageError {
    BzImageError(what.into())
}

/// Boot protocol 2.08: the first with `payload_offset` and `payload_length`.
const MIN_PROTOCOL: u16 = 0x0208;
/// `XEN_ELFNOTE_PHYS32_ENTRY`: the 32-bit physical entry point of a PVH boot.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// Largest uncompressed kernel accepted (Debian's is about 55 MiB).
const MAX_KERNEL: u32 = 512 << 20;

fn u16_at(b: &[u8], at: usize) -> Result<u16, BzImageError> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or_else(|| bad("the setup header is cut short"))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BzImageError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| bad("the setup header is cut short"))
}

/// The compressed kernel ELF inside `bzimage`.
fn payload(bzimage: &[u8]) -> Result<&[u8], BzImageError> {
    if bzimage.get(0x202..0x206) != Some(b"HdrS") {
        return Err(bad("no \"HdrS\" setup header at 0x202"));
    }
    let protocol = u16_at(bzimage, 0x206)?;
    if protocol < MIN_PROTOCOL {
        return Err(bad(format!(
            "boot protocol {}.{:02} has no payload fields (2.08 or later needed)",
            protocol >> 8,
            protocol & 0xff
        )));
    }
    // `setup_sects` = 0 means 4 (boot.rst); the protected-mode code follows the boot sector
    // and the setup sectors.
    let setup_sects = match bzimage[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let start = (setup_sects + 1) * 512 + u32_at(bzimage, 0x248)? as usize;
    let len = u32_at(bzimage, 0x24c)? as usize;
    bzimage
        .get(start..start.saturating_add(len))
        .ok_or_else(|| bad("the payload lies beyond the end of the file"))
}

/// The kernel ELF in `bzimage`, checked to be an x86-64 ELF with the PVH entry note, without
/// what follows the ELF.
pub fn pvh_kernel(bzimage: &[u8]) -> Result<Vec<u8>, BzImageError> {
    let payload = payload(bzimage)?;
    let (stream, size) = match payload.len().checked_sub(4) {
        Some(n) => (&payload[..n], u32_at(payload, n)?),
        None => return Err(bad("the payload is empty")),
    };
    if size > MAX_KERNEL {
        return Err(bad(format!("the payload says it inflates to {size} bytes")));
    }
    let mut out = Vec::with_capacity(size as usize);
    let read = match stream.get(..4) {
        Some([0x28, 0xb5, 0x2f, 0xfd]) => zstd::stream::read::Decoder::new(stream)
            .and_then(|d| d.take(u64::from(size) + 1).read_to_end(&mut out)),
        Some([0x1f, 0x8b, ..]) => flate2::read::GzDecoder::new(stream)
            .take(u64::from(size) + 1)
            .read_to_end(&mut out),
        Some(magic) => {
            return Err(bad(format!(
                "the payload is compressed with a format this build does not inflate (magic {}; zstd and gzip are supported)",
                hex::encode(magic)
            )))
        }
        None => return Err(bad("the payload is cut short")),
    };
    read.map_err(|e| bad(format!("the payload does not inflate: {e}")))?;
    if out.len() != size as usize {
        return Err(bad(format!(
            "the payload inflates to {} bytes, not the {size} its trailer says",
            out.len()
        )));
    }
    let end = elf_end(&out)?;
    out.truncate(end);
    Ok(out)
}

/// Checks the ELF (64-bit, x86-64, with the PVH entry note) and returns where it ends: after the
/// last of its program segments' file data and its section header table.
fn elf_end(data: &[u8]) -> Result<usize, BzImageError> {
    let file = ElfFile64::<Endianness>::parse(data)
        .map_err(|e| bad(format!("the payload is not an ELF64 file: {e}")))?;
    if file.architecture() != object::Architecture::X86_64 {
        return Err(bad(format!(
            "the payload is a {:?} ELF, not x86-64",
            file.architecture()
        )));
    }
    let endian = file.endian();
    let header = file.elf_header();
    let mut end = (header.e_shoff(endian) as usize).saturating_add(
        usize::from(header.e_shnum(endian)) * usize::from(header.e_shentsize(endian)),
    );
    let mut pvh = false;
    for ph in file.elf_program_headers() {
        let seg_end = (ph.p_offset(endian) as usize).saturating_add(ph.p_filesz(endian) as usize);
        end = end.max(seg_end);
        if ph.p_type(endian) != elf::PT_NOTE {
            continue;
        }
        let notes = ph
            .notes(endian, data)
            .map_err(|e| bad(format!("a note segment does not parse: {e}")))?;
        let Some(mut notes) = notes else { continue };
        while let Some(note) = notes
            .next()
            .map_err(|e| bad(format!("a note does not parse: {e}")))?
        {
            if note.name() == b"Xen" && note.n_type(endian) == XEN_ELFNOTE_PHYS32_ENTRY {
                pvh = true;
            }
        }
    }
    if !pvh {
        return Err(bad(
            "the kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): it needs CONFIG_PVH=y",
        ));
    }
    if end > data.len() {
        return Err(bad(
            "the ELF's segments or section headers lie beyond its end",
        ));
    }
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bzImage header (protocol 2.15, 1 setup sector) around `payload`.
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 1024];
        b[0x1f1] = 1;
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        b[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        b[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        b.extend_from_slice(&[0xaa; 16]);
        b.extend_from_slice(payload);
        b.extend_from_slice(&[0xbb; 32]);
        b
    }

    /// An x86-64 ELF64 whose one program header is a note segment holding a note of `owner`
    /// and type `n_type`.
    fn elf(owner: &[u8; 4], n_type: u32) -> Vec<u8> {
        let mut e = Vec::new();
        e.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        e.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        e.extend_from_slice(&1u32.to_le_bytes());
        e.extend_from_slice(&0x100_0000u64.to_le_bytes()); // e_entry
        e.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
        e.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        e.extend_from_slice(&0u32.to_le_bytes());
        for v in [64u16, 56, 1, 64, 0, 0] {
            e.extend_from_slice(&v.to_le_bytes());
        }
        let note_at = 64 + 56;
        e.extend_from_slice(&elf::PT_NOTE.to_le_bytes());
        e.extend_from_slice(&4u32.to_le_bytes());
        for v in [note_at, 0, 0, 20, 20, 4] {
            e.extend_from_slice(&(v as u64).to_le_bytes());
        }
        e.extend_from_slice(&4u32.to_le_bytes());
        e.extend_from_slice(&4u32.to_le_bytes());
        e.extend_from_slice(&n_type.to_le_bytes());
        e.extend_from_slice(owner);
        e.extend_from_slice(&0x0100_0a30u32.to_le_bytes());
        e
    }

    fn compressed(elf: &[u8], trailer: &[u8]) -> Vec<u8> {
        let mut whole = elf.to_vec();
        whole.extend_from_slice(trailer);
        let mut z = zstd::encode_all(&whole[..], 3).unwrap();
        z.extend_from_slice(&(whole.len() as u32).to_le_bytes());
        z
    }

    #[test]
    fn the_elf_comes_out_without_the_relocations_that_follow_it() {
        let kernel = elf(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY);
        let out = pvh_kernel(&bzimage(&compressed(&kernel, &[0x55; 300]))).unwrap();
        assert_eq!(out, kernel);

        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &kernel).unwrap();
        let mut gz = gz.finish().unwrap();
        gz.extend_from_slice(&(kernel.len() as u32).to_le_bytes());
        assert_eq!(pvh_kernel(&bzimage(&gz)).unwrap(), kernel);
    }

    #[test]
    fn a_kernel_without_the_pvh_entry_note_is_refused() {
        for kernel in [elf(b"Xen\0", 5), elf(b"Lnx\0", XEN_ELFNOTE_PHYS32_ENTRY)] {
            let err = pvh_kernel(&bzimage(&compressed(&kernel, &[])))
                .unwrap_err()
                .to_string();
            assert!(err.contains("CONFIG_PVH"), "{err}");
        }
    }

    #[test]
    fn headers_that_are_not_a_bzimage_are_refused_naming_why() {
        let err = pvh_kernel(&[0u8; 2048]).unwrap_err().to_string();
        assert!(err.contains("HdrS"), "{err}");
        let mut old = bzimage(b"x");
        old[0x206..0x208].copy_from_slice(&0x0206u16.to_le_bytes());
        let err = pvh_kernel(&old).unwrap_err().to_string();
        assert!(err.contains("2.06"), "{err}");
        let mut beyond = bzimage(b"x");
        beyond[0x24c..0x250].copy_from_slice(&1_000_000u32.to_le_bytes());
        let err = pvh_kernel(&beyond).unwrap_err().to_string();
        assert!(err.contains("beyond"), "{err}");
    }

    #[test]
    fn payloads_in_other_formats_or_of_the_wrong_size_are_refused() {
        let mut xz = vec![0xfd, b'7', b'z', b'X', b'Z', 0];
        xz.extend_from_slice(&100u32.to_le_bytes());
        let err = pvh_kernel(&bzimage(&xz)).unwrap_err().to_string();
        assert!(err.contains("fd377a58") && err.contains("zstd"), "{err}");

        let mut z = zstd::encode_all(&b"not an elf"[..], 3).unwrap();
        z.extend_from_slice(&11u32.to_le_bytes());
        let err = pvh_kernel(&bzimage(&z)).unwrap_err().to_string();
        assert!(err.contains("not the 11"), "{err}");

        let mut z = zstd::encode_all(&b"not an elf"[..], 3).unwrap();
        z.extend_from_slice(&10u32.to_le_bytes());
        let err = pvh_kernel(&bzimage(&z)).unwrap_err().to_string();
        assert!(err.contains("not an ELF64"), "{err}");
    }
}
