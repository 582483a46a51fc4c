//! One kind's watch as a pure state machine: [`KindWatch::step`] turns the watcher's events
//! (already read into engine objects) into [`SourceEvent`]s.
//!
//! The rules, as kube-rs' reflector store applies them:
//! - a list or re-list (`Init`, `InitApply`..., `InitDone`) is buffered and becomes ONE
//!   [`SourceEvent::Snapshot`] at `InitDone`; objects absent from it are gone, even though no
//!   `DELETED` event said so (after a `410 Gone` the deletions in between are lost);
//! - an object that cannot be read is reported and skipped: its last good version stays, in
//!   snapshots too, as a half-written manifest file keeps its last good objects;
//! - an update that changes nothing the engine reads (a Node's heartbeat, a status field) is
//!   dropped here, so it never wakes the sync loop.

use std::collections::BTreeMap;

use switchyard_engine::cluster::ObjectRef;
use switchyard_engine::input::Object;

use super::objects::ObjectError;
use super::{Kind, SourceEvent};

/// One object as read from the API: its reference, and the engine object, nothing (ignored, as
/// kube-proxy ignores it), or why it cannot be read.
pub type Read = (ObjectRef, Result<Option<Object>, ObjectError>);

/// What the watcher said, with objects already read.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchInput {
    /// A (re-)list starts.
    Init,
    InitApply(Read),
    /// The list is complete.
    InitDone,
    /// Added or modified while watching.
    Apply(Read),
    Deleted(ObjectRef),
    /// The watch failed (it is retried after a backoff).
    Error(String),
}

/// The state of one kind's watch.
#[derive(Debug, Clone)]
pub struct KindWatch {
    kind: Kind,
    /// The last good version of every object of this kind the engine has been told about.
    known: BTreeMap<ObjectRef, Object>,
    /// A re-list in progress.
    relist: Option<BTreeMap<ObjectRef, Object>>,
}

impl KindWatch {
    pub fn new(kind: Kind) -> Self {
        KindWatch { kind, known: BTreeMap::new(), relist: None }
    }

    /// Advances the watch by one input. Pure.
    pub fn step(&mut self, input: WatchInput) -> Vec<SourceEvent> {
        let mut out = Vec::new();
        match input {
            WatchInput::Init => self.relist = Some(BTreeMap::new()),
            WatchInput::InitApply((r, read)) => {
                let kept = self.known.get(&r).cloned();
                let Some(buffer) = self.relist.as_mut() else {
                    // The watcher always says Init first; be safe if it did not.
                    return self.step(WatchInput::Apply((r, read)));
                };
                match read {
                    Ok(Some(o)) => {
                        buffer.insert(r, o);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        if let Some(o) = kept {
                            buffer.insert(r, o);
                        }
                        out.push(SourceEvent::Invalid(e));
                    }
                }
            }
            WatchInput::InitDone => {
                self.known = self.relist.take().unwrap_or_default();
                out.push(SourceEvent::Snapshot { kind: self.kind, objects: self.known.values().cloned().collect() });
            }
            WatchInput::Apply((r, read)) => match read {
                Ok(Some(o)) => {
                    if self.known.get(&r) != Some(&o) {
                        self.known.insert(r, o.clone());
                        out.push(SourceEvent::Apply(o));
                    }
                }
                // It no longer concerns the proxy (e.g. a slice lost its service label).
                Ok(None) => {
                    if self.known.remove(&r).is_some() {
                        out.push(SourceEvent::Delete(r));
                    }
                }
                Err(e) => out.push(SourceEvent::Invalid(e)),
            },
            WatchInput::Deleted(r) => {
                if self.known.remove(&r).is_some() {
                    out.push(SourceEvent::Delete(r));
                }
            }
            WatchInput::Error(message) => {
                out.push(SourceEvent::WatchFailed { kind: self.kind, message });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_engine::input;
    use switchyard_engine::model::ObjectKey;

    fn svc(name: &str, ip: &str) -> Read {
        let text = format!(
            r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"{name}","namespace":"d"}},"spec":{{"clusterIP":"{ip}","ports":[{{"port":80}}]}}}}"#
        );
        let o = input::parse("t", &text).expect("parses").objects.pop();
        (ObjectRef::Service(ObjectKey::new("d", name)), Ok(o))
    }

    fn bad(name: &str) -> Read {
        let e = ObjectError {
            kind: Kind::Service,
            name: format!("d/{name}"),
            resource_version: None,
            field: Some("spec.clusterIP".into()),
            message: "bad".into(),
        };
        (ObjectRef::Service(ObjectKey::new("d", name)), Err(e))
    }

    fn snapshot_names(events: &[SourceEvent]) -> Vec<String> {
        match events {
            [SourceEvent::Snapshot { objects, .. }] => objects
                .iter()
                .map(|o| match o {
                    Object::Service(s) => s.key.name.clone(),
                    _ => String::new(),
                })
                .collect(),
            other => panic!("{other:?}"),
        }
    }

    /// A re-list says nothing until InitDone, then replaces the kind at once: what it did not
    /// list is gone.
    #[test]
    fn relist_is_one_snapshot() {
        let mut w = KindWatch::new(Kind::Service);
        assert!(w.step(WatchInput::Init).is_empty());
        assert!(w.step(WatchInput::InitApply(svc("a", "10.96.0.1"))).is_empty());
        assert!(w.step(WatchInput::InitApply(svc("b", "10.96.0.2"))).is_empty());
        assert_eq!(snapshot_names(&w.step(WatchInput::InitDone)), ["a", "b"]);
        // 410: a re-list in which b is gone and c is new.
        w.step(WatchInput::Init);
        assert!(w.step(WatchInput::InitApply(svc("a", "10.96.0.1"))).is_empty());
        assert!(w.step(WatchInput::InitApply(svc("c", "10.96.0.3"))).is_empty());
        assert_eq!(snapshot_names(&w.step(WatchInput::InitDone)), ["a", "c"]);
        // Deleting b now says nothing: the engine no longer has it.
        assert!(w.step(WatchInput::Deleted(ObjectRef::Service(ObjectKey::new("d", "b")))).is_empty());
    }

    /// An unreadable object is reported and its last good version is kept, while watching and
    /// through a re-list.
    #[test]
    fn bad_object_keeps_last_good() {
        let mut w = KindWatch::new(Kind::Service);
        w.step(WatchInput::Init);
        w.step(WatchInput::InitApply(svc("a", "10.96.0.1")));
        w.step(WatchInput::InitDone);
        let ev = w.step(WatchInput::Apply(bad("a")));
        assert!(matches!(&ev[..], [SourceEvent::Invalid(e)] if e.to_string().contains("field spec.clusterIP")));
        w.step(WatchInput::Init);
        let ev = w.step(WatchInput::InitApply(bad("a")));
        assert!(matches!(&ev[..], [SourceEvent::Invalid(_)]));
        assert_eq!(snapshot_names(&w.step(WatchInput::InitDone)), ["a"]);
        // A bad object never seen before is simply absent.
        w.step(WatchInput::Init);
        w.step(WatchInput::InitApply(bad("z")));
        assert_eq!(snapshot_names(&w.step(WatchInput::InitDone)), Vec::<String>::new());
    }

    /// An update the engine cannot see is dropped; a real one is passed on.
    #[test]
    fn unchanged_updates_are_dropped() {
        let mut w = KindWatch::new(Kind::Service);
        w.step(WatchInput::Init);
        w.step(WatchInput::InitApply(svc("a", "10.96.0.1")));
        w.step(WatchInput::InitDone);
        assert!(w.step(WatchInput::Apply(svc("a", "10.96.0.1"))).is_empty());
        assert!(matches!(&w.step(WatchInput::Apply(svc("a", "10.96.0.9")))[..], [SourceEvent::Apply(_)]));
        let (r, _) = svc("a", "");
        assert_eq!(w.step(WatchInput::Apply((r.clone(), Ok(None)))), [SourceEvent::Delete(r)]);
    }
}
