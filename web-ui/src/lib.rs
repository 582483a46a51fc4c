//! Switchyard's dashboard (Yew, WebAssembly), built by Trunk from the root `index.html`.
//!
//! The dashboard itself is the work of a later issue (live sequence diagrams, the packet composer,
//! the offline demo). This crate holds its place in the workspace so the engine is already built
//! the way the browser will use it: `switchyard-engine` is its only dependency.
