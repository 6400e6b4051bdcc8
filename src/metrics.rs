//! Prometheus metrics, registered once and shared by every module.
//!
//! Label values are bounded: request kinds, status codes, configured upstream
//! names, reason slugs. Never a path or a client-chosen name. Depends on
//! nothing else in the crate.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric pullgate exports.
pub struct Metrics {
    registry: Registry,
    /// Client requests by kind (`manifest`, `blob`, ...) and status code.
    pub requests: IntCounterVec,
    /// Pulls answered 403 (or served with a warning in audit mode).
    pub blocked_pulls: IntCounterVec,
    /// Cache lookups by kind and result (`hit`, `miss`, `stale`).
    pub cache_requests: IntCounterVec,
    /// Requests sent upstream, by upstream and status (`error` when no answer).
    pub upstream_requests: IntCounterVec,
    pub upstream_duration: HistogramVec,
    /// Bytes of blobs and manifests sent to clients, by source (`cache`, `upstream`).
    pub bytes_served: IntCounterVec,
    /// Bytes of blobs and manifests held in the store.
    pub store_size: IntGauge,
    /// `storage.max_size`, 0 when unset: alert rules compare the store with it.
    pub store_max_size: IntGauge,
    /// Blobs evicted to stay under `storage.max_size`.
    pub evictions: IntCounterVec,
    /// Upstream fetches running now.
    pub inflight_fetches: IntGauge,
    /// Tags served from their last known digest because the upstream failed.
    pub stale_serves: IntCounterVec,
    /// Tags that moved to denied content and were kept on their last approved digest.
    pub tag_drift: IntCounterVec,
    /// Base image refreshes by result (ok, stale, error).
    pub base_refreshes: IntCounterVec,
    /// Base image manifests currently allowed.
    pub base_images: prometheus::IntGauge,
    /// Upstream bodies whose bytes did not hash to the digest asked for.
    pub digest_mismatches: IntCounterVec,
    /// Config reloads by result (`ok`, `error`).
    pub config_reloads: IntCounterVec,
    /// Time to answer a manifest request (from cache or upstream).
    pub manifest_duration: Histogram,
    /// Signature verdicts by result (`pass`, `fail`, `cached`, `unavailable`).
    pub verifications: IntCounterVec,
    /// Time to reach a fresh verdict (signature fetch and checks).
    pub verify_duration: Histogram,
    /// Audit records lost, by kind (`dropped`: queue full; `write`, `reopen`).
    pub audit_errors: IntCounterVec,
    /// Pulls left in the upstream's rate-limit window, as it last said
    /// (Docker Hub's `ratelimit-remaining`).
    pub upstream_ratelimit_remaining: IntGaugeVec,
    /// Store writes that failed, by kind (`no-space`: the disk or a quota is
    /// full; `other`).
    pub store_write_errors: IntCounterVec,
    /// Client connections open now.
    pub connections: IntGauge,
    /// Connections refused because `server.max_connections` were open.
    pub connections_refused: IntCounter,
    /// Connections closed for a deadline, by kind (`header`: no whole
    /// request head in time, idle keep-alive included; `send`: the client
    /// stopped reading its response).
    pub connection_timeouts: IntCounterVec,
    /// Request handlers that panicked (a bug; answered 500).
    pub panics: IntCounter,
    /// Requests answered 401, by reason (`missing`, `malformed`,
    /// `bad-credentials`).
    pub auth_failures: IntCounterVec,
    /// htpasswd files read again after a change, by result (`ok`, `error`).
    pub auth_reloads: IntCounterVec,
    /// TLS handshakes that failed (an untrusted or expired client
    /// certificate, a client that does not speak TLS, a timeout).
    pub tls_handshake_failures: IntCounter,
    /// Requests of identities that belong to a tenant, by tenant, kind and
    /// status code (tenants come from the config: bounded).
    pub tenant_requests: IntCounterVec,
    /// Requests refused because they came round to this pullgate again, or
    /// passed too many pullgates.
    pub loops_refused: IntCounter,
    /// Imports (`pullgate import`) this server applied to its store.
    pub imports_applied: IntCounter,
    /// Requests to the shared bucket (`[storage.s3]`) by operation and
    /// result.
    pub bucket_requests: IntCounterVec,
    /// Blob uploads to the shared bucket running or waiting now.
    pub bucket_uploads_pending: IntGauge,
    /// The shared bucket's blob bytes at the last eviction pass.
    pub bucket_size: IntGauge,
    /// Every metric name registered, for checks against dashboards.
    pub names: Vec<&'static str>,
    /// `requests` children, resolved once per (kind, status) on first use:
    /// a cached pull should not hash its labels every time.
    request_children: Vec<std::sync::OnceLock<IntCounter>>,
    /// `bytes_served{source="cache"}`, for the same reason.
    bytes_from_cache: std::sync::OnceLock<IntCounter>,
}

/// The request kinds `pullgate_requests_total` counts.
const KINDS: [&str; 7] = [
    "manifest",
    "blob",
    "tags",
    "referrers",
    "base",
    "push",
    "other",
];

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        fn single_counter(r: &Registry, name: &str, help: &str) -> IntCounter {
            let c = IntCounter::new(name, help).expect("valid metric");
            r.register(Box::new(c.clone()))
                .expect("metric registered once");
            c
        }
        fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            r.register(Box::new(c.clone()))
                .expect("metric registered once");
            c
        }
        let upstream_duration = HistogramVec::new(
            HistogramOpts::new(
                "pullgate_upstream_request_duration_seconds",
                "Time until an upstream answered (headers), by upstream.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["upstream"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(upstream_duration.clone()))
            .expect("metric registered once");
        let manifest_duration = Histogram::with_opts(
            HistogramOpts::new(
                "pullgate_manifest_request_duration_seconds",
                "Time to answer a manifest request.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
            ]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(manifest_duration.clone()))
            .expect("metric registered once");
        let verify_duration = Histogram::with_opts(
            HistogramOpts::new(
                "pullgate_verify_duration_seconds",
                "Time to reach a fresh signature verdict, fetches included.",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
            ]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(verify_duration.clone()))
            .expect("metric registered once");
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("metric registered once");
            g
        };
        let store_size = gauge(
            "pullgate_store_size_bytes",
            "Bytes held in the content store.",
        );
        let store_max_size = gauge(
            "pullgate_store_max_size_bytes",
            "storage.max_size in bytes (0: no limit set); eviction keeps pullgate_store_size_bytes near it.",
        );
        let inflight_fetches = gauge(
            "pullgate_inflight_fetches",
            "Upstream blob fetches running now.",
        );
        let bucket_uploads_pending = gauge(
            "pullgate_bucket_uploads_pending",
            "Blobs committed to the local tier and not yet in the shared bucket ([storage.s3]): uploads running or waiting.",
        );
        let bucket_size = gauge(
            "pullgate_bucket_size_bytes",
            "Bytes of blobs in the shared bucket ([storage.s3] with max_size), as the last eviction pass found them (0 before the first).",
        );
        let m = Metrics {
            bucket_uploads_pending,
            bucket_size,
            bucket_requests: counter(
                &registry,
                "pullgate_bucket_requests_total",
                "Requests to the shared bucket ([storage.s3]) by operation (read_blob, read_manifest, upload, write_manifest, tag, approval, meta, discard, lease, mark, evict) and result (ok, present, absent, waited, evicting, error).",
                &["op", "result"],
            ),
            requests: counter(
                &registry,
                "pullgate_requests_total",
                "Client requests by kind and status.",
                &["kind", "status"],
            ),
            blocked_pulls: counter(
                &registry,
                "pullgate_blocked_pulls_total",
                "Pulls blocked (enforce) or that would be blocked (audit), by upstream and reason.",
                &["upstream", "reason", "mode"],
            ),
            cache_requests: counter(
                &registry,
                "pullgate_cache_requests_total",
                "Cache lookups by kind and result (hit, miss, stale).",
                &["kind", "result"],
            ),
            upstream_requests: counter(
                &registry,
                "pullgate_upstream_requests_total",
                "Requests sent to upstreams, by upstream and status.",
                &["upstream", "status"],
            ),
            upstream_duration,
            bytes_served: counter(
                &registry,
                "pullgate_bytes_served_total",
                "Content bytes sent to clients, by source (cache, upstream).",
                &["source"],
            ),
            store_size,
            store_max_size,
            evictions: counter(
                &registry,
                "pullgate_evictions_total",
                "Blobs removed from the store, by reason: max_size (to stay under storage.max_size), damaged (its size was not the one its manifest gives; moved to quarantine/ and fetched again).",
                &["reason"],
            ),
            inflight_fetches,
            stale_serves: counter(
                &registry,
                "pullgate_stale_serves_total",
                "Tags served from their last known digest because the upstream failed.",
                &["upstream"],
            ),
            tag_drift: counter(
                &registry,
                "pullgate_tag_drift_total",
                "Tags whose upstream digest policy denies, served from their last approved digest (tag_drift = keep-approved).",
                &["upstream", "policy"],
            ),
            base_refreshes: counter(
                &registry,
                "pullgate_base_refreshes_total",
                "Resolutions of [bases] references, by result (ok, error). A tag whose upstream fails is resolved from the store and counts as ok (and in pullgate_stale_serves_total).",
                &["result"],
            ),
            base_images: {
                let g = prometheus::IntGauge::new(
                    "pullgate_base_images",
                    "Base image manifests (per platform) that images may be built on.",
                )
                .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("metric registered once");
                g
            },
            digest_mismatches: counter(
                &registry,
                "pullgate_digest_mismatches_total",
                "Upstream bodies that did not hash to the requested digest.",
                &["upstream"],
            ),
            config_reloads: counter(
                &registry,
                "pullgate_config_reloads_total",
                "Config reloads (SIGHUP) by result.",
                &["result"],
            ),
            manifest_duration,
            verifications: counter(
                &registry,
                "pullgate_verifications_total",
                "Signature verdicts by result (pass, fail, cached, unavailable).",
                &["result"],
            ),
            verify_duration,
            audit_errors: counter(
                &registry,
                "pullgate_audit_errors_total",
                "Audit records lost: dropped (queue full), write or reopen failures.",
                &["kind"],
            ),
            upstream_ratelimit_remaining: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "pullgate_upstream_ratelimit_remaining",
                        "Pulls left in the upstream's rate-limit window, as it last said.",
                    ),
                    &["upstream"],
                )
                .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("metric registered once");
                g
            },
            store_write_errors: counter(
                &registry,
                "pullgate_store_write_errors_total",
                "Store writes that failed, by kind: no-space (the disk or a quota is full; nothing new is cached until there is room), other.",
                &["kind"],
            ),
            connections: {
                let g = IntGauge::new("pullgate_connections", "Client connections open now.")
                    .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("metric registered once");
                g
            },
            connections_refused: single_counter(
                &registry,
                "pullgate_connections_refused_total",
                "Connections answered 503 and closed because server.max_connections were open.",
            ),
            connection_timeouts: counter(
                &registry,
                "pullgate_connection_timeouts_total",
                "Connections closed for a deadline: header (no whole request head within server.header_timeout, idle keep-alive included), send (the client stopped reading for server.send_timeout).",
                &["kind"],
            ),
            panics: single_counter(
                &registry,
                "pullgate_panics_total",
                "Request handlers that panicked (a bug, answered 500; the log has the message).",
            ),
            auth_failures: counter(
                &registry,
                "pullgate_auth_failures_total",
                "Requests answered 401 for want of an identity, by reason: missing (no credentials sent: a client's first try), malformed, bad-credentials (an unknown user or a wrong password).",
                &["reason"],
            ),
            auth_reloads: counter(
                &registry,
                "pullgate_auth_reloads_total",
                "htpasswd files read again after they changed, by result (ok; error: the users read before stay in force).",
                &["result"],
            ),
            tls_handshake_failures: single_counter(
                &registry,
                "pullgate_tls_handshake_failures_total",
                "TLS handshakes that failed: an untrusted or expired client certificate, a client that does not speak TLS, no handshake within server.header_timeout.",
            ),
            tenant_requests: counter(
                &registry,
                "pullgate_tenant_requests_total",
                "Requests of identities that belong to a [[tenant]], by tenant, kind and status code.",
                &["tenant", "kind", "code"],
            ),
            loops_refused: single_counter(
                &registry,
                "pullgate_loops_refused_total",
                "Requests refused with 508 because they came round to this pullgate again or passed too many pullgates (chained upstreams that loop).",
            ),
            imports_applied: single_counter(
                &registry,
                "pullgate_imports_applied_total",
                "Imports (pullgate import) this server applied to its store while running; each one's images are served from then on.",
            ),
            names: vec![
                "pullgate_bucket_requests_total",
                "pullgate_bucket_uploads_pending",
                "pullgate_bucket_size_bytes",
                "pullgate_imports_applied_total",
                "pullgate_auth_failures_total",
                "pullgate_auth_reloads_total",
                "pullgate_tls_handshake_failures_total",
                "pullgate_tenant_requests_total",
                "pullgate_loops_refused_total",
                "pullgate_store_write_errors_total",
                "pullgate_connections",
                "pullgate_connections_refused_total",
                "pullgate_connection_timeouts_total",
                "pullgate_panics_total",
                "pullgate_requests_total",
                "pullgate_blocked_pulls_total",
                "pullgate_cache_requests_total",
                "pullgate_upstream_requests_total",
                "pullgate_upstream_request_duration_seconds",
                "pullgate_bytes_served_total",
                "pullgate_store_size_bytes",
                "pullgate_store_max_size_bytes",
                "pullgate_evictions_total",
                "pullgate_inflight_fetches",
                "pullgate_stale_serves_total",
                "pullgate_digest_mismatches_total",
                "pullgate_config_reloads_total",
                "pullgate_manifest_request_duration_seconds",
                "pullgate_verifications_total",
                "pullgate_verify_duration_seconds",
                "pullgate_audit_errors_total",
                "pullgate_upstream_ratelimit_remaining",
                "pullgate_tag_drift_total",
                "pullgate_base_refreshes_total",
                "pullgate_base_images",
            ],
            registry,
            request_children: (0..KINDS.len() * 500)
                .map(|_| std::sync::OnceLock::new())
                .collect(),
            bytes_from_cache: std::sync::OnceLock::new(),
        };
        // Series that alerts watch exist from the start at 0, so their first
        // increase is seen (a counter that appears at 1 has no increase).
        for result in ["ok", "error"] {
            m.config_reloads.with_label_values(&[result]);
        }
        for result in ["pass", "fail", "cached", "unavailable"] {
            m.verifications.with_label_values(&[result]);
        }
        for result in ["ok", "error"] {
            m.base_refreshes.with_label_values(&[result]);
        }
        for kind in ["dropped", "write", "reopen"] {
            m.audit_errors.with_label_values(&[kind]);
        }
        for kind in ["header", "send"] {
            m.connection_timeouts.with_label_values(&[kind]);
        }
        for kind in ["no-space", "other"] {
            m.store_write_errors.with_label_values(&[kind]);
        }
        for reason in ["missing", "malformed", "bad-credentials"] {
            m.auth_failures.with_label_values(&[reason]);
        }
        for result in ["ok", "error"] {
            m.auth_reloads.with_label_values(&[result]);
        }
        m
    }

    /// Counts one answered request.
    pub fn request(&self, kind: &'static str, status: http::StatusCode) {
        let code = usize::from(status.as_u16());
        match KINDS.iter().position(|k| *k == kind) {
            Some(k) if (100..600).contains(&code) => self.request_children[k * 500 + code - 100]
                .get_or_init(|| self.requests.with_label_values(&[kind, status.as_str()]))
                .inc(),
            _ => self
                .requests
                .with_label_values(&[kind, status.as_str()])
                .inc(),
        }
    }

    /// Counts bytes sent to clients from the store.
    pub fn served_from_cache(&self, bytes: u64) {
        self.bytes_from_cache
            .get_or_init(|| self.bytes_served.with_label_values(&["cache"]))
            .inc_by(bytes);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> Vec<u8> {
        debug_assert_eq!(
            self.names.len(),
            35,
            "keep `names` in step with the metrics"
        );
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding to memory");
        out
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_contract_names() {
        let m = Metrics::new();
        m.requests.with_label_values(&["manifest", "200"]).inc();
        m.blocked_pulls
            .with_label_values(&["docker.io", "no-policy", "enforce"])
            .inc();
        m.cache_requests.with_label_values(&["blob", "hit"]).inc();
        m.upstream_requests
            .with_label_values(&["docker.io", "200"])
            .inc();
        m.upstream_duration
            .with_label_values(&["docker.io"])
            .observe(0.1);
        m.bytes_served.with_label_values(&["cache"]).inc_by(3);
        let text = String::from_utf8(m.render()).unwrap();
        for name in [
            "pullgate_requests_total{kind=\"manifest\",status=\"200\"} 1",
            "pullgate_blocked_pulls_total{mode=\"enforce\",reason=\"no-policy\",upstream=\"docker.io\"} 1",
            "pullgate_cache_requests_total{kind=\"blob\",result=\"hit\"} 1",
            "pullgate_upstream_requests_total{status=\"200\",upstream=\"docker.io\"} 1",
            "pullgate_upstream_request_duration_seconds_bucket",
            "pullgate_bytes_served_total{source=\"cache\"} 3",
            "pullgate_store_size_bytes 0",
            "pullgate_store_max_size_bytes 0",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
