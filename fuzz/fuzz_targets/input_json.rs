//! The Kubernetes input parser on arbitrary text, read as a `.json` file.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(problems) = switchyard_engine::input::parse("fuzz.json", text) {
            assert!(!problems.is_empty());
        }
    }
});
