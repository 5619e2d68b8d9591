//! A pod VM on the pod network: the node side.
//!
//! The CNI plugin has configured the pod's network namespace (an interface such as `eth0`, its
//! addresses and routes). The keeper leaves that configuration as it is and plugs each of the
//! namespace's Ethernet interfaces into the VM:
//!
//! - QEMU runs inside the pod's namespace (`nsenter --net=PATH`) and creates a tap there per
//!   interface (`coffertapN`, not persistent: it goes when QEMU does, `kill -9` included), the
//!   guest's virtio-net device carrying the interface's MAC;
//! - traffic control redirects every frame arriving on the interface to the tap and every
//!   frame from the tap out of the interface (an `ingress` qdisc on each, a `u32` match-all
//!   filter with `mirred egress redirect`), so the pod's address lives in the guest;
//! - the guest's agent is sent the namespace's configuration in one `SetNetwork` request.
//!
//! The node's own network configuration is never touched; everything of it lives in the pod's
//! namespace and goes with it.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use coffer_agent::proto::{NetworkInterface, NetworkRoute, SetNetworkRequest, VxlanTunnel};

/// One interface of the pod's namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodLink {
    /// Its name (`eth0`).
    pub name: String,
    /// Its MAC.
    pub mac: String,
    /// Its MTU.
    pub mtu: u32,
    /// Its global addresses, `ADDRESS/PREFIX`.
    pub addresses: Vec<String>,
    /// The tap that stands for it (`coffertapN`).
    pub tap: String,
}

/// What the CNI configured in the pod's namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodNetwork {
    /// The namespace (a path such as `/var/run/netns/cni-…`).
    pub netns: PathBuf,
    /// Its Ethernet interfaces.
    pub links: Vec<PodLink>,
    /// Its routes, less those the kernel makes for each address.
    pub routes: Vec<NetworkRoute>,
}

/// Runs `prog args` in the network namespace `netns`; its standard output.
fn in_netns(
    netns: &Path,
    prog: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> anyhow::Result<String> {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.display()))
        .arg("--")
        .arg(prog)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run nsenter {prog} (util-linux, {prog} from iproute2)"))?;
    if let (Some(text), Some(mut w)) = (stdin, child.stdin.take()) {
        use std::io::Write;
        w.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{prog} {} in {}: {}",
            args.join(" "),
            netns.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl PodNetwork {
    /// Reads the configuration of the namespace `netns` (`ip -json`).
    pub fn read(netns: &Path) -> anyhow::Result<Self> {
        let addrs = in_netns(netns, "ip", &["-json", "addr", "show"], None)?;
        let mut routes = Vec::new();
        for family in ["-4", "-6"] {
            let text = in_netns(netns, "ip", &[family, "-json", "route", "show"], None)?;
            routes.extend(parse_routes(&text)?);
        }
        let links = parse_links(&addrs)?;
        if links.is_empty() {
            bail!(
                "the pod's network namespace {} has no Ethernet interface (did the CNI plugin run?)",
                netns.display()
            );
        }
        let routes = routes
            .into_iter()
            .filter(|r| links.iter().any(|l| l.name == r.interface))
            .collect();
        Ok(Self {
            netns: netns.to_path_buf(),
            links,
            routes,
        })
    }

    /// The guest's network devices: a tap and a virtio-net device with the interface's MAC
    /// for each link.
    pub fn nics(&self) -> Vec<coffer_podvm::Nic> {
        self.links
            .iter()
            .map(|l| coffer_podvm::Nic {
                tap: l.tap.clone(),
                mac: l.mac.clone(),
            })
            .collect()
    }

    /// Once QEMU made the taps (it runs in the namespace): brings them up with the interface's
    /// MTU and redirects each interface's traffic to its tap and back. Waits up to `bound` for
    /// the taps.
    pub fn connect(&self, bound: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + bound;
        for l in &self.links {
            loop {
                match in_netns(
                    &self.netns,
                    "ip",
                    &["-o", "link", "show", "dev", &l.tap],
                    None,
                ) {
                    Ok(_) => break,
                    Err(e) if Instant::now() >= until => {
                        return Err(e.context(format!(
                        "no device {} in the pod's namespace (QEMU's tap, or a peer pod's tunnel)",
                        l.tap
                    )))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
        let mut ip = String::new();
        let mut tc = String::new();
        for l in &self.links {
            ip.push_str(&format!("link set dev {} mtu {} up\n", l.tap, l.mtu));
            // A keeper killed before left its filters: start from none.
            let _ = in_netns(
                &self.netns,
                "tc",
                &["qdisc", "del", "dev", &l.name, "ingress"],
                None,
            );
            for (from, to) in [(&l.name, &l.tap), (&l.tap, &l.name)] {
                tc.push_str(&format!("qdisc add dev {from} ingress\n"));
                tc.push_str(&format!(
                    "filter add dev {from} parent ffff: protocol all u32 match u8 0 0 action mirred egress redirect dev {to}\n"
                ));
            }
        }
        in_netns(&self.netns, "ip", &["-batch", "-"], Some(&ip))?;
        in_netns(&self.netns, "tc", &["-batch", "-"], Some(&tc))?;
        Ok(())
    }

    /// Removes the redirection from the CNI's interfaces (the taps go with QEMU), leaving the
    /// namespace as the CNI made it.
    pub fn disconnect(&self) {
        for l in &self.links {
            if let Err(e) = in_netns(
                &self.netns,
                "tc",
                &["qdisc", "del", "dev", &l.name, "ingress"],
                None,
            ) {
                tracing::debug!(error = %e, "no redirection to remove");
            }
        }
    }

    /// A peer pod: the pod's one interface is carried to the VM at `remote` over VXLAN (UDP
    /// 4789, VNI `vni`). The VXLAN device is made in this process's network namespace (the
    /// node's, so its encapsulated traffic takes the node's network) and then moved into the
    /// pod's, where traffic control redirects the interface's frames to it and back, as for a
    /// local VM's tap. Returns the tunnel as the guest makes its end.
    pub fn tunnel(&mut self, vni: u32, remote: Ipv4Addr) -> anyhow::Result<VxlanTunnel> {
        if self.links.len() != 1 {
            bail!(
                "a peer pod carries one pod interface; the pod's namespace {} has {}",
                self.netns.display(),
                self.links.len()
            );
        }
        let dev = format!("cfrvx{vni}");
        let run = crate::cni::ip;
        let (v, r) = (vni.to_string(), remote.to_string());
        // One left by a keeper killed before goes first.
        let _ = Command::new("ip").args(["link", "del", &dev]).output();
        run(&[
            "link",
            "add",
            &dev,
            "type",
            "vxlan",
            "id",
            &v,
            "remote",
            &r,
            "dstport",
            "4789",
            "nolearning",
        ])?;
        let netns = self.netns.display().to_string();
        if let Err(e) = run(&["link", "set", "dev", &dev, "netns", &netns]) {
            let _ = Command::new("ip").args(["link", "del", &dev]).output();
            return Err(e);
        }
        self.links[0].tap = dev;
        if let Err(e) = self.connect(Duration::from_secs(5)) {
            self.untunnel();
            return Err(e);
        }
        Ok(VxlanTunnel {
            mac: self.links[0].mac.clone(),
            vni,
            remote: String::new(),
            port: 4789,
        })
    }

    /// Removes a peer pod's tunnel (and its redirection) from the pod's namespace.
    pub fn untunnel(&self) {
        self.disconnect();
        for l in &self.links {
            if l.tap.starts_with("cfrvx") {
                let _ = in_netns(&self.netns, "ip", &["link", "del", &l.tap], None);
            }
        }
    }

    /// The guest's configuration: these interfaces and routes, and the resolver of
    /// `resolv_conf` (the pod's, as the CRI's DNS settings made it, or the host's for `coffer
    /// run`) when given, less loopback name servers (the guest's loopback is not the host's).
    pub fn request(&self, resolv_conf: Option<&str>) -> SetNetworkRequest {
        let mut req = SetNetworkRequest {
            interfaces: self
                .links
                .iter()
                .map(|l| NetworkInterface {
                    name: l.name.clone(),
                    mac: l.mac.clone(),
                    addresses: l.addresses.clone(),
                    mtu: l.mtu,
                })
                .collect(),
            routes: self.routes.clone(),
            ..Default::default()
        };
        for line in resolv_conf.unwrap_or_default().lines() {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => req.dns_servers.extend(
                    words
                        .next()
                        .filter(|a| !a.parse::<IpAddr>().is_ok_and(|a| a.is_loopback()))
                        .map(str::to_string),
                ),
                Some("search") => req.dns_searches.extend(words.map(str::to_string)),
                Some("options") => req.dns_options.extend(words.map(str::to_string)),
                _ => {}
            }
        }
        // The resolver reads three (glibc's MAXNS), and the agent takes no more.
        req.dns_servers.truncate(3);
        req
    }
}

/// The Ethernet interfaces of `ip -json addr show` output, with their global addresses.
fn parse_links(json: &str) -> anyhow::Result<Vec<PodLink>> {
    let v: serde_json::Value =
        serde_json::from_str(json).context("cannot parse `ip -json addr show`")?;
    let mut links = Vec::new();
    for l in v.as_array().into_iter().flatten() {
        let name = l["ifname"].as_str().unwrap_or_default();
        if l["link_type"].as_str() != Some("ether") || name.starts_with("coffertap") {
            continue;
        }
        let addresses = l["addr_info"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["scope"].as_str() == Some("global"))
            .filter_map(|a| {
                Some(format!(
                    "{}/{}",
                    a["local"].as_str()?,
                    a["prefixlen"].as_u64()?
                ))
            })
            .collect();
        links.push(PodLink {
            name: name.to_string(),
            mac: l["address"].as_str().unwrap_or_default().to_string(),
            mtu: l["mtu"].as_u64().unwrap_or(1500) as u32,
            addresses,
            tap: format!("coffertap{}", links.len()),
        });
    }
    Ok(links)
}

/// The routes of `ip -json route show` output, less those the kernel made for an address
/// (`proto kernel`), which the guest's kernel makes itself.
fn parse_routes(json: &str) -> anyhow::Result<Vec<NetworkRoute>> {
    let v: serde_json::Value =
        serde_json::from_str(json).context("cannot parse `ip -json route show`")?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["protocol"].as_str() != Some("kernel"))
        .filter(|r| r["type"].as_str().is_none_or(|t| t == "unicast"))
        .filter_map(|r| {
            Some(NetworkRoute {
                destination: r["dst"].as_str()?.to_string(),
                gateway: r["gateway"]
                    .as_str()
                    .and_then(|g| g.parse::<IpAddr>().ok())
                    .map(|g| g.to_string())
                    .unwrap_or_default(),
                interface: r["dev"].as_str()?.to_string(),
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cnis_configuration_is_read_from_ips_json() {
        let addrs = r#"[{"ifindex":1,"ifname":"lo","link_type":"loopback","address":"00:00:00:00:00:00","mtu":65536,
            "addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host"}]},
          {"ifindex":3,"link_index":9,"ifname":"eth0","link_type":"ether","address":"0a:58:0a:58:07:05","mtu":1450,
            "addr_info":[{"family":"inet","local":"10.88.7.5","prefixlen":24,"scope":"global"},
                         {"family":"inet6","local":"fe80::858:aff:fe58:705","prefixlen":64,"scope":"link"}]}]"#;
        let links = parse_links(addrs).unwrap();
        assert_eq!(
            links,
            [PodLink {
                name: "eth0".into(),
                mac: "0a:58:0a:58:07:05".into(),
                mtu: 1450,
                addresses: vec!["10.88.7.5/24".into()],
                tap: "coffertap0".into(),
            }]
        );
        let routes = parse_routes(
            r#"[{"dst":"default","gateway":"10.88.7.1","dev":"eth0","flags":[]},
                {"dst":"10.88.7.0/24","dev":"eth0","protocol":"kernel","scope":"link","prefsrc":"10.88.7.5","flags":[]}]"#,
        )
        .unwrap();
        assert_eq!(
            routes,
            [NetworkRoute {
                destination: "default".into(),
                gateway: "10.88.7.1".into(),
                interface: "eth0".into(),
            }]
        );
        let net = PodNetwork {
            netns: "/var/run/netns/cni-1".into(),
            links,
            routes,
        };
        let req = net.request(Some(
            "search default.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\nnameserver 127.0.0.53\noptions ndots:5\n",
        ));
        assert_eq!(req.dns_servers, ["10.96.0.10"]);
        assert_eq!(req.dns_searches.len(), 2);
        assert_eq!(req.dns_options, ["ndots:5"]);
        assert_eq!(
            net.nics(),
            [coffer_podvm::Nic {
                tap: "coffertap0".into(),
                mac: "0a:58:0a:58:07:05".into()
            }]
        );
    }
}
