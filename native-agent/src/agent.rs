//! `switchyard agent`: keeps one node's kernel in step with a manifests folder or an API server,
//! as kube-proxy does, and serves `/metrics` and `/healthz`.
//!
//! The pieces: an [`AgentSource`] ([`crate::source::ManifestSource`], which re-reads the files
//! `notify` names and hands the loop the objects that changed, or [`crate::kube::KubeSource`],
//! which watches the API server), [`crate::sync::State`] (the pure loop; this module only carries
//! out its actions and feeds it the clock), a [`Kernel`] per backend over the appliers of
//! [`crate::apply`], and an axum server. [`run`] takes its listener and shutdown signal as
//! arguments so tests can bind port 0 and stop it; [`spawn`] runs it on a thread of its own for
//! callers without a runtime.
//!
//! Shutdown (SIGTERM, SIGINT) leaves every rule in place, as kube-proxy does: traffic keeps
//! flowing while the agent restarts, and the next start reconciles with a full sync.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use notify::Watcher as _;
use switchyard_engine::cluster::Cluster;
use switchyard_engine::policy;
use switchyard_engine::protocol::{self, Event, Mode, SourceInfo};
use tokio::sync::{mpsc, oneshot};

use crate::apply::{iptables, ipvs, nft_netlink, nftables};
use crate::conntrack;
use crate::metrics::{Health, Metrics};
use crate::source::ManifestSource;
use crate::stream::{self, Hub, HubConfig};
use crate::sync::{Action, Backoff, Input, State, SyncKind};

/// Which kernel interface the agent programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    Nftables,
    Iptables,
    /// Virtual servers with `ipvsadm`, plus the ipsets and iptables chains of kube-proxy's IPVS mode.
    Ipvs,
    /// Render and track everything, write nothing: a dry run.
    None,
}

impl BackendChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendChoice::Nftables => "nftables",
            BackendChoice::Iptables => "iptables",
            BackendChoice::Ipvs => "ipvs",
            BackendChoice::None => "none",
        }
    }
}

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node: String,
    pub source: AgentSource,
    pub backend: BackendChoice,
    /// Run the kernel tools inside this network namespace (`ip netns exec`), for tests.
    pub netns: Option<String>,
    pub backoff: Backoff,
    /// Observe conntrack and publish real flows (a kernel backend only; see [`crate::conntrack`]).
    pub flows: bool,
}

/// Where the cluster comes from.
#[derive(Debug, Clone)]
pub enum AgentSource {
    /// A manifests folder, watched for changes (`--cluster`).
    Manifests(PathBuf),
    /// An API server (`--kubeconfig`, `--in-cluster`), with the proxy configuration that
    /// kube-proxy would read from its `--config` file.
    Kube { connect: crate::kube::Connect, config: switchyard_engine::model::ProxyConfig },
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Kube(#[from] crate::kube::KubeError),
    #[error("cannot watch {}: {source}", path.display())]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
    #[error("cannot serve HTTP: {0}")]
    Serve(#[source] std::io::Error),
    #[error("cannot start the runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("the agent's thread panicked")]
    Panicked,
}

/// The kernel side of one backend, as the loop sees it: full programs and transactions in, an
/// error message out.
pub trait Kernel: Send + 'static {
    fn apply(&mut self, kind: SyncKind, program: &str) -> Result<(), String>;
}

/// nftables: a full sync also deletes our table of a family the program no longer has.
pub struct NftKernel<A>(pub A);

impl<A: nftables::NftApplier + Send + 'static> Kernel for NftKernel<A> {
    fn apply(&mut self, kind: SyncKind, program: &str) -> Result<(), String> {
        let script = match kind {
            SyncKind::Full => {
                let owned = self.0.owned_families().map_err(|e| e.to_string())?;
                nftables::full_sync_script(program, &owned)
            }
            SyncKind::Partial => program.to_string(),
        };
        self.0.apply(&script).map_err(|e| e.to_string())
    }
}

/// iptables: `--noflush` restores of our chains, builtin jumps ensured one by one.
pub struct IptKernel<A>(pub A);

impl<A: iptables::IptablesApplier + Send + 'static> Kernel for IptKernel<A> {
    fn apply(&mut self, kind: SyncKind, program: &str) -> Result<(), String> {
        let r = match kind {
            SyncKind::Full => iptables::apply_full(&mut self.0, program),
            SyncKind::Partial => iptables::apply_incremental(&mut self.0, program),
        };
        r.map(drop).map_err(|e| e.to_string())
    }
}

/// IPVS: `ipvsadm -R` and `ipset restore` steps in the program's order, and its iptables part
/// through the iptables applier, so a full sync rewrites only our chains (a plain
/// `iptables-restore` of that part would flush every rule of the node's `nat` and `filter`).
pub struct IpvsKernel<V, T> {
    pub ipvs: V,
    pub iptables: T,
}

impl<V: ipvs::IpvsApplier + Send + 'static, T: iptables::IptablesApplier + Send + 'static> Kernel for IpvsKernel<V, T> {
    fn apply(&mut self, kind: SyncKind, program: &str) -> Result<(), String> {
        use switchyard_engine::render::ipvs::Section;
        let t = match kind {
            SyncKind::Full => ipvs::Transaction::from_program(program),
            SyncKind::Partial => ipvs::Transaction::from_transaction(program),
        };
        // Rules match the ipsets and the virtual servers must exist before traffic is steered
        // to them, so the iptables part goes after the ipvsadm and ipset steps, and `ip` last.
        let (rules, others): (Vec<_>, Vec<_>) =
            t.steps.into_iter().partition(|s| matches!(s.section, Section::Iptables(_)));
        let (before, after): (Vec<_>, Vec<_>) = others.into_iter().partition(|s| s.section != Section::Ip);
        self.ipvs.apply(&ipvs::Transaction { steps: before }).map_err(|e| e.to_string())?;
        if !rules.is_empty() {
            let mut text = String::new();
            for step in &rules {
                let marker = match step.section {
                    Section::Iptables(switchyard_engine::model::IpFamily::V6) => {
                        switchyard_engine::render::iptables::SECTION_V6
                    }
                    _ => switchyard_engine::render::iptables::SECTION_V4,
                };
                text.push_str(marker);
                text.push('\n');
                text.push_str(&step.input);
            }
            let r = match kind {
                SyncKind::Full => iptables::apply_full(&mut self.iptables, &text),
                SyncKind::Partial => iptables::apply_incremental(&mut self.iptables, &text),
            };
            r.map_err(|e| e.to_string())?;
        }
        self.ipvs.apply(&ipvs::Transaction { steps: after }).map_err(|e| e.to_string())
    }
}

/// `--backend none`: accepts everything, writes nothing.
pub struct NoKernel;

impl Kernel for NoKernel {
    fn apply(&mut self, _: SyncKind, _: &str) -> Result<(), String> {
        Ok(())
    }
}

/// What the HTTP handlers read.
struct Shared {
    metrics: Metrics,
    health: Mutex<Health>,
}

/// Runs the agent until `shutdown` completes. Rules are left in place on the way out.
pub async fn run(
    cfg: AgentConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    run_with(cfg, ServeOptions::default(), listener, shutdown).await
}

/// What the agent serves besides the sync loop.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub server: crate::server::ServerConfig,
    /// Where the healthCheckNodePort servers listen (`None`: none are opened).
    pub health_checks: Option<crate::healthcheck::Bind>,
    pub hub: HubConfig,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            server: crate::server::ServerConfig::default(),
            health_checks: Some(crate::healthcheck::Bind::NodeAddresses),
            hub: HubConfig::default(),
        }
    }
}

/// [`run`] with the server's options: token, dashboard folder, health check addresses.
pub async fn run_with(
    cfg: AgentConfig,
    opts: ServeOptions,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let shared = Arc::new(Shared { metrics: Metrics::new(cfg.backend.as_str()), health: Mutex::default() });
    let hub = Hub::start(source_info(&cfg), Cluster::default(), opts.hub);
    let prefix = cfg.netns.as_deref().map(crate::apply::netns_prefix).unwrap_or_default();
    let (kernel, plan_backend): (Box<dyn Kernel>, policy::Backend) = match cfg.backend {
        BackendChoice::Nftables => {
            // Element-only transactions go over a netlink socket kept open (~0.1 ms instead of
            // an `nft` process's ~16 ms); the rest, and everything when no socket opens, `nft -f`.
            let mut k = nft_netlink::Hybrid::kernel(nftables::Kernel { prefix }, cfg.netns.clone());
            let metrics = shared.clone();
            k.on_apply = Some(Box::new(move |path| metrics.metrics.nft_transaction(path.as_str())));
            (Box::new(NftKernel(k)), policy::Backend::Nftables)
        }
        BackendChoice::Iptables => {
            // Write rules with the variant the node's other rules use, as kube-proxy's images do
            // (iptables-nft restores are also far slower than legacy ones at scale).
            let probe = iptables::Kernel { prefix, variant: None };
            let variant = probe.detect().unwrap_or_else(|e| {
                eprintln!("switchyard: cannot tell the iptables variant: {e}");
                iptables::Variant::Unknown
            });
            let k = probe.with_variant(variant);
            eprintln!("switchyard: iptables variant: {}", variant.as_str());
            shared.metrics.iptables_variant(variant.as_str());
            (Box::new(IptKernel(k)), policy::Backend::Iptables)
        }
        BackendChoice::Ipvs => {
            if !ipvs::ipvs_available() {
                // Every sync will fail and say why (metrics, /healthz); the rest still runs.
                eprintln!(
                    "switchyard: this kernel has no IPVS (no /proc/net/ip_vs): syncs will fail until it is loaded"
                );
            }
            let probe = iptables::Kernel { prefix: prefix.clone(), variant: None };
            let variant = probe.detect().unwrap_or(iptables::Variant::Unknown);
            let k = IpvsKernel {
                ipvs: ipvs::Kernel { prefix, ..ipvs::Kernel::default() },
                iptables: probe.with_variant(variant),
            };
            (Box::new(k), policy::Backend::Ipvs)
        }
        BackendChoice::None => (Box::new(NoKernel), policy::Backend::Nftables),
    };

    let (stop_http, http_stopped) = oneshot::channel::<()>();
    let status = Arc::new(AgentStatus { shared: shared.clone(), hub: hub.clone() });
    let router = crate::server::router(hub.clone(), status, &cfg.node, opts.server);
    let health_checks =
        opts.health_checks.map(|bind| tokio::spawn(crate::healthcheck::run(hub.clone(), cfg.node.clone(), bind)));
    let server = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = http_stopped.await;
            })
            .await
    });

    let mut feed = Feed::start(&cfg).await?;
    let observer = start_flows(&cfg, &hub, &shared);
    let result = sync_loop(&cfg, plan_backend, kernel, &shared, &hub, observer.as_ref(), &mut feed, shutdown).await;
    drop(observer);
    drop(feed);
    // Streams end first (they would hold the graceful shutdown open), with a close frame.
    hub.close();
    let _ = stop_http.send(());
    if let Some(h) = health_checks {
        h.abort();
    }
    match server.await {
        Ok(Ok(())) => result,
        Ok(Err(e)) => Err(AgentError::Serve(e)),
        Err(_) => Err(AgentError::Panicked),
    }
}

#[expect(clippy::too_many_arguments, reason = "the loop borrows each collaborator `run` made")]
async fn sync_loop(
    cfg: &AgentConfig,
    backend: policy::Backend,
    mut kernel: Box<dyn Kernel>,
    shared: &Shared,
    hub: &Hub,
    flows: Option<&conntrack::Observer>,
    feed: &mut Feed,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let origin = Instant::now();
    let mut publisher = Publisher::new(&cfg.node, cfg.backend.as_str());
    hub.publish(Event::Health(protocol::Health { healthy: true, message: "starting".into() }));
    let mut state = State::new(cfg.node.clone(), backend, cfg.backoff);
    let mut deadline: Option<Instant> = None;
    tokio::pin!(shutdown);

    let mut input = feed.first(origin);
    loop {
        let mut step_started = Instant::now();
        let mut actions: VecDeque<Action> = match input.take() {
            Some(i) => {
                publisher.input(hub, state.cluster(), &i);
                publisher.timed(|| state.step(i)).into()
            }
            None => VecDeque::new(),
        };
        while let Some(a) = actions.pop_front() {
            match a {
                Action::Apply { kind, program } => {
                    publisher.rendered();
                    // The kernel tools block: run them off the runtime's workers.
                    let (k, result) = tokio::task::spawn_blocking(move || {
                        let r = kernel.apply(kind, &program);
                        (kernel, r)
                    })
                    .await
                    .map_err(|_| AgentError::Panicked)?;
                    kernel = k;
                    let took = step_started.elapsed();
                    step_started = Instant::now();
                    let now = origin.elapsed();
                    actions.extend(publisher.timed(|| state.step(Input::Applied { now, took, error: result.err() })));
                }
                Action::Wake { at } => deadline = Some(origin + at),
                Action::FlushConntrack(flows) => {
                    let ns = cfg.netns.clone();
                    let n = flows.len();
                    let failed = tokio::task::spawn_blocking(move || flush_conntrack(ns.as_deref(), &flows))
                        .await
                        .map_err(|_| AgentError::Panicked)?;
                    match failed {
                        Some(e) => eprintln!("switchyard: flushing {n} stale UDP conntrack entries: {e}"),
                        None => eprintln!("switchyard: flushed UDP conntrack entries of {n} removed endpoint(s)"),
                    }
                }
                Action::Report(r) => {
                    shared.metrics.observe(&r);
                    let health = shared.health.lock().ok().map(|mut h| {
                        h.observe(&r);
                        h.reply()
                    });
                    publisher.report(hub, &r, health);
                    // A new program only: an unchanged one explains flows as before.
                    if let (Some(o), None, true, Some(plan)) = (flows, &r.error, r.wrote, state.applied()) {
                        let view = conntrack::View { cluster: Arc::new(state.cluster().clone()), plan: plan.clone() };
                        o.update(Arc::new(view));
                    }
                    match (&r.error, r.wrote) {
                        (Some(e), _) => eprintln!(
                            "switchyard: {} sync failed ({} in a row): {e}",
                            r.kind.as_str(),
                            r.consecutive_failures
                        ),
                        (None, true) => eprintln!(
                            "switchyard: {} sync in {:.1} ms: {} service ports, {} endpoints",
                            r.kind.as_str(),
                            r.took.as_secs_f64() * 1000.0,
                            r.service_ports,
                            r.endpoints
                        ),
                        (None, false) => {}
                    }
                }
            }
        }
        shared.metrics.pending(state.pending_services(), state.pending_endpoints());

        let wake_at = deadline;
        let sleep = async move {
            match wake_at {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = &mut shutdown => {
                eprintln!("switchyard: stopping; the rules stay in place");
                return Ok(());
            }
            Some(i) = feed.next(origin) => {
                if matches!(i, Input::Cluster { .. } | Input::Delta { .. }) {
                    shared.metrics.queued();
                }
                input = Some(i);
            }
            () = sleep => {
                deadline = None;
                input = Some(Input::Tick { now: origin.elapsed() });
            }
        }
    }
}

/// Starts the conntrack observer in the node's namespace when asked for and a kernel is
/// programmed. A node where it cannot run (no `CAP_NET_ADMIN`, no ctnetlink) still routes: the
/// agent says why and goes on without flows.
fn start_flows(cfg: &AgentConfig, hub: &Hub, shared: &Arc<Shared>) -> Option<conntrack::Observer> {
    if !cfg.flows || cfg.backend == BackendChoice::None {
        return None;
    }
    let ocfg = conntrack::ObserverConfig {
        flows: conntrack::FlowsConfig::new(cfg.node.clone()),
        netns: cfg.netns.clone(),
        recv_buffer: None,
    };
    let (hub, counts) = (hub.clone(), shared.clone());
    let publish = Box::new(move |e| hub.publish(e));
    let count = Box::new(move |d: &conntrack::Stats| counts.metrics.observe_flows(d));
    conntrack::Observer::spawn(ocfg, publish, count).inspect_err(|e| eprintln!("switchyard: no flows: {e}")).ok()
}

/// The agent's side of the event stream: what the loop saw, as events.
struct Publisher {
    node: String,
    backend: &'static str,
    /// Whether the source's first cluster was published (as one re-list).
    listed: bool,
    /// How long the last `State::step` took: when it started a sync, that was the render.
    last_step: Duration,
    /// The render time of the sync in flight.
    render: Duration,
    /// The health last published.
    health: Option<(bool, String)>,
}

impl Publisher {
    fn new(node: &str, backend: &'static str) -> Self {
        Publisher {
            node: node.to_string(),
            backend,
            listed: false,
            last_step: Duration::ZERO,
            render: Duration::ZERO,
            health: None,
        }
    }

    /// Watch and node events for a new cluster, or a change, from the source.
    fn input(&mut self, hub: &Hub, old: &Cluster, input: &Input) {
        let events = match input {
            Input::Cluster { cluster, .. } => stream::cluster_events(old, cluster, !self.listed),
            // A source hands on deltas only after its first cluster.
            Input::Delta { deltas, .. } => stream::delta_events(deltas),
            _ => return,
        };
        for e in events {
            hub.publish(e);
        }
        self.listed = true;
    }

    fn timed<T>(&mut self, step: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = step();
        self.last_step = t.elapsed();
        out
    }

    /// A sync was rendered by the last step and goes to the kernel now.
    fn rendered(&mut self) {
        self.render = self.last_step;
    }

    /// A sync ended; health events only when the health changed.
    fn report(&mut self, hub: &Hub, r: &crate::sync::SyncReport, health: Option<crate::metrics::HealthReply>) {
        // A sync that wrote nothing was rendered in the step that reported it.
        let render = if r.wrote { self.render } else { self.last_step };
        hub.publish(Event::Sync(stream::sync_event(&self.node, self.backend, r, render)));
        if let Some(h) = health {
            let now = (h.healthy, h.last_error.unwrap_or_default());
            if self.health.as_ref() != Some(&now) {
                hub.publish(Event::Health(protocol::Health { healthy: now.0, message: now.1.clone() }));
                self.health = Some(now);
            }
        }
    }
}

fn source_info(cfg: &AgentConfig) -> SourceInfo {
    SourceInfo {
        mode: Mode::Live,
        node: cfg.node.clone(),
        backend: cfg.backend.as_str().to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

/// An [`AgentSource`] at work, as the sync loop sees it: inputs.
enum Feed {
    Manifests {
        source: ManifestSource,
        /// Woken when `dirty` has something (a full channel already means "look").
        changed: mpsc::Receiver<()>,
        dirty: Arc<Mutex<Dirty>>,
        /// When the whole folder is read again.
        rescan_at: Instant,
        errors: Vec<String>,
        _watcher: notify::RecommendedWatcher,
    },
    Kube(crate::kube::KubeSource),
}

impl Feed {
    async fn start(cfg: &AgentConfig) -> Result<Feed, AgentError> {
        let path = match &cfg.source {
            AgentSource::Manifests(path) => path.clone(),
            AgentSource::Kube { connect, config } => {
                let client = crate::kube::client(connect).await?;
                eprintln!("switchyard: watching Services, EndpointSlices and Nodes on the API server");
                return Ok(Feed::Kube(crate::kube::KubeSource::start(client, config.clone(), cfg.backoff)));
            }
        };
        // notify calls back on its own thread; a full channel already means "look at `dirty`".
        let (tx, changed) = mpsc::channel::<()>(1);
        let dirty = Arc::new(Mutex::new(Dirty::default()));
        let noted = dirty.clone();
        let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            let Ok(mut d) = noted.lock() else { return };
            match ev {
                // A lost event (the kernel's queue overflowed) or a watch error: read everything.
                Err(_) => d.rescan = true,
                Ok(ev) if ev.need_rescan() || ev.paths.is_empty() && changes_content(&ev) => d.rescan = true,
                Ok(ev) if changes_content(&ev) => d.paths.extend(ev.paths),
                Ok(_) => return,
            }
            let _ = tx.try_send(());
        })
        .map_err(|source| AgentError::Watch { path: path.clone(), source })?;
        watcher
            .watch(&path, notify::RecursiveMode::Recursive)
            .map_err(|source| AgentError::Watch { path: path.clone(), source })?;
        Ok(Feed::Manifests {
            source: ManifestSource::new(path),
            changed,
            dirty,
            rescan_at: Instant::now() + RESCAN,
            errors: Vec::new(),
            _watcher: watcher,
        })
    }

    /// The first input: the folder as it is now; nothing yet from an API server (the first
    /// cluster comes once every kind is listed, not an empty one that would flush the rules).
    fn first(&mut self, origin: Instant) -> Option<Input> {
        match self {
            Feed::Manifests { source, errors, .. } => Some(reload(source, None, origin, true, errors)),
            Feed::Kube(_) => None,
        }
    }

    /// The next input (cancel-safe: the loop selects on it).
    async fn next(&mut self, origin: Instant) -> Option<Input> {
        match self {
            Feed::Manifests { source, changed, dirty, rescan_at, errors, .. } => {
                let at = *rescan_at;
                let paths = tokio::select! {
                    r = changed.recv() => {
                        r?;
                        let d = dirty.lock().map(|mut d| std::mem::take(&mut *d))
                            .unwrap_or_else(|_| Dirty { rescan: true, ..Dirty::default() });
                        (!d.rescan).then_some(d.paths)
                    }
                    () = tokio::time::sleep_until(at.into()) => None,
                };
                if paths.is_none() {
                    *rescan_at = Instant::now() + RESCAN;
                }
                Some(reload(source, paths, origin, false, errors))
            }
            Feed::Kube(source) => loop {
                match source.next().await? {
                    crate::kube::Update::Cluster { cluster, changes } => {
                        return Some(Input::Cluster { now: origin.elapsed(), cluster, changes });
                    }
                    crate::kube::Update::Invalid(e) => {
                        eprintln!("switchyard: {e}; skipped (its last good version stays)");
                    }
                    crate::kube::Update::WatchFailed { kind, message } => {
                        eprintln!("switchyard: watching {}s: {message}; retrying", kind.as_str());
                    }
                }
            },
        }
    }
}

/// How often the whole folder is read again, whatever the watcher said: inotify says nothing of
/// a change made behind a bind mount or on a network file system, and the rescan also rebuilds
/// the cluster from scratch, so anything the incremental path could have missed is repaired.
const RESCAN: Duration = Duration::from_secs(60);

/// What the watcher reported since the source last looked.
#[derive(Debug, Default)]
struct Dirty {
    paths: std::collections::BTreeSet<PathBuf>,
    /// Events were lost: read the whole folder.
    rescan: bool,
}

/// Reads the folder again (only `paths`, when given); the input for the loop (a tick when
/// nothing changed, so the loop still looks at its timers).
fn reload(
    source: &mut ManifestSource,
    paths: Option<std::collections::BTreeSet<PathBuf>>,
    origin: Instant,
    first: bool,
    last_errors: &mut Vec<String>,
) -> Input {
    let r = match paths {
        Some(paths) => source.reload_paths(paths),
        None => source.reload(),
    };
    // Said once per problem, not at every event while an editor saves.
    if r.errors != *last_errors {
        for e in &r.errors {
            eprintln!("switchyard: {e} (keeping the last good version of that file)");
        }
        last_errors.clone_from(&r.errors);
    }
    if first {
        for w in &r.warnings {
            eprintln!("switchyard: warning: {w}");
        }
    }
    let now = origin.elapsed();
    match r.deltas {
        Some(deltas) if r.changed && !first => Input::Delta { now, deltas, changes: r.changes },
        _ if r.changed || first => {
            Input::Cluster { now, cluster: Box::new(source.cluster().clone()), changes: r.changes }
        }
        _ => Input::Tick { now },
    }
}

/// Whether a watch event can mean new content. Opening and reading are events too, and the
/// agent's own reads must not wake it again (that would be a busy loop).
fn changes_content(ev: &notify::Event) -> bool {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode};
    match ev.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Deletes the conntrack entries of UDP flows whose endpoint is gone, as kube-proxy does
/// (`conntrack -D --orig-dst FRONTEND --orig-port-dst PORT --dst-nat ENDPOINT`). `conntrack`
/// exits 1 when nothing matched; only a failure to run it is reported.
fn flush_conntrack(ns: Option<&str>, flows: &[crate::sync::StaleUdp]) -> Option<String> {
    for f in flows {
        let mut argv = ns.map(crate::apply::netns_prefix).unwrap_or_default();
        argv.extend(["conntrack", "-D", "-p", "udp"].map(String::from));
        if f.endpoint.is_ipv6() {
            argv.extend(["-f", "ipv6"].map(String::from));
        }
        if let Some(ip) = f.frontend {
            argv.extend(["--orig-dst".into(), ip.to_string()]);
        }
        argv.extend(["--orig-port-dst".into(), f.port.to_string(), "--dst-nat".into(), f.endpoint.to_string()]);
        let out = std::process::Command::new(&argv[0]).args(&argv[1..]).output();
        match out {
            Err(e) => return Some(format!("cannot run {}: {e}", argv.join(" "))),
            Ok(o) if !matches!(o.status.code(), Some(0 | 1)) => {
                return Some(format!("{}: {}", argv.join(" "), String::from_utf8_lossy(&o.stderr).trim()));
            }
            Ok(_) => {}
        }
    }
    None
}

/// The agent's `/metrics` and `/healthz`, for [`crate::server`].
struct AgentStatus {
    shared: Arc<Shared>,
    hub: Hub,
}

impl crate::server::Status for AgentStatus {
    fn metrics(&self) -> String {
        self.shared.metrics.stream(self.hub.stats());
        self.shared.metrics.encode()
    }

    fn healthz(&self) -> (bool, String) {
        match self.shared.health.lock().map(|h| h.reply()) {
            Ok(r) => (r.healthy, serde_json::to_string(&r).unwrap_or_default()),
            Err(_) => (false, "{}".to_string()),
        }
    }
}

/// An agent running on a thread of its own (for tests and callers without a runtime).
pub struct Running {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), AgentError>>>,
}

/// Starts the agent serving on `listen` (port 0 picks a free port; see [`Running::addr`]).
pub fn spawn(cfg: AgentConfig, listen: SocketAddr) -> Result<Running, AgentError> {
    spawn_with(cfg, ServeOptions::default(), listen)
}

/// [`spawn`] with the server's options.
pub fn spawn_with(cfg: AgentConfig, opts: ServeOptions, listen: SocketAddr) -> Result<Running, AgentError> {
    Running::serve(listen, move |listener, shutdown| run_with(cfg, opts, listener, shutdown))
}

impl Running {
    /// Binds `listen`, then runs `serve(listener, shutdown)` on a runtime and thread of its own
    /// until [`Running::stop`] completes `shutdown`: the agent and the demo both run this way.
    pub(crate) fn serve<F, Fut>(listen: SocketAddr, serve: F) -> Result<Running, AgentError>
    where
        F: FnOnce(tokio::net::TcpListener, std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), AgentError>>,
    {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(AgentError::Runtime)?;
        let listener = runtime.block_on(tokio::net::TcpListener::bind(listen)).map_err(AgentError::Serve)?;
        let addr = listener.local_addr().map_err(AgentError::Serve)?;
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            runtime.block_on(serve(
                listener,
                Box::pin(async move {
                    let _ = stopped.await;
                }),
            ))
        });
        Ok(Running { addr, stop: Some(stop), thread: Some(thread) })
    }

    /// Stops the agent (rules stay) and waits for it.
    pub fn stop(mut self) -> Result<(), AgentError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), AgentError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| AgentError::Panicked)?,
            None => Ok(()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Waits for SIGTERM or SIGINT (what `switchyard agent` stops on).
pub async fn termination() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The IPVS backend: virtual servers and ipsets through their tools, the iptables part through
    /// the iptables applier (our chains restored with `--noflush`, builtin jumps ensured), never a
    /// flush of the node's tables; a failing step stops the sync before the rules.
    #[test]
    fn ipvs_kernel_applies_in_order_and_never_flushes_foreign_rules() {
        use crate::apply::iptables::Recording as IptRecording;
        use crate::apply::ipvs::Recording as IpvsRecording;
        use switchyard_engine::render::ipvs::Section;
        let cluster = switchyard_engine::demo::cluster();
        let program = switchyard_engine::render(&cluster, "node-1", policy::Backend::Ipvs).expect("renders");
        let mut k = IpvsKernel { ipvs: IpvsRecording::default(), iptables: IptRecording::default() };
        k.apply(SyncKind::Full, &program).expect("applies");
        let sections: Vec<Section> = k.ipvs.applied.iter().flat_map(|t| t.steps.iter().map(|s| s.section)).collect();
        assert_eq!(sections.first(), Some(&Section::Ipvsadm));
        assert!(sections.contains(&Section::Ipset));
        assert!(!sections.iter().any(|s| matches!(s, Section::Iptables(_))), "iptables goes through its applier");
        let restored: String = k.iptables.restores.iter().map(|(_, t)| t.as_str()).collect();
        assert!(restored.contains(":SWITCHYARD-SERVICES - [0:0]"), "{restored}");
        assert!(!restored.contains(":PREROUTING"), "builtin chains are never restored (that would flush them)");
        assert!(k.iptables.rule_ops.iter().any(|(_, table, _, rule)| table == "nat" && rule.starts_with("PREROUTING")));

        // A later partial sync of a changed service; then a failing ipvsadm stops before the rules.
        let mut changed = cluster.clone();
        changed.endpoint_slices.values_mut().for_each(|s| s.endpoints.truncate(1));
        let txn = switchyard_engine::render_incremental(&cluster, &changed, "node-1", policy::Backend::Ipvs)
            .expect("renders");
        k.apply(SyncKind::Partial, &txn).expect("applies");
        let before = k.iptables.restores.len();
        k.ipvs.fail_on = Some(Section::Ipvsadm);
        assert!(k.apply(SyncKind::Full, &program).is_err());
        assert_eq!(k.iptables.restores.len(), before, "no rules after a failed ipvsadm step");
    }

    /// The nftables kernel adds the deletion of a stale family to full syncs only.
    #[test]
    fn nft_kernel_full_and_partial() {
        let mut k = NftKernel(nftables::Recording { owned: vec!["ip6".into()], ..Default::default() });
        k.apply(SyncKind::Full, "table ip switchyard {\n}\n").expect("applies");
        k.apply(SyncKind::Partial, "add element ip switchyard x { 1 }\n").expect("applies");
        assert!(k.0.applied[0].ends_with("table ip6 switchyard\ndelete table ip6 switchyard\n"));
        assert_eq!(k.0.applied[1], "add element ip switchyard x { 1 }\n");
        k.0.fail = true;
        assert!(k.apply(SyncKind::Partial, "x").is_err());
    }
}
