//! The agent's Prometheus metrics and health, under kube-proxy's names where one applies
//! (`pkg/proxy/metrics/metrics.go`), so existing dashboards and alerts keep working, and
//! `switchyard_*` for what kube-proxy has no name for.
//!
//! [`Metrics::observe`] takes each [`SyncReport`] of the sync loop; [`Health`] turns
//! consecutive failures into kube-proxy's `/healthz` answer.

use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::sync::{SyncKind, SyncReport};

/// Syncs failing this many times in a row make `/healthz` answer 503.
pub const UNHEALTHY_AFTER_FAILURES: u32 = 3;

/// Every metric the agent serves, registered once.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    sync_duration: Histogram,
    full_duration: Histogram,
    partial_duration: Histogram,
    last_timestamp: Gauge<f64, AtomicU64>,
    last_queued: Gauge<f64, AtomicU64>,
    failures: Counter,
    service_changes_pending: Gauge,
    endpoint_changes_pending: Gauge,
    service_ports: Gauge,
    endpoints: Gauge,
    consecutive_failures: Gauge,
    syncs_written: Counter,
    syncs_empty: Counter,
    flows: FlowCounters,
    iptables_variant: Family<Vec<(String, String)>, Gauge>,
    nft_transactions: Family<Vec<(String, String)>, Counter>,
    stream_clients: Gauge,
    stream_events: Gauge,
    stream_resyncs: Gauge,
}

/// kube-proxy's buckets for sync durations: 1 ms doubling to ~16 s.
fn buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 15)
}

impl Metrics {
    /// The registry for `backend` (`nftables`, `iptables`, ...): the failure counter carries the
    /// backend's kube-proxy name as well as a generic one.
    pub fn new(backend: &str) -> Self {
        let mut r = Registry::default();
        let m = Metrics {
            sync_duration: Histogram::new(buckets()),
            full_duration: Histogram::new(buckets()),
            partial_duration: Histogram::new(buckets()),
            last_timestamp: Gauge::default(),
            last_queued: Gauge::default(),
            failures: Counter::default(),
            service_changes_pending: Gauge::default(),
            endpoint_changes_pending: Gauge::default(),
            service_ports: Gauge::default(),
            endpoints: Gauge::default(),
            consecutive_failures: Gauge::default(),
            syncs_written: Counter::default(),
            syncs_empty: Counter::default(),
            flows: FlowCounters::default(),
            iptables_variant: Family::default(),
            nft_transactions: Family::default(),
            stream_clients: Gauge::default(),
            stream_events: Gauge::default(),
            stream_resyncs: Gauge::default(),
            registry: Registry::default(),
        };
        r.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds (rendering and kernel)",
            m.sync_duration.clone(),
        );
        r.register(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            m.full_duration.clone(),
        );
        r.register(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            m.partial_duration.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced (Unix seconds)",
            m.last_timestamp.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync was queued by a change (Unix seconds)",
            m.last_queued.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            m.service_changes_pending.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            m.endpoint_changes_pending.clone(),
        );
        // Counters get `_total` appended by the encoder.
        let backend_failures = match backend {
            "nftables" => Some("kubeproxy_sync_proxy_rules_nftables_sync_failures"),
            "iptables" | "ipvs" => Some("kubeproxy_sync_proxy_rules_iptables_restore_failures"),
            _ => None,
        };
        if let Some(name) = backend_failures {
            r.register(name, "Failed kernel transactions", m.failures.clone());
        }
        r.register("switchyard_sync_failures", "Failed syncs, any backend", m.failures.clone());
        r.register(
            "switchyard_sync_consecutive_failures",
            "Syncs failed in a row (0 after a success)",
            m.consecutive_failures.clone(),
        );
        r.register(
            "switchyard_programmed_service_ports",
            "Service ports in the program the kernel holds",
            m.service_ports.clone(),
        );
        r.register(
            "switchyard_programmed_endpoints",
            "Endpoints (per service port) in the program the kernel holds",
            m.endpoints.clone(),
        );
        r.register("switchyard_syncs_written", "Syncs that wrote a kernel transaction", m.syncs_written.clone());
        r.register("switchyard_syncs_unchanged", "Syncs that found nothing to write", m.syncs_empty.clone());
        r.register(
            "switchyard_iptables_variant",
            "1 for the iptables variant in use (legacy, nf_tables), as kube-proxy detects it",
            m.iptables_variant.clone(),
        );
        m.flows.register(&mut r);
        r.register("switchyard_stream_clients", "Event stream (WebSocket) clients connected", m.stream_clients.clone());
        r.register(
            "switchyard_stream_events",
            "Events published on the stream since the start",
            m.stream_events.clone(),
        );
        r.register(
            "switchyard_nftables_transactions",
            "nftables transactions applied, by path: netlink (element updates) or nft (nft -f)",
            m.nft_transactions.clone(),
        );
        r.register(
            "switchyard_stream_client_resyncs",
            "Times a client fell behind its queue and was resynchronised",
            m.stream_resyncs.clone(),
        );
        Metrics { registry: r, ..m }
    }

    /// Records one finished sync.
    pub fn observe(&self, r: &SyncReport) {
        self.consecutive_failures.set(i64::from(r.consecutive_failures));
        if r.error.is_some() {
            self.failures.inc();
            return;
        }
        let secs = r.took.as_secs_f64();
        if r.wrote {
            self.syncs_written.inc();
            self.sync_duration.observe(secs);
            match r.kind {
                SyncKind::Full => self.full_duration.observe(secs),
                SyncKind::Partial => self.partial_duration.observe(secs),
            }
        } else {
            self.syncs_empty.inc();
        }
        self.last_timestamp.set(unix_now().as_secs_f64());
        self.service_ports.set(r.service_ports as i64);
        self.endpoints.set(r.endpoints as i64);
    }

    /// A change was queued for the next sync.
    pub fn queued(&self) {
        self.last_queued.set(unix_now().as_secs_f64());
    }

    /// Adds what the conntrack observer counted since its last report.
    pub fn observe_flows(&self, d: &crate::conntrack::Stats) {
        let f = &self.flows;
        for (c, n) in [
            (&f.observed, d.observed),
            (&f.matched, d.matched),
            (&f.overflows, d.overflows),
            (&f.resyncs, d.resyncs),
            (&f.evicted, d.evicted),
            (&f.diagrams_dropped, d.diagrams_dropped),
        ] {
            c.inc_by(n);
        }
    }

    /// Which iptables variant the node runs.
    pub fn iptables_variant(&self, variant: &str) {
        self.iptables_variant.get_or_create(&vec![("variant".to_string(), variant.to_string())]).set(1);
    }

    /// One nftables transaction applied through `path` (`netlink` or `nft`).
    pub fn nft_transaction(&self, path: &str) {
        self.nft_transactions.get_or_create(&vec![("path".to_string(), path.to_string())]).inc();
    }

    /// The event stream's counters, read when `/metrics` is served.
    pub fn stream(&self, stats: &crate::stream::HubStats) {
        use std::sync::atomic::Ordering::Relaxed;
        self.stream_clients.set(stats.clients.load(Relaxed) as i64);
        self.stream_events.set(stats.published.load(Relaxed) as i64);
        self.stream_resyncs.set(stats.resyncs.load(Relaxed) as i64);
    }

    /// Changes waiting for the next sync.
    pub fn pending(&self, services: usize, endpoints: usize) {
        self.service_changes_pending.set(services as i64);
        self.endpoint_changes_pending.set(endpoints as i64);
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut s, &self.registry);
        s
    }
}

fn unix_now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// What `/healthz` knows.
#[derive(Debug, Clone, Default)]
pub struct Health {
    last_success: Option<Duration>,
    consecutive_failures: u32,
    last_error: Option<String>,
}

/// The `/healthz` body: kube-proxy's fields (`lastUpdated`, `currentTime`, `nodeEligible`) and
/// ours.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HealthReply {
    pub last_updated: String,
    pub current_time: String,
    pub node_eligible: bool,
    pub healthy: bool,
    pub consecutive_failures: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl Health {
    pub fn observe(&mut self, r: &SyncReport) {
        self.consecutive_failures = r.consecutive_failures;
        match &r.error {
            None => {
                self.last_success = Some(unix_now());
                self.last_error = None;
            }
            Some(e) => self.last_error = Some(e.clone()),
        }
    }

    /// Healthy until syncs keep failing.
    pub fn healthy(&self) -> bool {
        self.consecutive_failures < UNHEALTHY_AFTER_FAILURES
    }

    pub fn reply(&self) -> HealthReply {
        HealthReply {
            last_updated: self.last_success.map(rfc3339).unwrap_or_default(),
            current_time: rfc3339(unix_now()),
            node_eligible: true,
            healthy: self.healthy(),
            consecutive_failures: self.consecutive_failures,
            last_error: self.last_error.clone(),
        }
    }
}

/// Unix time as RFC 3339 in UTC (`2024-01-02T03:04:05.678Z`), as Go's `time.Time` marshals.
pub fn rfc3339(t: Duration) -> String {
    let secs = t.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        t.subsec_millis()
    )
}

/// The conntrack observer's totals (`switchyard_flows_*`).
#[derive(Debug, Default)]
struct FlowCounters {
    observed: Counter,
    matched: Counter,
    overflows: Counter,
    resyncs: Counter,
    evicted: Counter,
    diagrams_dropped: Counter,
}

impl FlowCounters {
    fn register(&self, r: &mut Registry) {
        r.register("switchyard_flows_observed", "New-connection events conntrack sent", self.observed.clone());
        r.register(
            "switchyard_flows_matched",
            "Connections to a Service frontend, explained and published",
            self.matched.clone(),
        );
        r.register(
            "switchyard_flows_overflows",
            "Times the conntrack event socket overflowed (ENOBUFS)",
            self.overflows.clone(),
        );
        r.register("switchyard_flows_resyncs", "Conntrack table dumps reconciled", self.resyncs.clone());
        r.register(
            "switchyard_flows_evicted",
            "Connections forgotten to bound memory (no destroyed event for them)",
            self.evicted.clone(),
        );
        r.register(
            "switchyard_flows_diagrams_dropped",
            "Flows published without a diagram (rate limit)",
            self.diagrams_dropped.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(kind: SyncKind, error: Option<&str>, failures: u32) -> SyncReport {
        SyncReport {
            kind,
            at: Duration::ZERO,
            took: Duration::from_millis(3),
            error: error.map(str::to_string),
            wrote: true,
            consecutive_failures: failures,
            service_ports: 4,
            endpoints: 7,
            changed: 12,
            rules: 30,
            services: Vec::new(),
        }
    }

    /// kube-proxy's names are served, with the observed values.
    #[test]
    fn kube_proxy_names() {
        let m = Metrics::new("nftables");
        m.observe(&report(SyncKind::Full, None, 0));
        m.observe(&report(SyncKind::Partial, Some("boom"), 1));
        m.pending(2, 5);
        m.iptables_variant("nf_tables");
        let text = m.encode();
        for line in [
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count 1",
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count 0",
            "kubeproxy_sync_proxy_rules_nftables_sync_failures_total 1",
            "kubeproxy_sync_proxy_rules_service_changes_pending 2",
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending 5",
            "switchyard_programmed_endpoints 7",
            "switchyard_sync_consecutive_failures 1",
            "switchyard_iptables_variant{variant=\"nf_tables\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        assert!(text.contains("kubeproxy_sync_proxy_rules_last_timestamp_seconds "));
    }

    /// Three failures in a row make the node unhealthy; a success heals it.
    #[test]
    fn health_follows_failures() {
        let mut h = Health::default();
        assert!(h.healthy());
        for n in 1..=3 {
            h.observe(&report(SyncKind::Full, Some("nft failed"), n));
        }
        let r = h.reply();
        assert!(!r.healthy && r.last_error.as_deref() == Some("nft failed"));
        h.observe(&report(SyncKind::Full, None, 0));
        assert!(h.healthy());
        assert!(h.reply().last_updated.ends_with('Z'));
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(Duration::ZERO), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(Duration::from_millis(1_709_251_199_500)), "2024-02-29T23:59:59.500Z");
    }
}
