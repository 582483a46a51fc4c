//! The cluster the agent builds from the source's events, and what changed since the sync loop
//! last looked ([`Changes`], which partial syncs need).
//!
//! Nothing is handed to the sync loop before every kind has been listed once: a first sync
//! with Services but no EndpointSlices yet would reject traffic to every service for a moment
//! (kube-proxy waits for its informers' `HasSynced` the same way).

use std::collections::BTreeSet;

use switchyard_engine::cluster::{Cluster, ObjectRef};
use switchyard_engine::input::Object;
use switchyard_engine::model::{ObjectKey, ProxyConfig};

use super::{Kind, SourceEvent};
use crate::source;
use crate::sync::Changes;

/// The watched cluster, and the changes not yet taken.
#[derive(Debug, Clone)]
pub struct Feed {
    cluster: Cluster,
    listed: BTreeSet<Kind>,
    pending: Changes,
    /// Whether the cluster differs from the last one taken (or none was taken yet).
    dirty: bool,
    taken_once: bool,
}

impl Feed {
    /// An empty cluster with the proxy configuration the agent was started with.
    pub fn new(config: ProxyConfig) -> Self {
        let cluster = Cluster { config, ..Cluster::default() };
        Feed { cluster, listed: BTreeSet::new(), pending: Changes::default(), dirty: true, taken_once: false }
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Whether every kind has been listed at least once.
    pub fn ready(&self) -> bool {
        Kind::ALL.iter().all(|k| self.listed.contains(k))
    }

    /// The kinds not listed yet.
    pub fn waiting_for(&self) -> Vec<Kind> {
        Kind::ALL.iter().copied().filter(|k| !self.listed.contains(k)).collect()
    }

    /// Applies one event to the cluster. Reports (invalid objects, failed watches) change nothing.
    pub fn apply(&mut self, event: SourceEvent) {
        match event {
            SourceEvent::Snapshot { kind, objects } => {
                let mut next = self.cluster.clone();
                match kind {
                    Kind::Service => next.services.clear(),
                    Kind::EndpointSlice => next.endpoint_slices.clear(),
                    Kind::Node => next.nodes.clear(),
                }
                for o in objects {
                    next.apply(o);
                }
                self.listed.insert(kind);
                self.merge(source::diff(&self.cluster, &next));
                self.cluster = next;
            }
            SourceEvent::Apply(o) => {
                let mut c = Changes::default();
                match &o {
                    Object::Service(s) => {
                        c.services.insert(s.key.clone());
                    }
                    Object::EndpointSlice(s) => {
                        // A slice can move to another service (its label changed): both change.
                        if let Some(old) = Cluster::service_of(&ObjectRef::EndpointSlice(s.key.clone()), &self.cluster)
                        {
                            c.endpoints.insert(old);
                        }
                        c.endpoints.insert(ObjectKey::new(s.key.namespace.clone(), s.service.clone()));
                    }
                    _ => c.all = true,
                }
                self.cluster.apply(o);
                self.merge(c);
            }
            SourceEvent::Delete(r) => {
                let mut c = Changes::default();
                match (&r, Cluster::service_of(&r, &self.cluster)) {
                    (ObjectRef::Service(k), _) => {
                        c.services.insert(k.clone());
                    }
                    (_, Some(k)) => {
                        c.endpoints.insert(k);
                    }
                    _ => c.all = true,
                }
                if self.cluster.delete(&r) {
                    self.merge(c);
                }
            }
            SourceEvent::Invalid(_) | SourceEvent::WatchFailed { .. } => {}
        }
    }

    fn merge(&mut self, c: Changes) {
        if c.is_empty() {
            return;
        }
        self.dirty = true;
        self.pending.services.extend(c.services);
        self.pending.endpoints.extend(c.endpoints);
        self.pending.all |= c.all;
    }

    /// The cluster and what changed since the last call, once every kind is listed and only
    /// when something changed (the first call always answers).
    pub fn take(&mut self) -> Option<(Box<Cluster>, Changes)> {
        if !self.ready() || (!self.dirty && self.taken_once) {
            return None;
        }
        self.dirty = false;
        self.taken_once = true;
        Some((Box::new(self.cluster.clone()), std::mem::take(&mut self.pending)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_engine::input;

    fn objects(yaml: &str) -> Vec<Object> {
        input::parse("t.yaml", yaml).expect("parses").objects
    }

    fn svc(name: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: d}}\nspec:\n  clusterIP: 10.96.0.1\n  ports: [{{port: 80}}]\n---\n"
        )
    }

    fn slice(name: &str, service: &str) -> String {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: d\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv4\nendpoints: [{{addresses: [10.244.0.1]}}]\nports: [{{port: 80}}]\n---\n"
        )
    }

    fn listed() -> Feed {
        let mut f = Feed::new(ProxyConfig::default());
        f.apply(SourceEvent::Snapshot { kind: Kind::Service, objects: objects(&(svc("a") + &svc("b"))) });
        assert!(f.take().is_none(), "not before every kind is listed");
        f.apply(SourceEvent::Snapshot { kind: Kind::EndpointSlice, objects: objects(&slice("a-1", "a")) });
        assert_eq!(f.waiting_for(), [Kind::Node]);
        f.apply(SourceEvent::Snapshot { kind: Kind::Node, objects: Vec::new() });
        let (c, _) = f.take().expect("listed");
        assert_eq!(c.services.len(), 2);
        assert!(f.take().is_none(), "nothing new");
        f
    }

    /// A slice moving from one service to another changes both services' endpoints.
    #[test]
    fn moved_slice_changes_both() {
        let mut f = listed();
        for o in objects(&slice("a-1", "b")) {
            f.apply(SourceEvent::Apply(o));
        }
        let (_, changes) = f.take().expect("changed");
        let want: BTreeSet<_> = [ObjectKey::new("d", "a"), ObjectKey::new("d", "b")].into();
        assert_eq!(changes, Changes { endpoints: want, ..Changes::default() });
    }

    /// A re-list's snapshot changes exactly what differs; deleting the unknown changes nothing.
    #[test]
    fn snapshot_diff_and_deletes() {
        let mut f = listed();
        f.apply(SourceEvent::Snapshot { kind: Kind::Service, objects: objects(&svc("a")) });
        let (c, changes) = f.take().expect("changed");
        assert_eq!(c.services.len(), 1);
        assert_eq!(changes, Changes { services: [ObjectKey::new("d", "b")].into(), ..Changes::default() });
        f.apply(SourceEvent::Delete(ObjectRef::Service(ObjectKey::new("d", "b"))));
        assert!(f.take().is_none());
        f.apply(SourceEvent::Delete(ObjectRef::EndpointSlice(ObjectKey::new("d", "a-1"))));
        let (_, changes) = f.take().expect("changed");
        assert_eq!(changes.endpoints, [ObjectKey::new("d", "a")].into());
    }
}
