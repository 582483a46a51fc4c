//! Differential: the engine's YAML reader against serde-saphyr, the reader it replaced, over the
//! fuzzers' corpus and every YAML file of the repository.

use std::path::{Path, PathBuf};

use serde_json::Value;
use switchyard_engine::input::yaml::{self, Limits};

/// The YAML files of the repository and the fuzzers' corpus.
fn yaml_texts() -> Vec<(PathBuf, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut dirs = vec![root.join("fuzz/corpus/input_yaml"), root.join("fuzz/regressions/input_yaml")];
    for d in ["deploy", "engine", "native-agent", "tests", "web-ui"] {
        dirs.push(root.join(d));
    }
    let mut out = Vec::new();
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for p in entries.flatten().map(|e| e.path()) {
            let corpus = d.ends_with("input_yaml");
            if p.is_dir() && !p.ends_with("target") {
                dirs.push(p);
            } else if (corpus || p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                && let Some(text) = std::fs::read(&p).ok().and_then(|b| String::from_utf8(b).ok())
            {
                out.push((p, text));
            }
        }
    }
    out
}

/// Where two values first differ, for a readable failure.
fn difference(ours: &Value, theirs: &Value, at: &str) -> Option<String> {
    match (ours, theirs) {
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            a.iter().zip(b).enumerate().find_map(|(i, (x, y))| difference(x, y, &format!("{at}[{i}]")))
        }
        (Value::Object(a), Value::Object(b)) if a.len() == b.len() => a.iter().find_map(|(k, x)| match b.get(k) {
            Some(y) => difference(x, y, &format!("{at}.{k}")),
            None => Some(format!("{at}.{k}: only ours")),
        }),
        // YAML 1.2 reads `007` as the integer 7; serde-saphyr reads 7.0. The same number either way.
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => None,
        _ if ours == theirs => None,
        _ => Some(format!("{at}: ours {ours}, serde-saphyr's {theirs}")),
    }
}

/// Differential: wherever serde-saphyr (the reader this one replaced) reads a text, this one reads
/// the same values, and it refuses what serde-saphyr refuses.
#[test]
fn reads_what_serde_saphyr_reads() {
    let texts = yaml_texts();
    assert!(texts.len() > 400, "only {} texts found", texts.len());
    let (mut same, mut both_refused) = (0, 0);
    for (path, text) in &texts {
        let mut options = serde_saphyr::Options::default();
        options.strict_booleans = true;
        let theirs = serde_saphyr::from_multiple_with_options::<Value>(text, options);
        let ours = yaml::documents(text, Limits { max_depth: 64, max_alias_nodes: 10_000_000 });
        match (theirs, ours) {
            (Ok(t), Ok(o)) => {
                // serde-saphyr drops null documents; so does `input::parse`.
                let o: Vec<Value> = o.into_iter().filter(|v| !v.is_null()).collect();
                let t: Vec<Value> = t.into_iter().filter(|v| !v.is_null()).collect();
                if let Some(d) = difference(&Value::Array(o), &Value::Array(t), "") {
                    panic!("{}: {d}", path.display());
                }
                same += 1;
            }
            (Ok(t), Err(e)) => panic!("{}: serde-saphyr read {t:?}, we refused: {e:?}", path.display()),
            (Err(_), Err(_)) => both_refused += 1,
            (Err(e), Ok(_)) => panic!("{}: serde-saphyr refused ({e}), we read it", path.display()),
        }
    }
    println!("{same} read alike, {both_refused} refused by both");
}
