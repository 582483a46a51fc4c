//! The Kubernetes input parser on arbitrary text, read as a `.yaml` file: never panics, and
//! either parses or names a problem.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(problems) = switchyard_engine::input::parse("fuzz.yaml", text) {
            assert!(!problems.is_empty());
        }
    }
});
