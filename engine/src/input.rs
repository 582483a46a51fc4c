//! Kubernetes objects in, domain types out: the one place YAML and JSON are read.
//!
//! Accepts what `kubectl get -o yaml|json` prints (multi-document YAML, `kind: List`, JSON) and what
//! people write by hand. Tolerates what kube-proxy tolerates (whitespace around CIDRs, leading zeros
//! in IPv4 literals, as `netutils.ParseIPSloppy` does) and rejects the rest with a [`Problem`] naming
//! the file, the document, the object and the field. The caller does the file IO.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use serde_json::Value;

use crate::model::*;

pub mod yaml;

/// One object the proxy cares about.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Object {
    Service(Service),
    EndpointSlice(EndpointSlice),
    /// A legacy `Endpoints` object, as one slice per subset and family.
    Endpoints {
        key: ObjectKey,
        subsets: Vec<EndpointSlice>,
    },
    Node(Node),
    ServiceCidr(ServiceCidr),
    ProxyConfig(ProxyConfig),
}

/// What one file held.
#[derive(Debug, Default, Clone)]
pub struct Parsed {
    pub objects: Vec<Object>,
    /// Kinds we do not route by (Pods, Deployments, ...), with how often each was seen.
    pub skipped_kinds: BTreeMap<String, usize>,
    /// Objects ignored the way kube-proxy ignores them (e.g. a slice with no service label).
    pub warnings: Vec<String>,
}

/// A problem in the input, located as precisely as we can.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Problem {
    pub file: String,
    /// 1-based document index within the file (YAML `---` documents, or 1 for JSON).
    pub document: usize,
    /// `Kind namespace/name`, or `List item N` when the object has no readable name.
    pub object: Option<String>,
    /// A JSON-path-like field location, e.g. `spec.ports[0].port`.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.file, self.document)?;
        if let Some(o) = &self.object {
            write!(f, ": {o}")?;
        }
        if let Some(p) = &self.field {
            write!(f, ": field {p}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Limits that keep hostile input bounded in memory and time.
const MAX_INPUT_BYTES: usize = 256 << 20;
const MAX_DEPTH: usize = 64;
/// Manifests seldom use aliases; an alias bomb multiplies nodes, so this cap is what bounds the
/// memory a hostile file can cost (a few MB here, not gigabytes).
const MAX_ALIAS_NODES: usize = 100_000;

/// Parses one file's text. `file` is only used in messages. All problems are returned, one per
/// object at most, so a user can fix a file in one pass.
pub fn parse(file: &str, text: &str) -> Result<Parsed, Vec<Problem>> {
    let whole = |message: String, document: usize| Problem {
        file: file.to_string(),
        document,
        object: None,
        field: None,
        message,
    };
    if text.len() > MAX_INPUT_BYTES {
        return Err(vec![whole(format!("input is larger than {MAX_INPUT_BYTES} bytes"), 1)]);
    }
    let trimmed = text.trim_start();
    let docs: Vec<Value> = if trimmed.starts_with('{') || trimmed.starts_with('[') {
        let mut docs = Vec::new();
        for (i, v) in serde_json::Deserializer::from_str(text).into_iter::<Value>().enumerate() {
            match v {
                Ok(Value::Array(items)) => docs.push(list_of(items)),
                Ok(v) => docs.push(v),
                Err(e) => return Err(vec![whole(format!("invalid JSON: {e}"), i + 1)]),
            }
        }
        docs
    } else {
        let limits = yaml::Limits { max_depth: MAX_DEPTH, max_alias_nodes: MAX_ALIAS_NODES };
        match yaml::documents(text, limits) {
            Ok(d) => d,
            Err(e) => {
                return Err(vec![whole(format!("invalid YAML at {e}"), e.document)]);
            }
        }
    };

    let mut out = Parsed::default();
    let mut problems = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        let document = i + 1;
        if doc.is_null() {
            continue;
        }
        let mut results = Vec::new();
        if doc.get("kind").and_then(Value::as_str).is_some_and(|k| k.ends_with("List")) && doc.get("items").is_some() {
            match doc.get("items") {
                Some(Value::Array(items)) => {
                    for (n, item) in items.iter().enumerate() {
                        results.push((object(item, &format!("items[{n}]"), &mut out), Some(n)));
                    }
                }
                Some(Value::Null) => {}
                _ => results.push((Err(Located::field("items", "must be a list")), None)),
            }
        } else {
            results.push((object(doc, "", &mut out), None));
        }
        for (r, item) in results {
            match r {
                Ok(Some(o)) => out.objects.push(o),
                Ok(None) => {}
                Err(l) => problems.push(Problem {
                    file: file.to_string(),
                    document,
                    object: l.object.or(item.map(|n| format!("List item {n}"))),
                    field: l.field,
                    message: l.message,
                }),
            }
        }
    }
    if problems.is_empty() { Ok(out) } else { Err(problems) }
}

fn list_of(items: Vec<Value>) -> Value {
    let mut m = serde_json::Map::new();
    m.insert("kind".into(), Value::String("List".into()));
    m.insert("items".into(), Value::Array(items));
    Value::Object(m)
}

/// An error inside one object.
#[derive(Debug)]
struct Located {
    object: Option<String>,
    field: Option<String>,
    message: String,
}

impl Located {
    fn field(path: &str, message: impl Into<String>) -> Self {
        Located { object: None, field: Some(path.to_string()), message: message.into() }
    }
}

/// A value and where it is, so every error can say which field it came from.
struct Cursor<'v> {
    v: &'v Value,
    path: String,
}

impl<'v> Cursor<'v> {
    fn root(v: &'v Value, prefix: &str) -> Self {
        Cursor { v, path: prefix.to_string() }
    }
    fn join(&self, key: &str) -> String {
        if self.path.is_empty() { key.to_string() } else { format!("{}.{key}", self.path) }
    }
    fn get(&self, key: &str) -> Option<Cursor<'v>> {
        match self.v.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => Some(Cursor { v, path: self.join(key) }),
        }
    }
    fn err(&self, message: impl Into<String>) -> Located {
        Located::field(&self.path, message)
    }
    fn str(&self) -> Result<&'v str, Located> {
        self.v.as_str().ok_or_else(|| self.err(format!("expected a string, found {}", kind_of(self.v))))
    }
    fn opt_str(&self, key: &str) -> Result<Option<&'v str>, Located> {
        self.get(key).map(|c| c.str()).transpose()
    }
    fn bool(&self) -> Result<bool, Located> {
        self.v.as_bool().ok_or_else(|| self.err(format!("expected true or false, found {}", kind_of(self.v))))
    }
    fn opt_bool(&self, key: &str) -> Result<Option<bool>, Located> {
        self.get(key).map(|c| c.bool()).transpose()
    }
    fn int(&self) -> Result<i64, Located> {
        match self.v {
            Value::Number(n) => n.as_i64().ok_or_else(|| self.err(format!("expected an integer, found {n}"))),
            other => Err(self.err(format!("expected an integer, found {}", kind_of(other)))),
        }
    }
    fn port(&self) -> Result<u16, Located> {
        let n = self.int()?;
        if (1..=65535).contains(&n) { Ok(n as u16) } else { Err(self.err(format!("port {n} is outside 1-65535"))) }
    }
    fn opt_port(&self, key: &str) -> Result<Option<u16>, Located> {
        match self.get(key) {
            // `nodePort: 0` and `healthCheckNodePort: 0` mean "none allocated".
            Some(c) if c.v.as_i64() == Some(0) => Ok(None),
            Some(c) => c.port().map(Some),
            None => Ok(None),
        }
    }
    fn list(&self, key: &str) -> Result<Vec<Cursor<'v>>, Located> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(c) => match c.v {
                Value::Array(items) => {
                    Ok(items.iter().enumerate().map(|(i, v)| Cursor { v, path: format!("{}[{i}]", c.path) }).collect())
                }
                other => Err(c.err(format!("expected a list, found {}", kind_of(other)))),
            },
        }
    }
    fn string_map(&self, key: &str) -> Result<BTreeMap<String, String>, Located> {
        let mut out = BTreeMap::new();
        if let Some(c) = self.get(key) {
            let Value::Object(m) = c.v else {
                return Err(c.err(format!("expected a map, found {}", kind_of(c.v))));
            };
            for (k, v) in m {
                let s = match v {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    Value::Bool(b) => b.to_string(),
                    Value::Number(n) => n.to_string(),
                    other => {
                        return Err(Located::field(&c.join(k), format!("expected a string, found {}", kind_of(other))));
                    }
                };
                out.insert(k.clone(), s);
            }
        }
        Ok(out)
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a map",
    }
}

/// Parses an IP literal the way kube-proxy does (`ParseIPSloppy`): IPv4 parts may carry leading
/// zeros and are read as decimal.
pub fn parse_ip_sloppy(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    let parts: Vec<&str> = s.split('.').collect();
    if parts.len() != 4 {
        return None;
    }
    let mut octets = [0u8; 4];
    for (o, p) in octets.iter_mut().zip(&parts) {
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *o = p.parse::<u16>().ok().filter(|n| *n <= 255)? as u8;
    }
    Some(IpAddr::V4(Ipv4Addr::from(octets)))
}

/// Parses a CIDR sloppily (surrounding whitespace, leading zeros), masking host bits as Go's
/// `ParseCIDR` does for the network.
pub fn parse_cidr_sloppy(s: &str) -> Option<IpNet> {
    let s = s.trim();
    let (addr, len) = s.split_once('/')?;
    let ip = parse_ip_sloppy(addr.trim())?;
    let len: u8 = len.trim().parse().ok()?;
    IpNet::new(ip, len).ok().map(|n| n.trunc())
}

fn ip_of(c: &Cursor) -> Result<IpAddr, Located> {
    let s = c.str()?;
    parse_ip_sloppy(s.trim()).ok_or_else(|| c.err(format!("{s:?} is not an IP address")))
}

fn cidr_of(c: &Cursor) -> Result<IpNet, Located> {
    let s = c.str()?;
    parse_cidr_sloppy(s).ok_or_else(|| c.err(format!("{s:?} is not a CIDR")))
}

fn object(v: &Value, prefix: &str, out: &mut Parsed) -> Result<Option<Object>, Located> {
    let c = Cursor::root(v, prefix);
    if !v.is_object() {
        return Err(Located {
            object: None,
            field: (!prefix.is_empty()).then(|| prefix.to_string()),
            message: format!("expected a Kubernetes object (a map), found {}", kind_of(v)),
        });
    }
    let kind = match c.get("kind") {
        Some(k) => k.str()?.to_string(),
        None => return Err(c.err("has no `kind`").with_field(c.join("kind"))),
    };
    let api = c.opt_str("apiVersion")?.unwrap_or("");
    let meta = c.get("metadata");
    let name = match &meta {
        Some(m) => m.opt_str("name")?.unwrap_or("").to_string(),
        None => String::new(),
    };
    let namespace = match &meta {
        Some(m) => m.opt_str("namespace")?.unwrap_or("default").to_string(),
        None => "default".to_string(),
    };
    let label = if matches!(kind.as_str(), "Node" | "ServiceCIDR" | "KubeProxyConfiguration") || name.is_empty() {
        if name.is_empty() { kind.clone() } else { format!("{kind} {name}") }
    } else {
        format!("{kind} {namespace}/{name}")
    };
    let needs_name = |what: &str| -> Result<(), Located> {
        if name.is_empty() {
            Err(Located {
                object: Some(what.to_string()),
                field: Some(c.join("metadata.name")),
                message: "is required".into(),
            })
        } else {
            Ok(())
        }
    };
    let key = ObjectKey::new(namespace.clone(), name.clone());
    let r = match kind.as_str() {
        "Service" if api == "v1" || api.is_empty() => {
            needs_name("Service")?;
            service(&c, key).map(Object::Service).map(Some)
        }
        "EndpointSlice" if api.starts_with("discovery.k8s.io/") || api.is_empty() => {
            needs_name("EndpointSlice")?;
            endpoint_slice(&c, key, out).map(|s| s.map(Object::EndpointSlice))
        }
        "Endpoints" if api == "v1" || api.is_empty() => {
            needs_name("Endpoints")?;
            legacy_endpoints(&c, key.clone()).map(|subsets| Some(Object::Endpoints { key, subsets }))
        }
        "Node" if api == "v1" || api.is_empty() => {
            needs_name("Node")?;
            node(&c, name.clone()).map(Object::Node).map(Some)
        }
        "ServiceCIDR" if api.starts_with("networking.k8s.io/") || api.is_empty() => {
            needs_name("ServiceCIDR")?;
            service_cidr(&c, name.clone()).map(Object::ServiceCidr).map(Some)
        }
        "KubeProxyConfiguration" => proxy_config(&c).map(Object::ProxyConfig).map(Some),
        _ => {
            *out.skipped_kinds.entry(kind.clone()).or_default() += 1;
            Ok(None)
        }
    };
    r.map_err(|mut l| {
        l.object.get_or_insert(label);
        l
    })
}

impl Located {
    fn with_field(mut self, f: String) -> Self {
        self.field = Some(f);
        self
    }
}

fn service(c: &Cursor, key: ObjectKey) -> Result<Service, Located> {
    let spec = c.get("spec").ok_or_else(|| c.err("has no spec").with_field(c.join("spec")))?;
    let meta = c.get("metadata");
    let labels = match &meta {
        Some(m) => m.string_map("labels")?,
        None => BTreeMap::new(),
    };
    let annotations = match &meta {
        Some(m) => m.string_map("annotations")?,
        None => BTreeMap::new(),
    };
    let service_type = match spec.opt_str("type")? {
        None | Some("ClusterIP") => ServiceType::ClusterIP,
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("ExternalName") => ServiceType::ExternalName,
        Some(other) => {
            return Err(spec
                .get("type")
                .map(|t| t.err(format!("unknown service type {other:?}")))
                .unwrap_or_else(|| spec.err("bad type")));
        }
    };
    let mut headless = false;
    let mut cluster_ips = Vec::new();
    let ips = spec.list("clusterIPs")?;
    let literal: Vec<(String, Cursor)> = if ips.is_empty() {
        spec.get("clusterIP").map(|c| c.str().map(|s| vec![(s.to_string(), c)])).transpose()?.unwrap_or_default()
    } else {
        ips.into_iter().map(|c| c.str().map(|s| (s.to_string(), c))).collect::<Result<_, _>>()?
    };
    for (s, at) in &literal {
        match s.trim() {
            "None" => headless = true,
            "" => {}
            s => {
                let ip = parse_ip_sloppy(s).ok_or_else(|| at.err(format!("{s:?} is not an IP address")))?;
                if !cluster_ips.contains(&ip) {
                    cluster_ips.push(ip);
                }
            }
        }
    }
    let mut ports = Vec::new();
    for p in spec.list("ports")? {
        let port = p.get("port").ok_or_else(|| p.err("is missing `port`").with_field(p.join("port")))?.port()?;
        let protocol = match p.get("protocol") {
            None => Protocol::Tcp,
            Some(pc) => {
                let s = pc.str()?;
                Protocol::parse(s).ok_or_else(|| pc.err(format!("unknown protocol {s:?} (TCP, UDP or SCTP)")))?
            }
        };
        let target_port = match p.get("targetPort") {
            None => TargetPort::Number(port),
            Some(t) => match t.v {
                Value::Number(_) if t.v.as_i64() == Some(0) => TargetPort::Number(port),
                Value::Number(_) => TargetPort::Number(t.port()?),
                Value::String(s) => match s.parse::<i64>() {
                    Ok(n) if (1..=65535).contains(&n) => TargetPort::Number(n as u16),
                    Ok(n) => return Err(t.err(format!("port {n} is outside 1-65535"))),
                    Err(_) if s.is_empty() => TargetPort::Number(port),
                    Err(_) => TargetPort::Name(s.clone()),
                },
                other => return Err(t.err(format!("expected a port number or name, found {}", kind_of(other)))),
            },
        };
        ports.push(ServicePort {
            name: p.opt_str("name")?.unwrap_or("").to_string(),
            protocol,
            port,
            target_port,
            node_port: p.opt_port("nodePort")?,
        });
    }
    let external_ips = spec.list("externalIPs")?.iter().map(ip_of).collect::<Result<Vec<_>, _>>()?;
    let mut load_balancer_ingress = Vec::new();
    if let Some(status) = c.get("status")
        && let Some(lb) = status.get("loadBalancer")
    {
        for i in lb.list("ingress")? {
            let ip = i.get("ip").map(|c| ip_of(&c)).transpose()?;
            let ip_mode_proxy = match i.opt_str("ipMode")? {
                None | Some("VIP") => false,
                Some("Proxy") => true,
                Some(other) => {
                    return Err(i
                        .get("ipMode")
                        .map(|m| m.err(format!("unknown ipMode {other:?} (VIP or Proxy)")))
                        .unwrap_or_else(|| i.err("bad ipMode")));
                }
            };
            load_balancer_ingress.push(LoadBalancerIngress {
                ip,
                hostname: i.opt_str("hostname")?.map(str::to_string),
                ip_mode_proxy,
            });
        }
    }
    // kube-proxy reads the beta annotation when the field is empty (GetLoadBalancerSourceRanges).
    let mut load_balancer_source_ranges = Vec::new();
    let ranges = spec.list("loadBalancerSourceRanges")?;
    if ranges.is_empty() {
        if let Some(a) = annotations.get("service.beta.kubernetes.io/load-balancer-source-ranges") {
            for part in a.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let net = parse_cidr_sloppy(part).ok_or_else(|| {
                    Located::field(
                        "metadata.annotations[service.beta.kubernetes.io/load-balancer-source-ranges]",
                        format!("{part:?} is not a CIDR"),
                    )
                })?;
                load_balancer_source_ranges.push(net);
            }
        }
    } else {
        for r in &ranges {
            load_balancer_source_ranges.push(cidr_of(r)?);
        }
    }
    let policy = |key: &str| -> Result<bool, Located> {
        match spec.get(key) {
            None => Ok(false),
            Some(p) => match p.str()? {
                "Local" => Ok(true),
                "Cluster" | "Global" => Ok(false),
                other => Err(p.err(format!("unknown traffic policy {other:?} (Cluster or Local)"))),
            },
        }
    };
    let external_traffic_policy_local = policy("externalTrafficPolicy")?;
    let internal_traffic_policy_local = policy("internalTrafficPolicy")?;
    let session_affinity_timeout = match spec.opt_str("sessionAffinity")? {
        None | Some("None") | Some("") => None,
        Some("ClientIP") => {
            let t =
                spec.get("sessionAffinityConfig").and_then(|s| s.get("clientIP")).and_then(|s| s.get("timeoutSeconds"));
            match t {
                None => Some(10800),
                Some(t) => {
                    let n = t.int()?;
                    if !(1..=86400).contains(&n) {
                        return Err(t.err(format!("timeoutSeconds {n} is outside 1-86400")));
                    }
                    Some(n as u32)
                }
            }
        }
        Some(other) => {
            return Err(spec
                .get("sessionAffinity")
                .map(|s| s.err(format!("unknown sessionAffinity {other:?} (None or ClientIP)")))
                .unwrap_or_else(|| spec.err("bad sessionAffinity")));
        }
    };
    Ok(Service {
        key,
        service_type,
        cluster_ips,
        headless,
        external_name: spec.opt_str("externalName")?.map(str::to_string),
        ports,
        external_ips,
        load_balancer_ingress,
        load_balancer_source_ranges,
        external_traffic_policy_local,
        internal_traffic_policy_local,
        health_check_node_port: spec.opt_port("healthCheckNodePort")?,
        session_affinity_timeout,
        traffic_distribution: spec.opt_str("trafficDistribution")?.map(str::to_string),
        selector: spec.string_map("selector")?,
        labels,
    })
}

fn endpoint_slice(c: &Cursor, key: ObjectKey, out: &mut Parsed) -> Result<Option<EndpointSlice>, Located> {
    let labels = match c.get("metadata") {
        Some(m) => m.string_map("labels")?,
        None => BTreeMap::new(),
    };
    let Some(service) = labels.get("kubernetes.io/service-name").filter(|s| !s.is_empty()).cloned() else {
        // kube-proxy logs and ignores such slices.
        out.warnings.push(format!("EndpointSlice {key}: no kubernetes.io/service-name label; ignored"));
        return Ok(None);
    };
    let at = c.get("addressType").ok_or_else(|| c.err("is required").with_field(c.join("addressType")))?;
    let address_type = match at.str()? {
        "IPv4" => AddressType::IPv4,
        "IPv6" => AddressType::IPv6,
        "FQDN" => AddressType::Fqdn,
        other => return Err(at.err(format!("unknown addressType {other:?} (IPv4, IPv6 or FQDN)"))),
    };
    let mut endpoints = Vec::new();
    for e in c.list("endpoints")? {
        let addrs = e.list("addresses")?;
        let Some(first) = addrs.first() else { continue };
        if address_type == AddressType::Fqdn {
            first.str()?;
            continue;
        }
        let address = ip_of(first)?;
        let want = if address_type == AddressType::IPv4 { IpFamily::V4 } else { IpFamily::V6 };
        if IpFamily::of(&address) != want {
            return Err(first.err(format!("{address} does not match addressType {:?}", address_type)));
        }
        let cond = e.get("conditions");
        let get_cond = |k: &str| -> Result<Option<bool>, Located> {
            match &cond {
                Some(cc) => cc.opt_bool(k),
                None => Ok(None),
            }
        };
        // endpointslicecache.go: ready unset → true; serving unset → true; terminating unset → false.
        let ready = get_cond("ready")?.unwrap_or(true);
        let serving = get_cond("serving")?.unwrap_or(true);
        let terminating = get_cond("terminating")?.unwrap_or(false);
        let mut hints_for_zones = Vec::new();
        let mut hints_for_nodes = Vec::new();
        if let Some(h) = e.get("hints") {
            for z in h.list("forZones")? {
                if let Some(n) = z.opt_str("name")? {
                    hints_for_zones.push(n.to_string());
                }
            }
            for z in h.list("forNodes")? {
                if let Some(n) = z.opt_str("name")? {
                    hints_for_nodes.push(n.to_string());
                }
            }
        }
        endpoints.push(Endpoint {
            address,
            ready,
            serving,
            terminating,
            node_name: e.opt_str("nodeName")?.map(str::to_string),
            zone: e.opt_str("zone")?.map(str::to_string),
            hints_for_zones,
            hints_for_nodes,
            target: e.get("targetRef").map(|t| t.opt_str("name")).transpose()?.flatten().map(str::to_string),
        });
    }
    let mut ports = Vec::new();
    for p in c.list("ports")? {
        let Some(port) = p.get("port") else { continue };
        let protocol = match p.get("protocol") {
            None => Protocol::Tcp,
            Some(pc) => {
                let s = pc.str()?;
                Protocol::parse(s).ok_or_else(|| pc.err(format!("unknown protocol {s:?}")))?
            }
        };
        ports.push(EndpointPort { name: p.opt_str("name")?.unwrap_or("").to_string(), protocol, port: port.port()? });
    }
    Ok(Some(EndpointSlice { key, service, address_type, endpoints, ports, from_legacy_endpoints: false }))
}

/// A legacy `Endpoints` object as slices: one per subset and address family, since each subset
/// carries its own ports (as kube-proxy's old endpoints handling paired them).
fn legacy_endpoints(c: &Cursor, key: ObjectKey) -> Result<Vec<EndpointSlice>, Located> {
    let mut out = Vec::new();
    for (n, s) in c.list("subsets")?.iter().enumerate() {
        let mut endpoints = Vec::new();
        for (list, ready) in [("addresses", true), ("notReadyAddresses", false)] {
            for a in s.list(list)? {
                let ipc = a.get("ip").ok_or_else(|| a.err("is missing `ip`").with_field(a.join("ip")))?;
                endpoints.push(Endpoint {
                    address: ip_of(&ipc)?,
                    ready,
                    serving: ready,
                    terminating: false,
                    node_name: a.opt_str("nodeName")?.map(str::to_string),
                    zone: None,
                    hints_for_zones: Vec::new(),
                    hints_for_nodes: Vec::new(),
                    target: a.get("targetRef").map(|t| t.opt_str("name")).transpose()?.flatten().map(str::to_string),
                });
            }
        }
        let mut ports: Vec<EndpointPort> = Vec::new();
        for p in s.list("ports")? {
            let port = p.get("port").ok_or_else(|| p.err("is missing `port`").with_field(p.join("port")))?.port()?;
            let protocol = match p.get("protocol") {
                None => Protocol::Tcp,
                Some(pc) => {
                    let s = pc.str()?;
                    Protocol::parse(s).ok_or_else(|| pc.err(format!("unknown protocol {s:?}")))?
                }
            };
            ports.push(EndpointPort { name: p.opt_str("name")?.unwrap_or("").to_string(), protocol, port });
        }
        for (family, address_type) in [(IpFamily::V4, AddressType::IPv4), (IpFamily::V6, AddressType::IPv6)] {
            let eps: Vec<Endpoint> = endpoints.iter().filter(|e| IpFamily::of(&e.address) == family).cloned().collect();
            if eps.is_empty() {
                continue;
            }
            out.push(EndpointSlice {
                key: ObjectKey::new(key.namespace.clone(), format!("{}/subset-{n}-{family:?}", key.name)),
                service: key.name.clone(),
                address_type,
                endpoints: eps,
                ports: ports.clone(),
                from_legacy_endpoints: true,
            });
        }
    }
    Ok(out)
}

fn node(c: &Cursor, name: String) -> Result<Node, Located> {
    let labels = match c.get("metadata") {
        Some(m) => m.string_map("labels")?,
        None => BTreeMap::new(),
    };
    let mut pod_cidrs = Vec::new();
    if let Some(spec) = c.get("spec") {
        let list = spec.list("podCIDRs")?;
        if list.is_empty() {
            if let Some(p) = spec.get("podCIDR") {
                pod_cidrs.push(cidr_of(&p)?);
            }
        } else {
            for p in &list {
                pod_cidrs.push(cidr_of(p)?);
            }
        }
    }
    let mut addresses = Vec::new();
    if let Some(status) = c.get("status") {
        for a in status.list("addresses")? {
            let kind = a.get("type").ok_or_else(|| a.err("is missing `type`").with_field(a.join("type")))?.str()?;
            let ac = a.get("address").ok_or_else(|| a.err("is missing `address`").with_field(a.join("address")))?;
            let mut address = ac.str()?.trim().to_string();
            if kind.ends_with("IP") {
                address = ip_of(&ac)?.to_string();
            }
            addresses.push(NodeAddress { kind: kind.to_string(), address });
        }
    }
    Ok(Node { name, addresses, pod_cidrs, labels })
}

fn service_cidr(c: &Cursor, name: String) -> Result<ServiceCidr, Located> {
    let spec = c.get("spec").ok_or_else(|| c.err("has no spec").with_field(c.join("spec")))?;
    let cidrs = spec.list("cidrs")?.iter().map(cidr_of).collect::<Result<Vec<_>, _>>()?;
    Ok(ServiceCidr { name, cidrs })
}

/// Go durations as KubeProxyConfiguration writes them ("1s", "500ms", "1m30s").
fn duration_ms(c: &Cursor) -> Result<u64, Located> {
    let s = c.str()?;
    let bad = || c.err(format!("{s:?} is not a duration (e.g. 1s, 500ms, 1m30s)"));
    let mut total = 0f64;
    let mut rest = s.trim();
    if rest == "0" {
        return Ok(0);
    }
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let n = rest.find(|ch: char| !(ch.is_ascii_digit() || ch == '.')).ok_or_else(bad)?;
        let (num, tail) = rest.split_at(n);
        let value: f64 = num.parse().map_err(|_| bad())?;
        let u = tail.find(|ch: char| ch.is_ascii_digit()).unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(u);
        let scale = match unit {
            "h" => 3_600_000.0,
            "m" => 60_000.0,
            "s" => 1000.0,
            "ms" => 1.0,
            "us" | "µs" => 0.001,
            "ns" => 0.000_001,
            _ => return Err(bad()),
        };
        total += value * scale;
        rest = tail;
    }
    Ok(total as u64)
}

fn proxy_config(c: &Cursor) -> Result<ProxyConfig, Located> {
    let mut cfg = ProxyConfig::default();
    if let Some(cc) = c.get("clusterCIDR") {
        for part in cc.str()?.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            cfg.cluster_cidrs.push(parse_cidr_sloppy(part).ok_or_else(|| cc.err(format!("{part:?} is not a CIDR")))?);
        }
    }
    if let Some(m) = c.get("detectLocalMode") {
        cfg.detect_local_mode = match m.str()? {
            "" | "ClusterCIDR" => LocalMode::ClusterCidr,
            "NodeCIDR" => LocalMode::NodeCidr,
            "BridgeInterface" => LocalMode::BridgeInterface,
            "InterfaceNamePrefix" => LocalMode::InterfaceNamePrefix,
            other => {
                return Err(m.err(format!(
                    "unknown detectLocalMode {other:?} (ClusterCIDR, NodeCIDR, BridgeInterface or InterfaceNamePrefix)"
                )));
            }
        };
    }
    for a in c.list("nodePortAddresses")? {
        let s = a.str()?;
        if s.trim() == "primary" {
            cfg.node_port_addresses.push(NodePortAddress::Primary);
        } else {
            cfg.node_port_addresses.push(NodePortAddress::Cidr(cidr_of(&a)?));
        }
    }
    if let Some(ipt) = c.get("iptables") {
        if let Some(b) = ipt.opt_bool("masqueradeAll")? {
            cfg.iptables_masquerade_all = b;
        }
        if let Some(b) = ipt.opt_bool("localhostNodePorts")? {
            cfg.localhost_node_ports = b;
        }
        if let Some(bit) = ipt.get("masqueradeBit") {
            let n = bit.int()?;
            if !(0..=31).contains(&n) {
                return Err(bit.err(format!("masqueradeBit {n} is outside 0-31")));
            }
            cfg.masquerade_bit = n as u8;
        }
        if let Some(d) = ipt.get("minSyncPeriod") {
            cfg.min_sync_period_ms = duration_ms(&d)?;
        }
        if let Some(d) = ipt.get("syncPeriod") {
            cfg.sync_period_ms = duration_ms(&d)?;
        }
    }
    if let Some(nft) = c.get("nftables")
        && let Some(b) = nft.opt_bool("masqueradeAll")?
    {
        cfg.nftables_masquerade_all = b;
    }
    if let Some(ipvs) = c.get("ipvs")
        && let Some(s) = ipvs.opt_str("scheduler")?
        && !s.is_empty()
    {
        const SCHEDULERS: [&str; 11] = ["rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "mh"];
        if !SCHEDULERS.contains(&s) {
            return Err(ipvs
                .get("scheduler")
                .map(|x| x.err(format!("unknown IPVS scheduler {s:?}")))
                .unwrap_or_else(|| ipvs.err("bad scheduler")));
        }
        cfg.ipvs_scheduler = s.to_string();
    }
    if let Some(d) = c.get("minSyncPeriod") {
        cfg.min_sync_period_ms = duration_ms(&d)?;
    }
    if let Some(d) = c.get("syncPeriod") {
        cfg.sync_period_ms = duration_ms(&d)?;
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sloppy_ips_accept_leading_zeros() {
        assert_eq!(parse_ip_sloppy("010.000.000.001"), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(parse_ip_sloppy("256.0.0.1"), None);
        assert_eq!(parse_cidr_sloppy(" 203.0.113.5/24 "), Some("203.0.113.0/24".parse().unwrap()));
    }

    #[test]
    fn errors_name_file_document_object_and_field() {
        let text = "apiVersion: v1\nkind: Node\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: n}\nspec:\n  ports:\n  - port: 99999\n";
        let errs = parse("c.yaml", text).unwrap_err();
        assert_eq!(errs.len(), 1);
        assert_eq!(
            errs[0].to_string(),
            "c.yaml: document 2: Service n/s: field spec.ports[0].port: port 99999 is outside 1-65535"
        );
    }

    #[test]
    fn lists_and_other_kinds() {
        let text = "kind: List\nitems:\n- {apiVersion: v1, kind: Pod, metadata: {name: p}}\n- {apiVersion: v1, kind: Node, metadata: {name: n}}\n";
        let p = parse("l.yaml", text).unwrap();
        assert_eq!(p.objects.len(), 1);
        assert_eq!(p.skipped_kinds.get("Pod"), Some(&1));
    }

    #[test]
    fn syntax_errors_name_their_document() {
        let text = "kind: Node\nmetadata: {name: a}\n---\nkind: Node\nmetadata: {name: [b\n";
        let errs = parse("y.yaml", text).unwrap_err();
        assert_eq!(errs[0].document, 2, "{}", errs[0]);
    }

    #[test]
    fn durations() {
        let v = Value::String("1m30s".into());
        assert_eq!(duration_ms(&Cursor::root(&v, "x")).unwrap(), 90_000);
    }
}
