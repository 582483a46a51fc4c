//! The event stream and the server, end to end over loopback: `switchyard demo`'s stream (a
//! snapshot, then sequenced deltas with no gap), resuming with `?since=`, a client too far
//! behind, a slow client next to a fast one, the token, the Origin check, read-only methods and
//! security headers, `/api/v1/trace` against `switchyard trace --output json`, and the agent's
//! healthCheckNodePort servers following a manifests folder.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::{SinkExt, StreamExt};
use switchyard_agent::agent::{self, AgentConfig, AgentSource, BackendChoice, ServeOptions};
use switchyard_agent::demo::{self, DemoConfig};
use switchyard_agent::healthcheck::Bind;
use switchyard_agent::server::{self, ServerConfig, Status};
use switchyard_agent::stream::{Hub, HubConfig};
use switchyard_agent::sync::Backoff;
use switchyard_engine::protocol::{Event, Health, Mode, Sequenced, ServerMessage, SourceInfo, StreamState};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn localhost() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// The demo, fast: 20 simulated seconds per real second.
fn fast_demo(hub: HubConfig, server: ServerConfig) -> agent::Running {
    let cfg = DemoConfig { tick: Duration::from_millis(20), speed: 20, hub, server, ..DemoConfig::default() };
    // On a thread of its own: the demo builds its own runtime, which async tests cannot do.
    std::thread::spawn(move || demo::spawn(cfg, localhost())).join().expect("spawns").expect("the demo starts")
}

/// One HTTP/1.1 request on loopback: status, lower-cased headers, body.
fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n{extra}\r\n")
        .expect("send");
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("read");
    let code = reply.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    (code, head.to_ascii_lowercase(), body.to_string())
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let (code, _, body) = http(addr, "GET", path, &[]);
    (code, body)
}

async fn connect(addr: SocketAddr, query: &str, headers: &[(&str, &str)]) -> Result<Ws, WsError> {
    let mut req = format!("ws://{addr}/api/v1/events{query}").into_client_request()?;
    for (k, v) in headers {
        let name = HeaderName::from_bytes(k.as_bytes()).expect("header name");
        req.headers_mut().insert(name, HeaderValue::from_str(v).expect("header value"));
    }
    tokio_tungstenite::connect_async(req).await.map(|(ws, _)| ws)
}

/// The next protocol message (pings and pongs skipped).
async fn next(ws: &mut Ws) -> Result<ServerMessage> {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(15), ws.next())
            .await
            .context("no message within 15 s")?
            .context("the stream ended")??;
        match m {
            Message::Text(t) => return ServerMessage::from_json(&t).map_err(Into::into),
            Message::Close(c) => bail!("closed: {c:?}"),
            _ => continue,
        }
    }
}

async fn next_event(ws: &mut Ws) -> Result<Sequenced> {
    match next(ws).await? {
        ServerMessage::Event(e) => Ok(e),
        ServerMessage::Snapshot(s) => bail!("a snapshot at {} where an event was expected", s.seq),
    }
}

/// The demo streams a snapshot, then deltas numbered from the snapshot's sequence number on,
/// with no gap; folding them gives the state a new snapshot holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_streams_a_snapshot_then_gapless_deltas() -> Result<()> {
    let demo = fast_demo(HubConfig::default(), ServerConfig::default());
    let mut ws = connect(demo.addr, "", &[]).await?;
    let ServerMessage::Snapshot(snap) = next(&mut ws).await? else { bail!("the first message is not a snapshot") };
    assert_eq!(snap.source.mode, Mode::Demo);
    assert!(!snap.objects.is_empty(), "the demo cluster is in the snapshot");
    let mut state = StreamState::from_snapshot(snap.clone());
    let mut kinds = BTreeMap::new();
    let mut expected = snap.seq + 1;
    // 20 s of simulated time: the scale-up (6 s) and the pod going terminating (14 s) happen.
    while state.time_ms < 20_000 {
        let e = next_event(&mut ws).await?;
        assert_eq!(e.seq, expected, "a gap or a duplicate");
        expected += 1;
        let kind = match &e.event {
            Event::Watch(_) => "watch",
            Event::Sync(_) => "sync",
            Event::Flow(_) => "flow",
            Event::Node(_) => "node",
            Event::Health(_) => "health",
        };
        *kinds.entry(kind).or_insert(0) += 1;
        state.apply(&e);
    }
    for k in ["watch", "sync", "flow"] {
        assert!(kinds.contains_key(k), "no {k} event in 20 simulated seconds: {kinds:?}");
    }
    // A new client's snapshot agrees with what this one folded (at the same sequence number).
    let (code, body) = get(demo.addr, "/api/v1/snapshot");
    assert_eq!(code, 200, "{body}");
    let ServerMessage::Snapshot(now) = ServerMessage::from_json(&body)? else { bail!("not a snapshot") };
    assert!(now.seq >= state.seq);
    while state.seq < now.seq {
        state.apply(&next_event(&mut ws).await?);
    }
    assert_eq!(StreamState::from_snapshot(now).cluster, state.cluster);
    demo.stop()?;
    Ok(())
}

/// A client that reconnects with the last sequence number it saw gets exactly the events it
/// missed (the same ones a client that stayed got), then the live ones; one that fell further
/// behind than the journal, or names a number from another run, gets a fresh snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_resumes_or_gets_a_snapshot() -> Result<()> {
    let demo = fast_demo(HubConfig { journal: 200, ..HubConfig::default() }, ServerConfig::default());
    let mut stayed = connect(demo.addr, "?since=0", &[]).await?;
    let mut reference: Vec<Sequenced> = Vec::new();

    let mut leaver = connect(demo.addr, "", &[]).await?;
    let ServerMessage::Snapshot(s) = next(&mut leaver).await? else { bail!("not a snapshot") };
    let mut last = s.seq;
    for _ in 0..5 {
        last = next_event(&mut leaver).await?.seq;
    }
    leaver.close(None).await?;
    // Away while at least 20 more events happen.
    while reference.last().map_or(0, |e| e.seq) < last + 20 {
        reference.push(next_event(&mut stayed).await?);
    }
    let mut back = connect(demo.addr, &format!("?since={last}"), &[]).await?;
    let mut resumed = Vec::new();
    while resumed.len() < 30 {
        resumed.push(next_event(&mut back).await?);
    }
    while reference.last().map_or(0, |e| e.seq) < resumed[29].seq {
        reference.push(next_event(&mut stayed).await?);
    }
    assert_eq!(resumed[0].seq, last + 1, "the first event after the one it saw");
    let want: Vec<&Sequenced> = reference.iter().filter(|e| e.seq > last).take(30).collect();
    assert_eq!(resumed.iter().collect::<Vec<_>>(), want, "not exactly the events the staying client got");

    // Too far behind for a journal of 200 events.
    while reference.last().map_or(0, |e| e.seq) < last + 300 {
        reference.push(next_event(&mut stayed).await?);
    }
    let mut late = connect(demo.addr, &format!("?since={last}"), &[]).await?;
    let ServerMessage::Snapshot(s) = next(&mut late).await? else { bail!("a late client must get a snapshot") };
    assert!(s.seq > last + 200);
    let e = next_event(&mut late).await?;
    assert_eq!(e.seq, s.seq + 1, "deltas continue right after the snapshot");
    let mut other_run = connect(demo.addr, "?since=999999999", &[]).await?;
    assert!(matches!(next(&mut other_run).await?, ServerMessage::Snapshot(_)));
    assert!(connect(demo.addr, "?since=abc", &[]).await.is_err(), "a bad since is a 400");
    demo.stop()?;
    Ok(())
}

struct Quiet;

impl Status for Quiet {
    fn metrics(&self) -> String {
        String::new()
    }
    fn healthz(&self) -> (bool, String) {
        (true, "{}".into())
    }
}

/// A client that never reads does not stop a fast client from receiving every event in order,
/// nor the publisher from publishing: the slow one's queue overflows and only it is affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_does_not_slow_a_fast_one() -> Result<()> {
    let source = SourceInfo { mode: Mode::Live, node: "n1".into(), backend: "none".into(), version: "t".into() };
    let hub =
        Hub::start(source, Default::default(), HubConfig { journal: 50_000, client_queue: 64, ..HubConfig::default() });
    let router = server::router(hub.clone(), Arc::new(Quiet), "n1", ServerConfig::default());
    let listener = tokio::net::TcpListener::bind(localhost()).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, router).await });

    let mut slow = connect(addr, "?since=0", &[]).await?;
    let mut fast = connect(addr, "?since=0", &[]).await?;
    // 20,000 events of ~1 KB: 20 MB, far more than the slow client's socket buffers hold.
    const N: u64 = 20_000;
    let pad = "x".repeat(1000);
    let publisher = {
        let hub = hub.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            for n in 1..=N {
                hub.publish(Event::Health(Health { healthy: true, message: format!("{n} {pad}") }));
            }
            t.elapsed()
        })
    };
    let mut expected = 1;
    while expected <= N {
        match next(&mut fast).await? {
            ServerMessage::Event(e) => {
                assert_eq!(e.seq, expected, "the fast client lost or repeated an event");
                expected += 1;
            }
            ServerMessage::Snapshot(s) => bail!("the fast client was resynchronised at {}", s.seq),
        }
    }
    let took = publisher.join().expect("publisher");
    assert!(took < Duration::from_secs(10), "publishing {N} events took {took:?}");
    // The slow client still holds its connection; what it reads now starts in order.
    slow.send(Message::Ping(Default::default())).await?;
    let first = next_event(&mut slow).await?;
    assert_eq!(first.seq, 1);
    Ok(())
}

/// Off loopback the CLI refuses to start without a token; with one, every request needs it
/// (header, query, cookie or WebSocket subprotocol), the WebSocket included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_required_off_loopback_and_checked() -> Result<()> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["demo", "--listen", "0.0.0.0:0"])
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--token-file"), "{out:?}");
    let dir = std::env::temp_dir().join(format!("sy-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let empty = dir.join("empty");
    std::fs::write(&empty, "\n")?;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["demo", "--listen", "0.0.0.0:0", "--token-file"])
        .arg(&empty)
        .output()?;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    std::fs::remove_dir_all(&dir)?;

    let demo = fast_demo(HubConfig::default(), ServerConfig { token: Some("t0k3n".into()), ui_dir: None });
    let a = demo.addr;
    for path in ["/api/v1/snapshot", "/metrics", "/healthz", "/", "/api/v1/trace?from=10.0.0.1&to=10.96.0.10:80"] {
        assert_eq!(http(a, "GET", path, &[]).0, 401, "{path} without a token");
        assert_eq!(http(a, "GET", path, &[("Authorization", "Bearer wrong")]).0, 401, "{path} with a wrong token");
    }
    assert_eq!(http(a, "GET", "/api/v1/snapshot", &[("Authorization", "Bearer t0k3n")]).0, 200);
    let (code, head, _) = http(a, "GET", "/?token=t0k3n", &[]);
    assert_eq!(code, 200);
    assert!(head.contains("set-cookie: switchyard_token=t0k3n; path=/; httponly; samesite=strict"), "{head}");
    assert_eq!(http(a, "GET", "/metrics", &[("Cookie", "switchyard_token=t0k3n")]).0, 200);

    match connect(a, "", &[]).await {
        Err(WsError::Http(r)) => assert_eq!(r.status(), 401),
        other => bail!("a WebSocket without a token: {:?}", other.map(|_| ())),
    }
    let mut ws = connect(a, "", &[("Authorization", "Bearer t0k3n")]).await?;
    assert!(matches!(next(&mut ws).await?, ServerMessage::Snapshot(_)));
    let mut ws = connect(a, "?token=t0k3n", &[]).await?;
    assert!(matches!(next(&mut ws).await?, ServerMessage::Snapshot(_)));
    let mut ws = connect(a, "", &[("Sec-WebSocket-Protocol", "switchyard.v1, bearer.t0k3n")]).await?;
    assert!(matches!(next(&mut ws).await?, ServerMessage::Snapshot(_)));
    demo.stop()?;
    Ok(())
}

/// Browsers' WebSockets from another origin are refused; the same origin and clients without
/// one are served. Only GET and HEAD are answered, every response carries the security headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_methods_and_headers() -> Result<()> {
    let demo = fast_demo(HubConfig::default(), ServerConfig::default());
    let a = demo.addr;
    match connect(a, "", &[("Origin", "http://evil.example")]).await {
        Err(WsError::Http(r)) => assert_eq!(r.status(), 403),
        other => bail!("a cross-origin WebSocket: {:?}", other.map(|_| ())),
    }
    let mut ws = connect(a, "", &[("Origin", &format!("http://{a}"))]).await?;
    assert!(matches!(next(&mut ws).await?, ServerMessage::Snapshot(_)));

    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        let (code, head, body) = http(a, method, "/api/v1/snapshot", &[]);
        assert_eq!(code, 405, "{method}: {body}");
        assert!(head.contains("allow: get, head"), "{head}");
    }
    let (code, head, _) = http(a, "GET", "/api/v1/snapshot", &[]);
    assert_eq!(code, 200);
    for h in [
        "content-security-policy: default-src 'self'; script-src 'self' 'wasm-unsafe-eval'",
        "connect-src 'self'",
        "x-content-type-options: nosniff",
        "referrer-policy: no-referrer",
        "x-frame-options: deny",
    ] {
        assert!(head.contains(h), "missing {h:?} in\n{head}");
    }
    // Without a dashboard folder, the page says how to build it; paths cannot leave the folder.
    let (code, body) = get(a, "/");
    assert_eq!(code, 200);
    assert!(body.contains("cargo xtask demo"), "{body}");
    demo.stop()?;
    Ok(())
}

/// Without a token only loopback names are answered: a page on a rebound domain (its name now
/// resolving to 127.0.0.1) is same-origin with itself, so only the Host check stops it.
#[test]
fn dns_rebinding_is_refused() {
    let demo = fast_demo(HubConfig::default(), ServerConfig::default());
    let a = demo.addr;
    let raw = |host: &str, extra: &str| -> u16 {
        let mut s = TcpStream::connect(a).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        write!(s, "GET /api/v1/snapshot HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra}\r\n").expect("send");
        let mut reply = String::new();
        s.read_to_string(&mut reply).expect("read");
        reply.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
    };
    let port = a.port();
    for host in [format!("evil.example:{port}"), "evil.example".into(), format!("10.0.0.1:{port}")] {
        assert_eq!(raw(&host, ""), 403, "Host {host}");
        assert_eq!(raw(&host, &format!("Origin: http://{host}\r\n")), 403, "Host {host} with its own Origin");
    }
    for host in [format!("127.0.0.1:{port}"), format!("localhost:{port}"), format!("[::1]:{port}"), "127.1.2.3".into()]
    {
        assert_eq!(raw(&host, ""), 200, "Host {host}");
    }
    demo.stop().expect("stops");
}

/// The dashboard folder is served, and nothing outside it.
#[test]
fn the_dashboard_folder_is_served_and_nothing_else() {
    let dir = std::env::temp_dir().join(format!("sy-ui-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("index.html"), "<script type=\"module\">boot()</script>").expect("write");
    std::fs::write(dir.join("app.wasm"), b"\0asm").expect("write");
    std::fs::write(dir.join(".secret"), "no").expect("write");
    let demo = fast_demo(HubConfig::default(), ServerConfig { token: None, ui_dir: Some(dir.clone()) });
    let (code, head, body) = http(demo.addr, "GET", "/", &[]);
    assert_eq!((code, body.as_str()), (200, "<script type=\"module\">boot()</script>"));
    assert!(head.contains("'sha256-"), "the inline loader is allowed by hash: {head}");
    let (code, head, _) = http(demo.addr, "GET", "/app.wasm", &[]);
    assert_eq!(code, 200);
    assert!(head.contains("content-type: application/wasm"), "{head}");
    for path in ["/.secret", "/../Cargo.toml", "/%2e%2e/Cargo.toml", "/missing.js"] {
        assert_eq!(get(demo.addr, path).0, 404, "{path}");
    }
    demo.stop().expect("stops");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A browser that accepts gzip gets the dashboard's files gzipped (the wasm is a third of its size
/// so), made again when a file changes; one that does not gets them as they are.
#[test]
fn the_dashboard_is_served_gzipped_to_browsers_that_accept_it() {
    use std::io::Read as _;
    let dir = std::env::temp_dir().join(format!("sy-ui-gz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("index.html"), "<p>hi</p>").expect("write");
    let js = "console.log('switchyard');\n".repeat(10_000);
    std::fs::write(dir.join("app.js"), &js).expect("write");
    let demo = fast_demo(HubConfig::default(), ServerConfig { token: None, ui_dir: Some(dir.clone()) });
    let fetch = |accept: &str| {
        let mut s = TcpStream::connect(demo.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let addr = demo.addr;
        write!(s, "GET /app.js HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{accept}\r\n").expect("send");
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).expect("read");
        let at = reply.windows(4).position(|w| w == b"\r\n\r\n").expect("head");
        (String::from_utf8_lossy(&reply[..at]).to_ascii_lowercase(), reply[at + 4..].to_vec())
    };
    let gunzip = |body: &[u8]| {
        let mut out = String::new();
        flate2::read::GzDecoder::new(body).read_to_string(&mut out).expect("gzip");
        out
    };
    // The gzip form is made in the background, so an early request may get the file as it is.
    let gzipped = |want: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (head, body) = fetch("Accept-Encoding: gzip, deflate, br\r\n");
            if head.contains("content-encoding: gzip") {
                assert!(head.contains("vary: accept-encoding"), "{head}");
                assert!(body.len() < want.len() / 20, "{} bytes gzipped of {}", body.len(), want.len());
                assert_eq!(gunzip(&body), want);
                return;
            }
            assert_eq!(body, want.as_bytes(), "served as it is meanwhile");
            assert!(Instant::now() < deadline, "never served gzipped");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    gzipped(&js);
    let (head, body) = fetch("");
    assert!(!head.contains("content-encoding"), "{head}");
    assert_eq!(body, js.as_bytes());
    // A rebuilt file is compressed again, never answered from the old gzip form.
    let js2 = format!("{js}// rebuilt\n");
    std::fs::write(dir.join("app.js"), &js2).expect("write");
    gzipped(&js2);
    demo.stop().expect("stops");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `/api/v1/trace` answers what `switchyard trace --output json` answers for the same cluster,
/// and bad parameters are 400s naming the parameter.
#[test]
fn trace_endpoint_agrees_with_the_cli() {
    // Real time: the scenario's first change is 6 s in, so the cluster is still the demo's own.
    let cfg = DemoConfig::default();
    let demo = demo::spawn(cfg, localhost()).expect("starts");
    let started = Instant::now();
    for (title, node, from, to, protocol) in switchyard_engine::demo::sample_packets() {
        let proto = protocol.to_string().to_ascii_lowercase();
        let (code, body) = get(demo.addr, &format!("/api/v1/trace?node={node}&from={from}&to={to}&protocol={proto}"));
        let cli = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["trace", "--demo", "--node", node, "--from", &from.to_string(), "--to", to])
            .args(["--protocol", &proto, "--output", "json"])
            .output()
            .expect("runs");
        if cli.status.code() == Some(2) {
            assert_eq!(code, 400, "{title}: the CLI refused it, the API answered {body}");
            continue;
        }
        assert_eq!(code, 200, "{title}: {body}");
        let api: serde_json::Value = serde_json::from_str(&body).expect("json");
        let want: serde_json::Value = serde_json::from_slice(&cli.stdout).expect("the CLI's json");
        assert_eq!(api, want, "{title}");
    }
    assert!(started.elapsed() < Duration::from_secs(6), "too slow to compare against the first cluster");
    for (query, parameter) in [
        ("from=10.0.0.1", "to"),
        ("to=10.96.0.10:80", "from"),
        ("from=nope&to=10.96.0.10:80", "from"),
        ("from=10.0.0.1&to=10.96.0.10:80&protocol=icmp", "protocol"),
        ("from=10.0.0.1&to=10.96.0.10:80&node=node-9", "node"),
        ("from=10.0.0.1&to=nope-svc.default:80", "to"),
        ("from=10.0.0.1&to=10.96.0.10:80&backend=ebpf", "backend"),
    ] {
        let (code, body) = get(demo.addr, &format!("/api/v1/trace?{query}"));
        assert_eq!(code, 400, "{query}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["parameter"], parameter, "{query}: {body}");
    }
    demo.stop().expect("stops");
}

// ---------------------------------------------------------------------------------------------
// The agent: health check node ports, and its stream

const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\nstatus:\n  addresses:\n  - type: InternalIP\n    address: 192.168.50.2\n";
const CONFIG: &str = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nclusterCIDR: 10.244.0.0/16\nminSyncPeriod: 50ms\n";

/// A LoadBalancer service with externalTrafficPolicy Local and its slice: `(address, node,
/// ready)` per endpoint.
fn lb(hc_port: u16, endpoints: &[(&str, &str, bool)]) -> String {
    let eps: String = endpoints
        .iter()
        .map(|(ip, node, ready)| {
            format!("- addresses: [\"{ip}\"]\n  conditions:\n    ready: {ready}\n  nodeName: {node}\n")
        })
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: shop\n  namespace: default\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.40\n  externalTrafficPolicy: Local\n  healthCheckNodePort: {hc_port}\n  ports:\n  - name: http\n    port: 80\n    targetPort: 8080\n    nodePort: 30400\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: shop-1\n  namespace: default\n  labels:\n    kubernetes.io/service-name: shop\naddressType: IPv4\nports:\n- name: http\n  port: 8080\nendpoints:\n{eps}"
    )
}

struct Folder(PathBuf);

impl Folder {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("sy-stream-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        Folder(p)
    }

    fn write(&self, name: &str, text: &str) {
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, self.0.join(name)).expect("rename");
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Folder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind(localhost()).and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(15), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What the health check port answers: status and `localEndpoints` (None: nothing listens, or
/// the server closed while answering).
fn health_check(port: u16) -> Option<(u16, u64)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).ok()?;
    let code = reply.split_whitespace().nth(1)?.parse().ok()?;
    let body = reply.split_once("\r\n\r\n")?.1;
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    assert_eq!(v["service"], serde_json::json!({"namespace": "default", "name": "shop"}), "{body}");
    assert_eq!(v["serviceProxyHealthy"], true, "{body}");
    Some((code, v["localEndpoints"].as_u64()?))
}

/// The healthCheckNodePort server follows the folder: 200 with the local ready endpoint count,
/// 503 with 0, a new port when the service's changes, none once the service is gone. The
/// agent's stream carries the folder's changes and its syncs meanwhile.
#[test]
fn health_check_node_port_follows_local_endpoints() {
    let folder = Folder::new("hc");
    folder.write("node.yaml", NODE);
    folder.write("config.yaml", CONFIG);
    let port = free_port();
    folder.write("shop.yaml", &lb(port, &[("10.244.0.5", "n1", true), ("10.244.1.5", "n2", true)]));
    let cfg = AgentConfig {
        node: "n1".into(),
        source: AgentSource::Manifests(folder.path().to_path_buf()),
        backend: BackendChoice::None,
        netns: None,
        backoff: Backoff::default(),
        flows: false,
    };
    let opts = ServeOptions { health_checks: Some(Bind::Addresses(vec![[127, 0, 0, 1].into()])), ..Default::default() };
    let running = agent::spawn_with(cfg, opts, localhost()).expect("starts");

    wait_for("200 with one local endpoint", || health_check(port) == Some((200, 1)));
    folder.write(
        "shop.yaml",
        &lb(port, &[("10.244.0.5", "n1", true), ("10.244.0.6", "n1", true), ("10.244.0.7", "n1", false)]),
    );
    wait_for("two local ready endpoints", || health_check(port) == Some((200, 2)));
    folder.write("shop.yaml", &lb(port, &[("10.244.1.5", "n2", true)]));
    wait_for("503 with none on this node", || health_check(port) == Some((503, 0)));
    let moved = free_port();
    folder.write("shop.yaml", &lb(moved, &[("10.244.0.5", "n1", true)]));
    wait_for("the new port", || health_check(moved) == Some((200, 1)));
    wait_for("the old port closed", || health_check(port).is_none());

    // The stream saw the folder's objects and the syncs.
    let (code, body) = get(running.addr, "/api/v1/snapshot");
    assert_eq!(code, 200);
    let ServerMessage::Snapshot(s) = ServerMessage::from_json(&body).expect("a snapshot") else { panic!("{body}") };
    assert_eq!((s.source.mode, s.source.node.as_str()), (Mode::Live, "n1"));
    let cluster = StreamState::from_snapshot(s.clone()).cluster;
    let shop = &cluster.services[&switchyard_engine::model::ObjectKey::new("default", "shop")];
    assert_eq!(shop.health_check_node_port, Some(moved));
    assert!(s.syncs.len() >= 2, "{} syncs", s.syncs.len());
    assert!(s.timeline.len() >= 4, "{} timeline entries", s.timeline.len());
    let (code, body) = get(running.addr, "/api/v1/trace?from=203.0.113.9&to=192.168.50.2:30400");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("10.244.0.5:8080"), "{body}");

    folder.write("shop.yaml", "");
    std::fs::remove_file(folder.path().join("shop.yaml")).expect("rm");
    wait_for("the port closed with the service gone", || health_check(moved).is_none());
    running.stop().expect("stops");
}
