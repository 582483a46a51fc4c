//! The dashboard's entry point: Trunk builds this binary for wasm32 and loads it from `index.html`.

#[cfg(target_arch = "wasm32")]
fn main() {
    switchyard_web::start();
}

#[cfg(not(target_arch = "wasm32"))]
fn main() {
    eprintln!("switchyard-web runs in a browser: build it with `trunk build --release` (see README)");
}
