//! The VMSA (VM save area) page of a vCPU as QEMU/KVM set it up for an SEV-SNP launch: the x86
//! reset state, per the layout of AMD APM volume 2, table B-4 (`struct sev_es_save_area`).

use super::ovmf::PAGE;

/// The boot processor's reset address.
pub(super) const BSP_RESET_EIP: u32 = 0xffff_fff0;

// Offsets of the fields QEMU sets (AMD APM vol. 2, table B-4).
const ES: usize = 0x000;
const CS: usize = 0x010;
const SS: usize = 0x020;
const DS: usize = 0x030;
const FS: usize = 0x040;
const GS: usize = 0x050;
const GDTR: usize = 0x060;
const LDTR: usize = 0x070;
const IDTR: usize = 0x080;
const TR: usize = 0x090;
const EFER: usize = 0x0d0;
const CR4: usize = 0x148;
const CR0: usize = 0x158;
const DR7: usize = 0x160;
const DR6: usize = 0x168;
const RFLAGS: usize = 0x170;
const RIP: usize = 0x178;
const G_PAT: usize = 0x268;
const RDX: usize = 0x310;
const SEV_FEATURES: usize = 0x3b0;
const XCR0: usize = 0x3e8;
const MXCSR: usize = 0x408;
const X87_FCW: usize = 0x410;

struct Vmsa([u8; PAGE]);

impl Vmsa {
    fn put(&mut self, at: usize, bytes: &[u8]) {
        self.0[at..at + bytes.len()].copy_from_slice(bytes);
    }

    fn u64(&mut self, at: usize, v: u64) {
        self.put(at, &v.to_le_bytes());
    }

    /// A segment register: selector, attributes, limit, base.
    fn segment(&mut self, at: usize, selector: u16, attrib: u16, limit: u32, base: u64) {
        self.put(at, &selector.to_le_bytes());
        self.put(at + 2, &attrib.to_le_bytes());
        self.put(at + 4, &limit.to_le_bytes());
        self.u64(at + 8, base);
    }
}

/// The VMSA of a vCPU that starts at `eip` (real mode: `CS` base from its upper 16 bits, `RIP`
/// its lower 16), with `sev_features` and the CPUID signature in `RDX`; everything QEMU and KVM
/// do not set is zero.
pub(super) fn page(eip: u32, sev_features: u64, signature: u32) -> [u8; PAGE] {
    let mut v = Vmsa([0; PAGE]);
    for seg in [ES, SS, DS, FS, GS] {
        v.segment(seg, 0, 0x93, 0xffff, 0);
    }
    v.segment(CS, 0xf000, 0x9b, 0xffff, u64::from(eip & 0xffff_0000));
    v.segment(GDTR, 0, 0, 0xffff, 0);
    v.segment(IDTR, 0, 0, 0xffff, 0);
    v.segment(LDTR, 0, 0x82, 0xffff, 0);
    v.segment(TR, 0, 0x8b, 0xffff, 0);
    v.u64(EFER, 0x1000); // SVME, which KVM sets
    v.u64(CR4, 0x40); // MCE, which KVM sets
    v.u64(CR0, 0x10); // ET
    v.u64(DR7, 0x400);
    v.u64(DR6, 0xffff_0ff0);
    v.u64(RFLAGS, 0x2);
    v.u64(RIP, u64::from(eip & 0xffff));
    v.u64(G_PAT, 0x0007_0406_0007_0406); // the PAT MSR's reset value
    v.u64(RDX, u64::from(signature));
    v.u64(SEV_FEATURES, sev_features);
    v.u64(XCR0, 0x1);
    v.put(MXCSR, &0x1f80u32.to_le_bytes());
    v.put(X87_FCW, &0x37fu16.to_le_bytes());
    v.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_state() {
        let p = page(0x0080_b004, 0x1, 0x00a0_0f11);
        assert_eq!(
            &p[CS..CS + 16],
            &[0x00, 0xf0, 0x9b, 0, 0xff, 0xff, 0, 0, 0, 0, 0x80, 0, 0, 0, 0, 0]
        );
        assert_eq!(&p[RIP..RIP + 8], &0xb004u64.to_le_bytes());
        assert_eq!(&p[RDX..RDX + 4], &0x00a0_0f11u32.to_le_bytes());
        assert_eq!(p[SEV_FEATURES], 1);
        let bsp = page(BSP_RESET_EIP, 0, 0);
        assert_eq!(&bsp[CS + 8..CS + 16], &0xffff_0000u64.to_le_bytes());
        assert_eq!(&bsp[RIP..RIP + 8], &0xfff0u64.to_le_bytes());
        assert!(bsp[0x670..].iter().all(|&b| b == 0));
    }
}
