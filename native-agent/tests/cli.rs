//! The built `switchyard` binary, held to the CLI contract: the JSON shape, exit statuses, located
//! input errors, DNS-name destinations and `--program`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

fn data(rel: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(rel).display().to_string()
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("switchyard runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `trace --output json` against the test cluster, asserting exit 0.
fn trace_json(extra: &[&str]) -> Value {
    let cluster = data("cluster");
    let mut args = vec!["trace", "--cluster", cluster.as_str(), "--node", "node-1", "--output", "json"];
    args.extend_from_slice(extra);
    let o = run(&args);
    assert_eq!(o.status.code(), Some(0), "{args:?}\nstderr: {}", stderr(&o));
    serde_json::from_str(&stdout(&o)).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(&o)))
}

fn endpoints(v: &Value) -> Vec<String> {
    let mut e: Vec<String> = v["outcomes"]
        .as_array()
        .expect("outcomes")
        .iter()
        .map(|o| o["endpoint"].as_str().expect("endpoint").to_string())
        .collect();
    e.sort();
    e
}

/// A file under the temp dir, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, text: &str) -> Self {
        let p = std::env::temp_dir().join(format!("sy-cli-{}-{name}", std::process::id()));
        std::fs::write(&p, text).expect("write temp file");
        TempFile(p)
    }
    fn path(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The JSON answer is the contract's object: verdict, outcomes (endpoint, probability,
/// masquerade) summing to 1, and hops with `at` and `action`.
#[test]
fn json_has_the_contract_shape() {
    let v = trace_json(&["--from", "10.244.1.5", "--to", "10.96.0.10:80"]);
    assert_eq!(v["verdict"], "forward", "{v:#}");
    let outcomes = v["outcomes"].as_array().expect("outcomes array");
    let mut sum = 0.0;
    for o in outcomes {
        assert!(o["endpoint"].is_string(), "{o}");
        assert!(o["masquerade"].is_boolean(), "{o}");
        sum += o["probability"].as_f64().expect("probability is a number");
    }
    assert!((sum - 1.0).abs() < 1e-9, "probabilities sum to {sum}");
    assert_eq!(endpoints(&v), ["10.244.1.10:8080", "10.244.2.15:8080"]);
    for h in v["hops"].as_array().expect("hops array") {
        assert!(h["at"].is_string() && h["action"].is_string(), "{h}");
    }
}

/// Every verdict exits 0, including one that is not `forward`.
#[test]
fn a_reject_still_exits_0() {
    let v = trace_json(&["--from", "10.244.1.5", "--to", "10.96.0.10:81"]);
    assert_eq!(v["verdict"], "reject", "{v:#}");
    assert_eq!(v["outcomes"].as_array().map(Vec::len), Some(0));
}

/// Skipped kinds are one warning line each, on stderr only.
#[test]
fn skipped_kinds_warn_once_on_stderr() {
    let cluster = data("cluster");
    let o = run(&["render", "--cluster", &cluster, "--node", "node-1", "--backend", "nftables"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let warnings: Vec<_> = stderr(&o).lines().filter(|l| l.contains("kind Pod")).map(str::to_string).collect();
    assert_eq!(warnings.len(), 1, "{}", stderr(&o));
    assert!(!stdout(&o).contains("Pod"));
    assert!(stdout(&o).starts_with("# Switchyard nftables program for node node-1"), "{}", stdout(&o));
}

/// Malformed input exits 2 with one line per problem naming file, document, object and field.
#[test]
fn malformed_yaml_exits_2_with_located_lines() {
    let file = data("malformed/malformed.yaml");
    let o = run(&["render", "--cluster", &file, "--node", "node-1", "--backend", "nftables"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stdout(&o).is_empty());
    let err = stderr(&o);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(lines[0].contains("malformed.yaml: document 2: Service default/bad-ip: field spec.clusterIP"), "{err}");
    assert!(
        lines[1].contains("malformed.yaml: document 3: Service default/bad-port: field spec.ports[0].port"),
        "{err}"
    );

    // A YAML syntax error in a folder: every file's problems, each located.
    let folder = data("malformed");
    let o = run(&["trace", "--cluster", &folder, "--node", "node-1", "--from", "10.0.0.1", "--to", "10.96.0.10:80"]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(err.contains("broken-syntax.yaml: document 1: invalid YAML"), "{err}");
    assert_eq!(err.lines().count(), 3, "{err}");
}

/// Bad arguments exit 2 with a message that says what is wrong.
#[test]
fn bad_arguments_exit_2() {
    let cluster = data("cluster");
    let cases: [(&[&str], &str); 4] = [
        (&["--node", "node-9", "--from", "10.244.1.5", "--to", "10.96.0.10:80"], "node-9"),
        (&["--node", "node-1", "--from", "10.244.1.500", "--to", "10.96.0.10:80"], "10.244.1.500"),
        (&["--node", "node-1", "--from", "10.244.1.5", "--to", "10.96.0.10"], "10.96.0.10"),
        (&["--node", "node-1", "--from", "10.244.1.5", "--to", "10.96.0.10:80", "--backend", "ebpf"], "ebpf"),
    ];
    for (extra, names) in cases {
        let mut args = vec!["trace", "--cluster", cluster.as_str()];
        args.extend_from_slice(extra);
        let o = run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(names), "{args:?}: {}", stderr(&o));
    }
    let o = run(&["render", "--cluster", &cluster, "--node", "nope", "--backend", "nftables"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("\"nope\""), "{}", stderr(&o));
}

/// `--to` with a Service's DNS name: the trace starts with the DNS hop and ends where the
/// cluster IP would; both name forms work.
#[test]
fn dns_name_destination() {
    let by_ip = trace_json(&["--from", "10.244.1.5", "--to", "10.96.0.10:80"]);
    for name in ["nginx-svc.default:80", "nginx-svc.default.svc.cluster.local:80"] {
        let v = trace_json(&["--from", "10.244.1.5", "--to", name]);
        assert_eq!(v["verdict"], by_ip["verdict"], "{name}");
        assert_eq!(endpoints(&v), endpoints(&by_ip), "{name}");
        assert_eq!(v["hops"][0]["at"], "dns", "{name}: {:#}", v["hops"]);
    }
    // ExternalName: a CNAME hop, then the proxy leaves the packet alone.
    let v = trace_json(&["--from", "10.244.1.5", "--to", "my-db.default:5432"]);
    assert_eq!(v["verdict"], "no-match");
    assert!(v["hops"].to_string().contains("db.example.com"), "{:#}", v["hops"]);
    // An unknown name is bad input.
    let cluster = data("cluster");
    let o =
        run(&["trace", "--cluster", &cluster, "--node", "node-1", "--from", "10.244.1.5", "--to", "nope.default:80"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

/// `--to NODE:PORT` stands for the node's primary address: NodePorts by node name.
#[test]
fn node_name_destination() {
    let by_ip = trace_json(&["--from", "203.0.113.9", "--to", "192.168.10.11:30080"]);
    let by_name = trace_json(&["--from", "203.0.113.9", "--to", "node-1:30080"]);
    assert_eq!(by_ip["verdict"], "forward", "{by_ip:#}");
    assert_eq!(endpoints(&by_name), endpoints(&by_ip));
}

/// `--program FILE` traces the given program: the rendered one answers like no `--program`;
/// an edited one (drift) answers with what it says; garbage exits 2.
#[test]
fn program_file() {
    let cluster = data("cluster");
    let o = run(&["render", "--cluster", &cluster, "--node", "node-1", "--backend", "nftables"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let program = stdout(&o);
    let file = TempFile::new("program.nft", &program);
    let args = ["--from", "10.244.1.5", "--to", "10.96.0.10:80"];
    let rendered = trace_json(&args);
    let mut with_program = args.to_vec();
    let path = file.path();
    with_program.extend_from_slice(&["--program", &path]);
    let given = trace_json(&with_program);
    assert_eq!(given["verdict"], rendered["verdict"]);
    assert_eq!(endpoints(&given), endpoints(&rendered));

    // Drift: the node's program sends the second slot to another pod than the cluster says.
    let drifted = program.replace("10.244.2.15 . 8080", "10.244.2.99 . 8080");
    assert_ne!(drifted, program, "the rendered program names its endpoints as `ip . port` map values");
    let file = TempFile::new("drifted.nft", &drifted);
    let path = file.path();
    let v = trace_json(&["--from", "10.244.1.5", "--to", "10.96.0.10:80", "--program", &path]);
    assert_eq!(endpoints(&v), ["10.244.1.10:8080", "10.244.2.99:8080"]);

    let garbage = TempFile::new("garbage.nft", "this is not a ruleset {\n");
    let path = garbage.path();
    let o = run(&[
        "trace",
        "--cluster",
        &cluster,
        "--node",
        "node-1",
        "--from",
        "10.244.1.5",
        "--to",
        "10.96.0.10:80",
        "--program",
        &path,
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--program"), "{}", stderr(&o));
}

/// The text summary names the verdict, the outcomes with their shares, and numbered hops.
#[test]
fn text_output() {
    let cluster = data("cluster");
    let o = run(&["trace", "--cluster", &cluster, "--node", "node-1", "--from", "10.244.1.5", "--to", "10.96.0.10:80"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let s = stdout(&o);
    assert!(s.contains("verdict  forward"), "{s}");
    assert!(s.contains("50.00%") && s.contains("10.244.2.15:8080") && s.contains("masquerade: no"), "{s}");
    assert!(s.contains(" 1. "), "{s}");
}

/// `--demo` needs no files: the contract's nginx-svc answers at 10.96.0.10:80 from node-1.
#[test]
fn demo_cluster() {
    let o = run(&[
        "trace",
        "--demo",
        "--node",
        "node-1",
        "--from",
        "10.244.1.50",
        "--to",
        "10.96.0.10:80",
        "--output",
        "json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).expect("JSON");
    assert_eq!(v["verdict"], "forward");
    assert_eq!(endpoints(&v), ["10.244.1.10:8080", "10.244.2.15:8080"]);
    let o = run(&["render", "--demo", "--node", "node-3", "--backend", "iptables"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("*nat"), "{}", stdout(&o));
}

/// `--output mermaid` prints a Mermaid sequence diagram.
#[test]
fn mermaid_output() {
    let cluster = data("cluster");
    let o = run(&[
        "trace",
        "--cluster",
        &cluster,
        "--node",
        "node-2",
        "--from",
        "203.0.113.9",
        "--to",
        "node-2:30080",
        "--output",
        "mermaid",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("sequenceDiagram"), "{}", stdout(&o));
}

/// `ipvs list` prints what `ipvsadm -Ln` would show; `--program` lists a given program
/// (or plain `ipvsadm -Sn` output); an unknown node exits 2.
#[test]
fn ipvs_list() {
    let cluster = data("cluster");
    let o = run(&["ipvs", "list", "--cluster", &cluster, "--node", "node-1"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "IP Virtual Server version 1.2.1 (size=4096)");
    assert_eq!(lines[1], "Prot LocalAddress:Port Scheduler Flags");
    assert_eq!(lines[2], "  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn");
    let i = lines.iter().position(|l| *l == "TCP  10.96.0.10:80 rr").unwrap_or_else(|| panic!("{out}"));
    assert!(lines[i + 1].starts_with("  -> 10.244.1.10:8080             Masq    1      0          0"), "{out}");

    let saved =
        TempFile::new("ipvs.sn", "-A -t 10.96.0.10:80 -s sh -p 60\n-a -t 10.96.0.10:80 -r 10.244.1.10:8080 -m -w 2\n");
    let path = saved.path();
    let o = run(&["ipvs", "list", "--cluster", &cluster, "--node", "node-1", "--program", &path]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).ends_with(
        "TCP  10.96.0.10:80 sh persistent 60\n  -> 10.244.1.10:8080             Masq    2      0          0         \n"
    ));

    let o = run(&["ipvs", "list", "--cluster", &cluster, "--node", "no-such-node"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

/// `render --backend ipvs` writes every section, and `trace --backend ipvs` forwards like the
/// other backends, saying where IPVS picked the real server.
#[test]
fn ipvs_render_and_trace() {
    let cluster = data("cluster");
    let o = run(&["render", "--cluster", &cluster, "--node", "node-1", "--backend", "ipvs"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let program = stdout(&o);
    for marker in ["# ipvsadm -R", "# ipset restore", "# iptables-restore", "# ip -batch"] {
        assert!(program.lines().any(|l| l == marker), "{marker} missing");
    }
    let args = ["--from", "10.244.1.5", "--to", "10.96.0.10:80"];
    let nft = trace_json(&args);
    let mut ipvs_args = args.to_vec();
    ipvs_args.extend_from_slice(&["--backend", "ipvs"]);
    let v = trace_json(&ipvs_args);
    assert_eq!(v["verdict"], "forward");
    assert_eq!(endpoints(&v), endpoints(&nft));
    let hops = v["hops"].as_array().expect("hops");
    assert!(hops.iter().any(|h| h["at"] == "input ipvs"), "{v}");
}
