//! `coffer doctor` as a user runs it: on this machine, and on a host root that `coffer install
//! containerd` configured.

mod common;

use common::coffer;

#[test]
fn doctor_reports_this_host_without_failing() {
    let (ok, out, err) = coffer(&["doctor"]);
    assert!(ok, "coffer doctor failed: {err}");
    let line = |area: &str| {
        out.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(area))
            .unwrap_or_else(|| panic!("no {area} line in:\n{out}"))
            .to_string()
    };
    // Whatever this host is, the KVM line says whether pod VMs get KVM or TCG, and QEMU's
    // version is named (the tests' hosts have QEMU).
    let kvm = line("kvm");
    assert!(
        (kvm.starts_with("ok") && kvm.contains("KVM")) || kvm.contains("TCG"),
        "{kvm}"
    );
    assert!(line("qemu").contains("QEMU "), "{out}");
    assert!(
        out.lines()
            .last()
            .unwrap()
            .ends_with(" limited (each says what to do after ->)")
            || out
                .lines()
                .last()
                .unwrap()
                .contains(" 0 missing, 0 limited")
    );
}

#[test]
fn doctor_recognises_a_node_that_coffer_install_configured() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path().to_str().unwrap();
    let (ok, out, err) = coffer(&["doctor", "--root", r, "--uid", "0"]);
    assert!(ok, "{err}");
    // An empty root: no containerd, so no Kubernetes node yet.
    assert!(
        out.lines()
            .any(|l| l.starts_with("info") && l.contains("no containerd")),
        "{out}"
    );
    let (ok, _, err) = coffer(&[
        "install",
        "containerd",
        "--root",
        r,
        "--sandbox",
        "process",
        "--emulated-tee",
    ]);
    assert!(ok, "{err}");
    // containerd itself is looked for on the fake root's PATH.
    let bin = root.path().join("usr/bin");
    std::fs::create_dir_all(&bin).unwrap();
    for p in ["containerd", "containerd-shim-coffer-v2"] {
        let f = bin.join(p);
        std::fs::write(
            &f,
            "#!/bin/sh\necho 'containerd github.com/containerd/containerd 1.6.20~ds1 x'\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let (ok, out, err) = coffer(&["doctor", "--root", r, "--uid", "0"]);
    assert!(ok, "{err}");
    let cfg = out
        .lines()
        .find(|l| l.contains("containerd cfg"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(cfg.starts_with("ok"), "{cfg}");
    assert!(out
        .lines()
        .any(|l| l.starts_with("ok") && l.contains("containerd 1.6.20~ds1")));
}
