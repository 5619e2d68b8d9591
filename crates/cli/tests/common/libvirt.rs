//! Debian's libvirtd for the peer-pod tests, and `coffer-cloud` over it.
//!
//! The daemon runs in the test's network namespace (its taps join the test's bridge) and in a
//! mount namespace of its own, where tmpfs hides the host's `/run/libvirt`, `/var/lib/libvirt`
//! and `/var/cache/libvirt` and the test's configuration is bound over `/etc/libvirt`: nothing
//! of it outlives the test, and it never meets another libvirtd. Its socket is in the test's
//! directory. QEMU runs as root without a security driver or cgroups (as the tests' own QEMU
//! does); the `libvirt-qemu` account must exist (`.ci/run` makes it, as Debian's
//! libvirt-daemon-system would).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A private libvirtd, killed on drop.
pub struct Libvirtd {
    child: Child,
    /// The connection URI for clients (`qemu:///system?socket=…`).
    pub uri: String,
    /// Its log.
    pub log: PathBuf,
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        // Its domains first: their QEMU processes are its children only by name.
        let _ = Command::new("virsh")
            .args(["-c", &self.uri, "list", "--name"])
            .output()
            .map(|o| {
                for d in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("virsh")
                        .args(["-c", &self.uri, "destroy", d])
                        .output();
                }
            });
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Libvirtd {
    /// Starts one with its state under `dir`.
    pub fn start(dir: &Path) -> Self {
        let etc = dir.join("etc");
        let run = dir.join("run");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::create_dir_all(&run).unwrap();
        assert!(
            Command::new("getent")
                .args(["passwd", "libvirt-qemu"])
                .stdout(Stdio::null())
                .status()
                .unwrap()
                .success(),
            "libvirtd needs the libvirt-qemu account (.ci/run makes it: useradd --system libvirt-qemu)"
        );
        std::fs::write(
            etc.join("libvirtd.conf"),
            format!(
                "unix_sock_dir = \"{}\"\nauth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\n",
                run.display()
            ),
        )
        .unwrap();
        std::fs::write(
            etc.join("qemu.conf"),
            "user = \"root\"\ngroup = \"root\"\ndynamic_ownership = 0\nsecurity_driver = \"none\"\ncgroup_controllers = [ ]\nnamespaces = [ ]\nstdio_handler = \"file\"\n",
        )
        .unwrap();
        let log = dir.join("libvirtd.log");
        let script = format!(
            "set -e; for d in /run/libvirt /var/lib/libvirt /var/cache/libvirt; do mkdir -p $d; mount -t tmpfs tmpfs $d; done; \
             mkdir -p /etc/libvirt; mount --bind {etc} /etc/libvirt; exec libvirtd --config {etc}/libvirtd.conf --pid-file {pid}",
            etc = etc.display(),
            pid = dir.join("libvirtd.pid").display()
        );
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.join("libvirtd.err")).unwrap())
            .spawn()
            .expect("libvirtd (apt-get install libvirt-daemon libvirt-daemon-driver-qemu)");
        let sock = run.join("libvirt-sock");
        let uri = format!("qemu:///system?socket={}", sock.display());
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let up = Command::new("virsh")
                .args(["-c", &uri, "version"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if up {
                break;
            }
            assert!(
                Instant::now() < until,
                "libvirtd did not serve within 30 s: {}",
                std::fs::read_to_string(dir.join("libvirtd.err")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Self { child, uri, log }
    }

    /// The names of every domain, running or not.
    pub fn domains(&self) -> Vec<String> {
        self.virsh(&["list", "--all", "--name"])
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// `virsh -c URI ARGS…`'s output (it must succeed).
    pub fn virsh(&self, args: &[&str]) -> String {
        super::run_ok(Command::new("virsh").arg("-c").arg(&self.uri).args(args))
    }
}

/// A `coffer-cloud` daemon, killed on drop.
pub struct Cloud {
    pub child: Child,
    /// Its socket.
    pub socket: PathBuf,
    /// Its log (stderr).
    pub log: PathBuf,
    /// Its configuration.
    pub config: PathBuf,
    /// Its libvirt storage pool (set by [`Cloud::start`]).
    pub pool: String,
}

impl Drop for Cloud {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Cloud {
    /// Writes a configuration for `libvirtd` (pool `pool` under `dir`, VMs on `bridge` in
    /// `subnet` with gateway `gateway`, TCG, reconciling every 2 s) and starts the daemon.
    pub fn start(
        dir: &Path,
        libvirtd: &Libvirtd,
        podvm: &Path,
        bridge: &str,
        subnet: &str,
        gateway: &str,
    ) -> Self {
        Self::start_opts(dir, libvirtd, podvm, bridge, subnet, gateway, "")
    }

    /// As [`Cloud::start`], with `extra` lines in the `[libvirt]` section.
    pub fn start_opts(
        dir: &Path,
        libvirtd: &Libvirtd,
        podvm: &Path,
        bridge: &str,
        subnet: &str,
        gateway: &str,
        extra: &str,
    ) -> Self {
        let pool = format!(
            "coffer-t{}",
            dir.file_name()
                .unwrap()
                .to_string_lossy()
                .trim_start_matches('.')
        );
        let config = dir.join("cloud.toml");
        std::fs::write(
            &config,
            format!(
                "cluster = \"test\"\nnode = \"node-1\"\nprovider = \"libvirt\"\nreconcile_secs = 2\n\
                 [[instance_types]]\nname = \"small\"\nvcpus = 1\nmemory_mib = 512\n\
                 [libvirt]\nuri = \"{uri}\"\npool = \"{pool}\"\npool_dir = \"{pool_dir}\"\npodvm = \"{podvm}\"\n\
                 bridge = \"{bridge}\"\nsubnet = \"{subnet}\"\ngateway = \"{gateway}\"\naccel = \"tcg\"\nscratch_mib = 512\n{extra}",
                uri = libvirtd.uri,
                pool_dir = dir.join("pool").display(),
                podvm = podvm.display(),
            ),
        )
        .unwrap();
        let mut cloud = Self::start_with(dir, config);
        cloud.pool = pool;
        cloud
    }

    /// Starts the daemon with the configuration `config`.
    pub fn start_with(dir: &Path, config: PathBuf) -> Self {
        let socket = dir.join("cloud.sock");
        let log = dir.join("cloud.log");
        // A killed daemon's socket is still there: wait for the new one.
        let _ = std::fs::remove_file(&socket);
        let child = Command::new(super::sibling_binary("coffer-cloud", "coffer-cloud"))
            .arg("--config")
            .arg(&config)
            .arg("--listen")
            .arg(&socket)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let until = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            assert!(
                Instant::now() < until,
                "coffer-cloud did not serve: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Self {
            child,
            socket,
            log,
            config,
            pool: String::new(),
        }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
