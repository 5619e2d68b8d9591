//! `coffer run --sandbox process` end to end, as the acceptance scripts use it: a real coffer-kbs
//! (in this process) trusting the emulated PSP, reference values from `coffer measure`, Debian's
//! docker-registry serving an image skopeo encrypted to a key only the KBS holds, and the agent
//! running containers on runc inside its namespaces. Then `-d`, `coffer exec|logs|ps|rm`,
//! owner-signed exec, sealed logs, and what killing the launcher, the agent or the keeper leaves.

mod common;

use std::{
    io::BufRead,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use coffer_agent::api::proto::{ExecProcessRequest, IssueExecNonceRequest};

async fn cli(args: Vec<String>) -> (Option<i32>, String, String) {
    tokio::task::spawn_blocking(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_coffer"))
            .args(&args)
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    })
    .await
    .unwrap()
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// A KBS, a registry with the encrypted image, an emulated PSP and a state directory.
struct World {
    dir: tempfile::TempDir,
    psp_dir: PathBuf,
    agent: PathBuf,
    kbs: coffer_testkit::TestKbs,
    image: String,
    state: PathBuf,
    registry: common::Registry,
}

async fn world() -> World {
    world_with(None).await
}

/// A world whose registry wants basic auth `creds` ("user:password") when given.
async fn world_with(creds: Option<&str>) -> World {
    world_at("127.0.0.1", creds).await
}

/// A world whose KBS and registry listen on `ip` (loopback, or an address of the test's own
/// network namespace that a sandbox on its CNI network reaches).
async fn world_at(ip: &str, creds: Option<&str>) -> World {
    world_of(ip, creds, None).await
}

/// A world whose image holds `busybox` (a static busybox and its OCI architecture).
async fn world_of(ip: &str, creds: Option<&str>, busybox: Option<(&[u8], &str)>) -> World {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let agent = common::agent_binary();
    let psp_dir = d.join("psp");
    coffer_psp::EmulatedPsp::load_or_generate(&psp_dir).unwrap();
    let kbs = coffer_testkit::start_kbs_at(d, ip.parse().unwrap(), |c| {
        c.allow_emulated = true;
        c.emulated_root = Some(psp_dir.join("roots.pem"));
    })
    .await;

    // The image, pushed by skopeo encrypted to a JWE key whose private half only the KBS holds.
    let registry = match creds {
        None => common::Registry::start_at(ip, None),
        Some(c) => {
            let (user, pass) = c.split_once(':').unwrap();
            let hash = bcrypt::hash(pass, 4).unwrap();
            common::Registry::start_at(ip, Some(&format!("{user}:{hash}")))
        }
    };
    let image = common::push_encrypted_busybox_of(d, &registry.addr, creds, busybox);
    kbs.admin
        .set_resource(
            "default/image-keys/app",
            std::fs::read(d.join("img.pem")).unwrap(),
        )
        .await
        .unwrap();
    World {
        state: d.join("sandboxes"),
        dir,
        psp_dir,
        agent,
        kbs,
        image,
        registry,
    }
}

/// A test that fails half-way leaves no sandbox running: each keeper left is asked to tear down.
impl Drop for World {
    fn drop(&mut self) {
        for e in std::fs::read_dir(&self.state)
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(pid) = std::fs::read_to_string(e.path().join("keeper.pid")) {
                let _ = Command::new("kill").args(["-TERM", pid.trim()]).status();
            }
        }
    }
}

impl World {
    fn d(&self) -> &Path {
        self.dir.path()
    }

    /// `coffer initdata new --kbs-url URL --image-key … EXTRA > FILE`.
    async fn initdata(&self, file: &str, extra: &[&str]) -> PathBuf {
        let mut args = s(&[
            "initdata",
            "new",
            "--kbs-url",
            &self.kbs.url,
            "--image-key",
            "kbs:///default/image-keys/app",
        ]);
        args.extend(s(extra));
        let (code, text, stderr) = cli(args).await;
        assert_eq!(code, Some(0), "{stderr}");
        let path = self.d().join(file);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Registers the reference values `coffer measure` prints for each initdata.
    async fn register(&self, initdatas: &[&Path]) {
        self.register_for(&["--sandbox", "process"], initdatas)
            .await
    }

    /// Registers the reference values `coffer measure SANDBOX…` prints for each initdata.
    async fn register_for(&self, sandbox: &[&str], initdatas: &[&Path]) {
        let mut all: Option<serde_json::Value> = None;
        for i in initdatas {
            let mut args = s(&["measure"]);
            args.extend(s(sandbox));
            args.extend(s(&["--initdata", &i.display().to_string()]));
            if sandbox.contains(&"process") {
                args.extend(s(&["--agent", &self.agent.display().to_string()]));
            }
            args.extend(s(&["--psp-dir", &self.psp_dir.display().to_string()]));
            let (code, refs, stderr) = cli(args).await;
            assert_eq!(code, Some(0), "{stderr}");
            let refs: serde_json::Value = serde_json::from_str(&refs).unwrap();
            match &mut all {
                None => all = Some(refs),
                Some(a) => {
                    let more = refs["init_data"].as_array().unwrap().clone();
                    a["init_data"].as_array_mut().unwrap().extend(more);
                }
            }
        }
        self.kbs
            .admin
            .set_reference_values(all.unwrap().to_string().as_bytes())
            .await
            .unwrap();
    }

    /// `coffer run --sandbox process …` as the acceptance scripts write it.
    fn run(&self, initdata: &Path, name: &str, flags: &[&str], command: &[&str]) -> Vec<String> {
        self.run_in(&["--sandbox", "process"], initdata, name, flags, command)
    }

    /// `coffer run SANDBOX… --kbs … --initdata …` as the acceptance scripts write it.
    fn run_in(
        &self,
        sandbox: &[&str],
        initdata: &Path,
        name: &str,
        flags: &[&str],
        command: &[&str],
    ) -> Vec<String> {
        let mut v = s(&["run"]);
        v.extend(s(sandbox));
        v.extend(s(&["--kbs", &self.kbs.url, "--initdata"]));
        v.push(initdata.display().to_string());
        v.extend(s(&["--plain-http", "--name", name]));
        v.extend(s(flags));
        v.extend(self.local());
        v.push(self.image.clone());
        if !command.is_empty() {
            v.push("--".into());
            v.extend(s(command));
        }
        v
    }

    /// `coffer run -d` of `/bin/sh -c SCRIPT` in sandbox `name`; it must start.
    async fn detached(&self, initdata: &Path, name: &str, script: &str) {
        let (code, stdout, stderr) =
            cli(self.run(initdata, name, &["-d"], &["/bin/sh", "-c", script])).await;
        assert_eq!(code, Some(0), "{stderr}");
        assert_eq!(stdout, format!("{name}\n"));
    }

    /// [`World::detached`] in the sandbox `sandbox` (`--sandbox …` and its flags).
    async fn detached_in(&self, sandbox: &[&str], initdata: &Path, name: &str, script: &str) {
        let (code, stdout, stderr) =
            cli(self.run_in(sandbox, initdata, name, &["-d"], &["/bin/sh", "-c", script])).await;
        assert_eq!(code, Some(0), "{stderr}");
        assert_eq!(stdout, format!("{name}\n"));
    }

    /// Where this test keeps its PSP, agent and sandboxes.
    fn local(&self) -> Vec<String> {
        vec![
            "--psp-dir".into(),
            self.psp_dir.display().to_string(),
            "--agent".into(),
            self.agent.display().to_string(),
            "--state-dir".into(),
            self.state.display().to_string(),
        ]
    }

    fn state_flag(&self) -> Vec<String> {
        vec!["--state-dir".into(), self.state.display().to_string()]
    }

    /// `coffer CMD ARGS… --state-dir STATE`.
    async fn ctl(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let mut v = s(args);
        let at = v.iter().position(|a| a == "--").unwrap_or(v.len());
        v.splice(at..at, self.state_flag());
        cli(v).await
    }
}

/// Processes whose command line mentions `needle`.
fn processes_with(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if !e
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            if c.contains(needle) {
                found.push(format!("{}: {c}", e.file_name().to_string_lossy()));
            }
        }
    }
    found
}

/// Cgroup directories left for sandbox `name`, in any hierarchy.
fn cgroups_of(name: &str) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .filter(|l| l.contains(" - cgroup"))
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| Path::new(m).join("coffer").join(name))
        .filter(|p| p.exists())
        .collect()
}

/// `kill -9 PID`.
fn kill9(pid: &str) {
    assert!(Command::new("kill")
        .args(["-9", pid])
        .status()
        .unwrap()
        .success());
}

/// Whether process `pid` has fully exited: gone, or a zombie whose every thread has exited. A
/// process killed a moment ago can still hold its files (the keeper's lock among them) after its
/// command line reads empty, and after its main thread is a zombie while another thread of it
/// is still exiting (the files go with the last thread).
fn exited(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
                && std::fs::read_dir(format!("/proc/{pid}/task"))
                    .map(|threads| threads.count() <= 1)
                    .unwrap_or(true)
        }
        Err(_) => true,
    }
}

/// Waits for `cond`, up to 20 s.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let until = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < until, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `coffer logs …` once the container has written something (it runs detached).
async fn logs_until(w: &World, args: &[&str]) -> String {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, out, err) = w.ctl(args).await;
        assert_eq!(code, Some(0), "{err}");
        if !out.is_empty() || Instant::now() > until {
            return out;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Nothing of sandbox `name` (whose container ran `marker`) is left: processes, cgroups,
/// mounts, files.
async fn nothing_left(w: &World, name: &str, marker: &str) {
    let dir = w.state.join(name);
    let until = Instant::now() + Duration::from_secs(20);
    while dir.exists() {
        assert!(
            Instant::now() < until,
            "sandbox {name} is still there; keeper log: {:?}; processes: {:?}",
            std::fs::read_to_string(dir.join("keeper.log")),
            processes_with(&dir.display().to_string())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = || {
        let mut p = processes_with(marker);
        p.extend(processes_with(&dir.display().to_string()));
        p
    };
    let until = Instant::now() + Duration::from_secs(20);
    while !left().is_empty() {
        assert!(
            Instant::now() < until,
            "processes of {name} remain: {:?}",
            left()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(cgroups_of(name).is_empty(), "{:?}", cgroups_of(name));
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&dir.display().to_string()), "{mounts}");
}

/// `coffer run SANDBOX… NAME` of a command that greets from `place` on stdout, writes to stderr
/// and exits 7: both streams and the status come through, and nothing is left afterwards.
/// Returns the command.
async fn runs_and_exits_7(
    w: &World,
    sandbox: &[&str],
    init: &Path,
    name: &str,
    place: &str,
) -> [String; 3] {
    let greeting = format!("hello from {place}");
    let cmd = [
        "/bin/sh".to_string(),
        "-c".to_string(),
        format!("echo {greeting}; echo to stderr >&2; exit 7"),
    ];
    let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let (code, stdout, stderr) = cli(w.run_in(sandbox, init, name, &[], &args)).await;
    assert_eq!(code, Some(7), "{stderr}");
    assert_eq!(stdout, format!("{greeting}\n"));
    assert!(
        stderr.contains("to stderr") && stderr.contains("EMULATED TEE"),
        "{stderr}"
    );
    nothing_left(w, name, &greeting).await;
    cmd
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registered_run_prints_the_output_of_an_image_only_the_kbs_can_open() {
    let w = world().await;
    let init = w.initdata("initdata.toml", &[]).await;
    w.register(&[&init]).await;

    let owned = runs_and_exits_7(&w, &["--sandbox", "process"], &init, "r1", "the sandbox").await;
    let cmd: Vec<&str> = owned.iter().map(String::as_str).collect();

    // A permissive initdata nobody registered: the agent starts, the KBS releases nothing.
    std::fs::write(
        w.d().join("open.rego"),
        "package agent_policy\ndefault CreateContainerRequest := true\ndefault ExecProcessRequest := true\n",
    )
    .unwrap();
    let open = w
        .initdata(
            "open.toml",
            &["--policy", w.d().join("open.rego").to_str().unwrap()],
        )
        .await;
    let (code, stdout, stderr) = cli(w.run(&open, "r2", &[], &cmd)).await;
    assert_ne!(code, Some(0));
    assert!(stdout.is_empty());
    // The error says the KBS refused the key, and which.
    assert!(
        stderr.contains("kbs:///default/image-keys/app") && stderr.contains("KBS refused"),
        "{stderr}"
    );
    assert!(!w.state.join("r2").exists());

    // The initdata names another KBS than --kbs: refused before anything starts.
    let mut args = w.run(&init, "r3", &[], &cmd);
    let at = args.iter().position(|a| a == &w.kbs.url).unwrap();
    args[at] = "http://127.0.0.1:1".into();
    let (code, _, stderr) = cli(args).await;
    assert_ne!(code, Some(0));
    assert!(stderr.contains("the initdata names KBS"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_initdata_pinned_to_one_container_runs_it_and_refuses_any_other() {
    let w = world().await;
    let cmd = ["/bin/sh", "-c", "echo pinned run"];
    let mut extra = vec![
        "--container",
        &w.image,
        "--name",
        "pinned",
        "--plain-http",
        "--",
    ];
    extra.extend(cmd);
    let init = w.initdata("pinned.toml", &extra).await;
    w.register(&[&init]).await;

    let (code, stdout, stderr) = cli(w.run(&init, "pinned", &[], &cmd)).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "pinned run\n");
    // Another command, another name, a terminal: each refused, naming what differs.
    for (name, flags, command, why) in [
        (
            "pinned",
            &[][..],
            &["/bin/sh", "-c", "cat /etc/passwd"][..],
            "args[2] is \"cat /etc/passwd\", the policy allows \"echo pinned run\"",
        ),
        (
            "other",
            &[],
            &cmd,
            "container \"other\" is not in the policy, which allows [\"pinned\"]",
        ),
        (
            "pinned",
            &["-t"],
            &cmd,
            "tty is true, the policy allows false",
        ),
    ] {
        let (code, stdout, stderr) = cli(w.run(&init, name, flags, command)).await;
        assert_ne!(code, Some(0));
        assert!(stdout.is_empty(), "{stdout}");
        assert!(
            stderr.contains(&format!("denied by policy: CreateContainerRequest: {why}")),
            "{stderr}"
        );
    }
    // A policy file and a pinned container are one or the other.
    let (code, _, stderr) = cli(s(&[
        "initdata",
        "new",
        "--kbs-url",
        &w.kbs.url,
        "--policy",
        "x.rego",
        "--container",
        &w.image,
        "--name",
        "n",
    ]))
    .await;
    assert_ne!(code, Some(0));
    assert!(stderr.contains("cannot be used with"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn detached_containers_take_exec_only_as_the_policy_or_the_owner_allows() {
    let w = world().await;
    let d = w.d();
    common::openssl(
        d,
        &["genpkey", "-algorithm", "ed25519", "-out", "owner.pem"],
    );
    common::openssl(
        d,
        &["pkey", "-in", "owner.pem", "-pubout", "-out", "owner.pub"],
    );
    let init = w
        .initdata(
            "initdata.toml",
            &["--owner-key", d.join("owner.pub").to_str().unwrap()],
        )
        .await;
    w.register(&[&init]).await;

    let (code, stdout, stderr) = cli(w.run(
        &init,
        "app",
        &["-d"],
        &[
            "/bin/sh",
            "-c",
            "echo started; echo secret-data > /tmp/s; exec sleep 3013",
        ],
    ))
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "app\n");

    // The agent has its own network; it reached the KBS and the registry only through the
    // launcher's forwarding channel, which logged both.
    let agent = processes_with(&w.state.join("app").display().to_string())
        .into_iter()
        .find(|p| p.contains(&format!(": {} --listen", w.agent.display())))
        .unwrap();
    let pid = agent.split(':').next().unwrap();
    assert_ne!(
        std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap(),
        std::fs::read_link("/proc/self/ns/net").unwrap()
    );
    let egress = std::fs::read_to_string(w.state.join("app/egress.log")).unwrap();
    let kbs_host = w
        .kbs
        .url
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    let registry = w
        .image
        .trim_start_matches("docker://")
        .split('/')
        .next()
        .unwrap();
    assert!(egress.contains(kbs_host.trim_end_matches('/')), "{egress}");
    assert!(egress.contains(registry), "{egress}");

    let (code, stdout, _) = w.ctl(&["ps"]).await;
    assert_eq!(code, Some(0));
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("app ") && l.contains("running") && l.contains(&w.image)),
        "{stdout}"
    );
    assert_eq!(logs_until(&w, &["logs", "app"]).await, "started\n");

    // Exec under the default policy: refused, naming the policy; nothing of the container.
    let (code, stdout, stderr) = w.ctl(&["exec", "app", "--", "cat", "/tmp/s"]).await;
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("denied by policy: ExecProcessRequest"),
        "{stderr}"
    );
    assert!(!stdout.contains("secret-data") && !stderr.contains("secret-data"));

    // Signed by the owner: runs once, with its own output and status.
    let owner = d.join("owner.pem").display().to_string();
    let (code, stdout, stderr) = w
        .ctl(&[
            "exec",
            "app",
            "--owner-key",
            &owner,
            "--",
            "/bin/sh",
            "-c",
            "cat /tmp/s; exit 4",
        ])
        .await;
    assert_eq!(code, Some(4), "{stderr}");
    assert_eq!(stdout, "secret-data\n");

    // With a terminal (the signature covers `tty` too).
    let (code, stdout, stderr) = w
        .ctl(&[
            "exec",
            "app",
            "-t",
            "--owner-key",
            &owner,
            "--",
            "/bin/sh",
            "-c",
            "[ -t 1 ] && echo on-a-tty",
        ])
        .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "on-a-tty\r\n");

    // The owner's signature covers the exec, not what the host types into it: stdin stays
    // with the policy, which denies it by default.
    let mut exec = Command::new(env!("CARGO_BIN_EXE_coffer"))
        .args(["exec", "app", "-i", "--owner-key", &owner])
        .args(w.state_flag())
        .args(["--", "/bin/sh", "-c", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut exec.stdin.take().unwrap(), b"typed by the host\n").unwrap();
    let out = exec.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("denied by policy: WriteStreamRequest"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());

    // A captured signed request replayed, or altered, is refused.
    let mut c = coffer_agent::api::connect_unix(&w.state.join("app/agent.sock"))
        .await
        .unwrap();
    let nonce = c
        .issue_exec_nonce(IssueExecNonceRequest {
            container_id: "app".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .nonce;
    let mut req = ExecProcessRequest {
        container_id: "app".into(),
        exec_id: "signed-1".into(),
        args: s(&["true"]),
        nonce,
        ..Default::default()
    };
    let signer =
        coffer_image::sign::PemSigner::from_pem(&std::fs::read(d.join("owner.pem")).unwrap())
            .unwrap();
    req.owner_signature = signer
        .sign(&coffer_agent::owner::exec_message(&req))
        .unwrap();
    c.exec_process(req.clone()).await.unwrap();
    req.exec_id = "signed-2".into();
    let e = c.exec_process(req.clone()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().contains("nonce"), "{}", e.message());
    let audit = std::fs::read_to_string(w.state.join("app/audit.jsonl")).unwrap();
    assert!(audit.contains("owner signature"), "{audit}");

    // rm refuses a running container without -f; -f tears everything down.
    let (code, _, stderr) = w.ctl(&["rm", "app"]).await;
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("is running") && stderr.contains("rm -f"),
        "{stderr}"
    );
    let (code, _, stderr) = w.ctl(&["rm", "-f", "app"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    nothing_left(&w, "app", "3013").await;
    let (_, stdout, _) = w.ctl(&["ps"]).await;
    assert!(!stdout.contains("app"), "{stdout}");
    let (code, _, stderr) = w.ctl(&["logs", "app"]).await;
    assert_ne!(code, Some(0));
    assert!(stderr.contains("no sandbox named app"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sealed_logs_are_ciphertext_on_the_host_and_plaintext_with_the_owner_key() {
    let w = world().await;
    let d = w.d();
    common::openssl(d, &["genpkey", "-algorithm", "x25519", "-out", "log.pem"]);
    common::openssl(d, &["pkey", "-in", "log.pem", "-pubout", "-out", "log.pub"]);
    let init = w
        .initdata(
            "initdata.toml",
            &["--log-recipient", d.join("log.pub").to_str().unwrap()],
        )
        .await;
    w.register(&[&init]).await;

    let cmd = [
        "/bin/sh",
        "-c",
        "echo confidential-output; echo confidential-err >&2",
    ];
    let (code, stdout, stderr) = cli(w.run(&init, "s1", &[], &cmd)).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        !stdout.contains("confidential-") && !stderr.contains("confidential-"),
        "{stdout}{stderr}"
    );
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    std::fs::write(d.join("sealed.jsonl"), &stdout).unwrap();
    let key = d.join("log.pem").display().to_string();
    let (code, plain, err) = cli(s(&[
        "logs",
        "--owner-key",
        &key,
        "--sealed",
        d.join("sealed.jsonl").to_str().unwrap(),
    ]))
    .await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(plain, "confidential-output\n");
    assert_eq!(err, "confidential-err\n");

    // A record moved to another offset does not open.
    let moved = stdout.replacen("\"offset\":0", "\"offset\":1", 1);
    std::fs::write(d.join("moved.jsonl"), moved).unwrap();
    let (code, _, err) = cli(s(&[
        "logs",
        "--owner-key",
        &key,
        "--sealed",
        d.join("moved.jsonl").to_str().unwrap(),
    ]))
    .await;
    assert_ne!(code, Some(0));
    assert!(err.contains("does not open"), "{err}");

    // Detached: `coffer logs` shows ciphertext, and plaintext with the key; another key fails.
    let (code, _, stderr) = cli(w.run(
        &init,
        "s2",
        &["-d"],
        &["/bin/sh", "-c", "echo confidential-later; exec sleep 3014"],
    ))
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    let plain = logs_until(&w, &["logs", "s2", "--owner-key", &key]).await;
    assert_eq!(plain, "confidential-later\n");
    let (_, sealed, _) = w.ctl(&["logs", "s2"]).await;
    assert!(
        sealed.contains("\"record\"") && !sealed.contains("confidential-"),
        "{sealed}"
    );
    common::openssl(d, &["genpkey", "-algorithm", "x25519", "-out", "other.pem"]);
    let (code, _, err) = w
        .ctl(&[
            "logs",
            "s2",
            "--owner-key",
            d.join("other.pem").to_str().unwrap(),
        ])
        .await;
    assert_ne!(code, Some(0));
    assert!(err.contains("does not open"), "{err}");
    let (code, _, stderr) = w.ctl(&["rm", "-f", "s2"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    nothing_left(&w, "s2", "3014").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_launcher_the_agent_or_the_keeper_leaves_nothing() {
    let w = world().await;
    let init = w.initdata("initdata.toml", &[]).await;
    w.register(&[&init]).await;

    // kill -9 of a foreground `coffer run`.
    let mut run = Command::new(env!("CARGO_BIN_EXE_coffer"))
        .args(w.run(
            &init,
            "k1",
            &[],
            &["/bin/sh", "-c", "echo ready; exec sleep 3021"],
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(w.d().join("k1.err")).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(run.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(
        line,
        "ready\n",
        "{:?}",
        std::fs::read_to_string(w.d().join("k1.err"))
    );
    assert!(!processes_with("3021").is_empty());
    assert!(!cgroups_of("k1").is_empty(), "the container has its cgroup");
    run.kill().unwrap();
    run.wait().unwrap();
    nothing_left(&w, "k1", "3021").await;

    // kill -9 of the agent of a detached sandbox.
    w.detached(&init, "k2", "exec sleep 3022").await;
    let agent = processes_with(&w.state.join("k2").display().to_string())
        .into_iter()
        .find(|p| p.contains(&format!(": {} --listen", w.agent.display())))
        .unwrap();
    let pid = agent.split(':').next().unwrap();
    kill9(pid);
    nothing_left(&w, "k2", "3022").await;

    // kill -9 of the keeper: the sandbox dies with it; `coffer ps` removes what is left.
    w.detached(&init, "k3", "exec sleep 3023").await;
    let keeper = std::fs::read_to_string(w.state.join("k3/keeper.pid")).unwrap();
    kill9(keeper.trim());
    eventually("the container to die with its keeper", || {
        exited(keeper.trim()) && processes_with("3023").is_empty()
    })
    .await;
    let (code, stdout, stderr) = w.ctl(&["ps"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stdout.contains("k3"), "{stdout}");
    nothing_left(&w, "k3", "3023").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_credentials_and_the_signature_policy_come_from_the_kbs() {
    let w = world_with(Some("puller:s3cret-pass")).await;
    let d = w.d();
    let registry = w
        .image
        .trim_start_matches("docker://")
        .split('/')
        .next()
        .unwrap();
    let auth = serde_json::json!({"auths": {registry: {"auth": "cHVsbGVyOnMzY3JldC1wYXNz"}}});
    std::fs::write(d.join("auth.json"), auth.to_string()).unwrap();
    let admin = &w.kbs.admin;
    admin
        .set_resource("default/registry/auth", auth.to_string().into_bytes())
        .await
        .unwrap();
    // Only images signed by the owner's cosign key, whose public half the KBS holds.
    common::openssl(
        d,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "c.key",
        ],
    );
    common::openssl(d, &["ec", "-in", "c.key", "-pubout", "-out", "c.pub"]);
    let (code, _, stderr) = cli(s(&[
        "image",
        "sign",
        "--plain-http",
        "--authfile",
        d.join("auth.json").to_str().unwrap(),
        "--cosign-key",
        d.join("c.key").to_str().unwrap(),
        &w.image,
    ]))
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    admin
        .set_resource(
            "default/policy/images",
            br#"{"default": [{"type": "sigstoreSigned", "keyPath": "kbs:///default/keys/cosign"}]}"#
                .to_vec(),
        )
        .await
        .unwrap();
    let init = w
        .initdata(
            "initdata.toml",
            &[
                "--registry-auth",
                "kbs:///default/registry/auth",
                "--signature-policy",
                "kbs:///default/policy/images",
            ],
        )
        .await;
    w.register(&[&init]).await;
    let cmd = ["/bin/sh", "-c", "echo signed and private"];

    // The policy's key is not released yet: nothing runs, and the error names it.
    let (code, stdout, stderr) = cli(w.run(&init, "p1", &[], &cmd)).await;
    assert_ne!(code, Some(0));
    assert!(stdout.is_empty());
    assert!(stderr.contains("kbs:///default/keys/cosign"), "{stderr}");

    admin
        .set_resource(
            "default/keys/cosign",
            std::fs::read(d.join("c.pub")).unwrap(),
        )
        .await
        .unwrap();
    let (code, stdout, stderr) = cli(w.run(&init, "p2", &[], &cmd)).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "signed and private\n");

    // Without the credentials from the KBS the registry refuses the agent.
    let anon = w.initdata("anon.toml", &[]).await;
    w.register(&[&init, &anon]).await;
    let (code, _, stderr) = cli(w.run(&anon, "p3", &[], &cmd)).await;
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("could not create the container"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stdin_and_terminals_as_the_policy_allows() {
    let w = world().await;
    let d = w.d();
    // The default policy plus writes to stdin.
    let policy = format!(
        "{}\ndefault WriteStreamRequest := true\n",
        coffer_agent::policy::DEFAULT_POLICY.replace("default WriteStreamRequest := false", "")
    );
    std::fs::write(d.join("stdin.rego"), policy).unwrap();
    let stdin_ok = w
        .initdata(
            "stdin.toml",
            &["--policy", d.join("stdin.rego").to_str().unwrap()],
        )
        .await;
    let default = w.initdata("initdata.toml", &[]).await;
    w.register(&[&stdin_ok, &default]).await;
    let with_input = |args: Vec<String>, input: &'static [u8]| {
        tokio::task::spawn_blocking(move || {
            let mut child = Command::new(env!("CARGO_BIN_EXE_coffer"))
                .args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            std::io::Write::write_all(&mut child.stdin.take().unwrap(), input).unwrap();
            let out = child.wait_with_output().unwrap();
            (
                out.status.code(),
                String::from_utf8(out.stdout).unwrap(),
                String::from_utf8(out.stderr).unwrap(),
            )
        })
    };

    let upper = ["/bin/sh", "-c", "tr a-z A-Z"];
    let (code, stdout, stderr) = with_input(w.run(&stdin_ok, "i1", &["-i"], &upper), b"piped in\n")
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "PIPED IN\n");

    // The default policy refuses the input; the container ends (its input is closed).
    let (code, stdout, stderr) = with_input(w.run(&default, "i2", &["-i"], &upper), b"typed\n")
        .await
        .unwrap();
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("denied by policy: WriteStreamRequest"),
        "{stderr}"
    );
    assert!(stdout.is_empty());

    // A terminal.
    let (code, stdout, stderr) = cli(w.run(
        &default,
        "i3",
        &["-t"],
        &["/bin/sh", "-c", "[ -t 0 ] && [ -t 1 ] && echo on-a-tty"],
    ))
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "on-a-tty\r\n");
    for n in ["i1", "i2", "i3"] {
        nothing_left(&w, n, "tr a-z").await;
    }
}

/// `coffer podvm build --out DIR` with this test's agent (package files cached per user).
async fn podvm(w: &World, out: &str) -> PathBuf {
    podvm_with(w, out, &w.agent).await
}

/// `coffer podvm build --out DIR --agent AGENT`: `agent` runs as the guest's init.
async fn podvm_with(w: &World, out: &str, agent: &Path) -> PathBuf {
    let dir = w.d().join(out);
    let (code, _, stderr) = cli(vec![
        "podvm".into(),
        "build".into(),
        "--out".into(),
        dir.display().to_string(),
        "--agent".into(),
        agent.display().to_string(),
    ])
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    dir
}

fn vm_args(podvm: &Path) -> Vec<String> {
    s(&["--sandbox", "vm", "--podvm", &podvm.display().to_string()])
}

/// The non-zero 4 KiB blocks of a sparse file (read only where it holds data), with offsets.
fn written_blocks(path: &Path) -> Vec<(u64, Vec<u8>)> {
    use rustix::fs::{seek, SeekFrom};
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len();
    let mut blocks = Vec::new();
    let mut at = 0;
    while at < len {
        let Ok(start) = seek(&f, SeekFrom::Data(at)) else {
            break;
        };
        let end = seek(&f, SeekFrom::Hole(start)).unwrap();
        let mut buf = vec![0u8; (end - start) as usize];
        f.read_exact_at(&mut buf, start).unwrap();
        for (i, b) in buf.chunks(4096).enumerate() {
            if b.iter().any(|&x| x != 0) {
                blocks.push((start + i as u64 * 4096, b.to_vec()));
            }
        }
        at = end;
    }
    blocks
}

fn files_of(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().to_string(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_vm_is_reproducible_measured_and_runs_only_as_built() {
    let w = world().await;
    let a = podvm(&w, "podvm-a").await;
    let b = podvm(&w, "podvm-b").await;
    let (fa, fb) = (files_of(&a), files_of(&b));
    assert_eq!(
        fa.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        [
            "cmdline",
            "initrd.img",
            "measurements.json",
            "root.img",
            "vmlinux",
            "vmlinuz"
        ]
    );
    for ((n, x), (_, y)) in fa.iter().zip(&fb) {
        assert!(x == y, "{n} differs between two builds");
    }
    let cmdline = std::fs::read_to_string(a.join("cmdline")).unwrap();
    assert!(cmdline.contains("coffer.verity="), "{cmdline}");

    let init = w.initdata("initdata.toml", &[]).await;
    let vm = vm_args(&a);
    let vm: Vec<&str> = vm.iter().map(String::as_str).collect();
    w.register_for(&vm, &[&init]).await;
    let owned = runs_and_exits_7(&w, &vm, &init, "v1", "the pod VM").await;
    let cmd: Vec<&str> = owned.iter().map(String::as_str).collect();

    // kill -9 of the keeper of a detached pod VM: QEMU dies with it; `coffer ps` removes the rest.
    // (The image has no /bin/sleep: busybox's shell runs the applet.)
    let (code, _, stderr) = cli(w.run_in(
        &vm,
        &init,
        "v3",
        &["-d"],
        &["/bin/sh", "-c", "exec sleep 3031"],
    ))
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stdout, stderr) = w.ctl(&["ps"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    if !(stdout.contains("v3") && stdout.contains("running")) {
        let (_, out, err) = w.ctl(&["logs", "v3"]).await;
        panic!(
            "{stdout}\n--- coffer logs v3 ---\n{out}\n{err}\n--- the pod VM's console ---\n{}",
            std::fs::read_to_string(w.state.join("v3/agent.log")).unwrap_or_default()
        );
    }
    let keeper = std::fs::read_to_string(w.state.join("v3/keeper.pid")).unwrap();
    let v3 = w.state.join("v3").display().to_string();
    assert!(
        processes_with(&v3)
            .iter()
            .any(|p| p.contains("qemu-system-x86_64")),
        "QEMU runs the sandbox"
    );
    kill9(keeper.trim());
    eventually("QEMU to die with its keeper", || {
        exited(keeper.trim()) && processes_with(&v3).is_empty()
    })
    .await;
    let (code, stdout, stderr) = w.ctl(&["ps"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stdout.contains("v3"), "{stdout}");
    nothing_left(&w, "v3", "3031").await;

    // The same image with one more word on the kernel command line, or another initrd:
    // measured differently, and the KBS releases nothing to it.
    let measure = |dir: PathBuf| {
        let mut args = s(&["measure", "--sandbox", "vm", "--podvm"]);
        args.push(dir.display().to_string());
        args.extend(s(&["--initdata", &init.display().to_string()]));
        async move {
            let (code, out, err) = cli(args).await;
            assert_eq!(code, Some(0), "{err}");
            serde_json::from_str::<serde_json::Value>(&out).unwrap()["measurement"].clone()
        }
    };
    let good = measure(a.clone()).await;
    std::fs::write(
        b.join("initrd.img"),
        [std::fs::read(b.join("initrd.img")).unwrap(), vec![0u8; 512]].concat(),
    )
    .unwrap();
    assert_ne!(measure(b.clone()).await, good);
    std::fs::copy(a.join("initrd.img"), b.join("initrd.img")).unwrap();
    assert_eq!(measure(b.clone()).await, good);
    std::fs::write(
        b.join("cmdline"),
        format!("{} init=/bin/sh\n", cmdline.trim()),
    )
    .unwrap();
    assert_ne!(measure(b.clone()).await, good);
    let altered = vm_args(&b);
    let altered: Vec<&str> = altered.iter().map(String::as_str).collect();
    let (code, stdout, stderr) = cli(w.run_in(&altered, &init, "v2", &[], &cmd)).await;
    assert_ne!(code, Some(0));
    assert!(stdout.is_empty());
    assert!(
        stderr.contains("kbs:///default/image-keys/app") && stderr.contains("KBS refused"),
        "{stderr}"
    );
    nothing_left(&w, "v2", "hello from the pod VM").await;
}

/// An IBM Z pod VM (s390x, big-endian) under QEMU's s390x emulation on this x86 host: built from
/// Debian's s390x packages with the agent built for s390x, it boots with its launch
/// configuration on a disk (s390x has no fw_cfg), attests with the emulated TEE to the KBS,
/// which releases the image key only to its registered measurement, and runs an s390x
/// container. The measurement is the one `coffer measure --sandbox vm` computes over the s390x
/// kernel, initrd and command line; a pod VM for s390x is refused KVM here, and a
/// hardware TEE of the other machine is refused.
#[tokio::test(flavor = "multi_thread")]
async fn an_s390x_pod_vm_attests_and_runs_an_s390x_container_under_emulation() {
    let scratch = tempfile::tempdir().unwrap();
    let podvm = scratch.path().join("podvm-s390x");
    let agent = coffer_testkit::s390x_agent();
    let (code, _, stderr) = cli(s(&[
        "podvm",
        "build",
        "--arch",
        "s390x",
        "--agent",
        &agent.display().to_string(),
        "--out",
        &podvm.display().to_string(),
    ]))
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    let cache = coffer_testkit::debs_cache();
    let busybox = coffer_testkit::s390x_busybox(&cache, scratch.path());
    let w = world_of("127.0.0.1", None, Some((&busybox, "s390x"))).await;
    let init = w.initdata("initdata.toml", &[]).await;
    let mut vm = vm_args(&podvm);
    let measured: Vec<&str> = vm.iter().map(String::as_str).collect();
    w.register_for(&measured, &[&init]).await;
    vm.extend(s(&["--accel", "tcg"]));
    let vm: Vec<&str> = vm.iter().map(String::as_str).collect();
    let (code, stdout, stderr) = cli(w.run_in(
        &vm,
        &init,
        "z1",
        &[],
        &["/bin/sh", "-c", "echo hello from IBM Z; uname -m"],
    ))
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "hello from IBM Z\ns390x\n", "{stderr}");
    assert!(stderr.contains("EMULATED TEE"), "{stderr}");
    nothing_left(&w, "z1", "hello from IBM Z").await;

    // KVM cannot run an s390x guest on this host; SEV-SNP is an x86 TEE.
    let mut kvm = vm.clone();
    *kvm.last_mut().unwrap() = "kvm";
    let (code, _, stderr) = cli(w.run_in(&kvm, &init, "z2", &[], &["true"])).await;
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("is for s390x, which this host's KVM cannot run"),
        "{stderr}"
    );
    let mut snp = vm.clone();
    snp.extend(["--tee", "snp"]);
    let (code, _, stderr) = cli(w.run_in(&snp, &init, "z3", &[], &["true"])).await;
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("an x86-64 TEE; this pod VM is for s390x"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_vm_keeps_container_data_encrypted_and_reports_a_tampered_disk() {
    let w = world().await;
    let dir = podvm(&w, "podvm").await;
    let init = w.initdata("initdata.toml", &[]).await;
    let vm = vm_args(&dir);
    let vm: Vec<&str> = vm.iter().map(String::as_str).collect();
    w.register_for(&vm, &[&init]).await;
    let marker = "COFFER-SCRATCH-MARKER-7d3f";
    // Writes 1 MiB of marker lines past the page cache, then reads them back from the disk
    // until a read fails.
    let script = format!(
        "yes {marker} | head -c 1048576 | dd of=/data bs=65536 oflag=direct iflag=fullblock 2>/dev/null; \
         sync; echo written; \
         while dd if=/data of=/dev/null bs=65536 iflag=direct 2>/tmp/err; do sleep 0.2; done; \
         cat /tmp/err; echo READ FAILED; exit 9"
    );
    let (code, stdout, stderr) =
        cli(w.run_in(&vm, &init, "t1", &["-d"], &["/bin/sh", "-c", &script])).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "t1\n");
    let until = Instant::now() + Duration::from_secs(120);
    while !logs_until(&w, &["logs", "t1"]).await.contains("written") {
        assert!(
            Instant::now() < until,
            "the container did not write its data"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The VM's only way out was the keeper's forwarder: to the KBS and the registry.
    let egress = std::fs::read_to_string(w.state.join("t1").join("egress.log")).unwrap();
    let registry = w
        .image
        .trim_start_matches("docker://")
        .split('/')
        .next()
        .unwrap();
    let kbs = w
        .kbs
        .url
        .trim_start_matches("http://")
        .trim_end_matches('/');
    for line in egress.lines() {
        assert!(line.contains(registry) || line.contains(kbs), "{line}");
    }
    assert!(
        egress.contains(registry) && egress.contains(kbs),
        "{egress}"
    );

    // The host's copy of the scratch disk holds the MiB written, but never the marker.
    let scratch = w.state.join("t1").join("scratch.img");
    let written = written_blocks(&scratch);
    assert!(
        written.len() * 4096 >= 1 << 20,
        "only {} blocks written",
        written.len()
    );
    let all: Vec<u8> = written
        .iter()
        .flat_map(|(_, b)| b.iter().copied())
        .collect();
    assert!(
        !all.windows(marker.len()).any(|x| x == marker.as_bytes()),
        "the marker is on the host's disk in plaintext"
    );

    // The host flips one byte in every written block: the guest's next read fails.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&scratch)
            .unwrap();
        for (at, b) in &written {
            f.write_all_at(&[b[100] ^ 0x5a], at + 100).unwrap();
        }
        f.sync_all().unwrap();
    }
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let out = logs_until(&w, &["logs", "t1"]).await;
        if out.contains("READ FAILED") {
            // dm-integrity fails the read with EILSEQ ("Invalid or incomplete multibyte or
            // wide character"), or EIO where the filesystem's own read failed first.
            assert!(
                out.contains("Invalid or incomplete multibyte") || out.contains("I/O error"),
                "{out}"
            );
            break;
        }
        assert!(
            Instant::now() < until,
            "the tampering went unnoticed: {out}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let console = std::fs::read_to_string(w.state.join("t1").join("agent.log")).unwrap();
    assert!(console.contains("Checksum failed"), "{console}");
    let (code, _, stderr) = w.ctl(&["rm", "-f", "t1"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    nothing_left(&w, "t1", marker).await;
}

/// A pod VM whose guest never starts the agent (busybox's init instead: it waits at a console
/// prompt forever) is stopped once its bound is up: the start fails with the reason and the
/// console's last lines, and nothing is left. Its keeper, left alone as a detached sandbox's
/// is, leaves a record: `coffer ps` shows it failed, `coffer logs` says why, `coffer rm`
/// removes it.
#[tokio::test(flavor = "multi_thread")]
async fn a_pod_vm_whose_agent_never_starts_fails_within_its_bound_with_its_console() {
    let w = world().await;
    let dir = podvm_with(&w, "stalling-podvm", Path::new("/bin/busybox")).await;
    let init = w.initdata("initdata.toml", &[]).await;
    let vm = vm_args(&dir);
    let mut vm: Vec<&str> = vm.iter().map(String::as_str).collect();
    vm.extend(["--accel", "tcg", "--ready-timeout", "12"]);
    let t = Instant::now();
    let (code, stdout, stderr) = cli(w.run_in(&vm, &init, "s1", &[], &["/bin/true"])).await;
    let took = t.elapsed();
    assert_ne!(code, Some(0));
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains("did not become ready within 12s")
            && stderr.contains("the last lines of its console")
            && stderr.contains("/etc/init.d/rcS"),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(60), "took {took:?}");
    nothing_left(&w, "s1", "s1/agent-chan.sock").await;

    // A keeper on its own (its launcher gone).
    let sandbox = w.state.join("s2");
    std::fs::create_dir_all(&sandbox).unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_coffer"))
        .arg("__sandbox")
        .args(["--dir", &sandbox.display().to_string(), "--name", "s2"])
        .args(["--agent", "/bin/busybox", "--initdata"])
        .arg(&init)
        .arg("--psp-dir")
        .arg(&w.psp_dir)
        .arg("--podvm")
        .arg(&dir)
        .args(["--accel", "tcg", "--ready-timeout", "8"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success());
    assert!(processes_with(&sandbox.display().to_string()).is_empty());
    let (code, stdout, stderr) = w.ctl(&["ps"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let row = stdout
        .lines()
        .find(|l| l.starts_with("s2 "))
        .unwrap_or_default();
    assert!(
        row.contains("failed: the pod VM's agent did not become ready within 8s"),
        "{stdout}"
    );
    let (code, _, stderr) = w.ctl(&["logs", "s2"]).await;
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("sandbox s2 failed") && stderr.contains("/etc/init.d/rcS"),
        "{stderr}"
    );
    // Only the record and the logs stay (no scratch disk, no sockets).
    let mut left: Vec<String> = std::fs::read_dir(&sandbox)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    left.sort();
    assert_eq!(left, ["agent.log", "failed", "keeper.lock", "qemu.log"]);
    let (code, _, stderr) = w.ctl(&["rm", "s2"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!sandbox.exists());
}

/// A test process killed with SIGKILL while its sandbox runs leaves nothing: each test runs in
/// a cell (scripts/test-cell), whose PID namespace takes every process with it and whose
/// temporary directory (keys, stores) is removed.
#[tokio::test(flavor = "multi_thread")]
async fn a_test_killed_with_sigkill_leaves_no_process_and_no_files() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("not root: the cell does not isolate here, nothing to check");
        return;
    }
    let w = world().await;
    let init = w.initdata("initdata.toml", &[]).await;
    w.register(&[&init]).await;
    let cell = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/test-cell");
    let report = w.d().join("cell-tmpdir");
    let state = w.d().join("cell-state");
    // The "test": writes its TMPDIR, starts a detached sandbox, then hangs.
    let mut run = w.run(
        &init,
        "victim",
        &["-d"],
        &["/bin/sh", "-c", "exec sleep 4041"],
    );
    let at = run.iter().position(|a| a == "--state-dir").unwrap();
    run[at + 1] = state.display().to_string();
    let script = format!(
        "echo \"$TMPDIR\" > {}; touch \"$TMPDIR/key.pem\"; {} \"$@\" && exec sleep 600",
        report.display(),
        env!("CARGO_BIN_EXE_coffer")
    );
    let mut child = Command::new(cell)
        .args(["sh", "-c", &script, "sh"])
        .args(&run)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The container's own process (not a command line that mentions it).
    let sleeping = || {
        processes_with("sleep 4041").iter().any(|p| {
            p.split_once(": ")
                .is_some_and(|(_, c)| c.starts_with("sleep 4041"))
        })
    };
    eventually("the detached sandbox to run", sleeping).await;
    let tmp = PathBuf::from(std::fs::read_to_string(&report).unwrap().trim());
    assert!(tmp.join("key.pem").exists());
    assert!(!processes_with(&state.join("victim").display().to_string()).is_empty());
    // SIGKILL, as nextest's timeout ends a test that ignored SIGTERM.
    child.kill().unwrap();
    child.wait().unwrap();
    eventually("every process of the killed test to be gone", || {
        !sleeping() && processes_with(&state.join("victim").display().to_string()).is_empty()
    })
    .await;
    eventually(
        "the killed test's temporary directory to be removed",
        || !tmp.exists(),
    )
    .await;
}

/// The raw `coffer measure --tee tdx` values for the pod VM in `dir` with `append`.
async fn tdx_raw(dir: &Path, firmware: &Path, append: &str) -> serde_json::Value {
    let (code, out, err) = cli(vec![
        "measure".to_string(),
        "--tee".into(),
        "tdx".into(),
        "--firmware".into(),
        firmware.display().to_string(),
        "--kernel".into(),
        dir.join("vmlinuz").display().to_string(),
        "--initrd".into(),
        dir.join("initrd.img").display().to_string(),
        "--append".into(),
        append.into(),
    ])
    .await;
    assert_eq!(code, Some(0), "{err}");
    serde_json::from_str(&out).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_vm_built_for_sev_snp_measures_as_amds_reference_tool_does() {
    // The firmware is built from Debian's edk2 source package (the first time, in the cache of
    // downloaded packages; about a minute per firmware on two cores).
    let w = world().await;
    let debian = std::fs::read("/usr/share/ovmf/OVMF.fd")
        .expect("Debian's OVMF (apt-get install -y ovmf; .ci/run and scripts/test do)");
    let plain = w.d().join("OVMF.fd");
    std::fs::write(&plain, &debian).unwrap();
    let build = |tee: &str, firmware: Option<&Path>, out: &str| {
        let out = w.d().join(out);
        let mut args = s(&["podvm", "build", "--out"]);
        args.push(out.display().to_string());
        args.push("--agent".into());
        args.push(w.agent.display().to_string());
        args.extend(s(&["--tee", tee]));
        if let Some(f) = firmware {
            args.push("--firmware".into());
            args.push(f.display().to_string());
        }
        async move { (cli(args).await, out) }
    };

    // Firmware without the kernel-hashes table would measure nothing of the kernel: refused
    // before anything is built.
    let ((code, _, stderr), out) = build("snp", Some(&plain), "podvm-plain").await;
    assert_ne!(code, Some(0));
    assert!(stderr.contains("kernel-hashes table"), "{stderr}");
    assert!(!out.exists());

    // OVMF's AmdSev build, made from Debian's edk2 source; `coffer podvm firmware` finds the
    // same image in the cache.
    let ((code, _, stderr), dir) = build("snp", None, "podvm-snp").await;
    assert_eq!(code, Some(0), "{stderr}");
    let (code, out, err) = cli(s(&["podvm", "firmware", "--tee", "snp"])).await;
    assert_eq!(code, Some(0), "{err}");
    let built: serde_json::Value = serde_json::from_str(&out).unwrap();
    let firmware = std::fs::read(dir.join("firmware-snp.fd")).unwrap();
    assert_eq!(
        firmware,
        std::fs::read(built["path"].as_str().unwrap()).unwrap()
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("measurements.json")).unwrap()).unwrap();
    assert_eq!(manifest["snp"]["firmware"], "firmware-snp.fd");
    assert_eq!(manifest["snp"]["firmware_sha256"], built["sha256"]);
    assert_eq!(manifest["snp"]["edk2_source"], built["edk2_source"]);

    // The reference values' measurement is the launch digest AMD's sev-snp-measure computes for
    // the same firmware, kernel, initrd, command line, vCPUs and model.
    let init = w.initdata("initdata.toml", &[]).await;
    let init_digest = hex::encode(
        coffer_wire::initdata::digest(&std::fs::read_to_string(&init).unwrap()).unwrap(),
    );
    let cmdline = std::fs::read_to_string(dir.join("cmdline")).unwrap();
    for (vcpus, cpu) in [("2", "EPYC-Milan"), ("4", "EPYC-Genoa"), ("1", "EPYC-Rome")] {
        let (code, out, err) = cli(s(&[
            "measure",
            "--sandbox",
            "vm",
            "--tee",
            "snp",
            "--podvm",
            &dir.display().to_string(),
            "--initdata",
            &init.display().to_string(),
            "--vcpus",
            vcpus,
            "--cpu",
            cpu,
        ]))
        .await;
        assert_eq!(code, Some(0), "{err}");
        let refs: serde_json::Value = serde_json::from_str(&out).unwrap();
        let reference = std::process::Command::new("sev-snp-measure")
            .args([
                "--mode",
                "snp",
                "--vcpus",
                vcpus,
                "--vcpu-type",
                cpu,
                "--output-format",
                "hex",
            ])
            .arg("--ovmf")
            .arg(dir.join("firmware-snp.fd"))
            .arg("--kernel")
            .arg(dir.join("vmlinuz"))
            .arg("--initrd")
            .arg(dir.join("initrd.img"))
            .arg("--append")
            .arg(cmdline.trim())
            .output()
            .expect("sev-snp-measure (pip install sev-snp-measure==0.0.13; .ci/run does)");
        assert!(
            reference.status.success(),
            "{}",
            String::from_utf8_lossy(&reference.stderr)
        );
        assert_eq!(
            refs["measurement"][0].as_str().unwrap(),
            String::from_utf8_lossy(&reference.stdout).trim(),
            "{vcpus} vCPUs, {cpu}"
        );
        assert_eq!(refs["init_data"][0].as_str().unwrap(), init_digest);
        assert!(refs.get("snp_tcb_min").is_none(), "{refs}");
    }

    // TDX: a file that is no TDVF is refused before anything is built.
    let ((code, _, stderr), out) = build("tdx", Some(&dir.join("vmlinuz")), "podvm-not-tdvf").await;
    assert_ne!(code, Some(0));
    assert!(stderr.contains("no TDX metadata"), "{stderr}");
    assert!(!out.exists());
    // A TDVF built from Debian's edk2 source; measurements.json and `coffer measure` give the
    // same MRTD (both host page orders), RTMR1 and RTMR2, with the initdata digest.
    let ((code, _, stderr), tdx) = build("tdx", None, "podvm-tdx").await;
    assert_eq!(code, Some(0), "{stderr}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tdx.join("measurements.json")).unwrap()).unwrap();
    let (code, out, err) = cli(s(&[
        "measure",
        "--sandbox",
        "vm",
        "--tee",
        "tdx",
        "--podvm",
        &tdx.display().to_string(),
        "--initdata",
        &init.display().to_string(),
    ]))
    .await;
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("RTMR0"), "{err}");
    let refs: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(refs["mr_td"], manifest["tdx"]["mr_td"]);
    assert_eq!(refs["rtmr1"][0], manifest["tdx"]["rtmr1"]);
    assert_eq!(refs["rtmr2"][0], manifest["tdx"]["rtmr2"]);
    assert_eq!(refs["init_data"][0].as_str().unwrap(), init_digest);
    let mrtd = refs["mr_td"].as_array().unwrap();
    assert_eq!(mrtd.len(), 2);
    assert_ne!(mrtd[0], mrtd[1]);
    assert!(
        mrtd.iter().all(|m| m.as_str().unwrap().len() == 96),
        "{refs}"
    );
    // The raw form gives the same; the command line moves RTMR2 only.
    let fw = tdx.join("firmware-tdx.fd");
    let tdx_cmdline = std::fs::read_to_string(tdx.join("cmdline")).unwrap();
    let raw = tdx_raw(&tdx, &fw, tdx_cmdline.trim()).await;
    assert_eq!(raw["mr_td"], refs["mr_td"]);
    assert_eq!(raw["rtmr1"], refs["rtmr1"]);
    assert_eq!(raw["rtmr2"], refs["rtmr2"]);
    let other = tdx_raw(&tdx, &fw, &format!("{} quiet", tdx_cmdline.trim())).await;
    assert_eq!(other["mr_td"], refs["mr_td"]);
    assert_eq!(other["rtmr1"], refs["rtmr1"]);
    assert_ne!(other["rtmr2"], refs["rtmr2"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sandbox_on_a_cni_network_serves_at_its_address_and_gives_it_back() {
    // The CNI bridge and the sandbox's address exist only in this test's network namespace.
    let _netns = common::containerd::TestNetns::enter();
    common::containerd::TestNetns::bridge("10.88.13.1/24");
    let w = world().await;
    let root = w.d().join("cni");
    common::containerd::TestNetns::cni_config(&root, "10.88.13.0/24");
    let conf = root.join("etc/cni/net.d").display().to_string();
    let init = w.initdata("initdata.toml", &[]).await;
    w.register(&[&init]).await;

    // What --network takes, refused before anything starts.
    let (code, _, stderr) = cli(w.run(&init, "n0", &["--network", "bridge"], &["true"])).await;
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("--network bridge: use none, host or cni"),
        "{stderr}"
    );
    let (code, _, stderr) = cli(w.run_in(
        &["--sandbox", "vm", "--podvm", w.d().to_str().unwrap()],
        &init,
        "n0",
        &["--network", "host"],
        &["true"],
    ))
    .await;
    assert_ne!(code, Some(0));
    assert!(stderr.contains("pod VM"), "{stderr}");

    // --network host: a process sandbox's containers see this (the test's) namespace, with
    // its bridge; nothing of the sandbox remains afterwards, its bind of the namespace included.
    let (code, stdout, stderr) = cli(w.run(
        &init,
        "h1",
        &["--network", "host"],
        &["/bin/sh", "-c", "ip -o link; echo on the host network"],
    ))
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("cfr0"), "{stdout}");
    nothing_left(&w, "h1", "on the host network").await;
    // --network none (the default): only the loopback.
    let (code, stdout, stderr) =
        cli(w.run(&init, "h2", &[], &["/bin/sh", "-c", "ip -o link"])).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("lo:") && !stdout.contains("cfr0"),
        "{stdout}"
    );

    // A web server on the CNI network: reached from here at the address the plugins gave it.
    // The sandbox name is unique on this machine: it names the network namespace.
    let name = format!(
        "w{}",
        w.d()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .trim_start_matches('.')
    );
    let (code, stdout, stderr) = cli(w.run(
        &init,
        &name,
        &["-d", "--network", "cni", "--cni-conf-dir", &conf],
        &[
            "/bin/sh",
            "-c",
            "mkdir -p /www && echo hello on the cni network > /www/index.html && exec httpd -f -p 8080 -h /www",
        ],
    ))
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, format!("{name}\n"));
    let address = stderr
        .lines()
        .find_map(|l| l.split("on the CNI network at ").nth(1))
        .unwrap_or_else(|| panic!("no address in {stderr}"))
        .to_string();
    let ip = address.split('/').next().unwrap().to_string();
    assert!(ip.starts_with("10.88.13."), "{address}");
    let netns = PathBuf::from(format!("/run/netns/coffer-{name}"));
    assert!(netns.exists());
    let page = tokio::task::spawn_blocking({
        let ip = ip.clone();
        move || common::http_get(&ip, 8080, Instant::now() + Duration::from_secs(30))
    })
    .await
    .unwrap();
    assert!(page.contains("hello on the cni network"), "{page}");
    let leases = root.join("var/lib/cni/coffer-test");
    assert!(leases.join(&ip).exists(), "host-local leased {ip}");

    // kill -9 of its keeper, then `coffer rm`: the plugins give the address back and the
    // namespace goes.
    let keeper = std::fs::read_to_string(w.state.join(&name).join("keeper.pid")).unwrap();
    kill9(keeper.trim());
    eventually("the keeper to die", || exited(keeper.trim())).await;
    let (code, _, stderr) = w.ctl(&["rm", &name]).await;
    assert_eq!(code, Some(0), "{stderr}");
    nothing_left(&w, &name, "hello on the cni network").await;
    assert!(!netns.exists(), "{} remains", netns.display());
    assert!(
        !leases.join(&ip).exists(),
        "the address {ip} is still leased"
    );
    let links = common::run_ok(Command::new("ip").args(["-o", "link"]));
    assert!(!links.contains("veth"), "{links}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_vm_on_a_cni_network_attests_and_pulls_over_it() {
    // The KBS and the registry listen on the CNI bridge's address in this test's own network
    // namespace: the pod VM reaches them over its CNI interface, not through this host's
    // forwarder. The pod VM is built first: its Debian packages may have to be downloaded,
    // which the test's namespace cannot reach.
    let built = tempfile::tempdir().unwrap();
    let podvm = built.path().join("podvm");
    common::build_podvm(&podvm);
    let _netns = common::containerd::TestNetns::enter();
    common::containerd::TestNetns::bridge("10.88.14.1/24");
    let w = world_at("10.88.14.1", None).await;
    let root = w.d().join("cni");
    common::containerd::TestNetns::cni_config(&root, "10.88.14.0/24");
    let conf = root.join("etc/cni/net.d").display().to_string();
    let vm = vm_args(&podvm);
    let vm: Vec<&str> = vm.iter().map(String::as_str).collect();
    let init = w.initdata("initdata.toml", &[]).await;
    w.register_for(&vm, &[&init]).await;
    let name = format!(
        "v{}",
        w.d()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .trim_start_matches('.')
    );
    let registry = w.registry.addr.clone();
    let script = format!(
        "ip -o addr show dev eth0; wget -q -O - http://{registry}/v2/ && echo && echo reached the registry"
    );
    let (code, stdout, stderr) = cli(w.run_in(
        &vm,
        &init,
        &name,
        &["--network", "cni", "--cni-conf-dir", &conf],
        &["/bin/sh", "-c", &script],
    ))
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    let address = stderr
        .lines()
        .find_map(|l| l.split("on the CNI network at ").nth(1))
        .unwrap_or_else(|| panic!("no address in {stderr}"))
        .to_string();
    let ip = address.split('/').next().unwrap().to_string();
    assert!(ip.starts_with("10.88.14."), "{address}");
    assert!(stdout.contains(&format!("inet {address}")), "{stdout}");
    assert!(stdout.contains("reached the registry"), "{stdout}");
    // The guest pulled its image itself, from its CNI address.
    let gets = w.registry.blob_gets();
    assert!(
        gets.iter().any(|l| l.starts_with(&format!("{ip} "))),
        "no blob request from {ip}: {gets:#?}"
    );
    nothing_left(&w, &name, "reached the registry").await;
    assert!(!PathBuf::from(format!("/run/netns/coffer-{name}")).exists());
    assert!(!root.join("var/lib/cni/coffer-test").join(&ip).exists());
    let links = common::run_ok(Command::new("ip").args(["-o", "link"]));
    assert!(!links.contains("veth"), "{links}");
}

/// `--sandbox remote --podvm PODVM --cloud SOCKET --ready-timeout SECS`.
fn remote_args(podvm: &Path, cloud: &Path, secs: u32) -> Vec<String> {
    let mut v = s(&["--sandbox", "remote", "--podvm"]);
    v.push(podvm.display().to_string());
    v.push("--cloud".into());
    v.push(cloud.display().to_string());
    v.extend(s(&["--ready-timeout", &secs.to_string()]));
    v
}

/// The names of `pool`'s volumes that belong to one VM (not the shared pod VM image).
fn vm_volumes(libvirtd: &common::libvirt::Libvirtd, pool: &str) -> Vec<String> {
    let _ = Command::new("virsh")
        .args(["-c", &libvirtd.uri, "pool-refresh", pool])
        .output();
    libvirtd
        .virsh(&["vol-list", pool])
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|v| !v.starts_with("coffer-podvm-"))
        .collect()
}

/// A peer pods test's world: the pod VM built (with `build_args`) before the test enters a
/// network namespace of its own (its packages may have to be downloaded, which the namespace
/// cannot reach), a bridge `bridge` at `NET.1/24` there, Debian's libvirtd and coffer-cloud on it
/// (`extra` in its `[libvirt]` section), and an initdata registered for the image's reference
/// values (a peer pod boots the same measured image as a local pod VM).
struct PeerPods {
    _built: tempfile::TempDir,
    podvm: PathBuf,
    _netns: common::containerd::TestNetns,
    w: World,
    libvirtd: common::libvirt::Libvirtd,
    cloud: common::libvirt::Cloud,
    init: PathBuf,
}

async fn peer_pods(build_args: &[&str], bridge: &str, net: &str, extra: &str) -> PeerPods {
    let built = tempfile::tempdir().unwrap();
    let podvm = built.path().join("podvm");
    common::build_podvm_with(&podvm, build_args);
    let netns = common::containerd::TestNetns::enter();
    common::containerd::TestNetns::bridge_named(bridge, &format!("{net}.1/24"));
    let w = world().await;
    let libvirtd = common::libvirt::Libvirtd::start(&w.d().join("libvirt"));
    let cloud = common::libvirt::Cloud::start_opts(
        w.d(),
        &libvirtd,
        &podvm,
        bridge,
        &format!("{net}.0/24"),
        &format!("{net}.1"),
        extra,
    );
    let vm = vm_args(&podvm);
    let vm: Vec<&str> = vm.iter().map(String::as_str).collect();
    let init = w.initdata("initdata.toml", &[]).await;
    w.register_for(&vm, &[&init]).await;
    PeerPods {
        _built: built,
        podvm,
        _netns: netns,
        w,
        libvirtd,
        cloud,
        init,
    }
}

#[tokio::test]
async fn a_peer_pod_runs_in_a_libvirt_vm_that_goes_with_its_sandbox() {
    // Debian's libvirtd in this test's network and mount namespaces creates the pod VM (TCG,
    // emulated TEE) on the test's bridge; the keeper reaches its agent over mutual TLS on the
    // VM's address, and the guest's own traffic (the KBS, the registry on this namespace's
    // loopback) goes through the keeper's logged forwarder. The pod VM is built first: its
    // packages may have to be downloaded, which the namespace cannot reach.
    let PeerPods {
        _built: built,
        podvm,
        _netns,
        w,
        libvirtd,
        cloud,
        init,
    } = peer_pods(&[], "cfrpp0", "10.99.7", "").await;
    let pool = cloud.pool.clone();
    let remote = remote_args(&podvm, &cloud.socket, 60);
    let remote: Vec<&str> = remote.iter().map(String::as_str).collect();

    // Bad input is refused before anything is made: SEV-SNP on a libvirt host without KVM.
    let (code, _, stderr) =
        cli(w.run_in(&remote, &init, "pp-bad", &["--tee", "snp"], &["true"])).await;
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("tee snp: SEV-SNP needs KVM; libvirt.accel is tcg"),
        "{stderr}"
    );
    assert!(libvirtd.domains().is_empty());

    // A VM whose agent fails as it boots (the pod VM's root hash is wrong) ends the start at once,
    // with the end of its console, and is deleted.
    let broken = built.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    for e in std::fs::read_dir(&podvm).unwrap().flatten() {
        std::fs::copy(e.path(), broken.join(e.file_name())).unwrap();
    }
    let cmdline = std::fs::read_to_string(broken.join("cmdline")).unwrap();
    let verity = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("coffer.verity="))
        .unwrap()
        .to_string();
    let mut parts: Vec<String> = verity.split(',').map(str::to_string).collect();
    parts[1] = "0".repeat(parts[1].len());
    std::fs::write(
        broken.join("cmdline"),
        cmdline.replace(&verity, &parts.join(",")),
    )
    .unwrap();
    // The VM boots coffer-cloud's configured image: a second daemon (another node's, sharing
    // the libvirtd) boots the broken one.
    let dir2 = w.d().join("node-2");
    std::fs::create_dir_all(&dir2).unwrap();
    let text = std::fs::read_to_string(&cloud.config)
        .unwrap()
        .replace("node = \"node-1\"", "node = \"node-2\"")
        .replace(
            &format!("pool = \"{pool}\""),
            &format!("pool = \"{pool}-2\""),
        )
        .replace(
            &format!("podvm = \"{}\"", podvm.display()),
            &format!("podvm = \"{}\"", broken.display()),
        )
        .replace(
            &format!("pool_dir = \"{}\"", w.d().join("pool").display()),
            &format!("pool_dir = \"{}\"", dir2.join("pool").display()),
        );
    assert!(text.contains("node-2") && text.contains("broken"), "{text}");
    std::fs::write(dir2.join("cloud.toml"), text).unwrap();
    let cloud2 = common::libvirt::Cloud::start_with(&dir2, dir2.join("cloud.toml"));
    let t = Instant::now();
    let (code, _, stderr) = cli(w.run_in(
        &remote_args(&broken, &cloud2.socket, 170)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        &init,
        "pp-broken",
        &[],
        &["true"],
    ))
    .await;
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("VM stopped before its agent answered") && stderr.contains("coffer-agent:"),
        "{stderr}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(90),
        "took {:?}",
        t.elapsed()
    );
    eventually("the broken VM is deleted", || libvirtd.domains().is_empty()).await;
    nothing_left(&w, "pp-broken", "pp-broken/psp-chan.sock").await;
    drop(cloud2);

    let script = "echo hello from the peer pod; ip -o -4 addr show; cat /proc/cmdline";
    let name = "pp-one";
    let (code, stdout, stderr) =
        cli(w.run_in(&remote, &init, name, &[], &["/bin/sh", "-c", script])).await;
    assert_eq!(
        code,
        Some(0),
        "{stderr}\ncoffer-cloud: {}\nlibvirtd: {}",
        cloud.log(),
        std::fs::read_to_string(&libvirtd.log).unwrap_or_default()
    );
    assert!(stdout.contains("hello from the peer pod"), "{stdout}");
    // The container shares nothing of the VM's interface: its own namespace has loopback only.
    assert!(!stdout.contains("10.99.7."), "{stdout}");
    let log = cloud.log();
    assert!(
        log.contains("VM created") && log.contains("VM deleted"),
        "{log}"
    );
    // The VM and its disks went with the sandbox; the shared image stays for the next pod.
    nothing_left(&w, name, "hello from the peer pod").await;
    let domains = libvirtd.domains();
    assert!(domains.is_empty(), "domains left: {domains:?}");
    assert_eq!(vm_volumes(&libvirtd, &pool), Vec::<String>::new());

    // A keeper killed outright: the reconciler deletes its VM (its keeper.lock is free).
    let name = "pp-killed";
    w.detached_in(&remote, &init, name, "sleep 600").await;
    let domains = libvirtd.virsh(&["list", "--name"]);
    assert!(
        domains.contains(&format!("coffer-node-1-{name}")),
        "{domains}"
    );
    let pid = std::fs::read_to_string(w.state.join(name).join("keeper.pid")).unwrap();
    kill9(pid.trim());
    eventually("the reconciler deletes the orphan VM", || {
        libvirtd.domains().is_empty()
    })
    .await;
    assert!(
        cloud.log().contains("deleting a VM whose sandbox is gone"),
        "{}",
        cloud.log()
    );
    assert_eq!(vm_volumes(&libvirtd, &pool), Vec::<String>::new());
    let (code, _, stderr) = w.ctl(&["rm", name]).await;
    assert_eq!(code, Some(0), "{stderr}");

    // coffer-cloud and the keeper both killed outright: the next start of coffer-cloud deletes
    // the VM at its first reconcile.
    let name = "pp-both";
    w.detached_in(&remote, &init, name, "sleep 600").await;
    let mut cloud = cloud;
    cloud.child.kill().unwrap();
    cloud.child.wait().unwrap();
    let pid = std::fs::read_to_string(w.state.join(name).join("keeper.pid")).unwrap();
    kill9(pid.trim());
    eventually("the keeper is gone", || exited(pid.trim())).await;
    let domains = libvirtd.domains();
    assert!(
        domains.contains(&format!("coffer-node-1-{name}")),
        "{domains:?}"
    );
    // Images of earlier pod VM builds, uploaded two days ago: one that nothing names goes at
    // that first reconcile, one that a domain (not coffer's) boots from stays; so does the
    // current image, though no VM runs it after this pod's (it is newer than the grace period).
    let images = || -> Vec<String> {
        let _ = libvirtd.virsh(&["pool-refresh", &pool]);
        libvirtd
            .virsh(&["vol-list", &pool])
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .filter(|v| v.starts_with("coffer-podvm-") && v.ends_with("-ready"))
            .collect()
    };
    let current = images();
    assert_eq!(current.len(), 1, "{current:?}");
    let pool_dir = w.d().join("pool");
    for old in ["00000000000000aa", "00000000000000bb"] {
        for part in ["vmlinux", "root", "ready"] {
            let vol = format!("coffer-podvm-{old}-{part}");
            libvirtd.virsh(&["vol-create-as", &pool, &vol, "1M"]);
            common::run_ok(
                Command::new("touch")
                    .args(["-d", "2 days ago"])
                    .arg(pool_dir.join(&vol)),
            );
        }
    }
    let keeps = w.d().join("keeps-old-image.xml");
    std::fs::write(
        &keeps,
        format!(
            "<domain type='qemu'><name>keeps-old-image</name><memory unit='MiB'>64</memory>\
             <os><type arch='x86_64'>hvm</type></os><devices><disk type='file' device='disk'>\
             <source file='{}'/><target dev='vda' bus='virtio'/></disk></devices></domain>",
            pool_dir
                .join("coffer-podvm-00000000000000bb-root")
                .display()
        ),
    )
    .unwrap();
    libvirtd.virsh(&["define", &keeps.display().to_string()]);
    let restarted = common::libvirt::Cloud::start_with(w.d(), cloud.config.clone());
    eventually("the restarted coffer-cloud deletes the orphan VM", || {
        libvirtd.domains() == ["keeps-old-image"]
    })
    .await;
    assert_eq!(vm_volumes(&libvirtd, &pool), Vec::<String>::new());
    let log = restarted.log();
    assert!(
        log.contains(&format!("deleting a VM whose sandbox is gone pod={name}")),
        "{log}"
    );
    eventually("the unused old image is removed", || {
        restarted
            .log()
            .contains("removed a pod VM image that no VM uses image=00000000000000aa")
    })
    .await;
    let mut left = images();
    left.sort();
    let mut want = vec!["coffer-podvm-00000000000000bb-ready".to_string()];
    want.extend(current);
    want.sort();
    assert_eq!(left, want);
    let all = libvirtd.virsh(&["vol-list", &pool]);
    assert!(!all.contains("00000000000000aa"), "{all}");
    assert!(all.contains("coffer-podvm-00000000000000bb-root"), "{all}");
    libvirtd.virsh(&["undefine", "keeps-old-image"]);
    let (code, _, stderr) = w.ctl(&["rm", name]).await;
    assert_eq!(code, Some(0), "{stderr}");

    // libvirtd restarted under a running coffer-cloud: the next pod is made over a new
    // connection (the pool's definition and the uploaded image are libvirt's, and stay).
    drop(libvirtd);
    let libvirtd = common::libvirt::Libvirtd::start(&w.d().join("libvirt"));
    let name = "pp-after-restart";
    let (code, stdout, stderr) = cli(w.run_in(
        &remote,
        &init,
        name,
        &[],
        &["/bin/sh", "-c", "echo made after the restart"],
    ))
    .await;
    assert_eq!(code, Some(0), "{stderr}\ncoffer-cloud: {}", restarted.log());
    assert!(stdout.contains("made after the restart"), "{stdout}");
    assert!(
        restarted
            .log()
            .contains("the libvirt connection is gone; connecting again"),
        "{}",
        restarted.log()
    );
    assert!(libvirtd.domains().is_empty());
}

#[test]
fn a_pod_vm_disk_is_reproducible_and_the_same_in_every_format() {
    let built = tempfile::tempdir().unwrap();
    let args = [
        "--disk",
        "raw",
        "--disk",
        "qcow2",
        "--disk",
        "vhd",
        "--disk-scratch-mib",
        "64",
    ];
    let (a, b) = (built.path().join("a"), built.path().join("b"));
    common::build_podvm_with(&a, &args);
    common::build_podvm_with(&b, &args);
    for f in ["disk.raw", "disk.qcow2", "disk.vhd", "measurements.json"] {
        assert!(
            std::fs::read(a.join(f)).unwrap() == std::fs::read(b.join(f)).unwrap(),
            "{f} differs between two builds"
        );
    }
    // QEMU reads the three as the same disk: the VHD by its footer (a fixed VHD), the qcow2 by
    // its header.
    let raw = a.join("disk.raw");
    let size = std::fs::metadata(&raw).unwrap().len();
    assert_eq!(
        size % (1 << 20),
        0,
        "a whole number of MiB, as Azure requires"
    );
    let info = common::run_ok(
        Command::new("qemu-img")
            .args(["info", "--output=json", "-f", "vpc"])
            .arg(a.join("disk.vhd")),
    );
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["virtual-size"], size, "{info}");
    for (fmt, file) in [("qcow2", "disk.qcow2"), ("vpc", "disk.vhd")] {
        common::run_ok(
            Command::new("qemu-img")
                .args(["compare", "-q", "-f", "raw", "-F", fmt])
                .arg(&raw)
                .arg(a.join(file)),
        );
    }
    // The root partition is root.img, byte for byte; the scratch partition is what was asked.
    let (offset, len) = coffer_podvm::disk::partition(&raw, "coffer-root").unwrap();
    let root = std::fs::read(a.join("root.img")).unwrap();
    assert!(len >= root.len() as u64);
    assert!(coffer_podvm::disk::read_at(&raw, offset, root.len()).unwrap() == root);
    let (_, scratch) = coffer_podvm::disk::partition(&raw, "coffer-scratch").unwrap();
    assert_eq!(scratch, 64 << 20);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("measurements.json")).unwrap()).unwrap();
    assert!(manifest["disk"]["uki_sha256"].is_string(), "{manifest}");
    // A format no provider imports is refused, naming it.
    let out = Command::new(common::coffer_bin())
        .args(["podvm", "build", "--out"])
        .arg(built.path().join("c"))
        .args(["--disk", "vmdk"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("\"vmdk\": use raw, qcow2 or vhd"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Completes a TLS handshake with the agent at `addr` as `keeper` expecting `agent`, and checks
/// that the agent keeps the connection (it sends an alert and closes when it refuses the client).
fn agent_accepts(
    addr: std::net::SocketAddr,
    keeper: &coffer_podvm::remote::Identity,
    agent: &rustls::pki_types::CertificateDer<'static>,
) -> Result<(), String> {
    use std::io::Read;
    let config = coffer_podvm::remote::client_config(keeper, agent).map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("coffer-agent").unwrap();
    let mut conn = rustls::ClientConnection::new(config, name).map_err(|e| e.to_string())?;
    let mut sock = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).map_err(|e| e.to_string())?;
    }
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    let mut b = [0u8; 1];
    match tls.read(&mut b) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Ok(())
        }
        Ok(0) => Err("closed".into()),
        Ok(_) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

#[test]
fn a_disk_booted_pod_vm_in_a_cloud_takes_its_launch_configuration_from_the_metadata_service() {
    // A cloud in this test's network namespace: a bridge with DHCP (busybox udhcpd) and an
    // instance metadata service on 169.254.169.254 (tests/common/imds.py) answering as AWS
    // (IMDSv2) or Azure; QEMU boots the pod VM's disk through OVMF with the SMBIOS vendor that
    // cloud's firmware reports. With no fw_cfg entry, the agent takes its address by DHCP,
    // reads its launch configuration from the metadata service, and serves mutual TLS to the
    // keeper the user data names, and to no other.
    let built = tempfile::tempdir().unwrap();
    let d = built.path();
    let podvm = d.join("podvm");
    common::build_podvm_with(&podvm, &["--disk", "qcow2", "--disk-scratch-mib", "256"]);
    let _netns = common::containerd::TestNetns::enter();
    common::containerd::TestNetns::bridge_named("cfrim0", "10.99.9.1/24");
    common::run_ok(Command::new("ip").args(["addr", "add", "169.254.169.254/32", "dev", "cfrim0"]));
    std::fs::write(
        d.join("udhcpd.conf"),
        format!(
            "start 10.99.9.50\nend 10.99.9.60\ninterface cfrim0\noption subnet 255.255.255.0\noption router 10.99.9.1\noption lease 3600\nlease_file {}\npidfile {}\n",
            d.join("udhcpd.leases").display(),
            d.join("udhcpd.pid").display()
        ),
    )
    .unwrap();
    std::fs::write(d.join("udhcpd.leases"), "").unwrap();
    let _dhcpd = common::Proc(
        Command::new("busybox")
            .args(["udhcpd", "-f"])
            .arg(d.join("udhcpd.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("busybox udhcpd"),
    );
    let imds_script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/common/imds.py");
    for (n, (cloud, vendor)) in [("azure", "Microsoft Corporation"), ("aws", "Amazon EC2")]
        .into_iter()
        .enumerate()
    {
        let creds = coffer_podvm::remote::Credentials::generate(cloud).unwrap();
        let initdata = "version = \"0.1.0\"\nalgorithm = \"sha384\"\n";
        let launch = coffer_podvm::remote::LaunchConfig {
            initdata: initdata.into(),
            plain_http: false,
            tee: "emulated".into(),
            network: String::new(),
            remote: Some(creds.remote_agent()),
        };
        // The emulated TEE (the only one here): a PSP whose HOST_DATA is the initdata's digest,
        // which the agent checks first thing, on a virtio-serial port as the keeper serves it.
        let mut psp = coffer_psp::EmulatedPsp::load_or_generate(&d.join("psp")).unwrap();
        let digest = coffer_wire::initdata::digest(initdata).unwrap();
        let mut host_data = [0u8; 32];
        host_data.copy_from_slice(&coffer_wire::binding::fit_report_data(&digest, 32));
        psp.set_launch(coffer_psp::Launch {
            host_data,
            ..coffer_psp::Launch::default()
        });
        let psp_sock = d.join(format!("{cloud}.psp.sock"));
        let listener = std::os::unix::net::UnixListener::bind(&psp_sock).unwrap();
        std::thread::spawn(move || coffer_psp::channel::serve(std::sync::Arc::new(psp), listener));
        let user_data = d.join(format!("{cloud}.user-data"));
        std::fs::write(&user_data, serde_json::to_vec(&launch).unwrap()).unwrap();
        let log = d.join(format!("{cloud}.imds.log"));
        let _imds = common::Proc(
            Command::new("python3")
                .arg(&imds_script)
                .args(["--flavour", cloud, "--user-data"])
                .arg(&user_data)
                .arg("--log")
                .arg(&log)
                .spawn()
                .unwrap(),
        );
        let until = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("169.254.169.254", 80)).is_err() {
            assert!(
                Instant::now() < until,
                "the metadata service did not listen"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let overlay = d.join(format!("{cloud}.qcow2"));
        common::run_ok(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                .arg(podvm.join("disk.qcow2"))
                .arg(&overlay),
        );
        let tap = format!("cfrimt{n}");
        common::run_ok(Command::new("ip").args(["tuntap", "add", &tap, "mode", "tap"]));
        common::run_ok(Command::new("ip").args(["link", "set", &tap, "master", "cfrim0", "up"]));
        let console = d.join(format!("{cloud}.console"));
        let mut qemu = common::Proc(
            Command::new("qemu-system-x86_64")
                .args([
                    "-machine",
                    "q35,accel=tcg",
                    "-cpu",
                    "max",
                    "-m",
                    "1024",
                    "-smp",
                    "1",
                ])
                .args([
                    "-display",
                    "none",
                    "-no-reboot",
                    "-bios",
                    "/usr/share/ovmf/OVMF.fd",
                ])
                .arg("-smbios")
                .arg(format!("type=1,manufacturer={vendor}"))
                .arg("-drive")
                .arg(format!("file={},if=virtio,format=qcow2", overlay.display()))
                .args([
                    "-netdev",
                    &format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
                ])
                .args(["-device", "virtio-net-pci,netdev=n0,mac=52:54:00:99:09:0a"])
                .args(["-device", "virtio-serial-pci"])
                .arg("-chardev")
                .arg(format!("socket,id=psp,path={}", psp_sock.display()))
                .arg("-device")
                .arg(format!(
                    "virtserialport,chardev=psp,name={}",
                    coffer_podvm::launch::PSP_PORT
                ))
                .arg("-serial")
                .arg(format!("file:{}", console.display()))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("qemu-system-x86_64"),
        );
        // The agent logs the address DHCP gave it once it has its launch configuration.
        let until = Instant::now() + Duration::from_secs(240);
        let address = loop {
            let text = std::fs::read_to_string(&console).unwrap_or_default();
            if let Some(a) = text
                .lines()
                .find(|l| l.contains("interface configured by DHCP"))
                .and_then(|l| {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix("address="))
                })
            {
                break a.split('/').next().unwrap().to_string();
            }
            if let Some(s) = qemu.0.try_wait().unwrap() {
                panic!("the VM stopped ({s}):\n{text}");
            }
            assert!(
                Instant::now() < until,
                "no DHCP address within 240 s:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(250));
        };
        assert!(address.starts_with("10.99.9."), "{address}");
        let addr: std::net::SocketAddr =
            format!("{address}:{}", coffer_podvm::remote::AGENT_TCP_PORT)
                .parse()
                .unwrap();
        let until = Instant::now() + Duration::from_secs(120);
        loop {
            match agent_accepts(addr, &creds.keeper, &creds.agent.cert) {
                Ok(()) => break,
                Err(e) => {
                    assert!(
                        Instant::now() < until,
                        "the agent did not serve: {e}\n{}",
                        std::fs::read_to_string(&console).unwrap_or_default()
                    );
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
        // A keeper the user data does not name is refused.
        let stranger = coffer_podvm::remote::Credentials::generate("stranger").unwrap();
        assert!(agent_accepts(addr, &stranger.keeper, &creds.agent.cert).is_err());
        // The guest asked as the cloud requires.
        let log = std::fs::read_to_string(&log).unwrap();
        match cloud {
            "azure" => assert!(
                log.contains(
                    "/metadata/instance/compute/userData?api-version=2021-01-01&format=text"
                ) && log.contains("\"Metadata\": \"true\""),
                "{log}"
            ),
            _ => assert!(
                log.contains("\"PUT\"")
                    && log.contains("/latest/api/token")
                    && log.contains("X-aws-ec2-metadata-token\":"),
                "{log}"
            ),
        }
        drop(qemu);
        let _ = Command::new("ip").args(["link", "del", &tap]).status();
    }
}

#[tokio::test]
async fn a_peer_pod_boots_its_disk_through_uefi_as_a_cloud_vm_does() {
    // The pod VM as one disk (`coffer podvm build --disk qcow2`): OVMF boots the unified kernel
    // image on its EFI system partition, the agent finds the verity root and the scratch space
    // as GPT partitions by name. libvirt runs it as a cloud would, each VM on its own overlay.
    let PeerPods {
        _built,
        podvm,
        _netns,
        w,
        libvirtd,
        cloud,
        init,
    } = peer_pods(
        &["--disk", "qcow2", "--disk-scratch-mib", "512"],
        "cfrpd0",
        "10.99.8",
        "boot = \"disk\"\n",
    )
    .await;
    let pool = cloud.pool.clone();
    let remote = remote_args(&podvm, &cloud.socket, 120);
    let remote: Vec<&str> = remote.iter().map(String::as_str).collect();

    let name = "pp-disk";
    w.detached_in(&remote, &init, name, "echo booted from its disk; sleep 600")
        .await;
    let domain = format!("coffer-node-1-{name}");
    let xml = libvirtd.virsh(&["dumpxml", &domain]);
    assert!(
        xml.contains("<loader") && !xml.contains("<kernel>") && xml.contains("type='qcow2'"),
        "{xml}"
    );
    let mut volumes = vm_volumes(&libvirtd, &pool);
    volumes.sort();
    assert_eq!(
        volumes,
        [
            format!("{domain}-disk"),
            format!("{domain}-launch.json"),
            format!("{domain}.console")
        ]
    );
    // The firmware booted the disk, then the agent started from the unified kernel image.
    let console = std::fs::read_to_string(w.d().join("pool").join(format!("{domain}.console")))
        .unwrap_or_default();
    assert!(
        console.contains("BdsDxe: starting") && console.contains("coffer-agent starting"),
        "{console}"
    );
    assert_eq!(
        logs_until(&w, &["logs", name]).await,
        "booted from its disk\n"
    );
    let (code, _, stderr) = w.ctl(&["rm", "-f", name]).await;
    assert_eq!(code, Some(0), "{stderr}");
    eventually("the VM and its overlay are deleted", || {
        libvirtd.domains().is_empty()
    })
    .await;
    assert_eq!(vm_volumes(&libvirtd, &pool), Vec::<String>::new());
}

#[tokio::test]
async fn a_peer_pod_on_the_pod_network_serves_at_its_pod_address() {
    // The peer pod keeps the address the CNI gave its namespace on the node: the keeper carries
    // the pod's interface to the libvirt VM over VXLAN (the VM's own interface is on another
    // bridge), the guest attests and pulls over it, and a process-sandbox pod on the same CNI
    // bridge fetches the page the peer pod's container serves.
    let built = tempfile::tempdir().unwrap();
    let podvm = built.path().join("podvm");
    common::build_podvm(&podvm);
    let _netns = common::containerd::TestNetns::enter();
    common::containerd::TestNetns::bridge("10.88.15.1/24");
    common::containerd::TestNetns::bridge_named("cfrpp1", "10.99.8.1/24");
    let w = world_at("10.88.15.1", None).await;
    let root = w.d().join("cni");
    common::containerd::TestNetns::cni_config(&root, "10.88.15.0/24");
    let conf = root.join("etc/cni/net.d").display().to_string();
    let libvirtd = common::libvirt::Libvirtd::start(&w.d().join("libvirt"));
    let cloud = common::libvirt::Cloud::start(
        w.d(),
        &libvirtd,
        &podvm,
        "cfrpp1",
        "10.99.8.0/24",
        "10.99.8.1",
    );
    let vm = vm_args(&podvm);
    let vm: Vec<&str> = vm.iter().map(String::as_str).collect();
    let init = w.initdata("initdata.toml", &[]).await;
    w.register_for(&vm, &[&init]).await;
    let remote = remote_args(&podvm, &cloud.socket, 90);
    let remote: Vec<&str> = remote.iter().map(String::as_str).collect();
    let name = "pp-net";
    let serve = "mkdir -p /www && echo served by the peer pod > /www/index.html && exec httpd -f -p 8080 -h /www";
    let (code, stdout, stderr) = cli(w.run_in(
        &remote,
        &init,
        name,
        &["-d", "--network", "cni", "--cni-conf-dir", &conf],
        &["/bin/sh", "-c", serve],
    ))
    .await;
    assert_eq!(code, Some(0), "{stderr}\ncoffer-cloud: {}", cloud.log());
    assert_eq!(stdout, format!("{name}\n"));
    let address = stderr
        .lines()
        .find_map(|l| l.split("on the CNI network at ").nth(1))
        .unwrap_or_else(|| panic!("no address in {stderr}"))
        .to_string();
    let ip = address.split('/').next().unwrap().to_string();
    assert!(ip.starts_with("10.88.15."), "{address}");
    // The guest pulled its image itself, from its pod address, through the tunnel.
    let gets = w.registry.blob_gets();
    assert!(
        gets.iter().any(|l| l.starts_with(&format!("{ip} "))),
        "no blob request from {ip}: {gets:#?}"
    );
    // Another pod on the bridge reaches it at that address (a process sandbox: its own
    // measurement, registered beside the VM's).
    w.register_for(&["--sandbox", "process"], &[&init]).await;
    let fetch = format!("wget -q -O - http://{ip}:8080/index.html");
    let (code, stdout, stderr) = cli(w.run_in(
        &["--sandbox", "process"],
        &init,
        "pp-client",
        &["--network", "cni", "--cni-conf-dir", &conf],
        &["/bin/sh", "-c", &fetch],
    ))
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("served by the peer pod"), "{stdout}");
    let (code, _, stderr) = w.ctl(&["rm", "-f", name]).await;
    assert_eq!(code, Some(0), "{stderr}");
    nothing_left(&w, name, "served by the peer pod").await;
    eventually("the VM is deleted", || libvirtd.domains().is_empty()).await;
    let links = common::run_ok(Command::new("ip").args(["-o", "link"]));
    assert!(!links.contains("cfrvx"), "a tunnel is left: {links}");
}
