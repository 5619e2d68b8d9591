//! Pod VMs: the measured image ([`build`]: Debian kernel, the agent as init, a dm-verity
//! protected root), its launch measurement and QEMU command line ([`launch`]), and the
//! multiplexer that carries the agent API and the guest's network over one virtio-serial port
//! ([`mux`]). The guest side (boot, verity root, encrypted scratch) is in `coffer-agent`.
//! See `docs/podvm.md`.

#![deny(missing_docs)]

pub mod apt;
pub mod arch;
pub mod build;
pub mod bzimage;
pub mod disk;
pub mod firmware;
pub mod initrd;
pub mod launch;
pub mod mux;
pub mod remote;
pub mod snp;
pub mod tdx;
pub mod verity;

pub use launch::{Accel, Launch, Nic, PodVm, Tee};

/// The kernel uncompressed (`vmlinux`, the ELF in `vmlinuz`), in the pod VM directory: launches
/// without TEE firmware boot it directly through its PVH entry, with no decompressor (see
/// [`bzimage`]). SEV-SNP and TDX launches boot `vmlinuz` through their firmware.
pub const PVH_KERNEL: &str = "vmlinux";

/// The firmware an SEV-SNP launch of a pod VM boots (OVMF's AmdSev build, which carries the
/// kernel-hashes table), in the pod VM directory.
pub const FIRMWARE_SNP: &str = "firmware-snp.fd";
/// The firmware a TDX launch of a pod VM boots (TDVF), in the pod VM directory.
pub const FIRMWARE_TDX: &str = "firmware-tdx.fd";
/// The IBM Secure Execution image of an s390x pod VM (its kernel, initrd and command line
/// sealed for the chosen hosts by `coffer-se-image`), in the pod VM directory.
pub const SE_IMAGE: &str = "se.img";
