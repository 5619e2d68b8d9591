//! The libvirt provider's domain XML against libvirt's own schema: the RelaxNG grammar of
//! libvirt 11.3 (Debian bookworm-backports' `libvirt-common`, the first Debian libvirt that
//! knows SEV-SNP launch security; downloaded once into the package cache), checked by
//! `xmllint` as `virt-xml-validate` does. Every kind of domain the provider defines is checked:
//! kernel boot with the emulated TEE's channel (TCG and KVM), disk boot, and SEV-SNP.

#![cfg(feature = "libvirt")]

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use coffer_cloud::{
    config::LibvirtConfig,
    libvirt::{domain_xml, DomainXml, SnpLaunch},
};

/// libvirt 11.3's schema directory, from its package (cached in `~/.cache/coffer/debs`).
fn schemas(work: &Path) -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap()
        .join("coffer/debs");
    std::fs::create_dir_all(&cache).unwrap();
    let find = || {
        std::fs::read_dir(&cache)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libvirt-common_11.") && n.ends_with(".deb"))
            })
    };
    let deb = match find() {
        Some(d) => d,
        None => {
            let out = Command::new("apt-get")
                .args(["download", "libvirt-common/bookworm-backports"])
                .current_dir(&cache)
                .output()
                .expect("apt-get");
            assert!(
                out.status.success(),
                "apt-get download libvirt-common/bookworm-backports (bookworm-backports in apt's sources): {}",
                String::from_utf8_lossy(&out.stderr)
            );
            find().expect("the downloaded libvirt-common")
        }
    };
    let x = work.join("libvirt-common");
    let ok = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&x)
        .status()
        .unwrap()
        .success();
    assert!(ok, "dpkg-deb -x {}", deb.display());
    x.join("usr/share/libvirt/schemas")
}

/// `xmllint --relaxng domain.rng` of `xml`: its error output when the schema refuses it.
fn validate(schemas: &Path, work: &Path, name: &str, xml: &str) -> Result<(), String> {
    let file = work.join(format!("{name}.xml"));
    std::fs::write(&file, xml).unwrap();
    let out = Command::new("xmllint")
        .args(["--noout", "--relaxng"])
        .arg(schemas.join("domain.rng"))
        .arg(&file)
        .output()
        .expect("xmllint (Debian's libxml2-utils)");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A domain to check: its name, the provider's settings, the image volumes, the emulated PSP's
/// socket, an SEV-SNP launch.
type Case<'a> = (
    &'a str,
    &'a LibvirtConfig,
    &'a [String],
    Option<&'a Path>,
    Option<&'a SnpLaunch>,
);

fn config(accel: &str, boot: &str) -> LibvirtConfig {
    toml::from_str(&format!(
        "podvm = \"/var/lib/coffer/podvm\"\nbridge = \"br-pods\"\nsubnet = \"10.99.0.0/24\"\ngateway = \"10.99.0.1\"\naccel = \"{accel}\"\nboot = \"{boot}\"\n"
    ))
    .unwrap()
}

#[test]
fn every_domain_the_provider_defines_is_valid_libvirt_xml() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let schemas = schemas(work);
    let pool = "/var/lib/coffer-cloud/pool";
    let kernel = [
        format!("{pool}/coffer-podvm-0a1b-vmlinux"),
        format!("{pool}/coffer-podvm-0a1b-initrd"),
        format!("{pool}/coffer-podvm-0a1b-root"),
    ];
    let snp_image = [
        format!("{pool}/coffer-podvm-2c3d-vmlinuz"),
        format!("{pool}/coffer-podvm-2c3d-initrd"),
        format!("{pool}/coffer-podvm-2c3d-root"),
        format!("{pool}/coffer-podvm-2c3d-firmware-snp"),
    ];
    let disk = [format!("{pool}/coffer-podvm-4e5f-disk")];
    let snp = SnpLaunch {
        host_data: [0xab; 32],
        cpu: "EPYC-Milan".into(),
    };
    let psp = Path::new("/run/coffer/pods/p1/psp-chan.sock");
    let (tcg, kvm, disk_boot) = (
        config("tcg", "kernel"),
        config("kvm", "kernel"),
        config("tcg", "disk"),
    );
    let cases: [Case<'_>; 4] = [
        ("kernel-tcg-emulated", &tcg, &kernel, Some(psp), None),
        ("kernel-kvm", &kvm, &kernel, None, None),
        ("disk", &disk_boot, &disk, Some(psp), None),
        ("sev-snp", &kvm, &snp_image, None, Some(&snp)),
    ];
    for (name, c, image, psp_socket, snp) in cases {
        let xml = domain_xml(&DomainXml {
            config: c,
            cmdline: "console=ttyS0 rdinit=/init coffer.verity=2119,aa,bb",
            name: "coffer-node-1-p1",
            description: "{\"coffer_cloud\":1,\"pod\":\"p1 <&>\"}",
            memory_mib: 1024,
            vcpus: 2,
            image,
            launch_path: "/var/lib/coffer-cloud/pool/coffer-node-1-p1-launch.json",
            mac: "52:54:00:99:00:02",
            console: "/var/lib/coffer-cloud/pool/coffer-node-1-p1.console",
            psp_socket,
            snp,
        });
        if let Err(e) = validate(&schemas, work, name, &xml) {
            panic!("libvirt's schema refuses the {name} domain: {e}\n{xml}");
        }
        if let Some(s) = snp {
            use base64::Engine;
            let host_data = base64::engine::general_purpose::STANDARD.encode(s.host_data);
            assert!(
                xml.contains("<launchSecurity type='sev-snp' kernelHashes='yes'>")
                    && xml.contains(&format!("<hostData>{host_data}</hostData>"))
                    && xml.contains("<loader type='rom'>/var/lib/coffer-cloud/pool/coffer-podvm-2c3d-firmware-snp</loader>")
                    && xml.contains("<kernel>/var/lib/coffer-cloud/pool/coffer-podvm-2c3d-vmlinuz</kernel>")
                    && xml.contains("<model fallback='forbid'>EPYC-Milan</model>")
                    && xml.starts_with("<domain type='kvm'>"),
                "{xml}"
            );
        }
    }
    // The check can fail: launch security libvirt does not know is refused.
    let bad = domain_xml(&DomainXml {
        config: &kvm,
        cmdline: "x",
        name: "n",
        description: "{}",
        memory_mib: 1,
        vcpus: 1,
        image: &snp_image,
        launch_path: "/l",
        mac: "52:54:00:00:00:01",
        console: "/c",
        psp_socket: None,
        snp: Some(&snp),
    })
    .replace("type='sev-snp'", "type='sev-snp-9'");
    assert!(validate(&schemas, work, "bad", &bad).is_err());
}
