//! `switchyard demo`: the engine's demo scenario ([`Scenario`]) played in real time through the
//! same hub and server as the agent, so the dashboard cannot tell it from a live node except by
//! the snapshot's `source.mode`. No cluster, no root, no kernel.
//!
//! Every [`DemoConfig::tick`] the scenario is advanced to the wall-clock time since the start
//! (so a slow tick never slows the script down), with a monotonic clock to time its renders, and
//! each event is published at its simulated time. Traces answer against the scenario's current
//! cluster, which the published watch events keep in the hub.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_engine::demo::scenario::Scenario;
use switchyard_engine::protocol::{Event, SyncEvent};
use tokio::sync::oneshot;

use crate::agent::{AgentError, Running};
use crate::metrics::Metrics;
use crate::server::{ServerConfig, Status};
use crate::stream::{Hub, HubConfig};
use crate::sync::{SyncKind, SyncReport};

/// How the demo runs.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Seeds the scenario's traffic.
    pub seed: u64,
    /// How often the scenario is advanced.
    pub tick: Duration,
    /// Simulated milliseconds per real millisecond (1 in `switchyard demo`; tests run faster).
    pub speed: u32,
    pub server: ServerConfig,
    pub hub: HubConfig,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            seed: 1,
            tick: Duration::from_millis(100),
            speed: 1,
            server: ServerConfig::default(),
            hub: HubConfig::default(),
        }
    }
}

/// The demo's `/metrics` (the scenario's syncs, under the agent's names) and `/healthz`.
struct DemoStatus {
    metrics: Metrics,
    hub: Hub,
}

impl Status for DemoStatus {
    fn metrics(&self) -> String {
        self.metrics.stream(self.hub.stats());
        self.metrics.encode()
    }

    fn healthz(&self) -> (bool, String) {
        let healthy = self.hub.stats().healthy.load(std::sync::atomic::Ordering::Relaxed);
        (healthy, serde_json::json!({"healthy": healthy, "mode": "demo"}).to_string())
    }
}

/// A scenario sync as the agent's metrics take it.
fn report(s: &SyncEvent) -> SyncReport {
    SyncReport {
        kind: match s.kind {
            switchyard_engine::protocol::SyncKind::Full => SyncKind::Full,
            switchyard_engine::protocol::SyncKind::Partial => SyncKind::Partial,
        },
        at: Duration::ZERO,
        took: Duration::from_secs_f64(s.duration_ms.max(0.0) / 1000.0),
        error: s.error.clone(),
        wrote: s.changed > 0,
        consecutive_failures: u32::from(!s.ok),
        service_ports: 0,
        endpoints: 0,
        changed: s.changed,
        rules: s.rules,
        services: s.services.clone(),
    }
}

/// Runs the demo until `shutdown` completes.
pub async fn run(
    cfg: DemoConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let mut scenario = Scenario::new(cfg.seed);
    let source = Scenario::source();
    let node = source.node.clone();
    let hub = Hub::start(source, scenario.cluster().clone(), cfg.hub);
    let status = Arc::new(DemoStatus { metrics: Metrics::new("nftables"), hub: hub.clone() });
    let router = crate::server::router(hub.clone(), status.clone(), &node, cfg.server);
    let (stop_http, http_stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = http_stopped.await;
            })
            .await
    });

    let origin = Instant::now();
    let mut clock = move || origin.elapsed().as_secs_f64() * 1000.0;
    let mut tick = tokio::time::interval(cfg.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = tick.tick() => {
                let now = origin.elapsed().as_millis() as u64 * u64::from(cfg.speed.max(1));
                for (t, e) in scenario.advance(now, &mut clock) {
                    if let Event::Sync(s) = &e {
                        status.metrics.observe(&report(s));
                    }
                    hub.publish_at(t, e);
                }
            }
        }
    }
    hub.close();
    let _ = stop_http.send(());
    match server.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(AgentError::Serve(e)),
        Err(_) => Err(AgentError::Panicked),
    }
}

/// Starts the demo serving on `listen` on a thread of its own (port 0 picks a free port).
pub fn spawn(cfg: DemoConfig, listen: SocketAddr) -> Result<Running, AgentError> {
    Running::serve(listen, move |listener, shutdown| run(cfg, listener, shutdown))
}
