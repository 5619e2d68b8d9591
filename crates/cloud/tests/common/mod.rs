//! Shared by the AWS test and the create benchmark: moto in server mode (PyPI `moto[server]`) on
//! loopback, boto3 (AWS's own SDK for Python) to read what the provider did, coffer-cloud's own
//! binary, and sandboxes whose "keeper" is the test holding their lock.

#![allow(dead_code)]

use std::{
    io::Write,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use coffer_cloud::api::CreateVmRequest;
use coffer_podvm::remote::{Credentials, LaunchConfig};
use rustix::fs::{flock, FlockOperation};

/// A local cloud API server from this directory (`azure_arm.py`, `ibmcloud_vpc.py`) on a free
/// loopback port, with `args`; its base URL.
pub fn emulator(script: &str, args: &[&str]) -> (Proc, String) {
    let port = free_port();
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(script);
    let child = Command::new("python3")
        .arg(&path)
        .arg("--port")
        .arg(port.to_string())
        .args(args)
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("python3 {}: {e}", path.display()));
    let mut child = Proc(child);
    let until = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(s) = child.0.try_wait().unwrap() {
            panic!(
                "{script} exited ({s}); are its PyPI packages installed (scripts/test does it)?"
            );
        }
        assert!(Instant::now() < until, "{script} did not listen");
        std::thread::sleep(Duration::from_millis(100));
    }
    (child, format!("http://127.0.0.1:{port}"))
}

/// A JSON call to an emulator's own API (its state, its knobs).
pub fn emulator_call(base: &str, path: &str, body: Option<serde_json::Value>) -> serde_json::Value {
    let url = format!("{base}{path}");
    let text = match body {
        Some(b) => ureq::post(&url).send(b.to_string()),
        None => ureq::get(&url).call(),
    }
    .unwrap_or_else(|e| panic!("{url}: {e}"))
    .body_mut()
    .read_to_string()
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A process killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// moto's EC2 on a free loopback port.
pub fn moto() -> (Proc, String) {
    let port = free_port();
    let child = Command::new("python3")
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moto (pip install 'moto[server]')");
    let until = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < until, "moto did not listen");
        std::thread::sleep(Duration::from_millis(100));
    }
    (Proc(child), format!("http://127.0.0.1:{port}"))
}

/// Runs a boto3 snippet against moto at `endpoint` (`ec2` is the client); its stdout as JSON.
pub fn boto(endpoint: &str, code: &str) -> serde_json::Value {
    let script = format!(
        "import boto3, json, base64\nec2 = boto3.client('ec2', endpoint_url='{endpoint}', region_name='us-east-2', aws_access_key_id='testing', aws_secret_access_key='testing')\n{code}\n"
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "boto3: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The instances of cluster `test` that are not terminated: id, state, type, tags, user data.
pub fn instances(endpoint: &str) -> Vec<serde_json::Value> {
    let v = boto(
        endpoint,
        "out = []\n\
         for r in ec2.describe_instances(Filters=[{'Name': 'tag:coffer:cluster', 'Values': ['test']}])['Reservations']:\n\
         \x20   for i in r['Instances']:\n\
         \x20       if i['State']['Name'] == 'terminated': continue\n\
         \x20       ud = ec2.describe_instance_attribute(InstanceId=i['InstanceId'], Attribute='userData')['UserData'].get('Value', '')\n\
         \x20       out.append({'id': i['InstanceId'], 'type': i['InstanceType'], 'image': i['ImageId'], 'tags': {t['Key']: t['Value'] for t in i.get('Tags', [])}, 'user_data': base64.b64decode(ud).decode() if ud else ''})\n\
         print(json.dumps(out))",
    );
    v.as_array().unwrap().clone()
}

/// A sandbox directory whose keeper "lives" while the returned file is open (it holds the lock).
pub fn sandbox(dir: &Path, name: &str) -> (PathBuf, std::fs::File) {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let f = std::fs::File::create(d.join("keeper.lock")).unwrap();
    flock(&f, FlockOperation::NonBlockingLockExclusive).unwrap();
    (d, f)
}

pub struct Daemon {
    pub proc: Proc,
    pub socket: PathBuf,
    pub log: PathBuf,
}

pub fn daemon(dir: &Path, config: &Path, creds: bool) -> Result<Daemon, String> {
    let aws: &[(&str, &str)] = if creds {
        &[
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
        ]
    } else {
        &[]
    };
    daemon_with(dir, config, aws)
}

/// coffer-cloud with `config`, no cloud credentials in its environment but `env`.
pub fn daemon_with(dir: &Path, config: &Path, env: &[(&str, &str)]) -> Result<Daemon, String> {
    let socket = dir.join("cloud.sock");
    let _ = std::fs::remove_file(&socket);
    let log = dir.join("cloud.log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_coffer-cloud"));
    cmd.arg("--config")
        .arg(config)
        .arg("--listen")
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    for k in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AZURE_TENANT_ID",
        "AZURE_CLIENT_ID",
        "AZURE_CLIENT_SECRET",
        "IBMCLOUD_API_KEY",
    ] {
        cmd.env_remove(k);
    }
    cmd.envs(env.iter().copied());
    let mut child = cmd.spawn().unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        if let Some(s) = child.try_wait().unwrap() {
            return Err(format!(
                "{s}: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ));
        }
        assert!(Instant::now() < until, "coffer-cloud did not serve");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Daemon {
        proc: Proc(child),
        socket,
        log,
    })
}

pub fn config(dir: &Path, endpoint: &str, image: &str) -> PathBuf {
    let path = dir.join("cloud.toml");
    let mut f = std::fs::File::create(&path).unwrap();
    write!(
        f,
        "cluster = \"test\"\nnode = \"node-1\"\nprovider = \"aws\"\nreconcile_secs = 1\n\
         [[instance_types]]\nname = \"m6a.large\"\nvcpus = 2\nmemory_mib = 8192\n\
         [[instance_types]]\nname = \"m6a.xlarge\"\nvcpus = 4\nmemory_mib = 16384\n\
         [aws]\nregion = \"us-east-2\"\nendpoint = \"{endpoint}\"\nimage_id = \"{image}\"\nsev_snp = true\n"
    )
    .unwrap();
    path
}

pub fn launch(initdata: &str) -> Vec<u8> {
    serde_json::to_vec(&LaunchConfig {
        initdata: initdata.into(),
        plain_http: false,
        tee: "snp".into(),
        network: "pod".into(),
        remote: Some(Credentials::generate("t").unwrap().remote_agent()),
    })
    .unwrap()
}

pub fn request(pod: &str, dir: &Path, launch: Vec<u8>) -> CreateVmRequest {
    CreateVmRequest {
        pod: pod.into(),
        sandbox_dir: dir.display().to_string(),
        instance_type: String::new(),
        memory_mib: 1024,
        vcpus: 1,
        launch_config: launch,
        psp_socket: String::new(),
        pod_namespace: "default".into(),
        pod_name: pod.into(),
    }
}

pub async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let until = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < until, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Creates pods `c0` … `c{n-1}` at once, each in a sandbox of its own under `dir` whose keeper
/// "lives" while the returned locks are held; every create must succeed. Returns the VMs.
pub async fn create_at_once(
    client: &coffer_cloud::client::Client,
    dir: &Path,
    n: usize,
    launch: &[u8],
) -> (Vec<coffer_cloud::api::Vm>, Vec<std::fs::File>) {
    let mut locks = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..n {
        let (s, l) = sandbox(dir, &format!("c{i}"));
        locks.push(l);
        let mut c = client.clone();
        let data = launch.to_vec();
        tasks.push(tokio::spawn(async move {
            c.create_vm(request(&format!("c{i}"), &s, data)).await
        }));
    }
    let mut vms = Vec::new();
    for t in tasks {
        vms.push(t.await.unwrap().unwrap().into_inner());
    }
    (vms, locks)
}

/// Deletes pods `c0` … `c{n-1}` at once; each must have had a VM.
pub async fn delete_at_once(client: &coffer_cloud::client::Client, n: usize) {
    let mut tasks = Vec::new();
    for i in 0..n {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            c.delete_vm(coffer_cloud::api::DeleteVmRequest {
                pod: format!("c{i}"),
            })
            .await
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap().unwrap().into_inner().deleted);
    }
}

/// What every provider does when a pod's create is asked again: the same request (a keeper
/// retrying) returns the same VM `vm`; a new keeper's keys (another launch configuration, after
/// a crash) make a new VM in place of the old. Returns the new VM and its launch configuration.
pub async fn retry_then_replace(
    client: &mut coffer_cloud::client::Client,
    pod: &str,
    dir: &Path,
    vm: &coffer_cloud::api::Vm,
    data: &[u8],
) -> (coffer_cloud::api::Vm, Vec<u8>) {
    let again = client
        .create_vm(request(pod, dir, data.to_vec()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.id, vm.id, "a retried create returns the same VM");
    let renewed = launch("kbs = 'https://kbs.example'");
    let fresh = client
        .create_vm(request(pod, dir, renewed.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(fresh.id, vm.id, "a new keeper's keys make a new VM");
    (fresh, renewed)
}

/// With a wrong secret in `env` the daemon starts, but a create fails with the cloud's `reason`;
/// the secret appears in neither the error nor the daemon's log.
pub async fn wrong_secret_is_reported_not_leaked(
    dir: &Path,
    config: &Path,
    env: (&str, &str),
    reason: &str,
    sandbox_dir: &Path,
) {
    let cloud = daemon_with(dir, config, &[env]).unwrap();
    let mut client = coffer_cloud::client::connect(&cloud.socket).await.unwrap();
    let e = client
        .create_vm(request(
            "p1",
            sandbox_dir,
            launch("kbs = 'https://kbs.example'"),
        ))
        .await
        .unwrap_err();
    assert!(e.message().contains(reason), "{}", e.message());
    assert!(!e.message().contains(env.1));
    assert!(!std::fs::read_to_string(&cloud.log).unwrap().contains(env.1));
}
