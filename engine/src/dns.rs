//! Cluster DNS as a client sees it: a Service name resolves to its cluster IP, a headless service
//! to its endpoint addresses, and an ExternalName service to a CNAME, after which the proxy never
//! sees the traffic.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::cluster::Cluster;
use crate::model::{IpFamily, ObjectKey, ServiceType};

/// What a name resolved to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resolution {
    /// The name as asked.
    pub name: String,
    /// The fully qualified service name.
    pub fqdn: String,
    pub service: ObjectKey,
    pub answer: Answer,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum Answer {
    /// A/AAAA records of a ClusterIP service.
    ClusterIp { addresses: Vec<IpAddr> },
    /// A/AAAA records of a headless service: its ready endpoints.
    Headless { addresses: Vec<IpAddr> },
    /// A CNAME to a name outside the cluster: no proxying happens.
    Cname { target: String },
}

/// Whether `host` looks like a name rather than an address.
pub fn is_name(host: &str) -> bool {
    host.parse::<IpAddr>().is_err() && host.chars().any(|c| c.is_ascii_alphabetic())
}

/// Resolves `name` (`svc`, `svc.ns`, `svc.ns.svc`, `svc.ns.svc.cluster.local`) as a pod in
/// namespace `default` would.
pub fn resolve(cluster: &Cluster, name: &str) -> Option<Resolution> {
    let trimmed = name.trim_end_matches('.');
    let parts: Vec<&str> = trimmed.split('.').collect();
    let (svc, ns) = match parts.as_slice() {
        [svc] => (*svc, "default"),
        [svc, ns] | [svc, ns, "svc"] => (*svc, *ns),
        [svc, ns, "svc", rest @ ..] if !rest.is_empty() => (*svc, *ns),
        _ => return None,
    };
    let key = ObjectKey::new(ns, svc);
    let s = cluster.services.get(&key)?;
    let fqdn = format!("{svc}.{ns}.svc.cluster.local");
    let answer = if s.service_type == ServiceType::ExternalName {
        Answer::Cname { target: s.external_name.clone().unwrap_or_default() }
    } else if s.headless {
        let mut addresses: Vec<IpAddr> = cluster
            .slices_by_service()
            .get(&key)
            .into_iter()
            .flatten()
            .flat_map(|sl| sl.endpoints.iter())
            .filter(|e| e.ready)
            .map(|e| e.address)
            .collect();
        addresses.sort();
        addresses.dedup();
        Answer::Headless { addresses }
    } else {
        Answer::ClusterIp { addresses: s.cluster_ips.clone() }
    };
    Some(Resolution { name: name.to_string(), fqdn, service: key, answer })
}

impl Resolution {
    /// The address a client would connect to, preferring `family`.
    pub fn address(&self, family: Option<IpFamily>) -> Option<IpAddr> {
        let list = match &self.answer {
            Answer::ClusterIp { addresses } | Answer::Headless { addresses } => addresses,
            Answer::Cname { .. } => return None,
        };
        list.iter().copied().find(|ip| family.is_none_or(|f| IpFamily::of(ip) == f)).or(list.first().copied())
    }
}
