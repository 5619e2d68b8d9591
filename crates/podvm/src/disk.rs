//! The pod VM as one bootable disk, for infrastructure that boots disks, not kernels (clouds,
//! and libvirt with `boot = "disk"`): a GPT disk of three partitions:
//!
//! 1. the EFI system partition (FAT), whose only file is `\EFI\BOOT\BOOTX64.EFI`: a unified
//!    kernel image ([`uki`]) — Debian's systemd-stub with the kernel, the initramfs and the
//!    measured command line as PE sections, so UEFI firmware (and a vTPM or TDX's RTMRs) loads
//!    and measures them as one;
//! 2. `coffer-root`: `root.img` as it is (squashfs followed by its dm-verity tree);
//! 3. `coffer-scratch`: empty; the agent encrypts it (integrity-protected) with a key that never
//!    leaves the guest, as it does the scratch disk of a kernel-booted VM.
//!
//! The agent finds both partitions by their GPT name; verity authenticates the root whatever
//! device it is read from. Everything is derived from the inputs (the disk's and the
//! partitions' GUIDs from the verity root hash, FAT times and volume id fixed), so the disk is
//! reproducible. [`DiskFormat`] says what a provider imports: raw (AWS), qcow2 (libvirt, IBM
//! Cloud; converted by `qemu-img`), fixed VHD (Azure: the raw disk with a VHD footer, sized to
//! a whole MiB).

use std::{
    fs::File,
    io::{Read, Seek, SeekFrom, Write},
    path::Path,
    process::Command,
};

use sha2::{Digest, Sha256};

/// The GPT partition name of the verity root.
pub const ROOT_PARTITION: &str = "coffer-root";
/// The GPT partition name of the scratch space.
pub const SCRATCH_PARTITION: &str = "coffer-scratch";

const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;

/// A disk format a provider imports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskFormat {
    /// A raw disk (`disk.raw`): AWS EC2 image import.
    Raw,
    /// qcow2 (`disk.qcow2`): libvirt volumes, IBM Cloud custom images.
    Qcow2,
    /// A fixed VHD (`disk.vhd`): Azure managed disks and gallery images.
    Vhd,
}

impl DiskFormat {
    /// The file name in the pod VM directory.
    pub fn file_name(self) -> &'static str {
        match self {
            Self::Raw => "disk.raw",
            Self::Qcow2 => "disk.qcow2",
            Self::Vhd => "disk.vhd",
        }
    }

    /// `raw`, `qcow2` or `vhd`.
    pub fn parse(s: &str) -> Result<Self, DiskError> {
        match s {
            "raw" => Ok(Self::Raw),
            "qcow2" => Ok(Self::Qcow2),
            "vhd" => Ok(Self::Vhd),
            other => Err(DiskError::Invalid(format!(
                "disk format {other:?}: use raw, qcow2 or vhd"
            ))),
        }
    }
}

/// A disk could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The inputs do not make a disk.
    #[error("{0}")]
    Invalid(String),
    /// A tool failed.
    #[error("{tool}: {detail}")]
    Tool {
        /// The tool.
        tool: String,
        /// What it said.
        detail: String,
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

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DiskError {
    let what = what.into();
    move |source| DiskError::Io { what, source }
}

fn run(cmd: &mut Command) -> Result<(), DiskError> {
    let tool = format!("{:?}", cmd.get_program());
    let out = cmd.output().map_err(|e| DiskError::Tool {
        tool: tool.clone(),
        detail: format!("cannot run it: {e} (is it installed?)"),
    })?;
    if !out.status.success() {
        return Err(DiskError::Tool {
            tool,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Makes the unified kernel image `out`: systemd-stub (`stub`, Debian's `linuxx64.efi.stub`)
/// with `.osrel`, `.cmdline`, `.linux` and `.initrd` sections appended by `objcopy`, each
/// placed after the stub's image on the stub's section alignment.
pub fn uki(
    stub: &Path,
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
    work: &Path,
    out: &Path,
) -> Result<(), DiskError> {
    use object::read::pe::{ImageNtHeaders, ImageOptionalHeader, PeFile64};
    let data = std::fs::read(stub).map_err(io(format!("the UEFI stub {}", stub.display())))?;
    let pe = PeFile64::parse(&*data)
        .map_err(|e| DiskError::Invalid(format!("{} is not a PE32+ image: {e}", stub.display())))?;
    let opt = pe.nt_headers().optional_header();
    let base = opt.image_base();
    let align = u64::from(opt.section_alignment()).max(4096);
    let up = |v: u64| v.div_ceil(align) * align;
    let osrel = work.join("osrel");
    std::fs::write(&osrel, "ID=coffer\nNAME=\"Coffer pod VM\"\n").map_err(io("osrel"))?;
    let cmd = work.join("cmdline");
    std::fs::write(&cmd, cmdline).map_err(io("cmdline"))?;
    let mut at = up(u64::from(opt.size_of_image()));
    let mut objcopy = Command::new("objcopy");
    for (name, file) in [
        (".osrel", osrel.as_path()),
        (".cmdline", cmd.as_path()),
        (".linux", kernel),
        (".initrd", initrd),
    ] {
        let len = std::fs::metadata(file)
            .map_err(io(file.display().to_string()))?
            .len();
        objcopy
            .arg("--add-section")
            .arg(format!("{name}={}", file.display()))
            .arg("--change-section-vma")
            .arg(format!("{name}={:#x}", base + at));
        at = up(at + len);
    }
    run(objcopy.arg(stub).arg(out))?;
    // objcopy stamps the PE header with the time: zeroed, and the checksum recomputed, so the
    // image is reproducible.
    let mut img = std::fs::read(out).map_err(io("the UKI"))?;
    let pe = img
        .get(0x3c..0x40)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()) as usize)
        .filter(|pe| pe + 24 + 68 <= img.len())
        .ok_or_else(|| DiskError::Invalid("objcopy wrote no PE header".into()))?;
    img[pe + 8..pe + 12].fill(0); // COFF TimeDateStamp
    let sum_at = pe + 24 + 64; // optional header CheckSum
    img[sum_at..sum_at + 4].fill(0);
    let sum = pe_checksum(&img, sum_at);
    img[sum_at..sum_at + 4].copy_from_slice(&sum.to_le_bytes());
    std::fs::write(out, img).map_err(io("the UKI"))
}

/// The PE image checksum: the 16-bit one's-complement-style sum of the file (its checksum field
/// at `skip` counted as zero), folded, plus the file's length.
fn pe_checksum(img: &[u8], skip: usize) -> u32 {
    let mut sum: u64 = 0;
    for (i, w) in img.chunks(2).enumerate() {
        let at = i * 2;
        if at >= skip && at < skip + 4 {
            continue;
        }
        let v = u64::from(w[0]) | u64::from(*w.get(1).unwrap_or(&0)) << 8;
        sum += v;
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum = (sum & 0xffff) + (sum >> 16);
    (sum as u32).wrapping_add(img.len() as u32)
}

/// A GUID derived from `seed` and `what` (RFC 4122 version 4 layout, so tools read it as
/// random).
fn guid(seed: &[u8], what: &str) -> uuid::Uuid {
    let d = Sha256::new()
        .chain_update(b"coffer disk guid\0")
        .chain_update(seed)
        .chain_update(what.as_bytes())
        .finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    uuid::Builder::from_random_bytes(b).into_uuid()
}

/// Writes the raw disk `out` from the UKI and `root.img`, with `scratch_mib` of scratch space;
/// `seed` (the verity root hash) derives its GUIDs. Its size is a whole number of MiB.
pub fn write_raw(
    uki: &Path,
    root_img: &Path,
    scratch_mib: u64,
    seed: &[u8],
    work: &Path,
    out: &Path,
) -> Result<(), DiskError> {
    if scratch_mib == 0 {
        return Err(DiskError::Invalid(
            "the scratch partition needs at least 1 MiB".into(),
        ));
    }
    let uki_len = std::fs::metadata(uki).map_err(io("the UKI"))?.len();
    let root_len = std::fs::metadata(root_img).map_err(io("root.img"))?.len();
    // The ESP: the UKI plus room for FAT's tables, at least 64 MiB (FAT32's smallest comfortable
    // size; firmware reads FAT12/16/32 alike).
    let esp_mib = (uki_len.div_ceil(MIB) + 16).max(64);
    let root_mib = root_len.div_ceil(MIB);
    // 1 MiB before the first partition (GPT), 1 MiB after the last (the backup GPT).
    let size = (1 + esp_mib + root_mib + scratch_mib + 1) * MIB;

    // The ESP as its own file first, then copied in.
    let esp_path = work.join("esp.img");
    let mut esp = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&esp_path)
        .map_err(io("esp.img"))?;
    esp.set_len(esp_mib * MIB).map_err(io("esp.img"))?;
    let volume_id = u32::from_le_bytes(
        guid(seed, "esp volume").as_bytes()[..4]
            .try_into()
            .unwrap_or_default(),
    );
    fatfs::format_volume(
        &mut esp,
        fatfs::FormatVolumeOptions::new()
            .volume_id(volume_id)
            .volume_label(*b"COFFER ESP "),
    )
    .map_err(io("cannot format the EFI system partition"))?;
    {
        let fs = // Without chrono (not enabled) fatfs dates every entry 1980-01-01: reproducible.
        fatfs::FileSystem::new(&mut esp, fatfs::FsOptions::new())
            .map_err(io("cannot open the EFI system partition"))?;
        let boot = fs
            .root_dir()
            .create_dir("EFI")
            .and_then(|d| d.create_dir("BOOT"))
            .map_err(io("cannot make \\EFI\\BOOT"))?;
        let mut f = boot
            .create_file("BOOTX64.EFI")
            .map_err(io("cannot make BOOTX64.EFI"))?;
        let mut src = File::open(uki).map_err(io("the UKI"))?;
        std::io::copy(&mut src, &mut f).map_err(io("cannot write BOOTX64.EFI"))?;
        f.flush().map_err(io("cannot write BOOTX64.EFI"))?;
        drop(f);
        drop(boot);
        fs.unmount()
            .map_err(io("cannot close the EFI system partition"))?;
    }

    let mut disk = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(out)
        .map_err(io(out.display().to_string()))?;
    disk.set_len(size).map_err(io(out.display().to_string()))?;
    let sectors = size / SECTOR;
    gpt::mbr::ProtectiveMBR::with_lb_size(u32::try_from(sectors - 1).unwrap_or(u32::MAX))
        .overwrite_lba0(&mut disk)
        .map_err(|e| DiskError::Invalid(format!("protective MBR: {e}")))?;
    let gpt_err = |e: gpt::GptError| DiskError::Invalid(format!("GPT: {e}"));
    let mut table = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
        .create_from_device(disk, Some(guid(seed, "disk")))
        .map_err(gpt_err)?;
    let mut starts = Vec::new();
    for (name, mib, kind) in [
        ("EFI System", esp_mib, gpt::partition_types::EFI),
        (ROOT_PARTITION, root_mib, gpt::partition_types::LINUX_FS),
        (
            SCRATCH_PARTITION,
            scratch_mib,
            gpt::partition_types::LINUX_FS,
        ),
    ] {
        let id = table
            .add_partition(name, mib * MIB, kind, 0, Some(MIB / SECTOR))
            .map_err(gpt_err)?;
        starts.push(id);
    }
    let mut parts = table.partitions().clone();
    for (i, id) in starts.iter().enumerate() {
        if let Some(p) = parts.get_mut(id) {
            p.part_guid = guid(seed, &format!("partition {i}"));
        }
    }
    table.update_partitions(parts).map_err(gpt_err)?;
    let offsets: Vec<u64> = starts
        .iter()
        .map(|id| table.partitions()[id].first_lba * SECTOR)
        .collect();
    let mut disk = table.write().map_err(gpt_err)?;
    for (offset, src) in [(offsets[0], esp_path.as_path()), (offsets[1], root_img)] {
        disk.seek(SeekFrom::Start(offset))
            .map_err(io(out.display().to_string()))?;
        let mut f = File::open(src).map_err(io(src.display().to_string()))?;
        std::io::copy(&mut f, &mut disk).map_err(io(out.display().to_string()))?;
    }
    disk.sync_all().map_err(io(out.display().to_string()))?;
    drop(esp);
    let _ = std::fs::remove_file(&esp_path);
    Ok(())
}

/// The 512-byte footer that makes a raw disk of `size` bytes (a whole number of MiB) a fixed
/// VHD (Microsoft's Virtual Hard Disk Image Format Specification, footer of a fixed disk).
/// `id` is its unique id; the time stamp is 0 (2000-01-01) for reproducibility.
pub fn vhd_footer(size: u64, id: [u8; 16]) -> [u8; 512] {
    let mut f = [0u8; 512];
    f[0..8].copy_from_slice(b"conectix");
    f[8..12].copy_from_slice(&2u32.to_be_bytes()); // features: reserved bit set
    f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes()); // format version 1.0
    f[16..24].copy_from_slice(&u64::MAX.to_be_bytes()); // data offset: none (fixed)
                                                        // f[24..28]: time stamp, 0.
    f[28..32].copy_from_slice(b"cofr"); // creator application
    f[32..36].copy_from_slice(&0x0001_0000u32.to_be_bytes()); // creator version
    f[36..40].copy_from_slice(b"Wi2k"); // creator host OS, as Azure expects
    f[40..48].copy_from_slice(&size.to_be_bytes()); // original size
    f[48..56].copy_from_slice(&size.to_be_bytes()); // current size
    let (c, h, s) = chs(size / SECTOR);
    f[56..58].copy_from_slice(&c.to_be_bytes());
    f[58] = h;
    f[59] = s;
    f[60..64].copy_from_slice(&2u32.to_be_bytes()); // disk type: fixed
    f[68..84].copy_from_slice(&id);
    let sum = f.iter().fold(0u32, |a, b| a.wrapping_add(u32::from(*b)));
    f[64..68].copy_from_slice(&(!sum).to_be_bytes());
    f
}

/// The specification's CHS geometry for `sectors` (its appendix algorithm).
fn chs(sectors: u64) -> (u16, u8, u8) {
    let total = sectors.min(65535 * 16 * 255);
    let (spt, heads, cth);
    if total >= 65535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cth = total / spt;
    } else {
        let mut s = 17;
        let mut c = total / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        spt = s;
        heads = h;
        cth = c;
    }
    ((cth / heads) as u16, heads as u8, spt as u8)
}

/// Writes `raw` in `format` to `out` (raw: copied; qcow2: `qemu-img convert`; VHD: the raw
/// bytes followed by a fixed-VHD footer whose id derives from `seed`).
pub fn convert(raw: &Path, format: DiskFormat, seed: &[u8], out: &Path) -> Result<(), DiskError> {
    match format {
        DiskFormat::Raw => {
            std::fs::copy(raw, out).map_err(io(out.display().to_string()))?;
            Ok(())
        }
        DiskFormat::Qcow2 => run(Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(raw)
            .arg(out)),
        DiskFormat::Vhd => {
            let size = std::fs::metadata(raw).map_err(io("the raw disk"))?.len();
            if size % MIB != 0 {
                return Err(DiskError::Invalid(format!(
                    "a VHD for Azure must be a whole number of MiB, not {size} bytes"
                )));
            }
            std::fs::copy(raw, out).map_err(io(out.display().to_string()))?;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(out)
                .map_err(io(out.display().to_string()))?;
            f.write_all(&vhd_footer(size, *guid(seed, "vhd").as_bytes()))
                .map_err(io(out.display().to_string()))?;
            f.sync_all().map_err(io(out.display().to_string()))
        }
    }
}

/// Reads the partition named `name` of a raw GPT disk: its byte offset and length.
pub fn partition(disk: &Path, name: &str) -> Result<(u64, u64), DiskError> {
    let f = File::open(disk).map_err(io(disk.display().to_string()))?;
    let table = gpt::GptConfig::new()
        .writable(false)
        .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
        .open_from_device(f)
        .map_err(|e| DiskError::Invalid(format!("{}: GPT: {e}", disk.display())))?;
    table
        .partitions()
        .values()
        .find(|p| p.name == name)
        .map(|p| {
            (
                p.first_lba * SECTOR,
                (p.last_lba + 1 - p.first_lba) * SECTOR,
            )
        })
        .ok_or_else(|| DiskError::Invalid(format!("{}: no partition {name}", disk.display())))
}

/// Reads `len` bytes at `offset` of `path`.
pub fn read_at(path: &Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut b = vec![0u8; len];
    f.read_exact(&mut b)?;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vhd_footer_is_the_specifications() {
        let f = vhd_footer(64 * MIB, [7; 16]);
        assert_eq!(&f[0..8], b"conectix");
        assert_eq!(u64::from_be_bytes(f[48..56].try_into().unwrap()), 64 * MIB);
        assert_eq!(
            u32::from_be_bytes(f[60..64].try_into().unwrap()),
            2,
            "fixed"
        );
        // The checksum: the one's complement of the sum of every byte but its own.
        let mut g = f;
        g[64..68].fill(0);
        let sum = g.iter().fold(0u32, |a, b| a.wrapping_add(u32::from(*b)));
        assert_eq!(u32::from_be_bytes(f[64..68].try_into().unwrap()), !sum);
        // The specification's geometry for 64 MiB (131072 sectors): 17 sectors per track,
        // 8 heads -> 963 cylinders.
        assert_eq!(chs(131072), (963, 8, 17));
    }

    #[test]
    fn the_pe_checksum_skips_its_field_folds_carries_and_adds_the_length() {
        // Little-endian words 0x0201, 0x0403 (0x0605 is the skipped field), plus the length 6.
        assert_eq!(pe_checksum(&[1, 2, 3, 4, 5, 6], 4), 0x0201 + 0x0403 + 6);
        // 0xffff + 0x0002 carries out and folds back: 0x0002, plus the length 4.
        assert_eq!(pe_checksum(&[0xff, 0xff, 2, 0], 100), 0x0002 + 4);
    }

    #[test]
    fn bad_formats_are_named() {
        assert_eq!(DiskFormat::parse("qcow2").unwrap(), DiskFormat::Qcow2);
        assert!(DiskFormat::parse("vmdk")
            .unwrap_err()
            .to_string()
            .contains("\"vmdk\": use raw, qcow2 or vhd"));
    }
}
