//! What the JSON REST providers (Azure, IBM Cloud) share: one HTTP client (ureq over rustls),
//! endpoints that never carry a bearer token in the clear off loopback, a cached OAuth token
//! renewed before it expires, and calls retried as the clouds ask (`Retry-After` on 429 and 503,
//! back-off on other 5xx and on transport errors).

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use zeroize::Zeroizing;

use crate::provider::CloudError;

/// How many times a call is retried while throttled or failing on the cloud's side.
const RETRIES: u32 = 6;
/// The longest `Retry-After` honoured; a longer one is waited out in several tries.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// An HTTP answer: status, the headers the providers read, the body.
#[derive(Debug)]
pub struct Answer {
    /// The HTTP status.
    pub status: u16,
    /// `Retry-After`, in seconds.
    pub retry_after: Option<u64>,
    /// `Azure-AsyncOperation`.
    pub async_operation: Option<String>,
    /// `Location`.
    pub location: Option<String>,
    /// The body.
    pub body: String,
}

impl Answer {
    /// The body as JSON (`null` when empty or not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Checks that `url` is `https://`, or `http://` to a loopback address (a local test server):
/// a bearer token or secret is never sent in the clear over a network.
pub fn check_endpoint(what: &str, url: &str) -> Result<(), String> {
    if url.starts_with("https://") {
        return Ok(());
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(format!("{what} {url:?}: use an https:// URL"));
    };
    let host = rest.split(['/', '?']).next().unwrap_or_default();
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .map(|a| a.is_loopback())
            .unwrap_or(false);
    if loopback {
        Ok(())
    } else {
        Err(format!(
            "{what} {url:?}: plain http is allowed to loopback only (tokens and secrets travel on it); use https://"
        ))
    }
}

/// The HTTP client of one provider.
pub struct Http {
    agent: ureq::Agent,
    provider: &'static str,
}

impl Http {
    /// A client whose errors name `provider`.
    pub fn new(provider: &'static str) -> Self {
        // ureq's TLS takes the process's rustls provider.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(60)))
            .http_status_as_error(false)
            .max_redirects(0)
            .build()
            .into();
        Self { agent, provider }
    }

    /// A provider error naming what failed.
    pub fn fail(&self, why: impl std::fmt::Display) -> CloudError {
        CloudError::Provider {
            provider: self.provider,
            why: why.to_string(),
        }
    }

    /// One request, without retries. `body` is JSON, or a form when `form` is set.
    pub fn once(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        form: bool,
    ) -> Result<Answer, ureq::Error> {
        let mut req = ureq::http::Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let mut r = match body {
            Some(b) => {
                let ct = if form {
                    "application/x-www-form-urlencoded"
                } else {
                    "application/json"
                };
                // Borrowed, not copied: the body may hold a secret (a client secret, the agent
                // channel's key), which only its zeroized owner keeps.
                let req = req
                    .header("content-type", ct)
                    .body(b)
                    .map_err(|e| ureq::Error::BadUri(e.to_string()))?;
                self.agent.run(req)?
            }
            None => {
                let req = req
                    .body(())
                    .map_err(|e| ureq::Error::BadUri(e.to_string()))?;
                self.agent.run(req)?
            }
        };
        let h = |k: &str| {
            r.headers()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let retry_after = h("retry-after").and_then(|v| v.trim().parse().ok());
        let async_operation = h("azure-asyncoperation");
        let location = h("location");
        let status = r.status().as_u16();
        let body = r.body_mut().read_to_string()?;
        Ok(Answer {
            status,
            retry_after,
            async_operation,
            location,
            body,
        })
    }

    /// A request retried while the cloud throttles (429, honouring `Retry-After`) or fails on
    /// its side (5xx, transport errors), with exponential back-off. The last answer is returned
    /// whatever its status; `what` names the call in logs and errors.
    pub fn call(
        &self,
        what: &str,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<Answer, CloudError> {
        let mut delay = Duration::from_millis(200);
        for attempt in 0..=RETRIES {
            let last = attempt == RETRIES;
            match self.once(method, url, headers, body, false) {
                Ok(a) if (a.status == 429 || a.status >= 500) && !last => {
                    let wait = a
                        .retry_after
                        .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER))
                        .unwrap_or(delay);
                    tracing::warn!(
                        provider = self.provider,
                        call = what,
                        status = a.status,
                        wait_ms = wait.as_millis() as u64,
                        "throttled or failing on the cloud's side; backing off"
                    );
                    std::thread::sleep(wait);
                    delay = (delay * 2).min(MAX_RETRY_AFTER);
                }
                Ok(a) => return Ok(a),
                Err(e) if !last => {
                    tracing::warn!(provider = self.provider, call = what, error = %e, "unreachable; retrying");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(MAX_RETRY_AFTER);
                }
                Err(e) => return Err(self.fail(format!("{what}: {e}"))),
            }
        }
        unreachable!("the last attempt returns")
    }
}

/// A bearer token and when it stops being used (a margin before it expires).
struct Held {
    token: Zeroizing<String>,
    renew_at: Instant,
}

/// A cached bearer token, fetched again by its source before it expires or when the API
/// refuses it.
#[derive(Default)]
pub struct TokenCache {
    held: Mutex<Option<Held>>,
}

impl TokenCache {
    /// The current token, or a new one from `fetch` (which returns the token and its lifetime
    /// in seconds); renewed at 80% of its lifetime, as the clouds' own SDKs do.
    pub fn get(
        &self,
        fetch: impl FnOnce() -> Result<(Zeroizing<String>, u64), CloudError>,
    ) -> Result<Zeroizing<String>, CloudError> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = held.as_ref().filter(|h| Instant::now() < h.renew_at) {
            return Ok(h.token.clone());
        }
        let (token, lifetime) = fetch()?;
        let renew_at = Instant::now() + Duration::from_secs(lifetime.saturating_mul(4) / 5);
        *held = Some(Held {
            token: token.clone(),
            renew_at,
        });
        Ok(token)
    }

    /// Drops the token (the API refused it).
    pub fn forget(&self) {
        *self.held.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_travel_over_https_or_to_loopback_only() {
        assert!(check_endpoint("endpoint", "https://management.azure.com").is_ok());
        assert!(check_endpoint("endpoint", "http://127.0.0.1:8080/x").is_ok());
        assert!(check_endpoint("endpoint", "http://[::1]:80").is_ok());
        assert!(check_endpoint("endpoint", "http://localhost/").is_ok());
        let e = check_endpoint("endpoint", "http://10.0.0.1:8080").unwrap_err();
        assert!(e.contains("loopback only"), "{e}");
        assert!(check_endpoint("endpoint", "http://127.0.0.1.evil.example/").is_err());
        assert!(check_endpoint("endpoint", "ftp://x").is_err());
    }

    #[test]
    fn a_token_is_reused_until_renewal_and_fetched_again_when_refused() {
        let c = TokenCache::default();
        let mut n = 0;
        let mut fetch = |life| {
            n += 1;
            let t = Zeroizing::new(format!("t{n}"));
            c.get(|| Ok((t, life))).unwrap().to_string()
        };
        assert_eq!(fetch(3600), "t1");
        assert_eq!(fetch(3600), "t1", "still fresh");
        c.forget();
        assert_eq!(fetch(0), "t3", "refused: fetched again");
        assert_eq!(
            fetch(3600),
            "t4",
            "a token at the end of its life is renewed"
        );
    }
}
