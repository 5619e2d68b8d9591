//! Containers on the real OCI runtime (Debian's runc): an image with a static busybox, pulled by
//! the agent from an OCI layout, run with the default spec; output, exit status, removal, and
//! what the spec forbids (mounts, writes to a read-only rootfs).

#![cfg(target_arch = "x86_64")]

use coffer_agent::{api::proto::CreateContainerRequest, container::Containers};
use coffer_testkit::busybox_layout;

/// Everything a process wrote to `stream`, following it to the process's exit.
async fn output_of(c: &Containers, id: &str, exec: &str, stream: &str) -> String {
    let mut all = Vec::new();
    loop {
        let chunk = c
            .read(id, exec, stream, all.len() as u64, 4096, true)
            .await
            .unwrap();
        assert_eq!(chunk.offset, all.len() as u64);
        if chunk.eof {
            return String::from_utf8(all).unwrap();
        }
        all.extend(chunk.data);
    }
}

async fn output(c: &Containers, id: &str, stream: &str) -> String {
    output_of(c, id, "", stream).await
}

/// A busybox image in an OCI layout under a new directory, containers on runc beside it, and a
/// container id of this process's own.
struct Setup {
    dir: tempfile::TempDir,
    image: String,
    containers: Containers,
    id: String,
    _cleanup: Cleanup,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    busybox_layout(&dir.path().join("layout"));
    let image = format!("oci:{}:v1", dir.path().join("layout").display());
    let containers = Containers::new(
        dir.path().join("bundles"),
        "runc".into(),
        Default::default(),
    );
    // Unique across the test cells that run at once: each test is PID 1 or so of its own PID
    // namespace, while cgroups (/coffer/ID) and the runtime's names are the machine's.
    let suffix = dir
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .trim_start_matches('.')
        .to_string();
    Setup {
        image,
        containers,
        id: format!("coffer-test-{suffix}"),
        _cleanup: Cleanup(dir.path().join("bundles/.runtime"), suffix.clone()),
        dir,
    }
}

/// A test that fails half-way leaves no container (process, cgroup) behind.
struct Cleanup(std::path::PathBuf, String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for n in ["", "-2", "-3", "-4", "-missing"] {
            let _ = std::process::Command::new("runc")
                .arg("--root")
                .arg(&self.0)
                .args(["delete", "--force", &format!("coffer-test-{}{n}", self.1)])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn containers_run_under_runc_with_the_default_spec() {
    let Setup {
        dir: _dir,
        image,
        containers: c,
        id,
        _cleanup,
    } = setup();
    let req = |id: &str, args: &[&str], read_only: bool| CreateContainerRequest {
        container_id: id.into(),
        image: image.clone(),
        args: args.iter().map(|s| s.to_string()).collect(),
        read_only_rootfs: read_only,
        ..Default::default()
    };

    c.create(&req(
        &id,
        &["/bin/sh", "-c", "echo $GREETING; echo oops >&2; exit 3"],
        false,
    ))
    .await
    .unwrap();
    assert_eq!(c.list(), vec![id.clone()]);
    c.start(&id).await.unwrap();
    assert_eq!(c.wait(&id, "").await.unwrap(), 3);
    assert_eq!(output(&c, &id, "stdout").await, "hi\n");
    assert_eq!(output(&c, &id, "stderr").await, "oops\n");
    // Output is kept: it reads again from the start.
    assert_eq!(output(&c, &id, "stdout").await, "hi\n");
    assert_eq!(c.statuses()[0].state, "exited");
    assert_eq!(c.statuses()[0].exit_status, Some(3));
    let bundle = c.bundle(&id).unwrap();
    c.remove(&id).await.unwrap();
    assert!(c.list().is_empty() && !bundle.exists());

    // The default command comes from the image config.
    let id2 = format!("{id}-2");
    c.create(&req(&id2, &[], false)).await.unwrap();
    c.start(&id2).await.unwrap();
    assert_eq!(c.wait(&id2, "").await.unwrap(), 0);
    assert_eq!(output(&c, &id2, "stdout").await, "default\n");
    c.remove(&id2).await.unwrap();

    // A command the image lacks: it fails with runc's reason on its stderr.
    let missing = format!("{id}-missing");
    c.create(&req(&missing, &["/no/such/program"], false))
        .await
        .unwrap();
    c.start(&missing).await.unwrap();
    assert_ne!(c.wait(&missing, "").await.unwrap(), 0);
    let err = output(&c, &missing, "stderr").await;
    assert!(err.contains("/no/such/program"), "{err}");
    c.remove(&missing).await.unwrap();

    // No mounts (seccomp and dropped capabilities), no writes to a read-only rootfs.
    let id3 = format!("{id}-3");
    c.create(&req(
        &id3,
        &[
            "/bin/sh",
            "-c",
            "mount -t tmpfs none /mnt && echo mounted; touch /x && echo wrote; true",
        ],
        true,
    ))
    .await
    .unwrap();
    c.start(&id3).await.unwrap();
    assert_eq!(c.wait(&id3, "").await.unwrap(), 0);
    let out = output(&c, &id3, "stdout").await;
    assert!(!out.contains("mounted") && !out.contains("wrote"), "{out}");
    c.remove(&id3).await.unwrap();

    // Exec into a running container: its own output and status, the container's user and
    // environment, the container unaffected; statistics from its cgroup; signals.
    let id4 = format!("{id}-4");
    c.create(&req(
        &id4,
        &["/bin/sh", "-c", "echo up; exec sleep 30"],
        false,
    ))
    .await
    .unwrap();
    assert!(
        c.exec(&id4, "e1", &["true".into()], &[], false, false)
            .is_err(),
        "exec before start"
    );
    c.start(&id4).await.unwrap();
    assert_eq!(c.statuses()[0].state, "running");
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    c.exec(
        &id4,
        "e1",
        &args(&["/bin/sh", "-c", "echo $GREETING $EXTRA; id -u; exit 7"]),
        &["EXTRA=there".into()],
        false,
        false,
    )
    .unwrap();
    assert_eq!(
        c.wait(&id4, "e1").await.unwrap(),
        7,
        "{}",
        output_of(&c, &id4, "e1", "stderr").await
    );
    assert_eq!(output_of(&c, &id4, "e1", "stdout").await, "hi there\n0\n");
    assert!(
        c.exec(&id4, "e1", &args(&["true"]), &[], false, false)
            .is_err(),
        "exec id reused"
    );
    // Stdin, when asked for: written, then closed.
    c.exec(
        &id4,
        "in",
        &args(&["/bin/sh", "-c", "tr a-z A-Z"]),
        &[],
        true,
        false,
    )
    .unwrap();
    c.write(&id4, "in", b"piped ").await.unwrap();
    c.write(&id4, "in", b"input\n").await.unwrap();
    c.close_stdin(&id4, "in").await.unwrap();
    assert_eq!(c.wait(&id4, "in").await.unwrap(), 0);
    assert_eq!(output_of(&c, &id4, "in", "stdout").await, "PIPED INPUT\n");
    assert!(c.write(&id4, "in", b"late").await.is_err());
    assert!(c.write(&id4, "e1", b"no stdin").await.is_err());
    // A terminal: the process sees a TTY of the size set; input reaches it.
    c.exec(
        &id4,
        "t",
        &args(&[
            "/bin/sh",
            "-c",
            // runc applies a size to the process's terminal just after it starts (and on each
            // resize): ask until it shows.
            "read line; [ -t 0 ] && echo is-a-tty; for i in 1 2 3 4 5 6 7 8 9 10; do \
             s=$(stty size 2>/dev/null); [ \"$s\" = '33 77' ] && break; sleep 0.2; done; \
             echo size $s; echo got $line",
        ]),
        &[],
        true,
        true,
    )
    .unwrap();
    if let Err(e) = c.resize(&id4, "t", 33, 77).await {
        panic!("{e}: {}", output_of(&c, &id4, "t", "stderr").await);
    }
    c.write(&id4, "t", b"hello\n").await.unwrap();
    assert_eq!(c.wait(&id4, "t").await.unwrap(), 0);
    let out = output_of(&c, &id4, "t", "stdout").await;
    assert!(
        out.contains("is-a-tty") && out.contains("size 33 77") && out.contains("got hello"),
        "{out:?}"
    );
    // One echo of the input (the process's terminal), one CR/LF translation.
    assert!(out.starts_with("hello\r\nis-a-tty\r\n"), "{out:?}");
    assert!(c.resize(&id4, "e1", 10, 10).await.is_err(), "no terminal");
    let stats = c.stats(&id4).await.unwrap();
    assert!(stats.pids >= 1 && stats.memory_bytes > 0, "{stats:?}");
    c.exec(
        &id4,
        "e2",
        &args(&["/bin/sh", "-c", "exec sleep 30"]),
        &[],
        false,
        false,
    )
    .unwrap();
    c.signal(&id4, "e2", 15).await.unwrap();
    assert_ne!(c.wait(&id4, "e2").await.unwrap(), 0);
    assert_eq!(c.statuses()[0].state, "running");
    c.remove(&id4).await.unwrap();
    assert!(c.list().is_empty());

    // Bad ids and unknown containers are refused clearly.
    assert!(c.create(&req("../x", &[], false)).await.is_err());
    assert!(c.start("nope").await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_runtime_that_fails_before_creating_the_container_fails_the_start() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    busybox_layout(&dir.path().join("layout"));
    // A runtime that gives up before writing its state, as runc does when it cannot apply
    // the container's cgroup settings.
    let runtime = dir.path().join("failing-runtime");
    std::fs::write(
        &runtime,
        "#!/bin/sh\necho 'cannot set memory limit: device or resource busy' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o755)).unwrap();
    let c = Containers::new(dir.path().join("bundles"), runtime, Default::default());
    c.create(&CreateContainerRequest {
        container_id: "broken".into(),
        image: format!("oci:{}:v1", dir.path().join("layout").display()),
        args: vec!["/bin/true".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let err = c.start("broken").await.unwrap_err().to_string();
    assert_eq!(
        err,
        "runtime: failed to start container broken (exit status 1): cannot set memory limit: device or resource busy"
    );
}

/// A terminal's newline translation does not depend on who runs first: with both cores busy,
/// the container's init on a terminal and many terminal execs started at once each print
/// `\r\n` for `\n`, exactly once (runc's own relay added a second `\r` when the process wrote
/// before runc had set the modes).
#[tokio::test(flavor = "multi_thread")]
async fn a_terminals_output_is_translated_once_under_load() {
    let Setup {
        dir: _dir,
        image,
        containers,
        id,
        _cleanup,
    } = setup();
    let c = std::sync::Arc::new(containers);
    // Two busy loops, bounded in time, as a parallel build would keep the cores.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let busy: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
                while !stop.load(std::sync::atomic::Ordering::Relaxed)
                    && std::time::Instant::now() < until
                {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    c.create(&CreateContainerRequest {
        container_id: id.clone(),
        image: image.clone(),
        args: [
            "/bin/sh",
            "-c",
            "[ -t 1 ] && echo init-on-a-tty; exec sleep 60",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        tty: true,
        ..Default::default()
    })
    .await
    .unwrap();
    c.start(&id).await.unwrap();
    let mut seen = Vec::new();
    for round in 0..4 {
        let mut waits = Vec::new();
        for n in 0..6 {
            let exec = format!("t{round}-{n}");
            c.exec(
                &id,
                &exec,
                &[
                    "/bin/sh".into(),
                    "-c".into(),
                    "[ -t 1 ] && echo on-a-tty".into(),
                ],
                &[],
                false,
                true,
            )
            .unwrap();
            let c = c.clone();
            let id = id.clone();
            waits.push(tokio::spawn(async move {
                assert_eq!(c.wait(&id, &exec).await.unwrap(), 0);
                output_of(&c, &id, &exec, "stdout").await
            }));
        }
        for w in waits {
            seen.push(w.await.unwrap());
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for b in busy {
        b.join().unwrap();
    }
    assert!(
        seen.iter().all(|s| s == "on-a-tty\r\n"),
        "{:?}",
        seen.iter()
            .filter(|s| *s != "on-a-tty\r\n")
            .collect::<Vec<_>>()
    );
    let chunk = c.read(&id, "", "stdout", 0, 4096, false).await.unwrap();
    assert_eq!(chunk.data, b"init-on-a-tty\r\n");
    // The init's terminal takes a signal through the runtime, and its exit is seen.
    c.signal(&id, "", 9).await.unwrap();
    assert_eq!(c.wait(&id, "").await.unwrap(), 128 + 9);
    c.remove(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pods_containers_share_one_network_namespace_of_their_own() {
    let Setup {
        dir: _dir,
        image,
        containers: c,
        id,
        _cleanup,
    } = setup();
    let req = |id: &str, script: &str| CreateContainerRequest {
        container_id: id.into(),
        image: image.clone(),
        args: vec!["/bin/sh".into(), "-c".into(), script.into()],
        ..Default::default()
    };
    // A server on the pod's loopback, and a client in another container reaching it there.
    let server = format!("{id}-3");
    let client = format!("{id}-4");
    c.create(&req(
        &server,
        "echo served on the pod localhost | nc -l -p 38611",
    ))
    .await
    .unwrap();
    c.start(&server).await.unwrap();
    c.create(&req(
        &client,
        "for i in $(seq 1 50); do nc 127.0.0.1 38611 && exit 0; sleep 0.1; done; exit 1",
    ))
    .await
    .unwrap();
    c.start(&client).await.unwrap();
    assert_eq!(c.wait(&client, "").await.unwrap(), 0);
    assert_eq!(
        output(&c, &client, "stdout").await,
        "served on the pod localhost\n"
    );
    assert_eq!(c.wait(&server, "").await.unwrap(), 0);
    // The pod's namespace is not the agent's: nothing of the pod listens on this loopback.
    assert!(std::net::TcpStream::connect(("127.0.0.1", 38611)).is_err());
    c.remove(&server).await.unwrap();
    c.remove(&client).await.unwrap();
    // The sandbox's end lets the namespace go.
    let netns = _dir.path().join("bundles/.netns");
    assert!(netns.exists());
    c.remove_all().await.unwrap();
    assert!(!netns.exists());
}
