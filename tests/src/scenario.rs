//! Scenario folders and their probes, and one probe checked against the engine.
//!
//! A scenario is a folder with a `cluster.yaml` (read as `--cluster` would read the folder) and a
//! `probes.tsv` whose lines are `backends, from, to, protocol, verdicts, endpoints, masquerade`
//! (tab-separated; `#` starts a comment). A probe passes under the rules of
//! `shared/contract-check/run.py`: the verdict is one of the allowed ones (`a|b`), the set of
//! endpoints equals the expected set (empty unless `forward`), masquerade (`yes`/`no`; `-` is not
//! checked) holds on some branch, and a forwarded packet's probabilities sum to 1.

use std::fmt;
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use switchyard_engine::cluster::Cluster;
use switchyard_engine::model::Protocol;
use switchyard_engine::policy::Backend;
use switchyard_engine::trace::Verdict;
use switchyard_engine::{Destination, TraceRequest};

/// Every probe is traced as entering this node, as in `run.py`.
pub const PROBE_NODE: &str = "test-node";

/// One scenario folder.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub dir: PathBuf,
}

/// The scenario folders directly under `root` (those with a `probes.tsv`), sorted by name.
pub fn scenarios(root: &Path) -> Vec<Scenario> {
    let mut out: Vec<Scenario> = fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("probes.tsv").is_file())
        .map(|dir| Scenario {
            name: dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            dir,
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

impl Scenario {
    /// The scenario's cluster, read as `switchyard --cluster DIR` reads it.
    pub fn cluster(&self) -> Result<Cluster, String> {
        switchyard_agent::load::load(std::slice::from_ref(&self.dir))
            .map(|l| l.cluster)
            .map_err(|e| e.0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))
    }

    /// The probes of `probes.tsv`.
    pub fn probes(&self) -> Result<Vec<Probe>, String> {
        let path = self.dir.join("probes.tsv");
        let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        parse_probes(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// One line of `probes.tsv`.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    /// 1-based line number in `probes.tsv`.
    pub line: usize,
    pub backends: Vec<Backend>,
    pub from: IpAddr,
    pub to: Destination,
    pub protocol: Protocol,
    /// The allowed verdicts, as the contract spells them (`forward`, `no-match`, ...).
    pub verdicts: Vec<String>,
    /// Expected endpoints, sorted.
    pub endpoints: Vec<String>,
    /// `Some(yes)` when some branch must masquerade, `Some(false)` when none may, `None` for `-`.
    pub masquerade: Option<bool>,
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let to = match &self.to {
            Destination::Addr(a) => a.to_string(),
            Destination::Name { name, port } => format!("{name}:{port}"),
        };
        write!(f, "line {}: {} -> {to}/{}", self.line, self.from, self.protocol)
    }
}

impl Probe {
    /// The backends this probe holds: those it names, and IPVS wherever iptables forwards: the
    /// backends must agree on forwarded packets (contract-check's `run.py ... ipvs` does the same).
    pub fn checked_backends(&self) -> Vec<Backend> {
        let mut v = self.backends.clone();
        if v.contains(&Backend::Iptables) && !v.contains(&Backend::Ipvs) && self.verdicts == ["forward"] {
            v.push(Backend::Ipvs);
        }
        v
    }
}

fn backend(s: &str) -> Result<Backend, String> {
    match s {
        "nftables" => Ok(Backend::Nftables),
        "iptables" => Ok(Backend::Iptables),
        "ipvs" => Ok(Backend::Ipvs),
        other => Err(format!("unknown backend {other:?}")),
    }
}

/// Parses `probes.tsv` text.
pub fn parse_probes(text: &str) -> Result<Vec<Probe>, String> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.starts_with('#') || raw.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = raw.split('\t').collect();
        let [backends, from, to, proto, verdicts, endpoints, masq] = f[..] else {
            return Err(format!("line {line}: expected 7 tab-separated fields, found {}", f.len()));
        };
        let err = |what: String| format!("line {line}: {what}");
        let mut eps: Vec<String> = endpoints.split(',').filter(|e| !e.is_empty()).map(str::to_string).collect();
        eps.sort();
        out.push(Probe {
            line,
            backends: backends.split(',').map(backend).collect::<Result<_, _>>().map_err(err)?,
            from: from.parse().map_err(|_| err(format!("{from:?} is not an IP address")))?,
            to: to.parse().map_err(err)?,
            protocol: Protocol::parse(proto).ok_or_else(|| err(format!("unknown protocol {proto:?}")))?,
            verdicts: verdicts.split('|').map(str::to_string).collect(),
            endpoints: eps,
            masquerade: match masq {
                "yes" => Some(true),
                "no" => Some(false),
                "-" => None,
                other => {
                    return Err(err(format!("masquerade must be yes, no or -, not {other:?}")));
                }
            },
        });
    }
    Ok(out)
}

/// What the engine answered, in the probe's terms.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub verdict: Verdict,
    pub endpoints: Vec<String>,
    pub masquerade: bool,
    pub probability_sum: f64,
}

/// Traces the probe on `backend` and says why it fails, if it does.
pub fn check(cluster: &Cluster, probe: &Probe, backend: Backend) -> Result<Answer, String> {
    let req = TraceRequest {
        node: PROBE_NODE.to_string(),
        backend,
        program: None,
        from: probe.from,
        to: probe.to.clone(),
        protocol: probe.protocol,
        seed: 0,
    };
    let t = switchyard_engine::trace(cluster, &req).map_err(|e| format!("no answer: {e}"))?;
    let mut endpoints: Vec<String> = if t.verdict == Verdict::Forward {
        t.outcomes.iter().map(|o| o.endpoint.to_string()).collect()
    } else {
        Vec::new()
    };
    endpoints.sort();
    endpoints.dedup();
    let answer = Answer {
        verdict: t.verdict,
        endpoints,
        masquerade: t.outcomes.iter().any(|o| o.masquerade),
        probability_sum: t.outcomes.iter().map(|o| o.probability).sum(),
    };
    let mut ok = probe.verdicts.iter().any(|v| v == t.verdict.as_str()) && answer.endpoints == probe.endpoints;
    if let Some(m) = probe.masquerade {
        ok &= answer.masquerade == m;
    }
    if t.verdict == Verdict::Forward && (answer.probability_sum - 1.0).abs() > 1e-6 {
        ok = false;
    }
    if ok {
        Ok(answer)
    } else {
        let masq = match probe.masquerade {
            Some(true) => "yes",
            Some(false) => "no",
            None => "-",
        };
        Err(format!(
            "want {} {:?} masq={masq}; got {} {:?} masq={} (probabilities sum to {})",
            probe.verdicts.join("|"),
            probe.endpoints,
            answer.verdict.as_str(),
            answer.endpoints,
            answer.masquerade,
            answer.probability_sum
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A probes.tsv line reads into a probe; comments and blank lines are skipped.
    #[test]
    fn parses_probe_lines() {
        let text = "# header\n\nnftables,iptables\t10.0.0.1\t[fd00::1]:80\tudp\tno-match|accept\tb:1,a:1\t-\n";
        let p = parse_probes(text).expect("parses");
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].line, 3);
        assert_eq!(p[0].backends, [Backend::Nftables, Backend::Iptables]);
        assert_eq!(p[0].protocol, Protocol::Udp);
        assert_eq!(p[0].verdicts, ["no-match", "accept"]);
        assert_eq!(p[0].endpoints, ["a:1", "b:1"]);
        assert_eq!(p[0].masquerade, None);
    }

    /// Malformed lines are located.
    #[test]
    fn rejects_bad_lines() {
        let e = parse_probes("nftables\t10.0.0.1\t10.0.0.2:80\ttcp\tforward\n").expect_err("short line");
        assert!(e.starts_with("line 1:"), "{e}");
        let e = parse_probes("bpf\t10.0.0.1\t10.0.0.2:80\ttcp\tforward\t\t-\n").expect_err("backend");
        assert!(e.contains("bpf"), "{e}");
    }
}
