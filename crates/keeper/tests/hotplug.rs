//! Hot-plugging a block device through a real QEMU's monitor: a q35 machine with the pod VM's
//! hot-plug root ports, stopped before its first instruction (`-S`: no guest is needed to take
//! the device).

use std::{
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use coffer_keeper::hotplug::{attach_block, HotplugError};
use coffer_podvm::launch::{hotplug_port, HOTPLUG_PORTS};

#[tokio::test]
async fn a_node_block_device_is_plugged_into_a_free_port_and_bad_devices_are_named() {
    let d = tempfile::tempdir().unwrap();
    let lo = coffer_testkit::loopdev::LoopDevice::on_new_file(&d.path().join("disk.img"), 8 << 20);
    let qmp = d.path().join(coffer_keeper::dir::QMP_SOCK);
    let mut args: Vec<String> = [
        "-machine",
        "q35",
        "-accel",
        "tcg",
        "-nodefaults",
        "-nographic",
        "-S",
        "-qmp",
    ]
    .map(String::from)
    .to_vec();
    args.push(format!("unix:{},server=on,wait=off", qmp.display()));
    for i in 0..HOTPLUG_PORTS {
        args.push("-device".into());
        args.push(format!(
            "pcie-root-port,id={},chassis={}",
            hotplug_port(i),
            i + 1
        ));
    }
    let mut qemu = tokio::process::Command::new(coffer_keeper::vm::QEMU)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    while !qmp.exists() {
        assert!(Instant::now() < until, "QEMU made no monitor socket");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let serial = attach_block(d.path(), Path::new(&lo.dev), 0).await.unwrap();
    assert_eq!(serial, "coffer-vol0");
    // The same slot twice, and a device that is not there: QEMU's refusal, naming the device.
    match attach_block(d.path(), Path::new(&lo.dev), 0).await {
        Err(HotplugError::Refused { device, .. }) => assert_eq!(device, lo.dev),
        other => panic!("{other:?}"),
    }
    let e = attach_block(d.path(), Path::new("/dev/coffer-no-such-disk"), 1)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("blockdev-add") && e.contains("/dev/coffer-no-such-disk"),
        "{e}"
    );
    qemu.kill().await.unwrap();
}
