//! Small, realistic changes to a cluster, for incremental programs: an endpoint goes away, a
//! service is deleted and comes back, an endpoint is added. Each step starts from the previous
//! one, so applying their transactions in order walks a node's program through all of them.

use std::collections::BTreeSet;
use std::net::IpAddr;

use switchyard_engine::cluster::Cluster;
use switchyard_engine::model::ObjectKey;

/// One change and the cluster after it.
#[derive(Debug, Clone)]
pub struct Step {
    pub what: String,
    pub cluster: Cluster,
}

/// The changes this cluster allows, in order; ends back at `start` plus one added endpoint.
pub fn steps(start: &Cluster) -> Vec<Step> {
    let mut out = Vec::new();
    let mut c = start.clone();
    let slice = first_slice_with_endpoints(start);
    let removed = slice.as_ref().and_then(|key| {
        let s = c.endpoint_slices.get_mut(key)?;
        let ep = s.endpoints.remove(0);
        out.push(Step { what: format!("remove endpoint {} of slice {key}", ep.address), cluster: c.clone() });
        Some(ep)
    });
    if let Some(svc) = start.services.values().find(|s| s.is_proxied()).map(|s| s.key.clone()) {
        let before = c.clone();
        remove_service(&mut c, &svc);
        out.push(Step { what: format!("remove service {svc}"), cluster: c.clone() });
        c = before;
        out.push(Step { what: format!("add service {svc} back"), cluster: c.clone() });
    }
    if let (Some(key), Some(ep)) = (&slice, removed) {
        if let Some(s) = c.endpoint_slices.get_mut(key) {
            s.endpoints.insert(0, ep.clone());
            out.push(Step { what: format!("add endpoint {} back to slice {key}", ep.address), cluster: c.clone() });
        }
        let used = addresses(&c);
        if let (Some(s), Some(ip)) = (c.endpoint_slices.get_mut(key), fresh_address(ep.address, &used)) {
            let mut new = ep;
            new.address = ip;
            new.target = None;
            s.endpoints.push(new);
            out.push(Step { what: format!("add endpoint {ip} to slice {key}"), cluster: c.clone() });
        }
    }
    out
}

/// The first EndpointSlice (by key) of a proxied service that has an endpoint.
fn first_slice_with_endpoints(c: &Cluster) -> Option<ObjectKey> {
    c.endpoint_slices
        .values()
        .find(|s| {
            let svc = ObjectKey::new(s.key.namespace.clone(), s.service.clone());
            !s.endpoints.is_empty() && c.services.get(&svc).is_some_and(|s| s.is_proxied())
        })
        .map(|s| s.key.clone())
}

/// Deletes a service with its EndpointSlices and legacy Endpoints.
fn remove_service(c: &mut Cluster, svc: &ObjectKey) {
    c.services.remove(svc);
    c.endpoint_slices.retain(|_, s| !(s.key.namespace == svc.namespace && s.service == svc.name));
    c.legacy_endpoints.remove(svc);
}

fn addresses(c: &Cluster) -> BTreeSet<IpAddr> {
    c.slices_by_service().values().flatten().flat_map(|s| s.endpoints.iter().map(|e| e.address)).collect()
}

/// An address next to `near` (same family, same /24 or /120) that no endpoint uses.
fn fresh_address(near: IpAddr, used: &BTreeSet<IpAddr>) -> Option<IpAddr> {
    (1..=255u8)
        .map(|k| match near {
            IpAddr::V4(v) => {
                let mut o = v.octets();
                o[3] = o[3].wrapping_add(k);
                IpAddr::from(o)
            }
            IpAddr::V6(v) => {
                let mut o = v.octets();
                o[15] = o[15].wrapping_add(k);
                IpAddr::from(o)
            }
        })
        .find(|ip| !used.contains(ip) && !is_subnet_edge(ip))
}

/// Network and broadcast-looking addresses are left out: they make odd endpoints.
fn is_subnet_edge(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v) => matches!(v.octets()[3], 0 | 255),
        IpAddr::V6(v) => v.octets()[15] == 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new address stays in the neighbourhood and avoids used ones.
    #[test]
    fn fresh_addresses() {
        let used: BTreeSet<IpAddr> = ["10.0.0.1", "10.0.0.2"].iter().map(|s| s.parse().expect("ip")).collect();
        assert_eq!(fresh_address("10.0.0.1".parse().expect("ip"), &used), Some("10.0.0.3".parse().expect("ip")));
        assert_eq!(fresh_address("fd00::ff".parse().expect("ip"), &used), Some("fd00::1".parse().expect("ip")));
    }
}
