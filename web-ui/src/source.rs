//! The two data sources, as the browser runs them: the engine's demo scenario driven by the page's
//! clock, and the agent's WebSocket. Both hand [`ServerMessage`]s / [`Sequenced`] events to the
//! app, which feeds them to the reducer; neither knows anything about rendering.

use wasm_bindgen::JsCast;
use wasm_bindgen::closure::Closure;
use web_sys::{CloseEvent, MessageEvent, WebSocket};
use yew::Callback;

use switchyard_engine::cluster::Cluster;
use switchyard_engine::demo::scenario::Scenario;
use switchyard_engine::protocol::{Journal, Sequenced, ServerMessage, SourceInfo};

/// Milliseconds since the page started (`performance.now()`).
pub fn now_ms() -> f64 {
    web_sys::window().and_then(|w| w.performance()).map(|p| p.now()).unwrap_or(0.0)
}

/// The demo scenario running in the page. Simulated time follows the page's clock, but a frame
/// advances it by at most [`MAX_STEP_MS`]: after a hidden tab or a long stall the scenario slows
/// down instead of tracing minutes of traffic in one frame.
pub struct Demo {
    scenario: Scenario,
    journal: Journal,
    sim_ms: f64,
    last_wall: f64,
}

pub const MAX_STEP_MS: f64 = 250.0;

impl Demo {
    pub fn new(seed: u64) -> Demo {
        Demo { scenario: Scenario::new(seed), journal: Journal::new(1_024), sim_ms: 0.0, last_wall: now_ms() }
    }

    pub fn source() -> SourceInfo {
        Scenario::source()
    }

    pub fn cluster(&self) -> Cluster {
        self.scenario.cluster().clone()
    }

    /// Everything the scenario did since the last poll, numbered like a server would.
    pub fn poll(&mut self) -> Vec<Sequenced> {
        let now = now_ms();
        self.sim_ms += (now - self.last_wall).clamp(0.0, MAX_STEP_MS);
        self.last_wall = now;
        self.scenario
            .advance(self.sim_ms as u64, &mut now_ms)
            .into_iter()
            .map(|(t, e)| self.journal.push(t, e).clone())
            .collect()
    }
}

/// What the socket reports to the app.
pub enum LinkEvent {
    Open,
    Message(Box<ServerMessage>),
    /// A message that is not of this protocol version.
    Garbled(String),
    Closed(String),
}

/// One WebSocket connection to `/api/v1/events` on the page's origin. Dropping it closes it.
pub struct Link {
    socket: WebSocket,
    _on_open: Closure<dyn FnMut()>,
    _on_message: Closure<dyn FnMut(MessageEvent)>,
    _on_close: Closure<dyn FnMut(CloseEvent)>,
}

/// `ws://host/api/v1/events?since=N` for the page at `protocol//host`.
pub fn events_url(protocol: &str, host: &str, since: Option<u64>) -> String {
    let scheme = if protocol == "https:" { "wss" } else { "ws" };
    match since {
        Some(s) => format!("{scheme}://{host}/api/v1/events?since={s}"),
        None => format!("{scheme}://{host}/api/v1/events"),
    }
}

impl Link {
    pub fn connect(since: Option<u64>, report: Callback<LinkEvent>) -> Result<Link, String> {
        let location = gloo::utils::window().location();
        let protocol = location.protocol().unwrap_or_default();
        let host = location.host().unwrap_or_default();
        let socket = WebSocket::new(&events_url(&protocol, &host, since)).map_err(|e| format!("{e:?}"))?;
        let r = report.clone();
        let on_open = Closure::<dyn FnMut()>::new(move || r.emit(LinkEvent::Open));
        let r = report.clone();
        let on_message = Closure::<dyn FnMut(MessageEvent)>::new(move |e: MessageEvent| {
            let Some(text) = e.data().as_string() else { return };
            match ServerMessage::from_json(&text) {
                Ok(m) => r.emit(LinkEvent::Message(Box::new(m))),
                Err(err) => r.emit(LinkEvent::Garbled(err.to_string())),
            }
        });
        let r = report;
        let on_close = Closure::<dyn FnMut(CloseEvent)>::new(move |e: CloseEvent| {
            let reason = if e.reason().is_empty() { format!("closed (code {})", e.code()) } else { e.reason() };
            r.emit(LinkEvent::Closed(reason))
        });
        socket.set_onopen(Some(on_open.as_ref().unchecked_ref()));
        socket.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
        socket.set_onclose(Some(on_close.as_ref().unchecked_ref()));
        Ok(Link { socket, _on_open: on_open, _on_message: on_message, _on_close: on_close })
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.socket.set_onopen(None);
        self.socket.set_onmessage(None);
        self.socket.set_onclose(None);
        let _ = self.socket.close();
    }
}
