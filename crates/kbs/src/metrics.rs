//! Prometheus metrics served at `/metrics`.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// The KBS's metrics.
pub struct Metrics {
    registry: Registry,
    /// Requests by endpoint and HTTP status.
    pub requests: IntCounterVec,
    /// Attestations by TEE and outcome (EAR status, or `error`).
    pub attestations: IntCounterVec,
    /// Resource release decisions by outcome.
    pub releases: IntCounterVec,
    /// Request latency by endpoint.
    pub latency: HistogramVec,
    /// Client connections by event: `accepted`, `evicted` (closed at the bound to admit a new
    /// one), `refused` (at the bound with every connection busy), `tls_timeout`.
    pub connections: IntCounterVec,
    /// Client connections open now.
    pub open_connections: IntGauge,
    /// Resident set size of this process, refreshed at each scrape.
    rss: IntGauge,
}

/// Resident set size from `/proc/self/status` (Linux), in bytes.
fn resident_bytes() -> Option<i64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: i64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

impl Metrics {
    /// Registers the metrics.
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "kbs_http_requests_total",
                "HTTP requests by endpoint and status",
            ),
            &["endpoint", "status"],
        )
        .expect("valid metric");
        let attestations = IntCounterVec::new(
            Opts::new("kbs_attestations_total", "Attestations by TEE and outcome"),
            &["tee", "outcome"],
        )
        .expect("valid metric");
        let releases = IntCounterVec::new(
            Opts::new(
                "kbs_resource_releases_total",
                "Resource release decisions by outcome",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "kbs_request_duration_seconds",
                "Request latency by endpoint",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0,
            ]),
            &["endpoint"],
        )
        .expect("valid metric");
        let connections = IntCounterVec::new(
            Opts::new(
                "kbs_connections_total",
                "Client connections by event (accepted, evicted, refused, tls_timeout)",
            ),
            &["event"],
        )
        .expect("valid metric");
        let open_connections = IntGauge::new("kbs_open_connections", "Client connections open now")
            .expect("valid metric");
        registry
            .register(Box::new(open_connections.clone()))
            .expect("unique metric");
        for c in [&requests, &attestations, &releases, &connections] {
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
        }
        registry
            .register(Box::new(latency.clone()))
            .expect("unique metric");
        let rss = IntGauge::new(
            "kbs_process_resident_memory_bytes",
            "Resident memory of the KBS process",
        )
        .expect("valid metric");
        registry
            .register(Box::new(rss.clone()))
            .expect("unique metric");
        Self {
            registry,
            requests,
            attestations,
            releases,
            latency,
            connections,
            open_connections,
            rss,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        if let Some(b) = resident_bytes() {
            self.rss.set(b);
        }
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
