//! Replays the fuzzing corpus (`fuzz/corpus`) and every crash the fuzzers ever found
//! (`fuzz/regressions`) through the same entry points the fuzz targets call, on stable Rust, so a
//! crash once fixed stays fixed. `fuzz/run` is what grows the corpus.

use std::path::{Path, PathBuf};

use switchyard_engine::protocol::ServerMessage;
use switchyard_engine::{input, trace};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// Every file of `corpus/TARGET` and `regressions/TARGET`.
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for kind in ["corpus", "regressions"] {
        let dir = fuzz_dir().join(kind).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_file() {
                let bytes = std::fs::read(&p).unwrap_or_else(|err| panic!("{}: {err}", p.display()));
                out.push((p, bytes));
            }
        }
    }
    out
}

/// Runs `f` on every input of `target` as text; returns how many there were.
fn replay(target: &str, f: impl Fn(&str)) -> usize {
    let all = inputs(target);
    for (path, bytes) in &all {
        if let Ok(text) = std::str::from_utf8(bytes) {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(text)));
            assert!(r.is_ok(), "{target}: {} panics", path.display());
        }
    }
    all.len()
}

#[test]
fn input_parser_survives_its_corpus() {
    let yaml = replay("input_yaml", |t| {
        if let Err(p) = input::parse("fuzz.yaml", t) {
            assert!(!p.is_empty());
        }
    });
    let json = replay("input_json", |t| {
        if let Err(p) = input::parse("fuzz.json", t) {
            assert!(!p.is_empty());
        }
    });
    assert!(yaml > 0 && json > 0, "the seed corpus is missing");
}

#[test]
fn program_parsers_survive_their_corpus() {
    let n = replay("trace_nftables", |t| drop(trace::nftables::Program::parse(t)))
        + replay("trace_iptables", |t| drop(trace::iptables::Program::parse(t)))
        + replay("trace_ipvs", |t| drop(trace::ipvs::Program::parse(t)));
    assert!(n > 0, "the seed corpus is missing");
}

#[test]
fn stream_decoder_survives_its_corpus() {
    let n = replay("stream_decode", |t| {
        if let Ok(m) = ServerMessage::from_json(t) {
            assert_eq!(ServerMessage::from_json(&m.to_json()).expect("re-encodes"), m);
        }
    });
    assert!(n > 0, "the seed corpus is missing");
}

/// The seeds are real programs and messages: they must parse, or the corpus tests nothing deep.
#[test]
fn seeds_are_valid() {
    for (p, b) in inputs("trace_nftables")
        .iter()
        .filter(|(p, _)| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("golden")))
    {
        let text = std::str::from_utf8(b).expect("utf-8");
        trace::nftables::Program::parse(text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
    for (p, b) in inputs("stream_decode").iter().filter(|(p, _)| p.extension().is_some_and(|e| e == "json")) {
        let text = std::str::from_utf8(b).expect("utf-8");
        ServerMessage::from_json(text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
}
