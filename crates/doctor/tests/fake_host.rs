//! `coffer doctor`'s checks against fake host roots: a bare one, a fully equipped SEV-SNP host,
//! and the KVM cases that push pod VMs to TCG (PVM, a hanging nested KVM).

use std::{
    io::{Read, Write},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use coffer_doctor::{Check, Host, Options, Status};

fn options(root: &Path, kbs: Option<String>) -> Options {
    let scratch = root.join("tmp");
    std::fs::create_dir_all(&scratch).unwrap();
    Options {
        kbs,
        state_dir: "/run/coffer/sandboxes".into(),
        cache_dir: "/root/.cache/coffer".into(),
        scratch,
    }
}

fn file(root: &Path, path: &str, text: &str) -> PathBuf {
    let p = root.join(path.trim_start_matches('/'));
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, text).unwrap();
    p
}

fn program(root: &Path, name: &str, script: &str) {
    let p = file(
        root,
        &format!("/usr/bin/{name}"),
        &format!("#!/bin/sh\n{script}\n"),
    );
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn find<'a>(checks: &'a [Check], area: &str) -> &'a Check {
    checks
        .iter()
        .find(|c| c.area == area)
        .unwrap_or_else(|| panic!("no {area} line in {checks:#?}"))
}

/// A QEMU that answers -version and -object help, and runs the KVM probe's guest by exiting
/// the way isa-debug-exit makes QEMU exit (status 3), or as `kvm` says.
fn fake_qemu(root: &Path, objects: &str, kvm: &str) {
    program(
        root,
        "qemu-system-x86_64",
        &format!(
            r#"case "$1" in
-version) echo "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2~bpo12+1)";;
-object) printf 'List of user creatable objects:\n  memory-backend-ram\n{objects}';;
-accel) {kvm};;
esac"#
        ),
    );
}

#[tokio::test]
async fn a_bare_host_is_told_what_to_install_without_failing() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let checks = coffer_doctor::run(&Host::at(r, 1000), &options(r, None)).await;
    for c in &checks {
        println!("{c}");
    }
    let user = find(&checks, "user");
    assert_eq!(user.status, Status::Missing);
    assert!(user.found.contains("uid 1000"), "{user}");
    for (area, fix) in [
        ("runc", "apt-get install -y runc"),
        ("unshare", "apt-get install -y util-linux"),
        ("ip", "apt-get install -y iproute2"),
        (
            "qemu",
            "apt-get install -y --no-install-recommends qemu-system-x86",
        ),
        (
            "podvm build",
            "apt-get install -y squashfs-tools binutils dpkg apt",
        ),
    ] {
        let c = find(&checks, area);
        assert_eq!(
            (c.status, c.fix.as_deref()),
            (Status::Missing, Some(fix)),
            "{c}"
        );
    }
    let kvm = find(&checks, "kvm");
    assert_eq!(kvm.status, Status::Limited);
    assert!(
        kvm.found.starts_with("no /dev/kvm: pod VMs run under TCG"),
        "{kvm}"
    );
    let containerd = find(&checks, "containerd");
    assert_eq!(containerd.status, Status::Info, "only Kubernetes needs it");
    assert!(find(&checks, "tee guest")
        .found
        .contains("not a confidential guest"));
    assert!(find(&checks, "tee host").found.contains("emulated TEE"));
    assert!(find(&checks, "kbs").found.starts_with("not checked"));
    // One line each, the fix after an arrow.
    assert!(checks.iter().all(|c| !c.to_string().contains('\n')));
    assert!(find(&checks, "runc")
        .to_string()
        .ends_with("-> apt-get install -y runc"));
}

#[tokio::test]
async fn an_equipped_snp_host_with_a_coffer_node_passes_every_check() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    file(r, "/proc/sys/kernel/osrelease", "6.12.0-snp\n");
    file(r, "/sys/fs/cgroup/cgroup.controllers", "cpu memory pids\n");
    file(r, "/dev/kvm", "");
    file(r, "/sys/module/kvm_amd/parameters/sev_snp", "Y\n");
    fake_qemu(r, "  sev-guest\n  sev-snp-guest\n", "exit 3");
    program(r, "runc", "echo 'runc version 1.1.12'");
    for p in [
        "unshare",
        "ip",
        "mksquashfs",
        "objcopy",
        "dpkg-deb",
        "apt-get",
    ] {
        program(r, p, "exit 0");
    }
    program(
        r,
        "containerd",
        "echo 'containerd github.com/containerd/containerd 1.7.24 abc'",
    );
    program(r, "containerd-shim-coffer-v2", "exit 0");
    file(
        r,
        "/etc/containerd/config.toml",
        r#"version = 2
[proxy_plugins.coffer]
  type = "snapshot"
  address = "/run/coffer/snapshotter.sock"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.coffer]
  runtime_type = "io.containerd.coffer.v2"
"#,
    );
    // A KBS's health endpoint on loopback.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", server.local_addr().unwrap());
    let served = std::thread::spawn(move || {
        let (mut c, _) = server.accept().unwrap();
        let mut buf = [0u8; 1024];
        let n = c.read(&mut buf).unwrap();
        assert!(buf[..n].starts_with(b"GET /healthz HTTP/1.1\r\n"));
        c.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .unwrap();
    });
    let checks = coffer_doctor::run(&Host::at(r, 0), &options(r, Some(url))).await;
    served.join().unwrap();
    for c in &checks {
        println!("{c}");
    }
    for c in &checks {
        assert!(
            matches!(c.status, Status::Ok | Status::Info),
            "expected no missing or limited part: {c}"
        );
    }
    assert!(find(&checks, "kernel").found.contains("Linux 6.12.0-snp"));
    assert!(find(&checks, "kernel").found.contains("cgroup v2"));
    assert!(find(&checks, "qemu").found.starts_with("QEMU 10.0.2 "));
    assert!(find(&checks, "qemu cvm")
        .found
        .contains("sev-guest, sev-snp-guest"));
    assert_eq!(find(&checks, "kvm").status, Status::Ok);
    assert!(find(&checks, "tee host")
        .found
        .starts_with("KVM can launch SEV-SNP guests"));
    assert_eq!(find(&checks, "containerd").found, "containerd 1.7.24");
    assert_eq!(find(&checks, "containerd cfg").status, Status::Ok);
    assert_eq!(find(&checks, "kbs").status, Status::Ok);
    // The probe's firmware does not stay behind.
    assert_eq!(std::fs::read_dir(r.join("tmp")).unwrap().count(), 0);
}

#[tokio::test]
async fn a_kvm_that_cannot_run_the_pod_vm_is_reported_as_tcg() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    file(r, "/dev/kvm", "");
    // Nested KVM whose guests hang: the probe gives up after 2 s.
    fake_qemu(r, "", "exec sleep 30");
    let o = options(r, None);
    let checks = coffer_doctor::run(&Host::at(r, 0), &o).await;
    let kvm = find(&checks, "kvm");
    assert_eq!(kvm.status, Status::Limited);
    assert!(
        kvm.found.contains("hung") && kvm.found.contains("TCG"),
        "{kvm}"
    );
    let cvm = find(&checks, "qemu cvm");
    assert_eq!(cvm.status, Status::Limited);
    assert!(cvm.found.contains("none"), "{cvm}");
    // PVM passes the probe but cannot boot the pod VM's kernel.
    fake_qemu(r, "", "exit 3");
    file(r, "/sys/module/kvm_pvm/refcnt", "1\n");
    let checks = coffer_doctor::run(&Host::at(r, 0), &o).await;
    let kvm = find(&checks, "kvm");
    assert!(
        kvm.status == Status::Limited && kvm.found.contains("PVM"),
        "{kvm}"
    );
    // A KBS that is not there is named with the reason.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let o = options(r, Some(format!("http://127.0.0.1:{port}")));
    let checks = coffer_doctor::run(&Host::at(r, 0), &o).await;
    let kbs = find(&checks, "kbs");
    assert_eq!(kbs.status, Status::Missing);
    assert!(
        kbs.found
            .starts_with(&format!("cannot reach http://127.0.0.1:{port}")),
        "{kbs}"
    );
}

#[tokio::test]
async fn a_peer_pod_node_whose_coffer_cloud_is_down_is_told_so() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    // Not configured: a fact, with how to.
    let checks = coffer_doctor::run(&Host::at(r, 0), &options(r, None)).await;
    let c = find(&checks, "peer pods");
    assert_eq!(c.status, Status::Info, "{c}");
    assert!(c.fix.as_deref().unwrap().contains("--peer-pods"), "{c}");
    // The handler coffer-remote configured, its daemon absent.
    file(
        r,
        "/etc/coffer/shim-remote.toml",
        "sandbox = \"remote\"\npodvm = \"/opt/coffer/podvm\"\ncloud = \"/run/coffer/cloud.sock\"\n",
    );
    let checks = coffer_doctor::run(&Host::at(r, 0), &options(r, None)).await;
    let c = find(&checks, "peer pods");
    assert_eq!(c.status, Status::Missing, "{c}");
    assert!(
        c.found
            .contains("coffer-cloud does not answer at /run/coffer/cloud.sock"),
        "{c}"
    );
    assert!(
        c.fix.as_deref().unwrap().contains("coffer-cloud --config"),
        "{c}"
    );
}
