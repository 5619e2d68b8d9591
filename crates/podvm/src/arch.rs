//! The machines pod VMs are built for: x86-64 and IBM Z (s390x), and what differs between them
//! in Debian's packages and binaries.

/// The machine a pod VM is built for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Arch {
    /// x86-64: SEV-SNP, TDX, the emulated TEE, the clouds' x86 machines.
    #[default]
    X86_64,
    /// IBM Z and LinuxONE (s390x, big-endian): IBM Secure Execution.
    S390x,
}

impl Arch {
    /// `x86_64` (or `amd64`) or `s390x`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "x86_64" | "amd64" => Ok(Self::X86_64),
            "s390x" => Ok(Self::S390x),
            other => Err(format!("--arch {other}: use x86_64 or s390x")),
        }
    }

    /// The name `measurements.json` records.
    pub fn name(self) -> &'static str {
        match self {
            Self::X86_64 => "x86_64",
            Self::S390x => "s390x",
        }
    }

    /// Debian's multiarch triplet (the library directory).
    pub fn triplet(self) -> &'static str {
        match self {
            Self::X86_64 => "x86_64-linux-gnu",
            Self::S390x => "s390x-linux-gnu",
        }
    }

    /// Debian's architecture name.
    pub fn deb_arch(self) -> &'static str {
        match self {
            Self::X86_64 => "amd64",
            Self::S390x => "s390x",
        }
    }

    /// The dynamic loader: its file in the library directory, and the path ELF binaries name.
    pub fn loader(self) -> (&'static str, &'static str) {
        match self {
            Self::X86_64 => ("ld-linux-x86-64.so.2", "lib64/ld-linux-x86-64.so.2"),
            Self::S390x => ("ld64.so.1", "lib/ld64.so.1"),
        }
    }

    /// The ELF machine of its binaries (`e_machine`).
    pub fn elf_machine(self) -> u16 {
        match self {
            Self::X86_64 => 62,
            Self::S390x => 22,
        }
    }
}
