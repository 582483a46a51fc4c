//! The Kubernetes source: watches Services, EndpointSlices and Nodes on an API server with
//! kube-rs and hands the agent's sync loop engine clusters, the way the manifests folder does.
//!
//! - [`KubeSource::start`] runs one kube-runtime `watcher` per [`Kind`], with kube-proxy's label
//!   selector ([`PROXY_LABEL_SELECTOR`]) on Services and EndpointSlices, and an exponential
//!   backoff with jitter between failed attempts. kube-runtime resumes a dropped watch from the last resourceVersion and re-lists
//!   after `410 Gone`.
//! - [`objects`] reads every object once, through the engine's parser;
//! - [`watch::KindWatch`] (pure) makes each (re-)list ONE atomic snapshot and drops updates the
//!   engine cannot see;
//! - [`Feed`] (pure) keeps the cluster and the [`Changes`] partial syncs need, and holds
//!   everything back until every kind has been listed once.
//!
//! Objects are watched as untyped JSON ([`DynamicObject`], with the k8s-openapi types naming the
//! resources): decoding into k8s-openapi structs would fail a whole list page on one odd
//! object, and the watcher would then retry that list forever; here that object alone is
//! skipped, with a message naming its field.

pub mod feed;
pub mod objects;
pub mod watch;

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1 as core_v1;
use k8s_openapi::api::discovery::v1 as discovery_v1;
use kube::core::{ApiResource, DynamicObject};
use kube::runtime::watcher;
use kube::{Api, Client};
use switchyard_engine::cluster::{Cluster, ObjectRef};
use switchyard_engine::input::{self, Object};
use switchyard_engine::model::ProxyConfig;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub use feed::Feed;
pub use objects::ObjectError;

use crate::sync::{Backoff, Changes};
use watch::{KindWatch, WatchInput};

/// kube-proxy's selector for Services and EndpointSlices (`cmd/kube-proxy/app/server.go`): skip
/// objects that ask for another proxy (`service.kubernetes.io/service-proxy-name`, KEP-2447)
/// and the EndpointSlices of headless services (`service.kubernetes.io/headless`, which the
/// EndpointSlice controller sets). Requirements sorted by key, as `labels.Selector.String()`
/// writes them.
pub const PROXY_LABEL_SELECTOR: &str = "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name";

/// The kinds the source watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    /// The label selector the watch sends. Nodes have none: kube-proxy watches only its own
    /// Node (a field selector), but the tracer and the dashboard need every node's addresses
    /// and pod CIDRs to tell node, pod and outside traffic apart.
    pub fn label_selector(self) -> Option<&'static str> {
        match self {
            Kind::Service | Kind::EndpointSlice => Some(PROXY_LABEL_SELECTOR),
            Kind::Node => None,
        }
    }

    fn api_resource(self) -> ApiResource {
        match self {
            Kind::Service => ApiResource::erase::<core_v1::Service>(&()),
            Kind::EndpointSlice => ApiResource::erase::<discovery_v1::EndpointSlice>(&()),
            Kind::Node => ApiResource::erase::<core_v1::Node>(&()),
        }
    }
}

/// What the source says, in order, per kind.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceEvent {
    /// Every object of `kind` (a list or re-list): replaces all objects of that kind at once.
    Snapshot {
        kind: Kind,
        objects: Vec<Object>,
    },
    /// An object was added or changed.
    Apply(Object),
    Delete(ObjectRef),
    /// An object that cannot be read was skipped (its last good version stays).
    Invalid(ObjectError),
    /// A watch or list failed; it is retried after a backoff (a `410 Gone` by a re-list).
    WatchFailed {
        kind: Kind,
        message: String,
    },
}

/// Where the API server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connect {
    /// `--kubeconfig FILE` (its current context).
    Kubeconfig(PathBuf),
    /// `--in-cluster`: the pod's service account and `KUBERNETES_SERVICE_HOST`/`_PORT`.
    InCluster,
}

/// Why the source cannot start.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("kubeconfig {}: {source}", path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("in-cluster configuration: {0}")]
    InCluster(#[source] kube::config::InClusterError),
    #[error("cannot create the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error("cannot read --config {}: {source}", path.display())]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The `--config` file is not a readable KubeProxyConfiguration.
    #[error("--config {}: {message}", path.display())]
    Config { path: PathBuf, message: String },
}

/// A client for the API server. Needs a running Tokio runtime.
pub async fn client(connect: &Connect) -> Result<Client, KubeError> {
    let config = match connect {
        Connect::Kubeconfig(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|source| KubeError::Kubeconfig { path: path.clone(), source })?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|source| KubeError::Kubeconfig { path: path.clone(), source })?
        }
        Connect::InCluster => kube::Config::incluster().map_err(KubeError::InCluster)?,
    };
    Client::try_from(config).map_err(KubeError::Client)
}

/// Reads a `KubeProxyConfiguration` file (`--config`, the ConfigMap's `config.conf`) with the
/// engine's parser.
pub fn read_proxy_config(path: &Path) -> Result<ProxyConfig, KubeError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| KubeError::ReadConfig { path: path.to_path_buf(), source })?;
    let bad = |message: String| KubeError::Config { path: path.to_path_buf(), message };
    let parsed = input::parse(&path.display().to_string(), &text)
        .map_err(|problems| bad(problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")))?;
    parsed
        .objects
        .into_iter()
        .find_map(|o| match o {
            Object::ProxyConfig(c) => Some(c),
            _ => None,
        })
        .ok_or_else(|| bad("holds no KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1)".into()))
}

/// What the sync loop gets from [`KubeSource::next`].
#[derive(Debug, Clone)]
pub enum Update {
    /// The cluster to sync, and what changed since the last one.
    Cluster { cluster: Box<Cluster>, changes: Changes },
    /// An object that cannot be read was skipped (its last good version stays).
    Invalid(ObjectError),
    /// A watch or list failed; it is retried after a backoff.
    WatchFailed { kind: Kind, message: String },
}

/// The running watches and the cluster they build. Dropping it stops the watches.
pub struct KubeSource {
    rx: mpsc::Receiver<SourceEvent>,
    feed: Feed,
    ready: VecDeque<Update>,
    tasks: Vec<JoinHandle<()>>,
}

/// Events read ahead and applied as one change, so a burst (a re-list, a rollout) becomes one
/// cluster for the sync loop rather than one per object.
const BATCH: usize = 4096;

impl KubeSource {
    /// Starts watching. `config` is the proxy configuration the cluster carries; `backoff`
    /// paces reconnections after failures.
    pub fn start(client: Client, config: ProxyConfig, backoff: Backoff) -> Self {
        let (tx, rx) = mpsc::channel(BATCH);
        let tasks =
            Kind::ALL.iter().map(|&kind| tokio::spawn(watch_kind(client.clone(), kind, backoff, tx.clone()))).collect();
        KubeSource { rx, feed: Feed::new(config), ready: VecDeque::new(), tasks }
    }

    /// The cluster as built so far (empty kinds until listed).
    pub fn cluster(&self) -> &Cluster {
        self.feed.cluster()
    }

    /// The kinds not listed yet.
    pub fn waiting_for(&self) -> Vec<Kind> {
        self.feed.waiting_for()
    }

    /// Waits for the next update. The first [`Update::Cluster`] comes once every kind has been
    /// listed. `None` once the watches have stopped.
    pub async fn next(&mut self) -> Option<Update> {
        loop {
            if let Some(u) = self.ready.pop_front() {
                return Some(u);
            }
            let first = self.rx.recv().await?;
            self.absorb(first);
            for _ in 1..BATCH {
                match self.rx.try_recv() {
                    Ok(e) => self.absorb(e),
                    Err(_) => break,
                }
            }
            if let Some((cluster, changes)) = self.feed.take() {
                self.ready.push_back(Update::Cluster { cluster, changes });
            }
        }
    }

    fn absorb(&mut self, e: SourceEvent) {
        match e {
            SourceEvent::Invalid(e) => self.ready.push_back(Update::Invalid(e)),
            SourceEvent::WatchFailed { kind, message } => self.ready.push_back(Update::WatchFailed { kind, message }),
            other => self.feed.apply(other),
        }
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Watches one kind until the receiver is gone.
async fn watch_kind(client: Client, kind: Kind, backoff: Backoff, tx: mpsc::Sender<SourceEvent>) {
    let resource = kind.api_resource();
    let api: Api<DynamicObject> = Api::all_with(client, &resource);
    let mut config = watcher::Config::default();
    if let Some(s) = kind.label_selector() {
        config = config.labels(s);
    }
    let mut events = watcher(api, config).boxed();
    let mut state = KindWatch::new(kind);
    let mut retry = Retry::new(backoff);
    while let Some(item) = events.next().await {
        let mut pause = None;
        let input = match item {
            // Init comes before every list attempt, failed ones too: it is no sign of health.
            Ok(watcher::Event::Init) => WatchInput::Init,
            Ok(watcher::Event::InitApply(o)) => WatchInput::InitApply(read(kind, &o)),
            Ok(watcher::Event::InitDone) => {
                retry.succeeded();
                WatchInput::InitDone
            }
            Ok(watcher::Event::Apply(o)) => {
                retry.succeeded();
                WatchInput::Apply(read(kind, &o))
            }
            Ok(watcher::Event::Delete(o)) => {
                retry.succeeded();
                WatchInput::Deleted(objects::object_ref(kind, &o))
            }
            Err(e) => {
                pause = Some(retry.failed(tokio::time::Instant::now().into_std()));
                WatchInput::Error(e.to_string())
            }
        };
        for out in state.step(input) {
            if tx.send(out).await.is_err() {
                return;
            }
        }
        // The watcher recovers (re-watch, or re-list after 410) when polled again: not before.
        if let Some(d) = pause {
            tokio::time::sleep(d).await;
        }
    }
}

fn read(kind: Kind, o: &DynamicObject) -> watch::Read {
    (objects::object_ref(kind, o), objects::to_engine(kind, o))
}

/// Reconnection delays: the agent's [`Backoff`] per failure in a row, plus up to 20% of jitter
/// (so a DaemonSet's agents do not all come back at the same instant). The count restarts after
/// progress (a list completed, an event received) or two quiet minutes since the last failure;
/// a list that fails right after `Init` is no progress.
struct Retry {
    policy: Backoff,
    failures: u32,
    last_failure: Option<std::time::Instant>,
    seed: std::hash::RandomState,
}

impl Retry {
    const QUIET: Duration = Duration::from_secs(120);

    fn new(policy: Backoff) -> Self {
        Retry { policy, failures: 0, last_failure: None, seed: std::hash::RandomState::new() }
    }

    fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// The pause after a failure at `now`.
    fn failed(&mut self, now: std::time::Instant) -> Duration {
        if self.last_failure.is_some_and(|t| now.duration_since(t) > Self::QUIET) {
            self.failures = 0;
        }
        self.last_failure = Some(now);
        self.failures = self.failures.saturating_add(1);
        let base = self.policy.delay(self.failures);
        let mut h = self.seed.build_hasher();
        h.write_u32(self.failures);
        let permille = h.finish() % 200;
        base + base.mul_f64(permille as f64 / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Delays double up to the cap, each with at most 20% added; progress or a quiet spell
    /// starts over.
    #[test]
    fn retry_backs_off() {
        let policy = Backoff { initial: Duration::from_millis(100), max: Duration::from_millis(400) };
        let mut r = Retry::new(policy);
        let t0 = std::time::Instant::now();
        let got: Vec<Duration> = (0..4).map(|i| r.failed(t0 + Duration::from_secs(i))).collect();
        for (d, base) in got.iter().zip([100u64, 200, 400, 400]) {
            let base = Duration::from_millis(base);
            assert!(*d >= base && *d <= base.mul_f64(1.2), "{got:?}");
        }
        r.succeeded();
        assert!(r.failed(t0 + Duration::from_secs(5)) < Duration::from_millis(121));
        r.failed(t0 + Duration::from_secs(6));
        assert!(r.failed(t0 + Duration::from_secs(500)) < Duration::from_millis(121), "two quiet minutes");
    }

    /// The proxy configuration file is read by the engine's parser; other kinds are refused.
    #[test]
    fn proxy_config_file() {
        let dir = std::env::temp_dir().join(format!("sy-kube-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let good = dir.join("good.yaml");
        std::fs::write(
            &good,
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nclusterCIDR: 10.244.0.0/16\nmode: nftables\n",
        )
        .expect("write");
        let c = read_proxy_config(&good).expect("reads");
        assert_eq!(c.cluster_cidrs.len(), 1);
        let bad = dir.join("bad.yaml");
        std::fs::write(&bad, "apiVersion: v1\nkind: Node\nmetadata: {name: n}\n").expect("write");
        assert!(read_proxy_config(&bad).expect_err("no config").to_string().contains("no KubeProxyConfiguration"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
