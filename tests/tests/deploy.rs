//! The manifests in `deploy/`: valid against the Kubernetes 1.33 JSON schemas (strict, offline,
//! with `kubernetes-validate` from PyPI, which `cargo xtask test` installs), and in step with
//! the agent: the DaemonSet's arguments parse as `switchyard` parses them, the ConfigMap holds
//! a KubeProxyConfiguration the agent reads, and the ClusterRole grants list/watch and no more.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use clap::Parser;
use serde_json::Value;
use switchyard_agent::cli::{Cli, Command as Sub};

/// The Kubernetes version the manifests target (the agent's k8s-openapi feature, `v1_33`).
const KUBERNETES: &str = "1.33.0";

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy())
        .expect("deploy/ exists")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "{files:?}");
    files
}

fn validate(files: &[PathBuf]) -> Output {
    Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "--quiet", "-k", KUBERNETES])
        .args(files)
        .output()
        .expect("python3 runs")
}

fn no_validator(o: &Output) -> bool {
    String::from_utf8_lossy(&o.stderr).contains("No module named kubernetes_validate")
}

const MISSING: &str =
    "kubernetes-validate is not installed: `cargo xtask test` installs it (pip install kubernetes-validate==1.37.0)";

/// Every object of every manifest, parsed.
fn objects() -> Vec<Value> {
    let mut out = Vec::new();
    for f in manifests() {
        let text = std::fs::read_to_string(&f).expect("read");
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        out.extend(docs.into_iter().filter(|d| !d.is_null()));
    }
    out
}

fn find<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    objects.iter().find(|o| o["kind"] == kind).unwrap_or_else(|| panic!("no {kind} in deploy/"))
}

/// Every manifest validates against the Kubernetes schemas, unknown fields refused.
#[test]
fn manifests_match_the_kubernetes_schemas() {
    let o = validate(&manifests());
    assert!(!no_validator(&o), "{MISSING}");
    assert!(
        o.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The validator is not a rubber stamp: a broken copy of the DaemonSet (a string where the
/// schema wants a boolean, then an unknown field) fails, naming the field.
#[test]
fn a_broken_manifest_fails_validation() {
    let dir = std::env::temp_dir().join(format!("sy-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let good = std::fs::read_to_string(deploy().join("30-daemonset.yaml")).expect("daemonset");
    for (broken, field) in [
        (good.replace("hostNetwork: true", "hostNetwork: \"yes\""), "hostNetwork"),
        (
            good.replace("      hostNetwork: true", "      hostNetwork: true\n      hostNetworking: true"),
            "hostNetworking",
        ),
    ] {
        assert_ne!(broken, good);
        let path = dir.join("daemonset.yaml");
        std::fs::write(&path, broken).expect("write");
        let o = validate(&[path]);
        assert!(!no_validator(&o), "{MISSING}");
        let said = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert!(!o.status.success() && said.contains(field), "{said}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The DaemonSet runs `switchyard agent` with arguments the CLI accepts, in-cluster, on the
/// node the downward API names, with the ConfigMap's configuration, probed on its own server.
#[test]
fn the_daemonset_runs_the_agent_as_the_cli_parses_it() {
    let objects = objects();
    let ds = find(&objects, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    let c = &pod["containers"][0];
    let env: Vec<(&str, &str)> = c["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| (e["name"].as_str().expect("name"), e["valueFrom"]["fieldRef"]["fieldPath"].as_str().unwrap_or("")))
        .collect();
    assert!(env.contains(&("NODE_NAME", "spec.nodeName")), "{env:?}");
    let caps: Vec<&str> = c["securityContext"]["capabilities"]["add"]
        .as_array()
        .expect("caps")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(caps.contains(&"NET_ADMIN"), "{caps:?}");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/livez");

    // Kubernetes expands $(VAR) in args from the container's env.
    let args: Vec<String> = c["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("a string").replace("$(NODE_NAME)", "node-7"))
        .collect();
    let cli = Cli::try_parse_from(std::iter::once("switchyard".to_string()).chain(args.iter().cloned()))
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    let Sub::Agent(a) = cli.command else { panic!("not `agent`: {args:?}") };
    assert_eq!(a.node, "node-7");
    assert!(a.in_cluster && a.kubeconfig.is_none() && a.cluster.is_none());
    // Loopback: the server refuses any other address without a token.
    assert_eq!(a.listen, "127.0.0.1:10260".parse().expect("addr"));
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(c[probe]["httpGet"]["host"], "127.0.0.1", "{probe} must reach the loopback listener");
    }
    let port = c["ports"][0]["containerPort"].as_u64().expect("port");
    assert_eq!(port, 10260);

    // --config points into the ConfigMap's volume, at a key the ConfigMap has.
    let config = a.config.expect("--config");
    let mount = c["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .find(|m| config.starts_with(m["mountPath"].as_str().unwrap_or("-")))
        .expect("--config is in a mounted volume");
    let volume =
        pod["volumes"].as_array().expect("volumes").iter().find(|v| v["name"] == mount["name"]).expect("volume");
    let cm = find(&objects, "ConfigMap");
    assert_eq!(volume["configMap"]["name"], cm["metadata"]["name"]);
    let key = config.file_name().expect("a file").to_string_lossy().into_owned();
    let text = cm["data"][&key].as_str().unwrap_or_else(|| panic!("ConfigMap has no key {key}"));

    // The agent reads that configuration with the engine's parser.
    let dir = std::env::temp_dir().join(format!("sy-deploy-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join(&key);
    std::fs::write(&file, text).expect("write");
    let cfg = switchyard_agent::kube::read_proxy_config(&file).expect("a KubeProxyConfiguration the agent reads");
    assert_eq!(cfg.cluster_cidrs, ["10.244.0.0/16".parse().expect("cidr")]);
    let _ = std::fs::remove_dir_all(&dir);

    // The ServiceAccount the pod runs as is the one the ClusterRoleBinding binds.
    let binding = find(&objects, "ClusterRoleBinding");
    assert_eq!(binding["subjects"][0]["name"], pod["serviceAccountName"]);
    assert_eq!(binding["subjects"][0]["namespace"], ds["metadata"]["namespace"]);
    let svc = find(&objects, "Service");
    assert_eq!(svc["spec"]["type"], "ClusterIP");
    assert_eq!(svc["spec"]["selector"], ds["spec"]["selector"]["matchLabels"]);
}

/// The ClusterRole grants list and watch on exactly what the source watches.
#[test]
fn cluster_role_is_read_only() {
    let objects = objects();
    let role = find(&objects, "ClusterRole");
    let mut granted = Vec::new();
    for rule in role["rules"].as_array().expect("rules") {
        let verbs: Vec<&str> = rule["verbs"].as_array().expect("verbs").iter().filter_map(Value::as_str).collect();
        assert_eq!(verbs, ["list", "watch"], "{rule}");
        for g in rule["apiGroups"].as_array().expect("groups") {
            for r in rule["resources"].as_array().expect("resources") {
                granted.push(format!("{}/{}", g.as_str().expect("group"), r.as_str().expect("resource")));
            }
        }
    }
    granted.sort();
    assert_eq!(granted, ["/nodes", "/services", "discovery.k8s.io/endpointslices"]);
}
