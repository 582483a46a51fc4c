//! Switchyard's dashboard (Yew, WebAssembly), built by Trunk from the root `index.html`.
//!
//! Layout of the crate:
//! - [`state`]: the reducer (the engine's `StreamState` plus what the user looks at), plain Rust;
//! - [`layout`]: the sequence diagram as a scene and an animation timeline, plain Rust;
//! - [`program`]: a node's kernel program split into rules and the Service field behind each;
//! - `app`, `views`, `diagram`, `charts`, `source` (wasm32 only): the Yew components and the browser
//!   glue (WebSocket, the demo scenario on `performance.now()`, requestAnimationFrame), kept thin.
//!
//! The pure modules are tested natively (`cargo test -p switchyard-web`); the components in
//! headless Chromium (`cargo test -p switchyard-web --target wasm32-unknown-unknown --tests`).

pub mod compose;
pub mod layout;
pub mod program;
pub mod state;

#[cfg(target_arch = "wasm32")]
pub mod app;
#[cfg(target_arch = "wasm32")]
pub mod charts;
#[cfg(target_arch = "wasm32")]
pub mod composer;
#[cfg(target_arch = "wasm32")]
pub mod diagram;
#[cfg(target_arch = "wasm32")]
mod dom;
#[cfg(target_arch = "wasm32")]
pub mod loader;
#[cfg(target_arch = "wasm32")]
pub mod source;
#[cfg(target_arch = "wasm32")]
pub mod views;

/// Mounts the dashboard on the page's `<body>`, replacing the loading placeholder.
#[cfg(target_arch = "wasm32")]
pub fn start() {
    let document = gloo::utils::document();
    if let Some(boot) = document.get_element_by_id("boot") {
        boot.remove();
    }
    yew::Renderer::<app::App>::with_props(app::AppProps { boot: app::Boot::Auto, view: None }).render();
    // The first meaningful paint follows this mark: the benchmark reads it from the page.
    if let Some(p) = web_sys::window().and_then(|w| w.performance()) {
        let _ = p.mark("switchyard-mounted");
    }
}
