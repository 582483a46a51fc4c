//! The HTTP side of `switchyard agent` and `switchyard demo`: the event stream, the snapshot, the
//! tracer, metrics, health and the dashboard's files, all read-only.
//!
//! | path | what |
//! |---|---|
//! | `/api/v1/events` | WebSocket: a snapshot (or, with `?since=SEQ`, the missed events), then every event |
//! | `/api/v1/snapshot` | the snapshot message, as the stream's first message |
//! | `/api/v1/trace?node=&from=&to=&protocol=&backend=` | `switchyard trace --output json`, on the live cluster |
//! | `/metrics`, `/healthz`, `/livez` | Prometheus text; kube-proxy's health body; "the process answers" |
//! | `/` and below | the dashboard (`dist/`, as Trunk builds it), or a page saying how to build it |
//!
//! Safety ([`ServerConfig`]): only GET and HEAD (anything else is 405); with a token every request
//! must carry it ([`Auth`]); WebSocket upgrades from a browser must come from the page's own
//! origin (the `Origin` header matches `Host`); every response carries a strict
//! Content-Security-Policy and friends. Cluster names only ever travel as JSON strings.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::{SinkExt, StreamExt};
use switchyard_engine::{Destination, Error as EngineError};

use crate::cli::{BackendArg, Output, ProtocolArg, Source, TraceArgs};
use crate::stream::{ClientFeed, Hub};

/// How often an idle stream is pinged (proxies drop silent connections).
pub const PING_EVERY: Duration = Duration::from_secs(20);
/// A client that cannot take one message in this long is disconnected (it can resume with
/// `?since=`); until then its queue lags and it is resynchronised, never waited for.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many ready messages are written before one flush.
const BATCH: usize = 256;
/// The subprotocol the server selects when a client offers subprotocols (browsers require the
/// server to pick one of those offered; see [`Auth`]).
pub const SUBPROTOCOL: &str = "switchyard.v1";
/// Prefix of the subprotocol that carries a token: `bearer.<token>`.
pub const BEARER_SUBPROTOCOL: &str = "bearer.";
/// The cookie a browser gets after opening the dashboard with `?token=`.
pub const TOKEN_COOKIE: &str = "switchyard_token";

/// What the server needs besides the hub.
#[derive(Debug, Clone, Default)]
pub struct ServerConfig {
    /// Required on every request when set ([`Auth`]).
    pub token: Option<String>,
    /// The dashboard's files (`index.html`, the wasm and js Trunk writes); `None` or a folder
    /// without `index.html` serves a page saying how to build it.
    pub ui_dir: Option<PathBuf>,
}

/// Metrics and health of whatever feeds the hub (the agent's sync loop, the demo).
pub trait Status: Send + Sync + 'static {
    /// The Prometheus text exposition.
    fn metrics(&self) -> String;
    /// `/healthz`: healthy or not, and the JSON body.
    fn healthz(&self) -> (bool, String);
}

#[derive(Clone)]
struct App {
    hub: Hub,
    status: Arc<dyn Status>,
    token: Option<Arc<str>>,
    ui: Arc<Ui>,
    /// The node traces default to (the agent's own).
    node: Arc<str>,
}

/// The server's routes with every safety layer, ready for `axum::serve`.
pub fn router(hub: Hub, status: Arc<dyn Status>, node: &str, config: ServerConfig) -> Router {
    let ui = Ui::load(config.ui_dir.as_deref());
    let app = App { hub, status, token: config.token.map(Arc::from), ui: Arc::new(ui), node: Arc::from(node) };
    Router::new()
        .route("/api/v1/events", get(events))
        .route("/api/v1/snapshot", get(snapshot))
        .route("/api/v1/trace", get(trace))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .fallback(static_file)
        .layer(middleware::from_fn_with_state(app.clone(), guard))
        .with_state(app)
}

/// A JSON error body: `{"error": "...", "parameter": "..."}`.
fn error(code: StatusCode, message: impl Into<String>, parameter: Option<&str>) -> Response {
    #[derive(serde::Serialize)]
    struct Body<'a> {
        error: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        parameter: Option<&'a str>,
    }
    let body = serde_json::to_string(&Body { error: message.into(), parameter }).unwrap_or_default();
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

// ---------------------------------------------------------------------------------------------
// Safety: methods, token, headers

/// Runs around every request: read-only methods, the token, the security headers.
async fn guard(State(app): State<App>, req: Request, next: Next) -> Response {
    let mut resp = if let Some(token) = &app.token
        && let Some(why) = Auth::check(token, req.headers(), req.uri())
    {
        let mut r = error(StatusCode::UNAUTHORIZED, why, None);
        r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"switchyard\""));
        r
    } else if app.token.is_none()
        && let Err(why) = loopback_host(req.headers())
    {
        error(StatusCode::FORBIDDEN, why, None)
    } else if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = error(StatusCode::METHOD_NOT_ALLOWED, "the API is read-only: only GET and HEAD", None);
        r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        r
    } else {
        let sets_cookie = app.token.is_some() && query_param(req.uri(), "token").is_some();
        let mut r = next.run(req).await;
        if sets_cookie && let Some(token) = app.token.as_deref().filter(|t| cookie_safe(t)) {
            // The browser loads the page's scripts and opens the stream without our headers: a
            // same-site, script-invisible cookie carries the token it arrived with.
            let cookie = format!("{TOKEN_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict");
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                r.headers_mut().append(header::SET_COOKIE, v);
            }
        }
        r
    };
    let h = resp.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, app.ui.csp.clone());
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    resp
}

/// How a request proves it knows the token. Any one of:
///
/// - `Authorization: Bearer TOKEN` (curl, scripts, the dashboard's `fetch`);
/// - `?token=TOKEN` on any URL (a browser opening the dashboard; it then gets a cookie);
/// - the `switchyard_token` cookie that answer set (the page's own files and the WebSocket);
/// - on a WebSocket upgrade, a subprotocol `bearer.TOKEN` offered next to `switchyard.v1`
///   (`new WebSocket(url, ["switchyard.v1", "bearer." + token])`), since browsers cannot set
///   headers on a WebSocket.
pub struct Auth;

impl Auth {
    /// `None` when the request carries the token, else why not.
    pub fn check(token: &str, headers: &HeaderMap, uri: &Uri) -> Option<&'static str> {
        let mut offered = false;
        let mut check = |candidate: &str| {
            offered = true;
            constant_time_eq(candidate.as_bytes(), token.as_bytes())
        };
        if let Some(v) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())
            && let Some(t) = v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer "))
            && check(t.trim())
        {
            return None;
        }
        if let Some(t) = query_param(uri, "token")
            && check(&t)
        {
            return None;
        }
        for v in headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()) {
            for c in v.split(';') {
                if let Some(t) = c.trim().strip_prefix(TOKEN_COOKIE).and_then(|r| r.strip_prefix('='))
                    && check(t)
                {
                    return None;
                }
            }
        }
        for v in headers.get_all(header::SEC_WEBSOCKET_PROTOCOL).iter().filter_map(|v| v.to_str().ok()) {
            for p in v.split(',') {
                if let Some(t) = p.trim().strip_prefix(BEARER_SUBPROTOCOL)
                    && check(t)
                {
                    return None;
                }
            }
        }
        Some(if offered { "the token is wrong" } else { "a bearer token is required (Authorization: Bearer ...)" })
    }
}

/// Compares without an early exit, so the time taken does not tell how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0));
    }
    diff == 0
}

/// A token is set as a cookie only when it is made of cookie-safe characters; others still
/// work through the header, the query and the subprotocol.
fn cookie_safe(token: &str) -> bool {
    token.bytes().all(|b| b.is_ascii_graphic() && !matches!(b, b';' | b',' | b'"' | b'\\'))
}

/// One query parameter, percent-decoded.
fn query_param(uri: &Uri, name: &str) -> Option<String> {
    let q = uri.query()?;
    form_pairs(q).into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

fn form_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = b.get(i + 1..i + 3).filter(|h| h.iter().all(u8::is_ascii_hexdigit));
                match hex.and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Without a token the server is only for this machine, and that must hold for the name the
/// browser used too: a page on an attacker's domain that resolves to 127.0.0.1 (DNS rebinding) is
/// same-origin with itself, so the Origin check alone would let it read the stream. Only loopback
/// names pass: `localhost` (and `*.localhost`), 127.0.0.0/8 and `[::1]`, with any port. Clients
/// that send no `Host` (HTTP/1.0 tools) are not browsers.
fn loopback_host(headers: &HeaderMap) -> Result<(), String> {
    let Some(host) = headers.get(header::HOST) else { return Ok(()) };
    let host = host.to_str().map_err(|_| "the Host header is not text".to_string())?;
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => {
            host.rsplit_once(':').filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit())).map_or(host, |(n, _)| n)
        }
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let loopback = name == "localhost"
        || name.ends_with(".localhost")
        || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if loopback {
        Ok(())
    } else {
        Err(format!(
            "Host {host:?} is not a loopback name: without --token-file the server answers only \
             localhost, 127.0.0.1 and [::1] (DNS rebinding protection)"
        ))
    }
}

/// Whether a WebSocket upgrade may go ahead: browsers always send `Origin`, and it must be this
/// server (its `Host`); clients that are not browsers send none.
fn origin_allowed(headers: &HeaderMap) -> Result<(), String> {
    let Some(origin) = headers.get(header::ORIGIN) else { return Ok(()) };
    let origin = origin.to_str().map_err(|_| "the Origin header is not text".to_string())?;
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    let authority = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"));
    match authority {
        Some(a) if !host.is_empty() && a.trim_end_matches('/').eq_ignore_ascii_case(host) => Ok(()),
        _ => Err(format!("origin {origin:?} is not this server ({host:?}): cross-site WebSocket refused")),
    }
}

// ---------------------------------------------------------------------------------------------
// The stream

async fn events(State(app): State<App>, req: Request) -> Response {
    let since = match query_param(req.uri(), "since") {
        None => None,
        Some(s) => match s.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => {
                return error(StatusCode::BAD_REQUEST, format!("since={s:?} is not a sequence number"), Some("since"));
            }
        },
    };
    if let Err(why) = origin_allowed(req.headers()) {
        return error(StatusCode::FORBIDDEN, why, None);
    }
    let (mut parts, _) = req.into_parts();
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(u) => u,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("{e} (this is a WebSocket endpoint)"), None),
    };
    let hub = app.hub.clone();
    upgrade.protocols([SUBPROTOCOL]).on_upgrade(move |socket| serve_client(socket, hub, since))
}

/// Sends one client its snapshot (or missed events) and then every event, pings it when idle,
/// and drops it when it stops taking messages.
async fn serve_client(socket: WebSocket, hub: Hub, since: Option<u64>) {
    let Ok(mut feed) = ClientFeed::open(&hub, since).await else { return };
    let (mut tx, mut rx) = socket.split();
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    loop {
        let first = tokio::select! {
            m = feed.next() => match m {
                Ok(m) => WsMessage::Text(m.json),
                Err(_) => {
                    let close = CloseFrame { code: 1001, reason: "the agent is stopping; reconnect with ?since=".into() };
                    let _ = tokio::time::timeout(SEND_TIMEOUT, tx.send(WsMessage::Close(Some(close)))).await;
                    return;
                }
            },
            _ = ping.tick() => WsMessage::Ping(Default::default()),
            r = rx.next() => match r {
                // Clients have nothing to say; pongs and anything else are read and dropped.
                Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => continue,
            },
        };
        // Whatever else is ready goes in the same write: one flush per batch, not per event.
        let batch = async {
            tx.feed(first).await?;
            for _ in 0..BATCH {
                match feed.try_next() {
                    Some(m) => tx.feed(WsMessage::Text(m.json)).await?,
                    None => break,
                }
            }
            tx.flush().await
        };
        match tokio::time::timeout(SEND_TIMEOUT, batch).await {
            Ok(Ok(())) => {}
            // Gone, or not reading: its connection goes; it resumes from its last number.
            Ok(Err(_)) | Err(_) => return,
        }
    }
}

async fn snapshot(State(app): State<App>) -> Response {
    match app.hub.snapshot().await {
        Ok(m) => ([(header::CONTENT_TYPE, "application/json")], m.json.as_str().to_owned()).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string(), None),
    }
}

// ---------------------------------------------------------------------------------------------
// Trace

/// `/api/v1/trace`: the arguments of `switchyard trace`, as query parameters.
async fn trace(State(app): State<App>, Query(q): Query<BTreeMap<String, String>>) -> Response {
    let args = match trace_args(&q, &app.node) {
        Ok(a) => a,
        Err((message, parameter)) => return error(StatusCode::BAD_REQUEST, message, Some(parameter)),
    };
    let cluster = match app.hub.cluster().await {
        Ok(c) => c,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string(), None),
    };
    // Tracing walks the whole program: off the runtime's workers.
    let traced = tokio::task::spawn_blocking(move || crate::cli::trace(&cluster, &args)).await;
    match traced {
        Ok(Ok(t)) => match serde_json::to_string(&t) {
            Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None),
        },
        Ok(Err(crate::cli::Error::Engine(e))) => {
            let parameter = match &e {
                EngineError::UnknownNode(_) => "node",
                EngineError::UnsupportedBackend(_) => "backend",
                EngineError::UnknownName(_) | EngineError::NoAddress { .. } | EngineError::FamilyMismatch { .. } => {
                    "to"
                }
                _ => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None),
            };
            error(StatusCode::BAD_REQUEST, e.to_string(), Some(parameter))
        }
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "the trace panicked", None),
    }
}

/// The query as `switchyard trace` arguments; errors name the parameter.
fn trace_args(q: &BTreeMap<String, String>, node: &str) -> Result<TraceArgs, (String, &'static str)> {
    const KNOWN: [&str; 7] = ["node", "from", "to", "protocol", "backend", "seed", "token"];
    if let Some(k) = q.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err((format!("unknown parameter {k:?} (known: node, from, to, protocol, backend, seed)"), "query"));
    }
    let required = |name: &'static str| match q.get(name).map(|s| s.trim()) {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err((format!("{name} is required"), name)),
    };
    let from = crate::cli::parse_ip(required("from")?).map_err(|e| (e, "from"))?;
    let to_text = required("to")?;
    let to: Destination = to_text.parse().map_err(|e: String| (format!("to={to_text:?}: {e}"), "to"))?;
    let protocol = match q.get("protocol").map(|s| s.to_ascii_lowercase()).as_deref() {
        None | Some("tcp") => ProtocolArg::Tcp,
        Some("udp") => ProtocolArg::Udp,
        Some("sctp") => ProtocolArg::Sctp,
        Some(other) => return Err((format!("protocol={other:?}: expected tcp, udp or sctp"), "protocol")),
    };
    let backend = match q.get("backend").map(|s| s.to_ascii_lowercase()).as_deref() {
        None | Some("nftables") => BackendArg::Nftables,
        Some("iptables") => BackendArg::Iptables,
        Some("ipvs") => BackendArg::Ipvs,
        Some(other) => return Err((format!("backend={other:?}: expected nftables, iptables or ipvs"), "backend")),
    };
    let seed = match q.get("seed") {
        None => 0,
        Some(s) => s.parse().map_err(|_| (format!("seed={s:?} is not a number"), "seed"))?,
    };
    let node = match q.get("node").map(|s| s.trim()) {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => node.to_string(),
    };
    Ok(TraceArgs {
        source: Source { cluster: Vec::new(), demo: false },
        node,
        backend,
        program: None,
        from,
        to,
        protocol,
        output: Output::Json,
        seed,
    })
}

// ---------------------------------------------------------------------------------------------
// Metrics and health

async fn metrics(State(app): State<App>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], app.status.metrics()).into_response()
}

async fn healthz(State(app): State<App>) -> Response {
    let (healthy, body) = app.status.healthz();
    let code = if healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The process is up and serving (kube-proxy's `/livez` is its health too; liveness here only
/// says the server answers, so a node whose syncs fail is not restarted in a loop).
async fn livez() -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], "ok\n").into_response()
}

// ---------------------------------------------------------------------------------------------
// The dashboard's files

/// The dashboard folder and the Content-Security-Policy that lets its page run.
struct Ui {
    dir: Option<PathBuf>,
    csp: HeaderValue,
    /// The files' gzip forms, made in the background (the wasm is a third of its size gzipped).
    gzipped: GzipCache,
}

const NOT_BUILT: &str = "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Switchyard</title></head>\n<body><h1>Switchyard</h1>\n<p>The dashboard is not built. Build it with <code>cargo xtask demo</code> (or <code>trunk build</code> at the\nworkspace root), or point <code>--ui-dir</code> at Trunk's <code>dist/</code> folder.</p>\n<p>The API answers meanwhile: <a href=\"/api/v1/snapshot\">/api/v1/snapshot</a>, <code>/api/v1/events</code> (WebSocket),\n<a href=\"/metrics\">/metrics</a>, <a href=\"/healthz\">/healthz</a>.</p>\n</body></html>\n";

impl Ui {
    fn load(dir: Option<&Path>) -> Ui {
        let dir = dir.filter(|d| d.join("index.html").is_file()).map(Path::to_path_buf);
        let inline = dir.as_ref().and_then(|d| std::fs::read_to_string(d.join("index.html")).ok()).unwrap_or_default();
        let csp = csp(&inline_script_hashes(&inline));
        let csp = HeaderValue::from_str(&csp).unwrap_or_else(|_| HeaderValue::from_static("default-src 'self'"));
        let gzipped = GzipCache::default();
        // Start on the files now, so the first browser already gets them gzipped.
        for entry in dir.iter().flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten()) {
            if compressible(&entry.path()) {
                gzipped.get(&entry.path());
            }
        }
        Ui { dir, csp, gzipped }
    }
}

/// Gzip forms of the dashboard's files, each made once per version of its file on a thread of
/// its own, so that no response ever waits for compression: until a file's gzip form is ready,
/// the file is served as it is.
#[derive(Default, Clone)]
struct GzipCache {
    files: Arc<std::sync::Mutex<HashMap<PathBuf, Gzipped>>>,
}

/// One file's gzip form (`None` while it is being made), and the version of the file it is for.
#[derive(Clone)]
struct Gzipped {
    version: (u64, Option<std::time::SystemTime>),
    body: Option<axum::body::Bytes>,
}

impl GzipCache {
    /// `path`'s gzip form if it is ready for the file as it is now; else starts making it.
    fn get(&self, path: &Path) -> Option<axum::body::Bytes> {
        let meta = std::fs::metadata(path).ok()?;
        let version = (meta.len(), meta.modified().ok());
        let mut files = self.files.lock().ok()?;
        match files.get(path) {
            Some(g) if g.version == version => return g.body.clone(),
            _ => {}
        }
        files.insert(path.to_path_buf(), Gzipped { version, body: None });
        let (cache, path) = (self.clone(), path.to_path_buf());
        std::thread::spawn(move || {
            let body = std::fs::read(&path).ok().and_then(|bytes| gzip(&bytes));
            if let Ok(mut files) = cache.files.lock()
                && let Some(g) = files.get_mut(&path).filter(|g| g.version == version)
            {
                g.body = body;
            }
        });
        None
    }
}

fn gzip(bytes: &[u8]) -> Option<axum::body::Bytes> {
    use std::io::Write;
    let mut z = flate2::write::GzEncoder::new(Vec::with_capacity(bytes.len() / 3), flate2::Compression::best());
    z.write_all(bytes).ok()?;
    z.finish().ok().map(Into::into)
}

/// Whether `Accept-Encoding` allows gzip (`gzip` or `*`, and not with `q=0`).
fn accepts_gzip(headers: &HeaderMap) -> bool {
    let Some(v) = headers.get(header::ACCEPT_ENCODING).and_then(|v| v.to_str().ok()) else { return false };
    v.split(',').any(|item| {
        let mut parts = item.split(';').map(str::trim);
        let coding = parts.next().unwrap_or("");
        let refused = parts.any(|p| p.strip_prefix("q=").is_some_and(|q| q.parse::<f32>().is_ok_and(|q| q <= 0.0)));
        (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !refused
    })
}

/// Text and wasm shrink; images are compressed already.
fn compressible(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("wasm" | "js" | "mjs" | "css" | "html" | "json" | "svg" | "map" | "txt")
    )
}

/// `default-src 'self'; script-src 'self' 'wasm-unsafe-eval'` plus the hashes of the inline
/// scripts of the page (Trunk's loader is one), so no other inline script runs.
fn csp(script_hashes: &[String]) -> String {
    let hashes: String = script_hashes.iter().map(|h| format!(" '{h}'")).collect();
    format!(
        "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'{hashes}; style-src 'self' 'unsafe-inline'; \
         connect-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    )
}

/// `sha256-...` of each inline `<script>` body of a page.
fn inline_script_hashes(html: &str) -> Vec<String> {
    use base64::Engine as _;
    use sha2::Digest as _;
    let mut out = Vec::new();
    let mut rest = html;
    while let Some(start) = rest.find("<script") {
        let after = &rest[start..];
        let Some(open_end) = after.find('>') else { break };
        let tag = &after[..open_end];
        let body_start = &after[open_end + 1..];
        let Some(close) = body_start.find("</script>") else { break };
        if !tag.contains("src=") {
            let digest = sha2::Sha256::digest(&body_start.as_bytes()[..close]);
            out.push(format!("sha256-{}", base64::engine::general_purpose::STANDARD.encode(digest)));
        }
        rest = &body_start[close..];
    }
    out
}

async fn static_file(State(app): State<App>, uri: Uri, headers: HeaderMap) -> Response {
    let Some(dir) = &app.ui.dir else {
        return ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], NOT_BUILT).into_response();
    };
    let path = uri.path().trim_start_matches('/');
    let path = if path.is_empty() { "index.html" } else { path };
    let rel = Path::new(path);
    // Only plain names below the folder: no `..`, no absolute paths, no hidden files, no escapes.
    let plain = !path.contains(['%', '\\'])
        && rel.components().all(|c| matches!(c, Component::Normal(s) if !s.to_string_lossy().starts_with('.')));
    if !plain {
        return error(StatusCode::NOT_FOUND, "no such file", None);
    }
    let cache = if path == "index.html" { "no-cache" } else { "public, max-age=300" };
    let file = dir.join(rel);
    if compressible(rel)
        && accepts_gzip(&headers)
        && file.is_file()
        && let Some(body) = app.ui.gzipped.get(&file)
    {
        let h = [
            (header::CONTENT_TYPE, content_type(rel)),
            (header::CACHE_CONTROL, cache),
            (header::CONTENT_ENCODING, "gzip"),
            (header::VARY, "accept-encoding"),
        ];
        return (h, Body::from(body)).into_response();
    }
    match tokio::fs::read(&file).await {
        Ok(bytes) => {
            let h = [
                (header::CONTENT_TYPE, content_type(rel)),
                (header::CACHE_CONTROL, cache),
                (header::VARY, "accept-encoding"),
            ];
            (h, Body::from(bytes)).into_response()
        }
        Err(_) => error(StatusCode::NOT_FOUND, "no such file", None),
    }
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "wasm" => "application/wasm",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// The dashboard folder to serve: `--ui-dir`, else `dist/` in the current directory, beside the
/// binary's workspace (`target/{debug,release}/../../dist`), or in the source workspace.
pub fn default_ui_dir() -> Option<PathBuf> {
    let mut candidates = vec![PathBuf::from("dist")];
    if let Ok(exe) = std::env::current_exe()
        && let Some(ws) = exe.parent().and_then(Path::parent).and_then(Path::parent)
    {
        candidates.push(ws.join("dist"));
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("dist"));
    candidates.into_iter().find(|d| d.join("index.html").is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_encoding_is_read_as_http_says() {
        let accepts = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(v).expect("header"));
            accepts_gzip(&h)
        };
        assert!(accepts("gzip, deflate, br, zstd"));
        assert!(accepts("br;q=1.0, GZIP;q=0.5"));
        assert!(accepts("*"));
        assert!(!accepts("br, zstd"));
        assert!(!accepts("gzip;q=0"));
        assert!(!accepts("identity"));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(header::HeaderName::from_bytes(k.as_bytes()).expect("name"), HeaderValue::from_str(v).expect("v"));
        }
        h
    }

    /// Each way of carrying the token is accepted; a wrong or missing one is not.
    #[test]
    fn token_carriers() {
        let uri: Uri = "/api/v1/snapshot".parse().expect("uri");
        let ok = |h: &[(&str, &str)], u: &Uri| Auth::check("s3cret", &headers(h), u).is_none();
        assert!(ok(&[("authorization", "Bearer s3cret")], &uri));
        assert!(ok(&[], &"/?token=s3cret".parse().expect("uri")));
        assert!(ok(&[("cookie", "a=b; switchyard_token=s3cret")], &uri));
        assert!(ok(&[("sec-websocket-protocol", "switchyard.v1, bearer.s3cret")], &uri));
        assert!(!ok(&[("authorization", "Bearer s3cre")], &uri));
        assert!(!ok(&[("authorization", "Bearer s3cret2")], &uri));
        assert!(!ok(&[], &uri));
        assert_eq!(
            Auth::check("s3cret", &headers(&[]), &uri),
            Some("a bearer token is required (Authorization: Bearer ...)")
        );
    }

    /// Browsers' upgrades must come from this server's own origin; other clients send none.
    #[test]
    fn origins() {
        assert!(origin_allowed(&headers(&[("host", "127.0.0.1:10260")])).is_ok());
        assert!(origin_allowed(&headers(&[("host", "127.0.0.1:10260"), ("origin", "http://127.0.0.1:10260")])).is_ok());
        assert!(origin_allowed(&headers(&[("host", "node:10260"), ("origin", "https://NODE:10260")])).is_ok());
        assert!(origin_allowed(&headers(&[("host", "127.0.0.1:10260"), ("origin", "http://evil.example")])).is_err());
        assert!(origin_allowed(&headers(&[("host", "127.0.0.1:10260"), ("origin", "null")])).is_err());
        assert!(
            origin_allowed(&headers(&[("host", "127.0.0.1:10260"), ("origin", "http://127.0.0.1:10261")])).is_err()
        );
    }

    /// The query is read as `switchyard trace` reads its arguments, and errors name the parameter.
    #[test]
    fn trace_parameters() {
        let q = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let a = trace_args(&q(&[("from", "10.0.0.1"), ("to", "nginx-svc.default:80"), ("protocol", "UDP")]), "n1")
            .expect("parses");
        assert_eq!((a.node.as_str(), a.protocol, a.backend), ("n1", ProtocolArg::Udp, BackendArg::Nftables));
        assert_eq!(a.to, Destination::Name { name: "nginx-svc.default".into(), port: 80 });
        let err = |pairs: &[(&str, &str)]| trace_args(&q(pairs), "n1").err().map(|(_, p)| p);
        assert_eq!(err(&[("to", "10.96.0.10:80")]), Some("from"));
        assert_eq!(err(&[("from", "10.0.0.300"), ("to", "10.96.0.10:80")]), Some("from"));
        assert_eq!(err(&[("from", "10.0.0.1"), ("to", "10.96.0.10:99999")]), Some("to"));
        assert_eq!(err(&[("from", "10.0.0.1"), ("to", "10.96.0.10:80"), ("protocol", "icmp")]), Some("protocol"));
        assert_eq!(err(&[("from", "10.0.0.1"), ("to", "10.96.0.10:80"), ("backend", "bpf")]), Some("backend"));
        assert_eq!(err(&[("from", "10.0.0.1"), ("to", "10.96.0.10:80"), ("color", "red")]), Some("query"));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%3Ab+c"), "a:b c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(
            form_pairs("since=5&token=x%2Fy"),
            vec![("since".into(), "5".into()), ("token".into(), "x/y".into())]
        );
    }

    /// Inline scripts are allowed by hash only; the policy keeps everything else same-origin.
    #[test]
    fn csp_allows_the_pages_inline_loader_only() {
        let page = "<script type=\"module\">import init from '/a.js';init();</script><script src=\"/b.js\"></script>";
        let hashes = inline_script_hashes(page);
        assert_eq!(hashes.len(), 1);
        let p = csp(&hashes);
        assert!(p.contains("script-src 'self' 'wasm-unsafe-eval' 'sha256-") && p.contains("connect-src 'self'"), "{p}");
        assert!(!p.contains("unsafe-inline'; connect") || p.contains("style-src 'self' 'unsafe-inline'"));
    }

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }
}
