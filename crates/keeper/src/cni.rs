//! A sandbox's own network from the node's CNI plugins (`coffer run --network cni`), as a
//! container runtime gives a pod one: a network namespace `coffer-NAME` (`ip netns add`), the
//! plugins of the first network configuration in the configuration directory run on it
//! (`ADD`, in order, each given the previous one's result), then the sandbox takes the
//! namespace as its pod network (a process sandbox's containers join it, a pod VM takes its
//! interfaces over, [`crate::podnet`]). The plugins are invoked as the CNI specification
//! says: the plugin's configuration (with the list's `name`, `cniVersion` and `prevResult`)
//! on standard input, `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME` and
//! `CNI_PATH` in the environment, the result (or `{code, msg}`) on standard output.
//!
//! What was attached is recorded in the sandbox directory (`cni.json`, written before the
//! first plugin runs), so that whoever removes the sandbox — its keeper at the end, or the
//! reaper of a keeper that was killed — runs `DEL` (in reverse order, with the result) and
//! deletes the namespace: a sandbox's address is never leaked.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context};
use serde_json::{json, Value};

/// The record of a sandbox's CNI attachment, in its directory.
pub const RECORD: &str = "cni.json";

/// The interface the plugins make in the namespace.
const IFNAME: &str = "eth0";

/// The first network configuration (`*.conflist`, `*.conf`, `*.json`, by name) in `dir`, as a
/// list: `{cniVersion, name, plugins: […]}`.
pub fn load_config(dir: &Path) -> anyhow::Result<Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("--cni-conf-dir {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .is_some_and(|x| x == "conflist" || x == "conf" || x == "json")
        })
        .collect();
    files.sort();
    let path = files.first().with_context(|| {
        format!(
            "no CNI network configuration (*.conflist, *.conf) in {}",
            dir.display()
        )
    })?;
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let mut v: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    if v.get("plugins").is_none() {
        // A single plugin's configuration: a list of one.
        let name = v["name"].clone();
        let version = v["cniVersion"].clone();
        v = json!({"cniVersion": version, "name": name, "plugins": [v]});
    }
    let ok = v["name"].is_string()
        && v["cniVersion"].is_string()
        && v["plugins"]
            .as_array()
            .is_some_and(|p| !p.is_empty() && p.iter().all(|p| p["type"].is_string()));
    if !ok {
        bail!(
            "{}: a CNI configuration needs a name, a cniVersion and plugins with a type each",
            path.display()
        );
    }
    Ok(v)
}

/// One plugin call; its result (`ADD`).
fn invoke(
    list: &Value,
    plugin: &Value,
    command: &str,
    container: &str,
    netns: &Path,
    bin_path: &str,
    prev: Option<&Value>,
) -> anyhow::Result<Value> {
    let kind = plugin["type"].as_str().unwrap_or_default();
    if kind.is_empty() || kind.contains('/') || kind.starts_with('.') {
        bail!("CNI plugin type {kind:?} is not a plugin name");
    }
    let bin = bin_path
        .split(':')
        .map(|d| Path::new(d).join(kind))
        .find(|p| p.is_file())
        .with_context(|| format!("CNI plugin {kind} is in none of {bin_path}"))?;
    let mut conf = plugin.clone();
    conf["name"] = list["name"].clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    if let Some(p) = prev {
        conf["prevResult"] = p.clone();
    }
    let mut child = Command::new(&bin)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", IFNAME)
        .env("CNI_PATH", bin_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(conf.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    if !out.status.success() {
        bail!(
            "CNI plugin {kind} {command}: {} {}",
            answer["msg"].as_str().unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(answer)
}

/// The namespace's path.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(format!("coffer-{name}"))
}

/// Runs `ip ARGS…` (iproute2) in this process's network namespace; says what failed.
pub(crate) fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn write_record(dir: &Path, record: &Value) -> anyhow::Result<()> {
    coffer_fsutil::write_atomic(&dir.join(RECORD), record.to_string().as_bytes(), 0o600)
        .with_context(|| format!("cannot write {}", dir.join(RECORD).display()))
}

/// Makes the sandbox `name`'s network namespace and runs the plugins of the first
/// configuration in `conf_dir` (found in the `:`-separated `bin_path`) on it; the namespace's
/// path. On a failure everything made is removed again.
pub fn attach(dir: &Path, name: &str, conf_dir: &Path, bin_path: &str) -> anyhow::Result<PathBuf> {
    let list = load_config(conf_dir)?;
    let netns = netns_path(name);
    let mut record = json!({
        "netns": netns, "container": name, "bin_path": bin_path, "config": list,
    });
    write_record(dir, &record)?;
    let added = (|| -> anyhow::Result<Value> {
        ip(&["netns", "add", &format!("coffer-{name}")])?;
        let mut result: Option<Value> = None;
        for plugin in list["plugins"].as_array().into_iter().flatten() {
            let r = invoke(
                &list,
                plugin,
                "ADD",
                name,
                &netns,
                bin_path,
                result.as_ref(),
            )?;
            // A plugin that passes nothing on (an older one) leaves the previous result.
            if r.is_object() {
                result = Some(r);
            }
        }
        Ok(result.unwrap_or(Value::Null))
    })();
    match added {
        Ok(result) => {
            record["result"] = result;
            write_record(dir, &record)?;
            Ok(netns)
        }
        Err(e) => {
            release(dir);
            Err(e.context(format!(
                "cannot attach sandbox {name} to the CNI network {}",
                list["name"].as_str().unwrap_or_default()
            )))
        }
    }
}

/// The sandbox's first address (`ADDRESS/PREFIX`) in the record of `dir`, once attached.
pub fn address(dir: &Path) -> Option<String> {
    let record: Value = serde_json::from_slice(&std::fs::read(dir.join(RECORD)).ok()?).ok()?;
    Some(record["result"]["ips"][0]["address"].as_str()?.to_string())
}

/// Detaches what the record in `dir` says was attached: `DEL` of each plugin in reverse
/// order, then the namespace, then the record. Failures are logged; the rest goes on.
pub fn release(dir: &Path) {
    let Ok(bytes) = std::fs::read(dir.join(RECORD)) else {
        return;
    };
    let Ok(record) = serde_json::from_slice::<Value>(&bytes) else {
        tracing::warn!(record = %dir.join(RECORD).display(), "unreadable CNI record; its namespace may remain");
        return;
    };
    let list = &record["config"];
    let netns = PathBuf::from(record["netns"].as_str().unwrap_or_default());
    let container = record["container"].as_str().unwrap_or_default();
    let bin_path = record["bin_path"].as_str().unwrap_or_default();
    let result = record.get("result").filter(|r| r.is_object());
    for plugin in list["plugins"].as_array().into_iter().flatten().rev() {
        if let Err(e) = invoke(list, plugin, "DEL", container, &netns, bin_path, result) {
            tracing::warn!(error = %format!("{e:#}"), "CNI DEL failed");
        }
    }
    if let Some(name) = netns.file_name().and_then(|n| n.to_str()) {
        if netns.exists() {
            if let Err(e) = ip(&["netns", "del", name]) {
                tracing::warn!(error = %format!("{e:#}"), "cannot delete the sandbox's network namespace");
            }
        }
    }
    let _ = std::fs::remove_file(dir.join(RECORD));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configuration_is_a_list_and_a_bad_one_is_named() {
        let d = tempfile::tempdir().unwrap();
        let e = load_config(d.path()).unwrap_err().to_string();
        assert!(e.contains("no CNI network configuration"), "{e}");
        std::fs::write(
            d.path().join("20-one.conf"),
            r#"{"cniVersion":"0.4.0","name":"one","type":"bridge","bridge":"cni0"}"#,
        )
        .unwrap();
        let v = load_config(d.path()).unwrap();
        assert_eq!(v["name"], "one");
        assert_eq!(v["plugins"][0]["type"], "bridge");
        // The first by name wins; one without types is refused, naming the file.
        std::fs::write(
            d.path().join("10-bad.conflist"),
            r#"{"cniVersion":"0.4.0","name":"bad","plugins":[{"bridge":"x"}]}"#,
        )
        .unwrap();
        let e = load_config(d.path()).unwrap_err().to_string();
        assert!(
            e.contains("10-bad.conflist") && e.contains("a type each"),
            "{e}"
        );
    }

    #[test]
    fn a_plugin_is_found_on_the_path_and_its_failure_is_named() {
        let d = tempfile::tempdir().unwrap();
        let list = json!({"cniVersion": "0.4.0", "name": "n", "plugins": []});
        let e = invoke(
            &list,
            &json!({"type": "../bridge"}),
            "ADD",
            "c",
            Path::new("/run/netns/x"),
            "/usr/lib/cni",
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not a plugin name"), "{e}");
        let e = invoke(
            &list,
            &json!({"type": "nosuchplugin"}),
            "ADD",
            "c",
            Path::new("/run/netns/x"),
            &d.path().display().to_string(),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("CNI plugin nosuchplugin is in none of"), "{e}");
        // A plugin that fails: its message comes back.
        let plugin = d.path().join("failing");
        std::fs::write(
            &plugin,
            "#!/bin/sh\ncat >/dev/null\necho '{\"code\":7,\"msg\":\"no addresses left\"}'\nexit 1\n",
        )
        .unwrap();
        let mut perm = std::fs::metadata(&plugin).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
        std::fs::set_permissions(&plugin, perm).unwrap();
        let e = invoke(
            &list,
            &json!({"type": "failing"}),
            "ADD",
            "c",
            Path::new("/run/netns/x"),
            &d.path().display().to_string(),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("CNI plugin failing ADD: no addresses left"),
            "{e}"
        );
    }
}
