//! The cluster's state as one value: what a watch, a manifests folder or the demo scenario has said
//! so far. Objects are applied and deleted one at a time; a re-list replaces the whole state at once.
//! A source that knows what it changed hands on [`Delta`]s, so that the loops downstream patch their
//! copy of the cluster instead of comparing two whole clusters.

use std::collections::{BTreeMap, BTreeSet};

use crate::input::Object;
use crate::model::*;

impl Object {
    /// How to delete it; `None` for the proxy configuration, which is replaced, never deleted.
    pub fn reference(&self) -> Option<ObjectRef> {
        Some(match self {
            Object::Service(s) => ObjectRef::Service(s.key.clone()),
            Object::EndpointSlice(s) => ObjectRef::EndpointSlice(s.key.clone()),
            Object::Endpoints { key, .. } => ObjectRef::Endpoints(key.clone()),
            Object::Node(n) => ObjectRef::Node(n.name.clone()),
            Object::ServiceCidr(c) => ObjectRef::ServiceCidr(c.name.clone()),
            Object::ProxyConfig(_) => return None,
        })
    }
}

/// Identifies one object for deletion.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ObjectRef {
    Service(ObjectKey),
    EndpointSlice(ObjectKey),
    /// A legacy `Endpoints` object (named like its Service).
    Endpoints(ObjectKey),
    Node(String),
    ServiceCidr(String),
}

/// One object's change: what it was and what it is now (`None`: absent). The proxy configuration
/// is absent when it is the default one.
#[derive(Debug, Clone, PartialEq)]
pub struct Delta {
    pub before: Option<Object>,
    pub after: Option<Object>,
}

impl Delta {
    /// The object it is about (`None`: the proxy configuration).
    pub fn reference(&self) -> Option<ObjectRef> {
        self.after.as_ref().or(self.before.as_ref()).and_then(Object::reference)
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cluster {
    pub services: BTreeMap<ObjectKey, Service>,
    pub endpoint_slices: BTreeMap<ObjectKey, EndpointSlice>,
    pub legacy_endpoints: BTreeMap<ObjectKey, Vec<EndpointSlice>>,
    pub nodes: BTreeMap<String, Node>,
    pub service_cidrs: BTreeMap<String, ServiceCidr>,
    pub config: ProxyConfig,
}

impl Cluster {
    pub fn from_objects(objects: impl IntoIterator<Item = Object>) -> Self {
        let mut c = Cluster::default();
        for o in objects {
            c.apply(o);
        }
        c
    }

    /// Every object, in a stable order (nodes, CIDRs, services, slices, legacy endpoints, config):
    /// `Cluster::from_objects(c.objects()) == c`.
    pub fn objects(&self) -> Vec<Object> {
        let mut out = Vec::with_capacity(
            self.nodes.len() + self.service_cidrs.len() + self.services.len() + self.endpoint_slices.len() + 1,
        );
        out.extend(self.nodes.values().cloned().map(Object::Node));
        out.extend(self.service_cidrs.values().cloned().map(Object::ServiceCidr));
        out.extend(self.services.values().cloned().map(Object::Service));
        out.extend(self.endpoint_slices.values().cloned().map(Object::EndpointSlice));
        out.extend(self.legacy_endpoints.iter().map(|(k, s)| Object::Endpoints { key: k.clone(), subsets: s.clone() }));
        if self.config != ProxyConfig::default() {
            out.push(Object::ProxyConfig(self.config.clone()));
        }
        out
    }

    /// Adds or replaces one object.
    pub fn apply(&mut self, object: Object) {
        match object {
            Object::Service(s) => {
                self.services.insert(s.key.clone(), s);
            }
            Object::Endpoints { key, subsets } => {
                self.legacy_endpoints.insert(key, subsets);
            }
            Object::EndpointSlice(s) => {
                self.endpoint_slices.insert(s.key.clone(), s);
            }
            Object::Node(n) => {
                self.nodes.insert(n.name.clone(), n);
            }
            Object::ServiceCidr(c) => {
                self.service_cidrs.insert(c.name.clone(), c);
            }
            Object::ProxyConfig(c) => self.config = c,
        }
    }

    /// The object `r` names (`None`: the proxy configuration, absent when it is the default).
    pub fn get(&self, r: Option<&ObjectRef>) -> Option<Object> {
        match r {
            Some(ObjectRef::Service(k)) => self.services.get(k).cloned().map(Object::Service),
            Some(ObjectRef::EndpointSlice(k)) => self.endpoint_slices.get(k).cloned().map(Object::EndpointSlice),
            Some(ObjectRef::Endpoints(k)) => {
                self.legacy_endpoints.get(k).map(|s| Object::Endpoints { key: k.clone(), subsets: s.clone() })
            }
            Some(ObjectRef::Node(n)) => self.nodes.get(n).cloned().map(Object::Node),
            Some(ObjectRef::ServiceCidr(n)) => self.service_cidrs.get(n).cloned().map(Object::ServiceCidr),
            None => (self.config != ProxyConfig::default()).then(|| Object::ProxyConfig(self.config.clone())),
        }
    }

    /// Applies one change: the object becomes `after`, or goes.
    pub fn patch(&mut self, d: Delta) {
        match (d.after, d.before) {
            (Some(o), _) => self.apply(o),
            (None, Some(Object::ProxyConfig(_))) => self.config = ProxyConfig::default(),
            (None, Some(o)) => {
                if let Some(r) = o.reference() {
                    self.delete(&r);
                }
            }
            (None, None) => {}
        }
    }

    /// Removes one object; returns whether it was there.
    pub fn delete(&mut self, r: &ObjectRef) -> bool {
        match r {
            ObjectRef::Service(k) => self.services.remove(k).is_some(),
            ObjectRef::EndpointSlice(k) => self.endpoint_slices.remove(k).is_some(),
            ObjectRef::Endpoints(k) => self.legacy_endpoints.remove(k).is_some(),
            ObjectRef::Node(n) => self.nodes.remove(n).is_some(),
            ObjectRef::ServiceCidr(n) => self.service_cidrs.remove(n).is_some(),
        }
    }

    /// The EndpointSlices of every service, by service. A service with no real slice falls back
    /// to its legacy `Endpoints` object, as the contract says.
    pub fn slices_by_service(&self) -> BTreeMap<ObjectKey, Vec<&EndpointSlice>> {
        let mut by: BTreeMap<ObjectKey, Vec<&EndpointSlice>> = BTreeMap::new();
        for s in self.endpoint_slices.values() {
            by.entry(ObjectKey::new(s.key.namespace.clone(), s.service.clone())).or_default().push(s);
        }
        for (k, subsets) in &self.legacy_endpoints {
            by.entry(k.clone()).or_insert_with(|| subsets.iter().collect());
        }
        by
    }

    /// The EndpointSlices of the given services only, as [`Cluster::slices_by_service`] gives them
    /// (legacy `Endpoints` when a service has no real slice); services with none are left out.
    ///
    /// Slices are keyed by their own name, not by their service, so this walks the slices of the
    /// services' namespaces (one string comparison each, nothing allocated): a partial sync of a
    /// few services must not group the 10,000 others' slices as `slices_by_service` does.
    pub fn slices_of<'a>(
        &'a self,
        services: &'a BTreeSet<ObjectKey>,
    ) -> BTreeMap<&'a ObjectKey, Vec<&'a EndpointSlice>> {
        let mut by: BTreeMap<&ObjectKey, Vec<&EndpointSlice>> = BTreeMap::new();
        let mut namespaces: BTreeMap<&str, BTreeMap<&str, &ObjectKey>> = BTreeMap::new();
        for k in services {
            namespaces.entry(k.namespace.as_str()).or_default().insert(k.name.as_str(), k);
        }
        for (ns, names) in &namespaces {
            let from = ObjectKey::new(*ns, "");
            for (_, s) in self.endpoint_slices.range(from..).take_while(|(k, _)| k.namespace == *ns) {
                if let Some(k) = names.get(s.service.as_str()) {
                    by.entry(k).or_default().push(s);
                }
            }
        }
        for k in services {
            if let (false, Some(subsets)) = (by.contains_key(k), self.legacy_endpoints.get(k)) {
                by.insert(k, subsets.iter().collect());
            }
        }
        by
    }

    /// The key of the service that owns an object, for change tracking.
    pub fn service_of(r: &ObjectRef, cluster: &Cluster) -> Option<ObjectKey> {
        match r {
            ObjectRef::Service(k) | ObjectRef::Endpoints(k) => Some(k.clone()),
            ObjectRef::EndpointSlice(k) => {
                cluster.endpoint_slices.get(k).map(|s| ObjectKey::new(k.namespace.clone(), s.service.clone()))
            }
            _ => None,
        }
    }
}
