//! A disk-booted pod VM in a cloud: the launch configuration comes as the VM's user data, from
//! the cloud's instance metadata service, over the VM's own interface configured by DHCP.
//!
//! Which cloud is read from the firmware's SMBIOS system vendor (`/sys/class/dmi/id`). The
//! user data is not trusted for being where it is: what matters in it is checked (the initdata
//! against the attested HOST_DATA; the agent channel's keys pin the one client the node
//! chose), as it is when the host hands it over by fw_cfg.
//!
//! - **AWS** (IMDSv2): `PUT /latest/api/token` (a session token, 5 minutes), then
//!   `GET /latest/user-data` with it.
//! - **Azure**: `GET /metadata/instance/compute/userData?api-version=2021-01-01&format=text`
//!   with `Metadata: true`; the answer is base64.
//!
//! IBM Cloud VPC is not read yet (its s390x Secure Execution guests need an s390x image, and
//! its x86 metadata paths are not verified here): such a VM says it found no launch
//! configuration.

use std::time::Duration;

use zeroize::Zeroizing;

/// The instance metadata service's address in every supported cloud.
pub const METADATA: &str = "169.254.169.254";

/// A cloud whose metadata service serves the launch configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cloud {
    /// AWS EC2.
    Aws,
    /// Microsoft Azure.
    Azure,
}

impl Cloud {
    /// The cloud that SMBIOS names (`sys_vendor`), if a supported one.
    pub fn from_smbios(vendor: &str) -> Option<Self> {
        match vendor.trim() {
            "Amazon EC2" => Some(Self::Aws),
            "Microsoft Corporation" => Some(Self::Azure),
            _ => None,
        }
    }

    /// The cloud this VM runs in, from `/sys/class/dmi/id`.
    pub fn detect() -> Result<Self, String> {
        let vendor = std::fs::read_to_string("/sys/class/dmi/id/sys_vendor").unwrap_or_default();
        Self::from_smbios(&vendor).ok_or_else(|| {
            format!(
                "no launch configuration: no fw_cfg entry, and the firmware names no supported cloud (SMBIOS vendor {:?}; AWS and Azure are)",
                vendor.trim()
            )
        })
    }

    /// Fetches the user data from this cloud's metadata service at `base`
    /// (`http://169.254.169.254`), retrying for up to `bound` while it does not answer yet.
    pub fn user_data(self, base: &str, bound: Duration) -> Result<Zeroizing<Vec<u8>>, String> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(5)))
            .http_status_as_error(false)
            .max_redirects(0)
            .build()
            .into();
        let until = std::time::Instant::now() + bound;
        loop {
            match self.fetch(&agent, base) {
                Ok(d) => return Ok(d),
                Err(e) if std::time::Instant::now() < until => {
                    tracing::debug!(error = %e, "the metadata service does not answer yet");
                    std::thread::sleep(Duration::from_millis(250));
                }
                Err(e) => {
                    return Err(format!(
                        "the launch configuration from {self:?}'s metadata service: {e}"
                    ))
                }
            }
        }
    }

    fn fetch(self, agent: &ureq::Agent, base: &str) -> Result<Zeroizing<Vec<u8>>, String> {
        let body = |mut r: ureq::http::Response<ureq::Body>, what: &str| {
            let status = r.status().as_u16();
            let b = Zeroizing::new(
                r.body_mut()
                    .with_config()
                    .limit(1 << 20)
                    .read_to_vec()
                    .map_err(|e| format!("{what}: {e}"))?,
            );
            if status != 200 {
                return Err(format!("{what}: HTTP {status}"));
            }
            Ok(b)
        };
        let e = |what: &str| {
            let what = what.to_string();
            move |x: ureq::Error| format!("{what}: {x}")
        };
        match self {
            Self::Aws => {
                let r = agent
                    .put(format!("{base}/latest/api/token"))
                    .header("X-aws-ec2-metadata-token-ttl-seconds", "300")
                    .send_empty()
                    .map_err(e("IMDSv2 token"))?;
                let token = body(r, "IMDSv2 token")?;
                let token = String::from_utf8_lossy(&token).trim().to_string();
                let r = agent
                    .get(format!("{base}/latest/user-data"))
                    .header("X-aws-ec2-metadata-token", &token)
                    .call()
                    .map_err(e("user-data"))?;
                body(r, "user-data")
            }
            Self::Azure => {
                let r = agent
                    .get(format!(
                        "{base}/metadata/instance/compute/userData?api-version=2021-01-01&format=text"
                    ))
                    .header("Metadata", "true")
                    .call()
                    .map_err(e("userData"))?;
                let b64 = body(r, "userData")?;
                use base64::Engine;
                base64::engine::general_purpose::STANDARD
                    .decode(b64.trim_ascii())
                    .map(Zeroizing::new)
                    .map_err(|x| format!("userData is not base64: {x}"))
            }
        }
    }
}

/// Brings the VM's own interface (the first Ethernet device) up as `name` and configures it
/// by DHCP (busybox `udhcpc`, with the image's hook); returns the address it got.
pub fn dhcp(name: &str) -> Result<String, String> {
    let dev = crate::sys::wait_for("a network interface", || {
        let mut devs: Vec<_> = std::fs::read_dir("/sys/class/net")
            .ok()?
            .flatten()
            .filter(|e| {
                // A physical (or paravirtual) Ethernet device: it has a device link; type 1.
                e.path().join("device").exists()
                    && std::fs::read_to_string(e.path().join("type")).is_ok_and(|t| t.trim() == "1")
            })
            .map(|e| e.file_name())
            .collect();
        devs.sort();
        devs.into_iter().next().map(std::path::PathBuf::from)
    })?;
    let dev = dev.display().to_string();
    crate::sys::run_tool("/bin/busybox", &["ip", "link", "set", &dev, "name", name])?;
    crate::sys::run_tool("/bin/busybox", &["ip", "link", "set", name, "up"])?;
    crate::sys::run_tool(
        "/bin/busybox",
        &[
            "udhcpc",
            "-i",
            name,
            "-f",
            "-q",
            "-n",
            "-t",
            "20",
            "-T",
            "1",
            "-A",
            "1",
            "-s",
            "/etc/coffer/udhcpc.script",
        ],
    )?;
    let out = std::process::Command::new("/bin/busybox")
        .args(["ip", "-o", "-4", "addr", "show", "dev", name])
        .output()
        .map_err(|e| format!("ip addr: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .map(str::to_string)
        .ok_or_else(|| format!("DHCP gave {name} no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cloud_is_read_from_smbios_and_an_unknown_one_is_none() {
        assert_eq!(Cloud::from_smbios("Amazon EC2\n"), Some(Cloud::Aws));
        assert_eq!(
            Cloud::from_smbios("Microsoft Corporation\n"),
            Some(Cloud::Azure)
        );
        assert_eq!(Cloud::from_smbios("QEMU"), None);
    }
}
