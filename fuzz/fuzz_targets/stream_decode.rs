//! The event-stream decoder the dashboard runs on every message: never panics; what decodes
//! encodes back to something that decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_engine::protocol::ServerMessage;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(m) = ServerMessage::from_json(text) {
            let again = ServerMessage::from_json(&m.to_json()).expect("a message re-encodes");
            assert_eq!(again, m);
        }
    }
});
