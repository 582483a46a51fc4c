//! The agent's HTTP and WebSocket-upgrade request handling, through the real router with a token
//! set: whatever the method, path, query and headers, the server answers (no panic), never
//! serves data without the token, never accepts a write, and always sends its security headers.
//!
//! Input: the first byte picks the method; then `PATH?QUERY` up to a newline; then header lines
//! `Name: value`.
#![no_main]

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use libfuzzer_sys::fuzz_target;
use switchyard_agent::server::{self, ServerConfig, Status};
use switchyard_agent::stream::{Hub, HubConfig};
use switchyard_engine::demo::scenario::Scenario;
use tower::ServiceExt as _;

const TOKEN: &str = "fuzz-secret-token";

struct Quiet;
impl Status for Quiet {
    fn metrics(&self) -> String {
        String::new()
    }
    fn healthz(&self) -> (bool, String) {
        (true, "{}".into())
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime"))
}

fn router() -> &'static axum::Router {
    static R: OnceLock<axum::Router> = OnceLock::new();
    R.get_or_init(|| {
        let _guard = runtime().enter();
        let hub = Hub::start(Scenario::source(), switchyard_engine::demo::cluster(), HubConfig::default());
        let config = ServerConfig { token: Some(TOKEN.into()), ui_dir: None };
        server::router(hub, Arc::new(Quiet), "node-1", config)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&m, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let method = [Method::GET, Method::HEAD, Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS][m as usize % 6]
        .clone();
    let mut lines = text.split('\n');
    let target = lines.next().unwrap_or("/");
    let mut req = Request::builder().method(method.clone()).uri(target);
    let mut has_token = target.contains(TOKEN);
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            has_token |= v.contains(TOKEN);
            req = req.header(k.trim(), v.trim());
        }
    }
    let Ok(req) = req.body(Body::empty()) else { return };
    let resp = runtime().block_on(router().clone().oneshot(req)).expect("the router is infallible");
    let status = resp.status();
    assert!(resp.headers().contains_key(header::CONTENT_SECURITY_POLICY), "no CSP on {status}");
    assert!(resp.headers().contains_key(header::X_CONTENT_TYPE_OPTIONS));
    if !has_token {
        assert_eq!(status, StatusCode::UNAUTHORIZED, "served without the token");
    }
    if method != Method::GET && method != Method::HEAD {
        assert!(!status.is_success(), "{method} succeeded: the API must be read-only");
    }
});
