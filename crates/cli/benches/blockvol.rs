//! `cargo bench -p coffer --bench blockvol`: an encrypted block volume's cost.
//!
//! A pod VM (through containerd's CRI, under the accelerator `auto` picks: TCG on this project's
//! CI machine) gets a 160 MiB loop device as a `volumeDevices` block volume, which its agent
//! opens as LUKS2 with dm-integrity (AES-XTS, HMAC-SHA256) under a KBS key. Printed:
//!
//! - StartContainer (where containerd creates the shim's task) with the volume: the first time (hot-plug, attestation for the key,
//!   `luksFormat` with its integrity wipe of the whole device, open) and the second time in a
//!   new pod (hot-plug, key, open), each against a StartContainer of the same image without a
//!   volume in a pod VM that already attested;
//! - sequential throughput through the encrypted volume in the guest (busybox `dd`, 1 MiB
//!   blocks, 64 MiB, timed by the guest's uptime: a write ended by `fsync`, then a read in a
//!   fresh pod VM so that nothing is in its page cache), against the same loop device read and written on the node with
//!   `O_DIRECT` (what a runc pod with the plain volume gets).
//!
//! Bounded: one pod at a time, each container bounded in time.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use coffer_shim::annotations::INITDATA;
use common::containerd::{node, Pods};

const MIB: usize = 64;
/// How long a container without the volume may run.
const PLAIN_WAIT: Duration = Duration::from_secs(300);
/// How long a container with the volume may run (formatting, 64 MiB through it under TCG).
const VOLUME_WAIT: Duration = Duration::from_secs(600);

/// Wraps `command` to print the guest's uptime before and after it (`/proc/uptime`, 10 ms
/// resolution: busybox `dd` prints no rate).
fn timed(command: &str) -> String {
    format!("a=$(cut -d' ' -f1 /proc/uptime) && {command} && b=$(cut -d' ' -f1 /proc/uptime) && echo \"elapsed $a $b\"")
}

/// MiB/s of [`timed`]'s `elapsed` line in `log` for `MIB` MiB.
fn rate(log: &str) -> f64 {
    let line = log
        .lines()
        .find_map(|l| l.split("elapsed ").nth(1))
        .unwrap_or_else(|| panic!("no elapsed line in {log}"));
    let v: Vec<f64> = line
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    MIB as f64 / (v[1] - v[0]).max(0.01)
}

/// CreateContainer `c` in `pod`, then StartContainer (timed: where containerd creates the
/// shim's task, so where the agent plugs in and opens a volume), then its exit within `wait`:
/// (StartContainer's time, exit code).
async fn start_timed(
    p: &mut Pods,
    pod: &str,
    sandbox: &coffer_shim::cri::PodSandboxConfig,
    c: coffer_shim::cri::ContainerConfig,
    wait: Duration,
) -> (Duration, i32) {
    let id = p
        .create_config(pod, sandbox, c)
        .await
        .expect("CreateContainer");
    let t = Instant::now();
    p.start(&id).await.expect("StartContainer");
    let took = t.elapsed();
    (took, p.wait_exited(&id, wait).await)
}

/// GNU dd on the node with O_DIRECT: MiB/s.
fn node_dd(args: &[&str]) -> f64 {
    let t = Instant::now();
    let out = Command::new("dd").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "dd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    MIB as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let podvm = d.join("podvm");
    common::build_podvm(&podvm);
    let n = node(d, Some(&podvm));
    let lo = coffer_testkit::loopdev::LoopDevice::on_new_file(&d.join("pv.img"), 160 << 20);
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut key))
        .unwrap();
    n.rt.block_on(
        n.world
            .kbs
            .admin
            .set_resource("default/pv/bench", key.to_vec()),
    )
    .unwrap();
    let (ok, text, err) = common::coffer(&[
        "initdata",
        "new",
        "--kbs-url",
        &n.world.kbs.url,
        "--image-key",
        "kbs:///default/image-keys/app",
        "--block-volume",
        "/dev/xvda=kbs:///default/pv/bench",
    ]);
    assert!(ok, "{err}");
    let file = d.join("block-initdata.toml");
    std::fs::write(&file, &text).unwrap();
    let refs = common::run_ok(
        Command::new(common::coffer_bin())
            .args(["measure", "--sandbox", "vm", "--podvm"])
            .arg(&podvm)
            .arg("--initdata")
            .arg(&file),
    );
    n.rt.block_on(n.world.kbs.admin.set_reference_values(refs.as_bytes()))
        .unwrap();
    let annotation = coffer_shim::annotations::encode_initdata(&text);
    let container = |name: &str, command: &str, volume: bool| {
        common::containerd::shell_container(
            &n.app,
            name,
            command,
            volume.then_some(lo.dev.as_str()),
        )
    };
    let (start_plain, start_format, write, start_open, read) = n.rt.block_on(async {
        let mut p = Pods::new(&n.containerd).await;
        p.pull(&n.app).await.unwrap();
        // Pod 1: a container without the volume (the image pulled, attested), then the one
        // that formats the volume and writes through it.
        let config = p.sandbox_config("writer", &[(INITDATA, &annotation)]);
        let pod = p.run_pod(&config).await.expect("RunPodSandbox");
        start_timed(
            &mut p,
            &pod,
            &config,
            container("plain", "true", false),
            PLAIN_WAIT,
        )
        .await;
        let (start_plain, _) = start_timed(
            &mut p,
            &pod,
            &config,
            container("plain2", "true", false),
            PLAIN_WAIT,
        )
        .await;
        let write_dd = timed(&format!(
            "dd if=/dev/zero of=/dev/xvda bs=1M count={MIB} conv=fsync"
        ));
        let (start_format, code) = start_timed(
            &mut p,
            &pod,
            &config,
            container("write", &write_dd, true),
            VOLUME_WAIT,
        )
        .await;
        assert_eq!(code, 0);
        let write = rate(&std::fs::read_to_string(p.log_dir.join("writer/write.log")).unwrap());
        p.remove_pod(&pod).await.unwrap();
        // Pod 2: a fresh guest reads it back.
        let config = p.sandbox_config("reader", &[(INITDATA, &annotation)]);
        let pod = p.run_pod(&config).await.expect("RunPodSandbox");
        start_timed(
            &mut p,
            &pod,
            &config,
            container("plain", "true", false),
            PLAIN_WAIT,
        )
        .await;
        let read_dd = timed(&format!("dd if=/dev/xvda of=/dev/null bs=1M count={MIB}"));
        let (start_open, code) = start_timed(
            &mut p,
            &pod,
            &config,
            container("read", &read_dd, true),
            VOLUME_WAIT,
        )
        .await;
        assert_eq!(code, 0);
        let read = rate(&std::fs::read_to_string(p.log_dir.join("reader/read.log")).unwrap());
        p.remove_pod(&pod).await.unwrap();
        (start_plain, start_format, write, start_open, read)
    });
    let count = format!("count={MIB}");
    let of = format!("of={}", lo.dev);
    let iff = format!("if={}", lo.dev);
    let node_write = node_dd(&[
        "if=/dev/zero",
        &of,
        "bs=1M",
        &count,
        "oflag=direct",
        "conv=fsync",
    ]);
    let node_read = node_dd(&[&iff, "of=/dev/null", "bs=1M", &count, "iflag=direct"]);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("encrypted block volume (LUKS2 + dm-integrity, 160 MiB loop device), pod VM with --accel auto");
    println!(
        "StartContainer           no volume {:>8.0} ms   first use (format) {:>8.0} ms   next pod (open) {:>8.0} ms",
        ms(start_plain),
        ms(start_format),
        ms(start_open)
    );
    println!(
        "write {MIB} MiB (fsync)     guest, encrypted {:>7.1} MiB/s   node, plain O_DIRECT {:>7.1} MiB/s   ratio {:.2}",
        write,
        node_write,
        write / node_write
    );
    println!(
        "read {MIB} MiB (cold)       guest, encrypted {:>7.1} MiB/s   node, plain O_DIRECT {:>7.1} MiB/s   ratio {:.2}",
        read,
        node_read,
        read / node_read
    );
}
