//! The tracer's parser of iptables programs (what the renderer writes and the kernel lists back).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = switchyard_engine::trace::iptables::Program::parse(text);
    }
});
