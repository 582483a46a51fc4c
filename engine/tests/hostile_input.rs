//! Hostile input: YAML alias bombs, deep nesting and oversized documents get a clear error, fast,
//! without the parser's memory growing with what the input would expand to.

use switchyard_engine::input::{self, Problem};

/// The process's peak resident memory so far, in KiB (Linux).
fn peak_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn refused(name: &str, text: &str) -> Vec<Problem> {
    let before = peak_kib();
    let problems = input::parse(name, text).expect_err("hostile input is refused");
    let grown_mib = peak_kib().saturating_sub(before) / 1024;
    // The input itself is a few MB at most; expansion would be gigabytes.
    assert!(grown_mib < 256, "{name}: peak memory grew by {grown_mib} MiB");
    assert!(!problems.is_empty());
    problems
}

/// One test, so that no other test's allocations land inside a measurement (tests share the
/// process and run in parallel); the oversized input comes last because it is itself large.
#[test]
fn hostile_inputs_are_refused_in_bounded_memory() {
    billion_laughs();
    deep_yaml_nesting();
    deep_json_nesting();
    alias_flood();
    oversized_input();
}

fn billion_laughs() {
    let mut y = String::from("a0: &a0 [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n");
    for i in 1..=12 {
        let p = i - 1;
        y.push_str(&format!("a{i}: &a{i} [*a{p},*a{p},*a{p},*a{p},*a{p},*a{p},*a{p},*a{p},*a{p}]\n"));
    }
    let p = refused("bomb.yaml", &y);
    let text = p[0].to_string();
    assert!(text.contains("bomb.yaml") && text.contains("alias"), "{text}");
}

fn deep_yaml_nesting() {
    let depth = 100_000;
    let y = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let p = refused("deep.yaml", &y);
    assert!(p[0].to_string().contains("deep.yaml"));
}

fn deep_json_nesting() {
    let depth = 100_000;
    let j = format!("{{\"kind\":\"Service\",\"spec\":{}{}}}", "[".repeat(depth), "]".repeat(depth));
    let p = refused("deep.json", &j);
    assert!(p[0].to_string().contains("JSON"), "{}", p[0]);
}

/// Not nested, just many aliases of one anchor: the replay cap stops it as well.
fn alias_flood() {
    let mut y = String::from("anchors: &x [1, 2, 3]\n");
    for i in 0..200_000 {
        y.push_str(&format!("k{i}: *x\n"));
    }
    refused("aliases.yaml", &y);
}

fn oversized_input() {
    // 256 MiB and one byte: the input is the memory here, so only the answer is checked.
    let big = "# padding\n".repeat((256 << 20) / 10 + 1);
    let p = input::parse("big.yaml", &big).expect_err("too large");
    assert!(p[0].to_string().contains("larger than"), "{}", p[0]);
}
