//! IBM Secure Execution (SE) images: an s390x kernel, initrd and command line sealed for the
//! Ultravisor of chosen IBM Z / LinuxONE hosts, in IBM's image format (what `pvimg create`
//! writes; see `docs/podvm.md`).
//!
//! An image is laid out as guest memory from address 0:
//!
//! | address | what |
//! |---|---|
//! | 0 | the IPL PSW (short format), entering stage3a at 0x11000 |
//! | 0xc000 | the image metadata (`SeImgLnx`: where the SE header and the IPL block are) |
//! | 0x10000 | stage3a, Coffer's non-secure loader ([`STAGE3A_SOURCE`]) |
//! | next pages | the kernel, initrd, command line and stage3b ([`STAGE3B_SOURCE`]), each encrypted |
//! | next pages | the SE header, then the IPL parameter block listing the encrypted components |
//!
//! **Components.** Each is padded to 4 KiB pages and encrypted with AES-256-XTS under the
//! image's random XTS key. A page's tweak is the component's 8-byte tweak prefix (its kind,
//! then 6 random bytes) followed by the page's offset in the component (big-endian). The
//! Ultravisor checks, at unpack, three SHA-512 digests: of the encrypted pages (page list),
//! of their addresses (u64, big-endian; address list) and of their tweaks (tweak list), and
//! the page count.
//!
//! **The SE header** (version 0x100, big-endian): magic `IBMSecEx`, sizes, a random GCM IV, the
//! key-slot count, the encrypted area's size, the page count, the plaintext control flags, the
//! customer's ephemeral P-521 public key, the three digests and one 80-byte key slot per host
//! (the host-key hash, and the header protection key wrapped under the ECDH secret of the
//! customer key and that host's key). Then, encrypted under the protection key with
//! AES-256-GCM, whose tag ends the header and authenticates all of it: the customer
//! communication key, the XTS key, the PSW that starts stage3b, and the secret control flags.
//! The attestation measurement covers the digests and that tag ([`Sealed::tags`]: the KBS's
//! `se_image_tags` reference value).
//!
//! **Loaders.** stage3a hands the IPL block to the Ultravisor (DIAG 308 subcodes 8 and 10);
//! stage3b runs in the secure guest, moves the kernel and command line into place and starts
//! Linux. Both are Coffer's own assembly (`src/loaders/`), assembled here with Debian's s390x binutils
//! ([`Loaders::assemble`]). What stops a loader is a disabled-wait PSW whose address names
//! the failure (listed in each source).
//!
//! The keys (XTS, header protection, customer communication and the ephemeral private key)
//! exist only while an image is sealed, and are wiped after.

#![deny(missing_docs)]

use std::process::Command;

use openssl::{
    cipher::Cipher,
    cipher_ctx::CipherCtx,
    hash::{Hasher, MessageDigest},
    nid::Nid,
    pkey::{PKey, Public},
};
use s390_pv::request::{
    encrypt_aead, gen_ec_key, random_array, Confidential, EcPubKeyCoord, Encrypt, Keyslot,
    SeImgMetaData, SymKey, SymKeyType,
};
use zeroize::Zeroizing;

/// stage3a's source: s390x assembly (GNU as).
pub const STAGE3A_SOURCE: &str = include_str!("loaders/stage3a.S");
/// stage3b's source: s390x assembly (GNU as).
pub const STAGE3B_SOURCE: &str = include_str!("loaders/stage3b.S");

/// Where stage3a is loaded (and a stage-3 IPL loader enters).
pub const STAGE3A_ADDRESS: u64 = 0x10000;
/// Where the IPL PSW enters stage3a.
pub const STAGE3A_ENTRY: u64 = 0x11000;
/// Where Linux's s390x kernel runs.
pub const KERNEL_ENTRY: u64 = 0x10000;
/// The page size, the components' alignment and padding.
pub const PAGE: u64 = 4096;
/// The header version this module writes.
pub const HEADER_VERSION: u32 = 0x100;
/// The SE header's magic.
pub const HEADER_MAGIC: &[u8; 8] = b"IBMSecEx";
/// The plaintext control flags `pvimg create` sets by default, and so does Coffer: PCKMO for
/// DEA/TDEA, AES and ECC keys allowed (bits 56 to 58, MSB 0); dumping not allowed; components
/// encrypted.
pub const DEFAULT_PCF: u64 = 0xe0;
/// The PSW mask of the loaders and the kernel: 64-bit addressing (EA and BA).
pub const PSW_MASK_64: u64 = 0x0000_0001_8000_0000;

/// The fixed part of the header: magic to the tweak-list digest.
const HEADER_HEAD: usize = 416;
/// The encrypted area: CCK, XTS key, PSW, secret control flags, item count, reserved.
const ENCRYPTED_AREA: usize = 128;
/// A key slot: host-key hash, wrapped key, tag.
const KEY_SLOT: usize = 80;
/// The GCM tag.
const TAG: usize = 16;
/// The largest header the Ultravisor takes (two pages).
pub const MAX_HEADER: usize = 2 * PAGE as usize;
/// Where the kernel declares the longest command line it takes (u64, big-endian; 0 = 896).
const KERNEL_MAX_CMDLINE_AT: usize = 0x10430;
/// The command-line limit of kernels that declare none.
const LEGACY_MAX_CMDLINE: u64 = 896;
/// Where an s390x kernel image carries `S390EP`.
const S390EP_AT: usize = 0x10008;
/// Where the image metadata sits (stage3a's BSS, unused by stage3a).
const METADATA_AT: u64 = 0xc000;
/// The short-PSW bit that marks a 64-bit PSW folded into 8 bytes.
const SHORT_PSW_BIT: u64 = 0x0008_0000_0000_0000;
/// IPL block: its header's size, the PV block's fixed part and a component entry.
const IPIB_HEAD: usize = 8;
const IPIB_PV_FIXED: usize = 128;
const IPIB_COMPONENT: usize = 24;
/// The arguments at the end of stage3a and stage3b.
const STAGE3A_ARGS: usize = 24;
const STAGE3B_ARGS: usize = 64;

/// Why an image could not be sealed.
#[derive(Debug, thiserror::Error)]
pub enum SeImageError {
    /// An input is not what an SE image can be made of.
    #[error("{0}")]
    Input(String),
    /// A loader could not be assembled.
    #[error("assembling the SE loaders: {0}")]
    Loader(String),
    /// The cryptography failed (OpenSSL).
    #[error("sealing the SE image: {0}")]
    Crypto(String),
}

fn crypto(e: impl std::fmt::Display) -> SeImageError {
    SeImageError::Crypto(e.to_string())
}

/// A component's kind; its number starts the component's tweak prefix (as in `pvimg`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The Linux kernel image.
    Kernel = 40,
    /// The initial ramdisk.
    Initrd = 50,
    /// The kernel command line (NUL-terminated).
    Cmdline = 60,
    /// The secure-mode loader.
    Stage3b = 70,
}

/// The two loaders, assembled.
#[derive(Clone, Debug)]
pub struct Loaders {
    stage3a: Vec<u8>,
    stage3b: Vec<u8>,
}

impl Loaders {
    /// Assembles [`STAGE3A_SOURCE`] and [`STAGE3B_SOURCE`] with `s390x-linux-gnu-as` and
    /// `s390x-linux-gnu-objcopy` (Debian's `binutils-s390x-linux-gnu`), in a temporary
    /// directory.
    pub fn assemble() -> Result<Self, SeImageError> {
        let dir = tempfile::tempdir()
            .map_err(|e| SeImageError::Loader(format!("cannot create a work directory: {e}")))?;
        let work = dir.path();
        let one = |name: &str, source: &str| -> Result<Vec<u8>, SeImageError> {
            let src = work.join(format!("{name}.S"));
            let obj = work.join(format!("{name}.o"));
            let bin = work.join(format!("{name}.bin"));
            std::fs::write(&src, source)
                .map_err(|e| SeImageError::Loader(format!("{}: {e}", src.display())))?;
            for (tool, args) in [
                (
                    "s390x-linux-gnu-as",
                    vec!["-m64".into(), "-o".into(), obj.clone(), src.clone()],
                ),
                (
                    "s390x-linux-gnu-objcopy",
                    vec![
                        "-O".into(),
                        "binary".into(),
                        "-j".into(),
                        ".text".into(),
                        obj.clone(),
                        bin.clone(),
                    ],
                ),
            ] {
                let args: Vec<std::ffi::OsString> = args
                    .into_iter()
                    .map(|a: std::path::PathBuf| a.into_os_string())
                    .collect();
                let out = Command::new(tool).args(&args).output().map_err(|e| {
                    SeImageError::Loader(format!(
                        "cannot run {tool}: {e} (apt-get install binutils-s390x-linux-gnu)"
                    ))
                })?;
                if !out.status.success() {
                    return Err(SeImageError::Loader(format!(
                        "{tool} failed on {name}: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
            }
            std::fs::read(&bin).map_err(|e| SeImageError::Loader(format!("{name}: {e}")))
        };
        Self::from_bytes(
            one("stage3a", STAGE3A_SOURCE)?,
            one("stage3b", STAGE3B_SOURCE)?,
        )
    }

    /// Loaders from their flat binaries, checked for the room their arguments take.
    pub fn from_bytes(stage3a: Vec<u8>, stage3b: Vec<u8>) -> Result<Self, SeImageError> {
        if stage3a.len() <= (STAGE3A_ENTRY - STAGE3A_ADDRESS) as usize + STAGE3A_ARGS
            || !stage3a.len().is_multiple_of(8)
            || stage3a.len() > 0x3000
        {
            return Err(SeImageError::Loader(format!(
                "stage3a is {} bytes: it must pass its entry at +0x1000, end on its 24 bytes of \
                 arguments (8-byte aligned) and stay below 0x13000",
                stage3a.len()
            )));
        }
        if stage3b.len() <= STAGE3B_ARGS || !stage3b.len().is_multiple_of(8) {
            return Err(SeImageError::Loader(format!(
                "stage3b is {} bytes: it must end on its 64 bytes of arguments (8-byte aligned)",
                stage3b.len()
            )));
        }
        Ok(Self { stage3a, stage3b })
    }
}

/// What to seal.
pub struct Inputs<'a> {
    /// The s390x kernel image (`vmlinuz`, not the ELF `vmlinux`).
    pub kernel: &'a [u8],
    /// The initrd, if any.
    pub initrd: Option<&'a [u8]>,
    /// The kernel command line.
    pub cmdline: &'a str,
    /// The hosts' public keys (from verified host-key documents): one key slot each.
    pub host_keys: &'a [PKey<Public>],
    /// The plaintext control flags ([`DEFAULT_PCF`]).
    pub pcf: u64,
}

/// A component as placed in the image.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Placed {
    /// What it is.
    pub kind: Kind,
    /// Its guest address.
    pub addr: u64,
    /// Its encrypted size (whole pages).
    pub size: u64,
    /// Its size before padding.
    pub original_size: u64,
    /// Its 8-byte tweak prefix.
    pub tweak_prefix: u64,
}

/// A sealed image.
pub struct Sealed {
    /// The image file's bytes.
    pub image: Vec<u8>,
    /// The reference values: page-list, address-list and tweak-list digests and the header's
    /// tag (208 bytes), as `coffer measure --tee se` reads them back.
    pub tags: Vec<u8>,
    /// The encrypted components, in image order.
    pub components: Vec<Placed>,
    /// The SE header's address and size.
    pub header: (u64, u64),
    /// The IPL parameter block's address and size.
    pub ipib: (u64, u64),
    /// The PSW the Ultravisor starts the guest with (stage3b's start).
    pub psw: (u64, u64),
    /// The number of encrypted pages.
    pub pages: u64,
    /// The host-key hashes that have a key slot.
    pub host_key_hashes: Vec<[u8; 32]>,
}

/// A Debian s390x kernel in the cache.
#[derive(Clone, Debug)]
pub struct DebianKernel {
    /// The kernel image (`vmlinuz`).
    pub vmlinuz: std::path::PathBuf,
    /// Its release (`6.12.…-s390x`).
    pub release: String,
    /// The package file it came from.
    pub deb: std::path::PathBuf,
}

/// The s390x kernel an s390x pod VM is built with (bookworm-backports' `linux-image-s390x`:
/// the SCLP console, the Ultravisor device and gzip and zstd initramfs support), its package
/// fetched into `cache/s390x/` as `coffer podvm build --arch s390x` fetches it
/// ([`coffer_podvm::build::s390x_kernel`]), and its `vmlinuz` extracted beside it once.
pub fn debian_kernel(cache: &std::path::Path) -> Result<DebianKernel, SeImageError> {
    let fail =
        |what: &str, e: String| SeImageError::Input(format!("the s390x kernel: {what}: {e}"));
    let (name, deb) =
        coffer_podvm::build::s390x_kernel(cache).map_err(|e| fail("its package", e.to_string()))?;
    let release = name.trim_start_matches("linux-image-").to_string();
    let dir = cache.join("s390x");
    let vmlinuz = dir.join(format!("vmlinuz-{release}"));
    if !vmlinuz.exists() {
        let x = tempfile::tempdir_in(&dir).map_err(|e| fail("a work directory", e.to_string()))?;
        let out = Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(x.path())
            .output()
            .map_err(|e| fail("dpkg-deb", e.to_string()))?;
        if !out.status.success() {
            return Err(fail(
                &format!("dpkg-deb -x {}", deb.display()),
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
        // Extracted beside it (same file system): moved into place whole.
        let from = x.path().join(format!("boot/vmlinuz-{release}"));
        std::fs::rename(&from, &vmlinuz).map_err(|e| {
            fail(
                &format!("{} in {}", from.display(), deb.display()),
                e.to_string(),
            )
        })?;
    }
    Ok(DebianKernel {
        vmlinuz,
        release,
        deb,
    })
}

/// The build step that seals an s390x pod VM ([`coffer_podvm::build::Finish`]): the staged
/// kernel, initrd and command line become [`coffer_podvm::SE_IMAGE`] for `host_keys` (from
/// host-key documents the caller verified), and the manifest gains its `se` entry (the image's
/// SHA-256, `se_image_tags`, the host-key hashes and the start PSW).
pub fn podvm_finish(host_keys: Vec<PKey<Public>>) -> coffer_podvm::build::Finish {
    coffer_podvm::build::Finish(std::sync::Arc::new(move |stage, manifest| {
        if manifest["arch"] != "s390x" {
            return Err(
                "IBM Secure Execution images are for s390x: build with --arch s390x".into(),
            );
        }
        let cmdline = manifest["cmdline"]
            .as_str()
            .ok_or("the manifest has no command line")?
            .to_string();
        let read = |f: &str| std::fs::read(stage.join(f)).map_err(|e| format!("{f}: {e}"));
        let kernel = read("vmlinuz")?;
        let initrd = read("initrd.img")?;
        let loaders = Loaders::assemble().map_err(|e| e.to_string())?;
        let sealed = seal(
            &Inputs {
                kernel: &kernel,
                initrd: Some(&initrd),
                cmdline: &cmdline,
                host_keys: &host_keys,
                pcf: DEFAULT_PCF,
            },
            &loaders,
        )
        .map_err(|e| format!("the SE image: {e}"))?;
        std::fs::write(stage.join(coffer_podvm::SE_IMAGE), &sealed.image)
            .map_err(|e| format!("cannot write the SE image: {e}"))?;
        manifest["se"] = serde_json::json!({
            "image": coffer_podvm::SE_IMAGE,
            "sha256": hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&sealed.image)),
            "se_image_tags": [hex::encode(&sealed.tags)],
            "host_key_hashes": sealed.host_key_hashes.iter().map(hex::encode).collect::<Vec<_>>(),
            "psw": format!("{:#x}", sealed.psw.1),
        });
        Ok(())
    }))
}

fn round_up(v: u64) -> u64 {
    v.div_ceil(PAGE) * PAGE
}

/// The digests and XTS state shared by the components.
struct Components {
    xts: Zeroizing<[u8; 64]>,
    ctx: CipherCtx,
    pld: Hasher,
    ald: Hasher,
    tld: Hasher,
    pages: u64,
    placed: Vec<Placed>,
}

impl Components {
    fn new() -> Result<Self, SeImageError> {
        let mut xts = Zeroizing::new([0u8; 64]);
        // The two XTS halves must differ (OpenSSL refuses equal halves).
        loop {
            openssl::rand::rand_bytes(&mut xts[..]).map_err(crypto)?;
            if xts[..32] != xts[32..] {
                break;
            }
        }
        let mut ctx = CipherCtx::new().map_err(crypto)?;
        ctx.encrypt_init(Some(Cipher::aes_256_xts()), Some(&xts[..]), None)
            .map_err(crypto)?;
        let sha512 = || Hasher::new(MessageDigest::sha512()).map_err(crypto);
        Ok(Self {
            xts,
            ctx,
            pld: sha512()?,
            ald: sha512()?,
            tld: sha512()?,
            pages: 0,
            placed: Vec::new(),
        })
    }

    /// Encrypts `data` as `kind` at `addr` into `image` (which grows to hold it).
    fn add(
        &mut self,
        image: &mut Vec<u8>,
        kind: Kind,
        addr: u64,
        data: &[u8],
    ) -> Result<(), SeImageError> {
        let rand: [u8; 6] = random_array().map_err(crypto)?;
        let mut prefix = [0u8; 8];
        prefix[..2].copy_from_slice(&(kind as u16).to_be_bytes());
        prefix[2..].copy_from_slice(&rand);
        let size = round_up(data.len().max(1) as u64);
        let start = addr as usize;
        image.resize(start + size as usize, 0);
        let mut page = [0u8; PAGE as usize];
        let mut out = [0u8; PAGE as usize + 16];
        for (i, chunk) in data.chunks(PAGE as usize).enumerate() {
            page.fill(0);
            page[..chunk.len()].copy_from_slice(chunk);
            self.page(image, &prefix, addr, i as u64, &page, &mut out)?;
        }
        if data.is_empty() {
            page.fill(0);
            self.page(image, &prefix, addr, 0, &page, &mut out)?;
        }
        self.placed.push(Placed {
            kind,
            addr,
            size,
            original_size: data.len() as u64,
            tweak_prefix: u64::from_be_bytes(prefix),
        });
        Ok(())
    }

    fn page(
        &mut self,
        image: &mut [u8],
        prefix: &[u8; 8],
        addr: u64,
        index: u64,
        page: &[u8; PAGE as usize],
        out: &mut [u8],
    ) -> Result<(), SeImageError> {
        let offset = index * PAGE;
        let mut tweak = [0u8; 16];
        tweak[..8].copy_from_slice(prefix);
        tweak[8..].copy_from_slice(&offset.to_be_bytes());
        self.ctx
            .encrypt_init(None, None, Some(&tweak))
            .map_err(crypto)?;
        let n = self.ctx.cipher_update(page, Some(out)).map_err(crypto)?;
        let n = n + self.ctx.cipher_final(&mut out[n..]).map_err(crypto)?;
        if n != PAGE as usize {
            return Err(SeImageError::Crypto(format!(
                "AES-XTS gave {n} bytes for a page"
            )));
        }
        let at = (addr + offset) as usize;
        image[at..at + PAGE as usize].copy_from_slice(&out[..PAGE as usize]);
        self.pld.update(&out[..PAGE as usize]).map_err(crypto)?;
        self.ald
            .update(&(addr + offset).to_be_bytes())
            .map_err(crypto)?;
        self.tld.update(&tweak).map_err(crypto)?;
        self.pages += 1;
        Ok(())
    }
}

/// Checks the kernel and returns the longest command line (with its NUL) it takes.
fn check_kernel(kernel: &[u8]) -> Result<u64, SeImageError> {
    if kernel.starts_with(b"\x7fELF") {
        return Err(SeImageError::Input(
            "the kernel is an ELF file (vmlinux): give the s390x kernel image (vmlinuz)".into(),
        ));
    }
    if kernel.get(S390EP_AT..S390EP_AT + 6) != Some(b"S390EP") {
        return Err(SeImageError::Input(
            "the kernel is not an s390x Linux kernel image (no S390EP at 0x10008)".into(),
        ));
    }
    let max = kernel
        .get(KERNEL_MAX_CMDLINE_AT..KERNEL_MAX_CMDLINE_AT + 8)
        .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
        .unwrap_or(0);
    Ok(if max == 0 { LEGACY_MAX_CMDLINE } else { max })
}

/// Seals `inputs` into an SE image with `loaders`.
pub fn seal(inputs: &Inputs, loaders: &Loaders) -> Result<Sealed, SeImageError> {
    let max_cmdline = check_kernel(inputs.kernel)?;
    if inputs.cmdline.as_bytes().contains(&0) {
        return Err(SeImageError::Input(
            "the command line contains a NUL byte".into(),
        ));
    }
    let mut cmdline = inputs.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    if cmdline.len() as u64 > max_cmdline {
        return Err(SeImageError::Input(format!(
            "the command line is {} bytes with its NUL; this kernel takes at most {max_cmdline}",
            cmdline.len()
        )));
    }
    if inputs.host_keys.is_empty() {
        return Err(SeImageError::Input(
            "no host key: an SE image is sealed for at least one host-key document".into(),
        ));
    }
    let header_size = HEADER_HEAD + inputs.host_keys.len() * KEY_SLOT + ENCRYPTED_AREA + TAG;
    if header_size > MAX_HEADER {
        return Err(SeImageError::Input(format!(
            "{} host keys make a {header_size}-byte SE header; the Ultravisor takes at most \
             {MAX_HEADER} bytes ({} host keys)",
            inputs.host_keys.len(),
            (MAX_HEADER - HEADER_HEAD - ENCRYPTED_AREA - TAG) / KEY_SLOT
        )));
    }

    let mut image = Vec::new();
    let mut comps = Components::new()?;
    let mut next = round_up(STAGE3A_ADDRESS + loaders.stage3a.len() as u64);
    let mut add = |image: &mut Vec<u8>, kind, data: &[u8]| -> Result<u64, SeImageError> {
        let at = next;
        comps.add(image, kind, at, data)?;
        next = round_up(image.len() as u64);
        Ok(at)
    };
    let kernel_at = add(&mut image, Kind::Kernel, inputs.kernel)?;
    let initrd_at = inputs
        .initrd
        .map(|i| add(&mut image, Kind::Initrd, i))
        .transpose()?;
    let cmdline_at = add(&mut image, Kind::Cmdline, &cmdline)?;
    // stage3b's arguments: the components as unpacked, and the kernel's PSW.
    let mut stage3b = loaders.stage3b.clone();
    let args = stage3b.len() - STAGE3B_ARGS;
    let blobs = [
        (kernel_at, inputs.kernel.len() as u64),
        (cmdline_at, cmdline.len() as u64),
        (
            initrd_at.unwrap_or(0),
            inputs.initrd.map_or(0, |i| i.len() as u64),
        ),
        (PSW_MASK_64, KERNEL_ENTRY),
    ];
    for (i, (a, b)) in blobs.iter().enumerate() {
        stage3b[args + 16 * i..args + 16 * i + 8].copy_from_slice(&a.to_be_bytes());
        stage3b[args + 16 * i + 8..args + 16 * i + 16].copy_from_slice(&b.to_be_bytes());
    }
    let stage3b_at = add(&mut image, Kind::Stage3b, &stage3b)?;
    let psw = (PSW_MASK_64, stage3b_at);

    let header_at = next;
    let (header, tags, host_key_hashes) = header(inputs, &mut comps, psw)?;
    image.resize(header_at as usize, 0);
    image.extend_from_slice(&header);
    let ipib_at = round_up(image.len() as u64);
    let ipib = ipib(&comps.placed, header_at, header.len() as u64);
    image.resize(ipib_at as usize, 0);
    image.extend_from_slice(&ipib);

    // stage3a, with its arguments relative to their own address.
    let mut stage3a = loaders.stage3a.clone();
    let args_at = STAGE3A_ADDRESS + (stage3a.len() - STAGE3A_ARGS) as u64;
    let a = stage3a.len() - STAGE3A_ARGS;
    stage3a[a..a + 8].copy_from_slice(&(header_at - args_at).to_be_bytes());
    stage3a[a + 8..a + 16].copy_from_slice(&(header.len() as u64).to_be_bytes());
    stage3a[a + 16..a + 24].copy_from_slice(&(ipib_at - args_at).to_be_bytes());
    let s = STAGE3A_ADDRESS as usize;
    image[s..s + stage3a.len()].copy_from_slice(&stage3a);
    // The IPL PSW, and the metadata that tells tools where the header and the IPL block are.
    let short_psw = PSW_MASK_64 | SHORT_PSW_BIT | STAGE3A_ENTRY;
    image[..8].copy_from_slice(&short_psw.to_be_bytes());
    let meta = SeImgMetaData::new_v1(header_at, ipib_at);
    let m = METADATA_AT as usize;
    image[m..m + meta.as_bytes().len()].copy_from_slice(meta.as_bytes());

    Ok(Sealed {
        image,
        tags,
        header: (header_at, header.len() as u64),
        ipib: (ipib_at, ipib.len() as u64),
        psw,
        pages: comps.pages,
        components: comps.placed.clone(),
        host_key_hashes,
    })
}

/// The SE header, its tags and the host-key hashes it has slots for.
type SealedHeader = (Vec<u8>, Vec<u8>, Vec<[u8; 32]>);

/// Builds the SE header for `comps` (finished here) and `psw`.
fn header(
    inputs: &Inputs,
    comps: &mut Components,
    psw: (u64, u64),
) -> Result<SealedHeader, SeImageError> {
    let pld = comps.pld.finish().map_err(crypto)?;
    let ald = comps.ald.finish().map_err(crypto)?;
    let tld = comps.tld.finish().map_err(crypto)?;
    let customer = gen_ec_key(Nid::SECP521R1).map_err(crypto)?;
    let coords: EcPubKeyCoord = customer.as_ref().try_into().map_err(crypto)?;
    let protection: Zeroizing<[u8; 32]> = Zeroizing::new(random_array().map_err(crypto)?);
    let iv: [u8; 12] = random_array().map_err(crypto)?;
    let mut slots = Vec::new();
    let mut hashes = Vec::new();
    for key in inputs.host_keys {
        let slot = Keyslot::new(key.clone())
            .encrypt(&protection[..], &customer)
            .map_err(crypto)?;
        hashes.push(slot[..32].try_into().expect("a 32-byte hash"));
        slots.extend_from_slice(&slot);
    }
    let size = HEADER_HEAD + slots.len() + ENCRYPTED_AREA + TAG;
    let mut aad = Vec::with_capacity(HEADER_HEAD + slots.len());
    aad.extend_from_slice(HEADER_MAGIC);
    aad.extend_from_slice(&HEADER_VERSION.to_be_bytes());
    aad.extend_from_slice(&(size as u32).to_be_bytes());
    aad.extend_from_slice(&iv);
    aad.extend_from_slice(&0u32.to_be_bytes());
    aad.extend_from_slice(&(inputs.host_keys.len() as u64).to_be_bytes());
    aad.extend_from_slice(&(ENCRYPTED_AREA as u64).to_be_bytes());
    aad.extend_from_slice(&comps.pages.to_be_bytes());
    aad.extend_from_slice(&inputs.pcf.to_be_bytes());
    aad.extend_from_slice(coords.as_ref());
    aad.extend_from_slice(&pld);
    aad.extend_from_slice(&ald);
    aad.extend_from_slice(&tld);
    debug_assert_eq!(aad.len(), HEADER_HEAD);
    aad.extend_from_slice(&slots);
    let mut secret = Zeroizing::new(Vec::with_capacity(ENCRYPTED_AREA));
    let cck: Zeroizing<[u8; 32]> = Zeroizing::new(random_array().map_err(crypto)?);
    secret.extend_from_slice(&cck[..]);
    secret.extend_from_slice(&comps.xts[..]);
    secret.extend_from_slice(&psw.0.to_be_bytes());
    secret.extend_from_slice(&psw.1.to_be_bytes());
    secret.extend_from_slice(&0u64.to_be_bytes()); // secret control flags
    secret.extend_from_slice(&0u32.to_be_bytes()); // optional items
    secret.extend_from_slice(&0u32.to_be_bytes()); // reserved
    debug_assert_eq!(secret.len(), ENCRYPTED_AREA);
    let key = SymKey::try_from_data(
        SymKeyType::Aes256Gcm,
        Confidential::new(protection.to_vec()),
    )
    .map_err(crypto)?;
    let header = encrypt_aead(&key, &iv, &aad, &secret)
        .map_err(crypto)?
        .into_buf();
    debug_assert_eq!(header.len(), size);
    let mut tags = Vec::with_capacity(3 * 64 + TAG);
    tags.extend_from_slice(&pld);
    tags.extend_from_slice(&ald);
    tags.extend_from_slice(&tld);
    tags.extend_from_slice(&header[size - TAG..]);
    Ok((header, tags, hashes))
}

/// The IPL parameter block for a secure IPL (type 5): the header's place and each encrypted
/// component's tweak prefix, address and size.
fn ipib(placed: &[Placed], header_at: u64, header_len: u64) -> Vec<u8> {
    let pv_len = IPIB_PV_FIXED + placed.len() * IPIB_COMPONENT;
    let mut b = Vec::with_capacity(IPIB_HEAD + pv_len);
    b.extend_from_slice(&((IPIB_HEAD + pv_len) as u32).to_be_bytes());
    b.extend_from_slice(&[0, 0, 0, 1]); // flags, reserved, version 1
    b.extend_from_slice(&(pv_len as u32).to_be_bytes());
    b.push(5); // parameter block type: PV
    b.extend_from_slice(&[0; 3 + 8 + 84 + 3]); // reserved, load parameter, reserved
    b.push(1); // PV block version
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(&(placed.len() as u32).to_be_bytes());
    b.extend_from_slice(&header_at.to_be_bytes());
    b.extend_from_slice(&header_len.to_be_bytes());
    for p in placed {
        b.extend_from_slice(&p.tweak_prefix.to_be_bytes());
        b.extend_from_slice(&p.addr.to_be_bytes());
        b.extend_from_slice(&p.size.to_be_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loaders shaped like the real ones (content irrelevant to the layout checks).
    fn loaders() -> Loaders {
        Loaders::from_bytes(vec![0u8; 0x1110], vec![0u8; 0x130]).unwrap()
    }

    fn kernel(len: usize) -> Vec<u8> {
        let mut k = vec![0x11u8; len];
        k[S390EP_AT..S390EP_AT + 6].copy_from_slice(b"S390EP");
        k[KERNEL_MAX_CMDLINE_AT..KERNEL_MAX_CMDLINE_AT + 8].copy_from_slice(&0u64.to_be_bytes());
        k
    }

    fn host() -> PKey<Public> {
        let k = gen_ec_key(Nid::SECP521R1).unwrap();
        PKey::public_key_from_pem(&k.public_key_to_pem().unwrap()).unwrap()
    }

    #[test]
    fn the_ipl_block_has_the_layout_of_the_kernels_uapi() {
        let placed = vec![Placed {
            kind: Kind::Kernel,
            addr: 0x12000,
            size: 0x3000,
            original_size: 0x2f00,
            tweak_prefix: 0x0028_0102_0304_0506,
        }];
        let b = ipib(&placed, 0x40000, 720);
        assert_eq!(b.len(), 8 + 128 + 24);
        assert_eq!(u32::from_be_bytes(b[0..4].try_into().unwrap()), 160);
        assert_eq!(b[7], 1);
        assert_eq!(u32::from_be_bytes(b[8..12].try_into().unwrap()), 152);
        assert_eq!(b[12], 5);
        assert_eq!(b[8 + 103], 1);
        assert_eq!(u32::from_be_bytes(b[116..120].try_into().unwrap()), 1);
        // stage3a writes the header's address and size at 120 and 128.
        assert_eq!(u64::from_be_bytes(b[120..128].try_into().unwrap()), 0x40000);
        assert_eq!(u64::from_be_bytes(b[128..136].try_into().unwrap()), 720);
        assert_eq!(
            u64::from_be_bytes(b[136..144].try_into().unwrap()),
            0x0028_0102_0304_0506
        );
        assert_eq!(u64::from_be_bytes(b[144..152].try_into().unwrap()), 0x12000);
        assert_eq!(u64::from_be_bytes(b[152..160].try_into().unwrap()), 0x3000);
    }

    #[test]
    fn components_are_placed_on_pages_in_order_after_stage3a() {
        let k = kernel(0x20001);
        let initrd = vec![7u8; 5000];
        let keys = [host(), host()];
        let s = seal(
            &Inputs {
                kernel: &k,
                initrd: Some(&initrd),
                cmdline: "console=ttysclp0",
                host_keys: &keys,
                pcf: DEFAULT_PCF,
            },
            &loaders(),
        )
        .unwrap();
        let kinds: Vec<Kind> = s.components.iter().map(|c| c.kind).collect();
        assert_eq!(
            kinds,
            [Kind::Kernel, Kind::Initrd, Kind::Cmdline, Kind::Stage3b]
        );
        assert_eq!(s.components[0].addr, 0x12000);
        assert_eq!(s.components[0].size, 0x21000);
        assert_eq!(s.components[1].addr, 0x33000);
        assert_eq!(s.components[1].size, 0x2000);
        assert_eq!(s.components[2].original_size, 17);
        assert_eq!(s.pages, 0x21 + 2 + 1 + 1);
        assert_eq!(s.psw, (PSW_MASK_64, s.components[3].addr));
        assert_eq!(s.header.1, (HEADER_HEAD + 2 * KEY_SLOT + 128 + 16) as u64);
        assert_eq!(s.header.0 % PAGE, 0);
        assert_eq!(s.ipib.0, round_up(s.header.0 + s.header.1));
        assert_eq!(s.image.len() as u64, s.ipib.0 + s.ipib.1);
        // The IPL PSW enters stage3a; the metadata names the header and the IPL block.
        assert_eq!(&s.image[..8], &0x0008_0001_8001_1000u64.to_be_bytes());
        assert_eq!(&s.image[0xc000..0xc008], b"SeImgLnx");
        // The header's public part, as IBM's parser reads it.
        let h = &s.image[s.header.0 as usize..];
        assert_eq!(&h[..8], b"IBMSecEx");
        assert_eq!(u32::from_be_bytes(h[8..12].try_into().unwrap()), 0x100);
        assert_eq!(
            u32::from_be_bytes(h[12..16].try_into().unwrap()) as u64,
            s.header.1
        );
        assert_eq!(u64::from_be_bytes(h[32..40].try_into().unwrap()), 2);
        assert_eq!(u64::from_be_bytes(h[40..48].try_into().unwrap()), 128);
        assert_eq!(u64::from_be_bytes(h[48..56].try_into().unwrap()), s.pages);
        assert_eq!(u64::from_be_bytes(h[56..64].try_into().unwrap()), 0xe0);
        assert_eq!(&h[224..224 + 64], &s.tags[..64]);
        // The plaintext appears nowhere in the encrypted components.
        let kernel_bytes = &s.image[0x12000..0x12000 + 0x21000];
        assert!(!kernel_bytes.windows(6).any(|w| w == b"S390EP"));
        let tags = coffer_verifier::se::ImageTags::from_se_image(&s.image).unwrap();
        assert_eq!(tags.to_hex(), hex::encode(&s.tags));
        assert_eq!(s.host_key_hashes.len(), 2);
        assert_eq!(
            s.host_key_hashes[0],
            coffer_verifier::se::host_key_hash(&keys[0]).unwrap()
        );
    }

    /// The Ultravisor stand-in (which unpacks images made by IBM's `pvimg`, see
    /// `coffer_verifier::se`) unpacks a sealed image for either host it was sealed for: every
    /// component comes back as it went in, stage3b carries their places and the kernel's PSW,
    /// and the guest starts at stage3b. A changed byte anywhere it checks is refused.
    #[test]
    fn the_ultravisor_unpacks_what_was_sealed_for_its_host_and_nothing_altered() {
        use coffer_verifier::se::testing::Host;
        let (a, b, stranger) = (Host::new("a"), Host::new("b"), Host::new("c"));
        let k = kernel(0x18123);
        let initrd: Vec<u8> = (0..9000u32).map(|i| (i % 251) as u8).collect();
        let l = Loaders::from_bytes(vec![0u8; 0x1110], vec![0x5au8; 0x130]).unwrap();
        let s = seal(
            &Inputs {
                kernel: &k,
                initrd: Some(&initrd),
                cmdline: "console=ttysclp0 coffer.x=1",
                host_keys: &[a.public(), b.public()],
                pcf: DEFAULT_PCF,
            },
            &l,
        )
        .unwrap();
        for host in [&a, &b] {
            let u = host.unpack(&s.image).unwrap();
            assert_eq!(hex::encode(&s.tags), u.tags.to_hex());
            assert_eq!(u.psw, s.psw);
            assert_eq!(u.pcf, DEFAULT_PCF);
            let listed: Vec<(u64, u64, u64)> = s
                .components
                .iter()
                .map(|c| (c.tweak_prefix, c.addr, c.size))
                .collect();
            assert_eq!(u.components, listed);
            let at = |c: &Placed| &u.memory[c.addr as usize..(c.addr + c.size) as usize];
            let [kc, ic, cc, sc] = &s.components[..] else {
                panic!("four components")
            };
            assert!(at(kc)[..k.len()] == k[..] && at(kc)[k.len()..].iter().all(|&x| x == 0));
            assert!(at(ic)[..initrd.len()] == initrd[..]);
            assert_eq!(&at(cc)[..28], b"console=ttysclp0 coffer.x=1\0");
            let stage3b = at(sc);
            assert!(stage3b[..0x130 - 64].iter().all(|&x| x == 0x5a));
            let arg = |i: usize| {
                u64::from_be_bytes(
                    stage3b[0x130 - 64 + 8 * i..0x130 - 56 + 8 * i]
                        .try_into()
                        .unwrap(),
                )
            };
            assert_eq!(
                [
                    arg(0),
                    arg(1),
                    arg(2),
                    arg(3),
                    arg(4),
                    arg(5),
                    arg(6),
                    arg(7)
                ],
                [
                    kc.addr,
                    k.len() as u64,
                    cc.addr,
                    28,
                    ic.addr,
                    initrd.len() as u64,
                    PSW_MASK_64,
                    KERNEL_ENTRY
                ]
            );
        }
        assert!(stranger
            .unpack(&s.image)
            .unwrap_err()
            .contains("no key slot"));
        // Any encrypted page, the header's public part, its encrypted part, its tag.
        let h = s.header.0 as usize;
        for (at, why) in [
            (s.components[0].addr as usize + 7, "PLD"),
            (s.components[3].addr as usize + 4095, "PLD"),
            (h + 48, "GCM"),
            (h + HEADER_HEAD + 2 * KEY_SLOT + 40, "GCM"),
            (h + s.header.1 as usize - 1, "GCM"),
        ] {
            let mut bad = s.image.clone();
            bad[at] ^= 0x01;
            let e = a.unpack(&bad).unwrap_err();
            assert!(e.contains(why), "byte {at:#x}: {e}");
        }
    }

    #[test]
    fn what_cannot_be_sealed_is_refused_naming_why() {
        let keys = [host()];
        let l = loaders();
        let k = kernel(0x11000);
        let seal_with = |kernel: &[u8], cmdline: &str, keys: &[PKey<Public>]| {
            seal(
                &Inputs {
                    kernel,
                    initrd: None,
                    cmdline,
                    host_keys: keys,
                    pcf: DEFAULT_PCF,
                },
                &l,
            )
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
        };
        let mut elf = k.clone();
        elf[..4].copy_from_slice(b"\x7fELF");
        assert!(seal_with(&elf, "", &keys).contains("ELF"));
        assert!(seal_with(&vec![0u8; 0x11000], "", &keys).contains("S390EP"));
        assert!(seal_with(&k, &"x".repeat(896), &keys).contains("at most 896"));
        assert!(seal_with(&k, "a\0b", &keys).contains("NUL"));
        assert!(seal_with(&k, "", &[]).contains("at least one host-key"));
        let many: Vec<PKey<Public>> = (0..96).map(|_| keys[0].clone()).collect();
        assert!(seal_with(&k, "", &many).contains("at most 8192 bytes (95 host keys)"));
        assert!(Loaders::from_bytes(vec![0; 0x100], vec![0; 0x100]).is_err());
    }
}
