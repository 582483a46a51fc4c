//! A small Kubernetes API server on 127.0.0.1 that speaks the real list/watch wire format for
//! Services, EndpointSlices and Nodes, so the Kubernetes source can be tested without a cluster.
//!
//! What it does as kube-apiserver does:
//! - lists: `{"kind":"ServiceList","apiVersion":"v1","metadata":{"resourceVersion":".."},"items":[..]}`
//!   with items carrying full metadata (uid, resourceVersion, creationTimestamp, ...) but no
//!   `kind`/`apiVersion`; `limit`/`continue` paging;
//! - watches (`?watch=true&resourceVersion=N&allowWatchBookmarks=true`): a chunked stream of
//!   `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR","object":{..}}` lines, replaying every
//!   change after N from its event log; an object that stops matching the label selector is
//!   `DELETED` for that watch, one that starts matching is `ADDED`;
//! - a watch from a resourceVersion older than the compacted log, or an active watch when the
//!   log is compacted ([`ApiServer::expire`]), gets an `ERROR` event with a `410 Expired`
//!   `Status` and is closed;
//! - label selectors (`!key`, `key`, `key=value`, `key!=value`) filter lists and watches;
//! - a bearer token is required (401 `Status` otherwise);
//! - [`ApiServer::drop_watches`] cuts every open watch connection mid-stream;
//!   [`ApiServer::set_outage`] closes the listening socket (connections are refused) and opens
//!   it again on the same port.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// The token clients must send.
pub const TOKEN: &str = "switchyard-test-token";

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub resource: String,
    pub watch: bool,
    pub query: HashMap<String, String>,
}

struct Resource {
    kind: &'static str,
    api_version: &'static str,
    namespaced: bool,
    objects: BTreeMap<(String, String), Value>,
    /// (resourceVersion, old, new): None for a creation's old and a deletion's new.
    log: Vec<(u64, Option<Value>, Option<Value>)>,
    /// Watches from a resourceVersion below this get 410.
    compacted: u64,
}

struct Watch {
    resource: String,
    selector: String,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Result<Bytes, std::io::Error>>,
}

struct Inner {
    rv: u64,
    uid: u64,
    resources: BTreeMap<String, Resource>,
    watches: Vec<Watch>,
    seen: Vec<Seen>,
}

/// The running server; it stops with the test's runtime.
#[derive(Clone)]
pub struct ApiServer {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    /// The task accepting connections, while listening.
    listening: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl ApiServer {
    /// Serves on a free port of 127.0.0.1, on the current Tokio runtime.
    pub async fn start() -> ApiServer {
        let mut resources = BTreeMap::new();
        for (plural, kind, api_version, namespaced) in [
            ("services", "Service", "v1", true),
            ("endpointslices", "EndpointSlice", "discovery.k8s.io/v1", true),
            ("nodes", "Node", "v1", false),
        ] {
            let r = Resource { kind, api_version, namespaced, objects: BTreeMap::new(), log: Vec::new(), compacted: 0 };
            resources.insert(plural.to_string(), r);
        }
        let inner = Arc::new(Mutex::new(Inner { rv: 1000, uid: 0, resources, watches: Vec::new(), seen: Vec::new() }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = ApiServer { addr, inner, listening: Arc::default() };
        server.serve(listener);
        server
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let router = Router::new()
            .route("/api/v1/{resource}", get(handle))
            .route("/apis/discovery.k8s.io/v1/{resource}", get(handle))
            .with_state(self.inner.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        *self.listening.lock().expect("listening") = Some(task);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("server state")
    }

    /// A kubeconfig for this server (plain HTTP, bearer token).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: wire\n  cluster:\n    server: http://{}\nusers:\n- name: agent\n  user:\n    token: {TOKEN}\ncontexts:\n- name: wire\n  context:\n    cluster: wire\n    user: agent\ncurrent-context: wire\n",
            self.addr
        )
    }

    /// Creates or replaces an object (`resource` is the plural: services, endpointslices,
    /// nodes), stamping its metadata as the API server does, and tells the watches.
    pub fn put(&self, resource: &str, mut object: Value) -> u64 {
        let mut s = self.lock();
        s.rv += 1;
        let rv = s.rv;
        let key = key_of(&object);
        let old = s.resources[resource].objects.get(&key).cloned();
        let uid = match old.as_ref().and_then(|o| o["metadata"]["uid"].as_str()) {
            Some(u) => u.to_string(),
            None => {
                s.uid += 1;
                format!("6b1f3c2e-0d4a-4f7e-9a1b-{:012x}", s.uid)
            }
        };
        let r = s.resources.get_mut(resource).expect("a known resource");
        let meta = object["metadata"].as_object_mut().expect("metadata");
        meta.insert("uid".into(), json!(uid));
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        meta.entry("creationTimestamp").or_insert(json!("2026-11-26T09:00:00Z"));
        if r.namespaced {
            meta.entry("namespace").or_insert(json!("default"));
        }
        let mut with_type = object.clone();
        with_type["kind"] = json!(r.kind);
        with_type["apiVersion"] = json!(r.api_version);
        r.objects.insert(key, object);
        r.log.push((rv, old.map(|o| typed(r, o)), Some(with_type)));
        let entry = r.log.last().cloned().expect("just pushed");
        notify(&mut s, resource, &entry);
        rv
    }

    /// Deletes an object and tells the watches.
    pub fn delete(&self, resource: &str, namespace: &str, name: &str) {
        let mut s = self.lock();
        s.rv += 1;
        let rv = s.rv;
        let r = s.resources.get_mut(resource).expect("a known resource");
        let ns = if r.namespaced { namespace.to_string() } else { String::new() };
        let Some(mut old) = r.objects.remove(&(ns, name.to_string())) else { return };
        // A DELETED event carries the object's last state at the deletion's resourceVersion.
        old["metadata"]["resourceVersion"] = json!(rv.to_string());
        let old = typed(r, old);
        r.log.push((rv, Some(old), None));
        let entry = r.log.last().cloned().expect("just pushed");
        notify(&mut s, resource, &entry);
    }

    /// Sends a BOOKMARK at the current resourceVersion to every watch that asked for them.
    pub fn bookmark(&self) -> u64 {
        let s = self.lock();
        let rv = s.rv;
        let mut kinds = HashMap::new();
        for (plural, r) in &s.resources {
            kinds.insert(plural.clone(), (r.kind, r.api_version));
        }
        for w in s.watches.iter().filter(|w| w.bookmarks) {
            let (kind, api_version) = kinds[&w.resource];
            let object = json!({
                "kind": kind, "apiVersion": api_version,
                "metadata": {"resourceVersion": rv.to_string(), "creationTimestamp": null}
            });
            let _ = w.tx.send(Ok(line("BOOKMARK", &object)));
        }
        rv
    }

    /// Compacts every event log to now: open watches get `ERROR 410 Expired` and are closed, and
    /// any watch from an older resourceVersion gets the same, so clients must re-list.
    pub fn expire(&self) {
        let mut s = self.lock();
        let rv = s.rv;
        for r in s.resources.values_mut() {
            r.compacted = rv;
            r.log.clear();
        }
        for w in s.watches.drain(..) {
            let _ = w.tx.send(Ok(gone(rv, rv)));
        }
    }

    /// Cuts every open watch connection without ending its chunked body.
    pub fn drop_watches(&self) {
        for w in self.lock().watches.drain(..) {
            let _ = w.tx.send(Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "dropped by the test")));
        }
    }

    /// On: the server stops listening (new connections are refused; open watches go on until
    /// [`ApiServer::drop_watches`]). Off: it listens again on the same address. A 503 would not
    /// do: kube's client retries 503s itself.
    pub fn set_outage(&self, on: bool) {
        let mut listening = self.listening.lock().expect("listening");
        if on {
            if let Some(task) = listening.take() {
                task.abort();
            }
            return;
        }
        if listening.is_some() {
            return;
        }
        drop(listening);
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_reuseaddr(true).expect("SO_REUSEADDR");
        // The aborted task drops its listener when the runtime next polls it: retry briefly.
        for _ in 0..100 {
            if socket.bind(self.addr).is_ok() {
                self.serve(socket.listen(1024).expect("listen"));
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("cannot listen on {} again", self.addr);
    }

    /// The requests seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }

    /// Whether a watch of `resource` is open.
    pub fn watching(&self, resource: &str) -> bool {
        self.lock().watches.iter().any(|w| w.resource == resource && !w.tx.is_closed())
    }

    /// How many lists of `resource` were served (a re-list is one more).
    pub fn lists(&self, resource: &str) -> usize {
        self.lock().seen.iter().filter(|s| s.resource == resource && !s.watch).count()
    }
}

fn key_of(object: &Value) -> (String, String) {
    let m = &object["metadata"];
    (m["namespace"].as_str().unwrap_or("").to_string(), m["name"].as_str().expect("metadata.name").to_string())
}

fn typed(r: &Resource, mut object: Value) -> Value {
    object["kind"] = json!(r.kind);
    object["apiVersion"] = json!(r.api_version);
    object
}

fn line(kind: &str, object: &Value) -> Bytes {
    let mut s = json!({"type": kind, "object": object}).to_string();
    s.push('\n');
    Bytes::from(s)
}

/// The ERROR event kube-apiserver sends when a watch's resourceVersion has been compacted away.
fn gone(asked: u64, oldest: u64) -> Bytes {
    line(
        "ERROR",
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("too old resource version: {asked} ({oldest})"),
            "reason": "Expired", "code": 410
        }),
    )
}

/// The event one change means for a watch with `selector`, if any.
fn event_for(selector: &str, old: Option<&Value>, new: Option<&Value>) -> Option<Bytes> {
    let was = old.is_some_and(|o| matches(selector, o));
    match new {
        Some(n) if matches(selector, n) => Some(line(if was { "MODIFIED" } else { "ADDED" }, n)),
        // Deleted, or no longer selected: gone for this watch.
        Some(n) if was => Some(line("DELETED", n)),
        None if was => old.map(|o| line("DELETED", o)),
        _ => None,
    }
}

fn notify(s: &mut Inner, resource: &str, (_, old, new): &(u64, Option<Value>, Option<Value>)) {
    s.watches.retain(|w| !w.tx.is_closed());
    for w in s.watches.iter().filter(|w| w.resource == resource) {
        if let Some(b) = event_for(&w.selector, old.as_ref(), new.as_ref()) {
            let _ = w.tx.send(Ok(b));
        }
    }
}

/// Label selector matching for the forms kube-proxy and kubectl use.
fn matches(selector: &str, object: &Value) -> bool {
    let labels = &object["metadata"]["labels"];
    let label = |k: &str| labels.get(k).and_then(Value::as_str);
    selector.split(',').map(str::trim).filter(|t| !t.is_empty()).all(|term| {
        if let Some(k) = term.strip_prefix('!') {
            label(k).is_none()
        } else if let Some((k, v)) = term.split_once("!=") {
            label(k) != Some(v)
        } else if let Some((k, v)) = term.split_once('=') {
            label(k.trim_end_matches('=')) == Some(v)
        } else {
            label(term).is_some()
        }
    })
}

/// `a=1&b=%21x` into a map, percent-decoded (`+` is a space, as in forms).
fn parse_query(raw: &str) -> HashMap<String, String> {
    fn decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'%' if i + 2 < b.len() => {
                    let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                    match hex {
                        Some(v) => {
                            out.push(v);
                            i += 3;
                            continue;
                        }
                        None => out.push(b'%'),
                    }
                }
                b'+' => out.push(b' '),
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    raw.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16()
    });
    (code, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

async fn handle(
    State(inner): State<Arc<Mutex<Inner>>>,
    Path(resource): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Response {
    let query = parse_query(raw.as_deref().unwrap_or(""));
    let authorized =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {TOKEN}"));
    let mut s = inner.lock().expect("server state");
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    s.seen.push(Seen { resource: resource.clone(), watch, query: query.clone() });
    if !authorized {
        return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    let rv_now = s.rv;
    let Some(r) = s.resources.get(&resource) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("the server could not find the requested resource ({resource})"),
        );
    };
    let selector = query.get("labelSelector").cloned().unwrap_or_default();
    if !watch {
        let mut items: Vec<Value> = r.objects.values().filter(|o| matches(&selector, o)).cloned().collect();
        let start: usize = query.get("continue").and_then(|c| c.parse().ok()).unwrap_or(0);
        let limit: usize = query.get("limit").and_then(|l| l.parse().ok()).filter(|l| *l > 0).unwrap_or(usize::MAX);
        let total = items.len();
        items = items.into_iter().skip(start).take(limit).collect();
        let mut metadata = json!({"resourceVersion": rv_now.to_string()});
        if start + items.len() < total {
            metadata["continue"] = json!((start + items.len()).to_string());
            metadata["remainingItemCount"] = json!(total - start - items.len());
        }
        let body = json!({"kind": format!("{}List", r.kind), "apiVersion": r.api_version, "metadata": metadata, "items": items});
        return ([(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response();
    }
    let from: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(rv_now);
    let (tx, rx) = mpsc::unbounded_channel();
    if from < r.compacted {
        let _ = tx.send(Ok(gone(from, r.compacted)));
        drop(tx);
    } else {
        for (rv, old, new) in &r.log {
            if *rv > from
                && let Some(b) = event_for(&selector, old.as_ref(), new.as_ref())
            {
                let _ = tx.send(Ok(b));
            }
        }
        let bookmarks = query.get("allowWatchBookmarks").is_some_and(|v| v == "true");
        s.watches.push(Watch { resource, selector, bookmarks, tx });
    }
    let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .expect("a response")
}
