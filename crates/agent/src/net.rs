//! A pod VM's network: the guest side of the pod network (`SetNetwork`).
//!
//! The node plugs each interface of the pod's network namespace into the VM as a virtio-net
//! device with the same MAC (a tap in that namespace, traffic redirected both ways by
//! traffic-control `mirred`), then sends one [`SetNetworkRequest`] with what the namespace
//! holds: each interface's name, MAC, addresses and MTU, the routes, and the pod's resolver.
//! The agent checks it ([`plan`]) and applies it with `ip(8)` ([`Network::apply`]); the
//! containers of a pod VM share the guest's network namespace, so they have the pod's address.
//!
//! The network is the node's and untrusted: nothing on it is relied on for confidentiality.
//! What the agent refuses is what would be malformed or would let the node steer the agent's
//! own traffic: an address that is its subnet's network or broadcast address (or the KBS's), a
//! gateway outside every subnet of its interface, and a route that would carry the traffic to
//! the KBS (named by address in the initdata) anywhere but on the link or by the default
//! route. The agent's API channel is a virtio-serial port, never the
//! network. The configuration is applied once per sandbox.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
};

use ipnet::IpNet;

use crate::proto::SetNetworkRequest;

/// At most this many interfaces, addresses per interface, routes, resolver entries.
const MAX_INTERFACES: usize = 8;
const MAX_ADDRESSES: usize = 16;
const MAX_ROUTES: usize = 64;
/// glibc reads three name servers.
const MAX_SERVERS: usize = 3;
const MAX_SEARCHES: usize = 32;
const MAX_OPTIONS: usize = 16;

/// A refused or failed network configuration.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The request is malformed or would steer the KBS's traffic; names what was wrong.
    #[error("network configuration refused: {0}")]
    Invalid(String),
    /// This sandbox takes no network configuration (or already took one).
    #[error("{0}")]
    Unavailable(String),
    /// Applying it failed in the guest.
    #[error("cannot configure the network: {0}")]
    Apply(String),
}

fn invalid(s: impl Into<String>) -> NetError {
    NetError::Invalid(s.into())
}

/// One interface to configure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    /// Its name in the guest.
    pub name: String,
    /// Its MAC, lowercase `aa:bb:…`.
    pub mac: String,
    /// Its addresses.
    pub addresses: Vec<IpNet>,
    /// Its MTU, when set.
    pub mtu: Option<u32>,
}

/// One route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The destination prefix.
    pub destination: IpNet,
    /// The next hop, or on the link.
    pub gateway: Option<IpAddr>,
    /// The interface's name.
    pub interface: String,
}

/// A checked configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The interfaces.
    pub links: Vec<Link>,
    /// The routes.
    pub routes: Vec<Route>,
    /// The resolver's configuration (`resolv.conf` text), when the request had DNS settings.
    pub resolv_conf: Option<String>,
}

fn valid_name(n: &str) -> bool {
    (1..=15).contains(&n.len())
        && n != "lo"
        && n != "."
        && n != ".."
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn parse_mac(m: &str) -> Result<String, NetError> {
    let bytes: Vec<u8> = m
        .split(':')
        .map(|p| {
            if p.len() == 2 {
                u8::from_str_radix(p, 16).ok()
            } else {
                None
            }
        })
        .collect::<Option<_>>()
        .filter(|b: &Vec<u8>| b.len() == 6)
        .ok_or_else(|| invalid(format!("MAC {m:?} is not of the form aa:bb:cc:dd:ee:ff")))?;
    if bytes[0] & 1 == 1 || bytes.iter().all(|b| *b == 0) {
        return Err(invalid(format!("MAC {m} is not a unicast address")));
    }
    Ok(m.to_ascii_lowercase())
}

fn usable(a: IpAddr) -> bool {
    !(a.is_unspecified()
        || a.is_loopback()
        || a.is_multicast()
        || matches!(a, IpAddr::V4(v) if v.is_broadcast()))
}

/// The IP literal of the KBS's URL, when it names one.
pub fn kbs_address(url: &str) -> Option<IpAddr> {
    match url::Url::parse(url).ok()?.host()? {
        url::Host::Ipv4(a) => Some(IpAddr::V4(a)),
        url::Host::Ipv6(a) => Some(IpAddr::V6(a)),
        url::Host::Domain(_) => None,
    }
}

/// Checks `req` (see the module documentation); `kbs` is the KBS's address when the initdata
/// names it by address.
pub fn plan(req: &SetNetworkRequest, kbs: Option<IpAddr>) -> Result<Plan, NetError> {
    if req.interfaces.is_empty() || req.interfaces.len() > MAX_INTERFACES {
        return Err(invalid(format!(
            "{} interfaces (1 to {MAX_INTERFACES})",
            req.interfaces.len()
        )));
    }
    let mut links: Vec<Link> = Vec::new();
    for i in &req.interfaces {
        if !valid_name(&i.name) {
            return Err(invalid(format!(
                "interface name {:?}: 1 to 15 of A-Z a-z 0-9 _ . -, not lo",
                i.name
            )));
        }
        let mac = parse_mac(&i.mac)?;
        if links.iter().any(|l| l.name == i.name || l.mac == mac) {
            return Err(invalid(format!(
                "interface {} ({mac}) is named twice",
                i.name
            )));
        }
        if i.addresses.len() > MAX_ADDRESSES {
            return Err(invalid(format!(
                "interface {}: {} addresses (at most {MAX_ADDRESSES})",
                i.name,
                i.addresses.len()
            )));
        }
        let mut addresses = Vec::new();
        for a in &i.addresses {
            let net: IpNet = a.parse().map_err(|_| {
                invalid(format!(
                    "interface {}: address {a:?} is not ADDRESS/PREFIX",
                    i.name
                ))
            })?;
            if !usable(net.addr()) {
                return Err(invalid(format!(
                    "interface {}: {a} is not a host address",
                    i.name
                )));
            }
            if let IpNet::V4(v4) = net {
                if v4.prefix_len() < 31
                    && (v4.addr() == v4.network() || v4.addr() == v4.broadcast())
                {
                    return Err(invalid(format!(
                        "interface {}: address {a} is outside the subnet's hosts (its network or broadcast address)",
                        i.name
                    )));
                }
            }
            if Some(net.addr()) == kbs {
                return Err(invalid(format!(
                    "interface {}: address {a} is the KBS's address (from the initdata)",
                    i.name
                )));
            }
            addresses.push(net);
        }
        let mtu = match i.mtu {
            0 => None,
            m if !(68..=65535).contains(&m) => {
                return Err(invalid(format!(
                    "interface {}: MTU {m} (68 to 65535)",
                    i.name
                )))
            }
            m if m < 1280 && addresses.iter().any(|a| a.addr().is_ipv6()) => {
                return Err(invalid(format!(
                    "interface {}: MTU {m} is below IPv6's 1280",
                    i.name
                )))
            }
            m => Some(m),
        };
        links.push(Link {
            name: i.name.clone(),
            mac,
            addresses,
            mtu,
        });
    }
    let ours = |a: IpAddr| {
        links
            .iter()
            .flat_map(|l| &l.addresses)
            .any(|n| n.addr() == a)
    };
    if req.routes.len() > MAX_ROUTES {
        return Err(invalid(format!(
            "{} routes (at most {MAX_ROUTES})",
            req.routes.len()
        )));
    }
    let mut routes = Vec::new();
    for r in &req.routes {
        let link = links
            .iter()
            .find(|l| l.name == r.interface)
            .ok_or_else(|| {
                invalid(format!(
                    "route {} names interface {:?}, which the request does not configure",
                    r.destination, r.interface
                ))
            })?;
        let gateway = match r.gateway.as_str() {
            "" => None,
            g => Some(g.parse::<IpAddr>().map_err(|_| {
                invalid(format!(
                    "route {}: gateway {g:?} is not an address",
                    r.destination
                ))
            })?),
        };
        let destination: IpNet = match (r.destination.as_str(), gateway) {
            ("default", Some(IpAddr::V6(_))) => "::/0".parse().expect("literal"),
            ("default", _) => "0.0.0.0/0".parse().expect("literal"),
            (d, _) => d
                .parse::<IpNet>()
                .map_err(|_| {
                    invalid(format!(
                        "route destination {d:?} is not PREFIX/LENGTH or default"
                    ))
                })?
                .trunc(),
        };
        if let Some(g) = gateway {
            if g.is_ipv4() != destination.addr().is_ipv4() {
                return Err(invalid(format!(
                    "route {destination}: gateway {g} is of another address family"
                )));
            }
            if !usable(g) || ours(g) {
                return Err(invalid(format!(
                    "route {destination}: gateway {g} is not another host on the link"
                )));
            }
            let on_link = link
                .addresses
                .iter()
                .any(|a| a.contains(&g) && a.prefix_len() < a.max_prefix_len());
            let link_local = matches!(g, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80);
            if !on_link && !link_local {
                return Err(invalid(format!(
                    "route {destination}: gateway {g} is outside the subnets of {} ({})",
                    link.name,
                    link.addresses
                        .iter()
                        .map(|a| a.trunc().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        routes.push(Route {
            destination,
            gateway,
            interface: link.name.clone(),
        });
    }
    if let Some(k) = kbs {
        // The route the guest's kernel would pick for the KBS (longest prefix, the connected
        // subnets included) must be a connected subnet or the default route.
        let connected = links
            .iter()
            .flat_map(|l| &l.addresses)
            .filter(|a| a.contains(&k))
            .map(|a| a.prefix_len())
            .max();
        let steering = routes
            .iter()
            .filter(|r| r.destination.prefix_len() > 0 && r.destination.contains(&k))
            .find(|r| connected.is_none_or(|c| r.destination.prefix_len() > c));
        if let Some(r) = steering {
            return Err(invalid(format!(
                "route {}{} would carry the traffic to the KBS ({k}, from the initdata); the KBS is reached on the link or by the default route",
                r.destination,
                r.gateway.map(|g| format!(" via {g}")).unwrap_or_default()
            )));
        }
    }
    let resolv_conf = resolv_conf(req)?;
    Ok(Plan {
        links,
        routes,
        resolv_conf,
    })
}

fn resolv_conf(req: &SetNetworkRequest) -> Result<Option<String>, NetError> {
    if req.dns_servers.is_empty() && req.dns_searches.is_empty() && req.dns_options.is_empty() {
        return Ok(None);
    }
    if req.dns_servers.len() > MAX_SERVERS
        || req.dns_searches.len() > MAX_SEARCHES
        || req.dns_options.len() > MAX_OPTIONS
    {
        return Err(invalid(format!(
            "DNS: at most {MAX_SERVERS} servers, {MAX_SEARCHES} search domains and {MAX_OPTIONS} options"
        )));
    }
    let mut text = String::new();
    for s in &req.dns_servers {
        let a: IpAddr = s
            .parse()
            .map_err(|_| invalid(format!("DNS server {s:?} is not an address")))?;
        text.push_str(&format!("nameserver {a}\n"));
    }
    let domain = |d: &str| {
        (1..=253).contains(&d.len())
            && d.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    };
    if let Some(bad) = req.dns_searches.iter().find(|d| !domain(d)) {
        return Err(invalid(format!("DNS search domain {bad:?}")));
    }
    if !req.dns_searches.is_empty() {
        text.push_str(&format!("search {}\n", req.dns_searches.join(" ")));
    }
    let option = |o: &str| {
        (1..=64).contains(&o.len())
            && o.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'.' | b'-' | b'_'))
    };
    if let Some(bad) = req.dns_options.iter().find(|o| !option(o)) {
        return Err(invalid(format!("DNS option {bad:?}")));
    }
    if !req.dns_options.is_empty() {
        text.push_str(&format!("options {}\n", req.dns_options.join(" ")));
    }
    Ok(Some(text))
}

/// The guest's network, configured once.
pub struct Network {
    kbs: Option<IpAddr>,
    ip: Vec<String>,
    resolv_conf: PathBuf,
    done: Mutex<bool>,
}

impl Network {
    /// A pod VM's network: `kbs` from the initdata, `ip(8)` as busybox's applet, the resolver
    /// at `/run/resolv.conf` (the pod VM's `/etc/resolv.conf` links there).
    pub fn pod_vm(kbs: Option<IpAddr>) -> Self {
        Self::new(
            kbs,
            vec!["/bin/busybox".into(), "ip".into()],
            "/run/resolv.conf".into(),
        )
    }

    /// A network configured with the command `ip` (program and leading arguments), writing
    /// the resolver to `resolv_conf`.
    pub fn new(kbs: Option<IpAddr>, ip: Vec<String>, resolv_conf: PathBuf) -> Self {
        Self {
            kbs,
            ip,
            resolv_conf,
            done: Mutex::new(false),
        }
    }

    /// A peer pod's tunnels (`req.tunnels`): each checked (a known interface's MAC, a VNI, a
    /// usable remote address, a port), then made as a VXLAN device with that MAC, so that
    /// [`Network::configure`] finds it as the interface. Nothing is made once the network was
    /// configured.
    pub async fn tunnels(&self, req: &SetNetworkRequest) -> Result<(), NetError> {
        if req.tunnels.is_empty() {
            return Ok(());
        }
        if *self.done.lock().unwrap_or_else(|p| p.into_inner()) {
            return Err(NetError::Unavailable(
                "the sandbox's network is already configured (once per sandbox)".into(),
            ));
        }
        let mut checked: Vec<(String, u32, std::net::Ipv4Addr, u16)> = Vec::new();
        for t in &req.tunnels {
            let mac = parse_mac(&t.mac)?;
            if !req
                .interfaces
                .iter()
                .any(|i| parse_mac(&i.mac).is_ok_and(|m| m == mac))
            {
                return Err(invalid(format!(
                    "tunnel for {mac}: no interface of the request has that MAC"
                )));
            }
            if !(1..=0xff_ffff).contains(&t.vni) {
                return Err(invalid(format!(
                    "tunnel for {mac}: VNI {} (1 to 16777215)",
                    t.vni
                )));
            }
            let remote: std::net::Ipv4Addr = t.remote.parse().map_err(|_| {
                invalid(format!(
                    "tunnel for {mac}: remote {:?} is not an IPv4 address",
                    t.remote
                ))
            })?;
            if !usable(IpAddr::V4(remote)) {
                return Err(invalid(format!(
                    "tunnel for {mac}: remote {remote} is not a host address"
                )));
            }
            let port = u16::try_from(t.port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| invalid(format!("tunnel for {mac}: port {}", t.port)))?;
            if checked.iter().any(|(m, ..)| *m == mac) {
                return Err(invalid(format!("tunnel for {mac}: named twice")));
            }
            checked.push((mac, t.vni, remote, port));
        }
        // The vxlan module loads after the agent serves.
        crate::vm::later_modules()
            .await
            .map_err(|e| NetError::Apply(format!("the kernel's vxlan module: {e}")))?;
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| NetError::Apply(format!("netlink: {e}")))?;
        let conn = tokio::spawn(conn);
        let made = async {
            for (i, (mac, vni, remote, port)) in checked.iter().enumerate() {
                let bytes: Vec<u8> = mac
                    .split(':')
                    .filter_map(|b| u8::from_str_radix(b, 16).ok())
                    .collect();
                handle
                    .link()
                    .add(
                        rtnetlink::LinkVxlan::new(&format!("cfrvx{i}"), *vni)
                            .remote(*remote)
                            .port(*port)
                            .learning(false)
                            .address(bytes)
                            .build(),
                    )
                    .execute()
                    .await
                    .map_err(|e| {
                        NetError::Apply(format!(
                            "cannot make the tunnel for {mac} (VNI {vni} to {remote}): {e}"
                        ))
                    })?;
                tracing::info!(%mac, vni, %remote, port, "tunnel made");
            }
            Ok(())
        }
        .await;
        conn.abort();
        made
    }

    /// Checks `req` and applies it; refused after a first configuration was applied.
    pub fn configure(&self, req: &SetNetworkRequest) -> Result<Plan, NetError> {
        let plan = plan(req, self.kbs)?;
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        if *done {
            return Err(NetError::Unavailable(
                "the sandbox's network is already configured (once per sandbox)".into(),
            ));
        }
        *done = true;
        self.apply(&plan)?;
        Ok(plan)
    }

    fn ip(&self, args: &[&str]) -> Result<(), NetError> {
        let (prog, lead) = self.ip.split_first().expect("an ip command");
        let out = Command::new(prog)
            .args(lead)
            .args(args)
            .output()
            .map_err(|e| NetError::Apply(format!("cannot run {prog}: {e}")))?;
        if !out.status.success() {
            return Err(NetError::Apply(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// The guest's interface with MAC `mac`, from `ip -o link` (in this network namespace,
    /// which `/sys/class/net` would not show to a thread that entered another).
    fn find(&self, mac: &str) -> Result<String, NetError> {
        let (prog, lead) = self.ip.split_first().expect("an ip command");
        let out = Command::new(prog)
            .args(lead)
            .args(["-o", "link"])
            .output()
            .map_err(|e| NetError::Apply(format!("cannot run {prog}: {e}")))?;
        interface_with_mac(&String::from_utf8_lossy(&out.stdout), mac).ok_or_else(|| {
            NetError::Apply(format!(
                "the guest has no network device with MAC {mac} (the node did not plug it in)"
            ))
        })
    }

    /// Applies a checked plan: names, MTUs, addresses, links up, routes, the resolver.
    pub fn apply(&self, plan: &Plan) -> Result<(), NetError> {
        for l in &plan.links {
            let current = self.find(&l.mac)?;
            if current != l.name {
                self.ip(&["link", "set", "dev", &current, "down"])?;
                self.ip(&["link", "set", "dev", &current, "name", &l.name])?;
            }
            if let Some(m) = l.mtu {
                self.ip(&["link", "set", "dev", &l.name, "mtu", &m.to_string()])?;
            }
            for a in &l.addresses {
                let family = if a.addr().is_ipv6() { "-6" } else { "-4" };
                self.ip(&[family, "addr", "add", &a.to_string(), "dev", &l.name])?;
            }
            self.ip(&["link", "set", "dev", &l.name, "up"])?;
        }
        for r in &plan.routes {
            let family = if r.destination.addr().is_ipv6() {
                "-6"
            } else {
                "-4"
            };
            let dest = r.destination.to_string();
            let mut args = vec![family, "route", "replace", &dest];
            let gw = r.gateway.map(|g| g.to_string());
            if let Some(g) = &gw {
                args.extend(["via", g]);
            }
            args.extend(["dev", &r.interface]);
            self.ip(&args)?;
        }
        if let Some(text) = &plan.resolv_conf {
            write_atomic(&self.resolv_conf, text.as_bytes())
                .map_err(|e| NetError::Apply(format!("{}: {e}", self.resolv_conf.display())))?;
        }
        tracing::info!(
            interfaces = plan.links.len(),
            routes = plan.routes.len(),
            dns = plan.resolv_conf.is_some(),
            "the pod network is configured"
        );
        Ok(())
    }
}

/// The interface whose `link/ether` is `mac` in `ip -o link` output (iproute2's or busybox's:
/// `2: eth0: <…> mtu 1500 … \\    link/ether 0a:58:… brd …`).
fn interface_with_mac(listing: &str, mac: &str) -> Option<String> {
    listing.lines().find_map(|l| {
        let name = l.split(": ").nth(1)?.split('@').next()?.trim();
        let ether = l.split("link/ether ").nth(1)?.split_whitespace().next()?;
        ether.eq_ignore_ascii_case(mac).then(|| name.to_string())
    })
}

fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{NetworkInterface, NetworkRoute};

    fn pod(addr: &str, routes: &[(&str, &str)]) -> SetNetworkRequest {
        SetNetworkRequest {
            interfaces: vec![NetworkInterface {
                name: "eth0".into(),
                mac: "0A:58:0a:58:07:05".into(),
                addresses: vec![addr.into()],
                mtu: 1450,
            }],
            routes: routes
                .iter()
                .map(|(d, g)| NetworkRoute {
                    destination: d.to_string(),
                    gateway: g.to_string(),
                    interface: "eth0".into(),
                })
                .collect(),
            dns_servers: vec!["10.96.0.10".into()],
            dns_searches: vec!["default.svc.cluster.local".into()],
            dns_options: vec!["ndots:5".into()],
            tunnels: Vec::new(),
        }
    }

    fn refused(req: &SetNetworkRequest, kbs: Option<&str>) -> String {
        let e = plan(req, kbs.map(|k| k.parse().unwrap())).unwrap_err();
        assert!(matches!(e, NetError::Invalid(_)), "{e}");
        e.to_string()
    }

    #[tokio::test]
    async fn a_tunnel_is_refused_before_anything_is_made_naming_what_is_wrong() {
        let net = Network::new(None, vec!["false".into()], "/nonexistent".into());
        let with = |mac: &str, vni: u32, remote: &str, port: u32| {
            let mut r = pod("10.88.7.5/24", &[]);
            r.tunnels = vec![crate::proto::VxlanTunnel {
                mac: mac.into(),
                vni,
                remote: remote.into(),
                port,
            }];
            r
        };
        let refused = |r: SetNetworkRequest| {
            let net = &net;
            async move { net.tunnels(&r).await.unwrap_err().to_string() }
        };
        let e = refused(with("0a:58:0a:58:07:06", 5, "10.99.7.1", 4789)).await;
        assert!(
            e.contains("no interface of the request has that MAC"),
            "{e}"
        );
        let e = refused(with("0a:58:0a:58:07:05", 0, "10.99.7.1", 4789)).await;
        assert!(e.contains("VNI 0"), "{e}");
        let e = refused(with("0a:58:0a:58:07:05", 1 << 24, "10.99.7.1", 4789)).await;
        assert!(e.contains("VNI 16777216"), "{e}");
        let e = refused(with("0a:58:0a:58:07:05", 5, "node", 4789)).await;
        assert!(e.contains("remote \"node\" is not an IPv4 address"), "{e}");
        let e = refused(with("0a:58:0a:58:07:05", 5, "0.0.0.0", 4789)).await;
        assert!(e.contains("is not a host address"), "{e}");
        let e = refused(with("0a:58:0a:58:07:05", 5, "10.99.7.1", 70000)).await;
        assert!(e.contains("port 70000"), "{e}");
        // None at all is nothing to do.
        net.tunnels(&pod("10.88.7.5/24", &[])).await.unwrap();
    }

    #[test]
    fn the_interface_is_found_by_its_mac_in_either_ips_listing() {
        let iproute2 = "1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue state UNKNOWN mode DEFAULT group default qlen 1000\\    link/loopback 00:00:00:00:00:00 brd 00:00:00:00:00:00\n\
            3: eth0@if4: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP mode DEFAULT group default \\    link/ether 0a:58:0a:58:07:05 brd ff:ff:ff:ff:ff:ff link-netnsid 0\n";
        assert_eq!(
            interface_with_mac(iproute2, "0A:58:0a:58:07:05").as_deref(),
            Some("eth0")
        );
        let busybox = "2: eth0: <BROADCAST,MULTICAST> mtu 1500 qdisc noop qlen 1000\\    link/ether 0a:58:0a:58:07:05 brd ff:ff:ff:ff:ff:ff\n";
        assert_eq!(
            interface_with_mac(busybox, "0a:58:0a:58:07:05").as_deref(),
            Some("eth0")
        );
        assert_eq!(interface_with_mac(busybox, "0a:58:0a:58:07:06"), None);
    }

    #[test]
    fn a_pods_network_becomes_a_plan() {
        let p = plan(
            &pod("10.88.7.5/24", &[("default", "10.88.7.1")]),
            Some("10.96.0.3".parse().unwrap()),
        )
        .unwrap();
        assert_eq!(p.links[0].mac, "0a:58:0a:58:07:05");
        assert_eq!(p.links[0].mtu, Some(1450));
        assert_eq!(p.routes[0].destination.to_string(), "0.0.0.0/0");
        assert_eq!(
            p.resolv_conf.as_deref(),
            Some("nameserver 10.96.0.10\nsearch default.svc.cluster.local\noptions ndots:5\n")
        );
        // The KBS on the pod's own subnet is reached on the link: fine.
        plan(
            &pod("10.88.7.5/24", &[("default", "10.88.7.1")]),
            Some("10.88.7.1".parse().unwrap()),
        )
        .unwrap();
        // IPv6 beside IPv4, a link-local IPv6 gateway.
        let mut v6 = pod("10.88.7.5/24", &[("default", "fe80::1")]);
        v6.interfaces[0].addresses.push("fd00:7::5/64".into());
        let p = plan(&v6, None).unwrap();
        assert_eq!(p.routes[0].destination.to_string(), "::/0");
    }

    #[test]
    fn malformed_configurations_are_refused_naming_what_is_wrong() {
        let e = refused(&pod("10.88.7.0/24", &[]), None);
        assert!(
            e.contains("10.88.7.0/24 is outside the subnet's hosts"),
            "{e}"
        );
        let e = refused(&pod("10.88.7.255/24", &[]), None);
        assert!(e.contains("broadcast"), "{e}");
        let e = refused(&pod("10.88.7.5", &[]), None);
        assert!(e.contains("not ADDRESS/PREFIX"), "{e}");
        let e = refused(&pod("127.0.0.5/8", &[]), None);
        assert!(e.contains("not a host address"), "{e}");
        let e = refused(&pod("10.88.7.5/24", &[("default", "10.99.0.1")]), None);
        assert!(
            e.contains("gateway 10.99.0.1 is outside the subnets of eth0 (10.88.7.0/24)"),
            "{e}"
        );
        let e = refused(&pod("10.88.7.5/24", &[("default", "10.88.7.5")]), None);
        assert!(e.contains("not another host on the link"), "{e}");
        let e = refused(&pod("10.88.7.5/24", &[("10.0.0.0/8", "fd00::1")]), None);
        assert!(e.contains("another address family"), "{e}");
        let mut r = pod("10.88.7.5/24", &[]);
        r.routes.push(NetworkRoute {
            destination: "default".into(),
            gateway: "10.88.7.1".into(),
            interface: "eth9".into(),
        });
        let e = refused(&r, None);
        assert!(e.contains("interface \"eth9\""), "{e}");
        let mut r = pod("10.88.7.5/24", &[]);
        r.interfaces[0].mac = "01:00:5e:00:00:01".into();
        assert!(refused(&r, None).contains("not a unicast"));
        r.interfaces[0].mac = "0a:58:0a".into();
        assert!(refused(&r, None).contains("aa:bb:cc:dd:ee:ff"));
        let mut r = pod("10.88.7.5/24", &[]);
        r.interfaces[0].name = "lo".into();
        assert!(refused(&r, None).contains("interface name"));
        r.interfaces[0].name = "eth0\nx".into();
        assert!(refused(&r, None).contains("interface name"));
        let mut r = pod("10.88.7.5/24", &[]);
        r.interfaces[0].mtu = 40;
        assert!(refused(&r, None).contains("MTU 40"));
        // The resolver's file cannot be given lines of the node's choosing.
        let mut r = pod("10.88.7.5/24", &[]);
        r.dns_searches = vec!["a.example\nnameserver 6.6.6.6".into()];
        assert!(refused(&r, None).contains("search domain"));
        let mut r = pod("10.88.7.5/24", &[]);
        r.dns_servers = vec!["ns.example".into()];
        assert!(refused(&r, None).contains("not an address"));
        let mut r = pod("10.88.7.5/24", &[]);
        r.dns_options = vec!["ndots:5 rotate\n".into()];
        assert!(refused(&r, None).contains("DNS option"));
    }

    #[test]
    fn the_kbs_is_never_steered() {
        let kbs = Some("10.96.0.3");
        // A route that would carry the KBS's traffic to a router of the node's choice.
        let e = refused(
            &pod(
                "10.88.7.5/24",
                &[("default", "10.88.7.1"), ("10.96.0.0/24", "10.88.7.66")],
            ),
            kbs,
        );
        assert!(
            e.contains(
                "route 10.96.0.0/24 via 10.88.7.66 would carry the traffic to the KBS (10.96.0.3"
            ),
            "{e}"
        );
        // Even more specific than the KBS's own subnet.
        let e = refused(&pod("10.96.0.5/16", &[("10.96.0.3/32", "10.96.0.1")]), kbs);
        assert!(e.contains("would carry the traffic to the KBS"), "{e}");
        // The guest taking the KBS's address.
        let e = refused(&pod("10.96.0.3/16", &[]), kbs);
        assert!(e.contains("the KBS's address"), "{e}");
        // A route elsewhere is fine, and so is a KBS named by a host name (nothing to check).
        plan(
            &pod(
                "10.88.7.5/24",
                &[("default", "10.88.7.1"), ("10.97.0.0/16", "10.88.7.66")],
            ),
            kbs.map(|k| k.parse().unwrap()),
        )
        .unwrap();
        assert_eq!(kbs_address("https://kbs.example:8080"), None);
        assert_eq!(
            kbs_address("http://10.96.0.3:8080"),
            Some("10.96.0.3".parse().unwrap())
        );
        assert_eq!(
            kbs_address("http://[fd00::3]:8080"),
            Some("fd00::3".parse().unwrap())
        );
    }

    /// The plan applied with iproute2 to a dummy interface in a network namespace of this
    /// test's own (a thread that unshared one), as busybox's `ip` applies it in a pod VM.
    #[test]
    fn a_plan_is_applied_to_the_interface_with_that_mac() {
        let dir = tempfile::tempdir().unwrap();
        let resolv = dir.path().join("resolv.conf");
        let r = resolv.clone();
        let shown = std::thread::spawn(move || {
            // SAFETY: only the network namespace is unshared (not the file table, the case
            // that makes unshare unsafe for the other threads).
            #[allow(unsafe_code)]
            unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }
                .expect("a network namespace");
            let run = |args: &[&str]| {
                let out = Command::new("ip").args(args).output().unwrap();
                assert!(out.status.success(), "ip {args:?}: {out:?}");
                String::from_utf8(out.stdout).unwrap()
            };
            run(&[
                "link",
                "add",
                "veth7",
                "address",
                "0a:58:0a:58:07:05",
                "type",
                "veth",
                "peer",
                "name",
                "veth8",
            ]);
            let net = Network::new(Some("10.96.0.3".parse().unwrap()), vec!["ip".into()], r);
            let req = pod("10.88.7.5/24", &[("default", "10.88.7.1")]);
            net.configure(&req).unwrap();
            let again = net.configure(&req).unwrap_err();
            assert!(again.to_string().contains("already configured"), "{again}");
            (
                run(&["-o", "addr", "show", "dev", "eth0"]),
                run(&["-o", "link", "show", "dev", "eth0"]),
                run(&["route", "show"]),
            )
        })
        .join()
        .unwrap();
        assert!(shown.0.contains("inet 10.88.7.5/24"), "{}", shown.0);
        assert!(
            shown.1.contains("mtu 1450") && shown.1.contains("0a:58:0a:58:07:05"),
            "{}",
            shown.1
        );
        assert!(
            shown.2.contains("default via 10.88.7.1 dev eth0"),
            "{}",
            shown.2
        );
        assert!(std::fs::read_to_string(&resolv)
            .unwrap()
            .contains("nameserver 10.96.0.10"));
    }
}
